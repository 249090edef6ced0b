"""Batch normalization in training mode, with its backward pass written out.

Over the M = prod(reduction dims) values of each channel c:

    mean = sum(x) / M                 var = sum(x^2) / M - mean^2   (biased)
    xhat = (x - mean) * rstd          rstd = 1 / sqrt(var + eps)
    y    = xhat * scale + bias

and, for an output gradient g (the standard derivation: mean and var depend on
every x of the channel):

    dbias  = sum(g)                   dscale = sum(g * xhat) = rstd * (sum(g * x) - mean * dbias)
    dx     = scale * rstd / M * (M * g - dbias - xhat * dscale)

`batch_norm_train` returns (y, mean, var) -- mean and var for the running
statistics -- and its VJP uses these formulas instead of differentiating the
forward graph. Autodiff of flax's forward writes (x - mean) out as a saved
tensor; here only x is saved, and every reduction reads x and g as they are:
sum(g * xhat) is taken as rstd * (sum(g * x) - mean * sum(g)), because XLA
wrote out the broadcast xhat before reducing it, one more full-size tensor
through memory per layer. On CPU, where these passes are memory-bound, the
resnet20 training step is ~1.15x faster with this layer than with flax's
(benchmarks/README.md, "Session 8").

Rounding: sum(g * x) - mean * sum(g) cancels as E[x^2] - E[x]^2 does in the
fast variance both this op and flax use, so the errors are of the same size
as flax's (tests/test_batch_norm.py measures both against float64: ~1e-5 of
the largest gradient at |mean| = 10 std, ~1e-3 at 100 std).

Cross-device statistics (pmap / shard_map with `axis_name`): mean and mean of
squares are averaged over the axis, so M is the global count; in the backward
the two sums in dx are summed over the axis too, while dscale and dbias stay
each device's own contribution -- exactly what autodiff of the pmean'd forward
gives, so the train step's gradient averaging is unchanged.

The variance is flax's fast form (E[x^2] - E[x]^2, clipped at 0), so the
results equal `flax.linen.BatchNorm` (use_fast_variance=True, its default) to
float32 rounding; `cnn_jax.nn.BatchNorm` uses this op in training mode.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax


def _count(x, axes) -> int:
  n = 1
  for a in axes:
    n *= x.shape[a]
  return n


def _global_count(x, axes, axis_name) -> jax.Array | int:
  n = _count(x, axes)
  if axis_name is None:
    return n
  return lax.psum(n, axis_name)


def _stats(x, axes, axis_name):
  """(mean, var) over `axes` (and over `axis_name` devices), flax's fast variance."""
  n = _count(x, axes)
  mean = jnp.sum(x, axes) / n
  mean_sq = jnp.sum(x * x, axes) / n
  if axis_name is not None:
    mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
  var = jnp.maximum(0.0, mean_sq - mean * mean)
  return mean, var


def _forward(x, scale, bias, epsilon, axis_name):
  axes = tuple(range(x.ndim - 1))
  mean, var = _stats(x, axes, axis_name)
  rstd = lax.rsqrt(var + epsilon)
  y = (x - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, axis_name):
  return _forward(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
  return _forward(x, scale, bias, epsilon, axis_name)


def _batch_norm_bwd(epsilon, axis_name, res, cts):
  del epsilon
  x, mean, rstd, scale = res
  g, g_mean, g_var = cts
  axes = tuple(range(x.ndim - 1))
  m = _global_count(x, axes, axis_name)
  xc = x - mean
  xhat = xc * rstd
  dbias = jnp.sum(g, axes)                  # this device's share
  dscale = (jnp.sum(g * x, axes) - mean * dbias) * rstd
  if axis_name is not None:
    sum_g, sum_gx = lax.psum((dbias, dscale), axis_name)
  else:
    sum_g, sum_gx = dbias, dscale
  dx = (scale * rstd / m) * (m * g - sum_g - xhat * sum_gx)
  # The running-statistics outputs are normally not differentiated (their
  # cotangents are zero); where they are: d mean / dx = 1 / M and
  # d var / dx = 2 (x - mean) / M, each summed over the devices' cotangents.
  if axis_name is not None:
    g_mean, g_var = lax.psum((g_mean, g_var), axis_name)
  dx = dx + (g_mean + 2.0 * g_var * xc) / m
  return dx, dscale, dbias


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, *,
                     epsilon: float = 1e-5,
                     axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch norm over all axes but the last (channels-last input).

  Args:
    x: (..., C) float input; statistics run over every axis but the last.
    scale, bias: (C,) affine parameters (pass ones / zeros for none).
    epsilon: added to the variance.
    axis_name: a pmap / shard_map axis to compute the statistics across.

  Returns:
    (y, mean, var): the normalized output and the batch mean and (biased)
    variance of each channel, for the running statistics.
  """
  if x.ndim < 2:
    raise ValueError(f'batch_norm_train: x must be (..., C) with at least one axis to '
                     f'reduce over; got shape {x.shape}.')
  c = x.shape[-1]
  if scale.shape != (c,) or bias.shape != (c,):
    raise ValueError(f'batch_norm_train: scale and bias must have shape ({c},) for x of '
                     f'shape {x.shape}; got {scale.shape} and {bias.shape}.')
  return _batch_norm(x, scale, bias, float(epsilon), axis_name)


__all__ = ['batch_norm_train']
