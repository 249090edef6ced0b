"""Random-access data sources (tfds.data_source) and grain loaders.

``get_source(name, split, data_dir)``
  * embedded names (``digits``, ``mnist1d``, ``plants``, ``shapes``; see ``embedded.py``) are
    prepared on first use into ``data_dir`` as array_record files (offline, seconds)
    and read back;
  * catalog names (``mnist``, ``cifar10``, ``mnist:3.0.1``, ``cifar10/config`` ...) are
    read only if already prepared (array_record) under ``data_dir``; otherwise a
    ``ValueError`` is raised at once, naming the command that prepares them, instead
    of letting tfds retry the network for minutes.

``make_loader(source, batch_size=..., seed=..., task='classification')``
  a grain ``MapDataset`` pipeline yielding ``{'image': float32 (B, ...), 'label': int32
  (B,), 'mask': float32 (B,)}`` batches (``task='segmentation'``: 'label' is int32
  (B, H, W)), deterministic given the seed, reshuffled every epoch, indexable by step,
  and split by rows across processes (multi-host).
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Any, Callable

import grain
import numpy as np
import tensorflow_datasets as tfds

from cnn_jax.data import embedded

EMBEDDED = tuple(embedded.BUILDERS)


def default_data_dir() -> str:
  return os.path.expanduser(
      os.environ.get('TFDS_DATA_DIR') or os.path.join('~', 'tensorflow_datasets'))


def _prepare_command(name: str, data_dir: str | None = None) -> str:
  if data_dir and os.path.abspath(data_dir) != os.path.abspath(default_data_dir()):
    return f'make data DATASET={name} DATA_DIR={data_dir}'
  return f'make data DATASET={name}'


def _split_name(name: str):
  """'cifar10/cfg:1.0.0' -> ('cifar10', 'cfg', '1.0.0'); missing parts are None."""
  base, _, version = name.partition(':')
  base, _, config = base.partition('/')
  return base, (config or None), (version or None)


def _catalog_is_prepared(name: str, data_dir: str) -> tuple[bool, bool]:
  """(any prepared version present, array_record files present). Filesystem only."""
  base, config, version = _split_name(name)
  root = os.path.join(data_dir, base)
  if config:
    root = os.path.join(root, config)
  pattern = os.path.join(root, version) if version else os.path.join(root, '**')
  infos = glob.glob(os.path.join(pattern, 'dataset_info.json'), recursive=True)
  if not infos:
    return False, False
  dirs = {os.path.dirname(p) for p in infos}
  has_ar = any(glob.glob(os.path.join(d, '*.array_record*')) for d in dirs)
  return True, has_ar


def prepare_embedded(name: str, data_dir: str | None = None):
  """Builds (once) an embedded dataset into data_dir and returns its tfds builder."""
  if name not in embedded.BUILDERS:
    raise ValueError(f'{name!r} is not an embedded dataset; choose from {EMBEDDED}.')
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  builder = embedded.BUILDERS[name](data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')
  return builder


def get_source(name: str, split: str, data_dir: str | None = None):
  """Returns a random-access source (tfds.data_source) for split of dataset name."""
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  base = _split_name(name)[0]
  if base in embedded.BUILDERS:
    builder = prepare_embedded(base, data_dir)
    return builder.as_data_source(split=split)
  prepared, has_array_record = _catalog_is_prepared(name, data_dir)
  if not prepared:
    raise ValueError(
        f'Dataset {name!r} is not prepared in {data_dir!r} (no dataset_info.json found '
        f'under {os.path.join(data_dir, base)}). This machine may have no network, so '
        f'it is not downloaded here. Prepare it first with '
        f'`{_prepare_command(name.partition(":")[0], data_dir)}` '
        f'(or set TFDS_DATA_DIR / --data_dir to where it is prepared), or use an '
        f'embedded offline dataset: {", ".join(EMBEDDED)}.')
  if not has_array_record:
    raise ValueError(
        f'Dataset {name!r} in {data_dir!r} is prepared, but not as array_record files, '
        f'which tfds.data_source needs (it was probably built by tfds.load as tfrecord). '
        f'`make data` will not replace it: move that version folder aside, or prepare '
        f'into another directory with `{_prepare_command(base, "OTHER_DIR")}` and '
        'point config.data_dir there.')
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


TASKS = ('classification', 'segmentation', 'detection')


class Subset:
  """A random-access view of some records of a source, labels remapped.

  Built by `select`; behaves as a source (len, integer indexing) for make_loader."""

  def __init__(self, source, indices, label_map=None):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    self._label_map = label_map
    self.dataset_info = getattr(source, 'dataset_info', None)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    record = self._source[int(self._indices[i])]
    if self._label_map is not None:
      record = dict(record)
      record['label'] = np.int64(self._label_map[int(np.asarray(record['label']))])
    return record

  def __repr__(self):
    return f'Subset({len(self)} of {len(self._source)} records)'


def _labels(source) -> np.ndarray:
  """Every record's integer label, read once (decodes each record)."""
  out = np.empty(len(source), np.int64)
  for i in range(len(source)):
    label = np.asarray(source[i]['label'])
    if label.ndim:
      raise ValueError('selecting classes needs one integer label per record; this '
                       f'dataset has labels of shape {label.shape}.')
    out[i] = int(label)
  return out


def select(source, classes=None, per_class: int | None = None, seed: int = 0):
  """The records of `source` whose label is in `classes`, relabelled 0..k-1 in that
  order, and with `per_class`, only that many of each class (a seeded random pick,
  kept in source order).

  Raises ValueError when a class has no examples or fewer than per_class. Returns
  `source` itself when there is nothing to select."""
  if classes is None and per_class is None:
    return source
  labels = _labels(source)
  wanted = list(classes) if classes is not None else sorted(set(labels.tolist()))
  label_map = {c: i for i, c in enumerate(wanted)} if classes is not None else None
  rng = np.random.default_rng(seed)
  keep = []
  for c in wanted:
    idx = np.flatnonzero(labels == c)
    if idx.size == 0:
      raise ValueError(f'class {c} has no examples in this split (labels present: '
                       f'{sorted(set(labels.tolist()))}); fix config.classes.')
    if per_class is not None:
      if idx.size < per_class:
        raise ValueError(f'class {c} has {idx.size} examples in this split, fewer than '
                         f'train_examples_per_class={per_class}.')
      idx = np.sort(rng.choice(idx, per_class, replace=False))
    keep.append(idx)
  return Subset(source, np.sort(np.concatenate(keep)), label_map)


def _as_mask(mask) -> np.ndarray:
  """A mask (H, W) or (H, W, 1) -> int32 (H, W)."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  return mask.astype(np.int32)


def to_example(record: dict, task: str = 'classification', max_objects: int = 0) -> dict:
  """A raw tfds record -> {'image': float32, 'label': int32}.

  uint8 images (catalog datasets) are scaled to [0, 1]; float images are kept as is.

  task='classification' (the default): label = record['label'].
  task='segmentation': label = the (H, W) mask of class ids:
    * record['segmentation_mask'] when present, minus 1: tfds' oxford_iiit_pet trimap
      (1 pet, 2 background, 3 border -> 0 pet, 1 background, 2 border), whose
      record['label'] is the breed and is not used. A 'segmentation_mask' holding a 0
      follows another convention (caltech_birds2011, for one, uses the same key) and
      raises ValueError;
    * else record['label'], which must be a mask (ndim >= 2; e.g. ``plants``).
  Either way a label with ndim >= 2 is a mask: int32, a trailing channel of 1 dropped.
  task='detection': {'image', 'boxes' (M, 4) float32 (x0, y0, x1, y1) in [0, 1],
    'label' (M,) int32 class ids, 'valid' (M,) bool} with M = max_objects (padding
    rows zero and invalid), from the embedded ``shapes`` records ('boxes', 'labels',
    'num_objects') or tfds's detection records (``voc``, ``coco``: 'objects' with
    'bbox' as (ymin, xmin, ymax, xmax) and 'label'). More than M objects is an
    error naming config key 'detection.max_objects'.
  """
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}.')
  image = np.asarray(record['image'])
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  else:
    image = image.astype(np.float32)
  if task == 'detection':
    return _detection_example(record, image, max_objects)
  if task == 'segmentation' and 'segmentation_mask' in record:
    mask = _as_mask(record['segmentation_mask'])
    if mask.size and mask.min() < 1:
      raise ValueError("segmentation_mask holds 0: expected oxford_iiit_pet's trimap "
                       'values 1 (pet), 2 (background), 3 (border).')
    return {'image': image, 'label': mask - 1}
  label = np.asarray(record['label'])
  if label.ndim >= 2:
    return {'image': image, 'label': _as_mask(label)}
  if task == 'segmentation':
    raise ValueError(f"task='segmentation' needs a mask: a 'segmentation_mask' or an "
                     f"(H, W) 'label', got a label of shape {label.shape}.")
  return {'image': image, 'label': label.astype(np.int32)}


def _detection_example(record: dict, image: np.ndarray, max_objects: int) -> dict:
  if max_objects < 1:
    raise ValueError("task='detection' needs max_objects >= 1 (config key "
                     "'detection.max_objects').")
  if 'boxes' in record:
    n = int(np.asarray(record.get('num_objects', len(record['boxes']))))
    boxes = np.asarray(record['boxes'], np.float32)[:n]
    labels = np.asarray(record['labels'], np.int64)[:n]
  elif 'objects' in record:
    objects = record['objects']
    yxyx = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)
    boxes = yxyx[:, [1, 0, 3, 2]]
    labels = np.asarray(objects['label'], np.int64).reshape(-1)
    n = len(boxes)
  else:
    raise ValueError("task='detection' needs records with 'boxes'/'labels' (the embedded "
                     "shapes) or tfds 'objects' with 'bbox' and 'label' (voc, coco); got "
                     f'keys {sorted(record)}.')
  if n > max_objects:
    raise ValueError(f'an image holds {n} objects, more than detection.max_objects='
                     f'{max_objects}; raise config key detection.max_objects.')
  out_boxes = np.zeros((max_objects, 4), np.float32)
  out_labels = np.zeros((max_objects,), np.int32)
  valid = np.zeros((max_objects,), bool)
  out_boxes[:n], out_labels[:n], valid[:n] = boxes, labels, True
  return {'image': image, 'boxes': out_boxes, 'label': out_labels, 'valid': valid}


def make_loader(
    source,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    transform: Callable[[dict], dict] | None = None,
    random_transform: Callable[[dict, np.random.Generator], dict] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    task: str = 'classification',
    max_objects: int = 0,
) -> grain.MapDataset:
  """A grain MapDataset of dict batches {'image', 'label', 'mask'}.

  Pipeline: source -> seed -> shuffle (a new permutation every epoch) -> to_example
  -> transform -> random_transform (per-example numpy Generator, seeded from `seed`,
  the element's index and the epoch) -> repeat -> global batches of `batch_size`
  (per epoch: no batch straddles two epochs) -> this process's rows.

  Every process builds the same sequence of global batches and reads only its own
  rows ``[p * b, (p + 1) * b)`` of each, ``b = batch_size // process_count``; so
  the global batch at step k is the same whether it is read by one process or by
  many, and no process decodes another's examples.

  ``drop_remainder=False`` (evaluation) keeps the last partial batch at full size,
  padded with zero examples whose 'mask' is 0 (real examples have mask 1): shapes
  stay static and masked sums stay exact. ``num_epochs=None`` repeats forever.
  The result supports ``len``, indexing ``ds[step]`` (random access: step k is the
  same batch on every run, which is how a resumed run continues its data) and
  iteration. ``task`` is passed to ``to_example``: with 'segmentation' the 'label'
  of a batch is the int32 (B, H, W) stack of masks (padding examples: all 0);
  with 'detection' a batch has 'boxes' (B, M, 4), 'label' (B, M) and 'valid' (B, M)
  with M = ``max_objects`` (see ``to_example``).
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}.')
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} must be in [0, process_count='
                     f'{process_count}).')
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the number of '
                     f'processes {process_count}; choose a multiple of {process_count}.')
  n = len(source)
  if drop_remainder and batch_size > n:
    raise ValueError(f'batch_size {batch_size} > dataset size {n} with '
                     'drop_remainder=True would give no batches.')
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.map(functools.partial(to_example, task=task, max_objects=max_objects))
  if transform is not None:
    ds = ds.map(transform)
  if random_transform is not None:
    ds = ds.random_map(random_transform)
  ds = ds.repeat(num_epochs)

  local = batch_size // process_count
  per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
  epochs = num_epochs if num_epochs is not None else 10**12 // max(per_epoch * local, 1)
  template = []

  def padding():
    if not template:
      template.append(_padding_example(ds[0]))
    return template[0]

  def fetch(i):
    step, r = divmod(i, local)
    epoch, j = divmod(step, per_epoch)
    pos = j * batch_size + process_index * local + r
    if pos >= n:
      return padding()
    return {**ds[epoch * n + pos], 'mask': np.float32(1.0)}

  out = grain.MapDataset.range(per_epoch * local * epochs).map(fetch)
  return out.batch(local, drop_remainder=False)


def _padding_example(example: dict) -> dict:
  """A padding example: zeros shaped like `example`, with mask 0."""
  out = {k: np.zeros_like(np.asarray(v)) for k, v in example.items()}
  out['mask'] = np.float32(0.0)
  return out


# Class counts of the embedded datasets, whose labels are plain integer tensors
# (plants: the class ids of its masks).
_EMBEDDED_NUM_CLASSES = {'digits': 10, 'mnist1d': 10, 'plants': 3, 'shapes': 4}


def num_classes(source, name: str) -> int:
  """Number of classes of a dataset: its tfds ClassLabel, or the embedded table."""
  base = _split_name(name)[0]
  if base in _EMBEDDED_NUM_CLASSES:
    return _EMBEDDED_NUM_CLASSES[base]
  info = getattr(source, 'dataset_info', None)
  label = None
  try:
    label = info.features['label']
  except (AttributeError, KeyError, TypeError):
    pass
  n = getattr(label, 'num_classes', None)
  if not n:
    raise ValueError(f'cannot tell the number of classes of dataset {name!r} (no tfds '
                     "ClassLabel 'label' feature); set config.num_classes.")
  return int(n)


def read_options(num_threads: int | None = None, prefetch: int = 4) -> grain.ReadOptions:
  """grain read options for the training iterator: a few reader threads that
  prefetch whole batches while the step runs."""
  if num_threads is None:
    num_threads = min(8, max(2, os.cpu_count() or 2))
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def steps_per_epoch(source, batch_size: int, drop_remainder: bool = True) -> int:
  n = len(source)
  return n // batch_size if drop_remainder else -(-n // batch_size)


__all__: list[Any] = ['EMBEDDED', 'default_data_dir', 'prepare_embedded', 'get_source',
                      'make_loader', 'num_classes', 'read_options', 'steps_per_epoch',
                      'to_example']
