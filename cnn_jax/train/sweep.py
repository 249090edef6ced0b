"""Sweeps: one config file, many runs, one table.

A config file defines the sweep next to its base config::

    from cnn_jax.train import sweep

    def get_config():
      ...

    def get_sweep():
      return sweep.product(sweep.axis('model_kwargs.depth', [11, 13, 16, 19]),
                           sweep.axis('model_kwargs.kernel_size', [3, 5, 7]),
                           sweep.axis('seed', [0, 1, 2]))

`get_sweep()` returns a list of *points*, each a dict of dotted config keys ->
values applied on top of `get_config()`. `axis` makes one axis, `zipped` several
axes that move together (one point per position), `product` the Cartesian
product of its factors, `concat` the union of sweeps.

    python launch.py --mode=sweep --config=FILE --workdir=DIR [--sweep_workers=2]
    python launch.py --mode=sweep --config=FILE --workdir=DIR --sweep_index=7
    python launch.py --mode=sweep_results --config=FILE --workdir=DIR

Every point trains in `DIR/<point name>` with its own checkpoints and logs (the
name spells out its overrides, e.g. `depth=13,kernel_size=5,seed=1`). A finished
point is not rerun; an unfinished one resumes from its checkpoints. `--sweep_index`
runs one point only (a SLURM array task, an XManager work unit) and
`--mode=sweep_results` collects whatever has finished into:

  DIR/results.csv   one row per point: its overrides, parameters, FLOPs per
                    example, final train / validation / test metrics, time
  DIR/results.md    the same as a table, and a second one with mean and standard
                    deviation over seeds when 'seed' is an axis
  DIR/results.png   the test metric against the first axis, a line per value of
                    the others, error bars over seeds
  DIR/curves.png    training loss and validation accuracy against steps, per point
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

Point = Dict[str, Any]


class SweepError(RuntimeError):
  """A sweep point's process failed (the others ran; finished points are kept)."""


# ---------------------------------------------------------------------------
# Building sweeps
# ---------------------------------------------------------------------------

def axis(key: str, values: Sequence[Any]) -> List[Point]:
  """One axis: a point per value of config key `key` (dotted, e.g. 'optimizer.lr')."""
  values = list(values)
  if not values:
    raise ValueError(f'sweep axis {key!r} has no values.')
  return [{key: v} for v in values]


def zipped(**axes: Sequence[Any]) -> List[Point]:
  """Axes that move together: zipped(a=[1, 2], b=[3, 4]) -> {a:1, b:3}, {a:2, b:4}.
  Keys with dots are passed as a dict: zipped(**{'model_kwargs.k': [3, 5], ...})."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'zipped axes must have equal lengths, got {lengths}.')
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def product(*factors: Sequence[Point]) -> List[Point]:
  """The Cartesian product of sweeps (lists of points), earlier factors slowest."""
  out = []
  for combo in itertools.product(*factors):
    point: Point = {}
    for part in combo:
      clash = set(point) & set(part)
      if clash:
        raise ValueError(f'sweep factors set the same key(s) {sorted(clash)} twice.')
      point.update(part)
    out.append(point)
  return out


def concat(*sweeps: Sequence[Point]) -> List[Point]:
  """Several sweeps run as one (e.g. plain nets at 3 depths + residual ones at 3)."""
  return [dict(p) for s in sweeps for p in s]


def _fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (list, tuple)):
    return 'x'.join(_fmt(v) for v in value)
  return str(value)


def short_keys(points: Sequence[Point]) -> Dict[str, str]:
  """Each swept key's shortest unambiguous suffix ('model_kwargs.depth' -> 'depth')."""
  keys = sorted({k for p in points for k in p})
  out = {}
  for k in keys:
    parts = k.split('.')
    for n in range(1, len(parts) + 1):
      cand = '.'.join(parts[-n:])
      if sum(1 for other in keys if other == cand or other.endswith('.' + cand)) == 1:
        out[k] = cand
        break
  return out


def point_name(point: Point, short: Mapping[str, str]) -> str:
  """The directory name of a point: 'depth=13,kernel_size=5'. Only characters that
  are safe in a path; the values a sweep sets are short by design."""
  if not point:
    return 'base'
  name = ','.join(f'{short.get(k, k)}={_fmt(v)}' for k, v in point.items())
  return re.sub(r'[^A-Za-z0-9_.,=+\-x]', '_', name)


def names(points: Sequence[Point]) -> List[str]:
  short = short_keys(points)
  out = [point_name(p, short) for p in points]
  dup = sorted({n for n in out if out.count(n) > 1})
  if dup:
    raise ValueError(f'sweep points repeat: {dup}; every point must differ.')
  return out


def apply_point(config, point: Point):
  """A copy of `config` with the point's dotted keys set (type and key checks of the
  locked config apply: a misspelt key or a wrong type names the key)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from cnn_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.from_dict(config.to_dict())    # a fresh, locked copy
  for key, value in point.items():
    *path, last = key.split('.')
    node = config
    for p in path:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise ValueError(f'sweep key {key!r}: the config has no {p!r}.')
      node = node[p]
    if last not in node and not (path and path[-1] == 'model_kwargs'):
      raise ValueError(f'sweep key {key!r} is not a config key.')
    try:
      node[last] = value
    except (TypeError, KeyError, AttributeError) as e:
      raise ValueError(f'sweep key {key!r}: {e}') from None
  return config


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def load_sweep(module) -> List[Point]:
  """The points of a config module's get_sweep(); ValueError if it has none."""
  get = getattr(module, 'get_sweep', None)
  if get is None:
    raise ValueError(f'{getattr(module, "__file__", module)} defines no get_sweep(); '
                     '--mode=sweep needs one (see cnn_jax.train.sweep).')
  points = list(get())
  if not points:
    raise ValueError('get_sweep() returned no points.')
  for p in points:
    if not isinstance(p, Mapping):
      raise ValueError(f'get_sweep() must return dicts of config overrides, got {p!r}.')
  return [dict(p) for p in points]


def plan(config, points: Sequence[Point]):
  """[(name, point, config)] with every point's config validated up front, so a bad
  point fails before any of them trains."""
  from cnn_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  out = []
  for name, point in zip(names(points), points):
    try:
      cfg = config_lib.validate(apply_point(config, point))
    except ValueError as e:
      raise ValueError(f'sweep point {name!r}: {e}') from None
    out.append((name, point, cfg))
  return out


def is_finished(point_dir: str) -> bool:
  """A point is done when its run finished, or when it diverged (a deterministic run
  would diverge again: it is a result, recorded as such, not retried)."""
  record = _read_json(os.path.join(point_dir, 'sweep_point.json')) or {}
  if record.get('status') == 'diverged':
    return True
  path = os.path.join(point_dir, 'final_metrics.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    final = json.load(f)
  return final.get('step') is not None and (
      final.get('step') >= final.get('num_train_steps', math.inf) or final.get('stopped_early'))


def run_point(name: str, point: Point, config, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes, or finds finished) one point in workdir/name, recording its
  overrides and wall time in sweep_point.json."""
  from cnn_jax.train import loop  # pylint: disable=import-outside-toplevel
  point_dir = os.path.join(workdir, name)
  os.makedirs(point_dir, exist_ok=True)
  record_path = os.path.join(point_dir, 'sweep_point.json')
  record = _read_json(record_path) or dict(name=name, overrides=point, wall_seconds=0.0)
  t0 = time.time()
  finished = is_finished(point_dir)
  print(f'=== sweep point {name}' + (' (finished)' if finished else ''), flush=True)
  if record.get('status') == 'diverged':
    return {'status': 'diverged'}
  try:
    result = loop.train_and_evaluate(config, point_dir)
  except loop.NonFiniteLossError as e:
    # A learning-rate ablation may diverge: that is a result, not a failed sweep.
    print(f'sweep point {name} diverged: {e}', flush=True)
    record.update(status='diverged', error=str(e))
    result = {'status': 'diverged'}
  if not finished:
    record['wall_seconds'] = record.get('wall_seconds', 0.0) + time.time() - t0
  record['overrides'] = point
  _write_json(record_path, record)
  return result


def run_sweep(config, points: Sequence[Point], workdir: str, *, workers: int = 1,
              index: Optional[int] = None, child_argv: Optional[Sequence[str]] = None,
              aggregate_results: bool = True) -> Optional[List[Dict[str, Any]]]:
  """Runs the sweep (or point `index` of it) in workdir; returns the result rows
  (None when only one point ran).

  workers > 1 runs points in that many child processes, each started as
  `child_argv + ['--sweep_index=i']` (launch.py passes its own command line)."""
  planned = plan(config, points)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, 'sweep.json'),
              [dict(name=n, overrides=p) for n, p, _ in planned])
  if index is not None:
    if not 0 <= index < len(planned):
      raise ValueError(f'--sweep_index={index} is out of range: this sweep has '
                       f'{len(planned)} points (0..{len(planned) - 1}).')
    name, point, cfg = planned[index]
    run_point(name, point, cfg, workdir)
    return None
  todo = [i for i, (n, _, _) in enumerate(planned)
          if not is_finished(os.path.join(workdir, n))]
  print(f'Sweep of {len(planned)} points in {workdir}: {len(planned) - len(todo)} '
        f'finished, {len(todo)} to run.', flush=True)
  if workers <= 1 or len(todo) <= 1:
    for i in todo:
      name, point, cfg = planned[i]
      run_point(name, point, cfg, workdir)
  else:
    if child_argv is None:
      raise ValueError('workers > 1 needs child_argv (the command that runs one point).')
    _run_children(todo, planned, workdir, workers, child_argv)
  return aggregate(workdir, planned) if aggregate_results else None


def _run_children(todo, planned, workdir, workers, child_argv):
  """Runs points as child processes, at most `workers` at a time; each child's output
  goes to <point>/sweep.log. Raises if any child failed (after all have ended)."""
  pending = list(todo)
  running: Dict[int, tuple] = {}
  failed = []
  while pending or running:
    while pending and len(running) < workers:
      i = pending.pop(0)
      name = planned[i][0]
      point_dir = os.path.join(workdir, name)
      os.makedirs(point_dir, exist_ok=True)
      log = open(os.path.join(point_dir, 'sweep.log'), 'a')  # pylint: disable=consider-using-with
      proc = subprocess.Popen(list(child_argv) + [f'--sweep_index={i}'], stdout=log,
                              stderr=subprocess.STDOUT)
      running[i] = (proc, log, time.time())
      print(f'started point {i} {name} (pid {proc.pid})', flush=True)
    time.sleep(0.5)
    for i, (proc, log, t0) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[i]
      status = 'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'
      print(f'point {i} {planned[i][0]}: {status} in {time.time() - t0:.0f} s', flush=True)
      if proc.returncode:
        failed.append(planned[i][0])
  if failed:
    raise SweepError(f'sweep points failed: {failed}; see <workdir>/<point>/sweep.log. '
                       'Fix and rerun: finished points are kept.')


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

_TABLE_METRICS = ('train_loss', 'train_error', 'val_error', 'test_error', 'test_loss',
                  'test_mean_dice')


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path, obj):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _last_epoch_row(point_dir: str) -> Dict[str, float]:
  path = os.path.join(point_dir, 'epochs.csv')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return {}
  out = {}
  for k, v in rows[-1].items():
    try:
      out[k] = float(v)
    except (TypeError, ValueError):
      pass
  return out


def point_row(workdir: str, name: str, point: Point) -> Dict[str, Any]:
  """One results row from a point directory's files (final_metrics.json, epochs.csv,
  sweep_point.json). status 'missing' when the point has not finished."""
  point_dir = os.path.join(workdir, name)
  row: Dict[str, Any] = {'name': name, **point}
  record = _read_json(os.path.join(point_dir, 'sweep_point.json')) or {}
  if record.get('status') == 'diverged':
    row['status'] = 'diverged'
    return row
  final = _read_json(os.path.join(point_dir, 'final_metrics.json'))
  if final is None or not is_finished(point_dir):
    row['status'] = 'missing'
    return row
  row['status'] = 'done'
  epoch = _last_epoch_row(point_dir)
  for key in ('train/loss', 'train/accuracy', 'train/error', 'val/loss', 'val/accuracy',
              'val/error', 'val/mean_dice'):
    if key in epoch:
      row[key.replace('/', '_')] = epoch[key]
  for key, value in final.items():
    if key.startswith('test_') and isinstance(value, (int, float)):
      row[key] = value
  for key in ('num_params', 'flops_per_example', 'train_seconds', 'step'):
    if key in final:
      row[key] = final[key]
  if 'wall_seconds' in record:
    row['wall_seconds'] = record['wall_seconds']
  return row


def aggregate(workdir: str, planned) -> List[Dict[str, Any]]:
  """Writes results.csv, results.md, results.png and curves.png; returns the rows.
  Points that have not finished are rows with status 'missing', diverged ones
  'diverged'."""
  if not os.path.isdir(workdir):
    raise ValueError(f'{workdir!r} holds no sweep; run --mode=sweep first.')
  points = [(n, p) for n, p, *_ in planned]
  rows = [point_row(workdir, n, p) for n, p in points]
  keys = list(dict.fromkeys(k for _, p in points for k in p))
  write_csv(os.path.join(workdir, 'results.csv'), rows, keys)
  groups = group_over_seeds(rows, keys) if 'seed' in keys else None
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown(rows, keys, groups))
  done = [r for r in rows if r['status'] == 'done']
  if done:
    try:
      plot_results(rows, keys, os.path.join(workdir, 'results.png'))
      plot_curves(workdir, [n for n, _ in points], os.path.join(workdir, 'curves.png'))
    except Exception as e:  # a plot must never lose the tables  pylint: disable=broad-except
      print(f'WARNING: sweep plots failed: {type(e).__name__}: {e}', flush=True)
  print(markdown(rows, keys, groups), flush=True)
  return rows


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
  fields = ['name'] + list(keys) + sorted({k for r in rows for k in r} - {'name', *keys})
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    out = csv.DictWriter(f, fieldnames=fields, lineterminator='\n')
    out.writeheader()
    for r in rows:
      out.writerow({k: _fmt(v) if isinstance(v, (list, tuple)) else v for k, v in r.items()})
  os.replace(tmp, path)


def group_over_seeds(rows, keys) -> List[Dict[str, Any]]:
  """Rows that differ only in 'seed' merged: mean and std (ddof=1) of each numeric
  column over the finished seeds, with n."""
  others = [k for k in keys if k != 'seed']
  groups: Dict[tuple, List[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault(tuple(_fmt(r.get(k)) for k in others), []).append(r)
  out = []
  for members in groups.values():
    done = [m for m in members if m['status'] == 'done']
    g: Dict[str, Any] = {k: members[0].get(k) for k in others}
    g['n'] = len(done)
    g['seeds'] = len(members)
    numeric = sorted({k for m in done for k, v in m.items()
                      if isinstance(v, (int, float)) and k not in keys})
    for k in numeric:
      vals = np.array([m[k] for m in done if k in m], np.float64)
      g[k] = float(vals.mean())
      g[k + '_std'] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out.append(g)
  return out


def _cell(value, key: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ''
  if key in ('num_params', 'flops_per_example'):
    return f'{int(value):,}'
  if key.endswith('seconds'):
    return f'{value:.0f}'
  if isinstance(value, float):
    return f'{value:.4f}'
  return _fmt(value)


def _metric_columns(rows) -> List[str]:
  present = {k for r in rows for k in r}
  cols = [k for k in ('num_params', 'flops_per_example') if k in present]
  cols += [k for k in _TABLE_METRICS if k in present]
  cols += [k for k in ('train_seconds',) if k in present]
  return cols


def markdown(rows, keys, groups=None) -> str:
  """The per-point table (and the mean ± std table over seeds, when given)."""
  cols = _metric_columns(rows)
  short = short_keys([{k: None for k in keys}])
  lines = ['| ' + ' | '.join([short[k] for k in keys] + cols + ['status']) + ' |',
           '|' + '---|' * (len(keys) + len(cols) + 1)]
  for r in rows:
    lines.append('| ' + ' | '.join([_fmt(r.get(k)) for k in keys]
                                   + [_cell(r.get(c), c) for c in cols] + [r['status']])
                 + ' |')
  text = '\n'.join(lines) + '\n'
  if groups:
    others = [k for k in keys if k != 'seed']
    gcols = [c for c in cols if any(c in g for g in groups)]
    lines = ['', f'Mean ± standard deviation over seeds (n finished of the seeds run):', '',
             '| ' + ' | '.join([short[k] for k in others] + gcols + ['n']) + ' |',
             '|' + '---|' * (len(others) + len(gcols) + 1)]
    for g in groups:
      cells = [_fmt(g.get(k)) for k in others]
      for c in gcols:
        if c not in g:
          cells.append('')
        elif c in ('num_params', 'flops_per_example') or c.endswith('seconds'):
          cells.append(_cell(g[c], c))
        elif g['n'] < 2:          # one seed: no spread to show
          cells.append(f'{g[c]:.4f}')
        else:
          cells.append(f'{g[c]:.4f} ± {g[c + "_std"]:.4f}')
      cells.append(f'{g["n"]}/{g["seeds"]}')
      lines.append('| ' + ' | '.join(cells) + ' |')
    text += '\n'.join(lines) + '\n'
  return text


def _headline(rows) -> str:
  present = {k for r in rows for k in r}
  for k in ('test_error', 'test_mean_dice', 'test_loss'):
    if k in present:
      return k
  raise ValueError('no test metric in the results.')


def plot_results(rows, keys, path: str) -> None:
  """The headline test metric (and the last epoch's training error, when logged)
  against the first non-seed axis; one line per value of the remaining axes; mean
  and std over seeds as error bars."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  metrics = [_headline(rows)]
  if metrics[0] == 'test_error' and any('train_error' in r for r in rows):
    metrics.insert(0, 'train_error')
  fig, axs = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
  for ax, metric in zip(axs[0], metrics):
    _plot_metric(ax, rows, keys, metric)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_metric(ax, rows, keys, metric: str) -> None:
  axes_ = [k for k in keys if k != 'seed']
  done = [r for r in rows if r['status'] == 'done' and metric in r]
  if not axes_:
    vals = [r[metric] for r in done]
    ax.bar(['all'], [np.mean(vals)], yerr=[np.std(vals)], capsize=4)
  else:
    x_key, rest = axes_[0], axes_[1:]
    xs = list(dict.fromkeys(_fmt(r.get(x_key)) for r in rows))
    numeric_x = all(isinstance(r.get(x_key), (int, float)) and not isinstance(
        r.get(x_key), bool) for r in rows)
    lines: Dict[str, Dict[str, List[float]]] = {}
    for r in done:
      label = ', '.join(f'{k.split(".")[-1]}={_fmt(r.get(k))}' for k in rest) or metric
      lines.setdefault(label, {}).setdefault(_fmt(r.get(x_key)), []).append(r[metric])
    for label, by_x in lines.items():
      pts = [x for x in xs if x in by_x]
      pos = [float(x) if numeric_x else xs.index(x) for x in pts]
      means = [np.mean(by_x[x]) for x in pts]
      stds = [np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in pts]
      ax.errorbar(pos, means, yerr=stds, marker='o', capsize=4, label=label)
    if not numeric_x:
      ax.set_xticks(range(len(xs)))
      ax.set_xticklabels(xs, rotation=20)
    ax.set_xlabel(x_key)
    if len(lines) > 1:
      ax.legend(fontsize=8)
  what = 'last epoch, training mode' if metric.startswith('train') else 'test split'
  values = [r[metric] for r in done if r[metric] > 0]
  if metric.endswith(('error', 'loss')) and values and max(values) > 10 * min(values):
    ax.set_yscale('log')   # a diverged or chance-level point would flatten the rest
  ax.set_ylabel(f'{metric.replace("_", " ")} ({what})')
  ax.set_title(f'{metric.replace("_", " ")} per sweep point'
               + (' (mean ± std over seeds)' if 'seed' in keys else ''))
  ax.grid(alpha=0.3)


def plot_curves(workdir: str, point_names: Sequence[str], path: str) -> None:
  """Training loss and validation accuracy (when logged) against step, per point."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from cnn_jax.train import writers  # pylint: disable=import-outside-toplevel
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
  any_val = False
  for name in point_names:
    path_ = os.path.join(workdir, name, 'metrics.jsonl')
    records = writers.read_jsonl(path_) if os.path.exists(path_) else []
    train = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
    val = [(r['step'], r['val/accuracy']) for r in records if 'val/accuracy' in r]
    if train:
      a1.plot(*zip(*train), label=name, lw=1)
    if val:
      any_val = True
      a2.plot(*zip(*val), label=name, lw=1, marker='.')
  a1.set(xlabel='step', ylabel='training loss', title='Training loss', yscale='log')
  a2.set(xlabel='step', ylabel='validation accuracy',
         title='Validation accuracy' if any_val else 'Validation accuracy (none logged)')
  for a in (a1, a2):
    a.grid(alpha=0.3)
  _, labels = a1.get_legend_handles_labels()
  if len(labels) <= 16:
    a1.legend(fontsize=7)
  elif len(labels) <= 40:
    a1.legend(fontsize=5, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
