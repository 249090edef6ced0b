"""PyTorch twins of registry models, for the torch contender of benchmarks/train.py.

Each factory takes the torch module as its first argument (torch is optional and
lives in a separate venv, so this file never imports it) and returns a
`torch.nn.Module` with the same layers, shapes, padding, pooling and biases as
`cnn_jax.models.get_model(name, num_classes=...)`, the same parameter count and,
with our weights copied in, the same outputs (see "Weight copies" below).

  * `vgg11(torch, c_in, num_classes, image_hw)` twins `get_model('vgg11')`
    (configuration A, no BN): convs 64 | 128 | 256 256 | 512 512 | 512 512, each
    3x3 stride 1 pad 1 with bias, + ReLU; a 2x2/2 floor max pool ends each block;
    AdaptiveAvgPool2d((7, 7)); FC 4096, ReLU, dropout 0.5, FC 4096, ReLU,
    dropout 0.5, FC num_classes. The adaptive pool makes the head independent of
    the input size: at 64x64 the features are 2x2x512 and are pooled "up" to 7x7
    (every bin repeats cells, as ours and torch's AdaptiveAvgPool2d both do), so
    fc1 has 25088 inputs at any size >= 32x32 and the parameter count does not
    depend on image_hw (129,585,736 at 200 classes, 128,807,306 at 10,
    132,863,336 at 1000).

  * `googlenet(torch, c_in, num_classes, image_hw)` twins `get_model('googlenet')`
    (the paper's Inception v1, not `googlenet_bn`): every conv has a bias and is
    followed by ReLU, no BN; conv1 7x7/2 pad 3; 3x3/2 max pools in ceil mode
    (Caffe's; torch ceil_mode=True gives the same sizes and windows as our
    `max_pool_ceil`); LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1) after pool1
    and after conv2 (ours is LRN(size=5, k=1, alpha=1e-4/5): ours multiplies the
    window sum, torch's averages it); 1x1 conv2_reduce, 3x3 conv2 pad 1; Inception
    modules 3a-5b with branch order 1x1 | 1x1->3x3 | 1x1->5x5 (a real 5x5, pad 2) |
    3x3/1 max pool pad 1 -> 1x1; a 3x3/2 ceil max pool between stages (also before
    5a); global average pool, dropout 0.4, FC num_classes. Two auxiliary heads
    after 4a and 4d: AvgPool2d(5, 3) (VALID), 1x1 conv 128 + ReLU, flatten, FC 1024
    + ReLU, dropout 0.7, FC num_classes. 13,378,280 parameters at 224x224 and 1000
    classes (aux heads included; 6,998,552 without them).

GoogLeNet's auxiliary heads, training and evaluation. Ours builds the aux heads'
parameters at every init (so they are in the parameter count) but runs them only
with train=True, where it sows their logits as intermediates 'aux1_logits' and
'aux2_logits'; `cnn_jax.train.steps.compute_loss` then trains on
    loss = CE(logits) + aux_weight * (CE(aux1_logits) + CE(aux2_logits)),
aux_weight 0.3 (the paper's; the train config's default). The twin does the same
thing torchvision's does: in `.train()` mode it returns the tuple
(logits, aux1_logits, aux2_logits), in `.eval()` mode the logits alone. Use
`loss(torch, model(x), y)` below for the training loss: it is exactly that sum
for a tuple, and plain cross entropy for a tensor, so one call serves every twin.

GoogLeNet at 64x64: our `googlenet` cannot run there with its aux heads. The
stem takes 64 -> 32 (conv1) -> 16 -> 8 (ceil pools), stage 4 is 4x4, and the aux
heads' 5x5/3 VALID average pool does not fit a 4x4 map: our model raises a
ValueError at init. The twin refuses such sizes too (ValueError at construction,
as torch's AvgPool2d would fail at the first forward). Two ways to run it, each
available in both models with the same argument:
    get_model('googlenet', num_classes=n, aux_logits=False)
        <-> googlenet(torch, 3, n, (64, 64), aux_logits=False)      (6,998,552 at 1000)
    get_model('googlenet', num_classes=n, aux_pool_size=(4, 4))
        <-> googlenet(torch, 3, n, (64, 64), aux_pool_size=(4, 4))  (13,378,280 at 1000)
The second replaces the aux heads' 5x5/3 pool by an adaptive average pool to
4x4 (torchvision's aux heads; the identity on a 4x4 map), which keeps the
parameter tree and the count of the 224x224 model (at 200 classes: 6,178,552
without aux heads, 10,918,280 with them). At 224x224 both 4a and 4d
are 14x14 and the paper's pool gives 4x4 (2048 inputs to the aux fc1).

Weight copies (tested by a script outside the repo that copies initialised Flax
parameters into these twins and compares logits, aux logits, losses and
gradients): conv kernels HWIO -> OIHW (`k.transpose(3, 2, 0, 1)`), dense kernels
(in, out) -> (out, in); and the two dense layers that read a flattened map (VGG
fc1, GoogLeNet aux fc1) see it in (C, H, W) order here and in (H, W, C) order in
ours, so their rows are permuted: `k.reshape(h, w, c, out).transpose(3, 2, 0, 1)
.reshape(out, -1)`. Module names follow ours: VGG 'features_block{b}_conv{c}',
'fc1'..'fc3'; GoogLeNet 'conv1', 'conv2_reduce', 'conv2', 'inception3a'..'5b'
(each with 'conv1x1', 'conv3x3_reduce', 'conv3x3', 'conv5x5_reduce',
'conv5x5', 'pool_proj'), 'aux1', 'aux2' (each 'conv', 'fc1', 'fc2') and 'fc';
ours nests each GoogLeNet conv one level deeper ('<unit>/conv/kernel').

Dropout masks and the random init are of course not shared; neither affects the
cost of a step. Both models are float32 and BN-free, so there are no running
statistics to match.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

# Conv widths per VGG-11 block (configuration A); each block ends in a max pool.
VGG11_BLOCKS: Tuple[Tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512))

# GoogLeNet's Inception rows (the paper's Table 1: #1x1, #3x3 reduce, #3x3,
# #5x5 reduce, #5x5, pool proj), grouped by the max pools between the groups.
INCEPTION_V1 = (
    (('3a', (64, 96, 128, 16, 32, 32)),
     ('3b', (128, 128, 192, 32, 96, 64))),
    (('4a', (192, 96, 208, 16, 48, 64)),
     ('4b', (160, 112, 224, 24, 64, 64)),
     ('4c', (128, 128, 256, 24, 64, 64)),
     ('4d', (112, 144, 288, 32, 64, 64)),
     ('4e', (256, 160, 320, 32, 128, 128))),
    (('5a', (256, 160, 320, 32, 128, 128)),
     ('5b', (384, 192, 384, 48, 128, 128))),
)
GOOGLENET_AUX_AFTER = ('4a', '4d')
GOOGLENET_AUX_WEIGHT = 0.3      # cnn_jax.train config default 'aux_weight'


def _hw(image_hw) -> Tuple[int, int]:
  h, w = (image_hw, image_hw) if isinstance(image_hw, int) else tuple(image_hw)[:2]
  return int(h), int(w)


def _ceil_pool_out(n: int, window: int, stride: int) -> int:
  """Output length of a ceil-mode max pool without padding (ours and torch's)."""
  out = -(-(n - window) // stride) + 1
  if (out - 1) * stride >= n:          # a window starting past the input is dropped
    out -= 1
  return out


def vgg11(torch, c_in: int, num_classes: int, image_hw, *, dropout: float = 0.5):
  """Twin of `get_model('vgg11', num_classes=num_classes)` for (N, c_in, H, W) inputs.

  Output: logits (N, num_classes) in both modes. dropout: the rate after fc1 and
  fc2 (ours: `dropout_rate`, 0.5).
  """
  tnn, F = torch.nn, torch.nn.functional
  h, w = _hw(image_hw)
  if min(h, w) < 2 ** len(VGG11_BLOCKS):
    raise ValueError(f'vgg11 needs inputs of at least 32x32 (five 2x2 pools), got {h}x{w}.')

  class VGG11(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv_names = []
      c = c_in
      for b, widths in enumerate(VGG11_BLOCKS, start=1):
        names = []
        for j, features in enumerate(widths, start=1):
          name = f'features_block{b}_conv{j}'
          self.add_module(name, tnn.Conv2d(c, features, 3, 1, 1, bias=True))
          names.append(name)
          c = features
        self.conv_names.append(names)
      self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
      self.fc1 = tnn.Linear(c * 7 * 7, 4096)
      self.fc2 = tnn.Linear(4096, 4096)
      self.fc3 = tnn.Linear(4096, num_classes)
      self.dropout1, self.dropout2 = tnn.Dropout(dropout), tnn.Dropout(dropout)

    def forward(self, x):
      for names in self.conv_names:
        for name in names:
          x = F.relu(getattr(self, name)(x), inplace=True)
        x = F.max_pool2d(x, 2, 2)
      x = self.avgpool(x).flatten(1)           # (C, H, W) order; ours (H, W, C)
      x = self.dropout1(F.relu(self.fc1(x), inplace=True))
      x = self.dropout2(F.relu(self.fc2(x), inplace=True))
      return self.fc3(x)

  return VGG11()


def googlenet(torch, c_in: int, num_classes: int, image_hw, *, aux_logits: bool = True,
              aux_pool_size: Optional[Sequence[int]] = None, dropout: float = 0.4,
              aux_dropout: float = 0.7):
  """Twin of `get_model('googlenet', num_classes=num_classes, aux_logits=...,
  aux_pool_size=...)` for (N, c_in, H, W) inputs (keyword defaults are ours).

  Output: in .train() mode with aux_logits, (logits, aux1_logits, aux2_logits),
  to be combined with `loss` below; otherwise the logits (N, num_classes).
  aux_pool_size None: the paper's AvgPool 5x5/3 in the aux heads (needs the
  4a/4d maps to be at least 5x5, i.e. inputs of about 65x65 and more); (h, w):
  adaptive average pooling to that size instead. dropout / aux_dropout: ours
  `dropout_rate` / `aux_dropout_rate`.
  """
  tnn, F = torch.nn, torch.nn.functional
  h, w = _hw(image_hw)

  # Spatial sizes through the stem and the stages (ours raises on the same sizes).
  def stem(n):
    n = (n + 2 * 3 - 7) // 2 + 1                  # conv1 7x7/2 pad 3
    return _ceil_pool_out(_ceil_pool_out(n, 3, 2), 3, 2)
  sizes = []                                      # (h, w) of each stage
  sh, sw = stem(h), stem(w)
  for i in range(len(INCEPTION_V1)):
    if i:
      sh, sw = _ceil_pool_out(sh, 3, 2), _ceil_pool_out(sw, 3, 2)
    if sh < 1 or sw < 1:
      raise ValueError(f'googlenet: input {h}x{w} is too small.')
    sizes.append((sh, sw))
  # Aux heads read stage 2 (4a and 4d).
  aux_hw = None
  if not aux_logits:
    pass
  elif aux_pool_size is not None:
    aux_hw = tuple(int(a) for a in aux_pool_size)
  else:
    ah, aw = sizes[1]
    if min(ah, aw) < 5:
      raise ValueError(
          f'googlenet: at {h}x{w} the aux heads see {ah}x{aw} maps, smaller than their '
          '5x5/3 average pool (ours raises too); pass aux_logits=False or '
          'aux_pool_size=(4, 4) (and the same to get_model).')
    aux_hw = ((ah - 5) // 3 + 1, (aw - 5) // 3 + 1)

  class Inception(tnn.Module):
    def __init__(self, c, row):
      super().__init__()
      c1, c3r, c3, c5r, c5, pp = row
      self.conv1x1 = tnn.Conv2d(c, c1, 1)
      self.conv3x3_reduce = tnn.Conv2d(c, c3r, 1)
      self.conv3x3 = tnn.Conv2d(c3r, c3, 3, padding=1)
      self.conv5x5_reduce = tnn.Conv2d(c, c5r, 1)
      self.conv5x5 = tnn.Conv2d(c5r, c5, 5, padding=2)
      self.pool_proj = tnn.Conv2d(c, pp, 1)
      self.out_channels = c1 + c3 + c5 + pp

    def forward(self, x):
      relu = lambda t: F.relu(t, inplace=True)   # noqa: E731  (fresh conv outputs only)
      b1 = relu(self.conv1x1(x))
      b2 = relu(self.conv3x3(relu(self.conv3x3_reduce(x))))
      b3 = relu(self.conv5x5(relu(self.conv5x5_reduce(x))))
      b4 = relu(self.pool_proj(F.max_pool2d(x, 3, 1, 1)))
      return torch.cat([b1, b2, b3, b4], 1)

  class AuxHead(tnn.Module):
    def __init__(self, c):
      super().__init__()
      self.conv = tnn.Conv2d(c, 128, 1)
      self.fc1 = tnn.Linear(128 * aux_hw[0] * aux_hw[1], 1024)
      self.fc2 = tnn.Linear(1024, num_classes)
      self.dropout = tnn.Dropout(aux_dropout)

    def forward(self, x):
      if aux_pool_size is not None:
        x = F.adaptive_avg_pool2d(x, aux_hw)
      else:
        x = F.avg_pool2d(x, 5, 3)
      x = F.relu(self.conv(x), inplace=True).flatten(1)   # (C, H, W); ours (H, W, C)
      x = self.dropout(F.relu(self.fc1(x), inplace=True))
      return self.fc2(x)

  class GoogLeNet(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(c_in, 64, 7, 2, 3)
      self.conv2_reduce = tnn.Conv2d(64, 64, 1)
      self.conv2 = tnn.Conv2d(64, 192, 3, padding=1)
      # Caffe/ours: alpha 1e-4 on the window *mean*; torch's alpha is that one.
      self.lrn = tnn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
      self.stage_names, self.aux_names = [], {}
      c = 192
      for group in INCEPTION_V1:
        names = []
        for name, row in group:
          m = Inception(c, row)
          self.add_module(f'inception{name}', m)
          names.append(f'inception{name}')
          c = m.out_channels
          if aux_logits and name in GOOGLENET_AUX_AFTER:
            k = GOOGLENET_AUX_AFTER.index(name) + 1
            self.add_module(f'aux{k}', AuxHead(c))
            self.aux_names[f'inception{name}'] = f'aux{k}'
        self.stage_names.append(names)
      self.dropout = tnn.Dropout(dropout)
      self.fc = tnn.Linear(c, num_classes)

    def forward(self, x):
      x = F.relu(self.conv1(x), inplace=True)
      x = self.lrn(F.max_pool2d(x, 3, 2, ceil_mode=True))
      x = F.relu(self.conv2_reduce(x), inplace=True)
      x = self.lrn(F.relu(self.conv2(x), inplace=True))
      x = F.max_pool2d(x, 3, 2, ceil_mode=True)
      aux = []
      for i, names in enumerate(self.stage_names):
        if i:
          x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        for name in names:
          x = getattr(self, name)(x)
          if self.training and name in self.aux_names:
            aux.append(getattr(self, self.aux_names[name])(x))
      x = self.fc(self.dropout(x.mean(dim=(2, 3))))
      return (x, *aux) if aux else x

  return GoogLeNet()


def loss(torch, outputs, labels, aux_weight: float = GOOGLENET_AUX_WEIGHT):
  """Our training loss on a twin's output: cross entropy of the logits, plus
  aux_weight * the sum of the aux heads' cross entropies when `outputs` is a
  (logits, aux1, aux2, ...) tuple (GoogLeNet in train mode), as
  `cnn_jax.train.steps.compute_loss` with its default aux_weight 0.3."""
  ce = torch.nn.functional.cross_entropy
  if isinstance(outputs, (tuple, list)):
    main, *aux = outputs
    total = ce(main, labels)
    for a in aux:
      total = total + aux_weight * ce(a, labels)
    return total
  return ce(outputs, labels)


TWINS = {'vgg11': vgg11, 'googlenet': googlenet}
