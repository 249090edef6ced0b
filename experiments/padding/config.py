r"""Valid vs same padding, in a shallow and a deeper-per-stage net.

    python launch.py --mode=sweep --config=experiments/padding/config.py \
        --workdir=runs/padding --sweep_workers=1

'same' pads every k x k conv with k // 2 zeros so maps keep their size; 'valid'
pads nothing, so every 3x3 conv trims 2 pixels. Two nets fit both paddings on the
32x32 digits: three stages of one 3x3 conv (widths 16, 32, 64; final maps 4x4
same vs 2x2 valid) and two stages of two 3x3 convs (widths 16, 32; 8x8 vs 5x5).
Global average pooling before the classifier makes the parameter count
independent of the final map size, so each pair differs in padding only: same
weights, same layers, same training; 'valid' costs fewer FLOPs. 2 paddings x 2 nets
x 3 seeds = 12 runs of 12 epochs.
Measured (README.md): 'same' 0.46% / 0.65% test error vs 'valid' 1.48% / 1.20%
(shallow / deeper net). 23 min (9 min of CPU) on the 2-core CPU while other jobs
shared it.
"""
from cnn_jax.train import sweep
from cnn_jax.train.config import default_config

PADDING = ['same', 'valid']
# (kernels per stage, widths): the most stages each net can have and still fit a
# 'valid' 32x32 input (one more stage would leave maps too small to pool).
NETS = [((3,), (16, 32, 64)), ((3, 3), (16, 32))]
SEEDS = [0, 1, 2]


def get_config():
  config = default_config()
  config.model = 'ablation_cnn'
  config.model_kwargs = dict(
      kernels=(3,),
      widths=(16, 32, 64),
      downsample='max',
      padding='same',
      batch_norm=True,
      global_pool=True)     # keeps the classifier's size independent of the padding
  config.dataset = 'digits'
  config.train_split = 'train[:90%]'
  config.val_split = 'train[90%:]'
  config.eval_split = 'test'
  config.train_transform = 'rotate(10)|zoom(0.9,1.1)'
  config.batch_size = 32
  config.num_epochs = 12.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 50
  config.log_every_steps = 40
  config.checkpoint_every_steps = 1000   # one save, at the end
  config.keep_checkpoints = 1
  config.progress_bar = False
  config.print_summary = False
  return config


def get_sweep():
  nets = sweep.zipped(**{'model_kwargs.kernels': [k for k, _ in NETS],
                         'model_kwargs.widths': [w for _, w in NETS]})
  return sweep.product(sweep.axis('model_kwargs.padding', PADDING), nets,
                       sweep.axis('seed', SEEDS))
