"""Local Response Normalization (AlexNet, Krizhevsky et al. 2012; seed 003).

Lateral inhibition: a strongly excited unit damps its neighbours. With a^j the
activation at one position and N channels, the inter-channel form (the notes'
equation, AlexNet's layers 1 and 2) is

    b^i = a^i / (k + alpha * sum_{j = max(0, i - lo)}^{min(N - 1, i + hi)} (a^j)^2)^beta

with n = size, lo = n // 2 and hi = (n - 1) // 2: the window holds exactly n
channels, centred for odd n (lo = hi = (n - 1) / 2, the notes' "i +- n/2" with
integer n/2) and with the extra channel *before* i for even n (n = 4 sums
i-2 .. i+1), which is where PyTorch puts it. The intra-channel form sums the
same channel over a size x size (x size) spatial neighbourhood with the same
split in every spatial dimension. Both clip at the borders: positions outside
the array contribute nothing.

alpha multiplies the *sum*, as in the paper and the notes. PyTorch's
`nn.LocalResponseNorm` (and Caffe) multiply the *mean*, i.e. use alpha / n
(alpha / n^d within a channel); pass `alpha=alpha_torch / size` here to
reproduce them. AlexNet's values are size=5, k=2, alpha=1e-4, beta=0.75 with
the sum convention.

Backward, with S the windowed sum of squares, D = k + alpha * S and
y = x * D^-beta:

    dL/dx_j = dy_j * D_j^-beta
              - 2 alpha beta x_j * sum_{i : j in window(i)} dy_i x_i D_i^(-beta-1)

The second sum is the adjoint of the window sum: the same box sum with its
(lo, hi) split mirrored to (hi, lo), which for odd sizes is the window itself.
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_jax.ops import shapes

MODES = ('across_channels', 'within_channel')


class LRNSpec(NamedTuple):
  """Static description of one LRN (hashable: a custom_vjp nondiff argument)."""
  axes: Tuple[int, ...]       # the axes the window slides along
  size: int
  k: float
  alpha: float
  beta: float

  @property
  def pads(self) -> Tuple[int, int]:
    """(lo, hi): window positions before and after the centre."""
    return self.size // 2, (self.size - 1) // 2


def _check_number(value, what: str, *, minimum: float, hint: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'lrn: {what} must be a real number, got {value!r}. {hint}')
  value = float(value)
  if not value >= minimum or value == float('inf'):
    raise ValueError(
        f'lrn: {what} must be finite and >= {minimum:g}, got {value!r}. {hint}')
  return value


def make_spec(x_shape, x_dtype, *, size, k, alpha, beta, mode) -> LRNSpec:
  """Validates LRN arguments before any compute; ValueError says what to change."""
  nd = shapes.spatial_dims(len(x_shape), op='lrn')
  if mode not in MODES:
    raise ValueError(
        f"lrn: mode must be one of {MODES}, got {mode!r}. 'across_channels' is "
        f"AlexNet's inter-channel LRN; 'within_channel' sums a spatial "
        f"neighbourhood of each channel.")
  if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
    raise ValueError(
        f'lrn: size must be an int >= 1 (the number of channels, or the spatial '
        f'extent, summed over), got {size!r}. AlexNet uses size=5.')
  k = _check_number(k, 'k', minimum=0.0,
                    hint='k is the additive bias that keeps the denominator '
                         'away from 0; AlexNet uses k=2.')
  alpha = _check_number(alpha, 'alpha', minimum=0.0,
                        hint='A negative alpha can drive the denominator below '
                             'zero; AlexNet uses alpha=1e-4.')
  beta = _check_number(beta, 'beta', minimum=0.0,
                       hint='A negative beta amplifies instead of normalising; '
                            'AlexNet uses beta=0.75.')
  if not jnp.issubdtype(x_dtype, jnp.floating):
    raise ValueError(
        f'lrn: x must be a floating-point array, got dtype {x_dtype}. Cast it '
        f'first, e.g. x.astype(jnp.float32).')
  axes = (nd + 1,) if mode == 'across_channels' else tuple(range(1, nd + 1))
  return LRNSpec(axes, int(size), k, alpha, beta)


def _compute_dtype(dtype):
  # Squares of half-precision activations overflow at |a| > 256 (float16) and
  # lose the small alpha * S term to rounding, so sum in at least float32.
  return jnp.promote_types(dtype, jnp.float32)


def window_sum(q, axes: Tuple[int, ...], size: int, pads: Tuple[int, int]):
  """Box sum of `q` over `size` positions along `axes`, zeros beyond the border.

  Output position i covers i - pads[0] .. i + pads[1] on every axis in `axes`.
  """
  lo, hi = pads
  dims = tuple(size if a in axes else 1 for a in range(q.ndim))
  padding = tuple((lo, hi) if a in axes else (0, 0) for a in range(q.ndim))
  # A concrete (NumPy) zero lets JAX recognise the sum monoid even under jit
  # and use reduce_window_sum, which, unlike the generic reduce_window, is
  # differentiable: the backward pass itself can then be differentiated.
  return lax.reduce_window(q, np.zeros((), q.dtype), lax.add, dims,
                           (1,) * q.ndim, padding)


def _denominator(x, spec: LRNSpec):
  """D = k + alpha * S, S the windowed sum of squares."""
  return spec.k + spec.alpha * window_sum(x * x, spec.axes, spec.size, spec.pads)


def _forward(x, spec: LRNSpec):
  """y = x * D^-beta, and the residuals (x, D) the backward pass needs."""
  xc = x.astype(_compute_dtype(x.dtype))
  d = _denominator(xc, spec)
  return (xc * d ** -spec.beta).astype(x.dtype), (xc, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lrn(x, spec):
  return _forward(x, spec)[0]


def _lrn_bwd(spec, res, dy):
  xc, d = res
  dyc = dy.astype(xc.dtype)
  scale = d ** -spec.beta                      # D^-beta
  inner = dyc * xc * scale / d                 # dy_i x_i D_i^(-beta-1)
  lo, hi = spec.pads
  # The adjoint of "i sums j in [i - lo, i + hi]" is "j collects i in
  # [j - hi, j + lo]": the mirrored window, which differs only for even sizes.
  back = window_sum(inner, spec.axes, spec.size, (hi, lo))
  dx = dyc * scale - (2.0 * spec.alpha * spec.beta) * xc * back
  return (dx.astype(dy.dtype),)


_lrn.defvjp(_forward, _lrn_bwd)   # residuals: x (compute dtype) and D


def lrn(x, *, size: int = 5, k: float = 2.0, alpha: float = 1e-4,
        beta: float = 0.75, mode: str = 'across_channels'):
  """Local Response Normalization with an explicit backward pass.

  Args:
    x: channels-last activations (N, *spatial, C), 1, 2 or 3 spatial
      dimensions, floating point (half precision is summed in float32).
    size: n, the window length: channels summed over ('across_channels') or the
      spatial extent per dimension ('within_channel'). For even n the window
      covers n // 2 positions before the centre and n // 2 - 1 after.
    k: additive bias in the denominator (>= 0). With k = 0 an all-zero window
      gives 0 / 0 = NaN.
    alpha: scale of the *sum* of squares (>= 0). PyTorch's LocalResponseNorm
      scales the mean: its alpha equals alpha * size here (alpha * size**d
      within a channel).
    beta: exponent (>= 0).
    mode: 'across_channels' (inter-channel, AlexNet) or 'within_channel'
      (intra-channel: a size^d spatial neighbourhood of the same channel).

  Returns:
    b, the same shape and dtype as x:
      b = x / (k + alpha * S)^beta, S = sum of x^2 over the clipped window.

  Backward (jax.custom_vjp), with D = k + alpha * S:
    dL/dx_j = dy_j D_j^-beta
              - 2 alpha beta x_j sum_{i: j in window(i)} dy_i x_i D_i^(-beta-1),
    the inner sum being the window sum with its before/after split mirrored.

  Raises:
    ValueError: rank not 3-5, unknown mode, size not an int >= 1, k, alpha or
      beta negative or not finite, or a non-floating x.
  """
  x = jnp.asarray(x)
  spec = make_spec(x.shape, x.dtype, size=size, k=k, alpha=alpha, beta=beta,
                   mode=mode)
  return _lrn(x, spec)


__all__ = ['MODES', 'LRNSpec', 'lrn', 'make_spec', 'window_sum']
