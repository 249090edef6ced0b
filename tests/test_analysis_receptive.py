"""Receptive fields: theoretical sizes by hand, ERF supports, extents, the figure."""
import flax.linen as nn
import matplotlib.image
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.analysis import receptive as R
from cnn_jax.nn import Conv

SHAPE = (16, 16, 1)


@pytest.fixture(autouse=True)
def _fast(fast_compile):
  del fast_compile


def _three_3x3():
  """One stage of three 3x3 'same' convs (with BatchNorm and ReLU), no pooling."""
  return models.get_model('ablation_cnn', num_classes=3, kernels=(3, 3, 3), widths=(4,),
                          downsample='none')


class _SharedConv(nn.Module):
  """One 3x3 conv applied twice: the second call is named 'conv:2'."""
  @nn.compact
  def __call__(self, x, *, train):
    del train
    conv = Conv(1, 3, padding='SAME', name='conv')
    return conv(nn.relu(conv(x)))


def _window(centre, size):
  lo = centre - (size - 1) // 2
  return slice(lo, lo + size)


def test_stacked_3x3_convs_see_3_5_7():
  fields = {f.name: f for f in R.theoretical_receptive_fields(_three_3x3(), SHAPE)}
  assert [fields[f'stage1_conv{i}'].rf for i in (1, 2, 3)] == [(3, 3), (5, 5), (7, 7)]
  assert fields['stage1_bn2'].rf == (5, 5)            # BatchNorm mixes no positions
  assert all(f.jump == (1, 1) for f in fields.values())
  assert fields['stage1_conv3'].output_shape == (16, 16, 4)
  assert 'fc' not in fields                            # Dense layers have no field


def test_lenet5_fields_by_hand():
  # c1 5x5: 5; s2 2x2/2: 5 + 1*1 = 6, j 2; c3 5x5: 6 + 4*2 = 14; s4 2x2/2: 14 + 1*2 = 16,
  # j 4; c5 5x5: 16 + 4*4 = 32 - every C5 unit sees the whole 32x32 input.
  fields = R.theoretical_receptive_fields(models.get_model('lenet5'), (32, 32, 1))
  assert [(f.name, f.rf[0], f.jump[0]) for f in fields] == [
      ('c1', 5, 1), ('s2', 6, 2), ('c3', 14, 2), ('s4', 16, 4), ('c5', 32, 4)]
  assert fields[-1].output_shape == (1, 1, 120)


def test_erf_is_nonzero_exactly_inside_the_theoretical_field():
  model = _three_3x3()
  variables = R._init(model, SHAPE, seed=0)   # pylint: disable=protected-access
  for i, size in ((1, 3), (2, 5), (3, 7)):
    erf = R.effective_receptive_field(model, variables, SHAPE, f'stage1_conv{i}',
                                      num_samples=8)
    assert erf.shape == (16, 16) and erf.sum() == pytest.approx(1.0)
    inside = np.zeros((16, 16), bool)
    inside[_window(8, size), _window(8, size)] = True   # centre unit (16 // 2, 16 // 2)
    assert (erf[inside] > 0).all(), f'conv{i}: zero inside the {size}x{size} field'
    assert (erf[~inside] == 0).all(), f'conv{i}: non-zero outside the {size}x{size} field'
    assert 1 <= R.erf_extent(erf) <= size


def test_erf_of_a_module_called_twice_and_of_real_inputs():
  model = _SharedConv()
  names = [f.name for f in R.theoretical_receptive_fields(model, (9, 9, 1))]
  assert names == ['conv', 'conv:2']
  inputs = np.random.default_rng(0).normal(size=(3, 9, 9, 1))
  erf = R.effective_receptive_field(model, None, (9, 9, 1), 'conv:2', inputs=inputs)
  rows, cols = np.nonzero(erf)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 6, 2, 6)   # 5x5 at (4, 4)


def test_erf_extent_on_known_shapes():
  erf = np.zeros((12, 12))
  erf[4:7, 4:7] = 1
  assert R.erf_extent(erf) == 3
  erf = np.zeros((12, 12))
  erf[3:9, 5:11] = 1                     # an even field, off centre
  assert R.erf_extent(erf) == 6
  erf = np.zeros((5, 8))
  erf[2, 3] = 1
  assert R.erf_extent(erf) == 1
  # 95% of a centre-heavy field sits in a square smaller than its support.
  erf = np.ones((9, 9))
  erf[4, 4] = 10_000                     # 99% of the mass
  assert R.erf_extent(erf) == 1 and R.erf_extent(erf, mass=1.0) == 9
  with pytest.raises(ValueError, match='non-negative 2-D'):
    R.erf_extent(-erf)
  with pytest.raises(ValueError, match=r'mass must be in \(0, 1\]'):
    R.erf_extent(erf, mass=0)


def test_field_origin_uses_the_side_the_border_did_not_cut():
  erf = np.zeros((16, 16))
  erf[2:, 5:10] = 1                      # a 16-wide field from row 2, cut at the bottom
  assert R._field_origin(erf, (16, 5)) == (2.0, 5.0)   # pylint: disable=protected-access
  erf = np.zeros((8, 8))
  erf[:5, :] = 1
  assert R._field_origin(erf, (7, 10)) == (-2.0, -1.0)   # pylint: disable=protected-access


def test_errors_name_the_problem():
  model = models.get_model('ablation_cnn_tiny')
  variables = R._init(model, SHAPE, seed=0)   # pylint: disable=protected-access
  with pytest.raises(ValueError, match="layer 'fc' has output shape"):
    R.effective_receptive_field(model, variables, SHAPE, 'fc')
  with pytest.raises(ValueError, match="no layer named 'stage9_conv1'"):
    R.effective_receptive_field(model, variables, SHAPE, 'stage9_conv1')
  with pytest.raises(ValueError, match='inputs must be a batch'):
    R.effective_receptive_field(model, variables, SHAPE, 'stage1_conv1',
                                inputs=np.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match='image input'):
    R.effective_receptive_field(model, variables, (16, 1), 'stage1_conv1')


def test_receptive_field_figure_is_written(tmp_path):
  model = models.get_model('ablation_cnn_tiny')
  path = R.plot_receptive_fields(model, None, SHAPE, tmp_path / 'rf' / 'fields.png',
                                 num_samples=4, dpi=50)
  assert (tmp_path / 'rf' / 'fields.png').stat().st_size > 5000
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[2] == 4 and pixels.shape[0] > 200
  assert pixels[..., :3].std() > 0.05
