"""MobileNets: depthwise separable convolutions (v1) and inverted residuals (v2).

  * `MobileNetV1` (Howard et al. 2017): a 3x3/2 conv, then 13 depthwise
    separable units (3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU),
    global average pool, fc. A k x k conv on C_in -> C_out maps costs
    k*k*C_in*C_out weights; the separable pair costs k*k*C_in + C_in*C_out,
    8-9x fewer for 3x3. `width_multiplier` (the paper's alpha) thins every layer.
  * `MobileNetV2` (Sandler et al. 2018), torchvision layout: inverted residual
    blocks expand a thin bottleneck t = 6 times with a 1x1 conv, filter it with a
    3x3 depthwise conv (ReLU6 after both), and project back with a *linear* 1x1
    conv (no activation: a ReLU in the thin bottleneck would destroy
    information); the shortcut joins the thin ends when stride is 1 and the
    width is kept. Channels are rounded to multiples of 8 as torchvision does.

The depthwise convs are `conv(C, (3, 3), feature_group_count=C)`, so the
injected `conv` (cnn_jax.nn.Conv or flax.linen.Conv) covers them too and the
kernels have torchvision's (3, 3, 1, C) layout. Convs have no bias (a BN
follows each one), padding is symmetric (k // 2) as torchvision pads.

Param names (as the ResNets): 'conv_init', 'bn_init' (the stem), 'block{i}'
(v1: 'dw', 'dw_bn', 'pw', 'pw_bn'; v2: 'expand', 'expand_bn', 'dw', 'dw_bn',
'project', 'project_bn'), 'conv_last', 'bn_last' (v2's 1x1 conv to 1280), 'fc'.
Intermediates: 'stem', 'stage{i}' (the end of each row of the configuration table), 'pre_logits'.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry
from cnn_jax.models.common import batch_norm as _batch_norm
from cnn_jax.models.common import symmetric_padding as _pad

ModuleDef = Any

# torchvision's MobileNet init: kaiming_normal_(mode='fan_out') for convs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')






def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """Rounds a width to the nearest multiple of `divisor`, never more than 10%
  below `v` (the rule of the reference MobileNet code; torchvision uses it)."""
  min_value = divisor if min_value is None else min_value
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def _conv_bn(conv, norm, x, features, k, strides, groups, act, name, bn_name=None):
  """conv (no bias) -> BN (named `bn_name`, default `name`_bn) -> optional act."""
  x = conv(features, (k, k), strides=(strides, strides), padding=_pad(k),
           feature_group_count=groups, name=name)(x)
  x = norm(name=bn_name or f'{name}_bn')(x)
  return x if act is None else act(x)


class SeparableBlock(nn.Module):
  """MobileNet v1 unit: 3x3 depthwise conv-BN-act, 1x1 pointwise conv-BN-act."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = _conv_bn(self.conv, self.norm, x, c, 3, self.strides, c, self.act, 'dw')
    return _conv_bn(self.conv, self.norm, x, self.features, 1, 1, 1, self.act, 'pw')


class InvertedResidual(nn.Module):
  """MobileNet v2 unit: 1x1 expand (t x) -> 3x3 depthwise (stride) -> linear 1x1
  project; identity shortcut when stride 1 and width kept."""
  features: int
  expansion: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  act: Callable = nn.relu6

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    hidden = int(round(c * self.expansion))
    y = x
    if self.expansion != 1:
      y = _conv_bn(self.conv, self.norm, y, hidden, 1, 1, 1, self.act, 'expand')
    y = _conv_bn(self.conv, self.norm, y, hidden, 3, self.strides, hidden, self.act, 'dw')
    # Linear bottleneck: no activation after the projection.
    y = _conv_bn(self.conv, self.norm, y, self.features, 1, 1, 1, None, 'project')
    if self.strides == 1 and c == self.features:
      return x + y
    return y


# (output channels, stride) of v1's 13 separable units (Howard et al. Table 1).
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

# (expansion t, channels c, repeats n, first stride s): Sandler et al. Table 2.
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV1(nn.Module):
  """MobileNet v1: 3x3/2 conv 32, 13 depthwise separable units, GAP, fc.

  Attributes:
    num_classes: outputs of 'fc'.
    width_multiplier: alpha, scales every layer's width (int(c * alpha)).
    blocks: (channels, stride) per separable unit.
    stem_channels: width of the first (full) conv before alpha.
    act: activation (the paper's ReLU; some ports use ReLU6).
    dropout_rate: dropout before 'fc' (0: the paper has none).
    conv: cnn_jax.nn.Conv (explicit backward) or flax.linen.Conv.
    axis_name: the pmap axis the batch is split over, so BatchNorm statistics
      and dropout masks are those of the global batch; None under jit (sharded
      or not), where both already see the global batch.
  """
  num_classes: int = 1000
  width_multiplier: float = 1.0
  blocks: Sequence[Tuple[int, int]] = V1_BLOCKS
  stem_channels: int = 32
  act: Callable = nn.relu
  dropout_rate: float = 0.0
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_CONV_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    a = self.width_multiplier
    x = _conv_bn(conv, norm, x, int(self.stem_channels * a), 3, 2, 1, self.act,
                 'conv_init', 'bn_init')
    self.sow('intermediates', 'stem', x)
    for i, (c, s) in enumerate(self.blocks):
      x = SeparableBlock(int(c * a), conv, norm, strides=s, act=self.act,
                         name=f'block{i + 1}')(x)
      self.sow('intermediates', f'stage{i + 1}', x)
    x = cnn.GlobalAvgPool()(x)
    self.sow('intermediates', 'pre_logits', x)
    if self.dropout_rate:
      x = cnn.Dropout(self.dropout_rate, deterministic=not train,
                      axis_name=self.axis_name)(x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


class MobileNetV2(nn.Module):
  """MobileNet v2 (torchvision layout): 3x3/2 conv 32, 17 inverted residual
  blocks, 1x1 conv 1280, GAP, dropout 0.2, fc.

  Attributes:
    num_classes: outputs of 'fc'.
    width_multiplier: scales every width (rounded to `round_nearest`); the last
      conv is only ever widened (1280 * max(1, multiplier)).
    setting: (t, c, n, s) rows, Sandler et al. Table 2.
    stem_channels, last_channels: widths of the first and last full convs.
    dropout_rate: before 'fc' (needs a 'dropout' rng in train mode).
    conv: cnn_jax.nn.Conv (explicit backward) or flax.linen.Conv.
    axis_name: the pmap axis the batch is split over, so BatchNorm statistics
      and dropout masks are those of the global batch; None under jit (sharded
      or not), where both already see the global batch.
  """
  num_classes: int = 1000
  width_multiplier: float = 1.0
  setting: Sequence[Tuple[int, int, int, int]] = V2_SETTING
  stem_channels: int = 32
  last_channels: int = 1280
  round_nearest: int = 8
  dropout_rate: float = 0.2
  act: Callable = nn.relu6
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_CONV_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    m, r = self.width_multiplier, self.round_nearest
    x = _conv_bn(conv, norm, x, make_divisible(self.stem_channels * m, r), 3, 2, 1,
                 self.act, 'conv_init', 'bn_init')
    self.sow('intermediates', 'stem', x)
    k = 0
    for i, (t, c, n, s) in enumerate(self.setting):
      out = make_divisible(c * m, r)
      for j in range(n):
        k += 1
        x = InvertedResidual(out, t, conv, norm, strides=s if j == 0 else 1, act=self.act,
                             name=f'block{k}')(x)
      self.sow('intermediates', f'stage{i + 1}', x)
    x = _conv_bn(conv, norm, x, make_divisible(self.last_channels * max(1.0, m), r), 1,
                 1, 1, self.act, 'conv_last', 'bn_last')
    x = cnn.GlobalAvgPool()(x)
    self.sow('intermediates', 'pre_logits', x)
    if self.dropout_rate:
      x = cnn.Dropout(self.dropout_rate, deterministic=not train,
                      axis_name=self.axis_name)(x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


# Test-only: a few thin blocks, so a real forward/backward is cheap.
_MobileNetV1Tiny = functools.partial(MobileNetV1, stem_channels=8,
                                     blocks=((16, 1), (16, 2)))
# Second row's repeat has stride 1 and equal widths: covers the shortcut.
_MobileNetV2Tiny = functools.partial(MobileNetV2, stem_channels=8, last_channels=16,
                                     setting=((1, 8, 1, 1), (2, 8, 2, 2)))


def _register():
  imagenet = dict(family='mobilenet', input_shape=(224, 224, 3), num_classes=1000)
  registry.register('mobilenet_v1', MobileNetV1, description='MobileNet v1 1.0-224 '
                    '(Howard et al. 2017): depthwise separable conv-BN-ReLU units',
                    **imagenet)
  for alpha in (0.75, 0.5, 0.25):
    registry.register(f'mobilenet_v1_{int(alpha * 100):03d}',
                      functools.partial(MobileNetV1, width_multiplier=alpha),
                      description=f'MobileNet v1 width multiplier alpha = {alpha}',
                      **imagenet)
  registry.register('mobilenet_v2', MobileNetV2, description='MobileNet v2 (Sandler et '
                    'al. 2018), torchvision layout: inverted residuals, linear '
                    'bottlenecks, ReLU6', **imagenet)
  registry.register('mobilenet_v2_050', functools.partial(MobileNetV2, width_multiplier=0.5),
                    description='MobileNet v2 width multiplier 0.5', **imagenet)
  registry.register('mobilenet_v1_tiny', _MobileNetV1Tiny, family='mobilenet',
                    input_shape=(16, 16, 3), num_classes=10,
                    description='Test-only MobileNet v1: 8-16 channels, two units.')
  registry.register('mobilenet_v2_tiny', _MobileNetV2Tiny, family='mobilenet',
                    input_shape=(16, 16, 3), num_classes=10,
                    description='Test-only MobileNet v2: 8 channels, three blocks.')


_register()
