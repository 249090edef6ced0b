"""LeNet-5 on MNIST (tfds catalog; prepare it once with `make data DATASET=mnist`).

    make data DATASET=mnist
    python launch.py --config=configs/lenet5_mnist.py --workdir=runs/lenet5_mnist

MNIST's 28x28 digits are zero-padded to 32x32, the input LeNet-5 was designed for
(LeCun et al. 1998 pad the 20x20 digits inside a 32x32 field). 60,000 train
(54,000 used, 6,000 held out for validation) / 10,000 test.
Expected: ~99.0-99.2% test accuracy (LeCun et al. report 0.95% error for LeNet-5
without distortions). Time: not run here (no network to fetch MNIST); from the
lenet5 step rate in benchmarks/train.py, 10 epochs are ~8,400 steps of batch 64,
a few minutes on a 2-core CPU.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = 'lenet5'
  config.dataset = 'mnist'
  config.train_split = 'train[:54000]'
  config.val_split = 'train[54000:]'
  config.eval_split = 'test'
  config.train_transform = 'pad(2)|normalize(mnist)'   # 28x28 -> 32x32 with zeros
  config.eval_transform = 'pad(2)|normalize(mnist)'
  config.batch_size = 64
  config.num_epochs = 10.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.05
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 500
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2000
  return config
