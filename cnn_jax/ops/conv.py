"""Convolution with its backward pass written out, as in the notes.

Forward (cross-correlation, the frameworks' "convolution"; seed 004's
O(i, j) = sum_m sum_n I(i + m, j + n) F(m, n)), for every spatial dimension:

    Y[n, p, o] = sum_{t, i} Xpad[n, p*S + t*D, i] * W[t, i, o]

Backward (seed 004, "backpropagation as convolution with an inverted filter"):

    dL/dX = conv( dilate_S(dL/dY), rot180(W)^T )     # in/out channels swapped
            with padding (F_eff - 1 - P_lo,  F_eff - 1 - P_hi + r)
    dL/dW = correlation of X with dL/dY, summed over the batch and every output
            position (the shared-weight rule):
            dW[t, i, o] = sum_{n, p} Xpad[n, p*S + t*D, i] * dY[n, p, o]

where dilate_S inserts S - 1 zeros between neighbouring gradient entries, F_eff =
(F - 1) * D + 1 and r = (W1 + P_lo + P_hi - F_eff) mod S is the number of trailing
input rows/columns that the forward stride never reached (they get zero gradient).

All ops are channels-last: x (N, *spatial, C_in), w (*kernel, C_in // groups, C_out).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax.ops import shapes
from cnn_jax.ops import conv_grads

class ConvSpec(NamedTuple):
  """Static description of one convolution (hashable, so it can key jit caches)."""
  nd: int
  stride: Tuple[int, ...]
  padding: Tuple[Tuple[int, int], ...]
  dilation: Tuple[int, ...]
  groups: int
  in_spatial: Tuple[int, ...]     # spatial size of the conv's input
  kernel: Tuple[int, ...]
  out_spatial: Tuple[int, ...]    # spatial size of the conv's output
  channels: Tuple[int, int] = (0, 0)   # (C_in, C_out); (0, 0) where not known

  @property
  def remainder(self) -> Tuple[int, ...]:
    """Input rows/columns past the last window (r in the dL/dX padding)."""
    return tuple(
        shapes.stride_remainder(n, shapes.effective_kernel(k, d), s, lo, hi)
        for n, k, s, (lo, hi), d in zip(self.in_spatial, self.kernel, self.stride,
                                         self.padding, self.dilation))


def make_spec(x_shape, w_shape, *, stride=1, padding='VALID', dilation=1, groups=1,
              op: str = 'conv') -> ConvSpec:
  """Validates a convolution's arguments and resolves them to a ConvSpec.

  Raises ValueError, before any compute, for a wrong rank, channel or group
  mismatch, a zero stride/dilation/kernel, or a window larger than the padded input.
  """
  nd = shapes.spatial_dims(len(x_shape), op=op)
  if len(w_shape) != nd + 2:
    raise ValueError(
        f'{op}: kernel must be (*kernel_size, C_in // groups, C_out) with {nd} '
        f'spatial dimension(s) to match the input {tuple(x_shape)}, i.e. rank '
        f'{nd + 2}; got shape {tuple(w_shape)}.')
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f'{op}: groups must be a positive int, got {groups!r}.')
  c_in, c_out = x_shape[-1], w_shape[-1]
  kernel = tuple(int(k) for k in w_shape[:nd])
  shapes.check_positive(kernel, 'kernel size', op=op)
  if c_in % groups:
    raise ValueError(
        f'{op}: input channels {c_in} are not divisible by groups={groups}. Each '
        f'group convolves C_in / groups channels; pick groups dividing {c_in}.')
  if c_out % groups:
    raise ValueError(
        f'{op}: output channels {c_out} are not divisible by groups={groups}. Each '
        f'group produces C_out / groups channels; pick groups dividing {c_out}.')
  if w_shape[-2] != c_in // groups:
    raise ValueError(
        f'{op}: kernel expects {w_shape[-2]} input channels per group but the input '
        f'has {c_in} channels and groups={groups} (C_in // groups = '
        f'{c_in // groups}). Kernel shape must be (*kernel_size, {c_in // groups}, '
        f'C_out); got {tuple(w_shape)}.')
  stride = shapes.as_tuple(stride, nd, 'stride', op=op)
  dilation = shapes.as_tuple(dilation, nd, 'dilation', op=op)
  shapes.check_positive(stride, 'stride', op=op)
  shapes.check_positive(dilation, 'dilation', op=op)
  in_spatial = tuple(int(n) for n in x_shape[1:-1])
  pads = shapes.resolve_padding(padding, in_spatial, kernel, stride, dilation, op=op)
  out_spatial = shapes.output_spatial(in_spatial, kernel, stride, pads, dilation, op=op)
  return ConvSpec(nd, stride, pads, dilation, groups, in_spatial, kernel, out_spatial,
                  (int(c_in), int(c_out)))


# ----------------------------------------------------------------------------
# The three products. Each is a plain function of arrays and a static spec.
# ----------------------------------------------------------------------------

def forward(x, w, spec: ConvSpec):
  """Y = X (*) W: cross-correlation with stride, padding, dilation and groups.

  XLA's convolution, except where XLA's CPU backend takes a slow generic path
  (`conv_grads.forward_rule`): maps smaller than the kernel window (one im2col
  GEMM, `conv_grads.forward_im2col`) and one input channel per group, i.e.
  depthwise convs and 1-channel inputs (broadcast products summed over taps,
  `conv_grads.forward_depthwise`).
  """
  rule = conv_grads.forward_rule(spec)
  if rule != 'xla':
    return conv_grads.FORWARDS[rule](x, w, spec)
  return lax.conv_general_dilated(
      x, w, window_strides=spec.stride, padding=spec.padding,
      rhs_dilation=spec.dilation, dimension_numbers=conv_grads.dimension_numbers(spec.nd),
      feature_group_count=spec.groups)


def input_grad(dy, w, spec: ConvSpec):
  """dL/dX = dilate_S(dL/dY) (*) rot180(W)^T, padded (F_eff-1-lo, F_eff-1-hi+r).

  The formulation is picked by `conv_grads.input_grad` from the shape class.
  """
  return conv_grads.input_grad(dy, w, spec)


def weight_grad(x, dy, spec: ConvSpec):
  """dL/dW[t, i, o] = sum_{n, p} Xpad[n, p*S + t*D, i] dY[n, p, o].

  The formulation (one correlation over the batch, per-tap GEMMs, or im2col) is
  picked by `conv_grads.weight_grad` from the shape class; all are exact.
  """
  return conv_grads.weight_grad(x, dy, spec)


# ----------------------------------------------------------------------------
# custom_vjp wiring
# ----------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, spec):
  return forward(x, w, spec)


def _conv_fwd(x, w, spec):
  return forward(x, w, spec), (x, w)


def _conv_bwd(spec, res, dy):
  x, w = res
  return input_grad(dy, w, spec).astype(x.dtype), weight_grad(x, dy, spec).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x, w, *, stride=1, padding='VALID', dilation=1, groups=1):
  """N-D convolution (cross-correlation) with an explicit, notes-style backward.

  Args:
    x: input, (N, *spatial, C_in) with 1, 2 or 3 spatial dimensions.
    w: kernel, (*kernel_size, C_in // groups, C_out).
    stride: int or one int per spatial dimension (S).
    padding: 'VALID', 'SAME', 'FULL' (F_eff - 1 each side), an int P, one int
      per dimension, or per-dimension (lo, hi) pairs.
    dilation: int or per-dimension ints (D): kernel taps D apart (atrous).
    groups: split channels into `groups` independent convolutions; groups == C_in
      is depthwise.

  Returns:
    Y, (N, *out_spatial, C_out) with out = floor((W1 - F_eff + P_lo + P_hi)/S) + 1.

  Backward (jax.custom_vjp):
    dL/dX = dilate_S(dL/dY) (*) rot180(W) with in/out channels swapped, padded
            (F_eff - 1 - P_lo, F_eff - 1 - P_hi + r), r the stride remainder;
    dL/dW = sum over batch and positions of Xpad[p*S + t*D] * dL/dY[p].
  The bias is the layer's business (cnn_jax.nn).
  """
  spec = make_spec(x.shape, w.shape, stride=stride, padding=padding,
                   dilation=dilation, groups=groups, op='conv')
  return _conv(x, w, spec)


def true_convolution(x, w, **kwargs):
  """The notes' convolution: kernel rotated by 180 degrees, then correlated.

  y(m, n) = sum_p sum_q x(p, q) h(m - p, n - q) (seed 003). Equal to
  `conv(x, flip(w))`; for a symmetric kernel the two coincide.
  """
  nd = shapes.spatial_dims(x.ndim, op='true_convolution')
  return conv(x, jnp.flip(w, axis=tuple(range(nd))), **kwargs)


# ----------------------------------------------------------------------------
# Transposed convolution: the adjoint of conv, i.e. its dL/dX map, as a layer.
# ----------------------------------------------------------------------------

def _swap_io(w, nd: int, groups: int):
  """(*k, C_in/g, C_out) -> (*k, C_out/g, C_in) without flipping."""
  return jnp.flip(conv_grads.rotate_kernel(w, nd, groups), axis=tuple(range(nd)))


def transpose_spec(x_shape, w_shape, *, stride, padding, dilation, groups,
                   output_padding, op='conv_transpose') -> ConvSpec:
  """Spec of the forward conv whose input-gradient conv_transpose computes."""
  nd = shapes.spatial_dims(len(x_shape), op=op)
  if len(w_shape) != nd + 2:
    raise ValueError(
        f'{op}: kernel must be (*kernel_size, C_in // groups, C_out) with {nd} '
        f'spatial dimension(s); got shape {tuple(w_shape)}.')
  kernel = tuple(int(k) for k in w_shape[:nd])
  shapes.check_positive(kernel, 'kernel size', op=op)
  stride = shapes.as_tuple(stride, nd, 'stride', op=op)
  dilation = shapes.as_tuple(dilation, nd, 'dilation', op=op)
  shapes.check_positive(stride, 'stride', op=op)
  shapes.check_positive(dilation, 'dilation', op=op)
  out_pad = shapes.as_tuple(output_padding, nd, 'output_padding', op=op)
  in_spatial = tuple(int(n) for n in x_shape[1:-1])
  if isinstance(padding, str) and padding.upper() == 'SAME':
    # Output exactly W1 * S; the forward conv's SAME padding for that size.
    out_spatial = tuple(n * s for n, s in zip(in_spatial, stride))
    pads = shapes.resolve_padding('SAME', out_spatial, kernel, stride, dilation, op=op)
  else:
    pads = shapes.resolve_padding(padding, in_spatial, kernel, stride, dilation, op=op)
    out_spatial = []
    for i, (n, k, s, d, (lo, hi), op_) in enumerate(
        zip(in_spatial, kernel, stride, dilation, pads, out_pad)):
      if not 0 <= op_ < s:
        raise ValueError(
            f'{op}: output_padding must satisfy 0 <= output_padding < stride; got '
            f'{op_} with stride {s} in spatial dimension {i}.')
      size = (n - 1) * s + shapes.effective_kernel(k, d) - lo - hi + op_
      if size < 1:
        raise ValueError(
            f'{op}: output size (W1 - 1)*S + F_eff - P_lo - P_hi + output_padding = '
            f'({n} - 1)*{s} + {shapes.effective_kernel(k, d)} - {lo} - {hi} + {op_} '
            f'= {size} < 1 in spatial dimension {i}. Use less padding.')
      out_spatial.append(size)
    out_spatial = tuple(out_spatial)
  c_in, c_out = x_shape[-1], w_shape[-1]
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f'{op}: groups must be a positive int, got {groups!r}.')
  if c_in % groups or c_out % groups or w_shape[-2] != c_in // groups:
    raise ValueError(
        f'{op}: kernel {tuple(w_shape)} does not fit input channels {c_in} with '
        f'groups={groups}: need C_in and C_out divisible by groups and kernel shape '
        f'(*kernel_size, {c_in // max(groups, 1)}, C_out).')
  # The forward conv maps the transposed output (C_out channels) back to x.
  fwd = ConvSpec(nd, stride, pads, dilation, groups, out_spatial, kernel, in_spatial,
                 (int(c_out), int(c_in)))
  expected = shapes.output_spatial(out_spatial, kernel, stride, pads, dilation, op=op)
  if expected != in_spatial:  # pragma: no cover - guarded by the checks above
    raise ValueError(f'{op}: inconsistent shapes {expected} vs {in_spatial}.')
  return fwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose(x, w, spec):
  v = _swap_io(w, spec.nd, spec.groups)
  return input_grad(x, v, spec)


def _conv_transpose_fwd(x, w, spec):
  return _conv_transpose(x, w, spec), (x, w)


def _conv_transpose_bwd(spec, res, g):
  x, w = res
  v = _swap_io(w, spec.nd, spec.groups)
  dx = forward(g, v, spec)
  dv = weight_grad(g, x, spec)        # (*k, C_out/g, C_in)
  dw = _swap_io(dv, spec.nd, spec.groups)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


def conv_transpose(x, w, *, stride=1, padding='VALID', dilation=1, groups=1,
                   output_padding=0):
  """Transposed convolution ("deconvolution"): learnable upsampling.

  The exact adjoint of `conv`: the stride-dilated input correlated with the
  180-degree-rotated kernel, which is how conv's dL/dX is computed (seed 004).
  Output size per dimension: (W1 - 1)*S + F_eff - P_lo - P_hi + output_padding
  ('VALID': (W1 - 1)*S + F_eff, e.g. 2x2 -> 5x5 for a 3x3 kernel at stride 2;
  'SAME': W1 * S; 'FULL': P = F_eff - 1 each side).

  Args:
    x: (N, *spatial, C_in).
    w: (*kernel_size, C_in // groups, C_out).
    stride, padding, dilation, groups: those of the convolution being transposed.
    output_padding: extra rows/columns at the end (0 <= output_padding < S),
      choosing among the output sizes a strided conv maps to the same input size.

  Returns:
    (N, *out_spatial, C_out).

  Backward: dL/dX = conv(dL/dY, W^T, stride, padding) and dL/dW = correlation of
  dL/dY with X, i.e. conv's forward and weight-gradient rules with roles swapped.
  """
  spec = transpose_spec(x.shape, w.shape, stride=stride, padding=padding,
                        dilation=dilation, groups=groups,
                        output_padding=output_padding)
  return _conv_transpose(x, w, spec)
