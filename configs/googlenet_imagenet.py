"""GoogLeNet (Inception v1) on ImageNet with its two auxiliary classifiers.

    make data DATASET=imagenet2012
    python launch.py --config=configs/googlenet_imagenet.py --workdir=runs/googlenet

Szegedy et al. (2015): 22 layers, 9 inception modules, ~6.8 M parameters (13 M
with the auxiliary heads, which are only used in training, their losses weighted
0.3), dropout 0.4 before the classifier. The paper trained asynchronously with SGD
momentum 0.9 and lr decreased 4% every 8 epochs; here: synchronous SGD, the same 4%
step decay per 8 epochs expressed as a step schedule.
Expected: ~10.1% top-5 error for one model with one crop (paper, Table 3 reports
6.67% for an ensemble of 7 with 144 crops).
Time: not run here (ImageNet offline). Days on a few GPUs.
"""
from cnn_jax.train.config import default_config

_EPOCH = 1281167 // 256


def get_config():
  config = default_config()
  config.model = 'googlenet'
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.val_split = 'validation[:10000]'
  config.eval_split = 'validation'
  config.train_transform = 'resize(256)|zoom(0.8,1.25)|random_crop(224)|flip|normalize(imagenet)'
  config.eval_transform = 'resize(256)|center_crop(224)|normalize(imagenet)'
  config.batch_size = 256
  config.num_epochs = 120.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.1
  config.optimizer.weight_decay = 2e-4
  config.optimizer.schedule = 'step'
  # lr x0.96 every 8 epochs, as a piecewise-constant schedule (cumulative factors).
  config.optimizer.boundaries = tuple(8 * k * _EPOCH for k in range(1, 15))
  config.optimizer.decay_factor = 0.96
  config.loss.aux_weight = 0.3
  config.eval_every_steps = 4 * _EPOCH
  config.log_every_steps = 500
  config.checkpoint_every_steps = 2 * _EPOCH
  return config
