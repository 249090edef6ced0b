"""One run, four layouts: 1 device, 8 devices under jit, 8 under pmap, 2 processes x 4.

The model has BatchNorm and dropout (densenet_tiny with dropout_rate), so the test
covers global BN statistics (cross-replica under pmap) and dropout masks drawn by
global example index. Tolerance: parameters agree to 2e-5 (absolute, after 4 SGD
steps); the layouts differ only in the order XLA sums partial results across devices.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn_jax.train import checkpoint as ckpt_lib
from cnn_jax.train import config as config_lib
from cnn_jax.train import loop

ATOL = 2e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(digits_data_dir):
  return digits_data_dir


def parallel_config(data_dir, **overrides):
  c = config_lib.default_config()
  c.model = 'densenet_tiny'
  c.model_kwargs = {'dropout_rate': 0.2}
  c.dataset = 'digits'
  c.data_dir = data_dir
  c.batch_size = 16
  c.eval_batch_size = 128
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.best_metric = ''
  c.train_transform = 'flip'
  c.optimizer.name = 'momentum'
  c.optimizer.lr = 0.1
  c.progress_bar = False
  c.print_summary = False
  c.write_plots = False
  return config_lib.from_dict(overrides, c)


def final_params(workdir):
  config = json.load(open(os.path.join(workdir, 'config.json')))
  config['parallelism'], config['num_devices'], config['distributed'] = 'jit', 1, False
  for key in ('coordinator_address', 'num_processes', 'process_id'):
    config[key] = None
  run = loop.Run(config, workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  state, meta = ckpt.restore_latest(loop._host_target(run.abstract_state()))
  ckpt.close()
  assert meta['step'] == 4
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path({'p': state.params, 'bn': state.batch_stats})}


def assert_close(a, b):
  assert a.keys() == b.keys()
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert worst <= ATOL, worst
  return worst


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('one_device'))
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)   # compile time dominates
  try:
    loop.train_and_evaluate(parallel_config(data_dir, num_devices=1), workdir)
  finally:
    jax.config.update('jax_disable_most_optimizations', old)
  return final_params(workdir)


@pytest.mark.parametrize('parallelism', ['jit', 'pmap'])
def test_eight_devices_match_one(data_dir, reference, tmp_path, parallelism, fast_compile):
  assert jax.device_count() == 8
  workdir = str(tmp_path / parallelism)
  loop.train_and_evaluate(parallel_config(data_dir, parallelism=parallelism), workdir)
  got = final_params(workdir)
  assert_close(got, reference)
  # Training changed the parameters (the comparison is not of two initialisations).
  init = loop.Run(parallel_config(data_dir, num_devices=1), workdir).initial_state()
  k = next(iter(got))
  assert not np.allclose(got[k], np.asarray(jax.tree_util.tree_leaves(init.params)[0]))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(data_dir, reference, tmp_path):
  workdir = str(tmp_path / 'two_proc')
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4 '
             '--xla_cpu_use_fusion_emitters=false',   # as tests/conftest.py
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  procs = []
  for pid in range(2):
    overrides = dict(distributed=True, coordinator_address=f'127.0.0.1:{port}',
                     num_processes=2, process_id=pid, parallelism='jit')
    code = ('import sys, json; sys.path.insert(0, %r)\n'
            'import jax; jax.config.update("jax_disable_most_optimizations", True)\n'
            'from tests.test_parallel import parallel_config\n'
            'from cnn_jax.train import loop\n'
            'loop.train_and_evaluate(parallel_config(%r, **json.loads(%r)), %r)\n'
            % (REPO, data_dir, json.dumps(overrides), workdir))
    procs.append(subprocess.Popen([sys.executable, '-c', code], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert os.path.exists(os.path.join(workdir, 'final_metrics.json'))
  assert_close(final_params(workdir), reference)
