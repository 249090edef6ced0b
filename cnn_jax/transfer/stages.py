"""Which stage of a network each parameter belongs to, and which parameters are its head.

Transfer learning talks about networks in stages: "freeze the stem and the first
two stages", "fine-tune the top stage", "unfreeze one stage per epoch from the
top". This module turns a model's parameter tree into that vocabulary.

Stage names, bottom (input) to top (output):

  'stem'                      the layers before the first stage (ResNet's
                              conv_init/bn_init, GoogLeNet's conv1/conv2, an embedding)
  'stage1', 'stage2', ...     the stages the model sows as intermediates: ResNet
                              stages, VGG/AlexNet/LeNet conv blocks, DenseNet
                              blocks (with the transition that follows), MobileNet
                              v2 rows of its table (v1: its units), GoogLeNet's
                              inception groups 3, 4, 5
  'encoder1'.., 'bridge',     encoder-decoder segmentation nets
  'decoder1'..
  'classifier'                fully connected layers between the features and
                              the output layer (VGG's and AlexNet's fc1/fc2, LeNet's f6)
  'head'                      the output layer(s): every parameter whose shape
                              depends on num_classes (found by building the model
                              with two class counts), plus GoogLeNet's aux heads

`head_paths` finds the head without any name table: it compares the parameter
shapes of the same model built for 2 and for 3 classes. `param_stages` uses name
rules per model family for the rest; a model whose top-level modules the rules
cannot place raises, naming them (regex patterns over parameter paths still work
for such a model, see cnn_jax.transfer.freeze).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp

Path = Tuple[str, ...]

_STEM = re.compile(r'^(conv_init|bn_init|stem|embed|dense_init)$')


def path_str(path: Path) -> str:
  return '/'.join(path)


def flat_paths(tree) -> List[Path]:
  """Every leaf path of a nested dict of arrays, as tuples of keys, sorted."""
  if not tree:
    return []
  return sorted(flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).keys())


def abstract_variables(model, input_shape: Sequence[int], input_dtype=jnp.float32):
  """model.init as ShapeDtypeStructs (nothing allocated): 'params' and 'batch_stats'."""
  from cnn_jax.analysis import tables  # pylint: disable=import-outside-toplevel
  v = tables.abstract_variables(model, input_shape, dtype=input_dtype)
  return {k: v[k] for k in ('params', 'batch_stats') if k in v}


def head_paths(model, input_shape: Sequence[int], input_dtype=jnp.float32) -> List[Path]:
  """Parameter paths whose shapes depend on num_classes: the layers a new task replaces.

  Builds `model` for 2 and for 3 classes abstractly (jax.eval_shape) and compares.
  Raises ValueError if none differ (a model without a num_classes output)."""
  shapes = []
  for n in (2, 3):
    v = abstract_variables(model.clone(num_classes=n), input_shape, input_dtype)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(v['params']))
    shapes.append({k: s.shape for k, s in flat.items()})
  a, b = shapes
  if set(a) != set(b):
    raise ValueError('the parameter tree of this model changes with num_classes; its '
                     'head cannot be found by shape.')
  out = sorted(k for k in a if a[k] != b[k])
  if not out:
    raise ValueError(f'{type(model).__name__}: no parameter depends on num_classes, so '
                     'there is no classification head to replace.')
  return out


def _family_rule(model):
  """A function top-level module name -> stage name (or None) for this model."""
  from cnn_jax.models import mobilenet  # pylint: disable=import-outside-toplevel
  name = type(model).__name__
  v2_rows: Dict[int, int] = {}
  if isinstance(model, mobilenet.MobileNetV2):
    k = 0
    for i, row in enumerate(model.setting):
      for _ in range(row[2]):
        k += 1
        v2_rows[k] = i + 1
  transition_after = name.startswith('DenseNet')   # DenseNet: block i, then transition i

  def rule(top: str):
    if _STEM.match(top) or (name.startswith('GoogLeNet') and
                            top in ('conv1', 'conv2', 'conv2_reduce')):
      return 'stem'
    m = re.match(r'^(?:stage|features_block|block)(\d+)(?:_|$)', top)
    if m:
      i = int(m.group(1))
      if v2_rows and top.startswith('block'):
        return f'stage{v2_rows[i]}'
      return f'stage{i}'
    m = re.match(r'^conv(\d+)$', top)               # AlexNet, ZFNet, CNN1D, FF-CNN
    if m:
      return 'stage1' if name.startswith('TextCNN') else f'stage{m.group(1)}'
    m = re.match(r'^c(\d+)$', top)                  # LeNet c1, c3, c5
    if m:
      return f'stage{(int(m.group(1)) + 1) // 2}'
    m = re.match(r'^s(\d+)$', top)                  # LeNet's trainable subsampling
    if m:
      return f'stage{int(m.group(1)) // 2}'
    m = re.match(r'^transition(\d+)$', top)
    if m:
      i = int(m.group(1))
      return f'stage{i}' if transition_after else f'stage{i + 1}'
    m = re.match(r'^inception(\d)[a-z]$', top)      # GoogLeNet 3a-3b, 4a-4e, 5a-5b
    if m:
      return f'stage{m.group(1)}'
    m = re.match(r'^(encoder|decoder)(\d+)$', top)
    if m:
      return f'{m.group(1)}{m.group(2)}'
    m = re.match(r'^attention(\d+)$', top)          # ResUNet++: gates decoder i's input
    if m:
      return f'decoder{m.group(1)}'
    if top == 'bridge':
      return 'bridge'
    m = re.match(r'^(?:highway|dense)(\d+)$', top)   # highway MLP layers, MLP layers
    if m:
      return f'stage{m.group(1)}'
    if top in ('bn_final', 'conv_last', 'bn_last', 'bn2d'):
      return '_last'                                # closes the last stage
    if re.match(r'^(fc\d+|fc_hidden|f6|bn1d)$', top):
      return 'classifier'
    if re.match(r'^(aux\d+|head_aspp|head|fc|out|output)$', top):
      return 'head'
    return None
  return rule


def stage_rank(stage: str) -> Tuple[int, int]:
  """Sort key, bottom to top: stem, stage/encoder i, bridge, decoder i, classifier, head."""
  if stage == 'stem':
    return (0, 0)
  m = re.match(r'^(stage|encoder)(\d+)$', stage)
  if m:
    return (1, int(m.group(2)))
  if stage == 'bridge':
    return (2, 0)
  m = re.match(r'^decoder(\d+)$', stage)
  if m:
    # decoder1 is the deepest (next to the bridge) in both U-Nets here.
    return (3, int(m.group(1)))
  if stage == 'classifier':
    return (4, 0)
  if stage == 'head':
    return (5, 0)
  raise ValueError(f'unknown stage name {stage!r}.')


def param_stages(model, params, heads: Iterable[Path] = ()) -> Dict[Path, str]:
  """Stage name of every parameter path of `params` (a tree of `model`).

  Paths in `heads` (from head_paths) are 'head' whatever their name. Raises
  ValueError naming the top-level modules no rule places."""
  rule = _family_rule(model)
  nested = type(model).__name__ == 'YOLO'
  if nested:
    # A detector: its backbone ('net') staged by the backbone's own rules, the
    # detection head above it.
    from cnn_jax.models import registry  # pylint: disable=import-outside-toplevel
    rule = _family_rule(registry.get_model(model.backbone, num_classes=1,
                                           **dict(model.backbone_kwargs or {})))
  heads = set(map(tuple, heads))
  out: Dict[Path, str] = {}
  unplaced = set()
  for path in flat_paths(params):
    if path in heads:
      stage = 'head'
    elif nested:
      stage = rule(path[1]) if path[0] == 'net' and len(path) > 1 else 'head'
    else:
      stage = rule(path[0])
    if stage is None:
      unplaced.add('/'.join(path[:2]) if nested else path[0])
      continue
    out[path] = stage
  if unplaced:
    raise ValueError(
        f'{type(model).__name__}: cannot place module(s) {sorted(unplaced)} in a stage. '
        'Freeze them with regex patterns over parameter paths instead (e.g. '
        f'transfer.freeze={sorted(unplaced)[0] + "/"!r}).')
  real = sorted({s for s in out.values() if s != '_last'}, key=stage_rank)
  body = [s for s in real if s.startswith(('stage', 'encoder', 'decoder', 'bridge'))]
  for path, stage in out.items():
    if stage == '_last':
      out[path] = body[-1] if body else 'head'
  return out


def ordered_stages(stages: Mapping[Path, str]) -> List[str]:
  """The distinct stage names of a param_stages map, bottom to top."""
  return sorted(set(stages.values()), key=stage_rank)
