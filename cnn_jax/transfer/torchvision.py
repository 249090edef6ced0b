"""Import torchvision weights (e.g. its ImageNet ones) into cnn_jax models.

    variables = import_torchvision('resnet18', 'resnet18.pth')
    logits = get_model('resnet18').apply(variables, x_nhwc, train=False)

`source` is a state_dict file (.pth/.pt through `torch.load(weights_only=True)`;
.npz through `np.load(allow_pickle=False)`; .safetensors through our own
reader) or a mapping name -> array (NumPy arrays or torch tensors). Weight files
are untrusted: nothing in them is unpickled beyond tensors. Without torch,
convert a .pth on a machine that has it:

    python -m cnn_jax.transfer.torchvision --model resnet18 \\
        --input resnet18.pth --output resnet18.npz

Conversions (torch on the left, ours on the right):

  * conv weight (O, I/g, kh, kw) -> kernel (kh, kw, I/g, O): transpose
    (2, 3, 1, 0). Grouped and depthwise convs need nothing more, because both
    sides keep I/g input channels per filter (MobileNet v2's depthwise
    (C, 1, 3, 3) -> (3, 3, 1, C)).
  * Linear weight (out, in) -> Dense kernel (in, out): transpose.
  * The first Linear after a flatten of (C, H, W) maps (VGG fc1, AlexNet fc1,
    GoogLeNet aux fc1): PyTorch flattens channels-first, we flatten
    channels-last (H, W, C), so the input axis is reordered too:
    W.reshape(out, C, H, W).transpose(0, 2, 3, 1).reshape(out, -1).T.
  * BatchNorm weight -> scale, bias -> bias, running_mean -> mean,
    running_var -> var (the last two in 'batch_stats'); num_batches_tracked
    is dropped. Both sides compute (x - mean) / sqrt(var + eps) * scale + bias
    and our eps is torchvision's (1e-3 in GoogLeNet, 1e-5 elsewhere).
  * biases: unchanged.

Name mapping (ours -> torchvision), by family:

  * ResNet / ResNeXt / Wide ResNet: conv_init, bn_init -> conv1, bn1;
    stage{i}_block{j}/{conv,bn}{k} -> layer{i}.{j-1}.{conv,bn}{k};
    proj, proj_bn -> downsample.0, downsample.1; fc -> fc.
  * VGG: features_block{b}_conv{c} (and _bn{c}) -> features.{n}, n counting
    every conv, BN, ReLU and max pool in order; fc1, fc2, fc3 -> classifier.0,
    classifier.3, classifier.6.
  * AlexNet (alexnet_torchvision): conv1..conv5 -> features.0, 3, 6, 8, 10;
    fc1, fc2, fc3 -> classifier.1, classifier.4, classifier.6.
  * GoogLeNet (googlenet_bn): conv1, conv2_reduce, conv2 -> conv1, conv2,
    conv3; inception{m}/conv1x1, conv3x3_reduce, conv3x3, conv5x5_reduce,
    conv5x5, pool_proj -> inception{m}.branch1, branch2.0, branch2.1,
    branch3.0, branch3.1, branch4.1; aux{k}, fc -> aux{k}, fc; inside each
    unit conv, bn -> conv, bn.
  * DenseNet: conv_init, bn_init -> features.conv0, features.norm0;
    block{i}/layer{j}/{bn1,conv1,bn2,conv2} ->
    features.denseblock{i}.denselayer{j}.{norm1,conv1,norm2,conv2};
    transition{i}/{bn,conv} -> features.transition{i}.{norm,conv};
    bn_final -> features.norm5; fc -> classifier. (The old 'norm.1'-style
    names of early torchvision DenseNet files are accepted too.)
  * MobileNet v2: conv_init, bn_init -> features.0.0, features.0.1;
    block{k}/expand, expand_bn, dw, dw_bn, project, project_bn ->
    features.{k}.conv.0.0, conv.0.1, conv.1.0, conv.1.1, conv.2, conv.3
    (block1 has no expand: dw, dw_bn, project, project_bn -> conv.0.0,
    conv.0.1, conv.1, conv.2); conv_last, bn_last -> features.18.0,
    features.18.1; fc -> classifier.1.

Everything is checked before any array is converted: one ValueError lists
every missing key, every unexpected key and every tensor whose shape is not
the one our model needs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from cnn_jax.models import registry
from cnn_jax.transfer import safetensors

Path = Tuple[str, ...]

_RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
            'resnext50_32x4d', 'resnext101_32x8d', 'wide_resnet50_2', 'wide_resnet101_2')
_VGGS = tuple(f'vgg{d}{bn}' for d in (11, 13, 16, 19) for bn in ('', '_bn'))
_DENSENETS = ('densenet121', 'densenet161', 'densenet169', 'densenet201')
_MOBILENETS = ('mobilenet_v2', 'mobilenet_v2_050')

# Our registry name -> family; torchvision's constructor for each is the same name,
# except alexnet_torchvision (torchvision 'alexnet'), googlenet_bn ('googlenet')
# and mobilenet_v2_050 (mobilenet_v2(width_mult=0.5)).
_FAMILY = {**{n: 'resnet' for n in _RESNETS}, **{n: 'vgg' for n in _VGGS},
           'alexnet_torchvision': 'alexnet', 'googlenet_bn': 'googlenet',
           **{n: 'densenet' for n in _DENSENETS}, **{n: 'mobilenet' for n in _MOBILENETS}}
SUPPORTED_MODELS: Tuple[str, ...] = tuple(_FAMILY)

# Same-named models of ours that are *not* torchvision's architecture.
_NOT_TORCHVISION = {'googlenet': 'googlenet_bn', 'alexnet': 'alexnet_torchvision'}

# The classifier weight of each family: its out dim is the weights' class count.
_CLASSIFIER = {'resnet': 'fc.weight', 'vgg': 'classifier.6.weight',
               'alexnet': 'classifier.6.weight', 'googlenet': 'fc.weight',
               'densenet': 'classifier.weight', 'mobilenet': 'classifier.1.weight'}

_TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
_WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'module', 'net')


# ----------------------------------------------------------------------------
# Module names, ours -> torchvision's, per family. Each function maps every
# module path of our parameter tree (the path minus the leaf name) to the dotted
# prefix of the torchvision module holding the same tensors.
# ----------------------------------------------------------------------------

def _resnet_names(model, modules: FrozenSet[Path]) -> Dict[Path, str]:
  del model
  top = {('conv_init',): 'conv1', ('bn_init',): 'bn1', ('fc',): 'fc'}
  out = {}
  for m in modules:
    block = re.fullmatch(r'stage(\d+)_block(\d+)', m[0])
    if m in top:
      out[m] = top[m]
    elif block and len(m) == 2:
      sub = {'proj': 'downsample.0', 'proj_bn': 'downsample.1'}.get(m[1], m[1])
      out[m] = f'layer{block[1]}.{int(block[2]) - 1}.{sub}'
  return out


def _vgg_names(model, modules: FrozenSet[Path]) -> Dict[Path, str]:
  del modules
  # torchvision's make_layers appends conv, [BN], ReLU per conv and a pool per block.
  out, n = {}, 0
  for b, widths in enumerate(model.blocks, start=1):
    for c in range(1, len(widths) + 1):
      out[(f'features_block{b}_conv{c}',)] = f'features.{n}'
      if model.batch_norm:
        out[(f'features_block{b}_bn{c}',)] = f'features.{n + 1}'
      n += 3 if model.batch_norm else 2
    n += 1
  out.update({('fc1',): 'classifier.0', ('fc2',): 'classifier.3', ('fc3',): 'classifier.6'})
  return out


def _alexnet_names(model, modules: FrozenSet[Path]) -> Dict[Path, str]:
  del modules
  # features: conv, ReLU, [max pool] per layer (torchvision's AlexNet has no LRN).
  out, n = {}, 0
  for i, layer in enumerate(model.layers, start=1):
    out[(f'conv{i}',)] = f'features.{n}'
    n += 3 if layer.pool is not None else 2
  # classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear.
  out.update({('fc1',): 'classifier.1', ('fc2',): 'classifier.4', ('fc3',): 'classifier.6'})
  return out


_INCEPTION_BRANCHES = {'conv1x1': 'branch1', 'conv3x3_reduce': 'branch2.0',
                       'conv3x3': 'branch2.1', 'conv5x5_reduce': 'branch3.0',
                       'conv5x5': 'branch3.1', 'pool_proj': 'branch4.1'}


def _googlenet_names(model, modules: FrozenSet[Path]) -> Dict[Path, str]:
  del model
  stem = {'conv1': 'conv1', 'conv2_reduce': 'conv2', 'conv2': 'conv3', 'fc': 'fc'}
  out = {}
  for m in modules:
    head, rest = m[0], list(m[1:])
    if head in stem:
      out[m] = '.'.join([stem[head]] + rest)
    elif head.startswith('inception') and rest and rest[0] in _INCEPTION_BRANCHES:
      out[m] = '.'.join([head, _INCEPTION_BRANCHES[rest[0]]] + rest[1:])
    elif re.fullmatch(r'aux\d+', head):       # aux{k}/conv/{conv,bn}, fc1, fc2
      out[m] = '.'.join(m)
  return out


def _densenet_names(model, modules: FrozenSet[Path]) -> Dict[Path, str]:
  del model
  top = {('conv_init',): 'features.conv0', ('bn_init',): 'features.norm0',
         ('bn_final',): 'features.norm5', ('fc',): 'classifier'}
  layer = {'bn1': 'norm1', 'conv1': 'conv1', 'bn2': 'norm2', 'conv2': 'conv2'}
  out = {}
  for m in modules:
    block = re.fullmatch(r'block(\d+)', m[0])
    trans = re.fullmatch(r'transition(\d+)', m[0])
    dense_layer = re.fullmatch(r'layer(\d+)', m[1]) if len(m) == 3 else None
    if m in top:
      out[m] = top[m]
    elif block and dense_layer and m[2] in layer:
      out[m] = (f'features.denseblock{block[1]}.denselayer{dense_layer[1]}.'
                f'{layer[m[2]]}')
    elif trans and len(m) == 2 and m[1] in ('bn', 'conv'):
      out[m] = f'features.transition{trans[1]}.' + {'bn': 'norm', 'conv': 'conv'}[m[1]]
  return out


def _mobilenet_names(model, modules: FrozenSet[Path]) -> Dict[Path, str]:
  del model
  expanded = ('expand', 'expand_bn', 'dw', 'dw_bn', 'project', 'project_bn')
  plain = ('dw', 'dw_bn', 'project', 'project_bn')
  n_blocks = max(int(m[0][5:]) for m in modules if re.fullmatch(r'block\d+', m[0]))
  top = {('conv_init',): 'features.0.0', ('bn_init',): 'features.0.1',
         ('conv_last',): f'features.{n_blocks + 1}.0',
         ('bn_last',): f'features.{n_blocks + 1}.1', ('fc',): 'classifier.1'}
  out = {}
  for m in modules:
    block = re.fullmatch(r'block(\d+)', m[0])
    if m in top:
      out[m] = top[m]
    elif block and len(m) == 2:
      # torchvision's InvertedResidual.conv is one Sequential: [expand ConvBNReLU],
      # depthwise ConvBNReLU, project conv, project BN.
      if (m[0], 'expand') in modules:
        names = dict(zip(expanded, ('0.0', '0.1', '1.0', '1.1', '2', '3')))
      else:
        names = dict(zip(plain, ('0.0', '0.1', '1', '2')))
      if m[1] in names:
        out[m] = f'features.{block[1]}.conv.{names[m[1]]}'
  return out


def _vgg_chw(model) -> Dict[Path, int]:
  return {('fc1',): model.blocks[-1][-1]}


def _alexnet_chw(model) -> Dict[Path, int]:
  return {('fc1',): model.layers[-1].features}


def _googlenet_chw(model) -> Dict[Path, int]:
  if not model.aux_logits:
    return {}
  return {(f'aux{k + 1}', 'fc1'): model.aux_features[0] for k in range(len(model.aux_after))}


_NAMES: Dict[str, Callable[[Any, FrozenSet[Path]], Dict[Path, str]]] = {
    'resnet': _resnet_names, 'vgg': _vgg_names, 'alexnet': _alexnet_names,
    'googlenet': _googlenet_names, 'densenet': _densenet_names,
    'mobilenet': _mobilenet_names}
# Dense layers that read a flattened (C, H, W) map in torch: path -> C.
_CHW: Dict[str, Callable[[Any], Dict[Path, int]]] = {
    'vgg': _vgg_chw, 'alexnet': _alexnet_chw, 'googlenet': _googlenet_chw}


# ----------------------------------------------------------------------------
# The plan: every leaf of our variables, its torchvision key and conversion.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Leaf:
  collection: str                  # 'params' or 'batch_stats'
  path: Path                       # ours, leaf name included
  key: str                         # torchvision's state_dict key
  kind: str                        # 'conv', 'dense', 'dense_chw' or 'copy'
  shape: Tuple[int, ...]           # ours
  torch_shape: Tuple[int, ...]     # what the state_dict must hold
  channels: int = 0                # C of the (C, H, W) flatten, for 'dense_chw'


@dataclasses.dataclass(frozen=True)
class _Plan:
  model_name: str
  num_classes: int
  leaves: Tuple[_Leaf, ...]
  bn_prefixes: FrozenSet[str]      # torchvision BN modules (they carry num_batches_tracked)
  abstract: Any                    # jax.eval_shape of model.init


_PARAM_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_STAT_LEAVES = {'mean': 'running_mean', 'var': 'running_var'}


def _check_name(model_name: str):
  if model_name not in _FAMILY:
    hint = ''
    if model_name in _NOT_TORCHVISION:
      hint = (f" Our {model_name!r} is not torchvision's architecture; torchvision's is "
              f'{_NOT_TORCHVISION[model_name]!r}.')
    raise ValueError(f'import_torchvision: unsupported model {model_name!r}.{hint} '
                     f'Supported: {", ".join(SUPPORTED_MODELS)}.')


@functools.lru_cache(maxsize=16)
def _plan(model_name: str, num_classes: int) -> _Plan:
  _check_name(model_name)
  family = _FAMILY[model_name]
  model = registry.get_model(model_name, num_classes=num_classes)
  shape = (1,) + registry.model_info(model_name).input_shape
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32), train=False))
  unknown = set(abstract) - {'params', 'batch_stats'}
  if unknown:
    raise RuntimeError(f'{model_name}: variable collections {sorted(unknown)} have no '
                       'torchvision counterpart.')
  flat = {(col,) + path: leaf for col in abstract
          for path, leaf in traverse_util.flatten_dict(abstract[col]).items()}
  modules = frozenset(p[1:-1] for p in flat)
  names = _NAMES[family](model, modules)
  chw = _CHW[family](model) if family in _CHW else {}
  unnamed = sorted('/'.join(m) for m in modules if m not in names)
  if unnamed:
    raise RuntimeError(f'{model_name}: no torchvision name for our module(s) {unnamed}.')

  leaves, bn_prefixes = [], set()
  for (col, *path), abs_leaf in sorted(flat.items()):
    module, leaf_name = tuple(path[:-1]), path[-1]
    table = _PARAM_LEAVES if col == 'params' else _STAT_LEAVES
    if leaf_name not in table:
      raise RuntimeError(f'{model_name}: no torchvision name for {col}/{"/".join(path)}.')
    ours = tuple(abs_leaf.shape)
    kind, torch_shape, channels = 'copy', ours, 0
    if leaf_name == 'kernel' and len(ours) == 4:
      kind, torch_shape = 'conv', (ours[3], ours[2], ours[0], ours[1])
    elif leaf_name == 'kernel' and len(ours) == 2:
      kind, torch_shape = 'dense', (ours[1], ours[0])
      if module in chw:
        kind, channels = 'dense_chw', chw[module]
        hw = ours[0] // channels
        if channels * math.isqrt(hw) ** 2 != ours[0]:
          raise RuntimeError(f'{model_name}: {"/".join(path)} reads {ours[0]} inputs, not '
                             f'a square map of {channels} channels.')
    elif leaf_name == 'kernel':
      raise RuntimeError(f'{model_name}: kernel {"/".join(path)} has shape {ours}.')
    if col == 'batch_stats' or leaf_name == 'scale':
      bn_prefixes.add(names[module])
    leaves.append(_Leaf(col, tuple(path), f'{names[module]}.{table[leaf_name]}', kind, ours,
                        torch_shape, channels))
  keys = [l.key for l in leaves]
  if len(set(keys)) != len(keys):
    raise RuntimeError(f'{model_name}: two of our parameters map to one torchvision key.')
  return _Plan(model_name, num_classes, tuple(leaves), frozenset(bn_prefixes), abstract)


def torch_state_dict_shapes(model_name: str, num_classes: Optional[int] = None
                            ) -> Dict[str, Tuple[int, ...]]:
  """The torchvision state_dict keys our `model_name` needs, with their shapes.

  BatchNorm's `num_batches_tracked` (accepted and dropped on import) is not
  listed. num_classes defaults to the registry's (1000). Nothing is allocated.
  """
  _check_name(model_name)
  n = registry.model_info(model_name).num_classes if num_classes is None else num_classes
  return {l.key: l.torch_shape for l in _plan(model_name, n).leaves}


# ----------------------------------------------------------------------------
# Reading the source
# ----------------------------------------------------------------------------

def _torch_load(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(
        f'{path}: reading a .pth/.pt file needs PyTorch, which is not installed. Convert '
        'it to .npz with `python -m cnn_jax.transfer.torchvision --model NAME --input '
        f'{os.path.basename(path)} --output NAME.npz` on a machine with torch, or install '
        'torch.') from None
  try:
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe content
    raise ValueError(f'{path}: torch.load(weights_only=True) refused or failed to read it '
                     f'({type(e).__name__}: {e}). Save `model.state_dict()` (not the '
                     'model object) with torch.save.') from e


def _read_file(path: str) -> Mapping[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'import_torchvision: no such file {path!r}.')
  lower = path.lower()
  if lower.endswith(_TORCH_SUFFIXES):
    return _torch_load(path)
  if lower.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  if lower.endswith('.safetensors'):
    return safetensors.load_file(path)
  raise ValueError(f'import_torchvision: cannot tell the format of {path!r} from its '
                   f'extension; expected one of {", ".join(_TORCH_SUFFIXES)}, .npz, '
                   '.safetensors.')


def _unwrap(obj: Mapping[str, Any]) -> Mapping[str, Any]:
  # Checkpoints often wrap the state dict: {'state_dict': {...}, 'epoch': 90}.
  for _ in range(2):
    if not any(isinstance(v, Mapping) for v in obj.values()):
      return obj
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  nested = sorted(str(k) for k, v in obj.items() if isinstance(v, Mapping))
  if nested:
    raise ValueError(f'import_torchvision: the source holds nested mappings under {nested} '
                     f'and none of {_WRAPPER_KEYS}; pass the state_dict itself.')
  return obj


def _to_numpy(name: str, value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):          # a torch tensor, without importing torch
    t = value.detach().cpu()
    try:
      value = t.numpy()
    except (TypeError, RuntimeError):    # bfloat16 and friends have no NumPy view
      value = t.float().numpy()
  a = np.asarray(value)
  if a.dtype.kind not in 'biuf' and a.dtype != ml_dtypes.bfloat16:
    raise ValueError(f'import_torchvision: {name!r} is not a numeric array '
                     f'(dtype {a.dtype}).')
  return a


def _normalise_key(key: str, family: str) -> str:
  if key.startswith('module.'):         # saved from nn.DataParallel / DDP
    key = key[len('module.'):]
  if family == 'densenet':
    # Early torchvision DenseNet files: 'denselayer1.norm.1.weight' for 'norm1'.
    key = re.sub(r'(denselayer\d+\.(?:norm|relu|conv))\.((?:1|2)\.)', r'\1\2', key)
  return key


def _read_source(source, family: str) -> Dict[str, np.ndarray]:
  if isinstance(source, (str, os.PathLike)):
    obj = _read_file(os.fspath(source))
  elif isinstance(source, Mapping):
    obj = source
  else:
    raise TypeError(f'import_torchvision: source must be a path or a mapping name -> '
                    f'array, got {type(source).__name__}.')
  if not isinstance(obj, Mapping):
    raise ValueError(f'import_torchvision: the file holds a {type(obj).__name__}, not a '
                     'state_dict mapping.')
  state = {}
  for key, value in _unwrap(obj).items():
    if not isinstance(key, str):
      raise ValueError(f'import_torchvision: state_dict keys must be strings, got {key!r}.')
    new = _normalise_key(key, family)
    if new in state:
      raise ValueError(f'import_torchvision: {key!r} and another key both name {new!r}.')
    state[new] = _to_numpy(key, value)
  return state


# ----------------------------------------------------------------------------
# Checking and converting
# ----------------------------------------------------------------------------

def _check(plan: _Plan, state: Mapping[str, np.ndarray], num_classes_given: bool):
  expected = {l.key: l.torch_shape for l in plan.leaves}
  missing = [k for k in expected if k not in state]
  unexpected = sorted(
      k for k in state if k not in expected and not (
          k.endswith('.num_batches_tracked')
          and k[:-len('.num_batches_tracked')] in plan.bn_prefixes))
  misshaped = [(k, s, tuple(state[k].shape)) for k, s in expected.items()
               if k in state and tuple(state[k].shape) != s]
  if not (missing or unexpected or misshaped):
    return
  lines = [f'import_torchvision: the weights do not fit {plan.model_name!r} '
           f'(num_classes={plan.num_classes}).']
  if missing:
    lines.append(f'{len(missing)} missing key(s):')
    lines += [f'  {k}  (expected shape {expected[k]})' for k in missing]
  if unexpected:
    lines.append(f'{len(unexpected)} unexpected key(s):')
    lines += [f'  {k}  (shape {tuple(state[k].shape)})' for k in unexpected]
  if misshaped:
    lines.append(f'{len(misshaped)} mis-shaped tensor(s):')
    lines += [f'  {k}: expected {s}, got {g}' for k, s, g in misshaped]
  family = _FAMILY[plan.model_name]
  classifier = _CLASSIFIER[family]
  if num_classes_given and any(k == classifier for k, _, _ in misshaped):
    lines.append(f'hint: num_classes={plan.num_classes} differs from the '
                 f'{state[classifier].shape[0]} classes of the weights; import with '
                 'num_classes=None, then replace the head.')
  if family == 'googlenet' and missing and all(k.startswith('aux') for k in missing):
    lines.append("hint: torchvision drops GoogLeNet's aux heads unless built with "
                 "aux_logits=True: googlenet(weights='IMAGENET1K_V1', aux_logits=True) "
                 'keeps them (their ImageNet weights are untrained).')
  if len(missing) == len(expected):
    lines.append(f'hint: none of the {len(expected)} keys {plan.model_name!r} needs is '
                 'present; are these weights of another architecture?')
  raise ValueError('\n'.join(lines))


def _convert(leaf: _Leaf, w: np.ndarray) -> np.ndarray:
  w = np.asarray(w, dtype=np.float32)
  if leaf.kind == 'conv':
    w = w.transpose(2, 3, 1, 0)                       # (O, I/g, kh, kw) -> (kh, kw, I/g, O)
  elif leaf.kind == 'dense':
    w = w.T                                           # (out, in) -> (in, out)
  elif leaf.kind == 'dense_chw':
    out, fan_in = w.shape
    c = leaf.channels
    h = math.isqrt(fan_in // c)
    # Input index c*H*W + y*W + x (torch's flatten) -> y*W*C + x*C + c (ours).
    w = w.reshape(out, c, h, h).transpose(0, 2, 3, 1).reshape(out, fan_in).T
  return np.ascontiguousarray(w)


def import_torchvision(model_name: str, source, *, num_classes: Optional[int] = None
                       ) -> Dict[str, Dict[str, Any]]:
  """Converts a torchvision state_dict into variables of our `model_name`.

  Args:
    model_name: one of SUPPORTED_MODELS (our registry names; torchvision's
      'alexnet' is our 'alexnet_torchvision', its 'googlenet' our 'googlenet_bn').
    source: a path to a .pth/.pt (needs torch; loaded with weights_only=True),
      .npz (loaded with allow_pickle=False) or .safetensors file, or a mapping
      name -> NumPy array or torch tensor. A checkpoint wrapping the state dict
      under 'state_dict' or 'model' is unwrapped, and a leading 'module.'
      (DataParallel) is stripped from every key.
    num_classes: classifier outputs; None takes the weights' own count.

  Returns:
    {'params': ..., 'batch_stats': ...} ('batch_stats' only for models with
    BatchNorm), nested dicts of float32 NumPy arrays with exactly the structure
    and shapes of `get_model(model_name, num_classes=n).init(...)`, ready for
    `model.apply(variables, x, train=False)` on NHWC inputs.

  Raises:
    ValueError: unsupported model (listing SUPPORTED_MODELS); an unreadable or
      unsafe file; or weights that do not fit, listing every missing key,
      every unexpected key and every mis-shaped tensor in one message.
  """
  _check_name(model_name)
  family = _FAMILY[model_name]
  state = _read_source(source, family)
  n = num_classes
  if n is None:
    fc = state.get(_CLASSIFIER[family])
    n = int(fc.shape[0]) if fc is not None and fc.ndim == 2 and fc.shape[0] > 0 else (
        registry.model_info(model_name).num_classes)
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f'import_torchvision: num_classes must be a positive int, got {n!r}.')
  plan = _plan(model_name, n)
  _check(plan, state, num_classes_given=num_classes is not None)

  flat = {(l.collection,) + l.path: _convert(l, state[l.key]) for l in plan.leaves}
  variables = traverse_util.unflatten_dict(flat)
  _check_against(plan, variables)
  return variables


def _check_against(plan: _Plan, variables):
  """The result has exactly the structure, shapes and dtype of the model's init."""
  got = traverse_util.flatten_dict(variables)
  want = traverse_util.flatten_dict(dict(plan.abstract))
  bad = sorted('/'.join(k) for k in set(got) ^ set(want))
  bad += sorted('/'.join(k) for k in set(got) & set(want)
                if got[k].shape != tuple(want[k].shape) or got[k].dtype != want[k].dtype)
  if bad:
    raise RuntimeError(f'import_torchvision({plan.model_name!r}): the converted tree '
                       f'differs from the model at {bad}.')


# ----------------------------------------------------------------------------
# Command line: .pth -> .npz / .safetensors, on a machine with torch.
# ----------------------------------------------------------------------------

def convert_file(model_name: str, src, dst) -> int:
  """Writes the state_dict in `src` to `dst` (.npz or .safetensors), keeping
  torchvision's names and layouts, after checking it fits `model_name`.
  Returns the number of tensors written."""
  _check_name(model_name)
  dst = os.fspath(dst)
  if not dst.lower().endswith(('.npz', '.safetensors')):
    raise ValueError(f'--output must end in .npz or .safetensors, got {dst!r}.')
  state = _read_source(src, _FAMILY[model_name])
  import_torchvision(model_name, state)           # raises if the weights do not fit
  if dst.lower().endswith('.safetensors'):
    safetensors.save_file(state, dst)
  else:
    # .npy has no bfloat16: it would come back as raw void bytes.
    np.savez(dst, **{k: v.astype(np.float32) if v.dtype.kind == 'V' else v
                     for k, v in state.items()})
  return len(state)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cnn_jax.transfer.torchvision',
      description='Convert a torchvision state_dict (.pth) into a pickle-free .npz or '
                  '.safetensors file that import_torchvision reads without torch.')
  parser.add_argument('--model', required=True, choices=SUPPORTED_MODELS, metavar='MODEL',
                      help='our registry name, e.g. resnet18, googlenet_bn, '
                      'alexnet_torchvision; checks that the weights fit it.')
  parser.add_argument('--input', required=True, help='.pth/.pt state_dict (or .npz, '
                      '.safetensors).')
  parser.add_argument('--output', required=True, help='.npz or .safetensors to write.')
  args = parser.parse_args(argv)
  try:
    n = convert_file(args.model, args.input, args.output)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {n} tensors to {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
