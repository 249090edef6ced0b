"""cnn_jax.nn layers: parameter trees and counts (the notes' figures), equivalence
with flax.linen.Conv / ConvTranspose (outputs and gradients, same parameters),
the separable factorisations, initializer variances, and error messages."""
import functools
import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax import nn
from cnn_jax.nn import initializers

# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


# Same parameters through our explicit-backward conv and through XLA's autodiff.
F32_TOL = dict(rtol=1e-5, atol=1e-5)

# Random values come from NumPy: on this CPU every new shape drawn through
# jax.random costs seconds of compilation, NumPy costs nothing.
_RNG = np.random.default_rng(0)


def rand(shape):
  return jnp.asarray(_RNG.standard_normal(shape, dtype=np.float32))


def n_params(variables):
  return sum(math.prod(a.shape) for a in jax.tree.leaves(variables))


def abstract_init(module, shape):
  """Parameter shapes without allocating or computing anything."""
  return jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def random_init(module, x):
  """The module's variables, filled with N(0, 1) values."""
  return jax.tree.map(lambda s: rand(s.shape), abstract_init(module, x.shape))


def shapes_of(variables):
  return jax.tree.map(lambda a: tuple(a.shape), variables)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _both(ours, v, theirs, v_ref, x, r):
  """Output and gradients wrt (params, x) of sum(r * y), for both modules."""
  def vg(module, variables):
    y = module.apply(variables, x)
    loss = lambda v, x: jnp.sum(module.apply(v, x) * r)
    return y, jax.grad(loss, argnums=(0, 1))(variables, x)
  return vg(ours, v), vg(theirs, v_ref)


def outputs_and_grads(ours, v, theirs, v_ref, x):
  """((y, (dparams, dx)) of ours, the same of theirs), one compilation."""
  y = jax.eval_shape(ours.apply, v, x)
  return _both(ours, v, theirs, v_ref, x, rand(y.shape))


def assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


# ----------------------------------------------------------------------------
# Parameter counts: the notes' worked examples
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('layers, in_shape, out_shape, count', [
    # seed 002: 6 filters of 5x5 on a single-channel 32x32 image, (5*5 + 1) * 6.
    ([nn.Conv(6, 5, padding='VALID')], (1, 32, 32, 1), (1, 28, 28, 6), 156),
    # (5*5*3 + 1) * 10 on a 32x32x3 image.
    ([nn.Conv(10, 5, padding='VALID')], (1, 32, 32, 3), (1, 28, 28, 10), 760),
    # seed 000: one 3x5x5 filter (76), six of them (456), then 10 more (1966).
    ([nn.Conv(1, 5, padding='VALID')], (1, 32, 32, 3), (1, 28, 28, 1), 76),
    ([nn.Conv(6, 5, padding='VALID')], (2, 32, 32, 3), (2, 28, 28, 6), 456),
    ([nn.Conv(6, 5, padding='VALID'), nn.Conv(10, 5, padding='VALID')],
     (1, 32, 32, 3), (1, 24, 24, 10), 1966),
    # 32 1x1 filters over 64 channels: 32 * 64 + 32.
    ([nn.Conv(32, 1)], (1, 8, 8, 64), (1, 8, 8, 32), 2080),
    # A 1x3072 kernel over a 1x3072 "image" (the FC layer as a conv): 30730.
    ([nn.Conv(10, (1, 3072), padding='VALID')], (1, 1, 3072, 1), (1, 1, 1, 10), 30730),
    # 7x7x3, pad 1, stride 2, three 3x3x3 filters: 84 params, 4x4x3 out.
    ([nn.Conv(3, 3, strides=2, padding=1)], (1, 7, 7, 3), (1, 4, 4, 3), 84),
    # Receptive field: two 3x3 (20 params) vs one 5x5 (26) on 5x5 -> 1x1.
    ([nn.Conv(1, 3, padding='VALID'), nn.Conv(1, 3, padding='VALID')],
     (1, 5, 5, 1), (1, 1, 1, 1), 20),
    ([nn.Conv(1, 5, padding='VALID')], (1, 5, 5, 1), (1, 1, 1, 1), 26),
])
def test_conv_param_counts_from_the_notes(layers, in_shape, out_shape, count):
  model = fnn.Sequential(layers)
  variables = abstract_init(model, in_shape)
  assert n_params(variables) == count
  out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(in_shape, jnp.float32))
  assert out.shape == out_shape


def test_conv_param_tree_and_int_kernel_size():
  # An int kernel_size is used in every spatial dimension of the input.
  for spatial, kernel in [((9,), (3,)), ((9, 9), (3, 3)), ((9, 9, 9), (3, 3, 3))]:
    v = abstract_init(nn.Conv(4, 3, feature_group_count=2), (1, *spatial, 6))
    assert shapes_of(v) == {'params': {'kernel': kernel + (3, 4), 'bias': (4,)}}
  v = abstract_init(nn.Conv(4, (3, 2), use_bias=False), (1, 9, 9, 6))
  assert shapes_of(v) == {'params': {'kernel': (3, 2, 6, 4)}}


# ----------------------------------------------------------------------------
# Conv == flax.linen.Conv
# ----------------------------------------------------------------------------

CONV_CASES = [
    # (input shape, attributes)
    ((2, 9, 3), dict(features=4, kernel_size=(3,), strides=2, padding='SAME')),
    ((2, 11, 2), dict(features=3, kernel_size=(4,), padding='VALID', kernel_dilation=2)),
    ((2, 8, 2), dict(features=3, kernel_size=(3,), padding='CAUSAL', kernel_dilation=2)),
    ((2, 7, 6, 3), dict(features=4, kernel_size=(3, 3))),
    ((2, 8, 7, 3), dict(features=4, kernel_size=(3, 3), strides=2, padding='VALID')),
    ((2, 7, 8, 2), dict(features=3, kernel_size=(2, 3), strides=(2, 1),
                        padding=((1, 0), (2, 1)))),
    ((1, 6, 6, 2), dict(features=3, kernel_size=(3, 3), strides=3, padding=1)),
    ((1, 6, 7, 2), dict(features=3, kernel_size=(3, 2), padding=(1, 2))),
    ((2, 9, 8, 4), dict(features=6, kernel_size=(3, 3), kernel_dilation=2,
                        feature_group_count=2)),
    ((1, 8, 8, 4), dict(features=8, kernel_size=(3, 3), strides=2,
                        feature_group_count=4)),
    ((1, 6, 5, 2), dict(features=3, kernel_size=(3, 3), padding='CIRCULAR')),
    ((1, 6, 5, 2), dict(features=3, kernel_size=(3, 2), padding='REFLECT')),
    ((1, 5, 6, 5, 2), dict(features=3, kernel_size=(2, 3, 2), strides=(1, 2, 1))),
    ((1, 7, 6, 6, 2), dict(features=2, kernel_size=(3, 2, 2), strides=2, padding='VALID',
                           kernel_dilation=(2, 1, 2), use_bias=False)),
]


@pytest.mark.parametrize('shape, attrs', CONV_CASES)
def test_conv_matches_flax_conv(shape, attrs):
  ours, theirs = nn.Conv(**attrs), fnn.Conv(**attrs)
  x = rand(shape)
  variables = random_init(ours, x)
  # The same parameter tree: a checkpoint of one loads into the other.
  assert shapes_of(abstract_init(theirs, shape)) == shapes_of(variables)
  (y, grads), (y_ref, grads_ref) = outputs_and_grads(ours, variables, theirs, variables, x)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, **F32_TOL)
  assert_trees_close(grads, grads_ref, **F32_TOL)


@pytest.mark.parametrize('shape', [(7, 6, 3), (2, 3, 7, 6, 3)])
def test_conv_batch_dimensions_as_flax(shape):
  # No batch axis, or several, are flattened and restored as flax.linen.Conv does.
  ours, theirs = nn.Conv(4, (3, 3), strides=2), fnn.Conv(4, (3, 3), strides=2)
  x = rand(shape)
  variables = random_init(ours, x)
  y = ours.apply(variables, x)
  assert y.shape == shape[:-3] + (4, 3, 4)
  np.testing.assert_allclose(y, theirs.apply(variables, x), **F32_TOL)


def test_conv_full_and_int_padding():
  x = rand((1, 6, 5, 2))
  full = nn.Conv(3, (3, 2), padding='FULL')
  v = random_init(full, x)
  y = full.apply(v, x)
  assert y.shape == (1, 8, 6, 3)     # W1 + F - 1
  explicit = nn.Conv(3, (3, 2), padding=((2, 2), (1, 1))).apply(v, x)
  np.testing.assert_array_equal(y, explicit)
  np.testing.assert_array_equal(nn.Conv(3, (3, 2), padding=1).apply(v, x),
                                nn.Conv(3, (3, 2), padding=((1, 1), (1, 1))).apply(v, x))


def test_conv_dtype_and_param_dtype():
  x = jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32)
  layer = nn.Conv(3, (3, 3), dtype=jnp.bfloat16)
  v = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert v['params']['kernel'].dtype == jnp.float32
  assert jax.eval_shape(layer.apply, v, x).dtype == jnp.bfloat16
  v16 = jax.eval_shape(nn.Conv(3, (3, 3), param_dtype=jnp.bfloat16).init, jax.random.key(0), x)
  assert v16['params']['kernel'].dtype == jnp.bfloat16


class _Tiny(fnn.Module):
  """A model that takes `conv=`, as every model here does."""
  conv: type = nn.Conv

  @fnn.compact
  def __call__(self, x):
    x = fnn.relu(self.conv(4, (3, 3), strides=2, name='conv_init')(x))
    x = self.conv(8, (3, 3), feature_group_count=2, padding='VALID', name='conv2')(x)
    return jnp.mean(x, axis=(1, 2))


def test_conv_is_swappable_with_flax_conv_in_a_model():
  x = rand((2, 8, 8, 3))
  ours, theirs = _Tiny(conv=nn.Conv), _Tiny(conv=fnn.Conv)
  variables = random_init(ours, x)
  assert shapes_of(abstract_init(theirs, x.shape)) == shapes_of(variables)
  (y, grads), (y_ref, grads_ref) = outputs_and_grads(ours, variables, theirs, variables, x)
  assert y.shape == (2, 8)
  np.testing.assert_allclose(y, y_ref, **F32_TOL)
  assert_trees_close(grads, grads_ref, **F32_TOL)


# ----------------------------------------------------------------------------
# ConvTranspose
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('shape, kernel, strides, padding, dilation', [
    ((2, 4, 4, 3), (3, 3), 2, 'SAME', 1),
    ((1, 4, 5, 2), (4, 4), 2, 'SAME', 1),
    ((2, 4, 3), (3,), 2, 'VALID', 1),
    ((1, 3, 4, 2), (2, 2), 3, 'VALID', 1),     # F < S: flax's W1*S needs output_padding
    ((1, 4, 3, 2), (3, 2), (2, 1), 'SAME', (1, 2)),
    ((1, 3, 3, 2, 2), (2, 3, 2), 2, 'SAME', 1),
])
def test_conv_transpose_matches_flax_transpose_kernel(shape, kernel, strides, padding,
                                                      dilation):
  nd = len(kernel)
  bcast = lambda v: (v,) * nd if isinstance(v, int) else v
  theirs = fnn.ConvTranspose(3, kernel, strides=bcast(strides), padding=padding,
                             kernel_dilation=bcast(dilation), transpose_kernel=True)
  f_eff = [(k - 1) * d + 1 for k, d in zip(kernel, bcast(dilation))]
  out_pad = tuple(max(s - f, 0) if padding == 'VALID' else 0
                  for s, f in zip(bcast(strides), f_eff))
  ours = nn.ConvTranspose(3, kernel, strides=strides, padding=padding,
                          kernel_dilation=dilation, output_padding=out_pad)
  x = rand(shape)
  v = random_init(ours, x)
  assert shapes_of(v) == {'params': {'kernel': kernel + (shape[-1], 3), 'bias': (3,)}}
  # flax's transposed kernel is (*k, features, C_in); ours is (*k, C_in, features).
  swap = lambda p: {'params': {'kernel': jnp.swapaxes(p['params']['kernel'], -1, -2),
                               'bias': p['params']['bias']}}
  (y, grads), (y_ref, (g_ref, gx_ref)) = outputs_and_grads(ours, v, theirs, swap(v), x)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, **F32_TOL)
  assert_trees_close(grads, (swap(g_ref), gx_ref), **F32_TOL)


@pytest.mark.parametrize('kernel, padding', [((3, 3), 'VALID'), ((4, 3), 'SAME')])
def test_conv_transpose_vs_flax_default_layout(kernel, padding):
  # flax's transpose_kernel=False: our kernel shape, spatially flipped.
  theirs = fnn.ConvTranspose(3, kernel, strides=(2, 2), padding=padding)
  ours = nn.ConvTranspose(3, kernel, strides=2, padding=padding)
  x = rand((1, 3, 4, 2))
  v = random_init(ours, x)
  assert shapes_of(abstract_init(theirs, x.shape)) == shapes_of(v)
  flip = {'params': {'kernel': jnp.flip(v['params']['kernel'], (0, 1)),
                     'bias': v['params']['bias']}}
  np.testing.assert_allclose(ours.apply(v, x), theirs.apply(flip, x), **F32_TOL)


def _swap_io(w, groups):
  """(*k, C_in/g, C_out) -> (*k, C_out/g, C_in): the conv that ConvTranspose undoes."""
  *k, ci, co = w.shape
  w = w.reshape(*k, ci, groups, co // groups)
  return jnp.swapaxes(w, -1, -3).reshape(*k, co // groups, groups * ci)


@pytest.mark.parametrize('shape, attrs', [
    ((1, 3, 4, 2), dict(kernel_size=(3, 3), strides=2, padding=((1, 0), (2, 1)))),
    ((1, 4, 4, 4), dict(kernel_size=(3, 2), strides=(2, 3), padding='FULL',
                        output_padding=(1, 2), feature_group_count=2)),
    ((2, 5, 2), dict(kernel_size=(3,), strides=2, padding=1, kernel_dilation=2,
                     output_padding=1)),
])
def test_conv_transpose_is_the_adjoint_of_lax_conv(shape, attrs):
  layer = nn.ConvTranspose(6, use_bias=False, **attrs)
  x = rand(shape)
  v = random_init(layer, x)
  nd = len(attrs['kernel_size'])
  groups = attrs.get('feature_group_count', 1)
  pads = attrs['padding']
  if isinstance(pads, int):
    pads = [(pads, pads)] * nd
  elif pads == 'FULL':
    pads = [(k - 1, k - 1) for k in attrs['kernel_size']]
  strides = attrs['strides']
  strides = (strides,) * nd if isinstance(strides, int) else strides
  w_fwd = _swap_io(v['params']['kernel'], groups)
  fwd = lambda z: lax.conv_general_dilated(
      z, w_fwd, strides, pads, rhs_dilation=(attrs.get('kernel_dilation', 1),) * nd,
      dimension_numbers=('NWC', 'WIO', 'NWC') if nd == 1 else ('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)
  y_shape = jax.eval_shape(layer.apply, v, x).shape
  assert jax.eval_shape(fwd, jax.ShapeDtypeStruct(y_shape, jnp.float32)).shape == x.shape
  y, y_ref = jax.jit(lambda v, x: (layer.apply(v, x),
                                   jax.vjp(fwd, jnp.zeros(y_shape))[1](x)[0]))(v, x)
  np.testing.assert_allclose(y, y_ref, **F32_TOL)


@pytest.mark.parametrize('padding, output_padding, out', [
    ('VALID', 0, 5),    # (W1 - 1)*S + F: the notes' 2x2 -> 5x5 for 3x3 at stride 2
    ('SAME', 0, 4),     # W1 * S
    ('VALID', 1, 6),
    (1, 1, 4),          # (W1 - 1)*S + F - 2P + output_padding
])
def test_conv_transpose_output_sizes(padding, output_padding, out):
  layer = nn.ConvTranspose(5, 3, strides=2, padding=padding, output_padding=output_padding)
  v = abstract_init(layer, (1, 2, 2, 3))
  assert shapes_of(v) == {'params': {'kernel': (3, 3, 3, 5), 'bias': (5,)}}
  y = jax.eval_shape(layer.apply, v, jax.ShapeDtypeStruct((1, 2, 2, 3), jnp.float32))
  assert y.shape == (1, out, out, 5)


# ----------------------------------------------------------------------------
# Depthwise, separable, spatially separable
# ----------------------------------------------------------------------------

def test_depthwise_conv_is_a_grouped_conv():
  x = rand((2, 7, 7, 3))
  layer = nn.DepthwiseConv((3, 3), depth_multiplier=2, strides=2)
  v = random_init(layer, x)
  assert shapes_of(v) == {'params': {'kernel': (3, 3, 1, 6), 'bias': (6,)}}
  y = layer.apply(v, x)
  assert y.shape == (2, 4, 4, 6)
  ref = fnn.Conv(6, (3, 3), strides=2, feature_group_count=3).apply(v, x)
  np.testing.assert_allclose(y, ref, **F32_TOL)
  # Output channels c * m .. c * m + m - 1 see input channel c alone.
  y0 = layer.apply(v, x.at[..., 1:].set(0.0)) - v['params']['bias']
  np.testing.assert_allclose(y0[..., 2:], 0.0, atol=1e-6)


@pytest.mark.parametrize('k, c_in, mult, c_out', [(3, 3, 1, 8), (5, 4, 2, 6)])
def test_separable_conv_params(k, c_in, mult, c_out):
  layer = nn.SeparableConv(c_out, k, depth_multiplier=mult)
  v = abstract_init(layer, (1, 16, 16, c_in))
  assert shapes_of(v) == {'params': {
      'depthwise': {'kernel': (k, k, 1, c_in * mult)},
      'pointwise': {'kernel': (1, 1, c_in * mult, c_out), 'bias': (c_out,)}}}
  assert n_params(v) == k * k * c_in * mult + c_in * mult * c_out + c_out
  assert n_params(v) < n_params(abstract_init(nn.Conv(c_out, k), (1, 16, 16, c_in)))


def test_separable_conv_is_depthwise_then_pointwise():
  x = rand((2, 9, 2))   # 1-D works too
  layer = nn.SeparableConv(5, 3, depth_multiplier=2, strides=2, padding='VALID')
  v = random_init(layer, x)
  y = layer.apply(v, x)
  p = v['params']
  h = fnn.Conv(4, (3,), strides=2, padding='VALID', feature_group_count=2,
               use_bias=False).apply({'params': p['depthwise']}, x)
  ref = fnn.Conv(5, (1,)).apply({'params': p['pointwise']}, h)
  assert y.shape == (2, 4, 5)
  np.testing.assert_allclose(y, ref, **F32_TOL)


@pytest.mark.parametrize('strides, padding', [
    (1, 'SAME'), (2, 'VALID'), ((2, 1), 'FULL'), (1, ((1, 2), (0, 1))), (2, 1),
    (1, 'CIRCULAR'),
])
def test_spatially_separable_conv_factors_a_rank_one_kernel(strides, padding):
  x = rand((2, 8, 7, 1))
  layer = nn.SpatiallySeparableConv(1, 3, strides=strides, padding=padding, use_bias=False)
  v = random_init(layer, x)
  assert shapes_of(v) == {'params': {'vertical': {'kernel': (3, 1, 1, 1)},
                                     'horizontal': {'kernel': (1, 3, 1, 1)}}}
  column = v['params']['vertical']['kernel'][:, 0, 0, 0]
  row = v['params']['horizontal']['kernel'][0, :, 0, 0]
  full = nn.Conv(1, 3, strides=strides, padding=padding, use_bias=False)
  kernel = jnp.outer(column, row)[:, :, None, None]
  y_full = full.apply({'params': {'kernel': kernel}}, x)
  np.testing.assert_allclose(layer.apply(v, x), y_full, **F32_TOL)


def test_spatially_separable_conv_params_and_shape():
  layer = nn.SpatiallySeparableConv(8, (3, 5), mid_features=4, strides=2)
  v = abstract_init(layer, (1, 16, 12, 6))
  assert n_params(v) == 3 * 6 * 4 + 5 * 4 * 8 + 8
  y = jax.eval_shape(layer.apply, v, jax.ShapeDtypeStruct((1, 16, 12, 6), jnp.float32))
  assert y.shape == (1, 8, 6, 8)


# ----------------------------------------------------------------------------
# Initializers
# ----------------------------------------------------------------------------

# One big kernel shape for every draw: jax.random compiles once per shape.
BIG = (3, 3, 128, 64)              # fan_in = 9 * 128, fan_out = 9 * 64


@pytest.mark.parametrize('name, variance', [
    ('he', 2 / (9 * 128)), ('kaiming', 2 / (9 * 128)),
    ('glorot', 2 / (9 * 192)), ('xavier', 2 / (9 * 192)),
    ('lecun', 1 / (9 * 128)), ('LeCun', 1 / (9 * 128)),
])
def test_initializer_variance(name, variance):
  w = initializers.get_initializer(name)(jax.random.key(0), BIG)
  assert w.shape == BIG and w.dtype == jnp.float32
  assert abs(float(jnp.var(w)) / variance - 1) < 0.15
  assert abs(float(jnp.mean(w))) < 0.05 * math.sqrt(variance)


def test_initializer_names_and_layers():
  np.testing.assert_array_equal(
      initializers.get_initializer('zeros')(jax.random.key(0), (2, 3)), np.zeros((2, 3)))
  # Glorot is the uniform variant: bounded by sqrt(6 / (fan_in + fan_out)).
  w = initializers.get_initializer('xavier')(jax.random.key(0), BIG)
  assert float(jnp.max(jnp.abs(w))) <= math.sqrt(6 / (9 * 192))
  # A layer takes the name; its default 'lecun' is flax.linen's default, so
  # the two layers initialise identically from the same key.
  x = jnp.ones((1, 3, 3, 128))
  he = nn.Conv(64, 3, kernel_init='he').init(jax.random.key(0), x)['params']['kernel']
  assert abs(float(jnp.var(he)) / (2 / (9 * 128)) - 1) < 0.15
  ours = nn.Conv(64, 3).init(jax.random.key(1), x)
  assert_trees_close(ours, fnn.Conv(64, (3, 3)).init(jax.random.key(1), x), rtol=0, atol=0)
  custom = nn.Conv(2, 3, kernel_init=jax.nn.initializers.ones).init(jax.random.key(0), x)
  np.testing.assert_array_equal(custom['params']['kernel'], 1.0)


def test_unknown_initializer_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown initializer 'orthogonal'.*he, kaiming, "
                                       r"glorot, xavier, lecun, zeros"):
    initializers.get_initializer('orthogonal')
  with pytest.raises(ValueError, match='Unknown initializer'):
    abstract_init(nn.Conv(4, 3, kernel_init='msra'), (1, 8, 8, 3))
  with pytest.raises(ValueError, match='kernel_init must be an initializer name'):
    abstract_init(nn.Conv(4, 3, kernel_init=0.1), (1, 8, 8, 3))


# ----------------------------------------------------------------------------
# Errors: before any compute, with the message a user reads
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('layer, shape, match', [
    (nn.Conv(0, 3), (1, 8, 8, 3), 'Conv: features must be a positive int'),
    (nn.Conv(-2, 3), (1, 8, 8, 3), 'features must be a positive int'),
    (nn.Conv(2.5, 3), (1, 8, 8, 3), 'features must be a positive int'),
    (nn.ConvTranspose(0, 3), (1, 8, 8, 3), 'ConvTranspose: features must be'),
    (nn.SeparableConv(0, 3), (1, 8, 8, 3), 'SeparableConv: features must be'),
    (nn.Conv(4, 0), (1, 8, 8, 3), r'kernel_size must be >= 1'),
    (nn.Conv(4, (3, 0)), (1, 8, 8, 3), r'kernel_size must be >= 1'),
    (nn.Conv(4, (3, 'a')), (1, 8, 8, 3), r'kernel_size must be an int or a tuple'),
    (nn.Conv(4, ()), (1, 8, 8, 3), r'kernel_size must be an int or a tuple'),
    (nn.Conv(4, (1, 1, 1, 1)), (1, 8, 8, 8, 8, 3), r'tuple of 1-3 ints'),
    (nn.Conv(4, 3.0), (1, 8, 8, 3), r'kernel_size must be an int or a tuple'),
    (nn.Conv(4, 3), (8, 3), r'int kernel_size \(3\).*rank 3-5\); got rank 2'),
    (nn.Conv(4, (3, 3, 3)), (8, 8, 3), r'3-D kernel needs an input'),
    (nn.Conv(4, 3, feature_group_count=0), (1, 8, 8, 3), 'feature_group_count must be'),
    (nn.DepthwiseConv(3, depth_multiplier=0), (1, 8, 8, 3), 'depth_multiplier must be'),
    (nn.SpatiallySeparableConv(4, (3, 3, 3)), (1, 8, 8, 8, 3), '2-D only'),
    (nn.SpatiallySeparableConv(4, 3, mid_features=0), (1, 8, 8, 3), 'mid_features'),
    (nn.Conv(4, (3, 3), padding='CAUSAL'), (1, 8, 8, 3), "'CAUSAL' is only defined for 1-D"),
    # Shape errors come from the ops.
    (nn.Conv(4, 3, feature_group_count=2), (1, 8, 8, 3), 'not divisible by groups=2'),
    (nn.Conv(4, 5, padding='VALID'), (1, 3, 3, 2), 'larger than the padded input'),
    (nn.Conv(4, 3, padding='HALF'), (1, 8, 8, 3), 'padding must be one of'),
    (nn.ConvTranspose(4, 3, strides=2, output_padding=2, padding='VALID'), (1, 4, 4, 3),
     'output_padding must satisfy'),
])
def test_errors(layer, shape, match):
  with pytest.raises(ValueError, match=match):
    abstract_init(layer, shape)


# ----------------------------------------------------------------------------
# Pooling and LRN layers: thin wrappers, checked against independent references
# ----------------------------------------------------------------------------

POOL_X = (2, 6, 6, 3)


def _pool_layers():
  return {
      'max': nn.MaxPool(2),
      'max_overlap': nn.MaxPool((3, 3), strides=2, padding='SAME'),
      'avg': nn.AvgPool((3, 3), strides=2, padding='SAME', count_include_pad=False),
      'avg_pad': nn.AvgPool(3, strides=1, padding=1),
      'sum': nn.SumPool(2),
      'l2': nn.LpPool(2),
      'l3': nn.LpPool(3, strides=3, p=3.0),
      'mixed': nn.MixedPool(2, alpha=0.3),
      'gap': nn.GlobalAvgPool(),
      'gmp': nn.GlobalMaxPool(keepdims=True),
      'spp': nn.SpatialPyramidPool(levels=(1, 2)),
      'spp_avg': nn.SpatialPyramidPool(levels=(3,), mode='avg'),
  }


def test_pooling_layers_have_no_params_and_match_references():
  layers = _pool_layers()
  x = rand(POOL_X)
  for layer in layers.values():
    assert abstract_init(layer, POOL_X) == {}
  out = jax.jit(lambda x: {k: m.apply({}, x) for k, m in layers.items()})(x)
  xn = np.asarray(x)
  blocks = lambda a, f: a.reshape(2, 6 // f, f, 6 // f, f, 3)
  np.testing.assert_allclose(out['max'], blocks(xn, 2).max(axis=(2, 4)), **F32_TOL)
  np.testing.assert_allclose(out['max_overlap'],
                             fnn.max_pool(x, (3, 3), (2, 2), 'SAME'), **F32_TOL)
  np.testing.assert_allclose(out['avg'], fnn.avg_pool(x, (3, 3), (2, 2), 'SAME',
                                                      count_include_pad=False), **F32_TOL)
  np.testing.assert_allclose(out['avg_pad'], fnn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1))),
                             **F32_TOL)
  np.testing.assert_allclose(out['sum'], blocks(xn, 2).sum(axis=(2, 4)), **F32_TOL)
  np.testing.assert_allclose(out['l2'], np.sqrt((blocks(xn, 2) ** 2).sum(axis=(2, 4))),
                             **F32_TOL)
  np.testing.assert_allclose(out['l3'], ((np.abs(blocks(xn, 3)) ** 3).sum(axis=(2, 4)))
                             ** (1 / 3), rtol=1e-4)
  np.testing.assert_allclose(out['mixed'], 0.3 * blocks(xn, 2).max(axis=(2, 4))
                             + 0.7 * blocks(xn, 2).mean(axis=(2, 4)), **F32_TOL)
  np.testing.assert_allclose(out['gap'], xn.mean(axis=(1, 2)), **F32_TOL)
  np.testing.assert_allclose(out['gmp'], xn.max(axis=(1, 2), keepdims=True), **F32_TOL)
  level2 = blocks(xn, 3).max(axis=(2, 4)).reshape(2, 4 * 3)
  np.testing.assert_allclose(out['spp'], np.concatenate([xn.max(axis=(1, 2)), level2], -1),
                             **F32_TOL)
  np.testing.assert_allclose(out['spp_avg'], blocks(xn, 2).mean(axis=(2, 4)).reshape(2, 27),
                             **F32_TOL)


def test_pooling_layer_shapes():
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  shape = lambda m, *s: jax.eval_shape(lambda x: m.apply({}, x), spec(*s)).shape
  assert shape(nn.MaxPool(2), 1, 28, 28, 6) == (1, 14, 14, 6)           # LeNet S2
  assert shape(nn.MaxPool(3, strides=2), 1, 55, 55, 96) == (1, 27, 27, 96)  # AlexNet
  assert shape(nn.AvgPool(2), 4, 9, 3) == (4, 4, 3)
  assert shape(nn.SumPool((2, 1, 2)), 1, 4, 4, 4, 2) == (1, 2, 4, 2, 2)
  assert shape(nn.GlobalAvgPool(keepdims=True), 2, 5, 7, 4) == (2, 1, 1, 4)
  assert shape(nn.SpatialPyramidPool(), 2, 13, 9, 8) == (2, 8 * (1 + 4 + 16))
  assert shape(nn.SpatialPyramidPool(), 2, 21, 17, 8) == (2, 8 * 21)  # any size


@pytest.mark.parametrize('per_channel', [False, True])
def test_mixed_pool_learnable_alpha(per_channel):
  layer = nn.MixedPool(2, alpha=0.25, learnable=True, per_channel=per_channel)
  x = rand(POOL_X)
  v = layer.init(jax.random.key(0), x)
  logit = v['params']['alpha_logit']
  assert logit.shape == ((3,) if per_channel else ())
  np.testing.assert_allclose(jax.nn.sigmoid(logit), 0.25, rtol=1e-6)
  r = rand((2, 3, 3, 3))
  blocks = np.asarray(x).reshape(2, 3, 2, 3, 2, 3)
  y_max, y_avg = blocks.max(axis=(2, 4)), blocks.mean(axis=(2, 4))

  def loss(v):
    return jnp.sum(layer.apply(v, x) * r)

  value, grad = jax.jit(jax.value_and_grad(loss))(v)
  np.testing.assert_allclose(value, jnp.sum((0.25 * y_max + 0.75 * y_avg) * r), rtol=1e-5)
  # dL/dlogit = sigmoid'(logit) * sum dL/dY (MAX - AVG) = 0.25 * 0.75 * ...
  per_c = jnp.sum(r * (y_max - y_avg), axis=(0, 1, 2))
  expected = 0.25 * 0.75 * (per_c if per_channel else jnp.sum(per_c))
  np.testing.assert_allclose(grad['params']['alpha_logit'], expected, rtol=1e-4, atol=1e-6)


def test_lrn_layer():
  x = rand((2, 3, 3, 7)) * 4
  layer = nn.LRN(size=3, k=1.0, alpha=0.1, beta=0.75)
  assert abstract_init(layer, x.shape) == {}
  xn = np.asarray(x, np.float64)
  sq = np.pad(xn ** 2, [(0, 0)] * 3 + [(1, 1)])
  s = sum(sq[..., i:i + 7] for i in range(3))
  np.testing.assert_allclose(layer.apply({}, x), xn / (1.0 + 0.1 * s) ** 0.75, rtol=1e-5)
  within = nn.LRN(mode='within_channel')
  assert jax.eval_shape(lambda x: within.apply({}, x), x).shape == x.shape


@pytest.mark.parametrize('layer, match', [
    (nn.MaxPool(0), 'window must be >= 1'),
    (nn.AvgPool(2, strides=0), 'stride must be >= 1'),
    (nn.MaxPool(7), 'larger than the padded input'),
    (nn.LpPool(2, p=0.0), 'p must be a finite number > 0'),
    (nn.MixedPool(2, alpha=1.5), r'alpha must lie in \[0, 1\]'),
    (nn.MixedPool(2, alpha=1.0, learnable=True), 'strictly between 0 and 1'),
    (nn.MixedPool(2, per_channel=True), 'per_channel=True needs learnable=True'),
    (nn.SpatialPyramidPool(levels=(1, 8)), 'smaller than the largest pyramid level'),
    (nn.SpatialPyramidPool(mode='min'), "mode must be 'max' or 'avg'"),
    (nn.LRN(size=0), 'size must be an int >= 1'),
    (nn.LRN(mode='spatial'), 'mode must be one of'),
])
def test_pooling_and_lrn_errors(layer, match):
  with pytest.raises(ValueError, match=match):
    abstract_init(layer, POOL_X)
