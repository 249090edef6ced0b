"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998), as printed and as usually rebuilt.

`lenet5_classic` follows the paper and the notes' summary table (seed 003):

    layer  what                                          output     params
    C1     conv 6@5x5                                    28x28x6       156
    S2     trainable subsampling 2x2 s2                  14x14x6        12
    C3     conv 16@5x5, partial connection table         10x10x16    1,516
    S4     trainable subsampling 2x2 s2                  5x5x16         32
    C5     conv 120@5x5                                  1x1x120    48,120
    F6     full 84                                       84         10,164
    output Euclidean RBF over 10 fixed 84-dim codes      10              0
                                                               total 60,000

with the squashing function f(a) = 1.7159 tanh(2a/3) after C1..F6. The pieces
that modern rebuilds drop:

  * S2/S4 subsampling: each map sums its 2x2 window, multiplies by one
    trainable coefficient and adds one trainable bias (2 params per map), then
    squashes. The coefficient starts at 1/4, i.e. as average pooling.
  * C3's connection table (seed 003 / the paper's Table I): map j of C3 sees
    only the S2 maps marked in column j (3, 4 or 6 of them; 60 connections),
    "to break the symmetry in the network and keep the number of connections
    within reasonable bounds". Only connected kernels are stored: the maps are
    grouped by fan-in and each group is one grouped conv over the gathered
    inputs (`PartialConv`), so the parameter tree holds exactly the paper's
    60 * 25 + 16 = 1,516 numbers and the model still runs on `conv=`.
  * The RBF output: y_i = sum_j (x_j - w_ij)^2, the squared distance of F6's
    output to a fixed code of class i; the model returns logits = -y (the
    closest code gets the largest logit), so softmax cross-entropy applies as
    for every other model (the paper's own loss adds a competitive term; see
    its eq. 9). The paper's codes are stylised 7x12 bitmaps of the ASCII
    characters; these are NOT those bitmaps but Walsh-Hadamard rows
    (`rbf_codes`): deterministic, +-1, and nearly orthogonal. They are
    constants of the computation, not variables, so nothing about them is
    trained, checkpointed or counted.

`lenet5` is the usual modern rebuild (and the notes' seed-001 slide): ReLU,
2x2 max pooling, a full C3 (2,416 params) and a dense 10-way output
(850): 61,706 parameters.

Both take 32x32x1 (MNIST padded by 2, as LeCun fed it). For 28x28 inputs pass
`c1_padding='SAME'`: C1 then zero-pads by 2, which is the same as padding the
image to 32x32, so every later shape and count is unchanged.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnn_jax import nn as cnn
from cnn_jax import ops
from cnn_jax.models import registry
from cnn_jax.ops import pooling as pool_ops

ModuleDef = Any

# C3's connection table from the notes (seed 003) = LeCun et al. 1998, Table I.
# Row i is S2 map i, column j is C3 map j; 'X' marks a connection.
LECUN_C3_TABLE = (
    'X   XXX  XXXX XX',
    'XX   XXX  XXXX X',
    'XXX   XXX  X XXX',
    ' XXX  XXXX  X XX',
    '  XXX  XXXX XX X',
    '   XXX  XXXX XXX',
)


def connection_matrix(rows: Sequence[str]) -> np.ndarray:
  """Bool (C_in, C_out) matrix from rows of 'X' (connected) and ' ' (not)."""
  widths = {len(r) for r in rows}
  if len(widths) != 1 or set(''.join(rows)) - {'X', ' '}:
    raise ValueError(f"connection table rows must be equally long strings of 'X' and "
                     f"' ', got {rows!r}.")
  return np.array([[c == 'X' for c in r] for r in rows], dtype=bool)


class PartialConv(nn.Module):
  """A conv in which output map j sees only the input maps `connections` marks.

  Output maps with the same fan-in n form one group: their inputs are gathered
  side by side (n channels per map) and one `conv` with feature_group_count =
  number of maps computes them all, kernel (*kernel_size, n, maps). Submodules
  are named 'fanin{n}'; the output channels are put back in table order. Only
  connected weights exist: sum_j fan_in(j) * prod(kernel_size) + C_out params.
  """
  connections: Tuple[str, ...]          # rows as in LECUN_C3_TABLE
  kernel_size: Tuple[int, int]
  padding: Any = 'VALID'
  conv: ModuleDef = cnn.Conv
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    table = connection_matrix(self.connections)
    if table.shape[0] != x.shape[-1]:
      raise ValueError(f'PartialConv: the connection table has {table.shape[0]} input '
                       f'rows but the input has {x.shape[-1]} channels.')
    fan_in = table.sum(axis=0)
    if (fan_in == 0).any():
      raise ValueError(f'PartialConv: output maps {np.flatnonzero(fan_in == 0).tolist()} '
                       f'have no input connection.')
    outputs, order = [], []
    for n in sorted(set(fan_in.tolist())):
      maps = np.flatnonzero(fan_in == n)
      gather = np.concatenate([np.flatnonzero(table[:, j]) for j in maps])
      outputs.append(self.conv(len(maps), self.kernel_size, padding=self.padding,
                               feature_group_count=len(maps), dtype=self.dtype,
                               name=f'fanin{n}')(x[..., gather]))
      order.extend(maps.tolist())
    y = jnp.concatenate(outputs, axis=-1)
    if order != sorted(order):
      y = y[..., np.argsort(order)]
    return y


class TrainableSubsample(nn.Module):
  """LeNet-5's S layers: y_c = coefficient_c * sum_{window} x_c + bias_c.

  Two parameters per map; the squashing function is applied by the caller.
  `window_shape`/`strides` carry the geometry so summaries see a 2x2/2 pool.
  """
  window_shape: int = 2
  strides: Optional[int] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    # Starting at 1/area makes the layer an average pool before training.
    area = float(self.window_shape ** (x.ndim - 2))
    coefficient = self.param('coefficient', nn.initializers.constant(1.0 / area), (c,),
                             self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (c,), self.param_dtype)
    return pool_ops.sum_pool(x, self.window_shape, self.strides) * coefficient + bias


def rbf_codes(num_classes: int, dim: int) -> np.ndarray:
  """Fixed +-1 class codes (num_classes, dim): Walsh-Hadamard rows 1..num_classes.

  codes[i, j] = (-1)^popcount((i + 1) & j), i.e. rows 1.. of the Sylvester
  Hadamard matrix of order 2^ceil(log2 dim), truncated to `dim` columns (row 0,
  all ones, is skipped). Distinct rows are guaranteed while num_classes <
  2^bit_length(dim - 1) (128 for dim 84). Not the paper's 7x12 bitmaps.
  """
  limit = 2 ** (dim - 1).bit_length()
  if not 1 <= num_classes < limit:
    raise ValueError(f'rbf_codes: {dim}-dim Walsh codes give at most {limit - 1} '
                     f'distinct classes, got num_classes={num_classes}.')
  rows = np.arange(1, num_classes + 1)[:, None] & np.arange(dim)[None, :]
  parity = np.zeros_like(rows)
  while rows.any():
    parity ^= rows & 1
    rows >>= 1
  return (1 - 2 * parity).astype(np.float32)


class RBFOutput(nn.Module):
  """Euclidean RBF units: logits_i = -sum_j (x_j - code_ij)^2, fixed codes."""
  num_classes: int

  def __call__(self, x):
    codes = jnp.asarray(rbf_codes(self.num_classes, x.shape[-1]), x.dtype)
    return -jnp.sum(jnp.square(x[..., None, :] - codes), axis=-1)


class LeNet5(nn.Module):
  """LeNet-5: C1-S2-C3-S4-C5-F6-output; the variants differ only in attributes.

  Attributes:
    num_classes: output units.
    activation: name in `cnn_jax.ops.get_activation` ('scaled_tanh', 'relu').
    subsampling: 'trainable' (LeCun's S layers), 'max' or 'avg' (2x2 stride 2).
    c3_connections: C3's connection table (rows of 'X'/' ', e.g.
      LECUN_C3_TABLE), or None for a full 6->16 conv.
    head: 'rbf' (fixed-code Euclidean RBF, logits = -distance^2) or 'dense'.
    c1_padding: 'VALID' for 32x32 inputs; 'SAME' runs 28x28 inputs unchanged.
    filter_size: kernel of C1, C3 and C5; 5 in the paper. Tests use 3 at 18x18 (maps
      16-8-6-3-1, the same pattern), because compile time grows with taps.
    conv: the conv layer (cnn_jax.nn.Conv or flax.linen.Conv).
    dtype: computation dtype.
  """
  num_classes: int = 10
  activation: str = 'relu'
  subsampling: str = 'max'
  c3_connections: Optional[Tuple[str, ...]] = None
  head: str = 'dense'
  c1_padding: Any = 'VALID'
  filter_size: int = 5
  conv: ModuleDef = cnn.Conv
  dtype: Any = None

  def _subsample(self, name: str):
    if self.subsampling == 'trainable':
      return TrainableSubsample(2, name=name)
    if self.subsampling == 'max':
      return cnn.MaxPool(2, name=name)
    if self.subsampling == 'avg':
      return cnn.AvgPool(2, name=name)
    raise ValueError(f"LeNet5: subsampling must be 'trainable', 'max' or 'avg', got "
                     f'{self.subsampling!r}.')

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train   # no dropout or BatchNorm in LeNet-5
    if self.head not in ('rbf', 'dense'):
      raise ValueError(f"LeNet5: head must be 'rbf' or 'dense', got {self.head!r}.")
    act = ops.get_activation(self.activation)
    k = (self.filter_size, self.filter_size)
    conv = functools.partial(self.conv, kernel_size=k, dtype=self.dtype)
    x = act(conv(6, padding=self.c1_padding, name='c1')(x))
    x = act(self._subsample('s2')(x))
    self.sow('intermediates', 'stage1', x)
    if self.c3_connections is None:
      x = conv(16, padding='VALID', name='c3')(x)
    else:
      x = PartialConv(tuple(self.c3_connections), k, conv=self.conv,
                      dtype=self.dtype, name='c3')(x)
    x = act(x)
    x = act(self._subsample('s4')(x))
    self.sow('intermediates', 'stage2', x)
    # C5 is a conv: a full layer on 5x5 maps, but still a conv on larger inputs.
    x = act(conv(120, padding='VALID', name='c5')(x))
    x = x.reshape(x.shape[0], -1)
    x = act(cnn.Dense(84, dtype=self.dtype, name='f6')(x))
    self.sow('intermediates', 'pre_logits', x)
    if self.head == 'rbf':
      return RBFOutput(self.num_classes, name='output')(x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='output')(x)


registry.register(
    'lenet5_classic',
    functools.partial(LeNet5, activation='scaled_tanh', subsampling='trainable',
                      c3_connections=LECUN_C3_TABLE, head='rbf'),
    family='lenet', input_shape=(32, 32, 1), num_classes=10,
    description='LeNet-5 as in LeCun et al. 1998: scaled tanh, trainable subsampling, '
                'partial C3 table, fixed-code RBF output (logits = -distance^2); '
                '60,000 params.')
registry.register(
    'lenet5', functools.partial(LeNet5, activation='relu', subsampling='max', head='dense'),
    family='lenet', input_shape=(32, 32, 1), num_classes=10,
    description='Modern LeNet-5: ReLU, 2x2 max pooling, full C3, dense output; 61,706 '
                'params.')
