"""Dropout whose masks depend only on the key and each example's global index.

Inverted dropout (Srivastava et al. 2014), as in the notes: in training each unit
is kept with probability 1 - p and the kept ones are scaled up,

  y = m * x / (1 - p),   m ~ Bernoulli(1 - p) per unit,   so E[y] = x;

at test time "the whole network is used" and y = x, with no rescaling needed.

flax.linen.Dropout draws one mask of the *local* batch's shape from one key, so
the same global batch gets different masks under jit (one 8-example mask) and
under pmap (eight 1-example masks, or per-device keys). Here example j's mask is
drawn from `fold_in(key, offset + j)`, offset being the index of the local
batch's first example in the global batch (`axis_index(axis_name) * local_batch`
under pmap or shard_map, 0 otherwise). With the same key on every device the
masks are then bit-identical under 1-device jit, jit over a sharded batch and
pmap, whatever the split.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def dropout(key, x, rate: float, *, offset=0, broadcast_dims: Sequence[int] = ()):
  """Inverted dropout of x (batch axis 0) with per-example masks.

  Args:
    key: PRNG key shared by the whole global batch.
    x: (B, ...) local batch.
    rate: drop probability p; y = m * x / (1 - p), m ~ Bernoulli(1 - p).
    offset: global index of x[0] (an int or a traced scalar).
    broadcast_dims: axes that share one mask value. Including axis 0 gives every
      example the same mask, drawn from `key` itself.
  Returns:
    y of x's shape and dtype; example j's mask depends only on (key, offset + j).
  """
  if x.ndim == 0:
    raise ValueError('dropout needs a batch axis (axis 0); got a scalar.')
  if rate == 0.0:
    return x
  if rate == 1.0:
    return jnp.zeros_like(x)   # 0 * x / 0 would put NaNs into the gradient
  keep = 1.0 - rate
  dims = {d % x.ndim for d in broadcast_dims}
  mask_shape = tuple(1 if d in dims else n for d, n in enumerate(x.shape))
  if 0 in dims:
    mask = jax.random.bernoulli(key, keep, mask_shape)
  else:
    idx = offset + jnp.arange(x.shape[0])
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, idx)
    mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, mask_shape[1:]))(keys)
  mask = jnp.broadcast_to(mask, x.shape)
  return lax.select(mask, x / keep, jnp.zeros_like(x))


class Dropout(nn.Module):
  """flax.linen.Dropout's interface, with masks that do not depend on the device split.

  Example j of the global batch (batch axis 0) is masked with a draw from
  `fold_in(key, j)`. Under pmap or shard_map, set `axis_name` to the mapped
  axis so each device knows where its local batch starts
  (`axis_index(axis_name) * local_batch`), and give every device the SAME key:
  the masks then equal those of one jit over the global batch, bit for bit.
  Under jit (sharded or not) leave axis_name None; the batch is already global.

  Attributes:
    rate: drop probability p (not the keep probability); 0 is the identity and
      1 gives zeros.
    deterministic: True returns x unchanged (evaluation); may instead be passed
      to __call__.
    axis_name: the pmap / shard_map axis the batch is split over, or None.
    rng_collection: the rng stream the key is taken from.
    broadcast_dims: axes that share one mask value (e.g. (1, 2) drops whole
      channels of (B, H, W, C) maps).
  """
  rate: float
  deterministic: Optional[bool] = None
  axis_name: Optional[str] = None
  rng_collection: str = 'dropout'
  broadcast_dims: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, deterministic: Optional[bool] = None, rng=None):
    """y = m * x / (1 - rate) in training, x when deterministic; rng overrides the stream."""
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)   # as flax: no rng needed when nothing is random
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    offset = 0
    if self.axis_name is not None:
      offset = lax.axis_index(self.axis_name) * x.shape[0]
    return dropout(rng, x, self.rate, offset=offset, broadcast_dims=self.broadcast_dims)
