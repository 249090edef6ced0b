"""Freezing, discriminative learning rates and gradual unfreezing, with optax.

A `TransferPlan` says, for every parameter of a model: its stage, its learning-rate
multiplier, and from which *phase* it trains (never, from the start, or after k
unfreezing steps). It builds what the training step needs for a phase:

  * the optimizer: ``optax.multi_transform`` with ``optax.set_to_zero()`` for the
    parameters frozen for the whole run, so they get no update *and no optimizer
    state*; each other group runs the configured optimizer followed by
    ``optax.scale(multiplier)`` (the same as a per-group learning rate, since every
    optimizer here is linear in the lr). A group that unfreezes later is held:
    its optimizer state exists from the start (so checkpoints keep one layout),
    but until its phase its updates are zero and its state does not move.
    Gradient clipping stays global (before the split), reduce-on-plateau stays a
    single scale (after it).
  * a gradient mask: the frozen parameters' gradients are replaced by zeros
    before anything reads them, so XLA can drop the weight-gradient convolutions
    of frozen layers (and everything below the lowest trainable one);
  * the BatchNorm policy for frozen layers (`frozen_bn`): 'eval' normalises them
    with their running statistics (what a fixed feature extractor does; the
    layers then compute the same function in training and at test time), 'keep'
    normalises with the batch statistics but does not update the running ones,
    'update' treats them as unfrozen layers do.

Phases: with ``unfreeze_every_steps = N > 0``, phase k covers steps
[kN, (k+1)N); in phase k the k highest frozen stages train. Without it there is
one phase.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnn_jax.transfer import stages as stages_lib

Path = Tuple[str, ...]
NEVER = -1     # unfreeze phase of a parameter frozen for the whole run


def _split(spec: str) -> List[str]:
  return [p.strip() for p in (spec or '').split(',') if p.strip()]


def _match(item: str, stage_map: Dict[Path, str], all_stages: Sequence[str],
           what: str) -> List[Path]:
  """Parameter paths an item of a freeze / lr spec names: a stage, 'backbone'
  (every stage but the head), or a regex searched in 'module/sub/param'."""
  if item == 'backbone':
    return [p for p, s in stage_map.items() if s != 'head']
  if item in all_stages:
    return [p for p, s in stage_map.items() if s == item]
  try:
    rx = re.compile(item)
  except re.error as e:
    raise ValueError(f'{what}: {item!r} is neither a stage ({list(all_stages)}, '
                     f"'backbone') nor a valid regex ({e}).") from None
  hits = [p for p in stage_map if rx.search(stages_lib.path_str(p))]
  if not hits:
    raise ValueError(f'{what}: {item!r} matches no parameter. Stages of this model: '
                     f"{list(all_stages)} (and 'backbone'); a regex is searched in "
                     f"paths like {stages_lib.path_str(next(iter(stage_map)))!r}.")
  return hits


@dataclasses.dataclass
class TransferPlan:
  """Per-parameter stage, lr multiplier and unfreeze phase (see module doc).

  Attributes:
    stage: path -> stage name.
    order: stage names bottom to top.
    lr_mult: path -> learning-rate multiplier.
    unfreeze_phase: path -> 0 (trains from the start), k > 0 (from phase k) or NEVER.
    unfreeze_every_steps: phase length in steps (0: a single phase).
    frozen_bn: 'eval', 'keep' or 'update'.
  """
  stage: Dict[Path, str]
  order: List[str]
  lr_mult: Dict[Path, float]
  unfreeze_phase: Dict[Path, int]
  unfreeze_every_steps: int = 0
  frozen_bn: str = 'eval'

  # --- phases
  @property
  def num_phases(self) -> int:
    later = [k for k in self.unfreeze_phase.values() if k > 0]
    return 1 + (max(later) if later else 0)

  def phase(self, step: int) -> int:
    if not self.unfreeze_every_steps:
      return 0
    return min(int(step) // self.unfreeze_every_steps, self.num_phases - 1)

  def trainable(self, path: Path, phase: int) -> bool:
    k = self.unfreeze_phase[path]
    return k != NEVER and k <= phase

  def is_trivial(self) -> bool:
    """Nothing frozen, every multiplier 1: the plain optimizer does the same."""
    return (all(k == 0 for k in self.unfreeze_phase.values())
            and all(m == 1.0 for m in self.lr_mult.values()))

  # --- what a phase's train step needs
  def _tree(self, params, fn):
    flat = {p: fn(p) for p in stages_lib.flat_paths(params)}
    return flax.traverse_util.unflatten_dict(flat)

  def grad_mask(self, params, phase: int):
    """A tree of Python bools shaped like params: True where gradients are used."""
    return self._tree(params, lambda p: self.trainable(p, phase))

  def frozen_bn_modules(self, phase: int) -> frozenset:
    """Module paths of BatchNorm layers (found by their 'scale'/'bias') frozen now."""
    out = set()
    for p in self.stage:
      if p[-1] in ('scale', 'bias') and not self.trainable(p, phase):
        out.add(p[:-1])
    return frozenset(out)

  def stats_mask(self, batch_stats, phase: int):
    """Tree of bools shaped like batch_stats: True where statistics must not change
    (frozen BN layers, unless frozen_bn == 'update')."""
    if not batch_stats:
      return None
    frozen = self.frozen_bn_modules(phase) if self.frozen_bn != 'update' else frozenset()
    return self._tree(batch_stats, lambda p: p[:-1] in frozen)

  def labels(self, params):
    """optax.multi_transform labels: 'frozen' or 'g{k}' per parameter."""
    groups = self.groups()
    key = {g: name for name, g in groups.items()}
    return self._tree(params, lambda p: 'frozen' if self.unfreeze_phase[p] == NEVER
                      else key[(self.lr_mult[p], self.unfreeze_phase[p])])

  def groups(self) -> Dict[str, Tuple[float, int]]:
    """label -> (lr multiplier, unfreeze phase) of every group that ever trains."""
    distinct = sorted({(self.lr_mult[p], k) for p, k in self.unfreeze_phase.items()
                       if k != NEVER}, key=lambda g: (g[1], -g[0]))
    return {f'g{i}': g for i, g in enumerate(distinct)}

  def optimizer(self, make_core, phase: int) -> optax.GradientTransformation:
    """The multi_transform for `phase`. make_core() builds a fresh core optimizer
    (weight decay + update rule + schedule, no clipping or plateau scale)."""
    transforms = {'frozen': optax.set_to_zero()}
    for name, (mult, k) in self.groups().items():
      tx = make_core()
      if mult != 1.0:
        tx = optax.chain(tx, optax.scale(mult))
      transforms[name] = tx if k <= phase else hold(tx)
    return optax.multi_transform(transforms, self.labels)

  def describe(self) -> str:
    """A table: stage, parameters, trains from, lr multiplier."""
    rows = []
    for s in self.order:
      paths = [p for p in self.stage if self.stage[p] == s]
      phases = sorted({self.unfreeze_phase[p] for p in paths})
      mults = sorted({self.lr_mult[p] for p in paths})
      when = ', '.join('frozen' if k == NEVER else 'start' if k == 0 else
                       f'step {k * self.unfreeze_every_steps}' for k in phases)
      rows.append((s, len(paths), when, ', '.join(f'{m:g}' for m in mults)))
    w = max(len(r[0]) for r in rows)
    lines = [f'{"stage":<{w}}  tensors  trains from        lr x']
    lines += [f'{s:<{w}}  {n:>7}  {when:<17}  {m}' for s, n, when, m in rows]
    return '\n'.join(lines)


def hold(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`'s state layout, but zero updates and an unchanged state (a group that
  unfreezes later: its momentum starts from zero when it does)."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(jnp.zeros_like, updates), state
  return optax.GradientTransformation(inner.init, update)


def make_plan(model, params, input_shape, *, freeze: str = '', frozen_bn: str = 'eval',
              unfreeze_every_steps: int = 0, stage_lr_decay: float = 1.0,
              lr_multipliers: str = '', input_dtype=jnp.float32) -> TransferPlan:
  """Builds the plan for `model` (whose parameter tree is `params`) from the
  transfer config's strings (see cnn_jax.train.config: transfer.*).

  Raises ValueError for a name that is neither a stage nor a matching regex, or
  an lr multiplier that is not 'name=number'."""
  try:
    heads = stages_lib.head_paths(model, input_shape, input_dtype)
  except ValueError:
    heads = []
  stage = stages_lib.param_stages(model, params, heads)
  order = stages_lib.ordered_stages(stage)

  frozen = set()
  for item in _split(freeze):
    frozen.update(_match(item, stage, order, 'transfer.freeze'))
  if frozen and len(frozen) == len(stage):
    raise ValueError('transfer.freeze freezes every parameter; nothing would train. Leave '
                     "the head out (e.g. transfer.freeze='backbone').")
  unfreeze_phase = {p: (NEVER if p in frozen else 0) for p in stage}
  if unfreeze_every_steps and frozen:
    frozen_stages = sorted({stage[p] for p in frozen}, key=stages_lib.stage_rank,
                           reverse=True)
    for p in frozen:
      unfreeze_phase[p] = 1 + frozen_stages.index(stage[p])

  # lr x decay^k, k = stages between this one and the head (the head: k = 0).
  top = len(order) - 1
  lr_mult = {p: float(stage_lr_decay) ** (top - order.index(s)) for p, s in stage.items()}
  for item in _split(lr_multipliers):
    name, sep, value = item.rpartition('=')
    try:
      mult = float(value)
    except ValueError:
      mult = None
    if not sep or mult is None or mult < 0:
      raise ValueError(f"transfer.lr_multipliers: {item!r} is not 'stage_or_regex=number' "
                       "(e.g. 'stem=0.01,stage4=0.5').")
    for p in _match(name, stage, order, 'transfer.lr_multipliers'):
      lr_mult[p] = mult
  return TransferPlan(stage=stage, order=order, lr_mult=lr_mult,
                      unfreeze_phase=unfreeze_phase,
                      unfreeze_every_steps=int(unfreeze_every_steps), frozen_bn=frozen_bn)


# ---------------------------------------------------------------------------
# BatchNorm in eval mode for frozen layers, inside a train-mode forward pass.
# ---------------------------------------------------------------------------

def _running_average_bn(mod: nn.BatchNorm, x):
  """What mod(x) computes with use_running_average=True (flax's op order)."""
  axes = mod.axis if isinstance(mod.axis, tuple) else (mod.axis,)
  axes = tuple(a % x.ndim for a in axes)
  shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  mean = mod.get_variable('batch_stats', 'mean').reshape(shape)
  var = mod.get_variable('batch_stats', 'var').reshape(shape)
  y = x - mean
  mul = jax.lax.rsqrt(var + mod.epsilon)
  if mod.use_scale:
    mul = mul * mod.get_variable('params', 'scale').reshape(shape)
  y = y * mul
  if mod.use_bias:
    y = y + mod.get_variable('params', 'bias').reshape(shape)
  return jnp.asarray(y, mod.dtype or jnp.result_type(x, mean))


def eval_mode_bn_apply(apply_fn, frozen_modules: frozenset):
  """apply_fn, but the BatchNorm layers at `frozen_modules` (module paths) use their
  running statistics even in train mode, and leave them unchanged."""
  if not frozen_modules:
    return apply_fn

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if (context.method_name == '__call__' and isinstance(mod, nn.BatchNorm)
        and tuple(mod.scope.path) in frozen_modules and not mod.is_initializing()
        and not kwargs.get('use_running_average', mod.use_running_average)):
      return _running_average_bn(mod, args[0])
    return next_fun(*args, **kwargs)

  def wrapped(*args, **kwargs):
    with nn.intercept_methods(interceptor):
      return apply_fn(*args, **kwargs)
  return wrapped


def mask_grads(grads, mask):
  """Zeros where mask (a tree of Python bools) is False; static, so XLA drops the work."""
  if mask is None:
    return grads
  return jax.tree_util.tree_map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)


def keep_frozen_stats(new_stats, old_stats, mask):
  """new_stats, with the entries where mask is True taken from old_stats."""
  if mask is None:
    return new_stats
  return jax.tree_util.tree_map(lambda n, o, m: o if m else n, new_stats, old_stats, mask)
