"""GoogLeNet / Inception v1 (Szegedy et al. 2014) and its BatchNorm version.

Notes (seeds 000/001): an Inception module applies 1x1, 3x3 and 5x5 convs and
a 3x3 max pool to the same input in parallel and concatenates the results
depth-wise (several receptive field sizes at once). The naive module is
expensive: the pool branch keeps all input channels, so depth only grows, and
the 5x5 convs run on the full depth. The fix is 1x1 "bottleneck" convs that
reduce depth first (and project the pool branch), keeping the spatial size.
The 22-layer net stacks 9 such modules after a conv-pool-2x conv-pool stem,
has no FC layers in its body (global average pooling, then one linear layer)
and adds two auxiliary classifiers (AvgPool-1x1 conv-FC-FC) after 4a and 4d
to inject extra gradient into the lower layers during training.

  * `googlenet`: the paper. Convs have biases and no BN; LRN after the first
    pool and after conv2; ceil-mode max pools (as the Caffe reference); dropout
    0.4; aux heads on by default (`aux_logits`).
  * `googlenet_bn`: torchvision's layout, so its weights import one to one:
    every conv is conv (no bias) + BN (eps 1e-3) + ReLU, no LRN, the "5x5"
    branch uses a 3x3 kernel, the pool after 4e is 2x2, dropout 0.2. Its aux
    heads pool adaptively to 4x4 as torchvision's do (the paper: 5x5/3, which
    gives 4x4 maps at 224x224 from slightly different windows).

In train mode with aux heads on, the aux logits are sown as
'intermediates'/'aux1_logits' and 'aux2_logits' (the paper adds them to the
loss with weight 0.3); `__call__` always returns the main logits only. The aux
parameters are created at init whatever `train` is, so a model initialised in
eval mode (e.g. by `count_params`) trains with the same parameter tree.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry
from cnn_jax.models.alexnet import adaptive_avg_pool
from cnn_jax.models.common import batch_norm

ModuleDef = Any

# The Caffe reference model initialises its convs and FCs with Xavier; a
# function (not a name) so flax.linen.Conv takes it too.
_XAVIER = nn.initializers.glorot_uniform()

# One row of the paper's Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
InceptionRow = Tuple[int, int, int, int, int, int]

# The paper's Table 1, grouped by the max pools between them.
INCEPTION_V1 = (
    (('3a', (64, 96, 128, 16, 32, 32)),
     ('3b', (128, 128, 192, 32, 96, 64))),
    (('4a', (192, 96, 208, 16, 48, 64)),
     ('4b', (160, 112, 224, 24, 64, 64)),
     ('4c', (128, 128, 256, 24, 64, 64)),
     ('4d', (112, 144, 288, 32, 64, 64)),
     ('4e', (256, 160, 320, 32, 128, 128))),
    (('5a', (256, 160, 320, 32, 128, 128)),
     ('5b', (384, 192, 384, 48, 128, 128))),
)


def _sym_pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


def ceil_mode_padding(n: int, window: int, stride: int) -> Tuple[int, int]:
  """(lo, hi) padding that makes a VALID pool give Caffe's / PyTorch's ceil_mode
  output, ceil((n - window) / stride) + 1. ('SAME' gives ceil(n / stride),
  which differs for odd n.)"""
  out = -(-(n - window) // stride) + 1
  if (out - 1) * stride >= n:         # a window starting past the input is dropped
    out -= 1
  return (0, max((out - 1) * stride + window - n, 0))


def max_pool_ceil(x, window: int, stride: int):
  """Max pool with ceil_mode output size (padding cells hold -inf)."""
  pads = tuple(ceil_mode_padding(n, window, stride) for n in x.shape[1:-1])
  return cnn.MaxPool(window, strides=stride, padding=pads)(x)


class ConvUnit(nn.Module):
  """conv + ReLU (the paper), or conv without bias + BN + ReLU (torchvision's
  BasicConv2d) when `norm` is given. Symmetric k // 2 padding unless told."""
  features: int
  kernel_size: int
  conv: ModuleDef = cnn.Conv
  norm: Optional[ModuleDef] = None
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.strides
    # A bias before BN would be cancelled by its mean subtraction.
    y = self.conv(self.features, (k, k), strides=(s, s), padding=_sym_pad(k),
                  use_bias=self.norm is None, kernel_init=_XAVIER, dtype=self.dtype,
                  name='conv')(x)
    if self.norm is not None:
      y = self.norm(name='bn')(y)
    return nn.relu(y)


def _pool_branch(x):
  # 3x3 stride-1 max pool that keeps the spatial size (padding is -inf).
  return cnn.MaxPool(3, strides=1, padding=_sym_pad(3))(x)


class InceptionNaive(nn.Module):
  """Naive Inception module: 1x1, 3x3, 5x5 convs and a 3x3 max pool in parallel,
  concatenated. Output depth f1 + f3 + f5 + C_in: the pool branch passes all
  input channels on, which is why stacking these modules blows up."""
  f1: int
  f3: int
  f5: int
  conv: ModuleDef = cnn.Conv
  norm: Optional[ModuleDef] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    unit = functools.partial(ConvUnit, conv=self.conv, norm=self.norm, dtype=self.dtype)
    return jnp.concatenate([
        unit(self.f1, 1, name='conv1x1')(x),
        unit(self.f3, 3, name='conv3x3')(x),
        unit(self.f5, 5, name='conv5x5')(x),
        _pool_branch(x)], axis=-1)


class Inception(nn.Module):
  """Inception module with dimension reduction (the paper's Figure 2b).

  Branches, concatenated in this order (the Caffe and torchvision order):
  1x1; 1x1 reduce -> 3x3; 1x1 reduce -> 5x5; 3x3 max pool -> 1x1 projection.
  `features` is one row of the paper's Table 1 (#1x1, #3x3 reduce, #3x3,
  #5x5 reduce, #5x5, pool proj); output depth #1x1 + #3x3 + #5x5 + pool proj.
  `conv5x5_kernel` = 3 gives torchvision's version (the names keep the paper's
  roles so that paths read the same in both).
  """
  features: InceptionRow
  conv: ModuleDef = cnn.Conv
  norm: Optional[ModuleDef] = None
  conv5x5_kernel: int = 5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if len(self.features) != 6:
      raise ValueError('Inception features must be a Table 1 row of 6 ints (#1x1, '
                       '#3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), got '
                       f'{self.features!r}.')
    c1, c3r, c3, c5r, c5, pp = self.features
    unit = functools.partial(ConvUnit, conv=self.conv, norm=self.norm, dtype=self.dtype)
    b1 = unit(c1, 1, name='conv1x1')(x)
    b2 = unit(c3, 3, name='conv3x3')(unit(c3r, 1, name='conv3x3_reduce')(x))
    b3 = unit(c5, self.conv5x5_kernel, name='conv5x5')(
        unit(c5r, 1, name='conv5x5_reduce')(x))
    b4 = unit(pp, 1, name='pool_proj')(_pool_branch(x))
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxHead(nn.Module):
  """Auxiliary classifier: 5x5/3 avg pool, 1x1 conv 128 + ReLU, FC 1024 + ReLU,
  dropout 0.7, FC num_classes (4x4x512 -> 2048 inputs to FC 1024 at 224x224).

  pool_size=(h, w) pools adaptively to that size instead (torchvision's aux heads:
  4x4 whatever the input size; the same 4x4 maps at 224x224 from other windows)."""
  num_classes: int
  pool_size: Optional[Tuple[int, int]] = None
  conv: ModuleDef = cnn.Conv
  norm: Optional[ModuleDef] = None
  features: Tuple[int, int] = (128, 1024)
  dropout_rate: float = 0.7
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None   # the pmap axis, for the dropout masks

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.pool_size:
      x = adaptive_avg_pool(x, self.pool_size)
    else:
      if min(x.shape[1:3]) < 5:
        raise ValueError(
            f'GoogLeNet aux head {self.name!r}: its input maps are '
            f'{x.shape[1]}x{x.shape[2]}, smaller than the paper\'s 5x5/3 average pool '
            '(stage-4 maps are 1/16 of the input: 14x14 at 224x224). Pass '
            'aux_pool_size=(4, 4) (adaptive pooling, as torchvision; same parameter '
            'tree as at 224x224), aux_logits=False, or inputs of at least 80x80.')
      x = cnn.AvgPool(5, strides=3, padding='VALID')(x)
    x = ConvUnit(self.features[0], 1, conv=self.conv, norm=self.norm, dtype=self.dtype,
                 name='conv')(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(cnn.Dense(self.features[1], kernel_init=_XAVIER, dtype=self.dtype,
                         name='fc1')(x))
    x = cnn.Dropout(self.dropout_rate, deterministic=not train, axis_name=self.axis_name)(x)
    return cnn.Dense(self.num_classes, kernel_init=_XAVIER, dtype=self.dtype, name='fc2')(x)


class GoogLeNet(nn.Module):
  """GoogLeNet: stem, Inception stages separated by 3x3/2 max pools, GAP, dropout, fc.

  Attributes:
    num_classes: outputs of 'fc' (and of the aux heads).
    stages: groups of (name, Table 1 row); a max pool follows every group but
      the last. Module names are 'inception' + name.
    stem_features: (conv1 7x7/2, conv2_reduce 1x1, conv2 3x3) filters.
    aux_logits: build the auxiliary heads (used in train mode only).
    aux_after: the modules whose outputs feed aux1, aux2, ...
    aux_features: (aux 1x1 conv filters, aux FC units).
    aux_pool_size: None: the paper's 5x5/3 average pool in the aux heads; (h, w):
      adaptive average pooling to that size (torchvision: (4, 4)).
    dropout_rate / aux_dropout_rate: before 'fc' / in the aux heads.
    lrn: LRN after pool1 and after conv2 (the paper; Caffe's LRN parameters).
    batch_norm: conv (no bias) + BN (eps 1e-3) in every conv unit (torchvision).
    conv5x5_kernel: kernel of the "5x5" branch (3 in torchvision's version).
    last_pool_window: window of the max pool before the last stage (torchvision 2).
    conv, dtype: as in the ResNets.
    axis_name: the pmap axis the batch is split over, so BatchNorm statistics
      and dropout masks are those of the global batch; None under jit (sharded
      or not), where both already see the global batch.
  Intermediates: 'stem' (28x28x192 at 224), 'stage1'..'stage3' (the outputs of
  inception 3b, 4e, 5b), 'pre_logits', and in train mode 'aux{i}_logits'.
  """
  num_classes: int = 1000
  stages: Sequence[Sequence[Tuple[str, InceptionRow]]] = INCEPTION_V1
  stem_features: Tuple[int, int, int] = (64, 64, 192)
  aux_logits: bool = True
  aux_after: Sequence[str] = ('4a', '4d')
  aux_features: Tuple[int, int] = (128, 1024)
  aux_pool_size: Optional[Tuple[int, int]] = None
  dropout_rate: float = 0.4
  aux_dropout_rate: float = 0.7
  lrn: bool = True
  batch_norm: bool = False
  conv5x5_kernel: int = 5
  last_pool_window: int = 3
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    names = [n for group in self.stages for n, _ in group]
    missing = [a for a in self.aux_after if a not in names] if self.aux_logits else []
    if missing:
      raise ValueError(f'aux_after names {missing} are not Inception modules of this '
                       f'net ({names}).')
    norm = None
    if self.batch_norm:
      # eps 1e-3 as torchvision's BasicConv2d, so imported statistics mean the same.
      norm = batch_norm(train, self.dtype, self.axis_name, epsilon=1e-3)
    unit = functools.partial(ConvUnit, conv=self.conv, norm=norm, dtype=self.dtype)
    # Caffe's LRN averages over the window (alpha / size); ours multiplies the sum.
    lrn = functools.partial(cnn.LRN, size=5, k=1.0, alpha=1e-4 / 5, beta=0.75)

    f1, f2r, f2 = self.stem_features
    x = unit(f1, 7, strides=2, name='conv1')(x)
    x = max_pool_ceil(x, 3, 2)
    if self.lrn:
      x = lrn()(x)
    x = unit(f2r, 1, name='conv2_reduce')(x)
    x = unit(f2, 3, name='conv2')(x)
    if self.lrn:
      x = lrn()(x)
    x = max_pool_ceil(x, 3, 2)
    self.sow('intermediates', 'stem', x)

    # Aux parameters exist after any init, so eval-mode init and training agree.
    run_aux = self.aux_logits and (train or self.is_initializing())
    for i, group in enumerate(self.stages):
      if i:
        window = self.last_pool_window if i == len(self.stages) - 1 else 3
        x = max_pool_ceil(x, window, 2)
      for name, row in group:
        x = Inception(row, conv=self.conv, norm=norm, conv5x5_kernel=self.conv5x5_kernel,
                      dtype=self.dtype, name=f'inception{name}')(x)
        if run_aux and name in self.aux_after:
          k = list(self.aux_after).index(name) + 1
          logits = AuxHead(self.num_classes, pool_size=self.aux_pool_size, conv=self.conv,
                           norm=norm,
                           features=self.aux_features, dropout_rate=self.aux_dropout_rate,
                           dtype=self.dtype, axis_name=self.axis_name,
                           name=f'aux{k}')(x, train=train)
          if train:
            self.sow('intermediates', f'aux{k}_logits', logits)
      self.sow('intermediates', f'stage{i + 1}', x)

    x = cnn.GlobalAvgPool()(x)
    self.sow('intermediates', 'pre_logits', x)
    x = cnn.Dropout(self.dropout_rate, deterministic=not train, axis_name=self.axis_name)(x)
    return cnn.Dense(self.num_classes, kernel_init=_XAVIER, dtype=self.dtype, name='fc')(x)


GoogLeNetBN = functools.partial(GoogLeNet, batch_norm=True, lrn=False, conv5x5_kernel=3,
                                last_pool_window=2, dropout_rate=0.2, aux_pool_size=(4, 4))

# Test-only: two small modules, each feeding an aux head, and every other
# layer kind once, for 96x96 inputs (96 -> 48 -> 24 -> 12 | 3a, aux1 | 6 | 4a, aux2).
_TINY_STAGES = ((('3a', (4, 4, 8, 2, 4, 4)),), (('4a', (8, 4, 8, 2, 4, 4)),))
_GoogLeNet1 = functools.partial(GoogLeNet, stages=_TINY_STAGES, stem_features=(8, 8, 16),
                                aux_after=('3a', '4a'), aux_features=(8, 16))
_GoogLeNetBN1 = functools.partial(_GoogLeNet1, batch_norm=True, lrn=False, conv5x5_kernel=3,
                                  last_pool_window=2, dropout_rate=0.2)

registry.register('googlenet', GoogLeNet, family='googlenet', input_shape=(224, 224, 3),
                  num_classes=1000, description='GoogLeNet / Inception v1 (Szegedy et al. '
                  '2014): LRN, no BN, two aux heads (train mode)')
registry.register('googlenet_bn', GoogLeNetBN, family='googlenet', input_shape=(224, 224, 3),
                  num_classes=1000, description="GoogLeNet in torchvision's BN layout "
                  '(conv+BN, 3x3 in the 5x5 branch, no LRN)')
registry.register('googlenet_tiny', _GoogLeNet1, family='googlenet', input_shape=(96, 96, 3),
                  num_classes=10, description='Test-only GoogLeNet: two small Inception '
                  'modules, both aux heads, LRN, at 96x96x3.')
registry.register('googlenet_bn_tiny', _GoogLeNetBN1, family='googlenet',
                  input_shape=(96, 96, 3), num_classes=10,
                  description='Test-only googlenet_bn: two small Inception modules, both '
                  'aux heads, at 96x96x3.')
