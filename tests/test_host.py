"""cnn_jax.host.keep_host_memory: XLA's per-call temporaries stop faulting
fresh pages in every call (glibc), checked by counting page faults (not time)
in fresh processes, with and without it."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import sys
if sys.argv[1] == 'keep':   # first thing, as launch.py does
  from cnn_jax import host
  assert host.keep_host_memory()
import resource
import numpy as np
import jax, jax.numpy as jnp
x = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 4096)), jnp.float32)
def f(x):   # ~130 MB of temporaries: past glibc's mmap threshold and a thread arena
  a, b = jnp.cumsum(x, axis=0), jnp.cumsum(x, axis=1)
  c = x[::-1] * 2 + a
  return jnp.sum(a * b) + jnp.sum(b * c) + jnp.sum(a * c)
c = jax.jit(f).lower(x).compile()
pages = c.memory_analysis().temp_size_in_bytes // 4096
for _ in range(12):   # kept, the first calls still grow the heap (see below)
  c(x).block_until_ready()
faults = []
for _ in range(9):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  c(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(sorted(faults)[len(faults) // 2], pages)
'''


def _faults(mode):
  """(median page faults of one call, pages of the call's temporaries)."""
  env = {**os.environ, 'PYTHONPATH': REPO, 'XLA_FLAGS': ''}
  env.pop('CNN_JAX_KEEP_HOST_MEMORY', None)
  out = subprocess.run([sys.executable, '-c', _SCRIPT, mode], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  faults, pages = out.stdout.split()[-2:]
  return float(faults), int(pages)


def test_keep_host_memory_stops_per_call_page_faults():
  from cnn_jax import host
  if host._glibc() is None:
    pytest.skip('not glibc: keep_host_memory does nothing here')
  default, pages = _faults('default')
  if default < 0.5 * pages:
    pytest.skip(f'this jaxlib/libc already reuses its temporaries ({default:.0f} faults '
                f'per call for {pages} pages): nothing to keep')
  # Kept, the first few calls still map fresh temporaries now and then, until
  # the heap holds about two of them; after that calls fault nothing. The
  # median of 9 calls after 12 is that settled state.
  kept, _ = _faults('keep')
  assert kept < 0.5 * pages, (kept, default, pages)


def test_keep_host_memory_can_be_switched_off(monkeypatch):
  from cnn_jax import host
  monkeypatch.setattr(host, '_applied', False)
  monkeypatch.setenv('CNN_JAX_KEEP_HOST_MEMORY', '0')
  assert host.keep_host_memory() is False


def test_it_warns_when_called_after_threads_started():
  """In this (pytest) process numpy and jax already run threads: the arena limit
  may not take, and the call says so instead of failing silently."""
  from cnn_jax import host
  if host._glibc() is None or host._other_threads() == 0:
    pytest.skip('not glibc, or no other threads to detect')
  env = {**os.environ, 'PYTHONPATH': REPO}
  env.pop('CNN_JAX_KEEP_HOST_MEMORY', None)
  code = ('import warnings, numpy, jax; jax.numpy.zeros(3).block_until_ready()\n'
          'from cnn_jax import host\n'
          'with warnings.catch_warnings(record=True) as w:\n'
          '  warnings.simplefilter("always"); host.keep_host_memory()\n'
          'print(any("other thread" in str(x.message) for x in w))')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == 'True'
