"""Formulations of the two convolution gradients. Each computes exactly

    dX = dilate_S(dY) (*) rot180(W)^T, padded (F_eff-1-P_lo, F_eff-1-P_hi+r)
    dW[t, i, o] = sum_{n, p} Xpad[n, p*S + t*D, i] * dY[n, p, o]

(seed 004: the input gradient is a convolution with the flipped filter; the
weight gradient is the correlation of the input with the output gradient,
summed over batch and positions, the shared-weight rule). Formulations differ
only in how the sums are laid out for the hardware; `input_grad` and
`weight_grad` pick one by a fixed rule on the shape class.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cnn_jax.ops import shapes

_SPATIAL = {1: 'W', 2: 'HW', 3: 'DHW'}


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


def tap_slice(xpad, tap, spec):
  """The strided view of Xpad that kernel tap `tap` multiplies: Xpad[p*S + t*D]."""
  start = [0] + [t * d for t, d in zip(tap, spec.dilation)] + [0]
  limit = ([xpad.shape[0]]
           + [t * d + (o - 1) * s + 1 for t, d, o, s in
              zip(tap, spec.dilation, spec.out_spatial, spec.stride)]
           + [xpad.shape[-1]])
  strides = [1] + list(spec.stride) + [1]
  return lax.slice(xpad, start, limit, strides)


def pad_input(x, spec):
  return jnp.pad(x, [(0, 0)] + list(spec.padding) + [(0, 0)])


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


def _all_taps(kernel):
  taps = [()]
  for k in kernel:
    taps = [t + (i,) for t in taps for i in range(k)]
  return taps


def input_grad(dy, w, spec):
  """dL/dX by the formulation chosen for this shape class (all exact)."""
  return input_grad_dilated(dy, w, spec)


def weight_grad(x, dy, spec):
  """dL/dW by the formulation chosen for this shape class (all exact)."""
  return weight_grad_correlation(x, dy, spec)
