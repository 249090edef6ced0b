"""Segmentation through the one training loop: ResUNet++ (tiny) on the embedded plants."""
import csv
import json
import os

import pytest

from cnn_jax.data import scenes, sources
from cnn_jax.train import config as config_lib
from cnn_jax.train import loop, writers


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  # Only the scenes the run reads (train[:64], validation[:32], test[:32]) instead of
  # all 1,000: the same builder, and record i of a split is still scene(start + i).
  # (test_scenes.py builds the full splits.)
  mp = pytest.MonkeyPatch()
  mp.setattr(scenes, 'SPLITS', {'train': (0, 64), 'validation': (600, 632),
                                'test': (700, 732)})
  try:
    d = str(tmp_path_factory.mktemp('tfds'))
    sources.prepare_embedded('plants', d)
  finally:
    mp.undo()
  return d


def seg_config(data_dir, **overrides):
  c = config_lib.default_config()
  c.task = 'segmentation'
  c.model = 'resunetpp_tiny'
  c.dataset = 'plants'
  c.data_dir = data_dir
  c.train_split = 'train[:64]'
  c.val_split = 'validation[:32]'
  c.eval_split = 'test[:32]'
  c.train_transform = 'resize(32, 32)|flip'
  c.eval_transform = 'resize(32, 32)'
  c.batch_size = 16
  c.num_train_steps = 8
  c.eval_every_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.optimizer.name = 'adam'
  c.optimizer.lr = 3e-3
  c.optimizer.weight_decay = 0.0
  c.loss.name = 'cross_entropy+dice'
  c.best_metric = 'val/mean_dice'
  c.num_sample_predictions = 3
  c.progress_bar = False
  c.print_summary = False
  return config_lib.from_dict(overrides, c)


def test_resunetpp_trains_and_writes_csv_and_samples(data_dir, tmp_path, fast_compile):
  workdir = str(tmp_path / 'seg')
  final = loop.train_and_evaluate(seg_config(data_dir), workdir)
  for key in ('test_mean_dice', 'test_mean_iou', 'test_pixel_accuracy', 'test_dice_class0',
              'test_iou_class0'):
    assert 0.0 <= final[key] <= 1.0, key
  assert final['test_pixel_accuracy'] == pytest.approx(final['test_accuracy'], abs=1e-6)
  records = writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])   # the loss goes down
  rows = writers.read_csv(os.path.join(workdir, 'epochs.csv'))
  assert [r['step'] for r in rows] == ['4', '8']
  assert {'train/loss', 'val/mean_dice', 'val/mean_iou', 'val/pixel_accuracy'} <= set(rows[0])
  with open(os.path.join(workdir, 'test_per_class.csv')) as f:
    per_class = list(csv.DictReader(f))
  assert [r['class'] for r in per_class] == ['0', '1', '2']
  assert float(per_class[0]['dice']) == pytest.approx(final['test_dice_class0'], rel=1e-5)
  png = os.path.join(workdir, 'sample_predictions.png')
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(png) > 5000
  saved = json.load(open(os.path.join(workdir, 'final_metrics.json')))
  assert saved['test_mean_dice'] == final['test_mean_dice']
