"""Seeded augmentation ops (cnn_jax.data.augment) and their spec strings."""
import functools
import pickle

import jax
import numpy as np
import pytest

from cnn_jax.data import make_loader
from cnn_jax.data import augment as A


def _image(shape=(12, 16, 3), seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _gen(seed=0):
  return np.random.default_rng(seed)


def _window_offsets(big, small):
  """All (top, left) where small is an exact sub-window of big."""
  windows = np.lib.stride_tricks.sliding_window_view(big, small.shape)
  match = np.all(windows == small, axis=tuple(range(3, windows.ndim)))[..., 0]
  return [tuple(int(i) for i in offset) for offset in np.argwhere(match)]


# Every random op as (image, rng) -> image, for the shape and determinism checks.
RANDOM_OPS = {
    'random_crop': lambda x, g: A.random_crop(x, g, (8, 10)),
    'pad_and_crop': lambda x, g: A.pad_and_crop(x, g, 4),
    'pad_and_crop_reflect': lambda x, g: A.pad_and_crop(x, g, 3, mode='reflect'),
    'horizontal_flip': A.horizontal_flip,
    'pca_color_noise': A.pca_color_noise,
    'color_jitter': lambda x, g: A.color_jitter(x, g, 0.4, 0.4, 0.4),
    'random_rotation': lambda x, g: A.random_rotation(x, g, 30),
    'random_zoom': lambda x, g: A.random_zoom(x, g, (0.8, 1.25)),
}
RGB_ONLY = {'pca_color_noise', 'color_jitter'}


@pytest.mark.parametrize('name', sorted(RANDOM_OPS))
@pytest.mark.parametrize('channels', [3, 1])
def test_random_ops_shape_and_determinism(name, channels):
  op = RANDOM_OPS[name]
  x = _image((12, 16, channels))
  if channels != 3 and name in RGB_ONLY:
    with pytest.raises(ValueError, match=rf'{name}.*1 channel'):
      op(x, _gen())
    return
  out = op(x, _gen(1))
  expected = (8, 10, channels) if name == 'random_crop' else x.shape
  assert out.shape == expected and out.dtype == np.float32
  np.testing.assert_array_equal(op(x, _gen(1)), out)
  assert any(not np.array_equal(op(x, _gen(s)), out) for s in range(2, 12))
  np.testing.assert_array_equal(x, _image((12, 16, channels)))  # input untouched


def test_random_crop_is_a_subwindow_and_covers_every_offset():
  x = _image((6, 7, 2))
  seen = set()
  g = _gen()
  for _ in range(300):
    crop = A.random_crop(x, g, 4)
    assert crop.shape == (4, 4, 2)
    offsets = _window_offsets(x, crop)
    assert len(offsets) == 1
    seen.add(offsets[0])
  assert seen == {(t, l) for t in range(3) for l in range(4)}
  with pytest.raises(ValueError, match=r'random_crop: crop \(8, 8\) is larger'):
    A.random_crop(x, g, 8)


@pytest.mark.parametrize('mode', ['constant', 'reflect'])
def test_pad_and_crop_is_a_window_of_the_padded_image(mode):
  x = _image((8, 8, 3)) + 0.5  # no zeros inside, so the zero padding is unambiguous
  padded = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode=mode)
  g = _gen()
  shifts = set()
  for _ in range(300):
    out = A.pad_and_crop(x, g, pad=4, mode=mode)
    assert out.shape == x.shape
    offsets = _window_offsets(padded, out)
    assert offsets
    shifts.add(offsets[0])
  # Shifts -4..4 on each axis, all drawn (P(a row or column shift never drawn) ~ 1e-14).
  assert {t for t, _ in shifts} == {l for _, l in shifts} == set(range(9))
  np.testing.assert_array_equal(A.pad_and_crop(x, g, pad=0), x)
  with pytest.raises(ValueError, match='mode must be one of'):
    A.pad_and_crop(x, g, mode='wrap')


def test_horizontal_flip():
  x = _image()
  g = _gen()
  once = A.horizontal_flip(x, g, p=1.0)
  np.testing.assert_array_equal(once, x[:, ::-1])
  np.testing.assert_array_equal(A.horizontal_flip(once, g, p=1.0), x)
  for _ in range(20):
    np.testing.assert_array_equal(A.horizontal_flip(x, g, p=0.0), x)
  flips = sum(not np.array_equal(A.horizontal_flip(x, g), x) for _ in range(1000))
  assert 430 < flips < 570
  with pytest.raises(ValueError, match='probability'):
    A.horizontal_flip(x, g, p=1.5)


def test_center_crop():
  x = _image((7, 10, 1))
  np.testing.assert_array_equal(A.center_crop(x, 3), x[2:5, 3:6])
  np.testing.assert_array_equal(A.center_crop(x, (4, 10)), x[1:5])
  with pytest.raises(ValueError, match='center_crop'):
    A.center_crop(x, 8)


def _random_rotation_matrix(seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  return q.astype(np.float32)


def test_pca_noise_is_one_offset_per_image_in_the_eigvec_span():
  eigvecs = _random_rotation_matrix(0)
  eigvals = np.array([0.3, 0.1, 0.0], np.float32)  # third direction gets no noise
  x = _image((5, 6, 3))
  g = _gen()
  deltas = np.stack([A.pca_color_noise(x, g, std=0.1, eigvals=eigvals, eigvecs=eigvecs) - x
                     for _ in range(4000)])
  offsets = deltas[:, :1, :1]
  np.testing.assert_allclose(deltas, np.broadcast_to(offsets, deltas.shape), atol=1e-6)
  coeffs = offsets.reshape(-1, 3) @ eigvecs  # row i: alpha_i * lambda_i
  np.testing.assert_allclose(coeffs[:, 2], 0, atol=1e-6)
  alphas = coeffs[:, :2] / eigvals[:2]
  # std of a sample std from 4000 normals is ~1.1%; allow 5%.
  np.testing.assert_allclose(alphas.std(axis=0), 0.1, rtol=0.05)
  np.testing.assert_allclose(alphas.mean(axis=0), 0.0, atol=0.01)
  assert abs(np.corrcoef(alphas.T)[0, 1]) < 0.1


def test_pca_noise_with_imagenet_constants():
  x = np.full((2, 2, 3), 0.5, np.float32)
  g = _gen()
  offsets = np.array([(A.pca_color_noise(x, g) - x)[0, 0] for _ in range(2000)])
  along_first = offsets @ A.IMAGENET_EIGVECS[:, 0]
  # AlexNet: a1 ~ N(0, 0.1) times l1 = 55.46 / 255 on [0, 1] pixels.
  np.testing.assert_allclose(along_first.std(), 0.1 * 55.46 / 255, rtol=0.08)
  np.testing.assert_allclose(A.IMAGENET_EIGVECS.T @ A.IMAGENET_EIGVECS, np.eye(3), atol=1e-3)
  np.testing.assert_array_equal(A.pca_color_noise(x, g, std=0.0), x)


def test_pca_from_images_recovers_a_known_covariance():
  eigvecs = _random_rotation_matrix(1).astype(np.float64)
  eigvals = np.array([0.04, 0.01, 0.002])
  cov = eigvecs @ np.diag(eigvals) @ eigvecs.T
  pixels = np.random.default_rng(2).multivariate_normal([0.5, 0.4, 0.3], cov, size=40_000)
  images = pixels.reshape(100, 20, 20, 3).astype(np.float32)
  vals, vecs = A.pca_from_images(images)
  assert vals.shape == (3,) and vecs.shape == (3, 3)
  assert np.all(np.diff(vals) <= 0)
  np.testing.assert_allclose(vals, eigvals, rtol=0.05)
  np.testing.assert_allclose(np.abs(vecs.T @ eigvecs), np.eye(3), atol=0.03)
  np.testing.assert_allclose(vecs @ np.diag(vals) @ vecs.T, cov, atol=1e-3)
  # An iterable of differently sized images gives the same statistics.
  parts = [*images[:50], images[50:].reshape(250, 80, 3)]
  vals2, vecs2 = A.pca_from_images(iter(parts))
  np.testing.assert_allclose(vals2, vals, rtol=1e-4)
  np.testing.assert_allclose(vecs2, vecs, atol=1e-4)


def test_rotation_identity_and_quarter_turns():
  x = _image((9, 9, 3))
  np.testing.assert_array_equal(A.rotate(x, 0), x)
  np.testing.assert_array_equal(A.random_rotation(x, _gen(), 0), x)
  np.testing.assert_allclose(A.rotate(x, 90), np.rot90(x), atol=1e-5)
  np.testing.assert_allclose(A.random_rotation(x, _gen(), (90, 90)), np.rot90(x), atol=1e-5)
  np.testing.assert_allclose(A.rotate(x, -90), np.rot90(x, -1), atol=1e-5)
  np.testing.assert_allclose(A.rotate(x, 180), x[::-1, ::-1], atol=1e-5)
  # Non-square: a quarter turn maps the central square onto np.rot90 of itself.
  y = _image((8, 12, 1))
  np.testing.assert_allclose(A.rotate(y, 90)[:, 2:10], np.rot90(y[:, 2:10]), atol=1e-5)
  # 45 degrees: the centre stays, the corners come from outside (zero fill).
  z = _image((11, 11, 1)) + 1
  r = A.rotate(z, 45)
  np.testing.assert_allclose(r[5, 5], z[5, 5], atol=1e-5)
  assert r[0, 0, 0] == r[0, -1, 0] == r[-1, 0, 0] == r[-1, -1, 0] == 0


def test_zoom():
  x = _image((10, 14, 3))
  np.testing.assert_array_equal(A.zoom(x, 1.0), x)
  np.testing.assert_array_equal(A.random_zoom(x, _gen(), (1.0, 1.0)), x)
  # Bilinear interpolation of a linear ramp is exact: zoom scales it about the centre.
  yy, xx = np.meshgrid(np.arange(10.0), np.arange(14.0), indexing='ij')
  ramp = (0.03 * yy + 0.05 * xx)[..., None].astype(np.float32)
  centre = 0.03 * 4.5 + 0.05 * 6.5
  np.testing.assert_allclose(A.zoom(ramp, 2.0), centre + (ramp - centre) / 2, atol=1e-5)
  shrunk = A.zoom(ramp + 1, 0.5)
  np.testing.assert_allclose(shrunk[3:7, 4:10], 1 + centre + (ramp - centre)[3:7, 4:10] * 2,
                             atol=1e-5)
  assert np.all(shrunk[0] == 0) and np.all(shrunk[:, -1] == 0)


def test_resize_shorter_side_and_jax_reference():
  x = _image((30, 45, 3))
  assert A.resize(x, 20).shape == (20, 30, 3)
  assert A.resize(x.transpose(1, 0, 2), 20).shape == (30, 20, 3)
  assert A.resize(x, 60).shape == (60, 90, 3)
  assert A.resize(_image((7, 9, 1)), (5, 11)).shape == (5, 11, 1)
  np.testing.assert_array_equal(A.resize(x, 30), x)
  # One call covers shrinking (antialiased, 30 -> 13) and growing (45 -> 90).
  ref = jax.image.resize(x, (13, 90, 3), method='bilinear')
  np.testing.assert_allclose(A.resize(x, (13, 90)), np.asarray(ref), atol=1e-5)


def test_normalize_with_channel_stats():
  images = _image((20, 6, 7, 3)) * np.array([0.5, 1.0, 0.2], np.float32) + [0.1, 0.0, 0.7]
  mean, std = A.channel_stats(images)
  assert mean.shape == std.shape == (3,)
  normed = np.stack([A.normalize(im, mean, std) for im in images])
  np.testing.assert_allclose(normed.reshape(-1, 3).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(normed.reshape(-1, 3).std(0), 1, atol=1e-5)
  mean2, std2 = A.channel_stats(list(images))
  np.testing.assert_allclose(mean2, mean, rtol=1e-6)
  np.testing.assert_allclose(std2, std, rtol=1e-5)
  np.testing.assert_allclose(A.normalize(images[0], A.CIFAR10_MEAN, A.CIFAR10_STD),
                             (images[0] - A.CIFAR10_MEAN) / A.CIFAR10_STD, atol=1e-6)
  with pytest.raises(ValueError, match='normalize: mean has 3 values but the image has 1'):
    A.normalize(_image((4, 4, 1)), A.IMAGENET_MEAN, A.IMAGENET_STD)


def test_color_jitter():
  x = 0.3 + 0.4 * _image((8, 8, 3))  # away from 0 and 1, so nothing clips
  g = _gen()
  np.testing.assert_array_equal(A.color_jitter(x, g), x)
  grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
  sat = A.color_jitter(x, g, saturation=0.5)
  assert not np.allclose(sat, x)
  np.testing.assert_allclose(sat @ np.array([0.299, 0.587, 0.114]), grey, atol=1e-5)
  con = A.color_jitter(x, g, contrast=0.5)
  np.testing.assert_allclose((con @ np.array([0.299, 0.587, 0.114])).mean(), grey.mean(),
                             atol=1e-5)
  ratios = [(A.color_jitter(x, g, brightness=0.2) / x).ravel() for _ in range(200)]
  assert all(np.ptp(r) < 1e-5 for r in ratios)  # one factor per image
  factors = np.array([r[0] for r in ratios])
  assert 0.8 - 1e-6 <= factors.min() and factors.max() <= 1.2 + 1e-6
  assert factors.min() < 0.85 and factors.max() > 1.15
  out = A.color_jitter(_image(), g, 2.0, 2.0, 2.0)
  assert out.min() >= 0 and out.max() <= 1
  grey_image = _image((8, 8, 1))
  assert A.color_jitter(grey_image, g, brightness=0.3, contrast=0.3).shape == (8, 8, 1)


def test_to_rgb():
  x = _image((4, 5, 1))
  np.testing.assert_array_equal(A.to_rgb(x), np.concatenate([x, x, x], -1))
  rgb = _image()
  assert A.to_rgb(rgb) is rgb


# ----------------------------------------------------------------------- spec strings


def test_make_transform_composes_in_order():
  x = _image((20, 30, 3))
  ex = {'image': x, 'label': np.int32(7), 'id': 'a'}
  t = A.make_transform('resize(10) | center_crop(8)|normalize(cifar10)')
  assert t.spec == 'resize(10)|center_crop(8)|normalize(cifar10)'
  assert not t.is_random
  out = t(ex)
  want = A.normalize(A.center_crop(A.resize(x, 10), 8), A.CIFAR10_MEAN, A.CIFAR10_STD)
  np.testing.assert_allclose(out['image'], want, rtol=1e-6)
  assert out['label'] == 7 and out['id'] == 'a' and ex['image'] is x
  other_order = A.make_transform('center_crop(8)|resize(10)|normalize(cifar10)')(ex)
  assert other_order['image'].shape == (10, 10, 3)
  # A random spec draws from the one generator in op order.
  spec = 'pad_crop(2, reflect)|flip(p=0.5)|rotate(10)|zoom(0.9, 1.1)|pca_noise(0.1)'
  t = A.make_transform(spec)
  g = _gen(3)
  want = A.pad_and_crop(x, g, 2, 'reflect')
  want = A.horizontal_flip(want, g, 0.5)
  want = A.random_rotation(want, g, 10)
  want = A.random_zoom(want, g, (0.9, 1.1))
  want = A.pca_color_noise(want, g, 0.1)
  np.testing.assert_array_equal(t(ex, _gen(3))['image'], want)
  # A list of strings (and callables) is the same as joining with '|'.
  listed = A.make_transform(['pad_crop(2, reflect)|flip(p=0.5)', 'rotate(10)',
                             'zoom(0.9, 1.1)', functools.partial(A.pca_color_noise, std=0.1)])
  np.testing.assert_array_equal(listed(ex, _gen(3))['image'], want)
  # Pickles as its spec, for multiprocess loaders.
  again = pickle.loads(pickle.dumps(t))
  np.testing.assert_array_equal(again(ex, _gen(3))['image'], want)


def test_make_transform_examples_from_the_configs():
  alexnet = A.make_transform(
      'resize(256)|random_crop(227)|flip|pca_noise(0.1)|normalize(imagenet)')
  out = alexnet({'image': _image((260, 300, 3)), 'label': 1}, _gen())
  assert out['image'].shape == (227, 227, 3) and out['image'].dtype == np.float32
  cifar = A.make_transform('pad_crop(4)|flip|normalize(cifar10)')
  assert cifar({'image': _image((32, 32, 3))}, _gen())['image'].shape == (32, 32, 3)
  evaluation = A.make_transform('center_crop(227)|normalize(imagenet)')
  assert evaluation({'image': _image((256, 256, 3))})['image'].shape == (227, 227, 3)
  grey = A.make_transform('to_rgb|color_jitter(0.2, 0.2, 0.2)|normalize(imagenet)')
  assert grey({'image': _image((8, 8, 1))}, _gen())['image'].shape == (8, 8, 3)
  assert A.is_random('pad_crop(4)|flip') and A.is_random(['center_crop(4)', 'flip'])
  assert not A.is_random('center_crop(227)|normalize(imagenet)')
  assert not A.is_random('') and not A.is_random(None)


@pytest.mark.parametrize('spec', ['', None, '  ', []])
def test_empty_spec_is_identity(spec):
  ex = {'image': _image(), 'label': 3}
  out = A.make_transform(spec)(ex, _gen())
  np.testing.assert_array_equal(out['image'], ex['image'])
  assert out['label'] == 3


@pytest.mark.parametrize('spec, message', [
    ('flp', r"Unknown augmentation op 'flp'.*Valid ops: resize.*random_crop.*flip"),
    ('resize(256)|crop(227)', r"Unknown augmentation op 'crop'.*Valid ops"),
    ('random_crop()', r'random_crop: give size.*Usage: random_crop\(size\)'),
    ('random_crop(0)', r'random_crop: size must be a positive int.*got 0'),
    ('random_crop(22.5)', 'random_crop: size must be'),
    ('center_crop(1, 2, 3)', 'center_crop: give size'),
    ('pad_crop(mode=wrap)', r"pad_crop: mode must be one of .*'wrap'"),
    ('pad_crop(-1)', 'pad_crop: pad must be'),
    ('pad_crop(4, size=3)', r'pad_crop: wrong arguments.*Usage: pad_crop\(pad=4'),
    ('flip(2)', 'flip: p must be a probability'),
    ('pca_noise(-0.1)', 'pca_noise: std must be'),
    ('color_jitter(hue=0.1)', 'color_jitter: wrong arguments'),
    ('rotate', 'rotate: give max_degrees'),
    ('zoom(1.2, 0.8)', r'zoom: scale must be a number or \(lo, hi\) with lo <= hi'),
    ('zoom(0, 2)', 'zoom: scale must be > 0'),
    ('normalize(imagenette)', r"normalize: unknown statistics 'imagenette'.*imagenet, cifar10"),
    ('normalize(0.5, -1)', 'normalize: need mean and std'),
    ('normalize', 'normalize: give a statistics name'),
    ('resize(256', r"Cannot parse augmentation op 'resize\(256'"),
    ('resize(256)||flip', 'Empty op'),
    ('flip(p=print(1))', r'flip: cannot read the arguments'),
])
def test_spec_errors_at_parse_time(spec, message):
  with pytest.raises(ValueError, match=message):
    A.make_transform(spec)


def test_errors_that_need_the_image_name_the_op():
  t = A.make_transform('center_crop(4)|pca_noise(0.1)')
  with pytest.raises(ValueError, match=r"op 'pca_noise\(0.1\)'.*3 channel.*1 channel"):
    t({'image': _image((8, 8, 1))}, _gen())
  with pytest.raises(ValueError, match=r"'color_jitter\(saturation=0.4\)'.*1 channel"):
    A.make_transform('color_jitter(saturation=0.4)')({'image': _image((8, 8, 1))}, _gen())
  with pytest.raises(ValueError, match=r"'random_crop\(9\)'.*larger than the image"):
    A.make_transform('random_crop(9)')({'image': _image((8, 8, 1))}, _gen())
  with pytest.raises(ValueError, match='needs an rng'):
    A.make_transform('flip')({'image': _image()})
  with pytest.raises(ValueError, match='float images'):
    A.make_transform('flip')({'image': np.zeros((4, 4, 3), np.uint8)}, _gen())


def test_through_make_loader_same_seed_same_batches():
  source = [{'image': _image((10, 10, 3), seed=i), 'label': i % 3} for i in range(12)]
  spec = 'pad_crop(2)|flip|rotate(15)|color_jitter(0.2, 0.2)|normalize(cifar10)'

  def loader(seed):
    return make_loader(source, batch_size=4, seed=seed,
                       random_transform=A.make_transform(spec))

  a, b, c = loader(0), loader(0), loader(1)
  for step in (0, 1, 2, 3, 5):  # 3 steps per epoch: 3 and 5 are in epoch 2
    batch = a[step]
    assert batch['image'].shape == (4, 10, 10, 3) and batch['image'].dtype == np.float32
    np.testing.assert_array_equal(batch['image'], b[step]['image'])
    np.testing.assert_array_equal(batch['label'], b[step]['label'])
    assert not np.array_equal(batch['image'], c[step]['image'])
  # The same examples get new augmentations in the next epoch.
  first = np.concatenate([a[s]['image'] for s in range(3)])
  second = np.concatenate([a[s]['image'] for s in range(3, 6)])
  assert not np.allclose(np.sort(first.ravel()), np.sort(second.ravel()))
  # A deterministic spec fits the loader's plain `transform`.
  plain = make_loader(source, batch_size=4, seed=0,
                      transform=A.make_transform('center_crop(6)|normalize(cifar10)'))
  assert plain[0]['image'].shape == (4, 6, 6, 3)


def test_pad_op_zero_pads_every_side():
  x = np.ones((28, 28, 1), np.float32)
  y = A.make_transform('pad(2)')({'image': x}, None)['image']
  assert y.shape == (32, 32, 1)
  assert y[2:30, 2:30].all() and y.sum() == 28 * 28
  with pytest.raises(ValueError, match='pad: amount'):
    A.make_transform("pad(-1)")


# ------------------------------------------------------- segmentation: image + mask


def _blocky_mask(shape=(24, 28), ids=(0, 1, 2, 5), seed=0, block=4):
  """A mask of block x block squares of class ids (most pixels have neighbours of one
  class)."""
  rng = np.random.default_rng(seed)
  blocks = rng.choice(ids, size=(-(-shape[0] // block), -(-shape[1] // block)))
  return np.kron(blocks, np.ones((block, block), np.int64))[:shape[0], :shape[1]].astype(
      np.int32)


def _one_hot_image(mask, ids=(0, 1, 2, 5)):
  """The mask as an image: channel j is 1 where the mask is ids[j]."""
  return np.stack([mask == i for i in ids], axis=-1).astype(np.float32)


def _check_mask_follows_image(image, mask, ids=(0, 1, 2, 5)):
  """Where the transformed one-hot image is unambiguous, the mask is its class; where
  the image has no source pixel at all (all channels 0), the mask is 0 (background)."""
  peak = image.max(axis=-1)
  sure = peak > 1 - 1e-5                        # every contributing pixel of one class
  empty = peak < 1e-6
  np.testing.assert_array_equal(mask[sure], np.asarray(ids)[image.argmax(-1)][sure])
  np.testing.assert_array_equal(mask[empty], 0)
  return (sure | empty).mean()                  # the share of pixels checked


JOINT_SPECS = ['flip(1.0)', 'flip(0.5)', 'random_crop(17, 20)', 'center_crop(15)',
               'pad(3)', 'pad_crop(5)', 'pad_crop(4, reflect)', 'rotate(40)',
               'rotate(90, 90)', 'zoom(0.6, 1.5)', 'zoom(2.0)', 'resize(48)', 'resize(11, 9)',
               'resize(30)|random_crop(24)|flip|rotate(20)|zoom(0.8, 1.2)']


@pytest.mark.parametrize('spec', JOINT_SPECS)
def test_joint_geometric_ops_move_the_mask_with_the_image(spec):
  mask = _blocky_mask(block=6)
  example = {'image': _one_hot_image(mask), 'label': mask}
  transform = A.make_transform(spec)  # task 'auto': a 2-D label is a mask
  for seed in range(8):
    out = transform(example, _gen(seed))
    assert out['label'].dtype == np.int32 and out['label'].shape == out['image'].shape[:2]
    assert set(np.unique(out['label'])) <= {0, 1, 2, 5}
    # Shrinking 2.5x (antialiased) and chains of resampling blend more pixels.
    checked = _check_mask_follows_image(out['image'], out['label'])
    assert checked > (0.2 if spec == 'resize(11, 9)' else 0.3 if '|' in spec else 0.5)
    # The same draws as for the image alone: the image is what it would be without a mask.
    alone = A.make_transform(spec, task='classification')(example, _gen(seed))
    np.testing.assert_array_equal(out['image'], alone['image'])
    np.testing.assert_array_equal(alone['label'], mask)


def test_joint_exact_ops_with_the_mask_in_an_image_channel():
  mask = _blocky_mask((20, 20), ids=(0, 1, 2, 3))
  image = np.stack([mask.astype(np.float32), _image((20, 20, 1))[..., 0],
                    np.ones((20, 20), np.float32)], axis=-1)
  for spec in ('flip(1.0)', 'random_crop(13, 11)', 'pad_crop(3)', 'pad_crop(3, reflect)',
               'rotate(90, 90)', 'rotate(180, 180)', 'center_crop(12)|pad(2)'):
    out = A.make_transform(spec)({'image': image, 'label': mask}, _gen(4))
    filled = out['image'][..., 2] == 0  # no source pixel: padding / outside
    np.testing.assert_array_equal(out['label'][~filled],
                                  np.rint(out['image'][..., 0][~filled]).astype(np.int32))
    np.testing.assert_array_equal(out['label'][filled], 0)
  flipped = A.make_transform('flip(1.0)')({'image': image, 'label': mask}, _gen())
  np.testing.assert_array_equal(flipped['label'], mask[:, ::-1])


def test_resize_nearest():
  mask = _blocky_mask((10, 13))
  up = A.resize_nearest(mask, (23, 7))
  assert up.shape == (23, 7) and up.dtype == mask.dtype
  np.testing.assert_array_equal(up, np.asarray(jax.image.resize(
      mask.astype(np.float32), (23, 7), 'nearest')).astype(np.int32))
  assert A.resize_nearest(mask, 20).shape == (20, 26)  # int: the shorter side
  np.testing.assert_array_equal(A.resize_nearest(mask, (20, 26)), np.kron(
      mask, np.ones((2, 2), mask.dtype)))


@pytest.mark.parametrize('dtype', [np.uint8, np.int32, np.int64])
def test_joint_mask_keeps_dtype_and_values(dtype):
  mask = _blocky_mask(ids=(1, 2, 7)).astype(dtype)
  spec = 'resize(40)|rotate(30)|zoom(0.7, 1.3)|random_crop(32)|flip|pad_crop(3)'
  out = A.make_transform(spec)({'image': _image((24, 28, 3)), 'label': mask}, _gen(1))
  assert out['label'].dtype == dtype and out['label'].shape == (32, 32)
  assert set(np.unique(out['label'])) <= {0, 1, 2, 7}  # 0: filled areas only
  # A (H, W, 1) mask is accepted and comes back (H, W).
  out = A.make_transform('flip(1.0)')({'image': _image((24, 28, 3)),
                                       'label': mask[..., None]}, _gen())
  np.testing.assert_array_equal(out['label'], mask[:, ::-1])


def test_photometric_ops_leave_the_mask_alone():
  mask = _blocky_mask()
  x = _image((24, 28, 3))
  spec = 'color_jitter(0.4, 0.4, 0.4)|pca_noise(0.1)|normalize(imagenet)'
  out = A.make_transform(spec, task='segmentation')({'image': x, 'label': mask}, _gen(2))
  np.testing.assert_array_equal(out['label'], mask)
  np.testing.assert_array_equal(out['image'],
                                A.make_transform(spec)({'image': x}, _gen(2))['image'])
  grey = A.make_transform('to_rgb')({'image': x[..., :1], 'label': mask})
  assert grey['image'].shape == (24, 28, 3)
  np.testing.assert_array_equal(grey['label'], mask)
  # A callable in a list spec is photometric too.
  brighter = A.make_transform(['flip(1.0)', lambda image, rng: image * 0.5])(
      {'image': x, 'label': mask}, _gen())
  np.testing.assert_array_equal(brighter['label'], mask[:, ::-1])


def test_segmentation_task_rules():
  mask = _blocky_mask()
  x = _image((24, 28, 3))
  with pytest.raises(ValueError, match="task='segmentation' needs"):
    A.make_transform('flip', task='segmentation')({'image': x, 'label': 3}, _gen())
  with pytest.raises(ValueError, match='task must be one of'):
    A.make_transform('flip', task='detection')
  with pytest.raises(ValueError, match=r'must be \(H, W\) like the image'):
    A.make_transform('flip')({'image': x, 'label': mask[:10]}, _gen())
  with pytest.raises(ValueError, match='integer class ids'):
    A.make_transform('flip')({'image': x, 'label': mask.astype(np.float32)}, _gen())
  with pytest.raises(ValueError, match='changed the image size'):
    A.make_transform([lambda image, rng: image[:5]])({'image': x, 'label': mask}, _gen())
  # Scalar labels: 'auto' augments the image alone, as before.
  out = A.make_transform('flip(1.0)')({'image': x, 'label': np.int32(4)}, _gen())
  assert out['label'] == 4
  # The task survives pickling and re-wrapping.
  t = A.make_transform('rotate(20)', task='segmentation')
  again = pickle.loads(pickle.dumps(t))
  assert again.task == 'segmentation' and 'segmentation' in repr(again)
  ex = {'image': x, 'label': mask}
  np.testing.assert_array_equal(again(ex, _gen(5))['label'], t(ex, _gen(5))['label'])
  assert A.make_transform(t) is t
  assert A.make_transform(t, task='classification').task == 'classification'


def test_make_loader_segmentation_batches():
  masks = [_blocky_mask((16, 16), ids=(0, 1, 2), seed=i).astype(np.uint8) for i in range(10)]
  source = [{'image': (_image((16, 16, 3), seed=i) * 255).astype(np.uint8), 'label': m}
            for i, m in enumerate(masks)]
  transform = A.make_transform('random_crop(12)|flip|rotate(15)|normalize(imagenet)')
  loader = make_loader(source, batch_size=4, seed=0, task='segmentation',
                       random_transform=transform)
  batch = loader[0]
  assert batch['image'].shape == (4, 12, 12, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 12, 12) and batch['label'].dtype == np.int32
  assert batch['mask'].shape == (4,) and batch['mask'].dtype == np.float32
  assert set(np.unique(batch['label'])) <= {0, 1, 2}
  np.testing.assert_array_equal(batch['label'], make_loader(
      source, batch_size=4, seed=0, task='segmentation', random_transform=transform)[0]['label'])
  # Evaluation: the padded last batch has all-0 masks and example mask 0.
  evaluation = make_loader(source, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                           drop_remainder=False, task='segmentation')
  last = evaluation[2]
  assert last['label'].shape == (4, 16, 16)
  np.testing.assert_array_equal(last['mask'], [1, 1, 0, 0])
  np.testing.assert_array_equal(last['label'][:2], np.stack(masks[8:]).astype(np.int32))
  np.testing.assert_array_equal(last['label'][2:], 0)
