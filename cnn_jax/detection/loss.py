"""The YOLO v1 loss (Redmon et al., 2016, eq. 3), one sum-squared error over the grid.

For cell i of the S x S grid and predictor j of its B, 1obj_i is 1 where an object
appears in cell i, 1obj_ij is 1 for the predictor j "responsible" for it, and
1noobj_ij = 1 - 1obj_ij. The paper's loss of one image is

    lambda_coord sum_i sum_j 1obj_ij [(x_i - x^_i)^2 + (y_i - y^_i)^2]
  + lambda_coord sum_i sum_j 1obj_ij [(sqrt w_i - sqrt w^_i)^2 + (sqrt h_i - sqrt h^_i)^2]
  +              sum_i sum_j 1obj_ij (C_ij - C^_ij)^2                       'obj'
  + lambda_noobj sum_i sum_j 1noobj_ij (C_ij - 0)^2                         'noobj'
  +              sum_i 1obj_i sum_c (p_i(c) - p^_i(c))^2                    'class'

with lambda_coord = 5 (box errors count more than the many confidence errors) and
lambda_noobj = 0.5 (most cells are empty; their confidence gradients would
otherwise swamp the rest). The first two lines are 'coord'.

Choices here, all following the paper unless stated:
  * Predictions are read as in cnn_jax.detection.boxes: x = sigmoid(tx),
    y = sigmoid(ty) (the paper regresses the offsets linearly; the sigmoid keeps
    the centre inside its cell), sqrt w = tw, sqrt h = th linear as in the paper,
    C = sigmoid(tc), p = softmax(class logits) (the paper's p is linear).
  * Responsible predictor: of the B predictors of an object cell, the one whose
    decoded box has the highest IoU with the cell's ground truth (the first on a
    tie, e.g. when all IoUs are 0). The choice is not differentiated
    (stop_gradient).
  * Objectness target C^ of the responsible predictor: IoU(pred, truth) under
    stop_gradient (conf_target='iou', the paper's "confidence = Pr(object) * IoU"),
    or 1 (conf_target='one', as later YOLO versions do).
  * 'noobj' covers every predictor that is not responsible, including the other
    B - 1 predictors of an object cell.
  * Class term: the paper's squared error on probabilities (class_loss='mse') or
    the cross-entropy -log p_i(c_true) (class_loss='ce'), in object cells only.

The sums run over the grid and predictors and are averaged over the images of
the batch (weighted by `mask` when given), so the loss of one image does not
depend on the batch size. The returned terms are the weighted contributions and
add up to the loss:

    loss = coord + obj + noobj + class      (coord and noobj include their lambdas)
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from cnn_jax.detection import boxes as boxes_lib

CONF_TARGETS = ('iou', 'one')
CLASS_LOSSES = ('mse', 'ce')
TERMS = ('coord', 'obj', 'noobj', 'class')


def yolo_v1_loss(pred, targets, lambda_coord: float = 5.0, lambda_noobj: float = 0.5, *,
                 conf_target: str = 'iou', class_loss: str = 'mse',
                 mask=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """YOLO v1 loss of a batch (module docstring has the formula).

  Args:
    pred: raw head output (N, S, S, B*5 + C): per cell [tx, ty, tw, th, tc] for
      each predictor, then C class logits. B is inferred from the channel count.
    targets: (N, S, S, 5 + C) from encode_yolo (batched): per cell [x, y,
      sqrt(w), sqrt(h), obj, one-hot class].
    lambda_coord: weight of the box terms.
    lambda_noobj: weight of the confidence error of non-responsible predictors.
    conf_target: 'iou' (paper) or 'one': objectness target of a responsible predictor.
    class_loss: 'mse' (paper) or 'ce'.
    mask: optional (N,) weights of the images, 0 for batch padding; the loss
      is sum_n mask_n L_n / max(sum_n mask_n, 1e-12). Default: the plain mean.
  Returns:
    (loss, terms): the scalar loss and a dict 'coord', 'obj', 'noobj', 'class'
    of scalars summing to it.
  """
  if conf_target not in CONF_TARGETS:
    raise ValueError(f"conf_target must be one of {CONF_TARGETS}; got {conf_target!r}.")
  if class_loss not in CLASS_LOSSES:
    raise ValueError(f"class_loss must be one of {CLASS_LOSSES}; got {class_loss!r}.")
  pred = jnp.asarray(pred)
  targets = jnp.asarray(targets, pred.dtype)
  if targets.ndim != 4 or targets.shape[-1] < 6 or targets.shape[1] != targets.shape[2]:
    raise ValueError(f'targets must be (N, S, S, 5 + C) from encode_yolo; got '
                     f'{targets.shape}.')
  num_classes = targets.shape[-1] - 5
  num_boxes, extra = divmod(pred.shape[-1] - num_classes, 5)
  if pred.ndim != 4 or pred.shape[:3] != targets.shape[:3] or extra or num_boxes < 1:
    raise ValueError(f'pred must be (N, S, S, B*5 + C) with the targets\' N, S and '
                     f'C={num_classes}, i.e. (N, S, S, B*5 + {num_classes}); got pred '
                     f'{pred.shape} for targets {targets.shape}.')

  if mask is None:
    mask = jnp.ones(pred.shape[:1], pred.dtype)
  else:
    mask = jnp.asarray(mask, pred.dtype)
    if mask.shape != pred.shape[:1]:
      raise ValueError(f'mask must be (N,) = {pred.shape[:1]}, one weight per image; got '
                       f'{mask.shape}.')
  return _loss(pred, targets, mask, lambda_coord, lambda_noobj, num_boxes, num_classes,
               conf_target, class_loss)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _loss(pred, targets, mask, lambda_coord, lambda_noobj, num_boxes, num_classes,
          conf_target, class_loss):
  parts = boxes_lib.split_yolo_output(pred, num_boxes, num_classes)
  obj = targets[..., 4]                                     # (N, S, S)
  true_xy = targets[..., None, 0:2]                         # (N, S, S, 1, 2)
  true_sqrt_wh = targets[..., None, 2:4]

  pred_boxes = boxes_lib.cell_boxes_to_xyxy(parts['xy'], parts['sqrt_wh'])   # (N,S,S,B,4)
  true_boxes = boxes_lib.cell_boxes_to_xyxy(true_xy, true_sqrt_wh)           # (N,S,S,1,4)
  ious = jax.lax.stop_gradient(boxes_lib.elementwise_iou(pred_boxes, true_boxes))
  best = jnp.argmax(ious, axis=-1)
  responsible = jax.nn.one_hot(best, num_boxes, dtype=pred.dtype) * obj[..., None]

  coord_err = (jnp.sum(jnp.square(parts['xy'] - true_xy), -1)
               + jnp.sum(jnp.square(parts['sqrt_wh'] - true_sqrt_wh), -1))  # (N,S,S,B)
  conf_goal = ious if conf_target == 'iou' else jnp.ones_like(ious)
  conf = parts['conf']
  obj_err = jnp.square(conf - conf_goal)
  noobj_err = jnp.square(conf)
  if class_loss == 'mse':
    probs = jax.nn.softmax(parts['class_logits'], axis=-1)
    class_err = jnp.sum(jnp.square(probs - targets[..., 5:]), -1)
  else:
    log_probs = jax.nn.log_softmax(parts['class_logits'], axis=-1)
    class_err = -jnp.sum(targets[..., 5:] * log_probs, -1)

  def per_image(x):
    return x.reshape(x.shape[0], -1).sum(-1)

  per_term = {
      'coord': lambda_coord * per_image(responsible * coord_err),
      'obj': per_image(responsible * obj_err),
      'noobj': lambda_noobj * per_image((1 - responsible) * noobj_err),
      'class': per_image(obj * class_err),
  }
  total = jnp.maximum(mask.sum(), 1e-12)
  terms = {k: (v * mask).sum() / total for k, v in per_term.items()}
  loss = terms['coord'] + terms['obj'] + terms['noobj'] + terms['class']
  return loss, terms
