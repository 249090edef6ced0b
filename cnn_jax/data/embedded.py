"""Offline datasets that ship with Python packages, as tensorflow-datasets builders.

Four builders are registered with tfds when this module is imported:

* ``digits``  -- scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits
  (values 0..16), scaled to [0, 1] by dividing by 16 and upsampled 4x to 32x32 with
  **bilinear** interpolation (half-pixel centres, edges clamped -- the same as
  ``jax.image.resize(..., 'bilinear')`` for upsampling). Stored as
  ``image: (32, 32, 1) float32``, ``label: int64`` (0..9).
  Split: stratified ``sklearn.model_selection.train_test_split`` with
  ``test_size=360, random_state=0`` -> 1,437 train / 360 test, fixed forever
  (``DIGITS_SPLIT_SEED``).
* ``mnist1d`` -- MNIST-1D generated procedurally by the ``mnist1d`` package
  (``make_dataset(get_dataset_args())``: its default seed 42, 5,000 samples, 80/20
  split) -> 4,000 train / 1,000 test sequences of length 40, stored as
  ``image: (40, 1) float32`` (length, channels), ``label: int64``.
* ``plants``  -- SYNTHETIC 3-class segmentation scenes drawn procedurally by
  ``scenes.py`` (not photographs): soil background (class 0), broad-leaved rosettes
  (class 1) and grass tufts (class 2), after the notes' ResUNet++ wild-plants demo.
  1,000 scenes split 60/10/30 as in the notes: scenes 0-599 train, 600-699
  validation, 700-999 test. Stored as ``image: (128, 128, 3) uint8`` and
  ``label: (128, 128) uint8`` (the mask of class ids).
* ``shapes``  -- SYNTHETIC detection scenes drawn procedurally by
  ``shapes_scenes.py``: 64x64 RGB scenes with 1-4 objects of 4 classes (circle,
  square, triangle, cross) and their exact boxes. Scenes 0-1,999 train, 2,000-2,199
  validation, 2,200-2,699 test. Stored as ``image: (64, 64, 3) uint8``,
  ``boxes: (4, 4) float32`` ((x0, y0, x1, y1) in [0, 1], rows past ``num_objects``
  zero), ``labels: (4,) int64`` and ``num_objects: int64``.

Records are stored in generation order (``disable_shuffling``), so record i of a split
equals element i of ``digits_arrays()`` / ``mnist1d_arrays()`` (digits: increasing
original ``load_digits`` index), and record i of a plants split is
``scenes.scene(start + i)``. All use only ``tfds.features.Tensor`` features, so they
can be prepared with ``file_format='array_record'`` and read with ``tfds.data_source``
without TensorFlow. Nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from cnn_jax.data import scenes
from cnn_jax.data import shapes_scenes

DIGITS_SIZE = 32
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
MNIST1D_LENGTH = 40

_CITATION_DIGITS = 'Alpaydin & Kaynak (1998), UCI Optical Recognition of Handwritten Digits.'
_CITATION_MNIST1D = 'Greydanus (2020), Scaling down deep learning (MNIST-1D).'
_CITATION_SHAPES = ('Synthetic data (cnn_jax.data.shapes_scenes): procedurally drawn '
                    'detection scenes with exact boxes; no real images.')
SHAPES_SPLITS = {'train': (0, 2000), 'validation': (2000, 2200), 'test': (2200, 2700)}
_CITATION_PLANTS = ("Synthetic data (cnn_jax.data.scenes), modelled on the lecture notes' "
                    'ResUNet++ wild-plant segmentation demo; no real images.')


def bilinear_upsample(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of (N, h, w) images to (N, size, size), half-pixel centres.

  Output pixel i samples the input at ``(i + 0.5) * h / size - 0.5``, clamped to the
  image; this matches ``jax.image.resize(method='bilinear')`` when upsampling.
  """
  images = np.asarray(images, np.float64)

  def weights(n_in):
    coord = (np.arange(size) + 0.5) * n_in / size - 0.5
    coord = np.clip(coord, 0, n_in - 1)
    lo = np.floor(coord).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = coord - lo
    m = np.zeros((size, n_in))
    np.add.at(m, (np.arange(size), lo), 1 - frac)
    np.add.at(m, (np.arange(size), hi), frac)
    return m

  wy = weights(images.shape[1])
  wx = weights(images.shape[2])
  return np.einsum('yh,nhw,xw->nyx', wy, images, wx)


def digits_arrays():
  """Returns {'train': (x, y), 'test': (x, y)} for the digits dataset (NumPy)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  x = bilinear_upsample(d.images / 16.0, DIGITS_SIZE).astype(np.float32)[..., None]
  y = d.target.astype(np.int64)
  idx_train, idx_test = train_test_split(
      np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y,
      random_state=DIGITS_SPLIT_SEED)
  idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
  return {'train': (x[idx_train], y[idx_train]), 'test': (x[idx_test], y[idx_test])}


def mnist1d_arrays():
  """Returns {'train': (x, y), 'test': (x, y)} for MNIST-1D (NumPy), generated offline."""
  import random
  from mnist1d.data import get_dataset_args, make_dataset
  # make_dataset reseeds the global `random` and `np.random` states; restore them.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    d = make_dataset(get_dataset_args())
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  as_x = lambda a: np.asarray(a, np.float32)[..., None]
  return {'train': (as_x(d['x']), np.asarray(d['y'], np.int64)),
          'test': (as_x(d['x_test']), np.asarray(d['y_test'], np.int64))}


def _examples(x, y):
  for i in range(len(y)):
    yield i, {'image': x[i], 'label': y[i]}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits, 8x8 -> 32x32 bilinear, float32 in [0, 1], 1,437/360."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(DIGITS_SIZE, DIGITS_SIZE, 1), dtype=np.float32),
            'label': tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # keep generation order: record i == *_arrays()[i]
        citation=_CITATION_DIGITS,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    arrays = digits_arrays()
    return {split: _examples(*xy) for split, xy in arrays.items()}

  def _generate_examples(self, *args, **kwargs):  # unused: splits are generators
    raise NotImplementedError


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D from the mnist1d package (seed 42), (40, 1) float32, 4,000/1,000."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(MNIST1D_LENGTH, 1), dtype=np.float32),
            'label': tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # keep generation order: record i == *_arrays()[i]
        citation=_CITATION_MNIST1D,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    arrays = mnist1d_arrays()
    return {split: _examples(*xy) for split, xy in arrays.items()}

  def _generate_examples(self, *args, **kwargs):
    raise NotImplementedError


def _plant_examples(start: int, stop: int):
  for i in range(start, stop):
    image, mask = scenes.scene(i)
    yield i - start, {'image': image, 'label': mask}


class Plants(tfds.core.GeneratorBasedBuilder):
  """SYNTHETIC wild-plant segmentation scenes (scenes.py), 128x128 RGB uint8 with
  (128, 128) uint8 masks (0 background, 1 rosette, 2 grass), 600/100/300."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    size = scenes.SIZE
    return self.dataset_info_from_configs(
        description=('SYNTHETIC (procedurally drawn, not photographs) 3-class wild-plant '
                     'segmentation scenes: label is the (H, W) mask of class ids '
                     f'{dict(enumerate(scenes.CLASS_NAMES))}.\n\n' + __doc__),
        # encoding='bytes' stores raw uint8 bytes: without it tfds writes every pixel
        # as a protobuf int64, which takes longer to write and to read than drawing.
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                          encoding='bytes'),
            'label': tfds.features.Tensor(shape=(size, size), dtype=np.uint8,
                                          encoding='bytes'),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # keep generation order: record i == scene(start + i)
        citation=_CITATION_PLANTS,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: _plant_examples(*span) for split, span in scenes.SPLITS.items()}

  def _generate_examples(self, *args, **kwargs):
    raise NotImplementedError


def _shape_examples(start: int, stop: int):
  m = shapes_scenes.MAX_OBJECTS
  for i in range(start, stop):
    scene = shapes_scenes.scene(i)
    boxes, labels, valid = shapes_scenes.pad_objects(scene['boxes'], scene['labels'], m)
    yield i - start, {'image': scene['image'], 'boxes': boxes.astype(np.float32),
                      'labels': labels.astype(np.int64),
                      'num_objects': np.int64(valid.sum())}


class Shapes(tfds.core.GeneratorBasedBuilder):
  """SYNTHETIC detection scenes (shapes_scenes.py): 64x64 RGB uint8 with up to 4
  boxed objects of 4 classes, 2,000/200/500."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    size, m = shapes_scenes.SIZE, shapes_scenes.MAX_OBJECTS
    return self.dataset_info_from_configs(
        description=('SYNTHETIC (procedurally drawn) detection scenes: boxes (x0, y0, x1, '
                     'y1) in [0, 1] and class ids '
                     f'{dict(enumerate(shapes_scenes.CLASSES))}; rows past num_objects '
                     'are padding.\n\n' + __doc__),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                          encoding='bytes'),
            'boxes': tfds.features.Tensor(shape=(m, 4), dtype=np.float32),
            'labels': tfds.features.Tensor(shape=(m,), dtype=np.int64),
            'num_objects': tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        disable_shuffling=True,  # record i == shapes_scenes.scene(start + i)
        citation=_CITATION_SHAPES,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: _shape_examples(*span) for split, span in SHAPES_SPLITS.items()}

  def _generate_examples(self, *args, **kwargs):
    raise NotImplementedError


BUILDERS = {'digits': Digits, 'mnist1d': Mnist1d, 'plants': Plants, 'shapes': Shapes}
