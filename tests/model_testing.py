"""Helpers shared by the model tests (imported as a plain module by pytest)."""
import math

import jax
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
