"""The training loop: one function trains and evaluates every model on every dataset.

``train_and_evaluate(config, workdir)`` runs (or resumes, or finds finished) the run
the config describes; ``evaluate(config, workdir)`` restores its latest good
checkpoint and evaluates it. Everything in the run is a pure function of the config:
the data order (seeded grain loader indexed by step), the per-step randomness
(fold_in(rng, step)) and the step itself. So an interrupted run resumed from a
checkpoint ends bit-identical to an uninterrupted one.

Workdir contents::

    config.json  checkpoints/  metrics.jsonl  tensorboard/  final_metrics.json
    epochs.csv (train and validation statistics, one row per evaluation)
    test_per_class.csv  summary.txt  training_curves.png  confusion_matrix.png
    confusion_matrix.json  sample_predictions.png (segmentation)
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging

from cnn_jax import data as data_lib
from cnn_jax import models
from cnn_jax.data import augment
from cnn_jax.train import checkpoint as ckpt_lib
from cnn_jax.train import config as config_lib
from cnn_jax.train import metrics as metrics_lib
from cnn_jax.train import optim, parallel, state as state_lib, steps, writers


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks after every step."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    except ValueError:   # not the main thread: leave signals alone
      self._old = {}
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:   # a second signal: give up at once
      raise KeyboardInterrupt
    self.signal = signum
    print(f'\nReceived signal {signum}: saving a checkpoint and stopping.', flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class Run:
  """Everything a run builds from its config before training (no compute yet).

  With config.transfer set (see cnn_jax.transfer): `initial_state` starts from the
  pretrained variables with a fresh head; `plan` (a TransferPlan) decides frozen
  parameters, per-stage learning rates and unfreezing phases, and `tx_for_phase` /
  `train_step_fn(phase)` give the optimizer and step of each phase. In
  transfer.mode='features', `model` is the new classifier (a FeatureHead),
  `backbone` the pretrained network, and `prepare_features()` replaces the data
  sources by cached features.
  """

  def __init__(self, config, workdir: str):
    config = config_lib.validate(config)
    if config.distributed:
      parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                      config.process_id)
    self.config = config
    self.workdir = workdir
    self.is_chief = jax.process_index() == 0
    self.par = parallel.Parallel(config.parallelism, parallel.select_devices(config.num_devices))
    self.par.check_batch_size(config.batch_size)
    self.eval_batch_size = config.eval_batch_size or config.batch_size
    self.par.check_batch_size(self.eval_batch_size, 'eval_batch_size')

    data_dir = config.data_dir
    classes = config_lib.parse_classes(config.classes)
    self.train_source = data_lib.select(
        data_lib.get_source(config.dataset, config.train_split, data_dir), classes,
        config.train_examples_per_class, seed=config.seed)
    self.val_source = (data_lib.select(
        data_lib.get_source(config.dataset, config.val_split, data_dir), classes)
                       if config.val_split else None)
    self.eval_source = data_lib.select(
        data_lib.get_source(config.dataset, config.eval_split, data_dir), classes)
    self.num_classes = config.num_classes or (len(classes) if classes else
                                              data_lib.num_classes(self.train_source,
                                                                   config.dataset))
    self.train_transform = augment.make_transform(config.train_transform)
    self.eval_transform = augment.make_transform(config.eval_transform)
    self.max_objects = config.detection.max_objects if config.task == 'detection' else 0
    example = self.eval_transform(
        data_lib.to_example(self.eval_source[0], task=config.task,
                            max_objects=self.max_objects), np.random.default_rng(0))
    self.input_shape = tuple(example['image'].shape)

    self.steps_per_epoch = data_lib.steps_per_epoch(self.train_source, config.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch_size {config.batch_size} is larger than the training split '
                       f'({len(self.train_source)} examples); lower batch_size.')
    self.total_steps = (config.num_train_steps if config.num_train_steps is not None else
                        int(math.ceil(config.num_epochs * self.steps_per_epoch)))
    self.eval_every = config.eval_every_steps or self.steps_per_epoch

    kwargs = dict(config.model_kwargs)
    if config.conv == 'flax':
      import flax.linen as nn  # pylint: disable=import-outside-toplevel
      kwargs['conv'] = nn.Conv
    if self.par.axis_name is not None and 'axis_name' in _fields(config.model):
      kwargs['axis_name'] = self.par.axis_name
    self.model = models.get_model(config.model, num_classes=self.num_classes, **kwargs)

    self._opt = config.optimizer.to_dict()
    if self._opt.get('decay_steps') is None and self._opt['schedule'] in ('cosine',
                                                                          'warmup_cosine'):
      self._opt['decay_steps'] = self.total_steps   # the schedule spans the whole run
    self.plan = None
    self.backbone = None
    self._features_ready = False
    t = config.transfer
    if t.mode == 'features':
      self._setup_features()
    elif t.freeze or t.lr_multipliers or t.stage_lr_decay != 1.0:
      from cnn_jax import transfer  # pylint: disable=import-outside-toplevel
      abstract = transfer.stages.abstract_variables(self.model, self.input_shape)
      self.plan = transfer.make_plan(
          self.model, abstract['params'], self.input_shape, freeze=t.freeze,
          frozen_bn=t.frozen_bn, stage_lr_decay=t.stage_lr_decay,
          lr_multipliers=t.lr_multipliers,
          unfreeze_every_steps=int(round(t.unfreeze_every_epochs * self.steps_per_epoch)))
      self._abstract_variables = abstract
    self._tx_cache = {}
    self.tx, self.lr_schedule = self.tx_for_phase(0), optim.make_schedule(self._opt)
    self.rng = jax.random.PRNGKey(config.seed)

  # --- transfer learning
  def _setup_features(self):
    """transfer.mode='features': the model to train is a FeatureHead on the
    backbone's cached features (computed by prepare_features)."""
    from cnn_jax import transfer  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      raise ValueError("transfer.mode='features' runs in one process; use "
                       "transfer.mode='finetune' with a frozen backbone on several hosts.")
    t = self.config.transfer
    self.backbone = self.model
    head_name = transfer.features.head_module_name(self.backbone, self.input_shape)
    abstract = transfer.stages.abstract_variables(self.backbone, self.input_shape)

    def features_of(variables, x):
      _, state = self.backbone.apply(variables, x, train=False, mutable=['intermediates'])
      return state['intermediates'].get(t.feature_layer)
    out = jax.eval_shape(features_of, abstract,
                         jax.ShapeDtypeStruct((1,) + self.input_shape, jax.numpy.float32))
    if out is None:
      raise ValueError(f'{self.config.model} sows no intermediate '
                       f'{t.feature_layer!r}; set transfer.feature_layer to one it sows '
                       "(e.g. 'pre_logits', 'stage3').")
    out = out[0] if isinstance(out, tuple) else out
    self.backbone_input_shape = self.input_shape
    self.input_shape = (int(np.prod(out.shape[1:])),)
    self.model = transfer.FeatureHead(self.num_classes, hidden=t.head_hidden,
                                      head_name=head_name)

  def prepare_features(self) -> None:
    """Computes (or reads from workdir/features/) the backbone's features of every
    split and makes them the run's data sources."""
    if self.backbone is None or self._features_ready:
      return
    from cnn_jax import transfer  # pylint: disable=import-outside-toplevel
    c, t = self.config, self.config.transfer
    variables, info = self._pretrained(self.backbone)
    roles = [('train', self.train_source, c.train_split), ('eval', self.eval_source,
                                                            c.eval_split)]
    if self.val_source is not None:
      roles.append(('val', self.val_source, c.val_split))
    for role, source, split in roles:
      key = transfer.features.fingerprint(
          source=info, model=c.model, model_kwargs=c.model_kwargs.to_dict(),
          layer=t.feature_layer, dataset=c.dataset, split=split, classes=c.classes,
          per_class=c.train_examples_per_class if role == 'train' else None,
          seed=c.seed if role == 'train' else None, transform=c.eval_transform)
      path = os.path.join(self.workdir, 'features', f'{role}.npz')
      t0 = time.time()

      def compute(source=source):
        loader = data_lib.make_loader(
            source, batch_size=self.eval_batch_size, seed=0, shuffle=False, num_epochs=1,
            drop_remainder=False, random_transform=self.eval_transform, task=c.task)
        return transfer.extract(self.backbone, variables, loader, layer=t.feature_layer)
      feats = transfer.features.cached(path, key, compute)
      if self.is_chief:
        print(f'Features of {split} ({role}): {feats.features.shape} in '
              f'{time.time() - t0:.1f} s -> {path}', flush=True)
      setattr(self, {'train': 'train_source', 'val': 'val_source',
                     'eval': 'eval_source'}[role], feats)
    self.train_transform = augment.make_transform('')
    self.eval_transform = augment.make_transform('')
    self._features_ready = True

  def _pretrained(self, model, fresh=None):
    """Pretrained variables fitted to `model` (the head from `fresh`, or a new
    init), as numpy, and their origin."""
    from cnn_jax import transfer  # pylint: disable=import-outside-toplevel
    t = self.config.transfer
    shape = self.backbone_input_shape if model is self.backbone else self.input_shape
    pretrained, info = transfer.load_pretrained(
        t.init_from, model_name=t.init_model or self.config.model, which=t.init_checkpoint)
    if fresh is None:
      fresh = jax.device_get(jax.jit(lambda r: model.init(
          {'params': r, 'dropout': r}, jax.numpy.zeros((1,) + shape), train=False))(
              jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1)))
      fresh = {k: v for k, v in fresh.items() if k in ('params', 'batch_stats')}
    if type(model).__name__ == 'YOLO' and info.get('model') == model.backbone:
      # A classifier's weights for a detector's backbone: they fill 'net' (the
      # classifier's own output layer is dropped), the detection head stays fresh.
      pretrained = _nest_backbone(pretrained, fresh)
      heads = [p for p in transfer.stages.flat_paths(fresh['params']) if p[0] != 'net']
    else:
      heads = transfer.head_paths(model, shape)
    variables, counts = transfer.adapt_variables(pretrained, fresh, heads,
                                                 replace_head=t.head == 'replace')
    if self.is_chief:
      origin = info.get('workdir') or info.get('path')
      where = f' step {info["step"]}' if 'step' in info else ''
      print(f'Initialised from {origin}{where}: {counts["loaded"]} tensors loaded, '
            f'{counts["fresh"]} fresh (head).', flush=True)
    return variables, info

  def tx_for_phase(self, phase: int):
    """The optimizer of an unfreezing phase (the same one for every phase without a
    plan). Every phase's optimizer state has the same layout."""
    if phase not in self._tx_cache:
      split = None
      if self.plan is not None and not self.plan.is_trivial():
        split = functools.partial(self.plan.optimizer, phase=phase)
      self._tx_cache[phase] = optim.make_optimizer(self._opt, split=split)[0]
    return self._tx_cache[phase]

  def phase(self, step: int) -> int:
    return 0 if self.plan is None else self.plan.phase(step)

  # --- state, data and steps
  def abstract_state(self):
    return state_lib.abstract_train_state(self.model, self.tx, self.input_shape, self.rng)

  def initial_state(self):
    state = jax.device_get(state_lib.create_train_state(self.model, self.tx,
                                                        self.input_shape, self.rng))
    if self.config.transfer.init_from and self.backbone is None:
      fresh = {'params': state.params}
      if state.batch_stats:
        fresh['batch_stats'] = state.batch_stats
      variables, _ = self._pretrained(self.model, fresh)
      params = variables['params']
      state = state.replace(params=params, batch_stats=variables.get('batch_stats', {}),
                            opt_state=jax.device_get(jax.jit(self.tx.init)(params)))
    return state

  def train_loader(self):
    return data_lib.make_loader(
        self.train_source, batch_size=self.config.batch_size, seed=self.config.seed,
        random_transform=self.train_transform, process_index=jax.process_index(),
        process_count=jax.process_count(), task=self.config.task,
        max_objects=self.max_objects)

  def eval_loader(self, source):
    return data_lib.make_loader(
        source, batch_size=self.eval_batch_size, seed=0, shuffle=False, num_epochs=1,
        drop_remainder=False, random_transform=self.eval_transform,
        process_index=jax.process_index(), process_count=jax.process_count(),
        task=self.config.task, max_objects=self.max_objects)

  def train_step_fn(self, phase: int = 0):
    c = self.config.loss
    extra = {}
    if self.plan is not None:
      from cnn_jax import transfer  # pylint: disable=import-outside-toplevel
      params = self._abstract_variables['params']
      stats = self._abstract_variables.get('batch_stats', {})
      if any(not self.plan.trainable(p, phase) for p in self.plan.stage):
        extra['grad_mask'] = self.plan.grad_mask(params, phase)
        extra['stats_mask'] = self.plan.stats_mask(stats, phase)
        if self.plan.frozen_bn == 'eval':
          extra['apply_fn'] = transfer.eval_mode_bn_apply(
              self.model.apply, self.plan.frozen_bn_modules(phase))
    if self.config.task == 'detection':
      from cnn_jax.detection import steps as det_steps  # pylint: disable=import-outside-toplevel
      extra['task_loss'] = functools.partial(
          det_steps.yolo_loss, num_classes=self.num_classes,
          detection=self.config.detection.to_dict())
    fn = functools.partial(steps.train_step, label_smoothing=float(c.label_smoothing),
                           aux_weight=float(c.aux_weight), lr_schedule=self.lr_schedule,
                           axis_name=self.par.axis_name, loss_name=c.name,
                           class_weights=tuple(c.class_weights), **extra)
    return self.par.wrap(fn, donate_state=True)

  def eval_step_fn(self):
    if self.config.task == 'detection':
      from cnn_jax.detection import steps as det_steps  # pylint: disable=import-outside-toplevel
      fn = functools.partial(det_steps.eval_step, num_classes=self.num_classes,
                             detection=self.config.detection.to_dict())
      return self.par.wrap(fn, donate_state=False)
    fn = functools.partial(steps.eval_step, axis_name=self.par.axis_name,
                           loss_name=self.config.loss.name, confusion=True)
    return self.par.wrap(fn, donate_state=False)


def _nest_backbone(pretrained, fresh):
  """A classifier's variables placed under a detector's 'net', keeping only the
  top-level modules the truncated backbone has (its classifier never runs); the
  detector's other variables are taken from `fresh`."""
  out = {}
  for col, tree in fresh.items():
    have = tree.get('net', {})
    old = pretrained.get(col, {})
    out[col] = {**{k: v for k, v in tree.items() if k != 'net'},
                'net': {k: v for k, v in old.items() if k in have}}
  return out


def _fields(model_name: str):
  builder = models.model_info(model_name).builder
  cls = getattr(builder, 'func', builder)
  return getattr(cls, '__dataclass_fields__', {})


def _evaluate(run: Run, state, eval_step, source) -> Dict[str, Any]:
  """Exact metrics over a whole split (padded last batch masked out)."""
  if run.config.task == 'detection':
    from cnn_jax.detection import steps as det_steps  # pylint: disable=import-outside-toplevel
    collector = det_steps.Collector(run.num_classes)
    for batch in run.eval_loader(source):
      collector.add(batch, jax.device_get(eval_step(state, run.par.put_batch(batch))))
    return collector.metrics()
  totals = None
  for batch in run.eval_loader(source):
    out = eval_step(state, run.par.put_batch(batch))
    out = run.par.unreplicate_metrics(out)
    totals = out if totals is None else jax.tree_util.tree_map(np.add, totals, out)
  metrics = steps.finalize_eval_metrics(totals)
  confusion = np.asarray(totals['confusion'])
  if run.config.task == 'segmentation':
    scores = metrics_lib.segmentation_scores(confusion)
    metrics.update(mean_dice=scores['mean_dice'], mean_iou=scores['mean_iou'],
                   pixel_accuracy=scores['pixel_accuracy'])
    for c, (d, j) in enumerate(zip(scores['dice'], scores['iou'])):
      if d is not None:   # a class absent from truth and prediction has no score
        metrics[f'dice_class{c}'], metrics[f'iou_class{c}'] = d, j
  metrics['confusion'] = confusion
  return metrics


def _improved(value, best, mode, min_delta=0.0):
  if best is None:
    return True
  return value > best + min_delta if mode == 'max' else value < best - min_delta


def _mean_metrics(pending) -> Dict[str, float]:
  keys = pending[0][1].keys()
  return {k: float(np.mean([float(m[k]) for _, m in pending])) for k in keys}


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _load_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _scalars(prefix: str, metrics: Dict[str, Any]) -> Dict[str, float]:
  return {f'{prefix}/{k}': float(v) for k, v in metrics.items()
          if not isinstance(v, dict) and np.ndim(v) == 0 and k != 'count'}


def _host_target(abstract):
  """Restore target: host NumPy arrays shaped like the abstract state."""
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def train_and_evaluate(config, workdir: str, *, stop_after_steps: Optional[int] = None
                       ) -> Dict[str, Any]:
  """Trains `config`'s model on its dataset in `workdir`, then evaluates it.

  Resumes from the latest good checkpoint in workdir/checkpoints if there is one
  (and returns the saved final metrics at once if the run had finished).

  Args:
    config: a ConfigDict from cnn_jax.train.config.default_config() (or a dict of
      its keys); checked by config.validate before anything is computed.
    workdir: the run directory (created). A workdir holding a run of another
      config is refused unless config.allow_config_change.
    stop_after_steps: stop (with a checkpoint) once this many steps have run in
      this call, as a preemption would. For tests and time-sliced jobs.
  Returns:
    The final test metrics (as written to workdir/final_metrics.json), or, when
    the run stopped early by signal or stop_after_steps, {'status': 'stopped',
    'step': k}.
  Raises:
    ValueError: bad config, missing dataset, or a workdir of another config.
    NonFiniteLossError: the loss became NaN/Inf (names the step; the last good
      checkpoint is kept).
  """
  t_start = time.time()
  run = Run(config, workdir)
  config = run.config
  if run.is_chief:
    os.makedirs(workdir, exist_ok=True)
    ckpt_lib.check_workdir_config(workdir, config)
  final_path = os.path.join(workdir, 'final_metrics.json')

  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               best_metric=config.best_metric, best_mode=config.best_mode)
  restored = ckpt.restore_latest(_host_target(run.abstract_state()))
  if restored is not None:
    host_state, meta = restored
    start = int(meta['step'])
    loop_state = meta['loop']
    final = _load_json(final_path)
    if final is not None and final.get('step') == start and (
        start >= run.total_steps or loop_state['stopped_early']):
      print(f'Run in {workdir} already finished at step {start}; final metrics:\n'
            + json.dumps(final, indent=2, sort_keys=True), flush=True)
      ckpt.close()
      return final
    print(f'Resuming from checkpoint step {start} in {ckpt.directory}.', flush=True)
  else:
    host_state, start = run.initial_state(), 0
    loop_state = dict(best=None, best_step=None, plateau_bad=0, early_bad=0, stopped_early=False,
                      train_seconds=0.0)
  run.prepare_features()   # features mode: cached backbone features become the data

  if run.is_chief and config.print_summary:
    _print_summary(run)

  phase = run.phase(start)
  state = run.par.put_state(host_state.replace(tx=run.tx_for_phase(phase)))
  train_step = run.train_step_fn(phase)
  eval_step = run.eval_step_fn()
  end = start if loop_state['stopped_early'] else run.total_steps
  if stop_after_steps is not None:
    end = min(end, start + stop_after_steps)
  loader = run.train_loader()
  last_saved = start if restored is not None else None

  def save(step, metrics=None):
    nonlocal last_saved
    meta = dict(step=step, data_position=step, loop=loop_state,
                config=json.loads(config_lib.to_json(config)))
    ckpt.save(step, run.par.get_state(state), meta, metrics)
    last_saved = step

  writer = writers.MetricWriter(workdir, enabled=run.is_chief, resume_step=start)
  bar = (writers.ProgressBar(end - start, desc=f'{config.model} steps {start}->{end}')
         if run.is_chief and config.progress_bar and end > start else None)
  pending = []   # (step, device metrics) not yet fetched
  # Train metrics summed since the last evaluation point (for epochs.csv); kept in
  # loop_state so a resumed run's rows equal an uninterrupted run's.
  loop_state.setdefault('epoch_sums', {})
  loop_state.setdefault('epoch_count', 0)
  csv_path = os.path.join(workdir, 'epochs.csv')
  csv_resume = [start]   # the first row written drops rows a resumed run will redo
  step = start
  t_train = time.time()
  with _Preemption() as preempt, writer:
    it = iter(loader[start:end].to_iter_dataset(
        data_lib.read_options()))
    for step in range(start, end):
      batch = next(it)
      if run.phase(step) != phase:   # gradual unfreezing: the next stage trains
        phase = run.phase(step)
        state = state.replace(tx=run.tx_for_phase(phase))
        train_step = run.train_step_fn(phase)
        if run.is_chief:
          now = sorted({s for p, s in run.plan.stage.items()
                        if run.plan.unfreeze_phase[p] == phase})
          print(f'\nStep {step}: unfreezing {", ".join(now)}.', flush=True)
      state, metrics = train_step(state, run.par.put_batch(batch))
      pending.append((step + 1, metrics))
      done = step + 1
      at_eval_point = done % run.eval_every == 0 or done == run.total_steps
      is_eval = run.val_source is not None and at_eval_point
      is_ckpt = done % config.checkpoint_every_steps == 0 or done == run.total_steps
      signalled = preempt.signal is not None   # read once: a signal may land mid-block
      stopping = signalled or done == end
      if done % config.log_every_steps == 0 or at_eval_point or is_ckpt or stopping:
        fetched = [(s, run.par.unreplicate_metrics(m)) for s, m in pending]
        pending = []
        for s, m in fetched:
          if not np.isfinite(float(m['loss'])):
            where = (f'step {last_saved} in {ckpt.directory}' if last_saved is not None
                     else 'none (no checkpoint was saved yet)')
            ckpt.close()
            raise NonFiniteLossError(
                f'training loss is {float(m["loss"])} at step {s}; run stopped. Last good '
                f'checkpoint: {where}. Lower optimizer.lr, set optimizer.grad_clip_norm, or '
                'check the input data for NaN/Inf.')
        train_metrics = _mean_metrics(fetched)
        for _, m in fetched:
          for k, v in m.items():
            loop_state['epoch_sums'][k] = loop_state['epoch_sums'].get(k, 0.0) + float(v)
          loop_state['epoch_count'] += 1
        scalars = _scalars('train', metrics_lib.add_error_rates(train_metrics))
        plateau = optim.plateau_scale(run.par.get_state(state.opt_state)) \
            if config.optimizer.schedule == 'plateau' else None
        if plateau is not None:
          scalars['train/lr'] = scalars.get('train/lr', 0.0) * plateau
        writer.write_scalars(done, scalars)
        if bar is not None:
          bar.update(len(fetched), loss=train_metrics['loss'],
                     acc=train_metrics.get('accuracy'))
        val_scalars = {}
        if is_eval:
          val = _evaluate(run, state, eval_step, run.val_source)
          val_scalars = _scalars('val', val)
          writer.write_scalars(done, val_scalars)
          state = _after_validation(run, state, loop_state, {**scalars, **val_scalars}, done)
        if at_eval_point and loop_state['epoch_count']:
          n = loop_state['epoch_count']
          means = {k: v / n for k, v in loop_state['epoch_sums'].items()}
          row = dict(step=done, epoch=round(done / run.steps_per_epoch, 4),
                     **_scalars('train', metrics_lib.add_error_rates(means)), **val_scalars)
          if run.is_chief:
            writers.append_csv_row(csv_path, row, resume_step=csv_resume.pop() if csv_resume
                                   else None)
          loop_state.update(epoch_sums={}, epoch_count=0)
        if is_ckpt or stopping or loop_state['stopped_early']:
          save(done, {**scalars, **val_scalars})
        if signalled or loop_state['stopped_early']:
          break
    else:
      done = end
  loop_state['train_seconds'] += time.time() - t_train
  if bar is not None:
    bar.close()

  finished = done >= run.total_steps or loop_state['stopped_early']
  if not finished:
    ckpt.close()
    print(f'Stopped at step {done} of {run.total_steps}; re-run the same command to '
          'resume.', flush=True)
    return {'status': 'stopped', 'step': done}

  test = _evaluate(run, state, eval_step, run.eval_source)
  confusion = test.pop('confusion', None)
  detections = test.pop('detection_result', None)
  final = {f'test_{k}': v for k, v in test.items()}
  if run.is_chief:
    if confusion is not None:
      _write_per_class(os.path.join(workdir, 'test_per_class.csv'), confusion, config.task)
    if config.task == 'segmentation' and config.write_plots:
      _sample_predictions(run, state, os.path.join(workdir, 'sample_predictions.png'))
    if detections is not None and config.write_plots:
      _detection_plots(run, state, detections, workdir)
  from cnn_jax.analysis import tables  # pylint: disable=import-outside-toplevel
  total = tables.summary(run.model, run.input_shape, print_table=False)[-1]
  final.update(num_params=int(total['params']), flops_per_example=int(total['flops']),
               stopped_early=bool(loop_state['stopped_early']))
  final.update(step=done, num_train_steps=run.total_steps, epochs=done / run.steps_per_epoch,
               train_seconds=loop_state['train_seconds'], dataset=config.dataset,
               model=config.model, eval_split=config.eval_split,
               wall_seconds_this_call=time.time() - t_start)
  if loop_state['best'] is not None:
    final['best_' + config.best_metric.replace('/', '_')] = loop_state['best']
    final['best_step'] = loop_state['best_step']
  if last_saved != done:
    save(done)
  ckpt.close()
  if run.is_chief:
    old = _load_json(final_path)
    if old is not None and old.get('step') != done:   # a run extended to more steps
      os.replace(final_path, os.path.join(workdir, f'final_metrics.step{old.get("step")}.json'))
    _write_json(final_path, final)
    if confusion is not None:
      _write_json(os.path.join(workdir, 'confusion_matrix.json'), confusion.tolist())
    if config.write_plots:
      _plots(workdir, confusion)
    print('Final metrics:\n' + json.dumps(final, indent=2, sort_keys=True), flush=True)
  return final


def _after_validation(run: Run, state, loop_state, scalars, step):
  """Best-metric tracking, reduce-on-plateau and early stopping (host-side state)."""
  config = run.config
  name = config.best_metric
  if not name or name not in scalars:
    return state
  value = scalars[name]
  if _improved(value, loop_state['best'], config.best_mode, config.early_stopping_min_delta):
    loop_state.update(best=value, best_step=step, plateau_bad=0, early_bad=0)
    return state
  loop_state['plateau_bad'] += 1
  loop_state['early_bad'] += 1
  if config.optimizer.schedule == 'plateau' and (
      loop_state['plateau_bad'] >= config.optimizer.plateau_patience):
    host = run.par.get_state(state)
    scale = optim.plateau_scale(host.opt_state) * config.optimizer.plateau_factor
    print(f'\n{name} has not improved for {loop_state["plateau_bad"]} evaluations: '
          f'learning rate x{config.optimizer.plateau_factor} (now x{scale:g}).', flush=True)
    host = host.replace(opt_state=optim.set_plateau_scale(host.opt_state, scale))
    state = run.par.put_state(host)
    loop_state['plateau_bad'] = 0
  if (config.early_stopping_patience is not None
      and loop_state['early_bad'] >= config.early_stopping_patience):
    print(f'\nEarly stopping at step {step}: {name} has not improved for '
          f'{loop_state["early_bad"]} evaluations (best {loop_state["best"]:.4f} at step '
          f'{loop_state["best_step"]}).', flush=True)
    loop_state['stopped_early'] = True
  return state


def _write_per_class(path: str, confusion, task: str) -> None:
  """One row per class: support, precision, recall, F1 (and Dice, IoU)."""
  import csv  # pylint: disable=import-outside-toplevel
  report = metrics_lib.classification_report(confusion)
  seg = metrics_lib.segmentation_scores(confusion) if task == 'segmentation' else None
  fields = ['class', 'support', 'precision', 'recall', 'f1'] + (['dice', 'iou'] if seg else [])
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    out = csv.writer(f, lineterminator='\n')
    out.writerow(fields)
    for c, support in enumerate(report['support']):
      row = [c, support] + [f'{report[k][c]:.6g}' for k in ('precision', 'recall', 'f1')]
      if seg:
        row += ['' if seg[k][c] is None else f'{seg[k][c]:.6g}' for k in ('dice', 'iou')]
      out.writerow(row)
  os.replace(tmp, path)


def _sample_predictions(run: Run, state, path: str) -> None:
  """input | truth | prediction for the first few test examples."""
  from cnn_jax.analysis import plots  # pylint: disable=import-outside-toplevel
  n = run.config.num_sample_predictions
  if not n:
    return
  host = run.par.get_state(state)
  batch = run.eval_loader(run.eval_source)[0]
  images, labels = batch['image'][:n], batch['label'][:n]
  logits = jax.jit(functools.partial(run.model.apply, train=False))(
      {'params': host.params, 'batch_stats': host.batch_stats}, images)
  logits = np.asarray(logits)
  preds = (logits[..., 0] > 0).astype(np.int32) if logits.shape[-1] == 1 else logits.argmax(-1)
  plots.plot_segmentation_samples(images, labels, preds, path)


def _print_summary(run: Run) -> None:
  from cnn_jax.analysis import tables  # pylint: disable=import-outside-toplevel
  buf = []
  with contextlib.redirect_stdout(_Tee(buf)):
    print(f'{run.config.model} on {run.config.dataset}: input {run.input_shape}, '
          f'{run.num_classes} classes, {run.total_steps} steps of batch '
          f'{run.config.batch_size} ({run.steps_per_epoch} steps/epoch) on '
          f'{run.par.num_devices} device(s), parallelism={run.config.parallelism}')
    tables.summary(run.model, run.input_shape, print_table=True)
    if run.plan is not None:
      print('Transfer plan (transfer.freeze / stage_lr_decay / lr_multipliers / '
            'unfreeze_every_epochs):')
      print(run.plan.describe())
  with open(os.path.join(run.workdir, 'summary.txt'), 'w') as f:
    f.write(''.join(buf))


class _Tee:
  def __init__(self, buf):
    self.buf = buf
    self.out = __import__('sys').stdout

  def write(self, s):
    self.buf.append(s)
    return self.out.write(s)

  def flush(self):
    self.out.flush()


def _plots(workdir: str, confusion) -> None:
  from cnn_jax.analysis import plots  # pylint: disable=import-outside-toplevel
  records = writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  if records:
    plots.plot_training_curves(records, os.path.join(workdir, 'training_curves.png'))
  if confusion is not None:
    plots.plot_confusion_matrix(confusion, os.path.join(workdir, 'confusion_matrix.png'))


def _detection_plots(run: Run, state, result, workdir: str) -> None:
  """pr_curves.png (per class at IoU 0.5) and sample_detections.png (the first
  test images, predictions beside the ground truth)."""
  from cnn_jax.detection import draw  # pylint: disable=import-outside-toplevel
  from cnn_jax.detection import metrics as det_metrics  # pylint: disable=import-outside-toplevel
  from cnn_jax.detection import steps as det_steps  # pylint: disable=import-outside-toplevel
  names = _class_names(run)
  det_metrics.plot_pr_curves(result, os.path.join(workdir, 'pr_curves.png'), names)
  n = min(run.config.num_sample_predictions, len(run.eval_source))
  examples = [run.eval_transform(data_lib.to_example(run.eval_source[i], task='detection',
                                                     max_objects=run.max_objects),
                                 np.random.default_rng(0)) for i in range(n)]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  host = run.par.get_state(state)
  collector = det_steps.Collector(run.num_classes)
  fn = jax.jit(functools.partial(det_steps.eval_step, num_classes=run.num_classes,
                                 detection=run.config.detection.to_dict()))
  collector.add(batch, jax.device_get(fn(host, batch)))
  d = collector.detections
  draw.plot_detections(
      batch['image'], batch['boxes'], batch['label'], [x['boxes'] for x in d],
      [x['scores'] for x in d], [x['classes'] for x in d],
      os.path.join(workdir, 'sample_detections.png'), names, gt_valid=batch['valid'],
      pred_valid=[x['valid'] for x in d], max_images=n)


def _class_names(run: Run):
  if run.config.dataset == 'shapes':
    from cnn_jax.data import shapes_scenes  # pylint: disable=import-outside-toplevel
    return list(shapes_scenes.CLASSES)
  label = None
  try:
    label = run.train_source.dataset_info.features['objects']['label']
  except (AttributeError, KeyError, TypeError):
    pass
  names = getattr(label, 'names', None)
  return list(names) if names else [str(c) for c in range(run.num_classes)]


def evaluate(config, workdir: str) -> Dict[str, Any]:
  """Restores the latest good checkpoint of workdir and evaluates it on eval_split.

  Writes workdir/eval_metrics.json with the same keys as final_metrics.json's
  test_* entries, and returns them.
  """
  run = Run(config, workdir)
  if not os.path.exists(os.path.join(workdir, 'checkpoints')):
    raise ValueError(f'no checkpoints in {workdir!r}; train first with --mode=train.')
  ckpt_lib.check_workdir_config(workdir, run.config, write=False)
  run.prepare_features()
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  restored = ckpt.restore_latest(_host_target(run.abstract_state()))
  ckpt.close()
  if restored is None:
    raise ValueError(f'no restorable checkpoint in {workdir!r}; train first.')
  host_state, meta = restored
  state = run.par.put_state(host_state)
  test = _evaluate(run, state, run.eval_step_fn(), run.eval_source)
  test.pop('confusion', None)
  test.pop('detection_result', None)
  out = {f'test_{k}': v for k, v in test.items()}
  out['step'] = int(meta['step'])
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'eval_metrics.json'), out)
  print(json.dumps(out, indent=2, sort_keys=True), flush=True)
  return out
