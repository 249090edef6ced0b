"""Activation functions, each with its backward pass written out (jax.custom_vjp).

Elementwise, so none changes the shape: an L x B x d feature map stays
L x B x d (seed 004). Every backward is the chain rule with the local
derivative stated in the docstring:

    relu         y = max(0, x)                  dx = dy * [x > 0]
    leaky_relu   y = x if x > 0 else a x        dx = dy * (1 if x > 0 else a)
    sigmoid      s = 1 / (1 + e^-x)             dx = dy * s (1 - s)
    tanh         t = tanh(x)                    dx = dy * (1 - t^2)
    scaled_tanh  y = A tanh(S x)                dx = dy * A S (1 - tanh^2(S x))
    softmax      s = e^x / sum e^x              dx = s * (dy - sum(dy * s))
    log_softmax  y = x - log sum e^x            dx = dy - softmax(x) * sum(dy)

Integer inputs are promoted to the default float type by every function but
relu, which keeps the dtype (the notes apply ReLU to integer feature maps).
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
from jax import lax

# LeNet-5 (LeCun et al. 1998, appendix A): f(a) = A tanh(S a) with S = 2/3 and
# A = 1.7159, chosen so that f(1) = 1 and f(-1) = -1 and the second derivative
# peaks near +-1, keeping targets of +-1 out of the saturated tails.
SCALED_TANH_A = 1.7159
SCALED_TANH_S = 2.0 / 3.0


def _as_float(x):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(float)   # float32, or float64 when x64 is enabled
  return x


# ----------------------------------------------------------------------------
# ReLU family
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _relu(x):
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _relu_fwd(x):
  return _relu(x), x


def _relu_bwd(x, dy):
  return (jnp.where(x > 0, dy, jnp.zeros((), dy.dtype)),)


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu(x):
  """Rectified linear unit, y = max(0, x), with an explicit backward.

  Backward: dL/dx = dL/dy * [x > 0]. At x = 0 the function has no derivative;
  we take the subgradient 0, as the notes do ("if x <= 0 the gradient is 0"),
  and as jax.nn.relu does. (jnp.maximum's autodiff would give 1/2 there.)
  """
  return _relu(jnp.asarray(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _leaky_relu(x, slope):
  return jnp.where(x > 0, x, x * slope)


def _leaky_relu_fwd(x, slope):
  return _leaky_relu(x, slope), x


def _leaky_relu_bwd(slope, x, dy):
  return (jnp.where(x > 0, dy, dy * slope),)


_leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


def leaky_relu(x, negative_slope: float = 0.01):
  """Leaky ReLU, y = x for x > 0 and a x otherwise (a = negative_slope).

  Backward: dL/dx = dL/dy * (1 if x > 0 else a); at x = 0 the slope a is
  used, matching relu's convention that x <= 0 is the "off" side.

  Raises:
    ValueError: negative_slope is not a real number.
  """
  if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
    raise ValueError(
        f'leaky_relu: negative_slope must be a real number (e.g. 0.01), got '
        f'{negative_slope!r}.')
  # Integer inputs are promoted: a fractional slope would be truncated.
  return _leaky_relu(_as_float(x), float(negative_slope))


# ----------------------------------------------------------------------------
# Squashing functions
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _sigmoid(x):
  return lax.logistic(x)


def _sigmoid_fwd(x):
  s = lax.logistic(x)
  return s, s


def _sigmoid_bwd(s, dy):
  return (dy * s * (1 - s),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(x):
  """Logistic sigmoid s = 1 / (1 + e^-x). Backward: dL/dx = dL/dy * s (1 - s)."""
  return _sigmoid(_as_float(x))


@jax.custom_vjp
def _tanh(x):
  return jnp.tanh(x)


def _tanh_fwd(x):
  t = jnp.tanh(x)
  return t, t


def _tanh_bwd(t, dy):
  return (dy * (1 - t * t),)


_tanh.defvjp(_tanh_fwd, _tanh_bwd)


def tanh(x):
  """Hyperbolic tangent t = tanh(x). Backward: dL/dx = dL/dy * (1 - t^2)."""
  return _tanh(_as_float(x))


@jax.custom_vjp
def _scaled_tanh(x):
  return SCALED_TANH_A * jnp.tanh(SCALED_TANH_S * x)


def _scaled_tanh_fwd(x):
  t = jnp.tanh(SCALED_TANH_S * x)
  return SCALED_TANH_A * t, t


def _scaled_tanh_bwd(t, dy):
  return (dy * (SCALED_TANH_A * SCALED_TANH_S) * (1 - t * t),)


_scaled_tanh.defvjp(_scaled_tanh_fwd, _scaled_tanh_bwd)


def scaled_tanh(x):
  """LeNet-5's squashing function f(x) = 1.7159 tanh(2x / 3) (LeCun et al. 1998).

  The constants make f(1) = 1 and f(-1) = -1 (to about 2e-5).
  Backward: dL/dx = dL/dy * 1.7159 * (2/3) * (1 - tanh^2(2x / 3)).
  """
  return _scaled_tanh(_as_float(x))


# ----------------------------------------------------------------------------
# Softmax family
# ----------------------------------------------------------------------------

def _normalize_axis(axis, ndim: int, op: str) -> Tuple[int, ...]:
  items = axis if isinstance(axis, (tuple, list)) else (axis,)
  out = []
  for a in items:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      raise ValueError(f'{op}: axis must be an int or a tuple of ints, got {axis!r}.')
    if not -ndim <= a < ndim:
      raise ValueError(
          f'{op}: axis {a} is out of range for an input of rank {ndim} (valid: '
          f'{-ndim} .. {ndim - 1}). For class scores (N, C) use axis=-1.')
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f'{op}: axis {axis!r} names the same dimension twice.')
  return tuple(sorted(out))


def _shifted(x, axes):
  # e^x overflows float32 beyond x ~ 88; subtracting the max makes the largest
  # exponent 0 and leaves softmax unchanged (it is shift invariant).
  return x - lax.stop_gradient(jnp.max(x, axis=axes, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(x, axes):
  e = jnp.exp(_shifted(x, axes))
  return e / jnp.sum(e, axis=axes, keepdims=True)


def _softmax_fwd(x, axes):
  s = _softmax(x, axes)
  return s, s


def _softmax_bwd(axes, s, dy):
  return (s * (dy - jnp.sum(dy * s, axis=axes, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x, axis=-1):
  """Softmax s_i = e^{x_i} / sum_j e^{x_j} over `axis` (an int or tuple of ints).

  Computed as e^{x - max x} / sum e^{x - max x}, finite for any finite input.
  Backward (the Jacobian diag(s) - s s^T applied to dy):
    dL/dx = s * (dy - sum_j dy_j s_j).

  Raises:
    ValueError: axis is not an int/tuple of ints or is out of range.
  """
  x = _as_float(x)
  return _softmax(x, _normalize_axis(axis, x.ndim, 'softmax'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_softmax(x, axes):
  z = _shifted(x, axes)
  return z - jnp.log(jnp.sum(jnp.exp(z), axis=axes, keepdims=True))


def _log_softmax_fwd(x, axes):
  y = _log_softmax(x, axes)
  return y, y


def _log_softmax_bwd(axes, y, dy):
  return (dy - jnp.exp(y) * jnp.sum(dy, axis=axes, keepdims=True),)


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def log_softmax(x, axis=-1):
  """log softmax: y_i = x_i - log sum_j e^{x_j}, stably as z - log sum e^z, z = x - max x.

  Backward: dL/dx = dy - softmax(x) * sum_j dy_j, with softmax(x) = e^y.

  Raises:
    ValueError: axis is not an int/tuple of ints or is out of range.
  """
  x = _as_float(x)
  return _log_softmax(x, _normalize_axis(axis, x.ndim, 'log_softmax'))


def identity(x):
  """y = x (a layer with no activation); the gradient passes unchanged."""
  return jnp.asarray(x)


_ACTIVATIONS = {
    'relu': relu,
    'leaky_relu': leaky_relu,
    'sigmoid': sigmoid,
    'tanh': tanh,
    'scaled_tanh': scaled_tanh,
    'softmax': softmax,
    'log_softmax': log_softmax,
    'identity': identity,
}


def get_activation(name: str) -> Callable:
  """The activation called `name` (case-insensitive), e.g. from a config string."""
  key = name.lower() if isinstance(name, str) else None
  if key not in _ACTIVATIONS:
    raise ValueError(
        f'get_activation: unknown activation {name!r}; valid names are '
        f'{", ".join(sorted(_ACTIVATIONS))}.')
  return _ACTIVATIONS[key]


def list_activations() -> Tuple[str, ...]:
  return tuple(sorted(_ACTIVATIONS))


__all__ = [
    'relu', 'leaky_relu', 'sigmoid', 'tanh', 'scaled_tanh', 'softmax',
    'log_softmax', 'identity', 'get_activation', 'list_activations',
    'SCALED_TANH_A', 'SCALED_TANH_S',
]
