"""Greedy non-maximum suppression, jit-able and vmappable.

A detector proposes many overlapping boxes for one object; NMS keeps the best:

    candidates = {k : score_k > score_threshold}
    repeat max_detections times:
      k* = argmax_{k in candidates} score_k          (lowest index among equal scores)
      keep k*; remove k* and every k with IoU(box_k*, box_k) > iou_threshold
                                        [and, per class, class_k = class_k*]

Both thresholds are strict: a box at exactly iou_threshold survives, one at
exactly score_threshold is dropped.

The loop runs a fixed max_detections times (a static int), each step one IoU of
the chosen box against all N candidates, so the cost is O(max_detections * N)
with O(N) memory and no N x N matrix; the output has a fixed size with a
`valid` mask, as jit needs. Padding rows are zeros: read `valid`.

Per-class NMS (batched_class_nms) treats each (box, class) pair with its class
score as one candidate and suppresses only within a class, so boxes of different
classes never suppress each other. Greedy selection across all classes picks in
descending score, so its first max_detections picks are exactly the top
max_detections of the union of the per-class NMS results.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from cnn_jax.detection import boxes as boxes_lib


def _check_max_detections(max_detections):
  if isinstance(max_detections, bool) or not isinstance(max_detections, int) \
      or max_detections < 1:
    raise ValueError(f'max_detections must be a Python int >= 1 (it fixes the output shape; '
                     f'pass it as a static argument under jit); got {max_detections!r}.')


@functools.partial(jax.jit, static_argnums=(5,))
def _greedy(boxes, scores, classes, iou_threshold, score_threshold, max_detections):
  """The shared loop; all-equal classes make it class-agnostic."""
  n = scores.shape[0]
  available = scores > score_threshold         # also drops NaN scores
  neg_inf = jnp.asarray(-jnp.inf, scores.dtype)

  def step(t, carry):
    available, indices, valid = carry
    k = jnp.argmax(jnp.where(available, scores, neg_inf))
    ok = available[k]
    overlap = boxes_lib.elementwise_iou(boxes[k], boxes) > iou_threshold
    suppressed = (overlap & (classes == classes[k])) | (jnp.arange(n) == k)
    available = available & ~(suppressed & ok)
    indices = indices.at[t].set(jnp.where(ok, k, 0).astype(jnp.int32))
    valid = valid.at[t].set(ok)
    return available, indices, valid

  init = (available, jnp.zeros((max_detections,), jnp.int32),
          jnp.zeros((max_detections,), bool))
  if n == 0:
    return init[1], init[2]
  _, indices, valid = jax.lax.fori_loop(0, max_detections, step, init)
  return indices, valid


def nms(boxes, scores, iou_threshold: float = 0.5, score_threshold: float = -jnp.inf,
        max_detections: int = 100) -> Tuple[jax.Array, jax.Array]:
  """Class-agnostic greedy NMS.

  Args:
    boxes: (N, 4) xyxy.
    scores: (N,).
    iou_threshold: a kept box removes the others with IoU > this.
    score_threshold: only boxes scoring > this are candidates (default: all).
    max_detections: output size D (static under jit).
  Returns:
    indices (D,) int32 into boxes, in descending score, and valid (D,) bool;
    rows past the last kept box have valid False and index 0.
  """
  _check_max_detections(max_detections)
  boxes = boxes_lib._check_boxes(boxes)
  scores = jnp.asarray(scores)
  if boxes.ndim != 2 or scores.shape != boxes.shape[:1]:
    raise ValueError(f'nms takes boxes (N, 4) and scores (N,); got {boxes.shape} and '
                     f'{scores.shape} (use jax.vmap for a batch).')
  return _greedy(boxes, scores, jnp.zeros(scores.shape, jnp.int32), iou_threshold,
                 score_threshold, max_detections)


def batched_class_nms(boxes, class_scores, iou_threshold: float = 0.5,
                      score_threshold: float = 0.05, max_detections: int = 100,
                      pre_nms_top_k: Optional[int] = None) -> Dict[str, jax.Array]:
  """Per-class greedy NMS over N boxes with C class scores each.

  Each (box n, class c) with class_scores[n, c] > score_threshold is a candidate;
  candidates suppress each other only within a class. The result is the top
  max_detections of all classes together, in descending score.

  Args:
    boxes: (N, 4) xyxy (e.g. decode_yolo's boxes for one image).
    class_scores: (N, C) (e.g. decode_yolo's conf * class probability).
    iou_threshold: IoU above which a same-class box is suppressed.
    score_threshold: candidates need a score above this.
    max_detections: output size D (static).
    pre_nms_top_k: optionally keep only the k best candidates (of N * C) before
      the loop (static); None keeps all.
  Returns:
    dict with 'boxes' (D, 4), 'scores' (D,), 'classes' (D,) int32, 'indices'
    (D,) int32 (the row of `boxes` each detection came from) and 'valid' (D,)
    bool. Padding rows are zeros.
  """
  _check_max_detections(max_detections)
  boxes = boxes_lib._check_boxes(boxes)
  class_scores = jnp.asarray(class_scores)
  if boxes.ndim != 2 or class_scores.ndim != 2 or class_scores.shape[0] != boxes.shape[0]:
    raise ValueError(f'batched_class_nms takes boxes (N, 4) and class_scores (N, C); got '
                     f'{boxes.shape} and {class_scores.shape} (use jax.vmap for a batch).')
  if pre_nms_top_k is not None and (isinstance(pre_nms_top_k, bool)
                                    or not isinstance(pre_nms_top_k, int) or pre_nms_top_k < 1):
    raise ValueError(f'pre_nms_top_k must be None or a Python int >= 1; got {pre_nms_top_k!r}.')
  return _class_nms(boxes, class_scores, iou_threshold, score_threshold, max_detections,
                    pre_nms_top_k)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _class_nms(boxes, class_scores, iou_threshold, score_threshold, max_detections,
               pre_nms_top_k):
  n, c = class_scores.shape
  flat_scores = class_scores.reshape(-1)                 # candidate k = n * C + c
  box_index = jnp.arange(n * c, dtype=jnp.int32) // c
  class_id = jnp.arange(n * c, dtype=jnp.int32) % c
  if pre_nms_top_k is not None and pre_nms_top_k < n * c:
    flat_scores, top = jax.lax.top_k(flat_scores, pre_nms_top_k)
    box_index, class_id = box_index[top], class_id[top]
  cand_boxes = boxes[box_index]
  keep, valid = _greedy(cand_boxes, flat_scores, class_id, iou_threshold, score_threshold,
                        max_detections)
  return {
      'boxes': jnp.where(valid[:, None], cand_boxes[keep], 0),
      'scores': jnp.where(valid, flat_scores[keep], 0),
      'classes': jnp.where(valid, class_id[keep], 0),
      'indices': jnp.where(valid, box_index[keep], 0),
      'valid': valid,
  }
