"""Every conv-gradient formulation in cnn_jax.ops.conv_grads against jax.vjp of
the plain lax.conv_general_dilated, over a grid of 1/2/3-D shapes, strides,
paddings, dilations and groups (float64 to 1e-10, float32 to a stated
tolerance), and the static rule that picks one per shape class."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

# `cnn_jax.ops` re-exports the function `conv`, which shadows the module name.
conv_mod = importlib.import_module('cnn_jax.ops.conv')
conv_grads = importlib.import_module('cnn_jax.ops.conv_grads')
native = importlib.import_module('cnn_jax.ops.native')

# float32: the formulations add the same products in different orders (per
# block, per tap, per phase), so they differ from XLA's sums by rounding only.
F32_TOL = dict(rtol=1e-5, atol=1e-4)
F64_TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True, scope='module')
def fast_compiles():
  """Compiling dominates these small cases; XLA's optimizations reorder no sum
  the tolerances here could see (benchmarks/ops.py runs them optimized)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)

# (x shape, w shape, stride, padding, dilation, groups). Odd and even sizes and
# kernels; strides 1-3; VALID/SAME/FULL/explicit (lo, hi); padding wider than
# the kernel (negative dX padding); dilation 1-2; groups 1, 2 and depthwise.
GRID = [
    # 1-D
    ((2, 9, 3), (3, 3, 4), 1, 'VALID', 1, 1),
    ((2, 10, 4), (4, 2, 6), 3, 'SAME', 1, 2),
    ((1, 8, 2), (3, 2, 2), 2, 'FULL', 2, 1),
    ((2, 7, 3), (1, 3, 5), 2, [(2, 3)], 1, 1),
    ((2, 6, 3), (2, 1, 3), 1, [(4, 2)], 1, 3),
    # 2-D
    ((2, 7, 6, 4), (3, 3, 4, 6), 2, 'SAME', 1, 1),
    ((2, 8, 8, 4), (3, 3, 1, 8), 1, 'SAME', 1, 4),
    ((2, 6, 7, 4), (2, 3, 2, 6), (1, 3), [(4, 5), (0, 3)], (2, 1), 2),
    ((3, 7, 7, 6), (1, 1, 6, 4), 2, [(2, 3), (0, 1)], 1, 1),
    ((2, 9, 8, 3), (3, 2, 3, 5), 3, 'FULL', 1, 1),
    ((2, 6, 6, 4), (3, 3, 4, 5), 3, [(3, 6), (5, 2)], 2, 1),
    ((4, 5, 5, 4), (1, 1, 2, 6), 1, 'VALID', 1, 2),
    # 3-D
    ((1, 5, 6, 5, 4), (2, 3, 2, 2, 4), (1, 2, 3), 'FULL', (2, 1, 1), 2),
    ((2, 4, 5, 3, 3), (3, 1, 2, 3, 2), (2, 1, 1), 'VALID', 1, 1),
    ((1, 4, 4, 5, 4), (1, 1, 1, 4, 3), (1, 1, 2), 'SAME', 1, 1),
    ((1, 5, 5, 4, 3), (3, 3, 3, 1, 3), 1, 'SAME', 1, 3),
    # One input channel per group (the depthwise rule's class): pure depthwise,
    # strided, dilated and unevenly padded; a 1-channel input (LeNet's C1).
    ((2, 9, 8, 6), (3, 3, 1, 6), 2, [(1, 2), (0, 1)], (1, 2), 6),
    ((2, 9, 9, 1), (5, 5, 1, 6), 1, 'VALID', 1, 1),
    # Maps smaller than the window (the im2col forward and dX rule's class).
    ((2, 2, 2, 4), (3, 3, 4, 5), 1, 'SAME', 1, 1),
    ((2, 1, 3, 4), (3, 3, 2, 6), 2, [(1, 1), (2, 0)], (1, 2), 2),
]


def _ids(case):
  xs, ws, s, p, d, g = case
  return f'{len(xs) - 2}d-x{xs[1:]}-k{ws[:-2]}-s{s}-p{p}-d{d}-g{g}'.replace(' ', '')


def _is_1x1(spec):
  return all(k == 1 for k in spec.kernel)


def _formulations(spec, n):
  """(name, fn(dy or x, w or dy) -> grad) for every formulation that applies."""
  dx = {f'dx/{k}': f for k, f in conv_grads.INPUT_GRADS.items()
        if k != 'gemm' or (_is_1x1(spec) and spec.groups == 1)}
  depthwise = spec.channels[0] == spec.channels[1] == spec.groups
  dw = {f'dw/{k}': f for k, f in conv_grads.WEIGHT_GRADS.items()
        if (k != 'gemm' or _is_1x1(spec)) and (k != 'depthwise' or depthwise)}
  # The blocked im2col at its extremes: one image per step and the whole batch.
  dw['dw/im2col-chunk1'] = lambda x, dy, s: conv_grads.weight_grad_im2col(x, dy, s, chunk=1)
  dw[f'dw/im2col-chunk{n}'] = lambda x, dy, s: conv_grads.weight_grad_im2col(x, dy, s, chunk=n)
  return dx, dw


def _check_case(case, dtype, tol):
  xs, ws, stride, padding, dilation, groups = case
  spec = conv_mod.make_spec(xs, ws, stride=stride, padding=padding, dilation=dilation,
                            groups=groups)
  rng = np.random.default_rng(sum(xs) + 7 * sum(ws))
  x = jnp.asarray(rng.standard_normal(xs), dtype)
  w = jnp.asarray(rng.standard_normal(ws), dtype)
  dx_forms, dw_forms = _formulations(spec, xs[0])

  def everything(x, w, dy):
    ref = lambda x, w: lax.conv_general_dilated(
        x, w, spec.stride, spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=conv_grads.dimension_numbers(spec.nd),
        feature_group_count=spec.groups)
    _, vjp = jax.vjp(ref, x, w)
    ref_dx, ref_dw = vjp(dy)
    got = {k: f(dy, w, spec) for k, f in dx_forms.items()}
    got['y/im2col'] = conv_grads.forward_im2col(x, w, spec)
    if spec.channels[0] == spec.groups:
      got['y/depthwise'] = conv_grads.forward_depthwise(x, w, spec)
    got['y/ref'] = ref(x, w)
    got.update({k: f(x, dy, spec) for k, f in dw_forms.items()})
    return ref_dx, ref_dw, got

  dy = jnp.asarray(rng.standard_normal((xs[0], *spec.out_spatial, ws[-1])), dtype)
  # One compile per case: every formulation and the reference in one program.
  ref_dx, ref_dw, got = jax.jit(everything)(x, w, dy)
  assert ref_dx.dtype == dtype
  for name, value in got.items():
    if name.startswith('y/'):
      ref = got['y/ref']
    else:
      ref = ref_dx if name.startswith('dx/') else ref_dw
    assert value.shape == ref.shape, name
    assert value.dtype == dtype, name
    np.testing.assert_allclose(np.asarray(value), np.asarray(ref), err_msg=name, **tol)


@pytest.mark.parametrize('case', GRID, ids=_ids)
def test_every_formulation_matches_autodiff_float64(case, x64):
  _check_case(case, jnp.float64, F64_TOL)


@pytest.mark.parametrize('case', GRID[::3], ids=_ids)
def test_every_formulation_matches_autodiff_float32(case):
  _check_case(case, jnp.float32, F32_TOL)


def test_conv_backward_uses_the_rule_and_matches_autodiff(x64):
  """Through the custom_vjp: one case per dispatch class."""
  cases = [((2, 6, 6, 4), (3, 3, 4, 4), 2, 'SAME', 1, 1),      # im2col / dilated
           ((2, 6, 6, 4), (1, 1, 4, 6), 2, 'VALID', 1, 1),     # gemm / gemm
           ((2, 9, 4), (3, 4, 4), 1, 'SAME', 1, 1),            # correlation / dilated
           ((2, 6, 6, 4), (3, 3, 1, 4), 1, 'SAME', 1, 4),      # depthwise: all three
           ((2, 2, 2, 4), (3, 3, 4, 4), 1, 'SAME', 1, 1),      # small map: im2col Y, col2im dX
           ((2, 5, 5, 4), (5, 5, 4, 6), 1, 'VALID', 1, 1)]     # 1x1 output (LeNet's C5)
  for xs, ws, s, p, d, g in cases:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs))
    w = jnp.asarray(rng.standard_normal(ws))
    spec = conv_mod.make_spec(xs, ws, stride=s, padding=p, dilation=d, groups=g)
    ref = lambda x, w: lax.conv_general_dilated(
        x, w, spec.stride, spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=conv_grads.dimension_numbers(spec.nd), feature_group_count=g)
    ours = lambda x, w: conv_mod.conv(x, w, stride=s, padding=p, dilation=d, groups=g)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    both = jax.jit(lambda x, w: (jax.grad(loss(ours), argnums=(0, 1))(x, w),
                                 jax.grad(loss(ref), argnums=(0, 1))(x, w)))
    got, want = both(x, w)
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), **F64_TOL)


# ----------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------

RULE = [
    # (x shape, w shape, stride, groups) -> (dX formulation, dW formulation)
    (((32, 32, 32, 64), (3, 3, 64, 64), 1, 1), ('dilated', 'im2col')),
    (((32, 32, 32, 64), (3, 3, 64, 128), 2, 1), ('dilated', 'im2col')),
    (((32, 56, 56, 64), (7, 7, 64, 64), 2, 1), ('dilated', 'im2col')),
    (((32, 32, 32, 64), (1, 1, 64, 256), 1, 1), ('gemm', 'gemm')),
    (((32, 32, 32, 64), (1, 1, 64, 128), 2, 1), ('gemm', 'gemm')),
    (((32, 32, 32, 64), (1, 1, 16, 128), 1, 4), ('dilated', 'gemm')),
    (((32, 32, 32, 64), (3, 3, 1, 64), 1, 64), ('col2im', 'depthwise')),
    (((32, 32, 32, 64), (3, 3, 32, 64), 1, 2), ('dilated', 'im2col')),
    (((32, 256, 64), (5, 64, 64), 2, 1), ('dilated', 'correlation')),
    (((32, 256, 64), (5, 16, 64), 1, 4), ('dilated', 'im2col')),
    (((32, 256, 64), (1, 64, 64), 1, 1), ('gemm', 'gemm')),
    (((8, 16, 16, 16, 32), (3, 3, 3, 32, 32), 1, 1), ('dilated', 'im2col')),
    (((8, 16, 16, 16, 32), (1, 1, 1, 32, 64), 2, 1), ('gemm', 'gemm')),
    (((32, 2, 2, 512), (3, 3, 512, 512), 1, 1), ('col2im', 'im2col')),
    (((32, 4, 4, 256), (3, 3, 256, 512), 2, 1), ('col2im', 'im2col')),
    (((8, 4, 4, 256), (5, 5, 256, 256), 1, 1), ('col2im', 'im2col')),
    (((128, 1, 1, 120), (5, 5, 120, 120), 1, 1), ('col2im', 'im2col')),
    (((32, 32, 32, 64), (3, 3, 1, 64), 2, 64), ('col2im', 'depthwise')),
    (((32, 32, 32, 64), (3, 3, 1, 128), 1, 64), ('col2im', 'im2col')),
    (((128, 32, 32, 1), (5, 5, 1, 6), 1, 1), ('col2im', 'im2col')),
    (((32, 256, 64), (5, 1, 64), 1, 64), ('col2im', 'depthwise')),
    (((128, 14, 14, 6), (5, 5, 6, 16), 1, 1), ('col2im', 'im2col')),      # LeNet's C3
    (((32, 56, 56, 3), (3, 3, 3, 64), 1, 1), ('col2im', 'im2col')),
    (((32, 16, 16, 8), (3, 3, 8, 32), 1, 1), ('dilated', 'im2col')),
    (((32, 16, 16, 16), (3, 3, 4, 32), 1, 4), ('col2im', 'im2col')),
    (((8, 227, 227, 3), (11, 11, 3, 96), 4, 1), ('dilated', 'im2col')),   # > 49 taps
    (((8, 224, 224, 3), (7, 7, 3, 64), 2, 1), ('col2im', 'im2col')),
]


@pytest.mark.parametrize('xs,ws,stride,expected', [
    ((32, 2, 2, 512), (3, 3, 512, 512), 1, 'im2col'),
    ((32, 1, 1, 64), (3, 3, 64, 64), 1, 'im2col'),
    ((32, 4, 4, 256), (3, 3, 256, 512), 2, 'xla'),
    ((32, 4, 4, 256), (1, 1, 256, 512), 1, 'xla'),
    ((32, 32, 32, 64), (3, 3, 64, 64), 1, 'xla'),
    ((32, 2, 64), (3, 64, 64), 1, 'xla'),
    ((32, 32, 32, 1), (5, 5, 1, 6), 1, 'depthwise'),
    ((32, 2, 2, 64), (3, 3, 1, 64), 1, 'depthwise'),
])
def test_forward_rule(xs, ws, stride, expected):
  groups = xs[-1] // ws[-2]
  spec = conv_mod.make_spec(xs, ws, stride=stride, padding='SAME', groups=groups)
  with native.disabled():        # the pure-JAX rule (native: test_native.py)
    assert conv_grads.forward_rule(spec) == expected


@pytest.mark.parametrize('args,expected', RULE, ids=[str(r[1]) + str(r[0][1]) for r in RULE])
def test_rule_picks_the_expected_formulation(args, expected):
  # The pure-JAX rule; where the native CPU kernel takes over is tested in
  # test_native.py.
  xs, ws, stride, groups = args
  spec = conv_mod.make_spec(xs, ws, stride=stride, padding='SAME', groups=groups)
  with native.disabled():
    assert (conv_grads.input_grad_rule(spec), conv_grads.weight_grad_rule(spec)) == expected


def test_dispatch_calls_the_named_formulation(monkeypatch):
  spec = conv_mod.make_spec((2, 5, 5, 8), (3, 3, 8, 4), padding='SAME')   # dilated, im2col
  calls = []
  monkeypatch.setitem(conv_grads.INPUT_GRADS, 'dilated', lambda *a: calls.append('dx'))
  monkeypatch.setitem(conv_grads.WEIGHT_GRADS, 'im2col', lambda *a: calls.append('dw'))
  with native.disabled():
    conv_grads.input_grad(None, None, spec)
    conv_grads.weight_grad(None, None, spec)
  assert calls == ['dx', 'dw']


def test_im2col_chunk_divides_the_batch_and_fits_the_block():
  spec = conv_mod.make_spec((32, 32, 32, 64), (3, 3, 64, 64), padding='SAME')
  per_image = 9 * 64 * 32 * 32 * 4
  chunk = conv_grads.im2col_chunk(spec, 32, 64, 4)
  assert 32 % chunk == 0 and chunk * per_image <= conv_grads.IM2COL_BLOCK_BYTES
  assert 32 % (2 * chunk) or 2 * chunk * per_image > conv_grads.IM2COL_BLOCK_BYTES
  # An image larger than the block still gets one image per step.
  big = conv_mod.make_spec((6, 224, 224, 64), (3, 3, 64, 64), padding='SAME')
  assert conv_grads.im2col_chunk(big, 6, 64, 4) == 1
  # A prime batch of small images falls back to divisors (1 or all of it).
  small = conv_mod.make_spec((7, 4, 4, 2), (3, 3, 2, 2), padding='SAME')
  assert conv_grads.im2col_chunk(small, 7, 2, 4) == 7


def test_im2col_rejects_a_chunk_that_does_not_divide_the_batch():
  spec = conv_mod.make_spec((4, 5, 5, 2), (3, 3, 2, 2))
  x = jnp.zeros((4, 5, 5, 2))
  dy = jnp.zeros((4, 3, 3, 2))
  with pytest.raises(ValueError, match='chunk 3 must divide the batch 4'):
    conv_grads.weight_grad_im2col(x, dy, spec, chunk=3)


def _slice_ops(fn, k):
  """Number of (dynamic) slice ops in the lowered program of fn at a k x k kernel."""
  spec = conv_mod.make_spec((2, 12, 12, 3), (k, k, 3, 4), padding='SAME')
  x = jnp.zeros((2, 12, 12, 3), jnp.float32)
  dy = jnp.zeros((2, *spec.out_spatial, 4), jnp.float32)
  text = jax.jit(lambda x, dy: fn(x, dy, spec)).lower(x, dy).as_text()
  return text.count('slice')


def test_im2col_program_does_not_grow_with_the_kernel():
  """Compile time tracks the number of ops XLA compiles: the tap loop keeps the
  im2col program the same size at 3x3 and 11x11 (the unrolled one has a slice
  per tap: benchmarks/README.md, "Compile time")."""
  ours = [_slice_ops(conv_grads.weight_grad_im2col, k) for k in (3, 11)]
  assert ours[0] == ours[1]
  unrolled = [_slice_ops(conv_grads.weight_grad_im2col_unrolled, k) for k in (3, 11)]
  assert unrolled[1] - unrolled[0] >= 121 - 9
