"""Orbax checkpoints of a run: save every N steps, keep the last K and the best, resume.

Layout of ``workdir``::

    config.json              the config of the run that created the workdir
    checkpoints/<step>/      orbax steps, each with two items:
        state/               the TrainState pytree (step, params, batch_stats,
                             opt_state, rng), saved from host-local, unreplicated arrays
        meta/                JSON: data position, host-side loop state (best metric,
                             plateau and early-stopping counters), metrics, config

What is kept: the ``keep`` most recent steps and the best one by ``best_metric``
(an orbax preservation policy), never anything else.

Restoring walks the steps newest first. A step that fails to restore (damaged
files) is reported, moved aside to ``checkpoints/<step>.damaged-<time>`` (nothing is
deleted) and the previous step is tried. A save interrupted mid-write leaves an
orbax temporary directory that is ignored.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as cm

from cnn_jax.train import config as config_lib


class ConfigMismatchError(ValueError):
  """The workdir holds a run of a different config."""


def check_workdir_config(workdir: str, config, *, write: bool = True) -> None:
  """Writes workdir/config.json for a new run; refuses a different config on resume.

  Keys in config_lib.MUTABLE_KEYS (how long to train, logging, data_dir, ...) may
  change. Anything else differing raises ConfigMismatchError unless
  config.allow_config_change is set. The saved file is never overwritten, except
  to record an accepted change (the old one is kept as config.<time>.json).
  """
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config_lib.to_json(config))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diff = config_lib.differing_keys(saved, current)
    if not diff:
      return
    if not config.allow_config_change:
      raise ConfigMismatchError(
          f'workdir {workdir!r} holds a run with a different config (differing keys: '
          f'{diff}). Use a new --workdir, or pass --config.allow_config_change=True '
          'to resume this run with the new values.')
    logging.warning('Resuming %s with changed config keys %s (allow_config_change).',
                    workdir, diff)
    if write:
      os.replace(path, os.path.join(workdir, f'config.{int(time.time())}.json'))
  if write:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(config_lib.to_json(config))
    os.replace(tmp, path)


def _best_value(metrics: Mapping[str, Any], name: str) -> float:
  return float(metrics[name])


class Checkpointer:
  """Save/restore of (TrainState, meta) under workdir/checkpoints with orbax.

  Args:
    workdir: run directory.
    keep: how many of the most recent steps to keep.
    best_metric: metric name ('val/accuracy') whose best step is also kept; None
      for none. Steps saved without that metric are kept only while recent.
    best_mode: 'max' or 'min'.
    read_only: restore only (evaluation); nothing is saved or garbage-collected.
  """

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = 'max', read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.best_metric = best_metric
    policies = [cm.LatestN(n=keep)]
    if best_metric:
      policies.append(cm.BestN(
          get_metric_fn=lambda m: _best_value(m, best_metric), reverse=best_mode == 'min',
          n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=False,
        preservation_policy=cm.AnyPreservationPolicy(policies))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: Mapping[str, Any],
           metrics: Optional[Mapping[str, float]] = None) -> None:
    """Saves state (host-local, unreplicated) and JSON meta at `step`.

    `metrics` (when it holds best_metric) ranks the step for keep-the-best."""
    if step in self._manager.all_steps():
      # Runs are deterministic, so an existing step holds these very values;
      # never overwrite what was saved.
      logging.info('Checkpoint step %d already exists; not saving it again.', step)
      return
    keep_metrics = None
    if metrics and self.best_metric and self.best_metric in metrics:
      keep_metrics = {self.best_metric: float(metrics[self.best_metric])}
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(dict(meta))),
        metrics=keep_metrics, force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
    """(state, meta) of the newest step that restores; None if there is none.

    Damaged steps are reported and moved aside, and the next older one is tried."""
    for step in reversed(self.all_steps()):
      try:
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          meta=ocp.args.JsonRestore()))
        return out['state'], dict(out['meta'])
      except Exception as e:  # orbax raises many types for truncated or corrupt files
        reason = f'{type(e).__name__}: {str(e)[:300]}'
        logging.error('Checkpoint step %d in %s cannot be restored (%s); using the '
                      'previous one.', step, self.directory, reason)
        print(f'WARNING: checkpoint step {step} is damaged ({reason}); falling back to '
              'the previous checkpoint.', flush=True)
        self._move_aside(step, reason)
        self._manager.reload()
    return None

  def _move_aside(self, step: int, reason: str) -> None:
    if jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    if os.path.exists(src):
      dst = f'{src}.damaged-{int(time.time() * 1000)}'
      os.replace(src, dst)
      with open(os.path.join(dst, 'REASON.txt'), 'w') as f:
        f.write(reason + '\n')

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
