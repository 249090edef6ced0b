"""import_torchvision: names, layouts, errors and file formats without torch; with
torch and torchvision, logits equal to torchvision's for every supported family.

The equivalence tests need torch and torchvision, kept out of the project venv:

    python3 -m venv /tmp/tvvenv
    /tmp/tvvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    CNN_JAX_TORCH_SITE=/tmp/tvvenv/lib/python3.11/site-packages \\
        .venv/bin/pytest -rs tests/test_transfer_torchvision.py
"""
import os
import struct
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from cnn_jax.models import get_model, model_info
from cnn_jax.transfer import safetensors
from cnn_jax.transfer.torchvision import (SUPPORTED_MODELS, import_torchvision, main,
                                          torch_state_dict_shapes)

_BN_LEAVES = ('weight', 'bias', 'running_mean', 'running_var')


def _resnet18_shapes(num_classes=1000):
  """torchvision's resnet18 state_dict keys and shapes, written out independently."""
  shapes = {'conv1.weight': (64, 3, 7, 7)}

  def bn(prefix, c):
    shapes.update({f'{prefix}.{leaf}': (c,) for leaf in _BN_LEAVES})

  bn('bn1', 64)
  c_in = 64
  for i, c in enumerate((64, 128, 256, 512), start=1):
    for j in range(2):
      p = f'layer{i}.{j}'
      shapes[f'{p}.conv1.weight'] = (c, c_in if j == 0 else c, 3, 3)
      bn(f'{p}.bn1', c)
      shapes[f'{p}.conv2.weight'] = (c, c, 3, 3)
      bn(f'{p}.bn2', c)
      if i > 1 and j == 0:
        shapes[f'{p}.downsample.0.weight'] = (c, c_in, 1, 1)
        bn(f'{p}.downsample.1', c)
    c_in = c
  shapes['fc.weight'] = (num_classes, 512)
  shapes['fc.bias'] = (num_classes,)
  return shapes


def _fake_state_dict(shapes, seed=0):
  """Random float32 tensors, plus num_batches_tracked for every BN (as torch saves)."""
  rng = np.random.default_rng(seed)
  state = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  for k in list(shapes):
    if k.endswith('.running_var'):
      state[k] = np.abs(state[k]) + 0.5
      state[k[:-len('running_var')] + 'num_batches_tracked'] = np.array(7, np.int64)
  return state


@pytest.fixture(scope='module')
def resnet18_sd():
  return _fake_state_dict(_resnet18_shapes(num_classes=10))


def _abstract(name, num_classes):
  model = get_model(name, num_classes=num_classes)
  x = jax.ShapeDtypeStruct((1,) + model_info(name).input_shape, np.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)


# ----------------------------------------------------------------------------
# Names and shapes (no weights are allocated)
# ----------------------------------------------------------------------------

def test_resnet18_keys_are_torchvisions():
  assert torch_state_dict_shapes('resnet18') == _resnet18_shapes()


# Keys and shapes read off torchvision 0.29's models, and each family's key count
# (num_batches_tracked left out).
@pytest.mark.parametrize('name, count, spots', [
    ('resnet50', 267, {'layer4.2.conv3.weight': (2048, 512, 1, 1),
                       'layer1.0.downsample.0.weight': (256, 64, 1, 1)}),
    ('resnext50_32x4d', 267, {'layer1.0.conv2.weight': (128, 4, 3, 3)}),
    ('vgg11_bn', 54, {'features.26.running_var': (512,),
                      'classifier.0.weight': (4096, 25088)}),
    ('alexnet_torchvision', 16, {'features.10.weight': (256, 256, 3, 3),
                                 'classifier.1.weight': (4096, 9216)}),
    ('googlenet_bn', 305, {'conv3.bn.running_mean': (192,),
                           'inception5b.branch4.1.conv.weight': (128, 832, 1, 1),
                           'aux2.fc1.weight': (1024, 2048)}),
    ('densenet121', 606, {'features.denseblock4.denselayer16.conv2.weight': (32, 128, 3, 3),
                          'features.transition3.conv.weight': (512, 1024, 1, 1),
                          'features.norm5.weight': (1024,),
                          'classifier.weight': (1000, 1024)}),
    ('mobilenet_v2', 262, {'features.1.conv.1.weight': (16, 32, 1, 1),
                           'features.17.conv.2.weight': (320, 960, 1, 1),
                           'features.18.0.weight': (1280, 320, 1, 1),
                           'classifier.1.weight': (1000, 1280)}),
])
def test_keys_per_family(name, count, spots):
  shapes = torch_state_dict_shapes(name)
  assert len(shapes) == count
  for key, shape in spots.items():
    assert shapes[key] == shape, key
  # Every element of our variables has exactly one torchvision counterpart.
  ours = traverse_util.flatten_dict(_abstract(name, 1000))
  assert len(ours) == count
  assert sum(np.prod(s) for s in shapes.values()) == sum(np.prod(a.shape) for a in ours.values())


def test_supported_models_are_registered():
  assert 'resnet18' in SUPPORTED_MODELS and 'googlenet_bn' in SUPPORTED_MODELS
  for name in SUPPORTED_MODELS:
    model_info(name)                  # raises for an unregistered name


# ----------------------------------------------------------------------------
# Import: structure, values, layouts
# ----------------------------------------------------------------------------

def test_import_matches_init_structure_and_converts_layouts(resnet18_sd):
  sd = resnet18_sd
  v = import_torchvision('resnet18', sd)          # num_classes taken from fc.weight: 10
  want = traverse_util.flatten_dict(_abstract('resnet18', 10))
  got = traverse_util.flatten_dict(v)
  assert set(got) == set(want)
  for k, a in want.items():
    assert got[k].shape == a.shape and got[k].dtype == np.float32, k
  p, s = v['params'], v['batch_stats']
  np.testing.assert_array_equal(p['conv_init']['kernel'], sd['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p['stage2_block1']['proj']['kernel'],
                                sd['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p['stage3_block2']['bn2']['scale'], sd['layer3.1.bn2.weight'])
  np.testing.assert_array_equal(p['stage3_block2']['bn2']['bias'], sd['layer3.1.bn2.bias'])
  np.testing.assert_array_equal(s['stage4_block1']['proj_bn']['mean'],
                                sd['layer4.0.downsample.1.running_mean'])
  np.testing.assert_array_equal(s['bn_init']['var'], sd['bn1.running_var'])
  np.testing.assert_array_equal(p['fc']['kernel'], sd['fc.weight'].T)
  np.testing.assert_array_equal(p['fc']['bias'], sd['fc.bias'])


def test_googlenet_aux_fc1_reads_channels_last():
  sd = _fake_state_dict(torch_state_dict_shapes('googlenet_bn', num_classes=3))
  v = import_torchvision('googlenet_bn', sd)
  w_torch = sd['aux1.fc1.weight']                 # (1024, 128 * 4 * 4), index c*16 + y*4 + x
  ours = v['params']['aux1']['fc1']['kernel']     # (4 * 4 * 128, 1024), index y*512 + x*128 + c
  for c, y, x in [(0, 0, 0), (5, 1, 2), (127, 3, 3), (64, 2, 0)]:
    np.testing.assert_array_equal(ours[y * 512 + x * 128 + c], w_torch[:, c * 16 + y * 4 + x])
  # Depth-wise layouts elsewhere are plain transposes.
  np.testing.assert_array_equal(v['params']['fc']['kernel'], sd['fc.weight'].T)
  assert v['params']['aux2']['fc2']['kernel'].shape == (1024, 3)


def test_module_prefix_wrapper_and_batches_tracked(resnet18_sd):
  wrapped = {'epoch': 90, 'state_dict': {'module.' + k: v for k, v in resnet18_sd.items()}}
  assert any(k.endswith('num_batches_tracked') for k in resnet18_sd)
  a = import_torchvision('resnet18', wrapped)
  b = import_torchvision('resnet18', resnet18_sd)
  jax.tree.map(np.testing.assert_array_equal, a, b)


class _FakeTensor:
  """What import_torchvision touches on a torch tensor: detach().cpu().numpy()."""

  def __init__(self, a):
    self._a = a

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self._a


def test_torch_tensors_are_duck_typed(resnet18_sd):
  a = import_torchvision('resnet18', {k: _FakeTensor(v) for k, v in resnet18_sd.items()})
  np.testing.assert_array_equal(a['params']['fc']['bias'], resnet18_sd['fc.bias'])


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def test_one_error_names_every_missing_unexpected_and_misshaped_key(resnet18_sd):
  sd = dict(resnet18_sd)
  del sd['layer1.0.conv1.weight']
  del sd['bn1.running_mean']
  sd['head.extra.weight'] = np.zeros((3, 3), np.float32)
  sd['fc.num_batches_tracked'] = np.array(1)       # fc is no BN: unexpected
  sd['layer2.0.bn1.running_var'] = np.ones((7,), np.float32)
  with pytest.raises(ValueError) as e:
    import_torchvision('resnet18', sd)
  msg = str(e.value)
  for part in ['2 missing', 'layer1.0.conv1.weight', 'bn1.running_mean',
               '2 unexpected', 'head.extra.weight', 'fc.num_batches_tracked',
               '1 mis-shaped', 'layer2.0.bn1.running_var: expected (128,), got (7,)']:
    assert part in msg, part


def test_unknown_model_lists_supported():
  with pytest.raises(ValueError, match=r'unsupported model .*Supported: resnet18, resnet34'):
    import_torchvision('resnet7', {})
  with pytest.raises(ValueError, match="torchvision's is 'googlenet_bn'"):
    import_torchvision('googlenet', {})


def test_num_classes_mismatch_hints(resnet18_sd):
  with pytest.raises(ValueError, match=r'(?s)fc.weight: expected \(5, 512\), got \(10, 512\)'
                     r'.*num_classes=5 differs from the 10 classes'):
    import_torchvision('resnet18', resnet18_sd, num_classes=5)


def test_googlenet_without_aux_heads_hints_aux_logits():
  shapes = torch_state_dict_shapes('googlenet_bn')
  sd = {k: np.zeros(s, np.float32) for k, s in shapes.items() if not k.startswith('aux')}
  with pytest.raises(ValueError, match=r'(?s)missing key.*aux1.fc1.weight.*aux_logits=True'):
    import_torchvision('googlenet_bn', sd)


def test_wrong_architecture_says_so(resnet18_sd):
  with pytest.raises(ValueError, match='another architecture'):
    import_torchvision('mobilenet_v2', resnet18_sd)


# ----------------------------------------------------------------------------
# Files: .npz, .pth without torch, .safetensors, the command line
# ----------------------------------------------------------------------------

def test_npz_file(tmp_path, resnet18_sd):
  path = tmp_path / 'w.npz'
  np.savez(path, **resnet18_sd)
  a = import_torchvision('resnet18', str(path))
  jax.tree.map(np.testing.assert_array_equal, a, import_torchvision('resnet18', resnet18_sd))


def test_npz_with_pickled_objects_is_refused(tmp_path):
  path = tmp_path / 'evil.npz'
  np.savez(path, x=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match='allow_pickle'):
    import_torchvision('resnet18', path)


def test_pth_without_torch_names_the_fix(tmp_path, monkeypatch):
  path = tmp_path / 'w.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)     # `import torch` raises ImportError
  with pytest.raises(ValueError, match=r'(?s)needs PyTorch.*--output .*\.npz.*install torch'):
    import_torchvision('resnet18', path)


def test_unknown_extension(tmp_path):
  path = tmp_path / 'w.h5'
  path.write_bytes(b'')
  with pytest.raises(ValueError, match='cannot tell the format'):
    import_torchvision('resnet18', path)


def test_safetensors_round_trip_every_dtype(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      'f64': rng.standard_normal((2, 3)), 'f32': rng.standard_normal((4,)).astype(np.float32),
      'f16': rng.standard_normal((3, 1)).astype(np.float16),
      'bf16': rng.standard_normal((5, 2)).astype(ml_dtypes.bfloat16),
      'i64': np.arange(-3, 3, dtype=np.int64), 'i32': np.arange(6, dtype=np.int32).reshape(2, 3),
      'i16': np.array([-7, 7], np.int16), 'i8': np.array([-128, 127], np.int8),
      'u8': np.arange(256, dtype=np.uint8), 'bool': np.array([True, False, True]),
      'scalar': np.array(2.5, np.float32), 'empty': np.zeros((0, 4), np.float32),
  }
  path = tmp_path / 't.safetensors'
  safetensors.save_file(tensors, path, metadata={'format': 'pt'})
  data = path.read_bytes()
  (n,) = struct.unpack('<Q', data[:8])
  assert (8 + n) % 8 == 0                          # header padded: arrays stay aligned
  back = safetensors.load_file(path)
  assert set(back) == set(tensors)
  for k, a in tensors.items():
    assert back[k].dtype == a.dtype and back[k].shape == a.shape, k
    np.testing.assert_array_equal(back[k], a)
  assert safetensors.read_metadata(data) == {'format': 'pt'}


def _raw(header: bytes, body: bytes = b'') -> bytes:
  return struct.pack('<Q', len(header)) + header + body


@pytest.mark.parametrize('data, match', [
    (b'\x01\x02', 'too short'),
    (struct.pack('<Q', 1000) + b'{}', 'runs past the end'),
    (struct.pack('<Q', 2 ** 40), 'exceeds'),
    (_raw(b'{"a": '), 'not valid UTF-8 JSON'),
    (_raw(b'[1, 2]'), 'must be a JSON object'),
    (_raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
          b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
     'repeats the key'),
    (_raw(b'{"a": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}', bytes(2)),
     'unknown dtype'),
    (_raw(b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', bytes(4)),
     'non-negative ints'),
    (_raw(b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', bytes(8)),
     'needs 12'),
    (_raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}', bytes(8)),
     'outside'),
    (_raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
          b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8)),
     'gap or overlap'),
    (_raw(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(8)),
     'trailing bytes'),
    (_raw(b'{"a": {"dtype": "F32", "shape": [1]}}', bytes(4)), 'exactly'),
])
def test_safetensors_rejects_malformed(data, match):
  with pytest.raises(ValueError, match=match):
    safetensors.load(data)


def test_safetensors_file_with_bf16_imports(tmp_path, resnet18_sd):
  path = tmp_path / 'w.safetensors'
  safetensors.save_file({k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
                         for k, v in resnet18_sd.items()}, path)
  v = import_torchvision('resnet18', path)
  want = resnet18_sd['fc.weight'].astype(ml_dtypes.bfloat16).astype(np.float32).T
  np.testing.assert_array_equal(v['params']['fc']['kernel'], want)
  assert v['params']['fc']['kernel'].dtype == np.float32


def test_command_line_converts_and_checks(tmp_path, resnet18_sd, capsys):
  src, dst = tmp_path / 'in.npz', tmp_path / 'out.safetensors'
  np.savez(src, **resnet18_sd)
  assert main(['--model', 'resnet18', '--input', str(src), '--output', str(dst)]) == 0
  assert f'wrote {len(resnet18_sd)} tensors' in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, import_torchvision('resnet18', dst),
               import_torchvision('resnet18', resnet18_sd))
  assert main(['--model', 'densenet121', '--input', str(src),
               '--output', str(tmp_path / 'x.npz')]) == 1
  assert 'another architecture' in capsys.readouterr().err
  assert not (tmp_path / 'x.npz').exists()


# ----------------------------------------------------------------------------
# Equivalence with torchvision (skipped without torch)
# ----------------------------------------------------------------------------

_INSTALL = ('torch/torchvision are not importable: install torch==2.14.1 '
            'torchvision==0.29.1 into a separate venv and set CNN_JAX_TORCH_SITE to its '
            'site-packages (e.g. /tmp/tvvenv/lib/python3.11/site-packages), or install them '
            'into this environment')


def _torch():
  site = os.environ.get('CNN_JAX_TORCH_SITE')
  if site and site not in sys.path:
    sys.path.append(site)           # appended, so this venv's numpy still wins
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    pytest.skip(f'{_INSTALL} ({e}).')
  torch.set_num_threads(os.cpu_count() or 1)
  return torch, torchvision


def _randomise_bn(torch, net):
  """Non-trivial BN parameters and running statistics, so their mapping is tested."""
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 2.0)


# (ours, torchvision constructor, its kwargs, input H x W). Small inputs: the
# adaptive pools of VGG and AlexNet accept them, and at 64/96/127 they see 2x2
# and 3x3 maps of distinct values, so fc1's (C, H, W) -> (H, W, C) reordering is
# tested in both spatial axes; 61x75 (ResNet-18) and 127x127 (AlexNet) take odd
# sizes through strided convs and pools; GoogLeNet at 72 hits its ceil-mode
# pools with odd maps.
_CASES = [
    ('resnet18', 'resnet18', {}, (61, 75)),
    ('resnet50', 'resnet50', {}, (64, 64)),
    ('resnext50_32x4d', 'resnext50_32x4d', {}, (32, 32)),
    ('vgg11', 'vgg11', {}, (64, 64)),
    ('vgg11_bn', 'vgg11_bn', {}, (96, 96)),
    ('alexnet_torchvision', 'alexnet', {}, (127, 127)),
    ('googlenet_bn', 'googlenet', dict(transform_input=False, aux_logits=True,
                                       init_weights=True), (72, 72)),
    ('densenet121', 'densenet121', {}, (64, 64)),
    ('mobilenet_v2', 'mobilenet_v2', {}, (64, 64)),
]
# Logits may differ by float32 rounding, relative to their scale.
_RTOL = 1e-4


def _max_diff(ours, ref):
  err = float(np.max(np.abs(ours - ref)))
  return err, err / float(np.max(np.abs(ref)))


@pytest.mark.parametrize('name, tv_name, kwargs, hw', _CASES, ids=[c[0] for c in _CASES])
def test_logits_equal_torchvision(name, tv_name, kwargs, hw, fast_compile):
  torch, torchvision = _torch()
  torch.manual_seed(0)
  net = getattr(torchvision.models, tv_name)(num_classes=10, **kwargs)
  _randomise_bn(torch, net)
  net.eval()
  x = np.random.default_rng(1).standard_normal((2, 3) + hw).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()

  variables = import_torchvision(name, net.state_dict())
  model = get_model(name, num_classes=10)
  # One jit'd program compiles faster than the many distinct ops of an eager run.
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  ours = np.asarray(forward(variables, x.transpose(0, 2, 3, 1)))
  err, rel = _max_diff(ours, ref)
  print(f'{name}: max |diff| {err:.2e}, relative to max |logit| {rel:.2e}')
  np.testing.assert_allclose(ours, ref, rtol=_RTOL, atol=_RTOL * np.max(np.abs(ref)))

  if name == 'googlenet_bn':
    # torchvision's aux heads only run in train mode, and pool adaptively to 4x4
    # where ours pools 5x5/3 (equal parameters, different windows), so compare one
    # head on a 4x4 map, where torchvision's pool is the identity.
    feat = np.random.default_rng(2).standard_normal((2, 512, 4, 4)).astype(np.float32)
    with torch.no_grad():
      ref_aux = net.aux1(torch.from_numpy(feat)).numpy()
    p, s = variables['params']['aux1'], variables['batch_stats']['aux1']
    y = feat.transpose(0, 2, 3, 1) @ p['conv']['conv']['kernel'][0, 0]
    y = (y - s['conv']['bn']['mean']) / np.sqrt(s['conv']['bn']['var'] + 1e-3)
    y = np.maximum(y * p['conv']['bn']['scale'] + p['conv']['bn']['bias'], 0)
    y = np.maximum(y.reshape(2, -1) @ p['fc1']['kernel'] + p['fc1']['bias'], 0)
    ours_aux = y @ p['fc2']['kernel'] + p['fc2']['bias']
    np.testing.assert_allclose(ours_aux, ref_aux, rtol=_RTOL,
                               atol=_RTOL * np.max(np.abs(ref_aux)))


def test_pth_file_bf16_tensors_and_command_line(tmp_path):
  torch, torchvision = _torch()
  torch.manual_seed(0)
  sd = torchvision.models.resnet18(num_classes=10).state_dict()
  pth, npz = tmp_path / 'w.pth', tmp_path / 'w.npz'
  torch.save({'state_dict': sd, 'epoch': 3}, pth)   # a wrapped checkpoint
  want = import_torchvision('resnet18', sd)
  jax.tree.map(np.testing.assert_array_equal, import_torchvision('resnet18', pth), want)
  assert main(['--model', 'resnet18', '--input', str(pth), '--output', str(npz)]) == 0
  jax.tree.map(np.testing.assert_array_equal, import_torchvision('resnet18', npz), want)
  # bfloat16 tensors have no NumPy view; they are widened to float32.
  half = import_torchvision('resnet18', {k: v.bfloat16() if v.is_floating_point() else v
                                         for k, v in sd.items()})
  np.testing.assert_allclose(half['params']['fc']['kernel'], want['params']['fc']['kernel'],
                             rtol=1e-2, atol=1e-3)
  # A pickled module is not a state dict: weights_only=True refuses it.
  torch.save(torchvision.models.resnet18(num_classes=10), tmp_path / 'model.pth')
  with pytest.raises(ValueError, match='weights_only=True'):
    import_torchvision('resnet18', tmp_path / 'model.pth')
