"""cnn_jax.nn.Dropout: inverted scaling, edge cases, and masks that depend only on
(key, global example index), so one batch gets the same masks under 1-device jit,
jit over a sharded batch and pmap (bit for bit); and a BN + dropout model whose
train-mode forward under pmap equals jit's over the global batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn_jax import models
from cnn_jax import nn
from model_testing import random_variables

KEY = jax.random.key(0)
_RNG = np.random.default_rng(0)


def rand(shape):
  return jnp.asarray(_RNG.standard_normal(shape, dtype=np.float32))


def test_inverted_scaling_and_mask_statistics(fast_compile):
  x = rand((32, 4, 4, 4))
  rate = 0.25
  y, g = jax.jit(lambda x: (nn.Dropout(rate).apply({}, x, deterministic=False, rng=KEY),
                            jax.grad(lambda x: nn.Dropout(rate).apply(
                                {}, x, deterministic=False, rng=KEY).sum())(x)))(x)
  kept = np.asarray(y) != 0
  # y = m * x / (1 - p): kept units are scaled up, the rest are zero.
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  np.testing.assert_allclose(g, np.where(kept, 1 / (1 - rate), 0), rtol=1e-6)
  assert abs(kept.mean() - (1 - rate)) < 0.04          # 2048 units: ~4 sigma
  assert not np.array_equal(kept[0], kept[1])           # each example its own mask
  # Example j's mask is the draw from fold_in(key, j), whatever else is in the batch.
  for j in (0, 5):
    m = jax.random.bernoulli(jax.random.fold_in(KEY, j), 1 - rate, x.shape[1:])
    np.testing.assert_array_equal(kept[j], m)


def test_deterministic_and_rate_edge_cases():
  x = rand((2, 3))
  # No rng is needed whenever nothing is random.
  np.testing.assert_array_equal(nn.Dropout(0.5, deterministic=True).apply({}, x), x)
  np.testing.assert_array_equal(nn.Dropout(0.5).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(nn.Dropout(0.0).apply({}, x, deterministic=False), x)
  np.testing.assert_array_equal(nn.Dropout(1.0).apply({}, x, deterministic=False), 0 * x)
  g = jax.grad(lambda x: nn.Dropout(1.0).apply({}, x, deterministic=False).sum())(x)
  np.testing.assert_array_equal(g, 0 * x)                # zeros, not NaNs
  with pytest.raises(ValueError, match='deterministic'):
    nn.Dropout(0.5).apply({}, x)
  with pytest.raises(ValueError, match='batch axis'):
    nn.Dropout(0.5).apply({}, jnp.float32(1.0), deterministic=False, rng=KEY)


def test_broadcast_dims_and_ranks(fast_compile):
  x = jnp.ones((4, 3, 3, 2))
  d = lambda dims: nn.Dropout(0.5, broadcast_dims=dims)

  @jax.jit
  def run(x):
    return (d((1, 2)).apply({}, x, deterministic=False, rng=KEY),
            d((0,)).apply({}, x, deterministic=False, rng=KEY),
            d((-1,)).apply({}, x[:, 0, 0], deterministic=False, rng=KEY))
  spatial, shared, dense = map(np.asarray, run(x))
  # (1, 2): whole channels dropped; (0,): one mask for every example.
  assert (spatial == spatial[:, :1, :1]).all() and set(np.unique(spatial)) <= {0.0, 2.0}
  assert (shared == shared[:1]).all()
  assert (dense == dense[:, :1]).all() and dense.shape == (4, 2)


@pytest.mark.parametrize('shape, dims', [((8, 5), ()), ((8, 3, 3, 2), (2,))])
def test_masks_equal_under_jit_sharded_jit_and_pmap(shape, dims, fast_compile):
  x = rand(shape)

  def drop(axis_name):
    layer = nn.Dropout(0.5, axis_name=axis_name, broadcast_dims=dims)
    return lambda x: layer.apply({}, x, deterministic=False, rngs={'dropout': KEY})

  want = np.asarray(jax.jit(drop(None))(x))
  # pmap: the same key on every device, the batch split 8 x 1 and 2 x 4.
  for n in (8, 2):
    got = jax.pmap(drop('batch'), axis_name='batch')(x.reshape((n, -1) + shape[1:]))
    np.testing.assert_array_equal(np.asarray(got).reshape(shape), want)
  mesh = Mesh(np.array(jax.devices()[:8]), ('batch',))
  sharded = jax.device_put(x, NamedSharding(mesh, P('batch')))
  got = jax.jit(drop(None))(sharded)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(got), want)


def test_bn_and_dropout_model_same_under_pmap_and_jit(fast_compile):
  # Dropout on conv maps between BatchNorms: a mask or statistic that differed
  # between the two runs would change everything downstream.
  name, shape = 'densenet_tiny', (8, 16, 16, 3)
  ref = models.get_model(name, num_classes=5, dropout_rate=0.3)
  par = models.get_model(name, num_classes=5, dropout_rate=0.3, axis_name='batch')
  x = rand(shape)
  variables = random_variables(
      jax.eval_shape(lambda x: ref.init(jax.random.key(0), x, train=False), x), seed=0)

  def forward(model):
    def f(variables, x, key):
      logits, state = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': key})
      return logits, state['batch_stats']
    return f

  jit_fwd = jax.jit(forward(ref))
  logits, stats = jit_fwd(variables, x, KEY)
  p_logits, p_stats = jax.pmap(forward(par), axis_name='batch', in_axes=(None, 0, None))(
      variables, x.reshape((4, 2) + shape[1:]), KEY)
  np.testing.assert_allclose(np.asarray(p_logits).reshape(logits.shape), logits,
                             rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, np.broadcast_to(b, a.shape),
                                              rtol=1e-5, atol=1e-5), p_stats, stats)
  # Dropout is live: another key, other logits.
  other, _ = jit_fwd(variables, x, jax.random.key(1))
  assert np.abs(np.asarray(other) - np.asarray(logits)).max() > 1e-3


@pytest.mark.parametrize('name', [
    'alexnet_tiny', 'vgg_tiny', 'nin_tiny', 'resnet_tiny', 'cifar_resnet_tiny', 'wrn28_10',
    'densenet_tiny', 'googlenet_bn_tiny', 'mobilenet_v1_tiny', 'mobilenet_v2_tiny',
    'textcnn_tiny', 'example_ffcnn'])
def test_models_with_bn_or_dropout_take_axis_name(name):
  assert models.get_model(name, axis_name='batch').axis_name == 'batch'


@pytest.mark.parametrize('name', ['lenet5', 'highway_cnn_tiny', 'cnn1d_tiny'])
def test_models_without_bn_or_dropout_reject_axis_name(name):
  with pytest.raises(ValueError, match=r"no field\(s\) \['axis_name'\]"):
    models.get_model(name, axis_name='batch')
