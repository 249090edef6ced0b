r"""MNIST-1D: logistic regression vs MLP vs a 1-D CNN, 3 seeds each.

    python launch.py --mode=sweep --config=experiments/mnist1d/config.py \
        --workdir=runs/mnist1d --sweep_workers=1

Greydanus (2020) built MNIST-1D so that the three model classes come apart: he
reports 32% test accuracy for logistic regression, 68% for an MLP and 94% for a CNN.
This sweep trains our three (`logistic_regression`, `mlp`, `cnn1d`) on the offline
data (4,000 generated train / 1,000 test sequences of length 40; 3,600 train here, 400
held out for the validation curves) with one recipe for all: the paper's Adam, lr
1e-2, batch 100, no weight decay, here with a cosine decay over 40 epochs (1,440
steps). Same data, same steps, same optimizer: the only difference is the model.
Expected (README.md): 32.2%, 63.5% and 94.1% test accuracy (3 seeds); 9 runs,
~14 min on this 2-core CPU under load.
"""
from cnn_jax.train import sweep
from cnn_jax.train.config import default_config

MODELS = ('logistic_regression', 'mlp', 'cnn1d')
SEEDS = (0, 1, 2)


def get_config():
  config = default_config()
  config.model = 'cnn1d'              # the sweep sets it per point
  config.dataset = 'mnist1d'
  config.train_split = 'train[:90%]'  # 3,600 sequences
  config.val_split = 'train[90%:]'    # 400, for the validation curves only
  config.eval_split = 'test'          # 1,000; the headline number
  config.batch_size = 100
  config.num_epochs = 40.0
  # Greydanus's recipe for every model: Adam at 1e-2, batch 100, no weight decay.
  config.optimizer.name = 'adam'
  config.optimizer.lr = 1e-2
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule = 'cosine'   # decays to 0 over the run
  config.log_every_steps = 36            # one epoch
  config.checkpoint_every_steps = 720
  config.progress_bar = False
  config.print_summary = False
  return config


def get_sweep():
  return sweep.product(sweep.axis('model', list(MODELS)), sweep.axis('seed', list(SEEDS)))
