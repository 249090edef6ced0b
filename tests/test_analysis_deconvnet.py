"""Zeiler & Fergus's deconvnet: the explicit reverse walk against the modified gradient."""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from cnn_jax import models, ops
from cnn_jax import nn as cnn
from cnn_jax.analysis import deconvnet as dc
from cnn_jax.analysis import layers, saliency, tables
from cnn_jax.ops import pooling
from model_testing import random_variables


@pytest.fixture(autouse=True)
def _fast(fast_compile):
  del fast_compile
  yield


# The deconvnet's ReLU rule as a custom derivative: backward passes max(g, 0).
@jax.custom_vjp
def _deconv_relu(x):
  return jnp.maximum(x, 0.0)


def _deconv_relu_fwd(x):
  return _deconv_relu(x), None


def _deconv_relu_bwd(_, g):
  return (jnp.maximum(g, 0.0),)


_deconv_relu.defvjp(_deconv_relu_fwd, _deconv_relu_bwd)


class _Net(nn.Module):
  """conv-BN-ReLU, overlapping 3x3/2 max pool, grouped stride-2 conv, ReLU, head.

  16x16 -> conv1 16x16x4 -> pool1 7x7x4 -> conv2 4x4x6. head=False returns the
  rectified conv2 maps (the deconvnet's start), with the same parameters.
  """
  act: Callable = ops.relu
  head: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = cnn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name='conv1')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn1')(x)
    x = self.act(x)
    x = cnn.MaxPool(3, 2, name='pool1')(x)
    x = cnn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=2,
                 name='conv2')(x)
    x = self.act(x)
    if not self.head:
      return x
    return nn.Dense(3, name='fc')(cnn.GlobalAvgPool()(x))


# (kernel, stride, padding low) of each windowed layer of _Net, input to conv2.
_NET_GEOMETRY = ((3, 1, 1), (3, 2, 0), (3, 2, 1))


def _variables(model, shape, seed=0):
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32))
  return random_variables(abstract, seed)


def _images(shape, n=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n,) + tuple(shape)),
                     jnp.float32)


def _start(features, channel, keep):
  """The deconvnet's starting signal: one channel (one unit per image for 'max')."""
  fmap = features[..., channel]
  if keep == 'max':
    flat = fmap.reshape(len(fmap), -1)
    fmap = (flat * jax.nn.one_hot(jnp.argmax(flat, 1), flat.shape[1])).reshape(fmap.shape)
  return jnp.zeros_like(features).at[..., channel].set(fmap)


def _receptive_box(position, geometry, size):
  """Per dimension the input interval [lo, hi] a unit at `position` reads."""
  box = []
  for p, n in zip(position, size):
    lo = hi = p
    for k, s, pad in reversed(geometry):
      lo, hi = lo * s - pad, hi * s - pad + k - 1
    box.append((max(lo, 0), min(hi, n - 1)))
  return box


def _assert_inside(recon, position, geometry):
  box = _receptive_box(position, geometry, recon.shape[:-1])
  inside = np.zeros(recon.shape[:-1], bool)
  inside[tuple(slice(lo, hi + 1) for lo, hi in box)] = True
  assert np.all(recon[~inside] == 0), 'reconstruction leaks outside the receptive field'
  assert np.abs(recon[inside]).sum() > 0


def _png_ok(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
  assert float(image[..., :3].std()) > 0   # not a blank canvas


# ----------------------------------------------------------------------------
# The unpooling step
# ----------------------------------------------------------------------------

def test_max_unpool_routes_to_switches_and_sums_overlaps():
  # 3x3 windows, stride 2, on 5x5: the centre is every window's maximum.
  x = np.zeros((1, 5, 5, 1), np.float32)
  x[0, 2, 2, 0] = 9.0
  x[0, 0, 4, 0] = 5.0   # shares the top-right window with the centre, and loses
  _, switches = pooling.max_pool_with_argmax(jnp.asarray(x), 3, 2)
  assert np.all(np.asarray(switches) == 2 * 5 + 2)
  values = jnp.asarray([[[[1.0], [2.0]], [[3.0], [4.0]]]])
  out = np.asarray(pooling.max_unpool(values, switches, (5, 5)))
  expected = np.zeros((1, 5, 5, 1), np.float32)
  expected[0, 2, 2, 0] = 1 + 2 + 3 + 4     # overlapping windows add up
  np.testing.assert_array_equal(out, expected)

  # Non-overlapping windows: each value lands on its own window's maximum only.
  x = jnp.abs(_images((4, 4, 2), n=1)) + 1      # positive: re-pooling finds them
  y, switches = pooling.max_pool_with_argmax(x, 2)
  out = np.asarray(pooling.max_unpool(y, switches, (4, 4)))
  assert np.count_nonzero(out) == y.size
  np.testing.assert_array_equal(out[out != 0], np.asarray(x)[out != 0])
  np.testing.assert_array_equal(np.asarray(pooling.max_pool(jnp.asarray(out), 2)), y)


# ----------------------------------------------------------------------------
# The reverse walk equals the gradient with the deconvnet's ReLU rule
# ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def net():
  model = _Net()
  variables = _variables(model, (16, 16, 1))
  return model, variables, _images((16, 16, 1))


def test_reverse_steps_of_the_hand_built_net(net):
  model, variables, x = net
  assert dc.deconvnet_steps(model, variables, x, 'conv2') == [
      ('relu', 'conv2'), ('conv_transpose', 'conv2'), ('unpool', 'pool1'),
      ('relu', 'bn1'), ('batch_norm_scale', 'bn1'), ('conv_transpose', 'conv1')]


@pytest.mark.parametrize('keep', ['max', 'all'])
def test_equals_gradient_with_deconvnet_relu_rule(net, keep):
  model, variables, x = net
  channel = 3
  recon = dc.deconvnet(model, variables, x, 'conv2', channel, keep=keep)
  assert recon.shape == x.shape and recon.dtype == np.float32

  @functools.partial(jax.jit, static_argnums=1)
  def backprop(x, act):
    """The VJP of the rectified conv2 maps, started at the deconvnet's signal."""
    features = lambda x: _Net(act=act, head=False).apply(variables, x)
    a, vjp = jax.vjp(features, x)
    return vjp(_start(a, channel, keep))[0]

  expected = backprop(x, _deconv_relu)
  assert np.abs(expected).max() > 0
  np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-6)
  # The ReLU rule matters: the plain gradient is a different image.
  assert not np.allclose(recon, backprop(x, ops.relu), atol=1e-6)


def test_reconstruction_stays_in_the_receptive_field(net):
  model, variables, x = net
  maps = np.maximum(layers.layer_outputs(model, variables, x, ['conv2'])['conv2'], 0)
  peaks = maps.max(axis=(1, 2)).min(axis=0)      # per channel, over the images
  channel = int(np.argmax(peaks))
  assert peaks[channel] > 0                       # a channel every image activates
  recon = dc.deconvnet(model, variables, x, 'conv2', channel)
  for i in range(len(x)):
    position = np.unravel_index(np.argmax(maps[i, ..., channel]), maps.shape[1:3])
    _assert_inside(recon[i], position, _NET_GEOMETRY)


def test_relu_is_found_on_a_non_negative_map():
  """Detection does not depend on the data: this conv's output is all positive."""

  class Positive(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
      x = ops.relu(cnn.Conv(2, (3, 3), name='conv1')(x))
      return cnn.Conv(2, (3, 3), name='conv2')(x)

  model = Positive()
  variables = jax.tree_util.tree_map(jnp.abs, _variables(model, (6, 6, 1)))
  x = jnp.abs(_images((6, 6, 1))) + 1
  conv1 = layers.layer_outputs(model, variables, x, ['conv1'])['conv1']
  assert float(conv1.min()) > 0
  assert ('relu', 'conv1') in dc.deconvnet_steps(model, variables, x, 'conv2')


# ----------------------------------------------------------------------------
# Registry models
# ----------------------------------------------------------------------------

def _registry(name, **overrides):
  info = models.model_info(name)
  model = models.get_model(name, **overrides)
  variables = random_variables(tables.abstract_variables(model, info.input_shape), 0)
  return model, variables, _images(info.input_shape)


def test_registry_model_matches_modified_gradient():
  layer = 'features_block2_conv1'
  geometry = ((3, 1, 1), (2, 2, 0), (3, 1, 1))   # conv, pool, conv
  model, variables, x = _registry('vgg_tiny')

  # The same reconstruction as the model's own VJP with every ReLU passing back
  # max(g, 0), found in the traced computation (saliency.backprop_with_relu_rule).
  def rectified(x):
    return jnp.maximum(layers.layer_outputs(model, variables, x, [layer])[layer], 0.0)

  a = rectified(x)
  peaks = np.asarray(a).max(axis=(1, 2)).min(axis=0)
  channel = int(np.argmax(peaks))
  assert peaks[channel] > 0
  recon = dc.deconvnet(model, variables, x, layer, channel)
  start = _start(a, channel, 'max')
  expected = saliency.backprop_with_relu_rule(rectified, x, start, rule='deconvnet')
  np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-6)

  for i in range(len(x)):
    position = np.unravel_index(np.argmax(np.asarray(a[i, ..., channel])), a.shape[1:3])
    _assert_inside(recon[i], position, geometry)


def test_alexnet_reverse_steps():
  """Grouped and strided convs, LRN before and after pools, ceil-mode pool padding."""
  model, variables, x = _registry('alexnet_tiny')
  assert dc.deconvnet_steps(model, variables, x, 'conv3') == [
      ('relu', 'conv3'), ('conv_transpose', 'conv3'), ('pass', 'lrn2'), ('unpool', 'pool2'),
      ('relu', 'conv2'), ('conv_transpose', 'conv2'), ('unpool', 'pool1'), ('pass', 'lrn1'),
      ('relu', 'conv1'), ('conv_transpose', 'conv1')]


# ----------------------------------------------------------------------------
# Refusals and argument errors
# ----------------------------------------------------------------------------

def test_refuses_residual_model():
  model, variables, x = _registry('resnet_tiny')
  with pytest.raises(ValueError, match=r'skip connection.*vgg\*.*guided_backprop'):
    dc.deconvnet(model, variables, x, 'stage1_block1/conv1', 0)


def test_refuses_average_pooling_below_the_layer():
  model, variables, x = _registry('ablation_cnn_tiny', downsample='avg')
  assert dc.deconvnet_steps(model, variables, x, 'stage1_bn2')[0] == ('relu', 'stage1_bn2')
  with pytest.raises(ValueError, match="cannot pass back through layer 'AvgPool_0'"):
    dc.deconvnet(model, variables, x, 'stage2_conv1', 0)


def test_refuses_other_activations():
  model, variables, x = _registry('ablation_cnn_tiny', activation='tanh')
  with pytest.raises(ValueError, match='activation other than ReLU'):
    dc.deconvnet(model, variables, x, 'stage1_conv1', 0)


def test_argument_errors(net):
  model, variables, x = net
  with pytest.raises(ValueError, match="keep must be 'max'"):
    dc.deconvnet(model, variables, x, 'conv2', 0, keep='mean')
  with pytest.raises(ValueError, match=r'channel must be an int in \[0, 6\)'):
    dc.deconvnet(model, variables, x, 'conv2', 6)
  with pytest.raises(ValueError, match="no layer named 'conv9'"):
    dc.deconvnet(model, variables, x, 'conv9', 0)


# ----------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------

def test_plot_deconvnet(tmp_path, net):
  model, variables, x = net
  recon = dc.deconvnet(model, variables, x, 'conv2', 0)
  path = dc.plot_deconvnet(x, recon, str(tmp_path / 'figs' / 'deconv.png'),
                           titles=['conv2, channel 0', 'conv2, channel 0'])
  _png_ok(path)
  with pytest.raises(ValueError, match='one shape'):
    dc.plot_deconvnet(x, recon[:1], str(tmp_path / 'bad.png'))
