"""Models by name: `get_model('resnet18', num_classes=10)`, `list_models()`.

Each family module registers its variants (rows of a table or partials of one
class) with the input shape and class count they were published for. Every
registered model is a flax.linen Module called as `model.apply(variables, x,
train=...)` and returning logits; intermediates (stem, stages, pre_logits, aux
logits) are sown into the 'intermediates' collection.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Dict, List, Optional, Tuple

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  name: str
  builder: Callable[..., nn.Module]
  family: str
  input_shape: Tuple[int, ...]      # one example, channels-last, e.g. (224, 224, 3)
  num_classes: int
  description: str = ''


_REGISTRY: Dict[str, ModelEntry] = {}


def register(name: str, builder: Callable[..., nn.Module], *, family: str,
             input_shape: Tuple[int, ...], num_classes: int, description: str = ''):
  """Adds `builder` (a Module class or partial taking num_classes=) under `name`."""
  if name in _REGISTRY:
    raise ValueError(f'model {name!r} is registered twice.')
  _REGISTRY[name] = ModelEntry(name, builder, family, tuple(input_shape), num_classes,
                               description)
  return builder


def _unknown(name: str) -> ValueError:
  close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
  hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
  return ValueError(
      f'unknown model {name!r}.{hint} list_models() gives all '
      f'{len(_REGISTRY)} names.')


def model_info(name: str) -> ModelEntry:
  """The registry entry: builder, family, published input shape and classes."""
  _ensure_loaded()
  if name not in _REGISTRY:
    raise _unknown(name)
  return _REGISTRY[name]


def get_model(name: str, *, num_classes: Optional[int] = None, **overrides) -> nn.Module:
  """Builds model `name` with `num_classes` outputs and any field overrides.

  Raises ValueError for an unknown name (listing close matches) or an override
  that is not a field of the model (listing the fields it has).
  """
  entry = model_info(name)
  kwargs = dict(overrides)
  kwargs['num_classes'] = entry.num_classes if num_classes is None else num_classes
  if not isinstance(kwargs['num_classes'], int) or kwargs['num_classes'] < 1:
    raise ValueError(f'num_classes must be a positive int, got {kwargs["num_classes"]!r}.')
  cls = getattr(entry.builder, 'func', entry.builder)
  if dataclasses.is_dataclass(cls):
    fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    bad = sorted(set(kwargs) - fields)
    if bad:
      raise ValueError(
          f'model {name!r} has no field(s) {bad}; its fields are {sorted(fields)}.')
  return entry.builder(**kwargs)


def list_models(family: Optional[str] = None) -> List[str]:
  """Sorted model names, optionally of one family."""
  _ensure_loaded()
  return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def _ensure_loaded():
  # Family modules register on import; importing the package imports them all.
  import cnn_jax.models  # noqa: F401  pylint: disable=import-outside-toplevel
