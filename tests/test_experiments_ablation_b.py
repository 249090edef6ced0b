"""experiments/regularization and experiments/mnist1d: configs validate, the sweeps
expand to the intended points, and every point's config validates. No training."""
import importlib.util
import json
import os

import pytest

from cnn_jax.train import config as config_lib
from cnn_jax.train import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, file='config'):
  path = os.path.join(REPO, 'experiments', name, file + '.py')
  spec = importlib.util.spec_from_file_location(f'experiment_{name}_{file}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def regularization():
  return _load('regularization')


@pytest.fixture(scope='module')
def mnist1d():
  return _load('mnist1d')


def test_regularization_base_is_the_plain_net(regularization):
  config = config_lib.validate(regularization.get_config())
  assert (config.model, config.dataset) == ('ablation_cnn', 'digits')
  assert (config.train_split, config.val_split, config.eval_split) == (
      'train[:90%]', 'train[90%:]', 'test')
  kw = config.model_kwargs
  assert not kw.batch_norm and not kw.lrn and kw.dropout_rate == 0.0
  assert config.optimizer.weight_decay == 0.0 and config.train_transform == ''
  assert not config.progress_bar and not config.print_summary


def test_regularization_sweep_is_one_factor_at_a_time(regularization):
  points = sweep.load_sweep(regularization)
  assert len(points) == 7 * 3
  lr, hi = regularization.BASE_LR, regularization.HIGH_LR
  names = sweep.names(points)
  assert names[:3] == [
      f'lr={lr:g},batch_norm=False,lrn=False,dropout_rate=0,weight_decay=0,seed={s}'
      for s in range(3)]
  assert names[-1] == (f'lr={hi:g},batch_norm=True,lrn=False,dropout_rate=0,'
                       'weight_decay=0,seed=2')
  base = dict(zip(regularization.KEYS, regularization.ARMS['none']))
  arms = {tuple(p[k] for k in regularization.KEYS) for p in points}
  assert len(arms) == 7
  for arm in arms:
    changed = {k for k, v in zip(regularization.KEYS, arm) if v != base[k]}
    # One regulariser on at the base lr; the lr comparison is plain vs BatchNorm.
    assert len(changed) <= 1 or changed == {'optimizer.lr', 'model_kwargs.batch_norm'}
  for p in points:   # every point sets every key: every row has every column
    assert list(p) == list(regularization.KEYS) + ['seed']
  assert sorted({p['seed'] for p in points}) == [0, 1, 2]


def test_regularization_every_point_validates(regularization):
  planned = sweep.plan(regularization.get_config(), sweep.load_sweep(regularization))
  by_name = {name: cfg for name, _, cfg in planned}
  cfg = by_name['lr=0.05,batch_norm=False,lrn=False,dropout_rate=0.5,weight_decay=0,seed=1']
  assert cfg.model_kwargs.dropout_rate == 0.5 and cfg.seed == 1
  assert not cfg.model_kwargs.batch_norm and cfg.optimizer.lr == 0.05
  cfg = by_name['lr=0.05,batch_norm=False,lrn=False,dropout_rate=0,weight_decay=0.0005,seed=0']
  assert cfg.optimizer.weight_decay == 5e-4


def test_regularization_scales_to_cifar10_by_an_override_file(regularization):
  cifar10 = _load('regularization', 'cifar10')
  config = config_lib.validate(cifar10.get_config())
  assert config.dataset == 'cifar10' and config.val_split == 'train[45000:]'
  assert config.eval_transform == 'normalize(cifar10)'
  # Only the data and its sizes change: the arms and the plain baseline are the same.
  assert not config.model_kwargs.batch_norm and config.optimizer.weight_decay == 0.0
  assert cifar10.get_sweep() == regularization.get_sweep()
  planned = sweep.plan(config, cifar10.get_sweep())
  assert len(planned) == 21 and all(c.dataset == 'cifar10' for _, _, c in planned)


def test_mnist1d_config_validates(mnist1d):
  config = config_lib.validate(mnist1d.get_config())
  assert config.dataset == 'mnist1d' and config.optimizer.name == 'adam'
  assert not config.progress_bar and not config.print_summary


def test_mnist1d_sweep_is_three_models_by_three_seeds(mnist1d):
  points = sweep.load_sweep(mnist1d)
  assert sweep.names(points) == [f'model={m},seed={s}'
                                 for m in ('logistic_regression', 'mlp', 'cnn1d')
                                 for s in range(3)]
  planned = sweep.plan(mnist1d.get_config(), points)
  # One recipe for every model: only the model and the seed differ between points.
  recipes = set()
  for _, point, cfg in planned:
    assert (cfg.model, cfg.seed) == (point['model'], point['seed'])
    recipe = cfg.to_dict()
    del recipe['model'], recipe['seed']
    recipes.add(json.dumps(recipe, sort_keys=True, default=str))
  assert len(recipes) == 1
