"""Reusable multi-layer blocks: squeeze-and-excitation, ASPP, ResUNet++ attention.

Each block is a thin flax.linen module that takes the layers it is built from
as attributes: `conv` (`cnn_jax.nn.Conv`, explicit backward, or
flax.linen.Conv; pass a `functools.partial` to fix dtype or kernel_init) and,
where it normalises, `norm` (a BatchNorm partial with `use_running_average`
already set, e.g. `cnn_jax.models.common.batch_norm(train)`), so the block
itself has no `train` argument and runs the same under either conv.

  * `SqueezeExcite` (Hu et al. 2018): per-channel gates from the global
    average, s = sigmoid(W2 relu(W1 GAP(x))), output x * s.
  * `ASPP` (Chen et al., DeepLab): parallel 3x3 convs at several atrous rates,
    each followed by a norm, summed, then a 1x1 conv (ResUNet++'s variant: a
    sum, not DeepLab's concatenation, and no image-pooling branch).
  * `AttentionBlock` (Jha et al. 2019, ResUNet++): the decoder features x are
    multiplied by a map computed from x and the encoder skip (at twice x's
    resolution, max-pooled down to it).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax.nn.conv import Conv
from cnn_jax.nn.pooling import MaxPool

ModuleDef = Any


def _spatial_dims(x, layer: str) -> int:
  nd = x.ndim - 2
  if nd not in (1, 2, 3):
    raise ValueError(f'{layer}: input must be (N, *spatial, C) with 1-3 spatial '
                     f'dimensions; got shape {tuple(x.shape)}.')
  return nd


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation: x * sigmoid(W2 relu(W1 mean_spatial(x))).

  W1 maps C to max(1, C // ratio) channels and W2 back to C, both without
  bias (as in the ResUNet++ reference, ratio 8). They are 1x1 convs on the
  pooled (N, 1, .., 1, C) map rather than Dense layers so that the injected
  `conv` runs them too. Params: 'squeeze' (1.., C, C // r), 'excite'
  (1.., C // r, C): 2 C (C // r) in all.
  """
  ratio: int = 8
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x):
    nd = _spatial_dims(x, 'SqueezeExcite')
    if not isinstance(self.ratio, int) or self.ratio < 1:
      raise ValueError(f'SqueezeExcite: ratio must be a positive int, got {self.ratio!r}.')
    c = x.shape[-1]
    one = (1,) * nd
    s = jnp.mean(x, axis=tuple(range(1, nd + 1)), keepdims=True)
    s = nn.relu(self.conv(max(1, c // self.ratio), one, padding='VALID', use_bias=False,
                          name='squeeze')(s))
    s = nn.sigmoid(self.conv(c, one, padding='VALID', use_bias=False, name='excite')(s))
    return x * s


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling as in ResUNet++: sum_r norm_r(conv3x3_r(x)),
  then a 1x1 conv.

  Each branch is a 3x3 conv with dilation r and padding r (the output keeps
  x's size; a rate larger than the map reads only zero padding off the
  centre tap) followed by its own norm, as in the authors' Keras code; there
  is no activation anywhere in the block. Params per branch: 9 C_in F + F
  (conv) + the norm's; then F F + F for the 1x1 'project'.

  Attributes:
    features: F, channels of every branch and of the output.
    norm: normalisation partial applied to each branch ('rate{r}_bn').
    conv: conv layer; branches are named 'rate{r}'.
    rates: atrous rates, distinct positive ints (ResUNet++: 6, 12, 18, 1).
  """
  features: int
  norm: ModuleDef
  conv: ModuleDef = Conv
  rates: Sequence[int] = (6, 12, 18, 1)

  @nn.compact
  def __call__(self, x):
    nd = _spatial_dims(x, 'ASPP')
    rates = tuple(self.rates)
    if (not rates or len(set(rates)) != len(rates)
        or not all(isinstance(r, int) and r >= 1 for r in rates)):
      raise ValueError(f'ASPP: rates must be distinct positive ints, got {self.rates!r}.')
    y = 0
    for r in rates:
      b = self.conv(self.features, (3,) * nd, padding=((r, r),) * nd,
                    kernel_dilation=(r,) * nd, name=f'rate{r}')(x)
      y = y + self.norm(name=f'rate{r}_bn')(b)
    return self.conv(self.features, (1,) * nd, padding='VALID', name='project')(y)


class AttentionBlock(nn.Module):
  """ResUNet++ attention: x * conv(relu(bn(pool(conv(relu(bn(skip)))) +
  conv(relu(bn(x)))))), every conv 3x3 with C_x filters.

  `skip` is the encoder feature map at twice the resolution of the decoder
  features `x`; its branch is max-pooled 2x2 after its conv (the reference
  pools the conv output, not the skip itself). The product with x is not
  squashed by a sigmoid: the reference multiplies by the raw conv output.
  Submodules 'skip_bn', 'skip_conv', 'x_bn', 'x_conv', 'gate_bn', 'gate_conv'.
  Params: 2 C_s + 9 C_s C_x + C_x, then 2 (2 C_x + 9 C_x^2 + C_x).
  """
  norm: ModuleDef
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, skip, x):
    nd = _spatial_dims(x, 'AttentionBlock')
    if skip.ndim != x.ndim or any(s != 2 * t for s, t in zip(skip.shape[1:-1],
                                                             x.shape[1:-1])):
      raise ValueError(
          f'AttentionBlock: the skip must have twice the spatial size of x; got skip '
          f'{tuple(skip.shape)} and x {tuple(x.shape)}.')
    f = x.shape[-1]
    k, pad = (3,) * nd, ((1, 1),) * nd

    def bn_relu_conv(y, name):
      y = nn.relu(self.norm(name=f'{name}_bn')(y))
      return self.conv(f, k, padding=pad, name=f'{name}_conv')(y)

    g = MaxPool((2,) * nd, strides=(2,) * nd)(bn_relu_conv(skip, 'skip'))
    gate = bn_relu_conv(g + bn_relu_conv(x, 'x'), 'gate')
    return gate * x


__all__ = ['ASPP', 'AttentionBlock', 'SqueezeExcite']
