"""Feature extraction: run a frozen pretrained backbone once, train a classifier on
the cached features.

The notes' first transfer recipe: take a CNN trained on a large dataset, remove
its last fully connected layer, treat the rest as a fixed feature extractor, and
train a new classifier on the features. Because the backbone never changes, its
output for an example never changes either; computing it once per split and
caching it turns every later epoch into a few matrix products.

`extract` runs the backbone in eval mode over a source (after the eval
transform: there is no augmentation in this mode) and returns the chosen
intermediate (by default 'pre_logits', the input of the model's output layer)
for every example. `FeatureSource` serves the cached arrays as a data source, so
the training loop trains `FeatureHead` on them with the usual batching,
checkpoints and metrics. `merge_head` puts a trained linear head back into the
full model's variables.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.transfer import stages as stages_lib


class FeatureHead(nn.Module):
  """The new classifier: Dense(num_classes) (named like the model's head), or an MLP
  with one hidden ReLU layer of `hidden` units when hidden > 0."""
  num_classes: int
  hidden: int = 0
  head_name: str = 'fc'

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = x.reshape(x.shape[0], -1)
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden, name='hidden')(x))
    return nn.Dense(self.num_classes, name=self.head_name)(x)


class FeatureSource:
  """Cached features as a random-access source of {'image': feature, 'label'} records."""

  def __init__(self, features: np.ndarray, labels: np.ndarray):
    if len(features) != len(labels):
      raise ValueError(f'{len(features)} feature rows but {len(labels)} labels.')
    self.features = np.asarray(features, np.float32)
    self.labels = np.asarray(labels, np.int64)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {'image': self.features[i], 'label': self.labels[i]}

  def __repr__(self):
    return f'FeatureSource({len(self)} x {self.features.shape[1:]})'


def feature_fn(model, variables, layer: str = 'pre_logits') -> Callable:
  """jit'd images -> the sown intermediate `layer` of model in eval mode."""

  def fn(images):
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    inter = state.get('intermediates', {})
    if layer not in inter:
      raise ValueError(f'the model sows no intermediate {layer!r}; it sows '
                       f'{sorted(inter)}. Set transfer.feature_layer to one of them.')
    value = inter[layer]
    value = value[0] if isinstance(value, tuple) else value
    return value.reshape(value.shape[0], -1)
  return jax.jit(fn)


def extract(model, variables, loader, *, layer: str = 'pre_logits',
            progress: Optional[Callable[[int], None]] = None):
  """(features [N, D] float32, labels [N]) over one pass of `loader` (batches with a
  'mask'; padding rows are dropped)."""
  fn = feature_fn(model, variables, layer)
  feats, labels = [], []
  for batch in loader:
    keep = np.asarray(batch['mask']) > 0
    out = np.asarray(fn(jnp.asarray(batch['image'])))
    feats.append(out[keep])
    labels.append(np.asarray(batch['label'])[keep])
    if progress is not None:
      progress(int(keep.sum()))
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels)


def fingerprint(**parts) -> str:
  """A short hash of what a cache depends on (JSON-able parts)."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def cached(path: str, key: str, compute: Callable[[], tuple]) -> FeatureSource:
  """FeatureSource from `path` (an .npz) if it holds `key`, else computed and saved.

  A file with another key is not overwritten: it is moved aside to path.<key>.npz
  first (a changed backbone or split gets a new cache; nothing is lost)."""
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      if str(f['key']) == key:
        return FeatureSource(f['features'], f['labels'])
    with np.load(path, allow_pickle=False) as f:
      old_key = str(f['key'])
    os.replace(path, f'{path[:-4]}.{old_key}.npz')
  features, labels = compute()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, features=features, labels=labels, key=np.asarray(key))
  os.replace(tmp, path)
  return FeatureSource(features, labels)


def head_module_name(model, input_shape: Sequence[int]) -> str:
  """The top-level module of the model's output layer (e.g. 'fc', 'fc3', 'output')."""
  heads = stages_lib.head_paths(model, input_shape)
  tops = sorted({p[0] for p in heads if not p[0].startswith('aux')})
  if len(tops) != 1:
    raise ValueError(f'cannot tell the output layer of {type(model).__name__} '
                     f'(class-dependent modules: {tops}).')
  return tops[0]


def merge_head(variables: Dict[str, Any], head_params: Dict[str, Any], head_name: str):
  """The full model's variables with its output layer `head_name` replaced by the
  trained linear head's (a FeatureHead with hidden=0 reading 'pre_logits')."""
  if 'hidden' in head_params:
    raise ValueError('an MLP head (transfer.head_hidden > 0) has no counterpart in the '
                     "backbone's own output layer; only a linear head merges.")
  params = flax.core.unfreeze(variables['params'])
  old = params[head_name]
  new = head_params[head_name]
  for k in old:
    if np.shape(old[k])[:-1] != np.shape(new[k])[:-1] and k == 'kernel':
      raise ValueError(f'head kernel {np.shape(new[k])} does not fit the model\'s '
                       f'{head_name} {np.shape(old[k])}.')
  params = dict(params)
  params[head_name] = new
  return {**variables, 'params': params}
