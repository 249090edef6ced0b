"""The training config: every key, its default and type, and the checks run before compute.

Experiment files in ``configs/`` start from ``default_config()`` and change what
differs::

    from cnn_jax.train.config import default_config

    def get_config():
      config = default_config()
      config.model = 'lenet5'
      ...
      return config

``default_config()`` is locked: a misspelt key raises at once, naming the key, and
a value of the wrong type (``--config.batch_size=abc``) raises naming the field.
``validate(config)`` then checks values and combinations (the model exists, exactly
one of num_epochs/num_train_steps, known optimizer and loss, parseable augmentation
specs, ...) and returns a plain dict view. Configs given as plain dicts go through
``from_dict`` for the same key and type checks.
"""
from __future__ import annotations

import difflib
import json
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

TASKS = ('classification', 'segmentation', 'detection')
CONF_TARGETS = ('iou', 'one')
CLASS_LOSSES = ('mse', 'ce')
# Augmentation ops that leave normalised boxes where they are (detection).
BOX_SAFE_OPS = ('resize', 'normalize', 'to_rgb', 'color_jitter', 'pca_noise')
PARALLELISM = ('jit', 'pmap')
CONV_IMPLS = ('cnn_jax', 'flax')
LOSSES = ('cross_entropy', 'sigmoid_cross_entropy', 'mse', 'dice', 'cross_entropy+dice')
BEST_MODES = ('max', 'min')
# Keys that may change between runs in one workdir without --config.allow_config_change:
# they steer how the run is observed or where it stops, not what it computes.
MUTABLE_KEYS = ('allow_config_change', 'num_epochs', 'num_train_steps', 'log_every_steps',
                'progress_bar', 'write_plots', 'print_summary', 'data_dir',
                'checkpoint_every_steps', 'keep_checkpoints', 'eval_every_steps')
TRANSFER_MODES = ('finetune', 'features')
FROZEN_BN = ('eval', 'keep', 'update')
HEAD_MODES = ('replace', 'keep')
INIT_CHECKPOINTS = ('latest', 'best')


def default_config() -> ml_collections.ConfigDict:
  """Every config key with its default. Locked: unknown keys are errors."""
  c = ml_collections.ConfigDict()
  # --- what is trained
  c.task = 'classification'        # 'segmentation': per-pixel labels, Dice/IoU metrics;
                                   # 'detection': boxes, a YOLO model, mAP
  c.model = ''                     # a name from cnn_jax.models.list_models()
  c.model_kwargs = ml_collections.ConfigDict()  # extra fields for the model class
  c.conv = 'cnn_jax'               # 'cnn_jax': our custom_vjp conv; 'flax': flax.linen.Conv
  c.num_classes = placeholder(int)  # None: read from the dataset's label feature
  # --- data (tfds data sources read with grain; see cnn_jax.data)
  c.dataset = ''                   # 'digits', 'mnist1d' (embedded) or a prepared tfds name
  c.data_dir = placeholder(str)    # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.train_split = 'train'
  c.val_split = placeholder(str)   # e.g. 'train[90%:]' with train_split='train[:90%]'
  c.eval_split = 'test'            # evaluated once at the end -> final_metrics.json
  c.train_transform = ''           # augmentation spec, see cnn_jax.data.augment
  c.eval_transform = ''
  c.classes = ''                   # e.g. '5,6,7,8,9': keep these classes, relabelled 0..k-1
  c.train_examples_per_class = placeholder(int)  # few-shot: n per class of train_split
  # --- schedule of the run
  c.batch_size = 128               # global batch, split over devices and processes
  c.eval_batch_size = placeholder(int)  # None: batch_size
  c.num_epochs = placeholder(float)     # exactly one of num_epochs / num_train_steps
  c.num_train_steps = placeholder(int)
  c.seed = 0                       # params init, dropout and data order
  c.optimizer = ml_collections.ConfigDict(dict(
      name='momentum', lr=0.1, momentum=placeholder(float), weight_decay=0.0,
      schedule='constant', warmup_steps=0, decay_steps=placeholder(int),
      boundaries=(), decay_factor=0.1, grad_clip_norm=placeholder(float),
      plateau_factor=0.1, plateau_patience=2))
  c.loss = ml_collections.ConfigDict(dict(
      name='cross_entropy',        # see LOSSES; 'cross_entropy+dice' for segmentation
      label_smoothing=0.0,
      aux_weight=0.3,              # weight of GoogLeNet's auxiliary losses
      class_weights=()))           # per-class loss weights; () for none
  # --- detection (task='detection', see cnn_jax.detection)
  c.detection = ml_collections.ConfigDict(dict(
      max_objects=50,              # ground-truth boxes per image (the rest is padding)
      lambda_coord=5.0,            # YOLO v1 loss: weight of the box terms
      lambda_noobj=0.5,            # and of the confidence of boxes with no object
      conf_target='iou',           # 'iou' (the paper) or 'one'
      class_loss='mse',            # 'mse' (the paper) or 'ce'
      nms_iou_threshold=0.5,       # per-class non-maximum suppression
      score_threshold=0.01,        # detections kept for mAP (low: AP needs the tail)
      max_detections=100,          # per image
  ))
  # --- transfer learning (see cnn_jax.transfer): start from trained weights
  c.transfer = ml_collections.ConfigDict(dict(
      init_from='',                # '': train from scratch; a workdir of this project,
                                   # or a torchvision weights file (.pth/.npz/.safetensors)
      init_checkpoint='latest',    # workdir: 'latest' or 'best' checkpoint
      init_model='',               # the model the weights are for ('': config.model)
      head='replace',              # 'replace': fresh output layer; 'keep': reuse it
      mode='finetune',             # 'finetune' or 'features' (train a classifier on
                                   # cached features of the frozen backbone)
      freeze='',                   # comma list of stage names ('stem,stage1'), 'backbone',
                                   # or regexes over parameter paths
      frozen_bn='eval',            # frozen BN layers: 'eval' (running statistics),
                                   # 'keep' (batch statistics, running ones not updated),
                                   # 'update' (as unfrozen ones)
      unfreeze_every_epochs=0.0,   # > 0: unfreeze the frozen stages top-down, one per N epochs
      stage_lr_decay=1.0,          # lr x decay^k for the stage k stages below the head
      lr_multipliers='',           # 'stem=0.01,stage4=0.5': per stage or regex
      feature_layer='pre_logits',  # 'features' mode: the intermediate that is cached
      head_hidden=0,               # 'features' mode: hidden units of an MLP head (0: linear)
  ))
  # --- parallelism
  c.parallelism = 'jit'            # 'jit': Mesh + NamedSharding; 'pmap': jax.pmap
  c.num_devices = placeholder(int)  # None: all devices
  c.distributed = False            # call jax.distributed.initialize() (multi-host)
  c.coordinator_address = placeholder(str)  # 'host:port'; None: auto-detect (TPU, SLURM)
  c.num_processes = placeholder(int)
  c.process_id = placeholder(int)
  # --- evaluation, checkpoints, stopping
  c.log_every_steps = 50
  c.eval_every_steps = placeholder(int)  # None: once per epoch (needs val_split)
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3           # the last K, plus the best by best_metric
  c.best_metric = 'val/accuracy'   # chooses the best checkpoint and early stopping
  c.best_mode = 'max'
  c.early_stopping_patience = placeholder(int)  # evals without improvement; None: off
  c.early_stopping_min_delta = 0.0
  c.allow_config_change = False    # resume a workdir whose saved config differs
  # --- output
  c.progress_bar = True
  c.write_plots = True
  c.num_sample_predictions = 6     # segmentation: rows in sample_predictions.png
  c.print_summary = True
  c.lock()
  c.model_kwargs.unlock()
  return c


def _close(key: str, choices) -> str:
  near = difflib.get_close_matches(key, list(choices), n=3)
  return f' Did you mean {" or ".join(repr(n) for n in near)}?' if near else ''


def from_dict(values: Mapping[str, Any], base: ml_collections.ConfigDict | None = None,
              prefix: str = '') -> ml_collections.ConfigDict:
  """Applies nested `values` onto default_config() with key and type checks.

  Raises ValueError naming the first unknown key (with close matches) or the key
  whose value has the wrong type.
  """
  config = default_config() if base is None else base
  for key, value in values.items():
    name = prefix + key
    if key == 'model_kwargs' and not prefix:
      config.model_kwargs = ml_collections.ConfigDict(dict(value))
      continue
    if key not in config:
      raise ValueError(f'unknown config key {name!r}.{_close(key, config.keys())} '
                       f'Valid keys here: {sorted(config.keys())}.')
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping) and not hasattr(value, 'items'):
        raise ValueError(f'config key {name!r} must be a mapping, got {value!r}.')
      from_dict(value, config[key], prefix=name + '.')
      continue
    try:
      config[key] = value
    except TypeError as e:
      raise ValueError(f'config key {name!r} has the wrong type: {e}') from None
  return config


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f'config key {name!r} is {value!r}; valid choices are '
                     f'{list(choices)}.{_close(str(value), choices)}')


def validate(config) -> ml_collections.ConfigDict:
  """Checks a config before any compute and fills derived defaults.

  Accepts a ConfigDict (built from default_config()) or a plain nested dict.
  Returns the checked ConfigDict (unlocked copies are not made: fields stay typed).
  Raises:
    ValueError naming the key and the fix for every problem found first.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    config = from_dict(config)
  else:
    # A ConfigDict not built from default_config() still gets the key checks.
    config = from_dict(config.to_dict())
  from cnn_jax import models
  if not config.model:
    raise ValueError("config key 'model' is empty; set it to one of "
                     f'cnn_jax.models.list_models(), e.g. {models.list_models()[:5]}.')
  models.model_info(config.model)   # raises with close matches if unknown
  if not config.dataset:
    raise ValueError("config key 'dataset' is empty; set e.g. 'digits' (embedded, offline) "
                     "or a prepared tfds dataset such as 'cifar10'.")
  if (config.num_epochs is None) == (config.num_train_steps is None):
    raise ValueError("set exactly one of 'num_epochs' and 'num_train_steps' "
                     f'(got num_epochs={config.num_epochs}, '
                     f'num_train_steps={config.num_train_steps}).')
  for key in ('num_epochs', 'num_train_steps', 'batch_size', 'eval_batch_size',
              'checkpoint_every_steps', 'keep_checkpoints', 'log_every_steps',
              'eval_every_steps', 'num_devices'):
    v = config[key]
    if v is not None and v <= 0:
      raise ValueError(f'config key {key!r} must be positive, got {v}.')
  _check_choice('task', config.task, TASKS)
  _check_choice('parallelism', config.parallelism, PARALLELISM)
  _check_choice('conv', config.conv, CONV_IMPLS)
  _check_choice('loss.name', config.loss.name, LOSSES)
  _check_choice('best_mode', config.best_mode, BEST_MODES)
  if not 0.0 <= config.loss.label_smoothing < 1.0:
    raise ValueError("config key 'loss.label_smoothing' must be in [0, 1), got "
                     f'{config.loss.label_smoothing}.')
  if config.best_metric and not config.best_metric.startswith(('val/', 'train/')):
    raise ValueError("config key 'best_metric' must name a logged metric such as "
                     f"'val/accuracy' or 'train/loss', got {config.best_metric!r}.")
  if config.early_stopping_patience is not None and not config.val_split:
    raise ValueError("'early_stopping_patience' needs a validation split: set "
                     "'val_split' (e.g. train_split='train[:90%]', val_split='train[90%:]').")
  if config.optimizer.schedule == 'plateau' and not config.val_split:
    raise ValueError("optimizer.schedule 'plateau' reduces the lr when the validation "
                     "metric stops improving: set 'val_split'.")
  from cnn_jax.train import optim
  optim.check_config(config.optimizer)
  from cnn_jax.data import augment
  for key in ('train_transform', 'eval_transform'):
    try:
      augment.make_transform(config[key])
    except ValueError as e:
      raise ValueError(f'config key {key!r}: {e}') from None
  _validate_data_selection(config)
  _validate_detection(config)
  _validate_transfer(config)
  if config.distributed and config.coordinator_address is not None and (
      config.num_processes is None or config.process_id is None):
    raise ValueError("with 'coordinator_address' set, also set 'num_processes' and "
                     "'process_id' (or leave all three unset to auto-detect).")
  return config


def parse_classes(spec: str):
  """'5,6,7' or '5-9' (or a mix) -> [5, 6, 7]; '' -> None. Raises ValueError."""
  spec = (spec or '').strip()
  if not spec:
    return None
  out = []
  for part in spec.split(','):
    part = part.strip()
    lo, sep, hi = part.partition('-')
    try:
      ids = list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
    except ValueError:
      raise ValueError(f"config key 'classes' is {spec!r}; write class ids as '5,6,7' or "
                       "'5-9'.") from None
    out += ids
  if len(set(out)) != len(out) or min(out) < 0:
    raise ValueError(f"config key 'classes' is {spec!r}: class ids must be distinct and "
                     '>= 0.')
  return out


def _validate_data_selection(config) -> None:
  parse_classes(config.classes)
  n = config.train_examples_per_class
  if n is not None and n <= 0:
    raise ValueError(f"config key 'train_examples_per_class' must be positive, got {n}.")
  if n is not None and config.task != 'classification':
    raise ValueError("'train_examples_per_class' needs task='classification' (one label "
                     'per example).')
  if config.classes and config.task != 'classification':
    raise ValueError("'classes' selects examples by their label: it needs "
                     "task='classification'.")


def _validate_detection(config) -> None:
  d = config.detection
  _check_choice('detection.conf_target', d.conf_target, CONF_TARGETS)
  _check_choice('detection.class_loss', d.class_loss, CLASS_LOSSES)
  for key in ('max_objects', 'max_detections'):
    if d[key] < 1:
      raise ValueError(f"config key 'detection.{key}' must be >= 1, got {d[key]}.")
  for key in ('lambda_coord', 'lambda_noobj'):
    if d[key] < 0:
      raise ValueError(f"config key 'detection.{key}' must be >= 0, got {d[key]}.")
  for key in ('nms_iou_threshold', 'score_threshold'):
    if not 0.0 <= d[key] <= 1.0:
      raise ValueError(f"config key 'detection.{key}' must be in [0, 1], got {d[key]}.")
  family = None
  if config.model:
    from cnn_jax import models  # pylint: disable=import-outside-toplevel
    family = models.model_info(config.model).family
  if config.task != 'detection':
    if family == 'detection':
      raise ValueError(f"model {config.model!r} is a detector: set task='detection'.")
    return
  if family is not None:
    if family != 'detection':
      raise ValueError(f"task='detection' needs a detection model (yolo, yolo_shapes, or "
                       f"yolo with model_kwargs.backbone=...), got {config.model!r} "
                       f'({family}).')
  from cnn_jax.data import augment  # pylint: disable=import-outside-toplevel
  for key in ('train_transform', 'eval_transform'):
    ops = [text.split('(')[0] for text, _, _ in augment.make_transform(config[key]).ops]
    moving = [op for op in ops if op not in BOX_SAFE_OPS]
    if moving:
      raise ValueError(f"config key {key!r}: {', '.join(moving)} move pixels, and the "
                       "boxes would not follow; with task='detection' use only "
                       f"{', '.join(BOX_SAFE_OPS)}.")
  if config.best_metric.endswith(('/accuracy', '/top5_accuracy', '/error')):
    raise ValueError(f"best_metric {config.best_metric!r} is a classification metric; "
                     "with task='detection' use 'val/mAP50' (or 'val/mAP', 'val/loss' "
                     "with best_mode='min').")
  if config.distributed:
    raise ValueError("task='detection' gathers every image's detections on one host for "
                     'mAP; multi-process runs (distributed=True) are not supported yet: '
                     'train on the devices of one host.')
  if config.loss.name != 'cross_entropy' or config.loss.label_smoothing:
    raise ValueError("task='detection' trains the YOLO loss (config keys detection.*); "
                     'leave loss.name and loss.label_smoothing at their defaults.')


def _validate_transfer(config) -> None:
  t = config.transfer
  _check_choice('transfer.mode', t.mode, TRANSFER_MODES)
  _check_choice('transfer.frozen_bn', t.frozen_bn, FROZEN_BN)
  _check_choice('transfer.head', t.head, HEAD_MODES)
  _check_choice('transfer.init_checkpoint', t.init_checkpoint, INIT_CHECKPOINTS)
  if t.unfreeze_every_epochs < 0:
    raise ValueError("config key 'transfer.unfreeze_every_epochs' must be >= 0, got "
                     f'{t.unfreeze_every_epochs}.')
  if t.unfreeze_every_epochs and not t.freeze:
    raise ValueError("'transfer.unfreeze_every_epochs' unfreezes the stages listed in "
                     "'transfer.freeze', which is empty; set e.g. "
                     "transfer.freeze='backbone'.")
  if t.stage_lr_decay <= 0:
    raise ValueError("config key 'transfer.stage_lr_decay' must be positive (1.0: the "
                     f'same lr everywhere), got {t.stage_lr_decay}.')
  if t.head_hidden < 0:
    raise ValueError(f"config key 'transfer.head_hidden' must be >= 0, got {t.head_hidden}.")
  if t.mode == 'features':
    if not t.init_from:
      raise ValueError("transfer.mode='features' extracts features with a pretrained "
                       "backbone: set 'transfer.init_from' (a workdir or a weights file).")
    if config.train_transform:
      raise ValueError("transfer.mode='features' computes each example's features once, so "
                       "random augmentation cannot apply: set train_transform='' or use "
                       "transfer.mode='finetune'.")
    if config.task != 'classification':
      raise ValueError("transfer.mode='features' trains a classifier: it needs "
                       "task='classification'.")
    if t.freeze or t.unfreeze_every_epochs or t.lr_multipliers or t.stage_lr_decay != 1.0:
      raise ValueError("transfer.mode='features' trains only the new classifier; freeze, "
                       "unfreeze_every_epochs, stage_lr_decay and lr_multipliers apply to "
                       "transfer.mode='finetune'.")
  if t.init_from and not t.init_from.startswith(('gs://', 's3://')):
    import os  # pylint: disable=import-outside-toplevel
    if not os.path.exists(os.path.expanduser(t.init_from)):
      raise ValueError(f"config key 'transfer.init_from' is {t.init_from!r}, which does not "
                       'exist: give a workdir of a finished run or a weights file.')


def to_json(config) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=str)


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any], prefix='',
                   defaults: Mapping[str, Any] | None = None):
  """Dotted keys whose values differ between two nested dicts (MUTABLE_KEYS aside).

  A key missing from `saved` whose current value is its default does not count:
  a workdir written before that key existed holds a run that had the default.
  """
  if defaults is None and not prefix:
    defaults = default_config().to_dict()
  defaults = defaults or {}
  out = []
  for key in sorted(set(saved) | set(current)):
    name = prefix + key
    if name in MUTABLE_KEYS:
      continue
    a, b = saved.get(key, '<missing>'), current.get(key, '<missing>')
    d = defaults.get(key, '<missing>') if isinstance(defaults, Mapping) else '<missing>'
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += differing_keys(a, b, name + '.', d if isinstance(d, Mapping) else {})
    elif key not in saved and isinstance(b, Mapping) and isinstance(d, Mapping):
      out += differing_keys({}, b, name + '.', d)
    elif key not in saved and _normal(b) == _normal(d):
      continue
    elif _normal(a) != _normal(b):
      out.append(name)
  return out


def _normal(v):
  return json.loads(json.dumps(v, default=str))
