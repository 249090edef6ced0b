"""Depth, part 2: plain vs residual CIFAR-style nets of 20, 32 and 56 layers on digits.

    python launch.py --mode=sweep --config=experiments/depth/residual.py --workdir=runs/depth_residual

He et al.'s degradation experiment (sec. 4.2) in miniature: `plainN` and `resnetN`
(6n+2 layers: a 3x3 conv, three stages of n two-conv blocks at 16/32/64 channels,
global average pooling, the output layer) differ only in the identity shortcuts
(option A: subsample and zero-pad where the shape changes). Same data, schedule and
seed for both. The question is the *training* error of the deeper plain nets.
Expected: see experiments/depth/README.md for the measured table.
"""
from cnn_jax.train import sweep
from experiments import common

DEPTHS = (20, 32, 56)


def get_config():
  config = common.digits_config(weight_decay=1e-4, warmup_steps=40, log_every_steps=20)
  config.model = 'resnet20'
  # The digits are 8x8 scans stored upsampled to 32x32; at 16x16 they lose nothing
  # and the 56-layer nets cost a quarter of the multiply-adds (the budget of one
  # default run is ~15 minutes on a 2-core CPU). Drop both resize(16) for CIFAR-10.
  config.train_transform = 'rotate(10)|zoom(0.9,1.1)|resize(16)'
  config.eval_transform = 'resize(16)'
  config.write_plots = False
  return config


def get_sweep():
  # CifarResNet's depth and shortcut fields: 'none' is the plain twin (plainN).
  return sweep.product(sweep.axis('model_kwargs.depth', list(DEPTHS)),
                       sweep.axis('model_kwargs.shortcut', ['none', 'A']),
                       sweep.axis('seed', [0]))
