"""Seeded per-example image augmentation (NumPy) and the spec strings configs use.

Every op takes one ``(H, W, C)`` float32 image (values in [0, 1], as
``sources.to_example`` produces them) and returns the result. A random op also takes a
``np.random.Generator`` and draws from it in a fixed order, so its output is a
function of the image and the generator state alone; grain's ``random_map`` hands
each example a generator seeded from (seed, index, epoch), which makes a whole epoch
of augmented batches reproducible.

The ops, as in the notes (AlexNet: 256-rescale, random 227 crops, mirroring, RGB
intensity (PCA) noise; fine-tuning: rotation, flipping, zooming, colour jitter):

  random_crop      uniform (h, w) window; crops are exact sub-arrays.
  pad_and_crop     pad by ``pad`` pixels (zeros or reflection), then a random window of
                   the original size (the CIFAR recipe, pad 4 -> 40x40 -> 32x32).
  horizontal_flip  mirror the width axis with probability p.
  pca_color_noise  AlexNet's "fancy PCA": one RGB offset per image,
                   ``I_xy += [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T``, a_i ~ N(0, std^2),
                   (p_i, l_i) the eigenvectors / eigenvalues of the 3x3 RGB covariance
                   of the training pixels.
  color_jitter     random brightness, contrast and saturation factors.
  random_rotation  rotation about the centre, bilinear, zero outside the image.
  random_zoom      scale about the centre, same output size, bilinear, zero fill.
  resize           bilinear (antialiased when shrinking, = jax.image.resize).
  center_crop, normalize, to_rgb   deterministic.

Crops and flips return views of their input (no copy); nothing is modified in place.

Segmentation: image and mask together
-------------------------------------
When an example carries a mask -- ``example['label']`` an (H, W) array of integer class
ids, as ``sources.to_example(..., task='segmentation')`` makes it -- a ``Transform``
(``make_transform(spec, task=...)``; by default, task 'auto', whenever the label has
ndim >= 2) moves the mask with the image:

* geometric ops (resize, center_crop, random_crop, pad, pad_crop, flip, rotate, zoom)
  apply the SAME parameters to both, from the same draws (so the image gets exactly
  what it would get alone), and resample the mask by NEAREST neighbour: every mask
  value is one of the input's class ids, never a blend. ``resize`` uses
  ``resize_nearest`` (half-pixel centres, jax.image.resize's 'nearest' rule); rotate and
  zoom take, for each output pixel, the input pixel nearest to the point the image
  samples bilinearly.
* areas with no source pixel -- outside the rotated or shrunk image, zero padding of
  pad and pad_crop -- get mask 0, the background class (the image gets 0 there);
  pad_crop(mode=reflect) reflects the mask as it reflects the image.
* photometric ops (normalize, color_jitter, pca_noise, to_rgb) and callables in a
  list spec change the image only (a callable that changes the image size is an error).

The mask keeps its integer dtype and leaves as an (H', W') 'label'.

Spec strings
------------
``make_transform(spec, task='auto')`` turns a string into a ``(example, rng) -> example``
callable that applies the ops to ``example['image']`` (and its mask, above) left to
right::

  spec := '' | op ('|' op)*          (a list of op strings is joined with '|')
  op   := name | name '(' args ')'   args as in a Python call: positional, then
                                     key=value; values are numbers, (tuples) or bare
                                     words (imagenet, reflect) read as strings.

e.g. ``'resize(256)|random_crop(227)|flip|pca_noise(0.1)|normalize(imagenet)'``
(AlexNet training), ``'resize(256)|center_crop(227)|normalize(imagenet)'`` (AlexNet
evaluation), ``'pad_crop(4)|flip|normalize(cifar10)'`` (CIFAR training).

  ==========================================  ======  ===================================
  op (defaults)                               random  function
  ==========================================  ======  ===================================
  resize(size) | resize(h, w)                 no      resize: int = shorter side
  center_crop(size) | center_crop(h, w)       no      center_crop
  random_crop(size) | random_crop(h, w)       yes     random_crop
  pad(amount)                                 no      pad: zeros on every side
  pad_crop(pad=4, mode=constant|reflect)      yes     pad_and_crop
  flip(p=0.5)                                 yes     horizontal_flip
  pca_noise(std=0.1)                          yes     pca_color_noise, ImageNet PCA
  color_jitter(brightness=0, contrast=0,      yes     color_jitter
               saturation=0)
  rotate(max_degrees) | rotate(lo, hi)        yes     random_rotation, degrees, CCW > 0
  zoom(lo, hi)                                yes     random_zoom, > 1 magnifies
  normalize(imagenet|cifar10|mnist)           no      normalize with published stats
  normalize(mean, std)                        no      numbers or (per-channel tuples)
  to_rgb                                      no      to_rgb: 1 channel -> 3 copies
  ==========================================  ======  ===================================

Unknown names, wrong argument counts and bad values raise ``ValueError`` when the spec
is parsed, before any data is read. What depends on the image (channel count, crop
larger than the image) is checked when an op runs, and the error names the op and the
spec. A list spec may also hold callables ``fn(image, rng) -> image`` (e.g. a
``functools.partial(pca_color_noise, eigvals=..., eigvecs=...)`` with statistics from
``pca_from_images``); they count as random.
"""
from __future__ import annotations

import ast
import functools
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

Size = int | tuple[int, int]


def _constant(values) -> np.ndarray:
  array = np.array(values, np.float32)
  array.flags.writeable = False
  return array


# Per-channel statistics for pixel values in [0, 1].
IMAGENET_MEAN = _constant([0.485, 0.456, 0.406])
IMAGENET_STD = _constant([0.229, 0.224, 0.225])
# Per-channel mean / std over all pixels of the 50,000 CIFAR-10 training images. The
# (0.2023, 0.1994, 0.2010) found in many CIFAR repositories is not this std.
CIFAR10_MEAN = _constant([0.4914, 0.4822, 0.4465])
CIFAR10_STD = _constant([0.2470, 0.2435, 0.2616])
MNIST_MEAN = _constant([0.1307])
MNIST_STD = _constant([0.3081])

# ImageNet RGB PCA used with AlexNet-style colour noise. The numbers are usually quoted
# on the 0-255 scale as eigenvalues (55.46, 4.794, 1.148) (e.g. MXNet's LightingAug)
# and on the [0, 1] scale as (0.2175, 0.0188, 0.0045) (e.g. fb.resnet.torch): the
# two differ by 255, the factor that keeps the offset a_i l_i the same fraction of
# the pixel range. We store the [0, 1] values, 0-255 values / 255. On [0, 1] pixels
# they read as the covariance eigenvalues (variances: the first component holds 90%
# of a total 0.24, ~0.28 std per channel, near IMAGENET_STD), i.e. what
# ``pca_from_images`` returns for [0, 1] data, on the scale `std` was tuned for.
# Columns of IMAGENET_EIGVECS are the eigenvectors p1, p2, p3 (rows R, G, B); they are
# scale-free.
IMAGENET_EIGVALS = _constant(np.array([55.46, 4.794, 1.148]) / 255.0)
IMAGENET_EIGVECS = _constant([[-0.5675, 0.7192, 0.4009],
                              [-0.5808, -0.0045, -0.8140],
                              [-0.5836, -0.6948, 0.4203]])

STATS = {
    'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
    'cifar10': (CIFAR10_MEAN, CIFAR10_STD),
    'mnist': (MNIST_MEAN, MNIST_STD),
}

# ITU-R BT.601 luma weights, the usual RGB -> grey conversion.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_ONE = np.ones(1, np.float32)


# ----------------------------------------------------------------------------- checks


def _hwc(op: str, image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f'{op}: expected an (H, W, C) image, got shape {image.shape}.')
  return image


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
      x, (bool, np.bool_))


def _hw(op: str, size) -> tuple[int, int]:
  """size -> (h, w); an int means a square."""
  hw = (size, size) if _is_int(size) else size
  if (not isinstance(hw, (tuple, list)) or len(hw) != 2
      or not all(_is_int(s) and s > 0 for s in hw)):
    raise ValueError(f'{op}: size must be a positive int or (h, w) of positive ints, '
                     f'got {size!r}.')
  return int(hw[0]), int(hw[1])


def _range(op: str, name: str, value, *, symmetric: bool) -> tuple[float, float]:
  """A number or a (lo, hi) pair -> (lo, hi); a number x means (-x, x) if symmetric."""
  if _is_number(value):
    value = (-abs(value), abs(value)) if symmetric else (value, value)
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(_is_number(v) for v in value) or value[0] > value[1]):
    raise ValueError(f'{op}: {name} must be a number or (lo, hi) with lo <= hi, '
                     f'got {value!r}.')
  return float(value[0]), float(value[1])


def _probability(op: str, p) -> float:
  if not _is_number(p) or not 0.0 <= p <= 1.0:
    raise ValueError(f'{op}: p must be a probability in [0, 1], got {p!r}.')
  return float(p)


def _non_negative(op: str, name: str, value) -> float:
  if not _is_number(value) or value < 0:
    raise ValueError(f'{op}: {name} must be a number >= 0, got {value!r}.')
  return float(value)


# --------------------------------------------------------------------- geometric ops


def center_crop(image: np.ndarray, size: Size) -> np.ndarray:
  """The central (h, w) window; with an odd margin the extra pixel is below/right."""
  image = _hwc('center_crop', image)
  h, w = _hw('center_crop', size)
  height, width = image.shape[:2]
  if h > height or w > width:
    raise ValueError(f'center_crop: crop ({h}, {w}) is larger than the image '
                     f'({height}, {width}).')
  top, left = (height - h) // 2, (width - w) // 2
  return image[top:top + h, left:left + w]


def random_crop(image: np.ndarray, rng: np.random.Generator, size: Size) -> np.ndarray:
  """A uniformly placed (h, w) window (AlexNet: 227x227 out of 256x256)."""
  image = _hwc('random_crop', image)
  top, left, h, w = _draw_crop(image.shape, rng, size)
  return image[top:top + h, left:left + w]


def _draw_crop(shape, rng: np.random.Generator, size: Size) -> tuple[int, int, int, int]:
  """random_crop's window (top, left, h, w) of an image of `shape`: two draws."""
  h, w = _hw('random_crop', size)
  height, width = shape[:2]
  if h > height or w > width:
    raise ValueError(f'random_crop: crop ({h}, {w}) is larger than the image '
                     f'({height}, {width}); resize first.')
  top = int(rng.integers(0, height - h + 1))
  left = int(rng.integers(0, width - w + 1))
  return top, left, h, w


_PAD_MODES = ('constant', 'reflect')


def pad(image: np.ndarray, amount: int) -> np.ndarray:
  """Zero-pads every side by `amount` pixels (MNIST's 28x28 -> LeNet-5's 32x32 with 2)."""
  image = _hwc('pad', image)
  if not _is_int(amount) or amount < 0:
    raise ValueError(f'pad: amount must be an int >= 0, got {amount!r}.')
  return np.pad(image, ((amount, amount), (amount, amount), (0, 0)))


def pad_and_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 4,
                 mode: str = 'constant') -> np.ndarray:
  """Pads each side by `pad` (zeros or mirror without edge repeat), crops back to H x W.

  The shift is uniform in [-pad, pad] on each axis: the CIFAR ResNet recipe.
  """
  image = _hwc('pad_and_crop', image)
  dy, dx = _draw_shift(image.shape, rng, pad, mode)
  return _shift(image, dy, dx, pad, mode)


def _draw_shift(shape, rng: np.random.Generator, pad: int, mode: str) -> tuple[int, int]:
  """pad_and_crop's shift (dy, dx), each uniform in [-pad, pad]: the same two draws as
  random_crop of the original size on the padded image (top = dy + pad)."""
  _check_shift(shape, pad, mode)
  dy = int(rng.integers(0, 2 * pad + 1)) - pad
  dx = int(rng.integers(0, 2 * pad + 1)) - pad
  return dy, dx


def _check_shift(shape, pad: int, mode: str) -> None:
  """The checks of _draw_shift, which raise before anything is drawn; a batch of
  images of one shape (Transform.call_batch) runs them once."""
  if not _is_int(pad) or pad < 0:
    raise ValueError(f'pad_and_crop: pad must be an int >= 0, got {pad!r}.')
  if mode not in _PAD_MODES:
    raise ValueError(f'pad_and_crop: mode must be one of {_PAD_MODES}, got {mode!r}.')
  height, width = shape[:2]
  if mode == 'reflect' and pad >= min(height, width):
    raise ValueError(f'pad_and_crop: reflect padding {pad} needs an image larger than '
                     f'{pad} pixels, got ({height}, {width}).')


def _shift(image: np.ndarray, dy: int, dx: int, pad: int, mode: str) -> np.ndarray:
  """The H x W window at offset (pad + dy, pad + dx) of the image padded by `pad`."""
  height, width = image.shape[:2]
  if mode == 'reflect':
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    return padded[pad + dy:pad + dy + height, pad + dx:pad + dx + width]
  # Zero padding without building the padded image: copy the part of the image the
  # window overlaps.
  out = np.zeros_like(image)
  out[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = (
      image[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)])
  return out


def horizontal_flip(image: np.ndarray, rng: np.random.Generator,
                    p: float = 0.5) -> np.ndarray:
  """Mirrors left-right with probability p (always draws one uniform)."""
  image = _hwc('horizontal_flip', image)
  return image[:, ::-1] if _draw_flip(rng, p) else image


def _draw_flip(rng: np.random.Generator, p: float) -> bool:
  p = _probability('horizontal_flip', p)
  return rng.random() < p


@functools.lru_cache(maxsize=64)
def _resize_taps(n_in: int, n_out: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(index, weight), each (K, n_out * channels): K taps of a 1-D triangle-kernel resize.

  Output i is centred on input coordinate (i + 0.5) n_in / n_out - 0.5 (half-pixel
  centres). The triangle is widened by n_in / n_out when shrinking (antialiasing),
  and each row of weights is renormalised to sum to 1, which is also how the edges
  are handled; this is jax.image.resize's 'bilinear' (scale_and_translate).
  With channels > 1 the taps index a (W * C)-long row of interleaved channels.
  """
  inv_scale = n_in / n_out
  radius = max(inv_scale, 1.0)
  centre = (np.arange(n_out) + 0.5) * inv_scale - 0.5
  first = np.floor(centre - radius).astype(np.int64) + 1
  taps = int(math.ceil(2 * radius)) + 1
  index = first[:, None] + np.arange(taps)
  weight = np.maximum(0.0, 1.0 - np.abs(centre[:, None] - index) / radius)
  weight[(index < 0) | (index >= n_in)] = 0.0
  weight /= weight.sum(axis=1, keepdims=True)
  index = np.clip(index, 0, n_in - 1)
  if channels > 1:
    index = (index[:, None, :] * channels + np.arange(channels)[:, None]).reshape(
        n_out * channels, taps)
    weight = np.repeat(weight, channels, axis=0)
  return np.ascontiguousarray(index.T), np.ascontiguousarray(weight.T, np.float32)


def _resize_axis(image: np.ndarray, n_out: int, axis: int) -> np.ndarray:
  """Resizes axis 0 or 1 of an (H, W, C) image, working on (H, W * C) rows.

  Weights then broadcast along contiguous memory; NumPy is several times slower when
  a broadcast's innermost axis is the 3 colour channels.
  """
  height, width, channels = image.shape
  if image.shape[axis] == n_out:
    return image
  rows = image.reshape(height, width * channels)
  if axis == 0:
    index, weight = _resize_taps(height, n_out)
    weight = weight[:, :, None]
    shape = (n_out, width, channels)
  else:
    index, weight = _resize_taps(width, n_out, channels)
    weight = weight[:, None, :]
    shape = (height, n_out, channels)
  # Indices are in range; mode='clip' also keeps np.take from buffering `out`.
  out = np.take(rows, index[0], axis=axis, mode='clip')
  out *= weight[0]
  term = np.empty_like(out)
  for k in range(1, index.shape[0]):  # a few taps, each one vectorised gather
    np.take(rows, index[k], axis=axis, out=term, mode='clip')
    term *= weight[k]
    out += term
  return out.reshape(shape)


def resize(image: np.ndarray, size: Size) -> np.ndarray:
  """Bilinear resize; an int is the shorter side (AlexNet's 256), (h, w) is exact.

  With an int, the longer side keeps the aspect ratio (rounded). Shrinking is
  antialiased; the result equals jax.image.resize(image, ..., 'bilinear').
  """
  image = _hwc('resize', image)
  height, width = image.shape[:2]
  h, w = _resize_shape(image.shape, size)
  image = np.asarray(image, np.float32)
  # Shrink first along the axis that shrinks most, so the second pass has less to do.
  if h / height <= w / width:
    return _resize_axis(_resize_axis(image, h, 0), w, 1)
  return _resize_axis(_resize_axis(image, w, 1), h, 0)


def _resize_shape(shape, size: Size) -> tuple[int, int]:
  """resize's output (h, w) for an image of `shape`."""
  height, width = shape[:2]
  if _is_int(size):
    if size <= 0:
      raise ValueError(f'resize: size must be positive, got {size}.')
    short = min(height, width)
    h = size if height == short else max(1, round(height * size / short))
    w = size if width == short else max(1, round(width * size / short))
    return h, w
  return _hw('resize', size)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Nearest-neighbour source of each output index, half-pixel centres: input
  floor((i + 0.5) n_in / n_out), jax.image.resize(method='nearest')'s rule (which
  evaluates it in float32 and so can pick the neighbour at a few near-exact ties)."""
  index = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
  return np.minimum(index, n_in - 1)


def resize_nearest(mask: np.ndarray, size: Size) -> np.ndarray:
  """Nearest-neighbour resize of an (H, W) or (H, W, C) array, any dtype (masks: every
  output value is an input value). size as in ``resize``, with the same output shape."""
  mask = np.asarray(mask)
  if mask.ndim not in (2, 3):
    raise ValueError(f'resize_nearest: expected (H, W) or (H, W, C), got {mask.shape}.')
  h, w = _resize_shape(mask.shape, size)
  rows = _nearest_index(mask.shape[0], h)
  cols = _nearest_index(mask.shape[1], w)
  return mask[rows[:, None], cols[None, :]]


def _affine_coords(height: int, width: int, matrix: np.ndarray):
  """Input coordinates (ys, xs), float32 (H, W), that output pixel (y, x) reads under
  the map centre + matrix @ ((y, x) - centre), shifted by +1 into the coordinates of
  the image inside a one-pixel frame."""
  ry = np.arange(height) - (height - 1) / 2
  rx = np.arange(width) - (width - 1) / 2
  # The map is affine, so each coordinate is an outer sum of a row and a column term.
  ys = np.add.outer((matrix[0, 0] * ry + (height + 1) / 2).astype(np.float32),
                    (matrix[0, 1] * rx).astype(np.float32))
  xs = np.add.outer((matrix[1, 0] * ry + (width + 1) / 2).astype(np.float32),
                    (matrix[1, 1] * rx).astype(np.float32))
  return ys, xs


def _affine_nearest(mask: np.ndarray, matrix: np.ndarray, fill=0) -> np.ndarray:
  """The nearest-neighbour version of ``_affine_about_centre`` for (H, W, C) arrays of
  any dtype: out[y, x] = the input pixel nearest to the mapped point (the bilinear
  neighbour with weight > 1/2), `fill` where that is outside the image."""
  height, width = mask.shape[:2]
  ys, xs = _affine_coords(height, width, matrix)
  # Framed coordinates: the image's pixels are at 1..H (1..W); floor(c + 1/2) rounds.
  iy = np.floor(ys + np.float32(0.5)).astype(np.int64) - 1
  ix = np.floor(xs + np.float32(0.5)).astype(np.int64) - 1
  inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
  out = mask[np.clip(iy, 0, height - 1), np.clip(ix, 0, width - 1)]
  out[~inside] = fill
  return out


def _affine_about_centre(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """out[y, x] = bilinear sample of image at centre + matrix @ ((y, x) - centre).

  Points outside the image read 0, blended bilinearly at the border. One vectorised
  pass, no per-pixel Python: the image gets a one-pixel zero frame, coordinates are
  clamped into the frame, and the four neighbours are gathered by flat index from a
  channel-planar copy (so every arithmetic pass runs over contiguous memory).
  """
  height, width, channels = image.shape
  framed_width = width + 2
  # Framed coordinates are >= 0 after clipping, so casting to int is floor.
  ys, xs = _affine_coords(height, width, matrix)
  np.clip(ys, 0, height + 1, out=ys)
  np.clip(xs, 0, width + 1, out=xs)
  y0 = ys.astype(np.int32)
  x0 = xs.astype(np.int32)
  fy = np.subtract(ys, y0, out=ys).ravel()
  fx = np.subtract(xs, x0, out=xs).ravel()
  index = (y0 * framed_width + x0).ravel()
  # Steps to the right / lower neighbour, 0 on the far side of the frame (all zeros).
  dx = (x0 <= width).ravel().astype(np.int32)
  dy = (y0 <= height).ravel().astype(np.int32) * framed_width
  planar = np.zeros((channels, height + 2, framed_width), np.float32)
  planar[:, 1:-1, 1:-1] = np.moveaxis(image, -1, 0)
  flat = planar.reshape(channels, -1)
  # Indices are in range; mode='clip' also keeps np.take from buffering `out`.
  top = np.take(flat, index, axis=1, mode='clip')
  other = np.take(flat, index + dx, axis=1, mode='clip')
  other -= top
  other *= fx
  top += other  # top row, interpolated in x
  index += dy
  bottom = np.take(flat, index, axis=1, mode='clip')
  index += dx
  np.take(flat, index, axis=1, out=other, mode='clip')
  other -= bottom
  other *= fx
  bottom += other  # bottom row, interpolated in x
  bottom -= top
  bottom *= fy
  top += bottom
  return np.ascontiguousarray(top.reshape(channels, height, width).transpose(1, 2, 0))


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates about the centre, counter-clockwise as displayed (row 0 on top) for
  degrees > 0, so rotate(x, 90) = np.rot90(x) on a square image. Bilinear, zero fill."""
  image = _hwc('rotate', image)
  if degrees == 0:
    return image
  return _affine_about_centre(image, _rotation_matrix(degrees))


def _rotation_matrix(degrees: float) -> np.ndarray:
  theta = math.radians(degrees)
  c, s = math.cos(theta), math.sin(theta)
  # Output offset (dy, dx) reads the input at the offset rotated back by -theta.
  return np.array([[c, s], [-s, c]])


def zoom(image: np.ndarray, scale: float) -> np.ndarray:
  """Scales about the centre keeping H x W: scale > 1 magnifies (crops the border
  off), scale < 1 shrinks (zero border). Bilinear."""
  image = _hwc('zoom', image)
  if not _is_number(scale) or scale <= 0:
    raise ValueError(f'zoom: scale must be > 0, got {scale!r}.')
  if scale == 1:
    return image
  return _affine_about_centre(image, np.eye(2) / scale)


def random_rotation(image: np.ndarray, rng: np.random.Generator,
                    max_degrees: float | tuple[float, float]) -> np.ndarray:
  """Rotation by an angle uniform in [-max_degrees, max_degrees] (or [lo, hi])."""
  return rotate(image, _draw_degrees(rng, max_degrees))


def _draw_degrees(rng: np.random.Generator, max_degrees) -> float:
  lo, hi = _range('random_rotation', 'max_degrees', max_degrees, symmetric=True)
  return float(rng.uniform(lo, hi))


def random_zoom(image: np.ndarray, rng: np.random.Generator,
                scale: float | tuple[float, float] = (0.9, 1.1)) -> np.ndarray:
  """Zoom by a factor uniform in scale=(lo, hi) (a number: that fixed factor)."""
  return zoom(image, _draw_scale(rng, scale))


def _draw_scale(rng: np.random.Generator, scale) -> float:
  lo, hi = _range('random_zoom', 'scale', scale, symmetric=False)
  if lo <= 0:
    raise ValueError(f'random_zoom: scale must be > 0, got {scale!r}.')
  return float(rng.uniform(lo, hi))


# ------------------------------------------------------------------------ colour ops


def _per_channel(image: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """image * scale + shift with float32 scale and shift of shape (C,) or (1,).

  Runs on (H, W * C) rows with the vectors repeated W times: NumPy is several times
  slower when a broadcast's innermost axis is the 3 colour channels.
  """
  height, width, channels = image.shape
  image = np.asarray(image, np.float32)
  if channels == 1 or (scale.size == 1 and shift.size == 1):
    out = image * scale
    out += shift
    return out
  rows = image.reshape(height, width * channels)
  out = rows * (scale if scale.size == 1 else scale[None].repeat(width, 0).ravel())
  out += shift if shift.size == 1 else shift[None].repeat(width, 0).ravel()
  return out.reshape(image.shape)


def pca_color_noise(image: np.ndarray, rng: np.random.Generator, std: float = 0.1,
                    eigvals: np.ndarray = IMAGENET_EIGVALS,
                    eigvecs: np.ndarray = IMAGENET_EIGVECS) -> np.ndarray:
  """AlexNet's RGB intensity noise: every pixel gets the same offset

      [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T,   a_i ~ N(0, std^2), drawn once per image,

  where p_i are the columns of `eigvecs` and l_i the `eigvals` of the RGB covariance
  (``pca_from_images``). No clipping: the offset shifts the colour distribution, as in
  the paper, and a later ``normalize`` does not care about the [0, 1] range.
  """
  image = _hwc('pca_color_noise', image)
  eigvals = np.asarray(eigvals, np.float32)
  eigvecs = np.asarray(eigvecs, np.float32)
  channels = image.shape[-1]
  if eigvecs.shape != (channels, eigvals.shape[0]):
    raise ValueError(f'pca_color_noise: the PCA (eigvecs {eigvecs.shape}, eigvals '
                     f'{eigvals.shape}) is for {eigvecs.shape[0]} channels (RGB for the '
                     f'ImageNet default), but the image has {channels} channel(s).')
  _non_negative('pca_color_noise', 'std', std)
  alpha = rng.normal(0.0, std, size=eigvals.shape[0]).astype(np.float32)
  return _per_channel(image, _ONE, eigvecs @ (alpha * eigvals))


def _factor_range(op: str, name: str, amount) -> tuple[float, float]:
  amount = _non_negative(op, name, amount)
  return max(0.0, 1.0 - amount), 1.0 + amount


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0) -> np.ndarray:
  """Brightness, then contrast, then saturation, each by a factor f uniform in
  [max(0, 1 - amount), 1 + amount]; an amount of 0 leaves that property alone.

    brightness  f * I
    contrast    f * I + (1 - f) * mean(grey(I))      (grey: BT.601 luma for RGB,
    saturation  f * I + (1 - f) * grey(I) per pixel   the channel mean otherwise)

  Saturation needs RGB. The image is clipped to [0, 1] after each step, so use it
  before ``normalize``. Always draws three uniforms.
  """
  image = _hwc('color_jitter', image)
  ranges = [_factor_range('color_jitter', name, amount) for name, amount in
            (('brightness', brightness), ('contrast', contrast),
             ('saturation', saturation))]
  channels = image.shape[-1]
  if saturation and channels != 3:
    raise ValueError(f'color_jitter: saturation needs an RGB image (3 channels), got '
                     f'{channels} channel(s).')
  f_brightness, f_contrast, f_saturation = (
      np.float32(f) for f in rng.uniform([r[0] for r in ranges], [r[1] for r in ranges]))
  image = np.asarray(image, np.float32)
  if brightness:
    image = np.clip(image * f_brightness, 0.0, 1.0, out=np.empty_like(image))
  if contrast:
    grey_mean = (image @ _LUMA).mean() if channels == 3 else image.mean()
    image = image * f_contrast
    image += (1 - f_contrast) * grey_mean
    np.clip(image, 0.0, 1.0, out=image)
  if saturation:
    # Per pixel a linear map of the RGB vector: f I + (1 - f) (luma . I) (1, 1, 1).
    mix = f_saturation * np.eye(3, dtype=np.float32) + (1 - f_saturation) * np.outer(
        _LUMA, np.ones(3, np.float32))
    image = image @ mix
    np.clip(image, 0.0, 1.0, out=image)
  return image


def to_rgb(image: np.ndarray) -> np.ndarray:
  """Greyscale -> 3 identical channels (the notes' AlexNet input rule); RGB unchanged."""
  image = _hwc('to_rgb', image)
  if image.shape[-1] == 3:
    return image
  if image.shape[-1] != 1:
    raise ValueError(f'to_rgb: expected 1 or 3 channels, got {image.shape[-1]}.')
  return np.repeat(image, 3, axis=-1)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """(image - mean) / std per channel; mean and std are scalars or one value per channel."""
  image = _hwc('normalize', image)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  channels = image.shape[-1]
  for name, value in (('mean', mean), ('std', std)):
    if value.ndim > 1 or value.size not in (1, channels):
      raise ValueError(f'normalize: {name} has {value.size} values but the image has '
                       f'{channels} channel(s).')
  if np.any(std <= 0):
    raise ValueError(f'normalize: std must be > 0, got {std}.')
  return _per_channel(image, (1 / std).reshape(-1), (-mean / std).reshape(-1))


# ------------------------------------------------------------------- dataset statistics


def _moments(images, chunk: int = 256) -> tuple[int, np.ndarray, np.ndarray]:
  """(n, mean, covariance) of the pixels, in float64, streamed over `images`.

  images: an array (..., C) or an iterable of (H, W, C) arrays of any sizes. Sums are
  taken about the first chunk's mean, which avoids E[x^2] - E[x]^2 cancellation.
  """
  if isinstance(images, np.ndarray):
    if images.ndim < 2:
      raise ValueError(f'expected images of shape (..., C), got {images.shape}.')
    flat = images.reshape(-1, images.shape[-1])
    step = chunk * 1024
    pieces = (flat[i:i + step] for i in range(0, flat.shape[0], step))
  else:
    pieces = (np.asarray(image).reshape(-1, np.shape(image)[-1]) for image in images)
  n, shift, total, outer = 0, None, None, None
  for piece in pieces:
    piece = piece.astype(np.float64)
    if shift is None:
      shift = piece.mean(axis=0)
      total = np.zeros_like(shift)
      outer = np.zeros((shift.size, shift.size))
    if piece.shape[1] != shift.size:
      raise ValueError(f'images have different channel counts: {shift.size} and '
                       f'{piece.shape[1]}.')
    piece = piece - shift
    n += piece.shape[0]
    total += np.ones(piece.shape[0]) @ piece  # BLAS; a sum over axis 0 of (N, 3) is slow
    outer += piece.T @ piece
  if not n:
    raise ValueError('no pixels: images is empty.')
  centred_mean = total / n
  return n, shift + centred_mean, outer / n - np.outer(centred_mean, centred_mean)


def channel_stats(images) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and (population) std over all pixels, float32 arrays of shape (C,).

  images: an (N, H, W, C) array or an iterable of HWC images (sizes may differ).
  ``normalize(x, *channel_stats(x))`` has zero mean and unit std per channel.
  """
  _, mean, cov = _moments(images)
  return mean.astype(np.float32), np.sqrt(np.maximum(np.diag(cov), 0)).astype(np.float32)


def pca_from_images(images) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of the C x C pixel covariance (AlexNet's RGB PCA).

  Returns (eigvals (C,), eigvecs (C, C)) with eigvals descending and eigenvector i in
  column i, so cov = eigvecs @ diag(eigvals) @ eigvecs.T; each column's sign makes its
  largest-magnitude entry positive. For [0, 1] images these are on the scale of
  IMAGENET_EIGVALS / IMAGENET_EIGVECS and feed ``pca_color_noise`` directly.
  """
  _, _, cov = _moments(images)
  eigvals, eigvecs = np.linalg.eigh(cov)
  order = np.argsort(eigvals)[::-1]
  eigvals, eigvecs = np.maximum(eigvals[order], 0), eigvecs[:, order]
  signs = np.sign(eigvecs[np.argmax(np.abs(eigvecs), axis=0), np.arange(eigvecs.shape[1])])
  return eigvals.astype(np.float32), (eigvecs * signs).astype(np.float32)


# ----------------------------------------------------------------------- spec strings

ImageFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# What a parsed op is: (image, mask or None, rng) -> (image, mask). The mask is the
# segmentation label as (H, W, 1) ints; geometric ops move it with the image.
JointFn = Callable[[np.ndarray, np.ndarray | None, np.random.Generator | None],
                   tuple[np.ndarray, np.ndarray | None]]
# An op's batch form, for images without masks: (images (B, H, W, C), one rng per
# image or None) -> images (B, H', W', C'). It draws from rngs[i] exactly what the
# op draws for image i alone and computes the same values, so Transform.call_batch
# is bit-identical to calling the Transform on each example (see there).
BatchFn = Callable[[np.ndarray, Sequence[np.random.Generator] | None], np.ndarray]


def _with_batch(fn: JointFn, batch: BatchFn) -> JointFn:
  """fn, carrying its batch form as ``fn.batch`` (ops without one run per image)."""
  fn.batch = batch
  return fn


def _windows(images: np.ndarray, tops, lefts, h: int, w: int) -> np.ndarray:
  """(B, h, w, C): the (h, w) window of image i at (tops[i], lefts[i]), for all i in
  one fancy index (copies of the same pixels that slicing each image gives)."""
  rows = np.asarray(tops, np.intp)[:, None, None] + np.arange(h)[:, None]
  cols = np.asarray(lefts, np.intp)[:, None, None] + np.arange(w)
  return images[np.arange(len(images))[:, None, None], rows, cols]


def _image_only(fn: ImageFn) -> JointFn:
  """A photometric op: changes the image, passes the mask through."""
  return lambda image, mask, rng: (fn(image, rng), mask)


def _sized(op: str, size) -> Size:
  if len(size) not in (1, 2):
    raise ValueError(f'{op}: give size, or h and w.')
  value = size[0] if len(size) == 1 else tuple(size)
  _hw(op, value)
  return value


def _build_resize(*size):
  size = _sized('resize', size)

  def fn(image, mask, rng):
    image = resize(image, size)
    return image, None if mask is None else resize_nearest(mask, image.shape[:2])
  return fn


def _build_center_crop(*size):
  size = _sized('center_crop', size)

  def batch(images, rngs):
    h, w = center_crop(images[0], size).shape[:2]   # checks the size, as per image
    top, left = (images.shape[1] - h) // 2, (images.shape[2] - w) // 2
    return images[:, top:top + h, left:left + w]
  return _with_batch(
      lambda image, mask, rng: (center_crop(image, size),
                                None if mask is None else center_crop(mask, size)),
      batch)


def _build_random_crop(*size):
  size = _sized('random_crop', size)

  def fn(image, mask, rng):
    image = _hwc('random_crop', image)
    top, left, h, w = _draw_crop(image.shape, rng, size)
    window = (slice(top, top + h), slice(left, left + w))
    return image[window], None if mask is None else mask[window]

  def batch(images, rngs):
    windows = np.array([_draw_crop(images.shape[1:], rng, size) for rng in rngs])
    h, w = _hw('random_crop', size)
    return _windows(images, windows[:, 0], windows[:, 1], h, w)
  return _with_batch(fn, batch)


def _build_pad_crop(pad=4, mode='constant'):
  if not _is_int(pad) or pad < 0:
    raise ValueError(f'pad_crop: pad must be an int >= 0, got {pad!r}.')
  if mode not in _PAD_MODES:
    raise ValueError(f'pad_crop: mode must be one of {_PAD_MODES}, got {mode!r}.')

  def fn(image, mask, rng):
    image = _hwc('pad_and_crop', image)
    dy, dx = _draw_shift(image.shape, rng, pad, mode)
    return (_shift(image, dy, dx, pad, mode),
            None if mask is None else _shift(mask, dy, dx, pad, mode))

  def batch(images, rngs):
    # The window at (pad + dy, pad + dx) of each padded image, as _shift cuts it;
    # zero padding gives the zeros _shift fills in, reflect the same reflection.
    _check_shift(images.shape[1:], pad, mode)
    span = 2 * pad + 1
    tops = [int(rng.integers(0, span)) for rng in rngs]   # dy + pad, dx + pad: the
    lefts = [int(rng.integers(0, span)) for rng in rngs]  # draws, in _draw_shift's order
    if pad == 0:
      return images
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    return _windows(padded, tops, lefts, *images.shape[1:3])
  return _with_batch(fn, batch)


def _build_pad(amount):
  if not _is_int(amount) or amount < 0:
    raise ValueError(f'pad: amount must be an int >= 0, got {amount!r}.')
  return lambda image, mask, rng: (pad(image, amount),
                                   None if mask is None else pad(mask, amount))


def _build_flip(p=0.5):
  p = _probability('flip', p)

  def fn(image, mask, rng):
    image = _hwc('horizontal_flip', image)
    if not _draw_flip(rng, p):
      return image, mask
    return image[:, ::-1], None if mask is None else mask[:, ::-1]

  def batch(images, rngs):
    flipped = np.array([rng.random() < p for rng in rngs], bool)
    return np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
  return _with_batch(fn, batch)


def _build_pca_noise(std=0.1):
  std = _non_negative('pca_noise', 'std', std)
  return _image_only(lambda image, rng: pca_color_noise(image, rng, std))


def _build_color_jitter(brightness=0.0, contrast=0.0, saturation=0.0):
  for name, amount in (('brightness', brightness), ('contrast', contrast),
                       ('saturation', saturation)):
    _non_negative('color_jitter', name, amount)
  return _image_only(
      lambda image, rng: color_jitter(image, rng, brightness, contrast, saturation))


def _build_rotate(*max_degrees):
  if len(max_degrees) not in (1, 2):
    raise ValueError('rotate: give max_degrees, or lo and hi.')
  value = max_degrees[0] if len(max_degrees) == 1 else tuple(max_degrees)
  value = _range('rotate', 'max_degrees', value, symmetric=True)

  def fn(image, mask, rng):
    degrees = _draw_degrees(rng, value)
    image = rotate(image, degrees)
    if mask is None or degrees == 0:
      return image, mask
    return image, _affine_nearest(mask, _rotation_matrix(degrees))
  return fn


def _build_zoom(*scale):
  if len(scale) not in (1, 2):
    raise ValueError('zoom: give lo and hi (or one fixed scale).')
  value = scale[0] if len(scale) == 1 else tuple(scale)
  lo, hi = _range('zoom', 'scale', value, symmetric=False)
  if lo <= 0:
    raise ValueError(f'zoom: scale must be > 0, got {value!r}.')

  def fn(image, mask, rng):
    factor = _draw_scale(rng, (lo, hi))
    image = zoom(image, factor)
    if mask is None or factor == 1:
      return image, mask
    return image, _affine_nearest(mask, np.eye(2) / factor)
  return fn


def _build_normalize(*args):
  if len(args) == 1 and isinstance(args[0], str):
    if args[0] not in STATS:
      raise ValueError(f'normalize: unknown statistics {args[0]!r}; known: '
                       f'{", ".join(STATS)}, or give mean and std.')
    mean, std = STATS[args[0]]
  elif len(args) == 2:
    mean, std = args
    try:
      mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    except (TypeError, ValueError):
      raise ValueError(f'normalize: mean and std must be numbers or tuples of numbers, '
                       f'got {args!r}.') from None
    if mean.ndim > 1 or std.ndim > 1 or np.any(std <= 0):
      raise ValueError(f'normalize: need mean and std (> 0) as numbers or per-channel '
                       f'tuples, got {args!r}.')
  else:
    raise ValueError(f'normalize: give a statistics name ({", ".join(STATS)}) or mean '
                     f'and std, got {args!r}.')
  def batch(images, rngs):
    normalize(images[0, :1, :1], mean, std)   # the per-image checks (channels, std)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    # _per_channel's arithmetic: image * (1 / std) then += -mean / std, in float32.
    out = images.astype(np.float32, copy=False) * (1 / std32).reshape(-1)
    out += (-mean32 / std32).reshape(-1)
    return out
  return _with_batch(_image_only(lambda image, rng: normalize(image, mean, std)), batch)


def _build_to_rgb():
  return _image_only(lambda image, rng: to_rgb(image))


# name -> (builder, random, usage)
_OPS: dict[str, tuple[Callable[..., JointFn], bool, str]] = {
    'resize': (_build_resize, False, 'resize(size) or resize(h, w)'),
    'center_crop': (_build_center_crop, False, 'center_crop(size) or center_crop(h, w)'),
    'random_crop': (_build_random_crop, True, 'random_crop(size) or random_crop(h, w)'),
    'pad': (_build_pad, False, 'pad(amount)'),
    'pad_crop': (_build_pad_crop, True, 'pad_crop(pad=4, mode=constant|reflect)'),
    'flip': (_build_flip, True, 'flip(p=0.5)'),
    'pca_noise': (_build_pca_noise, True, 'pca_noise(std=0.1)'),
    'color_jitter': (_build_color_jitter, True,
                     'color_jitter(brightness=0, contrast=0, saturation=0)'),
    'rotate': (_build_rotate, True, 'rotate(max_degrees) or rotate(lo, hi)'),
    'zoom': (_build_zoom, True, 'zoom(lo, hi)'),
    'normalize': (_build_normalize, False,
                  f'normalize({"|".join(STATS)}) or normalize(mean, std)'),
    'to_rgb': (_build_to_rgb, False, 'to_rgb'),
}
OPS = tuple(_OPS)

_OP_RE = re.compile(r'^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$', re.DOTALL)


def _value(node: ast.AST) -> Any:
  """A literal argument; bare names are strings, so normalize(imagenet) works."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, (ast.Tuple, ast.List)):
    return tuple(_value(e) for e in node.elts)
  return ast.literal_eval(node)


def _valid_ops() -> str:
  return '; '.join(usage for _, _, usage in _OPS.values())


def _parse_op(text: str, spec: str) -> tuple[str, JointFn, bool]:
  match = _OP_RE.match(text)
  if not match:
    raise ValueError(f'Cannot parse augmentation op {text!r} in spec {spec!r}; expected '
                     f'name or name(args). Valid ops: {_valid_ops()}.')
  name, argtext = match.group(1), match.group(2)
  if name not in _OPS:
    raise ValueError(f'Unknown augmentation op {name!r} in spec {spec!r}. Valid ops: '
                     f'{_valid_ops()}.')
  build, random, usage = _OPS[name]
  args, kwargs = (), {}
  if argtext and argtext.strip():
    try:
      call = ast.parse(f'_({argtext})', mode='eval').body
      if not isinstance(call, ast.Call) or any(
          isinstance(a, ast.Starred) for a in call.args) or any(
              k.arg is None for k in call.keywords):
        raise SyntaxError('not a plain argument list')
      args = tuple(_value(a) for a in call.args)
      kwargs = {k.arg: _value(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError) as e:
      raise ValueError(f'{name}: cannot read the arguments {argtext!r} in spec {spec!r} '
                       f'({e}). Usage: {usage}.') from None
  try:
    fn = build(*args, **kwargs)
  except TypeError:
    raise ValueError(f'{name}: wrong arguments {text.strip()!r} in spec {spec!r}. '
                     f'Usage: {usage}.') from None
  except ValueError as e:
    raise ValueError(f'{e} Spec: {spec!r}. Usage: {usage}.') from None
  return text.strip(), fn, random


TASKS = ('auto', 'classification', 'segmentation')


class Transform:
  """A parsed spec: ``transform(example, rng) -> example`` with the image augmented.

  Other keys of the example pass through. rng may be omitted when no op is random,
  so a deterministic spec also fits ``make_loader(transform=...)``. Pickles as its
  spec and task (for multiprocess loaders).

  task: 'classification' touches only the image. 'segmentation' needs
  ``example['label']`` to be a mask of integer class ids, (H, W) (or (H, W, 1))
  like the image: geometric ops move it with the same random draws, resampled by
  nearest neighbour, so it stays a mask of valid ids; photometric ops leave it alone
  (see the module docstring). 'auto' (the default) is 'segmentation' for examples
  whose label has ndim >= 2 and 'classification' for the others (scalar labels).
  """

  def __init__(self, spec: str | Sequence[str | ImageFn] | None, task: str = 'auto'):
    if task not in TASKS:
      raise ValueError(f'task must be one of {TASKS}, got {task!r}.')
    self.task = task
    if spec is not None and not isinstance(spec, str):
      spec = list(spec)
    self._spec = spec
    ops = []
    if spec is None:
      pass
    elif isinstance(spec, str):
      ops = [self._parse(text, spec) for text in spec.split('|')] if spec.strip() else []
    else:
      spec_text = '|'.join(s if isinstance(s, str) else getattr(s, '__name__', repr(s))
                           for s in spec)
      for item in spec:
        if callable(item):
          ops.append((getattr(item, '__name__', repr(item)), _image_only(item), True))
        elif isinstance(item, str):
          ops.extend(self._parse(text, spec_text) for text in item.split('|')
                     if text.strip())
        else:
          raise ValueError(f'A spec list holds op strings or callables, got {item!r}.')
    self.ops: list[tuple[str, JointFn, bool]] = ops
    self._random = any(random for _, _, random in ops)
    self._callables = spec is not None and not isinstance(spec, str) and any(
        callable(item) for item in spec)

  @staticmethod
  def _parse(text, spec):
    if not text.strip():
      raise ValueError(f'Empty op in spec {spec!r} (two "|" in a row or a trailing "|").')
    return _parse_op(text, spec)

  @property
  def spec(self) -> str:
    return '|'.join(text for text, _, _ in self.ops)

  @property
  def is_random(self) -> bool:
    return self._random

  def _mask(self, example: dict, image: np.ndarray) -> np.ndarray | None:
    """The example's mask as (H, W, 1), or None when the image is augmented alone."""
    if self.task == 'classification':
      return None
    label = example.get('label')
    mask = None if label is None else np.asarray(label)
    if mask is None or mask.ndim < 2:
      if self.task == 'segmentation':
        shape = None if mask is None else mask.shape
        raise ValueError(f"Augmentation with task='segmentation' needs example['label'] "
                         f'to be an (H, W) mask, got {"no label" if mask is None else shape}.')
      return None
    if mask.ndim == 3 and mask.shape[-1] == 1:
      mask = mask[..., 0]
    if mask.ndim != 2 or mask.shape != image.shape[:2]:
      raise ValueError(f'Augmentation: the mask (label of shape {np.shape(label)}) must be '
                       f'(H, W) like the image {image.shape}.')
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
      raise ValueError(f'Augmentation: the mask must hold integer class ids, got dtype '
                       f'{mask.dtype}.')
    return mask[..., None]

  def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
    if rng is None and self._random:
      raise ValueError(f'Augmentation spec {self.spec!r} has random ops and needs an rng '
                       '(use make_loader(random_transform=...)).')
    image = np.asarray(example['image'])
    if not np.issubdtype(image.dtype, np.floating):
      raise ValueError(f'Augmentation expects float images in [0, 1] '
                       f'(sources.to_example), got dtype {image.dtype}.')
    image = image.astype(np.float32, copy=False)
    mask = self._mask(example, image)
    for text, fn, _ in self.ops:
      try:
        image, mask = fn(image, mask, rng)
      except ValueError as e:
        raise ValueError(f'Augmentation op {text!r} of spec {self.spec!r} failed on an '
                         f'image of shape {image.shape}: {e}') from e
      if mask is not None and mask.shape[:2] != image.shape[:2]:
        raise ValueError(f'Augmentation op {text!r} of spec {self.spec!r} changed the '
                         f'image size to {image.shape[:2]} but not the mask '
                         f'{mask.shape[:2]}: callables in a spec may only change colours.')
    out = dict(example)
    out['image'] = np.asarray(image, np.float32)
    if mask is not None:
      out['label'] = mask[..., 0]
    return out

  @property
  def batchable(self) -> bool:
    """Whether call_batch may run: the ops come from spec strings (callables may
    return images of any size) and the task is not 'segmentation'."""
    return self.task != 'segmentation' and not self._callables

  def call_batch(self, batch: dict, rngs: Sequence[np.random.Generator] | None = None
                 ) -> dict:
    """This transform of a batch: ``batch`` holds B examples stacked ('image' (B, H,
    W, C)), ``rngs`` one generator per example; returns the stacked results.

    Bit-identical to ``self(example_i, rngs[i])`` for every i, stacked: each op runs
    on the whole batch in the ops' order and draws from rngs[i] what it draws for
    image i alone, so every generator sees the same sequence of draws. Ops with a
    batch form (crops, pad_crop, flip, normalize) run vectorised, the others image by
    image. Examples with masks (labels of ndim >= 2 under task 'auto') and images
    that are not (H, W, C) go through __call__ one by one. The loader (sources.make_loader) calls this instead of
    __call__ per example: per-example Python work was most of its time.
    """
    if not self.batchable:
      raise ValueError(f'Augmentation spec {self.spec!r} (task {self.task!r}) has no '
                       'batch form; call it per example.')
    if rngs is None and self._random:
      raise ValueError(f'Augmentation spec {self.spec!r} has random ops and needs an rng '
                       '(use make_loader(random_transform=...)).')
    images = np.asarray(batch['image'])
    label = batch.get('label')
    count = len(images)
    if images.ndim != 4 or (self.task == 'auto' and label is not None
                            and np.ndim(label) >= 3):
      rows = [{k: v[i] for k, v in batch.items()} for i in range(count)]
      outs = [self(row, None if rngs is None else rngs[i]) for i, row in enumerate(rows)]
      return {k: np.stack([out[k] for out in outs]) for k in outs[0]} if outs else batch
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f'Augmentation expects float images in [0, 1] '
                       f'(sources.to_example), got dtype {images.dtype}.')
    images = images.astype(np.float32, copy=False)
    if count:
      for text, fn, _ in self.ops:
        shape = images.shape[1:]
        try:
          if hasattr(fn, 'batch'):
            images = fn.batch(images, rngs)
          else:
            images = np.stack([fn(images[i], None, None if rngs is None else rngs[i])[0]
                               for i in range(count)])
        except ValueError as e:
          raise ValueError(f'Augmentation op {text!r} of spec {self.spec!r} failed on an '
                           f'image of shape {shape}: {e}') from e
    out = dict(batch)
    out['image'] = np.asarray(images, np.float32)
    return out

  def __repr__(self) -> str:
    if self.task == 'auto':
      return f'Transform({self.spec!r})'
    return f'Transform({self.spec!r}, task={self.task!r})'

  def __reduce__(self):
    return Transform, (self._spec, self.task)


def make_transform(spec: str | Sequence[str | ImageFn] | None,
                   task: str = 'auto') -> Transform:
  """Parses an augmentation spec (grammar and op table in the module docstring).

  Args:
    spec: ``'op|op(args)|...'``, a list of such strings (and/or ``(image, rng) ->
      image`` callables, which change the image only), or ''/None for the identity.
    task: 'auto' (default: an example whose 'label' has ndim >= 2 is a segmentation
      example, others are classification examples), 'classification' (the image
      only) or 'segmentation' (every example must carry an (H, W) mask in 'label';
      geometric ops transform it with the image, nearest-neighbour).

  Returns:
    A ``Transform``: ``(example, rng) -> example`` applying the ops to
    ``example['image']`` (and its mask) in order, for
    ``make_loader(random_transform=...)``.

  Raises:
    ValueError: unknown op, unreadable or invalid arguments (naming the op, the spec
      and the valid usages), or an unknown task, before any image is seen.
  """
  if isinstance(spec, Transform):
    if task in ('auto', spec.task):
      return spec
    return Transform(spec._spec, task)  # pylint: disable=protected-access
  return Transform(spec, task)


def is_random(spec: str | Sequence[str | ImageFn] | None) -> bool:
  """Whether any op of the spec draws random numbers (by op kind, not by argument)."""
  return make_transform(spec).is_random


__all__ = [
    'CIFAR10_MEAN', 'CIFAR10_STD', 'IMAGENET_EIGVALS', 'IMAGENET_EIGVECS', 'IMAGENET_MEAN',
    'IMAGENET_STD', 'MNIST_MEAN', 'MNIST_STD', 'OPS', 'STATS', 'TASKS', 'Transform',
    'center_crop', 'pad', 'resize_nearest',
    'channel_stats', 'color_jitter', 'horizontal_flip', 'is_random', 'make_transform',
    'normalize', 'pad_and_crop', 'pca_color_noise', 'pca_from_images', 'random_crop',
    'random_rotation', 'random_zoom', 'resize', 'rotate', 'to_rgb', 'zoom',
]
