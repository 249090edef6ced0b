"""Depth, part 1: VGG-style nets of 3, 6, 9 and 12 conv layers on the embedded digits.

    python launch.py --mode=sweep --config=experiments/depth/vgg.py --workdir=runs/depth_vgg

Three stages of 16, 32 and 64 channels, each a stack of n 3x3 convs (n = 1..4) with
BatchNorm and ReLU, then a 2x2 max pool; global average pooling and the output
layer. Two seeds per depth. See experiments/depth/README.md for the measured table.
Expected: see the README (all depths within about a point of each other here).
"""
from cnn_jax.train import sweep
from experiments import common

DEPTHS = (1, 2, 3, 4)          # 3x3 convs per stage -> 3, 6, 9, 12 conv layers
SEEDS = (0, 1)


def get_config():
  config = common.digits_config(num_epochs=15, warmup_steps=40, log_every_steps=20)
  config.model = 'ablation_cnn'
  config.model_kwargs = dict(widths=(16, 32, 64), kernels=(3, 3), batch_norm=True)
  config.write_plots = False
  return config


def get_sweep():
  return sweep.product(sweep.axis('model_kwargs.kernels', [(3,) * n for n in DEPTHS]),
                       sweep.axis('seed', list(SEEDS)))
