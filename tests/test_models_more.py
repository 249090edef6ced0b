"""MobileNet v1/v2, DenseNet-BC, highway nets and the 1-D sequence CNNs.

Counts are pinned to torchvision where it has the model (MobileNet v2,
DenseNet-121/161/169/201) and otherwise to the exact count of the described
architecture, computed with jax.eval_shape so no full-size model is built.
Each family has one real train-mode step on a tiny variant, with
cnn_jax.nn.Conv and flax.linen.Conv on identical parameters.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.analysis import count_params
from cnn_jax.models import densenet, highway, mobilenet, registry, sequence
from model_testing import check_train_step_ours_vs_flax, random_variables as _random_variables

# Trainable parameters (BN scale and bias included, running statistics not).
PARAMS = {
    # Howard et al. 2017 Table 6/7 give 4.2M / 2.6M / 1.3M / 0.5M for alpha =
    # 1, 0.75, 0.5, 0.25 at 224: convs without bias, BN after each, fc with bias.
    'mobilenet_v1': 4_231_976,
    'mobilenet_v1_075': 2_585_560,
    'mobilenet_v1_050': 1_331_592,
    'mobilenet_v1_025': 470_072,
    'mobilenet_v2': 3_504_872,          # torchvision mobilenet_v2
    'mobilenet_v2_050': 1_968_680,      # 2.0M; the last conv keeps 1280 below multiplier 1
    'densenet121': 7_978_856,           # torchvision
    'densenet169': 14_149_480,          # torchvision
    'densenet201': 20_013_928,          # torchvision
    'densenet161': 28_681_000,          # torchvision
    # 784*50+50 + 10 * 2 * (50*50+50) + 50*10+10.
    'highway_mlp': 90_760,
    # stem 896; 3 x 2 x 3x3 convs at 32/64/128 (55,488 + 221,568 + 885,504);
    # transitions 18,496 + 73,856; fc 1,290.
    'highway_cnn': 1_257_098,
    # 3 convs k5: 192 + 5,152 + 5,152; flatten 10 x 32 = 320 -> fc 3,210.
    'cnn1d': 13_706,
    # embed 20,000 x 128 = 2,560,000; convs (3+4+5) x 128 x 100 + 300; fc 602.
    'textcnn': 2_714_502,
    'mobilenet_v1_tiny': 1_114,
    'mobilenet_v2_tiny': 1_690,
    'densenet_tiny': 2_698,
    'highway_mlp_tiny': 898,
    'highway_cnn_tiny': 1_962,
    'cnn1d_tiny': 362,
    'textcnn_tiny': 586,
}
BATCH_STATS = {'mobilenet_v1': 21_888, 'mobilenet_v2': 34_112, 'densenet121': 83_648,
               'densenet201': 229_056}
FAMILIES = ('mobilenet', 'densenet', 'highway', 'sequence')
INT_INPUT = {'textcnn', 'textcnn_tiny'}


def _size(tree):
  return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def _abstract(name):
  """(logits shape, variables incl. 'intermediates') of a batch of 2, as shapes."""
  entry = registry.model_info(name)
  model = registry.get_model(name)
  dtype = jnp.int32 if name in INT_INPUT else jnp.float32
  x = jax.ShapeDtypeStruct((2,) + entry.input_shape, dtype)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(rngs, x, train=False, mutable=True), x)
  return out.shape, variables


def test_registered_names():
  names = {n for f in FAMILIES for n in registry.list_models(f)}
  assert names == set(PARAMS)
  assert registry.model_info('textcnn').input_shape == (64,)
  assert registry.model_info('cnn1d').input_shape == (40, 1)


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_counts_and_output_shapes(name):
  entry = registry.model_info(name)
  shape, variables = _abstract(name)
  assert shape == (2, entry.num_classes)
  assert _size(variables['params']) == PARAMS[name]
  if name in BATCH_STATS:
    assert _size(variables['batch_stats']) == BATCH_STATS[name]


def test_count_params_works_for_every_family():
  # count_params traces with a float input; TextCNN casts it to token ids.
  for name in ('mobilenet_v2_tiny', 'densenet_tiny', 'highway_cnn_tiny', 'textcnn'):
    count = count_params(registry.get_model(name), registry.model_info(name).input_shape)
    assert count.trainable == PARAMS[name]
  assert count.batch_stats == 0


def test_make_divisible_rounds_as_torchvision():
  assert [mobilenet.make_divisible(v) for v in (32, 16, 12, 5.6, 1280, 20)] == [
      32, 16, 16, 8, 1280, 24]
  # Never more than 10% below the requested width: 76 -> 72 would be, so 80.
  assert mobilenet.make_divisible(76, 16) == 80


def test_mobilenet_layout():
  shape_of = lambda v: {k: x[0].shape for k, x in v['intermediates'].items()}
  _, v2 = _abstract('mobilenet_v2')
  shapes = shape_of(v2)
  assert shapes['stem'] == (2, 112, 112, 32)
  assert [shapes[f'stage{i}'] for i in range(1, 8)] == [
      (2, 112, 112, 16), (2, 56, 56, 24), (2, 28, 28, 32), (2, 14, 14, 64),
      (2, 14, 14, 96), (2, 7, 7, 160), (2, 7, 7, 320)]
  assert shapes['pre_logits'] == (2, 1280)
  p = v2['params']
  assert {'conv_init', 'bn_init', 'conv_last', 'bn_last', 'fc', 'block1', 'block17'} <= set(p)
  assert 'block18' not in p
  # t = 1 in the first row: no expansion conv. Depthwise kernels are (3, 3, 1, C).
  assert set(p['block1']) == {'dw', 'dw_bn', 'project', 'project_bn'}
  assert p['block2']['expand']['kernel'].shape == (1, 1, 16, 96)
  assert p['block2']['dw']['kernel'].shape == (3, 3, 1, 96)
  assert p['block2']['project']['kernel'].shape == (1, 1, 96, 24)
  assert p['conv_last']['kernel'].shape == (1, 1, 320, 1280)
  assert 'bias' not in p['block2']['dw']
  _, v1 = _abstract('mobilenet_v1')
  s1 = shape_of(v1)
  assert s1['stem'] == (2, 112, 112, 32) and s1['stage13'] == (2, 7, 7, 1024)
  p1 = v1['params']
  assert p1['block1']['dw']['kernel'].shape == (3, 3, 1, 32)
  assert p1['block1']['pw']['kernel'].shape == (1, 1, 32, 64)
  assert p1['fc']['kernel'].shape == (1024, 1000)
  half = _abstract('mobilenet_v1_050')[1]['params']
  assert half['block13']['pw']['kernel'].shape == (1, 1, 512, 512)


def test_densenet_layout():
  _, v = _abstract('densenet121')
  shapes = {k: x[0].shape for k, x in v['intermediates'].items()}
  # Each block adds n * 32 maps; each transition halves maps and resolution.
  assert shapes == {'stem': (2, 56, 56, 64), 'stage1': (2, 56, 56, 256),
                    'stage2': (2, 28, 28, 512), 'stage3': (2, 14, 14, 1024),
                    'stage4': (2, 7, 7, 1024), 'pre_logits': (2, 1024)}
  p = v['params']
  assert set(p) == {'conv_init', 'bn_init', 'block1', 'block2', 'block3', 'block4', 'transition1',
                    'transition2', 'transition3', 'bn_final', 'fc'}
  assert len(p['block3']) == 24
  # Layer 6 of block 1 sees 64 + 5 * 32 maps; its bottleneck makes 4k = 128.
  assert p['block1']['layer6']['conv1']['kernel'].shape == (1, 1, 224, 128)
  assert p['block1']['layer6']['conv2']['kernel'].shape == (3, 3, 128, 32)
  assert p['transition1']['conv']['kernel'].shape == (1, 1, 256, 128)
  assert p['conv_init']['kernel'].shape == (7, 7, 3, 64)


def test_sequence_layouts():
  _, v = _abstract('textcnn')
  p = v['params']
  assert p['embed']['embedding'].shape == (20_000, 128)
  assert [p[f'conv{w}']['kernel'].shape for w in (3, 4, 5)] == [
      (3, 128, 100), (4, 128, 100), (5, 128, 100)]
  assert v['intermediates']['pre_logits'][0].shape == (2, 300)
  _, c = _abstract('cnn1d')
  assert c['intermediates']['pre_logits'][0].shape == (2, 320)
  x = jax.ShapeDtypeStruct((2, 100, 1), jnp.float32)
  any_length = registry.get_model('cnn1d', pool='max')
  out = jax.eval_shape(lambda x: any_length.init_with_output(
      jax.random.key(0), x, train=False)[0], x)
  assert out.shape == (2, 10)


def test_errors_name_the_problem():
  def init(model, shape, dtype=jnp.float32):
    x = jax.ShapeDtypeStruct(shape, dtype)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  with pytest.raises(ValueError, match='shorter than the widest filter'):
    init(sequence.TextCNN(), (1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r'\(N, length\) token ids'):
    init(sequence.TextCNN(), (1, 8, 1))
  with pytest.raises(ValueError, match='pool must be one of'):
    init(sequence.CNN1D(pool='mean'), (1, 40, 1))
  with pytest.raises(ValueError, match='compression must be in'):
    init(densenet.DenseNet(block_config=(1, 1), compression=0.0), (1, 32, 32, 3))


# ----------------------------------------------------------------------------
# Block wiring: shapes from eval_shape, values filled in, one jit per call.
# ----------------------------------------------------------------------------


def _fill(abstract, value_fn):
  return jax.tree_util.tree_map_with_path(
      lambda path, s: value_fn(jax.tree_util.keystr(path), s), abstract)


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_highway_gate_limits():
  """b_T -> -inf: T = 0 and the layer is exactly the identity; b_T -> +inf:
  T = 1 and the layer is the plain H(x) = relu(W_H x + b_H)."""
  x = _rand((3, 6))
  layer = highway.HighwayDense()
  abstract = jax.eval_shape(lambda x: layer.init(jax.random.key(0), x), x)['params']

  def params(gate_bias):
    return _fill(abstract, lambda k, s: np.full(s.shape, gate_bias, np.float32)
                 if k == "['T']['bias']" else _rand(s.shape, seed=len(k)))

  closed, opened = params(-1e4), params(1e4)
  np.testing.assert_array_equal(layer.apply({'params': closed}, x), x)
  h = np.maximum(x @ opened['H']['kernel'] + opened['H']['bias'], 0)
  np.testing.assert_allclose(layer.apply({'params': opened}, x), h, rtol=1e-5, atol=1e-6)
  # Between the limits: y = H * T + x * (1 - T).
  mid = params(0.0)
  t = 1 / (1 + np.exp(-(x @ mid['T']['kernel'])))
  h = np.maximum(x @ mid['H']['kernel'] + mid['H']['bias'], 0)
  np.testing.assert_allclose(layer.apply({'params': mid}, x), h * t + x * (1 - t),
                             rtol=1e-5, atol=1e-5)


def test_highway_gate_bias_init_and_conv_identity(fast_compile):
  x = _rand((1, 5, 5, 4))
  conv_layer = highway.HighwayConv(conv=highway.cnn.Conv)

  @jax.jit
  def run(x):
    params = conv_layer.init(jax.random.key(0), x)['params']
    closed = {**params, 'T': {**params['T'], 'bias': jnp.full(4, -1e4)}}
    return params, conv_layer.apply({'params': closed}, x)

  params, y = run(x)
  np.testing.assert_array_equal(params['T']['bias'], np.full(4, -2.0, np.float32))
  assert params['H']['kernel'].shape == params['T']['kernel'].shape == (3, 3, 4, 4)
  np.testing.assert_array_equal(y, x)


def test_inverted_residual_shortcut_and_linear_bottleneck(fast_compile):
  """With the projection BN zeroed, the residual branch is 0: a stride-1
  equal-width block returns x exactly (shortcut), a stride-2 one returns 0."""
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  x = _rand((1, 6, 6, 8))

  def run(strides):
    block = mobilenet.InvertedResidual(8, 6, mobilenet.cnn.Conv, norm, strides=strides)
    abstract = jax.eval_shape(lambda x: block.init(jax.random.key(0), x), x)
    v = _fill(abstract, lambda k, s: np.zeros(s.shape, np.float32)
              if 'project_bn' in k and ('scale' in k or 'bias' in k)
              else np.ones(s.shape, np.float32) if k.endswith("['var']")
              else _rand(s.shape, seed=len(k)))
    return np.asarray(jax.jit(block.apply)(v, x))

  np.testing.assert_array_equal(run(1), x)
  y2 = run(2)
  assert y2.shape == (1, 3, 3, 8) and np.all(y2 == 0)


def test_dense_block_concatenates_its_input_unchanged(fast_compile):
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  block = densenet.DenseBlock(3, growth_rate=4, bn_size=2, conv=densenet.cnn.Conv,
                              norm=norm)
  x = _rand((1, 4, 4, 5))
  v = _random_variables(jax.eval_shape(lambda x: block.init(jax.random.key(0), x), x), 0)
  y = np.asarray(jax.jit(block.apply)(v, x))
  assert y.shape == (1, 4, 4, 5 + 3 * 4)
  np.testing.assert_array_equal(y[..., :5], x)
  # Layer 3 sees the input and the two earlier layers' maps.
  assert v['params']['layer3']['conv1']['kernel'].shape == (1, 1, 13, 8)


# ----------------------------------------------------------------------------
# Real forward/backward of tiny variants: our Conv vs flax.linen.Conv.
# ----------------------------------------------------------------------------



def check_ours_vs_flax(name, num_classes=5, compare=True):
  """Registered model `name` with our Conv vs flax.linen.Conv: see
  check_train_step_ours_vs_flax."""
  entry = registry.model_info(name)
  ours = registry.get_model(name, num_classes=num_classes)
  ref = registry.get_model(name, num_classes=num_classes, conv=nn.Conv) if compare else None
  rng = np.random.default_rng(0)
  if name in INT_INPUT:
    x = rng.integers(0, ours.vocab_size, (2,) + entry.input_shape).astype(np.int32)
  else:
    x = rng.standard_normal((2,) + entry.input_shape).astype(np.float32)
  check_train_step_ours_vs_flax(ours, ref, x, num_classes, compare)


@pytest.mark.parametrize('name', ['mobilenet_v1_tiny', 'mobilenet_v2_tiny', 'densenet_tiny',
                                  'highway_cnn_tiny', 'cnn1d_tiny', 'textcnn_tiny'])
def test_tiny_forward_backward_ours_vs_flax(name, fast_compile):
  check_ours_vs_flax(name)


def test_tiny_highway_mlp_gradients_reach_every_parameter(fast_compile):
  # No convs to swap; the gates and the carry path must pass gradient everywhere.
  check_ours_vs_flax('highway_mlp_tiny', compare=False)
