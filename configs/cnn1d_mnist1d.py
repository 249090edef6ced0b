"""A 1-D CNN on MNIST-1D (embedded, generated offline by the mnist1d package).

    python launch.py --config=configs/cnn1d_mnist1d.py --workdir=runs/cnn1d_mnist1d

MNIST-1D (Greydanus 2020): 4,000 train / 1,000 test sequences of length 40, 10
classes, built so that a CNN's translation equivariance matters. The model is three
width-5 convolutions (32 channels, strides 1, 2, 2) and a linear layer.
Expected: 94.9% test accuracy (seed 0; 2,160 steps, ~90 s of training on this
2-core CPU while other jobs ran, ~105 s in all).
(Greydanus reports ~94% for a CNN of this kind; an MLP gets ~68%.)
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = 'cnn1d'
  config.dataset = 'mnist1d'
  config.train_split = 'train[:90%]'
  config.val_split = 'train[90%:]'
  config.eval_split = 'test'
  config.batch_size = 100
  config.num_epochs = 60.0
  config.optimizer.name = 'adam'
  config.optimizer.lr = 1e-2
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule = 'cosine'    # decays to 0 over the run
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
