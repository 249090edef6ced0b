"""Normalization layers over `cnn_jax.ops` (BatchNorm etc. come from flax.linen)."""
from __future__ import annotations

import flax.linen as nn

from cnn_jax.ops.lrn import lrn


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


__all__ = ['LRN']
