"""The one entry point, and the only file that defines flags.

  python launch.py --mode=demo
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
_MODE = flags.DEFINE_enum('mode', 'demo', ['demo'],
                          'demo: the notes\' worked examples and gradient checks on our ops.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _MODE.value == 'demo':
    from cnn_jax import demo
    print(demo.run())


if __name__ == '__main__':
  app.run(main)
