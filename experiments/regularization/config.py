r"""Regularisation and normalisation, one factor at a time: dropout, BatchNorm, LRN and
weight decay, each added alone to a plain CNN, plus BatchNorm at a 4x learning rate.

    python launch.py --mode=sweep --config=experiments/regularization/config.py \
        --workdir=runs/regularization --sweep_workers=1

7 arms x 3 seeds = 21 runs of 10 epochs on the embedded `digits` (1,293 train / 144
validation / 360 test, 32x32x1, offline); ~15 min on this 2-core CPU under load.
Expected (README.md, mean of 3 seeds): test error 2.7% plain, 1.8% dropout, 1.6%
BatchNorm, 3.1% LRN, 2.0% weight decay, all at (nearly) 0 training error; at lr 0.2
the plain net stays at chance (90%) and the BatchNorm net gets 2.5%.

The same sweep on CIFAR-10, once prepared: experiments/regularization/cifar10.py.
"""
from cnn_jax.train import sweep
from experiments import common

SEEDS = (0, 1, 2)
BASE_LR = 0.05
HIGH_LR = 0.2     # 4x: the plain net does not train at 0.1 or 0.2 (seed 0, measured)

# One row per arm. Every arm sets every swept key, so every row of results.csv has
# every column; the order of the keys is the order of the columns, and the first
# (the learning rate) is the x axis of results.png.
KEYS = ('optimizer.lr', 'model_kwargs.batch_norm', 'model_kwargs.lrn',
        'model_kwargs.dropout_rate', 'optimizer.weight_decay')
ARMS = {
    #                 lr       BN     LRN    dropout  weight decay
    'none':          (BASE_LR, False, False, 0.0, 0.0),
    'dropout':       (BASE_LR, False, False, 0.5, 0.0),    # AlexNet's p = 0.5
    'batch_norm':    (BASE_LR, True, False, 0.0, 0.0),
    'lrn':           (BASE_LR, False, True, 0.0, 0.0),     # AlexNet's k=2, n=5, 1e-4, 0.75
    'weight_decay':  (BASE_LR, False, False, 0.0, 5e-4),   # AlexNet's 5e-4
    'none_high_lr':  (HIGH_LR, False, False, 0.0, 0.0),
    'batch_norm_high_lr': (HIGH_LR, True, False, 0.0, 0.0),
}


def get_config():
  """The plain baseline every arm changes one thing of."""
  # No augmentation: it is a regulariser too, and the point is to let the plain net
  # overfit so that the ones under test have something to act on. 10 epochs = 410
  # steps: the plain net fits the training set.
  config = common.digits_config(num_epochs=10, lr=BASE_LR, weight_decay=0.0, warmup_steps=40,
                                train_transform='', log_every_steps=41)   # 41: an epoch
  config.model = 'ablation_cnn'
  # Three stages of one 3x3 conv (8, 16, 32 channels) and 2x2 max pooling, then a
  # flatten (4x4x32 = 512) into a hidden FC layer of 128: most parameters sit in the
  # FC layers, as in AlexNet, and dropout acts on the hidden FC layer's output.
  config.model_kwargs = dict(widths=(8, 16, 32), kernels=(3,), downsample='max',
                             padding='same', batch_norm=False, lrn=False, dropout_rate=0.0,
                             activation='relu', residual=False, fc_features=128,
                             global_pool=False)
  config.best_metric = 'val/accuracy'
  return config


def get_sweep():
  arms = sweep.zipped(**{key: [values[i] for values in ARMS.values()]
                         for i, key in enumerate(KEYS)})
  return sweep.product(arms, sweep.axis('seed', list(SEEDS)))
