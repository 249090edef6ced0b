"""Per-layer gradient norms of the activation sweep's nets: where gradients vanish.

    python experiments/activations/grad_norms.py --workdir=runs/activations

For each activation in experiments/activations/config.py, takes one batch of 256
training digits and computes ||dL/dW|| (the Frobenius norm of the loss gradient
with respect to each conv / dense kernel) for the freshly initialised net (seed 0)
and, when the sweep has run, for its trained net (the point's last checkpoint).
Writes grad_norms.png (log scale, layer 1 = the input side) and grad_norms.md into
the workdir and prints the table.

The notes' argument: backpropagation multiplies the gradient by the activation's
derivative at every layer; sigmoid' <= 1/4 (and tanh' <= 1, near 1 only around 0),
so through many sigmoid layers the gradient reaching the first layers shrinks
geometrically, while ReLU passes it unchanged wherever the unit is active.
"""
import argparse
import importlib.util
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from cnn_jax import data as data_lib  # noqa: E402
from cnn_jax import models  # noqa: E402
from cnn_jax.train import steps, sweep  # noqa: E402


def _config_module():
  spec = importlib.util.spec_from_file_location('activations_config',
                                                os.path.join(HERE, 'config.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def batch_of_digits(config, n=256):
  source = data_lib.get_source(config.dataset, config.train_split, config.data_dir)
  examples = [data_lib.to_example(source[i]) for i in range(n)]
  return (jnp.asarray(np.stack([e['image'] for e in examples])),
          jnp.asarray(np.stack([e['label'] for e in examples])))


def _layer_order(name: str):
  """'stage2_conv1' -> (2, 1); the FC layers after every stage ('fc' last)."""
  m = re.match(r'stage(\d+)_conv(\d+)$', name)
  if m:
    return (int(m.group(1)), int(m.group(2)))
  return (10**6, 1 if name == 'fc' else 0)


def layer_grad_norms(model, variables, images, labels):
  """[(layer name, ||dL/dW||)] for every kernel, input side first (mean CE loss,
  train-mode forward pass without dropout randomness)."""
  def loss(params):
    logits = model.apply({**variables, 'params': params}, images, train=False)
    return jnp.mean(steps.cross_entropy(logits, labels))
  grads = jax.grad(loss)(variables['params'])
  out = []
  for name in sorted(variables['params'], key=_layer_order):   # input side first
    kernel = grads[name].get('kernel') if isinstance(grads[name], dict) else None
    if kernel is not None:
      out.append((name, float(jnp.sqrt(jnp.sum(kernel ** 2)))))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='runs/activations')
  args = parser.parse_args()
  module = _config_module()
  base = module.get_config()
  images, labels = batch_of_digits(base)
  results = {}
  for act in module.ACTIVATIONS:
    point = {'model_kwargs.activation': act, 'seed': 0}
    config = sweep.apply_point(base, point)
    model = models.get_model(config.model, num_classes=10, **config.model_kwargs)
    init = model.init(jax.random.PRNGKey(0), images[:1], train=False)
    results[(act, 'init')] = layer_grad_norms(model, init, images, labels)
    name = sweep.point_name(point, sweep.short_keys(module.get_sweep()))
    point_dir = os.path.join(args.workdir, name)
    if os.path.isdir(os.path.join(point_dir, 'checkpoints')):
      from cnn_jax.transfer import load  # pylint: disable=import-outside-toplevel
      trained, _ = load.restore_workdir_variables(point_dir)
      results[(act, 'trained')] = layer_grad_norms(model, trained, images, labels)
  os.makedirs(args.workdir, exist_ok=True)
  write(results, args.workdir)


def write(results, workdir):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  layers = [n for n, _ in next(iter(results.values()))]
  lines = ['| activation | when | ' + ' | '.join(layers) + ' | first / last |',
           '|' + '---|' * (len(layers) + 3)]
  stages = sorted({when for _, when in results})
  fig, axs = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.5), squeeze=False)
  for ax, when in zip(axs[0], stages):
    for (act, w), norms in results.items():
      if w != when:
        continue
      values = [v for _, v in norms]
      ax.semilogy(range(1, len(values) + 1), values, marker='o', label=act)
      lines.append(f'| {act} | {when} | ' + ' | '.join(f'{v:.2e}' for v in values)
                   + f' | {values[0] / values[-1]:.2e} |')
    ax.set(xlabel='layer (1 = input side; the last is the output layer)',
           ylabel='||dL/dW|| (log scale)',
           title=f'Per-layer gradient norms, {"at initialisation" if when == "init" else "after training"}')
    ax.grid(alpha=0.3, which='both')
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'grad_norms.png'), dpi=110)
  plt.close(fig)
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'grad_norms.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  main()
