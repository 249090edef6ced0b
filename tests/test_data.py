"""Embedded offline datasets (tfds builders read via tfds.data_source) and grain loaders."""
import os
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax.data import embedded, get_source, make_loader, steps_per_epoch
from cnn_jax.data import sources

tfds.disable_progress_bar()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def digits(data_dir):
  return {s: get_source('digits', s, data_dir) for s in ('train', 'test')}


@pytest.fixture(scope='module')
def mnist1d(data_dir):
  return {s: get_source('mnist1d', s, data_dir) for s in ('train', 'test')}


def _stack(src):
  recs = [src[i] for i in range(len(src))]
  return (np.stack([r['image'] for r in recs]), np.array([r['label'] for r in recs]))


def test_bilinear_upsample_matches_jax_image_resize():
  x = np.random.default_rng(0).uniform(size=(3, 8, 8))
  ours = embedded.bilinear_upsample(x, 32)
  ref = jax.image.resize(x, (3, 32, 32), method='bilinear')
  np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-6)


def test_digits_prepare_and_read(digits, data_dir):
  from sklearn.datasets import load_digits
  train, test = digits['train'], digits['test']
  assert (len(train), len(test)) == (1437, 360)
  assert os.path.isdir(os.path.join(data_dir, 'digits', '1.0.0'))
  xtr, ytr = _stack(train)
  xte, yte = _stack(test)
  assert xtr.shape == (1437, 32, 32, 1) and xtr.dtype == np.float32
  assert xte.shape == (360, 32, 32, 1)
  assert 0.0 <= xtr.min() and xtr.max() <= 1.0 and xtr.max() > 0.99
  assert set(ytr) == set(range(10)) and set(yte) == set(range(10))
  # Stratified: every class has 35-37 test examples.
  assert np.bincount(yte, minlength=10).min() >= 35
  # Pixels match sklearn's images: recover the original indices and compare.
  d = load_digits()
  arrays = embedded.digits_arrays()
  np.testing.assert_array_equal(xtr, arrays['train'][0])
  np.testing.assert_array_equal(yte, arrays['test'][1])
  from sklearn.model_selection import train_test_split
  idx_tr, _ = train_test_split(np.arange(1797), test_size=360, stratify=d.target,
                               random_state=0)
  idx_tr = np.sort(idx_tr)
  for i in (0, 17, 1000):
    j = idx_tr[i]
    assert ytr[i] == d.target[j]
    ref = np.asarray(jax.image.resize(d.images[j] / 16.0, (32, 32), 'bilinear'))
    for (r, c) in [(0, 0), (5, 9), (16, 16), (31, 30), (13, 22)]:
      assert abs(xtr[i, r, c, 0] - ref[r, c]) < 1e-5
  # Corner output pixels clamp to the source corner pixel.
  assert abs(xtr[0, 0, 0, 0] - d.images[idx_tr[0]][0, 0] / 16) < 1e-6


def test_digits_split_deterministic_and_disjoint():
  a, b = embedded.digits_arrays(), embedded.digits_arrays()
  for s in ('train', 'test'):
    np.testing.assert_array_equal(a[s][0], b[s][0])
    np.testing.assert_array_equal(a[s][1], b[s][1])
  # Train and test are disjoint subsets of the 1,797 images.
  tr = {x.tobytes() for x in a['train'][0]}
  assert not any(x.tobytes() in tr for x in a['test'][0][:50])


def test_mnist1d_prepare_and_read(mnist1d):
  train, test = mnist1d['train'], mnist1d['test']
  assert (len(train), len(test)) == (4000, 1000)
  xtr, ytr = _stack(train)
  xte, yte = _stack(test)
  assert xtr.shape == (4000, 40, 1) and xtr.dtype == np.float32
  assert xte.shape == (1000, 40, 1)
  assert set(ytr) == set(range(10)) and set(yte) <= set(range(10))
  arrays = embedded.mnist1d_arrays()  # deterministic generation (seed 42)
  np.testing.assert_array_equal(xtr, arrays['train'][0])
  np.testing.assert_array_equal(yte, arrays['test'][1])


def test_mnist1d_generation_leaves_global_rng_alone():
  np.random.seed(123)
  expected = np.random.rand()
  np.random.seed(123)
  embedded.mnist1d_arrays()
  assert np.random.rand() == expected


def test_second_get_source_reuses_prepared(digits, data_dir):
  t = time.time()
  src = get_source('digits', 'test', data_dir)
  assert time.time() - t < 5 and len(src) == 360


def test_unprepared_catalog_dataset_fails_fast(tmp_path):
  for name in ('mnist', 'cifar10', 'mnist:3.0.1'):
    t = time.time()
    with pytest.raises(ValueError, match=r'not prepared.*make data DATASET='):
      get_source(name, 'train', str(tmp_path))
    assert time.time() - t < 5


def test_catalog_prepared_check_on_disk(digits, data_dir, tmp_path):
  # A prepared array_record dataset is recognised by the filesystem check.
  assert sources._catalog_is_prepared('digits', data_dir) == (True, True)
  assert sources._catalog_is_prepared('digits:1.0.0', data_dir) == (True, True)
  assert sources._catalog_is_prepared('digits:9.9.9', data_dir) == (False, False)
  # One prepared without array_record files gets its own clear error.
  d = tmp_path / 'mnist' / '3.0.1'
  d.mkdir(parents=True)
  (d / 'dataset_info.json').write_text('{}')
  (d / 'mnist-train.tfrecord-00000-of-00001').write_text('')
  with pytest.raises(ValueError, match='not as array_record'):
    get_source('mnist', 'train', str(tmp_path))


def test_default_data_dir_env(monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', '/some/where')
  assert sources.default_data_dir() == '/some/where'
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert sources.default_data_dir() == os.path.expanduser('~/tensorflow_datasets')


def test_loader_batches_and_determinism(digits):
  src = digits['test']
  ds = make_loader(src, batch_size=32, seed=7)
  b = ds[0]
  assert b['image'].shape == (32, 32, 32, 1) and b['image'].dtype == np.float32
  assert b['label'].shape == (32,) and b['label'].dtype == np.int32
  spe = steps_per_epoch(src, 32)
  assert spe == 11
  run1 = [x for _, x in zip(range(2 * spe), iter(ds))]
  run2 = [x for _, x in zip(range(2 * spe), iter(make_loader(src, batch_size=32, seed=7)))]
  for a, c in zip(run1, run2):
    np.testing.assert_array_equal(a['image'], c['image'])
    np.testing.assert_array_equal(a['label'], c['label'])
  # Random access equals iteration.
  np.testing.assert_array_equal(ds[spe + 3]['label'], run1[spe + 3]['label'])
  # Each epoch is a permutation of distinct examples, and epochs differ.
  e0 = np.concatenate([x['label'] for x in run1[:spe]])
  e1 = np.concatenate([x['label'] for x in run1[spe:]])
  assert not np.array_equal(e0, e1)
  assert sorted(e0) != list(e0)
  # A different seed gives different batches.
  other = make_loader(src, batch_size=32, seed=8)[0]
  assert not np.array_equal(other['label'], b['label'])


def test_loader_finite_epochs_no_shuffle_transform(mnist1d):
  src = mnist1d['test']
  ds = make_loader(src, batch_size=300, seed=0, shuffle=False, num_epochs=1,
                   drop_remainder=False,
                   transform=lambda ex: {**ex, 'image': ex['image'] * 2})
  batches = list(ds)
  # The last batch is padded to full size; its mask marks the 100 real examples.
  assert [len(x['label']) for x in batches] == [300, 300, 300, 300]
  assert [int(x['mask'].sum()) for x in batches] == [300, 300, 300, 100]
  assert not batches[-1]['image'][100:].any()
  np.testing.assert_allclose(batches[0]['image'][0], 2 * np.asarray(src[0]['image']))
  assert batches[0]['label'][0] == src[0]['label']
  assert len(list(make_loader(src, batch_size=300, seed=0, num_epochs=2))) == 6


def test_loader_random_transform_deterministic(digits):
  src = digits['test']

  def flip(ex, rng):
    return {**ex, 'image': ex['image'][:, ::-1] if rng.random() < 0.5 else ex['image']}

  a = make_loader(src, batch_size=16, seed=3, random_transform=flip)[5]
  b = make_loader(src, batch_size=16, seed=3, random_transform=flip)[5]
  np.testing.assert_array_equal(a['image'], b['image'])


def test_loader_bad_batch_size(digits):
  with pytest.raises(ValueError):
    make_loader(digits['test'], batch_size=0, seed=0)
  with pytest.raises(ValueError):
    make_loader(digits['test'], batch_size=1000, seed=0)


def test_unknown_embedded_name():
  with pytest.raises(ValueError, match='not an embedded'):
    sources.prepare_embedded('nope', '/tmp')


def test_loader_process_shards_reassemble_the_global_batch(digits):
  src = digits['test']
  full = make_loader(src, batch_size=32, seed=5, random_transform=_noise)
  parts = [make_loader(src, batch_size=32, seed=5, random_transform=_noise,
                       process_index=p, process_count=4) for p in range(4)]
  for step in (0, 10, 11, 25):   # 11 steps per epoch: crosses epochs
    want = full[step]
    got = [ds[step] for ds in parts]
    assert all(g['label'].shape == (8,) for g in got)
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  with pytest.raises(ValueError, match='divisible by the number of processes'):
    make_loader(src, batch_size=30, seed=0, process_count=4)


def test_eval_loader_shards_pad_with_mask(mnist1d):
  src = mnist1d['test']   # 1,000 examples: 3 full global batches of 300 and 100 left
  parts = [list(make_loader(src, batch_size=300, seed=0, shuffle=False, num_epochs=1,
                            drop_remainder=False, process_index=p, process_count=2))
           for p in range(2)]
  assert [len(p) for p in parts] == [4, 4]
  assert sum(float(b['mask'].sum()) for p in parts for b in p) == 1000
  # Process 0 holds rows 900..999 of the last global batch, process 1 only padding.
  assert parts[0][-1]['mask'].sum() == 100 and parts[1][-1]['mask'].sum() == 0


def _noise(ex, rng):
  return {**ex, 'image': ex['image'] + rng.normal(size=ex['image'].shape).astype(np.float32)}


def _reference_loader(source, *, batch_size, seed, shuffle=True, num_epochs=None,
                      drop_remainder=True, transform=None, random_transform=None,
                      process_index=0, process_count=1, task='classification',
                      max_objects=0):
  """make_loader as it was: grain's per-example pipeline, then batch (the slow one)."""
  import functools
  import grain
  n = len(source)
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.map(functools.partial(sources.to_example, task=task, max_objects=max_objects))
  if transform is not None:
    ds = ds.map(transform)
  if random_transform is not None:
    ds = ds.random_map(random_transform)
  ds = ds.repeat(num_epochs)
  local = batch_size // process_count
  per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
  epochs = num_epochs if num_epochs is not None else 10**12 // max(per_epoch * local, 1)

  def fetch(i):
    step, r = divmod(i, local)
    epoch, j = divmod(step, per_epoch)
    pos = j * batch_size + process_index * local + r
    if pos >= n:
      return sources._padding_example(ds[0])
    return {**ds[epoch * n + pos], 'mask': np.float32(1.0)}

  out = grain.MapDataset.range(per_epoch * local * epochs).map(fetch)
  return out.batch(local, drop_remainder=False)


def _assert_same_batches(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('spec', ['pad_crop(2)', 'pad_crop(4, mode=reflect)|flip|'
                                  'normalize(mnist)', 'random_crop(28)|rotate(10)',
                                  'to_rgb|center_crop(30)|color_jitter(0.2, 0.2, 0.2)'])
def test_loader_batches_equal_the_per_example_pipeline(digits, spec):
  """make_loader computes whole batches (vectorised shuffle, in-memory examples,
  Transform.call_batch) and must give grain's per-example pipeline's batches bit for
  bit, across epochs, with padding, and on every process's rows."""
  from cnn_jax.data import augment
  src = digits['test']
  fn = augment.make_transform(spec)
  for kwargs in (dict(batch_size=32, seed=3),
                 dict(batch_size=48, seed=1, shuffle=False, drop_remainder=False,
                      num_epochs=2),
                 dict(batch_size=64, seed=2, process_index=1, process_count=2,
                      drop_remainder=False)):
    fast = make_loader(src, random_transform=fn, **kwargs)
    ref = _reference_loader(src, random_transform=fn, **kwargs)
    assert len(fast) == len(ref)
    for step in (0, 7, len(fast) - 1 if kwargs.get('num_epochs') else 12):
      _assert_same_batches(fast[step], ref[step])
  it = iter(fast.to_iter_dataset(sources.read_options()))
  for step in range(3):
    _assert_same_batches(next(it), ref[step])


def test_loader_plain_callables_equal_the_per_example_pipeline(mnist1d):
  src = mnist1d['test']
  transform = lambda ex: {**ex, 'image': ex['image'] * 2}
  for kwargs in (dict(random_transform=_noise), dict(transform=transform),
                 dict(transform=transform, random_transform=_noise, shuffle=False)):
    fast = make_loader(src, batch_size=100, seed=4, **kwargs)
    ref = _reference_loader(src, batch_size=100, seed=4, **kwargs)
    for step in (0, 9, 10, 31):
      _assert_same_batches(fast[step], ref[step])


@pytest.mark.parametrize('n', [1, 2, 10, 1437, 70000])
def test_shuffled_positions_equal_grains_index_shuffle(n):
  from grain._src.python.experimental.index_shuffle.python import index_shuffle_module
  pos = np.arange(min(n, 2000))
  for seed in (0, 5, 2**32 - 1):
    want = [index_shuffle_module.index_shuffle(int(p), max_index=n - 1, seed=seed,
                                               rounds=4) for p in pos]
    np.testing.assert_array_equal(sources.shuffled_positions(pos, n, seed), want)
    np.testing.assert_array_equal(sources._epoch_permutation(n, seed)[pos], want)
