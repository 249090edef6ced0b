"""Boxes, IoU and the YOLO v1 grid encoding (Redmon et al., 2016).

A box is a float array (..., 4) of corners (x0, y0, x1, y1), x horizontal (the
column axis), y vertical (the row axis), in pixels or in normalised image
coordinates [0, 1]. Ground truth of one image is padded to a fixed count M:
boxes (M, 4), labels (M,) int32 in [0, C), valid (M,) bool.

Intersection over union of boxes a and b:

    inter = max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    IoU   = inter / (area(a) + area(b) - inter),    0 where the union is 0.

YOLO v1 divides the (normalised) image into an S x S grid. The cell (i, j), row
i = floor(S cy) and column j = floor(S cx), that contains a box's centre
(cx, cy) is responsible for it. Its target is

    x = S cx - j,  y = S cy - i            (centre offset within the cell, in [0, 1))
    sqrt(w), sqrt(h)                       (w, h as fractions of the image)

regressed on square roots so that the same absolute error costs more on a small
box than on a large one, as in the paper.

Targets (encode_yolo), per cell, channels (S, S, 5 + C):

    [x, y, sqrt(w), sqrt(h), obj, one-hot class (C)]

obj is 1 in a cell that holds an object, and every other channel of an empty
cell is 0. A cell holds one object: where two centres fall into the same cell,
the larger box (by area; the lower index on a tie) is kept and the other is
dropped, a known limit of YOLO v1 on crowded scenes.

Raw head output (decode_yolo, yolo_v1_loss), per cell, channels (S, S, B*5 + C):

    [tx_1, ty_1, tw_1, th_1, tc_1, ..., tx_B, ty_B, tw_B, th_B, tc_B, class logits (C)]

one group of five per predictor b, then C class logits shared by the cell's B
predictors (YOLO v1 predicts one class distribution per cell). They read as

    x = sigmoid(tx), y = sigmoid(ty)        cell offsets, kept inside the cell
    sqrt(w) = tw, sqrt(h) = th              linear, as in the paper; decoding uses
                                            w = clip(tw, 0, 1)**2 (a negative root
                                            means an empty box)
    conf = sigmoid(tc)                      Pr(object) * IoU(pred, truth)
    p(c | object) = softmax(class logits)

and the score of predictor b for class c is conf_b * p(c | object), the paper's
class-specific confidence.

Every function here is jit-able (grid size, predictor and class counts are
static Python ints), takes any leading batch axes and also works under jax.vmap.
The public functions check their arguments in Python, then call a jax.jit-compiled
core, so an eager call is one compiled program rather than dozens of dispatched
small ops (under an outer jit the nesting is free).
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

_EPS = 1e-12


def _check_boxes(boxes, name='boxes'):
  boxes = jnp.asarray(boxes)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f'{name} must have a last axis of 4 (x0, y0, x1, y1); got shape '
                     f'{boxes.shape}.')
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  return boxes


def _check_static_int(value, name, minimum=1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be a Python int >= {minimum} (it fixes array shapes, so '
                     f'pass it as a static argument under jit); got {value!r}.')
  return value


def xyxy_to_cxcywh(boxes):
  """(x0, y0, x1, y1) -> (cx, cy, w, h), with cx = (x0 + x1) / 2 and w = x1 - x0."""
  boxes = _check_boxes(boxes)
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def cxcywh_to_xyxy(boxes):
  """(cx, cy, w, h) -> (x0, y0, x1, y1) = (cx - w/2, cy - h/2, cx + w/2, cy + h/2)."""
  boxes = _check_boxes(boxes)
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_area(boxes):
  """(x1 - x0) * (y1 - y0), with a negative side counted as 0 (an empty box)."""
  boxes = _check_boxes(boxes)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
  return w * h


@jax.jit
def _iou(a, b):
  """IoU of boxes broadcast against each other (shared by iou and elementwise_iou)."""
  iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  inter = iw * ih
  union = box_area(a) + box_area(b) - inter
  # The double where keeps 0/0 out of the forward pass and NaN out of gradients.
  positive = union > _EPS
  return jnp.where(positive, inter / jnp.where(positive, union, 1), 0)


def iou(a, b):
  """Pairwise intersection over union.

  Args:
    a: boxes (..., N, 4), (x0, y0, x1, y1).
    b: boxes (..., M, 4); leading axes broadcast against a's.
  Returns:
    (..., N, M) IoU in [0, 1]; 0 where both boxes are empty (zero union).
  """
  a = _check_boxes(a, 'a')
  b = _check_boxes(b, 'b')
  if a.ndim < 2 or b.ndim < 2:
    raise ValueError(f'iou is pairwise over (..., N, 4) x (..., M, 4); got shapes {a.shape} '
                     f'and {b.shape} (use elementwise_iou for matched pairs).')
  return _iou(a[..., :, None, :], b[..., None, :, :])


def elementwise_iou(a, b):
  """IoU of matched pairs: a (..., 4) and b (..., 4) broadcast -> (...,)."""
  return _iou(_check_boxes(a, 'a'), _check_boxes(b, 'b'))


def clip_boxes(boxes, height=1.0, width=1.0):
  """Clips x to [0, width] and y to [0, height] (defaults: normalised coordinates)."""
  boxes = _check_boxes(boxes)
  hi = jnp.asarray([width, height, width, height], boxes.dtype)
  return jnp.clip(boxes, 0, hi)


def normalize_boxes(boxes, height, width):
  """Pixel boxes -> normalised [0, 1] coordinates (x / width, y / height)."""
  boxes = _check_boxes(boxes)
  return boxes / jnp.asarray([width, height, width, height], boxes.dtype)


def denormalize_boxes(boxes, height, width):
  """Normalised boxes -> pixels (x * width, y * height)."""
  boxes = _check_boxes(boxes)
  return boxes * jnp.asarray([width, height, width, height], boxes.dtype)


def encode_yolo(boxes, labels, valid, grid_size: int, num_classes: int):
  """Dense YOLO v1 targets from padded ground truth.

  Args:
    boxes: (..., M, 4) normalised (x0, y0, x1, y1) in [0, 1] (divide pixel boxes
      by the image size first: normalize_boxes).
    labels: (..., M) int class ids in [0, num_classes).
    valid: (..., M) bool; False marks padding rows, which are ignored.
    grid_size: S (static).
    num_classes: C (static).
  Returns:
    (..., S, S, 5 + C) float targets, per cell [x, y, sqrt(w), sqrt(h), obj,
    one-hot class]: x, y the centre's offset within cell (row i = floor(S cy),
    column j = floor(S cx), clipped to the grid), w, h the box size as image
    fractions, obj 1 for a cell holding an object. All zeros in an empty cell.
    Two centres in one cell: the larger box is kept (lower index on a tie).
  """
  s = _check_static_int(grid_size, 'grid_size')
  c = _check_static_int(num_classes, 'num_classes')
  boxes = _check_boxes(boxes)
  labels = jnp.asarray(labels)
  valid = jnp.asarray(valid)
  if labels.shape != boxes.shape[:-1] or valid.shape != boxes.shape[:-1]:
    raise ValueError(f'labels {labels.shape} and valid {valid.shape} must both have the shape '
                     f'of boxes without its last axis, {boxes.shape[:-1]}.')
  if boxes.ndim < 2:
    raise ValueError(f'boxes must be (..., M, 4) padded ground truth; got {boxes.shape}.')
  return _encode_yolo(boxes, labels, valid.astype(bool), s, c)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _encode_yolo(boxes, labels, valid, s, c):
  cx, cy, w, h = jnp.moveaxis(xyxy_to_cxcywh(boxes), -1, 0)
  w = jnp.maximum(w, 0)
  h = jnp.maximum(h, 0)
  col = jnp.clip(jnp.floor(cx * s), 0, s - 1)
  row = jnp.clip(jnp.floor(cy * s), 0, s - 1)
  box_target = jnp.stack([cx * s - col, cy * s - row, jnp.sqrt(w), jnp.sqrt(h)], -1)
  per_box = jnp.concatenate([
      box_target,
      jnp.ones(w.shape + (1,), boxes.dtype),
      jax.nn.one_hot(labels, c, dtype=boxes.dtype)], axis=-1)          # (..., M, 5 + C)

  cell = (row * s + col).astype(jnp.int32)
  in_cell = (cell[..., :, None] == jnp.arange(s * s)) & valid[..., :, None]  # (..., M, S*S)
  # The winner of a cell is its largest box; argmax keeps the first of equals.
  claim = jnp.where(in_cell, (w * h)[..., :, None], -1.0)
  winner = jnp.argmax(claim, axis=-2)                                   # (..., S*S)
  occupied = jnp.any(in_cell, axis=-2)
  dense = jnp.take_along_axis(per_box, winner[..., :, None], axis=-2)   # (..., S*S, 5 + C)
  dense = jnp.where(occupied[..., None], dense, 0)
  return dense.reshape(dense.shape[:-2] + (s, s, 5 + c))


def _check_head_output(shape, num_boxes, num_classes, grid_size=None):
  """Checks a head output shape (..., S, S, B*5 + C); returns (B, C)."""
  b = _check_static_int(num_boxes, 'num_boxes')
  c = _check_static_int(num_classes, 'num_classes')
  if len(shape) < 3 or shape[-1] != b * 5 + c or shape[-3] != shape[-2]:
    raise ValueError(f'YOLO head output must be (..., S, S, B*5 + C) = (..., S, S, {b * 5 + c}) '
                     f'for B={b}, C={c}; got shape {tuple(shape)}.')
  if grid_size is not None and shape[-3] != grid_size:
    raise ValueError(f'grid_size={grid_size} but the head output has a {shape[-3]}x{shape[-2]} '
                     f'grid.')
  return b, c


def split_yolo_output(pred, num_boxes: int, num_classes: int) -> Dict[str, jax.Array]:
  """Reads the raw head output (..., S, S, B*5 + C) into its activated parts.

  Returns a dict with
    'xy'          (..., S, S, B, 2) sigmoid(tx, ty), offsets within the cell;
    'sqrt_wh'     (..., S, S, B, 2) tw, th as predicted (linear, unclipped);
    'conf_logit'  (..., S, S, B) tc;     'conf' (..., S, S, B) sigmoid(tc);
    'class_logits' (..., S, S, C).
  """
  pred = jnp.asarray(pred)
  b, _ = _check_head_output(pred.shape, num_boxes, num_classes)
  per_box = pred[..., :b * 5].reshape(pred.shape[:-1] + (b, 5))
  return {
      'xy': jax.nn.sigmoid(per_box[..., 0:2]),
      'sqrt_wh': per_box[..., 2:4],
      'conf_logit': per_box[..., 4],
      'conf': jax.nn.sigmoid(per_box[..., 4]),
      'class_logits': pred[..., b * 5:],
  }


def cell_boxes_to_xyxy(xy, sqrt_wh):
  """Cell-relative (x, y) and (sqrt w, sqrt h) on an S x S grid -> normalised xyxy.

  xy, sqrt_wh: (..., S, S, K, 2) for K boxes per cell. The centre is
  ((j + x) / S, (i + y) / S) for the cell in row i, column j, and w = clip(sqrt_w,
  0, 1)**2. Returns (..., S, S, K, 4).
  """
  s = xy.shape[-4]
  if xy.shape[-3] != s or sqrt_wh.shape != xy.shape or xy.shape[-1] != 2:
    raise ValueError(f'xy and sqrt_wh must both be (..., S, S, K, 2); got {xy.shape} and '
                     f'{sqrt_wh.shape}.')
  offset = jnp.arange(s, dtype=xy.dtype)
  cx = (offset[None, :, None] + xy[..., 0]) / s      # column j runs along axis -2
  cy = (offset[:, None, None] + xy[..., 1]) / s      # row i along axis -3
  wh = jnp.square(jnp.clip(sqrt_wh, 0, 1))
  return cxcywh_to_xyxy(jnp.stack([cx, cy, wh[..., 0], wh[..., 1]], axis=-1))


def decode_yolo(pred, grid_size: int, num_boxes: int, num_classes: int, *,
                clip: bool = True) -> Tuple[jax.Array, jax.Array]:
  """Boxes and class-specific scores from the raw YOLO v1 head output.

  Args:
    pred: (..., S, S, B*5 + C), per cell [tx, ty, tw, th, tc] for each of the B
      predictors, then C class logits (see the module docstring).
    grid_size: S (static); num_boxes: B (static); num_classes: C (static).
    clip: clip the boxes to the image [0, 1].
  Returns:
    boxes (..., S*S*B, 4) normalised xyxy, and scores (..., S*S*B, C) =
    sigmoid(tc) * softmax(class logits), the paper's Pr(class) * IoU. Rows run
    cell by cell in row-major order (row i, column j, predictor b): row index
    (i * S + j) * B + b.
  """
  s = _check_static_int(grid_size, 'grid_size')
  pred = jnp.asarray(pred)
  _check_head_output(pred.shape, num_boxes, num_classes, s)
  return _decode_yolo(jnp.asarray(pred), num_boxes, num_classes, bool(clip))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _decode_yolo(pred, num_boxes, num_classes, clip):
  parts = split_yolo_output(pred, num_boxes, num_classes)
  boxes = cell_boxes_to_xyxy(parts['xy'], parts['sqrt_wh'])
  if clip:
    boxes = clip_boxes(boxes)
  probs = jax.nn.softmax(parts['class_logits'], axis=-1)
  scores = parts['conf'][..., None] * probs[..., None, :]              # (..., S, S, B, C)
  lead = boxes.shape[:-4]
  return (boxes.reshape(lead + (-1, 4)),
          scores.reshape(lead + (-1, num_classes)))


def perfect_yolo_prediction(targets, num_boxes: int, *, logit: float = 20.0,
                            eps: float = 1e-6):
  """A raw head output that decodes to the targets exactly (for tests and oracles).

  Predictor 0 of every occupied cell carries the target box with tc = +logit;
  the other predictors copy the box with tc = -logit, as do all predictors of
  empty cells (whose boxes are zero). Class logits are +-logit around the
  one-hot target, so softmax gives 1 to the true class. tx = logit(x), with x
  clipped to [eps, 1 - eps] so the inverse sigmoid stays finite.

  Args:
    targets: (..., S, S, 5 + C) from encode_yolo.
    num_boxes: B (static).
  Returns:
    (..., S, S, B*5 + C) raw output.
  """
  b = _check_static_int(num_boxes, 'num_boxes')
  targets = jnp.asarray(targets)
  if targets.ndim < 3 or targets.shape[-1] < 6:
    raise ValueError(f'targets must be (..., S, S, 5 + C) from encode_yolo; got '
                     f'{targets.shape}.')
  return _perfect_prediction(targets, b, float(logit), float(eps))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _perfect_prediction(targets, b, logit, eps):
  xy = jnp.clip(targets[..., 0:2], eps, 1 - eps)
  txy = jnp.log(xy) - jnp.log1p(-xy)
  obj = targets[..., 4:5]
  first = jnp.concatenate([txy, targets[..., 2:4], jnp.where(obj > 0.5, logit, -logit)], -1)
  rest = jnp.concatenate([txy, targets[..., 2:4], jnp.full_like(obj, -logit)], -1)
  cls = jnp.where(targets[..., 5:] > 0.5, logit, -logit)
  return jnp.concatenate([first] + [rest] * (b - 1) + [cls], axis=-1)
