"""Speed of our ops against XLA autodiff (and PyTorch when importable), one run.

    .venv/bin/python benchmarks/ops.py            # or: make bench
    .venv/bin/python benchmarks/ops.py --rounds 15 --only conv,dw
    .venv/bin/python benchmarks/ops.py --rounds 3 --only compile   # compile time

Every number is the minimum over `--rounds` interleaved rounds (each round
calls every contender once, in turn, after two warm-up calls that also
compile), so a burst of load from other processes hits all contenders alike
and the minimum is the run least disturbed by it. Ratios are ours / XLA; < 1
means ours is faster.

PyTorch is optional and must not go into .venv: install it into a separate
venv and point CNN_JAX_TORCH_SITE at that venv's site-packages, which is then
appended (not prepended) to sys.path so .venv's numpy still wins:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0
    CNN_JAX_TORCH_SITE=/tmp/torchvenv/lib/python3.11/site-packages \
        .venv/bin/python benchmarks/ops.py

See benchmarks/README.md for the machine, the measured tables and the rule.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

# Run as a script from anywhere (`make bench` does not set PYTHONPATH).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get('CNN_JAX_TORCH_SITE'):
  sys.path.append(os.environ['CNN_JAX_TORCH_SITE'])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

# `cnn_jax.ops` re-exports the function `conv`, which shadows the module name.
conv_mod = importlib.import_module('cnn_jax.ops.conv')
conv_grads = importlib.import_module('cnn_jax.ops.conv_grads')

# libgomp threads otherwise spin after each parallel region and steal the
# 2 cores from the XLA calls timed right after a torch call.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
try:
  import torch  # optional comparison only
  torch.set_num_threads(os.cpu_count() or 1)
except ImportError:
  torch = None

try:
  pooling = importlib.import_module('cnn_jax.ops.pooling')
except ImportError:
  pooling = None


class ConvCase(NamedTuple):
  name: str
  x_shape: Tuple[int, ...]      # (N, H, W, C_in)
  kernel: int
  c_out: int
  stride: int
  padding: str
  groups: int = 1


# Batch 32, the ResNet-style shapes named in the issue.
CONV_CASES = [
    ConvCase('32x32x64->64 3x3', (32, 32, 32, 64), 3, 64, 1, 'SAME'),
    ConvCase('16x16x128->128 3x3', (32, 16, 16, 128), 3, 128, 1, 'SAME'),
    ConvCase('56x56x64->64 3x3', (32, 56, 56, 64), 3, 64, 1, 'SAME'),
    ConvCase('32x32x64->128 3x3 s2', (32, 32, 32, 64), 3, 128, 2, 'SAME'),
    ConvCase('32x32x64->256 1x1', (32, 32, 32, 64), 1, 256, 1, 'VALID'),
    ConvCase('32x32x64->128 1x1 s2', (32, 32, 32, 64), 1, 128, 2, 'VALID'),
    # Grouped and depthwise: XLA's weight gradient for these is a slow path.
    ConvCase('32x32x64->64 3x3 g2', (32, 32, 32, 64), 3, 64, 1, 'SAME', 2),
    ConvCase('32x32x64 3x3 depthwise', (32, 32, 32, 64), 3, 64, 1, 'SAME', 64),
    # Large-kernel stems (batch 8): ResNet/GoogLeNet's 7x7 s2, AlexNet's 11x11 s4.
    ConvCase('224x224x3->64 7x7 s2 b8', (8, 224, 224, 3), 7, 64, 2, 'SAME'),
    ConvCase('227x227x3->96 11x11 s4 b8', (8, 227, 227, 3), 11, 96, 4, 'VALID'),
    # Maps smaller than the window (ResNet-18's last stage at 64x64 input): XLA's
    # CPU conv takes a generic slow path; our forward is an im2col GEMM, our dX a
    # col2im GEMM. 1x1 output under 5x5: LeNet-5's C5 (batch 128).
    ConvCase('2x2x512->512 3x3', (32, 2, 2, 512), 3, 512, 1, 'SAME'),
    ConvCase('4x4x256->512 3x3 s2', (32, 4, 4, 256), 3, 512, 2, 'SAME'),
    ConvCase('1x1x512->512 3x3', (32, 1, 1, 512), 3, 512, 1, 'SAME'),
    ConvCase('5x5x16->120 5x5 b128', (128, 5, 5, 16), 5, 120, 1, 'VALID'),
]

# Compile time of jit(value_and_grad) of the conv: the kernel-size sweep
# on a small input (compile cost is about the program, not the data), then the
# run-time benchmark's shapes.
COMPILE_CASES = [
    ConvCase(f'2x32x32x16->32 {k}x{k}', (2, 32, 32, 16), k, 32, 1, 'SAME')
    for k in (3, 5, 7, 11)
] + [CONV_CASES[0], CONV_CASES[2], CONV_CASES[8], CONV_CASES[9]]


class PoolCase(NamedTuple):
  name: str
  x_shape: Tuple[int, ...]
  window: int
  stride: int
  padding: str


POOL_CASES = [
    PoolCase('32x32x64 2x2 s2', (32, 32, 32, 64), 2, 2, 'VALID'),
    PoolCase('56x56x64 3x3 s2 SAME', (32, 56, 56, 64), 3, 2, 'SAME'),
    PoolCase('16x16x128 3x3 s1 SAME', (32, 16, 16, 128), 3, 1, 'SAME'),
]


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

def _block(out):
  if torch is not None and isinstance(out, torch.Tensor):
    return out
  return jax.block_until_ready(out)


def measure(contenders: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
  """Milliseconds per call, min over interleaved rounds; warm-up compiles first."""
  for fn in contenders.values():
    _block(fn())
    _block(fn())
  best = {name: math.inf for name in contenders}
  for _ in range(rounds):
    for name, fn in contenders.items():
      t0 = time.perf_counter()
      _block(fn())
      best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
  return best


def _fmt(ms: Optional[float]) -> str:
  return '-' if ms is None else f'{ms:8.1f}'


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  return '-' if a is None or b is None else f'{a / b:5.2f}'


def _table(header, rows):
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: '  '.join(str(c).rjust(w) if i else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  print(line(header))
  print('  '.join('-' * w for w in widths))
  for r in rows:
    print(line(r))
  print(flush=True)


# ----------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------

def _conv_setup(case: ConvCase):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  n, h, w_, c_in = case.x_shape
  x = jax.random.normal(k[0], case.x_shape, jnp.float32)
  c_in_g = c_in // case.groups
  w = jax.random.normal(k[1], (case.kernel, case.kernel, c_in_g, case.c_out), jnp.float32)
  w = w / math.sqrt(case.kernel * case.kernel * c_in_g)
  spec = conv_mod.make_spec(x.shape, w.shape, stride=case.stride, padding=case.padding,
                            groups=case.groups)
  ct = jax.random.normal(k[2], (n, *spec.out_spatial, case.c_out), jnp.float32)
  return x, w, ct, spec


def _xla_conv(x, w, spec):
  return lax.conv_general_dilated(
      x, w, spec.stride, spec.padding, rhs_dilation=spec.dilation,
      dimension_numbers=conv_grads.dimension_numbers(spec.nd),
      feature_group_count=spec.groups)


def _ours_conv(x, w, spec):
  return conv_mod.conv(x, w, stride=spec.stride, padding=spec.padding,
                       dilation=spec.dilation, groups=spec.groups)


def _value_and_grads(conv_fn, spec):
  """jit of (x, w, ct) -> (sum(conv(x, w) * ct), (dL/dx, dL/dw)); ct is an
  argument, not a closed-over constant XLA could fold."""
  loss = lambda x, w, ct: jnp.sum(conv_fn(x, w, spec) * ct)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _torch_conv_step(case: ConvCase, x, w, ct):
  """PyTorch fwd+bwd of the same conv (channels_last, as ours), or None."""
  if torch is None:
    return None
  tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last).requires_grad_(True)
  tw = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
  tct = torch.from_numpy(np.array(ct)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  pad = 'same' if case.padding == 'SAME' and case.stride == 1 else 0
  if case.padding == 'SAME' and case.stride > 1:
    pad = (case.kernel - 1) // 2    # torch has no asymmetric 'same' for stride > 1

  def step():
    tx.grad = tw.grad = None
    y = torch.nn.functional.conv2d(tx, tw, stride=case.stride, padding=pad,
                                   groups=case.groups)
    (y * tct).sum().backward()
    return tw.grad
  return step


def bench_conv(rounds: int):
  print('== conv 2-D, batch 32, float32: forward + backward (value and dL/dx, dL/dw) '
        'of sum(conv(x, w) * ct), ms')
  rows = []
  for case in CONV_CASES:
    x, w, ct, spec = _conv_setup(case)
    contenders = {
        'xla': lambda f=_value_and_grads(_xla_conv, spec): f(x, w, ct),
        'ours': lambda f=_value_and_grads(_ours_conv, spec): f(x, w, ct),
    }
    t = measure(contenders, rounds)
    tstep = _torch_conv_step(case, x, w, ct)
    if tstep is not None:
      # Timed on its own, after the JAX pair: interleaving two runtimes' thread
      # pools on 2 cores slowed both.
      t.update(measure({'torch': tstep}, rounds))
    rows.append([case.name, _fmt(t['xla']), _fmt(t['ours']), _ratio(t['ours'], t['xla']),
                 _fmt(t.get('torch')), conv_grads.weight_grad_rule(spec),
                 conv_grads.input_grad_rule(spec)])
  _table(['case', 'XLA', 'ours', 'ours/XLA', 'torch', 'dW rule', 'dX rule'], rows)


def bench_dw(rounds: int):
  print('== conv dL/dW alone, ms (xla = jax.grad of lax.conv w.r.t. w; '
        '* = the rule\'s pick)')
  names = list(conv_grads.WEIGHT_GRADS)
  rows = []
  for case in CONV_CASES:
    x, w, ct, spec = _conv_setup(case)
    contenders = {'xla': lambda f=jax.jit(jax.grad(
        lambda w, x, ct: jnp.sum(_xla_conv(x, w, spec) * ct))): f(w, x, ct)}
    for name in names:
      if name == 'gemm' and spec.kernel != (1,) * spec.nd:
        continue
      fn = jax.jit(lambda x, ct, f=conv_grads.WEIGHT_GRADS[name]: f(x, ct, spec))
      contenders[name] = lambda fn=fn: fn(x, ct)
    t = measure(contenders, rounds)
    pick = conv_grads.weight_grad_rule(spec)
    rows.append([case.name, _fmt(t['xla'])] + [
        (_fmt(t[n]) + ('*' if n == pick else ' ')) if n in t else '-' for n in names]
        + [_ratio(t[pick], t['xla'])])
  _table(['case', 'xla'] + names + ['pick/xla'], rows)


def bench_dx(rounds: int):
  print('== conv dL/dX alone, ms (xla = jax.grad of lax.conv w.r.t. x; '
        '* = the rule\'s pick)')
  names = list(conv_grads.INPUT_GRADS)
  rows = []
  for case in CONV_CASES:
    x, w, ct, spec = _conv_setup(case)
    contenders = {'xla': lambda f=jax.jit(jax.grad(
        lambda x, w, ct: jnp.sum(_xla_conv(x, w, spec) * ct))): f(x, w, ct)}
    for name in names:
      if name == 'gemm' and (spec.kernel != (1,) * spec.nd or spec.groups != 1):
        continue
      if name in ('im2col', 'col2im') and conv_grads.input_grad_rule(spec) != 'col2im':
        continue   # made for small maps: im2col's patch matrix is T x dXpad, col2im
                   # adds T shifted copies
      fn = jax.jit(lambda ct, w, f=conv_grads.INPUT_GRADS[name]: f(ct, w, spec))
      contenders[name] = lambda fn=fn: fn(ct, w)
    t = measure(contenders, rounds)
    pick = conv_grads.input_grad_rule(spec)
    rows.append([case.name, _fmt(t['xla'])] + [
        (_fmt(t[n]) + ('*' if n == pick else ' ')) if n in t else '-' for n in names]
        + [_ratio(t[pick], t['xla'])])
  _table(['case', 'xla'] + names + ['pick/xla'], rows)


# ----------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------

def _xla_pool(kind, x, case: PoolCase):
  win = (1, case.window, case.window, 1)
  strides = (1, case.stride, case.stride, 1)
  if kind == 'max':
    return lax.reduce_window(x, -jnp.inf, lax.max, win, strides, case.padding)
  s = lax.reduce_window(x, 0.0, lax.add, win, strides, case.padding)
  return s / (case.window * case.window)    # count_include_pad=True, as ours


def bench_pool(rounds: int):
  print('== pooling, batch 32, float32: forward + backward of sum(pool(x) * ct), ms')
  if pooling is None:
    print('skipped: pooling not available\n')
    return
  rows = []
  for case in POOL_CASES:
    x = jax.random.normal(jax.random.PRNGKey(0), case.x_shape, jnp.float32)
    for kind, ours in (('max', pooling.max_pool), ('avg', pooling.avg_pool)):
      ours_fn = lambda x, c=case, o=ours: o(x, c.window, c.stride, c.padding)
      xla_fn = lambda x, c=case, k=kind: _xla_pool(k, x, c)
      ct = jax.random.normal(jax.random.PRNGKey(1), ours_fn(x).shape, jnp.float32)
      vg = lambda f: jax.jit(jax.value_and_grad(lambda x, ct: jnp.sum(f(x) * ct)))
      fx, fo = vg(xla_fn), vg(ours_fn)
      t = measure({'xla': lambda: fx(x, ct), 'ours': lambda: fo(x, ct)}, rounds)
      rows.append([f'{kind} {case.name}', _fmt(t['xla']), _fmt(t['ours']),
                   _ratio(t['ours'], t['xla'])])
  _table(['case', 'XLA', 'ours', 'ours/XLA'], rows)


# ----------------------------------------------------------------------------
# Compile time
# ----------------------------------------------------------------------------

def bench_compile(rounds: int):
  """Seconds to compile jit(value_and_grad(sum(conv(x, w) * ct))): XLA's
  autodiff, ours, and ours with the previous dW (im2col_unrolled: one static
  slice per tap) in place of im2col. Each round lowers and compiles a fresh
  jit of every contender in turn; the minimum over rounds is reported."""
  print('== compile time of jit(value_and_grad) of the conv, s '
        '(ours-unrolled = ours with the previous, per-tap-unrolled im2col dW)')
  rounds = max(1, min(rounds, 3))
  rows = []
  for case in COMPILE_CASES:
    x, w, ct, spec = _conv_setup(case)

    def compile_time(conv_fn, dw_impl=None):
      saved = conv_grads.WEIGHT_GRADS['im2col']
      if dw_impl is not None:
        conv_grads.WEIGHT_GRADS['im2col'] = dw_impl
      try:
        lowered = _value_and_grads(conv_fn, spec).lower(x, w, ct)
      finally:
        conv_grads.WEIGHT_GRADS['im2col'] = saved
      t0 = time.perf_counter()
      lowered.compile()
      return time.perf_counter() - t0

    contenders = {
        'xla': lambda: compile_time(_xla_conv),
        'ours': lambda: compile_time(_ours_conv),
        'ours-unrolled': lambda: compile_time(
            _ours_conv, conv_grads.weight_grad_im2col_unrolled),
    }
    best = {name: math.inf for name in contenders}
    for _ in range(rounds):
      for name, fn in contenders.items():
        best[name] = min(best[name], fn())
    rows.append([case.name, f'{best["xla"]:.2f}', f'{best["ours"]:.2f}',
                 f'{best["ours-unrolled"]:.2f}', _ratio(best['ours'], best['xla']),
                 _ratio(best['ours-unrolled'], best['xla']),
                 conv_grads.weight_grad_rule(spec)])
  _table(['case', 'xla', 'ours', 'ours-unrolled', 'ours/xla', 'unrolled/xla', 'dW rule'],
         rows)


SECTIONS = {'conv': bench_conv, 'dw': bench_dw, 'dx': bench_dx, 'pool': bench_pool,
            'compile': bench_compile}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7, help='timed rounds per contender')
  parser.add_argument('--only', default=','.join(SECTIONS),
                      help='comma-separated sections: ' + ','.join(SECTIONS))
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; '
        f'torch {torch.__version__ if torch is not None else "not importable"}; '
        f'min of {args.rounds} interleaved rounds.\n', flush=True)
  for name in args.only.split(','):
    SECTIONS[name.strip()](args.rounds)


if __name__ == '__main__':
  main()
