"""Pretrained variables from a workdir of this project or a weights file, fitted
to a (new) model: same parameters everywhere but the head, which starts fresh.

    variables, source = load_pretrained('runs/digits04', model_name='resnet20')
    variables = adapt_variables(variables, fresh_variables, head_paths(...))

A workdir is read without changing anything in it (the checkpoint step is
restored read-only; a damaged step is reported, not moved). Weight files go
through cnn_jax.transfer.torchvision.import_torchvision (no unpickling).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Tuple

import flax
import numpy as np

from cnn_jax.transfer import stages as stages_lib

Path = Tuple[str, ...]
WEIGHT_SUFFIXES = ('.pth', '.pt', '.npz', '.safetensors')


def _workdir_config(workdir: str) -> dict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{workdir!r} has no config.json: it is not a workdir of this project.')
  with open(path) as f:
    return json.load(f)


def restore_workdir_variables(workdir: str, which: str = 'latest'
                              ) -> Tuple[Dict[str, Any], dict]:
  """({'params', 'batch_stats'} as numpy, info) from a run's checkpoint.

  which: 'latest' (the newest step), 'best' (the step kept for best_metric) or
  'best_or_latest' (best where the run kept one, else latest). info has 'model', 'model_kwargs', 'num_classes', 'step', 'workdir'."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = _workdir_config(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise ValueError(f'{workdir!r} has no checkpoints/; train it first.')
  if which not in ('latest', 'best', 'best_or_latest'):
    raise ValueError(f"which must be 'latest', 'best' or 'best_or_latest', got {which!r}.")
  best_metric = config.get('best_metric') if which != 'latest' else None
  from absl import logging  # pylint: disable=import-outside-toplevel
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)   # orbax warns that a read-only manager is read-only
  try:
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False,
        best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
        best_mode=config.get('best_mode', 'max'))
    manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))
  except BaseException:
    logging.set_verbosity(verbosity)
    raise
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise ValueError(f'{workdir!r} has no finished checkpoint; train it first.')
    step = steps[-1]
    if which != 'latest':
      best = manager.best_step() if best_metric else None
      if best is None and which == 'best_or_latest':
        best = step
      if best is None:
        raise ValueError(f'{workdir!r} has no best checkpoint (its config has no '
                         "best_metric, or no step was saved with it); use "
                         "transfer.init_checkpoint='latest'.")
      step = best
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      raise ValueError(f'checkpoint step {step} of {workdir!r} cannot be restored '
                       f'({type(e).__name__}: {str(e)[:200]}). Resume that run once '
                       '(it sets damaged steps aside) or pick another workdir.') from None
  finally:
    manager.close()
    logging.set_verbosity(verbosity)
  state = out['state']
  variables = {'params': _to_numpy(state['params'])}
  if state.get('batch_stats'):
    variables['batch_stats'] = _to_numpy(state['batch_stats'])
  info = dict(model=config.get('model'), model_kwargs=config.get('model_kwargs') or {},
              num_classes=config.get('num_classes'), step=int(step), workdir=workdir,
              dataset=config.get('dataset'), classes=config.get('classes', ''))
  return variables, info


def _to_numpy(tree):
  return flax.traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()})


def load_pretrained(init_from: str, *, model_name: str, which: str = 'latest'
                    ) -> Tuple[Dict[str, Any], dict]:
  """Variables (numpy) and a description of where they came from.

  init_from: a workdir (a directory with config.json and checkpoints/) or a weights
  file (.pth/.pt/.npz/.safetensors in torchvision's layout, for model_name)."""
  path = os.path.expanduser(init_from)
  if os.path.isdir(path):
    variables, info = restore_workdir_variables(path, which)
    if info['model'] and info['model'] != model_name:
      raise ValueError(f'{init_from!r} holds a {info["model"]!r} run, but the model to '
                       f'initialise is {model_name!r}; set config.model to '
                       f'{info["model"]!r} (or start from a {model_name!r} run).')
    return variables, dict(info, kind='workdir')
  if not path.endswith(WEIGHT_SUFFIXES):
    raise ValueError(f'transfer.init_from {init_from!r} is neither a workdir nor a weights '
                     f'file ({", ".join(WEIGHT_SUFFIXES)}).')
  from cnn_jax.transfer import torchvision  # pylint: disable=import-outside-toplevel
  variables = torchvision.import_torchvision(model_name, path)
  return variables, dict(kind='torchvision', path=os.path.abspath(path), model=model_name)


def adapt_variables(pretrained: Dict[str, Any], fresh: Dict[str, Any],
                    heads: Iterable[Path] = (), *, replace_head: bool = True
                    ) -> Tuple[Dict[str, Any], Dict[str, int]]:
  """fresh's structure filled from pretrained, the head (param paths `heads`)
  left fresh when replace_head.

  Every other tensor must exist in both with the same shape; otherwise ValueError
  lists every missing, unexpected and mis-shaped one. Returns (variables, counts)
  with counts of tensors 'loaded' and 'fresh'."""
  heads = set(map(tuple, heads))
  out, problems = {}, []
  counts = dict(loaded=0, fresh=0)
  for col in sorted(set(fresh) | set(pretrained)):
    if col not in ('params', 'batch_stats'):
      continue
    new = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh.get(col, {})))
    old = flax.traverse_util.flatten_dict(flax.core.unfreeze(pretrained.get(col, {})))
    merged = {}
    for path, value in new.items():
      name = f'{col}/' + stages_lib.path_str(path)
      if col == 'params' and path in heads and replace_head:
        merged[path] = value
        counts['fresh'] += 1
        continue
      if path not in old:
        problems.append(f'missing {name} {tuple(np.shape(value))}')
        continue
      if tuple(np.shape(old[path])) != tuple(np.shape(value)):
        hint = (" (the output layer: num_classes differs; use transfer.head='replace')"
                if path in heads else '')
        problems.append(f'shape of {name}: pretrained {tuple(np.shape(old[path]))}, model '
                        f'{tuple(np.shape(value))}{hint}')
        continue
      merged[path] = np.asarray(old[path], dtype=value.dtype)
      counts['loaded'] += 1
    for path in sorted(set(old) - set(new)):
      problems.append(f'unexpected {col}/{stages_lib.path_str(path)} '
                      f'{tuple(np.shape(old[path]))}')
    out[col] = flax.traverse_util.unflatten_dict(merged) if merged else {}
  if problems:
    shown = problems[:20] + ([f'... and {len(problems) - 20} more'] if len(problems) > 20
                             else [])
    raise ValueError('the pretrained variables do not fit the model:\n  ' + '\n  '.join(shown)
                     + '\nCheck that config.model (and model_kwargs) match the run or '
                     'weights in transfer.init_from.')
  return out, counts
