"""ResNet-20 on CIFAR-10, the recipe of He et al. (2016), section 4.2.

    make data DATASET=cifar10
    python launch.py --config=configs/resnet20_cifar10.py --workdir=runs/resnet20_cifar10

The 6n+2 CIFAR ResNet with n=3 (0.27 M parameters, option A identity shortcuts):
SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k
iterations, 64k iterations in all; 4-pixel pad-and-crop and horizontal flips; a
45k/5k train/validation split as in the paper.
Expected: 8.75% test error (the paper's ResNet-20 figure), i.e. ~91.3% accuracy.
Time: not run here (CIFAR-10 cannot be downloaded offline); at the ResNet-20 step
rate measured by benchmarks/train.py on this 2-core CPU, 64k steps of batch 128 take
many hours. On one GPU it is ~30 minutes.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = 'resnet20'
  config.dataset = 'cifar10'
  config.train_split = 'train[:45000]'
  config.val_split = 'train[45000:]'
  config.eval_split = 'test'
  config.train_transform = 'pad_crop(4)|flip|normalize(cifar10)'
  config.eval_transform = 'normalize(cifar10)'
  config.batch_size = 128
  config.num_train_steps = 64000
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'step'
  config.optimizer.boundaries = (32000, 48000)
  config.optimizer.decay_factor = 0.1
  config.eval_every_steps = 2000
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2000
  return config
