"""YOLO (Redmon et al. 2016, "You Only Look Once"): a single-stage detector on any
backbone of the registry.

The image is divided into an S x S grid; each cell predicts B boxes, each with a
confidence, and one set of C class scores, all in one forward pass. The model
returns the raw grid

    (N, S, S, B * 5 + C):  per cell [x, y, w, h, conf] for each of the B boxes,
                           then C class scores

which `cnn_jax.detection.boxes.decode_yolo` turns into boxes and scores and
`cnn_jax.detection.loss.yolo_v1_loss` trains (the activations of each entry are
defined there, in one place).

Backbone. `backbone` names any registry classifier; its feature map is read where
the classifier stops being spatial: the input of its first layer with a
non-spatial output (the global average pool of a ResNet or MobileNet, the
classifier of VGG after its adaptive pool), or the layer named by
`feature_layer` (a module path as in `launch.py --mode=summary`). The forward pass
stops there, so the backbone's own classifier is never run and has no parameters;
the backbone's parameters sit under 'net'. A trained classifier initialises it:
`transfer.init_from` (a workdir or torchvision weights) with `transfer.init_model`
set to the backbone's name fills 'net' and leaves the detection head fresh.

Head. 'conv' (the default): a 3x3 conv + BatchNorm + leaky ReLU (slope 0.1, the
paper's activation), average pooling of the map to S x S when it is larger
(adaptive bins), and a 1x1 conv to B * 5 + C outputs per cell. 'fc': YOLO v1's
own head, two fully connected layers (fc_features units, leaky ReLU, dropout 0.5)
to S * S * (B * 5 + C) outputs reshaped to the grid; it sees the whole image in
every cell's prediction, at many more parameters.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax import nn as cnn
from cnn_jax.models import registry
from cnn_jax.models.alexnet import adaptive_avg_pool
from cnn_jax.ops import activations

HEADS = ('conv', 'fc')


class _Stop(Exception):
  """Carries the backbone's feature map out of its forward pass."""

  def __init__(self, features):
    super().__init__('feature map reached')
    self.features = features


class YOLO(nn.Module):
  """S x S grid, B boxes per cell, C classes, on a registry backbone."""
  num_classes: int = 20
  backbone: str = 'resnet18'
  backbone_kwargs: Any = None        # fields of the backbone model (a dict)
  feature_layer: Optional[str] = None
  grid_size: int = 7
  boxes_per_cell: int = 2
  head: str = 'conv'
  head_features: int = 256
  fc_features: int = 1024
  dropout_rate: float = 0.5          # 'fc' head only, as the paper
  leaky_slope: float = 0.1
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f'yolo: head must be one of {HEADS}, got {self.head!r}.')
    if self.grid_size < 1 or self.boxes_per_cell < 1:
      raise ValueError(f'yolo: grid_size and boxes_per_cell must be >= 1, got '
                       f'{self.grid_size} and {self.boxes_per_cell}.')
    kwargs = dict(self.backbone_kwargs or {})
    if registry.model_info(self.backbone).family in ('detection', 'segmentation'):
      raise ValueError(f'yolo: backbone {self.backbone!r} is not a classifier; use one of '
                       "the registry's classifiers (resnet18, mobilenet_v2, vgg11_bn, ...).")
    # num_classes=1: its classifier is never reached (see _features).
    self.net = registry.get_model(self.backbone, num_classes=1, **kwargs)
    self.per_cell = self.boxes_per_cell * 5 + self.num_classes
    bn = dict(momentum=0.9, epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name)
    if self.head == 'conv':
      self.conv = cnn.Conv(self.head_features, (3, 3), padding='SAME', use_bias=False,
                           dtype=self.dtype)
      self.bn = cnn.BatchNorm(**bn)
      self.out = cnn.Conv(self.per_cell, (1, 1), dtype=self.dtype)
    else:
      s = self.grid_size
      self.fc1 = cnn.Dense(self.fc_features, dtype=self.dtype)
      self.drop = cnn.Dropout(self.dropout_rate, axis_name=self.axis_name)
      self.fc2 = cnn.Dense(s * s * self.per_cell, dtype=self.dtype)

  def _features(self, x, train: bool):
    """The backbone's map at feature_layer, or where it stops being spatial."""
    prefix = tuple(self.net.path)
    target = self.feature_layer
    last = [None]

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name != '__call__' or not hasattr(out, 'ndim'):
        return out
      path = tuple(context.module.path)
      if path[:len(prefix)] != prefix or path == prefix:
        return out
      name = '/'.join(path[len(prefix):])
      if target is not None:
        if name == target:
          if out.ndim != x.ndim:
            raise ValueError(f'yolo: feature_layer {target!r} has output shape '
                             f'{tuple(out.shape[1:])}, not a spatial map.')
          raise _Stop(out)
        return out
      if out.ndim == x.ndim:
        last[0] = out
      elif args and getattr(args[0], 'ndim', 0) == x.ndim:
        raise _Stop(args[0])
      elif last[0] is not None:
        raise _Stop(last[0])
      return out

    try:
      with nn.intercept_methods(interceptor):
        self.net(x, train=train)
    except _Stop as stop:
      return stop.features
    where = f'no layer named {target!r}' if target else 'no non-spatial layer'
    raise ValueError(f'yolo: backbone {self.backbone!r} has {where}; name a layer with '
                     "spatial output as feature_layer (see launch.py --mode=summary).")

  def __call__(self, x, *, train: bool):
    y = self._features(x, train)
    s = self.grid_size
    if self.head == 'conv':
      y = self.bn(self.conv(y), use_running_average=not train)
      y = activations.leaky_relu(y, self.leaky_slope)
      if y.shape[1:3] != (s, s):
        if y.shape[1] < s or y.shape[2] < s:
          raise ValueError(f'yolo: the feature map is {y.shape[1]}x{y.shape[2]}, smaller '
                           f'than the {s}x{s} grid; use a larger input, a smaller '
                           'grid_size or an earlier feature_layer.')
        y = adaptive_avg_pool(y, (s, s))
      self.sow('intermediates', 'pre_logits', y)
      return self.out(y)
    y = y.reshape(y.shape[0], -1)
    y = activations.leaky_relu(self.fc1(y), self.leaky_slope)
    self.sow('intermediates', 'pre_logits', y)
    y = self.drop(y, deterministic=not train)
    return self.fc2(y).reshape(y.shape[0], s, s, self.per_cell)


registry.register('yolo', YOLO, family='detection', input_shape=(448, 448, 3),
                  num_classes=20, description='YOLO v1-style detector (S=7, B=2, '
                  'PASCAL VOC classes) on a registry backbone (default resnet18).')
registry.register(
    'yolo_shapes',
    functools.partial(YOLO, backbone='ablation_cnn', grid_size=8, head_features=128,
                      backbone_kwargs=dict(widths=(16, 32, 64), kernels=(3, 3))),
    family='detection', input_shape=(64, 64, 3), num_classes=4,
    description='Small YOLO for the embedded shapes scenes: 8x8 grid on a 3-stage '
                'ablation_cnn (16/32/64 channels).')
registry.register(
    'yolo_tiny',
    functools.partial(YOLO, backbone='ablation_cnn_tiny', grid_size=4, head_features=8,
                      backbone_kwargs=dict(kernels=(3,))),
    family='detection', input_shape=(16, 16, 3), num_classes=3,
    description='Test-only YOLO: 4x4 grid on ablation_cnn_tiny.')
