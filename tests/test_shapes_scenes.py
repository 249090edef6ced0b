"""The SYNTHETIC shapes detection scenes (cnn_jax.data.shapes_scenes) and the
detections figure (cnn_jax.detection.draw)."""
import matplotlib.image
import numpy as np
import pytest

from cnn_jax.data import shapes_scenes as ss
from cnn_jax.detection import draw

N = 40


@pytest.fixture(scope='module')
def sample():
  """Scenes 0..N-1 with their object masks."""
  return [ss.scene(i, return_masks=True) for i in range(N)]


def _iou(a, b):
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  inter = max(w, 0) * max(h, 0)
  area = lambda t: (t[2] - t[0]) * (t[3] - t[1])
  return inter / (area(a) + area(b) - inter)


def test_shapes_dtypes_and_label_range(sample):
  for s in sample:
    n = len(s['labels'])
    assert s['image'].shape == (64, 64, 3) and s['image'].dtype == np.uint8
    assert s['boxes'].shape == (n, 4) and s['boxes'].dtype == np.float32
    assert s['labels'].dtype == np.int32 and s['masks'].shape == (n, 64, 64)
    assert 1 <= n <= ss.MAX_OBJECTS
    assert ((s['labels'] >= 0) & (s['labels'] < ss.NUM_CLASSES)).all()
    assert s['image'].std() > 5  # textured, not flat
  counts = np.bincount(np.concatenate([s['labels'] for s in sample]),
                       minlength=ss.NUM_CLASSES)
  assert (counts > 0).all()
  big = ss.scene(3, size=96, max_objects=6)
  assert big['image'].shape == (96, 96, 3) and len(big['labels']) <= 6
  assert 'masks' not in big


def test_scene_is_a_function_of_seed_and_index_alone():
  first = ss.scene(7)
  ss.scene(3)  # drawing other scenes in between changes nothing
  again = ss.scene(7)
  for key in ('image', 'boxes', 'labels'):
    np.testing.assert_array_equal(first[key], again[key])
  batch = ss.generate(4, start=5)
  np.testing.assert_array_equal(batch['images'][2], first['image'])
  n = len(first['labels'])
  np.testing.assert_array_equal(batch['boxes'][2, :n], first['boxes'])
  np.testing.assert_array_equal(batch['labels'][2, :n], first['labels'])
  assert batch['valid'][2].sum() == n
  assert not np.array_equal(ss.scene(8)['image'], first['image'])
  assert not np.array_equal(ss.scene(7, seed=1)['image'], first['image'])


def test_boxes_are_normalised_and_tight(sample):
  for s in sample:
    b = s['boxes']
    assert ((b >= 0) & (b <= 1)).all()
    assert ((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])).all()
    pixels = np.rint(b * 64).astype(int)       # pixel edges: exact multiples of 1/64
    np.testing.assert_allclose(pixels / 64, b, atol=1e-6)
    covered = np.zeros((64, 64), bool)
    for k in reversed(range(len(b))):           # later objects are painted on top
      x0, y0, x1, y1 = pixels[k]
      mask, visible = s['masks'][k], s['masks'][k] & ~covered
      covered |= mask
      inside = np.zeros((64, 64), bool)
      inside[y0:y1, x0:x1] = True
      assert not (mask & ~inside).any()         # nothing outside the box
      for m in (mask, visible):                 # the visible pixels reach every side too
        assert m[y0].any() and m[y1 - 1].any() and m[:, x0].any() and m[:, x1 - 1].any()
      assert visible.sum() >= ss.MIN_VISIBLE * mask.sum()


def test_objects_show_and_overlaps_are_limited(sample):
  far = []
  for s in sample:
    image = s['image'].astype(np.float64)
    background = image[~s['masks'].any(0)].mean(0)
    covered = np.zeros((64, 64), bool)
    for k in reversed(range(len(s['labels']))):
      visible = s['masks'][k] & ~covered
      covered |= s['masks'][k]
      far.append(np.linalg.norm(image[visible].mean(0) - background) > 40)
    for j in range(len(s['boxes'])):
      for k in range(j):
        assert _iou(s['boxes'][j], s['boxes'][k]) <= ss.MAX_IOU + 1e-6
  assert np.mean(far) > 0.9


def test_pad_objects():
  boxes, labels, valid = ss.pad_objects([[0.1, 0.2, 0.3, 0.4]], [2], 3)
  assert boxes.shape == (3, 4) and labels.shape == (3,) and valid.shape == (3,)
  np.testing.assert_array_equal(valid, [True, False, False])
  np.testing.assert_allclose(boxes[0], [0.1, 0.2, 0.3, 0.4])
  assert labels[0] == 2 and not boxes[1:].any() and not labels[1:].any()
  empty = ss.pad_objects(np.zeros((0, 4)), np.zeros((0,)), 2)
  assert not empty[2].any()
  with pytest.raises(ValueError, match='do not fit in max_objects=1'):
    ss.pad_objects(np.zeros((2, 4)), [0, 1], 1)
  with pytest.raises(ValueError, match='same objects'):
    ss.pad_objects(np.zeros((2, 4)), [0], 3)
  with pytest.raises(ValueError, match='max_objects must be at least 1'):
    ss.scene(0, max_objects=0)
  with pytest.raises(ValueError, match='size must be at least 32'):
    ss.scene(0, size=16)


def test_plot_detections_writes_a_readable_figure(tmp_path):
  data = ss.generate(3)
  rng = np.random.default_rng(0)
  pred_boxes = np.clip(data['boxes'] + rng.normal(0, 0.02, data['boxes'].shape), 0, 1)
  scores = rng.uniform(0, 1, data['labels'].shape)
  path = draw.plot_detections(
      data['images'], data['boxes'], data['labels'], pred_boxes, scores, data['labels'],
      str(tmp_path / 'fig' / 'detections.png'), ss.CLASSES, gt_valid=data['valid'],
      pred_valid=data['valid'], max_images=2)
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
  assert image[..., :3].std() > 0.05  # not blank
  # Ragged per-image lists and float images in another range work too.
  draw.plot_detections([d.astype(np.float32) - 128 for d in data['images'][:1]],
                       [data['boxes'][0]], [data['labels'][0]], [np.zeros((0, 4))],
                       [np.zeros(0)], [np.zeros(0, int)], str(tmp_path / 'ragged.png'),
                       ss.CLASSES)
  with pytest.raises(ValueError, match='class id 7 has no name'):
    draw.plot_detections(data['images'][:1], data['boxes'][:1], np.full((1, 4), 7),
                         pred_boxes[:1], scores[:1], data['labels'][:1],
                         str(tmp_path / 'bad.png'), ss.CLASSES)
