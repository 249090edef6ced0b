"""Classic kernels: values from the notes, outputs vs a NumPy loop, the figure."""
import matplotlib.image
import numpy as np
import pytest

from cnn_jax.analysis import kernels as K

SYMMETRIC = ('identity', 'edge_laplacian_4', 'edge_laplacian_8', 'laplacian', 'sharpen',
             'box_blur', 'gaussian_3x3', 'gaussian_5x5', 'unsharp_5x5')
ANTISYMMETRIC = ('sobel_x', 'sobel_y', 'prewitt_x', 'prewitt_y', 'vertical_edge')
SUM_TO_ONE = ('identity', 'sharpen', 'box_blur', 'gaussian_3x3', 'gaussian_5x5', 'unsharp_5x5')
SUM_TO_ZERO = ('edge_laplacian_4', 'edge_laplacian_8', 'laplacian') + ANTISYMMETRIC


@pytest.fixture(autouse=True)
def _fast(fast_compile):
  del fast_compile


def _correlate_loop(x2d, k):
  """y[i, j] = sum_{u, v} xpad[i + u, j + v] k[u, v], 'same' zero padding (odd k)."""
  kh, kw = k.shape
  xp = np.pad(x2d.astype(np.float64), ((kh // 2, kh // 2), (kw // 2, kw // 2)))
  y = np.zeros(x2d.shape)
  for i in range(x2d.shape[0]):
    for j in range(x2d.shape[1]):
      y[i, j] = (xp[i:i + kh, j:j + kw] * k).sum()
  return y


def test_every_kernel_matches_a_numpy_loop_in_gray_and_rgb():
  rng = np.random.default_rng(0)
  rgb = rng.random((7, 9, 3), dtype=np.float32)
  gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
  assert set(SYMMETRIC + ANTISYMMETRIC) == set(K.CLASSIC_KERNELS)
  for name, k in K.CLASSIC_KERNELS.items():
    y = K.apply_kernel(rgb, name, 'gray')
    assert y.shape == (7, 9) and y.dtype == np.float32
    np.testing.assert_allclose(y, _correlate_loop(gray, k), atol=1e-5, err_msg=name)
    y = K.apply_kernel(rgb, k, 'rgb')
    assert y.shape == (7, 9, 3)
    for c in range(3):
      np.testing.assert_allclose(y[..., c], _correlate_loop(rgb[..., c], k), atol=1e-5,
                                 err_msg=f'{name} channel {c}')


def test_true_convolution_flips_the_sign_of_antisymmetric_kernels_only():
  x = np.random.default_rng(1).random((6, 8), dtype=np.float32)
  for name in SYMMETRIC:
    np.testing.assert_allclose(K.apply_kernel(x, name, true_convolution=True),
                               K.apply_kernel(x, name), atol=1e-6, err_msg=name)
  for name in ANTISYMMETRIC:
    flipped = K.apply_kernel(x, name, true_convolution=True)
    np.testing.assert_allclose(flipped, -K.apply_kernel(x, name), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(flipped, _correlate_loop(x, K.get_kernel(name)[::-1, ::-1]),
                               atol=1e-5, err_msg=name)


def test_seed_002_worked_vertical_edge_example():
  # 6x6 image, left half 10, right half 0, (*) [[1 0 -1] x 3] -> rows of [0 30 30 0].
  image = np.zeros((6, 6), np.float32)
  image[:, :3] = 10
  y = K.apply_kernel(image, 'vertical_edge', padding='valid')
  np.testing.assert_array_equal(y, np.tile([0, 30, 30, 0], (4, 1)))
  # The notes' '*' is a correlation: the flipped kernel gives the opposite sign.
  np.testing.assert_array_equal(
      K.apply_kernel(image, 'vertical_edge', padding='valid', true_convolution=True), -y)
  # A bright-left edge is negative for sobel_x / prewitt_x (brightness falls to the right).
  assert (K.apply_kernel(image, 'prewitt_x', padding='valid') == -y).all()


def test_kernel_values_and_sums():
  for name in SUM_TO_ONE:
    assert K.get_kernel(name).sum() == pytest.approx(1.0, abs=1e-6), name
  for name in SUM_TO_ZERO:
    assert K.get_kernel(name).sum() == pytest.approx(0.0, abs=1e-6), name
  for k in K.CLASSIC_KERNELS.values():
    assert k.dtype == np.float32 and not k.flags.writeable
  binomial = np.array([1, 4, 6, 4, 1])
  np.testing.assert_allclose(K.GAUSSIAN_5X5, np.outer(binomial, binomial) / 256)
  np.testing.assert_allclose(K.GAUSSIAN_3X3, np.outer([1, 2, 1], [1, 2, 1]) / 16)
  np.testing.assert_allclose(K.BOX_BLUR, np.full((3, 3), 1 / 9))
  assert K.UNSHARP_5X5[2, 2] == pytest.approx(476 / 256)
  identity5 = np.zeros((5, 5))
  identity5[2, 2] = 1
  np.testing.assert_allclose(K.UNSHARP_5X5, 2 * identity5 - K.GAUSSIAN_5X5, atol=1e-7)
  np.testing.assert_array_equal(K.SHARPEN, K.IDENTITY + K.EDGE_LAPLACIAN_4)
  np.testing.assert_array_equal(K.LAPLACIAN, -K.EDGE_LAPLACIAN_4)
  np.testing.assert_array_equal(K.VERTICAL_EDGE, -K.PREWITT_X)
  np.testing.assert_array_equal(K.SOBEL_Y, K.SOBEL_X.T)
  np.testing.assert_array_equal(K.PREWITT_Y, K.PREWITT_X.T)


def test_identity_returns_the_image_and_gray_is_luminance():
  rgb = np.random.default_rng(2).random((5, 7, 3), dtype=np.float32)
  np.testing.assert_allclose(K.apply_kernel(rgb, 'identity', 'rgb'), rgb, atol=1e-7)
  np.testing.assert_allclose(K.apply_kernel(rgb, 'identity', 'gray'),
                             rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
  np.testing.assert_allclose(K.apply_kernel(rgb[..., :1], 'identity'), rgb[..., 0], atol=1e-7)
  # A constant image stays constant under a blur away from the zero-padded border.
  flat = np.full((7, 7), 0.5, np.float32)
  np.testing.assert_allclose(K.apply_kernel(flat, 'gaussian_3x3')[1:-1, 1:-1], 0.5, atol=1e-6)
  np.testing.assert_allclose(K.apply_kernel(flat, 'sobel_x')[1:-1, 1:-1], 0.0, atol=1e-6)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"no classic kernel named 'sobelx'.*'sobel_x'"):
    K.get_kernel('sobelx')
  with pytest.raises(ValueError, match='mode must be one of'):
    K.apply_kernel(np.zeros((4, 4)), 'identity', 'hsv')
  with pytest.raises(ValueError, match="mode='rgb' filters each channel"):
    K.apply_kernel(np.zeros((4, 4)), 'identity', 'rgb')
  with pytest.raises(ValueError, match='2-D'):
    K.apply_kernel(np.zeros((4, 4)), np.ones((3, 3, 1)))
  with pytest.raises(ValueError, match='padding must be'):
    K.apply_kernel(np.zeros((4, 4)), 'identity', padding='reflect')
  with pytest.raises(ValueError, match='no sample photo'):
    K.sample_photo('cat')
  with pytest.raises(ValueError, match='size must be'):
    K.sample_photo(size=(0, 3))


def test_sample_photo_is_offline_and_resized():
  photo = K.sample_photo('flower.jpg', size=32)
  assert photo.shape == (21, 32, 3) and photo.dtype == np.float32
  assert 0.0 <= photo.min() and photo.max() <= 1.0 and photo.std() > 0.05
  assert K.sample_photo(size=(10, 12)).shape == (10, 12, 3)


@pytest.mark.parametrize('mode', ['gray', 'rgb'])
def test_kernel_grid_figure_is_written(tmp_path, mode):
  image = K.sample_photo(size=24)
  path = K.plot_kernel_grid(image, tmp_path / 'fig' / f'{mode}.png',
                            names=['box_blur', 'sobel_x', 'unsharp_5x5'], mode=mode, dpi=50)
  assert path.endswith(f'{mode}.png') and (tmp_path / 'fig' / f'{mode}.png').stat().st_size > 5000
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[2] == 4
  assert pixels.shape[0] > 200 and pixels.shape[1] > 200
  assert pixels[..., :3].std() > 0.05   # not a blank canvas
  with pytest.raises(ValueError, match='no classic kernel'):
    K.plot_kernel_grid(image, tmp_path / 'x.png', names=['blurr'])
