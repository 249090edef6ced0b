"""Depth, part 1: VGG-style nets of 3, 6, 9 and 12 conv layers on the embedded digits.

    python launch.py --mode=sweep --config=experiments/depth/vgg.py --workdir=runs/depth_vgg

Three stages of 16, 32 and 64 channels, each a stack of n 3x3 convs (n = 1..4) with
BatchNorm and ReLU, then a 2x2 max pool; global average pooling and the output
layer. Two seeds per depth. See experiments/depth/README.md for the measured table.
Expected: see the README (all depths within about a point of each other here).
"""
from cnn_jax.train import sweep
from cnn_jax.train.config import default_config

DEPTHS = (1, 2, 3, 4)          # 3x3 convs per stage -> 3, 6, 9, 12 conv layers
SEEDS = (0, 1)


def get_config():
  config = default_config()
  config.model = 'ablation_cnn'
  config.model_kwargs = dict(widths=(16, 32, 64), kernels=(3, 3), batch_norm=True)
  config.dataset = 'digits'
  config.train_split = 'train[:90%]'
  config.val_split = 'train[90%:]'
  config.eval_split = 'test'
  config.train_transform = 'rotate(10)|zoom(0.9,1.1)'
  config.batch_size = 32
  config.num_epochs = 15.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.05
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 40
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000
  config.progress_bar = False
  config.print_summary = False
  config.write_plots = False
  return config


def get_sweep():
  return sweep.product(sweep.axis('model_kwargs.kernels', [(3,) * n for n in DEPTHS]),
                       sweep.axis('seed', list(SEEDS)))
