"""Keep freed host memory in the process (glibc), so a CPU step does not re-fault it.

XLA's CPU runtime allocates each executable's temporaries as one buffer per
call: 195 MB for the resnet20 training step at batch 128. With glibc's default
settings a buffer that large is a fresh mmap, unmapped again at the end of the
step, so every step takes ~50,000 page faults and the kernel zeroes 195 MB:
~130 ms of system time per step, and the step ran ~1.2x slower than with the
memory kept (benchmarks/README.md, "Session 8").

`keep_host_memory()` sets three glibc malloc options through `mallopt`:

* M_ARENA_MAX = 1: every thread allocates from the main arena. XLA allocates
  the buffer on its own execution thread, and a thread arena cannot grow past
  64 MB, so glibc would fall back to mmap whatever M_MMAP_MAX says;
* M_MMAP_MAX = 0: no allocation is served by mmap, so freed memory goes back
  to the heap and the next step reuses it, pages already mapped;
* M_TRIM_THRESHOLD = 2 GiB - 1: the heap's free top is returned to the OS only
  past that size.

Effect: the process keeps freed memory instead of handing it back between
steps, as PyTorch's and JAX's GPU allocators do with device memory. The cost
is resident memory: the first steps still map fresh temporaries now and then,
until the heap holds about two sets of them, and that stays. resnet20 at batch
128: RSS settles at 1.05 GB after ~10 steps (0.61-0.69 GB with glibc's
defaults), and from then on its steps fault nothing in. Switch it off
(below) where memory is tighter than time.

When to call it: first thing in the process, before numpy, jax or torch are
imported. glibc fixes its arena limit when a second thread first allocates,
and importing numpy starts OpenBLAS's threads; called later, the arena limit
is ignored and XLA's temporaries stay mmapped (it warns then). `launch.py`
and the benchmarks call it on their first lines; this module imports nothing
heavy for that reason. Without code, the same settings are
GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
in the environment. `CNN_JAX_KEEP_HOST_MEMORY=0` switches it off. Elsewhere
than Linux with glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import warnings

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2 ** 31 - 1

_applied = False


def _glibc():
  """The process's C library when it is glibc, else None."""
  try:
    libc = ctypes.CDLL(None)
    version = libc.gnu_get_libc_version
  except (OSError, AttributeError):
    return None
  version.restype = ctypes.c_char_p
  if not version():
    return None
  return libc


def _other_threads() -> int:
  """Threads of this process besides the calling one (Linux), 0 if unknown."""
  try:
    return max(0, len(os.listdir('/proc/self/task')) - 1)
  except OSError:
    return 0


def keep_host_memory() -> bool:
  """Apply the settings above; True if they are in effect (now or before)."""
  global _applied
  if _applied:
    return True
  if os.environ.get('CNN_JAX_KEEP_HOST_MEMORY', '1') == '0':
    return False
  libc = _glibc()
  if libc is None:
    return False
  others = _other_threads()
  if others:
    warnings.warn(f'cnn_jax.host.keep_host_memory(): {others} other thread(s) already '
                  'run in this process (numpy, jax or torch imported first?), so glibc '
                  'may keep its per-thread arenas and XLA\'s temporaries may still be '
                  'mmapped per step. Call it first thing, or set GLIBC_TUNABLES (see '
                  'cnn_jax/host.py).', RuntimeWarning, stacklevel=2)
  ok = all(libc.mallopt(opt, value) == 1 for opt, value in (
      (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
  _applied = ok
  return ok


__all__ = ['keep_host_memory']
