"""Segmentation networks: ResUNet++ and its U-Net baseline.

Notes (seed 000, "ResUNet++ for multiclass image segmentation"): an improved
ResUNet for colonoscopy; residual units make the deep net easy to train and
skip connections carry information without degradation; squeeze-and-excitation
recalibrates channels from their global averages; atrous spatial pyramid
pooling (ASPP) sees several fields of view at once; an attention block focuses
the decoder; "very lightweight network, has around 4.06 M parameters". The
notes' demo segments wild plants (background + 2 plant classes) from 3-channel
256x256 images with a softmax output.

Both models are fully convolutional and return per-pixel logits (N, H, W,
num_classes): softmax over the last axis for num_classes > 1, a sigmoid of the
single channel for num_classes = 1. Spatial sizes must survive the stride-2
stages and come back exactly: H and W divisible by 8 (ResUNet++) or by
2 ** depth (U-Net, 16 by default); anything else is a ValueError.

  * `ResUNetPlusPlus` (Jha et al. 2019), as the authors' Keras/PyTorch code
    wires it: stem (conv-BN-ReLU-conv + 1x1 conv-BN shortcut, then SE), three
    pre-activation residual units with stride 2 (BN-ReLU-conv x2 + 1x1
    conv-BN shortcut, then SE), an ASPP bridge, three decoder stages
    (attention block, 2x nearest upsampling, concatenation with the skip,
    residual unit with SE), an ASPP and a 1x1 conv head. Every conv has a bias,
    as in the reference.
  * `UNet` (Ronneberger et al. 2015), padded: two 3x3 'SAME' convs (+ BN
    optionally) with ReLU per stage, 2x2 max pool down, 2x2 stride-2
    transposed conv up (halving the channels), concatenation with the skip,
    1x1 head.

Param trees: ResUNet++ 'stem', 'encoder{1,2,3}', 'bridge', 'attention{1,2,3}',
'decoder{1,2,3}', 'head_aspp', 'head'; U-Net 'encoder{1..depth}', 'bridge',
'decoder{1..depth}' (inside: 'up', 'conv1', 'conv2', 'bn1', 'bn2'), 'head'.
decoder1 is always the deepest. Intermediates sown: each of those blocks'
output as '<name>_out' ('stem_out' (ResUNet++), 'encoder{i}_out',
'bridge_out', 'decoder{i}_out'; the suffix keeps the keys apart from the
submodules' own scopes, which `capture_intermediates` fills) and 'pre_logits'
(the features the head reads).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry
from cnn_jax.models.common import batch_norm as _batch_norm

ModuleDef = Any

# He et al. 2015 init for these ReLU nets; a function (not a name) so that
# flax.linen.Conv accepts it too.
_HE_INIT = nn.initializers.he_normal()

RESUNETPP_FILTERS = (16, 32, 64, 128, 256)


def _check_input(x, multiple: int, model: str, why: str):
  if x.ndim != 4:
    raise ValueError(f'{model} takes images (N, H, W, C); got shape {tuple(x.shape)}.')
  h, w = x.shape[1:3]
  if h % multiple or w % multiple:
    fix = lambda n: -(-n // multiple) * multiple
    raise ValueError(
        f'{model} needs input height and width divisible by {multiple} ({why}); got '
        f'{h}x{w}. Resize or pad the images to e.g. {fix(h)}x{fix(w)}.')


def _conv3(conv: ModuleDef, features: int, strides: int = 1, name: Optional[str] = None):
  # Symmetric padding 1 (PyTorch's, and 'SAME' at stride 1): TF's 'SAME' would
  # pad a stride-2 conv (0, 1) and shift every output of an imported network.
  return conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
              name=name)


def _conv1(conv: ModuleDef, features: int, strides: int = 1, name: Optional[str] = None):
  return conv(features, (1, 1), strides=(strides, strides), padding='VALID', name=name)


def upsample_nearest(x, factor: int = 2):
  """(N, H, W, C) -> (N, factor H, factor W, C), each pixel repeated (Keras'
  UpSampling2D and PyTorch's Upsample(mode='nearest'))."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


# ----------------------------------------------------------------------------
# ResUNet++
# ----------------------------------------------------------------------------

class ResUNetStem(nn.Module):
  """conv3x3-BN-ReLU-conv3x3 + (conv1x1-BN shortcut), then SE.

  Params for C_in -> F: (9 C_in F + F) + 2F + (9 F^2 + F) + (C_in F + F) + 2F
  + F^2 / 4 (SE at ratio 8).
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  se_ratio: int = 8

  @nn.compact
  def __call__(self, x):
    y = _conv3(self.conv, self.features, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv3(self.conv, self.features, name='conv2')(y)
    s = self.norm(name='proj_bn')(_conv1(self.conv, self.features, name='proj')(x))
    return cnn.SqueezeExcite(self.se_ratio, conv=self.conv, name='se')(y + s)


class ResUNetUnit(nn.Module):
  """Pre-activation residual unit: BN-ReLU-conv3x3 (stride), BN-ReLU-conv3x3,
  + (conv1x1 (stride)-BN of the raw input), then SE.

  The shortcut is always projected (every unit of ResUNet++ changes width or
  resolution) and reads x before the pre-activation, as in the reference.
  Params for C_in -> F: 2 C_in + (9 C_in F + F) + 2F + (9 F^2 + F)
  + (C_in F + F) + 2F + F^2 / 4.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  se_ratio: int = 8

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name='bn1')(x))
    y = _conv3(self.conv, self.features, self.strides, name='conv1')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = _conv3(self.conv, self.features, name='conv2')(y)
    s = _conv1(self.conv, self.features, self.strides, name='proj')(x)
    s = self.norm(name='proj_bn')(s)
    return cnn.SqueezeExcite(self.se_ratio, conv=self.conv, name='se')(y + s)


class ResUNetPlusPlus(nn.Module):
  """ResUNet++ (Jha et al. 2019): stem, 3 residual encoder units (stride 2), ASPP
  bridge, 3 x (attention, 2x upsampling, concat skip, residual unit), ASPP, 1x1.

  With the default filters, 3 input channels and num_classes=1 it has 4,062,993
  trainable parameters (the paper's "4.06 M"; derivation in
  tests/test_models_segmentation.py) and 7,392 BN running statistics.

  Attributes:
    num_classes: output channels of the 1x1 'head' (logits; 1 for a sigmoid).
    filters: 5 widths: stem, encoder1..3 and the bridge; decoder{1,2,3} take
      filters[3], [2], [1] and the head ASPP filters[0].
    aspp_rates: atrous rates of both ASPP blocks.
    se_ratio: squeeze-and-excitation reduction (gates from C // r channels).
    conv: conv layer, `cnn_jax.nn.Conv` (explicit backward) or flax.linen.Conv.
    dtype: computation dtype.
    axis_name: the pmap axis the batch is split over, so BatchNorm statistics
      are those of the global batch; None under jit.
  """
  num_classes: int = 1
  filters: Sequence[int] = RESUNETPP_FILTERS
  aspp_rates: Sequence[int] = (6, 12, 18, 1)
  se_ratio: int = 8
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    _check_input(x, 8, 'ResUNet++', 'three stride-2 encoder units, each undone by a 2x '
                 'upsampling')
    f = tuple(self.filters)
    if len(f) != 5:
      raise ValueError(f'ResUNet++ filters must be 5 widths (stem, encoder1-3, bridge), '
                       f'got {self.filters!r}.')
    conv = functools.partial(self.conv, dtype=self.dtype, kernel_init=_HE_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    unit = functools.partial(ResUNetUnit, conv=conv, norm=norm, se_ratio=self.se_ratio)
    aspp = functools.partial(cnn.ASPP, conv=conv, norm=norm, rates=tuple(self.aspp_rates))

    skips = [ResUNetStem(f[0], conv, norm, self.se_ratio, name='stem')(x)]
    self.sow('intermediates', 'stem_out', skips[0])
    for i in range(1, 4):
      skips.append(unit(f[i], strides=2, name=f'encoder{i}')(skips[-1]))
      self.sow('intermediates', f'encoder{i}_out', skips[-1])
    y = aspp(f[4], name='bridge')(skips.pop())
    self.sow('intermediates', 'bridge_out', y)
    for i in range(1, 4):
      skip = skips.pop()
      y = cnn.AttentionBlock(norm=norm, conv=conv, name=f'attention{i}')(skip, y)
      y = jnp.concatenate([upsample_nearest(y), skip], axis=-1)
      y = unit(f[4 - i], name=f'decoder{i}')(y)
      self.sow('intermediates', f'decoder{i}_out', y)
    y = aspp(f[0], name='head_aspp')(y)
    self.sow('intermediates', 'pre_logits', y)
    return _conv1(conv, self.num_classes, name='head')(y)


# ----------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------

def _double_conv(x, features, conv, norm):
  # Called inside a compact __call__: the layers belong to that module.
  for j in (1, 2):
    x = _conv3(conv, features, name=f'conv{j}')(x)
    if norm is not None:
      x = norm(name=f'bn{j}')(x)
    x = nn.relu(x)
  return x


class UNetStage(nn.Module):
  """(3x3 'SAME' conv [-BN] - ReLU) x 2; convs lose their bias under BN."""
  features: int
  conv: ModuleDef
  norm: Optional[ModuleDef] = None

  @nn.compact
  def __call__(self, x):
    return _double_conv(x, self.features, self.conv, self.norm)


class UNetUp(nn.Module):
  """2x2 stride-2 transposed conv to `features` ('up'), concat the skip, stage."""
  features: int
  conv: ModuleDef
  conv_transpose: ModuleDef
  norm: Optional[ModuleDef] = None

  @nn.compact
  def __call__(self, skip, x):
    x = self.conv_transpose(self.features, (2, 2), strides=(2, 2), padding='VALID',
                            name='up')(x)
    x = jnp.concatenate([skip, x], axis=-1)
    return _double_conv(x, self.features, self.conv, self.norm)


class UNet(nn.Module):
  """U-Net (Ronneberger et al. 2015) with 'SAME' padding: the output has the
  input's size and skips need no cropping.

  Widths features * 2**i for encoder i+1 (i < depth) and the bridge at
  features * 2**depth. With the defaults (64 .. 1024), 3 input channels and
  num_classes=1: 31,031,745 trainable parameters without BN, 31,037,633 with
  it (derivation in tests/test_models_segmentation.py).

  Attributes:
    num_classes: output channels of the 1x1 'head' (logits; 1 for a sigmoid).
    features: width of the first stage.
    depth: number of 2x2 max pools (and of transposed-conv upsamplings).
    use_batch_norm: BN after every 3x3 conv (then without bias); the 2015
      paper has none.
    conv: conv layer, `cnn_jax.nn.Conv` or flax.linen.Conv.
    conv_transpose: upsampling layer, `cnn_jax.nn.ConvTranspose`.
      (flax.linen.ConvTranspose has the same parameter shapes but, per
      `cnn_jax.nn.ConvTranspose`'s docstring, a spatially flipped kernel.)
    dtype, axis_name: as in ResUNetPlusPlus.
  """
  num_classes: int = 1
  features: int = 64
  depth: int = 4
  use_batch_norm: bool = False
  conv: ModuleDef = cnn.Conv
  conv_transpose: ModuleDef = cnn.ConvTranspose
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    if not isinstance(self.depth, int) or self.depth < 1:
      raise ValueError(f'UNet depth must be a positive int, got {self.depth!r}.')
    _check_input(x, 2 ** self.depth, 'U-Net',
                 f'{self.depth} 2x2 max pools, each undone by a 2x upsampling')
    bn = self.use_batch_norm
    conv = functools.partial(self.conv, dtype=self.dtype, kernel_init=_HE_INIT,
                             use_bias=not bn)
    up = functools.partial(self.conv_transpose, dtype=self.dtype, kernel_init=_HE_INIT)
    norm = _batch_norm(train, self.dtype, self.axis_name) if bn else None
    skips = []
    for i in range(self.depth):
      x = UNetStage(self.features * 2 ** i, conv, norm, name=f'encoder{i + 1}')(x)
      self.sow('intermediates', f'encoder{i + 1}_out', x)
      skips.append(x)
      x = cnn.MaxPool((2, 2), strides=(2, 2))(x)
    x = UNetStage(self.features * 2 ** self.depth, conv, norm, name='bridge')(x)
    self.sow('intermediates', 'bridge_out', x)
    for i in range(self.depth):
      x = UNetUp(self.features * 2 ** (self.depth - 1 - i), conv, up, norm,
                 name=f'decoder{i + 1}')(skips.pop(), x)
      self.sow('intermediates', f'decoder{i + 1}_out', x)
    self.sow('intermediates', 'pre_logits', x)
    head = functools.partial(self.conv, dtype=self.dtype, kernel_init=_HE_INIT)
    return _conv1(head, self.num_classes, name='head')(x)


# ----------------------------------------------------------------------------
# Variants are data.
# ----------------------------------------------------------------------------

# Test-only: the same wiring at 4..64 filters on 32x32 inputs.
_ResUNetPPTiny = functools.partial(ResUNetPlusPlus, filters=(4, 8, 16, 32, 64))
_UNetTiny = functools.partial(UNet, features=4)


def _register():
  # The notes' plants demo: 3-channel 256x256 images, background + 2 plant classes.
  plants = dict(family='segmentation', input_shape=(256, 256, 3), num_classes=3)
  registry.register('resunetpp', ResUNetPlusPlus, description='ResUNet++ (Jha et al. '
                    '2019), filters 16-256, per-pixel logits', **plants)
  # Same input and classes as resunetpp, so it is a drop-in baseline.
  registry.register('unet', UNet, description='U-Net (Ronneberger et al. 2015), padded '
                    "('SAME') 3x3 convs, 64-1024 filters, per-pixel logits", **plants)
  tiny = dict(family='segmentation', input_shape=(32, 32, 3), num_classes=3)
  registry.register('resunetpp_tiny', _ResUNetPPTiny, description='Test-only ResUNet++: '
                    'filters 4/8/16/32/64 at 32x32x3.', **tiny)
  registry.register('unet_tiny', _UNetTiny, description='Test-only U-Net: 4..64 filters '
                    'at 32x32x3.', **tiny)


_register()
