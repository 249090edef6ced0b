r"""Activation functions in a deep plain net: ReLU vs sigmoid vs tanh on digits.

    python launch.py --mode=sweep --config=experiments/activations/config.py \
        --workdir=runs/activations
    python experiments/activations/grad_norms.py --workdir=runs/activations

A plain (no shortcut, no BatchNorm) net of 10 3x3 conv layers: five stages of two
convs at 16, 16, 32, 32, 64 channels, each followed by a 2x2 max pool (except the
last), global average pooling and the output layer. The three runs differ only in
the activation. grad_norms.py then plots ||dL/dW|| of every layer at initialisation
(and of the trained nets), which is where a vanishing gradient shows.
Expected: see experiments/activations/README.md for the measured table and plot.
"""
from cnn_jax.train import sweep
from experiments import common

ACTIVATIONS = ('relu', 'tanh', 'sigmoid')


def get_config():
  # No augmentation and no weight decay: only the activation differs.
  config = common.digits_config(num_epochs=15, lr=0.02, weight_decay=0.0, warmup_steps=40,
                                train_transform='', log_every_steps=20)
  config.model = 'ablation_cnn'
  config.model_kwargs = dict(widths=(16, 16, 32, 32, 64), kernels=(3, 3), batch_norm=False,
                             downsample='max', activation='relu')
  config.write_plots = False
  return config


def get_sweep():
  return sweep.product(sweep.axis('model_kwargs.activation', list(ACTIVATIONS)),
                       sweep.axis('seed', [0, 1]))
