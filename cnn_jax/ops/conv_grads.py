"""Formulations of the convolution weight gradient, all computing exactly

    dW[t, i, o] = sum_{n, p} Xpad[n, p*S + t*D, i] * dY[n, p, o]

(the correlation of the input with the output gradient, summed over batch and
positions: the shared-weight rule of seed 004). They differ only in how the sum
is laid out for the hardware; `weight_grad` picks one by shape class.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cnn_jax.ops import shapes

_SPATIAL = {1: 'W', 2: 'HW', 3: 'DHW'}


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


def weight_grad(x, dy, spec):
  """dL/dW by the formulation chosen for this shape class (all exact)."""
  return weight_grad_correlation(x, dy, spec)
