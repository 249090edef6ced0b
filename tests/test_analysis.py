"""count_params / summary / receptive_field on small models built here."""
import flax.linen as nn
import pytest

import jax.numpy as jnp

from cnn_jax.analysis import count_params, model_summary, parse_shape, receptive_field, summary
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


class _Branches(nn.Module):
  """Two parallel branches read one concatenated input, like an Inception block."""
  @nn.compact
  def __call__(self, x, *, train):
    a = Conv(2, 3, padding='SAME', name='a')(x)
    b = Conv(2, 5, padding='SAME', name='b')(x)
    x = jnp.concatenate([a, b], axis=-1)          # made outside any layer
    c = Conv(2, 1, name='c')(x)
    d = Conv(2, 3, padding='SAME', name='d')(x)
    return nn.Dense(3, name='fc')(jnp.concatenate([c, d], -1).reshape(x.shape[0], -1))


def test_receptive_field_through_concatenations_takes_the_deepest_path():
  rows = summary(_Branches(), (9, 9, 1), print_table=False)
  rf = {r['name']: r['receptive_field'] for r in rows}
  assert rf['a'] == (3, 3) and rf['b'] == (5, 5)
  # Both branches of the second block see the concat, whose field is 5x5;
  # d (computed after c) must not see c's output as its input.
  assert rf['c'] == (5, 5) and rf['d'] == (7, 7)


def test_model_summary_and_shape_parsing(capsys):
  rows = model_summary('lenet5', print_table=True)
  assert rows[-1]['params'] == 61_706
  assert 'lenet5 (lenet), input 32x32x1' in capsys.readouterr().out
  assert parse_shape('227,227,3') == (227, 227, 3) and parse_shape('40x1') == (40, 1)
  with pytest.raises(ValueError, match='positive ints'):
    parse_shape('a,b')
  with pytest.raises(ValueError, match="unknown model 'lenet6'. Did you mean 'lenet5'"):
    model_summary('lenet6')
