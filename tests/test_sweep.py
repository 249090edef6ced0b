"""Sweeps: expansion and naming, up-front validation, resume, --sweep_index, results."""
import csv
import json
import os
import subprocess
import sys

import pytest

from cnn_jax.train import config as config_lib
from cnn_jax.train import loop
from cnn_jax.train import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_axis_zip_product_and_concat():
  depth = sweep.axis('model_kwargs.depth', [11, 13])
  ks = sweep.zipped(**{'model_kwargs.kernel_size': [3, 5], 'model_kwargs.padding': [1, 2]})
  points = sweep.product(depth, ks)
  assert points == [
      {'model_kwargs.depth': 11, 'model_kwargs.kernel_size': 3, 'model_kwargs.padding': 1},
      {'model_kwargs.depth': 11, 'model_kwargs.kernel_size': 5, 'model_kwargs.padding': 2},
      {'model_kwargs.depth': 13, 'model_kwargs.kernel_size': 3, 'model_kwargs.padding': 1},
      {'model_kwargs.depth': 13, 'model_kwargs.kernel_size': 5, 'model_kwargs.padding': 2}]
  both = sweep.concat(sweep.axis('model', ['plain20']), sweep.axis('model', ['resnet20']))
  assert both == [{'model': 'plain20'}, {'model': 'resnet20'}]
  with pytest.raises(ValueError, match='equal lengths'):
    sweep.zipped(a=[1, 2], b=[1])
  with pytest.raises(ValueError, match='twice'):
    sweep.product(sweep.axis('seed', [0]), sweep.axis('seed', [1]))
  with pytest.raises(ValueError, match='no values'):
    sweep.axis('seed', [])


def test_point_names_are_short_unique_and_path_safe():
  points = sweep.product(sweep.axis('optimizer.lr', [0.1, 0.01]),
                         sweep.axis('model_kwargs.widths', [(16, 32), (8, 16)]),
                         sweep.axis('seed', [0]))
  assert sweep.names(points) == ['lr=0.1,widths=16x32,seed=0', 'lr=0.1,widths=8x16,seed=0',
                                 'lr=0.01,widths=16x32,seed=0', 'lr=0.01,widths=8x16,seed=0']
  # Two keys ending alike keep enough of their paths to differ.
  short = sweep.short_keys([{'optimizer.lr': 1, 'transfer.lr': 2}])
  assert short == {'optimizer.lr': 'optimizer.lr', 'transfer.lr': 'transfer.lr'}
  assert sweep.point_name({'dataset': 'a/b c'}, {}) == 'dataset=a_b_c'
  with pytest.raises(ValueError, match='repeat'):
    sweep.names([{'seed': 0}, {'seed': 0}])


def _config():
  c = config_lib.default_config()
  c.model, c.dataset, c.num_train_steps = 'cifar_resnet_tiny', 'digits', 2
  return c


def test_points_are_applied_with_the_config_checks():
  c = sweep.apply_point(_config(), {'optimizer.lr': 0.5, 'model_kwargs.depth': 14,
                                    'seed': 3})
  assert c.optimizer.lr == 0.5 and c.model_kwargs.depth == 14 and c.seed == 3
  assert _config().optimizer.lr == 0.1          # the base config is not changed
  with pytest.raises(ValueError, match="'optimizer.lrr' is not a config key"):
    sweep.apply_point(_config(), {'optimizer.lrr': 0.5})
  with pytest.raises(ValueError, match="'seed'"):
    sweep.apply_point(_config(), {'seed': 'abc'})
  # A bad point fails before any point trains, naming the point.
  with pytest.raises(ValueError, match="sweep point 'model=nope'"):
    sweep.plan(_config(), [{'model': 'cifar_resnet_tiny'}, {'model': 'nope'}])


def _fake_finished(point_dir, test_error, step=2, seed_loss=1.0):
  os.makedirs(point_dir, exist_ok=True)
  with open(os.path.join(point_dir, 'final_metrics.json'), 'w') as f:
    json.dump({'step': step, 'num_train_steps': 2, 'test_error': test_error,
               'test_accuracy': 1 - test_error, 'test_loss': seed_loss,
               'num_params': 1234, 'flops_per_example': 56789, 'train_seconds': 3.0}, f)
  with open(os.path.join(point_dir, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': 1, 'train/loss': 2.0}) + '\n')
    f.write(json.dumps({'step': 2, 'train/loss': seed_loss, 'val/accuracy': 0.6}) + '\n')
  with open(os.path.join(point_dir, 'epochs.csv'), 'w') as f:
    f.write('step,epoch,train/loss,train/error,val/error\n1,0.5,2.0,0.9,0.8\n'
            f'2,1.0,{seed_loss},0.5,0.4\n')


def test_a_partly_finished_sweep_runs_only_the_rest(tmp_path, monkeypatch):
  points = sweep.product(sweep.axis('optimizer.lr', [0.1, 0.2]), sweep.axis('seed', [0, 1]))
  names = sweep.names(points)
  _fake_finished(tmp_path / names[0], 0.2)
  os.makedirs(tmp_path / names[1])   # started, not finished: resumes
  calls = []

  def fake_train(config, workdir):
    calls.append((os.path.basename(workdir), config.optimizer.lr, config.seed))
    _fake_finished(workdir, 0.1 + config.seed * 0.1)
    return {}
  monkeypatch.setattr(loop, 'train_and_evaluate', fake_train)
  rows = sweep.run_sweep(_config(), points, str(tmp_path))
  assert calls == [(names[1], 0.1, 1), (names[2], 0.2, 0), (names[3], 0.2, 1)]
  assert [r['status'] for r in rows] == ['done'] * 4
  # Run again: nothing left to train.
  calls.clear()
  sweep.run_sweep(_config(), points, str(tmp_path))
  assert calls == []
  record = json.load(open(tmp_path / names[2] / 'sweep_point.json'))
  assert record['overrides'] == {'optimizer.lr': 0.2, 'seed': 0}


def test_sweep_index_runs_one_point(tmp_path, monkeypatch):
  points = sweep.axis('seed', [0, 1, 2])
  calls = []
  monkeypatch.setattr(loop, 'train_and_evaluate',
                      lambda config, workdir: calls.append(config.seed) or {})
  assert sweep.run_sweep(_config(), points, str(tmp_path), index=2) is None
  assert calls == [2]
  with pytest.raises(ValueError, match='out of range: this sweep has 3 points'):
    sweep.run_sweep(_config(), points, str(tmp_path), index=3)


def test_results_tables_from_fake_point_results(tmp_path):
  points = sweep.product(sweep.axis('optimizer.lr', [0.1, 0.2]), sweep.axis('seed', [0, 1]))
  names = sweep.names(points)
  errors = [0.10, 0.20, 0.30, None]          # the last point has not finished
  for name, err in zip(names, errors):
    if err is not None:
      _fake_finished(tmp_path / name, err, seed_loss=err * 2)
  rows = sweep.aggregate(str(tmp_path), sweep.plan(_config(), points))
  assert [r['status'] for r in rows] == ['done', 'done', 'done', 'missing']
  with open(tmp_path / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [t['name'] for t in table] == names
  assert float(table[1]['test_error']) == 0.2 and float(table[1]['train_loss']) == 0.4
  assert table[0]['optimizer.lr'] == '0.1' and table[3]['status'] == 'missing'
  md = open(tmp_path / 'results.md').read()
  assert '| lr | seed | num_params |' in md
  # lr=0.1 over seeds 0 and 1: test error 0.15 +- 0.0707 (ddof 1); lr=0.2: one seed.
  assert '| 0.1 | 1,234 | 56,789 |' in md and '0.1500 ± 0.0707' in md and '| 2/2 |' in md
  assert '| 0.3000 |' in md and '| 1/2 |' in md     # one seed: no spread
  assert os.path.getsize(tmp_path / 'results.png') > 5000
  assert os.path.exists(tmp_path / 'curves.png')


def test_launch_sweep_results_mode(tmp_path):
  cfg = tmp_path / 'cfg.py'
  cfg.write_text(
      'from cnn_jax.train.config import default_config\n'
      'from cnn_jax.train import sweep\n'
      'def get_config(arg=None):\n'
      '  c = default_config()\n'
      "  c.model, c.dataset, c.num_train_steps = 'cifar_resnet_tiny', 'digits', 2\n"
      '  return c\n'
      'def get_sweep():\n'
      "  return sweep.axis('seed', [0, 1])\n")
  _fake_finished(tmp_path / 'w' / 'seed=0', 0.25)
  env = dict(os.environ, PYTHONPATH=REPO)
  # 'file:arg' configs work too (the argument goes to get_config).
  out = subprocess.run([sys.executable, 'launch.py', '--mode=sweep_results',
                        f'--config={cfg}:x', f'--workdir={tmp_path / "w"}'], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr
  assert '| 0 | 1,234 |' in out.stdout and 'missing' in out.stdout
  bad = subprocess.run([sys.executable, 'launch.py', '--mode=sweep', f'--config={cfg}',
                        f'--workdir={tmp_path / "w"}', '--sweep_index=5'], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
  assert bad.returncode == 2 and 'out of range' in bad.stderr


def test_a_diverging_point_is_a_result_not_a_failed_sweep(tmp_path, monkeypatch):
  points = sweep.axis('optimizer.lr', [0.1, 10.0])
  calls = []

  def fake_train(config, workdir):
    calls.append(config.optimizer.lr)
    if config.optimizer.lr > 1:
      raise loop.NonFiniteLossError('training loss is nan at step 3')
    _fake_finished(workdir, 0.1)
    return {}
  monkeypatch.setattr(loop, 'train_and_evaluate', fake_train)
  rows = sweep.run_sweep(_config(), points, str(tmp_path))
  assert [r['status'] for r in rows] == ['done', 'diverged']
  assert 'diverged' in open(tmp_path / 'results.md').read()
  calls.clear()
  sweep.run_sweep(_config(), points, str(tmp_path))   # neither point runs again
  assert calls == []


def test_results_of_a_missing_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='holds no sweep'):
    sweep.aggregate(str(tmp_path / 'nope'), sweep.plan(_config(), sweep.axis('seed', [0])))
