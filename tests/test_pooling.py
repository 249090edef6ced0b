"""Pooling ops: forward vs NumPy loops and the notes' examples, the custom
backward vs jax.grad of lax.reduce_window references and finite differences,
the max-pool routing and tie rule, unpooling, SPP, and every error message."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from cnn_jax.ops import pooling, shapes
from cnn_jax.ops.pooling import (avg_pool, global_avg_pool, global_max_pool, lp_pool,
                                 max_pool, max_pool_with_argmax, max_unpool, mixed_pool,
                                 rms_pool, spatial_pyramid_pool, sum_pool)

# float32 custom backward vs jax.grad of the lax.reduce_window references.
F32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope='module')
def fast_compiles():
  """Compiling dominates these tiny tests; XLA's optimizations do not change
  the values checked here (test_ops_under_jit_and_grad_through_jit compiles
  with them on and compares)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def fast_jit(f):
  """jax.jit for test programs. On CPU, XLA's fusion emitters cost 2-3x in
  compile time on these tiny programs and change no value checked here."""
  options = {'xla_cpu_use_fusion_emitters': False} if jax.default_backend() == 'cpu' else None
  return jax.jit(f, compiler_options=options)


# (spatial, window, stride, padding): 1/2/3-D, odd/even sizes, windows 2-3,
# strides 1-3 (3 > window leaves gaps), VALID/SAME/FULL/int/per-dim/(lo, hi).
GRID = [
    ((7,), 3, 2, 'VALID'),
    ((8,), 2, 1, 'SAME'),
    ((5,), 3, 3, 'FULL'),
    ((8,), 2, 3, 'VALID'),
    ((6,), 3, 2, [(1, 2)]),
    ((4, 4), 2, 2, 'VALID'),
    ((5, 6), 3, 2, 'SAME'),
    ((5, 5), 3, 2, 'FULL'),
    ((6, 7), (2, 3), (1, 3), [(1, 0), (2, 1)]),
    ((7, 5), 3, 3, 1),
    ((4, 5), 2, 1, 'VALID'),
    ((7, 8), 2, 3, 'SAME'),
    ((5, 4), 3, 1, [1, 2]),
    ((4, 5, 3), 2, (2, 1, 2), 'SAME'),
    ((5, 4, 4), 3, 2, 1),
    ((3, 4, 5), (2, 3, 2), (1, 2, 3), 'FULL'),
]
GRID_IDS = [f'{len(g[0])}d-{"x".join(map(str, g[0]))}-k{g[1]}-s{g[2]}-{g[3]}' for g in GRID]
# The backward checks are the costliest to compile; this subset still covers
# overlap, gaps, unit and mixed strides (the two spreading formulations),
# every padding kind, anisotropy and all three ranks.
BWD = (3, 4, 5, 6, 8, 9, 12, 13, 15)
BWD_GRID = [GRID[i] for i in BWD]
BWD_IDS = [GRID_IDS[i] for i in BWD]


def resolve(spatial, window, stride, padding):
  nd = len(spatial)
  window = shapes.as_tuple(window, nd, 'window')
  stride = shapes.as_tuple(stride, nd, 'stride')
  pads = shapes.resolve_padding(padding, spatial, window, stride, (1,) * nd)
  return window, stride, pads


def distinct(shape, seed=0):
  """Tie-free values: a shuffled arange, scaled to O(1)."""
  rng = np.random.default_rng(seed)
  size = math.prod(shape)
  return ((rng.permutation(size).reshape(shape) + 0.5) / size * 4.0 - 2.0).astype(np.float32)


def image(rows):
  """A 2-D list as a (1, H, W, 1) float32 batch."""
  return jnp.asarray(np.array(rows, np.float32)[None, :, :, None])


# ----------------------------------------------------------------------------
# NumPy loop references
# ----------------------------------------------------------------------------

def np_windows(x, window, stride, pads, fill):
  """Yields (output position, window cells (N, |R|, C), their unpadded flat
  indices, a mask of the cells that are input rather than padding)."""
  nd = x.ndim - 2
  spatial = x.shape[1:-1]
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)], constant_values=fill)
  out = [(xp.shape[d + 1] - window[d]) // stride[d] + 1 for d in range(nd)]
  for pos in np.ndindex(*out):
    cells, index, valid = [], [], []
    for t in itertools.product(*(range(k) for k in window)):   # row-major
      q = [p * s + ti for p, s, ti in zip(pos, stride, t)]
      cells.append(xp[(slice(None),) + tuple(q) + (slice(None),)])
      real = [qi - lo for qi, (lo, _) in zip(q, pads)]
      ok = all(0 <= r < n for r, n in zip(real, spatial))
      valid.append(ok)
      index.append(int(np.ravel_multi_index(real, spatial)) if ok else -1)
    yield pos, np.stack(cells, 1), np.array(index), np.array(valid)


def np_pool(x, window, stride, pads, kind, p=2.0, count_include_pad=True):
  x = np.asarray(x, np.float64)
  fill = -np.inf if kind == 'max' else 0.0
  results = {}
  for pos, cells, index, valid in np_windows(x, window, stride, pads, fill):
    if kind == 'max':
      v = cells.max(1)
    elif kind == 'sum':
      v = cells.sum(1)
    elif kind == 'avg':
      v = cells.sum(1) / (cells.shape[1] if count_include_pad else valid.sum())
    elif kind == 'lp':
      v = (np.abs(cells) ** p).sum(1) ** (1.0 / p)
    elif kind == 'rms':
      v = np.sqrt((cells ** 2).sum(1) / (cells.shape[1] if count_include_pad else valid.sum()))
    results[pos] = v
  out = tuple(max(k[d] for k in results) + 1 for d in range(x.ndim - 2))
  y = np.zeros((x.shape[0],) + out + (x.shape[-1],))
  for pos, v in results.items():
    y[(slice(None),) + pos + (slice(None),)] = v
  return y


def np_switches(x, window, stride, pads):
  """First maximum (row-major) of each window as a flat unpadded index."""
  x = np.asarray(x, np.float64)
  found = {}
  for pos, cells, index, valid in np_windows(x, window, stride, pads, -np.inf):
    cells = np.where(valid[None, :, None], cells, -np.inf)
    found[pos] = index[np.argmax(cells, axis=1)]     # argmax: first maximum
  out = tuple(max(k[d] for k in found) + 1 for d in range(x.ndim - 2))
  sw = np.zeros((x.shape[0],) + out + (x.shape[-1],), np.int64)
  for pos, v in found.items():
    sw[(slice(None),) + pos + (slice(None),)] = v
  return sw


def np_route(x, dy, window, stride, pads):
  """dX of max pooling by the tie rule: each dY to its window's first maximum."""
  sw = np_switches(x, window, stride, pads)
  n_batch, c = x.shape[0], x.shape[-1]
  dx = np.zeros((n_batch, math.prod(x.shape[1:-1]), c))
  sw3, dy3 = sw.reshape(n_batch, -1, c), np.asarray(dy, np.float64).reshape(n_batch, -1, c)
  for n, p, ch in np.ndindex(*sw3.shape):
    dx[n, sw3[n, p, ch], ch] += dy3[n, p, ch]
  return dx.reshape(x.shape)


# ----------------------------------------------------------------------------
# lax.reduce_window references (autodiff backward)
# ----------------------------------------------------------------------------

def ref_reduce(x, window, stride, pads, init, op):
  return lax.reduce_window(x, np.asarray(init, x.dtype), op, (1,) + window + (1,),
                           (1,) + stride + (1,), ((0, 0),) + pads + ((0, 0),))


def ref_max(x, window, stride, pads):
  return ref_reduce(x, window, stride, pads, -jnp.inf, lax.max)


def ref_sum(x, window, stride, pads):
  return ref_reduce(x, window, stride, pads, 0.0, lax.add)


def ref_avg(x, window, stride, pads, count_include_pad=True):
  if count_include_pad:
    return ref_sum(x, window, stride, pads) / math.prod(window)
  return ref_sum(x, window, stride, pads) / ref_sum(jnp.ones_like(x), window, stride, pads)


def ref_lp(x, window, stride, pads, p):
  return ref_sum(jnp.abs(x) ** p, window, stride, pads) ** (1.0 / p)


def vjp_of(f, x, dy):
  y, pullback = jax.vjp(f, x)
  return y, pullback(dy)[0]


# ----------------------------------------------------------------------------
# Forward against NumPy loops
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('spatial, window, stride, padding', GRID, ids=GRID_IDS)
def test_forward_matches_numpy_loops(spatial, window, stride, padding):
  x = np.random.default_rng(1).normal(size=(2,) + spatial + (3,)).astype(np.float32)
  k, s, pads = resolve(spatial, window, stride, padding)
  args = (window, stride, padding)

  @fast_jit   # one compile per configuration keeps the grid fast
  def outputs(v):
    return {
        'max': max_pool(v, *args),
        'sum': sum_pool(v, *args),
        'avg': avg_pool(v, *args),
        'avg_valid': avg_pool(v, *args, count_include_pad=False),
        'lp2': lp_pool(v, *args),
        'lp3': lp_pool(v, *args, p=3.0),
        'rms': rms_pool(v, *args),
        'rms_valid': rms_pool(v, *args, count_include_pad=False),
        'mixed': mixed_pool(v, *args, alpha=0.25),
        'argmax': max_pool_with_argmax(v, *args),
    }

  got = outputs(x)
  expected = {
      'max': np_pool(x, k, s, pads, 'max'),
      'sum': np_pool(x, k, s, pads, 'sum'),
      'avg': np_pool(x, k, s, pads, 'avg'),
      'avg_valid': np_pool(x, k, s, pads, 'avg', count_include_pad=False),
      'lp2': np_pool(x, k, s, pads, 'lp'),
      'lp3': np_pool(x, k, s, pads, 'lp', p=3.0),
      'rms': np_pool(x, k, s, pads, 'rms'),
      'rms_valid': np_pool(x, k, s, pads, 'rms', count_include_pad=False),
      'mixed': 0.25 * np_pool(x, k, s, pads, 'max') + 0.75 * np_pool(x, k, s, pads, 'avg'),
  }
  for name, want in expected.items():
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
  y, sw = got['argmax']
  np.testing.assert_array_equal(y, got['max'])
  np.testing.assert_array_equal(sw, np_switches(x, k, s, pads))
  assert sw.dtype == jnp.int32
  # Eagerly, too (the public ops validate in Python and run a compiled core).
  np.testing.assert_array_equal(max_pool(x, *args), got['max'])


def test_output_size_rule():
  """Seed 002: ((n_h - f)/s + 1) x ((n_w - f)/s + 1) x n_c."""
  for n_h, n_w, f, s in [(4, 4, 2, 2), (6, 6, 2, 2), (13, 13, 3, 2), (7, 10, 3, 1)]:
    x = jnp.zeros((1, n_h, n_w, 5))
    assert max_pool(x, f, s).shape == (1, (n_h - f) // s + 1, (n_w - f) // s + 1, 5)
    assert avg_pool(x, f, s).shape == max_pool(x, f, s).shape


def test_stride_defaults_to_window():
  x = distinct((1, 6, 6, 2))
  np.testing.assert_array_equal(max_pool(x, 3), max_pool(x, 3, 3))
  assert avg_pool(x, (2, 3)).shape == (1, 3, 2, 2)


# ----------------------------------------------------------------------------
# The notes' worked examples
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('rows, expected', [
    # seed 002
    ([[1, 3, 5, 3], [4, 2, 3, 1], [3, 1, 1, 3], [0, 1, 0, 4]], [[4, 5], [3, 4]]),
    # seed 003
    ([[3, 2, 5, 6], [8, 9, 5, 3], [4, 4, 6, 8], [1, 1, 2, 1]], [[9, 6], [4, 8]]),
    # seed 004
    ([[1, 3, 2, 4, 8, 6], [5, 6, 1, 8, 7, 3], [9, 2, 7, 3, 6, 5],
      [4, 5, 6, 1, 9, 2], [8, 3, 4, 7, 2, 1], [5, 7, 9, 2, 3, 6]],
     [[6, 8, 8], [9, 7, 9], [8, 9, 6]]),
], ids=['seed002', 'seed003', 'seed004'])
def test_notes_worked_examples(rows, expected):
  y = max_pool(image(rows), 2, 2)
  np.testing.assert_array_equal(y[0, :, :, 0], np.array(expected, np.float32))
  n = len(rows)
  assert y.shape[1] == (n - 2) // 2 + 1 == shapes.output_size(n, 2, 2)


def test_worked_example_gradient_routes_to_the_maxima():
  """Seed 002 backward: each dY lands on its window's max, zeros elsewhere."""
  x = image([[1, 3, 5, 3], [4, 2, 3, 1], [3, 1, 1, 3], [0, 1, 0, 4]])
  dy = image([[10, 20], [30, 40]])
  _, dx = vjp_of(lambda v: max_pool(v, 2, 2), x, dy)
  np.testing.assert_array_equal(
      dx[0, :, :, 0], [[0, 0, 20, 0], [10, 0, 0, 0], [30, 0, 0, 0], [0, 0, 0, 40]])


# ----------------------------------------------------------------------------
# Custom backward against jax.grad of lax.reduce_window (float32, tie-free)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('spatial, window, stride, padding', BWD_GRID, ids=BWD_IDS)
def test_backward_matches_reduce_window_autodiff(spatial, window, stride, padding):
  shape = (2,) + spatial + (2,)
  x = jnp.asarray(distinct(shape))
  k, s, pads = resolve(spatial, window, stride, padding)
  args = (window, stride, padding)
  out_shape = jax.eval_shape(lambda v: max_pool(v, *args), x).shape
  dy = jnp.asarray(np.random.default_rng(2).normal(size=out_shape).astype(np.float32))
  ours = {
      'max': lambda v: max_pool(v, *args),
      'argmax': lambda v: max_pool_with_argmax(v, *args)[0],
      'avg': lambda v: avg_pool(v, *args),
      'avg_valid': lambda v: avg_pool(v, *args, count_include_pad=False),
      'lp2': lambda v: lp_pool(v, *args),
      'lp3': lambda v: lp_pool(v, *args, p=3.0),
      'mixed': lambda v: mixed_pool(v, *args, alpha=0.3),
  }
  refs = {
      'max': lambda v: ref_max(v, k, s, pads),
      'avg': lambda v: ref_avg(v, k, s, pads),
      'avg_valid': lambda v: ref_avg(v, k, s, pads, count_include_pad=False),
      'lp2': lambda v: ref_lp(v, k, s, pads, 2.0),
      'lp3': lambda v: ref_lp(v, k, s, pads, 3.0),
  }

  @fast_jit
  def both(v, g):
    return ({name: vjp_of(f, v, g) for name, f in ours.items()},
            {name: vjp_of(f, v, g) for name, f in refs.items()})

  got, want = both(x, dy)
  # Both are linear in (y, dx): reuse the references rather than compile
  # select_and_scatter_add three times.
  want['argmax'] = want['max']
  want['mixed'] = tuple(0.3 * m + 0.7 * a for m, a in zip(want['max'], want['avg']))
  for name, (y, dx) in got.items():
    y_ref, dx_ref = want[name]
    np.testing.assert_allclose(y, y_ref, err_msg=name, **F32_TOL)
    np.testing.assert_allclose(dx, dx_ref, err_msg=name, **F32_TOL)
    assert dx.dtype == x.dtype


def test_global_pools_backward_matches_autodiff():
  for shape in [(2, 5, 3), (2, 4, 5, 3), (1, 3, 2, 4, 2)]:
    x = jnp.asarray(distinct(shape, seed=3))
    dy = jnp.asarray(np.random.default_rng(4).normal(size=(shape[0], shape[-1])),
                     jnp.float32)
    axes = tuple(range(1, len(shape) - 1))

    @fast_jit
    def both(v, g):
      return [(vjp_of(ours, v, g), vjp_of(ref, v, g)) for ours, ref in [
          (global_avg_pool, lambda u: jnp.mean(u, axis=axes)),
          (global_max_pool, lambda u: jnp.max(u, axis=axes))]]

    for (y, dx), (y_ref, dx_ref) in both(x, dy):
      np.testing.assert_allclose(y, y_ref, **F32_TOL)
      np.testing.assert_allclose(dx, dx_ref, **F32_TOL)
    kept = (shape[0],) + (1,) * len(axes) + (shape[-1],)
    assert global_avg_pool(x, keepdims=True).shape == kept
    assert global_max_pool(x, keepdims=True).shape == kept


# ----------------------------------------------------------------------------
# Finite differences in float64
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('spatial, window, stride, padding', [
    ((5, 6), 3, 2, 'FULL'),
    ((3, 4, 4), 2, (1, 2, 2), [(1, 0), (0, 1), 0]),
])
def test_check_grads_float64(x64, spatial, window, stride, padding):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2,) + spatial + (2,)))
  assert x.dtype == jnp.float64
  args = (window, stride, padding)
  # Max with well-separated values, so the finite-difference step never
  # changes which cell wins.
  xd = jnp.asarray(distinct(x.shape, seed=6).astype(np.float64) * 100)

  # One jitted function per check: check_grads compares the vjp against
  # central differences along a random direction, for every output at once.
  # (check_grads nests it, so plain jax.jit: compiler options are top-level only.)
  @jax.jit
  def smooth(v, a):
    return (sum_pool(v, *args), avg_pool(v, *args),
            avg_pool(v, *args, count_include_pad=False), lp_pool(v, *args),
            lp_pool(v, *args, p=3.0), mixed_pool(v, *args, alpha=a))

  kw = dict(order=1, modes=['rev'], atol=1e-6, rtol=1e-6)
  check_grads(smooth, (x, jnp.float64(0.3)), **kw)
  check_grads(jax.jit(lambda v: max_pool(v, *args)), (xd,), **kw)


def test_check_grads_float64_composites(x64):
  rng = np.random.default_rng(23)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 2)))
  xd = jnp.asarray(distinct(x.shape, seed=24).astype(np.float64) * 100)
  kw = dict(order=1, modes=['rev'], atol=1e-6, rtol=1e-6)
  check_grads(jax.jit(lambda v: (rms_pool(v, 3, 2, 'SAME'),
                                 spatial_pyramid_pool(v, (1, 2), 'avg'),
                                 global_avg_pool(v))), (x,), **kw)
  check_grads(jax.jit(lambda v: (max_pool_with_argmax(v, 3, 2, 'SAME')[0],
                                 spatial_pyramid_pool(v, (1, 2), 'max'),
                                 global_max_pool(v))), (xd,), **kw)
  y, sw = max_pool_with_argmax(xd, 2)
  check_grads(jax.jit(lambda v: max_unpool(v, sw, (5, 6))), (y,), **kw)
  # |x|^1.5 has unbounded curvature at 0, which costs the central differences
  # a few digits.
  check_grads(jax.jit(lambda v: lp_pool(v, 3, 2, 'SAME', p=1.5)), (x,),
              **dict(kw, atol=1e-5, rtol=1e-5))


def test_x64_fixture_restores_float32():
  # The x64 fixture (tests/conftest.py) must not leak into the float32 tests.
  assert jnp.zeros(1).dtype == jnp.float32


# ----------------------------------------------------------------------------
# Max-pool gradient routing and the tie rule
# ----------------------------------------------------------------------------

def test_max_gradient_only_at_window_maxima():
  x = distinct((2, 7, 6, 3), seed=7)
  k, s, pads = (3, 3), (2, 2), ((0, 0), (0, 0))
  dy = np.random.default_rng(8).uniform(1, 2, size=max_pool(x, 3, 2).shape).astype(np.float32)
  _, dx = vjp_of(lambda v: max_pool(v, 3, 2), jnp.asarray(x), jnp.asarray(dy))
  dx = np.asarray(dx)
  sw = np_switches(x, k, s, pads)
  for n, ch in np.ndindex(x.shape[0], x.shape[-1]):
    winners = set(sw[n, ..., ch].ravel().tolist())
    nonzero = set(np.flatnonzero(dx[n, ..., ch]).tolist())
    assert nonzero == winners    # dY > 0, so every winner receives something
    for q in nonzero:
      expected = dy[n, ..., ch].ravel()[sw[n, ..., ch].ravel() == q].sum()
      np.testing.assert_allclose(dx[n, ..., ch].ravel()[q], expected, rtol=1e-6)
  np.testing.assert_allclose(dx, np_route(x, dy, k, s, pads), rtol=1e-6)
  np.testing.assert_allclose(dx.sum(), dy.sum(), rtol=1e-5)


def test_overlapping_windows_sum_at_a_shared_maximum():
  """AlexNet's 3x3 stride 2: the centre of a 5x5 lies in all four windows."""
  x = np.zeros((5, 5), np.float32)
  x[2, 2] = 9.0
  x[0, 0] = x[4, 4] = 1.0
  dy = image([[1, 2], [3, 4]])
  y, dx = vjp_of(lambda v: max_pool(v, 3, 2), image(x), dy)
  np.testing.assert_array_equal(y[0, :, :, 0], [[9, 9], [9, 9]])
  expected = np.zeros((5, 5), np.float32)
  expected[2, 2] = 1 + 2 + 3 + 4
  np.testing.assert_array_equal(dx[0, :, :, 0], expected)
  # 1-D: windows [0,3) and [2,5) share cell 2.
  _, dx1 = vjp_of(lambda v: max_pool(v, 3, 2), jnp.array([0., 1., 5., 2., 3.])[None, :, None],
                  jnp.array([10., 100.])[None, :, None])
  np.testing.assert_array_equal(dx1[0, :, 0], [0, 0, 110, 0, 0])


@pytest.mark.parametrize('window, stride, padding', [
    (2, 2, 'VALID'), (2, 1, 'VALID'), (3, 2, 'SAME'), (3, 1, 'FULL'), ((2, 3), (1, 2), 1)])
def test_ties_go_to_the_first_maximum_in_row_major_order(window, stride, padding):
  rng = np.random.default_rng(9)
  # Few distinct values: almost every window has a tied maximum.
  x = rng.integers(0, 3, size=(2, 6, 5, 2)).astype(np.float32)
  x[0, :, :, 0] = 1.0                                      # all ties
  k, s, pads = resolve((6, 5), window, stride, padding)
  args = (window, stride, padding)
  out_shape = jax.eval_shape(lambda v: max_pool(v, *args), x).shape
  dy = rng.uniform(1, 2, size=out_shape).astype(np.float32)

  @fast_jit
  def run(v, g):
    return (vjp_of(lambda u: max_pool(u, *args), v, g)[1], max_pool_with_argmax(v, *args)[1],
            vjp_of(lambda u: max_pool_with_argmax(u, *args)[0], v, g)[1])

  dx, sw, dx_argmax = run(x, dy)
  expected = np_route(x, dy, k, s, pads)
  np.testing.assert_allclose(dx, expected, rtol=1e-6)
  np.testing.assert_allclose(np.sum(dx), dy.sum(), rtol=1e-5)
  np.testing.assert_array_equal(sw, np_switches(x, k, s, pads))
  np.testing.assert_allclose(dx_argmax, expected, rtol=1e-6)


def test_tie_rule_on_a_single_window():
  x = image([[1, 7], [7, 7]])
  _, dx = vjp_of(lambda v: max_pool(v, 2), x, image([[5]]))
  np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 5], [0, 0]])
  _, dx = vjp_of(global_max_pool, x, jnp.array([[5.0]]))
  np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 5], [0, 0]])


def test_nan_counts_as_the_maximum():
  x = image([[1, np.nan], [3, np.nan]])
  y, dx = vjp_of(lambda v: max_pool(v, 2), x, image([[1]]))
  assert np.isnan(y[0, 0, 0, 0])
  np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 1], [0, 0]])
  _, sw = max_pool_with_argmax(x, 2)
  assert int(sw[0, 0, 0, 0]) == 1


def test_padding_never_wins_even_against_minus_inf():
  """Padded cells hold -inf but are not input cells: an all -inf window still
  routes to its first input cell, and every switch stays in range."""
  x = jnp.full((1, 3, 1), -jnp.inf)
  y, sw = max_pool_with_argmax(x, 2, 1, 'FULL')            # windows [-1, 1) ... [2, 4)
  np.testing.assert_array_equal(sw[0, :, 0], [0, 0, 1, 2])
  _, dx = vjp_of(lambda v: max_pool(v, 2, 1, 'FULL'), x, jnp.ones((1, 4, 1)))
  np.testing.assert_array_equal(dx[0, :, 0], [2, 1, 1])


def test_avg_spreads_dy_evenly():
  dy = image([[4, 8], [12, 16]])
  _, dx = vjp_of(lambda v: avg_pool(v, 2), jnp.zeros((1, 4, 4, 1)), dy)
  np.testing.assert_array_equal(dx[0, :, :, 0], np.kron([[1, 2], [3, 4]], np.ones((2, 2))))
  # Overlap (3x3 stride 2 on 5x5): the centre collects dY/9 from all four windows.
  _, dx = vjp_of(lambda v: avg_pool(v, 3, 2), jnp.zeros((1, 5, 5, 1)), dy)
  np.testing.assert_allclose(dx[0, 2, 2, 0], (4 + 8 + 12 + 16) / 9, rtol=1e-6)
  np.testing.assert_allclose(dx[0, 0, 0, 0], 4 / 9, rtol=1e-6)
  # count_include_pad=False: the corner window of SAME 3x3 holds 4 input cells.
  _, dx = vjp_of(lambda v: avg_pool(v, 3, 1, 'SAME', count_include_pad=False),
                 jnp.zeros((1, 3, 3, 1)), jnp.zeros((1, 3, 3, 1)).at[0, 0, 0, 0].set(1.0))
  np.testing.assert_allclose(dx[0, :, :, 0], [[.25, .25, 0], [.25, .25, 0], [0, 0, 0]])
  # sum_pool spreads dY itself.
  _, dx = vjp_of(lambda v: sum_pool(v, 2), jnp.zeros((1, 4, 4, 1)), dy)
  np.testing.assert_array_equal(dx[0, :, :, 0], np.kron([[4, 8], [12, 16]], np.ones((2, 2))))


def test_lp_pool_zero_window_has_zero_gradient():
  x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(3.0).at[0, 0, 1, 0].set(-4.0)
  ones = jnp.ones((1, 2, 2, 1))
  ps = (2.0, 3.0, 1.0, 0.5)
  results = fast_jit(lambda v: [vjp_of(lambda u: lp_pool(u, 2, p=p), v, ones) for p in ps]
                    + [vjp_of(lambda u: rms_pool(u, 2), v, ones)])(x)
  for p, (y, dx) in zip(ps + ('rms',), results):
    assert np.all(np.isfinite(dx)), p
    np.testing.assert_array_equal(dx[0, 2:, :, 0], 0.0)
    np.testing.assert_array_equal(dx[0, :, 2:, 0], 0.0)
  y, dx = results[0]
  np.testing.assert_allclose(y[0, :, :, 0], [[5, 0], [0, 0]])
  np.testing.assert_allclose(dx[0, :2, :2, 0], [[3 / 5, -4 / 5], [0, 0]], rtol=1e-6)


def test_mixed_pool_alpha_gradient_and_endpoints():
  x = jnp.asarray(distinct((2, 6, 6, 3), seed=10))
  alpha = jnp.array([0.0, 0.5, 1.0])                      # per channel

  @fast_jit
  def run(v, a):
    return dict(
        max=max_pool(v, 2), avg=avg_pool(v, 2),
        at1=mixed_pool(v, 2, alpha=1.0), at0=mixed_pool(v, 2, alpha=0.0),
        per_channel=mixed_pool(v, 2, alpha=a),
        dalpha=jax.grad(lambda b: mixed_pool(v, 2, alpha=b).sum())(0.4),
        dalpha_per_channel=jax.grad(lambda b: mixed_pool(v, 2, alpha=b).sum())(a))

  r = run(x, alpha)
  np.testing.assert_allclose(r['at1'], r['max'], rtol=1e-6)
  np.testing.assert_allclose(r['at0'], r['avg'], rtol=1e-6)
  # dL/dalpha = sum dY * (MAX - AVG), per channel for a per-channel alpha.
  diff = r['max'] - r['avg']
  np.testing.assert_allclose(r['dalpha'], diff.sum(), rtol=1e-5)
  np.testing.assert_allclose(r['dalpha_per_channel'], diff.sum(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(r['per_channel'][..., 2], r['max'][..., 2], rtol=1e-6)
  np.testing.assert_allclose(r['per_channel'][..., 0], r['avg'][..., 0], rtol=1e-6)


def test_integer_max_pool_pads_with_the_dtype_minimum():
  x = jnp.array([[-5, -7, -1]], jnp.int32)[..., None]
  np.testing.assert_array_equal(max_pool(x, 2, 1, 'FULL')[0, :, 0], [-5, -5, -1, -1])


# ----------------------------------------------------------------------------
# Switches and max unpooling
# ----------------------------------------------------------------------------

def test_unpool_round_trip_non_overlapping():
  x = jnp.asarray(distinct((2, 6, 8, 3), seed=11) + 3.0)     # positive: zeros are "empty"
  y, sw = max_pool_with_argmax(x, 2)
  u = max_unpool(y, sw, (6, 8))
  assert u.shape == x.shape
  u3, x3 = np.asarray(u).reshape(2, -1, 3), np.asarray(x).reshape(2, -1, 3)
  sw3, y3 = np.asarray(sw).reshape(2, -1, 3), np.asarray(y).reshape(2, -1, 3)
  for n, ch in np.ndindex(2, 3):
    np.testing.assert_array_equal(np.flatnonzero(u3[n, :, ch]), np.sort(sw3[n, :, ch]))
    np.testing.assert_array_equal(u3[n, sw3[n, :, ch], ch], y3[n, :, ch])
    np.testing.assert_array_equal(x3[n, sw3[n, :, ch], ch], y3[n, :, ch])
  # unpool(pool(x)) keeps x at the maxima and zeros the rest.
  np.testing.assert_array_equal(u, jnp.where(u != 0, x, 0))


def test_unpool_sums_windows_that_share_a_switch_and_equals_max_pool_grad():
  x = jnp.asarray(distinct((1, 7, 7, 2), seed=12) + 3.0)
  y, sw = max_pool_with_argmax(x, 3, 2, 'SAME')
  u = max_unpool(y, sw, (7, 7))
  u3, sw3, y3 = (np.asarray(a).reshape(1, -1, 2) for a in (u, sw, y))
  for ch in range(2):
    for q in np.unique(sw3[0, :, ch]):
      np.testing.assert_allclose(u3[0, q, ch], y3[0, sw3[0, :, ch] == q, ch].sum(), rtol=1e-6)
    assert np.count_nonzero(u3[0, :, ch]) == len(np.unique(sw3[0, :, ch]))
  # The deconvnet identity: max_pool's dL/dX is max_unpool(dL/dY, switches).
  dy = jnp.asarray(np.random.default_rng(13).normal(size=y.shape), jnp.float32)
  _, dx = vjp_of(lambda v: max_pool(v, 3, 2, 'SAME'), x, dy)
  np.testing.assert_allclose(dx, max_unpool(dy, sw, (7, 7)), rtol=1e-6, atol=1e-6)


def test_unpool_gradient_is_a_gather_at_the_switches():
  x = jnp.asarray(distinct((2, 5, 3), seed=14))
  y, sw = max_pool_with_argmax(x, 2, 2, 'SAME')
  g = jnp.asarray(np.random.default_rng(15).normal(size=x.shape), jnp.float32)
  _, dy = vjp_of(lambda v: max_unpool(v, sw, (5,)), y, g)
  np.testing.assert_array_equal(dy, jnp.take_along_axis(g, sw, axis=1))
  # 3-D round trip shape and switch range.
  x3 = jnp.asarray(distinct((1, 4, 5, 3, 2), seed=16))
  y3, sw3 = max_pool_with_argmax(x3, 2, 2, 'SAME')
  assert int(sw3.min()) >= 0 and int(sw3.max()) < 4 * 5 * 3
  assert max_unpool(y3, sw3, (4, 5, 3)).shape == x3.shape


# ----------------------------------------------------------------------------
# Spatial pyramid pooling
# ----------------------------------------------------------------------------

def np_spp(x, levels, mode):
  nd = x.ndim - 2
  reduce = np.max if mode == 'max' else np.mean
  parts = []
  for n in levels:
    edges = [[(math.floor(i * w / n), math.ceil((i + 1) * w / n)) for i in range(n)]
             for w in x.shape[1:-1]]
    for box in itertools.product(*edges):
      sl = tuple(slice(lo, hi) for lo, hi in box)
      parts.append(reduce(x[(slice(None),) + sl + (slice(None),)], axis=tuple(range(1, nd + 1))))
  return np.concatenate(parts, axis=-1)


@pytest.mark.parametrize('spatial', [(13, 13), (17, 20), (32, 32)])
def test_spp_fixed_length_and_bin_values(spatial):
  x = distinct((2,) + spatial + (3,), seed=17)
  modes = ('max', 'avg') if spatial == (17, 20) else ('max',)
  got = fast_jit(lambda v: {mode: spatial_pyramid_pool(v, (1, 2, 4), mode) for mode in modes})(x)
  for mode, y in got.items():
    assert y.shape == (2, 3 * (1 + 4 + 16))
    np.testing.assert_allclose(y, np_spp(x, (1, 2, 4), mode), rtol=1e-5, atol=1e-6)


def test_spp_other_ranks_and_gradient():
  x1 = distinct((2, 9, 3), seed=18)
  np.testing.assert_allclose(spatial_pyramid_pool(x1, (1, 3)), np_spp(x1, (1, 3), 'max'))
  x3 = distinct((1, 5, 6, 4, 2), seed=19)
  y3 = spatial_pyramid_pool(x3, (1, 2))
  assert y3.shape == (1, 2 * (1 + 8))
  np.testing.assert_allclose(y3, np_spp(x3, (1, 2), 'max'))
  # Gradient against autodiff of a plain bin-max reference (tie-free input).
  x = jnp.asarray(distinct((2, 7, 9, 2), seed=20))

  def ref(v):
    parts = []
    for n in (1, 2, 4):
      for box in itertools.product(*[pooling.pyramid_bins(w, n) for w in (7, 9)]):
        parts.append(jnp.max(v[:, box[0][0]:box[0][1], box[1][0]:box[1][1], :], axis=(1, 2)))
    return jnp.concatenate(parts, axis=-1)

  dy = jnp.asarray(np.random.default_rng(21).normal(size=(2, 42)), jnp.float32)
  (y, dx), (y_ref, dx_ref) = fast_jit(
      lambda v, g: (vjp_of(lambda u: spatial_pyramid_pool(u, (1, 2, 4)), v, g),
                    vjp_of(ref, v, g)))(x, dy)
  np.testing.assert_allclose(y, y_ref, **F32_TOL)
  np.testing.assert_allclose(dx, dx_ref, **F32_TOL)


def test_spp_bins_match_the_paper_edges():
  assert pooling.pyramid_bins(13, 4) == [(0, 4), (3, 7), (6, 10), (9, 13)]
  assert pooling.pyramid_bins(8, 2) == [(0, 4), (4, 8)]
  assert pooling.pyramid_bins(5, 1) == [(0, 5)]


# ----------------------------------------------------------------------------
# jit, grad through jit, batching
# ----------------------------------------------------------------------------

def test_ops_under_jit_and_grad_through_jit():
  x = jnp.asarray(distinct((3, 7, 6, 2), seed=22))
  # Most tests run the ops inside jax.jit; here eager, jit and XLA-optimized
  # compiles are compared directly.
  ops = [
      lambda v: max_pool(v, 3, 2, 'SAME'),
      lambda v: max_unpool(*max_pool_with_argmax(v, 2), (7, 6)),
      lambda v: spatial_pyramid_pool(v, (1, 2)),
  ]

  def run_all(v):
    return [(f(v), jax.grad(lambda u: jnp.sum(f(u) ** 2))(v)) for f in ops]

  eager = run_all(x)
  traced = fast_jit(run_all)(x)
  # The fixture turns XLA's optimizations off; with them on, values agree too.
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    optimized = jax.jit(lambda v: run_all(v))(x)
  finally:
    jax.config.update('jax_disable_most_optimizations', True)
  for i, ((y, g), (yj, gj), (yo, go)) in enumerate(zip(eager, traced, optimized)):
    for a, b in ((yj, y), (gj, g), (yo, y), (go, g)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f'op {i}')
  # Each example of a batch is pooled independently of the others, and vmap
  # over an extra leading axis agrees with folding it into the batch.
  y = jax.jit(lambda v: max_pool(v, 3, 2))(x)
  for n in range(3):
    np.testing.assert_array_equal(y[n:n + 1], max_pool(x[n:n + 1], 3, 2))
  xs = x.reshape(3, 1, 7, 6, 2)
  np.testing.assert_allclose(jax.vmap(lambda v: avg_pool(v, 2))(xs)[:, 0], avg_pool(x, 2),
                             rtol=1e-6)
  gv = jax.vmap(jax.grad(lambda v: max_pool(v, 2).sum()))(xs)[:, 0]
  np.testing.assert_array_equal(gv, jax.grad(lambda v: max_pool(v, 2).sum())(x))


# ----------------------------------------------------------------------------
# Errors, before any compute, in the words a user reads
# ----------------------------------------------------------------------------

X2 = np.zeros((1, 4, 4, 2), np.float32)   # NumPy: no JAX backend at import time


@pytest.mark.parametrize('call, match', [
    (lambda: max_pool(jnp.zeros((4, 4)), 2), r'1, 2 or 3 spatial dimensions .*got rank 2'),
    (lambda: avg_pool(jnp.zeros((1, 2, 2, 2, 2, 2, 1)), 2), r'got rank 7'),
    (lambda: max_pool(X2, 0), r'max_pool: window must be >= 1 .*W2 = \(W1 - F \+ 2P\)/S \+ 1'),
    (lambda: avg_pool(X2, (2, 0)), r'avg_pool: window must be >= 1 .*dimension 1 is 0'),
    (lambda: sum_pool(X2, 2, 0), r'sum_pool: stride must be >= 1'),
    (lambda: max_pool(X2, (2, 2, 2)), r'window must be an int or a tuple of 2 ints'),
    (lambda: max_pool(X2, 2.5), r'window must be an int'),
    (lambda: max_pool(X2, 5),
     r'window of 5 .* larger than the padded input 4 .*\(4 - 5 \+ 0 \+ 0\)/5 \+ 1 < 1'),
    (lambda: lp_pool(X2, (2, 7), 1, 1),
     r'lp_pool: window of 7 .* larger than the padded input 6 \(input 4 \+ padding 1 \+ 1\)'),
    (lambda: max_pool(X2, 2, padding='SAMEISH'), r"padding must be one of \('VALID', 'SAME', 'FULL'\)"),
    (lambda: max_pool(X2, 2, padding=-1), r'padding must be >= 0'),
    (lambda: max_pool(X2, 2, padding=2),
     r'padding \(2, 2\) in spatial dimension 0 leaves a window made only of padding .*'
     r'need P_lo < F \(2 < 2\)'),
    (lambda: avg_pool(X2, 2, 1, [(0, 0), (0, 3)], count_include_pad=False),
     r'spatial dimension 1 leaves a window made only of padding .*\(\(6 - 1\)\*1 < 0 \+ 4\)'),
    (lambda: avg_pool(X2, 2, count_include_pad='no'), r'count_include_pad must be True or False'),
    (lambda: lp_pool(X2, 2, p=0), r'p must be a finite number > 0 .*got 0'),
    (lambda: lp_pool(X2, 2, p=-2.0), r'p must be a finite number > 0'),
    (lambda: lp_pool(X2, 2, p=float('inf')), r'p must be a finite number > 0 .*use max_pool'),
    (lambda: lp_pool(X2, 2, p='2'), r'p must be a finite number > 0'),
    (lambda: mixed_pool(X2, 2, alpha=1.5), r'alpha must lie in \[0, 1\] .*got alpha=1.5'),
    (lambda: mixed_pool(X2, 2, alpha=-0.1), r'alpha must lie in \[0, 1\]'),
    (lambda: mixed_pool(X2, 2, alpha=True), r'alpha must be a number in \[0, 1\] or an array'),
    (lambda: global_avg_pool(jnp.zeros((4, 2))), r'global_avg_pool: .*got rank 2'),
    (lambda: global_max_pool(jnp.zeros((1, 0, 3, 2))), r'empty spatial dimension'),
    (lambda: global_max_pool(X2, keepdims=1), r'keepdims must be True or False'),
    (lambda: spatial_pyramid_pool(X2, ()), r'levels must be a non-empty sequence of positive ints'),
    (lambda: spatial_pyramid_pool(X2, (0, 1)), r'levels must be a non-empty sequence of positive'),
    (lambda: spatial_pyramid_pool(X2, (1, 2.0)), r'levels must be a non-empty sequence'),
    (lambda: spatial_pyramid_pool(X2, (True,)), r'levels must be a non-empty sequence'),
    (lambda: spatial_pyramid_pool(X2, 4), r'levels must be a sequence of positive ints'),
    (lambda: spatial_pyramid_pool(jnp.zeros((1, 13, 3, 2)), (1, 2, 4)),
     r'input spatial size 3 in dimension 1 .* smaller than the largest pyramid level 4'),
    (lambda: spatial_pyramid_pool(X2, (1, 2), mode='min'), r"mode must be 'max' or 'avg'"),
    (lambda: max_unpool(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 1), jnp.int32), (4, 4)),
     r'switches must have the same shape as the values'),
    (lambda: max_unpool(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2)), (4, 4)),
     r'switches must be integer flat indices'),
    (lambda: max_unpool(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2), jnp.int32), (4, 4, 4)),
     r'output_spatial_shape must be an int or a tuple of 2 ints'),
    (lambda: max_unpool(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2), jnp.int32), (4, 0)),
     r'output_spatial_shape must be >= 1'),
    (lambda: max_unpool(jnp.zeros((2, 2)), jnp.zeros((2, 2), jnp.int32), (4,)), r'got rank 2'),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_errors_are_raised_while_tracing():
  """Shape errors come from Python at trace time, never from XLA."""
  with pytest.raises(ValueError, match='larger than the padded input'):
    jax.jit(lambda v: max_pool(v, 7)).lower(jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))


# ----------------------------------------------------------------------------
# The native routing kernel (cnn_jax/ops/csrc/pool_cpu.cc)
# ----------------------------------------------------------------------------

native = pytest.importorskip('cnn_jax.ops.native')
needs_native = pytest.mark.skipif(
    not native.available(), reason=f'native kernels not available: {native.unavailable_reason()}')


@needs_native
@pytest.mark.parametrize('shape,window,stride,padding', [
    ((4, 28, 28, 6), 2, 2, 'VALID'),           # LeNet's S2: windows tile the input
    ((2, 9, 9, 5), 3, 2, 'SAME'),              # overlapping windows, padding
    ((3, 8, 8, 17), 3, 1, 'SAME'),
    ((2, 11, 3), 3, 2, 'VALID'),               # 1-D
    ((1, 5, 4, 6, 2), 2, 1, 'SAME'),           # 3-D
])
def test_native_routing_equals_xla_scatter(shape, window, stride, padding):
  """max_pool's backward through the native loop gives XLA's scatter-add (the
  same sums where windows overlap), and is what the program calls."""
  x = jnp.asarray(np.random.default_rng(40).standard_normal(shape), jnp.float32)
  loss = lambda v: jnp.sum(jnp.sin(3.0 * max_pool(v, window, stride, padding)))
  step = jax.jit(jax.grad(loss))
  got = step(x)
  assert 'cnn_jax_scatter_add_rows' in step.lower(x).as_text()
  with native.disabled():
    plain = jax.jit(jax.grad(loss))
    assert 'cnn_jax_scatter_add_rows' not in plain.lower(x).as_text()
    want = plain(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  # Second order goes through the routing's JVP (a scatter whose transpose is a gather).
  hess = lambda v: jnp.sum(jax.grad(loss)(v) ** 2)
  got2 = jax.grad(hess)(x)
  with native.disabled():
    want2 = jax.grad(hess)(x)
  np.testing.assert_allclose(np.asarray(got2), np.asarray(want2), rtol=1e-5, atol=1e-5)


@needs_native
def test_native_unpool_drops_switches_outside_the_output():
  y = jnp.asarray(np.arange(1, 13, dtype=np.float32).reshape(1, 6, 2))
  sw = jnp.asarray(np.array([[[0, 1], [9, 2], [-1, 2], [3, 100], [3, 0], [4, 5]]], np.int32))
  got = jax.jit(lambda y, s: max_unpool(y, s, (5,)))(y, sw)
  with native.disabled():
    want = jax.jit(lambda y, s: max_unpool(y, s, (5,)))(y, sw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(got)[0, :, 0], [1, 0, 0, 7 + 9, 11])


def test_routing_outside_float32_stays_in_xla():
  x = jnp.asarray(np.random.default_rng(41).standard_normal((2, 6, 6, 3)), jnp.bfloat16)
  text = jax.jit(jax.grad(lambda v: jnp.sum(max_pool(v, 2).astype(jnp.float32)))).lower(x).as_text()
  assert 'cnn_jax_scatter_add_rows' not in text
