"""AlexNet (Krizhevsky, Sutskever & Hinton 2012), its torchvision form, and ZFNet.

One class, `AlexNet`, runs a table of conv layers (`ConvLayer` rows: conv,
ReLU, optional LRN and max pool) and the three-layer classifier; each variant
is a table:

  * `alexnet`: the notes' table (seed 001) at 227x227x3: conv1 96@11x11/4,
    LRN, 3x3/2 overlapping max pool; conv2 256@5x5 pad 2, LRN, pool; conv3
    384, conv4 384, conv5 256 (3x3 pad 1), pool -> 6x6x256; FC 4096, 4096,
    1000 with dropout 0.5. 62,378,344 params, layer by layer: 34,944;
    614,656; 885,120; 1,327,488; 884,992; 37,752,832; 16,781,312; 4,097,000.
    LRN follows the ReLU and precedes the pool ("Response-normalization layers
    follow the first and second convolutional layers. Max-pooling layers
    follow both response-normalization layers"), with size 5, k 2,
    alpha 1e-4 (multiplying the sum), beta 0.75.
  * `alexnet_grouped`: the paper's two-GPU split, conv2/conv4/conv5 with
    groups=2 (each half sees only its GPU's 48/192/192 input maps): the
    notes' slide figures 307K / 663K / 442K; 60,965,224 params in all.
  * `alexnet_torchvision`: torchvision's single-tower rebuild at 224x224x3
    (64@11x11/4 pad 2, 192@5x5, 384, 256, 256; no LRN; adaptive average pool
    to 6x6, which is the identity at 224; dropout on the *inputs* of fc1 and
    fc2): 61,100,840 params, the figure torchvision publishes.
  * `zfnet`: Zeiler & Fergus 2013 (Fig. 3) at 224x224x3: conv1 96@7x7/2,
    3x3/2 pool, LRN; conv2 256@5x5/2, pool, LRN; 384, 384, 256 3x3; pool; FC
    4096, 4096, 1000. Their map sizes 110-55-26-13-13-6 come out of conv1
    padding 1 and Caffe's ceil-mode pooling, written here as pool padding
    (0, 1). LRN stands in for their (across-map) contrast normalization.
    62,357,608 params (conv1 14,208; the rest as AlexNet's).

Intermediates: 'stage1'..'stage5' after each conv layer's block (ReLU, LRN,
pool) and 'pre_logits' (fc2 after ReLU, before dropout). fc1 reads the pooled
maps flattened channels-last (H, W, C); PyTorch flattens (C, H, W), so
importing a torchvision fc1 weight needs that permutation.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnn_jax import nn as cnn
from cnn_jax import ops
from cnn_jax.models import registry
from cnn_jax.ops.pooling import pyramid_bins

ModuleDef = Any
Padding = Union[str, int, Tuple[Tuple[int, int], ...]]


# ----------------------------------------------------------------------------
# Adaptive average pooling (torchvision's AdaptiveAvgPool2d)
# ----------------------------------------------------------------------------

def adaptive_avg_pool(x, output_size: Sequence[int]):
  """Average over bins [floor(i*W/n), ceil((i+1)*W/n)) per spatial dimension.

  The bins of PyTorch's adaptive pooling (they overlap by a cell when n does
  not divide W, and repeat cells when W < n). Equal sizes return x itself
  (AlexNet at 224, VGG at 224). A box average is the product of 1-D averages,
  so each dimension is one small matrix product with A[i, lo:hi] = 1/(hi - lo);
  the gradient is the transposed product, i.e. each bin spreads dY/|bin|.

  Args:
    x: (N, *spatial, C).
    output_size: one int per spatial dimension (or one int for all).

  Returns:
    (N, *output_size, C).
  """
  nd = x.ndim - 2
  out = (output_size,) * nd if isinstance(output_size, int) else tuple(output_size)
  if len(out) != nd or not all(isinstance(n, int) and n >= 1 for n in out):
    raise ValueError(f'adaptive_avg_pool: output_size must be {nd} positive ints for '
                     f'input {tuple(x.shape)}, got {output_size!r}.')
  for axis, (w, n) in enumerate(zip(x.shape[1:-1], out), start=1):
    if w == n:
      continue
    a = np.zeros((n, w), np.float32)
    for i, (lo, hi) in enumerate(pyramid_bins(w, n)):
      a[i, lo:hi] = 1.0 / (hi - lo)
    x = jnp.moveaxis(jnp.tensordot(jnp.asarray(a, x.dtype), x, axes=[[1], [axis]]), 0, axis)
  return x


class AdaptiveAvgPool(nn.Module):
  """`adaptive_avg_pool` as a layer: (N, *spatial, C) -> (N, *output_size, C)."""
  output_size: Union[int, Tuple[int, ...]]

  def __call__(self, x):
    return adaptive_avg_pool(x, self.output_size)


# ----------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------

class ConvLayer(NamedTuple):
  """One conv layer of the feature extractor: conv, ReLU, [LRN], [max pool]."""
  features: int
  kernel: int
  stride: int = 1
  padding: Padding = 0               # int p, 'VALID'/'SAME', or ((lo, hi), (lo, hi))
  groups: int = 1
  lrn: Optional[str] = None          # 'before_pool' (AlexNet) or 'after_pool' (ZFNet)
  pool: Optional[Tuple[int, int, Padding]] = None   # max pool (window, stride, padding)


_POOL = (3, 2, 0)                    # overlapping 3x3 stride-2 max pool
_CEIL_POOL = (3, 2, ((0, 1), (0, 1)))  # Caffe's ceil mode where the windows overhang

ALEXNET = (
    ConvLayer(96, 11, 4, 0, lrn='before_pool', pool=_POOL),
    ConvLayer(256, 5, 1, 2, lrn='before_pool', pool=_POOL),
    ConvLayer(384, 3, 1, 1),
    ConvLayer(384, 3, 1, 1),
    ConvLayer(256, 3, 1, 1, pool=_POOL),
)
# The two-GPU original: layers 2, 4 and 5 only see the maps on their own GPU.
ALEXNET_GROUPED = tuple(l._replace(groups=2) if i in (1, 3, 4) else l
                        for i, l in enumerate(ALEXNET))
ALEXNET_TORCHVISION = (
    ConvLayer(64, 11, 4, 2, pool=_POOL),
    ConvLayer(192, 5, 1, 2, pool=_POOL),
    ConvLayer(384, 3, 1, 1),
    ConvLayer(256, 3, 1, 1),
    ConvLayer(256, 3, 1, 1, pool=_POOL),
)
ZFNET = (
    ConvLayer(96, 7, 2, 1, lrn='after_pool', pool=_CEIL_POOL),
    ConvLayer(256, 5, 2, 0, lrn='after_pool', pool=_CEIL_POOL),
    ConvLayer(384, 3, 1, 1),
    ConvLayer(384, 3, 1, 1),
    ConvLayer(256, 3, 1, 1, pool=_POOL),
)
# Test-only: the mechanisms (stride, groups, both LRN placements, ceil-mode and
# plain pools, a non-identity adaptive pool) at 31x31x3, with 3x3 and 1x1
# kernels because compile time grows with the number of kernel taps.
ALEXNET_TINY = (
    ConvLayer(8, 3, 2, 0, lrn='before_pool', pool=_POOL),                # 15 -> 7
    ConvLayer(8, 3, 1, 1, groups=2, lrn='after_pool', pool=_CEIL_POOL),  # 7 -> 3
    ConvLayer(8, 1, 1, 0, groups=2, pool=_POOL),                         # 3 -> 1
)


def _pad(p: Padding):
  # Explicit pairs, so flax.linen.Conv (conv=nn.Conv) reads them exactly as we do.
  return ((p, p), (p, p)) if isinstance(p, int) else p


class AlexNet(nn.Module):
  """Conv table + classifier (fc1, fc2: fc_features with ReLU and dropout; fc3).

  Attributes:
    num_classes: output units.
    layers: `ConvLayer` rows (ALEXNET, ALEXNET_GROUPED, ALEXNET_TORCHVISION, ZFNET).
    adaptive_pool: (h, w) to average-pool the last maps to (torchvision's 6x6),
      or None to flatten them as they are.
    fc_features: width of fc1 and fc2.
    dropout_rate: dropout probability in the classifier.
    dropout_before_fc: True drops the inputs of fc1 and fc2 (torchvision);
      False drops the outputs of fc1 and fc2 (the paper: "dropout in the
      first two fully-connected layers").
    lrn: (size, k, alpha, beta) of the LRN layers.
    conv: the conv layer (cnn_jax.nn.Conv or flax.linen.Conv).
    dtype: computation dtype.
    axis_name: the pmap axis the batch is split over, so dropout masks are
      those of the global batch; None under jit (sharded or not).
  """
  num_classes: int = 1000
  layers: Sequence[ConvLayer] = ALEXNET
  adaptive_pool: Optional[Tuple[int, int]] = None
  fc_features: int = 4096
  dropout_rate: float = 0.5
  dropout_before_fc: bool = False
  lrn: Tuple[int, float, float, float] = (5, 2.0, 1e-4, 0.75)
  conv: ModuleDef = cnn.Conv
  dtype: Any = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    size, k, alpha, beta = self.lrn
    for i, layer in enumerate(self.layers, start=1):
      if layer.lrn not in (None, 'before_pool', 'after_pool'):
        raise ValueError(f"AlexNet: ConvLayer.lrn must be None, 'before_pool' or "
                         f"'after_pool', got {layer.lrn!r} in layer {i}.")
      x = self.conv(layer.features, (layer.kernel, layer.kernel),
                    strides=(layer.stride, layer.stride), padding=_pad(layer.padding),
                    feature_group_count=layer.groups, dtype=self.dtype,
                    name=f'conv{i}')(x)
      x = ops.relu(x)
      norm = cnn.LRN(size, k, alpha, beta, name=f'lrn{i}') if layer.lrn else None
      if layer.lrn == 'before_pool':
        x = norm(x)
      if layer.pool is not None:
        window, stride, padding = layer.pool
        x = cnn.MaxPool(window, stride, _pad(padding), name=f'pool{i}')(x)
      if layer.lrn == 'after_pool':
        x = norm(x)
      self.sow('intermediates', f'stage{i}', x)
    if self.adaptive_pool is not None:
      x = AdaptiveAvgPool(tuple(self.adaptive_pool), name='avgpool')(x)
    x = x.reshape(x.shape[0], -1)

    dropout = functools.partial(cnn.Dropout, self.dropout_rate, deterministic=not train,
                                axis_name=self.axis_name)
    dense = functools.partial(cnn.Dense, dtype=self.dtype)
    for j in (1, 2):
      if self.dropout_before_fc:
        x = dropout(name=f'dropout{j}')(x)
      x = ops.relu(dense(self.fc_features, name=f'fc{j}')(x))
      if j == 2:
        self.sow('intermediates', 'pre_logits', x)
      if not self.dropout_before_fc:
        x = dropout(name=f'dropout{j}')(x)
    return dense(self.num_classes, name='fc3')(x)


registry.register(
    'alexnet', functools.partial(AlexNet, layers=ALEXNET), family='alexnet',
    input_shape=(227, 227, 3), num_classes=1000,
    description="AlexNet as in the notes' table (single tower, LRN, overlapping pools); "
                '62,378,344 params.')
registry.register(
    'alexnet_grouped', functools.partial(AlexNet, layers=ALEXNET_GROUPED), family='alexnet',
    input_shape=(227, 227, 3), num_classes=1000,
    description='AlexNet with the two-GPU split (groups=2 on conv2, conv4, conv5); '
                '60,965,224 params.')
registry.register(
    'alexnet_torchvision',
    functools.partial(AlexNet, layers=ALEXNET_TORCHVISION, adaptive_pool=(6, 6),
                      dropout_before_fc=True),
    family='alexnet', input_shape=(224, 224, 3), num_classes=1000,
    description="torchvision's AlexNet (64-192-384-256-256, no LRN, adaptive 6x6 pool); "
                '61,100,840 params.')
registry.register(
    'zfnet', functools.partial(AlexNet, layers=ZFNET), family='alexnet',
    input_shape=(224, 224, 3), num_classes=1000,
    description='ZFNet (Zeiler & Fergus 2013): 7x7/2 conv1, 5x5/2 conv2, ceil-mode pools; '
                '62,357,608 params.')
registry.register(
    'alexnet_tiny',
    functools.partial(AlexNet, layers=ALEXNET_TINY, adaptive_pool=(2, 2), fc_features=16),
    family='alexnet', input_shape=(31, 31, 3), num_classes=10,
    description='Test-only AlexNet-shaped net (groups, LRN, ceil and adaptive pools) at '
                '31x31x3.')
