"""Highway networks (Srivastava, Greff & Schmidhuber 2015).

A highway layer carries its input through a learned gate:

  y = H(x) * T(x) + x * (1 - T(x)),   T(x) = sigmoid(W_T x + b_T),

H being the usual affine transform + nonlinearity. A negative gate bias
(b_T = -2 here, the paper uses -1 to -3) starts every layer close to the
identity (T ~ 0.12), so information and gradients cross very deep stacks
before the layers learn to transform; in the limit b_T -> -inf the layer is
exactly y = x, and b_T -> +inf gives a plain layer y = H(x). H and T keep the
width of x, so the carry path needs no projection.

  * `HighwayMLP`: flatten, 'dense_init' Dense to `width` (784 -> 50 for MNIST as in
    the paper's experiments), `depth` highway layers, 'fc'.
  * `HighwayCNN`: 'conv_init' 3x3 conv, then per stage a 2x2 max pool and a 3x3
    'transition' conv that widens (after the first stage) and `depth` conv
    highway layers with 3x3 H and T convs; GAP, 'fc'.

Param names: 'dense_init' / 'conv_init', 'transition{i}', 'highway{i}' ('H', 'T'), 'fc' (the CNN's
highway layers are 'stage{i}_highway{j}'). Intermediates 'stem', 'stage{i}',
'pre_logits'.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry

ModuleDef = Any

GATE_BIAS = -2.0


def highway(h, t, x):
  """y = H * T + x * (1 - T), written as x + T * (H - x) (one fewer product)."""
  return x + t * (h - x)


class HighwayDense(nn.Module):
  """Fully connected highway layer of the input's width."""
  act: Callable = nn.relu
  gate_bias: float = GATE_BIAS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = self.act(cnn.Dense(c, dtype=self.dtype, name='H')(x))
    t = nn.sigmoid(cnn.Dense(c, dtype=self.dtype, name='T',
                            bias_init=nn.initializers.constant(self.gate_bias))(x))
    return highway(h, t, x)


class HighwayConv(nn.Module):
  """Convolutional highway layer: 3x3 H and T convs of the input's width."""
  conv: ModuleDef
  kernel: int = 3
  act: Callable = nn.relu
  gate_bias: float = GATE_BIAS

  @nn.compact
  def __call__(self, x):
    c, k = x.shape[-1], self.kernel
    pad = ((k // 2, k // 2),) * 2
    h = self.act(self.conv(c, (k, k), padding=pad, name='H')(x))
    t = nn.sigmoid(self.conv(c, (k, k), padding=pad, name='T',
                             bias_init=nn.initializers.constant(self.gate_bias))(x))
    return highway(h, t, x)


class HighwayMLP(nn.Module):
  """Flatten, Dense to `width`, `depth` highway layers, fc.

  Attributes:
    num_classes: outputs of 'fc'.
    width: units of every highway layer (50 in the paper's MNIST nets).
    depth: number of highway layers.
    gate_bias: initial transform-gate bias b_T (negative: start near identity).
  """
  num_classes: int = 10
  width: int = 50
  depth: int = 10
  gate_bias: float = GATE_BIAS
  act: Callable = nn.relu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train   # no BN or dropout
    x = x.reshape((x.shape[0], -1))
    x = self.act(cnn.Dense(self.width, dtype=self.dtype, name='dense_init')(x))
    self.sow('intermediates', 'stem', x)
    for i in range(self.depth):
      x = HighwayDense(self.act, self.gate_bias, self.dtype, name=f'highway{i + 1}')(x)
    self.sow('intermediates', 'pre_logits', x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


class HighwayCNN(nn.Module):
  """3x3 conv stem, stages of conv highway layers with 2x2 max pools and
  widening 3x3 'transition' convs between them, GAP, fc.

  Attributes:
    num_classes: outputs of 'fc'.
    widths: channels of each stage.
    depth: highway layers per stage.
    gate_bias: initial transform-gate bias b_T.
    conv: cnn_jax.nn.Conv (explicit backward) or flax.linen.Conv.
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  depth: int = 3
  gate_bias: float = GATE_BIAS
  act: Callable = nn.relu
  conv: ModuleDef = cnn.Conv
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    conv = functools.partial(self.conv, dtype=self.dtype)
    pad = ((1, 1), (1, 1))
    x = self.act(conv(self.widths[0], (3, 3), padding=pad, name='conv_init')(x))
    self.sow('intermediates', 'stem', x)
    for i, c in enumerate(self.widths):
      if i:
        x = cnn.MaxPool((2, 2), strides=(2, 2))(x)
        x = self.act(conv(c, (3, 3), padding=pad, name=f'transition{i}')(x))
      for j in range(self.depth):
        x = HighwayConv(conv, act=self.act, gate_bias=self.gate_bias,
                        name=f'stage{i + 1}_highway{j + 1}')(x)
      self.sow('intermediates', f'stage{i + 1}', x)
    x = cnn.GlobalAvgPool()(x)
    self.sow('intermediates', 'pre_logits', x)
    return cnn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


# Test-only variants.
_HighwayMLPTiny = functools.partial(HighwayMLP, width=8, depth=2)
_HighwayCNNTiny = functools.partial(HighwayCNN, widths=(4, 8), depth=1)


def _register():
  registry.register('highway_mlp', HighwayMLP, family='highway', input_shape=(28, 28, 1),
                    num_classes=10, description='Highway MLP (Srivastava et al. 2015): '
                    '784 -> 50, 10 highway layers of 50 units, gate bias -2')
  registry.register('highway_cnn', HighwayCNN, family='highway', input_shape=(32, 32, 3),
                    num_classes=10, description='Convolutional highway net: 3 stages '
                    '(32/64/128) of 3 highway layers with 3x3 H and T convs')
  registry.register('highway_mlp_tiny', _HighwayMLPTiny, family='highway',
                    input_shape=(8, 8, 1), num_classes=10,
                    description='Test-only highway MLP: 2 layers of 8 units.')
  registry.register('highway_cnn_tiny', _HighwayCNNTiny, family='highway',
                    input_shape=(8, 8, 3), num_classes=10,
                    description='Test-only highway CNN: 4/8 channels, 1 layer a stage.')


_register()
