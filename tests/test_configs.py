"""Every experiment config loads, passes the checks, and names a model that builds."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from cnn_jax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
REQUIRED = ('model', 'dataset', 'batch_size', 'seed', 'parallelism', 'optimizer',
            'checkpoint_every_steps')


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_issue_s_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert names >= {'lenet5_digits', 'lenet5_mnist', 'alexnet_imagenet', 'vgg16_cifar10',
                   'resnet20_cifar10', 'resnet50_imagenet', 'googlenet_imagenet',
                   'cnn1d_mnist1d'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_is_valid_and_documented(path):
  module = load(path)
  doc = module.__doc__ or ''
  assert 'python launch.py --config=configs/' in doc and 'Expected' in doc, path
  config = module.get_config()
  init_from = config.transfer.init_from
  if init_from and not os.path.exists(os.path.join(REPO, init_from)):
    # Pretrained weights the user downloads: missing, the config is refused up front.
    with pytest.raises(ValueError, match='does not exist'):
      config_lib.validate(config)
    config.transfer.init_from = REPO     # any existing path, to check everything else
  config = config_lib.validate(config)
  for key in REQUIRED:
    assert config[key] not in (None, ''), key
  assert (config.num_epochs is None) != (config.num_train_steps is None)
  assert config.optimizer.name and config.optimizer.lr > 0


def _launch(*args):
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_launch_overrides_are_typed_and_keys_checked(tmp_path):
  base = ['--config=configs/lenet5_digits.py', f'--workdir={tmp_path}/w']
  bad_type = _launch(*base, '--config.batch_size=big')
  assert bad_type.returncode != 0 and 'batch_size' in bad_type.stderr
  bad_key = _launch(*base, '--config.optimizer.lrr=0.1')
  assert bad_key.returncode != 0 and 'lrr' in bad_key.stderr
  bad_value = _launch(*base, '--config.parallelism=pjit')
  assert bad_value.returncode == 2 and "'parallelism' is 'pjit'" in bad_value.stderr
  assert not os.path.exists(tmp_path / 'w')
