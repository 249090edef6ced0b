"""Normalization layers over `cnn_jax.ops`."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax.ops.batch_norm import batch_norm_train
from cnn_jax.ops.lrn import lrn


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` whose training-mode pass is `cnn_jax.ops.batch_norm`.

  Same fields, variables ('params': scale, bias; 'batch_stats': mean, var),
  initialization and results (to float32 rounding), so checkpoints and code
  written for flax's layer carry over, and `isinstance(m, flax.linen.BatchNorm)`
  holds. In training mode on float32, channels-last input it runs
  `cnn_jax.ops.batch_norm`: the same statistics, and the explicit backward
  formulas instead of autodiff of the forward graph. Every
  other case -- running averages (evaluation), init, a mask, axis_index_groups,
  another feature axis, use_fast_variance=False, other dtypes -- is flax's own
  code path.
  """

  @nn.compact
  def __call__(self, x, use_running_average=None, *, mask=None):
    use_ra = nn.merge_param('use_running_average', self.use_running_average,
                            use_running_average)
    f32 = jnp.dtype(jnp.float32)
    axis = self.axis if isinstance(self.axis, int) else None
    plain = (not use_ra and mask is None and not self.is_initializing()
             and self.axis_index_groups is None and self.use_fast_variance
             and getattr(x, 'ndim', 0) >= 2 and axis is not None and axis % x.ndim == x.ndim - 1
             and jnp.dtype(x.dtype) == f32 and jnp.dtype(self.param_dtype) == f32
             and (self.dtype is None or jnp.dtype(self.dtype) == f32))
    if not plain:
      return super().__call__(x, use_running_average, mask=mask)
    c = x.shape[-1]
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, stats_dtype), (c,))
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, stats_dtype), (c,))
    scale = (self.param('scale', self.scale_init, (c,), self.param_dtype) if self.use_scale
             else jnp.ones((c,), jnp.float32))
    bias = (self.param('bias', self.bias_init, (c,), self.param_dtype) if self.use_bias
            else jnp.zeros((c,), jnp.float32))
    y, mean, var = batch_norm_train(x, scale, bias, epsilon=self.epsilon,
                                    axis_name=self.axis_name)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


class LRN(nn.Module):
  """Local Response Normalization (AlexNet) over `cnn_jax.ops.lrn`; no parameters.

  b = a / (k + alpha * sum_{window} a^2)^beta, the window `size` channels
  ('across_channels', AlexNet's) or a size^d spatial neighbourhood of each
  channel ('within_channel'). alpha multiplies the sum, as in the paper; for
  PyTorch's LocalResponseNorm (which averages) use alpha = alpha_torch / size.
  Defaults are AlexNet's: size=5, k=2, alpha=1e-4, beta=0.75.
  """
  size: int = 5
  k: float = 2.0
  alpha: float = 1e-4
  beta: float = 0.75
  mode: str = 'across_channels'

  def __call__(self, x):
    return lrn(x, size=self.size, k=self.k, alpha=self.alpha, beta=self.beta,
               mode=self.mode)


__all__ = ['BatchNorm', 'LRN']
