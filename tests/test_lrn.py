"""LRN against a naive NumPy loop, jax.grad of a plain jnp version, finite
differences (float64), a hand-computed case, and the PyTorch convention."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnn_jax.ops.lrn import lrn

# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


# Tiny shapes per number of spatial dims; C = 3 or 2 so that sizes 4 and 5 clip
# at both channel borders.
SHAPES = {1: (2, 5, 3), 2: (2, 4, 3, 3), 3: (1, 3, 4, 3, 2)}
MODES = ('across_channels', 'within_channel')
# alpha is large so that normalisation visibly changes the output.
HP = dict(k=1.0, alpha=0.3, beta=0.75)


def _window(i, n, size):
  """Indices j of the window at i: i - size//2 .. i + (size-1)//2, clipped."""
  return range(max(0, i - size // 2), min(n - 1, i + (size - 1) // 2) + 1)


def naive_lrn(x, size, k, alpha, beta, mode):
  """The notes' equation, one output element at a time (float64)."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  spatial = x.shape[1:-1]
  for idx in np.ndindex(*x.shape):
    n, pos, c = idx[0], idx[1:-1], idx[-1]
    if mode == 'across_channels':
      s = sum(x[(n, *pos, j)] ** 2 for j in _window(c, x.shape[-1], size))
    else:
      ranges = [_window(p, w, size) for p, w in zip(pos, spatial)]
      s = sum(x[(n, *q, c)] ** 2 for q in itertools.product(*ranges))
    out[idx] = x[idx] / (k + alpha * s) ** beta
  return out


def _box_sum(q, axis, size):
  """Windowed sum along one axis by shifted slices (independent of lax.reduce_window)."""
  lo, hi = size // 2, (size - 1) // 2
  pad = [(0, 0)] * q.ndim
  pad[axis] = (lo, hi)
  qp = jnp.pad(q, pad)
  n = q.shape[axis]
  return sum(jax.lax.slice_in_dim(qp, t, t + n, axis=axis) for t in range(size))


def plain_lrn(x, size, k, alpha, beta, mode):
  """LRN in plain jnp, differentiated by JAX autodiff as the reference."""
  axes = (x.ndim - 1,) if mode == 'across_channels' else range(1, x.ndim - 1)
  s = x * x
  for a in axes:   # a box over several axes is a product of 1-D boxes
    s = _box_sum(s, a, size)
  return x / (k + alpha * s) ** beta


def _data(shape, seed=0, scale=2.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('nd', (1, 2, 3))
@pytest.mark.parametrize('size', (1, 2, 3, 4, 5))
def test_forward_matches_naive_loop(mode, nd, size):
  x = _data(SHAPES[nd])
  got = lrn(x, size=size, mode=mode, **HP)
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, naive_lrn(x, size, mode=mode, **HP),
                             rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize('mode,nd,size', [
    ('across_channels', 1, 2), ('across_channels', 1, 5), ('across_channels', 2, 4),
    ('across_channels', 3, 3), ('within_channel', 1, 2), ('within_channel', 2, 3),
    ('within_channel', 2, 4), ('within_channel', 3, 2),
])
def test_backward_matches_autodiff_float32(mode, nd, size):
  x = _data(SHAPES[nd], seed=1)
  dy = _data(SHAPES[nd], seed=2, scale=1.0)

  @jax.jit   # one compile per case, not one per primitive: keeps the file fast
  def forward_and_backward(x, dy):
    out = []
    for f in (lambda v: lrn(v, size=size, mode=mode, **HP),
              lambda v: plain_lrn(v, size, mode=mode, **HP)):
      y, vjp = jax.vjp(f, x)
      out.append((y, vjp(dy)[0]))
    return out

  (y, dx), (y_ref, dx_ref) = forward_and_backward(x, dy)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  # float32: the two backward passes sum the same terms in different orders.
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode,size,nd,order', [
    ('across_channels', 4, 1, 2), ('across_channels', 5, 2, 1),
    ('within_channel', 3, 2, 1), ('within_channel', 2, 3, 1),
])
def test_check_grads_float64(mode, size, nd, order):
  with jax.enable_x64(True):
    x = jnp.asarray(_data(SHAPES[nd], seed=3, dtype=np.float64))
    f = jax.jit(lambda v: lrn(v, size=size, mode=mode, **HP))
    assert f(x).dtype == jnp.float64
    # order 2 is reverse over reverse under jit: the backward pass itself must
    # be differentiable (e.g. for gradient penalties).
    check_grads(f, (x,), order=order, modes=('rev',), atol=1e-6, rtol=1e-6)


def test_hand_computed_one_pixel_three_channels():
  # x = (1, 2, 3), size 3, k=2, alpha=1e-4, beta=0.75:
  #   S = (1+4, 1+4+9, 4+9) = (5, 14, 13),  D = (2.0005, 2.0014, 2.0013),
  #   b = x / D^0.75 = (1/1.682108, 2/1.682676, 3/1.682613).
  x = jnp.array([[[1.0, 2.0, 3.0]]])
  got = lrn(x, size=3, k=2.0, alpha=1e-4, beta=0.75)
  np.testing.assert_allclose(got[0, 0], [0.5944921, 1.1885832, 1.7829416], rtol=1e-6)
  # AlexNet's size 5 covers all three channels: S = 14 everywhere.
  got5 = lrn(x)
  np.testing.assert_allclose(got5[0, 0], np.array([1, 2, 3]) / 2.0014 ** 0.75, rtol=1e-6)


def test_alexnet_defaults():
  # A conv1-like block: 96 channels, post-ReLU magnitudes.
  x = np.maximum(_data((1, 3, 3, 96), seed=4, scale=30.0), 0)
  got = lrn(x)
  want = naive_lrn(x, 5, 2.0, 1e-4, 0.75, 'across_channels')
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
  np.testing.assert_array_equal(
      got, lrn(x, size=5, k=2.0, alpha=1e-4, beta=0.75, mode='across_channels'))
  # Lateral inhibition: every output shrinks, and more in busy neighbourhoods.
  assert np.all(np.abs(got) <= np.abs(x) / 2.0 ** 0.75 + 1e-6)


def torch_lrn_numpy(x, size, alpha, beta, k):
  """PyTorch's F.local_response_norm, channels-last, written out in NumPy:
  squares zero-padded by size//2 before and (size-1)//2 after along C, averaged
  over `size` (padding counted), then x / (k + alpha * mean)^beta."""
  sq = np.asarray(x, np.float64) ** 2
  c = x.shape[-1]
  pad = [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)]
  sqp = np.pad(sq, pad)
  mean = sum(sqp[..., t:t + c] for t in range(size)) / size
  return x / (k + alpha * mean) ** beta


@pytest.mark.parametrize('size', (2, 3, 4, 5, 7))
def test_pytorch_convention_is_alpha_over_size(size):
  x = _data((2, 3, 3, 6), seed=5, scale=3.0)
  alpha_torch, beta, k = 0.5, 0.75, 1.0
  ours = lrn(x, size=size, alpha=alpha_torch / size, beta=beta, k=k)
  np.testing.assert_allclose(ours, torch_lrn_numpy(x, size, alpha_torch, beta, k),
                             rtol=2e-6, atol=1e-6)
  # Same alpha, different convention: not equal.
  assert not np.allclose(lrn(x, size=size, alpha=alpha_torch, beta=beta, k=k),
                         torch_lrn_numpy(x, size, alpha_torch, beta, k), rtol=1e-3)


def test_pytorch_itself_when_installed():
  torch = pytest.importorskip('torch')
  x = _data((2, 4, 4, 7), seed=6, scale=3.0)
  for size in (3, 4):
    want = torch.nn.functional.local_response_norm(
        torch.from_numpy(np.moveaxis(x, -1, 1).copy()), size, alpha=0.5, beta=0.75, k=1.0)
    ours = lrn(x, size=size, alpha=0.5 / size, beta=0.75, k=1.0)
    np.testing.assert_allclose(ours, np.moveaxis(want.numpy(), 1, -1), rtol=1e-5, atol=1e-6)


def test_beta_zero_is_identity_and_jit():
  x = _data((1, 2, 2, 4), seed=7)
  np.testing.assert_array_equal(lrn(x, beta=0.0), x)
  g = jax.grad(lambda v: jnp.sum(lrn(v, beta=0.0)))(x)
  np.testing.assert_array_equal(g, np.ones_like(x))
  f = jax.jit(lambda v: lrn(v, size=3, mode='within_channel', **HP))
  np.testing.assert_allclose(f(x), lrn(x, size=3, mode='within_channel', **HP), rtol=1e-6)


def test_bfloat16_sums_in_float32():
  x = _data((1, 2, 2, 8), seed=8, scale=300.0)   # 300^2 * 5 overflows float16
  got16 = lrn(x.astype(jnp.float16))
  assert got16.dtype == jnp.float16 and np.all(np.isfinite(got16))
  got = lrn(jnp.asarray(x, jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), lrn(x), rtol=2e-2, atol=1e-2)
  dx = jax.grad(lambda v: jnp.sum(lrn(v).astype(jnp.float32)))(jnp.asarray(x, jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16


@pytest.mark.parametrize('kwargs,match', [
    (dict(size=0), 'size must be an int >= 1'),
    (dict(size=2.5), 'size must be an int >= 1'),
    (dict(size=True), 'size must be an int >= 1'),
    (dict(k=-1.0), 'k must be finite and >= 0'),
    (dict(alpha=-1e-4), 'alpha must be finite and >= 0'),
    (dict(beta=-0.75), 'beta must be finite and >= 0'),
    (dict(beta=float('nan')), 'beta must be finite'),
    (dict(k='2'), 'k must be a real number'),
    (dict(mode='inter'), "mode must be one of .*across_channels"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lrn(np.ones((1, 2, 2, 3), np.float32), **kwargs)


@pytest.mark.parametrize('shape', [(4, 3), (1, 1, 1, 1, 1, 3)])
def test_bad_rank(shape):
  with pytest.raises(ValueError, match=r'1, 2 or 3 spatial dimensions \(rank 3, 4 or 5\)'):
    lrn(np.ones(shape, np.float32))


def test_integer_input_rejected():
  with pytest.raises(ValueError, match='floating-point.*astype'):
    lrn(np.ones((1, 2, 2, 3), np.int32))
