"""The native CPU weight-gradient kernel (cnn_jax/ops/native.py, csrc/conv_cpu.cc).

It must equal the notes' dW = sum over batch and positions of Xpad[p*S + t] * dY[p]
(XLA's own correlation is the reference) over strides, asymmetric paddings,
kernel shapes, channel counts off the 16-wide vectors, maps smaller than the
kernel, and both of its threading splits; be picked by the rule exactly for its
shape class; and leave first- and second-order gradients, vmap and pmap as they
are without it."""
import importlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

conv_mod = importlib.import_module('cnn_jax.ops.conv')
conv_grads = importlib.import_module('cnn_jax.ops.conv_grads')
native = importlib.import_module('cnn_jax.ops.native')


def _cpu_has_avx512f() -> bool:
  try:
    with open('/proc/cpuinfo') as f:
      return any(line.startswith('flags') and ' avx512f' in line for line in f)
  except OSError:
    return False


needs_native = pytest.mark.skipif(
    not native.available(), reason=f'native kernels not available: {native.unavailable_reason()}')


def test_native_kernels_load_where_they_can():
  """With a C++ compiler and an AVX-512 CPU (this project's machines) the kernels
  must build and load: a silent fallback would hide a broken build."""
  if native._compiler() is None or not _cpu_has_avx512f():
    pytest.skip('no C++ compiler or no AVX-512F: the JAX formulations are used')
  if os.environ.get('CNN_JAX_NATIVE', '1') == '0':
    pytest.skip('switched off by CNN_JAX_NATIVE=0')
  assert native.available(), native.unavailable_reason()


def _reference_dw(x, dy, spec):
  return conv_grads.weight_grad_correlation(x, dy, spec)


# (x shape, kernel (kh, kw), C_out, stride, padding)
CASES = [
    ((2, 7, 9, 3), (3, 3), 5, 1, 'SAME'),
    ((3, 8, 8, 16), (3, 3), 16, 1, 'SAME'),             # one full vector of outputs
    ((2, 9, 11, 5), (3, 3), 40, 2, 1),                  # 2 vectors + an 8-wide tail
    ((2, 8, 8, 1), (5, 5), 6, 1, 'VALID'),              # LeNet's C1
    ((4, 14, 14, 6), (5, 5), 16, 1, 'VALID'),           # LeNet's C3
    ((2, 10, 10, 33), (3, 3), 70, 2, 'SAME'),
    ((2, 17, 17, 3), (7, 7), 64, 2, 3),                 # the ResNet stem
    ((2, 9, 8, 4), (3, 1), 17, (2, 1), [(2, 0), (0, 1)]),  # non-square, asymmetric
    ((1, 5, 6, 2), (1, 4), 3, (1, 3), [(0, 0), (3, 1)]),
    ((2, 2, 2, 8), (3, 3), 24, 1, 'SAME'),              # map smaller than the kernel
    ((3, 6, 6, 12), (2, 2), 31, 3, 'VALID'),            # stride past the kernel
    ((1, 3, 3, 2), (1, 1), 1, 1, 'VALID'),              # 1x1, one output channel
]


def _check(xs, k, c_out, stride, padding, seed=0):
  rng = np.random.default_rng(seed)
  spec = conv_mod.make_spec(xs, (*k, xs[-1], c_out), stride=stride, padding=padding)
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((xs[0], *spec.out_spatial, c_out)), jnp.float32)
  both = jax.jit(lambda x, dy: (native._call_weight_grad(x, dy, spec), _reference_dw(x, dy, spec)))
  got, want = both(x, dy)
  assert got.shape == want.shape == (*k, xs[-1], c_out)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)


@needs_native
@pytest.mark.parametrize('case', CASES, ids=[str(i) for i in range(len(CASES))])
def test_native_weight_grad_equals_the_correlation(case):
  _check(*case)


def _check_forward_and_input_grad(xs, k, c_out, stride, padding, seed=0):
  """The forward kernel against XLA's convolution, and dX through it (the
  notes' convolution of padded dY with the flipped kernel; per sub-pixel
  phase at stride > 1) against XLA's autodiff."""
  rng = np.random.default_rng(seed)
  spec = conv_mod.make_spec(xs, (*k, xs[-1], c_out), stride=stride, padding=padding)
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(rng.standard_normal((*k, xs[-1], c_out)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((xs[0], *spec.out_spatial, c_out)), jnp.float32)

  def both(x, w, dy):
    ref = lambda x, w: conv_grads._xla_forward(x, w, spec)
    y_ref, vjp = jax.vjp(ref, x, w)
    got = {'y': native._call_forward(x, w, spec.stride, spec.padding),
           'dx': conv_grads._input_grad_native_cpu(dy, w, spec)}
    return got, {'y': y_ref, 'dx': vjp(dy)[0]}

  assert native.supports_input_grad(jnp.zeros((1,), jnp.float32),
                                    jnp.zeros((1,), jnp.float32), spec)
  got, want = jax.jit(both)(x, w, dy)
  for name, value in got.items():
    assert value.shape == want[name].shape, name
    scale = float(jnp.max(jnp.abs(want[name])))
    np.testing.assert_allclose(np.asarray(value), np.asarray(want[name]), rtol=1e-5,
                               atol=1e-5 * scale, err_msg=name)


@needs_native
@pytest.mark.parametrize('case', CASES, ids=[str(i) for i in range(len(CASES))])
def test_native_forward_and_input_grad_equal_xla(case):
  _check_forward_and_input_grad(*case)


@needs_native
def test_native_forward_splits_a_long_reduction():
  """kh * kw * C_in * 64 outputs past the 32 KiB weight panel: the reduction in
  blocks, later blocks adding to the stored partial outputs."""
  _check_forward_and_input_grad((2, 5, 5, 200), (3, 3), 70, 1, 'SAME')
  _check_forward_and_input_grad((1, 6, 6, 300), (3, 3), 64, 2, 1, seed=1)


@needs_native
@pytest.mark.parametrize('c_out', [6, 17, 40])
def test_native_tail_lanes_do_not_leak(c_out):
  """Where C_out is not a multiple of 16, the dW tile reads whole vectors of
  dY (the lanes past C_out belong to the next position and are never stored)
  and the forward kernel reads a zero-padded copy of W. A NaN in one channel
  of one position of dY (or one column of W) must then reach exactly the dW
  (or Y) entries it reaches in the reference, and the last positions of dY,
  run from a padded copy, must count once."""
  xs = (2, 6, 7, 3)
  rng = np.random.default_rng(c_out)
  spec = conv_mod.make_spec(xs, (3, 3, 3, c_out), padding='SAME')
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  dy = rng.standard_normal((2, 6, 7, c_out)).astype(np.float32)
  dy[1, 2, 3, c_out - 1] = np.nan      # the next position's lanes hold channel 0 of it
  dy[0, 4, 1, 0] = np.nan
  dy = jnp.asarray(dy)
  got = np.asarray(jax.jit(lambda x, dy: native._call_weight_grad(x, dy, spec))(x, dy))
  want = np.asarray(jax.jit(lambda x, dy: _reference_dw(x, dy, spec))(x, dy))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  assert np.isnan(want).any() and not np.isnan(want).all()
  finite = ~np.isnan(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5,
                             atol=1e-5 * np.abs(want[finite]).max())

  w = rng.standard_normal((3, 3, 3, c_out)).astype(np.float32)
  w[1, 1, 2, c_out - 1] = np.nan
  w = jnp.asarray(w)
  got = np.asarray(jax.jit(lambda x, w: native._call_forward(x, w, spec.stride, spec.padding))(x, w))
  want = np.asarray(jax.jit(lambda x, w: conv_grads._xla_forward(x, w, spec))(x, w))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  finite = ~np.isnan(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5,
                             atol=1e-5 * np.abs(want[finite]).max())


@needs_native
def test_native_weight_grad_large_dw_splits_rows():
  """dW over 512 KiB takes the other threading split (rows of dW per thread,
  every thread reading all positions) and chunks of few rows."""
  _check((2, 4, 4, 64), (3, 3), 600, 1, 'SAME')       # 1.4 MB of dW
  _check((1, 2, 2, 300), (3, 3), 520, 1, 'SAME')


@needs_native
def test_native_weight_grad_many_chunks():
  """More positions than one ~512 KiB chunk holds: partial sums across chunks
  and across threads' private copies."""
  _check((6, 40, 40, 24), (3, 3), 32, 1, 'SAME', seed=3)


@needs_native
def test_native_kernels_are_bit_for_bit_reproducible():
  """Work is shared between threads dynamically, but every sum runs in a fixed
  order: repeated calls agree exactly (a checkpoint resume depends on it)."""
  rng = np.random.default_rng(7)
  spec = conv_mod.make_spec((16, 24, 24, 8), (3, 3, 8, 24), padding='SAME')
  x = jnp.asarray(rng.standard_normal((16, 24, 24, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 24)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((16, 24, 24, 24)), jnp.float32)
  f = jax.jit(lambda x, w, dy: (native._call_weight_grad(x, dy, spec),
                                native._call_forward(x, w, spec.stride, spec.padding)))
  first = [np.asarray(a) for a in f(x, w, dy)]
  for _ in range(5):
    for a, b in zip(first, f(x, w, dy)):
      np.testing.assert_array_equal(a, np.asarray(b))


@needs_native
def test_rule_picks_native_for_its_class_only():
  def rule(xs, ws, stride=1, padding='SAME', dilation=1, groups=1):
    spec = conv_mod.make_spec(xs, ws, stride=stride, padding=padding, dilation=dilation,
                              groups=groups)
    return conv_grads.weight_grad_rule(spec)

  assert rule((8, 32, 32, 16), (3, 3, 16, 16)) == 'native'
  assert rule((8, 224, 224, 3), (7, 7, 3, 64), stride=2) == 'native'

  def rules(xs, ws, stride=1, padding='SAME'):
    spec = conv_mod.make_spec(xs, ws, stride=stride, padding=padding)
    return conv_grads.forward_rule(spec), conv_grads.input_grad_rule(spec)

  assert rules((8, 32, 32, 16), (3, 3, 16, 16)) == ('native', 'native')
  assert rules((8, 32, 32, 8), (5, 5, 8, 6), padding='VALID') == ('native', 'native')
  # Few input channels or dY smaller than the window: col2im stays (the padded
  # dY would be mostly zeros, or the output vectors mostly empty).
  assert rules((8, 32, 32, 1), (5, 5, 1, 6), padding='VALID') == ('native', 'col2im')
  assert rules((8, 5, 5, 16), (5, 5, 16, 120), padding='VALID') == ('native', 'col2im')
  assert rules((8, 32, 32, 16), (3, 3, 16, 32), stride=2) == ('native', 'native')
  # Past NATIVE_MAX_REDUCTION_CHANNELS (C_in for Y, C_out for dX): XLA's.
  assert rules((8, 7, 7, 512), (3, 3, 512, 512)) == ('xla', 'dilated')
  assert rules((8, 7, 7, 256), (3, 3, 256, 512)) == ('native', 'dilated')
  assert rules((8, 16, 16, 8), (1, 1, 8, 16)) == ('xla', 'gemm')
  assert rule((8, 4, 4, 512), (3, 3, 512, 512)) == 'native'
  assert rule((8, 2, 2, 512), (3, 3, 512, 512)) == 'im2col'       # map < window
  assert rule((8, 16, 16, 8), (1, 1, 8, 16)) == 'gemm'            # 1x1: one XLA GEMM
  assert rule((8, 16, 16, 8), (3, 3, 1, 8), groups=8) == 'depthwise'
  assert rule((8, 16, 16, 8), (3, 3, 2, 8), groups=4) == 'im2col'  # grouped
  assert rule((8, 16, 16, 8), (3, 3, 8, 8), dilation=2) == 'im2col'
  assert rule((8, 16, 8), (3, 8, 8)) == 'correlation'              # 1-D
  assert rule((2, 6, 6, 6, 4), (3, 3, 3, 4, 4)) == 'im2col'        # 3-D
  with native.disabled():
    assert rule((8, 32, 32, 16), (3, 3, 16, 16)) == 'im2col'
    with native.disabled():          # nests
      assert not native.available()
    assert not native.available()
  assert native.available()


def _conv_grads_both_ways(f, *args):
  """f's value with the native kernel and with the JAX formulations (each
  traced afresh: jit's cache does not know about native.disabled())."""
  got = jax.jit(lambda *a: f(*a))(*args)
  with native.disabled():
    fresh = lambda *a: f(*a)
    assert 'cnn_jax_conv2d' not in jax.jit(fresh).lower(*args).as_text()
    want = jax.jit(fresh)(*args)
  return got, want


@needs_native
def test_conv_gradients_with_and_without_native_agree():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 12, 12, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 20)) * 0.2, jnp.float32)

  for stride in (1, 2):
    def loss(x, w):
      y = conv_mod.conv(x, w, stride=stride, padding='SAME')
      return jnp.sum(jnp.tanh(y) ** 2)

    (gx, gw), (hx, hw) = _conv_grads_both_ways(jax.grad(loss, argnums=(0, 1)), x, w)
    for a, b in ((gw, hw), (gx, hx)):       # float32, summed in other orders
      scale = float(jnp.max(jnp.abs(b)))
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6 * scale)
    # The native calls are in the compiled program (so the test above compared
    # them): dW and Y always, dX through the forward kernel at stride 1.
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert native._TARGET in hlo
    # dX: one call at stride 1, one per phase (2 x 2) at stride 2.
    assert hlo.count(native._TARGET_FORWARD) == (2 if stride == 1 else 5)
    with native.disabled():
      assert native._TARGET_FORWARD not in jax.jit(jax.grad(loss)).lower(x, w).as_text()


@needs_native
def test_second_order_gradients_through_the_native_kernel():
  """grad of a function of dW (e.g. a gradient penalty): the kernel's own VJP."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 7, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)) * 0.3, jnp.float32)

  def penalty(x, w):
    gw = jax.grad(lambda w: jnp.sum(jnp.sin(conv_mod.conv(x, w, padding='SAME'))))(w)
    return jnp.sum(gw ** 2)

  (px, pw), (qx, qw) = _conv_grads_both_ways(jax.grad(penalty, argnums=(0, 1)), x, w)
  for a, b in ((pw, qw), (px, qx)):     # float32 sums of terms up to ~1e3
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
  # And against finite differences of the penalty in one direction.
  d = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
  eps = 1e-2
  fd = (penalty(x, w + eps * d) - penalty(x, w - eps * d)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(pw, d)), float(fd), rtol=2e-2)


@needs_native
def test_per_example_weight_gradients_under_vmap():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((3, 1, 6, 6, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
  per_example = jax.vmap(jax.grad(lambda w, x: jnp.sum(conv_mod.conv(x, w, padding=1) ** 2)),
                         in_axes=(None, 0))
  got, want = _conv_grads_both_ways(per_example, w, x)
  assert got.shape == (3, 3, 3, 2, 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@needs_native
def test_native_weight_grad_under_pmap():
  n = min(jax.local_device_count(), 4)
  if n < 2:
    pytest.skip('needs several devices (tests/conftest.py asks for 8 CPU devices)')
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((n, 2, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 8)), jnp.float32)
  grad = jax.grad(lambda w, x: jnp.sum(jnp.cos(conv_mod.conv(x, w, padding='SAME'))))
  summed = jax.pmap(lambda x: lax.psum(grad(w, x), 'd'), axis_name='d')(x)[0]
  want = sum(grad(w, x[i]) for i in range(n))
  np.testing.assert_allclose(np.asarray(summed), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_other_dtypes_fall_back_to_jax():
  """bfloat16 and float64 are outside the kernel's class: same answer as XLA."""
  rng = np.random.default_rng(6)
  spec = conv_mod.make_spec((2, 6, 6, 4), (3, 3, 4, 8), padding='SAME')
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((2, 6, 6, 8)), jnp.bfloat16)
  got = jax.jit(lambda x, dy: conv_grads.weight_grad_native(x, dy, spec))(x, dy)
  want = _reference_dw(x.astype(jnp.float32), dy.astype(jnp.float32), spec)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=5e-2, atol=0.3)


def test_build_without_a_compiler_names_the_fix(monkeypatch):
  monkeypatch.setattr(native, '_compiler', lambda: None)
  with pytest.raises(native.NativeBuildError, match='g\\+\\+'):
    native.build()
  assert native.library_path() is None


def test_build_error_shows_the_compiler_output(monkeypatch, tmp_path):
  """A compiler that fails: the error carries the command; nothing is left in
  the cache (no half-written library to load later)."""
  fake = tmp_path / 'fakecxx'
  fake.write_text('#!/bin/sh\necho "fake compiler: no such luck" >&2\nexit 1\n')
  fake.chmod(0o755)
  monkeypatch.setenv('CXX', str(fake))
  monkeypatch.setenv('CNN_JAX_NATIVE_DIR', str(tmp_path / 'cache'))
  with pytest.raises(native.NativeBuildError, match='no such luck'):
    native.build()
  assert not list((tmp_path / 'cache').rglob('*.so'))


@pytest.mark.skipif(native._compiler() is None, reason='no C++ compiler')
def test_switch_off_by_environment(monkeypatch):
  monkeypatch.setattr(native, '_state', {})
  monkeypatch.setenv('CNN_JAX_NATIVE', '0')
  assert not native.available()
  assert 'CNN_JAX_NATIVE=0' in native.unavailable_reason()
  spec = conv_mod.make_spec((2, 6, 6, 4), (3, 3, 4, 8), padding='SAME')
  assert conv_grads.weight_grad_rule(spec) == 'im2col'


def test_cache_key_follows_the_source(monkeypatch, tmp_path):
  """An edited kernel source or header gets a new library path (never a stale
  build)."""
  cxx = native._compiler() or shutil.which('sh')
  key = native._key(cxx)
  for attr in ('_SOURCES', '_HEADERS'):
    files = getattr(native, attr)
    edited = tmp_path / files[-1].name
    edited.write_bytes(files[-1].read_bytes() + b'\n// edited\n')
    with monkeypatch.context() as m:
      m.setattr(native, attr, files[:-1] + (edited,))
      assert native._key(cxx) != key, attr
  assert native._key(cxx) == key
