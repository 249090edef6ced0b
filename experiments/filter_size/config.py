r"""Filter size at equal receptive field: one 7x7 vs three 3x3, one 5x5 vs two 3x3.

    python launch.py --mode=sweep --config=experiments/filter_size/config.py \
        --workdir=runs/filter_size --sweep_workers=1

Every stage of `ablation_cnn` is either one k x k conv or a stack of 3x3 convs
with the same receptive field (k = 7: three, k = 5: two), at the same widths, so
the notes' 3 * 3^2 C^2 vs 7^2 C^2 weights per C->C stage can be read off the
table's num_params next to flops_per_example and test error. 4 stacks x 3 seeds
= 12 runs of 12 epochs on the embedded digits.
Measured (README.md): all four at 0.4-0.7% test error, inside the seed spread;
19,034 vs 26,138 and 12,026 vs 13,466 parameters, but more FLOPs for the stacks,
whose first stage reads one channel at 32x32. 26 min (11 min of CPU) on the
2-core CPU while other jobs shared it.
"""
from cnn_jax.train import sweep
from experiments import common

KERNELS = [(7,), (3, 3, 3), (5,), (3, 3)]
SEEDS = [0, 1, 2]


def get_config():
  config = common.digits_config()
  config.model = 'ablation_cnn'
  config.model_kwargs = dict(
      kernels=(3, 3, 3),
      # One width throughout: every conv after the first sees C channels in and out,
      # which is the case the notes' parameter count is for.
      widths=(16, 16, 16),
      downsample='max',
      padding='same',        # 'valid' would shrink a 7x7 stage's maps by 6 pixels
      batch_norm=True)
  return config


def get_sweep():
  return sweep.product(sweep.axis('model_kwargs.kernels', KERNELS),
                       sweep.axis('seed', SEEDS))
