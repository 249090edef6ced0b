"""Network in Network (Lin, Chen & Yan 2013), the CIFAR-10 model.

An "mlpconv" block is a k x k conv followed by 1x1 convs: a small MLP slid
over the image, each 1x1 conv a fully connected layer across channels at
every position. Three blocks, then global average pooling replaces the fully
connected classifier (the last 1x1 conv has num_classes maps, one confidence
map per class):

    block1  conv 192@5x5 pad 2, 1x1 160, 1x1 96     32x32   max pool 3x3/2 -> 16, dropout 0.5
    block2  conv 192@5x5 pad 2, 1x1 192, 1x1 192    16x16   avg pool 3x3/2 ->  8, dropout 0.5
    block3  conv 192@3x3 pad 1, 1x1 192, 1x1 C       8x8    global average pool -> C

ReLU follows every conv, the last included (as in the authors' Caffe model;
`final_relu=False` drops it so the logits can go negative). The 3x3/2 pools
use Caffe's ceil mode (32 -> 16 -> 8), written as padding (0, 1) with the
average taken over the cells inside the input, as Caffe does. 966,986
parameters at 10 classes.

Layer names: 'block{b}_conv' (the k x k conv), 'block{b}_mlp{l}' (the 1x1
convs), 'pool1', 'pool2', 'dropout1', 'dropout2', 'global_pool'.
Intermediates: 'stage1'..'stage3' (block outputs; stage3 is the class maps)
and 'pre_logits' (= the logits here: there is no layer after the pool).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn

from cnn_jax import nn as cnn
from cnn_jax import ops
from cnn_jax.models import registry

ModuleDef = Any

# Per block: (kernel, features) of each conv; None means num_classes.
NIN_CIFAR10 = (
    ((5, 192), (1, 160), (1, 96)),
    ((5, 192), (1, 192), (1, 192)),
    ((3, 192), (1, 192), (1, None)),
)
NIN_TINY = (      # test-only: the same pools and heads, fewer and smaller convs
    ((3, 8), (1, 8)),
    ((3, 8), (1, 8)),
    ((1, None),),
)
_CEIL = ((0, 1), (0, 1))


class NIN(nn.Module):
  """mlpconv blocks, pools with dropout between them, global average pooling.

  Attributes:
    num_classes: output units (the last 1x1 conv's maps).
    blocks: per block, (kernel, features) of each conv (features None = classes);
      blocks are separated by a 3x3/2 max pool, then a 3x3/2 average pool.
    dropout_rate: dropout after each in-between pool.
    final_relu: ReLU on the class maps too (the original model).
    conv: the conv layer (cnn_jax.nn.Conv or flax.linen.Conv).
    dtype: computation dtype.
    axis_name: the pmap axis the batch is split over, so dropout masks are
      those of the global batch; None under jit (sharded or not).
  """
  num_classes: int = 10
  blocks: Sequence[Sequence[Tuple[int, Optional[int]]]] = NIN_CIFAR10
  dropout_rate: float = 0.5
  final_relu: bool = True
  conv: ModuleDef = cnn.Conv
  dtype: Any = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    pools = (functools.partial(cnn.MaxPool, 3, 2, _CEIL),
             functools.partial(cnn.AvgPool, 3, 2, _CEIL, count_include_pad=False))
    if len(self.blocks) - 1 > len(pools):
      raise ValueError(f'NIN: at most {len(pools) + 1} blocks (one pool between each), '
                       f'got {len(self.blocks)}.')
    for b, block in enumerate(self.blocks, start=1):
      last_block = b == len(self.blocks)
      for l, (k, features) in enumerate(block):
        last_conv = last_block and l == len(block) - 1
        name = f'block{b}_conv' if l == 0 else f'block{b}_mlp{l}'
        pad = (k - 1) // 2     # 'same' size for the odd kernels used here
        x = self.conv(self.num_classes if features is None else features, (k, k),
                      padding=((pad, pad), (pad, pad)), dtype=self.dtype, name=name)(x)
        if not last_conv or self.final_relu:
          x = ops.relu(x)
      self.sow('intermediates', f'stage{b}', x)
      if not last_block:
        x = pools[b - 1](name=f'pool{b}')(x)
        x = cnn.Dropout(self.dropout_rate, deterministic=not train,
                        axis_name=self.axis_name, name=f'dropout{b}')(x)
    x = cnn.GlobalAvgPool(name='global_pool')(x)
    self.sow('intermediates', 'pre_logits', x)
    return x


registry.register(
    'nin', functools.partial(NIN, blocks=NIN_CIFAR10), family='nin',
    input_shape=(32, 32, 3), num_classes=10,
    description='Network in Network, CIFAR-10 model: 3 mlpconv blocks and global average '
                'pooling; 966,986 params.')
registry.register(
    'nin_tiny', functools.partial(NIN, blocks=NIN_TINY), family='nin',
    input_shape=(16, 16, 3), num_classes=10,
    description='Test-only NIN: 2+2+1 convs, 8 maps wide, at 16x16x3.')
