"""The detection task in the training loop: the YOLO loss of a batch, and an eval
step that returns each image's detections for mAP.

Batches (`cnn_jax.data.make_loader(task='detection')`) hold 'image', 'boxes'
(B, M, 4) normalised (x0, y0, x1, y1), 'label' (B, M) class ids, 'valid' (B, M)
and 'mask' (B,) (0 for the padding images of a last eval batch). Targets are
encoded on the device from the boxes (`boxes.encode_yolo`), so the pipeline stays
task-agnostic and the grid size is the model's.

Config keys (`config.detection`): lambda_coord, lambda_noobj, conf_target and
class_loss for the loss; nms_iou_threshold, score_threshold and max_detections
for the detections that mAP is computed from.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.detection import boxes as boxes_lib
from cnn_jax.detection import loss as loss_lib
from cnn_jax.detection import metrics as metrics_lib
# (the package exports the function nms, which shadows the module of that name)
from cnn_jax.detection.nms import batched_class_nms

TERMS = ('coord', 'obj', 'noobj', 'class')


def _grid(pred, num_classes: int):
  s = pred.shape[1]
  b, rem = divmod(pred.shape[-1] - num_classes, 5)
  if rem or b < 1 or pred.shape[2] != s:
    raise ValueError(f'a YOLO head output is (N, S, S, 5 B + C) with C={num_classes}; got '
                     f'{pred.shape}.')
  return s, b


def _mask(batch):
  m = batch.get('mask')
  return jnp.ones(batch['image'].shape[:1], jnp.float32) if m is None else m


def yolo_loss(params, state, batch, rng, *, num_classes: int, detection: Mapping[str, Any],
              apply_fn: Optional[Callable] = None):
  """Train-mode forward pass and YOLO v1 loss; the `task_loss` of steps.train_step.

  Returns (loss, ({'<term>_loss': ...}, new_batch_stats))."""
  pred, mutated = (apply_fn or state.apply_fn)(
      {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
      rngs={'dropout': rng}, mutable=['batch_stats'])
  s, _ = _grid(pred, num_classes)
  targets = boxes_lib.encode_yolo(batch['boxes'], batch['label'], batch['valid'], s,
                                  num_classes)
  loss, terms = loss_lib.yolo_v1_loss(
      pred, targets, float(detection['lambda_coord']), float(detection['lambda_noobj']),
      conf_target=detection['conf_target'], class_loss=detection['class_loss'],
      mask=_mask(batch))
  parts = {f'{k}_loss': terms[k] for k in TERMS}
  return loss, (parts, mutated.get('batch_stats', state.batch_stats))


def eval_step(state, batch, *, num_classes: int, detection: Mapping[str, Any]
              ) -> Dict[str, jax.Array]:
  """Eval-mode loss (summed) and every image's detections after per-class NMS.

  Returns 'loss_sum', 'count' and the '<term>_sum' loss terms (sums over the
  unmasked images), and 'boxes' (B, D, 4), 'scores' (B, D), 'classes' (B, D),
  'valid' (B, D) with D = detection.max_detections.
  """
  pred = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                        batch['image'], train=False)
  s, b = _grid(pred, num_classes)
  mask = _mask(batch)
  targets = boxes_lib.encode_yolo(batch['boxes'], batch['label'], batch['valid'], s,
                                  num_classes)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  loss, terms = loss_lib.yolo_v1_loss(
      pred, targets, float(detection['lambda_coord']), float(detection['lambda_noobj']),
      conf_target=detection['conf_target'], class_loss=detection['class_loss'], mask=mask)
  out = {'loss_sum': loss * n, 'count': jnp.sum(mask)}
  out.update({f'{k}_sum': terms[k] * n for k in TERMS})
  boxes, scores = boxes_lib.decode_yolo(pred, s, b, num_classes)
  dets = jax.vmap(lambda bx, sc: batched_class_nms(
      bx, sc, iou_threshold=float(detection['nms_iou_threshold']),
      score_threshold=float(detection['score_threshold']),
      max_detections=int(detection['max_detections'])))(boxes, scores)
  out.update(boxes=dets['boxes'], scores=dets['scores'], classes=dets['classes'],
             valid=dets['valid'] & (mask[:, None] > 0))
  return out


class Collector:
  """Gathers eval_step outputs and the batches' ground truth over a split (host)."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.sums: Dict[str, float] = {}
    self.detections: List[Dict[str, np.ndarray]] = []
    self.ground_truths: List[Dict[str, np.ndarray]] = []

  def add(self, batch: Mapping[str, np.ndarray], out: Mapping[str, Any]) -> None:
    out = {k: np.asarray(v) for k, v in out.items()}
    for k in ('loss_sum', 'count') + tuple(f'{t}_sum' for t in TERMS):
      self.sums[k] = self.sums.get(k, 0.0) + float(np.sum(out[k]))
    boxes = out['boxes'].reshape((-1,) + out['boxes'].shape[-2:])
    scores = out['scores'].reshape(boxes.shape[:2])
    classes = out['classes'].reshape(boxes.shape[:2])
    valid = out['valid'].reshape(boxes.shape[:2])
    mask = np.asarray(batch.get('mask', np.ones(len(boxes)))).reshape(-1)
    gt_boxes = np.asarray(batch['boxes']).reshape(boxes.shape[:1] + (-1, 4))
    gt_labels = np.asarray(batch['label']).reshape(boxes.shape[:1] + (-1,))
    gt_valid = np.asarray(batch['valid']).reshape(gt_labels.shape)
    for i in np.flatnonzero(mask > 0):
      self.detections.append(dict(boxes=boxes[i], scores=scores[i], classes=classes[i],
                                  valid=valid[i]))
      self.ground_truths.append(dict(boxes=gt_boxes[i], labels=gt_labels[i],
                                     valid=gt_valid[i].astype(bool)))

  def metrics(self) -> Dict[str, Any]:
    """Mean losses, mAP@0.5 (VOC, all-point), COCO mAP@[.5:.95] and per-class AP50."""
    n = max(self.sums.get('count', 0.0), 1.0)
    out: Dict[str, Any] = {'loss': self.sums['loss_sum'] / n, 'count': n}
    out.update({f'{t}_loss': self.sums[f'{t}_sum'] / n for t in TERMS})
    result = metrics_lib.evaluate_detections(self.detections, self.ground_truths,
                                             self.num_classes)
    out['mAP50'] = _finite(result['map50'])
    out['mAP'] = _finite(result['map_coco'])
    for c, ap in enumerate(result['ap50']):
      if np.isfinite(ap):
        out[f'AP50_class{c}'] = float(ap)
    out['detection_result'] = result
    return out


def _finite(x) -> float:
  x = float(x)
  return x if np.isfinite(x) else 0.0
