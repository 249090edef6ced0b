"""Filter grids, activation maps, top-activating patches and their receptive fields."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.analysis import feature_maps as fm
from cnn_jax.analysis import layers, tables
from cnn_jax.nn import AvgPool, Conv, MaxPool


@pytest.fixture(autouse=True)
def _fast(fast_compile):
  del fast_compile
  yield


def _init(model, shape):
  """Variables as NumPy arrays (a jitted init compiles far faster than eager ops)."""
  init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))
  return jax.tree_util.tree_map(np.asarray, init(jnp.zeros((1,) + tuple(shape))))


def _outputs(model, variables, x, name):
  run = jax.jit(lambda v, x: layers.layer_outputs(model, v, x, [name])[name])
  return np.asarray(run(variables, jnp.asarray(x)))


def _png_ok(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
  assert float(image[..., :3].std()) > 0   # not a blank canvas


# ----------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------

def _tiles(grid, n, h, w, ncols):
  return [grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w]
          for r, c in (divmod(i, ncols) for i in range(n))]


def test_filter_grid_gray_each_tile_scaled_on_its_own():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 5)).astype(np.float32)
  kernel[..., 4] = 0.3                       # a constant filter
  grid = fm.filter_grid(kernel)
  assert grid.shape == (2 * 4 - 1, 3 * 4 - 1)   # 3 per row, 2 rows, 1-pixel separators
  tiles = _tiles(grid, 5, 3, 3, 3)
  for o in range(4):
    k = kernel[..., 0, o]
    np.testing.assert_allclose(tiles[o], (k - k.min()) / (k.max() - k.min()), atol=1e-6)
    assert tiles[o].min() == 0.0 and tiles[o].max() == 1.0
  np.testing.assert_array_equal(tiles[4], 0.5)
  assert np.all(grid[3, :] == 1.0) and np.all(grid[:, 3] == 1.0)   # separators
  assert np.all(grid[4:, 8:] == 1.0)                                   # the empty 6th slot


def test_filter_grid_rgb_and_1d():
  kernel = np.random.default_rng(1).normal(size=(5, 5, 3, 4)).astype(np.float32)
  grid = fm.filter_grid(kernel)
  assert grid.shape == (11, 11, 3)
  for o, tile in enumerate(_tiles(grid, 4, 5, 5, 2)):
    k = kernel[..., o]
    np.testing.assert_allclose(tile, (k - k.min()) / (k.max() - k.min()), atol=1e-6)
  # Mean over input channels when C_in is neither 1 nor 3.
  k4 = np.random.default_rng(2).normal(size=(3, 3, 4, 2)).astype(np.float32)
  m = k4[..., 1].mean(axis=2)
  np.testing.assert_allclose(_tiles(fm.filter_grid(k4), 2, 3, 3, 2)[1],
                             (m - m.min()) / (m.max() - m.min()), atol=1e-6)
  # 1-D: one (C_in, k) block per output channel, stacked.
  k1 = np.random.default_rng(3).normal(size=(5, 2, 3)).astype(np.float32)
  grid1 = fm.filter_grid(k1)
  assert grid1.shape == (3 * 3 - 1, 5)
  np.testing.assert_allclose(grid1[3:5], (k1[:, :, 1].T - k1[:, :, 1].min())
                             / np.ptp(k1[:, :, 1]), atol=1e-6)
  with pytest.raises(ValueError, match='3-D conv kernels are not drawn'):
    fm.filter_grid(np.zeros((2, 2, 2, 1, 4)))


def test_first_layer_filters_and_plot(tmp_path):
  model = models.get_model('ablation_cnn_tiny')
  variables = _init(model, (16, 16, 1))
  kernel = fm.first_layer_filters(variables)
  assert kernel.shape == (3, 3, 1, 4)
  np.testing.assert_array_equal(kernel, variables['params']['stage1_conv1']['kernel'])
  by_order = fm.first_layer_filters(variables, model=model, input_shape=(16, 16, 1))
  np.testing.assert_array_equal(by_order, kernel)
  assert fm.first_layer_filters(variables['params'], 'stage2_conv1').shape == (3, 3, 4, 8)
  with pytest.raises(ValueError, match="'fc' has a 2-D kernel"):
    fm.first_layer_filters(variables, 'fc')
  with pytest.raises(ValueError, match='no layer named'):
    fm.first_layer_filters(variables, 'conv9')
  with pytest.raises(ValueError, match='no conv kernel'):
    fm.first_layer_filters({'params': {'fc': {'kernel': np.zeros((3, 2))}}})
  _png_ok(fm.plot_filters(kernel, str(tmp_path / 'f' / 'filters.png')))
  rgb = np.random.default_rng(0).normal(size=(5, 5, 3, 6))
  _png_ok(fm.plot_filters(rgb, str(tmp_path / 'rgb.png'), title='rgb'))
  _png_ok(fm.plot_filters(np.random.default_rng(0).normal(size=(5, 2, 4)),
                          str(tmp_path / 'f1d.png')))


# ----------------------------------------------------------------------------
# Receptive field geometry
# ----------------------------------------------------------------------------

class _Linear(nn.Module):
  """Positive weights, average pools, no nonlinearity: the gradient of a unit is
  positive exactly on the input pixels its field covers."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    ones = nn.initializers.ones
    x = Conv(1, (3, 3), strides=2, padding='SAME', kernel_init=ones, name='c1')(x)
    x = AvgPool(3, strides=1, padding='SAME', name='p1')(x)
    x = Conv(1, (3, 3), kernel_dilation=2, padding=((2, 1), (0, 2)), kernel_init=ones,
             name='c2')(x)
    x = nn.relu(x)   # made outside a layer: inherits the field of c2
    return Conv(1, (2, 2), strides=(1, 2), padding='VALID', kernel_init=ones, name='c3')(x)


def test_field_geometry_matches_gradient_support_and_summary():
  model, shape = _Linear(), (11, 12, 1)
  geometry = fm.field_geometry(model, shape)
  assert geometry['c1'] == fm.FieldGeometry((3, 3), (2, 2), (-1, 0))   # SAME: pads (1,1)/(0,1)
  rows = {r['name']: r for r in tables.summary(model, shape, print_table=False)}
  for name in ('c1', 'p1', 'c2', 'c3'):
    assert geometry[name].size == tuple(rows[name]['receptive_field'])
    assert geometry[name].jump == tuple(rows[name]['jump'])
  variables = _init(model, shape)
  x = jnp.ones((1,) + shape)
  for name in ('c1', 'p1', 'c2', 'c3'):
    def outputs(x, name=name):
      return layers.layer_outputs(model, variables, x, [name])[name][0, ..., 0]
    jacobian = np.asarray(jax.jit(jax.jacrev(outputs))(x))[..., 0]   # (h, w, 1, H, W)
    h, w = jacobian.shape[:2]
    for unit in [(0, 0), (h - 1, w - 1), (h // 2, 1)]:
      support = jacobian[unit][0] > 0
      expected = np.zeros(shape[:2], bool)
      (y0, y1), (x0, x1) = geometry[name].box(unit)
      expected[max(y0, 0):y1, max(x0, 0):x1] = True
      np.testing.assert_array_equal(support, expected, err_msg=f'{name} unit {unit}')


@pytest.mark.parametrize('name', ['ablation_cnn_tiny', 'vgg_tiny', 'resnet_tiny'])
def test_field_geometry_agrees_with_summary_on_models(name):
  info = models.model_info(name)
  model = models.get_model(name)
  geometry = fm.field_geometry(model, info.input_shape)
  rows = tables.summary(model, info.input_shape, print_table=False)[:-1]
  names = [n for n, _, _ in layers.list_layers(model, info.input_shape)]
  checked = 0
  for layer_name, row in zip(names, rows):
    g = geometry[layer_name]
    if g is not None:
      assert (g.size, g.jump) == (tuple(row['receptive_field']), tuple(row['jump']))
      checked += 1
  assert checked >= 4
  if name == 'ablation_cnn_tiny':   # 'same' 3x3 convs and 2x2 pools
    assert geometry['stage1_conv2'] == fm.FieldGeometry((5, 5), (1, 1), (-2, -2))
    assert geometry['stage2_conv1'] == fm.FieldGeometry((10, 10), (2, 2), (-4, -4))


# ----------------------------------------------------------------------------
# Top-activating patches on a hand-built model
# ----------------------------------------------------------------------------

class _Probe(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = Conv(2, (3, 3), padding='SAME', name='conv1')(x)
    x = MaxPool(2, strides=2, name='pool')(x)
    x = Conv(1, (3, 3), padding='VALID', name='conv2')(x)
    return x.mean(axis=(1, 2))


def _probe():
  """conv1 channel 0 copies the input, channel 1 sums its 3x3 neighbourhood."""
  model = _Probe()
  variables = _init(model, (8, 8, 1))
  k1 = np.zeros((3, 3, 1, 2), np.float32)
  k1[1, 1, 0, 0] = 1.0
  k1[:, :, 0, 1] = 1.0
  variables['params']['conv1'] = {'kernel': k1, 'bias': np.zeros(2, np.float32)}
  variables['params']['conv2'] = {'kernel': np.ones((3, 3, 2, 1), np.float32),
                                  'bias': np.zeros(1, np.float32)}
  images = np.random.default_rng(0).uniform(0, 0.1, size=(6, 8, 8, 1)).astype(np.float32)
  images[3, 5, 6, 0] = 1.0    # the brightest spot
  images[1, 2, 1, 0] = 0.8    # two spots in image 1
  images[1, 6, 6, 0] = 0.7
  images[4, 0, 0, 0] = 0.6    # a spot in the corner
  return model, variables, images


def _check_values_against_layer_outputs(model, variables, images, res):
  out = _outputs(model, variables, images, res.layer)
  for i, c in enumerate(res.channels):
    for value, pos in zip(res.values[i], res.positions[i]):
      assert value == out[(pos[0],) + tuple(pos[1:]) + (c,)]
    # one_per_image: each kept value is its image's maximum, in decreasing order.
    if res.one_per_image:
      best = out[..., c].reshape(len(images), -1).max(axis=1)
      np.testing.assert_array_equal(np.sort(best)[::-1][:len(res.values[i])], res.values[i])


def test_top_patches_identity_filter_finds_the_spot():
  model, variables, images = _probe()
  res = fm.top_activating_patches(model, variables, images, 'conv1', [0], k=4,
                                  batch_size=4)
  assert res.layer == 'conv1' and res.field == fm.FieldGeometry((3, 3), (1, 1), (-1, -1))
  np.testing.assert_array_equal(res.positions[0, :3], [[3, 5, 6], [1, 2, 1], [4, 0, 0]])
  np.testing.assert_array_equal(res.values[0, :3], np.float32([1.0, 0.8, 0.6]))
  assert len(set(res.positions[0, :, 0].tolist())) == 4     # one per image
  assert res.patches.shape == (1, 4, 3, 3, 1)
  np.testing.assert_array_equal(res.patches[0, 0], images[3, 4:7, 5:8])
  np.testing.assert_array_equal(res.patches[0, 1], images[1, 1:4, 0:3])
  # The corner spot: the window starts one pixel outside; zeros there, box clipped.
  corner = np.zeros((3, 3, 1), np.float32)
  corner[1:, 1:] = images[4, 0:2, 0:2]
  np.testing.assert_array_equal(res.patches[0, 2], corner)
  np.testing.assert_array_equal(res.boxes[0, 2], [[0, 2], [0, 2]])
  np.testing.assert_array_equal(res.boxes[0, 0], [[4, 7], [5, 8]])
  _check_values_against_layer_outputs(model, variables, images, res)


def test_top_patches_several_per_image_and_ties():
  model, variables, images = _probe()
  several = fm.top_activating_patches(model, variables, images, 'conv1', 0, k=3,
                                      one_per_image=False)
  np.testing.assert_array_equal(several.positions[0], [[3, 5, 6], [1, 2, 1], [1, 6, 6]])
  np.testing.assert_array_equal(several.values[0], np.float32([1.0, 0.8, 0.7]))
  _check_values_against_layer_outputs(model, variables, images, several)
  # On a noise-free image the 3x3 box sum ties at the 9 positions around the
  # spot: the earliest (row-major) wins.
  clean = np.zeros((2, 8, 8, 1), np.float32)
  clean[1, 5, 6, 0] = 1.0
  res = fm.top_activating_patches(model, variables, clean, 'conv1', [1], k=2)
  np.testing.assert_array_equal(res.positions[0], [[1, 4, 5], [0, 0, 0]])
  np.testing.assert_array_equal(res.values[0], [1.0, 0.0])


def test_top_patches_deeper_layer_and_batching(tmp_path):
  model, variables, images = _probe()
  res = fm.top_activating_patches(model, variables, images, 'conv2', [0], k=6,
                                  batch_size=64)
  # 3x3 'same' conv, 2x2 pool, 3x3 'valid' conv: field 8, jump 2, start -1.
  assert res.field == fm.FieldGeometry((8, 8), (2, 2), (-1, -1))
  assert res.patches.shape == (1, 6, 8, 8, 1)
  _check_values_against_layer_outputs(model, variables, images, res)
  for pos, patch, box in zip(res.positions[0], res.patches[0], res.boxes[0]):
    img, u, v = pos
    padded = np.pad(images[img], ((1, 8), (1, 8), (0, 0)))   # input coordinate -1 -> 0
    np.testing.assert_array_equal(patch, padded[2 * u:2 * u + 8, 2 * v:2 * v + 8])
    np.testing.assert_array_equal(box, [[max(2 * u - 1, 0), min(2 * u + 7, 8)],
                                        [max(2 * v - 1, 0), min(2 * v + 7, 8)]])
  # Same answer from an iterable of batches, and from loader-style dict batches
  # whose padding rows (mask 0) are skipped.
  batches = [images[:4], images[4:5], images[5:]]
  again = fm.top_activating_patches(model, variables, batches, 'conv2', [0], k=6)
  dicts = [{'image': np.concatenate([images[:4], np.full_like(images[:2], 9.0)]),
            'mask': np.array([1, 1, 1, 1, 0, 0], np.float32)},
           {'image': images[4:], 'mask': np.ones(2, np.float32)}]
  from_dicts = fm.top_activating_patches(model, variables, dicts, 'conv2', [0], k=6)
  for other in (again, from_dicts):
    np.testing.assert_array_equal(other.values, res.values)
    np.testing.assert_array_equal(other.positions, res.positions)
    np.testing.assert_array_equal(other.patches, res.patches)
  _png_ok(fm.plot_top_patches(res, str(tmp_path / 'top.png')))


def test_top_patches_errors():
  model, variables, images = _probe()
  with pytest.raises(ValueError, match=r'channels must be ints in \[0, 2\)'):
    fm.top_activating_patches(model, variables, images, 'conv1', [2])
  with pytest.raises(ValueError, match='no layer named'):
    fm.top_activating_patches(model, variables, images, 'conv3', [0])
  with pytest.raises(ValueError, match='k must be a positive int'):
    fm.top_activating_patches(model, variables, images, 'conv1', [0], k=0)
  with pytest.raises(ValueError, match='no images'):
    fm.top_activating_patches(model, variables, [], 'conv1', [0])


# ----------------------------------------------------------------------------
# Real models: activation maps, top patches, 1-D
# ----------------------------------------------------------------------------

def test_activation_maps_and_top_patches_on_a_model(tmp_path):
  model = models.get_model('ablation_cnn_tiny')
  variables = _init(model, (16, 16, 1))
  images = np.random.default_rng(0).uniform(size=(10, 16, 16, 1)).astype(np.float32)
  path = fm.plot_activation_maps(model, variables, images[0],
                                 ['stage1_conv1', 'stage1_bn2', 'stage2_conv2'],
                                 str(tmp_path / 'maps.png'), max_channels=4)
  _png_ok(path)
  with pytest.raises(ValueError, match='no spatial maps'):
    fm.plot_activation_maps(model, variables, images[:1], ['fc'], str(tmp_path / 'x.png'))
  res = fm.top_activating_patches(model, variables, images, 'stage2_conv1', [0, 5], k=3,
                                  batch_size=4)
  assert res.patches.shape == (2, 3, 10, 10, 1)
  _check_values_against_layer_outputs(model, variables, images, res)
  _png_ok(fm.plot_top_patches(res, str(tmp_path / 'top.png')))


def test_one_dimensional_model(tmp_path):
  model = models.get_model('cnn1d_tiny')
  variables = _init(model, (16, 1))
  signals = np.random.default_rng(0).normal(size=(5, 16, 1)).astype(np.float32)
  res = fm.top_activating_patches(model, variables, signals, 'conv1', None, k=2)
  size = res.field.size[0]
  assert res.patches.shape == (4, 2, size, 1) and res.positions.shape == (4, 2, 2)
  _check_values_against_layer_outputs(model, variables, signals, res)
  _png_ok(fm.plot_top_patches(res, str(tmp_path / 'top1d.png')))
  _png_ok(fm.plot_activation_maps(model, variables, signals[0], ['conv1', 'conv2'],
                                  str(tmp_path / 'maps1d.png')))
  kernel = fm.first_layer_filters(variables)
  assert kernel.ndim == 3
  _png_ok(fm.plot_filters(kernel, str(tmp_path / 'filters1d.png')))


# ----------------------------------------------------------------------------
# Real images
# ----------------------------------------------------------------------------

def test_dataset_images_and_run_images(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  images, labels = fm.dataset_images('digits', 'test', 5, data_dir=data_dir)
  assert images.shape == (5, 32, 32, 1) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0 and labels.shape == (5,)
  later, _ = fm.dataset_images('digits', 'test', 2, data_dir, start=3)
  np.testing.assert_array_equal(later, images[3:])
  small, _ = fm.dataset_images('digits', 'test', 2, data_dir, 'resize(16)')
  assert small.shape == (2, 16, 16, 1)
  with pytest.raises(ValueError, match='draws random numbers'):
    fm.dataset_images('digits', 'test', 2, data_dir, 'flip')
  with pytest.raises(ValueError, match='cannot read'):
    fm.dataset_images('digits', 'test', 2, data_dir, start=10**6)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(dict(
      dataset='digits', data_dir=data_dir, eval_split='test', eval_transform='resize(16)',
      classes='3,5')))
  run, run_labels = fm.run_images(str(workdir), n=3)
  assert run.shape == (3, 16, 16, 1) and set(run_labels.tolist()) <= {0, 1}
  with pytest.raises(ValueError, match='no config.json'):
    fm.run_images(str(tmp_path))
