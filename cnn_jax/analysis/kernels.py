"""The hand-designed kernels of the notes, applied to a photo with our conv op.

Before a CNN learns its filters, image processing chose them by hand. The notes
print these (seed 000's "Operation / Kernel / Image result" tables, seed 002's
"Understanding Convolutional Filters" slide and its worked edge example):

  identity           [[0 0 0] [0 1 0] [0 0 0]]                          sums to 1
  edge_laplacian_4   [[0 -1 0] [-1 4 -1] [0 -1 0]]   seed 000: "Ridge or edge
                     detection"; the negative of the 4-neighbour Laplacian  sums to 0
  edge_laplacian_8   [[-1 -1 -1] [-1 8 -1] [-1 -1 -1]]  the 8-neighbour form   sums to 0
  laplacian          [[0 1 0] [1 -4 1] [0 1 0]]      seed 002's example "Filter":
                     the discrete Laplacian d2/dx2 + d2/dy2 itself      sums to 0
  sharpen            [[0 -1 0] [-1 5 -1] [0 -1 0]]   seed 002: "Sharpen"
                     = identity + edge_laplacian_4                      sums to 1
  box_blur           1/9 [[1 1 1] [1 1 1] [1 1 1]]                       sums to 1
  gaussian_3x3       1/16 [[1 2 1] [2 4 2] [1 2 1]]  binomial approximation  sums to 1
  gaussian_5x5       1/256 (outer product of [1 4 6 4 1])                sums to 1
  unsharp_5x5        -1/256 [[1 4 6 4 1] ... centre -476 ...]: unsharp masking with
                     amount 1 = identity + (identity - gaussian_5x5)     sums to 1
  sobel_x, sobel_y   [[-1 0 1] [-2 0 2] [-1 0 1]] and its transpose: seed 002's
                     "Edges" pair (d/dx across columns, d/dy down rows)  sums to 0
  prewitt_x, prewitt_y  [[-1 0 1] x 3 rows] and its transpose (not printed in the
                     notes; Sobel without the centre weight 2)            sums to 0
  vertical_edge      [[1 0 -1] x 3 rows]: seed 002's worked example, a 6x6 image
                     whose left half is 10 and right half 0 gives a 4x4 map
                     [0 30 30 0] in every row (= -prewitt_x)              sums to 0

A naming slip in the notes: seed 000's table labels the 8-neighbour kernel
[[-1 -1 -1] [-1 8 -1] [-1 -1 -1]] "Sharpen", but it sums to 0, so it maps flat
regions to 0 and keeps only edges: it is an edge (ridge) detector, the 8-neighbour
partner of the 4-neighbour one above it in the same table. A sharpening kernel sums
to 1 (identity plus an edge detector); seed 002 prints the usual one, [[0 -1 0]
[-1 5 -1] [0 -1 0]]. Here the 8-neighbour kernel is named 'edge_laplacian_8' and
'sharpen' is seed 002's.

How a kernel is applied. `apply_kernel` computes, with `cnn_jax.ops.conv`,

    y[i, j] = sum_{u, v} xpad[i + u, j + v] K[u, v]          (cross-correlation)

which is what a CNN layer computes and what seed 002's worked example computes
([10 10 0] . [1 0 -1] = 10 per row, 30 over 3 rows). The signal-processing
convolution of seed 001/003, y[i, j] = sum_{u, v} x[i - u, j - v] K[u, v], is the
same with K rotated by 180 degrees (`true_convolution=True`). The two agree for the
symmetric kernels (identity, the Laplacians, sharpen and the blurs) and differ in
sign for the antisymmetric ones (Sobel, Prewitt, vertical_edge): by correlation,
sobel_x is positive where brightness increases to the right and vertical_edge is
positive on a bright-left / dark-right edge, as in the worked example.

'same' zero padding (K // 2 zeros each side for an odd K) keeps the output the size
of the input; near the border the zeros darken the blurs and make the edge
detectors fire on the image frame.
"""
from __future__ import annotations

import difflib
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np

from cnn_jax import ops

# ITU-R BT.601 luma weights (the ones PIL's convert('L') uses).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _k(rows, scale=1.0) -> np.ndarray:
  """A read-only float32 constant (callers copy it to modify it)."""
  k = (np.asarray(rows, np.float64) * scale).astype(np.float32)
  k.setflags(write=False)
  return k


_BINOMIAL_5 = np.array([1, 4, 6, 4, 1], np.float64)

IDENTITY = _k([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
EDGE_LAPLACIAN_4 = _k([[0, -1, 0], [-1, 4, -1], [0, -1, 0]])
EDGE_LAPLACIAN_8 = _k([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]])
LAPLACIAN = _k([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
SHARPEN = _k([[0, -1, 0], [-1, 5, -1], [0, -1, 0]])
BOX_BLUR = _k(np.ones((3, 3)), 1 / 9)
GAUSSIAN_3X3 = _k([[1, 2, 1], [2, 4, 2], [1, 2, 1]], 1 / 16)
GAUSSIAN_5X5 = _k(np.outer(_BINOMIAL_5, _BINOMIAL_5), 1 / 256)
UNSHARP_5X5 = _k([[1, 4, 6, 4, 1],
                  [4, 16, 24, 16, 4],
                  [6, 24, -476, 24, 6],
                  [4, 16, 24, 16, 4],
                  [1, 4, 6, 4, 1]], -1 / 256)
SOBEL_X = _k([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
SOBEL_Y = _k([[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
PREWITT_X = _k([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]])
PREWITT_Y = _k([[-1, -1, -1], [0, 0, 0], [1, 1, 1]])
VERTICAL_EDGE = _k([[1, 0, -1], [1, 0, -1], [1, 0, -1]])

CLASSIC_KERNELS: Dict[str, np.ndarray] = {
    'identity': IDENTITY,
    'edge_laplacian_4': EDGE_LAPLACIAN_4,
    'edge_laplacian_8': EDGE_LAPLACIAN_8,
    'laplacian': LAPLACIAN,
    'sharpen': SHARPEN,
    'box_blur': BOX_BLUR,
    'gaussian_3x3': GAUSSIAN_3X3,
    'gaussian_5x5': GAUSSIAN_5X5,
    'unsharp_5x5': UNSHARP_5X5,
    'sobel_x': SOBEL_X,
    'sobel_y': SOBEL_Y,
    'prewitt_x': PREWITT_X,
    'prewitt_y': PREWITT_Y,
    'vertical_edge': VERTICAL_EDGE,
}

# Figure titles: what the kernel does, and where the notes print it.
KERNEL_TITLES: Dict[str, str] = {
    'identity': 'identity',
    'edge_laplacian_4': 'ridge/edge detection (seed 000)',
    'edge_laplacian_8': "8-neighbour edge (seed 000: 'Sharpen')",
    'laplacian': 'Laplacian (seed 002 example filter)',
    'sharpen': 'sharpen (seed 002)',
    'box_blur': 'box blur (normalised)',
    'gaussian_3x3': 'Gaussian blur 3x3 (approximation)',
    'gaussian_5x5': 'Gaussian blur 5x5 (approximation)',
    'unsharp_5x5': 'unsharp masking 5x5 (amount 1)',
    'sobel_x': 'Sobel x: vertical edges (seed 002)',
    'sobel_y': 'Sobel y: horizontal edges (seed 002)',
    'prewitt_x': 'Prewitt x: vertical edges',
    'prewitt_y': 'Prewitt y: horizontal edges',
    'vertical_edge': 'vertical edge (seed 002 example)',
}

MODES = ('gray', 'rgb')
PHOTOS = ('china', 'flower')


def get_kernel(name: str) -> np.ndarray:
  """The classic kernel called `name` (a key of CLASSIC_KERNELS), as float32."""
  if name in CLASSIC_KERNELS:
    return CLASSIC_KERNELS[name]
  close = difflib.get_close_matches(str(name), list(CLASSIC_KERNELS), n=3, cutoff=0.4)
  hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
  raise ValueError(f'no classic kernel named {name!r}.{hint} '
                   f'Known kernels: {", ".join(CLASSIC_KERNELS)}.')


def _as_kernel(kernel: Union[str, np.ndarray]) -> np.ndarray:
  k = get_kernel(kernel) if isinstance(kernel, str) else np.asarray(kernel, np.float32)
  if k.ndim != 2 or min(k.shape) < 1:
    raise ValueError(f'a kernel must be a 2-D (kh, kw) array, got shape {k.shape}; '
                     'it is applied to every channel (mode="rgb") or to the luminance.')
  return k


# ----------------------------------------------------------------------------
# The photo
# ----------------------------------------------------------------------------

def sample_photo(name: str = 'china',
                 size: Optional[Union[int, Tuple[int, int]]] = None) -> np.ndarray:
  """One of scikit-learn's two bundled photos, as float32 (H, W, 3) in [0, 1].

  Args:
    name: 'china' (a temple, 427x640) or 'flower' (427x640); 'china.jpg' also works.
      Both ship with scikit-learn, so nothing is downloaded.
    size: None keeps the full photo; an int is the longer side after resizing
      (aspect ratio kept); (H, W) resizes to exactly that. Resizing averages the
      pixels each output pixel covers (PIL's BOX filter), so small figures stay
      free of aliasing.

  Returns:
    float32 array (H, W, 3), values in [0, 1].
  """
  stem = str(name).removesuffix('.jpg')
  if stem not in PHOTOS:
    raise ValueError(f'no sample photo {name!r}; scikit-learn ships {PHOTOS} '
                     "(pass e.g. name='china').")
  longer_side = isinstance(size, int) and not isinstance(size, bool)
  exact = isinstance(size, (tuple, list)) and len(size) == 2
  if size is not None and (not (longer_side or exact) or
                           min((size,) if longer_side else size) < 1):
    raise ValueError(f'size must be a positive int (the longer side) or (H, W), '
                     f'got {size!r}.')
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_image  # pylint: disable=import-outside-toplevel
  photo = load_sample_image(f'{stem}.jpg')
  if size is not None:
    h, w = photo.shape[:2]
    if longer_side:
      scale = size / max(h, w)
      target = (max(1, round(h * scale)), max(1, round(w * scale)))
    else:
      target = (int(size[0]), int(size[1]))
    photo = np.asarray(Image.fromarray(photo).resize((target[1], target[0]), Image.BOX))
  return photo.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------
# Applying a kernel
# ----------------------------------------------------------------------------

def to_gray(image) -> np.ndarray:
  """(H, W, 3) RGB -> (H, W) luminance 0.299 R + 0.587 G + 0.114 B; (H, W, 1) or
  (H, W) -> (H, W)."""
  x = np.asarray(image, np.float32)
  if x.ndim == 2:
    return x
  if x.ndim == 3 and x.shape[-1] == 1:
    return x[..., 0]
  if x.ndim == 3 and x.shape[-1] == 3:
    return (x @ np.asarray(LUMA_WEIGHTS, np.float32)).astype(np.float32)
  raise ValueError(f'to_gray needs an (H, W), (H, W, 1) or (H, W, 3) image, got shape '
                   f'{x.shape}.')


def apply_kernel(image, kernel: Union[str, np.ndarray], mode: str = 'gray', *,
                 padding: str = 'same', true_convolution: bool = False) -> np.ndarray:
  """Filters an image with one hand-designed kernel, using cnn_jax.ops.conv.

  y[i, j, c] = sum_{u, v} xpad[i + u, j + v, c] K[u, v]  (cross-correlation, as a
  CNN layer computes it; with true_convolution=True, K is rotated by 180 degrees
  first, which negates the antisymmetric Sobel/Prewitt/vertical_edge outputs).

  Args:
    image: (H, W) or (H, W, C) array (e.g. `sample_photo()`).
    kernel: a (kh, kw) array or a name from CLASSIC_KERNELS.
    mode: 'gray' converts to luminance 0.299 R + 0.587 G + 0.114 B first (a
      1-channel image is used as it is) and returns (H, W); 'rgb' filters each of
      the C channels separately with the same kernel (a depthwise conv, groups=C)
      and returns (H, W, C).
    padding: 'same' (zeros, K // 2 each side for odd K: output H x W), 'valid' (no
      padding: (H - kh + 1) x (W - kw + 1)) or 'full' (K - 1 zeros each side).
    true_convolution: rotate the kernel by 180 degrees (the signal-processing
      convolution) instead of correlating with it.

  Returns:
    float32 NumPy array: (H', W') for 'gray', (H', W', C) for 'rgb'. Values are not
    clipped: edge detectors give signed responses, sharpening may leave [0, 1].
  """
  k = _as_kernel(kernel)
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
  if str(padding).lower() not in ('same', 'valid', 'full'):
    raise ValueError(f"padding must be 'same', 'valid' or 'full', got {padding!r}.")
  x = np.asarray(image, np.float32)
  if mode == 'gray':
    x = to_gray(x)[..., None]
  elif x.ndim != 3:
    raise ValueError(f"mode='rgb' filters each channel of an (H, W, C) image; got shape "
                     f"{x.shape}. Use mode='gray' for a 2-D image.")
  c = x.shape[-1]
  w = jnp.broadcast_to(jnp.asarray(k)[:, :, None, None], k.shape + (1, c))
  op = ops.true_convolution if true_convolution else ops.conv
  y = op(jnp.asarray(x)[None], w, padding=str(padding).upper(), groups=c)[0]
  y = np.asarray(y, np.float32)
  return y[..., 0] if mode == 'gray' else y


# ----------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------

def _integer_form(k: np.ndarray) -> Tuple[np.ndarray, int]:
  """(M, d) with k = M / d and M integer, for the small denominators the notes use
  (d = 1 if none fits; d < 0 puts the sign in the factor)."""
  for d in (1, 2, 4, 8, 9, 16, 256):
    m = k.astype(np.float64) * d
    if np.allclose(m, np.round(m), atol=1e-4):
      # Mostly negative entries read better with the sign in the factor, as the
      # notes print unsharp masking: -1/256 [... -476 ...].
      if d > 1 and (k < 0).sum() > (k > 0).sum():
        return -np.round(m).astype(np.int64), -d
      return np.round(m).astype(np.int64), d
  return k, 1


def _draw_kernel(ax, k: np.ndarray, title: str):
  """The kernel as a small matrix, values printed in the cells, coloured by sign."""
  m, d = _integer_form(k)
  lim = float(np.abs(k).max()) or 1.0
  ax.imshow(k, cmap='RdBu_r', vmin=-lim, vmax=lim, interpolation='nearest')
  small = max(k.shape) > 3
  for (i, j), v in np.ndenumerate(m):
    text = f'{int(v)}' if m.dtype.kind == 'i' else f'{v:.2g}'
    ax.text(j, i, text, ha='center', va='center', fontsize=6 if small else 8,
            color='white' if abs(k[i, j]) > 0.6 * lim else 'black')
  ax.set_xticks([])
  ax.set_yticks([])
  factor = '' if d == 1 else (f'x 1/{d}, ' if d > 0 else f'x -1/{-d}, ')
  ax.set_title(f'{title}\n({factor}sum {k.sum():.3g})', fontsize=7)


def _display_output(y: np.ndarray, zero_sum: bool) -> Tuple[np.ndarray, dict, str]:
  """(array, imshow kwargs, caption) of one filtered image."""
  if zero_sum:
    # Signed response: mid-grey (or white in the diverging map) is 0.
    s = float(np.percentile(np.abs(y), 99)) or 1.0
    if y.ndim == 2:
      return y, dict(cmap='RdBu_r', vmin=-s, vmax=s), f'signed, colour range +-{s:.2g}'
    return np.clip(0.5 + 0.5 * y / s, 0, 1), {}, f'0.5 + y / (2 x {s:.2g}), grey = 0'
  kwargs = dict(cmap='gray', vmin=0.0, vmax=1.0) if y.ndim == 2 else {}
  return np.clip(y, 0, 1), kwargs, 'clipped to [0, 1]'


def plot_kernel_grid(image, path_png: str, names: Optional[Sequence[str]] = None,
                     mode: str = 'gray', *, true_convolution: bool = False,
                     pairs_per_row: int = 2, dpi: int = 100) -> str:
  """A PNG of classic kernels next to what each does to `image`.

  The input is drawn first; then, for each kernel, the kernel as an annotated
  matrix (integer entries times the printed 1/d factor, red positive, blue
  negative) beside its output. Kernels that sum to 1 (identity, blurs, sharpening)
  show their output clipped to [0, 1]; zero-sum kernels (edge detectors) show the
  signed response, scaled to the 99th percentile of |y|: a red/blue map in 'gray'
  mode, 0.5 + y / (2 s) per channel (grey = no response) in 'rgb' mode.

  Args:
    image: (H, W) or (H, W, 3), values in [0, 1] (e.g. `sample_photo(size=160)`;
      keep it small, the figure draws it once per kernel).
    path_png: where to write the PNG (parent directories are created).
    names: kernels to draw (keys of CLASSIC_KERNELS); default all of them.
    mode: 'gray' (filter the luminance) or 'rgb' (filter each channel), as in
      `apply_kernel`.
    true_convolution: flip the kernels (signal-processing convolution) instead of
      the cross-correlation CNN layers compute.
    pairs_per_row: kernel/output pairs side by side in one row.
    dpi: resolution.

  Returns:
    path_png.
  """
  from cnn_jax.analysis.plots import new_figure, save_figure  # pylint: disable=import-outside-toplevel
  names = list(CLASSIC_KERNELS) if names is None else list(names)
  if not names:
    raise ValueError('names is empty: give at least one kernel name (or None for all).')
  kernels = [get_kernel(n) for n in names]
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
  if pairs_per_row < 1:
    raise ValueError(f'pairs_per_row must be >= 1, got {pairs_per_row}.')
  x = np.asarray(image, np.float32)
  shown = to_gray(x) if mode == 'gray' else x
  h, w = shown.shape[:2]
  aspect = w / h
  cols = min(pairs_per_row, len(names))
  rows = math.ceil(len(names) / cols)
  panel_h = 1.9
  fig = new_figure((cols * (panel_h + panel_h * aspect) + 0.3, (rows + 1) * (panel_h + 0.5) + 0.6))
  grid = fig.add_gridspec(rows + 1, 2 * cols, width_ratios=[1, aspect] * cols)
  ax = fig.add_subplot(grid[0, :])
  ax.imshow(np.clip(shown, 0, 1), cmap='gray' if shown.ndim == 2 else None, vmin=0, vmax=1)
  ax.set_title(f'input ({h}x{w}, ' + ('luminance 0.299R + 0.587G + 0.114B)' if mode == 'gray'
                                      else 'RGB, each channel filtered separately)'),
               fontsize=9)
  ax.axis('off')
  for idx, (name, k) in enumerate(zip(names, kernels)):
    r, c = divmod(idx, cols)
    y = apply_kernel(x, k, mode, true_convolution=true_convolution)
    _draw_kernel(fig.add_subplot(grid[r + 1, 2 * c]), k, KERNEL_TITLES.get(name, name))
    arr, kwargs, caption = _display_output(y, zero_sum=abs(float(k.sum())) < 1e-6)
    ax = fig.add_subplot(grid[r + 1, 2 * c + 1])
    ax.imshow(arr, interpolation='nearest', **kwargs)
    ax.set_title(f'{name}: {caption}', fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
  op = 'true convolution (kernel rotated 180 deg)' if true_convolution else \
      'cross-correlation, as a CNN layer'
  fig.suptitle(f'Classic hand-designed kernels, {mode} mode: {op}, same zero padding',
               fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  return save_figure(fig, path_png, dpi)
