"""DenseNet-BC (Huang et al. 2017), torchvision layout.

Inside a dense block every layer sees the concatenation of all earlier feature
maps of the block and adds `growth_rate` (k) new ones: layer l receives
k0 + k * (l - 1) channels. "B" is the bottleneck: each layer is BN-ReLU-1x1
conv (bn_size * k maps) then BN-ReLU-3x3 conv (k maps), so the 3x3 runs on a
fixed 4k channels however wide the concatenation grows. "C" is compression:
each transition (BN-ReLU-1x1 conv, 2x2/2 average pool) keeps
floor(theta * m) of its m channels, theta = 0.5.

Stem: 7x7/2 conv 2k, BN-ReLU, 3x3/2 max pool (padding 1); after the last
block a BN-ReLU, global average pool and the 'fc' classifier.

Param names: 'conv_init', 'bn_init' (the stem, as the ResNets), 'block{i}' with 'layer{j}' ('bn1', 'conv1',
'bn2', 'conv2'), 'transition{i}' ('bn', 'conv'), 'bn_final', 'fc'.
Intermediates: 'stem', 'stage{i}' (each block's output), 'pre_logits'.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry
from cnn_jax.models.common import batch_norm as _batch_norm
from cnn_jax.models.common import symmetric_padding as _pad

ModuleDef = Any

# torchvision initialises DenseNet convs with kaiming_normal_ (fan_in).
_HE_INIT = nn.initializers.he_normal()






class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size * k), BN-ReLU-3x3 conv (k); returns the k new maps."""
  growth_rate: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef
  dropout: Optional[ModuleDef] = None

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name='bn1')(x))
    y = self.conv(self.bn_size * self.growth_rate, (1, 1), padding='VALID', name='conv1')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.growth_rate, (3, 3), padding=_pad(3), name='conv2')(y)
    if self.dropout is not None:
      y = self.dropout()(y)
    return y


class DenseBlock(nn.Module):
  """`num_layers` dense layers, each fed the concatenation of all before it."""
  num_layers: int
  growth_rate: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef
  dropout: Optional[ModuleDef] = None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      y = DenseLayer(self.growth_rate, self.bn_size, self.conv, self.norm, self.dropout,
                     name=f'layer{j + 1}')(x)
      x = jnp.concatenate([x, y], axis=-1)
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv to `features` maps, 2x2/2 average pool."""
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.norm(name='bn')(x))
    x = self.conv(self.features, (1, 1), padding='VALID', name='conv')(x)
    return cnn.AvgPool((2, 2), strides=(2, 2))(x)


class DenseNet(nn.Module):
  """DenseNet-BC.

  Attributes:
    block_config: dense layers per block, e.g. (6, 12, 24, 16) for DenseNet-121.
    num_classes: outputs of 'fc'.
    growth_rate: k, new maps per dense layer.
    num_init_features: stem width (2k in the paper).
    bn_size: bottleneck width factor (the 1x1 conv makes bn_size * k maps).
    compression: theta, the fraction of channels a transition keeps.
    dropout_rate: after each dense layer's 3x3 conv (0 in torchvision).
    conv: cnn_jax.nn.Conv (explicit backward) or flax.linen.Conv.
    dtype: computation dtype.
    axis_name: the pmap axis the batch is split over, so BatchNorm statistics
      and dropout masks are those of the global batch; None under jit (sharded
      or not), where both already see the global batch.
  """
  block_config: Sequence[int]
  num_classes: int = 1000
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  dropout_rate: float = 0.0
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    if not 0 < self.compression <= 1:
      raise ValueError(f'compression must be in (0, 1], got {self.compression}.')
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_HE_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    dropout = None
    if self.dropout_rate:
      dropout = functools.partial(cnn.Dropout, rate=self.dropout_rate,
                                  deterministic=not train, axis_name=self.axis_name)
    x = conv(self.num_init_features, (7, 7), strides=(2, 2), padding=_pad(7),
             name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    x = cnn.MaxPool((3, 3), strides=(2, 2), padding=_pad(3))(x)
    self.sow('intermediates', 'stem', x)
    for i, n in enumerate(self.block_config):
      x = DenseBlock(n, self.growth_rate, self.bn_size, conv, norm, dropout,
                     name=f'block{i + 1}')(x)
      self.sow('intermediates', f'stage{i + 1}', x)
      if i + 1 < len(self.block_config):
        x = Transition(int(x.shape[-1] * self.compression), conv, norm,
                       name=f'transition{i + 1}')(x)
    x = nn.relu(norm(name='bn_final')(x))
    x = cnn.GlobalAvgPool()(x)
    self.sow('intermediates', 'pre_logits', x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


# depth: (block_config, growth_rate, num_init_features) — Huang et al. Table 1.
CONFIGS = {
    121: ((6, 12, 24, 16), 32, 64),
    169: ((6, 12, 32, 32), 32, 64),
    201: ((6, 12, 48, 32), 32, 64),
    161: ((6, 12, 36, 24), 48, 96),
}

DenseNet121 = functools.partial(DenseNet, block_config=(6, 12, 24, 16))
DenseNet169 = functools.partial(DenseNet, block_config=(6, 12, 32, 32))
DenseNet201 = functools.partial(DenseNet, block_config=(6, 12, 48, 32))
DenseNet161 = functools.partial(DenseNet, block_config=(6, 12, 36, 24), growth_rate=48,
                                num_init_features=96)

# Test-only: blocks of two and one thin layers and a transition.
_DenseNetTiny = functools.partial(DenseNet, block_config=(2, 1), growth_rate=4,
                                  num_init_features=8, bn_size=2)


def _register():
  for depth, (blocks, k, init) in CONFIGS.items():
    registry.register(
        f'densenet{depth}',
        functools.partial(DenseNet, block_config=blocks, growth_rate=k,
                          num_init_features=init),
        family='densenet', input_shape=(224, 224, 3), num_classes=1000,
        description=f'DenseNet-BC-{depth} (Huang et al. 2017), k={k}, torchvision layout')
  registry.register('densenet_tiny', _DenseNetTiny, family='densenet',
                    input_shape=(16, 16, 3), num_classes=10,
                    description='Test-only DenseNet-BC: blocks of 2 and 1 layers, k=4.')


_register()
