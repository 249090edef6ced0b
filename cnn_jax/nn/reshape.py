"""Flatten as a layer, so per-layer tables list it as the notes' tables do."""
import flax.linen as nn


class Flatten(nn.Module):
  """(N, *dims) -> (N, prod(dims)), row-major (channels-last order)."""

  def __call__(self, x):
    return x.reshape(x.shape[0], -1)
