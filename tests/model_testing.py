"""Helpers shared by the model tests (imported as a plain module by pytest)."""
import math

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(abstract, seed):
  """Fills a variables tree (from jax.eval_shape) with well-scaled random values,
  so no init has to be compiled: kernels ~ N(0, 1 / fan_in), BN scale and
  running variance near 1, biases and means small. A wrong wiring then shows
  up in every leaf."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    key = jax.tree_util.keystr(path)
    if key.endswith("['scale']") or key.endswith("['var']"):
      return (1 + 0.2 * rng.random(s.shape)).astype(np.float32)
    if len(s.shape) <= 1:
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    return (rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))).astype(
        np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def check_train_step_ours_vs_flax(ours, ref, x, num_classes, compare=True):
  """One train-mode step of `ours` (cnn_jax.nn.Conv) and, if `compare`, of `ref`
  (the same model with flax.linen.Conv) on the same random variables: equal
  logits, gradients and BN statistics; every parameter gets a gradient; BN
  statistics move. Auxiliary logits sown in train mode join the loss."""
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  variables = random_variables(
      jax.eval_shape(lambda x: ours.init(rngs, x, train=False), x), seed=1)
  weights = jnp.arange(1.0, num_classes + 1)

  def step(model):
    def loss(p):
      out, state = model.apply({**variables, 'params': p}, x, train=True,
                               mutable=['batch_stats', 'intermediates'],
                               rngs={'dropout': jax.random.key(2)})
      # Aux heads (sown in train mode) join the loss as in GoogLeNet's paper.
      aux = sum(jnp.sum(v[0] * weights) for k, v in state.get('intermediates', {}).items()
                if k.startswith('aux'))
      return jnp.sum(out * weights) + 0.3 * aux, (out, state.get('batch_stats', {}))
    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params'])
    return out, stats, grads

  out, stats, grads = step(ours)
  assert out.shape == (2, num_classes)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.any(np.asarray(g) != 0), f'no gradient reaches {jax.tree_util.keystr(path)}'
  if 'batch_stats' in variables:
    moved = jax.tree_util.tree_map(lambda new, old: bool(np.any(np.asarray(new) != old)),
                                   stats, variables['batch_stats'])
    assert all(jax.tree_util.tree_leaves(moved)), moved
  if not compare:
    return
  # Same tree, so checkpoints and imported weights fit either conv.
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      jax.eval_shape(lambda x: ref.init(rngs, x, train=False), x))
  out_ref, stats_ref, grads_ref = step(ref)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree_util.tree_leaves(grads_ref)):
    scale = max(float(jnp.max(jnp.abs(g_ref))), 1.0)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, stats_ref)
