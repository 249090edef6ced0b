r"""The regularisation sweep on CIFAR-10: the same 7 arms x 3 seeds, sized for it.

    make data DATASET=cifar10
    python launch.py --mode=sweep --config=experiments/regularization/cifar10.py \
        --workdir=runs/regularization_cifar10

Changes from config.py only what CIFAR-10 needs: its 45k/5k/10k splits, inputs
normalised with the published channel statistics (still no augmentation), stages of
32/64/128 channels, batch 128 and 30 epochs (10.5k steps). Not run here (CIFAR-10
cannot be downloaded offline); HIGH_LR was chosen on digits and may need a new scan.
"""
from experiments.regularization import config as digits

get_sweep = digits.get_sweep


def get_config():
  config = digits.get_config()
  config.dataset = 'cifar10'
  config.train_split = 'train[:45000]'
  config.val_split = 'train[45000:]'
  config.eval_split = 'test'
  config.train_transform = 'normalize(cifar10)'
  config.eval_transform = 'normalize(cifar10)'
  config.model_kwargs.widths = (32, 64, 128)
  config.batch_size = 128
  config.num_epochs = 30.0
  config.optimizer.warmup_steps = 352   # one epoch of 45k at batch 128
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
