"""The SYNTHETIC `plants` segmentation scenes (cnn_jax.data.scenes), their tfds builder
and segmentation records through sources.to_example / make_loader."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax.data import embedded, get_source, make_loader, num_classes, scenes, sources

tfds.disable_progress_bar()


@pytest.fixture(scope='module')
def sample():
  """The first 60 scenes (about a second to draw)."""
  return scenes.scenes(0, 60)


@pytest.fixture(scope='module')
def plants(tmp_path_factory):
  """All three splits, prepared once (all 1,000 scenes) into a fresh data_dir."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return {split: get_source('plants', split, data_dir)
          for split in ('train', 'validation', 'test')}


def test_scene_shapes_dtypes_and_values():
  image, mask = scenes.scene(0)
  assert image.shape == (128, 128, 3) and image.dtype == np.uint8
  assert mask.shape == (128, 128) and mask.dtype == np.uint8
  assert set(np.unique(mask)) <= {0, 1, 2}
  assert image.std() > 10  # textured, not flat
  small_image, small_mask = scenes.scene(0, size=64)
  assert small_image.shape == (64, 64, 3) and small_mask.shape == (64, 64)
  with pytest.raises(ValueError, match='multiple of 4'):
    scenes.scene(0, size=30)
  assert scenes.colorize(mask).shape == (128, 128, 3)
  np.testing.assert_array_equal(scenes.colorize(np.array([0, 1, 2])),
                                [[0, 0, 0], [255, 0, 0], [0, 255, 0]])


def test_scene_is_a_function_of_seed_and_index_alone():
  image, mask = scenes.scene(7)
  scenes.scene(3)  # drawing other scenes in between changes nothing
  again_image, again_mask = scenes.scene(7)
  np.testing.assert_array_equal(image, again_image)
  np.testing.assert_array_equal(mask, again_mask)
  batch_images, batch_masks = scenes.scenes(5, 9)
  np.testing.assert_array_equal(batch_images[2], image)
  np.testing.assert_array_equal(batch_masks[2], mask)
  assert not np.array_equal(scenes.scene(8)[0], image)
  assert not np.array_equal(scenes.scene(7, seed=scenes.SEED + 1)[0], image)


def test_class_balance(sample):
  _, masks = sample
  fractions = np.bincount(masks.ravel(), minlength=3) / masks.size
  # Measured on all 1,000 scenes: 0.759 / 0.125 / 0.116 (these 60: 0.760 / 0.129 / 0.111).
  assert 0.65 < fractions[0] < 0.85
  assert 0.07 < fractions[1] < 0.22 and 0.07 < fractions[2] < 0.22
  present = np.stack([(masks == c).any(axis=(1, 2)) for c in range(3)], axis=1)
  assert present.all(axis=1).mean() >= 0.85  # all three classes in most scenes
  assert present[:, 0].all()


def test_colour_alone_does_not_separate_the_classes(sample):
  images, masks = sample
  x = images.astype(np.int32)
  green = (x[..., 1] > x[..., 0]) & (x[..., 1] > x[..., 2])
  share = [green[masks == c].mean() for c in range(3)]
  # Green background (moss), and plants of both kinds that are not green.
  assert share[0] > 0.05
  assert 0.2 < share[1] < 0.9 and 0.2 < share[2] < 0.9


def test_plants_builder_splits_and_records(plants):
  assert {s: len(src) for s, src in plants.items()} == {
      'train': 600, 'validation': 100, 'test': 300}
  record = plants['validation'][3]
  assert set(record) == {'image', 'label'}
  assert record['image'].shape == (128, 128, 3) and record['image'].dtype == np.uint8
  assert record['label'].shape == (128, 128) and record['label'].dtype == np.uint8
  image, mask = scenes.scene(600 + 3)  # records in generation order
  np.testing.assert_array_equal(record['image'], image)
  np.testing.assert_array_equal(record['label'], mask)
  np.testing.assert_array_equal(plants['test'][299]['label'], scenes.scene(999)[1])
  assert num_classes(plants['train'], 'plants') == 3
  assert 'SYNTHETIC' in embedded.Plants.__doc__ and 'SYNTHETIC' in scenes.__doc__


def test_plants_through_the_segmentation_loader(plants):
  from cnn_jax.data import augment
  loader = make_loader(plants['train'], batch_size=4, seed=0, task='segmentation',
                       random_transform=augment.make_transform('random_crop(96)|flip'))
  batch = loader[0]
  assert batch['image'].shape == (4, 96, 96, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 96, 96) and batch['label'].dtype == np.int32
  assert batch['mask'].shape == (4,) and batch['mask'].dtype == np.float32
  assert set(np.unique(batch['label'])) <= {0, 1, 2}


# ------------------------------------------------------------------- to_example


def _pets_record(breed=5):
  rng = np.random.default_rng(0)
  trimap = rng.integers(1, 4, size=(6, 7, 1)).astype(np.uint8)  # 1 pet, 2 bg, 3 border
  return {'image': rng.integers(0, 256, (6, 7, 3)).astype(np.uint8), 'label': breed,
          'species': 1, 'file_name': 'Abyssinian_1.jpg', 'segmentation_mask': trimap}


def test_to_example_pets_record():
  record = _pets_record()
  seg = sources.to_example(record, task='segmentation')
  assert seg['image'].dtype == np.float32 and seg['image'].max() <= 1.0
  np.testing.assert_allclose(seg['image'], record['image'] / 255.0, rtol=1e-6)
  assert seg['label'].shape == (6, 7) and seg['label'].dtype == np.int32
  np.testing.assert_array_equal(seg['label'], record['segmentation_mask'][..., 0] - 1)
  cls = sources.to_example(record)  # the default: classification, the breed
  assert cls['label'].shape == () and cls['label'] == 5 and cls['label'].dtype == np.int32
  bad = dict(record, segmentation_mask=np.zeros((6, 7, 1), np.uint8))
  with pytest.raises(ValueError, match='segmentation_mask holds 0'):
    sources.to_example(bad, task='segmentation')


def test_to_example_plants_record_and_errors():
  image, mask = scenes.scene(1)
  record = {'image': image, 'label': mask}
  for task in ('classification', 'segmentation'):  # an (H, W) label is a mask either way
    ex = sources.to_example(record, task=task)
    assert ex['image'].shape == (128, 128, 3) and ex['image'].dtype == np.float32
    assert ex['label'].shape == (128, 128) and ex['label'].dtype == np.int32
    np.testing.assert_array_equal(ex['label'], mask)
  ex = sources.to_example({'image': image, 'label': mask[..., None]}, task='segmentation')
  assert ex['label'].shape == (128, 128)  # trailing channel of 1 dropped
  digit = {'image': np.zeros((4, 4, 1), np.float32), 'label': np.int64(3)}
  with pytest.raises(ValueError, match='needs a mask'):
    sources.to_example(digit, task='segmentation')
  with pytest.raises(ValueError, match='task must be one of'):
    sources.to_example(digit, task='keypoints')
  with pytest.raises(ValueError, match="needs records with 'boxes'"):   # a digit has none
    sources.to_example(digit, task='detection', max_objects=4)
  with pytest.raises(ValueError, match='task must be one of'):
    make_loader([digit], batch_size=1, seed=0, task='segment')
