"""VGG (Simonyan & Zisserman 2014), configurations A, B, D, E, with or without BN.

Every conv is 3x3, stride 1, pad 1 (two stacked see 5x5, three see 7x7, with
fewer parameters and more nonlinearities: the notes' argument); each block
ends in a 2x2/2 max pool. A configuration is a row of `CONFIGS`: the conv
widths of each of the five blocks. The classifier is torchvision's: adaptive
average pool to 7x7 (the identity at 224x224, where the features are 7x7),
FC 4096, ReLU, dropout, FC 4096, ReLU, dropout, FC num_classes. Parameter
counts at 224x224x3, 1000 classes (equal to torchvision's):

    vgg11 132,863,336   vgg13 133,047,848   vgg16 138,357,544   vgg19 143,667,240

and with BatchNorm after every conv (the conv keeps its bias, as torchvision's
does; BN's scale and bias are trainable, its running mean and variance are
'batch_stats'): vgg11_bn 132,868,840, vgg13_bn 133,053,736, vgg16_bn
138,365,992, vgg19_bn 143,678,248.

Layer names: 'features_block{b}_conv{c}', 'features_block{b}_bn{c}',
'features_block{b}_pool', 'avgpool', 'fc1', 'fc2', 'fc3'. Intermediates:
'stage1'..'stage5' (each block's pooled output) and 'pre_logits'. The conv
default initializer is the conv's own (LeCun normal); for He init pass e.g.
conv=functools.partial(cnn_jax.nn.Conv, kernel_init='he').
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn

from cnn_jax import nn as cnn
from cnn_jax import ops
from cnn_jax.models import registry
from cnn_jax.models.common import batch_norm
from cnn_jax.models.alexnet import AdaptiveAvgPool

ModuleDef = Any

# Conv widths per block (each block: its convs, then a 2x2/2 max pool).
CONFIGS = {
    'A': ((64,), (128,), (256, 256), (512, 512), (512, 512)),                  # VGG-11
    'B': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),          # VGG-13
    'D': ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),          # VGG-16
    'E': ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),          # VGG-19
    'tiny': ((8,), (16,)),                                                    # tests
}
_DEPTHS = {11: 'A', 13: 'B', 16: 'D', 19: 'E'}


class VGG(nn.Module):
  """Blocks of 3x3 convs (+BN) and max pools, then the 3-layer classifier.

  Attributes:
    num_classes: output units.
    blocks: conv widths per block, a row of CONFIGS.
    batch_norm: BatchNorm after every conv (the *_bn variants).
    pool_size: (h, w) of the adaptive average pool before fc1.
    fc_features: width of fc1 and fc2.
    dropout_rate: dropout after fc1 and fc2.
    conv: the conv layer (cnn_jax.nn.Conv or flax.linen.Conv).
    dtype: computation dtype.
    axis_name: the pmap axis the batch is split over, so BatchNorm statistics
      and dropout masks are those of the global batch; None under jit (sharded
      or not), where both already see the global batch.
  """
  num_classes: int = 1000
  blocks: Sequence[Sequence[int]] = CONFIGS['D']
  batch_norm: bool = False
  pool_size: Tuple[int, int] = (7, 7)
  fc_features: int = 4096
  dropout_rate: float = 0.5
  conv: ModuleDef = cnn.Conv
  dtype: Any = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = batch_norm(train, self.dtype, self.axis_name)
    for b, widths in enumerate(self.blocks, start=1):
      for c, features in enumerate(widths, start=1):
        x = self.conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                      name=f'features_block{b}_conv{c}')(x)
        if self.batch_norm:
          x = norm(name=f'features_block{b}_bn{c}')(x)
        x = ops.relu(x)
      x = cnn.MaxPool(2, name=f'features_block{b}_pool')(x)
      self.sow('intermediates', f'stage{b}', x)
    x = AdaptiveAvgPool(tuple(self.pool_size), name='avgpool')(x)
    x = x.reshape(x.shape[0], -1)
    for j in (1, 2):
      x = ops.relu(cnn.Dense(self.fc_features, dtype=self.dtype, name=f'fc{j}')(x))
      if j == 2:
        self.sow('intermediates', 'pre_logits', x)
      x = cnn.Dropout(self.dropout_rate, deterministic=not train, axis_name=self.axis_name,
                      name=f'dropout{j}')(x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc3')(x)


for _depth, _cfg in _DEPTHS.items():
  for _bn in (False, True):
    registry.register(
        f'vgg{_depth}' + ('_bn' if _bn else ''),
        functools.partial(VGG, blocks=CONFIGS[_cfg], batch_norm=_bn),
        family='vgg', input_shape=(224, 224, 3), num_classes=1000,
        description=f'VGG-{_depth} (configuration {_cfg})' + (' with BatchNorm' if _bn else '')
                    + ', torchvision classifier.')
registry.register(
    'vgg_tiny',
    functools.partial(VGG, blocks=CONFIGS['tiny'], pool_size=(2, 2), fc_features=32),
    family='vgg', input_shape=(16, 16, 3), num_classes=10,
    description='Test-only VGG: blocks (8,), (16,), adaptive pool 4x4 -> 2x2, FC 32.')
