"""Gradient saliency, guided backpropagation and Grad-CAM against direct computations."""
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
from cnn_jax.analysis import layers, saliency, tables
from model_testing import random_variables


@pytest.fixture(autouse=True)
def _fast(fast_compile):
  del fast_compile
  yield


def _images(shape, n=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n,) + tuple(shape)),
                     jnp.float32)


def _variables(model, shape, seed=0):
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32))
  return random_variables(abstract, seed)


@functools.lru_cache(maxsize=None)
def _registry(name):
  info = models.model_info(name)
  model = models.get_model(name)
  variables = random_variables(tables.abstract_variables(model, info.input_shape), 0)
  return model, variables, _images(info.input_shape)


def _png_ok(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
  assert float(image[..., :3].std()) > 0   # not a blank canvas


# ----------------------------------------------------------------------------
# Gradient saliency
# ----------------------------------------------------------------------------

def test_gradient_saliency_is_abs_gradient_max_over_channels():
  model, variables, x = _registry('vgg_tiny')
  one = lambda xi: model.apply(variables, xi[None], train=False)[0]
  logits = jax.jit(one)
  grad = jax.jit(jax.grad(lambda xi, t: one(xi)[t]))     # each example on its own

  def direct(targets):
    return np.stack([np.abs(np.asarray(grad(xi, t))).max(axis=-1)
                     for xi, t in zip(x, targets)])

  predicted = direct([int(np.argmax(logits(xi))) for xi in x])
  chosen = direct([3, 7])
  np.testing.assert_allclose(saliency.gradient_saliency(model, variables, x), predicted,
                             rtol=1e-5, atol=1e-7)
  got = saliency.gradient_saliency(model, variables, x, target=[3, 7])
  assert got.shape == x.shape[:3] and got.dtype == np.float32
  np.testing.assert_allclose(got, chosen, rtol=1e-5, atol=1e-7)


def test_target_errors():
  model, variables, x = _registry('vgg_tiny')
  with pytest.raises(ValueError, match=r'target class 10 out of range for 10 classes'):
    saliency.gradient_saliency(model, variables, x, target=10)
  with pytest.raises(ValueError, match='one int, or 2 ints'):
    saliency.gradient_saliency(model, variables, x, target=[1, 2, 3])


# ----------------------------------------------------------------------------
# Backprop with a replaced ReLU rule; guided backprop
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _guided(x):
  return jnp.maximum(x, 0.0)


def _guided_fwd(x):
  return _guided(x), x


def _guided_bwd(x, g):
  return (jnp.where((x > 0) & (g > 0), g, 0.0),)


_guided.defvjp(_guided_fwd, _guided_bwd)


class _Residual(nn.Module):
  """conv, ReLU, a residual conv block (ReLU after the add), global pool, dense."""
  act: Callable = ops.relu

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    h = self.act(cnn.Conv(4, (3, 3), name='conv1')(x))
    h = self.act(cnn.Conv(4, (3, 3), name='conv2')(h) + h)
    return nn.Dense(3, name='fc')(cnn.GlobalAvgPool()(h))


@pytest.mark.parametrize('act', [ops.relu, nn.relu, lambda x: jnp.maximum(x, 0.0)],
                         ids=['cnn_jax.ops.relu', 'flax.linen.relu', 'jnp.maximum'])
def test_guided_backprop_equals_custom_relu_gradient(act):
  variables = _variables(_Residual(), (8, 8, 2))
  x = _images((8, 8, 2))
  target = jnp.asarray([0, 2])
  expected = jax.jit(jax.grad(lambda x: jnp.sum(jnp.take_along_axis(
      _Residual(act=_guided).apply(variables, x), target[:, None], axis=1))))(x)
  got = saliency.guided_backprop(_Residual(act=act), variables, x, target=[0, 2])
  assert got.shape == x.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_relu_rules_on_resnet():
  model, variables, x = _registry('resnet_tiny')
  fn = lambda x: model.apply(variables, x, train=False)
  onehot = lambda logits: jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])

  @jax.jit
  def direct(x):
    logits, vjp = jax.vjp(fn, x)
    return vjp(onehot(logits))[0]

  plain = direct(x)
  # The interpreter itself is exact: the 'gradient' rule is the model's own VJP.
  same = saliency.backprop_with_relu_rule(fn, x, onehot, rule='gradient')
  np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-7)
  guided = saliency.guided_backprop(model, variables, x)
  assert guided.shape == x.shape and np.all(np.isfinite(guided))
  assert np.abs(guided).max() > 0 and not np.allclose(guided, plain, atol=1e-6)


def test_relu_rule_errors():
  fn = lambda x: jnp.tanh(x) * 2
  with pytest.raises(ValueError, match='found no ReLU'):
    saliency.backprop_with_relu_rule(fn, jnp.ones(3), jnp.ones(3))
  with pytest.raises(ValueError, match='rule must be one of'):
    saliency.backprop_with_relu_rule(fn, jnp.ones(3), jnp.ones(3), rule='leaky')
  with pytest.raises(ValueError, match='cotangent shape'):
    saliency.backprop_with_relu_rule(jax.nn.relu, jnp.ones(3), jnp.ones(4))


# ----------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------

class _CamNet(nn.Module):
  """conv (stride 2: 16 -> 8) [, ReLU], global average pool, dense: Zhou et al.'s CAM net."""
  rectify: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    a = cnn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), name='conv')(x)
    if self.rectify:
      a = ops.relu(a)
    return nn.Dense(3, name='fc')(cnn.GlobalAvgPool()(a))


def _class_activation_map(a, w, target, size):
  """Zhou et al.: ReLU(sum_k W[k, c] A_k), resized to the input, scaled to max 1."""
  cam = np.maximum(np.einsum('nhwk,kn->nhw', a, w[:, target]), 0)
  cam = np.asarray(jax.image.resize(cam, (len(cam),) + size, method='linear'))
  return cam / cam.max(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize('rectify, layer', [(False, 'conv'), (True, None)])
def test_grad_cam_is_the_class_activation_map(rectify, layer):
  model = _CamNet(rectify=rectify)
  variables = _variables(model, (16, 16, 1))
  x = _images((16, 16, 1))
  a = np.asarray(layers.layer_outputs(model, variables, x, ['conv'])['conv'])
  if rectify:
    # The default layer is what the global pool reads: the rectified maps.
    assert saliency.default_cam_layer(model, variables, x) == ('GlobalAvgPool_0', 'input')
    a = np.maximum(a, 0)
  w = np.asarray(variables['params']['fc']['kernel'])
  target = np.asarray([0, 2])
  expected = _class_activation_map(a, w, target, (16, 16))
  got = saliency.grad_cam(model, variables, x, layer=layer, target=target)
  assert got.shape == (2, 16, 16) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name, layer', [('resnet_tiny', None),
                                         ('resnet_tiny', 'stage1_block1/conv2'),
                                         ('ablation_cnn_tiny', None)])
def test_grad_cam_on_registry_models(name, layer):
  model, variables, x = _registry(name)
  cam = saliency.grad_cam(model, variables, x, layer=layer)
  assert cam.shape == x.shape[:3] and np.all(np.isfinite(cam))
  assert cam.min() >= 0 and cam.max() <= 1
  for m in cam:
    assert m.max() == 0 or np.isclose(m.max(), 1.0)


def test_default_cam_layers_and_errors():
  model, variables, x = _registry('resnet_tiny')
  assert saliency.default_cam_layer(model, variables, x) == ('GlobalAvgPool_0', 'input')
  model, variables, x = _registry('vgg_tiny')
  # VGG flattens its adaptive pool's output, so that output is the map used.
  assert saliency.default_cam_layer(model, variables, x) == ('avgpool', 'output')
  with pytest.raises(ValueError, match="layer 'fc1' has output shape"):
    saliency.grad_cam(model, variables, x, layer='fc1')


# ----------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------

def test_plot_saliency(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.random((2, 12, 12, 3))
  heat = rng.random((2, 12, 12))
  path = saliency.plot_saliency(images, heat, str(tmp_path / 'figs' / 'saliency.png'),
                                titles=['class 1', 'class 4'])
  _png_ok(path)
  # Signed gradients shaped like the images are shown as max |.| over channels.
  _png_ok(saliency.plot_saliency(images[:, :, :, :1], rng.standard_normal((2, 12, 12, 1)),
                                 str(tmp_path / 'guided.png')))
  with pytest.raises(ValueError, match=r'maps must be \(N, H, W\)'):
    saliency.plot_saliency(images, heat[:, :6], str(tmp_path / 'bad.png'))
