"""Parameter counts and per-layer tables, computed from shapes alone.

`jax.eval_shape` traces the model with abstract arrays, so VGG-19 or ResNet-152
are counted without allocating a single weight. `summary` intercepts every
layer call during that trace and records what the notes' AlexNet table lists
(output tensor size, weights, biases, parameters) plus multiply-adds,
activation memory and the theoretical receptive field.

Receptive field of a chain of layers (kernel F, stride S, dilation D):

    r_out = r_in + (F_eff - 1) * j_in,   j_out = j_in * S,   F_eff = (F - 1) D + 1

starting from r = j = 1 at the input; two stacked 3x3 convs see 5x5, three see 7x7.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _size(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_variables(model: nn.Module, input_shape: Sequence[int], *,
                       batch_size: int = 1, dtype=jnp.float32, **apply_kwargs):
  """Variables of `model` for one batch of `input_shape` examples, as shapes only."""
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(input_shape), dtype)
  kwargs = {'train': False, **apply_kwargs}
  return jax.eval_shape(
      lambda x: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                           x, **kwargs), x)


@dataclasses.dataclass(frozen=True)
class ParamCount:
  trainable: int          # everything in 'params'
  batch_stats: int        # BatchNorm running means and variances (not trainable)

  def __int__(self):
    return self.trainable


def count_params(model: nn.Module, input_shape: Sequence[int], **apply_kwargs) -> ParamCount:
  """Trainable parameters, and BatchNorm running statistics separately.

  Args:
    model: a flax.linen Module called as model(x, train=...).
    input_shape: one example's shape, channels-last, e.g. (224, 224, 3).
  """
  variables = abstract_variables(model, input_shape, **apply_kwargs)
  return ParamCount(_size(variables.get('params', {})), _size(variables.get('batch_stats', {})))


# ----------------------------------------------------------------------------
# Per-layer table
# ----------------------------------------------------------------------------

def _pairs(v, nd):
  if v is None:
    return (1,) * nd
  if isinstance(v, int):
    return (v,) * nd
  return tuple(v) if len(v) == nd else (tuple(v) + (1,) * nd)[:nd]


def layer_geometry(module: nn.Module, nd: int) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]:
  """(kernel, stride, dilation) of a windowed layer, read from its attributes."""
  kernel = getattr(module, 'kernel_size', None)
  is_pool = kernel is None
  if is_pool:
    kernel = getattr(module, 'window', None) or getattr(module, 'window_shape', None)
  if kernel is None:
    return None
  kernel = _pairs(kernel, nd)
  stride = getattr(module, 'strides', None)
  if stride is None:
    stride = getattr(module, 'stride', None)
  if stride is None and is_pool:
    stride = kernel          # pooling default: stride = window
  stride = _pairs(stride, nd)
  dilation = _pairs(getattr(module, 'kernel_dilation', None), nd)
  return kernel, stride, dilation


def _own_params(module: nn.Module) -> Dict[str, Any]:
  """Arrays that belong to this module itself, not to its children."""
  try:
    params = module.variables.get('params', {})
  except Exception:  # pylint: disable=broad-except
    return {}
  return {k: v for k, v in params.items() if hasattr(v, 'shape')}


def summary(model: nn.Module, input_shape: Sequence[int], *, print_table: bool = True,
            **apply_kwargs) -> List[Dict[str, Any]]:
  """A per-layer table like the notes' AlexNet table, plus FLOPs and receptive field.

  Args:
    model: a flax.linen Module called as model(x, train=...).
    input_shape: one example's shape, e.g. (227, 227, 3).
    print_table: also print the formatted table.

  Returns:
    One dict per layer call, in call order, with keys name, type, output_shape,
    weights, biases, params, flops (multiply-adds per example), activation_bytes,
    receptive_field (per spatial dim, or None) and jump; the last row is 'Total'.
  """
  variables = abstract_variables(model, input_shape, **apply_kwargs)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  rows: List[Dict[str, Any]] = []
  nd = max(len(input_shape) - 1, 0)
  rf_of: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
  by_spatial: Dict[Tuple[int, ...], Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
  alive = []   # keeps traced outputs alive so their ids stay unique during the trace
  calls = [0]

  def source_field(inp):
    """(r, j) of a layer's input. Arrays made outside a layer (concatenations,
    sums, slices, activations) are not tracked one by one: they get the largest
    field recorded so far at their spatial size, the deepest path into them."""
    if id(inp) not in rf_of:
      # Fixed at first use, so parallel branches reading one block input agree.
      shape = tuple(getattr(inp, 'shape', ())[1:-1])
      rf_of[id(inp)] = by_spatial.get(shape, ((1,) * nd, (1,) * nd))
      alive.append(inp)
    return rf_of[id(inp)]

  def interceptor(next_fun, args, kwargs, context):
    calls[0] += 1
    before = calls[0]
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    # A layer is a module that called no other module: containers (blocks,
    # the model itself) are represented by their layers.
    if calls[0] != before or not hasattr(out, 'shape'):
      return out
    module = context.module
    own = _own_params(module)
    geometry = layer_geometry(module, nd) if nd else None
    inp = args[0] if args else None
    r, j = source_field(inp)
    if geometry is not None and len(out.shape) == nd + 2:
      k, s, d = geometry
      r = tuple(ri + ((ki - 1) * di) * ji for ri, ki, di, ji in zip(r, k, d, j))
      j = tuple(ji * si for ji, si in zip(j, s))
    rf_of[id(out)] = (r, j)
    alive.append(out)
    if len(out.shape) == nd + 2:
      key = tuple(out.shape[1:-1])
      if key not in by_spatial or by_spatial[key][0] < r:
        by_spatial[key] = (r, j)
    biases = sum(math.prod(v.shape) for n, v in own.items() if n == 'bias')
    weights = sum(math.prod(v.shape) for n, v in own.items() if n != 'bias')
    kernel = own.get('kernel')
    flops = 0
    if kernel is not None:
      out_positions = math.prod(out.shape[1:-1]) if len(out.shape) > 2 else 1
      flops = out_positions * math.prod(kernel.shape)
    rows.append(dict(
        name='/'.join(module.path) or type(module).__name__,
        type=type(module).__name__,
        output_shape=tuple(out.shape[1:]),
        weights=int(weights), biases=int(biases), params=int(weights + biases),
        flops=int(flops),
        activation_bytes=int(math.prod(out.shape[1:]) * np.dtype(out.dtype).itemsize),
        receptive_field=r if len(out.shape) == nd + 2 else None,
        jump=j if len(out.shape) == nd + 2 else None))
    return out

  def run(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, **{'train': False, **apply_kwargs})

  jax.eval_shape(run, variables, x)
  # Variables may hold parameters no layer call reported (e.g. a bare self.param).
  total_params = _size(variables.get('params', {}))
  rows.append(dict(
      name='Total', type='', output_shape=(),
      weights=sum(r['weights'] for r in rows), biases=sum(r['biases'] for r in rows),
      params=total_params, flops=sum(r['flops'] for r in rows),
      activation_bytes=sum(r['activation_bytes'] for r in rows),
      receptive_field=None, jump=None))
  if print_table:
    print(format_table(rows, input_shape))
  return rows


def format_table(rows: List[Dict[str, Any]], input_shape: Sequence[int]) -> str:
  """Text table: layer, tensor size, weights, biases, parameters, MACs, memory, RF."""
  def size(shape):
    return 'x'.join(str(s) for s in shape) if shape else ''
  header = ('Layer', 'Tensor size', 'Weights', 'Biases', 'Parameters', 'MACs',
            'Act. KiB', 'RF')
  lines = [('Input', size(tuple(input_shape)), '0', '0', '0', '0', '', '1')]
  for r in rows:
    rf = 'x'.join(map(str, r['receptive_field'])) if r['receptive_field'] else ''
    lines.append((r['name'], size(r['output_shape']), f"{r['weights']:,}",
                  f"{r['biases']:,}", f"{r['params']:,}", f"{r['flops']:,}",
                  f"{r['activation_bytes'] / 1024:,.1f}", rf))
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
  def fmt(cells):
    return '  '.join(c.ljust(w) if i < 2 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))
  out = [fmt(header), '  '.join('-' * w for w in widths)]
  out += [fmt(l) for l in lines]
  return '\n'.join(out)


def receptive_field(layers: Sequence[Tuple[int, int, int]]) -> Tuple[int, int]:
  """(receptive field, jump) after a chain of (kernel, stride, dilation) layers.

  >>> receptive_field([(3, 1, 1)] * 2)
  (5, 1)
  """
  r, j = 1, 1
  for layer in layers:
    k, s, d = (tuple(layer) + (1, 1))[:3]
    if k < 1 or s < 1 or d < 1:
      raise ValueError(f'receptive_field: kernel, stride and dilation must be >= 1, got {layer}.')
    r += (k - 1) * d * j
    j *= s
  return r, j


def parse_shape(text: str) -> Tuple[int, ...]:
  """'227,227,3' -> (227, 227, 3), with a clear error for anything else."""
  try:
    shape = tuple(int(v) for v in str(text).replace('x', ',').split(',') if v.strip())
  except ValueError:
    shape = ()
  if not shape or any(v < 1 for v in shape):
    raise ValueError(
        f'input shape {text!r} is not a list of positive ints; write it as H,W,C '
        f'(e.g. 224,224,3) or L,C for 1-D models.')
  return shape


def model_summary(name: str, input_shape: Optional[Sequence[int]] = None,
                  num_classes: Optional[int] = None, print_table: bool = True):
  """summary() of a registered model at its published (or a given) input shape."""
  from cnn_jax import models  # pylint: disable=import-outside-toplevel
  info = models.model_info(name)
  model = models.get_model(name, num_classes=num_classes)
  shape = tuple(input_shape) if input_shape else info.input_shape
  if print_table:
    print(f'{name} ({info.family}), input {"x".join(map(str, shape))}')
  return summary(model, shape, print_table=print_table)
