"""Zeiler & Fergus's deconvnet: one feature map projected back to pixel space.

"Passing an input image through a trained CNN, then selectively projecting
activations back into image space using a Deconvnet" (seed 000; Zeiler & Fergus,
"Visualizing and Understanding Convolutional Networks", 2014). Pick a layer l and a
channel c. The forward pass stores every max pool's switches; the reverse pass
starts from layer l's map with every other channel zeroed (and, by default, every
position but the channel's strongest activation) and walks the layers back down,
undoing each one:

    max pool  (switches s)   g_in[q] = sum_{p : s[p] = q} g_out[p]      (max_unpool)
    ReLU                     g_in = max(g_out, 0)                       (rectify)
    conv      (kernel W)     g_in = dilate_S(g_out) (*) rot180(W)^T, padded
                             (F_eff - 1 - P_lo, F_eff - 1 - P_hi + r): the layer's
                             own filters, flipped, in/out channels swapped (per
                             group), i.e. the transposed convolution, conv's dL/dX
                             (`cnn_jax.ops.conv.input_grad`); the bias is dropped
    BatchNorm (eval)         g_in = g_out * gamma / sqrt(var + eps)
    LRN, Dropout (eval)      g_in = g_out

The result has the input's shape: the image pattern that layer l's unit "sees".
Every step but the ReLU (and LRN) is the transpose of its layer's linear map (at
the stored switches), so for a conv/BatchNorm/ReLU/max-pool net the deconvnet is
the gradient of the selected unit(s) with respect to the input with one change:
each ReLU passes back max(g, 0) instead of g [x > 0] (Springenberg et al. 2015
compare the two rules and guided backprop, g [x > 0][g > 0]; see
`saliency.backprop_with_relu_rule`). The tests check the explicit walk here
against that formulation.

Choices, stated:

  * The start. The chosen layer's output, rectified when a ReLU follows the layer
    (so the start is the activation Zeiler & Fergus display). A conv followed by a
    BatchNorm is started before the BatchNorm, from the signed conv output; name the
    BatchNorm layer ('stage1_bn1') to start from the rectified activation.
  * BatchNorm (Zeiler & Fergus's net had none) passes back through its transpose,
    the per-channel scale gamma / sqrt(var + eps), and drops its shift as a conv
    drops its bias. This keeps the deconvnet equal to the modified gradient.
  * LRN (their "contrast normalization") is passed through unchanged, as they did:
    it is not inverted. Dropout is the identity at evaluation.

Where the ReLUs are. Activations are plain functions between modules, not layers,
so they are detected rather than assumed: the model is run once more with every
layer's output replaced by a fixed random sign-mixed pattern r, and each layer's
input is compared with the previous layer's r. Equal to r: nothing sits in between;
equal to max(r, 0): a ReLU does. Anything else (a skip connection adding another
layer's output, a concatenation, a tanh, a ReLU6, a function pool such as
`flax.linen.max_pool`) makes the model non-sequential for the deconvnet and is
refused. The test is exact (no tolerance) and does not depend on the image, so a
ReLU on a map that happens to be non-negative is still found.

Supported: sequential conv nets built from Conv / DepthwiseConv (ours or
flax.linen.Conv), BatchNorm, ReLU, MaxPool, LRN and Dropout layers, checked
link by link over the whole spatial part of the model: ablation_cnn with
downsample='max' (residual=False, activation='relu'), vgg*, alexnet*, zfnet,
lenet5, mobilenet_v1* (depthwise convs are grouped convs). Refused with a
ValueError: residual and branching models (resnet*, googlenet*, densenet*,
highway*, unet, ...), other activations (mobilenet_v2's ReLU6, tanh), and
average, Lp or trainable pooling below the chosen layer (no switches to unpool
with; NiN's layers above its average pool, lenet5_classic).

Cost: two eager forward passes (the image, and the ReLU probe) and one reverse
pass. Call it eagerly, not under jax.jit: the ReLU detection compares concrete
arrays.
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_jax import nn as cnn
from cnn_jax.analysis import layers
# (cnn_jax.ops.conv the module is shadowed by the function of that name in cnn_jax.ops.)
from cnn_jax.ops.conv import forward as conv_forward
from cnn_jax.ops.conv import input_grad as conv_input_grad
from cnn_jax.ops.conv import make_spec as conv_spec
from cnn_jax.ops import pooling as pool_ops

# The layer walk that list_layers, layer_outputs and apply_with_taps share.
walk = layers.walk

KEEP = ('max', 'all')
SUPPORTED = ("ablation_cnn (downsample='max', no residual, ReLU), vgg*, alexnet*, "
             'zfnet, lenet5, mobilenet_v1*')
_ALTERNATIVE = ('For residual or branching models (resnet*, googlenet*, densenet*, '
                'mobilenet_v2*, highway*, ...) use cnn_jax.analysis.saliency.guided_backprop '
                'or gradient_saliency, which follow any computation.')
_PREPAD = ('CIRCULAR', 'REFLECT', 'CAUSAL')
_CONVS = (cnn.Conv, cnn.DepthwiseConv, nn.Conv)


class _Step(NamedTuple):
  """One operation of the reverse pass: g -> fn(g, params).

  op is 'relu' (rectify the signal on `layer`'s output), 'conv_transpose',
  'batch_norm_scale', 'unpool' or 'pass' (LRN, Dropout); params holds the arrays
  it needs (kernel, BatchNorm scale, switches), fn only static geometry.
  """
  op: str
  layer: str
  fn: Callable[[jax.Array, Any], jax.Array]
  params: Any = None


class _Stop(Exception):
  """Ends the image walk once the chosen layer has been recorded."""


class _Check(NamedTuple):
  """A recomputation of a layer's output from what its reverse step will use."""
  exact: bool            # compare bit for bit (pooling, dropout) or to rounding
  again: jax.Array
  out: jax.Array
  message: str


def _close(a, b) -> bool:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.abs(b).max(initial=0.0)))
  return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale))


def _relu(g, _=None):
  return jnp.maximum(g, jnp.zeros((), g.dtype))


def _identity(g, _=None):
  return g


# ----------------------------------------------------------------------------
# The reverse step of each layer, built from its forward call.
# ----------------------------------------------------------------------------

def _conv_step(name, module, x_in, out):
  params = module.variables.get('params', {})
  kernel = params.get('kernel')
  nd = x_in.ndim - 2
  if kernel is None or kernel.ndim != nd + 2:
    raise ValueError(f'deconvnet: conv layer {name!r} has no kernel of rank {nd + 2} '
                     f'for its input {tuple(x_in.shape)}; cannot transpose it.')
  padding = module.padding
  if isinstance(padding, str) and padding.upper() in _PREPAD:
    raise ValueError(f'deconvnet: conv layer {name!r} pads {padding!r}; the transposed '
                     "conv is implemented for zero padding only ('SAME', 'VALID', "
                     "'FULL', ints or (lo, hi) pairs).")
  input_dilation = getattr(module, 'input_dilation', 1)
  if input_dilation not in (None, 1) and tuple(np.ravel(input_dilation)) != (1,) * nd:
    raise ValueError(f'deconvnet: conv layer {name!r} has input_dilation '
                     f'{input_dilation!r}; only 1 is supported.')
  strides = 1 if module.strides is None else module.strides
  dilation = getattr(module, 'kernel_dilation', 1)
  dilation = 1 if dilation is None else dilation
  groups = x_in.shape[-1] // kernel.shape[-2]
  kernel = kernel.astype(x_in.dtype)
  spec = conv_spec(x_in.shape, kernel.shape, stride=strides, padding=padding,
                   dilation=dilation, groups=groups, op=f'deconvnet ({name})')
  again = conv_forward(x_in, kernel, spec)
  if 'bias' in params:
    again = again + params['bias']
  message = (f'deconvnet: could not reproduce conv layer {name!r} from its kernel '
             f'{tuple(kernel.shape)}, strides {strides!r}, padding {padding!r}, dilation '
             f'{dilation!r} and groups {groups}; its transpose would be wrong. Is it a '
             'plain cnn_jax.nn.Conv / flax.linen.Conv?')
  step = _Step('conv_transpose', name, lambda g, w: conv_input_grad(g, w, spec), kernel)
  return step, _Check(False, again, out, message)


def _batch_norm_step(name, module, x_in, out):
  if module.axis not in (-1, x_in.ndim - 1):
    raise ValueError(f'deconvnet: BatchNorm layer {name!r} normalises axis '
                     f'{module.axis}; only the channel axis (-1) is supported.')
  stats = module.variables.get('batch_stats', {})
  params = module.variables.get('params', {})
  if 'mean' not in stats or 'var' not in stats:
    raise ValueError(f'deconvnet: BatchNorm layer {name!r} has no running statistics '
                     "('batch_stats' mean and var); pass the model's full variables.")
  factor = lax.rsqrt(stats['var'] + module.epsilon) * params.get('scale', 1.0)
  again = (x_in - stats['mean']) * factor + params.get('bias', 0.0)
  message = (f'deconvnet: BatchNorm layer {name!r} did not normalise with its running '
             'statistics (is the model run with train=True, or with batch statistics?); '
             'the deconvnet uses the evaluation-mode layer.')
  step = _Step('batch_norm_scale', name, lambda g, f: g * f, factor.astype(out.dtype))
  return step, _Check(False, again, out, message)


def _max_pool_step(name, module, x_in, out):
  y, switches = pool_ops.max_pool_with_argmax(x_in, module.window_shape, module.strides,
                                              module.padding)
  spatial = tuple(x_in.shape[1:-1])
  message = (f'deconvnet: max_pool_with_argmax does not reproduce max pool layer '
             f'{name!r}; cannot take its switches.')
  step = _Step('unpool', name, lambda g, s: pool_ops.max_unpool(g, s, spatial), switches)
  return step, _Check(True, y, out, message)


def _step(name, module, x_in, out, target):
  """(reverse step, check or None) of one recorded layer call."""
  if isinstance(module, _CONVS):
    return _conv_step(name, module, x_in, out)
  if isinstance(module, nn.BatchNorm):
    return _batch_norm_step(name, module, x_in, out)
  if isinstance(module, cnn.MaxPool):
    return _max_pool_step(name, module, x_in, out)
  if isinstance(module, cnn.LRN):
    return _Step('pass', name, _identity), None
  if isinstance(module, cnn.Dropout):
    return _Step('pass', name, _identity), _Check(
        True, x_in, out, f'deconvnet: dropout layer {name!r} changed its input; run the '
        'model in evaluation mode.')
  raise ValueError(
      f'deconvnet: cannot pass back through layer {name!r} ({type(module).__name__}) on '
      f'the way down from {target!r}. The reverse pass inverts Conv, DepthwiseConv, '
      'BatchNorm, MaxPool (by its switches), LRN and Dropout layers; average, Lp or '
      'trainable pooling keeps no switches. Choose a layer below it, or a model with '
      f'max pooling ({SUPPORTED}).')


# ----------------------------------------------------------------------------
# The two forward walks
# ----------------------------------------------------------------------------

def _probe(model, variables, x):
  """The ReLU probe: a walk with every layer's output replaced by a fixed random
  pattern. Returns (layer names, layer inputs, the patterns, the pattern fed as
  the image)."""
  rng = np.random.default_rng(0)
  start = jnp.asarray(rng.standard_normal(x.shape), x.dtype)
  names, inputs, patterns = [], [], []

  def probe(name, module, args, out):
    del module
    names.append(name)
    inputs.append(args[0] if args and hasattr(args[0], 'shape') else None)
    if jnp.issubdtype(out.dtype, jnp.inexact):
      out = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
    patterns.append(out)
    return out

  walk(model, variables, start, train=False, on_layer=probe)
  return names, inputs, patterns, start


def _record(model, variables, x, target: str):
  """(reverse steps of the layers up to `target` in call order, their checks,
  target's output), from a walk over the image that stops at `target`.

  Like the probe, it runs eagerly: each op compiles once per shape and stays
  cached across calls, which on CPU beats compiling the model as one program per
  call.
  """
  steps: List[_Step] = []
  checks: List[Optional[_Check]] = []
  final = {}

  def record(name, module, args, out):
    step, check = _step(name, module, args[0], out, target)
    steps.append(step)
    checks.append(check)
    if name == target:
      final['out'] = out
      raise _Stop()
    return out

  try:
    walk(model, variables, x, train=False, on_layer=record)
  except _Stop:
    pass
  return steps, checks, final['out']


def _links(probe, ndim: int) -> List[Tuple[str, Optional[str], str]]:
  """(layer, link, previous layer) per layer in call order, from `_probe`.

  link is 'identity' or 'relu' (the layer's input is the previous layer's pattern
  r, or max(r, 0), up to a flatten), 'other' for anything else when the input is
  a spatial map, and None when it is not (a head after a flatten: not checked).
  """
  names, inputs, patterns, start = probe
  before, before_name = np.asarray(start), 'the model input'
  found: List[Tuple[str, Optional[str], str]] = []
  for name, x_in, out in zip(names, inputs, patterns):
    link = None
    if x_in is not None:
      got, prev = np.asarray(x_in), before
      if got.ndim != ndim and prev.ndim and got.ndim and len(prev) == len(got):
        # A head after a flatten: not checked, but a ReLU before the flatten (LeNet's
        # c5) still counts as the ReLU after the previous layer.
        got, prev = got.reshape(len(got), -1), prev.reshape(len(prev), -1)
      if got.shape == prev.shape and np.array_equal(got, prev):
        link = 'identity'
      elif got.shape == prev.shape and np.array_equal(got, np.maximum(prev, 0)):
        link = 'relu'
      elif got.ndim == ndim:
        link = 'other'
    found.append((name, link, before_name))
    before, before_name = np.asarray(out), name
  return found


def _check_sequential(links):
  for name, link, before in links:
    if link == 'other':
      raise ValueError(
          f'deconvnet: layer {name!r} does not read the output of the layer before it '
          f'({before!r}) directly or through a ReLU: something else sits in between (a '
          'skip connection adding another layer\'s output, a concatenation of branches, '
          'a pooling function that is not a layer, or an activation other than ReLU, '
          'such as tanh or relu6). The deconvnet walks back through sequential '
          f'conv/BatchNorm/ReLU/max-pool nets only: {SUPPORTED}. {_ALTERNATIVE}')


def _plan(model, variables, x, layer: str):
  """(full layer name, its output, relu after it?, reverse steps top-down)."""
  if isinstance(x, jax.core.Tracer):
    raise ValueError('deconvnet runs eagerly (it compares concrete feature maps to '
                     'find the ReLUs); call it outside jax.jit / jax.grad.')
  x = jnp.asarray(x)
  names = [n for n, _, _ in layers.list_layers(model, x.shape[1:], variables=variables)]
  target = layers.resolve(layer, names)
  links = _links(_probe(model, variables, x), x.ndim)
  _check_sequential(links)
  recorded, checks, out = _record(model, variables, x, target)
  for check in checks:
    if check is not None and not (
        np.array_equal(np.asarray(check.again), np.asarray(check.out)) if check.exact
        else _close(check.again, check.out)):
      raise ValueError(check.message)
  if out.ndim != x.ndim:
    raise ValueError(f'deconvnet: layer {target!r} has output shape '
                     f'{tuple(out.shape)}, not a spatial map like the input '
                     f'{tuple(x.shape)}; choose a conv, BatchNorm or pooling layer.')
  link_of = {name: link for name, link, _ in links}
  k = names.index(target)
  relu_after = k + 1 < len(names) and link_of.get(names[k + 1]) == 'relu'
  reverse: List[_Step] = []
  if relu_after:
    reverse.append(_Step('relu', target, _relu))
  for i in range(len(recorded) - 1, -1, -1):
    reverse.append(recorded[i])
    if link_of.get(recorded[i].layer) == 'relu':
      below = recorded[i - 1].layer if i > 0 else 'input'
      reverse.append(_Step('relu', below, _relu))
  return target, out, relu_after, reverse


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------

def deconvnet_steps(model: nn.Module, variables, x, layer: str) -> List[Tuple[str, str]]:
  """The reverse pass `deconvnet` would run, as (op, layer) pairs, top to bottom.

  ('relu', 'conv1') rectifies the signal where a ReLU sits on conv1's output;
  ('relu', 'input') would be a ReLU on the image itself. Raises the same errors
  as `deconvnet` for models it cannot invert.
  """
  _, _, _, reverse = _plan(model, variables, x, layer)
  return [(s.op, s.layer) for s in reverse]


def deconvnet(model: nn.Module, variables, x, layer: str, channel: int, *,
              keep: str = 'max') -> np.ndarray:
  """Zeiler & Fergus's deconvnet reconstruction of one channel of one layer.

  Args:
    model: a sequential conv net from the registry (see the module docstring for
      which are supported), called as model.apply(variables, x, train=False).
    variables: its variables (params and, with BatchNorm, batch_stats).
    x: (N, *spatial, C) images; each is reconstructed on its own.
    layer: the layer to start from, a full name or unique suffix as in
      `layers.list_layers` ('features_block2_conv1', 'stage2_bn1', 'pool2').
    channel: the feature map (output channel) of that layer to project down.
    keep: 'max' keeps only the channel's strongest activation per image (Zeiler &
      Fergus's figures); 'all' keeps the whole map.

  Returns:
    float32 array shaped like x: the reverse pass (see the module docstring) of
    the selected activation(s) of `layer`, channel `channel`, down to pixels. It
    lies inside the receptive field of the kept unit(s), and is zero where the
    unit's ReLUs and switches let nothing through.

  Raises:
    ValueError: an unknown layer, a channel out of range, an unknown `keep`, a
      non-spatial layer, or a model the reverse pass cannot walk (skip
      connections, branches, non-ReLU activations, pools without switches).
  """
  if keep not in KEEP:
    raise ValueError(f"deconvnet: keep must be 'max' (the strongest activation) or "
                     f"'all' (the whole map), got {keep!r}.")
  x = jnp.asarray(x)
  target, out, relu_after, reverse = _plan(model, variables, x, layer)
  channels = out.shape[-1]
  if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not (
      0 <= channel < channels):
    raise ValueError(f'deconvnet: channel must be an int in [0, {channels}) for layer '
                     f'{target!r} ({channels} channels), got {channel!r}.')
  act = _relu(out) if relu_after else out
  fmap = act[..., int(channel)]
  if keep == 'max':
    flat = fmap.reshape(fmap.shape[0], -1)
    winner = jax.nn.one_hot(jnp.argmax(flat, axis=1), flat.shape[1], dtype=flat.dtype)
    fmap = (flat * winner).reshape(fmap.shape)
  g = jnp.zeros_like(act).at[..., int(channel)].set(fmap)
  for step in reverse:
    g = step.fn(g, step.params)
  return np.asarray(g, np.float32)


def plot_deconvnet(images, reconstructions, path_png: str,
                   titles: Optional[Sequence[str]] = None, *, dpi: int = 100) -> str:
  """Rows of image | deconvnet reconstruction, written to a PNG.

  Args:
    images: (N, H, W, C) inputs (any range; each is rescaled for display).
    reconstructions: (N, H, W, C) `deconvnet` outputs. Each is min-max rescaled
      to [0, 1] on its own (so 0 is not mid-grey), as the panel titles say.
    path_png: where to write the PNG (parent directories are created).
    titles: one caption per row (e.g. 'conv2, channel 5'), shown above the
      reconstruction.
    dpi: resolution.

  Returns:
    path_png.
  """
  from cnn_jax.analysis.plots import (  # pylint: disable=import-outside-toplevel
      channels_for_display, new_figure, save_figure, unit_range)
  images, recon = np.asarray(images), np.asarray(reconstructions)
  if images.ndim != 4 or recon.shape != images.shape:
    raise ValueError(f'plot_deconvnet: need images and reconstructions of one shape '
                     f'(N, H, W, C); got {images.shape} and {recon.shape}.')
  n = len(images)
  if titles is not None and len(titles) != n:
    raise ValueError(f'plot_deconvnet: {len(titles)} titles for {n} images.')
  fig = new_figure((5.0, 2.4 * n + 0.2))
  for i in range(n):
    caption = f'{titles[i]}\n' if titles is not None else ''
    panels = ((channels_for_display(unit_range(images[i])), 'input' if i == 0 else ''),
              (channels_for_display(unit_range(recon[i])),
               f'{caption}reconstruction (rescaled to [0, 1])'))
    for j, (panel, title) in enumerate(panels, start=1):
      ax = fig.add_subplot(n, 2, 2 * i + j)
      ax.imshow(panel, cmap='gray' if panel.ndim == 2 else None, vmin=0, vmax=1,
                interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(title, fontsize='small')
  fig.tight_layout()
  return save_figure(fig, path_png, dpi)


__all__ = ['deconvnet', 'deconvnet_steps', 'plot_deconvnet', 'KEEP', 'SUPPORTED']
