"""Residual networks: ImageNet ResNets, pre-activation, ResNeXt, Wide, CIFAR ones.

Notes (seeds 000/001/004): stacking more layers on a plain network makes it
*underfit* (training error rises: the degradation problem), not overfit; a
residual block fits F(x) = H(x) - x and outputs F(x) + x, so an extra block can
fall back to the identity (F = 0) and a deeper net is at least as good as a
shallower one. Blocks are two 3x3 convs (BasicBlock) or, from ResNet-50 on, a
1x1 -> 3x3 -> 1x1 "bottleneck" that runs the 3x3 on 4x fewer channels; every
stage after the first halves the resolution (stride 2) and doubles the filters,
and a 1x1 projection matches the shortcut where the shape changes.

Families here, all one call signature `model.apply(vars, x, train=...)`:

  * `ResNet`: He et al. 2015 ImageNet nets in torchvision's "v1.5" layout (the
    stride sits on the bottleneck's 3x3 conv, not its first 1x1), projection
    shortcuts (option B) with BN on a shape change. `groups`/`width_per_group`
    give ResNeXt (Xie et al. 2017, grouped 3x3) and Wide ResNet-50-2
    (Zagoruyko & Komodakis 2016, 2x wider bottleneck) from the same class;
    `block_cls=PreAct*Block` gives He et al. 2016 "identity mappings" nets.
  * `CifarResNet`: He et al. 2015 sec. 4.2, 6n+2 layers on 32x32 inputs, with
    the paper's parameter-free option-A shortcut, option B, or none (the plain
    twins of the degradation experiment).
  * `WideResNet`: WRN-d-k on CIFAR, pre-activation wide basic blocks.

Param trees are named for checkpoint paths, weight import and freezing:
'conv_init', 'bn_init', 'stage{i}_block{j}' (inside: 'conv1', 'bn1', ...,
'proj', 'proj_bn'), 'bn_final' (pre-activation nets), 'fc'. Intermediates
'stem', 'stage1'.., 'pre_logits' are sown into the 'intermediates' collection.
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

# He et al. 2015 initialise every conv as in "Delving deep into rectifiers":
# Var(W) = 2 / fan_in keeps the activation variance through ReLUs. A function
# (not a name) so that flax.linen.Conv accepts it too.
_HE_INIT = nn.initializers.he_normal()

_SHORTCUTS = ('A', 'B', 'C', 'none')




def _conv(conv: ModuleDef, features: int, k: int, strides: int = 1, groups: int = 1,
          name: Optional[str] = None):
  # Tuples for kernel and strides: flax.linen.Conv reads an int kernel_size as 1-D.
  return conv(features, (k, k), strides=(strides, strides), padding=_pad(k),
              feature_group_count=groups, name=name)


def shortcut_a(x, features: int, strides: int):
  """Option A (He et al. 2015): identity, subsampled by `strides`, with the new
  channels zero-padded after the old ones. Parameter-free."""
  if strides > 1:
    x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f'option-A shortcut cannot reduce channels ({x.shape[-1]} -> '
                     f'{features}); use shortcut="B".')
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
  return x


def _check_shortcut(shortcut: str):
  if shortcut not in _SHORTCUTS:
    raise ValueError(f'shortcut must be one of {_SHORTCUTS}, got {shortcut!r}.')


# ----------------------------------------------------------------------------
# Post-activation blocks (He et al. 2015): conv-BN-ReLU ... conv-BN, add, ReLU.
# ----------------------------------------------------------------------------

class _PostActBlock(nn.Module):
  """Shared fields and shortcut of the post-activation blocks."""
  features: int                   # block output channels / expansion
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  groups: int = 1
  width_per_group: int = 64
  shortcut: str = 'B'             # 'A' pad, 'B' project on shape change, 'C' always, 'none'
  zero_init_last_bn: bool = False

  expansion = 1
  preactivation = False

  def _last_norm(self, name: str):
    # Zeroing the last BN's gamma makes each block start as the identity
    # (Goyal et al. 2017): the net begins as a shallow one and grows into depth.
    init = nn.initializers.zeros_init() if self.zero_init_last_bn else nn.initializers.ones_init()
    return self.norm(scale_init=init, name=name)

  def _residual_add(self, x, y):
    _check_shortcut(self.shortcut)
    if self.shortcut == 'none':       # plain network: no identity path at all
      return y
    out = y.shape[-1]
    changes = self.strides != 1 or x.shape[-1] != out
    if self.shortcut == 'C' or (self.shortcut == 'B' and changes):
      x = _conv(self.conv, out, 1, self.strides, name='proj')(x)
      x = self.norm(name='proj_bn')(x)
    elif changes:                     # 'A', or 'B' with nothing to project
      x = shortcut_a(x, out, self.strides)
    return x + y


class BasicBlock(_PostActBlock):
  """Two 3x3 convs (ResNet-18/34 and the CIFAR nets)."""

  @nn.compact
  def __call__(self, x):
    if self.groups != 1 or self.width_per_group != 64:
      raise ValueError('BasicBlock has no groups/width (ResNeXt and Wide ResNet-50 '
                       'use BottleneckBlock); got groups='
                       f'{self.groups}, width_per_group={self.width_per_group}.')
    y = _conv(self.conv, self.features, 3, self.strides, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv(self.conv, self.features, 3, name='conv2')(y)
    y = self._last_norm('bn2')(y)
    return nn.relu(self._residual_add(x, y))


class BottleneckBlock(_PostActBlock):
  """1x1 reduce -> 3x3 (stride, groups) -> 1x1 expand x4 (ResNet-50+).

  The 3x3 runs on width = features * width_per_group / 64 * groups channels:
  `features` for ResNet, 2x for Wide ResNet-50-2 (width_per_group 128) and
  groups x 4 for ResNeXt 32x4d.
  """
  expansion = 4

  @nn.compact
  def __call__(self, x):
    width = int(self.features * (self.width_per_group / 64.0)) * self.groups
    y = _conv(self.conv, width, 1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv(self.conv, width, 3, self.strides, self.groups, name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = _conv(self.conv, self.features * self.expansion, 1, name='conv3')(y)
    y = self._last_norm('bn3')(y)
    return nn.relu(self._residual_add(x, y))


# ----------------------------------------------------------------------------
# Pre-activation blocks (He et al. 2016, "Identity mappings"): BN-ReLU-conv x2,
# and nothing after the addition, so the identity path is a clean x_{l+1} = x_l + F.
# ----------------------------------------------------------------------------

class _PreActBlock(nn.Module):
  """Shared fields of the pre-activation blocks."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  groups: int = 1
  width_per_group: int = 64
  shortcut: str = 'B'
  zero_init_last_bn: bool = False
  # False for the first unit after the stem, which already ends in BN-ReLU (the
  # paper takes "the first activation right after conv1, before splitting").
  preactivate: bool = True
  dropout: Optional[ModuleDef] = None   # WRN's dropout between the convs

  expansion = 1
  preactivation = True

  def _preact(self, x, name: str):
    if self.zero_init_last_bn:
      raise ValueError('zero_init_last_bn: a pre-activation block ends in a conv, '
                       'not a BN, so there is no last BN gamma to zero.')
    return nn.relu(self.norm(name=name)(x)) if self.preactivate else x

  def _residual_add(self, x, x_act, y):
    _check_shortcut(self.shortcut)
    if self.shortcut == 'none':
      return y
    out = y.shape[-1]
    changes = self.strides != 1 or x.shape[-1] != out
    if self.shortcut == 'C' or (self.shortcut == 'B' and changes):
      # The projection reads the activated input (the paper's code): a 1x1 conv
      # of raw x would be the only un-normalised path. No BN: the next unit's
      # pre-activation normalises the sum.
      return _conv(self.conv, out, 1, self.strides, name='proj')(x_act) + y
    if changes:
      return shortcut_a(x, out, self.strides) + y
    return x + y


class PreActBasicBlock(_PreActBlock):
  """BN-ReLU-3x3 conv, BN-ReLU-3x3 conv, + shortcut (WRN's wide basic block)."""

  @nn.compact
  def __call__(self, x):
    if self.groups != 1 or self.width_per_group != 64:
      raise ValueError('PreActBasicBlock has no groups/width; got groups='
                       f'{self.groups}, width_per_group={self.width_per_group}.')
    a = self._preact(x, 'bn1')
    y = _conv(self.conv, self.features, 3, self.strides, name='conv1')(a)
    y = nn.relu(self.norm(name='bn2')(y))
    if self.dropout is not None:
      y = self.dropout()(y)
    y = _conv(self.conv, self.features, 3, name='conv2')(y)
    return self._residual_add(x, a, y)


class PreActBottleneckBlock(_PreActBlock):
  """BN-ReLU-1x1, BN-ReLU-3x3 (stride, groups), BN-ReLU-1x1 x4, + shortcut."""
  expansion = 4

  @nn.compact
  def __call__(self, x):
    width = int(self.features * (self.width_per_group / 64.0)) * self.groups
    a = self._preact(x, 'bn1')
    y = _conv(self.conv, width, 1, name='conv1')(a)
    y = nn.relu(self.norm(name='bn2')(y))
    y = _conv(self.conv, width, 3, self.strides, self.groups, name='conv2')(y)
    y = nn.relu(self.norm(name='bn3')(y))
    if self.dropout is not None:
      y = self.dropout()(y)
    y = _conv(self.conv, self.features * self.expansion, 1, name='conv3')(y)
    return self._residual_add(x, a, y)




def _stages(mdl, x, *, norm, conv, stage_sizes, widths, first_strides,
            stem_is_activated, groups=1, width_per_group=64, dropout=None):
  """Runs the residual stages, sowing 'stage{i}'; shared by every ResNet here."""
  block_cls = mdl.block_cls
  for i, (n_blocks, features) in enumerate(zip(stage_sizes, widths)):
    for j in range(n_blocks):
      kw = {}
      if block_cls.preactivation:
        kw = dict(preactivate=not (stem_is_activated and i == 0 and j == 0),
                  dropout=dropout)
      elif dropout is not None:
        raise ValueError(f'{block_cls.__name__} has no dropout; use a PreAct block.')
      x = block_cls(features=features, conv=conv, norm=norm,
                    strides=(first_strides[i] if j == 0 else 1), groups=groups,
                    width_per_group=width_per_group, shortcut=mdl.shortcut,
                    zero_init_last_bn=mdl.zero_init_last_bn,
                    name=f'stage{i + 1}_block{j + 1}', **kw)(x)
    mdl.sow('intermediates', f'stage{i + 1}', x)
  return x


def _head(mdl, x, norm):
  if mdl.block_cls.preactivation:
    # The last unit's sum is never normalised inside a block; do it once here.
    x = nn.relu(norm(name='bn_final')(x))
  x = cnn.GlobalAvgPool()(x)
  mdl.sow('intermediates', 'pre_logits', x)
  return cnn.Dense(mdl.num_classes, dtype=mdl.dtype, name='fc')(x)


class ResNet(nn.Module):
  """ImageNet ResNet: 7x7/2 conv, 3x3/2 max pool, residual stages, GAP, fc.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: BasicBlock, BottleneckBlock or their PreAct* versions.
    num_classes: outputs of 'fc'.
    num_filters: stage-1 width (doubled at each later stage).
    groups, width_per_group: bottleneck 3x3 grouping and width (ResNeXt, Wide).
    shortcut: 'B' projection on shape change (torchvision), 'A' zero-pad, 'C'
      projection everywhere, 'none' plain network.
    zero_init_last_bn: start every (post-activation) block as the identity.
    conv: conv layer, `cnn_jax.nn.Conv` (explicit backward) or flax.linen.Conv.
    dtype: computation dtype.
    axis_name: the pmap axis the batch is split over, so BatchNorm statistics
      and dropout masks are those of the global batch; None under jit (sharded
      or not), where both already see the global batch.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 1000
  num_filters: int = 64
  groups: int = 1
  width_per_group: int = 64
  shortcut: str = 'B'
  zero_init_last_bn: bool = False
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_HE_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    x = _conv(conv, self.num_filters, 7, 2, name='conv_init')(x)
    # Pre-activation nets keep this BN-ReLU too: it is the first unit's
    # pre-activation, taken before the max pool and the split into two paths.
    x = nn.relu(norm(name='bn_init')(x))
    x = cnn.MaxPool(3, strides=2, padding=_pad(3))(x)
    self.sow('intermediates', 'stem', x)
    n = len(self.stage_sizes)
    x = _stages(self, x, norm=norm, conv=conv, stage_sizes=self.stage_sizes,
                widths=[self.num_filters * 2 ** i for i in range(n)],
                first_strides=[1] + [2] * (n - 1), stem_is_activated=True,
                groups=self.groups, width_per_group=self.width_per_group)
    return _head(self, x, norm)


class CifarResNet(nn.Module):
  """He et al. 2015 sec. 4.2 CIFAR net: 3x3 conv 16, 3 x n blocks at 16/32/64
  filters (32x32, 16x16, 8x8 maps), GAP, fc; depth = 6n + 2.

  shortcut='A' (default, the paper's: parameter-free subsample + zero-pad),
  'B' (1x1 projection + BN where the shape changes: +2,752 params for the
  16/32/64 widths), 'C' (projection everywhere) or 'none' (the plain twin).
  conv, dtype, axis_name: as in ResNet.
  """
  depth: int
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  shortcut: str = 'A'
  block_cls: ModuleDef = BasicBlock
  zero_init_last_bn: bool = False
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f'CifarResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, '
                       f'110, 1202, ...), got {self.depth}.')
    n = (self.depth - 2) // 6
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_HE_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    x = _conv(conv, self.widths[0], 3, name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    self.sow('intermediates', 'stem', x)
    x = _stages(self, x, norm=norm, conv=conv, stage_sizes=[n] * len(self.widths),
                widths=self.widths, first_strides=[1] + [2] * (len(self.widths) - 1),
                stem_is_activated=True)
    return _head(self, x, norm)


class WideResNet(nn.Module):
  """WRN-depth-k (Zagoruyko & Komodakis 2016) for CIFAR: 3x3 conv 16, 3 stages of
  (depth - 4) / 6 pre-activation wide basic blocks at 16k/32k/64k filters,
  BN-ReLU, GAP, fc. Projection shortcuts (option B) where the shape changes;
  dropout_rate > 0 puts dropout between each block's convs (needs a 'dropout' rng).
  conv, dtype, axis_name: as in ResNet (axis_name serves BN and dropout alike).
  """
  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  dropout_rate: float = 0.0
  shortcut: str = 'B'
  block_cls: ModuleDef = PreActBasicBlock
  zero_init_last_bn: bool = False
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4 with n >= 1 (16, 22, 28, 40, '
                       f'...), got {self.depth}.')
    n = (self.depth - 4) // 6
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_HE_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    dropout = None
    if self.dropout_rate:
      dropout = functools.partial(cnn.Dropout, rate=self.dropout_rate,
                                  deterministic=not train, axis_name=self.axis_name)
    # No BN after the stem: the first unit's pre-activation normalises it.
    x = _conv(conv, 16, 3, name='conv_init')(x)
    self.sow('intermediates', 'stem', x)
    k = self.widen_factor
    x = _stages(self, x, norm=norm, conv=conv, stage_sizes=[n] * 3,
                widths=(16 * k, 32 * k, 64 * k), first_strides=(1, 2, 2),
                stem_is_activated=False, dropout=dropout)
    return _head(self, x, norm)


# ----------------------------------------------------------------------------
# Variants are data.
# ----------------------------------------------------------------------------

# depth: (stage_sizes, block) — He et al. 2015 Table 1.
IMAGENET_CONFIGS = {
    18: ((2, 2, 2, 2), 'basic'),
    34: ((3, 4, 6, 3), 'basic'),
    50: ((3, 4, 6, 3), 'bottleneck'),
    101: ((3, 4, 23, 3), 'bottleneck'),
    152: ((3, 8, 36, 3), 'bottleneck'),
}
_POST = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}
_PRE = {'basic': PreActBasicBlock, 'bottleneck': PreActBottleneckBlock}

ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)
ResNeXt50_32x4d = functools.partial(ResNet50, groups=32, width_per_group=4)
ResNeXt101_32x8d = functools.partial(ResNet101, groups=32, width_per_group=8)
WideResNet50_2 = functools.partial(ResNet50, width_per_group=128)
WideResNet101_2 = functools.partial(ResNet101, width_per_group=128)
WRN28_10 = functools.partial(WideResNet, depth=28, widen_factor=10)

CIFAR_DEPTHS = (20, 32, 44, 56, 110)

# Test-only: one stage of one small block, so a real forward/backward is cheap.
_ResNet1 = functools.partial(ResNet, stage_sizes=(1,), block_cls=BasicBlock, num_filters=8)
_ResNeXt1 = functools.partial(ResNet, stage_sizes=(1,), block_cls=BottleneckBlock,
                              num_filters=8, groups=2, width_per_group=32)
_PreActResNet1 = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=PreActBottleneckBlock,
                                   num_filters=4)
_CifarResNet1 = functools.partial(CifarResNet, depth=8, widths=(4, 8))
_WRN1 = functools.partial(WideResNet, depth=10, widen_factor=1, dropout_rate=0.3)


def _register():
  imagenet = dict(input_shape=(224, 224, 3), num_classes=1000)
  for depth, (sizes, kind) in IMAGENET_CONFIGS.items():
    registry.register(
        f'resnet{depth}', functools.partial(ResNet, stage_sizes=sizes, block_cls=_POST[kind]),
        family='resnet', description=f'ResNet-{depth} (He et al. 2015), torchvision v1.5 '
        'layout', **imagenet)
  for depth, (sizes, kind) in IMAGENET_CONFIGS.items():
    registry.register(
        f'preact_resnet{depth}',
        functools.partial(ResNet, stage_sizes=sizes, block_cls=_PRE[kind]),
        family='resnet', description=f'pre-activation ResNet-{depth} (He et al. 2016, '
        'identity mappings)', **imagenet)
  for name, builder, desc in [
      ('resnext50_32x4d', ResNeXt50_32x4d, 'ResNeXt-50 32x4d (Xie et al. 2017)'),
      ('resnext101_32x8d', ResNeXt101_32x8d, 'ResNeXt-101 32x8d (Xie et al. 2017)'),
      ('wide_resnet50_2', WideResNet50_2, 'Wide ResNet-50-2: 2x wider bottleneck 3x3'),
      ('wide_resnet101_2', WideResNet101_2, 'Wide ResNet-101-2: 2x wider bottleneck 3x3')]:
    registry.register(name, builder, family='resnet', description=desc, **imagenet)
  cifar = dict(family='cifar_resnet', input_shape=(32, 32, 3), num_classes=10)
  for depth in CIFAR_DEPTHS:
    registry.register(f'resnet{depth}', functools.partial(CifarResNet, depth=depth),
                      description=f'CIFAR ResNet-{depth} (He et al. 2015 sec. 4.2), '
                      'option-A shortcuts', **cifar)
  for depth in CIFAR_DEPTHS:
    registry.register(f'plain{depth}',
                      functools.partial(CifarResNet, depth=depth, shortcut='none'),
                      description=f'plain {depth}-layer twin of CIFAR ResNet-{depth} (no '
                      'shortcuts; the degradation experiment)', **cifar)
  registry.register('wrn28_10', WRN28_10, description='Wide ResNet 28-10 (Zagoruyko & '
                    'Komodakis 2016), pre-activation', **cifar)
  # Test-only nets, registered so that the training loop can run them by name.
  registry.register('resnet_tiny', _ResNet1, family='resnet', input_shape=(16, 16, 3),
                    num_classes=10, description='Test-only ResNet: ImageNet stem, one '
                    'stage of one BasicBlock, 8 filters, at 16x16x3.')
  registry.register('cifar_resnet_tiny', _CifarResNet1, description='Test-only CIFAR '
                    'ResNet-8: 4/8 filters, option A, at 32x32x3.', **cifar)


_register()
