"""How much does LRN actually normalise in the sweep's LRN nets?

    python experiments/regularization/lrn_denominator.py --workdir=runs/regularization

AlexNet's LRN divides each activation by d = (k + alpha * sum of a^2 over n = 5
neighbouring channels)^beta with k=2, alpha=1e-4, beta=0.75. The neighbours inhibit
only when alpha * sum a^2 is comparable to k, i.e. activations of order
sqrt(k / (n * alpha)) ~ 60. For every trained LRN point of the sweep this prints, per
stage, the largest ReLU activation entering LRN on 256 test digits and how far d
strays from the constant k^beta = 1.68 (max and mean of d / k^beta): when that
ratio is ~1, LRN is a fixed gain of k^-beta = 0.59 per stage, not a normalisation.
"""
import argparse
import glob
import os
import sys

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cnn_jax import data as data_lib  # noqa: E402
from cnn_jax import models  # noqa: E402
from cnn_jax.nn import LRN  # noqa: E402
from cnn_jax.transfer import load  # noqa: E402


def denominator_ratios(model, variables, images, lrn=LRN()):
  """[(stage, max activation, max d / k^beta, mean d / k^beta)] for each stage's LRN."""
  _, inter = model.apply(variables, images, train=False, capture_intermediates=True,
                         mutable=['intermediates'])
  out = []
  for i in range(1, len(model.widths) + 1):
    last = f'stage{i}_conv{len(model.kernels)}'
    y = inter['intermediates'][last]['__call__'][0]
    if f'stage{i}_bn{len(model.kernels)}' in inter['intermediates']:
      y = inter['intermediates'][f'stage{i}_bn{len(model.kernels)}']['__call__'][0]
    a = jax.nn.relu(y)   # what LRN receives (no residual: the sweep's nets have none)
    half = lrn.size // 2
    sq = jnp.pad(a ** 2, [(0, 0)] * (a.ndim - 1) + [(half, half)])
    window = sum(sq[..., j:j + a.shape[-1]] for j in range(lrn.size))
    ratio = ((lrn.k + lrn.alpha * window) / lrn.k) ** lrn.beta
    out.append((i, float(a.max()), float(ratio.max()), float(ratio.mean())))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/regularization')
  parser.add_argument('--examples', type=int, default=256)
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)   # orbax: 'read_only=True, setting save_interval...'
  point_dirs = sorted(glob.glob(os.path.join(args.workdir, '*lrn=True*')))
  if not point_dirs:
    sys.exit(f'no LRN points in {args.workdir}: run the sweep first (see config.py).')
  print('| point | stage | max activation | max d / k^beta | mean d / k^beta |')
  print('|---|---|---|---|---|')
  for point_dir in point_dirs:
    variables, info = load.restore_workdir_variables(point_dir)
    model = models.get_model(info['model'], num_classes=info['num_classes'],
                             **info['model_kwargs'])
    source = data_lib.get_source('digits', 'test')
    n = min(args.examples, len(source))
    images = jnp.asarray(np.stack([data_lib.to_example(source[i])['image']
                                   for i in range(n)]))
    variables = {k: v for k, v in variables.items() if v}
    for stage, amax, rmax, rmean in denominator_ratios(model, variables, images):
      print(f'| {os.path.basename(point_dir)} | {stage} | {amax:.2f} | {rmax:.5f} | '
            f'{rmean:.6f} |')


if __name__ == '__main__':
  main()
