"""experiments/transfer_digits: configs validate, every arm builds, the table writes.

No training here: the experiment itself is `python experiments/transfer_digits/run.py`.
"""
import csv
import os

import pytest

from cnn_jax.train import config as config_lib
from cnn_jax.train import loop
from experiments.transfer_digits import pretrain, run, transfer


@pytest.fixture
def fake_pretrain_dir(tmp_path):
  # validate() only checks that transfer.init_from exists; nothing is read from it
  # until a run starts.
  path = tmp_path / 'pretrain'
  path.mkdir()
  return str(path)


def test_pretrain_config_validates():
  config = config_lib.validate(pretrain.get_config())
  assert config.classes == '0-4' and config.train_examples_per_class is None
  assert not config.transfer.init_from


@pytest.mark.parametrize('arm', transfer.ARMS)
def test_arm_config_validates_and_matches_pretraining(arm, fake_pretrain_dir):
  config = config_lib.validate(run.arm_config(arm, 1, fake_pretrain_dir))
  source = pretrain.get_config()
  assert (config.model, config.model_kwargs.to_dict()) == (
      source.model, source.model_kwargs.to_dict())
  assert config.classes == '5-9' and config.train_examples_per_class == 10
  assert config.seed == 1
  assert config.num_train_steps == transfer.NUM_TRAIN_STEPS
  assert config.optimizer.lr == transfer.LR[arm]
  assert config.transfer.init_from == ('' if arm == 'scratch' else fake_pretrain_dir)
  # Augmentation wherever the images reach trained layers, none for cached features.
  assert bool(config.train_transform) == (arm != 'features')


def test_arm_configs_build(fake_pretrain_dir, tmp_path):
  """Run() builds each arm's data, model and optimizer (no compute, nothing loaded)."""
  runs = {arm: loop.Run(run.arm_config(arm, 0, fake_pretrain_dir), str(tmp_path / arm))
          for arm in transfer.ARMS}
  for arm, r in runs.items():
    assert len(r.train_source) == 50, arm
    assert r.num_classes == 5, arm
  assert runs['scratch'].plan is None and runs['finetune_all'].plan is None
  assert runs['features'].backbone is not None
  assert runs['features'].input_shape == (64,)   # pre_logits of widths (16, 32, 64)
  plan = runs['finetune_top'].plan
  frozen = sorted({plan.stage[p] for p in plan.stage if not plan.trainable(p, 0)})
  assert frozen == ['stage1', 'stage2', 'stem']
  assert plan.order == ['stem', 'stage1', 'stage2', 'stage3', 'head']


def test_unknown_arm_is_an_error():
  with pytest.raises(ValueError, match='unknown arm'):
    transfer.get_config('linear_probe')


def test_lr_grid_holds_every_chosen_lr():
  assert set(transfer.LR) == set(transfer.ARMS)
  assert set(transfer.LR.values()) <= set(transfer.LR_GRID)


def _fake_rows():
  rows = []
  for arm, accs in [('scratch', (0.9, 0.92, 0.94)), ('features', (0.75, 0.8, 0.7)),
                    ('finetune_top', (0.95, 0.96, 0.97)), ('finetune_all', (0.9, 0.9, 0.9))]:
    for seed, acc in enumerate(accs):
      rows.append(dict(arm=arm, seed=seed, lr=0.05, test_accuracy=acc,
                       test_loss=0.3, val_accuracy=0.8, val_loss=0.5,
                       train_seconds=10.0 + seed, wall_seconds=30.0 + seed,
                       workdir=f'/x/{arm}_seed{seed}'))
  return rows


def test_write_results_on_fake_results(tmp_path):
  rows = _fake_rows()
  pre = dict(test_accuracy=0.994, train_seconds=70.0, wall_seconds_this_call=90.0)
  text = run.write_results(rows, str(tmp_path), pretrain=pre, seeds=[0, 1, 2],
                           total_seconds=700.0)
  for name in ('results.csv', 'results.md', 'results.png'):
    assert os.path.getsize(tmp_path / name) > 0
  with open(tmp_path / 'results.csv') as f:
    saved = list(csv.DictReader(f))
  assert len(saved) == 12 and saved[0]['arm'] == 'scratch'
  assert float(saved[4]['test_accuracy']) == pytest.approx(0.8)
  assert (tmp_path / 'results.md').read_text() == text
  assert 'Pretraining (digits 0-4): test accuracy 99.4 %' in text
  # Mean ± sample std over seeds, per-seed values, mean times.
  assert ('| (a) from scratch | 0.05 | 92.0 ± 2.0 % | 90.0, 92.0, 94.0 | 11.0 (10.0) | '
          '31.0 (30.0) |') in text
  assert 'as each was measured when it ran: 462 s (pretraining + 12 transfer runs)' in text
  assert '(d) fine-tune all, lower lr' in text and '90.0 ± 0.0 %' in text


def test_summarize_and_best_lrs():
  summary = run.summarize(_fake_rows(), arms=['features', 'scratch'])
  assert [s['arm'] for s in summary] == ['features', 'scratch']
  assert summary[0]['acc_mean'] == pytest.approx(0.75)
  rows = [dict(arm='scratch', lr=lr, val_accuracy=acc, val_loss=loss)
          for lr, acc, loss in [(0.01, 0.9, 0.4), (0.03, 0.95, 0.5), (0.1, 0.95, 0.3),
                                (0.3, float('nan'), float('nan'))]]
  assert run.best_lrs(rows) == {'scratch': 0.1}
  rows += [dict(arm='finetune_all', lr=lr, val_accuracy=acc, val_loss=0.5)
           for lr, acc in [(0.01, 0.8), (0.03, 0.85), (0.1, 0.9)]]
  assert run.best_lrs(rows)['finetune_all'] == 0.1
  assert run.best_lrs(rows, {'finetune_all': 'scratch'}) == {'scratch': 0.1,
                                                             'finetune_all': 0.03}
