"""Pure training and evaluation steps: (state, batch) -> (state, metrics).

A batch is a dict with 'image' (the model input, batch axis first), 'label'
(int class ids, shape [B]; 0/1 for a one-logit binary model) and optionally
'mask' (1 for real examples, 0 for padding). Every hyperparameter is an
argument; make_train_step/make_eval_step bind them from a config and jit.

Nothing here is pmap-specific: under jax.jit with the batch sharded over a
mesh axis (NamedSharding) the steps run unchanged and the means are global.
Under pmap, pass axis_name so grads, BN statistics and metrics are averaged
(train) or summed (eval) across devices.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_jax.train import metrics as metrics_lib
from cnn_jax.train.state import TrainState

LOSS_KEYS = ('name', 'label_smoothing', 'aux_weight', 'class_weights')
LOSSES = ('cross_entropy', 'sigmoid_cross_entropy', 'mse', 'dice', 'cross_entropy+dice')
_LOSS_DEFAULTS = dict(name='cross_entropy', label_smoothing=0.0, aux_weight=0.3,
                      class_weights=())
AUX_NAMES = ('aux1_logits', 'aux2_logits')
_DICE_EPS = 1.0   # smoothing of the soft Dice ratio: an empty class scores 1, not 0/0


def _targets(logits, labels, label_smoothing):
  """Integer ids -> one-hot; float targets shaped like logits are used as given.
  Smoothing mixes them with the uniform distribution."""
  num_classes = logits.shape[-1]
  if labels.ndim == logits.ndim:
    target = labels.astype(logits.dtype)
  else:
    target = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  return target * (1.0 - label_smoothing) + label_smoothing / num_classes


def _per_example(values, weights=None):
  """(B, ...) per-position values -> (B,) means (weighted by `weights` if given):
  a segmentation loss per image is its mean over pixels."""
  if values.ndim == 1:
    return values if weights is None else values * weights
  flat = values.reshape(values.shape[0], -1)
  if weights is None:
    return flat.mean(-1)
  w = weights.reshape(weights.shape[0], -1)
  return (flat * w).sum(-1) / jnp.maximum(w.sum(-1), 1e-12)


def _pixel_weights(logits, labels, class_weights):
  """w[label] per position (int labels), or None without class weights."""
  if not class_weights:
    return None
  w = jnp.asarray(class_weights, logits.dtype)
  if labels.ndim == logits.ndim and logits.shape[-1] > 1:   # one-hot / soft targets
    return labels.astype(logits.dtype) @ w
  return w[labels.astype(jnp.int32)]


def cross_entropy(logits, labels, label_smoothing=0.0, class_weights=()):
  """Per-example loss: softmax CE with int (or one-hot/soft) labels; sigmoid BCE
  for one logit (labels 0/1, smoothed towards 0.5). Per-pixel labels (segmentation)
  give each image's mean over its pixels; with class_weights, the mean is weighted
  by w[label] (sum w CE / sum w, as PyTorch's weighted mean)."""
  if logits.shape[-1] == 1:
    y = labels.astype(logits.dtype).reshape(logits.shape[:-1])
    y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    values = optax.sigmoid_binary_cross_entropy(logits[..., 0], y)
  else:
    values = optax.softmax_cross_entropy(logits, _targets(logits, labels, label_smoothing))
  return _per_example(values, _pixel_weights(logits, labels, class_weights))


def sigmoid_cross_entropy(logits, labels, label_smoothing=0.0, class_weights=()):
  """Per-example sum over classes of independent sigmoid BCEs (multi-label
  targets shaped like logits, or int ids as one-hot)."""
  if logits.shape[-1] == 1:
    return cross_entropy(logits, labels, label_smoothing, class_weights)
  target = _targets(logits, labels, 0.0)
  target = target * (1.0 - label_smoothing) + 0.5 * label_smoothing
  values = optax.sigmoid_binary_cross_entropy(logits, target)
  if class_weights:
    values = values * jnp.asarray(class_weights, values.dtype)
  return _per_example(jnp.sum(values, axis=-1))


def mse(logits, labels, label_smoothing=0.0, class_weights=()):
  """Per-example squared error between the outputs and the (one-hot) targets,
  summed over classes (the notes' quadratic cost)."""
  values = jnp.square(logits - _targets(logits, labels, label_smoothing))
  if class_weights:
    values = values * jnp.asarray(class_weights, values.dtype)
  return _per_example(jnp.sum(values, axis=-1))


def dice_loss(logits, labels, label_smoothing=0.0, class_weights=()):
  """Per-example soft Dice loss, 1 - mean_c (2 sum p y + e) / (sum p + sum y + e).

  p = softmax(logits) (sigmoid for one logit, scoring the foreground only), y the
  one-hot truth, sums over an image's pixels, e = 1 so a class absent from both
  scores 1. The mean over classes is weighted by class_weights when given."""
  del label_smoothing
  if logits.shape[-1] == 1:
    p = jax.nn.sigmoid(logits)
    y = labels.astype(logits.dtype).reshape(p.shape)
  else:
    p = jax.nn.softmax(logits, axis=-1)
    y = _targets(logits, labels, 0.0)
  axes = tuple(range(1, p.ndim - 1))
  inter = jnp.sum(p * y, axis=axes)
  dice = (2 * inter + _DICE_EPS) / (jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes) + _DICE_EPS)
  if class_weights:
    w = jnp.asarray(class_weights, dice.dtype)
    return 1.0 - (dice * w).sum(-1) / w.sum()
  return 1.0 - dice.mean(-1)


def cross_entropy_plus_dice(logits, labels, label_smoothing=0.0, class_weights=()):
  """The sum of the pixel cross-entropy and the soft Dice loss."""
  return (cross_entropy(logits, labels, label_smoothing, class_weights)
          + dice_loss(logits, labels, label_smoothing, class_weights))


LOSS_FNS = {'cross_entropy': cross_entropy, 'sigmoid_cross_entropy': sigmoid_cross_entropy,
            'mse': mse, 'dice': dice_loss, 'cross_entropy+dice': cross_entropy_plus_dice}


def _label_ids(logits, labels):
  """Class ids for accuracy: one-hot/soft targets -> argmax."""
  if labels.ndim == logits.ndim and logits.shape[-1] > 1:
    return jnp.argmax(labels, -1)
  return labels


def _correct(logits, labels):
  """Per-example fraction correct (per-pixel labels: the image's pixel accuracy)."""
  labels = _label_ids(logits, labels)
  if logits.shape[-1] == 1:
    right = (logits[..., 0] > 0) == (labels.reshape(logits.shape[:-1]) > 0)
  else:
    right = jnp.argmax(logits, -1) == labels
  return _per_example(right.astype(jnp.float32))


def _correct_top5(logits, labels):
  return _per_example(metrics_lib.topk_correct(logits, _label_ids(logits, labels), 5))


def _mask(batch, labels):
  m = batch.get('mask')
  return jnp.ones(labels.shape[:1], jnp.float32) if m is None else m.astype(jnp.float32)


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def compute_loss(params, state: TrainState, batch, rng, *, label_smoothing=0.0,
                 aux_weight=0.3, loss_name='cross_entropy', class_weights=(),
                 apply_fn: Optional[Callable] = None):
  """Train-mode forward pass and loss.

  loss = L(logits) + aux_weight * sum_i L(aux{i}_logits), L = LOSS_FNS[loss_name],
  for the GoogLeNet aux logits sown in 'intermediates' (absent for other models).
  Masked examples count for nothing. Returns (loss, (logits, parts,
  new_batch_stats)) where parts has 'ce_loss' (the main term, whatever loss_name)
  and 'aux_loss' (the unweighted sum of aux terms). apply_fn replaces
  state.apply_fn when given (transfer learning: frozen BN layers in eval mode).
  """
  logits, mutated = (apply_fn or state.apply_fn)(
      {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
      rngs={'dropout': rng}, mutable=['batch_stats', 'intermediates'])
  labels = batch['label']
  mask = _mask(batch, labels)
  loss_fn = LOSS_FNS[loss_name]
  ce = _masked_mean(loss_fn(logits, labels, label_smoothing, class_weights), mask)
  aux = jnp.zeros((), ce.dtype)
  inter = mutated.get('intermediates', {})
  for name in AUX_NAMES:
    for aux_logits in inter.get(name, ()):   # sow stores a tuple
      aux = aux + _masked_mean(loss_fn(aux_logits, labels, label_smoothing, class_weights),
                               mask)
  loss = ce + aux_weight * aux
  new_stats = mutated.get('batch_stats', state.batch_stats)
  return loss, (logits, {'ce_loss': ce, 'aux_loss': aux}, new_stats)


def train_step(state: TrainState, batch, *, label_smoothing: float = 0.0,
               aux_weight: float = 0.3, lr_schedule: Optional[Callable] = None,
               axis_name: Optional[str] = None, loss_name: str = 'cross_entropy',
               class_weights=(), grad_mask=None, stats_mask=None,
               apply_fn: Optional[Callable] = None, task_loss: Optional[Callable] = None):
  """One optimizer step. Pure: (state, batch) -> (new_state, metrics).

  Args:
    state: TrainState; dropout draws from fold_in(state.rng, state.step), so step
      k's randomness depends on nothing but the base rng and k.
    batch: dict with 'image', 'label' and optionally 'mask' (see module doc).
    label_smoothing: mass moved from the true class to the uniform distribution.
    loss_name: a key of LOSS_FNS ('cross_entropy', 'sigmoid_cross_entropy', 'mse',
      'dice', 'cross_entropy+dice').
    class_weights: per-class loss weights (empty: none).
    aux_weight: weight of each auxiliary (GoogLeNet) loss term; 0.3 as the paper.
    lr_schedule: step -> lr, only to report 'lr' (tx applies its own schedule).
    axis_name: the pmap axis to average grads, BN statistics and metrics over;
      None under jit (sharded or not). Dropout keys are the same on every device
      (see the comment in the body). Under pmap each device's loss is its own
      masked mean, so with a 'mask' that pads devices unevenly the pmean weights
      devices, not examples; jit over a sharded batch has no such caveat.
    grad_mask: a tree of Python bools shaped like params (transfer learning):
      False leaves get zero gradients, so XLA drops their backward computations.
    stats_mask: a tree of Python bools shaped like batch_stats: True leaves keep
      their old values (frozen BatchNorm layers).
    apply_fn: replaces state.apply_fn in the train-mode forward pass.
    task_loss: replaces compute_loss for another task (detection):
      fn(params, state, batch, rng, apply_fn=...) -> (loss, (metrics, new_stats));
      its metrics are reported instead of the classification ones.
  Returns:
    (new_state, metrics) with scalar 'loss' (total), 'ce_loss', 'aux_loss',
    'accuracy', 'top5_accuracy' (>= 5 classes), 'grad_norm' (before clipping)
    and 'lr' (when lr_schedule is given).
  """
  # The same key on every device: models built with axis_name draw dropout masks
  # by global example index (cnn_jax.nn.Dropout), so pmap matches jit.
  rng = jax.random.fold_in(state.rng, state.step)
  if task_loss is not None:
    (loss, (parts, new_stats)), grads = jax.value_and_grad(task_loss, has_aux=True)(
        state.params, state, batch, rng, apply_fn=apply_fn)
    metrics = {'loss': loss, **parts}
  else:
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (loss, (logits, parts, new_stats)), grads = grad_fn(
        state.params, state, batch, rng, label_smoothing=label_smoothing,
        aux_weight=aux_weight, loss_name=loss_name, class_weights=tuple(class_weights),
        apply_fn=apply_fn)
    labels = batch['label']
    mask = _mask(batch, labels)
    metrics = {'loss': loss, **parts,
               'accuracy': _masked_mean(_correct(logits, labels), mask)}
    if logits.shape[-1] >= 5:
      metrics['top5_accuracy'] = _masked_mean(_correct_top5(logits, labels), mask)
  if grad_mask is not None:
    grads = jax.tree_util.tree_map(lambda g, m: g if m else jnp.zeros_like(g), grads,
                                   grad_mask)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    new_stats = jax.lax.pmean(new_stats, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  if stats_mask is not None:
    new_stats = jax.tree_util.tree_map(lambda n, o, m: o if m else n, new_stats,
                                       state.batch_stats, stats_mask)
  metrics['grad_norm'] = optax.global_norm(grads)
  if lr_schedule is not None:
    metrics['lr'] = jnp.asarray(lr_schedule(state.step), jnp.float32)
  return state.apply_gradients(grads, batch_stats=new_stats), metrics


def eval_step(state: TrainState, batch, *, axis_name: Optional[str] = None,
              loss_name: str = 'cross_entropy', confusion: bool = False
              ) -> Dict[str, jax.Array]:
  """Eval-mode metrics as sums and a count, so batches aggregate exactly.

  Returns 'loss_sum' (the unsmoothed loss_name loss, no aux terms), 'correct',
  'correct_top5' (>= 5 classes), 'count' and, with confusion=True, the
  'confusion' matrix (rows true, columns predicted; 2x2 for one logit), all summed
  over the unmasked examples (and over devices under pmap). finalize_eval_metrics
  turns summed totals into means.
  """
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  labels = batch['label']
  mask = _mask(batch, labels)
  out = {'loss_sum': jnp.sum(LOSS_FNS[loss_name](logits, labels) * mask),
         'correct': jnp.sum(_correct(logits, labels) * mask),
         'count': jnp.sum(mask)}
  if logits.shape[-1] >= 5:
    out['correct_top5'] = jnp.sum(_correct_top5(logits, labels) * mask)
  if confusion:
    ids = _label_ids(logits, labels)
    pixel_mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (ids.ndim - 1)), ids.shape)
    out['confusion'] = metrics_lib.confusion_matrix(
        logits, ids, max(2, logits.shape[-1]), pixel_mask, dtype=jnp.int32)
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


def finalize_eval_metrics(totals: Dict[str, Any]) -> Dict[str, float]:
  """Summed eval_step outputs (one dict or a list of them) -> means on the host."""
  if isinstance(totals, (list, tuple)):
    totals = jax.tree_util.tree_map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs),
                                    *totals)
  n = float(totals['count'])
  out = {'loss': float(totals['loss_sum']) / n, 'accuracy': float(totals['correct']) / n}
  if 'correct_top5' in totals:
    out['top5_accuracy'] = float(totals['correct_top5']) / n
  out['count'] = n
  if 'confusion' in totals:
    report = metrics_lib.classification_report(np.asarray(totals['confusion']))
    for key in ('macro_precision', 'macro_recall', 'macro_f1'):
      if key in report:
        out[key] = float(report[key])
  return metrics_lib.add_error_rates(out)


def _loss_config(config) -> dict:
  if config is None:
    return dict(_LOSS_DEFAULTS)
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  bad = sorted(set(config) - set(LOSS_KEYS))
  if bad:
    raise ValueError(f'unknown loss config key(s) {bad}; valid keys are {list(LOSS_KEYS)}.')
  c = {**_LOSS_DEFAULTS, **dict(config)}
  if c['name'] not in LOSS_FNS:
    raise ValueError(f"unknown loss {c['name']!r} (key 'loss.name'); valid choices are "
                     f'{list(LOSS_FNS)}.')
  return c


def make_train_step(config=None, lr_schedule: Optional[Callable] = None, *,
                    axis_name: Optional[str] = None):
  """train_step with the loss config bound, jitted with the state donated.

  Args:
    config: ConfigDict/dict with 'label_smoothing' (default 0) and 'aux_weight'
      (default 0.3); None for the defaults.
    lr_schedule: reported as metrics['lr'] (from optim.make_optimizer).
    axis_name: if given, the step is jax.pmap'd over that axis instead (state
      and batch then carry a leading device axis).
  """
  c = _loss_config(config)
  fn = functools.partial(train_step, label_smoothing=float(c['label_smoothing']),
                         aux_weight=float(c['aux_weight']), lr_schedule=lr_schedule,
                         axis_name=axis_name, loss_name=c['name'],
                         class_weights=tuple(c['class_weights']))
  if axis_name is not None:
    return jax.pmap(fn, axis_name=axis_name, donate_argnums=(0,))
  return jax.jit(fn, donate_argnums=(0,))


def make_eval_step(*, axis_name: Optional[str] = None):
  """eval_step jitted (or pmap'd over axis_name); the state is not donated."""
  fn = functools.partial(eval_step, axis_name=axis_name)
  if axis_name is not None:
    return jax.pmap(fn, axis_name=axis_name)
  return jax.jit(fn)
