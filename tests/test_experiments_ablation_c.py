"""The depth and activation experiments: configs valid, sweeps as intended."""
import importlib.util
import os

import jax.numpy as jnp
import numpy as np

from cnn_jax import models
from cnn_jax.train import config as config_lib
from cnn_jax.train import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(rel):
  path = os.path.join(REPO, rel)
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_depth_sweeps_expand_and_validate():
  vgg = _load('experiments/depth/vgg.py')
  points = vgg.get_sweep()
  assert sweep.names(points)[:2] == ['kernels=3,seed=0', 'kernels=3,seed=1']
  assert len(points) == 8
  planned = sweep.plan(vgg.get_config(), points)
  depths = [len(cfg.model_kwargs.kernels) * 3 for _, _, cfg in planned]
  assert depths == [3, 3, 6, 6, 9, 9, 12, 12]
  residual = _load('experiments/depth/residual.py')
  names = sweep.names(residual.get_sweep())
  assert names == ['depth=20,shortcut=none,seed=0', 'depth=20,shortcut=A,seed=0',
                   'depth=32,shortcut=none,seed=0', 'depth=32,shortcut=A,seed=0',
                   'depth=56,shortcut=none,seed=0', 'depth=56,shortcut=A,seed=0']
  for _, _, cfg in sweep.plan(residual.get_config(), residual.get_sweep()):
    model = models.get_model(cfg.model, **cfg.model_kwargs)
    assert model.depth in (20, 32, 56) and model.shortcut in ('none', 'A')


def test_activation_sweep_and_gradient_norms(fast_compile):
  act = _load('experiments/activations/config.py')
  planned = sweep.plan(act.get_config(), act.get_sweep())
  assert {cfg.model_kwargs.activation for _, _, cfg in planned} == {'relu', 'tanh', 'sigmoid'}
  assert all(not cfg.model_kwargs.batch_norm for _, _, cfg in planned)
  grad = _load('experiments/activations/grad_norms.py')
  model = models.get_model('ablation_cnn', widths=(4, 4, 4), kernels=(3,), batch_norm=False,
                           activation='sigmoid')
  x = jnp.ones((4, 16, 16, 1)) * jnp.arange(4.0).reshape(4, 1, 1, 1)
  import jax
  # One jitted init instead of op-by-op dispatch of every initializer.
  variables = jax.jit(lambda key: model.init(key, x, train=False))(jax.random.PRNGKey(0))
  norms = grad.layer_grad_norms(model, variables, x, jnp.arange(4))
  assert [n for n, _ in norms] == ['stage1_conv1', 'stage2_conv1', 'stage3_conv1', 'fc']
  values = np.array([v for _, v in norms])
  assert np.all(values > 0)
  # Through sigmoids the gradient shrinks towards the input side.
  assert values[0] < values[1] < values[2]
