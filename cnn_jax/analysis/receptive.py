"""Receptive fields: the window of the input a unit can see, and the part it uses.

Theoretical receptive field (the notes: two stacked 3x3 convs see 5x5, three see
7x7, as one 7x7 conv does). Through a chain of layers with kernel F, stride S and
dilation D, starting from r = j = 1 at the input,

    r_out = r_in + (F_eff - 1) * j_in,    j_out = j_in * S,    F_eff = (F - 1) D + 1,

where the jump j is the distance, in input pixels, between neighbouring units of
the layer. `tables.summary` tracks r and j through any model; here they are listed
per spatial layer under the names `layers.list_layers` uses.

Effective receptive field (Luo, Li, Urtasun and Zemel, "Understanding the Effective
Receptive Field in Deep Convolutional Neural Networks", NeurIPS 2016). Not every
pixel of the theoretical window matters equally: the centre is reached by many
more paths through the stacked kernels than the border, so its influence is
larger. Measure it by back-propagating from the centre unit of a layer:

    ERF[u, v] = mean_n sum_c | d( sum_k y_k[n, centre] ) / d x[n, u, v, c] |,

normalised to sum to 1, for random inputs x[n] ~ N(0, 1) (or a batch of real
images) and the given weights (random at initialisation, or trained). The
centre unit of an (h, w) map is (h // 2, w // 2). For linear layers with
positive weights the ERF is the repeated convolution of the kernels, which tends
to a Gaussian whose width grows like sqrt(depth) while the theoretical field grows
like depth, so the ERF fills an ever smaller fraction of it. The ERF is exactly
zero outside the theoretical field, which the tests check. Its extent is
summarised by the side of the smallest square window holding 95% of its mass
(`erf_extent`), to set beside the theoretical size.

Models are evaluated with train=False, so BatchNorm uses its running statistics
(a per-channel affine map that mixes no positions) and dropout is off.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.analysis import layers as layer_tools
from cnn_jax.analysis import tables


class LayerField(NamedTuple):
  """Theoretical receptive field of one spatial layer."""
  name: str                        # as layers.list_layers names it
  output_shape: Tuple[int, ...]    # without the batch, e.g. (16, 16, 4)
  rf: Tuple[int, ...]              # receptive field per spatial dimension, in pixels
  jump: Tuple[int, ...]            # input pixels between neighbouring units


def theoretical_receptive_fields(model: nn.Module,
                                 input_shape: Sequence[int]) -> List[LayerField]:
  """(name, output shape, receptive field, jump) of every spatial layer, in call order.

  Args:
    model: a flax.linen Module called as model(x, train=...).
    input_shape: one example's shape, channels last, e.g. (32, 32, 1).

  Returns:
    One LayerField per layer whose output still has the input's spatial
    dimensions (convs, pools, BatchNorm, ...); flattening and Dense layers are
    left out. Names match `layers.list_layers` (a module called twice gets ':2').
    The rule describes downsampling chains: after upsampling layers (transposed
    convs in a U-Net decoder) `tables.summary` keeps multiplying the jump, so
    the values there are not meaningful.
  """
  rows = tables.summary(model, input_shape, print_table=False)[:-1]   # [-1]: 'Total'
  listed = layer_tools.list_layers(model, input_shape)
  if len(rows) != len(listed):   # both trace the same layer calls
    raise ValueError(f'summary saw {len(rows)} layer calls but list_layers saw '
                     f'{len(listed)}; the model is not traced the same way twice.')
  return [LayerField(name, tuple(shape), tuple(r['receptive_field']), tuple(r['jump']))
          for (name, _, shape), r in zip(listed, rows) if r['receptive_field'] is not None]


def _spatial_layer(model, variables, input_shape, layer) -> Tuple[str, Tuple[int, ...]]:
  """The full name and output shape of a layer with a 2-D spatial output."""
  listed = layer_tools.list_layers(model, input_shape, variables=variables)
  name = layer_tools.resolve(layer, [n for n, _, _ in listed])
  shape = dict((n, s) for n, _, s in listed)[name]
  if len(shape) != len(input_shape):
    spatial = [n for n, _, s in listed if len(s) == len(input_shape)]
    raise ValueError(f'layer {name!r} has output shape {shape}, no spatial grid to take a '
                     f'centre unit from; pick a conv/pool layer, e.g. '
                     f'{", ".join(spatial[-3:])}.')
  return name, tuple(shape)


def _init(model, input_shape, seed):
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  rngs = {'params': jax.random.key(seed), 'dropout': jax.random.key(seed + 1)}
  # One compiled program: eager init would compile every op of the model one by one.
  return jax.jit(lambda rngs, x: model.init(rngs, x, train=False))(rngs, x)


def effective_receptive_field(model: nn.Module, variables, input_shape: Sequence[int],
                              layer: str, *, num_samples: int = 32, seed: int = 0,
                              inputs=None) -> np.ndarray:
  """The effective receptive field of the centre unit of `layer` (Luo et al. 2016).

  ERF[u, v] = mean over inputs of sum over input channels of
  |d (sum over channels of y[centre]) / d x[u, v]|, normalised to sum to 1.

  Args:
    model: a flax.linen Module called as model(x, train=...); evaluated with
      train=False (BatchNorm running statistics, no dropout).
    variables: its variables; None initialises random ones from `seed` (the ERF
      at initialisation, as in the paper).
    input_shape: one example's shape (H, W, C).
    layer: a layer name from `layers.list_layers` (or a unique suffix of one);
      its output must still be an (h, w, k) map. Its centre unit is (h // 2, w // 2).
    num_samples: how many random N(0, 1) inputs to average over.
    seed: seeds the random inputs (and the weights when variables is None).
    inputs: optional (N, H, W, C) batch of real images to use instead of random
      inputs (num_samples is then ignored).

  Returns:
    float64 (H, W) array, non-negative, summing to 1; exactly 0 outside the
    theoretical receptive field of the centre unit.
  """
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) != 3:
    raise ValueError(f'effective_receptive_field needs an image input (H, W, C), got '
                     f'input_shape {input_shape}.')
  if variables is None:
    variables = _init(model, input_shape, seed)
  name, out_shape = _spatial_layer(model, variables, input_shape, layer)
  if inputs is None:
    if num_samples < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}.')
    x = jax.random.normal(jax.random.key(seed), (num_samples,) + input_shape, jnp.float32)
  else:
    x = jnp.asarray(inputs, jnp.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != input_shape:
      raise ValueError(f'inputs must be a batch (N, {", ".join(map(str, input_shape))}) '
                       f'matching input_shape; got shape {tuple(x.shape)}.')
  centre = tuple(s // 2 for s in out_shape[:-1])

  def centre_response(x, variables):
    y = layer_tools.layer_outputs(model, variables, x, [name])[name]
    # Samples are independent (train=False), so one gradient of the batch sum
    # holds every sample's own input gradient.
    return jnp.sum(y[(slice(None),) + centre])

  grads = jax.jit(jax.grad(centre_response))(x, variables)
  erf = np.abs(np.asarray(grads, np.float64)).sum(axis=-1).mean(axis=0)
  total = erf.sum()
  if not total > 0:
    raise ValueError(f'the gradient of the centre of {name!r} is zero for every input '
                     '(e.g. all ReLUs dead at these weights); try other weights, a '
                     'different seed or real images as inputs.')
  return erf / total


def erf_extent(erf, mass: float = 0.95) -> int:
  """Side, in pixels, of the smallest square window holding `mass` of the ERF.

  Every position of every square is tried (window sums from a summed-area table),
  so even fields (6x6 after a 2x2 pool) and off-centre ones are measured alike. A
  uniform k x k field gives k, a single pixel 1. Squares may run past the border
  of a non-square map.
  """
  erf = np.asarray(erf, np.float64)
  if erf.ndim != 2 or np.any(erf < 0) or not erf.sum() > 0:
    raise ValueError(f'erf must be a non-negative 2-D array with positive mass, got shape '
                     f'{erf.shape}.')
  if not 0 < mass <= 1:
    raise ValueError(f'mass must be in (0, 1], got {mass}.')
  side = max(erf.shape)
  square = np.zeros((side, side))
  square[:erf.shape[0], :erf.shape[1]] = erf
  table = np.zeros((side + 1, side + 1))
  table[1:, 1:] = square.cumsum(0).cumsum(1)
  target = mass * erf.sum() * (1 - 1e-9)   # tolerance for the rounding of cumsum
  for s in range(1, side + 1):
    sums = table[s:, s:] - table[:-s, s:] - table[s:, :-s] + table[:-s, :-s]
    if sums.max() >= target:
      return s
  return side


def _field_origin(erf: np.ndarray, rf: Sequence[int]) -> Tuple[float, ...]:
  """Top-left corner (row, col) of the theoretical field behind a measured ERF.

  The ERF's non-zero pixels are the field clipped to the image: a side the border
  did not cut fixes the field's position; if the border cut both sides, the field
  is centred on them.
  """
  origin = []
  for axis, r in enumerate(rf):
    nonzero = np.nonzero(erf.any(axis=1 - axis))[0]
    lo, hi, last = nonzero.min(), nonzero.max(), erf.shape[axis] - 1
    if lo > 0:
      origin.append(float(lo))
    elif hi < last:
      origin.append(float(hi - r + 1))
    else:
      origin.append((lo + hi) / 2 - (r - 1) / 2)
  return tuple(origin)


def _default_layers(fields: Sequence[LayerField], count: int = 3) -> List[str]:
  """Up to `count` layers that grow the field (convs, pools), first to last."""
  growing, previous = [], None
  for f in fields:
    if f.rf != previous:
      growing.append(f.name)
    previous = f.rf
  if len(growing) <= count:
    return growing
  picks = np.round(np.linspace(0, len(growing) - 1, count)).astype(int)
  return [growing[i] for i in picks]


def plot_receptive_fields(model: nn.Module, variables, input_shape: Sequence[int],
                          path_png: str, layers: Optional[Sequence[str]] = None, *,
                          num_samples: int = 32, seed: int = 0, inputs=None,
                          dpi: int = 100) -> str:
  """Theoretical receptive field per layer, and the ERF of a few layers.

  Top: the theoretical field (height, in input pixels) against the layer index,
  with the 95%-mass extent of the ERF of the chosen layers beside it and the input
  size as a dashed line. Bottom: one ERF heatmap per chosen layer (scaled to its
  maximum), the theoretical field of its centre unit drawn as a dashed rectangle
  (placed by the ERF's non-zero pixels, which fill exactly the field's part
  inside the image).

  Args:
    model, variables, input_shape, num_samples, seed, inputs: as in
      `effective_receptive_field` (variables None: random weights from seed).
    path_png: where to write the PNG (parent directories are created).
    layers: the layers whose ERF is drawn; default up to 3 layers that grow the
      field, first, middle and last.
    dpi: resolution.

  Returns:
    path_png.
  """
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel
  from cnn_jax.analysis.plots import new_figure, save_figure  # pylint: disable=import-outside-toplevel
  input_shape = tuple(int(s) for s in input_shape)
  if variables is None:
    variables = _init(model, input_shape, seed)
  fields = theoretical_receptive_fields(model, input_shape)
  if not fields:
    raise ValueError('the model has no spatial layers, so no receptive fields to plot.')
  available = [f.name for f in fields]
  chosen = _default_layers(fields) if layers is None else [
      layer_tools.resolve(n, [n for n, _, _ in layer_tools.list_layers(
          model, input_shape, variables=variables)]) for n in layers]
  if not chosen:
    raise ValueError('layers is empty: name at least one spatial layer (or None).')
  by_name = {f.name: f for f in fields}
  erfs = {n: effective_receptive_field(model, variables, input_shape, n,
                                       num_samples=num_samples, seed=seed, inputs=inputs)
          for n in chosen}
  extents = {n: erf_extent(e) for n, e in erfs.items()}

  fig = new_figure((max(7.0, 3.2 * len(chosen)), 7.4))
  fig.set_layout_engine('constrained')   # room for the rotated names and the colour bar
  grid = fig.add_gridspec(2, len(chosen), height_ratios=[1.0, 1.15])
  ax = fig.add_subplot(grid[0, :])
  index = np.arange(len(fields))
  ax.plot(index, [f.rf[0] for f in fields], marker='o', markersize=4,
          label='theoretical receptive field')
  picked = [available.index(n) for n in chosen]
  ax.plot(picked, [extents[n] for n in chosen], 's', color='tab:orange',
          label='effective RF (side holding 95% of the gradient)')
  ax.axhline(input_shape[0], color='grey', linestyle='--', linewidth=1,
             label=f'input height ({input_shape[0]})')
  ax.set_xticks(index)
  ax.set_xticklabels(available, rotation=60, ha='right', fontsize=7)
  ax.set_xlabel('layer (call order)')
  ax.set_ylabel('size (input pixels)')
  ax.set_title('receptive field per layer: r_out = r_in + (F_eff - 1) j_in')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize='small', loc='upper left')

  for i, name in enumerate(chosen):
    erf = erfs[name]
    ax = fig.add_subplot(grid[1, i])
    image = ax.imshow(erf / erf.max(), cmap='magma', vmin=0, vmax=1, interpolation='nearest')
    rf = by_name[name].rf
    top, left = _field_origin(erf, rf)
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), rf[1], rf[0], fill=False,
                           edgecolor='cyan', linewidth=1.5, linestyle='--'))
    ax.set_xlim(-0.5, erf.shape[1] - 0.5)
    ax.set_ylim(erf.shape[0] - 0.5, -0.5)
    ax.set_title(f'{name}\ntheoretical {rf[0]}x{rf[1]} (cyan), ERF 95% in '
                 f'{extents[name]}x{extents[name]}', fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(image, ax=fig.axes[1:], fraction=0.03, pad=0.02,
               label='|d centre / d input|, scaled to max')
  source = 'real images' if inputs is not None else f'{num_samples} N(0, 1) inputs'
  fig.suptitle(f'Receptive fields on a {"x".join(map(str, input_shape))} input '
               f'(ERF: mean |gradient| over {source})', fontsize=10)
  return save_figure(fig, path_png, dpi)
