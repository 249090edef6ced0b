"""Optimizers and learning-rate schedules from an ml_collections config.

`make_optimizer(config.optimizer)` reads one sub-dict:

  name            'sgd' | 'momentum' | 'nesterov' | 'adam' | 'adamw' | 'rmsprop'
  lr              peak learning rate (required)
  momentum        for 'momentum'/'nesterov' (default 0.9); rmsprop's momentum (default 0)
  weight_decay    0 turns it off. For 'adamw' it is decoupled (Loshchilov & Hutter:
                  w -= lr * wd * w, outside Adam's normalisation). For every other
                  optimizer it is L2 added to the gradient, g += wd * w, before momentum
                  and the learning rate (AlexNet's 5e-4, Caffe and torch.optim.SGD).
                  Either way it is applied only to leaves with ndim >= 2 (conv and
                  dense kernels): biases and BatchNorm scale/bias (all 1-D) are not
                  decayed, and BN running statistics are not params at all.
  schedule        'constant' | 'cosine' | 'step' | 'warmup_cosine' | 'plateau'
  warmup_steps    linear warmup from 0 ('warmup_cosine')
  decay_steps     total steps of the cosine ('cosine', 'warmup_cosine'; the warmup
                  counts towards them for 'warmup_cosine')
  boundaries      steps at which 'step' multiplies the lr by decay_factor
  decay_factor    'step' multiplier (default 0.1)
  grad_clip_norm  clip the raw gradient to this global norm first (None: off)
  plateau_factor  'plateau': multiply the lr by this when the monitored validation
                  metric has not improved for plateau_patience evaluations
                  (AlexNet: "divide the learning rate by 10 when the validation error
                  rate stopped improving"). The factor applied so far lives in the
                  optimizer state (an inject_hyperparams scale at the end of the
                  chain), so it is checkpointed and a resumed run keeps it; the loop
                  decides when to reduce (see plateau_scale / set_plateau_scale).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import optax

OPTIMIZERS = ('sgd', 'momentum', 'nesterov', 'adam', 'adamw', 'rmsprop')
SCHEDULES = ('constant', 'cosine', 'step', 'warmup_cosine', 'plateau')
_DEFAULTS = dict(name='sgd', lr=None, momentum=None, weight_decay=0.0, schedule='constant',
                 warmup_steps=0, decay_steps=None, boundaries=(), decay_factor=0.1,
                 grad_clip_norm=None, plateau_factor=0.1, plateau_patience=2)


def _as_dict(config: Any) -> dict:
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f'optimizer config must be a mapping, got {type(config).__name__}.')
  bad = sorted(set(config) - set(_DEFAULTS))
  if bad:
    raise ValueError(f'unknown optimizer config key(s) {bad}; valid keys are '
                     f'{sorted(_DEFAULTS)}.')
  return {**_DEFAULTS, **dict(config)}


def decay_mask(params):
  """True for leaves that get weight decay: kernels (ndim >= 2), not biases or BN."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_schedule(config: Any) -> Callable[[Any], Any]:
  """The learning-rate schedule step -> lr described by an optimizer config."""
  c = _as_dict(config)
  lr = c['lr']
  if lr is None:
    raise ValueError("optimizer config needs 'lr' (the peak learning rate).")
  name = c['schedule']
  if name not in SCHEDULES:
    raise ValueError(f'unknown schedule {name!r} (key \'schedule\'); valid choices are '
                     f'{list(SCHEDULES)}.')
  if name in ('constant', 'plateau'):
    return optax.constant_schedule(lr)
  if name == 'step':
    if not c['boundaries']:
      raise ValueError("schedule 'step' needs 'boundaries' (steps where the lr drops).")
    return optax.piecewise_constant_schedule(
        lr, {int(b): float(c['decay_factor']) for b in c['boundaries']})
  if not c['decay_steps']:
    raise ValueError(f"schedule {name!r} needs 'decay_steps' (total steps).")
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, int(c['decay_steps']))
  if c['warmup_steps'] >= c['decay_steps']:
    raise ValueError(f"'warmup_steps' ({c['warmup_steps']}) must be smaller than "
                     f"'decay_steps' ({c['decay_steps']}).")
  return optax.warmup_cosine_decay_schedule(0.0, lr, int(c['warmup_steps']),
                                            int(c['decay_steps']))


def make_optimizer(config: Any, *, split: Optional[Callable] = None
                   ) -> Tuple[optax.GradientTransformation, Callable]:
  """Builds the optax chain an optimizer config describes.

  Args:
    config: ConfigDict or dict with the keys in this module's docstring.
    split: optional; called as split(make_core) where make_core() returns a fresh
      core transformation (weight decay, update rule, schedule); what it returns
      replaces the core in the chain. Clipping (first) and the plateau scale
      (last) stay global. cnn_jax.transfer uses it for per-group transforms
      (optax.multi_transform: frozen parameters, per-stage learning rates).
  Returns:
    (tx, schedule): the GradientTransformation and the step -> lr function (for
    logging; tx already uses it).
  Raises:
    ValueError naming the key and the valid choices for an unknown optimizer,
    schedule or key, or a missing value a schedule needs.
  """
  c = _as_dict(config)
  name = c['name']
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r} (key 'name'); valid choices are "
                     f'{list(OPTIMIZERS)}.')
  schedule = make_schedule(c)
  wd = float(c['weight_decay'] or 0.0)

  def core_parts():
    parts = []
    if wd and name != 'adamw':
      parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    if name == 'sgd':
      parts.append(optax.sgd(schedule))
    elif name in ('momentum', 'nesterov'):
      m = 0.9 if c['momentum'] is None else float(c['momentum'])
      parts.append(optax.sgd(schedule, momentum=m, nesterov=name == 'nesterov'))
    elif name == 'adam':
      parts.append(optax.adam(schedule))
    elif name == 'adamw':
      parts.append(optax.adamw(schedule, weight_decay=wd, mask=decay_mask))
    else:
      m = 0.0 if c['momentum'] is None else float(c['momentum'])
      parts.append(optax.rmsprop(schedule, momentum=m))
    return parts

  def make_core():
    core = core_parts()
    return core[0] if len(core) == 1 else optax.chain(*core)

  parts = []
  if c['grad_clip_norm'] is not None:
    parts.append(optax.clip_by_global_norm(float(c['grad_clip_norm'])))
  if split is None:
    parts.extend(core_parts())   # flat: the state layout checkpoints were written with
  else:
    parts.append(split(make_core))
  if c['schedule'] == 'plateau':
    parts.append(optax.inject_hyperparams(optax.scale)(step_size=1.0))
  return optax.chain(*parts), schedule


def check_config(config: Any) -> None:
  """Raises the ValueError make_optimizer would. decay_steps may be None for the
  cosine schedules (the training loop sets it to the run's length)."""
  c = _as_dict(config)
  if c['decay_steps'] is None and c['schedule'] in ('cosine', 'warmup_cosine'):
    # The loop fills in the run's length; check the rest with any valid value.
    c['decay_steps'] = int(c['warmup_steps']) + 1
  make_optimizer(c)
  if c['schedule'] == 'plateau':
    if not 0.0 < float(c['plateau_factor']) < 1.0:
      raise ValueError(f"'plateau_factor' must be in (0, 1), got {c['plateau_factor']}.")
    if int(c['plateau_patience']) < 1:
      raise ValueError(f"'plateau_patience' must be >= 1, got {c['plateau_patience']}.")


def plateau_scale(opt_state) -> float | None:
  """The lr multiplier reduce-on-plateau has applied so far (None: not 'plateau')."""
  last = opt_state[-1] if isinstance(opt_state, tuple) and opt_state else None
  hp = getattr(last, 'hyperparams', None)
  if not hp or 'step_size' not in hp:
    return None
  return float(hp['step_size'])


def set_plateau_scale(opt_state, value: float):
  """opt_state with the reduce-on-plateau multiplier replaced by value."""
  last = opt_state[-1]
  hp = dict(last.hyperparams)
  hp['step_size'] = jax.numpy.asarray(value, jax.numpy.asarray(hp['step_size']).dtype)
  return opt_state[:-1] + (last._replace(hyperparams=hp),)
