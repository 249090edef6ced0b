"""Pooling layers: thin flax.linen modules over `cnn_jax.ops.pooling`.

Each layer holds its configuration and calls the op (whose backward pass is
explicit); only `MixedPool(learnable=True)` has a parameter. Attribute names
follow flax.linen's pooling functions (window_shape, strides, padding); as in
the ops, an int window_shape or strides is used in every spatial dimension,
strides=None means strides = window_shape (non-overlapping windows), and
padding takes 'VALID' (default), 'SAME', 'FULL', an int, or per-dimension ints
or (lo, hi) pairs. Inputs are (N, *spatial, C) with 1-3 spatial dimensions.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.ops import pooling as pool_ops

IntOrSeq = Union[int, Sequence[int]]
PaddingLike = Any


class MaxPool(nn.Module):
  """Max pooling; gradient routed to each window's (first) maximum."""
  window_shape: IntOrSeq
  strides: Optional[IntOrSeq] = None
  padding: PaddingLike = 'VALID'

  def __call__(self, x):
    return pool_ops.max_pool(x, self.window_shape, self.strides, self.padding)


class AvgPool(nn.Module):
  """Average pooling; count_include_pad as in `ops.avg_pool` (True: divide by F^d)."""
  window_shape: IntOrSeq
  strides: Optional[IntOrSeq] = None
  padding: PaddingLike = 'VALID'
  count_include_pad: bool = True

  def __call__(self, x):
    return pool_ops.avg_pool(x, self.window_shape, self.strides, self.padding,
                             count_include_pad=self.count_include_pad)


class SumPool(nn.Module):
  """Sum pooling (padding counts as zeros)."""
  window_shape: IntOrSeq
  strides: Optional[IntOrSeq] = None
  padding: PaddingLike = 'VALID'

  def __call__(self, x):
    return pool_ops.sum_pool(x, self.window_shape, self.strides, self.padding)


class LpPool(nn.Module):
  """Lp-norm pooling, (sum |x|^p)^(1/p) per window; p=2 is L2 pooling."""
  window_shape: IntOrSeq
  strides: Optional[IntOrSeq] = None
  padding: PaddingLike = 'VALID'
  p: float = 2.0

  def __call__(self, x):
    return pool_ops.lp_pool(x, self.window_shape, self.strides, self.padding, p=self.p)


class MixedPool(nn.Module):
  """alpha * max_pool + (1 - alpha) * avg_pool (Yu et al. 2014).

  With learnable=False alpha is the fixed float given (in [0, 1]). With
  learnable=True the layer owns a parameter 'alpha_logit' (shape () or, with
  per_channel, (C,)) initialised to logit(alpha), and mixes with
  alpha = sigmoid(alpha_logit): alpha stays in (0, 1) and its gradient never
  vanishes at a clipping boundary. Learnable alpha must start strictly inside
  (0, 1).
  """
  window_shape: IntOrSeq
  strides: Optional[IntOrSeq] = None
  padding: PaddingLike = 'VALID'
  alpha: float = 0.5
  learnable: bool = False
  per_channel: bool = False
  count_include_pad: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    alpha = self.alpha
    if self.learnable:
      if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(
            f'MixedPool: a learnable alpha is sigmoid(alpha_logit), so its initial '
            f'value must lie strictly between 0 and 1; got alpha={alpha!r}.')
      shape = (x.shape[-1],) if self.per_channel else ()
      logit0 = math.log(alpha / (1 - alpha))
      logit = self.param('alpha_logit', nn.initializers.constant(logit0), shape,
                         self.param_dtype)
      alpha = jax.nn.sigmoid(logit).astype(x.dtype)
    elif self.per_channel:
      raise ValueError('MixedPool: per_channel=True needs learnable=True (a fixed '
                       'alpha is one float).')
    return pool_ops.mixed_pool(x, self.window_shape, self.strides, self.padding,
                               alpha=alpha, count_include_pad=self.count_include_pad)


class GlobalAvgPool(nn.Module):
  """Mean over all spatial positions: (N, *spatial, C) -> (N, C) (or keepdims)."""
  keepdims: bool = False

  def __call__(self, x):
    return pool_ops.global_avg_pool(x, keepdims=self.keepdims)


class GlobalMaxPool(nn.Module):
  """Max over all spatial positions: (N, *spatial, C) -> (N, C) (or keepdims)."""
  keepdims: bool = False

  def __call__(self, x):
    return pool_ops.global_max_pool(x, keepdims=self.keepdims)


class SpatialPyramidPool(nn.Module):
  """Spatial pyramid pooling (He et al. 2014): (N, *spatial, C) -> (N, C * sum n^d).

  A fixed-length vector for any input size >= max(levels); levels are the bins
  per dimension at each pyramid level, mode 'max' or 'avg'.
  """
  levels: Sequence[int] = (1, 2, 4)
  mode: str = 'max'

  def __call__(self, x):
    return pool_ops.spatial_pyramid_pool(x, levels=self.levels, mode=self.mode)


__all__ = ['MaxPool', 'AvgPool', 'SumPool', 'LpPool', 'MixedPool', 'GlobalAvgPool',
           'GlobalMaxPool', 'SpatialPyramidPool']
