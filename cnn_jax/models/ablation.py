"""Configurable nets for the ablation experiments: every design choice the notes argue
about is one field.

`AblationCNN` is a VGG-like stack: stages of convolutions at one width each, each
stage ending in a downsampling step, then global average pooling (or a flatten),
an optional hidden FC layer and the output layer. Its fields are the notes'
questions:

  kernels          the conv kernel sizes inside every stage: (7,) vs (3, 3, 3) is
                   one 7x7 vs three stacked 3x3 at the same receptive field
                   (parameters 7^2 C^2 vs 3 * 3^2 C^2 at C channels in and out)
  widths           channels per stage (len(widths) stages; depth = len(widths) *
                   len(kernels) convs, plus the FC layers)
  downsample       'max', 'avg', 'l2' (2x2/2 pools), 'strided' (the stage's last
                   conv has stride 2) or 'none'
  padding          'same' (k // 2 zeros: maps keep their size), 'valid' (no
                   padding: every k x k conv trims k - 1 pixels), or an int p with
                   0 <= p <= k // 2 for every kernel: p zeros on each side, so a
                   k x k conv trims k - 1 - 2p pixels (the amounts in between)
  batch_norm, lrn, dropout_rate   on/off (LRN: AlexNet's, after the stage's last
                   activation, before the downsampling; dropout before the head)
  activation       any name of cnn_jax.ops.activations ('relu', 'sigmoid', 'tanh', ...)
  residual         identity shortcuts around every conv whose input and output
                   shapes agree (same padding, stride 1, same width)

`MLP` flattens its input and applies Dense layers (hidden=() is logistic
regression) - the baselines of the MNIST-1D comparison.

Param names: 'stage{i}_conv{j}', 'stage{i}_bn{j}', 'fc_hidden', 'fc'; MLP:
'dense{i}', 'fc'. Intermediates: 'stage{i}', 'pre_logits'.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry
from cnn_jax.models.common import batch_norm as _batch_norm
from cnn_jax.ops import activations

ModuleDef = Any
DOWNSAMPLING = ('max', 'avg', 'l2', 'strided', 'none')
PADDINGS = ('same', 'valid')


class AblationCNN(nn.Module):
  """Stages of k x k convs (see the module docstring for every field)."""
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  kernels: Sequence[int] = (3, 3)
  downsample: str = 'max'
  padding: Union[str, int] = 'same'
  batch_norm: bool = True
  lrn: bool = False
  dropout_rate: float = 0.0
  activation: str = 'relu'
  residual: bool = False
  fc_features: int = 0             # a hidden FC layer before the output (0: none)
  global_pool: bool = True         # False: flatten the last maps instead
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.downsample not in DOWNSAMPLING:
      raise ValueError(f'downsample must be one of {DOWNSAMPLING}, got {self.downsample!r}.')
    _check_padding(self.padding, self.kernels)
    if not self.widths or not self.kernels:
      raise ValueError('widths and kernels need at least one entry each.')
    act = activations.get_activation(self.activation)
    norm = _batch_norm(train, self.dtype, self.axis_name)
    nd = x.ndim - 2
    for i, width in enumerate(self.widths, start=1):
      for j, k in enumerate(self.kernels, start=1):
        last = j == len(self.kernels)
        stride = 2 if (self.downsample == 'strided' and last) else 1
        pad = _pad_amount(self.padding, k)
        if any(s < k - 2 * pad for s in x.shape[1:-1]):
          raise ValueError(
              f'stage {i} conv {j}: a {k}x{k} conv with padding {self.padding!r} needs '
              f'maps of at least {k - 2 * pad}, got {tuple(x.shape[1:-1])}. Use fewer '
              "stages, padding='same', or a larger input.")
        y = self.conv(width, (k,) * nd, strides=(stride,) * nd, padding=((pad, pad),) * nd,
                      use_bias=not self.batch_norm, dtype=self.dtype,
                      name=f'stage{i}_conv{j}')(x)
        if self.batch_norm:
          y = norm(name=f'stage{i}_bn{j}')(y)
        if self.residual and y.shape == x.shape:
          y = y + x
        x = act(y)
      if self.lrn:
        x = cnn.LRN()(x)
      if self.downsample in ('max', 'avg', 'l2'):
        if any(s < 2 for s in x.shape[1:-1]):
          raise ValueError(f'stage {i}: maps of {tuple(x.shape[1:-1])} are too small to '
                           'pool 2x2; use fewer stages or a larger input.')
        pool = {'max': cnn.MaxPool, 'avg': cnn.AvgPool, 'l2': cnn.LpPool}[self.downsample]
        x = pool((2,) * nd, strides=(2,) * nd)(x)
      self.sow('intermediates', f'stage{i}', x)
    x = cnn.GlobalAvgPool()(x) if self.global_pool else x.reshape(x.shape[0], -1)
    if self.fc_features:
      x = act(cnn.Dense(self.fc_features, dtype=self.dtype, name='fc_hidden')(x))
    self.sow('intermediates', 'pre_logits', x)
    if self.dropout_rate:
      x = cnn.Dropout(self.dropout_rate, deterministic=not train,
                      axis_name=self.axis_name)(x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


def _check_padding(padding, kernels):
  if isinstance(padding, bool) or not isinstance(padding, (str, int)):
    raise ValueError(f"padding must be 'same', 'valid' or an int, got {padding!r}.")
  if isinstance(padding, str):
    if padding not in PADDINGS:
      raise ValueError(f'padding must be one of {PADDINGS} or an int, got {padding!r}.')
    return
  too_big = [k for k in kernels if padding > k // 2]
  if padding < 0 or too_big:
    raise ValueError(
        f'padding={padding} is outside 0..k // 2 for kernel size(s) {too_big or list(kernels)}: '
        "0 is 'valid', k // 2 is 'same'; more would add rows of pure zeros around every map.")


def _pad_amount(padding, k):
  if padding == 'same':
    return k // 2
  if padding == 'valid':
    return 0
  return int(padding)


class MLP(nn.Module):
  """Flatten, Dense layers of `hidden` units with `activation`, Dense num_classes.
  hidden=() is multinomial logistic regression."""
  num_classes: int = 10
  hidden: Sequence[int] = (100, 100)
  activation: str = 'relu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    act = activations.get_activation(self.activation)
    x = x.reshape(x.shape[0], -1)
    for i, units in enumerate(self.hidden, start=1):
      x = act(cnn.Dense(units, dtype=self.dtype, name=f'dense{i}')(x))
    self.sow('intermediates', 'pre_logits', x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


registry.register('ablation_cnn', AblationCNN, family='ablation', input_shape=(32, 32, 1),
                  num_classes=10, description='Configurable VGG-like CNN for ablations: '
                  'kernels, widths, downsampling, padding, BN, LRN, dropout, activation.')
registry.register('ablation_cnn_tiny', functools.partial(AblationCNN, widths=(4, 8)),
                  family='ablation', input_shape=(16, 16, 1), num_classes=10,
                  description='Test-only ablation_cnn: 2 stages of 4 and 8 channels.')
registry.register('mlp', MLP, family='mlp', input_shape=(40, 1), num_classes=10,
                  description='MLP: flatten, 2 hidden ReLU layers of 100 units.')
registry.register('logistic_regression', functools.partial(MLP, hidden=()), family='mlp',
                  input_shape=(40, 1), num_classes=10,
                  description='Multinomial logistic regression: flatten, one Dense layer.')
