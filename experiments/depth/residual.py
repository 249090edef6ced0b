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
from cnn_jax.train.config import default_config

DEPTHS = (20, 32, 56)


def get_config():
  config = default_config()
  config.model = 'resnet20'
  config.dataset = 'digits'
  config.train_split = 'train[:90%]'
  config.val_split = 'train[90%:]'
  config.eval_split = 'test'
  config.train_transform = 'rotate(10)|zoom(0.9,1.1)'
  config.batch_size = 32
  config.num_epochs = 12.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.05
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 40
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000
  config.progress_bar = False
  config.print_summary = False
  config.write_plots = False
  return config


def get_sweep():
  # CifarResNet's depth and shortcut fields: 'none' is the plain twin (plainN).
  return sweep.product(sweep.axis('model_kwargs.depth', list(DEPTHS)),
                       sweep.axis('model_kwargs.shortcut', ['none', 'A']),
                       sweep.axis('seed', [0]))
