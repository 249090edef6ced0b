"""The fully connected layer with its explicit backward (cnn_jax/ops/dense.py,
csrc/dense_cpu.cc, cnn_jax.nn.Dense).

The three products Y = X W, dX = dY W^T, dW = X^T dY must equal float64
references over shapes off the 16-wide vectors (N % 16 != 0, N < 16, K = 1,
M = 1) and both sides of the rule's row limit; the tails must not mix lanes
(an infinity in one column stays in the outputs that use it); the rule must pick
the native kernels exactly for its class; and gradients (first and second order),
vmap, pmap and flax's Dense must be unchanged by them."""
import importlib

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn_jax.nn as cnn_nn

dense_ops = importlib.import_module('cnn_jax.ops.dense')
native = importlib.import_module('cnn_jax.ops.native')

needs_native = pytest.mark.skipif(
    not native.available(), reason=f'native kernels not available: {native.unavailable_reason()}')

# (M, K, N): vector tails, tiny dims, several column items and row blocks of
# the forward, several row items of the gradients, the row limit and one past it.
SHAPES = [(16, 300, 70), (3, 37, 21), (1, 1, 1), (7, 5, 1000), (2, 100, 15),
          (5, 1030, 33), (32, 64, 130), (33, 64, 130), (6, 49, 64)]


def _arrays(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  dy = rng.standard_normal((m, n)).astype(np.float32)
  return x, w, dy


def _close(got, want, k):
  """float32 sums of k terms against a float64 reference."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k + 1) * scale)


@pytest.mark.parametrize('shape', SHAPES)
def test_products_equal_float64(shape):
  m, k, n = shape
  x, w, dy = _arrays(m, k, n)
  x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
  _close(jax.jit(dense_ops.forward)(x, w), x64 @ w64, k)
  _close(jax.jit(dense_ops.input_grad)(dy, w), dy64 @ w64.T, n)
  _close(jax.jit(dense_ops.weight_grad)(x, dy), x64.T @ dy64, m)


@pytest.mark.parametrize('shape', [(16, 300, 70), (40, 20, 10), (2, 3, 17)])
def test_matmul_vjp_is_the_notes_backward(shape):
  """jax.grad through matmul gives dX = dY W^T and dW = X^T dY, equal to autodiff
  of x @ w."""
  m, k, n = shape
  x, w, dy = _arrays(m, k, n, seed=1)
  y, vjp = jax.vjp(dense_ops.matmul, x, w)
  dx, dw = vjp(jnp.asarray(dy))
  _close(y, x.astype(np.float64) @ w, k)
  _close(dx, dy.astype(np.float64) @ w.T.astype(np.float64), n)
  _close(dw, x.T.astype(np.float64) @ dy, m)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  got = jax.grad(loss(dense_ops.matmul), (0, 1))(x, w)
  want = jax.grad(loss(jnp.matmul), (0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_second_order_gradients():
  """Each native product is a custom_vjp whose cotangents are the other two
  products: grad of grad matches autodiff of x @ w."""
  x, w, _ = _arrays(5, 23, 19, seed=2)

  def outer(f):
    inner = jax.grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w))), (0, 1))
    return jax.grad(lambda x, w: sum(jnp.sum(g ** 2) for g in inner(x, w)), (0, 1))

  got, want = outer(dense_ops.matmul)(x, w), outer(jnp.matmul)(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4,
                               atol=1e-5 * float(np.abs(r).max()))


@needs_native
@pytest.mark.parametrize('n', [20, 70, 5])
def test_tail_lanes_do_not_mix(n):
  """The kernels read whole 16-lane vectors past a row's end (into the next row)
  or under masks. An infinity in one column of W (or dY) must reach exactly the
  outputs that use it."""
  m, k = 6, 40
  x, w, dy = _arrays(m, k, n, seed=3)
  w[:, 0] = np.inf                  # forward: only Y[:, 0] uses column 0
  y = np.asarray(jax.jit(dense_ops.forward)(x, w))
  assert not np.isfinite(y[:, 0]).any() and np.isfinite(y[:, 1:]).all()
  w2 = _arrays(m, k, n, seed=3)[1]
  w2[5, 0] = np.inf                 # input grad: only dX[:, 5] uses row 5 of W
  dx = np.asarray(jax.jit(dense_ops.input_grad)(dy, w2))
  assert not np.isfinite(dx[:, 5]).any()
  assert np.isfinite(np.delete(dx, 5, axis=1)).all()
  dy2 = dy.copy()
  dy2[:, 0] = np.inf                # weight grad: only dW[:, 0] uses column 0 of dY
  dw = np.asarray(jax.jit(dense_ops.weight_grad)(x, dy2))
  assert not np.isfinite(dw[:, 0]).any() and np.isfinite(dw[:, 1:]).all()


@needs_native
def test_rule_picks_native_for_few_rows_only():
  w = jnp.zeros((64, 40), jnp.float32)
  step = jax.jit(jax.grad(lambda x, w: jnp.sum(dense_ops.matmul(x, w) ** 2), (0, 1)))
  few = step.lower(jnp.zeros((dense_ops.NATIVE_MAX_ROWS, 64), jnp.float32), w).as_text()
  many = step.lower(jnp.zeros((dense_ops.NATIVE_MAX_ROWS + 1, 64), jnp.float32), w).as_text()
  for target in ('cnn_jax_dense_forward', 'cnn_jax_dense_input_grad',
                 'cnn_jax_dense_weight_grad'):
    assert target in few
    assert target not in many
  with native.disabled():
    off = step.lower(jnp.zeros((4, 64), jnp.float32), w).as_text()
  assert 'cnn_jax_dense' not in off
  bf16 = step.lower(jnp.zeros((4, 64), jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
  assert 'cnn_jax_dense' not in bf16


def test_native_and_xla_agree_in_a_training_gradient():
  x, w, _ = _arrays(8, 50, 30, seed=4)
  loss = lambda x, w: jnp.sum(jax.nn.log_softmax(dense_ops.matmul(x, w)))
  got = jax.jit(jax.grad(loss, (0, 1)))(x, w)
  with native.disabled():
    want = jax.jit(jax.grad(loss, (0, 1)))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                               atol=1e-5 * float(np.abs(r).max()))


def test_products_are_reproducible():
  x, w, dy = _arrays(16, 900, 300, seed=5)
  for f, a, b in ((dense_ops.forward, x, w), (dense_ops.input_grad, dy, w),
                  (dense_ops.weight_grad, x, dy)):
    first = np.asarray(jax.jit(f)(a, b))
    for _ in range(3):
      np.testing.assert_array_equal(np.asarray(jax.jit(f)(a, b)), first)


def test_per_example_gradients_under_vmap():
  x, w, _ = _arrays(4, 12, 9, seed=6)
  per_example = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.cos(dense_ops.matmul(x[None], w)))),
                         in_axes=(None, 0))
  got = per_example(w, x)
  want = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.cos(x[None] @ w))), in_axes=(None, 0))(w, x)
  assert got.shape == (4, 12, 9)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_weight_gradient_under_pmap():
  n = min(jax.local_device_count(), 4)
  if n < 2:
    pytest.skip('needs several devices (tests/conftest.py asks for 8 CPU devices)')
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((n, 3, 10)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((10, 17)), jnp.float32)
  grad = jax.grad(lambda w, x: jnp.sum(jnp.cos(dense_ops.matmul(x, w))))
  summed = jax.pmap(lambda x: jax.lax.psum(grad(w, x), 'd'), axis_name='d')(x)[0]
  want = sum(jax.grad(lambda w, x: jnp.sum(jnp.cos(x @ w)))(w, x[i]) for i in range(n))
  np.testing.assert_allclose(np.asarray(summed), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_dense_flattens_leading_axes_and_adds_bias():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 11)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((11, 6)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((6,)), jnp.float32)
  got = dense_ops.dense(x, w, b)
  assert got.shape == (2, 3, 4, 6)
  np.testing.assert_allclose(np.asarray(got), np.asarray(x @ w + b), rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_problem():
  with pytest.raises(ValueError, match='in_features'):
    dense_ops.dense(jnp.zeros((2, 5)), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r'\(in_features, out_features\)'):
    dense_ops.matmul(jnp.zeros((2, 5)), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match='Flatten'):
    dense_ops.matmul(jnp.zeros((2, 3, 5)), jnp.zeros((5, 3)))


@pytest.mark.parametrize('use_bias', [True, False])
def test_layer_is_flax_dense(use_bias):
  """Same parameter tree, initial values and outputs as flax.linen.Dense; the
  gradients too."""
  x = jnp.asarray(np.random.default_rng(9).standard_normal((4, 2, 30)), jnp.float32)
  ours, theirs = cnn_nn.Dense(20, use_bias=use_bias), flax_nn.Dense(20, use_bias=use_bias)
  assert isinstance(ours, flax_nn.Dense)
  params = ours.init(jax.random.key(0), x)
  want_params = theirs.init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want_params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)),
                             np.asarray(theirs.apply(params, x)), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
  got, want = jax.grad(loss(ours))(params), jax.grad(loss(theirs))(params)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_layer_falls_back_to_flax_outside_float32():
  """bfloat16 compute and an explicit precision take flax's own path (no native
  call in the program) and give flax's results."""
  x = jnp.asarray(np.random.default_rng(10).standard_normal((3, 8)), jnp.float32)
  for kwargs in ({'dtype': jnp.bfloat16}, {'precision': jax.lax.Precision.HIGHEST}):
    ours, theirs = cnn_nn.Dense(5, **kwargs), flax_nn.Dense(5, **kwargs)
    params = ours.init(jax.random.key(1), x)
    text = jax.jit(ours.apply).lower(params, x).as_text()
    assert 'cnn_jax_dense' not in text
    got, want = ours.apply(params, x), theirs.apply(params, x)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
