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
import math
import os
import threading
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
  # The per-example grain pipeline this loader reproduces batch by batch: source ->
  # seed -> shuffle -> to_example -> transform -> random_transform -> repeat. It is
  # built (lazily, nothing is read) for the seeds grain derives for its shuffle and
  # random_map (from `seed` and their depth in the pipeline); _BatchReader computes
  # what ds[epoch * n + pos] holds for a whole batch at once, bit for bit.
  ds = grain.MapDataset.source(source).seed(seed)
  shuffle_seed = None
  if shuffle:
    ds = ds.shuffle()
    shuffle_seed = ds._seed  # pylint: disable=protected-access
  ds = ds.map(functools.partial(to_example, task=task, max_objects=max_objects))
  if transform is not None:
    ds = ds.map(transform)
  rng_seed = None
  if random_transform is not None:
    ds = ds.random_map(random_transform)
    rng_seed = ds._rng_pool._seed  # pylint: disable=protected-access

  local = batch_size // process_count
  per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
  epochs = num_epochs if num_epochs is not None else 10**12 // max(per_epoch * local, 1)
  reader = _BatchReader(source, functools.partial(to_example, task=task,
                                                  max_objects=max_objects),
                        shuffle_seed, transform, random_transform, rng_seed)

  def fetch(step):
    epoch, j = divmod(step, per_epoch)
    pos = j * batch_size + process_index * local + np.arange(local)
    return reader.batch(epoch, pos[pos < n], local)

  return grain.MapDataset.range(per_epoch * epochs).map(fetch)


# Examples are cached in memory (as converted by to_example) when all of them take at
# most this many bytes: the embedded digits (6 MB) and mnist1d (0.6 MB), whose
# records tfds otherwise decodes again on every access (most of the loader's time).
# Larger datasets are read from their source every time, as before.
CACHE_BYTES = 64 * 2**20


class _ExampleCache:
  """to_example(source[i]) for every i, as one stacked array per key, filled on first
  access of each record (so a loader that reads a few batches decodes only those).

  Used only when the examples are flat dicts of arrays of one shape and dtype per key
  and all of them fit in CACHE_BYTES; `take` returns None otherwise (and for good once
  a record breaks the pattern), and the caller reads the source itself."""

  def __init__(self, source, convert):
    self._source, self._convert = source, convert
    self._arrays = None       # key -> (n, ...) array, from the first record's layout
    self._filled = None       # (n,) bool: records already converted
    self._enabled = None      # None: not decided yet
    self._lock = threading.Lock()

  def _start(self):
    n = len(self._source)
    first = self._convert(self._source[0])
    if not isinstance(first, dict) or not first:
      return False
    values = {k: np.asarray(v) for k, v in first.items()}
    if any(v.dtype == object for v in values.values()):
      return False
    if n * sum(v.nbytes for v in values.values()) > CACHE_BYTES:
      return False
    self._arrays = {k: np.empty((n,) + v.shape, v.dtype) for k, v in values.items()}
    self._filled = np.zeros(n, bool)
    self._store(0, values)
    return True

  def _store(self, i, example) -> bool:
    if not isinstance(example, dict) or example.keys() != self._arrays.keys():
      return False
    for k, v in example.items():
      v = np.asarray(v)
      if v.shape != self._arrays[k].shape[1:] or v.dtype != self._arrays[k].dtype:
        return False
    for k, v in example.items():
      self._arrays[k][i] = v
    self._filled[i] = True
    return True

  def take(self, indices: np.ndarray) -> dict | None:
    """{key: (len(indices), ...) array} of the examples at `indices`, or None."""
    if self._enabled is None:
      with self._lock:
        if self._enabled is None:
          self._enabled = self._start()
    if not self._enabled:
      return None
    for i in np.unique(indices[~self._filled[indices]]):
      if not self._store(i, self._convert(self._source[int(i)])):
        self._enabled = False
        return None
    return {k: v[indices] for k, v in self._arrays.items()}


def _seed_seq(seed: int, count: int) -> list[int]:
  """C++ std::seed_seq{seed}.generate(count words), as the C++ standard defines it."""
  mask = 0xFFFFFFFF
  n, v = count, [seed & mask]
  s = len(v)
  out = [0x8b8b8b8b] * n
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p = (n - t) // 2
  q = p + t
  m = max(s + 1, n)
  mix = lambda x: x ^ (x >> 27)
  for k in range(m):
    r1 = 1664525 * mix(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n]) & mask
    r2 = (r1 + (s if k == 0 else (k % n + v[k - 1] if k <= s else k % n))) & mask
    out[(k + p) % n] = (out[(k + p) % n] + r1) & mask
    out[(k + q) % n] = (out[(k + q) % n] + r2) & mask
    out[k % n] = r2
  for k in range(m, m + n):
    r3 = 1566083941 * mix((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & mask) & mask
    r4 = (r3 - k % n) & mask
    out[(k + p) % n] ^= r3
    out[(k + q) % n] ^= r4
    out[k % n] = r4
  return out


def _simon(x: np.ndarray, keys: list[int], word: int) -> np.ndarray:
  """grain's index_shuffle block cipher (Simon, 2 x `word` bits, its round keys) on
  every element of the uint64 array x."""
  mask = np.uint64((1 << word) - 1)
  rotl = lambda v, r: ((v << np.uint64(r)) | (v >> np.uint64(word - r))) & mask
  f = lambda v: (rotl(v, 1) & rotl(v, 8)) ^ rotl(v, 2)
  left, right = (x >> np.uint64(word)) & mask, x & mask
  for k1, k2 in zip(keys[::2], keys[1::2]):
    left = left ^ f(right) ^ np.uint64(k1 & ((1 << word) - 1))
    right = right ^ f(left) ^ np.uint64(k2 & ((1 << word) - 1))
  return (left << np.uint64(word)) | right


# Up to this cipher width the shuffle maps whole epochs through a table of the cipher
# (2**bits uint64 entries: 32 MiB at 22, which covers datasets of up to 2**22
# examples, ImageNet's 1.28M included); above it, it walks each batch's positions.
_TABLE_BITS = 22
_ROUNDS = 4   # grain's ShuffleMapDataset


def _cipher_bits(n: int) -> int:
  """Width of grain's cipher domain for max_index n - 1 (n >= 2): ceil(log2(n - 1))
  rounded up to even, at least 16."""
  bits = int(math.ceil(math.log2(n - 1)))
  return max(bits + bits % 2, 16)


def _cycle_walk(x: np.ndarray, n: int, step) -> np.ndarray:
  """Applies `step` (one cipher pass) to the entries of x still >= n until none is:
  the cipher permutes [0, 2**bits), cycle walking restricts it to [0, n)."""
  x = x.copy()              # x may be a view of the table that `step` reads
  while True:
    out = x >= n
    if not out.any():
      return x.astype(np.int64)
    x[out] = step(x[out])


def shuffled_positions(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
  """Where grain's shuffle (index_shuffle(p, max_index=n - 1, seed, rounds=4), a
  cycle-walking Simon cipher over [0, 2**bits)) sends each position p, vectorised:
  grain's C++ function takes ~45 us per call at n ~ 1,000 (it walks ~2**16 / n
  steps), as long as the rest of a digits example."""
  positions = np.asarray(positions, np.uint64)
  if n == 1:
    return np.zeros(len(positions), np.int64)
  half = _cipher_bits(n) // 2
  keys = _seed_seq(seed % 2**32, _ROUNDS)
  step = lambda v: _simon(v, keys, half)
  return _cycle_walk(step(positions), n, step)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int) -> np.ndarray:
  """shuffled_positions(arange(n), n, seed), walked through a table of the cipher."""
  if n == 1:
    return np.zeros(1, np.int64)
  bits = _cipher_bits(n)
  table = _simon(np.arange(2**bits, dtype=np.uint64), _seed_seq(seed % 2**32, _ROUNDS),
                 bits // 2)
  return _cycle_walk(table[:n], n, lambda v: table[v])


class _BatchReader:
  """The rows of one batch of make_loader's pipeline, computed a batch at a time.

  For positions `pos` of epoch e it returns, stacked, what grain's per-example
  pipeline gives for elements e * n + pos: the record at the shuffled position
  (grain's permutation, computed a whole epoch at once), to_example (cached in memory
  for small datasets, _ExampleCache), `transform`, then `random_transform` with the
  numpy Generator grain's random_map hands element i (Philox seeded with grain's
  derived seed, counter [0, 0, 0, i]); a Transform runs on the whole batch
  (augment.Transform.call_batch). Then 'mask' 1, and padding rows up to `size`.
  """

  def __init__(self, source, convert, shuffle_seed, transform, random_transform,
               rng_seed):
    self._source, self._convert = source, convert
    self._n = len(source)
    self._shuffle_seed = shuffle_seed
    self._transform, self._random_transform = transform, random_transform
    self._cache = _ExampleCache(source, convert)
    self._rng_seed = rng_seed
    self._rngs: list[np.random.Generator] = []   # a pool, reused across batches
    self._key = None                             # Philox key of Philox(rng_seed)
    self._lock = threading.Lock()
    self._template = None

  def _records(self, pos: np.ndarray, epoch: int) -> np.ndarray:
    if self._shuffle_seed is None:
      return pos
    seed = (self._shuffle_seed + epoch) % 2**32
    if self._n < 2 or _cipher_bits(self._n) <= _TABLE_BITS:
      return _epoch_permutation(self._n, seed)[pos]
    return shuffled_positions(pos, self._n, seed)

  def _acquire(self, count: int) -> list[np.random.Generator]:
    with self._lock:
      taken, self._rngs = self._rngs[:count], self._rngs[count:]
    while len(taken) < count:
      taken.append(np.random.Generator(np.random.Philox(self._rng_seed)))
    return taken

  def _reset_rng(self, rng: np.random.Generator, index: int) -> None:
    """rng's state as grain's RngPool sets it for element `index` (op_seed 0): key
    from the seed, counter [0, 0, 0, index], empty buffers. (grain reads the state
    back before setting it, which takes three times as long.)"""
    if self._key is None:
      self._key = rng.bit_generator.state['state']['key']
    rng.bit_generator.state = {
        'bit_generator': 'Philox',
        'state': {'counter': np.array([0, 0, 0, index], np.uint64), 'key': self._key},
        'buffer': np.zeros(4, np.uint64), 'buffer_pos': 4, 'has_uint32': 0,
        'uinteger': 0}

  def _release(self, rngs):
    with self._lock:
      self._rngs.extend(rngs)

  def examples(self, epoch: int, pos: np.ndarray):
    """The pipeline's examples at positions pos of epoch: a stacked dict, or a list
    of example dicts where the examples cannot be stacked before the transforms."""
    records = self._records(pos, epoch)
    rows = self._cache.take(records)
    if rows is None:
      rows = [self._convert(self._source[int(i)]) for i in records]
    if self._transform is not None:
      rows = self._apply(self._transform, rows, None)
    if self._random_transform is not None:
      rngs = self._acquire(len(pos))
      try:
        for rng, index in zip(rngs, epoch * self._n + pos):
          self._reset_rng(rng, int(index))
        rows = self._apply(self._random_transform, rows, rngs)
      finally:
        self._release(rngs)
    return rows

  @staticmethod
  def _apply(fn, rows, rngs):
    if isinstance(rows, dict) and getattr(fn, 'batchable', False):
      return fn.call_batch(rows, rngs)
    if isinstance(rows, dict):
      rows = [{k: v[i] for k, v in rows.items()} for i in range(len(next(iter(
          rows.values()))))]
    if rngs is None:
      return [fn(row) for row in rows]
    return [fn(row, rng) for row, rng in zip(rows, rngs)]

  def batch(self, epoch: int, pos: np.ndarray, size: int) -> dict:
    """The batch rows at positions pos (< n) of epoch, with 'mask', padded to size."""
    rows = self.examples(epoch, pos) if len(pos) else []
    if isinstance(rows, dict):
      rows = {**rows, 'mask': np.ones(len(pos), np.float32)}
      if len(pos) == size:
        return rows
      rows = [{k: v[i] for k, v in rows.items()} for i in range(len(pos))]
    else:
      rows = [{**row, 'mask': np.float32(1.0)} for row in rows]
    rows += [self._padding()] * (size - len(rows))
    return _stack(rows)

  def _padding(self):
    if self._template is None:
      first = self.examples(0, np.zeros(1, np.int64))
      first = first[0] if isinstance(first, list) else {k: v[0] for k, v in first.items()}
      self._template = _padding_example(first)
    return self._template


def _stack(rows: list) -> Any:
  """grain's default batch: np.stack of each leaf over the rows (dicts of arrays)."""
  first = rows[0]
  if isinstance(first, dict):
    return {k: _stack([row[k] for row in rows]) for k in first}
  if isinstance(first, (list, tuple)):
    return type(first)(_stack([row[i] for row in rows]) for i in range(len(first)))
  return np.stack(rows)


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
