"""Test setup: 8 virtual CPU devices for multi-device tests, float64 on demand."""
import os

# Must happen before jax initialises its backends.
# xla_cpu_use_fusion_emitters=false: XLA's CPU fusion emitters cost 2-3x in compile
# time on the small programs the tests compile (and compiling dominates the suite);
# the loop emitters compute the same values. (test_pooling.fast_jit passes the same
# option per function.)
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same step (the loop tests re-create it for every run they
# resume): a compilation cache shared by the session turns repeats into lookups.
# It lives in a fresh temporary directory, so nothing carries over between sessions.
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='cnn_jax_xla_cache_'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture
def x64():
  """Run one test in float64 (for numerical gradient checks), then restore."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def fast_compile():
  """XLA's optimisation passes dominate compile time for one-off test programs.

  The flag is not part of jit's cache key, so it affects only what is compiled
  while the fixture is active."""
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', old)


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """The embedded digits prepared once into a fresh directory, shared by the modules
  that train on it (they only read it; test_data.py tests the preparation itself)."""
  from cnn_jax.data import prepare_embedded  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp('tfds_digits'))
  prepare_embedded('digits', d)
  return d
