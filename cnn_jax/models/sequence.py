"""1-D CNNs for sequences: a small net for MNIST-1D and Kim's (2014) TextCNN.

  * `CNN1D`: three 1-D convs (kernel 5, ReLU; the last two stride 2) over a
    (length, channels) signal, flatten (or global pooling), 'fc'. For MNIST-1D
    (Greydanus 2020) inputs are (40, 1) and there are 10 classes.
  * `TextCNN` (Kim 2014, "CNN-rand/static"): token ids (N, L) -> 'embed'
    (vocab x 128) -> parallel 1-D convs of widths 3, 4, 5 with 100 filters
    each ('conv3', 'conv4', 'conv5'), ReLU, max over time (one number per
    filter: the strongest n-gram match anywhere in the sentence), concat 300,
    dropout 0.5, 'fc'. The net's input is integer ids; float inputs are cast
    to int32 so that shape-only tools (count_params) can pass floats.

Intermediates: 'stem' (CNN1D: after conv1; TextCNN: the embeddings),
'pre_logits'.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry

ModuleDef = Any

_POOLS = ('flatten', 'avg', 'max')


class CNN1D(nn.Module):
  """Conv1d(k5)-ReLU x3 (strides 1, 2, 2, symmetric padding 2), flatten, fc.

  Attributes:
    num_classes: outputs of 'fc'.
    features: channels of every conv.
    kernel: conv width.
    strides: one stride per conv (their count sets the depth).
    pool: 'flatten' (fc sees every position: fixed input length), 'avg' or
      'max' (global pooling over time: any length).
    conv: cnn_jax.nn.Conv (explicit backward) or flax.linen.Conv.
  """
  num_classes: int = 10
  features: int = 32
  kernel: int = 5
  strides: Sequence[int] = (1, 2, 2)
  pool: str = 'flatten'
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    if self.pool not in _POOLS:
      raise ValueError(f'pool must be one of {_POOLS}, got {self.pool!r}.')
    if x.ndim != 3:
      raise ValueError(f'CNN1D takes (N, length, channels) inputs, got shape {x.shape}.')
    k = self.kernel
    for i, s in enumerate(self.strides):
      x = self.conv(self.features, (k,), strides=(s,), padding=((k // 2, k // 2),),
                    dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = nn.relu(x)
      if i == 0:
        self.sow('intermediates', 'stem', x)
    if self.pool == 'flatten':
      x = x.reshape((x.shape[0], -1))
    elif self.pool == 'avg':
      x = cnn.GlobalAvgPool()(x)
    else:
      x = cnn.GlobalMaxPool()(x)
    self.sow('intermediates', 'pre_logits', x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


class TextCNN(nn.Module):
  """Kim (2014) sentence classifier.

  Attributes:
    num_classes: outputs of 'fc' (2 for MR / SST-2).
    vocab_size: rows of the embedding table.
    embed_dim: embedding width (Kim uses 300-d word2vec; 128 here, random init).
    widths: filter widths (n-gram sizes) of the parallel convs.
    filters: feature maps per width.
    dropout_rate: on the concatenated max-pooled features (needs a 'dropout'
      rng in train mode).
    conv: cnn_jax.nn.Conv (explicit backward) or flax.linen.Conv.
    axis_name: the pmap axis the batch is split over, so dropout masks are
      those of the global batch; None under jit (sharded or not).
  """
  num_classes: int = 2
  vocab_size: int = 20_000
  embed_dim: int = 128
  widths: Sequence[int] = (3, 4, 5)
  filters: int = 100
  dropout_rate: float = 0.5
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, tokens, *, train: bool):
    if tokens.ndim != 2:
      raise ValueError(f'TextCNN takes (N, length) token ids, got shape {tokens.shape}.')
    if tokens.shape[1] < max(self.widths):
      raise ValueError(f'sequences of length {tokens.shape[1]} are shorter than the '
                       f'widest filter ({max(self.widths)}).')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      tokens = tokens.astype(jnp.int32)
    x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name='embed')(tokens)
    self.sow('intermediates', 'stem', x)
    pooled = []
    for w in self.widths:
      y = self.conv(self.filters, (w,), padding='VALID', dtype=self.dtype,
                    name=f'conv{w}')(x)
      pooled.append(jnp.max(nn.relu(y), axis=1))     # max over time
    x = jnp.concatenate(pooled, axis=-1)
    self.sow('intermediates', 'pre_logits', x)
    x = cnn.Dropout(self.dropout_rate, deterministic=not train, axis_name=self.axis_name)(x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


# Test-only variants.
_CNN1DTiny = functools.partial(CNN1D, features=4)
_TextCNNTiny = functools.partial(TextCNN, vocab_size=50, embed_dim=8, widths=(2, 3),
                                 filters=4)


def _register():
  registry.register('cnn1d', CNN1D, family='sequence', input_shape=(40, 1),
                    num_classes=10, description='1-D CNN for MNIST-1D: 3 convs of 32 '
                    'channels, kernel 5, flatten, fc')
  registry.register('textcnn', TextCNN, family='sequence', input_shape=(64,),
                    num_classes=2, description='TextCNN (Kim 2014): embed 128, convs '
                    '3/4/5 x 100, max over time, dropout 0.5; int token ids (N, L)')
  registry.register('cnn1d_tiny', _CNN1DTiny, family='sequence', input_shape=(16, 1),
                    num_classes=10, description='Test-only 1-D CNN: 4 channels.')
  registry.register('textcnn_tiny', _TextCNNTiny, family='sequence', input_shape=(12,),
                    num_classes=2, description='Test-only TextCNN: vocab 50, embed 8, '
                    'widths 2/3 x 4 filters.')


_register()
