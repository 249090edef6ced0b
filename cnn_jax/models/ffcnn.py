"""The notes' worked example network (seed 000, `Example_ffcnn`): 695 parameters.

A binary classifier for 3-channel 7x7 images, used in the notes to count
parameters layer by layer:

    layer    PyTorch                               output   params
    conv1    Conv2d(3, 3, 3, stride=2, padding=1)  4x4x3        84  (3*3*3*3 + 3)
    conv2    Conv2d(3, 3, 3, stride=1, padding=3)  8x8x3        84
    bn2d     BatchNorm2d(3)                        8x8x3         6  (gamma, beta)
    maxpool  MaxPool2d(2)                          4x4x3         0
    flatten  Flatten()                             48            0
    fc1      Linear(48, 10)                        10          490
    bn1d     BatchNorm1d(10)                       10           20
    out      Linear(10, 1)                         1            11
    sigmoid  Sigmoid()                             1             0
                                                          total 695

Layer names are the PyTorch attribute names, so a state_dict maps one to one
(fc1's input is flattened channels-last here, (H, W, C), where PyTorch flattens
(C, H, W): importing its fc1 weight needs that permutation).

Like every model in the registry this returns the logit, not the probability:
the notes' final nn.Sigmoid is applied by the loss (sigmoid binary
cross-entropy, numerically stable on logits) or at prediction time
(`jax.nn.sigmoid(logits) > 0.5`, i.e. logits > 0).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn

from cnn_jax import nn as cnn
from cnn_jax.models import registry
from cnn_jax.models.common import batch_norm

ModuleDef = Any


class ExampleFFCNN(nn.Module):
  """conv-conv-BN-maxpool-flatten-fc-BN-fc; see the module docstring.

  axis_name is the pmap axis the batch is split over, for global-batch BN
  statistics; None under jit (sharded or not), where they are global already.
  """
  num_classes: int = 1
  conv: ModuleDef = cnn.Conv
  dtype: Any = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = batch_norm(train, self.dtype, self.axis_name)
    # Tuple kernels and explicit (lo, hi) pads so flax.linen.Conv reads them the same.
    x = self.conv(3, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  name='conv1')(x)
    # No activation anywhere before the sigmoid: the notes' network is this linear.
    x = self.conv(3, (3, 3), strides=(1, 1), padding=((3, 3), (3, 3)), dtype=self.dtype,
                  name='conv2')(x)
    x = norm(name='bn2d')(x)
    x = cnn.MaxPool(2, name='maxpool')(x)
    self.sow('intermediates', 'stage1', x)
    x = cnn.Flatten(name='flatten')(x)
    x = cnn.Dense(10, dtype=self.dtype, name='fc1')(x)
    x = norm(name='bn1d')(x)
    self.sow('intermediates', 'pre_logits', x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='out')(x)


registry.register(
    'example_ffcnn', ExampleFFCNN, family='ffcnn', input_shape=(7, 7, 3), num_classes=1,
    description="The notes' Example_ffcnn (seed 000): 695 params, binary classifier on "
                '7x7x3; returns the logit (sigmoid in the loss).')
