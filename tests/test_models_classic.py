"""Classic CNNs: the notes' example_ffcnn, LeNet-5, AlexNet/ZFNet, VGG, NIN.

Counts, tables and shapes come from jax.eval_shape (VGG-19 costs a trace, not
143M floats). The only real computation is one forward+backward per family on
a tiny variant, run once with cnn_jax.nn.Conv and once with flax.linen.Conv on
the same parameters. Compile time dominates here (it grows with kernel taps),
so the tiny variants use 3x3/1x1 kernels and the parameters are filled from
NumPy rather than by a jitted init.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn_jax.models.alexnet as alexnet
import cnn_jax.models.ffcnn  # noqa: F401  (registers example_ffcnn)
import cnn_jax.models.lenet as lenet
import cnn_jax.models.nin  # noqa: F401
import cnn_jax.models.vgg as vgg
from cnn_jax import nn as cnn
from cnn_jax.analysis import count_params, summary
from cnn_jax.models import get_model, list_models, model_info

# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


FAMILIES = ('ffcnn', 'lenet', 'alexnet', 'vgg', 'nin')
MODELS = [name for family in FAMILIES for name in list_models(family)]

# Published (or, where marked, derived here and pinned) trainable parameter counts.
PARAM_COUNTS = {
    'example_ffcnn': 695,                  # the notes: 84+84+6+0+0+490+20+11
    'lenet5_classic': 60_000,              # LeCun et al. 1998
    'lenet5': 61_706,
    'alexnet': 62_378_344,                 # the notes' per-layer table
    'alexnet_grouped': 60_965_224,         # derived: two-GPU groups on conv2/4/5
    'alexnet_torchvision': 61_100_840,     # torchvision
    'zfnet': 62_357_608,                   # derived from Zeiler & Fergus Fig. 3
    'vgg11': 132_863_336, 'vgg13': 133_047_848,                     # torchvision
    'vgg16': 138_357_544, 'vgg19': 143_667_240,
    'vgg11_bn': 132_868_840, 'vgg13_bn': 133_053_736,
    'vgg16_bn': 138_365_992, 'vgg19_bn': 143_678_248,
    'nin': 966_986,                        # derived: Lin et al.'s CIFAR-10 model
}


def _abstract(model, input_shape, batch=1):
  """(logits, variables) as ShapeDtypeStructs; nothing is allocated or compiled."""
  x = jax.ShapeDtypeStruct((batch,) + tuple(input_shape), jnp.float32)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return jax.eval_shape(
      lambda x: model.init_with_output(rngs, x, train=False, mutable=True), x)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

def test_every_family_is_registered():
  for family in FAMILIES:
    assert list_models(family), family
  assert set(PARAM_COUNTS) <= set(MODELS)
  for name in ('alexnet_tiny', 'vgg_tiny', 'nin_tiny'):
    assert name in MODELS


def test_unknown_name_lists_close_matches():
  with pytest.raises(ValueError, match="unknown model 'vgg161'.*'vgg16'"):
    get_model('vgg161')
  with pytest.raises(ValueError, match="'alexnet'"):
    get_model('alexnett')
  with pytest.raises(ValueError, match=r"no field\(s\) \['widht'\].*batch_norm"):
    get_model('vgg16', widht=2)


# ----------------------------------------------------------------------------
# Parameter counts and per-layer tables
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_parameter_count(name):
  entry = model_info(name)
  count = count_params(get_model(name), entry.input_shape)
  assert count.trainable == PARAM_COUNTS[name]
  if name.startswith('vgg') and name.endswith('_bn'):
    # Running mean and variance per conv channel, kept out of the trainable count.
    cfg = vgg.CONFIGS[{'11': 'A', '13': 'B', '16': 'D', '19': 'E'}[name[3:5]]]
    assert count.batch_stats == 2 * sum(sum(block) for block in cfg)
  elif name == 'example_ffcnn':
    assert count.batch_stats == 2 * (3 + 10)
  else:
    assert count.batch_stats == 0


def test_example_ffcnn_breakdown_matches_the_notes():
  rows = summary(get_model('example_ffcnn'), (7, 7, 3), print_table=False)
  by = {r['name']: r for r in rows}
  # The notes' 84 + 84 + 6 + 0 + 0 + 490 + 20 + 11, row by row.
  notes = [('conv1', 84), ('conv2', 84), ('bn2d', 6), ('maxpool', 0), ('flatten', 0),
           ('fc1', 490), ('bn1d', 20), ('out', 11)]
  assert [(r['name'], r['params']) for r in rows[:-1]] == notes
  assert by['flatten']['output_shape'] == (48,)
  assert by['Total']['params'] == sum(p for _, p in notes) == 695
  assert by['conv1']['output_shape'] == (4, 4, 3)     # pad 1, stride 2
  assert by['conv2']['output_shape'] == (8, 8, 3)     # pad 3 grows it
  assert by['maxpool']['output_shape'] == (4, 4, 3)   # 48 features into fc1
  assert by['out']['output_shape'] == (1,)            # one logit (sigmoid in the loss)


def test_alexnet_rows_match_the_notes_table():
  rows = summary(get_model('alexnet'), (227, 227, 3), print_table=False)
  with_params = [(r['name'], r['params']) for r in rows[:-1] if r['params']]
  assert with_params == [
      ('conv1', 34_944), ('conv2', 614_656), ('conv3', 885_120), ('conv4', 1_327_488),
      ('conv5', 884_992), ('fc1', 37_752_832), ('fc2', 16_781_312), ('fc3', 4_097_000)]
  # The notes' map sizes: C1 55, S2 27, C3 27, S4 13, C5-C7 13, S8 6, F9/F10 4096.
  shapes = [(r['name'], r['output_shape']) for r in rows[:-1]
            if r['type'] not in ('Dropout', 'LRN')]   # the notes' table omits both
  assert shapes == [
      ('conv1', (55, 55, 96)), ('pool1', (27, 27, 96)), ('conv2', (27, 27, 256)),
      ('pool2', (13, 13, 256)), ('conv3', (13, 13, 384)), ('conv4', (13, 13, 384)),
      ('conv5', (13, 13, 256)), ('pool5', (6, 6, 256)), ('fc1', (4096,)),
      ('fc2', (4096,)), ('fc3', (1000,))]
  assert rows[-1]['params'] == 62_378_344


def test_alexnet_grouped_weights_match_the_slide():
  # The notes' slide: [5x5x48]x256 = 307K, then 663K and 442K (weights only).
  rows = summary(get_model('alexnet_grouped'), (227, 227, 3), print_table=False)
  weights = {r['name']: r['weights'] for r in rows}
  assert (weights['conv2'], weights['conv4'], weights['conv5']) == (
      5 * 5 * 48 * 256, 3 * 3 * 192 * 384, 3 * 3 * 192 * 256) == (307_200, 663_552, 442_368)


def test_zfnet_map_sizes_follow_the_paper():
  rows = summary(get_model('zfnet'), (224, 224, 3), print_table=False)
  sizes = {r['name']: r['output_shape'] for r in rows}
  assert sizes['conv1'] == (110, 110, 96) and sizes['pool1'] == (55, 55, 96)
  assert sizes['conv2'] == (26, 26, 256) and sizes['pool2'] == (13, 13, 256)
  assert sizes['conv5'] == (13, 13, 256) and sizes['pool5'] == (6, 6, 256)
  assert sizes['fc3'] == (1000,)


def test_lenet5_classic_layers_match_the_paper():
  rows = summary(get_model('lenet5_classic'), (32, 32, 1), print_table=False)
  params, shapes = {}, {}
  for r in rows[:-1]:
    layer = r['name'].split('/')[0]          # C3's fan-in groups sum into 'c3'
    params[layer] = params.get(layer, 0) + r['params']
    if '/' not in r['name']:
      shapes[layer] = r['output_shape']
    else:                                     # C3's groups: 6 + 9 + 1 maps of 10x10
      prev = shapes.get(layer, r['output_shape'][:-1] + (0,))
      shapes[layer] = r['output_shape'][:-1] + (prev[-1] + r['output_shape'][-1],)
  assert params == {'c1': 156, 's2': 12, 'c3': 1_516, 's4': 32, 'c5': 48_120, 'f6': 10_164,
                    'output': 0}
  assert shapes == {'c1': (28, 28, 6), 's2': (14, 14, 6), 'c3': (10, 10, 16),
                    's4': (5, 5, 16), 'c5': (1, 1, 120), 'f6': (84,), 'output': (10,)}
  rf = {r['name']: r['receptive_field'] for r in rows[:-1]}
  assert rf['c1'] == (5, 5) and rf['s2'] == (6, 6) and rf['c3/fanin4'] == (14, 14)
  assert rf['c5'] == (32, 32)                 # C5 sees the whole 32x32 input
  assert rows[-1]['params'] == 60_000          # the RBF codes are constants


def test_lenet5_modern_layers():
  rows = summary(get_model('lenet5'), (32, 32, 1), print_table=False)
  params = {r['name']: r['params'] for r in rows[:-1] if r['params']}
  assert params == {'c1': 156, 'c3': 2_416, 'c5': 48_120, 'f6': 10_164, 'output': 850}


def test_lenet5_runs_28x28_with_same_padding_on_c1():
  for name in ('lenet5_classic', 'lenet5'):
    model = get_model(name, c1_padding='SAME')
    assert count_params(model, (28, 28, 1)).trainable == PARAM_COUNTS[name]
    logits, _ = _abstract(model, (28, 28, 1), batch=2)
    assert logits.shape == (2, 10)


# ----------------------------------------------------------------------------
# Output shapes of every registered model
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', MODELS)
def test_output_shape_at_registered_input(name):
  entry = model_info(name)
  logits, variables = _abstract(get_model(name), entry.input_shape, batch=2)
  assert logits.shape == (2, entry.num_classes)
  assert logits.dtype == jnp.float32
  inter = variables['intermediates']
  assert 'pre_logits' in inter and inter['pre_logits'][0].shape[0] == 2
  logits, _ = _abstract(get_model(name, num_classes=7), entry.input_shape)
  assert logits.shape == (1, 7)


# ----------------------------------------------------------------------------
# LeNet-5 pieces: the C3 table, trainable subsampling, the RBF output
# ----------------------------------------------------------------------------

# Seed 003's table, read column by column: the S2 maps each C3 map sees.
C3_INPUTS_FROM_NOTES = [
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5)]


def test_c3_connection_table_is_the_notes():
  table = lenet.connection_matrix(lenet.LECUN_C3_TABLE)
  assert table.shape == (6, 16) and table.sum() == 60
  assert [tuple(np.flatnonzero(table[:, j])) for j in range(16)] == C3_INPUTS_FROM_NOTES
  with pytest.raises(ValueError, match='equally long'):
    lenet.connection_matrix(('X  ', 'X'))


def test_partial_conv_equals_a_masked_full_conv():
  """Only connected kernels are stored; the result is the masked full conv."""
  k = 3
  layer = lenet.PartialConv(lenet.LECUN_C3_TABLE, (k, k))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 6, 6, 6)), jnp.float32)
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)['params']
  assert {n: p['kernel'].shape for n, p in shapes.items()} == {
      'fanin3': (k, k, 3, 6), 'fanin4': (k, k, 4, 9), 'fanin6': (k, k, 6, 1)}
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
  y = jax.jit(layer.apply)({'params': params}, x)

  full = np.zeros((k, k, 6, 16), np.float32)
  bias = np.zeros(16, np.float32)
  fan_in = np.array([len(c) for c in C3_INPUTS_FROM_NOTES])
  for n in (3, 4, 6):
    group = params[f'fanin{n}']
    for g, j in enumerate(np.flatnonzero(fan_in == n)):
      full[:, :, list(C3_INPUTS_FROM_NOTES[j]), j] = group['kernel'][:, :, :, g]
      bias[j] = group['bias'][g]
  ref = jax.lax.conv_general_dilated(x, full, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_trainable_subsampling():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  layer = lenet.TrainableSubsample(2)
  params = {'coefficient': jnp.array([1.0, -2.0, 0.5]), 'bias': jnp.array([0.0, 1.0, 2.0])}
  y = layer.apply({'params': params}, x)
  window_sums = np.asarray(x).reshape(2, 2, 2, 2, 2, 3).sum(axis=(2, 4))
  np.testing.assert_allclose(y, window_sums * params['coefficient'] + params['bias'])
  # Initialised as average pooling: coefficient 1/4, bias 0.
  init = jax.eval_shape(layer.init, jax.random.key(0), x)['params']
  assert init['coefficient'].shape == init['bias'].shape == (3,)


def test_rbf_codes_and_output():
  codes = lenet.rbf_codes(10, 84)
  assert codes.shape == (10, 84) and set(np.unique(codes)) == {-1.0, 1.0}
  gram = codes @ codes.T
  np.testing.assert_array_equal(np.diag(gram), 84)
  assert np.abs(gram - np.diag(np.diag(gram))).max() <= 4     # nearly orthogonal
  logits = lenet.RBFOutput(10).apply({}, jnp.asarray(codes))
  np.testing.assert_array_equal(np.diag(logits), 0)           # distance to itself
  assert (np.argmax(logits, axis=1) == np.arange(10)).all()
  np.testing.assert_allclose(logits[0, 1], -np.sum((codes[0] - codes[1]) ** 2))
  assert len({tuple(r) for r in lenet.rbf_codes(127, 84)}) == 127
  with pytest.raises(ValueError, match='at most 127'):
    lenet.rbf_codes(128, 84)


# ----------------------------------------------------------------------------
# Adaptive average pooling
# ----------------------------------------------------------------------------

def _adaptive_ref(x, out):
  """NumPy loop over PyTorch's bins [floor(i*W/n), ceil((i+1)*W/n))."""
  n, h, w, c = x.shape
  y = np.zeros((n, out[0], out[1], c), x.dtype)
  for i in range(out[0]):
    h0, h1 = (i * h) // out[0], -(-((i + 1) * h) // out[0])
    for j in range(out[1]):
      w0, w1 = (j * w) // out[1], -(-((j + 1) * w) // out[1])
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


@pytest.mark.parametrize('in_hw,out_hw', [((5, 7), (3, 3)), ((6, 6), (4, 2)),
                                          ((2, 3), (4, 5)), ((1, 1), (7, 7))])
def test_adaptive_avg_pool_matches_pytorch_bins(in_hw, out_hw):
  x = np.random.default_rng(0).standard_normal((2,) + in_hw + (3,)).astype(np.float32)
  y = alexnet.adaptive_avg_pool(jnp.asarray(x), out_hw)
  np.testing.assert_allclose(y, _adaptive_ref(x, out_hw), rtol=1e-5, atol=1e-6)


def test_adaptive_avg_pool_identity_and_errors():
  x = jnp.ones((1, 6, 6, 2))
  assert alexnet.adaptive_avg_pool(x, (6, 6)) is x          # AlexNet/VGG at 224
  with pytest.raises(ValueError, match='output_size'):
    alexnet.adaptive_avg_pool(x, (6, 6, 6))


# ----------------------------------------------------------------------------
# One real forward + backward per family, with both conv layers
# ----------------------------------------------------------------------------

def _fill(abstract, seed):
  """Concrete variables for an abstract tree, drawn with NumPy (no jit compile)."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    key = jax.tree_util.keystr(path)
    if key.endswith("['var']"):
      return jnp.ones(a.shape, a.dtype)
    if key.endswith("['mean']"):
      return jnp.zeros(a.shape, a.dtype)
    if key.endswith("['scale']") or key.endswith("['coefficient']"):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(a.shape), a.dtype)
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(fan_in), a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


REAL_CASES = {   # case: (registered name, overrides, input shape or None = registered)
    'ffcnn': ('example_ffcnn', {}, None),
    'lenet': ('lenet5_classic', {'filter_size': 3}, (18, 18, 1)),
    'alexnet': ('alexnet_tiny', {}, None),
    'vgg': ('vgg_tiny', {'batch_norm': True}, None),
    'nin': ('nin_tiny', {}, None),
}


@pytest.mark.parametrize('case', sorted(REAL_CASES))
def test_forward_backward_same_with_flax_conv(case):
  name, overrides, input_shape = REAL_CASES[case]
  input_shape = input_shape or model_info(name).input_shape
  ours = get_model(name, conv=cnn.Conv, **overrides)
  theirs = get_model(name, conv=nn.Conv, **overrides)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4,) + input_shape), jnp.float32)

  _, abstract = _abstract(ours, input_shape, batch=4)
  _, abstract_flax = _abstract(theirs, input_shape, batch=4)
  abstract.pop('intermediates', None)
  abstract_flax.pop('intermediates', None)
  assert jax.tree_util.tree_map(lambda a: a.shape, abstract) == jax.tree_util.tree_map(
      lambda a: a.shape, abstract_flax)            # one checkpoint fits both
  variables = _fill(abstract, seed=0)
  params = variables.pop('params')
  cot = jnp.asarray(np.random.default_rng(2).standard_normal(
      (4, model_info(name).num_classes)), jnp.float32)
  # unsafe_rbg: the same dropout masks for both models at a fraction of
  # threefry's compile time.
  rngs = {'dropout': jax.random.key(0, impl='unsafe_rbg')}

  def value_and_grad(model):
    def loss(p):
      out, state = model.apply({'params': p, **variables}, x, train=True,
                               mutable=['batch_stats'], rngs=rngs)
      return jnp.vdot(out, cot), (out, state)
    return jax.value_and_grad(loss, has_aux=True)(params)

  # Both in one program: one compile instead of two.
  ((l1, (y1, s1)), g1), ((l2, (y2, s2)), g2) = jax.jit(
      lambda: (value_and_grad(ours), value_and_grad(theirs)))()
  assert y1.shape == (4, model_info(name).num_classes)
  assert np.isfinite(np.asarray(y1)).all()
  scale = float(jnp.max(jnp.abs(y2))) + 1e-6
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-5 * scale)
  for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  flat1 = jax.tree_util.tree_leaves_with_path(g1)
  flat2 = jax.tree_util.tree_leaves(g2)
  assert len(flat1) == len(flat2) == len(jax.tree_util.tree_leaves(params))
  # Some gradients are exactly zero in exact arithmetic (a conv bias followed
  # by BatchNorm; ffcnn's bn2d beta, whose routed sum cancels over the batch
  # because bn1d's input gradient sums to zero) or nearly so (ffcnn's conv1
  # bias, through conv2 and BatchNorm over 4 examples). Both sides then hold
  # float32 rounding of much larger terms, summed in different orders (our
  # kernels vs XLA's), so the tolerance has a floor relative to the largest
  # gradient of the model. Measured for conv1's bias (fast_compile: XLA's
  # optimisations off): XLA alone and ours alone are each ~2e-4 from the
  # float64 value, 1e-5 of the model's largest gradient.
  floor = 1e-4 * max(float(np.abs(np.asarray(b)).max()) for b in flat2)
  for (path, a), b in zip(flat1, flat2):
    where = jax.tree_util.keystr(path)
    assert np.abs(np.asarray(a)).max() > 0, f'no gradient reaches {where}'
    tol = 1e-4 * float(np.abs(np.asarray(b)).max()) + floor
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=tol, err_msg=where)
