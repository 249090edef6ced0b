"""Runs the transfer experiment: pretraining on digits 0-4, then every arm x seed on 5-9.

    python experiments/transfer_digits/run.py                    # ~13 min on 2 CPU cores
    python experiments/transfer_digits/run.py --seeds=0 --arms=features,finetune_top
    python experiments/transfer_digits/run.py --tune             # the lr search (seed 0)

Layout of --workdir (default runs/transfer_digits)::

    pretrain/                 the source model (experiments/transfer_digits/pretrain.py)
    ARM_seedS/                one run of experiments/transfer_digits/transfer.py:ARM
    tune/ARM_lrLR/            --tune: one run per arm and grid lr
    results.csv  results.md  results.png

Every run is a workdir of cnn_jax.train.loop.train_and_evaluate, so running this
again skips the finished runs (their saved metrics are read back) and resumes an
interrupted one. The table is rewritten from all runs each time.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from typing import Dict, List, Mapping, Sequence

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:   # run as a script from anywhere
  sys.path.insert(0, _ROOT)

from experiments.transfer_digits import pretrain as pretrain_config  # noqa: E402
from experiments.transfer_digits import transfer as transfer_config  # noqa: E402

ARM_TITLES = {
    'scratch': '(a) from scratch',
    'features': '(b) feature extraction',
    'finetune_top': '(c) fine-tune top stage',
    'finetune_all': '(d) fine-tune all, lower lr',
}
CSV_FIELDS = ('arm', 'seed', 'lr', 'test_accuracy', 'test_loss', 'val_accuracy', 'val_loss',
              'train_seconds', 'wall_seconds', 'workdir')


def arm_config(arm: str, seed: int, pretrain_workdir: str, lr: float | None = None):
  """The config of one arm and seed, reading the pretrained net from pretrain_workdir."""
  config = transfer_config.get_config(arm)
  config.seed = seed
  if lr is not None:
    config.optimizer.lr = lr
  if config.transfer.init_from:
    config.transfer.init_from = pretrain_workdir
  return config


def _row(arm: str, seed: int, lr: float, metrics: Mapping, workdir: str) -> Dict:
  return dict(arm=arm, seed=seed, lr=lr, test_accuracy=metrics['test_accuracy'],
              test_loss=metrics.get('test_loss', float('nan')),
              **_last_val(workdir),
              train_seconds=metrics['train_seconds'],
              wall_seconds=metrics['wall_seconds_this_call'], workdir=workdir)


def _last_val(workdir: str) -> Dict[str, float]:
  """val accuracy and loss of the last evaluation in workdir/epochs.csv (nan if none)."""
  path = os.path.join(workdir, 'epochs.csv')
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [r for r in csv.DictReader(f) if r.get('val/accuracy')]
  last = rows[-1] if rows else {}
  return dict(val_accuracy=float(last.get('val/accuracy', 'nan')),
              val_loss=float(last.get('val/loss', 'nan')))


def run_pretraining(workdir: str) -> Dict:
  from cnn_jax.train import loop  # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, 'pretrain')
  print(f'== pretraining on digits {pretrain_config.SOURCE_CLASSES} -> {out}', flush=True)
  return loop.train_and_evaluate(pretrain_config.get_config(), out)


def run_arms(workdir: str, arms: Sequence[str], seeds: Sequence[int]) -> List[Dict]:
  """Every arm x seed (pretraining must be done); one result row per run."""
  from cnn_jax.train import loop  # pylint: disable=import-outside-toplevel
  rows = []
  for seed in seeds:
    for arm in arms:
      out = os.path.join(workdir, f'{arm}_seed{seed}')
      config = arm_config(arm, seed, os.path.join(workdir, 'pretrain'))
      print(f'== {arm} seed {seed} -> {out}', flush=True)
      metrics = loop.train_and_evaluate(config, out)
      rows.append(_row(arm, seed, config.optimizer.lr, metrics, out))
      print(f'   test accuracy {metrics["test_accuracy"]:.4f}, '
            f'{metrics["train_seconds"]:.1f} s training', flush=True)
  return rows


def run_tuning(workdir: str, arms: Sequence[str], lrs: Sequence[float],
               seed: int = 0) -> List[Dict]:
  """The lr search: every arm x lr on seed `seed`, judged by validation accuracy."""
  from cnn_jax.train import loop  # pylint: disable=import-outside-toplevel
  rows = []
  for arm in arms:
    for lr in lrs:
      out = os.path.join(workdir, 'tune', f'{arm}_lr{lr:g}')
      print(f'== tune {arm} lr {lr:g} -> {out}', flush=True)
      try:
        metrics = loop.train_and_evaluate(
            arm_config(arm, seed, os.path.join(workdir, 'pretrain'), lr=lr), out)
      except loop.NonFiniteLossError as e:   # too high an lr is a result here
        print(f'   diverged: {e}', flush=True)
        nan = float('nan')
        metrics = dict(test_accuracy=nan, test_loss=nan, train_seconds=nan,
                       wall_seconds_this_call=nan)
      rows.append(_row(arm, seed, lr, metrics, out))
  return rows


def best_lrs(rows: Sequence[Mapping], lower_than: Mapping[str, str] | None = None
             ) -> Dict[str, float]:
  """Per arm, the lr with the highest validation accuracy (ties: lowest val loss).

  lower_than {arm: other}: arm picks only among lrs below other's pick (the
  notes' "fine-tune with a lower learning rate" than training from scratch)."""
  out = {}
  for arm in sorted(dict.fromkeys(r['arm'] for r in rows),
                    key=lambda a: a in (lower_than or {})):
    ok = [r for r in rows if r['arm'] == arm and np.isfinite(r['val_accuracy'])]
    if lower_than and arm in lower_than and lower_than[arm] in out:
      ok = [r for r in ok if r['lr'] < out[lower_than[arm]]]
    if ok:
      out[arm] = min(ok, key=lambda r: (-r['val_accuracy'], r['val_loss']))['lr']
  return out


def summarize(rows: Sequence[Mapping], arms: Sequence[str] | None = None) -> List[Dict]:
  """Per arm: mean and (sample) std over seeds of test accuracy, mean times."""
  arms = list(arms) if arms else list(dict.fromkeys(r['arm'] for r in rows))
  out = []
  for arm in arms:
    rs = [r for r in rows if r['arm'] == arm]
    if not rs:
      continue
    acc = np.array([float(r['test_accuracy']) for r in rs])
    out.append(dict(
        arm=arm, n=len(rs), lr=rs[0]['lr'], acc_mean=float(acc.mean()),
        acc_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        acc_all=[float(a) for a in acc],
        train_seconds=float(np.mean([float(r['train_seconds']) for r in rs])),
        wall_seconds=float(np.mean([float(r['wall_seconds']) for r in rs])),
        train_seconds_min=float(np.min([float(r['train_seconds']) for r in rs])),
        wall_seconds_min=float(np.min([float(r['wall_seconds']) for r in rs]))))
  return out


def markdown_table(summary: Sequence[Mapping]) -> str:
  lines = ['| arm | lr | test accuracy (mean ± std) | per seed | train s mean (min) | '
           'wall s mean (min) |',
           '|---|---:|---:|---|---:|---:|']
  for s in summary:
    per_seed = ', '.join(f'{100 * a:.1f}' for a in s['acc_all'])
    lines.append(f'| {ARM_TITLES.get(s["arm"], s["arm"])} | {s["lr"]:g} | '
                 f'{100 * s["acc_mean"]:.1f} ± {100 * s["acc_std"]:.1f} % | {per_seed} | '
                 f'{s["train_seconds"]:.1f} ({s["train_seconds_min"]:.1f}) | '
                 f'{s["wall_seconds"]:.1f} ({s["wall_seconds_min"]:.1f}) |')
  return '\n'.join(lines)


def write_results(rows: Sequence[Mapping], workdir: str, *, pretrain: Mapping | None = None,
                  seeds: Sequence[int] = (), total_seconds: float | None = None,
                  arms: Sequence[str] | None = None) -> str:
  """Writes results.csv (one row per run), results.md and results.png into workdir.

  Returns the markdown written to results.md (a header and the per-arm table)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction='ignore', lineterminator='\n')
    w.writeheader()
    for r in rows:
      w.writerow({k: (f'{r[k]:.6g}' if isinstance(r.get(k), float) else r.get(k, ''))
                  for k in CSV_FIELDS})
  summary = summarize(rows, arms)
  seeds = list(seeds) or sorted({int(r['seed']) for r in rows})
  head = [f'# Transfer on digits: {pretrain_config.SOURCE_CLASSES} -> '
          f'{pretrain_config.TARGET_CLASSES}, {transfer_config.EXAMPLES_PER_CLASS} '
          'training digits per class',
          '',
          f'Measured {datetime.date.today().isoformat()}, seeds {seeds}, '
          f'{transfer_config.NUM_TRAIN_STEPS} steps of batch {transfer_config.BATCH_SIZE} '
          f'per arm, model {pretrain_config.MODEL} {pretrain_config.MODEL_KWARGS}.']
  if pretrain:
    head.append(f'Pretraining (digits {pretrain_config.SOURCE_CLASSES}): test accuracy '
                f'{100 * pretrain["test_accuracy"]:.1f} %, '
                f'{pretrain["train_seconds"]:.0f} s training, '
                f'{pretrain["wall_seconds_this_call"]:.0f} s wall.')
  runs_wall = sum(float(r['wall_seconds']) for r in rows) + (
      float(pretrain['wall_seconds_this_call']) if pretrain else 0.0)
  head.append(f'Wall time of the runs as each was measured when it ran: {runs_wall:.0f} s '
              f'({"pretraining + " if pretrain else ""}{len(rows)} transfer runs).')
  if total_seconds is not None:
    head.append(f'This call of run.py: {total_seconds:.0f} s wall (finished runs are '
                'read back, not rerun).')
  text = '\n'.join(head) + '\n\n' + markdown_table(summary) + '\n'
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  x = np.arange(len(summary))
  labels = [ARM_TITLES.get(s['arm'], s['arm']).replace(') ', ')\n', 1).replace(', ', ',\n')
            for s in summary]
  ax1.bar(x, [100 * s['acc_mean'] for s in summary],
          yerr=[100 * s['acc_std'] for s in summary], capsize=4, color='tab:blue', alpha=0.8)
  for i, s in enumerate(summary):
    ax1.plot([i] * len(s['acc_all']), [100 * a for a in s['acc_all']], 'k.', ms=6)
  ax1.set_xticks(x, labels, fontsize=8)
  ax1.set_ylabel('test accuracy on digits 5-9 (%)')
  lo = min([100 * min(s['acc_all']) for s in summary] + [100.0])
  ax1.set_ylim(max(0.0, lo - 10), 100.5)
  ax1.set_title('accuracy (bars: mean ± std, dots: seeds)')
  w = 0.38
  ax2.bar(x - w / 2, [s['train_seconds'] for s in summary], w, label='training')
  ax2.bar(x + w / 2, [s['wall_seconds'] for s in summary], w, label='wall (whole run)')
  ax2.set_xticks(x, labels, fontsize=8)
  ax2.set_ylabel('seconds per run (mean over seeds)')
  ax2.set_title('time on this machine')
  ax2.legend(fontsize=8)
  fig.suptitle(f'digits {pretrain_config.SOURCE_CLASSES} -> {pretrain_config.TARGET_CLASSES}'
               f' with {transfer_config.EXAMPLES_PER_CLASS} examples per class')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'results.png'), dpi=110)
  plt.close(fig)
  return text


def tuning_table(rows: Sequence[Mapping]) -> str:
  lines = ['| arm | lr | val accuracy | val loss | test accuracy (not used to choose) |',
           '|---|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["arm"]} | {r["lr"]:g} | {100 * r["val_accuracy"]:.1f} % | '
                 f'{r["val_loss"]:.3f} | {100 * r["test_accuracy"]:.1f} % |')
  return '\n'.join(lines)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', default='runs/transfer_digits')
  p.add_argument('--seeds', default='0,1,2', help='comma list of config.seed values')
  p.add_argument('--arms', default=','.join(transfer_config.ARMS),
                 help=f'comma list from {transfer_config.ARMS}')
  p.add_argument('--tune', action='store_true',
                 help='run the lr search (every arm x --lrs, seed 0) instead')
  p.add_argument('--lrs', default=','.join(f'{x:g}' for x in transfer_config.LR_GRID))
  args = p.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  args.arms = [a.strip() for a in args.arms.split(',') if a.strip()]
  bad = sorted(set(args.arms) - set(transfer_config.ARMS))
  if bad:
    p.error(f'unknown arm(s) {bad}; choose from {transfer_config.ARMS}')
  args.lrs = [float(x) for x in args.lrs.split(',') if x.strip()]
  return args


def main(argv=None):
  args = _parse(argv)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  t0 = time.time()
  pre = run_pretraining(args.workdir)
  if args.tune:
    rows = run_tuning(args.workdir, args.arms, args.lrs)
    text = (tuning_table(rows) + '\n\nBest by val accuracy, then val loss: '
            f'{best_lrs(rows)}\nWith finetune_all below scratch (the arm\'s definition): '
            f'{best_lrs(rows, transfer_config.LOWER_LR_THAN)}')
    with open(os.path.join(args.workdir, 'tune.md'), 'w') as f:
      f.write(text + '\n')
  else:
    rows = run_arms(args.workdir, args.arms, args.seeds)
    text = write_results(rows, args.workdir, pretrain=pre, seeds=args.seeds,
                         total_seconds=time.time() - t0, arms=args.arms)
  print(f'\n{text}\nTotal: {time.time() - t0:.0f} s wall.', flush=True)


if __name__ == '__main__':
  main()
