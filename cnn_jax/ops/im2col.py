"""Convolution as matrix multiplication (seed 004: "a convolution operation can be
represented as matrix multiplication").

im2col unrolls every receptive field of X into one row of a patch matrix

    P[(n, p), (t, i)] = Xpad[n, p*S + t*D, i]          shape (N*positions, K*C_in)

so that, with W reshaped to (K*C_in, C_out),

    Y   = P @ W
    dW  = P^T @ dY                   (the shared-weight sum as one GEMM)
    dX  = col2im(dY @ W^T)           (col2im scatters each row back onto its field,
                                      adding where fields overlap)

col2im is the exact adjoint of im2col. `conv_matmul` is a full convolution on
this path with its own custom_vjp, used as a test reference and as an
alternative execution path.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax.ops.conv import make_spec


def _taps(kernel):
  taps = [()]
  for k in kernel:
    taps = [t + (i,) for t in taps for i in range(k)]
  return taps


def _tap_window(tap, spec, batch, channels):
  start = (0,) + tuple(t * d for t, d in zip(tap, spec.dilation)) + (0,)
  limit = ((batch,)
           + tuple(t * d + (o - 1) * s + 1 for t, d, o, s in
                   zip(tap, spec.dilation, spec.out_spatial, spec.stride))
           + (channels,))
  strides = (1,) + spec.stride + (1,)
  return start, limit, strides


def _patches(x, spec):
  xpad = jnp.pad(x, ((0, 0),) + spec.padding + ((0, 0),))
  n, c = x.shape[0], x.shape[-1]
  cols = [lax.slice(xpad, *_tap_window(tap, spec, n, c)) for tap in _taps(spec.kernel)]
  return jnp.stack(cols, axis=-2)          # (N, *out, K, C)


def _fold(cols, spec, x_shape):
  """Adjoint of _patches: add each tap's slab back at its strided offset."""
  n, c = x_shape[0], x_shape[-1]
  padded = (n,) + tuple(m + lo + hi for m, (lo, hi) in zip(spec.in_spatial, spec.padding)) + (c,)
  out = jnp.zeros(padded, cols.dtype)
  for j, tap in enumerate(_taps(spec.kernel)):
    start, limit, strides = _tap_window(tap, spec, n, c)
    # Interior padding puts stride-1 zeros between rows, edge padding moves the
    # slab to the tap's offset: the transpose of the strided slice.
    cfg = [(0, 0, 0)]
    for st, li, s, full in zip(start[1:-1], limit[1:-1], strides[1:-1], padded[1:-1]):
      cfg.append((st, full - li, s - 1))
    cfg.append((0, 0, 0))
    out = out + lax.pad(cols[..., j, :], jnp.zeros((), cols.dtype), cfg)
  crop = tuple(slice(lo, lo + m) for m, (lo, _) in zip(spec.in_spatial, spec.padding))
  return out[(slice(None),) + crop + (slice(None),)]


def im2col(x, kernel_size, *, stride=1, padding='VALID', dilation=1):
  """Patch matrix of x: (N, *out_spatial, K * C) with K = prod(kernel_size).

  Row (n, p) holds the receptive field of output position p, ordered
  (kernel tap in row-major order, channel), matching `w.reshape(K * C_in, C_out)`.
  """
  nd = x.ndim - 2
  kernel = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * nd
  spec = make_spec(x.shape, tuple(kernel) + (x.shape[-1], 1), stride=stride,
                            padding=padding, dilation=dilation, op='im2col')
  p = _patches(x, spec)
  return p.reshape(p.shape[:-2] + (-1,))


def col2im(cols, x_shape, kernel_size, *, stride=1, padding='VALID', dilation=1):
  """Adjoint of im2col: sums every patch row back onto its receptive field."""
  nd = len(x_shape) - 2
  kernel = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * nd
  spec = make_spec(x_shape, tuple(kernel) + (x_shape[-1], 1), stride=stride,
                            padding=padding, dilation=dilation, op='col2im')
  k = math.prod(spec.kernel)
  cols = cols.reshape(cols.shape[:-1] + (k, x_shape[-1]))
  return _fold(cols, spec, x_shape)


def _grouped_matmul(p, w, groups):
  """p (..., K, C_in), w (*k, C_in/g, C_out) -> (..., C_out) group by group."""
  k = p.shape[-2]
  c_in = p.shape[-1]
  c_out = w.shape[-1]
  pg = p.reshape(p.shape[:-1] + (groups, c_in // groups))
  wg = w.reshape(k, c_in // groups, groups, c_out // groups)
  y = jnp.einsum('...kgi,kigo->...go', pg, wg)
  return y.reshape(y.shape[:-2] + (c_out,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_matmul(x, w, spec):
  return _grouped_matmul(_patches(x, spec), w, spec.groups)


def _conv_matmul_fwd(x, w, spec):
  p = _patches(x, spec)
  return _grouped_matmul(p, w, spec.groups), (p, w, x.shape)


def _conv_matmul_bwd(spec, res, dy):
  p, w, x_shape = res
  g = spec.groups
  k = p.shape[-2]
  c_in, c_out = p.shape[-1], dy.shape[-1]
  pg = p.reshape(-1, k, g, c_in // g)
  dyg = dy.reshape(-1, g, c_out // g)
  dw = jnp.einsum('mkgi,mgo->kigo', pg, dyg).reshape(w.shape)      # P^T dY
  wg = w.reshape(k, c_in // g, g, c_out // g)
  dcols = jnp.einsum('...go,kigo->...kgi', dy.reshape(dy.shape[:-1] + (g, c_out // g)), wg)
  dcols = dcols.reshape(dy.shape[:-1] + (k, c_in))                 # dY W^T
  return _fold(dcols, spec, x_shape).astype(p.dtype), dw.astype(w.dtype)


_conv_matmul.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)


def conv_matmul(x, w, *, stride=1, padding='VALID', dilation=1, groups=1):
  """`conv` computed as im2col followed by one GEMM per group.

  Same arguments and result as `cnn_jax.ops.conv`. Backward:
  dW = P^T @ dY and dX = col2im(dY @ W^T), where P = im2col(X).
  """
  spec = make_spec(x.shape, w.shape, stride=stride, padding=padding,
                            dilation=dilation, groups=groups, op='conv_matmul')
  return _conv_matmul(x, w, spec)
