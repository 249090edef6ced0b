"""Detection metrics on the host: matching, precision-recall, AP and mAP (NumPy).

Matching, per class and IoU threshold t: the detections of one image are taken in
descending score; each is a true positive (TP) if it matches a ground-truth box
(GT) of its class not matched before, else a false positive (FP), so a second
detection of an already found object is an FP. Two rules, as in the two
benchmarks:

    'voc'   the GT of highest IoU with the detection, matched if IoU > t and that
            GT is still free (the PASCAL VOC devkit);
    'coco'  the free GT of highest IoU >= t (pycocotools: when its best GT is
            already taken, a detection may still match another free one).

GT flagged 'ignore' (VOC "difficult", COCO "crowd") are not counted, and a
detection whose match is one of them is neither TP nor FP.

Over all images, with detections of class c sorted by descending score (ties in
input order) and n_c counted GT, after the k best:

    precision_k = TP_k / k,      recall_k = TP_k / n_c.

Average precision summarises the curve with the interpolated precision
p_interp(r) = max_{k : recall_k >= r} precision_k (the precision envelope):

    'voc2010'    AP = sum_k (r_k - r_{k-1}) p_interp(r_k)     (all points, VOC 2010+)
    'voc07_11pt' AP = 1/11 sum_{r in 0, 0.1, .., 1} p_interp(r)       (VOC 2007)
    'coco101'    AP = 1/101 sum_{r in 0, 0.01, .., 1} p_interp(r)     (COCO)

with p_interp(r) = 0 where the recall r is never reached.

mAP is the mean AP over classes. mAP@0.5 (VOC) uses IoU 0.5; COCO's
mAP@[.5:.95] averages AP over the ten IoU thresholds 0.5, 0.55, .., 0.95 with
101-point interpolation, so it rewards tight boxes: a detection at IoU 0.8 is a
TP for 7 of the 10 thresholds. A class with no (counted) ground truth in the
evaluation set has no recall and no AP: it is reported as NaN and left out of
every mean (as pycocotools does; the VOC devkit would report 0 or NaN).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

AP_METHODS = ('voc2010', 'voc07_11pt', 'coco101')
MATCHING = ('voc', 'coco')
COCO_IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


def average_precision(recall, precision, method: str = 'voc2010') -> float:
  """AP of one precision-recall curve.

  Args:
    recall: (K,) recall after each of the K detections in descending score
      (non-decreasing).
    precision: (K,) precision after each detection.
    method: 'voc2010' (all-point interpolation with the precision envelope),
      'voc07_11pt' (11 recall points) or 'coco101' (101 recall points).
  Returns:
    AP in [0, 1]; 0 for an empty curve (no detections).
  """
  if method not in AP_METHODS:
    raise ValueError(f'method must be one of {AP_METHODS}; got {method!r}.')
  recall = np.asarray(recall, np.float64).reshape(-1)
  precision = np.asarray(precision, np.float64).reshape(-1)
  if recall.shape != precision.shape:
    raise ValueError(f'recall {recall.shape} and precision {precision.shape} must have one '
                     f'entry per detection each.')
  if recall.size == 0:
    return 0.0
  if np.any(np.diff(recall) < 0):
    raise ValueError('recall must be non-decreasing (points in descending score order).')
  # envelope[k] = max precision at any point from k on, i.e. at recall >= recall_k.
  envelope = np.maximum.accumulate(precision[::-1])[::-1]
  if method == 'voc2010':
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))
  points = np.linspace(0, 1, 11 if method == 'voc07_11pt' else 101)
  first = np.searchsorted(recall, points, side='left')   # first k with recall_k >= r
  reached = first < recall.size
  interp = np.where(reached, envelope[np.minimum(first, recall.size - 1)], 0.0)
  return float(interp.mean())


def _as_detections(item, index):
  if isinstance(item, Mapping):
    parts = [item['boxes'], item['scores'], item['classes'], item.get('valid')]
  else:
    if len(item) not in (3, 4):
      raise ValueError(f'detections[{index}] must be (boxes, scores, classes[, valid]) or a '
                       f'dict with those keys; got {len(item)} items.')
    parts = list(item) + [None] * (4 - len(item))
  boxes = np.asarray(parts[0], np.float64).reshape(-1, 4)
  scores = np.asarray(parts[1], np.float64).reshape(-1)
  classes = np.asarray(parts[2]).reshape(-1)
  keep = (np.ones(len(scores), bool) if parts[3] is None
          else np.asarray(parts[3], bool).reshape(-1))
  if not len(boxes) == len(scores) == len(classes) == len(keep):
    raise ValueError(f'detections[{index}]: boxes, scores, classes (and valid) must have one '
                     f'row per detection; got {len(boxes)}, {len(scores)}, {len(classes)}, '
                     f'{len(keep)}.')
  return boxes[keep], scores[keep], classes[keep].astype(np.int64)


def _as_ground_truth(item, index):
  if isinstance(item, Mapping):
    parts = [item['boxes'], item['labels'], item.get('valid'), item.get('ignore')]
  else:
    if len(item) not in (2, 3):
      raise ValueError(f'ground_truths[{index}] must be (boxes, labels[, valid]) or a dict '
                       f"with 'boxes', 'labels' and optional 'valid', 'ignore'; got "
                       f'{len(item)} items.')
    parts = list(item) + [None] * (4 - len(item))
  boxes = np.asarray(parts[0], np.float64).reshape(-1, 4)
  labels = np.asarray(parts[1]).reshape(-1)
  n = len(boxes)
  keep = np.ones(n, bool) if parts[2] is None else np.asarray(parts[2], bool).reshape(-1)
  ignore = np.zeros(n, bool) if parts[3] is None else np.asarray(parts[3], bool).reshape(-1)
  if not n == len(labels) == len(keep) == len(ignore):
    raise ValueError(f'ground_truths[{index}]: boxes, labels, valid and ignore must have one '
                     f'row per box; got {n}, {len(labels)}, {len(keep)}, {len(ignore)}.')
  return boxes[keep], labels[keep].astype(np.int64), ignore[keep]


def _pairwise_iou(a, b):
  """(D, 4) x (G, 4) -> (D, G) IoU in float64; 0 where the union is 0."""
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match(ious, ignore, thresholds, matching):
  """Greedy matching of detections (rows of ious, in descending score) to GT.

  Returns (T, D) int8: 1 TP, 0 FP, -1 ignored (matched an ignored GT).
  """
  num_det, num_gt = ious.shape
  t = np.asarray(thresholds)[:, None]
  outcome = np.zeros((len(t), num_det), np.int8)
  taken = np.zeros((len(t), num_gt), bool)
  for d in range(num_det):
    if num_gt == 0:
      break
    row = ious[d][None, :]
    if matching == 'voc':
      g = int(np.argmax(ious[d]))
      hit = row[0, g] > t[:, 0]
      ign = hit & ignore[g]
      tp = hit & ~ignore[g] & ~taken[:, g]
      taken[:, g] |= tp
      outcome[:, d] = np.where(ign, -1, tp)
      continue
    # COCO: free counted GT first; an ignored GT only when no counted one is left.
    free = (row >= t) & ~taken & ~ignore
    best = np.argmax(np.where(free, row, -1.0), axis=1)
    tp = free.any(axis=1)
    taken[np.nonzero(tp)[0], best[tp]] = True
    ign = ~tp & ((row >= t) & ignore).any(axis=1)
    outcome[:, d] = np.where(ign, -1, tp)
  return outcome


def evaluate_detections(detections: Sequence[Any], ground_truths: Sequence[Any],
                        num_classes: int, iou_thresholds: Sequence[float] = (0.5,), *,
                        method: str = 'voc2010', matching: str = 'voc') -> Dict[str, Any]:
  """Per-class AP, mAP@0.5 and COCO mAP@[.5:.95] of a set of images.

  Boxes of detections and ground truth must be in the same coordinates
  (pixels or normalised; IoU does not care which).

  Args:
    detections: one entry per image, (boxes (D, 4), scores (D,), classes (D,))
      with an optional 4th entry valid (D,) bool, or a dict with those keys (the
      output of batched_class_nms for one image fits as is).
    ground_truths: one entry per image, (boxes (M, 4), labels (M,)[, valid (M,)])
      with the padded convention (valid False rows are dropped), or a dict with
      'boxes', 'labels' and optional 'valid' and 'ignore' (VOC difficult / COCO
      crowd flags).
    num_classes: C; class ids are 0..C-1.
    iou_thresholds: thresholds of the 'ap' table (AP with `method`).
    method: AP interpolation of 'ap' and 'ap50' / 'map50' (see average_precision).
    matching: 'voc' or 'coco' (module docstring).
  Returns:
    dict with
      'iou_thresholds' (T,), 'ap' (T, C) with `method`;
      'ap50' (C,) and 'map50': AP at IoU 0.5 with `method` and its class mean;
      'ap_coco' (C,) and 'map_coco': AP with 101-point interpolation averaged
        over COCO_IOU_THRESHOLDS, and its class mean (mAP@[.5:.95]);
      'precision', 'recall', 'scores': per class (lists of C arrays) the curve
        at IoU 0.5, for plotting;
      'num_gt' (C,) counted GT and 'num_detections' (C,) per class;
      'num_scored_classes' (classes with GT, the ones averaged).
    AP entries of classes without GT are NaN; the maps are NaN if no class has GT.
  """
  if method not in AP_METHODS:
    raise ValueError(f'method must be one of {AP_METHODS}; got {method!r}.')
  if matching not in MATCHING:
    raise ValueError(f'matching must be one of {MATCHING}; got {matching!r}.')
  if len(detections) != len(ground_truths):
    raise ValueError(f'one entry per image in both: got {len(detections)} detection lists '
                     f'and {len(ground_truths)} ground truths.')
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be an int >= 1; got {num_classes!r}.')
  user = tuple(float(t) for t in np.atleast_1d(np.asarray(iou_thresholds, np.float64)))
  if not user or any(not 0.0 <= t <= 1.0 for t in user):
    raise ValueError(f'iou_thresholds must be a non-empty sequence in [0, 1]; got '
                     f'{iou_thresholds!r}.')
  thresholds = tuple(sorted(set(user) | {0.5} | set(COCO_IOU_THRESHOLDS)))
  column = {t: i for i, t in enumerate(thresholds)}

  num_gt = np.zeros(num_classes, np.int64)
  scores = [[] for _ in range(num_classes)]
  outcomes = [[] for _ in range(num_classes)]      # (T, D_image) per image and class
  for i, (det, gt) in enumerate(zip(detections, ground_truths)):
    d_boxes, d_scores, d_classes = _as_detections(det, i)
    g_boxes, g_labels, g_ignore = _as_ground_truth(gt, i)
    for name, ids in (('detection classes', d_classes), ('ground-truth labels', g_labels)):
      if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f'image {i}: {name} must lie in [0, {num_classes}); got '
                         f'{sorted(set(ids.tolist()))} (mark padding with valid=False).')
    np.add.at(num_gt, g_labels[~g_ignore], 1)
    for c in np.unique(d_classes):
      sel = np.nonzero(d_classes == c)[0]
      sel = sel[np.argsort(-d_scores[sel], kind='stable')]
      gsel = g_labels == c
      ious = _pairwise_iou(d_boxes[sel], g_boxes[gsel])
      outcomes[c].append(_match(ious, g_ignore[gsel], thresholds, matching))
      scores[c].append(d_scores[sel])

  ap = np.full((len(thresholds), num_classes), np.nan)
  ap_coco = np.full((len(thresholds), num_classes), np.nan)
  curves = {'precision': [], 'recall': [], 'scores': []}
  num_det = np.zeros(num_classes, np.int64)
  for c in range(num_classes):
    if scores[c]:
      s = np.concatenate(scores[c])
      out = np.concatenate(outcomes[c], axis=1)
    else:
      s, out = np.zeros(0), np.zeros((len(thresholds), 0), np.int8)
    order = np.argsort(-s, kind='stable')
    s, out = s[order], out[:, order]
    counted = out[column[0.5]] >= 0
    num_det[c] = int(counted.sum())
    for ti in range(len(thresholds)):
      keep = out[ti] >= 0
      tp = np.cumsum(out[ti][keep] == 1)
      fp = np.cumsum(out[ti][keep] == 0)
      precision = tp / np.maximum(tp + fp, 1)
      recall = tp / num_gt[c] if num_gt[c] else np.zeros_like(precision, np.float64)
      if ti == column[0.5]:
        curves['precision'].append(precision)
        curves['recall'].append(recall)
        curves['scores'].append(s[keep])
      if num_gt[c]:
        ap[ti, c] = average_precision(recall, precision, method)
        ap_coco[ti, c] = average_precision(recall, precision, 'coco101')

  scored = num_gt > 0
  mean = lambda v: float(np.mean(v[scored])) if scored.any() else float('nan')
  coco_rows = [column[t] for t in COCO_IOU_THRESHOLDS]
  ap_coco_mean = np.mean(ap_coco[coco_rows], axis=0)
  ap50 = ap[column[0.5]]
  return {
      'iou_thresholds': np.asarray(user),
      'ap': ap[[column[t] for t in user]],
      'ap50': ap50,
      'map50': mean(ap50),
      'ap_coco': ap_coco_mean,
      'map_coco': mean(ap_coco_mean),
      'precision': curves['precision'],
      'recall': curves['recall'],
      'scores': curves['scores'],
      'num_gt': num_gt,
      'num_detections': num_det,
      'num_scored_classes': int(scored.sum()),
  }


def plot_pr_curves(result: Mapping[str, Any], path_png: str,
                   class_names: Optional[Sequence[str]] = None, dpi: int = 100) -> str:
  """Draws the precision-recall curve at IoU 0.5 of every class with ground truth.

  Args:
    result: evaluate_detections' output.
    path_png: where to write the PNG (parent directories are created).
    class_names: optional names for the legend (default 'class c').
    dpi: resolution.
  Returns:
    path_png.
  """
  from cnn_jax.analysis import plots   # matplotlib is loaded only to draw

  num_classes = len(result['precision'])
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for {num_classes} classes.')
  names = list(class_names) if class_names is not None else [
      f'class {c}' for c in range(num_classes)]
  fig = plots.new_figure((6, 5))
  ax = fig.add_subplot(1, 1, 1)
  for c in range(num_classes):
    if not result['num_gt'][c]:
      continue
    recall = np.concatenate([[0.0], result['recall'][c]])
    precision = np.concatenate([[1.0], result['precision'][c]])
    ax.plot(recall, precision, drawstyle='steps-post',
            label=f"{names[c]} (AP {result['ap50'][c]:.3f})")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel('recall')
  ax.set_ylabel('precision')
  ax.set_title(f"IoU 0.5: mAP {result['map50']:.3f}, mAP@[.5:.95] {result['map_coco']:.3f}")
  if result['num_scored_classes']:
    ax.legend(loc='lower left', fontsize='small')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return plots.save_figure(fig, path_png, dpi)
