"""VGG-16 with BatchNorm on CIFAR-10 (the usual CIFAR adaptation of Simonyan & Zisserman).

    make data DATASET=cifar10
    python launch.py --config=configs/vgg16_cifar10.py --workdir=runs/vgg16_cifar10

The 13 3x3 conv layers of configuration D with BN; at 32x32 the five pools leave a
1x1x512 map, so the classifier is 512-512-10 (pool_size 1x1, fc_features 512)
instead of ImageNet's 7x7x512-4096-4096. Pad-and-crop and flips, SGD momentum with
weight decay 5e-4 and a cosine schedule over 200 epochs.
Expected: ~93.5% test accuracy (typical for VGG-16-BN with this recipe).
Time: not run here (CIFAR-10 offline); ~15 GFLOP-equivalent MACs per 128-batch step
make it a GPU job: ~1 hour on one modern GPU, days on this 2-core CPU.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = 'vgg16_bn'
  config.model_kwargs = {'pool_size': (1, 1), 'fc_features': 512}
  config.dataset = 'cifar10'
  config.train_split = 'train[:45000]'
  config.val_split = 'train[45000:]'
  config.eval_split = 'test'
  config.train_transform = 'pad_crop(4)|flip|normalize(cifar10)'
  config.eval_transform = 'normalize(cifar10)'
  config.batch_size = 128
  config.num_epochs = 200.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.05
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'cosine'
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
