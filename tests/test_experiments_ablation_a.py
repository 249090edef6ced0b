"""The filter-size, pooling and padding experiments: their configs and sweeps are
valid, expand to the intended points, and compare what their READMEs say they do."""
import importlib.util
import os

import jax
import pytest

from cnn_jax import models
from cnn_jax.analysis import tables
from cnn_jax.train import config as config_lib
from cnn_jax.train import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = ['seed=0', 'seed=1', 'seed=2']


def _load(name):
  path = os.path.join(REPO, 'experiments', name, 'config.py')
  spec = importlib.util.spec_from_file_location(f'experiment_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _names(*axes):
  """The point names of a product sweep, earlier axes slowest."""
  out = ['']
  for values in axes:
    out = [f'{a},{b}' if a else b for a in out for b in values]
  return out


EXPECTED = {
    'filter_size': _names(['kernels=7', 'kernels=3x3x3', 'kernels=5', 'kernels=3x3'], SEEDS),
    'pooling': _names(['downsample=max', 'downsample=avg', 'downsample=l2',
                       'downsample=strided'], SEEDS),
    'padding': (_names(['padding=0', 'padding=1'], ['kernels=3,widths=16x32x64'], SEEDS)
                + _names(['padding=0', 'padding=1', 'padding=2'], ['kernels=5,widths=16x32'],
                         SEEDS)),
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_config_and_every_sweep_point_validate(name):
  module = _load(name)
  assert f'--config=experiments/{name}/config.py' in module.__doc__   # the command
  config = module.get_config()
  config_lib.validate(config)
  assert config.dataset == 'digits' and not config.progress_bar and not config.print_summary
  points = sweep.load_sweep(module)
  assert sweep.names(points) == EXPECTED[name]
  planned = sweep.plan(config, points)
  assert len(planned) == len(EXPECTED[name])
  for _, point, cfg in planned:
    for key, value in point.items():
      *path, last = key.split('.')
      node = cfg
      for p in path:
        node = node[p]
      assert node[last] == value


def _abstract_params(model_kwargs, input_shape=(32, 32, 1)):
  model = models.get_model('ablation_cnn', num_classes=10, **model_kwargs)
  return tables.abstract_variables(model, input_shape)['params']


def _point_kwargs(name):
  """The distinct model_kwargs of an experiment's points (seeds share a net)."""
  module = _load(name)
  config = module.get_config()
  out = {}
  for p in module.get_sweep():
    kw = sweep.apply_point(config, p).model_kwargs.to_dict()
    out.setdefault(repr(sorted(kw.items())), kw)
  return list(out.values())


@pytest.mark.parametrize('k,stack', [(7, (3, 3, 3)), (5, (3, 3))])
def test_stacked_3x3_convs_have_the_notes_parameter_count(k, stack):
  # A C -> C stage: one k x k conv has k^2 C^2 weights, the stack n * 3^2 C^2.
  c = 16
  kw = dict(widths=(c,), batch_norm=False, num_classes=10)
  head = c * 10 + 10
  one = tables.count_params(models.get_model('ablation_cnn', kernels=(k,), **kw),
                            (32, 32, c)).trainable
  many = tables.count_params(models.get_model('ablation_cnn', kernels=stack, **kw),
                             (32, 32, c)).trainable
  assert one - c - head == k ** 2 * c ** 2
  assert many - len(stack) * c - head == len(stack) * 3 ** 2 * c ** 2
  assert len(stack) * 3 ** 2 < k ** 2                     # 27 < 49, 18 < 25


def test_filter_size_nets_obey_the_formula_stage_by_stage():
  """In the experiment's own nets every stage after the first is C -> C, so its conv
  weights are exactly the notes' n * 3^2 C^2 vs k^2 C^2."""
  weights = {}
  for kw in _point_kwargs('filter_size'):
    c = kw['widths'][0]
    assert set(kw['widths']) == {c}                       # matched channels throughout
    params = _abstract_params(kw)
    per_stage = [sum(params[f'stage{i}_conv{j}']['kernel'].size
                     for j in range(1, len(kw['kernels']) + 1))
                 for i in range(1, len(kw['widths']) + 1)]
    assert all(s == sum(k * k for k in kw['kernels']) * c * c for s in per_stage[1:])
    weights[tuple(kw['kernels'])] = sum(per_stage)
  assert weights[(3, 3, 3)] < weights[(7,)] and weights[(3, 3)] < weights[(5,)]


@pytest.mark.parametrize('name,key', [('pooling', 'downsample'), ('padding', 'padding')])
def test_compared_nets_have_equal_parameters(name, key):
  """Pooling is parameter-free and the global-pooled head ignores the map size, so the
  compared downsampling methods, and the paddings of one net, train the same weights."""
  counts = {}
  for kw in _point_kwargs(name):
    net = (tuple(kw['kernels']), tuple(kw['widths']))
    size = jax.tree_util.tree_reduce(lambda n, x: n + x.size, _abstract_params(kw), 0)
    counts.setdefault(net, {})[kw[key]] = size
  for by_value in counts.values():
    assert len(by_value) > 1 and len(set(by_value.values())) == 1, by_value
