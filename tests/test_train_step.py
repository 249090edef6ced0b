"""TrainState, optimizers from config and the pure train/eval steps."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn_jax.models import get_model
from cnn_jax.train import optim, state as state_lib, steps

RNG = jax.random.PRNGKey(0)


def _batch(n, shape, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.standard_normal((n,) + shape), jnp.float32),
          'label': jnp.asarray(rng.integers(0, num_classes, n), jnp.int32)}


def _sgd(lr=0.05, **kw):
  return optim.make_optimizer(ml_collections.ConfigDict(dict(name='sgd', lr=lr, **kw)))


# ---------------------------------------------------------------- optimizers

@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_every_optimizer_updates(name):
  tx, schedule = optim.make_optimizer(
      {'name': name, 'lr': 0.1, 'weight_decay': 1e-4, 'grad_clip_norm': 1.0})
  params = {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(bool(jnp.all(u < 0)) for u in jax.tree_util.tree_leaves(updates))
  assert float(schedule(0)) == pytest.approx(0.1)


def test_schedules():
  s = optim.make_schedule({'lr': 1.0, 'schedule': 'cosine', 'decay_steps': 100})
  assert [float(s(0)), float(s(50)), float(s(100))] == pytest.approx([1.0, 0.5, 0.0])
  s = optim.make_schedule({'lr': 1.0, 'schedule': 'step', 'boundaries': [10, 20]})
  assert [float(s(9)), float(s(10)), float(s(25))] == pytest.approx([1.0, 0.1, 0.01])
  s = optim.make_schedule({'lr': 1.0, 'schedule': 'warmup_cosine', 'warmup_steps': 10,
                           'decay_steps': 110})
  assert [float(s(0)), float(s(5)), float(s(10)), float(s(110))] == pytest.approx(
      [0.0, 0.5, 1.0, 0.0])


@pytest.mark.parametrize('config, match', [
    ({'name': 'adagrad', 'lr': 0.1}, r"unknown optimizer 'adagrad' \(key 'name'\).*'adamw'"),
    ({'lr': 0.1, 'schedule': 'poly'}, r"unknown schedule 'poly' \(key 'schedule'\).*'cosine'"),
    ({'lr': 0.1, 'wd': 1e-4}, r"unknown optimizer config key\(s\) \['wd'\].*weight_decay"),
    ({'name': 'sgd'}, r"needs 'lr'"),
    ({'lr': 0.1, 'schedule': 'cosine'}, r"'cosine' needs 'decay_steps'"),
    ({'lr': 0.1, 'schedule': 'step'}, r"'step' needs 'boundaries'"),
])
def test_optimizer_config_errors(config, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(config)


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_weight_decay_skips_biases_and_bn(name):
  lr, wd = 0.5, 0.1
  tx, _ = optim.make_optimizer({'name': name, 'lr': lr, 'weight_decay': wd})
  params = {'conv': {'kernel': jnp.full((3, 3, 1, 2), 2.0), 'bias': jnp.full(2, 2.0)},
            'bn': {'scale': jnp.full(2, 2.0), 'bias': jnp.full(2, 2.0)}}
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # SGD: g += wd * w, then -lr * g; AdamW: -lr * wd * w outside Adam. Same here.
  np.testing.assert_allclose(updates['conv']['kernel'], -lr * wd * 2.0, rtol=1e-6)
  for leaf in (updates['conv']['bias'], updates['bn']['scale'], updates['bn']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)


# ---------------------------------------------------------------- state

def test_abstract_state_matches_created(fast_compile):
  tx, _ = _sgd(momentum=None)
  model = get_model('resnet_tiny')
  abstract = state_lib.abstract_train_state(model, tx, (16, 16, 3), RNG)
  real = state_lib.create_train_state(model, tx, (16, 16, 3), RNG)
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(real)
  assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), abstract) == \
      jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), real)
  assert real.batch_stats and int(real.step) == 0


# ---------------------------------------------------------------- train_step

def test_train_steps_lower_loss_without_recompiling(fast_compile):
  tx, schedule = optim.make_optimizer({'name': 'momentum', 'lr': 0.05,
                                       'weight_decay': 5e-4})
  state = state_lib.create_train_state(get_model('lenet5'), tx, (32, 32, 1), RNG)
  rng0 = np.asarray(state.rng)
  batch = _batch(16, (32, 32, 1), 10)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return steps.train_step(state, batch, lr_schedule=schedule)

  step = jax.jit(counted, donate_argnums=(0,))
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert len(traces) == 1
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 6
  np.testing.assert_array_equal(state.rng, rng0)
  assert set(metrics) == {'loss', 'ce_loss', 'aux_loss', 'accuracy', 'top5_accuracy',
                          'grad_norm', 'lr'}
  assert float(metrics['lr']) == pytest.approx(0.05)
  assert float(metrics['grad_norm']) > 0


def test_make_train_step_config_and_bn(fast_compile):
  tx, schedule = _sgd()
  state = state_lib.create_train_state(get_model('resnet_tiny'), tx, (16, 16, 3), RNG)
  step = steps.make_train_step(ml_collections.ConfigDict({'label_smoothing': 0.1}),
                               schedule)
  stats0 = jax.tree_util.tree_map(np.asarray, state.batch_stats)
  state, metrics = step(state, _batch(8, (16, 16, 3), 10))
  state, metrics = step(state, _batch(8, (16, 16, 3), 10, seed=1))
  assert step._cache_size() == 1
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), stats0,
                                   state.batch_stats)
  assert all(jax.tree_util.tree_leaves(changed))   # running stats were updated
  with pytest.raises(ValueError, match=r"unknown loss config key\(s\) \['smoothing'\]"):
    steps.make_train_step({'smoothing': 0.1})


def test_googlenet_aux_logits_enter_the_loss(fast_compile):
  tx, _ = _sgd()
  state = state_lib.create_train_state(get_model('googlenet_tiny'), tx, (96, 96, 3), RNG)
  batch = _batch(2, (96, 96, 3), 10)

  @jax.jit
  def loss(state, w):
    total, (logits, parts, _) = steps.compute_loss(state.params, state, batch, state.rng,
                                                   aux_weight=w)
    return total, parts

  with_aux, parts = loss(state, 0.3)
  without, parts0 = loss(state, 0.0)
  assert float(parts['aux_loss']) > 2.0      # two CE terms of ~ln(10) each
  np.testing.assert_allclose(without, parts['ce_loss'], rtol=1e-6)
  np.testing.assert_allclose(with_aux - without, 0.3 * parts['aux_loss'], rtol=1e-5)


def test_dropout_depends_only_on_rng_and_step(fast_compile):
  tx, _ = _sgd()
  model = get_model('alexnet_tiny')
  s0 = state_lib.create_train_state(model, tx, (31, 31, 3), RNG)
  batch = _batch(4, (31, 31, 3), 10)
  step = jax.jit(functools.partial(steps.train_step))   # no donation: states are reused
  s1 = s0
  for _ in range(3):
    s1, _ = step(s1, batch)
  # Same params/opt state at step 3 but a different history: the same draw.
  fresh = s0.replace(params=s1.params, opt_state=s1.opt_state, step=s1.step)
  _, m_hist = step(s1, batch)
  _, m_fresh = step(fresh, batch)
  assert float(m_hist['loss']) == float(m_fresh['loss'])
  # Another step number: other dropout masks, another loss for the same params.
  _, m_other = step(s1.replace(step=s1.step + 1), batch)
  assert float(m_other['loss']) != float(m_hist['loss'])


def test_binary_single_logit(fast_compile):
  logits = jnp.array([[2.0], [-1.0], [0.5]])
  labels = jnp.array([1, 1, 0])
  z, y = np.asarray(logits[:, 0], np.float64), np.asarray(labels, np.float64)
  ref = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
  np.testing.assert_allclose(steps.cross_entropy(logits, labels), ref, rtol=1e-5)
  tx, _ = _sgd()
  state = state_lib.create_train_state(get_model('lenet5', num_classes=1), tx, (32, 32, 1),
                                       RNG)
  _, metrics = jax.jit(steps.train_step)(state, _batch(8, (32, 32, 1), 2))
  assert 'top5_accuracy' not in metrics and np.isfinite(float(metrics['loss']))


# ---------------------------------------------------------------- eval_step

def _logit_state():
  # apply_fn returns its input: the batch 'image' holds the logits.
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32),
                              apply_fn=lambda v, x, train: x, params={}, batch_stats={},
                              opt_state=(), tx=optax.identity(), rng=RNG)


def test_eval_metrics_exact_with_mask_and_uneven_batches():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((11, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 11)
  mask = np.ones(11, np.float32)
  mask[[2, 9, 10]] = 0           # padding
  labels[[9, 10]] = 0
  keep = mask > 0
  z = logits[keep].astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ref_loss = -logp[np.arange(len(z)), labels[keep]].mean()
  ref_acc = (z.argmax(-1) == labels[keep]).mean()
  rank = (z > z[np.arange(len(z)), labels[keep]][:, None]).sum(-1)
  ref_top5 = (rank < 5).mean()

  state = _logit_state()
  step = steps.make_eval_step()
  parts = [step(state, {'image': logits[a:b], 'label': labels[a:b], 'mask': mask[a:b]})
           for a, b in [(0, 4), (4, 11)]]   # unequal sizes, padding in both
  out = steps.finalize_eval_metrics(parts)
  assert out['count'] == 8
  assert out['loss'] == pytest.approx(ref_loss, rel=1e-6)
  assert out['accuracy'] == pytest.approx(ref_acc)
  assert out['top5_accuracy'] == pytest.approx(ref_top5)

  # Summed over 8 devices under pmap: the same totals (padded to 16 examples).
  pad = lambda a: np.concatenate([a, np.zeros((5,) + a.shape[1:], a.dtype)])
  sharded = {'image': pad(logits), 'label': pad(labels), 'mask': pad(mask)}
  sharded = jax.tree_util.tree_map(lambda a: a.reshape((8, 2) + a.shape[1:]), sharded)
  totals = jax.tree_util.tree_map(lambda x: x[0], steps.make_eval_step(axis_name='b')(
      jax.tree_util.tree_map(lambda x: jnp.stack([x] * 8), state), sharded))
  for k, v in steps.finalize_eval_metrics(totals).items():
    assert v == pytest.approx(out[k], rel=1e-6), k


# ---------------------------------------------------------------- devices

def test_pmap_jit_and_sharded_jit_agree(fast_compile):
  n = jax.device_count()
  assert n == 8
  tx, _ = _sgd(lr=0.1)
  state = state_lib.create_train_state(get_model('lenet5'), tx, (32, 32, 1), RNG)
  batches = [_batch(16, (32, 32, 1), 10, seed=s) for s in range(2)]

  jit_step = jax.jit(steps.train_step)
  s_jit = state
  for b in batches:
    s_jit, m_jit = jit_step(s_jit, b)

  mesh = Mesh(np.array(jax.devices()), ('data',))
  shard = NamedSharding(mesh, P('data'))
  s_sh = jax.device_put(state, NamedSharding(mesh, P()))
  for b in batches:
    s_sh, m_sh = jit_step(s_sh, jax.device_put(b, shard))

  pstep = steps.make_train_step(axis_name='batch')
  s_pm = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), state)
  for b in batches:
    s_pm, m_pm = pstep(s_pm, jax.tree_util.tree_map(
        lambda x: x.reshape((n, -1) + x.shape[1:]), b))
  s_pm = jax.tree_util.tree_map(lambda x: x[0], s_pm)

  for other, m in [(s_sh, m_sh), (s_pm, m_pm)]:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
                           s_jit.params, other.params)
    np.testing.assert_allclose(np.asarray(m['loss']).reshape(-1)[0], m_jit['loss'],
                               rtol=1e-5)
