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
from cnn_jax.train.config import default_config

ACTIVATIONS = ('relu', 'tanh', 'sigmoid')


def get_config():
  config = default_config()
  config.model = 'ablation_cnn'
  config.model_kwargs = dict(widths=(16, 16, 32, 32, 64), kernels=(3, 3), batch_norm=False,
                             downsample='max', activation='relu')
  config.dataset = 'digits'
  config.train_split = 'train[:90%]'
  config.val_split = 'train[90%:]'
  config.eval_split = 'test'
  config.batch_size = 32
  config.num_epochs = 15.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.02
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 40
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000
  config.progress_bar = False
  config.print_summary = False
  config.write_plots = False
  return config


def get_sweep():
  return sweep.product(sweep.axis('model_kwargs.activation', list(ACTIVATIONS)),
                       sweep.axis('seed', [0, 1]))
