r"""Zero padding from 'valid' to 'same' and in between, at equal weights.

    python launch.py --mode=sweep --config=experiments/padding/config.py \
        --workdir=runs/padding --sweep_workers=1

`model_kwargs.padding=p` puts p zeros on each side of every k x k conv, from 0
('valid': every conv trims k - 1 pixels) to k // 2 ('same': maps keep their size).
Two nets, each the deepest of its kind that still fits a 32x32 digit with p = 0:
three stages of one 3x3 conv (widths 16, 32, 64; p = 0, 1) and two stages of one
5x5 conv (widths 16, 32; p = 0, 1, 2 - the amount in between that the notes
expect to be best). Every conv is followed by BatchNorm and ReLU, every stage by
a 2x2 max pool; global average pooling before the classifier makes the parameter
count independent of the map sizes, so the paddings of one net train the same
weights. (2 + 3 paddings) x 3 seeds = 15 runs of 12 epochs.
Measured (README.md): 3x3 net valid 1.48% vs same 0.46% test error; 5x5 net
p=0 1.20%, p=1 1.11%, same 2.31% (the in-between amount best, as the notes say).
12 min 10 s on the 2-core CPU.
"""
from cnn_jax.train import sweep
from experiments import common

# kernel size -> widths: the most stages of one k x k conv that a 32x32 input still
# fits with p = 0 (one more stage would leave maps too small to pool).
NETS = {3: (16, 32, 64), 5: (16, 32)}
SEEDS = [0, 1, 2]


def get_config():
  config = common.digits_config()
  config.model = 'ablation_cnn'
  config.model_kwargs = dict(
      kernels=(3,),
      widths=(16, 32, 64),
      downsample='max',
      padding=1,            # an int: the sweep sets 0 .. k // 2
      batch_norm=True,
      global_pool=True)     # keeps the classifier's size independent of the padding
  return config


def get_sweep():
  # padding first: it is the x axis of results.png, one line per net.
  return sweep.concat(*[
      sweep.product(sweep.axis('model_kwargs.padding', list(range(k // 2 + 1))),
                    sweep.zipped(**{'model_kwargs.kernels': [(k,)],
                                    'model_kwargs.widths': [widths]}),
                    sweep.axis('seed', SEEDS))
      for k, widths in NETS.items()])
