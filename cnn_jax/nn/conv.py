"""Convolution layers: thin flax.linen modules over `cnn_jax.ops.conv`.

A layer holds its configuration and parameters and calls the op; the math and
the explicit backward pass live in the op. `Conv` keeps flax.linen.Conv's
attribute names, defaults and parameter tree ('kernel' (*kernel_size,
C_in // groups, features), 'bias' (features,)), so a model built with
`conv=cnn_jax.nn.Conv` and one built with `conv=flax.linen.Conv` share
checkpoints and, given the same parameters, compute the same outputs and
gradients (to float32 rounding). Two deliberate differences:

  * an int kernel_size is used in every spatial dimension of the input
    (`Conv(10, 5)` on (N, 32, 32, 3) is a 5x5 conv), where flax.linen.Conv
    reads an int as a 1-D kernel. Pass tuples when a model must also run with
    flax.linen.Conv;
  * padding also accepts 'FULL' (F_eff - 1 on each side); flax's 'CIRCULAR',
    'REFLECT' and 'CAUSAL' are supported by padding the input first.

`kernel_init` takes an initializer function or a name ('he', 'glorot',
'lecun', ...; see `cnn_jax.nn.initializers`). The default, 'lecun', is
flax.linen's default, so the two layers even initialise identically from the
same key. (There is no separate `init=` attribute: it would shadow
`Module.init`.)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import flax.linen as nn
from flax.linen.dtypes import promote_dtype

from cnn_jax.ops import shapes
from cnn_jax.ops.conv import conv as conv_op, conv_transpose as conv_transpose_op
from cnn_jax.nn import initializers as inits

IntOrSeq = Union[int, Sequence[int]]
PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]

# Paddings done here by padding the input, then running a 'VALID' conv (flax's).
_PREPAD_MODES = ('CIRCULAR', 'REFLECT', 'CAUSAL')


# ----------------------------------------------------------------------------
# Argument checks: a bad layer is a ValueError before any parameter or compute.
# ----------------------------------------------------------------------------

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _check_positive_int(value, what: str, layer: str, hint: str = '') -> int:
  if not _is_int(value) or value < 1:
    raise ValueError(f'{layer}: {what} must be a positive int{hint}, got {value!r}.')
  return value


def _kernel_tuple(kernel_size, x_ndim: int, layer: str) -> Tuple[int, ...]:
  """kernel_size as one int per spatial dimension, validated."""
  if _is_int(kernel_size):
    nd = x_ndim - 2
    if nd not in (1, 2, 3):
      raise ValueError(
          f'{layer}: an int kernel_size ({kernel_size}) is used in every spatial '
          f'dimension, so the input must be (N, *spatial, C) with 1, 2 or 3 spatial '
          f'dimensions (rank 3-5); got rank {x_ndim}. Pass a tuple kernel_size for '
          f'unbatched inputs or several batch dimensions.')
    kernel = (kernel_size,) * nd
  else:
    try:
      kernel = tuple(kernel_size)
    except TypeError:
      kernel = None
    if (kernel is None or not 1 <= len(kernel) <= 3
        or not all(_is_int(k) for k in kernel)):
      raise ValueError(
          f'{layer}: kernel_size must be an int or a tuple of 1-3 ints (one per '
          f'spatial dimension), got {kernel_size!r}.')
  if any(k < 1 for k in kernel):
    raise ValueError(
        f'{layer}: kernel_size must be >= 1 in every spatial dimension, got '
        f'{kernel_size!r}.')
  return kernel


def _or_one(value):
  """flax.linen allows None for strides / kernel_dilation, meaning 1."""
  return 1 if value is None else value


def _flatten_batch(x, nd: int, layer: str):
  """(*batch, *spatial, C) -> (N, *spatial, C), as flax.linen.Conv does."""
  n_batch = x.ndim - nd - 1
  if n_batch < 0:
    raise ValueError(
        f'{layer}: a {nd}-D kernel needs an input (*batch, {nd} spatial dims, C) of '
        f'rank >= {nd + 1}; got shape {tuple(x.shape)}.')
  if n_batch == 1:
    return x, None
  batch_shape = tuple(x.shape[:n_batch])
  return x.reshape((-1,) + tuple(x.shape[n_batch:])), batch_shape


def _unflatten_batch(y, batch_shape):
  return y if batch_shape is None else y.reshape(batch_shape + tuple(y.shape[1:]))


def _prepad(x, padding, kernel, dilation, layer: str):
  """flax's CIRCULAR / REFLECT / CAUSAL as an explicit pad, then 'VALID'."""
  if not isinstance(padding, str) or padding.upper() not in _PREPAD_MODES:
    return x, padding
  mode = padding.upper()
  nd = len(kernel)
  dilation = shapes.as_tuple(dilation, nd, 'kernel_dilation', op=layer)
  shapes.check_positive(dilation, 'kernel_dilation', op=layer)
  k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
  if mode == 'CAUSAL':
    if nd != 1:
      raise ValueError(f"{layer}: padding 'CAUSAL' is only defined for 1-D "
                       f'convolutions; this kernel is {nd}-D {kernel}.')
    pads = [(k_eff[0] - 1, 0)]
    np_mode = 'constant'
  else:
    pads = [((k - 1) // 2, k // 2) for k in k_eff]
    np_mode = 'wrap' if mode == 'CIRCULAR' else 'reflect'
  return jnp.pad(x, [(0, 0)] + pads + [(0, 0)], mode=np_mode), 'VALID'


def _conv_apply(mdl: nn.Module, x, *, features: int, kernel: Tuple[int, ...],
                strides, padding, dilation, groups: int, use_bias: bool, layer: str):
  """Creates `kernel`/`bias` on `mdl` and applies ops.conv (+ bias)."""
  x, batch_shape = _flatten_batch(x, len(kernel), layer)
  strides, dilation = _or_one(strides), _or_one(dilation)
  x, padding = _prepad(x, padding, kernel, dilation, layer)
  c_in = x.shape[-1]
  w = mdl.param('kernel', inits.resolve(mdl.kernel_init), kernel + (c_in // groups, features),
                mdl.param_dtype)
  b = mdl.param('bias', mdl.bias_init, (features,), mdl.param_dtype) if use_bias else None
  x, w, b = promote_dtype(x, w, b, dtype=mdl.dtype)
  y = conv_op(x, w, stride=strides, padding=padding, dilation=dilation,
                    groups=groups)
  if b is not None:
    y = y + b
  return _unflatten_batch(y, batch_shape)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

class Conv(nn.Module):
  """N-D convolution layer over `cnn_jax.ops.conv` (explicit backward).

  Attributes:
    features: number of filters, C_out (> 0).
    kernel_size: int (same size in every spatial dimension of the input) or a
      tuple of 1-3 ints (its length sets the number of spatial dimensions).
    strides: int or per-dimension ints (None means 1).
    padding: 'SAME' (default, as flax.linen.Conv: output ceil(W1 / S)),
      'VALID', 'FULL', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int P, or
      per-dimension ints or (lo, hi) pairs.
    kernel_dilation: int or per-dimension ints (atrous rate; None means 1).
    feature_group_count: groups; C_in and features must be divisible by it.
    use_bias: add a learned bias per output channel.
    dtype: computation dtype (default: promoted from input and params).
    param_dtype: parameter dtype.
    kernel_init: initializer function or name ('lecun' default, 'he', ...).
    bias_init: initializer for the bias.

  Input (*batch, *spatial, C_in) (an int kernel_size needs exactly one batch
  dimension); output (*batch, *out_spatial, features).
  Params: 'kernel' (*kernel_size, C_in // groups, features), 'bias' (features,).
  """
  features: int
  kernel_size: IntOrSeq
  strides: Optional[IntOrSeq] = 1
  padding: PaddingLike = 'SAME'
  kernel_dilation: Optional[IntOrSeq] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: inits.InitializerLike = 'lecun'
  bias_init: inits.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    layer = type(self).__name__
    _check_positive_int(self.features, 'features', layer, ' (output channels)')
    _check_positive_int(self.feature_group_count, 'feature_group_count', layer)
    kernel = _kernel_tuple(self.kernel_size, x.ndim, layer)
    return _conv_apply(self, x, features=self.features, kernel=kernel,
                       strides=self.strides, padding=self.padding,
                       dilation=self.kernel_dilation, groups=self.feature_group_count,
                       use_bias=self.use_bias, layer=layer)


class DepthwiseConv(nn.Module):
  """Depthwise convolution: each input channel filtered on its own.

  A `Conv` with feature_group_count = C_in and features = C_in *
  depth_multiplier; output channel c * depth_multiplier + m is filter m of
  input channel c. Params: 'kernel' (*kernel_size, 1, C_in * depth_multiplier),
  'bias' (C_in * depth_multiplier,). Other attributes as in `Conv`.
  """
  kernel_size: IntOrSeq
  depth_multiplier: int = 1
  strides: Optional[IntOrSeq] = 1
  padding: PaddingLike = 'SAME'
  kernel_dilation: Optional[IntOrSeq] = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: inits.InitializerLike = 'lecun'
  bias_init: inits.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    layer = type(self).__name__
    _check_positive_int(self.depth_multiplier, 'depth_multiplier', layer)
    kernel = _kernel_tuple(self.kernel_size, x.ndim, layer)
    c_in = x.shape[-1]
    return _conv_apply(self, x, features=c_in * self.depth_multiplier, kernel=kernel,
                       strides=self.strides, padding=self.padding,
                       dilation=self.kernel_dilation, groups=c_in,
                       use_bias=self.use_bias, layer=layer)


class SeparableConv(nn.Module):
  """Depthwise-separable convolution (Xception, MobileNet): depthwise, then 1x1.

  Submodules 'depthwise' (`DepthwiseConv`, no bias: a bias there would only
  shift the pointwise layer's bias) and 'pointwise' (1x1 `Conv` to `features`).
  Parameters: k^d * C_in * m + C_in * m * features (+ features with use_bias),
  against k^d * C_in * features for the full conv. strides, padding and
  kernel_dilation apply to the depthwise step. There is no nonlinearity in
  between; MobileNet-style blocks compose DepthwiseConv, norm and Conv instead.
  """
  features: int
  kernel_size: IntOrSeq
  depth_multiplier: int = 1
  strides: Optional[IntOrSeq] = 1
  padding: PaddingLike = 'SAME'
  kernel_dilation: Optional[IntOrSeq] = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: inits.InitializerLike = 'lecun'
  bias_init: inits.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    layer = type(self).__name__
    _check_positive_int(self.features, 'features', layer, ' (output channels)')
    kernel = _kernel_tuple(self.kernel_size, x.ndim, layer)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=self.kernel_init, bias_init=self.bias_init)
    x = DepthwiseConv(kernel, depth_multiplier=self.depth_multiplier,
                      strides=self.strides, padding=self.padding,
                      kernel_dilation=self.kernel_dilation, use_bias=False,
                      name='depthwise', **common)(x)
    return Conv(self.features, (1,) * len(kernel), padding='VALID',
                use_bias=self.use_bias, name='pointwise', **common)(x)


def _split_2d(value, what: str, layer: str):
  """Per-dimension (h, w) of an int-or-pair attribute (None means 1)."""
  value = _or_one(value)
  if _is_int(value):
    return value, value
  try:
    h, w = value
  except (TypeError, ValueError):
    raise ValueError(f'{layer}: {what} must be an int or (height, width) pair, got '
                     f'{value!r}.') from None
  return h, w


def _split_padding_2d(padding, layer: str):
  """Padding of the (k x 1) and (1 x k) steps from a 2-D conv's padding."""
  if isinstance(padding, str):
    return padding, padding   # a size-1 kernel gets no padding in any mode
  none = (0, 0)
  if _is_int(padding):
    return ((padding, padding), none), (none, (padding, padding))
  try:
    h, w = padding
  except (TypeError, ValueError):
    raise ValueError(
        f'{layer}: padding must be a mode string, an int, or (height, width) entries '
        f'each an int or a (lo, hi) pair; got {padding!r}.') from None
  h = (h, h) if _is_int(h) else h
  w = (w, w) if _is_int(w) else w
  return (h, none), (none, w)


class SpatiallySeparableConv(nn.Module):
  """A k x k conv factored into k x 1 then 1 x k (Inception-v3), 2-D only.

  Submodules 'vertical' (`Conv`, kernel (k_h, 1), C_in -> mid_features, no
  bias) and 'horizontal' (`Conv`, kernel (1, k_w), mid_features -> features).
  Parameters: k_h * C_in * mid + k_w * mid * features (+ features), against
  k_h * k_w * C_in * features. The output has the shape of the k x k `Conv`
  with the same strides, padding and dilation (each is split into its height
  part, used by 'vertical', and its width part, used by 'horizontal'); with
  one channel and a rank-1 kernel (column outer row) the outputs are equal
  for any padding mode.

  Attributes:
    features: output channels.
    kernel_size: k, or (k_h, k_w).
    mid_features: channels between the two steps (default: features).
    Others as in `Conv`.
  """
  features: int
  kernel_size: IntOrSeq
  mid_features: Optional[int] = None
  strides: Optional[IntOrSeq] = 1
  padding: PaddingLike = 'SAME'
  kernel_dilation: Optional[IntOrSeq] = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: inits.InitializerLike = 'lecun'
  bias_init: inits.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    layer = type(self).__name__
    _check_positive_int(self.features, 'features', layer, ' (output channels)')
    mid = self.features if self.mid_features is None else self.mid_features
    _check_positive_int(mid, 'mid_features', layer)
    kh, kw = _check_2d_kernel(self.kernel_size, layer)
    sh, sw = _split_2d(self.strides, 'strides', layer)
    dh, dw = _split_2d(self.kernel_dilation, 'kernel_dilation', layer)
    pad_v, pad_h = _split_padding_2d(self.padding, layer)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=self.kernel_init, bias_init=self.bias_init)
    x = Conv(mid, (kh, 1), strides=(sh, 1), padding=pad_v, kernel_dilation=(dh, 1),
             use_bias=False, name='vertical', **common)(x)
    return Conv(self.features, (1, kw), strides=(1, sw), padding=pad_h,
                kernel_dilation=(1, dw), use_bias=self.use_bias, name='horizontal',
                **common)(x)


def _check_2d_kernel(kernel_size, layer: str):
  kernel = _kernel_tuple(kernel_size, 4, layer)
  if len(kernel) != 2:
    raise ValueError(f'{layer}: is 2-D only; kernel_size must be k or (k_h, k_w), got '
                     f'{kernel_size!r}.')
  return kernel


class ConvTranspose(nn.Module):
  """Transposed convolution layer over `cnn_jax.ops.conv_transpose`.

  The exact adjoint of `Conv` with the same strides/padding/dilation/groups:
  ConvTranspose(x) with kernel W equals the input gradient of a conv from
  `features` to C_in channels whose kernel is W with its last two axes swapped.
  Output size per dimension: 'SAME' (default) W1 * S; 'VALID' (W1 - 1) * S +
  F_eff; explicit/'FULL' padding P: (W1 - 1) * S + F_eff - P_lo - P_hi; each
  plus output_padding.

  Relation to flax: flax.linen.ConvTranspose(transpose_kernel=True) with kernel
  K (*k, features, C_in) computes the same function as this layer with kernel
  swapaxes(K, -1, -2), for 'SAME', and for 'VALID' when F_eff >= S (for
  F_eff < S use output_padding = S - F_eff to match flax's W1 * S output).
  flax's explicit paddings mean padding of the dilated input, not of the conv
  being transposed, so they differ from ours. flax's default
  transpose_kernel=False has our kernel layout (*k, C_in, features) but does
  not rotate it: under the same conditions it equals this layer with the
  kernel flipped in its spatial axes.

  Attributes:
    features: output channels (> 0).
    kernel_size, strides, padding, kernel_dilation, feature_group_count:
      those of the convolution being transposed (padding: 'SAME', 'VALID',
      'FULL', int or per-dimension ints/(lo, hi) pairs).
    output_padding: extra rows/columns at the high end, 0 <= it < stride.
    use_bias, dtype, param_dtype, kernel_init, bias_init: as in `Conv`.

  Params: 'kernel' (*kernel_size, C_in // groups, features), 'bias' (features,).
  """
  features: int
  kernel_size: IntOrSeq
  strides: Optional[IntOrSeq] = 1
  padding: PaddingLike = 'SAME'
  kernel_dilation: Optional[IntOrSeq] = 1
  feature_group_count: int = 1
  output_padding: IntOrSeq = 0
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: inits.InitializerLike = 'lecun'
  bias_init: inits.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    layer = type(self).__name__
    _check_positive_int(self.features, 'features', layer, ' (output channels)')
    groups = _check_positive_int(self.feature_group_count, 'feature_group_count', layer)
    kernel = _kernel_tuple(self.kernel_size, x.ndim, layer)
    x, batch_shape = _flatten_batch(x, len(kernel), layer)
    c_in = x.shape[-1]
    w = self.param('kernel', inits.resolve(self.kernel_init),
                   kernel + (c_in // groups, self.features), self.param_dtype)
    b = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
         if self.use_bias else None)
    x, w, b = promote_dtype(x, w, b, dtype=self.dtype)
    y = conv_transpose_op(x, w, stride=_or_one(self.strides), padding=self.padding,
                                dilation=_or_one(self.kernel_dilation), groups=groups,
                                output_padding=self.output_padding)
    if b is not None:
      y = y + b
    return _unflatten_batch(y, batch_shape)


__all__ = ['Conv', 'ConvTranspose', 'DepthwiseConv', 'SeparableConv',
           'SpatiallySeparableConv']
