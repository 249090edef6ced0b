"""The training loop end to end on the embedded digits data: files, resume, errors."""
import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from cnn_jax.train import checkpoint as ckpt_lib
from cnn_jax.train import config as config_lib
from cnn_jax.train import loop, writers


@pytest.fixture(scope='module')
def data_dir(digits_data_dir):
  return digits_data_dir


def small_config(data_dir, **overrides):
  c = config_lib.default_config()
  c.model = 'lenet5'
  c.dataset = 'digits'
  c.data_dir = data_dir
  c.train_split = 'train[:90%]'
  c.val_split = 'train[90%:]'
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_train_steps = 6
  c.eval_every_steps = 3
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 2
  c.optimizer.name = 'momentum'
  c.optimizer.lr = 0.05
  c.progress_bar = False
  c.print_summary = False
  c.write_plots = False
  return config_lib.from_dict(overrides, c)


def _params(workdir):
  """Parameters of the newest checkpoint, as a flat dict of NumPy arrays."""
  step = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  run = loop.Run(json.load(open(os.path.join(workdir, 'config.json'))), workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  state, meta = ckpt.restore_latest(loop._host_target(run.abstract_state()))
  ckpt.close()
  assert meta['step'] == step
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(
              {'params': state.params, 'opt': state.opt_state})}


def test_run_writes_everything_and_eval_reproduces(data_dir, tmp_path, fast_compile, capsys):
  workdir = str(tmp_path / 'run')
  config = small_config(data_dir, write_plots=True, print_summary=True, progress_bar=True)
  final = loop.train_and_evaluate(config, workdir)
  for name in ('config.json', 'metrics.jsonl', 'final_metrics.json', 'summary.txt',
               'training_curves.png', 'confusion_matrix.png', 'confusion_matrix.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert final['step'] == 6 and final['test_count'] == 360
  for key in ('test_accuracy', 'test_loss', 'test_top5_accuracy', 'test_error',
              'test_top5_error', 'test_macro_f1', 'test_macro_precision', 'test_macro_recall'):
    assert np.isfinite(final[key]), key
  assert final == json.load(open(os.path.join(workdir, 'final_metrics.json')))
  assert sum(map(sum, json.load(open(os.path.join(workdir, 'confusion_matrix.json'))))) == 360
  # Checkpoints: the last keep_checkpoints=2 steps plus the best by val/accuracy.
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps[-2:] == [4, 6] and len(steps) <= 3
  records = writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records if 'train/loss' in r] == [2, 3, 4, 6]
  assert [r['step'] for r in records if 'val/accuracy' in r] == [3, 6]
  tb = writers.read_tfevents(os.path.join(workdir, 'tensorboard'))
  assert {t for _, t, _ in tb} >= {'train/loss', 'val/accuracy', 'train/lr'}
  out = capsys.readouterr().out
  assert 'Layer' in out and 'Final metrics' in out
  # Eval mode restores the last checkpoint and reproduces the final test metrics.
  again = loop.evaluate(config, workdir)
  for key, value in again.items():
    if key != 'step':
      assert value == pytest.approx(final[key], abs=1e-6), key
  # Running the finished run again returns its metrics without training.
  t = time.time()
  assert loop.train_and_evaluate(config, workdir) == final
  assert time.time() - t < 30


def test_resume_is_bit_identical(data_dir, tmp_path, fast_compile):
  config = small_config(data_dir, model='lenet5', train_transform='flip|rotate(10)')
  straight = str(tmp_path / 'straight')
  loop.train_and_evaluate(config, straight)
  resumed = str(tmp_path / 'resumed')
  assert loop.train_and_evaluate(config, resumed, stop_after_steps=4) == {
      'status': 'stopped', 'step': 4}
  final = loop.train_and_evaluate(config, resumed)
  a, b = _params(straight), _params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  first = json.load(open(os.path.join(straight, 'final_metrics.json')))
  for key in first:
    if key.startswith('test_'):
      assert final[key] == first[key], key
  # The resumed run's log has the same steps and values as the uninterrupted one.
  rec = lambda w: [{k: v for k, v in r.items() if k != 'time'}
                   for r in writers.read_jsonl(os.path.join(w, 'metrics.jsonl'))]
  assert rec(straight) == rec(resumed)
  # So are the per-epoch rows (the row at step 6 spans the interruption at step 4).
  assert (writers.read_csv(os.path.join(straight, 'epochs.csv'))
          == writers.read_csv(os.path.join(resumed, 'epochs.csv')))


def test_damaged_latest_checkpoint_falls_back(data_dir, tmp_path, fast_compile, capsys):
  config = small_config(data_dir, checkpoint_every_steps=2, keep_checkpoints=3,
                        best_metric='')
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(config, workdir, stop_after_steps=4)
  ckdir = os.path.join(workdir, 'checkpoints')
  assert sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) == [2, 4]
  # Damage every array file of step 4 and leave a half-written save of step 6.
  for root, _, files in os.walk(os.path.join(ckdir, '4', 'state')):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  os.makedirs(os.path.join(ckdir, '6.orbax-checkpoint-tmp-123'))
  final = loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'checkpoint step 4 is damaged' in out and 'Resuming from checkpoint step 2' in out
  assert final['step'] == 6
  # Nothing was deleted: the damaged step was moved aside with the reason.
  aside = [d for d in os.listdir(ckdir) if d.startswith('4.damaged-')]
  assert len(aside) == 1 and os.path.exists(os.path.join(ckdir, aside[0], 'REASON.txt'))


def test_nan_loss_stops_with_step_and_keeps_last_good(data_dir, tmp_path, fast_compile):
  config = small_config(data_dir, num_train_steps=40, checkpoint_every_steps=1,
                        log_every_steps=1, val_split=None, best_metric='')
  config.optimizer.lr = 1e12
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.NonFiniteLossError, match=r'at step (\d+); run stopped') as e:
    loop.train_and_evaluate(config, workdir)
  bad_step = int(e.value.args[0].split('at step ')[1].split(';')[0])
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert saved and max(saved) == bad_step - 1
  assert f'Last good checkpoint: step {bad_step - 1}' in e.value.args[0]


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path, fast_compile):
  config = small_config(data_dir, num_train_steps=100000, checkpoint_every_steps=10**6,
                        val_split=None, best_metric='')
  workdir = str(tmp_path / 'run')
  sent = []

  def kill_soon(ex):
    if not sent:
      sent.append(1)
      threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    return ex

  # The timer starts once the first training batch is read, so compile time does not race it.
  orig = loop.Run.train_loader

  def loader(self):
    ds = orig(self)
    return ds.map(kill_soon)

  loop.Run.train_loader = loader
  try:
    result = loop.train_and_evaluate(config, workdir)
  finally:
    loop.Run.train_loader = orig
  assert result['status'] == 'stopped' and 0 < result['step'] < 100000
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert saved == [result['step']]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
      signal.getsignal(signal.SIGTERM))


def test_config_change_refused_unless_allowed(data_dir, tmp_path, fast_compile):
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(small_config(data_dir, num_train_steps=2, val_split=None,
                                       best_metric=''), workdir)
  changed = small_config(data_dir, num_train_steps=2, val_split=None, best_metric='')
  changed.optimizer.lr = 0.01
  with pytest.raises(ckpt_lib.ConfigMismatchError, match=r"optimizer.lr.*allow_config_change"):
    loop.train_and_evaluate(changed, workdir)
  # Training longer is not a different run: it resumes.
  longer = small_config(data_dir, num_train_steps=4, val_split=None, best_metric='')
  assert loop.train_and_evaluate(longer, workdir)['step'] == 4
  changed.allow_config_change = True
  changed.num_train_steps = 4
  assert loop.train_and_evaluate(changed, workdir)['step'] == 4


@pytest.mark.parametrize('overrides, match', [
    ({'modle': 'lenet5'}, r"unknown config key 'modle'.*Did you mean 'model'"),
    ({'optimizer': {'lr_rate': 0.1}}, r"unknown config key 'optimizer.lr_rate'"),
    ({'batch_size': 'big'}, r"'batch_size' has the wrong type"),
    ({'model': 'lenet6'}, r'lenet6'),
    ({'num_epochs': 2.0}, r'exactly one of'),
    ({'parallelism': 'pjit'}, r"'parallelism' is 'pjit'"),
    ({'optimizer': {'name': 'adamax'}}, r"unknown optimizer 'adamax'"),
    ({'loss': {'name': 'hinge'}}, r"'loss.name' is 'hinge'"),
    ({'train_transform': 'flip|twirl(3)'}, r"train_transform.*twirl"),
    ({'batch_size': 0}, r"'batch_size' must be positive"),
    ({'val_split': None, 'early_stopping_patience': 2}, r'needs a validation split'),
])
def test_bad_configs_fail_before_compute(data_dir, overrides, match):
  t = time.time()
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(small_config(data_dir, **overrides), '/nonexistent/never')
  assert time.time() - t < 5
  assert not os.path.exists('/nonexistent/never')


def test_locked_config_rejects_typos_and_types():
  c = config_lib.default_config()
  with pytest.raises(AttributeError, match='modle'):
    c.modle = 'x'
  with pytest.raises(TypeError, match='batch_size'):
    c.batch_size = 'x'


def test_missing_catalog_dataset_fails_fast(tmp_path):
  t = time.time()
  c = small_config(str(tmp_path), dataset='cifar10')
  with pytest.raises(ValueError, match=r'make data DATASET=cifar10'):
    loop.train_and_evaluate(c, str(tmp_path / 'run'))
  assert time.time() - t < 10


def test_batch_not_divisible_by_devices(data_dir):
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    loop.Run(small_config(data_dir, batch_size=12), '/tmp/unused')


def test_early_stopping_and_plateau(data_dir, tmp_path, fast_compile):
  # At lr 1e-6 the validation accuracy does not move after the first evaluation.
  config = small_config(data_dir, num_train_steps=30, eval_every_steps=2,
                        early_stopping_patience=2, log_every_steps=1)
  config.optimizer.lr = 1e-6
  config.optimizer.schedule = 'plateau'
  config.optimizer.plateau_patience = 1
  workdir = str(tmp_path / 'run')
  final = loop.train_and_evaluate(config, workdir)
  assert final['step'] == 6   # evals at 2 (best), 4 (bad 1), 6 (bad 2): stop
  records = writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  lr = {r['step']: r['train/lr'] for r in records if 'train/lr' in r}
  # Reduced x0.1 after each evaluation without improvement (plateau_patience=1).
  assert lr[1] == pytest.approx(1e-6) and lr[4] == pytest.approx(1e-6)
  assert lr[5] == pytest.approx(1e-7) and lr[6] == pytest.approx(1e-7)
  again = loop.train_and_evaluate(config, workdir)
  assert again == final
