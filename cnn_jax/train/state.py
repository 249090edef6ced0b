"""TrainState: everything a training step reads and writes, as one pytree."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """step, params, BN statistics, optimizer state and the base rng.

  `rng` never changes: step k draws its randomness from fold_in(rng, step), so a
  resumed run draws what an uninterrupted one would. apply_fn and tx are static
  (not traced, part of jit's cache key by identity).
  """
  step: jax.Array
  apply_fn: Callable = struct.field(pytree_node=False)
  params: Any
  batch_stats: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  rng: jax.Array

  def apply_gradients(self, grads, **changes) -> 'TrainState':
    """One optimizer update; step += 1; other fields replaced from `changes`."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


def _init_fn(model: nn.Module, tx, input_shape, input_dtype):
  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    x = jnp.zeros((1,) + tuple(input_shape), input_dtype)
    variables = model.init({'params': params_rng, 'dropout': dropout_rng}, x, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), apply_fn=model.apply, params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), tx=tx, rng=state_rng)
  return init


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         input_shape: Sequence[int], rng, input_dtype=jnp.float32):
  """The TrainState as ShapeDtypeStructs (jax.eval_shape): nothing is allocated.

  For parameter counts of big models and as the target of a checkpoint restore."""
  return jax.eval_shape(_init_fn(model, tx, input_shape, input_dtype), rng)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: Sequence[int], rng, input_dtype=jnp.float32
                       ) -> TrainState:
  """Initialises model variables and optimizer state.

  Args:
    model: a flax Module called as model.apply(variables, x, train=...).
    tx: the optax transformation (see optim.make_optimizer).
    input_shape: one example's shape, without the batch axis (e.g. (32, 32, 1)).
    rng: a PRNG key; split into init keys and the state's base rng.
    input_dtype: dtype of the dummy init input (int32 for token models).
  Returns:
    TrainState at step 0. Collections other than params and batch_stats (e.g.
    'intermediates' sown during init) are dropped.
  """
  init = _init_fn(model, tx, input_shape, input_dtype)
  return jax.jit(init)(rng)
