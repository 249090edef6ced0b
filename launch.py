"""The one entry point, and the only file that defines flags.

  python launch.py --mode=demo
  python launch.py --mode=summary --model=alexnet [--input_shape=227,227,3]
  python launch.py --config=configs/NAME.py --workdir=DIR --mode=train

Everything it calls is an importable library function.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file with get_config(); override '
    'fields with --config.FIELD=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum(
    'mode', 'demo', ['demo', 'summary'],
    'demo: the notes\' worked examples and gradient checks on our ops; '
    'summary: per-layer table of --model (or the config\'s model).')
_MODEL = flags.DEFINE_string('model', None, 'Registered model name for --mode=summary.')
_INPUT_SHAPE = flags.DEFINE_string(
    'input_shape', None, 'One example\'s shape for --mode=summary, e.g. 227,227,3 '
    '(default: the shape the model was published for).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _MODE.value == 'demo':
    from cnn_jax import demo
    print(demo.run())
  elif _MODE.value == 'summary':
    from cnn_jax.analysis import tables
    config = _CONFIG.value
    name = _MODEL.value or (config.model if config is not None else None)
    if name is None:
      raise app.UsageError('--mode=summary needs --model=NAME or --config=FILE.')
    shape = tables.parse_shape(_INPUT_SHAPE.value) if _INPUT_SHAPE.value else None
    tables.model_summary(name, shape)


if __name__ == '__main__':
  app.run(main)
