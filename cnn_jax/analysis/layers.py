"""Naming, reading and probing the layers of any model, for the figures.

A *layer* is a module call that calls no other module (a conv, a pool, a BatchNorm,
a Dense), as in `tables.summary`; containers (blocks, stages, the model itself) are
represented by their layers. A layer is named by its module path joined with '/'
('stage1_conv1', 'layer2/block1/conv2'); a module called more than once in one
forward pass gets ':2', ':3', ... on its later calls.

* `list_layers(model, input_shape)` - the names in call order, with output shapes
  (from a shape-only trace, nothing is computed).
* `layer_outputs(model, variables, x, names)` - the outputs of the named layers.
* `walk(model, variables, x, train=..., on_layer=fn)` - the forward pass with a hook
  on every layer (what the functions below and the figures are built on).
* `apply_with_taps(model, variables, x, taps)` - the model's output with `taps[name]`
  added to the named layers' outputs. With zero taps the output is unchanged, and
  the gradient of anything with respect to a tap is the gradient with respect to
  that layer's output: what Grad-CAM, the effective receptive field and the
  deconvnet need, without cutting the model in two.

Layer names accept the exact path or a unique suffix ('conv2' when only one path
ends in it); an unknown name is an error that lists the close matches.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def walk(model: nn.Module, variables, x, *, train: bool, on_layer, **apply_kwargs):
  """model.apply with `on_layer(name, module, args, out) -> out` called on each layer.

  The hook every function here (and the figures) builds on: on_layer sees each
  layer's name (module path, ':k' for repeated calls), module, positional inputs and
  output, and returns the output to continue with (the same, or modified).
  """
  calls = [0]
  seen: Dict[str, int] = {}

  def interceptor(next_fun, args, kwargs, context):
    calls[0] += 1
    before = calls[0]
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__' or calls[0] != before:
      return out
    if not isinstance(out, jax.Array) and not hasattr(out, 'shape'):
      return out
    base = '/'.join(context.module.path) or type(context.module).__name__
    seen[base] = seen.get(base, 0) + 1
    name = base if seen[base] == 1 else f'{base}:{seen[base]}'
    return on_layer(name, context.module, args, out)

  with nn.intercept_methods(interceptor):
    return model.apply(variables, x, train=train, **apply_kwargs)


def list_layers(model: nn.Module, input_shape: Sequence[int], *,
                variables=None) -> List[Tuple[str, str, Tuple[int, ...]]]:
  """(name, module type, output shape without the batch) of every layer, in call order."""
  from cnn_jax.analysis import tables  # pylint: disable=import-outside-toplevel
  if variables is None:
    variables = tables.abstract_variables(model, input_shape)
  rows: List[Tuple[str, str, Tuple[int, ...]]] = []

  def record(name, module, args, out):
    del args
    rows.append((name, type(module).__name__, tuple(out.shape[1:])))
    return out

  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  jax.eval_shape(lambda v, x: walk(model, v, x, train=False, on_layer=record), variables, x)
  return rows


def resolve(name: str, available: Sequence[str]) -> str:
  """The full layer name for `name` (exact, or a unique '/'-suffix), else a clear error."""
  if name in available:
    return name
  suffix = [a for a in available if a.endswith('/' + name)]
  if len(suffix) == 1:
    return suffix[0]
  if len(suffix) > 1:
    raise ValueError(f'layer {name!r} is ambiguous: it ends {len(suffix)} layer paths '
                     f'({", ".join(suffix[:6])}{", ..." if len(suffix) > 6 else ""}); '
                     'give the full path.')
  close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
  hint = f' Close matches: {", ".join(close)}.' if close else ''
  raise ValueError(f'no layer named {name!r} in this model.{hint} '
                   "`python launch.py --mode=summary --model=NAME` lists every layer.")


def layer_outputs(model: nn.Module, variables, x, names: Optional[Sequence[str]] = None, *,
                  train: bool = False) -> Dict[str, jax.Array]:
  """Outputs of the named layers (all layers when names is None) for the batch x."""
  available = [n for n, _, _ in list_layers(model, x.shape[1:], variables=variables)]
  wanted = None if names is None else {resolve(n, available) for n in names}
  got: Dict[str, jax.Array] = {}

  def record(name, module, args, out):
    del module, args
    if wanted is None or name in wanted:
      got[name] = out
    return out

  mutable = ['batch_stats'] if train else False
  walk(model, variables, x, train=train, on_layer=record, mutable=mutable)
  return got if names is None else {n: got[resolve(n, available)] for n in names}


def apply_with_taps(model: nn.Module, variables, x, taps: Mapping[str, Any], *,
                    train: bool = False, record: Sequence[str] = ()):
  """(output, recorded) of the model with taps[name] added to each named layer's output.

  `taps` must be keyed by full layer names (see `resolve`) and shaped like the
  layer's output; `recorded` holds the outputs of the layers named in `record`
  (after their taps). Differentiate with respect to `taps` for layer gradients.
  """
  available = _names_seen(model, variables, x, train)
  unknown = [n for n in list(taps) + list(record) if n not in available]
  if unknown:
    raise ValueError(f'apply_with_taps: no layer named {unknown[0]!r}; use the full names '
                     'from list_layers() or resolve().')
  got: Dict[str, jax.Array] = {}

  def add(name, module, args, out):
    del module, args
    if name in taps:
      out = out + taps[name]
    if name in record:
      got[name] = out
    return out

  return walk(model, variables, x, train=train, on_layer=add), got


def _names_seen(model, variables, x, train) -> List[str]:
  names: List[str] = []

  def note(name, module, args, out):
    del module, args
    names.append(name)
    return out

  jax.eval_shape(lambda v, x: walk(model, v, x, train=train, on_layer=note), variables, x)
  return names
