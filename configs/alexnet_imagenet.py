"""AlexNet on ImageNet (ILSVRC-2012) as in Krizhevsky et al. (2012) and the notes.

    make data DATASET=imagenet2012      # needs the ILSVRC2012 tars in DATA_DIR/downloads/manual
    python launch.py --config=configs/alexnet_imagenet.py --workdir=runs/alexnet

The notes' single-tower AlexNet (227x227x3 input, 62,378,344 parameters, LRN,
overlapping 3x3/2 max pools, dropout 0.5). The paper's recipe: images rescaled to
256 on the shorter side, random 227 crops (the paper says 224; 227 makes the
arithmetic of conv1 work) and horizontal mirrors, PCA colour noise with
alpha ~ N(0, 0.1); SGD with momentum 0.9, weight decay 5e-4, batch 128, lr 0.01
divided by 10 when the validation error stops improving (reduce-on-plateau), ~90
epochs. Evaluation on the center 227 crop.
Expected: ~40.7% top-1 / 18.2% top-5 error for one net (the paper's figures; the
paper averages 10 crops, a single center crop is ~2 points worse).
Time: not run here (ImageNet is 150 GB and needs a manual download). About 6 days on
two GTX 580 GPUs in 2012; hours on a TPU pod slice; impractical on this 2-core CPU.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = 'alexnet'
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.val_split = 'validation[:10000]'   # monitored for the lr reductions
  config.eval_split = 'validation'
  config.train_transform = 'resize(256)|random_crop(227)|flip|pca_noise(0.1)|normalize(imagenet)'
  config.eval_transform = 'resize(256)|center_crop(227)|normalize(imagenet)'
  config.batch_size = 128
  config.num_epochs = 90.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'plateau'     # lr / 10 when val accuracy stalls
  config.optimizer.plateau_factor = 0.1
  config.optimizer.plateau_patience = 2
  config.best_metric = 'val/accuracy'
  config.eval_every_steps = 5000
  config.log_every_steps = 500
  config.checkpoint_every_steps = 5000
  return config
