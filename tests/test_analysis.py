"""count_params / summary / receptive_field on small models built here."""
import flax.linen as nn
import pytest

from cnn_jax.analysis import count_params, receptive_field, summary
from cnn_jax.nn import Conv


class _TwoConvs(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    x = nn.relu(Conv(4, 3, padding='VALID', name='conv1')(x))
    x = Conv(4, 3, strides=2, padding='VALID', name='conv2')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    x = Conv(4, 3, padding='VALID', name='conv3')(x)
    return nn.Dense(10, name='fc')(x.reshape(x.shape[0], -1))


def test_receptive_field_of_stacked_3x3():
  assert receptive_field([(3, 1, 1)]) == (3, 1)
  assert receptive_field([(3, 1, 1)] * 2) == (5, 1)
  assert receptive_field([(3, 1, 1)] * 3) == (7, 1)
  assert receptive_field([(3, 1, 2)]) == (5, 1)           # dilation 2
  assert receptive_field([(3, 2, 1), (3, 1, 1)]) == (7, 2)
  # The notes' single-channel example: two 3x3 (3*3+1)*2 = 20 params vs one 5x5: 26.
  assert (3 * 3 + 1) * 2 == 20 and 5 * 5 + 1 == 26
  with pytest.raises(ValueError, match='must be >= 1'):
    receptive_field([(0, 1, 1)])


def test_summary_rows_and_totals():
  rows = summary(_TwoConvs(), (11, 11, 1), print_table=False)
  names = [r['name'] for r in rows]
  assert names == ['conv1', 'conv2', 'bn', 'conv3', 'fc', 'Total']
  by = {r['name']: r for r in rows}
  assert by['conv1']['output_shape'] == (9, 9, 4)
  assert (by['conv1']['weights'], by['conv1']['biases']) == (36, 4)
  assert by['conv2']['output_shape'] == (4, 4, 4)
  assert by['conv3']['output_shape'] == (2, 2, 4)
  assert by['bn']['params'] == 8
  assert by['fc']['params'] == 16 * 10 + 10
  assert by['conv1']['flops'] == 9 * 9 * 3 * 3 * 1 * 4
  assert by['conv1']['receptive_field'] == (3, 3)
  assert by['conv2']['receptive_field'] == (5, 5) and by['conv2']['jump'] == (2, 2)
  assert by['conv3']['receptive_field'] == (9, 9)
  assert by['Total']['params'] == 40 + 148 + 8 + 148 + 170


def test_count_params_separates_batch_stats():
  c = count_params(_TwoConvs(), (11, 11, 1))
  assert c.trainable == 40 + 148 + 8 + 148 + 170
  assert c.batch_stats == 8
