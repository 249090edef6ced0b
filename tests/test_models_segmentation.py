"""Segmentation family (ResUNet++, U-Net) and the blocks it is built from.

Parameter counts are pinned with their per-block arithmetic (from
jax.eval_shape: nothing allocated); SE, ASPP and the attention block are
checked against plain-jnp references; tiny variants run a real train-mode
step with a per-pixel loss, with our Conv and with flax.linen.Conv.
"""
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import nn as cnn
from cnn_jax.analysis import count_params, summary
from cnn_jax.models import registry
from model_testing import random_variables

# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


EVAL_NORM = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)


def _size(tree):
  return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def _abstract(name, batch=2, input_shape=None, **overrides):
  """(logits shape, variables incl. 'intermediates') from one jax.eval_shape."""
  model = registry.get_model(name, **overrides)
  shape = input_shape or registry.model_info(name).input_shape
  x = jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False, mutable=True), x)
  return out.shape, variables


# ----------------------------------------------------------------------------
# Parameter counts, block by block.
# ----------------------------------------------------------------------------

def _conv(k, c_in, c_out, bias=True):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _bn(c):                 # trainable scale and bias; mean and var are batch_stats
  return 2 * c


def _se(c, ratio=8):        # two bias-free 1x1 convs, C -> C // 8 -> C
  return 2 * c * max(1, c // ratio)


def _stem(c_in, f):         # conv3-BN-ReLU-conv3 + (conv1-BN), SE
  return _conv(3, c_in, f) + _bn(f) + _conv(3, f, f) + _conv(1, c_in, f) + _bn(f) + _se(f)


def _unit(c_in, f):         # BN-ReLU-conv3, BN-ReLU-conv3 + (conv1-BN), SE
  return (_bn(c_in) + _conv(3, c_in, f) + _bn(f) + _conv(3, f, f)
          + _conv(1, c_in, f) + _bn(f) + _se(f))


def _aspp(c_in, f, n_rates=4):   # n x (atrous conv3-BN), summed, conv1
  return n_rates * (_conv(3, c_in, f) + _bn(f)) + _conv(1, f, f)


def _attention(c_skip, c_x):     # BN-ReLU-conv3 on each input, add, BN-ReLU-conv3
  return _bn(c_skip) + _conv(3, c_skip, c_x) + 2 * (_bn(c_x) + _conv(3, c_x, c_x))


# ResUNet++ at filters 16/32/64/128/256, 3 input channels, one sigmoid output.
# Decoder i concatenates the upsampled attention output (the previous width)
# with the skip, so its unit reads e.g. 256 + 64 = 320 channels.
RESUNETPP_BLOCKS = {
    'stem': (_stem(3, 16), 2_960),
    'encoder1': (_unit(16, 32), 14_848),
    'encoder2': (_unit(32, 64), 58_880),
    'encoder3': (_unit(64, 128), 234_496),
    'bridge': (_aspp(128, 256), 1_248_512),
    'attention1': (_attention(64, 256), 1_329_024),
    'decoder1': (_unit(256 + 64, 128), 562_688),
    'attention2': (_attention(32, 128), 332_736),
    'decoder2': (_unit(128 + 32, 64), 141_056),
    'attention3': (_attention(16, 64), 83_424),
    'decoder3': (_unit(64 + 16, 32), 35_456),
    'head_aspp': (_aspp(32, 16), 18_896),
    'head': (_conv(1, 16, 1), 17),
}
# The notes' (and the paper's) "4.06 M". BN running statistics: 2 per BN
# channel, 3,696 channels.
RESUNETPP_PARAMS = 4_062_993
RESUNETPP_BATCH_STATS = 7_392


def _unet_stage(c_in, f, bn=False):   # (conv3 [-BN] - ReLU) x 2, no conv bias under BN
  return _conv(3, c_in, f, not bn) + _conv(3, f, f, not bn) + (2 * _bn(f) if bn else 0)


def _unet_params(c_in=3, classes=1, width=64, depth=4, bn=False):
  widths = [width * 2 ** i for i in range(depth + 1)]
  total = sum(_unet_stage(a, b, bn) for a, b in zip([c_in] + widths, widths))
  for f in reversed(widths[:-1]):       # 2x2 transposed conv 2f -> f, stage(2f -> f)
    total += _conv(2, 2 * f, f) + _unet_stage(2 * f, f, bn)
  return total + _conv(1, width, classes)


UNET_PARAMS = 31_031_745        # 3 in, 1 out, no BN (Ronneberger et al.'s layout, padded)
UNET_BN_PARAMS = 31_037_633     # BN after every 3x3 conv, which then has no bias


def test_registered_names_and_shapes():
  assert registry.list_models('segmentation') == ['resunetpp', 'resunetpp_tiny', 'unet',
                                                  'unet_tiny']
  for name in ('resunetpp', 'unet'):
    info = registry.model_info(name)
    assert (info.input_shape, info.num_classes) == ((256, 256, 3), 3)
  for name in ('resunetpp_tiny', 'unet_tiny'):
    assert registry.model_info(name).input_shape == (32, 32, 3)


def test_resunetpp_count_block_by_block():
  for name, (formula, pinned) in RESUNETPP_BLOCKS.items():
    assert formula == pinned, name
  assert sum(p for _, p in RESUNETPP_BLOCKS.values()) == RESUNETPP_PARAMS
  shape, variables = _abstract('resunetpp', num_classes=1)
  assert shape == (2, 256, 256, 1)
  params = variables['params']
  assert {k: _size(v) for k, v in params.items()} == {
      k: p for k, (_, p) in RESUNETPP_BLOCKS.items()}
  count = count_params(registry.get_model('resunetpp',
                                          num_classes=1), (256, 256, 3))
  assert (count.trainable, count.batch_stats) == (RESUNETPP_PARAMS, RESUNETPP_BATCH_STATS)
  # As in the authors' code, every conv has a bias, also those feeding a BN
  # (directly, or through a max pool and a sum in the attention block) whose
  # batch mean cancels it: 2,912 parameters that can never learn.
  redundant = sum(math.prod(leaf.shape) for path, leaf
                  in jax.tree_util.tree_leaves_with_path(params)
                  if _REDUNDANT_BIAS.search(jax.tree_util.keystr(path)))
  assert redundant == 2_912


def test_resunetpp_softmax_head_and_layer_shapes():
  shape, variables = _abstract('resunetpp')
  assert shape == (2, 256, 256, 3)
  params = variables['params']
  assert params['head']['kernel'].shape == (1, 1, 16, 3)
  # SE at ratio 8: 128 -> 16 -> 128 gates in encoder3.
  assert params['encoder3']['se']['squeeze']['kernel'].shape == (1, 1, 128, 16)
  # The skip branch of attention1 maps the 64-channel skip to the 256 channels
  # of the bridge it gates; the bridge's atrous branches run at 6/12/18/1.
  assert params['attention1']['skip_conv']['kernel'].shape == (3, 3, 64, 256)
  assert {k for k in params['bridge'] if not k.endswith('_bn')} == {
      'rate6', 'rate12', 'rate18', 'rate1', 'project'}
  assert params['decoder1']['conv1']['kernel'].shape == (3, 3, 320, 128)
  sown = {k: v[0].shape for k, v in variables['intermediates'].items()}
  assert sown == {
      'stem_out': (2, 256, 256, 16), 'encoder1_out': (2, 128, 128, 32),
      'encoder2_out': (2, 64, 64, 64), 'encoder3_out': (2, 32, 32, 128),
      'bridge_out': (2, 32, 32, 256), 'decoder1_out': (2, 64, 64, 128),
      'decoder2_out': (2, 128, 128, 64), 'decoder3_out': (2, 256, 256, 32),
      'pre_logits': (2, 256, 256, 16)}


def test_unet_counts():
  assert _unet_params() == UNET_PARAMS
  assert _unet_params(bn=True) == UNET_BN_PARAMS
  shape, variables = _abstract('unet', num_classes=1)
  assert shape == (2, 256, 256, 1)
  assert _size(variables['params']) == UNET_PARAMS
  assert _abstract('unet', num_classes=1, use_batch_norm=True)[1]['params'][
      'encoder1']['conv1'].keys() == {'kernel'}
  assert count_params(registry.get_model('unet', num_classes=1, use_batch_norm=True),
                      (256, 256, 3)).trainable == UNET_BN_PARAMS
  params = variables['params']
  assert params['bridge']['conv2']['kernel'].shape == (3, 3, 1024, 1024)
  assert params['decoder1']['up']['kernel'].shape == (2, 2, 1024, 512)
  assert params['decoder4']['conv1']['kernel'].shape == (3, 3, 128, 64)
  # The often-quoted 31,031,685 is zhixuhao/unet's Keras model: one input
  # channel (-2 * 9 * 64 weights), and a 3x3 conv 64 -> 2 then a 1x1 conv
  # 2 -> 1 where we have one 1x1 conv 64 -> 1.
  one_channel = count_params(registry.get_model('unet', num_classes=1), (256, 256, 1))
  assert one_channel.trainable == UNET_PARAMS - 2 * 9 * 64 == _unet_params(c_in=1)
  assert one_channel.trainable - _conv(1, 64, 1) + _conv(3, 64, 2) + _conv(1, 2, 1) == (
      31_031_685)


@pytest.mark.parametrize('name', ['resunetpp_tiny', 'unet_tiny'])
@pytest.mark.parametrize('num_classes', [1, 3])
def test_tiny_output_shapes(name, num_classes):
  assert _abstract(name, num_classes=num_classes)[0] == (2, 32, 32, num_classes)
  # Not square, and not the registered size.
  assert _abstract(name, batch=1, input_shape=(32, 48, 3),
                   num_classes=num_classes)[0] == (1, 32, 48, num_classes)


def test_bad_input_sizes_name_the_fix():
  with pytest.raises(ValueError, match=r'divisible by 8 .* got 250x256\. .* 256x256'):
    _abstract('resunetpp', input_shape=(250, 256, 3))
  with pytest.raises(ValueError, match=r'divisible by 16 .* got 40x40\. .* 48x48'):
    _abstract('unet_tiny', input_shape=(40, 40, 3))
  with pytest.raises(ValueError, match=r'divisible by 4 .* got 30x32'):
    _abstract('unet_tiny', input_shape=(30, 32, 3), depth=2)
  with pytest.raises(ValueError, match='filters must be 5 widths'):
    _abstract('resunetpp_tiny', filters=(4, 8, 16, 32))
  with pytest.raises(ValueError, match='rates must be distinct'):
    _abstract('resunetpp_tiny', aspp_rates=(6, 6))


def test_sown_keys_leave_room_for_capture_intermediates():
  # Feature-map tools may capture every module's output; the sown keys must not
  # collide with the module scopes ('encoder1' vs 'encoder1_out').
  model = registry.get_model('resunetpp_tiny')
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  _, state = jax.eval_shape(lambda x: model.init_with_output(
      jax.random.key(0), x, train=False, capture_intermediates=True), x)
  inter = state['intermediates']
  assert inter['encoder1']['__call__'][0].shape == inter['encoder1_out'][0].shape == (
      1, 16, 16, 8)


# ----------------------------------------------------------------------------
# Blocks against plain-jnp references.
# ----------------------------------------------------------------------------

def _conv_ref(x, kernel, bias=None, rate=1):
  pad = rate * (kernel.shape[0] // 2)
  y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), [(pad, pad), (pad, pad)], rhs_dilation=(rate, rate),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')
  return y if bias is None else y + bias


def _bn_ref(x, p, s):        # eval-mode BatchNorm
  return (x - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']


def _block_variables(block, *inputs, seed=1):
  abstract = jax.eval_shape(lambda *a: block.init(jax.random.key(0), *a), *inputs)
  return random_variables(abstract, seed)


def test_squeeze_excite_gates_each_channel_by_its_global_average():
  x = np.random.default_rng(0).standard_normal((2, 5, 6, 16)).astype(np.float32)
  se = cnn.SqueezeExcite(ratio=8)
  variables = _block_variables(se, x)
  p = variables['params']
  assert p['squeeze']['kernel'].shape == (1, 1, 16, 2)
  assert p['excite']['kernel'].shape == (1, 1, 2, 16)
  y = np.asarray(se.apply(variables, x))
  gates = y / x
  # One gate per (example, channel), shared by every position, inside (0, 1).
  np.testing.assert_allclose(gates, np.broadcast_to(gates[:, :1, :1], gates.shape),
                             rtol=1e-5)
  assert np.all((gates > 0) & (gates < 1))
  hidden = jax.nn.relu(x.mean(axis=(1, 2)) @ p['squeeze']['kernel'][0, 0])
  np.testing.assert_allclose(gates[:, 0, 0],
                             jax.nn.sigmoid(hidden @ p['excite']['kernel'][0, 0]), rtol=1e-5)
  # flax.linen.Conv runs the same block on the same parameters.
  np.testing.assert_allclose(cnn.SqueezeExcite(ratio=8, conv=nn.Conv).apply(variables, x),
                             y, rtol=1e-5, atol=1e-6)


def test_aspp_sums_normalised_atrous_branches_then_projects():
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  aspp = cnn.ASPP(features=5, norm=EVAL_NORM)
  variables = _block_variables(aspp, x)
  p, s = variables['params'], variables['batch_stats']
  y = aspp.apply(variables, x)
  assert y.shape == (2, 8, 8, 5)
  total = sum(_bn_ref(_conv_ref(x, p[f'rate{r}']['kernel'], p[f'rate{r}']['bias'], r),
                      p[f'rate{r}_bn'], s[f'rate{r}_bn']) for r in (6, 12, 18, 1))
  ref = _conv_ref(total, p['project']['kernel'], p['project']['bias'])
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  # On an 8x8 map, rates 12 and 18 put every off-centre tap in the zero
  # padding: those branches are 1x1 convs of their centre tap.
  centre_only = jax.tree_util.tree_map(lambda a: a, variables)
  for r in (12, 18):
    k = p[f'rate{r}']['kernel']
    centre_only['params'][f'rate{r}']['kernel'] = jnp.zeros_like(k).at[1, 1].set(k[1, 1])
  np.testing.assert_allclose(aspp.apply(centre_only, x), y, rtol=1e-5, atol=1e-6)


def test_attention_block_gates_decoder_features_with_pooled_skip():
  rng = np.random.default_rng(0)
  skip = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  x = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
  block = cnn.AttentionBlock(norm=EVAL_NORM)
  variables = _block_variables(block, skip, x)
  p, s = variables['params'], variables['batch_stats']
  assert [p[k]['kernel'].shape for k in ('skip_conv', 'x_conv', 'gate_conv')] == [
      (3, 3, 3, 6), (3, 3, 6, 6), (3, 3, 6, 6)]
  y = block.apply(variables, skip, x)

  def bn_relu_conv(z, name):
    z = jax.nn.relu(_bn_ref(z, p[f'{name}_bn'], s[f'{name}_bn']))
    return _conv_ref(z, p[f'{name}_conv']['kernel'], p[f'{name}_conv']['bias'])

  g = bn_relu_conv(skip, 'skip').reshape(2, 4, 2, 4, 2, 6).max(axis=(2, 4))
  ref = bn_relu_conv(g + bn_relu_conv(x, 'x'), 'gate') * x
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='twice the spatial size'):
    block.apply(variables, skip[:, :6, :6], x)


# ----------------------------------------------------------------------------
# A real train-mode step of the tiny variants: our Conv vs flax.linen.Conv.
# ----------------------------------------------------------------------------

# Conv biases whose output reaches a train-mode BN unchanged but for a shift
# (directly, or through a max pool and a sum): the batch mean cancels them, so
# their gradient is zero up to rounding.
_REDUNDANT_BIAS = re.compile(
    r"\['(stem|encoder\d|decoder\d)'\]\['(conv1|proj)'\]\['bias'\]"
    r"|\['attention\d'\]\['(skip|x)_conv'\]\['bias'\]"
    r"|\['(bridge|head_aspp)'\]\['rate\d+'\]\['bias'\]")


def _pixel_loss(logits, labels):
  """Mean per-pixel softmax cross-entropy (sigmoid BCE for one channel)."""
  if logits.shape[-1] == 1:
    z, y = logits[..., 0], labels.astype(logits.dtype)
    return jnp.mean(jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z))))
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def check_pixel_train_step_ours_vs_flax(name, num_classes, seed=1, redundant=None,
                                        **overrides):
  """check_train_step_ours_vs_flax for per-pixel outputs and labels: equal
  logits, gradients and BN statistics with either conv; every parameter but
  those whose path matches `redundant` (which must get none) gets a gradient;
  BN statistics move."""
  ours = registry.get_model(name, num_classes=num_classes, **overrides)
  ref = registry.get_model(name, num_classes=num_classes, conv=nn.Conv, **overrides)
  shape = registry.model_info(name).input_shape
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2,) + shape).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, max(num_classes, 2), (2,) + shape[:2]))
  abstract = jax.eval_shape(lambda x: ours.init(jax.random.key(0), x, train=False), x)
  variables = random_variables({k: v for k, v in abstract.items() if k != 'intermediates'},
                               seed)

  def step(model):
    def loss(p):
      out, state = model.apply({**variables, 'params': p}, x, train=True,
                               mutable=['batch_stats'])
      return _pixel_loss(out, labels), (out, state.get('batch_stats', {}))
    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params'])
    return out, stats, grads

  out, stats, grads = step(ours)
  assert out.shape == (2,) + shape[:2] + (num_classes,)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    key, biggest = jax.tree_util.keystr(path), float(jnp.max(jnp.abs(g)))
    if redundant is not None and redundant.search(key):
      assert biggest < 1e-5 * scale, f'{key}: gradient {biggest} through a BN'
    else:
      assert biggest > 0, f'no gradient reaches {key}'
  if 'batch_stats' in variables:
    moved = jax.tree_util.tree_map(lambda new, old: bool(np.any(np.asarray(new) != old)),
                                   stats, variables['batch_stats'])
    assert all(jax.tree_util.tree_leaves(moved)), moved
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(
      jax.eval_shape(lambda x: ref.init(jax.random.key(0), x, train=False), x))
  out_ref, stats_ref, grads_ref = step(ref)
  # The tolerances of test_models_classic's check: the two convs sum in different
  # orders, and BN over 2 examples of 2x2 maps scales the float32 differences up.
  out_scale = float(np.max(np.abs(out_ref)))
  np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-5 * out_scale)
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree_util.tree_leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * max(scale, 1.0),
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, stats_ref)


def test_resunetpp_tiny_train_step_ours_vs_flax(fast_compile):
  # At 4 and 8 channels an SE has one hidden ReLU unit; with random weights it
  # is dead for both examples about half the time, and then passes no gradient
  # to its kernels. Seed 10 leaves all six alive.
  check_pixel_train_step_ours_vs_flax('resunetpp_tiny', 3, seed=10, redundant=_REDUNDANT_BIAS)


@pytest.mark.parametrize('num_classes,overrides', [(1, {}), (3, {'use_batch_norm': True})],
                         ids=['sigmoid', 'softmax_bn'])
def test_unet_tiny_train_step_ours_vs_flax(num_classes, overrides, fast_compile):
  check_pixel_train_step_ours_vs_flax('unet_tiny', num_classes, **overrides)


def test_summary_of_resunetpp_tiny():
  rows = summary(registry.get_model('resunetpp_tiny'), (32, 32, 3), print_table=False)
  by_name = {r['name']: r for r in rows}
  assert by_name['Total']['params'] == count_params(
      registry.get_model('resunetpp_tiny'), (32, 32, 3)).trainable == 256_199
  assert by_name['head']['output_shape'] == (32, 32, 3)
  assert by_name['bridge/rate18']['output_shape'] == (4, 4, 64)
  assert by_name['encoder3/conv1']['output_shape'] == (4, 4, 32)
  # Every parameter is in a reported layer (none created by a bare self.param).
  assert sum(r['params'] for r in rows[:-1]) == by_name['Total']['params']
