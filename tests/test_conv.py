"""conv, true_convolution, conv_transpose and im2col against references.

References: naive NumPy loops, scipy.signal, jax.vjp of the plain lax ops,
numerical differences (check_grads), and the worked examples of the notes.
Float32 comparisons use rtol/atol 1e-4 (sums of up to a few hundred products of
O(1) values); float64 comparisons use 1e-10.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads
from scipy import signal

from cnn_jax.ops import conv, conv_transpose, true_convolution
from cnn_jax.ops import conv_grads
from cnn_jax.ops.conv import make_spec
from cnn_jax.ops.im2col import col2im, conv_matmul, im2col

F32 = dict(rtol=1e-4, atol=1e-4)

# One-off programs throughout: XLA's optimisation passes would dominate their time.
pytestmark = pytest.mark.usefixtures('fast_compile')


def np_conv(x, w, stride, pads, dilation, groups):
  """Direct loop over output positions: Y[n,p,o] = sum Xpad[n,p*S+t*D,i] W[t,i,o]."""
  nd = x.ndim - 2
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  k = w.shape[:nd]
  c_in, c_out = x.shape[-1], w.shape[-1]
  cig, cog = c_in // groups, c_out // groups
  out_sp = [(xp.shape[1 + i] - ((k[i] - 1) * dilation[i] + 1)) // stride[i] + 1
            for i in range(nd)]
  y = np.zeros((x.shape[0], *out_sp, c_out))
  for pos in itertools.product(*[range(o) for o in out_sp]):
    idx = tuple(slice(p * s, p * s + (kk - 1) * d + 1, d)
                for p, s, kk, d in zip(pos, stride, k, dilation))
    field = xp[(slice(None),) + idx]                       # (N, *k, C_in)
    for g in range(groups):
      y[(slice(None),) + pos + (slice(g * cog, (g + 1) * cog),)] = np.tensordot(
          field[..., g * cig:(g + 1) * cig], w[..., g * cog:(g + 1) * cog],
          axes=(list(range(1, nd + 2)), list(range(nd + 1))))
  return y


def lax_conv(x, w, spec):
  return lax.conv_general_dilated(
      x, w, spec.stride, spec.padding, rhs_dilation=spec.dilation,
      dimension_numbers=conv_grads.dimension_numbers(spec.nd),
      feature_group_count=spec.groups)


def _value_and_vjp(f):
  """jit'd (y, dx, dw) for cotangent ct: one compile instead of op-by-op dispatch."""
  def run(a, b, ct):
    y, vjp = jax.vjp(f, a, b)
    return (y,) + vjp(ct)
  return jax.jit(run)


# nd, size, stride, padding, dilation, groups
GRID = [
    (1, 7, 1, 'VALID', 1, 1), (1, 8, 2, 'SAME', 1, 2), (1, 9, 3, 'FULL', 2, 1),
    (1, 6, 2, ((0, 3),), 1, 4),
    (2, 5, 1, 'VALID', 1, 1), (2, 6, 2, 'SAME', 1, 1), (2, 7, 2, 'VALID', 1, 2),
    (2, 8, 3, 'FULL', 1, 1), (2, 7, 1, 'SAME', 2, 1), (2, 6, 3, 1, 1, 4),
    (2, 9, 2, ((1, 0), (2, 3)), 2, 2), (2, 5, 1, 3, 1, 1), (2, 8, 2, 'SAME', 1, 4),
    (3, 5, 1, 'VALID', 1, 1), (3, 6, 2, 'SAME', 1, 2), (3, 7, 3, 'FULL', 1, 1),
    (3, 6, 1, 1, 2, 4),
]


def _case(nd, n, groups, seed=0, c_in=4, c_out=8, k=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2,) + (n + 0,) * nd + (c_in,)).astype(np.float32)
  if nd == 2:   # non-square inputs too
    x = rng.normal(size=(2, n, n + 1, c_in)).astype(np.float32)
  w = rng.normal(size=(k,) * nd + (c_in // groups, c_out)).astype(np.float32)
  return x, w


@pytest.mark.parametrize('nd,n,s,pad,d,g', GRID)
def test_forward_matches_numpy_loop(nd, n, s, pad, d, g):
  x, w = _case(nd, n, g)
  spec = make_spec(x.shape, w.shape, stride=s, padding=pad, dilation=d, groups=g)
  y = conv(x, w, stride=s, padding=pad, dilation=d, groups=g)
  ref = np_conv(x.astype(np.float64), w.astype(np.float64), spec.stride, spec.padding,
                spec.dilation, g)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, **F32)


@pytest.mark.parametrize('nd,n,s,pad,d,g', GRID)
def test_backward_matches_autodiff_of_lax(nd, n, s, pad, d, g):
  x, w = _case(nd, n, g, seed=1)
  spec = make_spec(x.shape, w.shape, stride=s, padding=pad, dilation=d, groups=g)
  y_shape = jax.eval_shape(lambda a, b: lax_conv(a, b, spec), x, w).shape
  ct = np.random.default_rng(2).normal(size=y_shape).astype(np.float32)
  y, dx, dw = _value_and_vjp(
      lambda p, q: conv(p, q, stride=s, padding=pad, dilation=d, groups=g))(x, w, ct)
  y_ref, dx_ref, dw_ref = _value_and_vjp(lambda p, q: lax_conv(p, q, spec))(x, w, ct)
  np.testing.assert_allclose(y, y_ref, **F32)
  np.testing.assert_allclose(dx, dx_ref, **F32)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-3)
  assert dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize('nd,s,pad,d,g', [
    (1, 2, 'SAME', 1, 1), (2, 2, 'VALID', 1, 2), (2, 1, 'FULL', 2, 1), (3, 2, 1, 1, 1)])
def test_numerical_gradients_float64(x64, nd, s, pad, d, g):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1,) + (5,) * nd + (2,))
  w = rng.normal(size=(2,) * nd + (2 // g, 2))
  # jit: the same function, compiled once per derivative instead of op by op.
  f = jax.jit(lambda a, b: conv(a, b, stride=s, padding=pad, dilation=d, groups=g))
  check_grads(f, (x, w), order=2, modes=['rev'], eps=1e-4, atol=1e-6, rtol=1e-6)


def test_backward_is_the_notes_equations_single_channel(x64):
  """dX = full correlation of dY with rot180(W) (= full convolution with W);
  dW = valid correlation of X with dY. Stated with scipy, independent of lax."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(7, 6))
  w = rng.normal(size=(3, 2))
  dy = rng.normal(size=(5, 5))
  _, vjp = jax.vjp(lambda a, b: conv(a[None, ..., None], b[..., None, None]), x, w)
  dx, dw = vjp(dy[None, ..., None])
  np.testing.assert_allclose(dx, signal.correlate2d(dy, w[::-1, ::-1], mode='full'), atol=1e-12)
  np.testing.assert_allclose(dx, signal.convolve2d(dy, w, mode='full'), atol=1e-12)
  np.testing.assert_allclose(dw, signal.correlate2d(x, dy, mode='valid'), atol=1e-12)


def test_stride_remainder_rows_get_zero_gradient(x64):
  """8 wide, 3 wide kernel, stride 2: the last column is never read (r = 1)."""
  x = np.ones((1, 8, 8, 1))
  w = np.ones((3, 3, 1, 1))
  spec = make_spec(x.shape, w.shape, stride=2)
  assert spec.out_spatial == (3, 3) and spec.remainder == (1, 1)
  dx = jax.grad(lambda a: conv(a, w, stride=2).sum())(x)
  assert np.all(dx[0, -1, :, 0] == 0) and np.all(dx[0, :, -1, 0] == 0)
  assert dx[0, 2, 2, 0] == 4  # read by four overlapping windows


# --- the notes' worked examples -------------------------------------------------

SEED004_IMAGE = np.array([[6, 3, 4, 4, 5, 0, 3], [4, 7, 4, 0, 4, 0, 4],
                          [7, 0, 2, 3, 4, 5, 2], [3, 7, 5, 0, 3, 0, 7],
                          [5, 8, 1, 2, 5, 4, 2], [8, 0, 1, 0, 6, 0, 0],
                          [6, 4, 1, 3, 0, 4, 5]], np.float32)
SEED004_FILTER = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 2]], np.float32)


def test_seed004_7x7_valid_correlation():
  # The notes' output figure, with one correction: row 5, column 4 is printed as
  # 16 but the window [[2,5,4],[0,6,0],[3,0,4]] gives 2 + 4 + 0 + 2*4 = 14.
  # (The "NumPy Implementation Output" block printed beside it does not match
  # its own code; the figure does.)
  expected = np.array([[18, 20, 21, 14, 16], [25, 7, 16, 3, 26], [14, 14, 21, 16, 13],
                       [15, 15, 21, 2, 15], [16, 16, 7, 14, 23]], np.float32)
  y = conv(SEED004_IMAGE[None, :, :, None], SEED004_FILTER[:, :, None, None])
  np.testing.assert_array_equal(y[0, :, :, 0], expected)
  # The two single positions the notes work by hand.
  assert y[0, 0, 4, 0] == 16 and y[0, 1, 4, 0] == 26


def test_seed002_vertical_edge():
  img = np.array([[10, 10, 10, 0, 0, 0]] * 6, np.float32)
  k = np.array([[1, 0, -1]] * 3, np.float32)
  y = conv(img[None, :, :, None], k[:, :, None, None])[0, :, :, 0]
  np.testing.assert_array_equal(y, np.array([[0, 30, 30, 0]] * 4, np.float32))


def test_seed002_laplacian_is_flip_symmetric():
  """For a kernel symmetric under rot180, convolution and correlation agree."""
  lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)[:, :, None, None]
  x = np.random.default_rng(5).normal(size=(1, 6, 6, 1)).astype(np.float32)
  np.testing.assert_allclose(true_convolution(x, lap), conv(x, lap), atol=1e-6)


def test_true_convolution_differs_from_correlation_and_matches_scipy():
  x = SEED004_IMAGE
  conv_full = true_convolution(x[None, :, :, None], SEED004_FILTER[:, :, None, None],
                               padding='FULL')[0, :, :, 0]
  np.testing.assert_allclose(conv_full, signal.convolve2d(x, SEED004_FILTER, 'full'))
  corr = conv(x[None, :, :, None], SEED004_FILTER[:, :, None, None])[0, :, :, 0]
  true = true_convolution(x[None, :, :, None], SEED004_FILTER[:, :, None, None])[0, :, :, 0]
  assert not np.allclose(corr, true)
  np.testing.assert_allclose(true, signal.convolve2d(x, SEED004_FILTER, 'valid'))


def test_seed003_1d_convolution_sum():
  """y(n) = sum_p w(p) x(n - p) with a 5-tap kernel, centred (A = 2)."""
  x = np.arange(1.0, 9.0, dtype=np.float32)
  w = np.array([1, -2, 3, 0.5, 2], np.float32)   # w(-2) .. w(2)
  y = true_convolution(x[None, :, None], w[:, None, None], padding='SAME')[0, :, 0]
  ref = [sum(w[p + 2] * (x[n - p] if 0 <= n - p < len(x) else 0) for p in range(-2, 3))
         for n in range(len(x))]
  np.testing.assert_allclose(y, ref, rtol=1e-6)


@pytest.mark.parametrize('stride,expected', [(1, 3), (2, 2), (3, 1)])
def test_seed004_output_size_5x5_3x3(stride, expected):
  x = np.ones((1, 5, 5, 1), np.float32)
  y = conv(x, np.ones((3, 3, 1, 1), np.float32), stride=stride)
  assert y.shape == (1, expected, expected, 1)


def test_seed003_32x32x3_ten_5x5_same():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((5, 5, 3, 10), jnp.float32)
  y = jax.eval_shape(lambda a, b: conv(a, b, padding='SAME'), x, w)
  assert y.shape == (1, 32, 32, 10)


def test_padding_modes_sizes():
  x = np.ones((1, 5, 5, 1), np.float32)
  w = np.ones((3, 3, 1, 1), np.float32)
  assert conv(x, w, padding='SAME').shape[1:3] == (5, 5)    # P = (F - 1)/2
  assert conv(x, w, padding='FULL').shape[1:3] == (7, 7)    # F - 1 each side
  assert conv(x, w, padding=1).shape[1:3] == (5, 5)
  y6 = conv(np.ones((1, 6, 6, 1), np.float32), w, padding=1)  # 6x6 -> 8x8 -> 6x6
  assert y6.shape[1:3] == (6, 6)


def test_depthwise_is_per_channel_convolution():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 1, 3)).astype(np.float32)
  y = conv(x, w, groups=3)
  for c in range(3):
    yc = conv(x[..., c:c + 1], w[..., c:c + 1])
    np.testing.assert_allclose(y[..., c:c + 1], yc, rtol=1e-5, atol=1e-5)


# --- transposed convolution ---------------------------------------------------------

def np_conv_transpose(x, w, stride):
  """Scatter definition: out[p*S + t] += x[p] * w[t] (2-D, VALID, one group)."""
  n, h, wd, _ = x.shape
  kh, kw, _, c_out = w.shape
  out = np.zeros((n, (h - 1) * stride + kh, (wd - 1) * stride + kw, c_out))
  for i, j in itertools.product(range(h), range(wd)):
    out[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :] += np.einsum(
        'nc,hwco->nhwo', x[:, i, j, :], w)
  return out


@pytest.mark.parametrize('stride,out', [(1, 4), (2, 5)])
def test_conv_transpose_upsamples_2x2(stride, out):
  """The notes' learnable upsampling: 2x2 -> 4x4 (stride 1) and 2x2 -> 5x5 (stride 2)."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(1, 2, 2, 2)).astype(np.float32)
  w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
  y = conv_transpose(x, w, stride=stride)
  assert y.shape == (1, out, out, 3)
  np.testing.assert_allclose(y, np_conv_transpose(x, w, stride), **F32)


@pytest.mark.parametrize('s,pad,op,g', [(2, 'SAME', 0, 1), (2, 1, 1, 1), (3, 'VALID', 2, 2),
                                        (1, 'FULL', 0, 1)])
def test_conv_transpose_is_adjoint_of_conv(x64, s, pad, op, g):
  rng = np.random.default_rng(8)
  x = rng.normal(size=(2, 4, 5, 4))
  w = rng.normal(size=(3, 3, 4 // g, 6))
  y = conv_transpose(x, w, stride=s, padding=pad, output_padding=op, groups=g)
  z = rng.normal(size=y.shape)
  # conv(z, W^T) maps the upsampled space back to x's; <T x, z> == <x, C z>.
  wt = np.swapaxes(w.reshape(3, 3, 4 // g, g, 6 // g), 2, 4).reshape(3, 3, 6 // g, 4)
  pads = make_spec(z.shape, wt.shape, stride=s, padding=pad if pad != 'SAME' else 'SAME',
                   groups=g).padding
  cz = conv(z, wt, stride=s, padding=pads, groups=g)
  assert cz.shape == x.shape
  np.testing.assert_allclose(np.vdot(y, z), np.vdot(x, cz), rtol=1e-10)
  check_grads(jax.jit(lambda a, b: conv_transpose(a, b, stride=s, padding=pad,
                                                  output_padding=op, groups=g)),
              (x[:1, :3, :3], w), order=1, modes=['rev'], eps=1e-4, atol=1e-6, rtol=1e-6)


def test_conv_transpose_matches_lax_conv_transpose():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  for pad in ('SAME', 'VALID'):
    ours = conv_transpose(x, w, stride=2, padding=pad)
    # lax.conv_transpose with transpose_kernel=True wants the kernel as the
    # forward conv's (HWIO with I = our output channels).
    ref = lax.conv_transpose(x, np.swapaxes(w, 2, 3), (2, 2), pad,
                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                             transpose_kernel=True)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, **F32)


# --- im2col -------------------------------------------------------------------------

@pytest.mark.parametrize('nd,n,s,pad,d,g', [GRID[1], GRID[6], GRID[10], GRID[12], GRID[14]])
def test_conv_matmul_matches_conv(nd, n, s, pad, d, g):
  x, w = _case(nd, n, g, seed=10)
  kw = dict(stride=s, padding=pad, dilation=d, groups=g)
  y_shape = jax.eval_shape(lambda a, b: conv(a, b, **kw), x, w).shape
  ct = np.random.default_rng(11).normal(size=y_shape).astype(np.float32)
  ours = _value_and_vjp(lambda a, b: conv_matmul(a, b, **kw))(x, w, ct)
  ref = _value_and_vjp(lambda a, b: conv(a, b, **kw))(x, w, ct)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_im2col_rows_are_receptive_fields_and_col2im_is_adjoint(x64):
  rng = np.random.default_rng(12)
  x = rng.normal(size=(2, 6, 5, 3))
  p = im2col(x, (3, 2), stride=2, padding=1)
  assert p.shape == (2, 3, 3, 3 * 2 * 3)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_allclose(p[1, 2, 1], xp[1, 4:7, 2:4].reshape(-1))
  q = rng.normal(size=p.shape)
  back = col2im(q, x.shape, (3, 2), stride=2, padding=1)
  np.testing.assert_allclose(np.vdot(p, q), np.vdot(x, back), rtol=1e-12)


# --- errors ------------------------------------------------------------------------

@pytest.mark.parametrize('x_shape,w_shape,kw,match', [
    ((1, 3, 3, 1), (5, 5, 1, 1), {}, r'window of 5 .* larger than the padded input 3'),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(dilation=3), r'dilation 3 -> effective 7'),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(stride=0), r'stride must be >= 1'),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(stride=(1, 0)), r'dimension 1 is 0'),
    ((1, 5, 5, 1), (3, 0, 1, 1), {}, r'kernel size must be >= 1'),
    ((1, 5, 5, 3), (3, 3, 2, 4), {}, r'kernel expects 2 input channels per group'),
    ((1, 5, 5, 6), (3, 3, 3, 5), dict(groups=2), r'output channels 5 are not divisible'),
    ((1, 5, 5, 5), (3, 3, 1, 4), dict(groups=2), r'input channels 5 are not divisible'),
    ((5, 5, 3), (3, 3, 3, 4), {}, r'kernel must be .* rank 3'),
    ((1, 5, 5, 1, 1, 1), (3, 3, 1, 1), {}, r'1, 2 or 3 spatial dimensions'),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(padding='same-ish'), r"padding must be one of"),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(padding=-1), r'padding must be >= 0'),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(padding=((1, 1),)), r'one entry per spatial dimension'),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(stride=(1, 1, 1)), r'tuple of 2 ints'),
    ((1, 5, 5, 1), (3, 3, 1, 1), dict(groups=0), r'groups must be a positive int'),
])
def test_conv_errors(x_shape, w_shape, kw, match):
  with pytest.raises(ValueError, match=match):
    conv(jnp.zeros(x_shape), jnp.zeros(w_shape), **kw)


def test_conv_error_names_formula():
  with pytest.raises(ValueError, match=r'W2 = \(W1 - F \+ P_lo \+ P_hi\)/S \+ 1 = \(3 - 5'):
    conv(jnp.zeros((1, 3, 3, 1)), jnp.zeros((5, 5, 1, 1)))


def test_conv_transpose_errors():
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match='output_padding must satisfy'):
    conv_transpose(x, jnp.zeros((3, 3, 1, 1)), stride=2, output_padding=2)
  with pytest.raises(ValueError, match='Use less padding'):
    conv_transpose(x, jnp.zeros((1, 1, 1, 1)), padding=1)
  with pytest.raises(ValueError, match='does not fit input channels'):
    conv_transpose(x, jnp.zeros((3, 3, 2, 1)))


def test_errors_raise_before_compute():
  """Bad arguments fail while tracing shapes: nothing is allocated or run."""
  x = jax.ShapeDtypeStruct((1, 3, 3, 1), jnp.float32)
  w = jax.ShapeDtypeStruct((5, 5, 1, 1), jnp.float32)
  with pytest.raises(ValueError, match='larger than the padded input'):
    jax.eval_shape(conv, x, w)
