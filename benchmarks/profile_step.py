"""Where one training step's time goes: a jax.profiler trace, summed per XLA op.

    .venv/bin/python benchmarks/profile_step.py --model resnet20
    .venv/bin/python benchmarks/profile_step.py --model vgg11_64 --contender nn.Conv --top 30

For one model of benchmarks/train.py (same architecture, input, batch and
optimizer; a synthetic batch, so no input pipeline), it compiles the training
step, runs `--warmup` steps, then traces `--steps` steps with
`jax.profiler.trace` and reads the trace back (the `*.trace.json.gz` that JAX
writes next to the xplane; no TensorBoard needed). It prints:

* the median step time and the CPU utilisation of the traced steps (user+sys
  CPU seconds over wall seconds: 2.0 means both cores busy all the time);
* per op kind (the HLO instruction name without its numeric suffix:
  `ynn_fusion` = YNNPACK dots and convolutions, `conv_general_dilated` = XLA's
  own convolutions, `select_dynamic-update-slice_fusion` = our im2col patch fill,
  `*transpose*` / `wrapped_copy` = layout changes, `while` = loop overhead, ...)
  the *exclusive* time per step: each traced event minus the events nested in
  it, summed over XLA's worker threads (so it is thread time: with two threads
  busy a kind can take more than the wall time);
* the `--top` most expensive single instructions, each with the layer it came
  from (the `op_name` metadata of the compiled HLO, e.g.
  `transpose(jvp(CifarResNet))/stage1_block1/conv2/while` is that conv's
  backward loop).

Findings from it are in benchmarks/README.md ("Session 6").
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

# First, before numpy or jax start a thread (cnn_jax/host.py), as launch.py does.
from cnn_jax import host as _host  # noqa: E402
if __name__ == '__main__' and '--default_malloc' not in sys.argv:
  _host.keep_host_memory()

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Runtime bookkeeping events, not ops: they wrap or wait for the ops.
BOOKKEEPING = ('ThunkExecutor', 'SlinkyThreadPool', 'end: ')


def exclusive_times(events: Iterable[dict]) -> Dict[str, float]:
  """Per event name, the summed duration (trace units) not covered by events
  nested in it on the same thread. `events` are Chrome-trace complete events
  ('ph': 'X') with 'name', 'tid', 'ts', 'dur'; nesting is by time containment."""
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e.get('pid'), e['tid'])].append(e)
  out = collections.Counter()
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e['ts'], -e['dur']))
    stack: List[dict] = []
    for e in evs:
      while stack and stack[-1]['ts'] + stack[-1]['dur'] <= e['ts']:
        stack.pop()
      if stack:
        out[stack[-1]['name']] -= e['dur']
      out[e['name']] += e['dur']
      stack.append(e)
  return dict(out)


def op_kind(name: str) -> str:
  """'select_dynamic-update-slice_fusion.17' -> 'select_dynamic-update-slice_fusion'."""
  return re.sub(r'(\.\d+)+$', '', name)


def by_kind(times: Dict[str, float]) -> List[Tuple[str, float]]:
  kinds = collections.Counter()
  for name, t in times.items():
    if not name.startswith(BOOKKEEPING):
      kinds[op_kind(name)] += t
  return kinds.most_common()


def xla_thread_events(trace: dict) -> List[dict]:
  """The complete events of XLA's CPU worker threads (named tf_XLAEigen...)."""
  names = {(e['pid'], e['tid']): e['args'].get('name', '')
           for e in trace['traceEvents']
           if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  return [e for e in trace['traceEvents']
          if e.get('ph') == 'X' and 'XLA' in names.get((e.get('pid'), e.get('tid')), '')
          and 'PjRt' not in names.get((e.get('pid'), e.get('tid')), '')]


def hlo_op_names(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> its op_name metadata (the JAX op and layer it came from)."""
  out = {}
  for m in re.finditer(r'%([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text):
    out.setdefault(m.group(1), m.group(2))
  return out


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main(argv=None):
  import train as bench_train   # benchmarks/train.py: the cases and contenders

  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='resnet20', help=', '.join(bench_train.CASES_BY_KEY))
  parser.add_argument('--contender', default='ours', choices=('ours', 'nn.Conv'),
                      help="ours: the registry model; nn.Conv: conv=flax.linen.Conv")
  parser.add_argument('--batch', type=int, default=0, help="override the model's batch")
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3, help='traced steps')
  parser.add_argument('--top', type=int, default=20, help='single instructions to list')
  parser.add_argument('--trace_dir', default=None,
                      help='keep the trace here (default: a temp dir, removed)')
  parser.add_argument('--default_malloc', action='store_true',
                      help="leave glibc's malloc settings as they are (default: keep freed "
                           "host memory, as launch.py and benchmarks/train.py do; read at import)")
  args = parser.parse_args(argv)
  if args.model not in bench_train.CASES_BY_KEY:
    parser.error(f'unknown --model {args.model!r}; choose from {list(bench_train.CASES_BY_KEY)}')
  if args.steps < 1:
    parser.error('--steps must be >= 1')

  from cnn_jax import train as cnn_train
  from cnn_jax.models import get_model
  import flax.linen as flax_nn
  import cnn_jax.nn

  case = bench_train.CASES_BY_KEY[args.model]
  batch_size = args.batch or case.batch
  conv = cnn_jax.nn.Conv if args.contender == 'ours' else flax_nn.Conv
  model = get_model(case.model, num_classes=case.num_classes, conv=conv,
                    **dict(case.model_kwargs))
  tx, schedule = cnn_train.make_optimizer(bench_train.OPTIMIZER)
  state = cnn_train.create_train_state(model, tx, case.image, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((batch_size,) + tuple(case.image)).astype(np.float32),
           'label': rng.integers(0, case.num_classes, batch_size).astype(np.int32)}
  batch = jax.device_put(batch)
  compiled = cnn_train.make_train_step(None, schedule).lower(state, batch).compile()
  layers = hlo_op_names(compiled.as_text())

  def run(state):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0

  for _ in range(args.warmup):
    state, _ = run(state)
  tmp = None
  trace_dir = args.trace_dir
  if trace_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix='cnn_jax_profile_')
    trace_dir = tmp.name
  try:
    walls = []
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, dt = run(state)
        walls.append(dt)
    utilisation = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
    if not files:
      raise SystemExit(f'no *.trace.json.gz under {trace_dir}: this jax wrote no trace JSON.')
    with gzip.open(files[-1]) as f:
      trace = json.load(f)
  finally:
    if tmp is not None:
      tmp.cleanup()

  times = exclusive_times(xla_thread_events(trace))
  n = args.steps
  print(f'{args.model} ({args.contender}, batch {batch_size}): median step '
        f'{1e3 * statistics.median(walls):.1f} ms over {n} traced steps; CPU utilisation '
        f'{utilisation:.2f} of {os.cpu_count()} cores (profiling adds some overhead)\n')
  kinds = by_kind(times)
  total = sum(t for _, t in kinds)
  print('thread-ms per step by op kind (exclusive):')
  for kind, t in kinds:
    if t / n >= 50:        # >= 0.05 ms
      print(f'  {t / n / 1e3:9.2f}  {100 * t / total:5.1f}%  {kind}')
  print(f'  {total / n / 1e3:9.2f}  total\n')
  print(f'the {args.top} most expensive instructions (thread-ms per step):')
  ops = sorted(((t, name) for name, t in times.items() if not name.startswith(BOOKKEEPING)),
               reverse=True)
  for t, name in ops[:args.top]:
    print(f'  {t / n / 1e3:9.2f}  {name:42s} {layers.get(name, "")[:110]}')


if __name__ == '__main__':
  main()
