"""launch.py --mode=visualize: every figure from a (tiny) trained run, and the errors."""
import os
import subprocess
import sys

import jax
import matplotlib.image as mpimg
import pytest

from cnn_jax.analysis import visualize
from cnn_jax.train import config as config_lib
from cnn_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The figures compile one-off programs (saliency, deconvnet, ERFs, ...): XLA's
# optimisation passes would dominate their time.
pytestmark = pytest.mark.usefixtures('fast_compile')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A conv / BN / ReLU / max-pool net trained 3 steps on the offline digits at 16x16."""
  wd = str(tmp_path_factory.mktemp('vis') / 'run')
  c = config_lib.default_config()
  c.model, c.dataset = 'ablation_cnn_tiny', 'digits'
  c.model_kwargs = dict(kernels=(3,), widths=(4, 8))
  c.eval_split = 'test[:40]'
  c.train_transform = c.eval_transform = 'resize(16)'
  c.batch_size, c.num_train_steps, c.num_devices = 8, 3, 1
  c.progress_bar, c.write_plots, c.print_summary = False, False, False
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)   # compile time dominates
  try:
    loop.train_and_evaluate(c, wd)
  finally:
    jax.config.update('jax_disable_most_optimizations', old)
  return wd


def _readable(path):
  assert os.path.getsize(path) > 1000, path
  image = mpimg.imread(path)
  assert image.ndim == 3 and min(image.shape[:2]) > 50, (path, image.shape)
  assert image[..., :3].std() > 0.01, f'{path} is blank'


def test_every_figure_of_a_trained_run(run_dir):
  figures = [f for f in visualize.FIGURES if f != 'kernels']   # kernels: own test file
  written = visualize.visualize(run_dir, figures=figures, num_images=2)
  # One top-patch grid per default layer (first, middle, last conv: here both convs).
  assert set(written) == (set(figures) - {'top_patches'}) | {
      'top_patches:stage1_conv1', 'top_patches:stage2_conv1'}
  for path in written.values():
    assert os.path.dirname(path) == os.path.join(run_dir, 'figures')
    _readable(path)


def test_chosen_layer_and_errors_before_compute(run_dir, tmp_path):
  written = visualize.visualize(run_dir, figures=['activation_maps'], layers=['stage2_conv1'],
                                num_images=1)
  _readable(written['activation_maps'])
  with pytest.raises(ValueError, match='Close matches: stage2_conv1'):
    visualize.visualize(run_dir, figures=['activation_maps'], layers=['stage2_conv'])
  with pytest.raises(ValueError, match='unknown figure'):
    visualize.parse_figures('filters,deconv')
  empty = str(tmp_path / 'nothing')
  with pytest.raises(ValueError, match='holds no trained run'):
    visualize.visualize(empty, figures=['filters'])
  with pytest.raises(ValueError, match='need a trained run'):
    visualize.visualize(empty, figures=['saliency'], model='ablation_cnn_tiny')
  with pytest.raises(ValueError, match='holds a trained'):
    visualize.visualize(run_dir, figures=['filters'], model='resnet_tiny')
  assert not os.path.exists(empty)      # refused before anything was written


def test_model_without_a_run_draws_the_data_free_figures(tmp_path):
  written = visualize.visualize(str(tmp_path), model='ablation_cnn_tiny',
                                figures=['filters', 'receptive_field'])
  assert set(written) == {'filters', 'receptive_field'}
  for path in written.values():
    _readable(path)


def test_launch_visualize_kernels(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'launch.py'), '--mode=visualize',
       f'--workdir={tmp_path}', '--figures=kernels'],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ('kernels_gray.png', 'kernels_rgb.png'):
    _readable(str(tmp_path / 'figures' / name))
  bad = subprocess.run(
      [sys.executable, os.path.join(REPO, 'launch.py'), '--mode=visualize',
       f'--workdir={tmp_path}', '--figures=filters'],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
  assert bad.returncode == 2 and 'holds no trained run' in bad.stderr
