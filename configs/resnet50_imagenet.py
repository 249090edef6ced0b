"""ResNet-50 on ImageNet: the standard (Goyal et al. 2017 / torchvision) recipe.

    make data DATASET=imagenet2012
    python launch.py --config=configs/resnet50_imagenet.py --workdir=runs/resnet50

torchvision-layout ResNet-50 (25,557,032 parameters). SGD momentum 0.9, Nesterov
off, weight decay 1e-4 (not on BN or biases), batch 256 with lr 0.1 (scale linearly
with the batch: --config.batch_size=1024 --config.optimizer.lr=0.4), 5 warmup
epochs then cosine decay over 90 epochs, label smoothing 0.1; random crops with
flips, 224x224; evaluation at resize 256 / center crop 224.
Expected: ~76-77% top-1 accuracy (torchvision's ResNet-50 v1: 76.13%).
Time: not run here (ImageNet offline). ~1 hour on a TPU v3-128 pod slice; a few
days on 8 GPUs; impractical on this 2-core CPU. parallelism='jit' shards the
batch over every device of every host (set distributed=True on a pod).
"""
from cnn_jax.train.config import default_config

_EPOCH = 1281167 // 256   # steps per epoch at batch 256


def get_config():
  config = default_config()
  config.model = 'resnet50'
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.val_split = 'validation[:10000]'
  config.eval_split = 'validation'
  # A simplified random-resized-crop: random rescale via zoom, then a 224 crop.
  config.train_transform = 'resize(256)|zoom(0.8,1.25)|random_crop(224)|flip|normalize(imagenet)'
  config.eval_transform = 'resize(256)|center_crop(224)|normalize(imagenet)'
  config.batch_size = 256
  config.num_epochs = 90.0
  config.optimizer.name = 'nesterov'
  config.optimizer.lr = 0.1
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 5 * _EPOCH
  config.loss.label_smoothing = 0.1
  config.eval_every_steps = 5 * _EPOCH
  config.log_every_steps = 500
  config.checkpoint_every_steps = 2 * _EPOCH
  return config
