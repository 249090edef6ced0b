"""Activations: values vs NumPy, custom backward vs autodiff of the plain
function and vs finite differences, the notes' ReLU example, and stability."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnn_jax.ops import activations as act


# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


# name -> (ours, NumPy reference, plain jnp function differentiated by JAX).
CASES = {
    'relu': (act.relu, lambda x: np.maximum(x, 0), jax.nn.relu),
    'leaky_relu': (act.leaky_relu, lambda x: np.where(x > 0, x, 0.01 * x),
                   lambda x: jnp.where(x > 0, x, 0.01 * x)),
    'sigmoid': (act.sigmoid, lambda x: 1 / (1 + np.exp(-x)), lambda x: 1 / (1 + jnp.exp(-x))),
    'tanh': (act.tanh, np.tanh, jnp.tanh),
    'scaled_tanh': (act.scaled_tanh, lambda x: 1.7159 * np.tanh(2 * x / 3),
                    lambda x: 1.7159 * jnp.tanh(2 * x / 3)),
    'softmax': (act.softmax, _np_softmax,
                lambda x: jnp.exp(x) / jnp.sum(jnp.exp(x), -1, keepdims=True)),
    'log_softmax': (act.log_softmax, lambda x: np.log(_np_softmax(x)),
                    lambda x: x - jnp.log(jnp.sum(jnp.exp(x), -1, keepdims=True))),
}


def _data(shape=(3, 5), seed=0, dtype=np.float32):
  x = 2.0 * np.random.default_rng(seed).standard_normal(shape)
  # Keep clear of the ReLU kink, where autodiff conventions differ.
  x = np.where(np.abs(x) < 1e-3, 0.5, x)
  return x.astype(dtype)


@pytest.mark.parametrize('name', sorted(CASES))
def test_values_match_numpy(name):
  ours, ref, _ = CASES[name]
  x = _data()
  got = ours(x)
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref(x.astype(np.float64)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', sorted(CASES))
def test_gradients_match_autodiff_of_plain_function(name):
  ours, _, plain = CASES[name]
  x, dy = _data(seed=1), _data(seed=2)
  # One jit for both backward passes: one compile instead of one per primitive.
  dx, dx_ref = jax.jit(lambda x, dy: [jax.vjp(f, x)[1](dy)[0] for f in (ours, plain)])(x, dy)
  # float32; the custom and autodiff backward round differently.
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', sorted(CASES))
def test_check_grads_float64(name):
  ours = CASES[name][0]
  with jax.enable_x64(True):
    x = jnp.asarray(_data((2, 4), seed=3, dtype=np.float64))
    assert ours(x).dtype == jnp.float64
    check_grads(ours, (x,), order=1, modes=('rev',), atol=1e-7, rtol=1e-7)


def test_seed_004_relu_example():
  fmap = np.array([[-2, 3, -1], [4, -5, 6], [-7, 8, -9]])
  got = act.relu(fmap)
  np.testing.assert_array_equal(got, [[0, 3, 0], [4, 0, 6], [0, 8, 0]])
  assert got.shape == fmap.shape                     # L x B x d is unchanged
  assert jnp.issubdtype(got.dtype, jnp.integer)      # integer maps stay integer


def test_relu_gradient_is_zero_at_zero_and_below():
  x = jnp.array([-3.0, -1e-30, 0.0, 1e-30, 2.0])
  g = jax.grad(lambda v: jnp.sum(act.relu(v)))(x)
  np.testing.assert_array_equal(g, [0.0, 0.0, 0.0, 1.0, 1.0])
  assert jax.grad(act.relu)(0.0) == 0.0


def test_leaky_relu_slope():
  x = jnp.array([-2.0, 0.0, 3.0])
  np.testing.assert_allclose(act.leaky_relu(x, 0.2), [-0.4, 0.0, 3.0], rtol=1e-7)
  g = jax.grad(lambda v: jnp.sum(act.leaky_relu(v, negative_slope=0.2)))(x)
  np.testing.assert_allclose(g, [0.2, 0.2, 1.0], rtol=1e-7)
  # A fractional slope on an integer map is not truncated.
  np.testing.assert_allclose(act.leaky_relu(np.array([-5, 5]), 0.1), [-0.5, 5.0], rtol=1e-6)


def test_scaled_tanh_lecun_constants():
  np.testing.assert_allclose(act.scaled_tanh(1.0), 1.7159 * np.tanh(2 / 3), rtol=1e-6)
  # LeCun 1998 chose A and S so that f(+-1) = +-1.
  np.testing.assert_allclose(act.scaled_tanh(jnp.array([1.0, -1.0])), [1.0, -1.0], atol=1e-3)
  np.testing.assert_allclose(act.scaled_tanh(100.0), 1.7159, rtol=1e-6)   # asymptote A
  # Slope at 0 is A * S = 1.1439.
  np.testing.assert_allclose(jax.grad(act.scaled_tanh)(0.0), 1.7159 * 2 / 3, rtol=1e-6)


def test_softmax_is_stable_on_large_inputs():
  x = jnp.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4], [-1e4, -1e4 + 1.0, -1e4]])
  s = act.softmax(x)
  assert np.all(np.isfinite(s))
  np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(s[0], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(s[1], [1 / 3] * 3, rtol=1e-6)
  np.testing.assert_allclose(s[2], _np_softmax(np.array([0.0, 1.0, 0.0])), rtol=1e-6)
  ls = act.log_softmax(x)
  assert np.all(np.isfinite(ls))
  np.testing.assert_allclose(ls[0], [0.0, -1e4, -2e4], rtol=1e-6)
  dy = jnp.ones_like(x).at[:, 0].set(2.0)
  for f in (act.softmax, act.log_softmax):
    assert np.all(np.isfinite(jax.vjp(f, x)[1](dy)[0]))


def test_softmax_axis_and_tuple_axes():
  x = _data((2, 3, 4), seed=4)
  np.testing.assert_allclose(act.softmax(x, axis=1), _np_softmax(x, axis=1), rtol=1e-6)
  s = act.softmax(x, axis=(1, 2))
  np.testing.assert_allclose(s.sum((1, 2)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(act.log_softmax(x, axis=(1, -1)), np.log(s), rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    check_grads(jax.jit(lambda v: act.softmax(v, axis=(0, 2))), (x64,), 1, modes=('rev',))
    check_grads(jax.jit(lambda v: act.log_softmax(v, axis=0)), (x64,), 1, modes=('rev',))


def test_integer_inputs_are_promoted():
  for f in (act.sigmoid, act.tanh, act.scaled_tanh, act.softmax, act.log_softmax):
    assert jnp.issubdtype(f(np.array([0, 1, 2])).dtype, jnp.floating)
  np.testing.assert_allclose(act.sigmoid(np.array([0])), [0.5])


def test_jit_and_second_order():
  x = _data(seed=5)
  for name, (ours, _, plain) in CASES.items():
    np.testing.assert_allclose(jax.jit(ours)(x), ours(x), rtol=1e-6, err_msg=name)
  # The backward passes are plain jnp, so they differentiate again.
  h = jax.grad(jax.grad(act.scaled_tanh))(0.5)
  t = np.tanh(1 / 3)
  np.testing.assert_allclose(h, 1.7159 * (2 / 3) ** 2 * -2 * t * (1 - t * t), rtol=1e-5)
  h = jax.grad(jax.grad(act.sigmoid))(0.3)
  s = 1 / (1 + np.exp(-0.3))
  np.testing.assert_allclose(h, s * (1 - s) * (1 - 2 * s), rtol=1e-5)


def test_get_activation():
  for name in act.list_activations():
    assert act.get_activation(name) is act.get_activation(name.upper())
  assert act.get_activation('relu') is act.relu
  assert act.get_activation('scaled_tanh') is act.scaled_tanh
  np.testing.assert_array_equal(act.get_activation('identity')(np.array([-1.0])), [-1.0])


@pytest.mark.parametrize('name', ['gelu', '', None, 3])
def test_get_activation_unknown(name):
  with pytest.raises(ValueError, match='unknown activation.*valid names are .*leaky_relu.*'
                                       'relu.*scaled_tanh.*softmax'):
    act.get_activation(name)


@pytest.mark.parametrize('f,axis,match', [
    (act.softmax, 2, r'axis 2 is out of range for an input of rank 2 \(valid: -2 .. 1\)'),
    (act.log_softmax, -3, 'axis -3 is out of range'),
    (act.softmax, 1.0, 'axis must be an int or a tuple of ints'),
    (act.softmax, (1, -1), 'names the same dimension twice'),
])
def test_softmax_bad_axis(f, axis, match):
  with pytest.raises(ValueError, match=match):
    f(np.ones((2, 3), np.float32), axis=axis)


def test_leaky_relu_bad_slope():
  with pytest.raises(ValueError, match='negative_slope must be a real number'):
    act.leaky_relu(np.ones(3, np.float32), negative_slope='0.1')
