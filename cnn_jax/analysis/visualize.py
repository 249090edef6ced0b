"""`launch.py --mode=visualize`: every figure of the notes, from one trained run.

    python launch.py --mode=visualize --workdir=runs/lenet5_digits
    python launch.py --mode=visualize --workdir=runs/lenet5_digits \
        --figures=deconvnet,grad_cam --layers=c3 --num_images=4
    python launch.py --mode=visualize --workdir=runs/figures --figures=kernels
    python launch.py --mode=visualize --workdir=runs/vgg16_rf --model=vgg16 \
        --figures=receptive_field,filters

The figures (PNG, in `<workdir>/figures/`):

  kernels          classic hand-designed kernels (identity, edge, sharpen, blurs,
                   unsharp masking, Sobel, Prewitt, the notes' vertical edge) applied
                   with our conv to a photo that ships with scikit-learn, grayscale
                   (kernels_gray.png) and per RGB channel (kernels_rgb.png)
  filters          the first conv layer's learned filters as an image grid
  activation_maps  the maps of the chosen layers for one test image
  top_patches      per chosen layer, the test patches that excite 8 of its channels
                   most (one row per channel)
  deconvnet        Zeiler & Fergus: each image's strongest channel at the deepest
                   chosen layer, projected back to pixels through ReLU, the layer's
                   own filters flipped and max-unpooling at the forward switches
                   (sequential conv nets only)
  saliency         |d score / d pixel| of the predicted class
  guided_backprop  the same gradient with the guided-backprop ReLU rule
  grad_cam         Grad-CAM of the predicted class at the last spatial layer
  receptive_field  theoretical receptive field per layer and the effective one
                   measured by gradients over the test images
  curves           training curves from metrics.jsonl
  confusion        the test confusion matrix from confusion_matrix.json

A workdir with a trained run (its `config.json` and checkpoints) gives all of
them, on images of its evaluation split. Without one, `model=NAME` draws the
figures that need no data (filters, receptive_field) from random initial
weights, and says so in the titles; `kernels` needs neither.

Layers default to three conv layers (the first, one in the middle, the last);
`layers=` takes names or unique suffixes from `launch.py --mode=summary`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

FIGURES = ('kernels', 'filters', 'activation_maps', 'top_patches', 'deconvnet', 'saliency',
           'guided_backprop', 'grad_cam', 'receptive_field', 'curves', 'confusion')
_NO_MODEL = ('kernels',)
_NO_DATA = ('kernels', 'filters', 'receptive_field')
_TOP_CHANNELS = 8
_TOP_PATCH_IMAGES = 500     # top-9 patches are searched over this many eval images


def parse_figures(text: Optional[str]) -> List[str]:
  """'a,b' -> ['a', 'b'] checked against FIGURES; '' or 'all' -> every figure."""
  if not text or text == 'all':
    return list(FIGURES)
  names = [t.strip() for t in text.split(',') if t.strip()]
  unknown = [n for n in names if n not in FIGURES]
  if unknown:
    raise ValueError(f'unknown figure(s) {", ".join(unknown)}; choose from '
                     f'{", ".join(FIGURES)} (or all).')
  return names


def _has_checkpoint(workdir: str) -> bool:
  return (os.path.exists(os.path.join(workdir, 'config.json'))
          and os.path.isdir(os.path.join(workdir, 'checkpoints')))


def _conv_layers(model, input_shape, variables) -> List[str]:
  from cnn_jax.analysis import layers as layers_lib  # pylint: disable=import-outside-toplevel
  nd = len(input_shape) - 1
  return [name for name, kind, shape in layers_lib.list_layers(model, input_shape,
                                                               variables=variables)
          if 'Conv' in kind and len(shape) == nd + 1]


def _pick(names: Sequence[str]) -> List[str]:
  """First, middle and last (distinct, in order)."""
  if len(names) <= 3:
    return list(names)
  return [names[0], names[len(names) // 2], names[-1]]


class _Subject:
  """The model, its variables and (with a trained run) images, labels and class names."""

  def __init__(self, workdir, model_name, input_shape, checkpoint, num_images, load=True):
    from cnn_jax import models  # pylint: disable=import-outside-toplevel
    from cnn_jax.analysis import tables  # pylint: disable=import-outside-toplevel
    self.workdir = workdir
    self.trained = load and _has_checkpoint(workdir)
    self.images = self.labels = None
    if self.trained:
      from cnn_jax.analysis import feature_maps  # pylint: disable=import-outside-toplevel
      from cnn_jax.transfer import load  # pylint: disable=import-outside-toplevel
      variables, info = load.restore_workdir_variables(workdir, checkpoint)
      if model_name and model_name != info['model']:
        raise ValueError(f'--model={model_name} but {workdir!r} holds a trained '
                         f'{info["model"]!r}; drop --model or use another workdir.')
      self.name = info['model']
      self.model = models.get_model(self.name, num_classes=info['num_classes'],
                                    **dict(info.get('model_kwargs') or {}))
      self.variables = jax.tree_util.tree_map(np.asarray, variables)
      self.images, self.labels = feature_maps.run_images(workdir, n=num_images, clip=True)
      self.input_shape = tuple(self.images.shape[1:])
      self.where = f'step {info["step"]}'
    elif model_name and load:
      self.name = model_name
      info = models.model_info(model_name)
      self.model = models.get_model(model_name)
      self.input_shape = tuple(input_shape or info.input_shape)
      # Shape errors surface here, as clear errors, before the jitted init below.
      tables.abstract_variables(self.model, self.input_shape)
      x = np.zeros((1,) + self.input_shape, np.float32)
      self.variables = jax.jit(lambda k: self.model.init(k, x, train=False))(
          jax.random.PRNGKey(0))
      self.where = 'untrained: random initial weights'
    else:
      self.model = None
      self.name, self.where = None, ''


def visualize(workdir: str, *, figures: Optional[Sequence[str]] = None,
              layers: Optional[Sequence[str]] = None, model: Optional[str] = None,
              input_shape: Optional[Sequence[int]] = None, num_images: int = 8,
              checkpoint: str = 'best_or_latest', photo: str = 'china') -> Dict[str, str]:
  """Draws the chosen figures (see the module docstring) into workdir/figures.

  Returns {figure name: PNG path} (two entries for 'kernels'). Everything that can
  be checked before any compute is checked first: figure names, what the workdir
  holds, the layer names.
  """
  figures = list(figures) if figures else list(FIGURES)
  parse_figures(','.join(figures))
  if num_images < 1:
    raise ValueError(f'num_images must be >= 1, got {num_images}.')
  if checkpoint not in ('best', 'latest', 'best_or_latest'):
    raise ValueError("checkpoint must be 'best', 'latest' or 'best_or_latest', got "
                     f'{checkpoint!r}.')
  workdir = os.path.expanduser(workdir)
  explicit = figures != list(FIGURES)
  trained = _has_checkpoint(workdir)
  if not trained and not model:
    needs = [f for f in figures if f not in _NO_MODEL]
    if needs and explicit:
      raise ValueError(f'{workdir!r} holds no trained run (config.json and checkpoints), '
                       f'and no --model was given: {", ".join(needs)} need a model. Train '
                       'first, point --workdir at a run, or pass --model=NAME.')
    figures = [f for f in figures if f in _NO_MODEL]
  elif not trained:
    needs = [f for f in figures if f not in _NO_DATA]
    if needs and explicit:
      raise ValueError(f'{", ".join(needs)} need a trained run\'s data and logs, and '
                       f'{workdir!r} holds none; with --model alone only '
                       f'{", ".join(_NO_DATA)} can be drawn.')
    figures = [f for f in figures if f in _NO_DATA]
  needs_model = any(f not in _NO_MODEL for f in figures)
  subject = _Subject(workdir, model, input_shape, checkpoint, num_images, load=needs_model)
  chosen = _resolve_layers(subject, layers)
  out = os.path.join(workdir, 'figures')
  os.makedirs(out, exist_ok=True)
  written: Dict[str, str] = {}
  for name in figures:
    try:
      paths = _DRAW[name](subject, chosen, out, photo=photo, num_images=num_images)
    except _Skip as e:
      if explicit:
        raise ValueError(f'{name}: {e}') from None
      print(f'visualize: skipped {name}: {e}')
      continue
    for key, path in paths.items():
      written[key] = path
      print(f'visualize: {key:16s} {path}')
  return written


class _Skip(Exception):
  """A figure that does not apply to this model (e.g. deconvnet of a ResNet)."""


def _resolve_layers(subject, layers) -> List[str]:
  if subject.model is None:
    if layers:
      raise ValueError('--layers needs a model: a trained workdir or --model=NAME.')
    return []
  from cnn_jax.analysis import layers as layers_lib  # pylint: disable=import-outside-toplevel
  available = [n for n, _, _ in layers_lib.list_layers(subject.model, subject.input_shape,
                                                       variables=subject.variables)]
  if layers:
    return [layers_lib.resolve(n, available) for n in layers]
  convs = _conv_layers(subject.model, subject.input_shape, subject.variables)
  if not convs:
    raise ValueError(f'{subject.name} has no conv layers with spatial outputs; name the '
                     'layers to draw with --layers.')
  return _pick(convs)


def _title(subject, text: str) -> str:
  return f'{subject.name} ({subject.where}): {text}' if subject.name else text


def _kernels(subject, chosen, out, *, photo, num_images):
  del subject, chosen, num_images
  from cnn_jax.analysis import kernels  # pylint: disable=import-outside-toplevel
  image = kernels.sample_photo(photo, size=160)
  return {'kernels_gray': kernels.plot_kernel_grid(image, os.path.join(out, 'kernels_gray.png'),
                                                   mode='gray'),
          'kernels_rgb': kernels.plot_kernel_grid(image, os.path.join(out, 'kernels_rgb.png'),
                                                  mode='rgb')}


def _filters(subject, chosen, out, **_):
  from cnn_jax.analysis import feature_maps  # pylint: disable=import-outside-toplevel
  try:
    kernel = feature_maps.first_layer_filters(subject.variables, model=subject.model,
                                              input_shape=subject.input_shape)
  except ValueError as e:
    raise _Skip(str(e)) from None
  del chosen
  path = os.path.join(out, 'filters.png')
  shape = 'x'.join(map(str, kernel.shape))
  return {'filters': feature_maps.plot_filters(
      kernel, path, title=_title(subject, f'first conv layer filters ({shape}), each '
                                 'scaled to [0, 1] on its own'))}


def _activation_maps(subject, chosen, out, **_):
  from cnn_jax.analysis import feature_maps  # pylint: disable=import-outside-toplevel
  path = os.path.join(out, 'activation_maps.png')
  return {'activation_maps': feature_maps.plot_activation_maps(
      subject.model, subject.variables, subject.images[:1], chosen, path)}


def _top_patches(subject, chosen, out, *, num_images, **_):
  del num_images
  from cnn_jax.analysis import feature_maps  # pylint: disable=import-outside-toplevel
  images, _ = feature_maps.run_images(subject.workdir, n=_TOP_PATCH_IMAGES, clip=True)
  written = {}
  for layer in chosen:
    result = feature_maps.top_activating_patches(subject.model, subject.variables, images,
                                                 layer, channels=None, k=9)
    # The channels with the strongest single responses, in channel order.
    keep = sorted(np.argsort(-result.values[:, 0], kind='stable')[:_TOP_CHANNELS])
    result = dataclasses.replace(
        result, channels=tuple(result.channels[i] for i in keep), values=result.values[keep],
        positions=result.positions[keep], patches=result.patches[keep],
        boxes=result.boxes[keep])
    safe = layer.replace('/', '.').replace(':', '_')
    written[f'top_patches:{layer}'] = feature_maps.plot_top_patches(
        result, os.path.join(out, f'top_patches_{safe}.png'))
  return written


def _deconvnet(subject, chosen, out, *, num_images, **_):
  from cnn_jax.analysis import deconvnet  # pylint: disable=import-outside-toplevel
  from cnn_jax.analysis import layers as layers_lib  # pylint: disable=import-outside-toplevel
  images = subject.images[:num_images]
  layer = chosen[-1]
  try:
    deconvnet.deconvnet_steps(subject.model, subject.variables, images[:1], layer)
  except ValueError as e:
    raise _Skip(str(e)) from None
  acts = np.asarray(layers_lib.layer_outputs(subject.model, subject.variables, images,
                                             [layer])[layer])
  strongest = acts.reshape(acts.shape[0], -1, acts.shape[-1]).max(axis=1).argmax(axis=1)
  recon = np.concatenate([
      deconvnet.deconvnet(subject.model, subject.variables, images[i:i + 1], layer, int(c))
      for i, c in enumerate(strongest)])
  titles = [f'{layer}, channel {int(c)} (its strongest)' for c in strongest]
  return {'deconvnet': deconvnet.plot_deconvnet(images, recon,
                                                os.path.join(out, 'deconvnet.png'), titles)}


def _class_titles(subject, method: str, logits) -> List[str]:
  pred = np.asarray(logits).argmax(-1)
  return [f'{method}: predicted {p}, label {int(l)}' for p, l in zip(pred, subject.labels)]


def _logits(subject, images):
  return subject.model.apply(subject.variables, images, train=False)


def _saliency(subject, chosen, out, *, num_images, **_):
  del chosen
  from cnn_jax.analysis import saliency  # pylint: disable=import-outside-toplevel
  images = subject.images[:num_images]
  maps = saliency.gradient_saliency(subject.model, subject.variables, images)
  titles = _class_titles(subject, '|gradient|', _logits(subject, images))
  return {'saliency': saliency.plot_saliency(images, maps, os.path.join(out, 'saliency.png'),
                                             titles)}


def _guided_backprop(subject, chosen, out, *, num_images, **_):
  del chosen
  from cnn_jax.analysis import saliency  # pylint: disable=import-outside-toplevel
  images = subject.images[:num_images]
  try:
    maps = saliency.guided_backprop(subject.model, subject.variables, images)
  except ValueError as e:
    raise _Skip(str(e)) from None
  titles = _class_titles(subject, 'guided backprop', _logits(subject, images))
  return {'guided_backprop': saliency.plot_saliency(
      images, maps, os.path.join(out, 'guided_backprop.png'), titles)}


def _grad_cam(subject, chosen, out, *, num_images, **_):
  del chosen
  from cnn_jax.analysis import saliency  # pylint: disable=import-outside-toplevel
  images = subject.images[:num_images]
  layer = _cam_layer(subject)
  maps = saliency.grad_cam(subject.model, subject.variables, images, layer)
  if layer is None:
    name, where = saliency.default_cam_layer(subject.model, subject.variables, images[:1])
    layer = f'the input of {name}' if where == 'input' else name
  titles = _class_titles(subject, f'Grad-CAM at {layer}', _logits(subject, images))
  return {'grad_cam': saliency.plot_saliency(images, maps, os.path.join(out, 'grad_cam.png'),
                                             titles)}


def _cam_layer(subject) -> Optional[str]:
  """None (Grad-CAM's default: the maps the head reads) unless those are 1x1, as
  LeNet-5's c5 is: Grad-CAM of a single position is a constant, so then the last
  layer whose map is larger."""
  from cnn_jax.analysis import layers as layers_lib  # pylint: disable=import-outside-toplevel
  rows = layers_lib.list_layers(subject.model, subject.input_shape,
                                variables=subject.variables)
  nd = len(subject.input_shape) - 1
  spatial = [(name, shape) for name, _, shape in rows if len(shape) == nd + 1]
  if not spatial or any(s > 1 for s in spatial[-1][1][:nd]):
    return None
  wider = [name for name, shape in spatial if any(s > 1 for s in shape[:nd])]
  return wider[-1] if wider else None


def _receptive_field(subject, chosen, out, **_):
  from cnn_jax.analysis import receptive  # pylint: disable=import-outside-toplevel
  if len(subject.input_shape) != 3:
    raise _Skip('the receptive-field figure draws 2-D inputs only.')
  path = os.path.join(out, 'receptive_field.png')
  return {'receptive_field': receptive.plot_receptive_fields(
      subject.model, subject.variables, subject.input_shape, path, layers=chosen,
      inputs=subject.images)}


def _curves(subject, chosen, out, **_):
  del chosen
  from cnn_jax.analysis import plots  # pylint: disable=import-outside-toplevel
  from cnn_jax.train import writers  # pylint: disable=import-outside-toplevel
  records = writers.read_jsonl(os.path.join(subject.workdir, 'metrics.jsonl'))
  if not records:
    raise _Skip('metrics.jsonl is empty or missing.')
  return {'curves': plots.plot_training_curves(records, os.path.join(out,
                                                                     'training_curves.png'))}


def _confusion(subject, chosen, out, **_):
  del chosen
  from cnn_jax.analysis import plots  # pylint: disable=import-outside-toplevel
  path = os.path.join(subject.workdir, 'confusion_matrix.json')
  if not os.path.exists(path):
    raise _Skip('no confusion_matrix.json: the run has not finished its test evaluation.')
  with open(path) as f:
    confusion = np.asarray(json.load(f))
  return {'confusion': plots.plot_confusion_matrix(confusion,
                                                   os.path.join(out, 'confusion_matrix.png'))}


_DRAW = {'kernels': _kernels, 'filters': _filters, 'activation_maps': _activation_maps,
         'top_patches': _top_patches, 'deconvnet': _deconvnet, 'saliency': _saliency,
         'guided_backprop': _guided_backprop, 'grad_cam': _grad_cam,
         'receptive_field': _receptive_field, 'curves': _curves, 'confusion': _confusion}
assert set(_DRAW) == set(FIGURES)
