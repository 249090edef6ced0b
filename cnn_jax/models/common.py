"""Pieces every model family builds with the same way."""
from __future__ import annotations

import functools
from typing import Tuple

import flax.linen as nn


def batch_norm(train: bool, dtype=None, axis_name=None, epsilon: float = 1e-5):
  """The BatchNorm partial a model builds once per call.

  momentum 0.9 is PyTorch's 0.1 (flax: new = m * old + (1 - m) * batch), so
  running statistics imported from torchvision keep their meaning.
  """
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=epsilon, dtype=dtype, axis_name=axis_name)


def symmetric_padding(k: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """k // 2 on every side of both spatial dims, as torchvision pads. 'SAME' would
  pad a stride-2 layer (0, 1) and shift every output of an imported network."""
  return ((k // 2, k // 2), (k // 2, k // 2))
