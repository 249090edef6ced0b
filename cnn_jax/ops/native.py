"""Native CPU kernels behind the convolution's explicit backward (XLA FFI).

`cnn_jax/ops/csrc/conv_cpu.cc` computes the notes' weight gradient

    dW[i, j, c, o] = sum_{n, p, q} Xpad[n, p*S_h + i, q*S_w + j, c] * dY[n, p, q, o]

directly from X and dY with AVX-512 register tiles, without the patch matrix the
pure-JAX formulation (`conv_grads.weight_grad_im2col`) builds, on XLA's own CPU
thread pool. It is 2-7x faster than that formulation on this machine's shapes
(benchmarks/README.md, "Session 7") and is used, by the fixed rule in
`conv_grads.weight_grad_rule`, for every 2-D convolution with groups == 1,
dilation 1 and a kernel larger than 1x1, in float32, on CPU, when:

  * the library is built: it is compiled on first use with the system's C++
    compiler (g++ or clang++, found as $CXX or on PATH) against the XLA FFI
    headers that ship with jaxlib, into a cache keyed by the source, the flags,
    the compiler and jaxlib's version ($CNN_JAX_NATIVE_DIR, default
    ~/.cache/cnn_jax/native); `make setup` builds it ahead of time;
  * the CPU has AVX-512F (checked at load; other CPUs keep the JAX formulation);
  * it is not switched off: CNN_JAX_NATIVE=0 in the environment, or
    `with native.disabled():` around tracing.

The same library holds two more sets of kernels, each behind its own fixed rule:
`csrc/dense_cpu.cc`, the fully connected layer's Y = X W, dX = dY W^T and
dW = X^T dY for batches of at most 32 rows (`cnn_jax/ops/dense.py`), and
`csrc/pool_cpu.cc`, max pooling's backward routing dX[q] = sum of dY over the
windows whose switch is q (`cnn_jax/ops/pooling.py`). `csrc/parallel.h` shares
the work between XLA's pool threads for all of them.

On GPU and TPU nothing changes: the call sits in a `lax.platform_dependent`
whose non-CPU branch is the JAX formulation. The kernel's own VJP is defined
(dW is bilinear in X and dY), so second-order gradients through a convolution
work the same with it as without.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_CSRC = Path(__file__).parent / 'csrc'
_SOURCES = (_CSRC / 'conv_cpu.cc', _CSRC / 'dense_cpu.cc', _CSRC / 'pool_cpu.cc')
_HEADERS = (_CSRC / 'parallel.h',)
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC')
_TARGET = 'cnn_jax_conv2d_weight_grad'
_TARGET_FORWARD = 'cnn_jax_conv2d_forward'
_TARGET_DENSE = {'forward': ('cnn_jax_dense_forward', 'CnnDenseForward'),
                 'input_grad': ('cnn_jax_dense_input_grad', 'CnnDenseInputGrad'),
                 'weight_grad': ('cnn_jax_dense_weight_grad', 'CnnDenseWeightGrad')}
_TARGET_SCATTER = 'cnn_jax_scatter_add_rows'

_lock = threading.Lock()
_state: dict = {}          # 'lib', 'error' once loading has been attempted
_local = threading.local()


class NativeBuildError(RuntimeError):
  """The native library could not be compiled or loaded (the message says why)."""


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def cache_dir() -> Path:
  return Path(os.environ.get('CNN_JAX_NATIVE_DIR')
              or Path.home() / '.cache' / 'cnn_jax' / 'native')


def _key(cxx: str) -> str:
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
  h = hashlib.sha256()
  for part in (*(f.read_bytes() for f in _SOURCES + _HEADERS), ' '.join(_FLAGS).encode(),
               version.encode(), jax.__version__.encode(), jax.ffi.include_dir().encode()):
    h.update(part)
    h.update(b'\0')
  return h.hexdigest()[:16]


def library_path() -> Path | None:
  """Where the library for the current source/compiler/jaxlib lives (or will)."""
  cxx = _compiler()
  if cxx is None:
    return None
  return cache_dir() / _key(cxx) / 'libcnn_jax_native.so'


def build(force: bool = False) -> Path:
  """Compiles the kernels (if not already cached) and returns the library path.

  Raises NativeBuildError naming the missing compiler or the compiler's errors.
  """
  cxx = _compiler()
  if cxx is None:
    raise NativeBuildError(
        'no C++ compiler found for the native CPU kernels: install g++ (Debian/'
        'Ubuntu: apt-get install g++) or set CXX; without it the pure-JAX '
        'formulations are used')
  path = cache_dir() / _key(cxx) / 'libcnn_jax_native.so'
  if path.exists() and not force:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Build under a temporary name, then rename: concurrent builders never load
  # a half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, f'-I{jax.ffi.include_dir()}', *map(str, _SOURCES), '-o', tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise NativeBuildError(f'compiling {_CSRC} failed ({" ".join(cmd)}):\n{proc.stderr[-4000:]}')
  os.replace(tmp, path)
  return path


def _load():
  with _lock:
    if 'lib' in _state:
      return _state['lib']
    lib, error = None, None
    if os.environ.get('CNN_JAX_NATIVE', '1') == '0':
      error = 'switched off by CNN_JAX_NATIVE=0'
    elif jax.config.jax_platforms not in (None, '') and 'cpu' not in jax.config.jax_platforms:
      error = f'no CPU platform (jax_platforms={jax.config.jax_platforms!r})'
    else:
      try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        if not lib.cnn_native_cpu_supported():
          lib, error = None, 'this CPU has no AVX-512F'
        else:
          jax.ffi.register_ffi_target(
              _TARGET, jax.ffi.pycapsule(lib.CnnConv2dWeightGrad), platform='cpu')
          jax.ffi.register_ffi_target(
              _TARGET_FORWARD, jax.ffi.pycapsule(lib.CnnConv2dForward), platform='cpu')
          for target, symbol in _TARGET_DENSE.values():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
          jax.ffi.register_ffi_target(
              _TARGET_SCATTER, jax.ffi.pycapsule(lib.CnnScatterAddRows), platform='cpu')
      except (NativeBuildError, OSError) as e:
        lib, error = None, str(e)
    if error:
      logging.getLogger(__name__).info('native CPU kernels not used: %s', error)
    _state['lib'], _state['error'] = lib, error
    return lib


def available() -> bool:
  """True when the native kernels will be used for CPU computations traced now."""
  if getattr(_local, 'disabled', 0):
    return False
  return _load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True)."""
  if getattr(_local, 'disabled', 0):
    return 'disabled by native.disabled()'
  _load()
  return _state['error']


@contextlib.contextmanager
def disabled():
  """Trace with the pure-JAX formulations (this thread; nests)."""
  _local.disabled = getattr(_local, 'disabled', 0) + 1
  try:
    yield
  finally:
    _local.disabled -= 1


def supports_weight_grad(x, dy, spec) -> bool:
  """The shape class the native weight gradient covers (see module docstring)."""
  return (spec.nd == 2 and spec.groups == 1 and spec.dilation == (1, 1)
          and all(lo >= 0 and hi >= 0 for lo, hi in spec.padding)
          and x.dtype == jnp.float32 and dy.dtype == jnp.float32)


def _call_weight_grad(x, dy, spec):
  (pt, pb), (pl, pr) = spec.padding
  kh, kw = spec.kernel
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method='sequential')(
      x, dy, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(spec.stride[0]),
      sw=np.int64(spec.stride[1]), pad_top=np.int64(pt), pad_bottom=np.int64(pb),
      pad_left=np.int64(pl), pad_right=np.int64(pr))


def supports_forward(x, w, spec) -> bool:
  """The shape class the native forward covers (the same as the weight gradient's)."""
  return supports_weight_grad(x, x, spec) and w.dtype == jnp.float32


def supports_input_grad(dy, w, spec) -> bool:
  """dX through the forward kernel: at stride 1 a padding it can express (at
  stride > 1 the phases crop instead)."""
  return (supports_weight_grad(dy, dy, spec) and w.dtype == jnp.float32
          and (spec.stride != (1, 1)
               or all(lo <= k - 1 and n + k - 1 - o - (k - 1 - lo) >= 0
                      for n, o, k, (lo, _) in zip(spec.in_spatial, spec.out_spatial,
                                                  spec.kernel, spec.padding))))


def _call_forward(x, w, stride, padding):
  """Y = Xpad (*) W (2-D, NHWC, float32) by the native forward kernel."""
  (pt, pb), (pl, pr) = padding
  kh, kw = w.shape[:2]
  out_h = (x.shape[1] + pt + pb - kh) // stride[0] + 1
  out_w = (x.shape[2] + pl + pr - kw) // stride[1] + 1
  out = jax.ShapeDtypeStruct((x.shape[0], out_h, out_w, w.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(_TARGET_FORWARD, out, vmap_method='sequential')(
      x, w, sh=np.int64(stride[0]), sw=np.int64(stride[1]), pad_top=np.int64(pt),
      pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr))


def supports_dense(a, b) -> bool:
  """The shape class of the native dense products: two float32 matrices."""
  return a.ndim == 2 and b.ndim == 2 and a.dtype == jnp.float32 and b.dtype == jnp.float32


def _call_dense(product, a, b):
  """One product of the fully connected layer by its native kernel:
  'forward' X (M, K) @ W (K, N); 'input_grad' dY (M, N) @ W^T;
  'weight_grad' X^T @ dY (K, N)."""
  if product == 'forward':
    shape = (a.shape[0], b.shape[1])
  elif product == 'input_grad':
    shape = (a.shape[0], b.shape[0])
  else:
    shape = (a.shape[1], b.shape[1])
  return jax.ffi.ffi_call(_TARGET_DENSE[product][0], jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(a, b)


def supports_scatter_add_rows(values, switches) -> bool:
  """The class of the native routing: float32 values, int32 switches."""
  return values.dtype == jnp.float32 and switches.dtype == jnp.int32


def _call_scatter_add_rows(values, switches, q: int):
  """out[n, s, c] = sum of values[n, p, c] over p with switches[n, p, c] = s, for
  values and switches (N, P, C) and out (N, q, C); switches outside [0, q) are
  dropped."""
  out = jax.ShapeDtypeStruct((values.shape[0], q, values.shape[2]), jnp.float32)
  return jax.ffi.ffi_call(_TARGET_SCATTER, out, vmap_method='sequential')(values, switches)


def main():
  """`python -m cnn_jax.ops.native`: build (or find) the library and report."""
  try:
    path = build()
  except NativeBuildError as e:
    print(f'native CPU kernels not built: {e}')
    return 1
  supported = bool(ctypes.cdll.LoadLibrary(str(path)).cnn_native_cpu_supported())
  print(f'native CPU kernels: {path}' + ('' if supported else
        ' (this CPU has no AVX-512F: the JAX formulations will be used)'))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
