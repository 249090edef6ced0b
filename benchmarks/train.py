"""Training throughput of whole models: our ops vs flax.linen.Conv (and PyTorch).

    .venv/bin/python benchmarks/train.py                   # every model, defaults
    .venv/bin/python benchmarks/train.py --quick --models lenet5,resnet20
    .venv/bin/python benchmarks/train.py --models resnet18_224 --steps 15 --plain

For each model (lenet5 and CIFAR resnet20 at 32x32, ResNet-18 at 64x64 and
224x224, VGG-11 at 64x64, GoogLeNet at 64x64 and 224x224, ResNet-50 at 224x224:
issue 9's list) it measures, in one run:

  * images/s of the full jitted training step (`cnn_jax.train.make_train_step`:
    forward, loss, backward, SGD with momentum and weight decay, BN statistics,
    metrics) with our ops (`cnn_jax.nn.Conv`, the default) and with the same
    model built with `conv=flax.linen.Conv` (XLA autodiff of `lax.conv`); the two
    JAX contenders are timed in interleaved rounds, so a burst of load from other
    processes hits both alike. `--plain` adds a third JAX contender, plain Flax:
    flax.linen.Conv *and* flax.linen's pooling, BatchNorm and Dense, since
    `conv=` swaps only the convolutions (the models' pooling, BatchNorm and
    Dense layers are always ours otherwise);
  * the same step in PyTorch (same architecture, batch, float32, SGD momentum,
    weight decay on the same tensors), when torch is importable (see below);
  * the time to trace, lower and compile the first step (our ops, flax Conv);
  * GFLOP/s of each contender (the model's FLOPs per step, by XLA's cost
    analysis of the nn.Conv step, over the median step time) against the
    machine's matmul peak, measured at the start of the same run;
  * the input pipeline's throughput (`cnn_jax.data.make_loader` with the
    model's augmentation, iterated in this process, nothing else running) and
    its ratio to what our step consumes (target: >= 5x).

Step times are per step with `jax.block_until_ready` on the new state and
metrics; the median over `--steps` timed steps (after `--warmup` untimed ones)
is reported. The batches are produced by the model's own pipeline beforehand
and cycled, so the step timing does not include the pipeline. Ratios are
ours / other in images/s: > 1 means ours trains faster.

PyTorch is optional and must not go into .venv: install it into a separate
venv and point CNN_JAX_TORCH_SITE at that venv's site-packages, which is then
appended (not prepended) to sys.path so .venv's numpy still wins:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0
    CNN_JAX_TORCH_SITE=/tmp/torchvenv/lib/python3.11/site-packages \\
        .venv/bin/python benchmarks/train.py

Torch is timed on its own after the JAX contenders of each model (two runtimes'
thread pools interleaved on two cores slow each other; see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Run as a script from anywhere (`make bench` does not set PYTHONPATH).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))   # torch_twins
if os.environ.get('CNN_JAX_TORCH_SITE'):
  sys.path.append(os.environ['CNN_JAX_TORCH_SITE'])

# Before numpy, jax or torch start a thread (cnn_jax/host.py), as launch.py
# does: freed host memory stays mapped. Both runtimes run in this process
# under the same settings. --default_malloc leaves glibc's defaults.
from cnn_jax import host as cnn_host  # noqa: E402
_KEPT_HOST_MEMORY = (__name__ == '__main__' and '--default_malloc' not in sys.argv
                     and cnn_host.keep_host_memory())

import flax.linen as flax_nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import cnn_jax.nn  # noqa: E402
from cnn_jax import data as cnn_data  # noqa: E402
from cnn_jax.data import sources as cnn_data_sources  # noqa: E402
from cnn_jax import train as cnn_train  # noqa: E402
from cnn_jax.models import get_model  # noqa: E402
from cnn_jax.ops import native  # noqa: E402

# libgomp threads otherwise spin after each parallel region and steal the
# 2 cores from the XLA steps timed right after a torch step.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
try:
  import torch  # optional comparison only
  torch.set_num_threads(os.cpu_count() or 1)
except ImportError:
  torch = None

import torch_twins  # noqa: E402  (benchmarks/torch_twins.py; imports torch lazily)

try:   # seeded augmentation specs ('pad_crop(4)|flip|normalize(cifar10)')
  from cnn_jax.data import augment as cnn_augment
except ImportError:
  cnn_augment = None


# ----------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  key: str                        # --models name
  model: str                      # registry name
  image: Tuple[int, int, int]     # (H, W, C) of one input
  batch: int
  num_classes: int
  data: str                       # 'digits' (real, embedded) or 'synthetic'
  augment: str                    # augmentation spec for cnn_jax.data.augment
  synthetic_size: int = 0         # images in the in-memory uint8 source
  steps: int = 10                 # timed steps per contender (--steps overrides)
  model_kwargs: Tuple[Tuple[str, Any], ...] = ()   # registry overrides (and the twin's)


CASES = [
    # The real offline digits (1,437 train images, 32x32x1 float).
    Case('lenet5', 'lenet5', (32, 32, 1), 128, 10, 'digits', 'pad_crop(2)', steps=20),
    # CIFAR-10 shaped: uint8 32x32x3, the standard pad-crop-flip-normalize.
    Case('resnet20', 'resnet20', (32, 32, 3), 128, 10, 'synthetic',
         'pad_crop(4)|flip|normalize(cifar10)', 2048),
    # Tiny-ImageNet shaped (200 classes) and ImageNet shaped (1000 classes).
    Case('resnet18_64', 'resnet18', (64, 64, 3), 32, 200, 'synthetic',
         'pad_crop(8)|flip|normalize(imagenet)', 1024, steps=5),
    Case('resnet18_224', 'resnet18', (224, 224, 3), 16, 1000, 'synthetic',
         'pad_crop(16)|flip|normalize(imagenet)', 128, steps=5),
    Case('vgg11_64', 'vgg11', (64, 64, 3), 16, 200, 'synthetic',
         'pad_crop(8)|flip|normalize(imagenet)', 512, steps=5),
    # At 64x64 stage 4's maps are 4x4, smaller than the aux heads' 5x5/3 pool:
    # the aux heads pool adaptively to 4x4 instead (same parameter tree).
    Case('googlenet_64', 'googlenet', (64, 64, 3), 8, 200, 'synthetic',
         'pad_crop(8)|flip|normalize(imagenet)', 256, steps=5,
         model_kwargs=(('aux_pool_size', (4, 4)),)),
    Case('googlenet_224', 'googlenet', (224, 224, 3), 8, 1000, 'synthetic',
         'pad_crop(16)|flip|normalize(imagenet)', 64, steps=5),
    # Mostly for the first step's compile time (the resnet50 target).
    Case('resnet50_224', 'resnet50', (224, 224, 3), 16, 1000, 'synthetic',
         'pad_crop(16)|flip|normalize(imagenet)', 64, steps=3),
]
CASES_BY_KEY = {c.key: c for c in CASES}

# SGD with momentum and L2 weight decay on kernels (ndim >= 2), as torch below.
OPTIMIZER = dict(name='momentum', lr=0.01, momentum=0.9, weight_decay=5e-4)


# ----------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------

class SyntheticSource:
  """In-memory random uint8 images and int labels: a random-access source of
  tfds-style records {'image': (H, W, C) uint8, 'label': int64} for the shapes
  whose catalog datasets are not available offline. Pixels and labels are
  seeded; their values do not matter for speed."""

  def __init__(self, size: int, image: Tuple[int, int, int], num_classes: int, seed=0):
    rng = np.random.default_rng(seed)
    self._images = rng.integers(0, 256, (size, *image), dtype=np.uint8)
    self._labels = rng.integers(0, num_classes, size).astype(np.int64)

  def __len__(self):
    return len(self._images)

  def __getitem__(self, i):
    return {'image': self._images[i], 'label': self._labels[i]}


def _inline_pad_crop_flip(pad: int, flip: bool):
  """Stand-in for cnn_jax.data.augment when it is not importable: random
  zero-pad-and-crop by `pad` pixels and a random horizontal flip, in numpy."""
  def fn(example, rng: np.random.Generator):
    img = example['image']
    h, w = img.shape[:2]
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, 2)
    img = padded[top:top + h, left:left + w]
    if flip and rng.random() < 0.5:
      img = img[:, ::-1]
    return {**example, 'image': np.ascontiguousarray(img)}
  return fn


def random_transform_for(spec: str):
  """(fn(example, rng), description): the augmentation the pipeline runs."""
  if cnn_augment is not None:
    return cnn_augment.make_transform(spec), spec
  pad = 0
  for part in spec.split('|'):
    if part.startswith('pad_crop('):
      pad = int(part[len('pad_crop('):-1])
  flip = 'flip' in spec.split('|')
  desc = f'inline numpy pad_crop({pad}){"|flip" if flip else ""} (augment.py not found)'
  return _inline_pad_crop_flip(pad, flip), desc


def train_iterator(loader):
  """The iterator the training loop (cnn_jax/train/loop.py) reads batches from."""
  read_options = getattr(cnn_data_sources, 'read_options', None)
  if read_options is None:
    return iter(loader)
  return iter(loader.to_iter_dataset(read_options()))


def make_source(case: Case, data_dir: Optional[str]):
  if case.data == 'digits':
    with contextlib.redirect_stdout(io.StringIO()):   # tfds' 'preparing' lines
      return cnn_data.get_source('digits', 'train', data_dir)
  return SyntheticSource(case.synthetic_size, case.image, case.num_classes)


def make_pipeline(case: Case, data_dir: Optional[str]):
  source = make_source(case, data_dir)
  fn, desc = random_transform_for(case.augment)
  loader = cnn_data.make_loader(source, batch_size=case.batch, seed=0, random_transform=fn)
  return loader, desc


def pipeline_throughput(loader, batch: int, seconds: float, min_batches: int
                        ) -> Tuple[float, float]:
  """Images/s of the loader, nothing else running, two ways:

  * iterated as the training loop does: `loader.to_iter_dataset(
    cnn_jax.data.sources.read_options())`, reader threads prefetching whole
    batches (sharing the GIL), or plain `iter(loader)` (grain's default, 16
    threads) where read_options does not exist;
  * indexed, `loader[i]` for consecutive steps, synchronous in this thread
    (the random-access path a resumable loop can use).

  Each runs for at least `seconds` and `min_batches` batches after two untimed
  ones; the iterator is closed afterwards so its threads stop competing with
  whatever is timed next."""
  def timed(next_batch):
    next_batch()
    next_batch()
    n, t0 = 0, time.perf_counter()
    while n < min_batches or time.perf_counter() - t0 < seconds:
      b = next_batch()
      assert b['image'].shape[0] == batch
      n += 1
    return n * batch / (time.perf_counter() - t0)

  it = train_iterator(loader)
  try:
    iterated = timed(lambda: next(it))
  finally:
    if hasattr(it, 'close'):
      it.close()
  steps = itertools.count()      # the loader repeats forever (num_epochs=None)
  indexed = timed(lambda: loader[next(steps)])
  return iterated, indexed


# ----------------------------------------------------------------------------
# JAX contenders
# ----------------------------------------------------------------------------

class _FlaxMaxPool(flax_nn.Module):
  """flax.linen.max_pool with cnn_jax.nn.MaxPool's constructor (plain Flax)."""
  window_shape: Any
  strides: Any = None
  padding: Any = 'VALID'

  def __call__(self, x):
    nd = x.ndim - 2
    as_tuple = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)
    window = as_tuple(self.window_shape)
    strides = window if self.strides is None else as_tuple(self.strides)
    padding = self.padding
    if isinstance(padding, int):
      padding = ((padding, padding),) * nd
    return flax_nn.max_pool(x, window, strides, padding)


class _FlaxGlobalAvgPool(flax_nn.Module):
  keepdims: bool = False

  def __call__(self, x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=self.keepdims)


_FlaxMaxPool.__name__ = 'MaxPool'          # same auto-names as ours
_FlaxGlobalAvgPool.__name__ = 'GlobalAvgPool'


@contextlib.contextmanager
def _flax_pooling():
  """While tracing: cnn_jax.nn.MaxPool/GlobalAvgPool -> flax.linen's pooling,
  cnn_jax.nn.BatchNorm and cnn_jax.nn.Dense (explicit backwards) ->
  flax.linen.BatchNorm and flax.linen.Dense.

  The models look the layer classes up on the cnn_jax.nn module when called,
  so swapping them for the duration of the trace builds a plain-Flax program."""
  names = ('MaxPool', 'GlobalAvgPool', 'BatchNorm', 'Dense')
  saved = [getattr(cnn_jax.nn, k) for k in names]
  for k, layer in zip(names, (_FlaxMaxPool, _FlaxGlobalAvgPool, flax_nn.BatchNorm,
                              flax_nn.Dense)):
    setattr(cnn_jax.nn, k, layer)
  try:
    yield
  finally:
    for k, layer in zip(names, saved):
      setattr(cnn_jax.nn, k, layer)


@dataclasses.dataclass
class JaxContender:
  name: str
  conv: Any
  flax_pooling: bool = False
  no_native: bool = False         # trace with cnn_jax.ops.native switched off
  compile_s: float = float('nan')
  flops: float = float('nan')     # XLA's count for the compiled step
  num_params: int = 0
  step: Optional[Callable] = None
  state: Any = None
  times: List[float] = dataclasses.field(default_factory=list)


def build_jax(c: JaxContender, case: Case, batch0: Dict[str, jax.Array]):
  """Init state, then trace+lower+compile the step (timed as compile_s)."""
  model = get_model(case.model, num_classes=case.num_classes, conv=c.conv,
                    **dict(case.model_kwargs))
  tx, schedule = cnn_train.make_optimizer(OPTIMIZER)
  ctx = _flax_pooling() if c.flax_pooling else contextlib.nullcontext()
  native_ctx = native.disabled() if c.no_native else contextlib.nullcontext()
  with ctx, native_ctx:
    state = cnn_train.create_train_state(model, tx, case.image, jax.random.key(0))
    jax.block_until_ready(state)
    step = cnn_train.make_train_step(None, schedule)
    t0 = time.perf_counter()
    c.step = step.lower(state, batch0).compile()
    c.compile_s = time.perf_counter() - t0
  if c.no_native and 'cnn_jax_' in c.step.as_text():
    raise RuntimeError(f'{c.name}: the native kernels were traced in despite native.disabled()')
  c.flops = compiled_flops(c.step)
  c.state = state
  c.num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))


def compiled_flops(compiled) -> float:
  """Floating-point operations of one call of a compiled step, by XLA's cost
  analysis (a multiply-add counts 2), or nan where the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float('nan')
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def matmul_peak(size: int = 2048, rounds: int = 5) -> Dict[str, float]:
  """GFLOP/s of a float32 (size x size) @ (size x size) product: jnp.dot through
  XLA, and torch.mm when torch is importable (min time of `rounds`)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), dtype=np.float32)
  b = rng.standard_normal((size, size), dtype=np.float32)
  flop = 2.0 * size ** 3

  def best(fn):
    fn()
    fn()
    ts = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
    return flop / min(ts) / 1e9

  ja, jb = jnp.asarray(a), jnp.asarray(b)
  dot = jax.jit(jnp.dot)
  out = {'jax': best(lambda: jax.block_until_ready(dot(ja, jb)))}
  if torch is not None:
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out['torch'] = best(lambda: torch.mm(ta, tb))
  return out


def run_jax_step(c: JaxContender, batch) -> float:
  t0 = time.perf_counter()
  c.state, metrics = c.step(c.state, batch)
  jax.block_until_ready((c.state, metrics))
  return time.perf_counter() - t0


# ----------------------------------------------------------------------------
# PyTorch: the same architectures
# ----------------------------------------------------------------------------

def torch_model(case: Case):
  """The registry model `case.model` written in torch.nn (same layers, shapes,
  padding, shortcuts and BN settings)."""
  tnn = torch.nn
  F = torch.nn.functional
  assert not case.model_kwargs or case.model in torch_twins.TWINS, case

  def bn(c):       # flax momentum 0.9 == torch 0.1; eps 1e-5 both
    return tnn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

  class LeNet5(tnn.Module):
    # 'lenet5': conv 6@5x5 VALID, ReLU, max 2x2, conv 16@5x5, ReLU, max 2x2,
    # conv 120@5x5, ReLU, dense 84, ReLU, dense classes. (Ours applies ReLU
    # again after each pool, which changes nothing.)
    def __init__(self, c_in, classes):
      super().__init__()
      self.c1, self.c3 = tnn.Conv2d(c_in, 6, 5), tnn.Conv2d(6, 16, 5)
      self.c5 = tnn.Conv2d(16, 120, 5)
      self.f6, self.out = tnn.Linear(120, 84), tnn.Linear(84, classes)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.c1(x)), 2)
      x = F.max_pool2d(F.relu(self.c3(x)), 2)
      x = F.relu(self.c5(x)).flatten(1)
      return self.out(F.relu(self.f6(x)))

  class Basic(tnn.Module):
    # Post-activation basic block; shortcut 'A' (subsample + zero-pad channels,
    # parameter-free) or 'B' (1x1 conv + BN where the shape changes).
    def __init__(self, c_in, c_out, stride, shortcut):
      super().__init__()
      self.conv1 = tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
      self.bn1 = bn(c_out)
      self.conv2 = tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
      self.bn2 = bn(c_out)
      self.stride, self.extra = stride, c_out - c_in
      self.proj = None
      if shortcut == 'B' and (stride != 1 or c_in != c_out):
        self.proj = tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.proj is not None:
        s = self.proj(x)
      else:
        s = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra:
          s = F.pad(s, (0, 0, 0, 0, 0, self.extra))
      return F.relu(y + s)

  class Bottleneck(tnn.Module):
    # 1x1 reduce, 3x3 (stride here), 1x1 expand x4, projection 'B' shortcut.
    expansion = 4

    def __init__(self, c_in, width, stride, shortcut):
      super().__init__()
      del shortcut   # ResNet-50 always projects where the shape changes
      c_out = 4 * width
      self.conv1, self.bn1 = tnn.Conv2d(c_in, width, 1, bias=False), bn(width)
      self.conv2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = bn(width)
      self.conv3, self.bn3 = tnn.Conv2d(width, c_out, 1, bias=False), bn(c_out)
      self.proj = None
      if stride != 1 or c_in != c_out:
        self.proj = tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return F.relu(y + (x if self.proj is None else self.proj(x)))

  class ResNet(tnn.Module):
    def __init__(self, c_in, classes, stem, widths, blocks, shortcut, block=Basic):
      super().__init__()
      if stem == 'imagenet':     # 7x7/2 conv, BN, ReLU, 3x3/2 max pool (pad 1)
        self.stem = tnn.Sequential(tnn.Conv2d(c_in, widths[0], 7, 2, 3, bias=False),
                                   bn(widths[0]), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1))
      else:                      # CIFAR: 3x3 conv, BN, ReLU
        self.stem = tnn.Sequential(tnn.Conv2d(c_in, widths[0], 3, 1, 1, bias=False),
                                   bn(widths[0]), tnn.ReLU())
      layers, c = [], widths[0]
      expansion = getattr(block, 'expansion', 1)
      for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
          layers.append(block(c, w, 2 if (i > 0 and j == 0) else 1, shortcut))
          c = w * expansion
      self.layers = tnn.Sequential(*layers)
      self.fc = tnn.Linear(c, classes)

    def forward(self, x):
      x = self.layers(self.stem(x))
      return self.fc(x.mean(dim=(2, 3)))

  c_in = case.image[2]
  if case.model == 'lenet5':
    return LeNet5(c_in, case.num_classes)
  if case.model == 'resnet20':
    return ResNet(c_in, case.num_classes, 'cifar', (16, 32, 64), (3, 3, 3), 'A')
  if case.model == 'resnet18':
    return ResNet(c_in, case.num_classes, 'imagenet', (64, 128, 256, 512), (2, 2, 2, 2), 'B')
  if case.model == 'resnet50':
    return ResNet(c_in, case.num_classes, 'imagenet', (64, 128, 256, 512), (3, 4, 6, 3), 'B',
                  block=Bottleneck)
  if case.model in ('vgg11', 'googlenet'):
    return torch_twins.TWINS[case.model](torch, c_in, case.num_classes, case.image[:2],
                                         **dict(case.model_kwargs))
  raise ValueError(f'no torch twin of {case.model!r}')


def torch_step(case: Case, channels_last: bool):
  """(a closure running one torch training step on (x, y), parameter count)."""
  model = torch_model(case)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  model.train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.SGD([{'params': decay, 'weight_decay': OPTIMIZER['weight_decay']},
                         {'params': no_decay, 'weight_decay': 0.0}],
                        lr=OPTIMIZER['lr'], momentum=OPTIMIZER['momentum'])

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    # GoogLeNet's twin returns (logits, aux1, aux2) in training: CE + 0.3 * aux CEs,
    # as our train step's loss.
    loss = torch_twins.loss(torch, model(x), y)
    loss.backward()
    opt.step()
    return loss
  return step, sum(p.numel() for p in model.parameters())


def to_torch(batch, channels_last: bool):
  x = torch.from_numpy(np.asarray(batch['image'])).permute(0, 3, 1, 2)
  x = x.contiguous(memory_format=torch.channels_last if channels_last
                   else torch.contiguous_format)
  return x, torch.from_numpy(np.asarray(batch['label']).astype(np.int64))


# ----------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
  case: Case
  ips: Dict[str, float]           # images/s by contender
  ms: Dict[str, float]            # median ms/step
  spread: Dict[str, float]        # max/min - 1 of the timed steps
  compile_s: Dict[str, float]
  flops: float                    # per step: XLA's count for the nn.Conv step
  pipeline_iter: float            # images/s, iterated as the loop does (threads)
  pipeline_index: float           # images/s, loader[step] in this thread
  augment: str


def bench_case(case: Case, args) -> Result:
  batch = args.batch or case.batch
  steps = args.steps or case.steps
  case = dataclasses.replace(case, batch=batch, steps=steps)
  loader, augment_desc = make_pipeline(case, args.data_dir)
  print(f'-- {case.key}: {case.model}, batch {batch} x {"x".join(map(str, case.image))}, '
        f'{case.num_classes} classes, {case.data} data, augment {augment_desc}; '
        f'{steps} timed steps', flush=True)

  # A few batches from the pipeline, cycled by every contender.
  host_batches = [loader[i] for i in range(args.num_batches)]
  batches = [jax.device_put(b) for b in host_batches]   # image, label (and mask)

  contenders = [JaxContender('ours', cnn_jax.nn.Conv),
                JaxContender('nn.Conv', flax_nn.Conv)]
  if args.plain:
    contenders.append(JaxContender('plain', flax_nn.Conv, flax_pooling=True))
  if args.jax_only:
    contenders.append(JaxContender('ours-jax', cnn_jax.nn.Conv, no_native=True))
  for c in contenders:
    build_jax(c, case, batches[0])
  print(f'   {contenders[0].num_params:,} parameters', flush=True)
  for i in range(args.warmup):
    for c in contenders:
      run_jax_step(c, batches[i % len(batches)])
  for i in range(steps):          # interleaved: one step of each per round
    for c in contenders:
      c.times.append(run_jax_step(c, batches[i % len(batches)]))

  times = {c.name: c.times for c in contenders}
  compile_s = {c.name: c.compile_s for c in contenders}
  # The model's arithmetic: XLA's count for the nn.Conv step (its convolutions
  # and their autodiff are counted exactly; ours hides its backward GEMMs in
  # scan loops, which cost analysis counts once, not per trip).
  flops = contenders[1].flops
  for c in contenders:            # free the states before torch runs
    c.state = c.step = None

  if torch is not None and not args.no_torch:
    tstep, torch_params = torch_step(case, args.torch_channels_last)
    if torch_params != contenders[0].num_params:
      print(f'   note: torch twin has {torch_params:,} parameters, ours '
            f'{contenders[0].num_params:,}')
    tb = [to_torch(b, args.torch_channels_last) for b in host_batches]
    for i in range(args.warmup):
      tstep(*tb[i % len(tb)])
    times['torch'] = []
    for i in range(steps):
      t0 = time.perf_counter()
      tstep(*tb[i % len(tb)])
      times['torch'].append(time.perf_counter() - t0)

  ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  ips = {k: batch / (m / 1e3) for k, m in ms.items()}
  spread = {k: max(v) / min(v) - 1 for k, v in times.items()}
  pipe_iter, pipe_index = pipeline_throughput(loader, batch, args.pipeline_seconds,
                                              min_batches=3)
  return Result(case, ips, ms, spread, compile_s, flops, pipe_iter, pipe_index,
                augment_desc)


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def _table(header, rows):
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: '  '.join(str(c).rjust(w) if i else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  print(line(header))
  print('  '.join('-' * w for w in widths))
  for r in rows:
    print(line(r))
  print(flush=True)


def _f(v: Optional[float], fmt='{:.1f}') -> str:
  return '-' if v is None else fmt.format(v)


def gflops(r: Result, name: str) -> float:
  """Achieved GFLOP/s of contender `name`: the model's FLOPs per step over its
  median step time."""
  return r.flops / (r.ms[name] / 1e3) / 1e9


def report(r: Result, peak: Dict[str, float]):
  names = list(r.ips)
  rows = [[n, _f(r.ips[n]), _f(r.ms[n]), f'{100 * r.spread[n]:.0f}%',
           _f(r.compile_s.get(n), '{:.1f}'), _f(gflops(r, n)),
           _f(100 * gflops(r, n) / peak['jax'], '{:.0f}%'),
           _f(r.ips['ours'] / r.ips[n], '{:.2f}')]
          for n in names]
  print(f'{r.flops / 1e9:.2f} GFLOP per step ({r.flops / 1e9 / r.case.batch:.2f} per image)')
  _table(['contender', 'images/s', 'ms/step', 'spread', 'compile s', 'GFLOP/s',
          'of peak', 'ours/this'], rows)
  need = r.ips['ours']
  print(f'pipeline, images/s: iterated {r.pipeline_iter:.0f} = '
        f'{r.pipeline_iter / need:.1f}x, loader[step] {r.pipeline_index:.0f} = '
        f'{r.pipeline_index / need:.1f}x what our step consumes ({need:.1f} images/s); '
        f'target >= 5x\n', flush=True)


def summary(results: Sequence[Result], peak: Dict[str, float]):
  have_torch = any('torch' in r.ips for r in results)
  have_plain = any('plain' in r.ips for r in results)
  have_jax = any('ours-jax' in r.ips for r in results)
  header = ['model', 'batch', 'ours img/s', 'nn.Conv img/s']
  header += ['plain img/s'] if have_plain else []
  header += ['torch img/s'] if have_torch else []
  header += ['ours/nn.Conv'] + (['ours/plain'] if have_plain else [])
  header += ['ours/ours-jax'] if have_jax else []
  header += ['ours/torch'] if have_torch else []
  header += ['GFLOP/s ours'] + (['GFLOP/s torch'] if have_torch else [])
  header += ['compile ours s', 'compile nn.Conv s']
  header += ['compile plain s', 'compile ours/plain'] if have_plain else []
  header += ['pipe iter img/s', 'iter/step',
             'pipe index img/s', 'index/step']
  rows = []
  for r in results:
    ips = r.ips
    row = [r.case.key, r.case.batch, _f(ips['ours']), _f(ips['nn.Conv'])]
    row += [_f(ips.get('plain'))] if have_plain else []
    row += [_f(ips.get('torch'))] if have_torch else []
    row += [_f(ips['ours'] / ips['nn.Conv'], '{:.2f}')]
    if have_plain:
      row += [_f(ips['ours'] / ips['plain'], '{:.2f}') if 'plain' in ips else '-']
    if have_jax:
      row += [_f(ips['ours'] / ips['ours-jax'], '{:.2f}') if 'ours-jax' in ips else '-']
    if have_torch:
      row += [_f(ips['ours'] / ips['torch'], '{:.2f}') if 'torch' in ips else '-']
    row += [_f(gflops(r, 'ours'))]
    row += [_f(gflops(r, 'torch')) if 'torch' in ips else '-'] if have_torch else []
    row += [_f(r.compile_s['ours']), _f(r.compile_s['nn.Conv'])]
    if have_plain:
      row += [_f(r.compile_s.get('plain')),
              _f(r.compile_s['ours'] / r.compile_s['plain'], '{:.2f}')
              if 'plain' in r.compile_s else '-']
    row += [_f(r.pipeline_iter, '{:.0f}'), _f(r.pipeline_iter / ips['ours'], '{:.1f}x'),
            _f(r.pipeline_index, '{:.0f}'), _f(r.pipeline_index / ips['ours'], '{:.1f}x')]
    rows.append(row)
  print('== summary: training step images/s (median), ratios ours/other (> 1: ours faster)')
  _table(header, rows)
  print('matmul peak (float32 2048^3, same run): ' +
        ', '.join(f'{k} {v:.1f} GFLOP/s' for k, v in peak.items()))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(CASES_BY_KEY),
                      help='comma-separated: ' + ','.join(CASES_BY_KEY))
  parser.add_argument('--steps', type=int, default=0,
                      help='timed steps per contender (default: per model, 5-20)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compile')
  parser.add_argument('--batch', type=int, default=0, help='override every model\'s batch')
  parser.add_argument('--num_batches', type=int, default=4,
                      help='distinct pipeline batches cycled through the timed steps')
  parser.add_argument('--pipeline_seconds', type=float, default=3.0,
                      help='how long to iterate each input pipeline')
  parser.add_argument('--plain', action='store_true',
                      help='also time plain Flax (flax.linen Conv, pooling, BatchNorm and Dense)')
  parser.add_argument('--jax_only', action='store_true',
                      help='also time our ops with the native CPU kernels switched off '
                           '(contender ours-jax: the pure-JAX formulations)')
  parser.add_argument('--no_torch', action='store_true', help='skip PyTorch even if importable')
  parser.add_argument('--torch_channels_last', action='store_true',
                      help='run torch in channels_last memory format (default: NCHW)')
  parser.add_argument('--data_dir', default=None,
                      help='tfds data dir for the embedded digits (default: a temp dir)')
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: 2 timed steps, 1 warm-up, 0.5 s of pipeline')
  parser.add_argument('--default_malloc', action='store_true',
                      help="leave glibc's malloc settings as they are (by default the run "
                           "keeps freed host memory, as launch.py does: cnn_jax/host.py)")
  args = parser.parse_args(argv)
  kept = _KEPT_HOST_MEMORY and not args.default_malloc
  if args.quick:
    args.steps, args.warmup, args.pipeline_seconds = 2, 1, 0.5
  keys = [k.strip() for k in args.models.split(',') if k.strip()]
  bad = [k for k in keys if k not in CASES_BY_KEY]
  if bad:
    parser.error(f'unknown model(s) {bad}; choose from {list(CASES_BY_KEY)}')

  load = os.getloadavg()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; '
        f'torch {torch.__version__ if torch is not None else "not importable"}'
        f'{" (skipped)" if torch is not None and args.no_torch else ""}; '
        f'median of {args.steps or "5-20"} steps after {args.warmup} warm-up; load average '
        f'{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; freed host memory '
        f'{"kept (cnn_jax/host.py)" if kept else "returned (malloc defaults)"}.\n',
        flush=True)
  tfds.disable_progress_bar()
  absl_logging.set_verbosity(absl_logging.ERROR)   # tfds' notes while preparing digits
  tmp = None
  if args.data_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix='cnn_jax_bench_')
    args.data_dir = tmp.name
  # One small jit first, so the first model's compile time carries no
  # backend start-up.
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(())))
  peak = matmul_peak()
  print('matmul peak (float32 2048^3): ' +
        ', '.join(f'{k} {v:.1f} GFLOP/s' for k, v in peak.items()) + '\n', flush=True)
  results = []
  try:
    for key in keys:
      results.append(bench_case(CASES_BY_KEY[key], args))
      report(results[-1], peak)
  finally:
    if tmp is not None:
      tmp.cleanup()
  summary(results, peak)
  load = os.getloadavg()
  print(f'load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}')


if __name__ == '__main__':
  main()
