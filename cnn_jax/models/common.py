"""Pieces every model family builds with the same way."""
from __future__ import annotations

import functools
from typing import Tuple

from cnn_jax import nn as cnn_nn


def batch_norm(train: bool, dtype=None, axis_name=None, epsilon: float = 1e-5):
  """The BatchNorm partial a model builds once per call: `cnn_jax.nn.BatchNorm`
  (flax's layer with the explicit training-mode backward).

  momentum 0.9 is PyTorch's 0.1 (flax: new = m * old + (1 - m) * batch), so
  running statistics imported from torchvision keep their meaning.
  """
  # cnn_nn.BatchNorm is looked up per call, so a benchmark can swap in flax's layer.
  return functools.partial(cnn_nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=epsilon, dtype=dtype, axis_name=axis_name)


def symmetric_padding(k: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """k // 2 on every side of both spatial dims, as torchvision pads. 'SAME' would
  pad a stride-2 layer (0, 1) and shift every output of an imported network."""
  return ((k // 2, k // 2), (k // 2, k // 2))
