"""Formulations of the two convolution gradients. Each computes exactly

    dX = dilate_S(dY) (*) rot180(W)^T, padded (F_eff-1-P_lo, F_eff-1-P_hi+r)
    dW[t, i, o] = sum_{n, p} Xpad[n, p*S + t*D, i] * dY[n, p, o]

(seed 004: the input gradient is a convolution with the flipped filter; the
weight gradient is the correlation of the input with the output gradient,
summed over batch and positions, the shared-weight rule). Formulations differ
only in how the sums are laid out for the hardware; `input_grad` and
`weight_grad` pick one by a fixed rule on the shape class (never by timing):

  On CPU, when the native kernels are available (cnn_jax/ops/native.py: built,
  AVX-512F, not switched off), float32 2-D convolutions with groups == 1,
  dilation 1 and a kernel larger than 1x1 go to them first:

  dW  all of that class but maps   -> weight_grad_native    (register tiles over
      smaller than the window         Xpad and dY; 2-7x the im2col GEMMs)
  Y   C_in <= 256                  -> forward_native        (same tiles, no patch
                                      matrix; 1-9x XLA's below 512 channels)
  dX  C_out <= 256, and not a      -> input_grad_native     (the forward kernel on
      col2im case below (C_in <= 6;   padded dY with rot180(W)^T: the notes' formula;
      dY smaller than the window)     one per sub-pixel phase at stride > 1)

  Otherwise (other platforms, dtypes, classes, or the native kernels off):

  dW  1x1 kernel                   -> weight_grad_gemm      (one GEMM per group)
      depthwise (C_in = C_out =    -> weight_grad_depthwise (per tap, one fused
      groups), k > 1                  multiply-and-reduce)
      1-D, groups == 1             -> weight_grad_correlation (one XLA conv: XLA's
                                      own dW, which is fast in 1-D only)
      otherwise (2-D/3-D k > 1, or -> weight_grad_im2col    (blocked patch GEMMs;
      any other grouped conv)         XLA's grouped dW is 10-300x slower)
  dX  1x1 kernel, groups == 1      -> input_grad_gemm       (GEMM, then scatter)
      1 < T <= 49 taps and <= 6    -> input_grad_col2im     (the transpose of the
      input channels per group        forward's im2col: one GEMM dY @ W^T, then
      (depthwise, gray/RGB inputs,    each tap's columns added back in place)
      LeNet's C3); or 2-D/3-D with
      dY smaller than the window
      otherwise                    -> input_grad_dilated    (the notes' formula;
                                      XLA's own dX, within ~1.2x of PyTorch)
  Y   one input channel per group, -> forward_depthwise     (broadcast products
      k > 1                           accumulated in a loop over the taps)
      2-D/3-D, X smaller than the  -> forward_im2col        (one im2col GEMM)
      kernel window (k > 1)
      otherwise                    -> XLA's convolution

XLA's CPU convolution has no fast path for one input channel per group: a 3x3
depthwise conv on 32x32x64 (batch 32) runs ~150 ms forward and ~150 ms dX there,
~5 ms each as broadcast products and col2im. Its dX convolution is also slow
when it produces only a few channels (COL2IM_MAX_IN_CHANNELS).
Maps smaller than the kernel window (ResNet-18's 2x2 maps under 3x3 kernels at
64x64 input) send XLA's CPU convolution down a generic path at ~0.5 GFLOP/s
(benchmarks/README.md); there the patch matrix is small and one GEMM is fast.

benchmarks/README.md has the measurements behind the rule. weight_grad_im2col
fills its patch matrix in a lax.fori_loop over the taps, so its compiled
program (and compile time) does not grow with the kernel size; the unrolled
version it replaced (weight_grad_im2col_unrolled, same run time) compiled one
kernel per tap, 9 s for an 11x11 conv (README "Compile time").
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax.ops import native
from cnn_jax.ops import shapes

_SPATIAL = {1: 'W', 2: 'HW', 3: 'DHW'}

# Bytes of patch matrix one step of weight_grad_im2col builds: small enough to
# stay in cache while the GEMM reads it back (measured best at one 32x32x64
# image, 2.4 MB, on this machine's 2 cores).
IM2COL_BLOCK_BYTES = 4 << 20


def dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last layouts: (N, *spatial, C), (*k, I, O), (N, *spatial, C)."""
  sp = _SPATIAL[nd]
  return lax.conv_dimension_numbers(
      (1,) * (nd + 2), (1,) * (nd + 2), (f'N{sp}C', f'{sp}IO', f'N{sp}C'))


def rotate_kernel(w, nd: int, groups: int = 1):
  """rot180 over the spatial axes, input/output channels swapped per group.

  w (*k, C_in/g, C_out) -> (*k, C_out/g, C_in): the kernel that maps dL/dY back
  onto dL/dX.
  """
  k = w.shape[:nd]
  c_in_g, c_out = w.shape[-2], w.shape[-1]
  w = jnp.flip(w, axis=tuple(range(nd)))
  w = w.reshape(*k, c_in_g, groups, c_out // groups)
  w = jnp.moveaxis(w, nd, nd + 2)          # (*k, g, C_out/g, C_in/g)
  w = jnp.swapaxes(w, nd, nd + 1)          # (*k, C_out/g, g, C_in/g)
  return w.reshape(*k, c_out // groups, groups * c_in_g)


def _all_taps(kernel):
  taps = [()]
  for k in kernel:
    taps = [t + (i,) for t in taps for i in range(k)]
  return taps


def pad_input(x, spec):
  return jnp.pad(x, [(0, 0)] + list(spec.padding) + [(0, 0)])


def tap_slice(xpad, tap, spec, first_spatial_axis: int = 1):
  """The strided view of Xpad that kernel tap `tap` multiplies: Xpad[p*S + t*D].

  Spatial axes start at `first_spatial_axis` (1 for channels-last, 2 for
  channels-first); the other axes are taken whole.
  """
  a = first_spatial_axis
  start = [0] * xpad.ndim
  limit = list(xpad.shape)
  strides = [1] * xpad.ndim
  for i, (t, d, o, s) in enumerate(zip(tap, spec.dilation, spec.out_spatial, spec.stride)):
    start[a + i] = t * d
    limit[a + i] = t * d + (o - 1) * s + 1
    strides[a + i] = s
  return lax.slice(xpad, start, limit, strides)


def _tap_offsets(t, spec):
  """Xpad offsets (t_1*D_1, ..., t_nd*D_nd) of flat tap index t (traced, row-major
  over the kernel), for dynamic slicing inside a loop over the taps."""
  starts, rest = [], t
  for k, d in zip(reversed(spec.kernel), reversed(spec.dilation)):
    starts.append(lax.rem(rest, k) * d)    # lax.rem/div: no sign fix-ups
    rest = lax.div(rest, k)
  return starts[::-1]


def _tap_window(xpad, t, spec):
  """(N, *out, C): Xpad[n, p*S + tap*D, c] for flat tap index t (traced), channels
  last: a dynamic slice at the tap's offset, then the static stride."""
  zero = jnp.zeros_like(t)
  span = [(o - 1) * s_ + 1 for o, s_ in zip(spec.out_spatial, spec.stride)]
  win = lax.dynamic_slice(xpad, [zero] + _tap_offsets(t, spec) + [zero],
                          (xpad.shape[0], *span, xpad.shape[-1]))
  return lax.slice(win, [0] * win.ndim, win.shape, (1, *spec.stride, 1))


# ----------------------------------------------------------------------------
# Y (the forward product), for small maps
# ----------------------------------------------------------------------------

def forward_im2col(x, w, spec):
  """Y = X (*) W as one contraction over (tap, channel): the strided tap views of
  Xpad stacked side by side (the patch matrix), times W reshaped to (T, C_in/g,
  C_out). Exact; the sums run in another order than XLA's conv.

  Used where XLA's CPU convolution takes its generic slow path: a map smaller
  than the kernel window (ResNet-18's 2x2 maps under 3x3 kernels at 64x64 input
  run at ~0.5 GFLOP/s there, 286 ms against 5 ms for this GEMM). The patch matrix
  is T times the output size, small exactly when the maps are.
  """
  taps = _all_taps(spec.kernel)
  g = spec.groups
  c_in, c_out = x.shape[-1], w.shape[-1]
  xpad = pad_input(x, spec)
  cols = jnp.stack([tap_slice(xpad, t, spec) for t in taps], axis=-2)   # (N, *out, T, C_in)
  wt = w.reshape(len(taps), c_in // g, c_out)
  if g == 1:
    return jnp.einsum('...tc,tco->...o', cols, wt)
  cols = cols.reshape(cols.shape[:-1] + (g, c_in // g))
  wt = wt.reshape(len(taps), c_in // g, g, c_out // g)
  y = jnp.einsum('...tgc,tcgo->...go', cols, wt)
  return y.reshape(y.shape[:-2] + (c_out,))


def forward_depthwise(x, w, spec):
  """Y for one input channel per group (depthwise convs, and single-channel inputs
  such as LeNet-5's C1 on grayscale): Y[p, c*m + j] = sum_t Xpad[p*S + t*D, c]
  W[t, 0, c*m + j], broadcast products accumulated over the taps. XLA's CPU
  convolution has no fast path for these: a 3x3 depthwise conv on 32x32x64
  (batch 32) takes ~150 ms there, ~5 ms here.

  The taps are a lax.fori_loop (dynamic slice at the tap's offset, strided
  slice, multiply-add), not T unrolled terms: unrolled, XLA split the sum into
  pieces fused with whatever consumed Y (a reduction pulled the adds into a slow
  YNNPACK fusion), and LeNet-5's training step ran 1.8x slower than with the
  loop; the loop body is one kernel whatever follows, and whatever the kernel size.
  """
  g, c_out = spec.groups, w.shape[-1]
  m = c_out // g
  n_taps = math.prod(spec.kernel)
  xpad = pad_input(x, spec)
  wt = w.reshape(n_taps, g, m).astype(x.dtype)

  def tap(t, y):
    win = _tap_window(xpad, t, spec)[..., None]             # (N, *out, g, 1)
    return y + win * lax.dynamic_index_in_dim(wt, t, keepdims=False)

  y = lax.fori_loop(0, n_taps, tap, jnp.zeros((x.shape[0], *spec.out_spatial, g, m), x.dtype))
  return y.reshape(y.shape[:-2] + (c_out,))


def _valid_spec(in_spatial, kernel, dilation, groups):
  """The spec of a stride-1, unpadded conv (for formulations built on another)."""
  from cnn_jax.ops.conv import ConvSpec  # pylint: disable=import-outside-toplevel
  nd = len(kernel)
  out = tuple(n - shapes.effective_kernel(k, d) + 1
              for n, k, d in zip(in_spatial, kernel, dilation))
  return ConvSpec(nd, (1,) * nd, ((0, 0),) * nd, tuple(dilation), groups, tuple(in_spatial),
                  tuple(kernel), out)


# ----------------------------------------------------------------------------
# dL/dX
# ----------------------------------------------------------------------------

def input_grad_dilated(dy, w, spec):
  """dL/dX = dilate_S(dL/dY) (*) rot180(W)^T, padded (F_eff-1-lo, F_eff-1-hi+r)."""
  pads = []
  for k, d, (lo, hi), r in zip(spec.kernel, spec.dilation, spec.padding, spec.remainder):
    k_eff = shapes.effective_kernel(k, d)
    pads.append((k_eff - 1 - lo, k_eff - 1 - hi + r))
  return lax.conv_general_dilated(
      dy, rotate_kernel(w, spec.nd, spec.groups), window_strides=(1,) * spec.nd,
      padding=pads, lhs_dilation=spec.stride, rhs_dilation=spec.dilation,
      dimension_numbers=dimension_numbers(spec.nd), feature_group_count=spec.groups)


def input_grad_im2col(dy, w, spec):
  """The notes' dL/dX (as input_grad_dilated) with the convolution done by
  forward_im2col: dY dilated by the stride and padded (F_eff-1-lo, F_eff-1-hi+r)
  explicitly (lax.pad: interior padding dilates, negative padding crops), then
  correlated with rot180(W), channels swapped. Kept and tested; input_grad_col2im
  replaced it for small maps (2-100x faster there: its patch matrix is T times
  the dilated, padded dY, mostly zeros; benchmarks/README.md)."""
  pads = [(0, 0, 0)]
  for k, d, s_, (lo, hi), r in zip(spec.kernel, spec.dilation, spec.stride, spec.padding,
                                   spec.remainder):
    k_eff = shapes.effective_kernel(k, d)
    pads.append((k_eff - 1 - lo, k_eff - 1 - hi + r, s_ - 1))
  pads.append((0, 0, 0))
  g = lax.pad(dy, jnp.zeros((), dy.dtype), pads)
  inner = _valid_spec(g.shape[1:-1], spec.kernel, spec.dilation, spec.groups)
  return forward_im2col(g, rotate_kernel(w, spec.nd, spec.groups), inner)


def input_grad_col2im(dy, w, spec):
  """dL/dX as the transpose of forward_im2col: dcols = dY @ W^T (one GEMM giving,
  for every output position p and tap t, what p sends back through t), then
  col2im: each tap's columns are added into dXpad at p*S + t*D, and the forward
  padding is cropped. The same sums as the notes' formula (every dXpad[q]
  collects dY[p] W[t] over the (p, t) with p*S + t*D = q), grouped by tap.

  Each tap's placement is one lax.pad (low t*D, interior S-1); the T padded
  terms are added in one fused pass over dXpad. For maps smaller than the
  kernel window (1x1 maps under 3x3 or 5x5 kernels: LeNet-5's C5, ResNet's last
  stage at small inputs) this is a small GEMM plus T cheap passes, where XLA's
  CPU convolution takes its slow generic path and input_grad_im2col would build
  a patch matrix T times the size of dXpad.
  """
  nd, g = spec.nd, spec.groups
  n_taps = math.prod(spec.kernel)
  c_in_g, c_out = w.shape[-2], w.shape[-1]
  wt = w.reshape(n_taps, c_in_g, c_out).astype(dy.dtype)
  if g == 1:
    cols = jnp.einsum('...o,tio->...ti', dy, wt)              # (N, *out, T, C_in)
  else:
    dyg = dy.reshape(dy.shape[:-1] + (g, c_out // g))
    cols = jnp.einsum('...go,tigo->...tgi', dyg, wt.reshape(n_taps, c_in_g, g, c_out // g))
    cols = cols.reshape(cols.shape[:-2] + (g * c_in_g,))
  padded = [sz + lo + hi for sz, (lo, hi) in zip(spec.in_spatial, spec.padding)]
  zero = jnp.zeros((), cols.dtype)
  dxpad = None
  for i, tap in enumerate(_all_taps(spec.kernel)):
    cfg = [(0, 0, 0)]
    for t, d, s_, o, l in zip(tap, spec.dilation, spec.stride, spec.out_spatial, padded):
      cfg.append((t * d, l - (t * d + (o - 1) * s_ + 1), s_ - 1))
    cfg.append((0, 0, 0))
    term = lax.pad(cols[..., i, :], zero, cfg)
    dxpad = term if dxpad is None else dxpad + term
  crop = tuple(slice(lo, lo + sz) for sz, (lo, _) in zip(spec.in_spatial, spec.padding))
  return dxpad[(slice(None),) + crop]


def _phase(a, k, s, d, p_out, m_out):
  """One spatial dimension of input_grad_phases for residue a = q mod S.

  Returns (first tap, tap step, sub-kernel dilation, (pad_lo, pad_hi)) of the
  stride-1 correlation of dY that yields dXpad[m*S + a] for m < m_out, or None
  when no tap lands on residue a. Taps t with t*D = a (mod S) hit
  dXpad[q] from dY[(q - t*D)/S]; they are evenly spaced, S/gcd(S, D) apart.
  """
  g = math.gcd(s, d)
  first = next((t for t in range(k) if (t * d - a) % s == 0), None)
  if first is None:
    return None
  step = s // g
  count = len(range(first, k, step))
  dil = d // g                          # consecutive taps read dY this far apart
  j0 = (first * d - a) // s             # dY offset of the first tap
  lo = j0 + (count - 1) * dil
  return first, step, dil, (lo, m_out - p_out - j0)


def _xla_phase_conv(dy, sub, padding, dilation, groups):
  return lax.conv_general_dilated(
      dy, sub, window_strides=(1,) * (dy.ndim - 2), padding=padding,
      rhs_dilation=dilation, dimension_numbers=dimension_numbers(dy.ndim - 2),
      feature_group_count=groups)


def input_grad_phases(dy, w, spec, phase_conv=_xla_phase_conv):
  """dL/dX by sub-pixel phases: S^nd stride-1 convolutions, then interleave.

  dilate_S(dY) is mostly zeros; output positions q = m*S + a with the same
  residue a only ever meet the taps t with t*D = a (mod S), so each residue
  class is one small correlation of the undilated dY with those taps (rotated,
  channels swapped), and the classes interleave back into dXpad. Same sums as
  input_grad_dilated, without the multiplications by inserted zeros.
  """
  nd = spec.nd
  n = dy.shape[0]
  c_in = w.shape[-2] * spec.groups
  # (*k, C_out/g, C_in): channels swapped per group, not yet flipped.
  v = jnp.flip(rotate_kernel(w, nd, spec.groups), axis=tuple(range(nd)))
  l_pad = [sz + lo + hi for sz, (lo, hi) in zip(spec.in_spatial, spec.padding)]
  m_out = [shapes.ceil_div(l, s) for l, s in zip(l_pad, spec.stride)]
  phases = []
  for a in _all_taps(spec.stride):        # every residue vector a in [0, S)^nd
    dims = [_phase(ai, k, s, d, p, m) for ai, k, s, d, p, m in
            zip(a, spec.kernel, spec.stride, spec.dilation, spec.out_spatial, m_out)]
    if any(dm is None for dm in dims):
      phases.append(jnp.zeros((n, *m_out, c_in), dy.dtype))
      continue
    sub = v[tuple(slice(f, None, st) for f, st, _, _ in dims)]
    sub = jnp.flip(sub, axis=tuple(range(nd)))
    phases.append(phase_conv(dy, sub.astype(dy.dtype), [p for _, _, _, p in dims],
                             [dl for _, _, dl, _ in dims], spec.groups))
  # (S_1, ..., S_nd, N, *M, C) -> (N, M_1, S_1, ..., M_nd, S_nd, C) -> dXpad.
  out = jnp.stack(phases).reshape(*spec.stride, n, *m_out, c_in)
  perm = [nd] + [ax for i in range(nd) for ax in (nd + 1 + i, i)] + [2 * nd + 1]
  out = out.transpose(perm).reshape(n, *[m * s for m, s in zip(m_out, spec.stride)], c_in)
  crop = tuple(slice(lo, lo + sz) for sz, (lo, _) in zip(spec.in_spatial, spec.padding))
  return out[(slice(None),) + crop]


def input_grad_gemm(dy, w, spec):
  """1x1 kernels: dXpad[p*S] = dY[p] @ W^T (one GEMM), zeros elsewhere, cropped.

  lax.pad puts each row at p*S (interior padding S-1) and crops the forward's
  padding (negative low/high), all in one pass.
  """
  g = spec.groups
  c_in_g, c_out = w.shape[-2], w.shape[-1]
  lead = dy.shape[:-1]
  if g == 1:
    dx = (dy.reshape(-1, c_out) @ w.reshape(c_in_g, c_out).T.astype(dy.dtype))
  else:
    wg = w.reshape(c_in_g, g, c_out // g).astype(dy.dtype)
    dx = jnp.einsum('mgo,igo->mgi', dy.reshape(-1, g, c_out // g), wg)
  dx = dx.reshape(*lead, g * c_in_g)
  cfg = [(0, 0, 0)]
  for sz, (lo, _), s, p in zip(spec.in_spatial, spec.padding, spec.stride, spec.out_spatial):
    cfg.append((-lo, sz + lo - ((p - 1) * s + 1), s - 1))
  cfg.append((0, 0, 0))
  return lax.pad(dx, jnp.zeros((), dx.dtype), cfg)


# ----------------------------------------------------------------------------
# dL/dW
# ----------------------------------------------------------------------------

def weight_grad_correlation(x, dy, spec):
  """One XLA convolution: the batch axis becomes the contracted "feature" axis.

  X is read as (C_in as batch, spatial, N as features), dY as a kernel
  (spatial, N in, C_out out); window stride D and kernel dilation S walk the
  taps. Grouped convs use batch_group_count (C_in groups pair with C_out groups).
  """
  sp = _SPATIAL[spec.nd]
  dn = lax.conv_dimension_numbers(
      x.shape, dy.shape, (f'C{sp}N', f'I{sp}O', f'{sp}NC'))
  pads = [(lo, hi - r) for (lo, hi), r in zip(spec.padding, spec.remainder)]
  return lax.conv_general_dilated(
      x, dy, window_strides=spec.dilation, padding=pads,
      rhs_dilation=spec.stride, dimension_numbers=dn,
      batch_group_count=spec.groups)


def weight_grad_depthwise(x, dy, spec):
  """dW for depthwise convs (one input and one output channel per group):
  dW[t, 0, c] = sum_{n, p} Xpad[n, p*S + t*D, c] dY[n, p, c], per tap one fused
  multiply-and-reduce over batch and positions (the per-group GEMMs of im2col
  and correlation degenerate to dot products here). A lax.fori_loop over the
  taps keeps one reduce kernel whatever the kernel size (unrolled, a 7x7 took
  11.6 s to compile and ran 5x slower)."""
  n_taps = math.prod(spec.kernel)
  xpad = pad_input(x, spec)
  axes = tuple(range(dy.ndim - 1))

  def row(t, acc):
    win = _tap_window(xpad, t, spec)
    return lax.dynamic_update_index_in_dim(acc, jnp.sum(win * dy, axis=axes), t, 0)

  acc = lax.fori_loop(0, n_taps, row, jnp.zeros((n_taps, dy.shape[-1]), jnp.result_type(x, dy)))
  return acc.reshape(*spec.kernel, 1, dy.shape[-1])


def weight_grad_taps(x, dy, spec):
  """One GEMM per kernel tap: dW[t] = Xpad[tap t]^T @ dY over all N*positions."""
  g = spec.groups
  xpad = pad_input(x, spec)
  n = x.shape[0]
  c_in, c_out = x.shape[-1], dy.shape[-1]
  dy_g = dy.reshape(n, -1, g, c_out // g)
  taps = []
  for tap in _all_taps(spec.kernel):
    xs = tap_slice(xpad, tap, spec).reshape(n, -1, g, c_in // g)
    dw = jnp.einsum('npgi,npgo->igo', xs, dy_g)
    taps.append(dw.reshape(c_in // g, c_out))
  return jnp.stack(taps).reshape(*spec.kernel, c_in // g, c_out)


def _group_gemm(p, d, g):
  """p (T, C_in, M), d (M, C_out) -> (T, C_in/g, C_out): per-group P_g @ dY_g."""
  t, c_in, m = p.shape
  c_out = d.shape[-1]
  if g == 1:                   # the common case stays one plain 2-D GEMM
    return (p.reshape(t * c_in, m) @ d).reshape(t, c_in, c_out)
  pg = p.reshape(t, g, c_in // g, m)
  dg = d.reshape(m, g, c_out // g)
  out = jnp.einsum('tgim,mgo->tigo', pg, dg)
  return out.reshape(t, c_in // g, c_out)


def weight_grad_gemm(x, dy, spec):
  """1x1 kernels: dW = Xpad[p*S]^T @ dY, one GEMM over all N*positions."""
  (tap,) = _all_taps(spec.kernel)
  xs = tap_slice(pad_input(x, spec), tap, spec)
  c_in, c_out = x.shape[-1], dy.shape[-1]
  p = xs.reshape(-1, c_in).T[None]
  dw = _group_gemm(p, dy.reshape(-1, c_out), spec.groups)
  return dw.reshape(*spec.kernel, c_in // spec.groups, c_out)


def im2col_chunk(spec, batch: int, c_in: int, itemsize: int) -> int:
  """Images per weight_grad_im2col step: the largest divisor of the batch whose
  patch matrix fits IM2COL_BLOCK_BYTES (at least one image)."""
  per_image = math.prod(spec.kernel) * c_in * math.prod(spec.out_spatial) * itemsize
  best = 1
  for c in range(1, batch + 1):
    if batch % c == 0 and c * per_image <= IM2COL_BLOCK_BYTES:
      best = c
  return best


def weight_grad_im2col(x, dy, spec, chunk: int | None = None):
  """Blocked im2col: dW = sum over blocks of P_b @ dY_b, P_b the block's patches.

  X is moved to channels-first blocks (N/chunk, C_in, chunk, *Pin) once, so
  each block's patch matrix P_b (T * C_in, chunk * positions) is a stack of
  tap windows with no transpose; a lax.scan walks the batch `chunk` images at
  a time so P_b is built and consumed while it is still in cache (the whole-batch patch matrix is T times
  the input and would be written to and read back from memory).

  P_b is filled by a lax.fori_loop over the T taps: one dynamic_slice of the
  block at the tap's offset (t * D), a static strided slice (stride S) and a
  dynamic_update_slice into row block t, which XLA fuses into one kernel. The
  loop body is the same for every tap, so XLA compiles one window kernel
  whatever the kernel size; unrolling T static slices (the previous version)
  compiled one LLVM kernel per tap, ~50-100 ms each, 6-9 s at 11x11.
  """
  n = x.shape[0]
  c_in, c_out = x.shape[-1], dy.shape[-1]
  n_taps = math.prod(spec.kernel)
  if chunk is None:
    chunk = im2col_chunk(spec, n, c_in, x.dtype.itemsize)
  if n % chunk:
    raise ValueError(f'weight_grad_im2col: chunk {chunk} must divide the batch {n}.')
  # Blocks (N/chunk, C_in, chunk, *Pin): channels first, so a tap's window of
  # a block is already laid out as its rows of P_b. (With chunk == 1 the
  # transpose is the plain 4-D one: the 5-D form compiled measurably slower.)
  xpad = pad_input(x, spec)
  if chunk == 1:
    xs = jnp.moveaxis(xpad, -1, 1)[:, :, None]
  else:
    xs = jnp.moveaxis(xpad.reshape(n // chunk, chunk, *xpad.shape[1:]), -1, 1)
  ds = dy.reshape(n // chunk, chunk * math.prod(spec.out_spatial), c_out)
  # Extent of Xpad one tap's window covers: (O - 1) * S + 1 along each axis.
  span = [(o - 1) * s + 1 for o, s in zip(spec.out_spatial, spec.stride)]

  def tap_window(xb, t):
    """(C_in, chunk, *O): Xpad[p*S + tap*D] for flat tap index t (traced)."""
    zero = jnp.zeros_like(t)                 # the loop index's int type (x64 aware)
    win = lax.dynamic_slice(xb, [zero, zero] + _tap_offsets(t, spec), (c_in, chunk, *span))
    return lax.slice(win, [0] * win.ndim, win.shape, (1, 1, *spec.stride))

  def step(carry, block):
    acc, p = carry
    xb, db = block                                     # (C_in, chunk, *Pin), (M, C_out)

    def fill(t, p):
      return lax.dynamic_update_slice(
          p, tap_window(xb, t)[None], [t] + [jnp.zeros_like(t)] * (spec.nd + 2))

    p = lax.fori_loop(0, n_taps, fill, p)
    dw = _group_gemm(p.reshape(n_taps, c_in, -1), db, spec.groups)   # P_b (T, C_in, M)
    return (acc + dw.astype(acc.dtype), p), None

  acc = jnp.zeros((n_taps, c_in // spec.groups, c_out), jnp.result_type(x, dy))
  # P_b's buffer is carried through the scan: every tap overwrites its own rows,
  # so it is zeroed once, not once per block (that zero fill cost as much as a
  # fifth of the whole dW at 32x32x16).
  p0 = jnp.zeros((n_taps, c_in, chunk, *spec.out_spatial), x.dtype)
  (acc, _), _ = lax.scan(step, (acc, p0), (xs, ds))
  return acc.reshape(*spec.kernel, c_in // spec.groups, c_out)


def weight_grad_im2col_unrolled(x, dy, spec, chunk: int | None = None):
  """The previous weight_grad_im2col: the same blocks and GEMMs, but P_b is a
  Python-unrolled stack of T static tap slices. Same run time, but XLA compiles
  one kernel per tap (compile time grows with T: 9 s at 11x11). Kept for the
  benchmarks' before/after comparison and tested like the others."""
  n = x.shape[0]
  c_in, c_out = x.shape[-1], dy.shape[-1]
  taps = _all_taps(spec.kernel)
  if chunk is None:
    chunk = im2col_chunk(spec, n, c_in, x.dtype.itemsize)
  if n % chunk:
    raise ValueError(f'weight_grad_im2col: chunk {chunk} must divide the batch {n}.')
  xt = jnp.moveaxis(pad_input(x, spec), -1, 1)          # (N, C_in, *Pin)
  xs = xt.reshape(n // chunk, chunk, *xt.shape[1:])
  ds = dy.reshape(n // chunk, chunk * math.prod(spec.out_spatial), c_out)

  def step(acc, block):
    xb, db = block                                     # (chunk, C_in, *Pin), (M, C_out)
    p = jnp.stack([tap_slice(xb, t, spec, first_spatial_axis=2) for t in taps], 1)
    p = jnp.moveaxis(p, 0, 2).reshape(len(taps), c_in, -1)   # (T, C_in, M)
    return acc + _group_gemm(p, db, spec.groups).astype(acc.dtype), None

  acc = jnp.zeros((len(taps), c_in // spec.groups, c_out), jnp.result_type(x, dy))
  acc, _ = lax.scan(step, acc, (xs, ds))
  return acc.reshape(*spec.kernel, c_in // spec.groups, c_out)


def _xla_forward(x, w, spec):
  return lax.conv_general_dilated(
      x, w, spec.stride, spec.padding, rhs_dilation=spec.dilation,
      dimension_numbers=dimension_numbers(spec.nd), feature_group_count=spec.groups)


def _weight_grad_native_cpu(x, dy, spec):
  if native.available() and native.supports_weight_grad(x, dy, spec):
    return native._call_weight_grad(x, dy, spec)
  return weight_grad_im2col(x, dy, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def weight_grad_native(x, dy, spec):
  """dW by the native CPU kernel (cnn_jax/ops/native.py): the correlation of
  Xpad with dY summed in AVX-512 register tiles, no patch matrix. On other
  platforms, other dtypes or CPUs without the kernel, weight_grad_im2col."""
  return lax.platform_dependent(
      x, dy, cpu=functools.partial(_weight_grad_native_cpu, spec=spec),
      default=functools.partial(weight_grad_im2col, spec=spec))


def _weight_grad_native_fwd(x, dy, spec):
  return weight_grad_native(x, dy, spec), (x, dy)


def _weight_grad_native_bwd(spec, res, g):
  # dW is bilinear in (X, dY). For a cotangent G of dW: the X part is the input
  # gradient of a convolution with kernel G, the dY part the forward
  # convolution of X with G. Both are ordinary (differentiable) JAX, so grad
  # of grad works as it does without the native kernel.
  x, dy = res
  dx = input_grad(dy, g.astype(dy.dtype), spec).astype(x.dtype)
  ddy = _xla_forward(x, g.astype(x.dtype), spec).astype(dy.dtype)
  return dx, ddy


weight_grad_native.defvjp(_weight_grad_native_fwd, _weight_grad_native_bwd)


def _forward_native_cpu(x, w, spec):
  if native.available() and native.supports_forward(x, w, spec):
    return native._call_forward(x, w, spec.stride, spec.padding)
  return _xla_forward(x, w, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def forward_native(x, w, spec):
  """Y by the native CPU kernel (cnn_jax/ops/native.py): register tiles of
  positions x output channels over the kernel rows' contiguous (tap, channel)
  runs of Xpad, no patch matrix. Elsewhere, XLA's convolution."""
  return lax.platform_dependent(
      x, w, cpu=functools.partial(_forward_native_cpu, spec=spec),
      default=functools.partial(_xla_forward, spec=spec))


def _forward_native_fwd(x, w, spec):
  return forward_native(x, w, spec), (x, w)


def _forward_native_bwd(spec, res, g):
  # The convolution's own backward (only reached when differentiating a
  # backward pass again, e.g. grad of grad).
  x, w = res
  return (input_grad(g, w, spec).astype(x.dtype), weight_grad(x, g, spec).astype(w.dtype))


forward_native.defvjp(_forward_native_fwd, _forward_native_bwd)


def native_input_grad_padding(spec):
  """The padding of dY that makes dX a stride-1 convolution with rot180(W)^T:
  (F - 1 - P_lo) before and whatever reaches the input size after."""
  pads = []
  for n, o, k, (lo, _) in zip(spec.in_spatial, spec.out_spatial, spec.kernel, spec.padding):
    before = k - 1 - lo
    pads.append((before, n + k - 1 - o - before))
  return tuple(pads)


def _native_phase_conv(dy, sub, padding, dilation, groups):
  """One phase of input_grad_phases on the native forward kernel (stride 1);
  a negative padding (a phase whose window overhangs dY's end) crops first."""
  crop = tuple(slice(max(0, -lo), dy.shape[1 + i] - max(0, -hi))
               for i, (lo, hi) in enumerate(padding))
  dy = dy[(slice(None),) + crop]
  pads = tuple((max(0, lo), max(0, hi)) for lo, hi in padding)
  return native._call_forward(dy, sub, (1, 1), pads)


def _input_grad_native_cpu(dy, w, spec):
  if native.available() and native.supports_input_grad(dy, w, spec):
    if spec.stride == (1, 1):
      return native._call_forward(dy, rotate_kernel(w, spec.nd, spec.groups), (1, 1),
                                  native_input_grad_padding(spec))
    return input_grad_phases(dy, w, spec, phase_conv=_native_phase_conv)
  return input_grad_dilated(dy, w, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def input_grad_native(dy, w, spec):
  """dX by the native forward kernel, as the notes write it: the convolution of
  the padded dY with the flipped, channel-swapped kernel; at stride S > 1 one
  such convolution per sub-pixel phase (input_grad_phases: the zeros that
  dilate_S inserts are never multiplied). Elsewhere, input_grad_dilated (the
  same formula through XLA)."""
  return lax.platform_dependent(
      dy, w, cpu=functools.partial(_input_grad_native_cpu, spec=spec),
      default=functools.partial(input_grad_dilated, spec=spec))


def _input_grad_native_fwd(dy, w, spec):
  return input_grad_native(dy, w, spec), (dy, w)


def _input_grad_native_bwd(spec, res, g):
  # dX is bilinear in (dY, W): for a cotangent G of dX, the dY part is the
  # forward convolution of G with W and the W part the weight gradient with
  # G as the input.
  dy, w = res
  ddy = _xla_forward(g.astype(w.dtype), w, spec).astype(dy.dtype)
  dw = weight_grad(g.astype(dy.dtype), dy, spec).astype(w.dtype)
  return ddy, dw


input_grad_native.defvjp(_input_grad_native_fwd, _input_grad_native_bwd)


# ----------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------

INPUT_GRADS = {
    'dilated': input_grad_dilated,
    'phases': input_grad_phases,
    'gemm': input_grad_gemm,
    'im2col': input_grad_im2col,
    'col2im': input_grad_col2im,
    'native': input_grad_native,
}

FORWARDS = {
    'xla': None,               # lax.conv_general_dilated (cnn_jax.ops.conv.forward)
    'im2col': forward_im2col,
    'depthwise': forward_depthwise,
    'native': forward_native,
}

WEIGHT_GRADS = {
    'correlation': weight_grad_correlation,
    'taps': weight_grad_taps,
    'gemm': weight_grad_gemm,
    'im2col': weight_grad_im2col,
    'im2col_unrolled': weight_grad_im2col_unrolled,
    'depthwise': weight_grad_depthwise,
    'native': weight_grad_native,
}


def _is_1x1(spec) -> bool:
  return all(k == 1 for k in spec.kernel)


def _smaller_than_window(spatial, spec) -> bool:
  """Some spatial size below the (dilated) kernel's extent: XLA's slow path."""
  return any(n < shapes.effective_kernel(k, d)
             for n, k, d in zip(spatial, spec.kernel, spec.dilation))


def _one_channel_per_group(spec) -> bool:
  """Each group reads one input channel (depthwise convs; 1-channel inputs)."""
  return spec.channels[0] == spec.groups


# Below this many input channels per group, XLA's dX convolution (which produces
# the C_in channels) runs far under its GEMM speed and col2im wins: LeNet-5's C3
# (6 channels) 7.2 vs 11.5 ms, 4 channels 8.2 vs 25.9 ms; at 8 and 16 channels
# XLA's is faster again (benchmarks/README.md).
COL2IM_MAX_IN_CHANNELS = 6
# ... and up to 7x7 kernels: col2im adds one shifted copy per tap, unrolled. At
# 11x11 (AlexNet's conv1, 3 channels) it ran no faster than XLA's (348 vs 338
# ms) and took 3.0 s to compile against 0.4; at 7x7 s2 it ran 207 vs 440 ms.
COL2IM_MAX_TAPS = 49


def _few_input_channels(spec) -> bool:
  return (0 < spec.channels[0] // spec.groups <= COL2IM_MAX_IN_CHANNELS
          and math.prod(spec.kernel) <= COL2IM_MAX_TAPS)


# The native forward kernel (and dX through it) beats or ties XLA's CPU
# convolution up to 256 reduction channels; at 512 (ResNet-18's last stage) XLA's
# was faster (benchmarks/README.md, "Session 7").
NATIVE_MAX_REDUCTION_CHANNELS = 256


def _native_class(spec) -> bool:
  """2-D, ungrouped, undilated, kernel larger than 1x1: the native kernels' class."""
  return (spec.nd == 2 and spec.groups == 1 and spec.dilation == (1, 1)
          and not _is_1x1(spec))


def forward_rule(spec) -> str:
  """Name of the forward formulation for this shape class (see module docstring)."""
  if (_native_class(spec) and spec.channels[0] <= NATIVE_MAX_REDUCTION_CHANNELS
      and native.available()):
    return 'native'
  if not _is_1x1(spec) and _one_channel_per_group(spec):
    return 'depthwise'
  if spec.nd > 1 and not _is_1x1(spec) and _smaller_than_window(spec.in_spatial, spec):
    return 'im2col'
  return 'xla'


def input_grad_rule(spec) -> str:
  """Name of the dL/dX formulation for this shape class (see module docstring)."""
  if _is_1x1(spec) and spec.groups == 1:
    return 'gemm'
  # col2im first: with few input channels or a dY smaller than the window, the
  # convolution of the padded dY (native or XLA's) mostly multiplies zeros or
  # fills a fraction of its vectors (LeNet's C3: col2im 3.1 ms, native 5.1).
  if not _is_1x1(spec) and _few_input_channels(spec):
    return 'col2im'
  if spec.nd > 1 and not _is_1x1(spec) and _smaller_than_window(spec.out_spatial, spec):
    return 'col2im'
  if (_native_class(spec) and spec.channels[1] <= NATIVE_MAX_REDUCTION_CHANNELS
      and (spec.stride != (1, 1)
           or all(a >= 0 and b >= 0 for a, b in native_input_grad_padding(spec)))
      and native.available()):
    return 'native'
  return 'dilated'


def weight_grad_rule(spec) -> str:
  """Name of the dL/dW formulation for this shape class (see module docstring)."""
  if _is_1x1(spec):
    return 'gemm'
  if spec.channels[0] == spec.channels[1] == spec.groups:
    return 'depthwise'
  if spec.nd == 1 and spec.groups == 1:
    return 'correlation'
  # Maps smaller than the window (GoogLeNet's 2x2 at 64x64 input): most of each
  # position's run is padding, and one im2col GEMM over the whole batch was
  # ~2x faster (0.64 vs 1.20 ms at 8x2x2x160, 3x3 -> 320).
  if (_native_class(spec) and not _smaller_than_window(spec.in_spatial, spec)
      and native.available()):
    return 'native'
  return 'im2col'


def input_grad(dy, w, spec):
  """dL/dX by the formulation chosen for this shape class (all exact)."""
  return INPUT_GRADS[input_grad_rule(spec)](dy, w, spec)


def weight_grad(x, dy, spec):
  """dL/dW by the formulation chosen for this shape class (all exact)."""
  return WEIGHT_GRADS[weight_grad_rule(spec)](x, dy, spec)
