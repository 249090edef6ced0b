r"""The one entry point, and the only file that defines flags.

  python launch.py --config=configs/lenet5_digits.py --workdir=runs/lenet5_digits
  python launch.py --config=configs/lenet5_digits.py --workdir=runs/lenet5_digits --mode=eval
  python launch.py --config=configs/resnet20_cifar10.py --workdir=runs/r20 \
      --config.optimizer.lr=0.05 --config.batch_size=64
  python launch.py --mode=summary --model=alexnet [--input_shape=227,227,3]
  python launch.py --mode=demo
  python launch.py --mode=sweep --config=experiments/depth/config.py --workdir=runs/depth \
      [--sweep_workers=2] [--sweep_index=3]
  python launch.py --mode=sweep_results --config=... --workdir=runs/depth
  python launch.py --mode=visualize --workdir=runs/lenet5_digits [--figures=deconvnet,grad_cam] \
      [--layers=c1,c3] [--num_images=8]

Everything it calls is an importable library function.
"""
import sys

# First, before any library starts a thread: XLA's per-step temporaries then
# reuse mapped heap pages instead of faulting fresh ones every step.
from cnn_jax import host as _host
_host.keep_host_memory()

from absl import app  # noqa: E402
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file with get_config(); override '
    'fields with --config.FIELD=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'summary', 'demo', 'sweep', 'sweep_results', 'visualize'],
    'train: train (or resume) the config in --workdir, then evaluate; '
    'eval: evaluate the latest checkpoint in --workdir; '
    'summary: per-layer table of --model (or the config\'s model); '
    'demo: the notes\' worked examples and gradient checks on our ops; '
    'sweep: run every point of the config file\'s get_sweep() in --workdir/<point> '
    '(finished points are kept, unfinished ones resume), then write results tables; '
    'sweep_results: only write the tables from the points finished so far; '
    'visualize: figures of the run in --workdir (kernels, filters, activation maps, top '
    'patches, deconvnet, saliency, Grad-CAM, receptive fields, ...) into --workdir/figures.')
_SWEEP_WORKERS = flags.DEFINE_integer(
    'sweep_workers', 1, '--mode=sweep: points run in parallel, each in its own process.')
_SWEEP_INDEX = flags.DEFINE_integer(
    'sweep_index', None, '--mode=sweep: run only point i (0-based), e.g. from a SLURM '
    'array task; collect the results later with --mode=sweep_results.')
_MODEL = flags.DEFINE_string(
    'model', None, 'Registered model name for --mode=summary, or for --mode=visualize '
    'without a trained run (random weights).')
_INPUT_SHAPE = flags.DEFINE_string(
    'input_shape', None, 'One example\'s shape for --mode=summary, e.g. 227,227,3 '
    '(default: the shape the model was published for).')
_FIGURES = flags.DEFINE_string(
    'figures', 'all', '--mode=visualize: comma-separated figures (kernels, filters, '
    'activation_maps, top_patches, deconvnet, saliency, guided_backprop, grad_cam, '
    'receptive_field, curves, confusion) or all.')
_LAYERS = flags.DEFINE_list(
    'layers', None, '--mode=visualize: layer names (or unique suffixes, see --mode=summary); '
    'default: the first, a middle and the last conv layer.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, '--mode=visualize: images per figure.')
_CHECKPOINT = flags.DEFINE_enum(
    'checkpoint', 'best_or_latest', ['best', 'latest', 'best_or_latest'],
    '--mode=visualize: which checkpoint of the run to draw (best_or_latest: the best by '
    'the config\'s best_metric where the run kept one).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Library INFO lines (orbax logs every save) drown the progress bar;
    # --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  mode = _MODE.value
  if mode == 'demo':
    from cnn_jax import demo
    print(demo.run())
    return
  if mode == 'summary':
    from cnn_jax.analysis import tables
    config = _CONFIG.value
    name = _MODEL.value or (config.model if config is not None else None)
    if name is None:
      raise app.UsageError('--mode=summary needs --model=NAME or --config=FILE.')
    shape = tables.parse_shape(_INPUT_SHAPE.value) if _INPUT_SHAPE.value else None
    tables.model_summary(name, shape)
    return
  if mode == 'visualize':
    from cnn_jax.analysis import tables, visualize
    if _WORKDIR.value is None:
      raise app.UsageError('--mode=visualize needs --workdir=DIR (a trained run, or where '
                           'to write the figures).')
    try:
      visualize.visualize(
          _WORKDIR.value, figures=visualize.parse_figures(_FIGURES.value),
          layers=_LAYERS.value, model=_MODEL.value, num_images=_NUM_IMAGES.value,
          input_shape=tables.parse_shape(_INPUT_SHAPE.value) if _INPUT_SHAPE.value else None,
          checkpoint=_CHECKPOINT.value)
    except ValueError as e:
      print(f'ERROR: {e}', file=sys.stderr)
      sys.exit(2)
    return
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError(f'--mode={mode} needs --config=configs/NAME.py and --workdir=DIR.')
  from cnn_jax.train import loop
  try:
    if mode in ('sweep', 'sweep_results'):
      _sweep(mode)
    elif mode == 'train':
      result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      if result.get('status') == 'stopped':
        sys.exit(0)
    else:
      loop.evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, loop.NonFiniteLossError, _sweep_error()) as e:
    # Config, data and checkpoint problems are the user's to fix: one clear line,
    # not a traceback.
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(2)


def _sweep_error():
  from cnn_jax.train import sweep
  return sweep.SweepError


def _sweep(mode):
  import importlib.util
  import os
  from cnn_jax.train import sweep
  # 'file.py:arg' (a config file with an argument) -> the file.
  path = config_flags.get_config_filename(flags.FLAGS['config']).split(':', 1)[0]
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  points = sweep.load_sweep(module)
  if mode == 'sweep_results':
    sweep.aggregate(_WORKDIR.value, sweep.plan(_CONFIG.value, points))
    return
  # A child runs one point with this very command line (flags and overrides alike).
  child = [sys.executable, os.path.abspath(__file__)] + [
      a for a in sys.argv[1:] if not a.startswith(('--sweep_workers', '--sweep_index'))]
  sweep.run_sweep(_CONFIG.value, points, _WORKDIR.value, workers=_SWEEP_WORKERS.value,
                  index=_SWEEP_INDEX.value, child_argv=child)


if __name__ == '__main__':
  app.run(main)
