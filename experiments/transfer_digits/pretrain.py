r"""Pretraining for the transfer experiment: a small CIFAR ResNet on digits 0-4.

    python launch.py --config=experiments/transfer_digits/pretrain.py \
        --workdir=runs/transfer_digits/pretrain

ResNet-14 (CIFAR-style, 3 stages of 2 basic blocks at 16/32/64 filters, 172k
parameters) on the classes 0-4 of the embedded `digits` data (649 training digits,
32x32x1; 72 validation, 180 test). experiments/transfer_digits/run.py runs this
first, then the transfer arms.
Expected: 99.4% test accuracy on digits 0-4 (179/180), 200 steps of batch 32,
~70 s of training and ~90 s in all on this 2-core CPU.
"""
from cnn_jax.train.config import default_config

# The registry's CIFAR ResNet entry with its depth overridden: 6n + 2 with n = 2
# blocks per stage (ResNet-20 has 3), small enough that pretraining and the 12
# transfer runs fit in ~12 minutes on 2 CPU cores.
MODEL = 'resnet20'
MODEL_KWARGS = {'depth': 14}
SOURCE_CLASSES = '0-4'
TARGET_CLASSES = '5-9'
TRAIN_SPLIT = 'train[:90%]'
VAL_SPLIT = 'train[90%:]'
EVAL_SPLIT = 'test'
AUGMENT = 'rotate(10)|zoom(0.9,1.1)'


def common(config):
  """The model and data keys shared by pretraining and every transfer arm."""
  config.model = MODEL
  config.model_kwargs = dict(MODEL_KWARGS)
  config.dataset = 'digits'
  config.train_split = TRAIN_SPLIT
  config.val_split = VAL_SPLIT
  config.eval_split = EVAL_SPLIT
  # One device: batches of 10 (the transfer arms) do not split over 8, and 50
  # images gain nothing from data parallelism.
  config.num_devices = 1
  config.progress_bar = False
  config.print_summary = False
  config.write_plots = False
  return config


def get_config():
  config = common(default_config())
  config.classes = SOURCE_CLASSES
  config.train_transform = AUGMENT
  config.batch_size = 32
  config.num_epochs = 10.0
  config.seed = 0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 20
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000
  return config
