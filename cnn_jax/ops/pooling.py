"""Pooling with its backward pass written out, as in the notes.

Every windowed pool slides a window of F cells with stride S over the padded
input and reduces each window to one number; per spatial dimension the output
size is the conv rule W2 = floor((W1 - F + P_lo + P_hi) / S) + 1, which with no
padding is seed 002's (n_h - f)/s + 1. Channels are pooled independently.

Write R(o) for the cells of window o (t a tap offset inside the window, taps in
row-major order) and Xpad for the padded input. Then, for every channel:

    max:  Y[o] = max_{t} Xpad[o*S + t]
          dX[q] = sum_{o : q = argmax of window o} dY[o]          (routing)
    sum:  Y[o] = sum_{t} Xpad[o*S + t]
          dX[q] = sum_{o : q in R(o)} dY[o]                        (spreading)
    avg:  sum / |R(o)|, so dX[q] = sum_{o : q in R(o)} dY[o] / |R(o)|
    Lp:   Y[o] = (sum_{t} |Xpad[o*S + t]|^p)^(1/p)
          dX[q] = x_q |x_q|^(p-2) * sum_{o : q in R(o)} dY[o] / Y[o]^(p-1)

The sums over o are where overlapping windows (F > S, e.g. AlexNet's 3x3 stride
2) add their contributions. Routing scatter-adds dY at the argmax indices
("switches") that the forward pass records. Spreading is the transpose of the
sum pool, i.e. a transposed convolution with a ones kernel: at unit stride a
ones-kernel correlation of dY padded (F - 1 - P_lo, F - 1 - P_hi + r), as in
conv's dL/dX (see conv.py); with a stride, dY placed once per tap.

Tie rule for max (max_pool, max_pool_with_argmax, global_max_pool and
spatial_pyramid_pool): the FIRST maximum of a window in row-major window order
takes the whole dY of that window, so every window has exactly one winner and
sum(dX) == sum(dY). `jax.grad` of `lax.reduce_window(..., lax.max, ...)` may
split or place tied gradients differently; the two agree on tie-free inputs.
NaN counts as a maximum (the first NaN wins), as in `np.argmax`.

All ops are channels-last: x (N, *spatial, C) with 1, 2 or 3 spatial dimensions.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_jax.ops import native, shapes


# Every public op below validates in Python, then calls a jax.jit-compiled core
# keyed on its static spec. Under an outer jit that nesting is free; called
# eagerly (or under eager jax.grad) it makes the op one compiled program instead
# of dozens of separately dispatched per-tap slices and pads.


class PoolSpec(NamedTuple):
  """Static description of one windowed pool (hashable, so it can key jit caches)."""
  nd: int
  window: Tuple[int, ...]
  stride: Tuple[int, ...]
  padding: Tuple[Tuple[int, int], ...]
  in_spatial: Tuple[int, ...]
  out_spatial: Tuple[int, ...]

  @property
  def remainder(self) -> Tuple[int, ...]:
    """Padded rows/columns past the last window (r in the spreading padding)."""
    return tuple(shapes.stride_remainder(n, k, s, lo, hi) for n, k, s, (lo, hi)
                 in zip(self.in_spatial, self.window, self.stride, self.padding))

  @property
  def taps(self):
    """Offsets inside the window, in row-major order (the tie-break order)."""
    return itertools.product(*(range(k) for k in self.window))


def make_spec(x_shape, window, stride=None, padding='VALID', *,
              op: str = 'pool') -> PoolSpec:
  """Validates a pool's arguments and resolves them to a PoolSpec.

  Raises ValueError, before any compute, for a wrong rank, a zero window or
  stride, a window larger than the padded input, or padding so wide that some
  window would hold no input cell at all (its max/average would be undefined).
  """
  nd = shapes.spatial_dims(len(x_shape), op=op)
  window = shapes.as_tuple(window, nd, 'window', op=op)
  shapes.check_positive(window, 'window', op=op)
  stride = window if stride is None else shapes.as_tuple(stride, nd, 'stride', op=op)
  shapes.check_positive(stride, 'stride', op=op)
  in_spatial = tuple(int(n) for n in x_shape[1:-1])
  ones = (1,) * nd
  pads = shapes.resolve_padding(padding, in_spatial, window, stride, ones, op=op)
  out_spatial = shapes.output_spatial(in_spatial, window, stride, pads, ones, op=op)
  for i, (n, k, s, (lo, hi), out) in enumerate(
      zip(in_spatial, window, stride, pads, out_spatial)):
    if lo >= k or (out - 1) * s >= lo + n:
      raise ValueError(
          f'{op}: padding ({lo}, {hi}) in spatial dimension {i} leaves a window '
          f'made only of padding (input {n}, window {k}, stride {s}, output {out}); '
          f'every window must overlap the input: need P_lo < F ({lo} < {k}) and '
          f'(W2 - 1)*S < P_lo + W1 (({out} - 1)*{s} < {lo} + {n}). Use less padding '
          f'(at most F - 1 per side, e.g. "SAME" or "FULL").')
  return PoolSpec(nd, window, stride, pads, in_spatial, out_spatial)


# ----------------------------------------------------------------------------
# Static helpers: everything here is NumPy or lax on shapes known at trace time.
# ----------------------------------------------------------------------------

def _lowest(dtype):
  """The pad value that never wins a max."""
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.inexact):
    return np.array(-np.inf, dtype)
  if dtype == np.bool_:
    return np.array(False)
  return np.array(np.iinfo(dtype).min, dtype)


def _window_args(spec: PoolSpec):
  return ((1,) + spec.window + (1,), (1,) + spec.stride + (1,),
          ((0, 0),) + spec.padding + ((0, 0),))


def _reduce(x, spec: PoolSpec, init, computation):
  dims, strides, pads = _window_args(spec)
  return lax.reduce_window(x, np.asarray(init, x.dtype), computation, dims, strides, pads)


def _pad_input(x, spec: PoolSpec, value):
  config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in spec.padding] + [(0, 0, 0)]
  return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _tap(xpad, t, spec: PoolSpec):
  """Xpad[:, p*S + t, :] for every output position p: one strided slice."""
  start = (0,) + tuple(t) + (0,)
  limit = ((xpad.shape[0],)
           + tuple(ti + (o - 1) * s + 1 for ti, o, s in zip(t, spec.out_spatial, spec.stride))
           + (xpad.shape[-1],))
  return lax.slice(xpad, start, limit, (1,) + spec.stride + (1,))


def _place(g, t, spec: PoolSpec):
  """Transpose of `_tap` cropped to the unpadded input: g[p] lands on p*S + t - P_lo.

  Interior padding S - 1 spaces the values S apart; the (possibly negative)
  edge padding shifts them by t and crops the input padding in the same op.
  """
  config = [(0, 0, 0)]
  for ti, n, o, s, (lo, _) in zip(t, spec.in_spatial, spec.out_spatial, spec.stride,
                                  spec.padding):
    config.append((ti - lo, lo + n - ti - (o - 1) * s - 1, s - 1))
  config.append((0, 0, 0))
  return lax.pad(g, jnp.zeros((), g.dtype), config)


def _tap_positions(t, spec: PoolSpec):
  """Per dimension, the unpadded input coordinate p*S + t - P_lo of tap t."""
  return [np.arange(o) * s + ti - lo
          for ti, o, s, (lo, _) in zip(t, spec.out_spatial, spec.stride, spec.padding)]


def _outer(vectors, combine):
  """Broadcast per-dimension vectors to (1, *out_spatial, 1) and combine them."""
  nd = len(vectors)
  result = None
  for d, v in enumerate(vectors):
    shape = [1] * (nd + 2)
    shape[d + 1] = len(v)
    v = np.reshape(v, shape)
    result = v if result is None else combine(result, v)
  return result


def _tap_valid(t, spec: PoolSpec):
  """Bool (1, *out, 1): where tap t reads an input cell rather than padding."""
  return _outer([(pos >= 0) & (pos < n) for pos, n
                 in zip(_tap_positions(t, spec), spec.in_spatial)], np.logical_and)


def _tap_index(t, spec: PoolSpec):
  """int32 (1, *out, 1): row-major flat input index of tap t (clipped in padding)."""
  strides = np.cumprod((1,) + spec.in_spatial[:0:-1])[::-1]
  parts = [np.clip(pos, 0, n - 1) * st for pos, n, st
           in zip(_tap_positions(t, spec), spec.in_spatial, strides)]
  return _outer(parts, np.add).astype(np.int32)


def _valid_counts(spec: PoolSpec):
  """(1, *out, 1): the number of input (non-padding) cells in each window."""
  counts = []
  for n, k, s, o, (lo, _) in zip(spec.in_spatial, spec.window, spec.stride,
                                 spec.out_spatial, spec.padding):
    start = np.arange(o) * s
    counts.append(np.minimum(start + k, lo + n) - np.maximum(start, lo))
  return _outer(counts, np.multiply)


def _divisor(spec: PoolSpec, count_include_pad: bool):
  if count_include_pad:
    return float(math.prod(spec.window))
  return _valid_counts(spec).astype(np.float64)


def _spread(g, spec: PoolSpec):
  """dX[q] = sum_{p : q in R(p)} g[p]: the sum pool's transpose.

  With unit strides this is a ones-kernel correlation of g padded
  (F-1-P_lo, F-1-P_hi+r), conv's dL/dX rule (make_spec keeps both pads >= 0).
  With a stride that correlation would run over the S-dilated g, mostly zeros;
  placing g once per tap (an interior-padded lax.pad each) does the same sum
  several times faster on CPU (3-12x measured for 3x3 stride 2).
  """
  if all(s == 1 for s in spec.stride):
    config = [(0, 0, 0)]
    for k, (lo, hi), r in zip(spec.window, spec.padding, spec.remainder):
      config.append((k - 1 - lo, k - 1 - hi + r, 0))
    config.append((0, 0, 0))
    gp = lax.pad(g, jnp.zeros((), g.dtype), config)
    ones = (1,) * (spec.nd + 2)
    return lax.reduce_window(gp, np.zeros((), g.dtype), lax.add,
                             (1,) + spec.window + (1,), ones, 'VALID')
  dx = None
  for t in spec.taps:
    part = _place(g, t, spec)
    dx = part if dx is None else dx + part
  return dx


def _argmax_forward(x, spec: PoolSpec):
  """Running first-max over the taps: (Y, flat input index of the winner).

  A tap replaces the running winner only if strictly greater (or the first
  NaN), so the earliest maximum in row-major window order keeps the window.
  """
  xpad = _pad_input(x, spec, _lowest(x.dtype))
  y = None
  switches = None
  # Validity is static, so which windows have seen an input cell is NumPy.
  seen = np.zeros((1,) + spec.out_spatial + (1,), bool)
  for t in spec.taps:
    cand = _tap(xpad, t, spec)
    idx = _tap_index(t, spec)
    valid = _tap_valid(t, spec)
    if y is None:
      y = cand
      switches = jnp.broadcast_to(jnp.asarray(idx), cand.shape)
      seen = valid
      continue
    take = cand > y
    if jnp.issubdtype(cand.dtype, jnp.inexact):
      take = take | (jnp.isnan(cand) & ~jnp.isnan(y))
    if not seen.all():
      take = take | ~seen
    if not valid.all():
      take = take & valid
    seen = seen | valid
    y = jnp.where(take, cand, y)
    switches = jnp.where(take, idx, switches)
  return y, switches


def _scatter_add(values, switches, out_spatial, mode, use_native):
  """Out[n, q, c] = sum_{p : switches[n, p, c] = q} values[n, p, c].

  On CPU with the native kernels (float32 values, int32 switches), a loop over
  each image's windows (cnn_jax/ops/csrc/pool_cpu.cc): XLA's scatter builds a
  (batch, index, channel) tuple per element in memory, which cost LeNet's S2
  5.6 of its 6.5 ms backward. Elsewhere one XLA scatter-add over C-contiguous
  rows (on CPU it beats a per-tap placement of masked dY by 2-5x once windows
  overlap). Switches outside the output are dropped by both ('drop'), or
  promised absent ('promise_in_bounds'). `use_native` is `_routing()` taken
  when the op was called: a static argument of the jitted ops, so tracing under
  `native.disabled()` gets its own compiled program.
  """
  n, c = values.shape[0], values.shape[-1]
  v3 = values.reshape(n, -1, c)
  s3 = switches.reshape(n, -1, c)
  q = math.prod(out_spatial)
  xla = functools.partial(_scatter_add_xla, q=q, mode=mode)
  if use_native and native.supports_scatter_add_rows(v3, s3):
    out = lax.platform_dependent(v3, s3, cpu=functools.partial(_scatter_add_native, q=q),
                                 default=xla)
  else:
    out = xla(v3, s3)
  return out.reshape((n,) + tuple(out_spatial) + (c,))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _scatter_add_native(v3, s3, q):
  return native._call_scatter_add_rows(v3, s3, q)


@_scatter_add_native.defjvp
def _scatter_add_native_jvp(q, primals, tangents):
  # Linear in the values (the integer switches have no tangent); the transpose
  # of the tangent map is the gather of XLA's scatter, so grad of grad works.
  v3, s3 = primals
  dv, _ = tangents
  return (_scatter_add_native(v3, s3, q),
          _scatter_add_xla(dv, s3, q=q, mode='drop'))


def _scatter_add_xla(v3, s3, *, q, mode):
  n, c = v3.shape[0], v3.shape[-1]
  batch = jnp.arange(n, dtype=jnp.int32)[:, None, None]
  channel = jnp.arange(c, dtype=jnp.int32)[None, None, :]
  if mode == 'drop':
    # jnp indexing wraps negative indices (-1 is the last cell) before the
    # mode applies; a negative switch is outside the output and is dropped.
    s3 = jnp.where(s3 < 0, q, s3)
  out = jnp.zeros((n, q, c), v3.dtype)
  return out.at[batch, s3, channel].add(v3, mode=mode)


# ----------------------------------------------------------------------------
# Max pooling
# ----------------------------------------------------------------------------

def _routing() -> bool:
  """Whether max pooling's backward routes through the native kernel (decided
  when the op is called, like the convolution's rule)."""
  return native.available()


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, spec, use_native):
  return _reduce(x, spec, _lowest(x.dtype), lax.max)


def _max_pool_fwd(x, spec, use_native):
  # When differentiating, record the switches (int32, the size of Y) instead
  # of keeping x and y for the backward pass.
  return _argmax_forward(x, spec)


def _max_pool_bwd(spec, use_native, switches, dy):
  # make_spec guarantees every window has an input cell, and padding never
  # wins, so every switch is in range.
  return (_scatter_add(dy, switches, spec.in_spatial, 'promise_in_bounds', use_native),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
_max_pool_jit = jax.jit(_max_pool, static_argnums=(1, 2))


def max_pool(x, window, stride=None, padding='VALID'):
  """Max pooling with an explicit, switch-routing backward.

  Args:
    x: (N, *spatial, C) with 1, 2 or 3 spatial dimensions.
    window: int or one int per spatial dimension (F).
    stride: int or per-dimension ints (S); defaults to `window` (non-overlapping).
    padding: 'VALID', 'SAME', 'FULL', an int, per-dimension ints or (lo, hi)
      pairs, as in `shapes.resolve_padding`. Padded cells hold -inf, so they
      never win; every window must still overlap the input.

  Returns:
    Y, (N, *out_spatial, C): Y[p] = max_{t in window} Xpad[p*S + t], with
    out = floor((W1 - F + P_lo + P_hi)/S) + 1.

  Backward (jax.custom_vjp):
    dL/dX[q] = sum over windows p whose maximum sits at q of dL/dY[p]
    (the forward pass records each window's argmax, its "switch", and the
    backward scatter-adds dL/dY there). Ties: the first maximum in row-major
    window order takes all of dL/dY[p] (one winner per window, so
    sum(dL/dX) = sum(dL/dY)); overlapping windows that share a maximum add
    their gradients there. jax.grad of lax.reduce_window max can differ from
    this on ties only.
  """
  spec = make_spec(x.shape, window, stride, padding, op='max_pool')
  return _max_pool_jit(x, spec, _routing())


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_argmax(x, spec, use_native):
  return _argmax_forward(x, spec)


def _max_pool_argmax_fwd(x, spec, use_native):
  y, switches = _argmax_forward(x, spec)
  return (y, switches), switches


def _max_pool_argmax_bwd(spec, use_native, switches, cotangents):
  dy, _ = cotangents        # the integer switches carry no gradient
  return (_scatter_add(dy, switches, spec.in_spatial, 'promise_in_bounds', use_native),)


_max_pool_argmax.defvjp(_max_pool_argmax_fwd, _max_pool_argmax_bwd)
_max_pool_argmax_jit = jax.jit(_max_pool_argmax, static_argnums=(1, 2))


def max_pool_with_argmax(x, window, stride=None, padding='VALID'):
  """Max pooling that also returns the "switches" of Zeiler & Fergus' deconvnet.

  Args:
    x, window, stride, padding: as in `max_pool`.

  Returns:
    (Y, switches): Y as `max_pool(x, window, stride, padding)`; switches, int32
    of Y's shape, hold the row-major flat index, into the example's UNPADDED
    input spatial positions (0 <= index < prod(spatial)), of the cell each
    window took its maximum from, separately per example and channel. Ties go
    to the first maximum in row-major window order; padding never wins.

  Backward (jax.custom_vjp): dL/dX = max_unpool(dL/dY, switches, spatial), i.e.
  dL/dX[q] = sum_{p : switches[p] = q} dL/dY[p]; the same routing as max_pool.
  """
  spec = make_spec(x.shape, window, stride, padding, op='max_pool_with_argmax')
  return _max_pool_argmax_jit(x, spec, _routing())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _max_unpool(y, switches, out_spatial, use_native):
  return _scatter_add(y, switches, out_spatial, 'drop', use_native)


def _max_unpool_fwd(y, switches, out_spatial, use_native):
  return _max_unpool(y, switches, out_spatial, use_native), switches


def _max_unpool_bwd(out_spatial, use_native, switches, g):
  n, c = g.shape[0], g.shape[-1]
  g3 = g.reshape(n, -1, c)
  s3 = switches.reshape(n, -1, c)
  dy = jnp.take_along_axis(g3, s3, axis=1, mode='fill', fill_value=0)
  return dy.reshape(switches.shape), None


_max_unpool.defvjp(_max_unpool_fwd, _max_unpool_bwd)
_max_unpool_jit = jax.jit(_max_unpool, static_argnums=(2, 3))


def max_unpool(y, switches, output_spatial_shape):
  """Max unpooling: put pooled values back where their maxima came from.

  The deconvnet's unpooling (Zeiler & Fergus 2014; seed 000): with switches
  from `max_pool_with_argmax`, every value returns to the input position that
  won its window, and all other positions are zero.

  Args:
    y: (N, *pooled_spatial, C) values to unpool (e.g. pooled activations, or a
      reconstruction travelling down a deconvnet).
    switches: integer array of y's shape, flat row-major indices into
      `output_spatial_shape`, as returned by `max_pool_with_argmax`. Indices
      outside [0, prod(output_spatial_shape)) are dropped.
    output_spatial_shape: spatial shape of the unpooled output (the pooled
      input's spatial shape), one int per spatial dimension.

  Returns:
    (N, *output_spatial_shape, C) with Out[q] = sum_{p : switches[p] = q} y[p]
    (overlapping windows that chose the same cell add up there).

  Backward (jax.custom_vjp): dL/dy[p] = dL/dOut[switches[p]], a gather; the
  switches get no gradient.
  """
  op = 'max_unpool'
  nd = shapes.spatial_dims(y.ndim, op=op)
  if tuple(switches.shape) != tuple(y.shape):
    raise ValueError(
        f'{op}: switches must have the same shape as the values to unpool (one '
        f'index per pooled value); got values {tuple(y.shape)} and switches '
        f'{tuple(switches.shape)}.')
  if not jnp.issubdtype(switches.dtype, jnp.integer):
    raise ValueError(
        f'{op}: switches must be integer flat indices (from max_pool_with_argmax), '
        f'got dtype {switches.dtype}.')
  out_spatial = shapes.as_tuple(output_spatial_shape, nd, 'output_spatial_shape', op=op)
  shapes.check_positive(out_spatial, 'output_spatial_shape', op=op)
  return _max_unpool_jit(y, switches, out_spatial, _routing())


# ----------------------------------------------------------------------------
# Sum and average pooling
# ----------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _scaled_sum_pool(x, spec, divide):
  """divide: None (sum pool), 'window' (avg over F cells) or 'valid' (non-pad)."""
  y = _reduce(x, spec, 0, lax.add)
  if divide is not None:
    y = y / jnp.asarray(_divisor(spec, divide == 'window'), y.dtype)
  return y


def _scaled_sum_pool_fwd(x, spec, divide):
  return _scaled_sum_pool(x, spec, divide), None


def _scaled_sum_pool_bwd(spec, divide, _, dy):
  if divide is not None:
    dy = dy / jnp.asarray(_divisor(spec, divide == 'window'), dy.dtype)
  return (_spread(dy, spec),)


_scaled_sum_pool.defvjp(_scaled_sum_pool_fwd, _scaled_sum_pool_bwd)
_scaled_sum_pool_jit = jax.jit(_scaled_sum_pool, static_argnums=(1, 2))


def _check_bool(value, what, op):
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{op}: {what} must be True or False, got {value!r}.')


def sum_pool(x, window, stride=None, padding='VALID'):
  """Sum pooling with an explicit, spreading backward.

  Args:
    x, window, stride, padding: as in `max_pool`; padded cells hold 0.

  Returns:
    Y[p] = sum_{t in window} Xpad[p*S + t], (N, *out_spatial, C).

  Backward (jax.custom_vjp):
    dL/dX[q] = sum over windows p containing q of dL/dY[p]: the transposed
    convolution of dL/dY with a ones kernel (see `_spread`).
  """
  spec = make_spec(x.shape, window, stride, padding, op='sum_pool')
  return _scaled_sum_pool_jit(x, spec, None)


def avg_pool(x, window, stride=None, padding='VALID', count_include_pad=True):
  """Average pooling with an explicit, spreading backward.

  Args:
    x, window, stride, padding: as in `max_pool`; padded cells hold 0.
    count_include_pad: divide every window by its full size |R| = prod(F)
      (True, the TensorFlow/PyTorch default) or by the number of input cells it
      covers (False), which keeps border averages unbiased under padding.

  Returns:
    Y[p] = (1/|R(p)|) sum_{t in window} Xpad[p*S + t], (N, *out_spatial, C).

  Backward (jax.custom_vjp):
    dL/dX[q] = sum over windows p containing q of dL/dY[p] / |R(p)|: each dY
    spread evenly over its window, overlaps summed.
  """
  op = 'avg_pool'
  spec = make_spec(x.shape, window, stride, padding, op=op)
  _check_bool(count_include_pad, 'count_include_pad', op)
  return _scaled_sum_pool_jit(x, spec, 'window' if count_include_pad else 'valid')


# ----------------------------------------------------------------------------
# Lp (L2) and RMS pooling
# ----------------------------------------------------------------------------

def _check_p(p, op):
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
    raise ValueError(
        f'{op}: p must be a finite number > 0 for y = (sum |x|^p)^(1/p), got {p!r}. '
        f'p = 2 is L2 pooling; p -> inf approaches max pooling (use max_pool).')
  return float(p)


def _abs_pow(x, p):
  return x * x if p == 2.0 else jnp.abs(x) ** p


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _lp_pool(x, spec, p):
  s = _reduce(_abs_pow(x, p), spec, 0, lax.add)
  return jnp.sqrt(s) if p == 2.0 else s ** (1.0 / p)


def _lp_pool_fwd(x, spec, p):
  y = _lp_pool(x, spec, p)
  return y, (x, y)


def _lp_pool_bwd(spec, p, res, dy):
  x, y = res
  zero = jnp.zeros((), dy.dtype)
  positive = y > 0
  safe_y = jnp.where(positive, y, jnp.ones((), y.dtype))
  g = jnp.where(positive, dy / (safe_y if p == 2.0 else safe_y ** (p - 1.0)), zero)
  if p == 2.0:
    local = x
  else:
    # x |x|^(p-2) = sign(x) |x|^(p-1); at x = 0 it is 0 (p > 1) or undefined
    # (p <= 1, a kink or a cusp): take 0 there rather than NaN.
    nonzero = x != 0
    local = jnp.where(nonzero, jnp.sign(x) * jnp.abs(jnp.where(nonzero, x, 1)) ** (p - 1.0),
                      jnp.zeros((), x.dtype))
  return ((local * _spread(g, spec)).astype(x.dtype),)


_lp_pool.defvjp(_lp_pool_fwd, _lp_pool_bwd)
_lp_pool_jit = jax.jit(_lp_pool, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rms_pool(x, spec, count_include_pad):
  scale = 1.0 / np.sqrt(_divisor(spec, count_include_pad))
  return _lp_pool(x, spec, 2.0) * jnp.asarray(scale, x.dtype)


def lp_pool(x, window, stride=None, padding='VALID', p=2.0):
  """Lp-norm pooling ("L^2 norm of a rectangular neighbourhood", seed 000).

  Args:
    x, window, stride, padding: as in `max_pool`; padded cells hold 0.
    p: a finite number > 0 (static). p = 2 is L2 pooling, p = 1 sums |x|,
      large p approaches max pooling of |x|. Computed directly (no rescaling),
      so |x|^p must stay within the dtype's range.

  Returns:
    Y[o] = (sum_{t in window} |Xpad[o*S + t]|^p)^(1/p), (N, *out_spatial, C).

  Backward (jax.custom_vjp):
    dL/dX[q] = x_q |x_q|^(p-2) * sum over windows o containing q of
               dL/dY[o] / Y[o]^(p-1)           (p = 2: x_q * dL/dY[o] / Y[o]).
    A window with Y = 0 (all zeros) passes no gradient (0, not NaN), and for
    p <= 1 a cell with x = 0 gets 0.
  """
  op = 'lp_pool'
  spec = make_spec(x.shape, window, stride, padding, op=op)
  return _lp_pool_jit(x, spec, _check_p(p, op))


def rms_pool(x, window, stride=None, padding='VALID', count_include_pad=True):
  """Root-mean-square pooling: Y = sqrt(mean_{window} x^2).

  Args:
    x, window, stride, padding: as in `max_pool`; padded cells hold 0.
    count_include_pad: the mean's divisor |R|, as in `avg_pool`.

  Returns:
    Y[p] = L2pool(X)[p] / sqrt(|R(p)|), (N, *out_spatial, C).

  Backward (through lp_pool's custom_vjp):
    dL/dX[q] = x_q * sum over windows p containing q of dL/dY[p] / (|R(p)| Y[p]),
    with Y = 0 windows passing no gradient.
  """
  op = 'rms_pool'
  spec = make_spec(x.shape, window, stride, padding, op=op)
  _check_bool(count_include_pad, 'count_include_pad', op)
  return _rms_pool(x, spec, bool(count_include_pad))


# ----------------------------------------------------------------------------
# Mixed pooling
# ----------------------------------------------------------------------------

def mixed_pool(x, window, stride=None, padding='VALID', alpha=0.5,
               count_include_pad=True):
  """Mixed pooling: alpha * max_pool + (1 - alpha) * avg_pool (Yu et al. 2014).

  Args:
    x, window, stride, padding: as in `max_pool`.
    alpha: mixing weight; a Python float in [0, 1], or an array broadcastable
      to the output (e.g. a learned scalar, or per channel of shape (C,)), in
      which case it is differentiable and its range is the caller's business.
    count_include_pad: for the average branch, as in `avg_pool`.

  Returns:
    Y = alpha * MAX + (1 - alpha) * AVG, (N, *out_spatial, C).

  Backward (each branch's custom_vjp, combined by the chain rule):
    dL/dX = alpha * route_max(dL/dY) + (1 - alpha) * spread(dL/dY) / |R|,
    dL/dalpha = sum over positions (reduced to alpha's shape) of
                dL/dY * (MAX - AVG).
  """
  op = 'mixed_pool'
  spec = make_spec(x.shape, window, stride, padding, op=op)
  _check_bool(count_include_pad, 'count_include_pad', op)
  if isinstance(alpha, bool):
    raise ValueError(f'{op}: alpha must be a number in [0, 1] or an array, got {alpha!r}.')
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(
        f'{op}: alpha must lie in [0, 1] for Y = alpha * max + (1 - alpha) * avg, '
        f'got alpha={alpha!r}.')
  return _mixed_pool(x, alpha, spec, 'window' if count_include_pad else 'valid', _routing())


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _mixed_pool(x, alpha, spec, divide, use_native):
  return alpha * _max_pool(x, spec, use_native) + (1 - alpha) * _scaled_sum_pool(x, spec, divide)


# ----------------------------------------------------------------------------
# Global pooling
# ----------------------------------------------------------------------------

# The (N, M, C) cores take M, the number of spatial positions, as a static
# argument so the backward knows it without saving x.

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _global_avg(x3, m):
  return jnp.sum(x3, axis=1) / jnp.asarray(m, x3.dtype)


def _global_avg_fwd(x3, m):
  return _global_avg(x3, m), None


def _global_avg_bwd(m, _, dy):
  g = dy / jnp.asarray(m, dy.dtype)
  return (jnp.broadcast_to(g[:, None, :], (dy.shape[0], m, dy.shape[1])),)


_global_avg.defvjp(_global_avg_fwd, _global_avg_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _global_max(x3, m):
  return jnp.max(x3, axis=1)


def _global_max_fwd(x3, m):
  # argmax returns the first maximum (or first NaN): the row-major tie rule.
  return _global_max(x3, m), jnp.argmax(x3, axis=1).astype(jnp.int32)


def _global_max_bwd(m, winner, dy):
  positions = jnp.arange(m, dtype=jnp.int32)[None, :, None]
  hit = positions == winner[:, None, :]
  return (jnp.where(hit, dy[:, None, :], jnp.zeros((), dy.dtype)),)


_global_max.defvjp(_global_max_fwd, _global_max_bwd)


_GLOBAL_CORES = {'avg': _global_avg, 'max': _global_max}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _global_pool(x, keepdims, kind):
  n, c = x.shape[0], x.shape[-1]
  m = math.prod(x.shape[1:-1])
  y = _GLOBAL_CORES[kind](x.reshape(n, m, c), m)
  return y.reshape((n,) + (1,) * (x.ndim - 2) + (c,)) if keepdims else y


def _global(x, keepdims, kind, op):
  shapes.spatial_dims(x.ndim, op=op)
  _check_bool(keepdims, 'keepdims', op)
  if 0 in x.shape[1:-1]:
    raise ValueError(f'{op}: the input has an empty spatial dimension, shape '
                     f'{tuple(x.shape)}; there is nothing to pool.')
  return _global_pool(x, bool(keepdims), kind)


def global_avg_pool(x, keepdims=False):
  """Global average pooling (GoogLeNet's replacement for FC layers, seed 004).

  Args:
    x: (N, *spatial, C) with 1, 2 or 3 spatial dimensions.
    keepdims: return (N, 1, ..., 1, C) instead of (N, C).

  Returns:
    Y[n, c] = (1/M) sum_q X[n, q, c], M = prod(spatial).

  Backward (jax.custom_vjp): dL/dX[n, q, c] = dL/dY[n, c] / M at every q.
  """
  return _global(x, keepdims, 'avg', 'global_avg_pool')


def global_max_pool(x, keepdims=False):
  """Global max pooling over all spatial positions.

  Args:
    x: (N, *spatial, C) with 1, 2 or 3 spatial dimensions.
    keepdims: return (N, 1, ..., 1, C) instead of (N, C).

  Returns:
    Y[n, c] = max_q X[n, q, c].

  Backward (jax.custom_vjp): dL/dX[n, q, c] = dL/dY[n, c] at the first maximum
  in row-major spatial order, 0 elsewhere.
  """
  return _global(x, keepdims, 'max', 'global_max_pool')


# ----------------------------------------------------------------------------
# Spatial pyramid pooling
# ----------------------------------------------------------------------------

def pyramid_bins(size: int, level: int):
  """He et al.'s bin edges along one dimension: [floor(i*W/n), ceil((i+1)*W/n))."""
  return [((i * size) // level, -(-((i + 1) * size) // level)) for i in range(level)]


def spatial_pyramid_pool(x, levels: Sequence[int] = (1, 2, 4), mode: str = 'max'):
  """Spatial pyramid pooling (He et al. 2014): a fixed-length vector for any size.

  For each level n the spatial extent is cut into an n x n (x n) grid of bins
  with edges floor(i*W/n) .. ceil((i+1)*W/n) per dimension (neighbouring bins
  overlap by a cell when n does not divide W); each bin is pooled globally.

  Args:
    x: (N, *spatial, C) with 1, 2 or 3 spatial dimensions, every spatial size
      >= max(levels).
    levels: positive ints, the bins per dimension at each pyramid level.
    mode: 'max' (the paper's) or 'avg'.

  Returns:
    (N, C * sum_n n^nd). Level by level in the order given; within a level the
    bins are row-major and channels are innermost (channels-last flattening of
    an (N, n, n, C) grid).

  Backward: through `global_max_pool` / `global_avg_pool` on each bin, so each
  bin routes (first maximum, row-major) or spreads its dY inside the bin, and
  cells shared by overlapping bins or levels sum their gradients.
  """
  op = 'spatial_pyramid_pool'
  shapes.spatial_dims(x.ndim, op=op)
  if mode not in _GLOBAL_CORES:
    raise ValueError(f"{op}: mode must be 'max' or 'avg', got {mode!r}.")
  try:
    levels = tuple(levels)
  except TypeError:
    raise ValueError(f'{op}: levels must be a sequence of positive ints, got {levels!r}.'
                     ) from None
  if not levels or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                           for n in levels):
    raise ValueError(
        f'{op}: levels must be a non-empty sequence of positive ints (bins per '
        f'dimension), got {levels!r}.')
  spatial = tuple(x.shape[1:-1])
  top = max(levels)
  for i, w in enumerate(spatial):
    if w < top:
      raise ValueError(
          f'{op}: input spatial size {w} in dimension {i} (input {tuple(x.shape)}) is '
          f'smaller than the largest pyramid level {top}; every bin '
          f'[floor(i*W/n), ceil((i+1)*W/n)) needs its own cells, so W >= n. Use '
          f'smaller levels or a larger input.')
  return _spatial_pyramid_pool(x, levels, mode)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _spatial_pyramid_pool(x, levels, mode):
  pool = _GLOBAL_CORES[mode]
  n_batch, c = x.shape[0], x.shape[-1]
  spatial = tuple(x.shape[1:-1])
  features = []
  for level in levels:
    edges = [pyramid_bins(w, level) for w in spatial]
    for box in itertools.product(*edges):
      start = (0,) + tuple(lo for lo, _ in box) + (0,)
      limit = (n_batch,) + tuple(hi for _, hi in box) + (c,)
      m = math.prod(hi - lo for lo, hi in box)
      features.append(pool(lax.slice(x, start, limit).reshape(n_batch, m, c), m))
  return jnp.concatenate(features, axis=-1)


__all__ = [
    'PoolSpec', 'make_spec', 'max_pool', 'max_pool_with_argmax', 'max_unpool',
    'sum_pool', 'avg_pool', 'lp_pool', 'rms_pool', 'mixed_pool',
    'global_avg_pool', 'global_max_pool', 'spatial_pyramid_pool', 'pyramid_bins',
]
