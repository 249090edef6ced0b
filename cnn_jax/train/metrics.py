"""Classification metrics: confusion matrix on device, reports on the host.

On device (jit-able, psum-friendly) everything is a sum, so batches and devices
aggregate exactly by addition:

    C[i, j] = sum_n mask_n * [label_n = i] * [pred_n = j]

rows are the true class, columns the prediction. From the summed matrix the
host computes, per class c (tp = C[c, c]):

    precision_c = tp / sum_i C[i, c]     recall_c = tp / sum_j C[c, j]
    F1_c = 2 precision_c recall_c / (precision_c + recall_c)
    accuracy = trace(C) / sum(C),        error = 1 - accuracy

The ILSVRC measures are top-1 and top-5 error: 'error' here is the top-1 error
(1 - 'accuracy'), 'top5_error' is 1 - 'top5_accuracy'.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

# metric-name suffix -> the suffix of its error rate (see add_error_rates)
_ERROR_NAMES = (('top5_accuracy', 'top5_error'), ('accuracy', 'error'))


def predictions(logits_or_preds, labels):
  """Integer class predictions from logits [..., C], one binary logit [..., 1] or ids.

  An array with one more axis than `labels` holds logits: argmax over the last
  axis, or `logit > 0` for a single (sigmoid) logit, as the train step scores it.
  An array shaped like `labels` already holds predicted ids.
  """
  x = jnp.asarray(logits_or_preds)
  labels = jnp.asarray(labels)
  if x.ndim == labels.ndim + 1:
    if x.shape[-1] == 1:
      return (x[..., 0] > 0).astype(jnp.int32)
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  if x.shape != labels.shape:
    raise ValueError(f'expected logits of shape {labels.shape} + (num_classes,) or '
                     f'predictions of shape {labels.shape}; got {x.shape}.')
  if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
    raise ValueError(f'predictions shaped like the labels must be integer class ids; '
                     f'got dtype {x.dtype} (pass logits with a class axis instead).')
  return x.astype(jnp.int32)


def confusion_matrix(logits_or_preds, labels, num_classes: int, mask=None, *, dtype=None):
  """Confusion matrix of one batch; rows = true class, columns = predicted class.

  C[i, j] = sum_n mask_n [label_n = i][pred_n = j], a plain sum, so matrices of
  several batches add up and `jax.lax.psum(C, axis)` gives the global one.
  Works under jit (num_classes static) and for any leading shape, e.g. per-pixel
  labels [B, H, W] with logits [B, H, W, C] for segmentation.

  Args:
    logits_or_preds: logits [..., C] (argmax), one binary logit [..., 1]
      (`> 0`, with num_classes=2) or integer predictions shaped like `labels`.
    labels: integer class ids [...].
    num_classes: size of the matrix (static).
    mask: optional weights shaped like `labels`; 0 marks padding. Entries whose
      label or prediction lies outside [0, num_classes) are not counted either,
      so padding labelled -1 is dropped even without a mask (and
      sum(C) < count reveals out-of-range labels).
    dtype: of the result. Default int32, or float32 when `mask` is a float
      array (fractional weights are then kept). float32 counts are exact only
      up to 2**24 per cell, which per-pixel segmentation counts pass quickly:
      pass dtype=jnp.int32 for a 0/1 float mask there.
  Returns:
    [num_classes, num_classes] counts (weights) of that dtype.
  """
  labels = jnp.asarray(labels)
  preds = predictions(logits_or_preds, labels)
  labels = labels.astype(jnp.int32)
  if mask is None:
    dtype = jnp.int32 if dtype is None else dtype
    weights = jnp.ones(labels.shape, dtype)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != labels.shape:
      raise ValueError(f'mask shape {mask.shape} must equal the labels shape {labels.shape}.')
    if dtype is None:
      dtype = jnp.float32 if jnp.issubdtype(mask.dtype, jnp.floating) else jnp.int32
    weights = mask.astype(dtype)
  valid = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
  # Invalid entries are sent to cell 0 with weight 0 rather than indexed out of
  # range (negative indices would wrap around).
  flat = jnp.where(valid, labels * num_classes + preds, 0).reshape(-1)
  weights = jnp.where(valid, weights, jnp.zeros((), dtype)).reshape(-1)
  counts = jnp.zeros((num_classes * num_classes,), dtype).at[flat].add(weights)
  return counts.reshape(num_classes, num_classes)


def topk_correct(logits, labels, k: int):
  """Per-example 1.0 if the label is among the k highest logits, else 0.0 (float32).

  Ties are broken towards the lower class index, as argmax does, so k=1 agrees
  with `argmax(logits) == label`. k larger than the number of classes is clipped.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f'logits {logits.shape} must be labels {labels.shape} + (num_classes,).')
  if k < 1:
    raise ValueError(f'k must be >= 1; got {k}.')
  _, top = jax.lax.top_k(logits, min(int(k), logits.shape[-1]))
  return jnp.any(top == labels[..., None], axis=-1).astype(jnp.float32)


def add_error_rates(metrics: Mapping[str, Any]) -> Dict[str, Any]:
  """A copy of `metrics` with error rates next to the accuracies (ILSVRC measures).

  For every key 'accuracy' or 'top5_accuracy', bare or after a '/' prefix
  ('val/accuracy'), adds the same key ending in 'error' / 'top5_error' with
  value 1 - accuracy: 'error' is the top-1 error. Values keep their type
  (Python float, NumPy or jax scalar), so this also works inside jit.
  """
  out = dict(metrics)
  for name, value in metrics.items():
    for acc, err in _ERROR_NAMES:
      if name == acc or name.endswith('/' + acc):
        out[name[:-len(acc)] + err] = 1 - value
        break
  return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den != 0)


def classification_report(confusion, class_names: Optional[list] = None) -> Dict[str, Any]:
  """Accuracy, error and per-class / macro precision, recall and F1 from a confusion matrix.

  Conventions (those of sklearn.metrics.precision_recall_fscore_support with
  zero_division=0 and its default labels):
    * a class never predicted has precision 0; a class absent from the labels
      has recall 0; F1 is 0 where precision + recall = 0;
    * the macro averages are unweighted means over the classes that occur in
      the labels or in the predictions (row or column sum > 0). A class that
      appears in neither (e.g. one of 1000 classes missing from a small eval
      set and never predicted) has nothing to score and is left out; its
      per-class entries are reported as 0 with support 0.

  Args:
    confusion: [C, C] array, rows = true class, columns = predicted (counts or
      weights, e.g. summed confusion_matrix outputs).
    class_names: optional names, returned as 'class_names'.
  Returns:
    dict with 'accuracy', 'error', 'macro_precision', 'macro_recall',
    'macro_f1', 'count' (total weight) as floats, and per-class lists
    'precision', 'recall', 'f1', 'support' (row sums).
  """
  cm = np.asarray(confusion, dtype=np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square [C, C]; got shape {cm.shape}.')
  total = cm.sum()
  if total <= 0:
    raise ValueError('confusion matrix is empty (no counted examples); '
                     'nothing to report.')
  if class_names is not None and len(class_names) != cm.shape[0]:
    raise ValueError(f'{len(class_names)} class names for {cm.shape[0]} classes.')
  tp = np.diag(cm)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  precision = _safe_div(tp, predicted)
  recall = _safe_div(tp, support)
  f1 = _safe_div(2 * precision * recall, precision + recall)
  present = (support > 0) | (predicted > 0)
  accuracy = float(tp.sum() / total)
  report = {
      'accuracy': accuracy,
      'error': 1.0 - accuracy,
      'macro_precision': float(precision[present].mean()),
      'macro_recall': float(recall[present].mean()),
      'macro_f1': float(f1[present].mean()),
      'count': float(total),
      'precision': precision.tolist(),
      'recall': recall.tolist(),
      'f1': f1.tolist(),
      'support': [int(s) if float(s).is_integer() else float(s) for s in support],
  }
  if class_names is not None:
    report['class_names'] = list(class_names)
  return report


def segmentation_scores(confusion) -> Dict[str, Any]:
  """Per-class and mean Dice and Jaccard (IoU) from a pixel confusion matrix.

  With TP_c = C[c, c], FP_c = column sum - TP_c, FN_c = row sum - TP_c over the
  pixels of a whole split (not averaged per batch or per image):

    Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c)      IoU_c = TP_c / (TP_c + FP_c + FN_c)

  Conventions:
    * a class absent from both the truth and the prediction (denominator 0) has
      no score: its entries are None and it is left out of the means;
    * a class present in the truth but never predicted (or predicted but absent
      from the truth) scores 0 (TP = 0 over a positive denominator).
  Returns 'dice' and 'iou' (per-class lists), 'mean_dice', 'mean_iou' (means over
  the scored classes), 'pixel_accuracy' and 'num_scored_classes'.
  """
  cm = np.asarray(confusion, dtype=np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square [C, C]; got shape {cm.shape}.')
  tp = np.diag(cm)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  scored = (tp + fp + fn) > 0
  dice = np.where(scored, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300), np.nan)
  iou = np.where(scored, tp / np.maximum(tp + fp + fn, 1e-300), np.nan)
  as_list = lambda a: [None if np.isnan(v) else float(v) for v in a]
  total = cm.sum()
  return {
      'dice': as_list(dice),
      'iou': as_list(iou),
      'mean_dice': float(dice[scored].mean()) if scored.any() else float('nan'),
      'mean_iou': float(iou[scored].mean()) if scored.any() else float('nan'),
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else float('nan'),
      'num_scored_classes': int(scored.sum()),
  }
