"""Seeing what a CNN computes: its filters, its activation maps, and the image
patches that excite a unit most.

* `first_layer_filters(variables)` / `filter_grid(kernel)` / `plot_filters(kernel, png)`
  - the learned kernels of a conv layer (HWIO, or WIO for 1-D convs) as a tiled
  image, each filter rescaled to [0, 1] on its own.
* `plot_activation_maps(model, variables, x, layers, png)` - one input and, per
  chosen layer, its channel maps, the most active channels first.
* `top_activating_patches(model, variables, images, layer, channels)` - over a
  data set, the k positions where each chosen channel responds most, and the
  input patch each of them sees (Zeiler & Fergus's top-9 grids);
  `plot_top_patches(result, png)` draws them.
* `field_geometry(model, input_shape)` - per layer, the receptive field size, the
  jump and the input coordinate where unit 0's field starts, which place a
  unit's patch in the input.
* `dataset_images(dataset, split, n)` / `run_images(workdir)` - a batch of real
  images, as the model sees them at evaluation.

Layer outputs are what the layer module returns (see `layers`): a conv followed
by a functional activation (`nn.relu(conv(x))`) is read before the
nonlinearity, so its maps can be negative.

Where a unit's patch lies. With `r` the receptive field, `j` the jump (the
input distance between neighbouring units) and `s` the start offset, unit `u`
of a layer sees input pixels [s + u j, s + u j + r) in every spatial dimension.
The three are carried through the layers in call order, from r = j = 1, s = 0
at the input; a windowed layer (kernel F, stride S, dilation D, low-side
padding P_lo) maps

    r' = r + (F_eff - 1) j,   j' = j S,   s' = s - P_lo j,   F_eff = (F - 1) D + 1,

because its output unit u reads input units [u S - P_lo, u S - P_lo + F_eff).
P_lo comes from the layer's `padding` attribute through
`ops.shapes.resolve_padding` ('SAME' puts the odd extra row at the end, so
P_lo = floor(total / 2)); a windowed layer without a `padding` attribute gets
that 'SAME' split of the padding its shapes imply. r and j follow
`tables.summary`'s rule, and, as there, an array made outside a layer (an
activation, a residual sum, a concatenation) inherits the largest field
recorded at its spatial size. For a stack of 'SAME' k x k convs (k odd) and
2x2 pools, s = -(k // 2) summed over the convs, scaled by the jump at each, so
a unit's centre lies at about u j + (j - 1) / 2. After a transposed conv, an
upsampling or any other layer that changes the spatial size without a window,
the field is not tracked (None) and `top_activating_patches` refuses the layer.

Figures are drawn on matplotlib's Agg canvas without pyplot, as in `plots`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.analysis import layers as layers_lib
from cnn_jax.analysis import plots as plots_lib
from cnn_jax.analysis import tables
from cnn_jax.ops import shapes

new_figure, save_figure = plots_lib.new_figure, plots_lib.save_figure
walk = layers_lib.walk
_layer_geometry = tables.layer_geometry

# Modes of cnn_jax.nn.Conv that pad the input themselves, then run a 'VALID' conv:
# the low-side padding as a function of the effective kernel extent.
_PREPAD_LO = {'CIRCULAR': lambda k: (k - 1) // 2, 'REFLECT': lambda k: (k - 1) // 2,
              'CAUSAL': lambda k: k - 1}


# ----------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------

def _params(variables) -> Mapping[str, Any]:
  if isinstance(variables, Mapping) and 'params' in variables:
    return variables['params']
  return variables


def _kernels(variables) -> Dict[str, np.ndarray]:
  """'module/path' -> kernel of every module with a 'kernel' param, in tree order."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(_params(variables)))
  return {'/'.join(path[:-1]): v for path, v in flat.items()
          if path and path[-1] == 'kernel' and hasattr(v, 'shape')}


def first_layer_filters(variables, layer: Optional[str] = None, *, model=None,
                        input_shape: Optional[Sequence[int]] = None) -> np.ndarray:
  """The kernel (HWIO; WIO for 1-D convs) of the first conv layer, or of `layer`.

  Args:
    variables: a model's variables ({'params': ...}) or its params tree.
    layer: a conv layer's module path, or a unique '/'-suffix of it ('conv1').
    model, input_shape: when given (and `layer` is None), "first" means first in
      call order. Otherwise it means first in the parameter tree, which is
      creation order for variables from `model.init` but may be alphabetical
      for variables read back from a checkpoint.

  Returns:
    The kernel as a NumPy array, (*kernel_size, C_in, C_out).
  """
  kernels = _kernels(variables)
  convs = {p: k for p, k in kernels.items() if 3 <= np.ndim(k) <= 5}
  if layer is not None:
    name = layers_lib.resolve(layer, list(kernels)) if kernels else layer
    if name not in convs:
      if name in kernels:
        raise ValueError(f'layer {layer!r} has a {np.ndim(kernels[name])}-D kernel '
                         f'{tuple(np.shape(kernels[name]))}, not a conv kernel; conv '
                         f'layers: {", ".join(list(convs)[:8]) or "none"}.')
      raise ValueError(f'no conv layer named {layer!r}; conv layers: '
                       f'{", ".join(list(convs)[:8]) or "none"}.')
    return np.asarray(convs[name])
  if not convs:
    raise ValueError('these variables hold no conv kernel (a param named "kernel" with '
                     f'3-5 dims); kernels found: {list(kernels) or "none"}.')
  if model is not None and input_shape is not None:
    for name, _, _ in layers_lib.list_layers(model, input_shape):
      path = name.split(':')[0]
      if path in convs:
        return np.asarray(convs[path])
  return np.asarray(next(iter(convs.values())))


def _unit_range(a: np.ndarray) -> np.ndarray:
  """a rescaled to [0, 1] (a constant array becomes 0.5)."""
  a = np.asarray(a, np.float32)
  lo, hi = float(np.min(a)), float(np.max(a))
  if hi - lo <= 0:
    return np.full_like(a, 0.5)
  return (a - lo) / (hi - lo)


def _tile(tiles: np.ndarray, ncols: int, fill: float) -> np.ndarray:
  """(n, h, w[, 3]) tiles -> one image, ncols per row, 1-pixel `fill` separators."""
  n, h, w = tiles.shape[:3]
  rows = -(-n // ncols)
  out = np.full((rows * (h + 1) - 1, ncols * (w + 1) - 1) + tiles.shape[3:], fill,
                np.float32)
  for i in range(n):
    r, c = divmod(i, ncols)
    out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tiles[i]
  return out


def _check_kernel(kernel) -> np.ndarray:
  kernel = np.asarray(kernel, np.float32)
  if kernel.ndim not in (3, 4):
    raise ValueError(f'expected a 2-D conv kernel (kh, kw, C_in, C_out) or a 1-D one '
                     f'(k, C_in, C_out), got shape {kernel.shape}; 3-D conv kernels are '
                     'not drawn (slice one depth first).')
  return kernel


def filter_grid(kernel, ncols: Optional[int] = None, *, fill: float = 1.0) -> np.ndarray:
  """The filters of a conv kernel tiled into one image, one tile per output channel.

  Each filter is rescaled to [0, 1] on its own (its minimum -> 0, its maximum
  -> 1; a constant filter -> 0.5), so tiles show patterns, not relative
  magnitudes. Tiles are separated by 1-pixel lines of `fill`.

  Args:
    kernel: (kh, kw, C_in, C_out) (HWIO) or, for 1-D convs, (k, C_in, C_out).
    ncols: tiles per row (default: ceil(sqrt(C_out)); 1 for 1-D kernels).
    fill: value of the separators.

  Returns:
    2-D kernels: (rows * (kh + 1) - 1, ncols * (kw + 1) - 1, 3) in RGB when
    C_in == 3, else the same without the last axis, grayscale: with C_in != 1
    a tile is the mean over input channels (a rough view of a deeper kernel).
    1-D kernels: a grayscale image whose tile for output channel o is a
    (C_in, k) block, one row per input channel.
  """
  kernel = _check_kernel(kernel)
  c_out = kernel.shape[-1]
  if kernel.ndim == 3:
    tiles = np.stack([_unit_range(kernel[:, :, o].T) for o in range(c_out)])
    return _tile(tiles, ncols or 1, fill)
  if kernel.shape[2] == 3:
    tiles = np.stack([_unit_range(kernel[..., o]) for o in range(c_out)])
  else:
    tiles = np.stack([_unit_range(kernel[..., o].mean(axis=2)) for o in range(c_out)])
  return _tile(tiles, ncols or math.ceil(math.sqrt(c_out)), fill)


def plot_filters(kernel, path_png: str, title: Optional[str] = None, *,
                 dpi: int = 100) -> str:
  """Writes the filters of a conv kernel to a PNG; returns path_png.

  2-D kernels are drawn as `filter_grid` (each filter rescaled to [0, 1] on its
  own, RGB when C_in == 3). 1-D kernels get one small line plot per output
  channel, one line per input channel, on the filter's own y scale.
  """
  kernel = _check_kernel(kernel)
  c_out = kernel.shape[-1]
  if kernel.ndim == 4:
    kh, kw, c_in = kernel.shape[:3]
    grid = filter_grid(kernel)
    side = min(12.0, max(3.0, grid.shape[1] / 8))
    fig = new_figure((side, side * grid.shape[0] / grid.shape[1] + 0.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap=None if grid.ndim == 3 else 'gray', vmin=0.0, vmax=1.0,
              interpolation='nearest')
    ax.set_axis_off()
    ax.set_title(title or f'{c_out} filters {kh}x{kw}x{c_in}, each scaled to [0, 1]',
                 fontsize=9)
  else:
    k, c_in = kernel.shape[:2]
    ncols = min(c_out, 8)
    nrows = -(-c_out // ncols)
    fig = new_figure((1.4 * ncols, 1.1 * nrows + 0.6))
    for o in range(c_out):
      ax = fig.add_subplot(nrows, ncols, o + 1)
      for c in range(c_in):
        ax.plot(np.arange(k), kernel[:, c, o], lw=1)
      ax.axhline(0.0, color='0.7', lw=0.5)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(str(o), fontsize=7)
    fig.suptitle(title or f'{c_out} filters of width {k}, {c_in} input channel(s)',
                 fontsize=9)
  fig.tight_layout()
  return save_figure(fig, path_png, dpi)


# ----------------------------------------------------------------------------
# Where a unit looks: receptive field, jump and start offset per layer
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FieldGeometry:
  """The input window of a layer's units: unit u sees [start + u jump, ... + size)."""
  size: Tuple[int, ...]    # receptive field per spatial dimension
  jump: Tuple[int, ...]    # input distance between neighbouring units
  start: Tuple[int, ...]   # input coordinate where unit 0's field begins (< 0: padding)

  def box(self, position: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    """[lo, hi) per spatial dimension of the unit at `position`, not clipped."""
    return tuple((s + int(p) * j, s + int(p) * j + r)
                 for s, p, j, r in zip(self.start, position, self.jump, self.size))


def _pad_lo(module, in_spatial, out_spatial, kernel, stride, dilation) -> Tuple[int, ...]:
  k_eff = [shapes.effective_kernel(k, d) for k, d in zip(kernel, dilation)]
  padding = getattr(module, 'padding', None)
  if isinstance(padding, str) and padding.upper() in _PREPAD_LO:
    return tuple(_PREPAD_LO[padding.upper()](k) for k in k_eff)
  if padding is None:
    # No attribute to read: the 'SAME' split of the padding the shapes imply.
    return tuple(max((m - 1) * s + k - n, 0) // 2
                 for n, m, k, s in zip(in_spatial, out_spatial, k_eff, stride))
  pads = shapes.resolve_padding(padding, in_spatial, kernel, stride, dilation,
                                op='/'.join(module.path) or type(module).__name__)
  return tuple(lo for lo, _ in pads)


def field_geometry(model, input_shape: Sequence[int], *, variables=None
                   ) -> Dict[str, Optional[FieldGeometry]]:
  """FieldGeometry of every layer (names as `layers.list_layers`), None where untracked.

  Layers without spatial output (Dense, global pooling) and layers after a
  transposed conv or a window-less resize are None. The derivation is in the
  module docstring; size and jump equal `tables.summary`'s receptive_field
  and jump wherever both are defined.
  """
  input_shape = tuple(input_shape)
  nd = len(input_shape) - 1
  if nd < 1:
    raise ValueError(f'field_geometry needs inputs with spatial dimensions, (*spatial, C); '
                     f'got input_shape {input_shape}.')
  if variables is None:
    variables = tables.abstract_variables(model, input_shape)
  identity = FieldGeometry((1,) * nd, (1,) * nd, (0,) * nd)
  by_id: Dict[int, Optional[FieldGeometry]] = {}
  by_spatial: Dict[Tuple[int, ...], FieldGeometry] = {tuple(input_shape[:-1]): identity}
  alive: List[Any] = []   # keeps traced arrays alive so their ids stay unique
  result: Dict[str, Optional[FieldGeometry]] = {}

  def is_map(a) -> bool:
    return hasattr(a, 'shape') and len(a.shape) == nd + 2

  def source(inp) -> Optional[FieldGeometry]:
    if id(inp) not in by_id:
      by_id[id(inp)] = by_spatial.get(tuple(inp.shape[1:-1]))
      alive.append(inp)
    return by_id[id(inp)]

  def on_layer(name, module, args, out):
    inp = args[0] if args else None
    if not is_map(out) or not is_map(inp):
      result[name] = None
      return out
    field = source(inp)
    geometry = _layer_geometry(module, nd)
    in_sp, out_sp = tuple(inp.shape[1:-1]), tuple(out.shape[1:-1])
    if field is None or 'Transpose' in type(module).__name__:
      field = None
    elif geometry is not None:
      kernel, stride, dilation = geometry
      lo = _pad_lo(module, in_sp, out_sp, kernel, stride, dilation)
      field = FieldGeometry(
          size=tuple(r + (shapes.effective_kernel(k, d) - 1) * j
                     for r, k, d, j in zip(field.size, kernel, dilation, field.jump)),
          jump=tuple(j * s for j, s in zip(field.jump, stride)),
          start=tuple(s - p * j for s, p, j in zip(field.start, lo, field.jump)))
    elif out_sp != in_sp:
      field = None
    by_id[id(out)] = field
    alive.append(out)
    if field is not None and (out_sp not in by_spatial
                              or by_spatial[out_sp].size < field.size):
      by_spatial[out_sp] = field
    result[name] = field
    return out

  def run(v, x):
    by_id[id(x)] = identity
    alive.append(x)
    return walk(model, v, x, train=False, on_layer=on_layer)

  jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32))
  return result


# ----------------------------------------------------------------------------
# Activation maps
# ----------------------------------------------------------------------------

def _display(image: np.ndarray) -> Tuple[np.ndarray, Optional[str]]:
  """An (H, W, C) image for imshow: RGB for C == 3, else gray (mean over channels);
  rescaled to [0, 1] when its values leave that range."""
  image = np.asarray(image, np.float32)
  if image.shape[-1] != 3:
    image = image.mean(axis=-1)
  if image.size and (image.min() < 0.0 or image.max() > 1.0):
    image = _unit_range(image)
  return image, (None if image.ndim == 3 else 'gray')


def _show_input(ax, image: np.ndarray) -> None:
  if image.ndim == 2:   # 1-D signal (L, C)
    for c in range(image.shape[-1]):
      ax.plot(image[:, c], lw=1)
    ax.set_yticks([])
  else:
    shown, cmap = _display(image)
    ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation='nearest')
    ax.set_axis_off()
  ax.set_title('input ' + 'x'.join(map(str, image.shape)), fontsize=8)


def plot_activation_maps(model, variables, x, layers: Sequence[str], path_png: str,
                         max_channels: int = 16, *, dpi: int = 100) -> str:
  """Writes one input and, per layer, its channel maps, to a PNG; returns path_png.

  Channels are sorted by their mean activation over positions, most active
  first, and the first `max_channels` are tiled (1-pixel separators) with the
  channel index in each tile's corner. One colour scale is shared by the tiles
  of a layer, so channels of a layer compare; a colour bar gives it. 1-D
  layers are drawn as one (channels x length) heat map.

  Args:
    model, variables: the model and its variables (BatchNorm in inference mode).
    x: one input, (*spatial, C), or a batch holding one, (1, *spatial, C) (an
      array of rank >= 3 whose first axis is 1 is read as the latter).
    layers: layer names (full paths or unique suffixes; `layers.list_layers`).
    path_png: where to write the PNG (parent directories are created).
    max_channels: channels shown per layer.
    dpi: resolution.
  """
  if isinstance(layers, str):
    layers = [layers]
  if not layers:
    raise ValueError('plot_activation_maps: name at least one layer (see '
                     'layers.list_layers(model, input_shape)).')
  if max_channels < 1:
    raise ValueError(f'max_channels must be >= 1, got {max_channels}.')
  x = np.asarray(x, np.float32)
  # (1, *spatial, C) is already a batch of one; (*spatial, C) gets the batch axis.
  batch = x if (x.ndim >= 3 and x.shape[0] == 1) else x[None]
  image = batch[0]
  available = layers_lib.list_layers(model, image.shape, variables=variables)
  names = [layers_lib.resolve(n, [a for a, _, _ in available]) for n in layers]
  outs = layers_lib.layer_outputs(model, variables, jnp.asarray(batch), names)
  for name in names:
    shape = tuple(outs[name].shape[1:])
    if len(shape) != image.ndim:
      raise ValueError(f'layer {name!r} has output {shape}, with no spatial maps like the '
                       f'input {image.shape}; choose a conv, pool or norm layer.')
  panels = 1 + len(names)
  ncols = min(panels, 3)
  nrows = -(-panels // ncols)
  fig = new_figure((4.2 * ncols, 4.2 * nrows))
  _show_input(fig.add_subplot(nrows, ncols, 1), image)
  for i, name in enumerate(names):
    ax = fig.add_subplot(nrows, ncols, i + 2)
    maps = np.asarray(outs[name][0], np.float32)            # (*spatial, C)
    c_total = maps.shape[-1]
    order = np.argsort(-maps.reshape(-1, c_total).mean(axis=0), kind='stable')
    order = order[:max_channels]
    shown = np.moveaxis(maps[..., order], -1, 0)             # (n, *spatial)
    vmin, vmax = float(shown.min()), float(shown.max())
    if maps.ndim == 2:   # 1-D: channels as rows
      im = ax.imshow(shown, aspect='auto', cmap='viridis', vmin=vmin, vmax=vmax,
                     interpolation='nearest')
      ax.set_yticks(range(len(order)))
      ax.set_yticklabels([str(c) for c in order], fontsize=6)
    else:
      ncol_tiles = math.ceil(math.sqrt(len(order)))
      grid = _tile(shown, ncol_tiles, np.nan)
      im = ax.imshow(np.ma.masked_invalid(grid), cmap='viridis', vmin=vmin, vmax=vmax,
                     interpolation='nearest')
      h, w = shown.shape[1:3]
      for t, c in enumerate(order):
        r, q = divmod(t, ncol_tiles)
        ax.text(q * (w + 1), r * (h + 1), str(c), color='white', fontsize=6,
                va='top', ha='left')
      ax.set_axis_off()
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(f'{name} {"x".join(map(str, maps.shape))}\n{len(order)} of {c_total} '
                 'channels, most active (mean) first', fontsize=8)
  fig.tight_layout()
  return save_figure(fig, path_png, dpi)


# ----------------------------------------------------------------------------
# Top-activating patches
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TopPatches:
  """What `top_activating_patches` found; index [i] of each array is channels[i]."""
  layer: str                  # full layer name
  channels: Tuple[int, ...]
  values: np.ndarray          # (n_channels, k) activations, highest first
  positions: np.ndarray       # (n_channels, k, 1 + nd) int: image index, then unit coords
  patches: np.ndarray         # (n_channels, k, *field.size, C); outside the image: 0
  boxes: np.ndarray           # (n_channels, k, nd, 2) int: [lo, hi) in the image, clipped
  field: FieldGeometry
  one_per_image: bool


def _batches(images, batch_size: int) -> Iterable[np.ndarray]:
  """Arrays of images from an array, or from an iterable of arrays or dict batches
  (make_loader's: rows with 'mask' 0 are padding and are dropped)."""
  if isinstance(images, (np.ndarray, jax.Array)):
    images = np.asarray(images)
    for i in range(0, len(images), batch_size):
      yield images[i:i + batch_size]
    return
  for batch in images:
    if isinstance(batch, Mapping):
      x = np.asarray(batch['image'])
      if 'mask' in batch:
        x = x[np.asarray(batch['mask']) > 0]
    else:
      x = np.asarray(batch)
    yield x


def _crop(image: np.ndarray, box: Sequence[Tuple[int, int]]):
  """The window `box` of image (*spatial, C), zero outside the image, and the
  clipped box."""
  size = tuple(hi - lo for lo, hi in box)
  patch = np.zeros(size + image.shape[-1:], image.dtype)
  src, dst, clipped = [], [], []
  for (lo, hi), n in zip(box, image.shape[:-1]):
    a, b = max(lo, 0), min(hi, n)
    b = max(a, b)
    src.append(slice(a, b))
    dst.append(slice(a - lo, b - lo))
    clipped.append((a, b))
  patch[tuple(dst)] = image[tuple(src)]
  return patch, clipped


def top_activating_patches(model, variables, images, layer: str,
                           channels: Union[int, Sequence[int], None] = None, k: int = 9, *,
                           batch_size: int = 64, one_per_image: bool = True) -> TopPatches:
  """The k strongest responses of each chosen channel of a layer over a data set,
  with the input patch each one sees.

  A response is one unit: (image index, position) of the layer's output. Its
  patch is the unit's theoretical receptive field, placed by `field_geometry`
  (unit u sees [start + u jump, start + u jump + size) per spatial dimension;
  derivation in the module docstring). The window is clipped at the image
  border: the patch array keeps the full field size with zeros where the window
  leaves the image (the zero padding the network sees, when inputs are zero
  padded), and `boxes` gives the clipped window in image coordinates.

  Ties go to the earlier image, then the earlier position (row-major).

  Args:
    model, variables: the model and its variables (run with train=False).
    images: (N, *spatial, C) array, or a finite iterable of such batches or of
      make_loader dict batches (build the loader with num_epochs=1; rows with
      'mask' 0 are skipped). Image indices count the images in that order.
    layer: a layer name (full path or unique suffix) with spatial output.
    channels: an int, a list of ints, or None for every channel of the layer.
    k: responses kept per channel (fewer if the data has fewer candidates).
    batch_size: batch size when `images` is an array.
    one_per_image: keep at most one response (that image's maximum) per image
      and channel, as in Zeiler & Fergus's grids; False allows several
      positions of one image.

  Returns:
    A TopPatches; values[i] (highest first), positions[i], patches[i] and
    boxes[i] belong to channels[i].
  """
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'k must be a positive int, got {k!r}.')
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
  fn = None
  kept: List[Dict[str, np.ndarray]] = []
  seen = 0
  full = field = chans = spatial = None
  pad_to = 0
  for x in _batches(images, batch_size):
    x = np.asarray(x, np.float32)
    if fn is None:
      if x.ndim < 3:
        raise ValueError(f'images must be (N, *spatial, C) with spatial dimensions, got a '
                         f'batch of shape {x.shape}.')
      input_shape = x.shape[1:]
      available = layers_lib.list_layers(model, input_shape, variables=variables)
      full = layers_lib.resolve(layer, [n for n, _, _ in available])
      out_shape = dict((n, s) for n, _, s in available)[full]
      if len(out_shape) != len(input_shape):
        raise ValueError(f'layer {full!r} has output {out_shape} without the spatial '
                         f'dimensions of the input {input_shape}; choose a conv, pool or '
                         'norm layer.')
      field = field_geometry(model, input_shape, variables=variables)[full]
      if field is None:
        raise ValueError(f'the receptive field of layer {full!r} is not tracked (it comes '
                         'after a transposed conv, an upsampling or another size change '
                         'without a window), so its patches cannot be placed; choose an '
                         'earlier layer.')
      spatial, c_layer = tuple(out_shape[:-1]), out_shape[-1]
      chans = _channels(channels, c_layer, full)
      idx = jnp.asarray(chans)
      fn = jax.jit(lambda v, xb: layers_lib.layer_outputs(model, v, xb, [full])[full][..., idx])
      kept = [None] * len(chans)
      pad_to = len(x)
    elif x.shape[1:] != input_shape:
      raise ValueError(f'all images must share one shape; got {x.shape[1:]} after '
                       f'{input_shape}.')
    n = len(x)
    if n == 0:
      continue
    xb = x if n >= pad_to else np.concatenate(
        [x, np.zeros((pad_to - n,) + x.shape[1:], x.dtype)])
    act = np.asarray(fn(variables, xb))[:n]
    flat = act.reshape(n, -1, len(chans))
    positions_per_image = flat.shape[1]
    for ci in range(len(chans)):
      a = flat[:, :, ci]
      if one_per_image:
        pos = np.argmax(a, axis=1)
        img = np.arange(n)
        vals = a[img, pos]
      else:
        img, pos = np.divmod(np.arange(n * positions_per_image), positions_per_image)
        vals = a.reshape(-1)
      top = np.argsort(-vals, kind='stable')[:k]
      units = np.stack(np.unravel_index(pos[top], spatial), axis=-1).reshape(len(top), -1)
      crops = [_crop(x[img[t]], field.box(u)) for t, u in zip(top, units)]
      new = dict(values=vals[top].astype(np.float32),
                 positions=np.concatenate([(seen + img[top])[:, None], units], axis=1),
                 patches=np.stack([c[0] for c in crops]),
                 boxes=np.asarray([c[1] for c in crops], np.int64).reshape(len(top), -1, 2))
      if kept[ci] is not None:
        new = {key: np.concatenate([kept[ci][key], new[key]]) for key in new}
      order = np.argsort(-new['values'], kind='stable')[:k]
      kept[ci] = {key: v[order] for key, v in new.items()}
    seen += n
  if fn is None or seen == 0:
    raise ValueError('top_activating_patches: no images were given.')
  return TopPatches(
      layer=full, channels=tuple(chans),
      values=np.stack([c['values'] for c in kept]),
      positions=np.stack([c['positions'] for c in kept]).astype(np.int64),
      patches=np.stack([c['patches'] for c in kept]),
      boxes=np.stack([c['boxes'] for c in kept]),
      field=field, one_per_image=one_per_image)


def _channels(channels, c_layer: int, layer: str) -> List[int]:
  if channels is None:
    return list(range(c_layer))
  if isinstance(channels, (int, np.integer)) and not isinstance(channels, bool):
    channels = [channels]
  chans = [int(c) for c in channels]
  bad = [c for c in chans if not 0 <= c < c_layer]
  if not chans or bad:
    raise ValueError(f'channels must be ints in [0, {c_layer}) for layer {layer!r} '
                     f'({c_layer} channels); got {list(channels)!r}.')
  return chans


def plot_top_patches(result: TopPatches, path_png: str, *, dpi: int = 100) -> str:
  """Writes a grid of top-activating patches to a PNG; returns path_png.

  One row per channel, its k patches left to right (highest first), each
  titled with its activation and labelled with its image index. Patches share
  one display scale (values already in [0, 1] are shown as they are; otherwise
  the range of all patches maps to [0, 1]); 1-D patches are line plots.
  """
  patches = np.asarray(result.patches, np.float32)
  n_ch, k = patches.shape[:2]
  if n_ch == 0 or k == 0:
    raise ValueError('plot_top_patches: the result holds no patches.')
  lo, hi = float(patches.min()), float(patches.max())
  if lo < 0.0 or hi > 1.0:
    patches = (patches - lo) / (hi - lo) if hi > lo else np.full_like(patches, 0.5)
  one_d = patches.ndim == 4       # (n_ch, k, size, C)
  fig = new_figure((1.3 * k + 0.8, 1.4 * n_ch + 0.6))
  for i in range(n_ch):
    for t in range(k):
      ax = fig.add_subplot(n_ch, k, i * k + t + 1)
      patch = patches[i, t]
      if one_d:
        for c in range(patch.shape[-1]):
          ax.plot(patch[:, c], lw=1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks([])
        ax.set_yticks([])
      else:
        rgb = patch if patch.shape[-1] == 3 else patch.mean(axis=-1)
        ax.imshow(rgb, cmap=None if rgb.ndim == 3 else 'gray', vmin=0.0, vmax=1.0,
                  interpolation='nearest')
        ax.set_xticks([])
        ax.set_yticks([])
      ax.set_title(f'{result.values[i, t]:.3g}', fontsize=7)
      ax.set_xlabel(f'img {int(result.positions[i, t, 0])}', fontsize=6)
      if t == 0:
        ax.set_ylabel(f'ch {result.channels[i]}', fontsize=8)
  size = 'x'.join(map(str, result.field.size))
  fig.suptitle(f'{result.layer}: top {k} per channel (receptive field {size}, jump '
               f'{"x".join(map(str, result.field.jump))}'
               f'{", one per image" if result.one_per_image else ""})', fontsize=9)
  fig.tight_layout()
  return save_figure(fig, path_png, dpi)


# ----------------------------------------------------------------------------
# Real images
# ----------------------------------------------------------------------------

def dataset_images(dataset: str, split: str, n: int, data_dir: Optional[str] = None,
                   transform: str = '', *, start: int = 0, classes=None,
                   clip: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """n consecutive examples of a data set, as the model sees them at evaluation.

  Args:
    dataset: a cnn_jax.data name ('digits' and the other embedded sets work
      offline; catalog sets must be prepared, see `data.get_source`).
    split: a tfds split ('test', 'train[:90%]').
    n: how many examples, read from index `start` on.
    data_dir: where data sets are prepared (default: $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    transform: a deterministic augmentation spec (a run's eval_transform).
    start: index of the first example.
    classes: only these class ids, relabelled 0..len-1 (a run's classes).
    clip: read at most n (fewer when the split ends first) instead of refusing.

  Returns:
    (images float32 (n, *spatial, C), labels (n,) int32, or masks).
  """
  from cnn_jax.data import augment, sources  # pylint: disable=import-outside-toplevel
  if not isinstance(n, int) or n < 1 or not isinstance(start, int) or start < 0:
    raise ValueError(f'n must be a positive int and start a non-negative int; got n={n!r}, '
                     f'start={start!r}.')
  fn = augment.make_transform(transform)
  if fn.is_random:
    raise ValueError(f'transform {transform!r} draws random numbers; pass a deterministic '
                     "spec (a run's eval_transform, e.g. 'center_crop(224)').")
  source = sources.select(sources.get_source(dataset, split, data_dir), classes)
  if clip and start < len(source):
    n = min(n, len(source) - start)
  if start + n > len(source):
    raise ValueError(f'{dataset!r} split {split!r} has {len(source)} examples; cannot read '
                     f'{n} from index {start}. Lower n or start.')
  examples = [fn(sources.to_example(source[i])) for i in range(start, start + n)]
  return (np.stack([e['image'] for e in examples]).astype(np.float32),
          np.stack([np.asarray(e['label']) for e in examples]))


def run_images(workdir: str, split: Optional[str] = None, n: int = 16, *, start: int = 0,
               clip: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """`dataset_images` with a run's dataset, data_dir, classes and eval_transform
  (from its config.json); split defaults to the run's eval_split."""
  import json  # pylint: disable=import-outside-toplevel
  from cnn_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.expanduser(workdir), 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{workdir!r} has no config.json: it is not a workdir of this project.')
  with open(path) as f:
    config = json.load(f)
  return dataset_images(config['dataset'], split or config.get('eval_split', 'test'), n,
                        config.get('data_dir'), config.get('eval_transform', ''),
                        start=start, clip=clip,
                        classes=config_lib.parse_classes(config.get('classes', '')))


__all__ = ['FieldGeometry', 'TopPatches', 'dataset_images', 'field_geometry', 'filter_grid',
           'first_layer_filters', 'plot_activation_maps', 'plot_filters', 'plot_top_patches',
           'run_images', 'top_activating_patches']
