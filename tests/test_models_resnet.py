"""ResNet family: pinned parameter counts, shapes of every registered model
(from jax.eval_shape: nothing allocated), and real forward/backward passes of
tiny variants with our Conv against flax.linen.Conv."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn_jax.models.resnet as resnet  # registers the family
from cnn_jax.analysis import count_params
from cnn_jax.models import registry
from model_testing import check_train_step_ours_vs_flax

# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


# torchvision's published counts (BN scale and bias trainable; running
# statistics are batch_stats).
TORCHVISION_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'resnext50_32x4d': 25_028_904,
    'resnext101_32x8d': 88_791_336,
    'wide_resnet50_2': 68_883_240,
    'wide_resnet101_2': 126_886_696,
}
# Computed here. Relative to resnetN: no BN on the projections (-2 per channel
# of each 'proj'), the first unit's pre-activation BN is bn_init's (shared with
# the stem), each later first unit normalises its *input* width (half the
# output: -2 * C_in) and a 'bn_final' is added (+2 * last width). E.g.
# preact-18: -2*(128+256+512) - 2*(64+128+256) + 2*512 = -1,792.
PREACT_PARAMS = {
    'preact_resnet18': 11_687_720,
    'preact_resnet34': 21_795_880,
    'preact_resnet50': 25_549_352,
    'preact_resnet101': 44_541_480,
    'preact_resnet152': 60_185_128,
}
# He et al. 2015 Table 6 gives 0.27M / 0.46M / 0.66M / 0.85M / 1.7M. With the
# paper's option A (parameter-free shortcuts) the exact counts are these; the
# often quoted 272,474 / 466,906 / ... are option B: the two 1x1 projections
# + BN at the 16->32 and 32->64 transitions add 16*32 + 2*32 + 32*64 + 2*64 =
# 2,752 to every depth. Plain twins have exactly the option-A counts.
CIFAR_PARAMS_A = {
    'resnet20': 269_722,
    'resnet32': 464_154,
    'resnet44': 658_586,
    'resnet56': 853_018,
    'resnet110': 1_727_962,
}
CIFAR_PARAMS_B = {
    'resnet20': 272_474,
    'resnet32': 466_906,
    'resnet44': 661_338,
    'resnet56': 855_770,
    'resnet110': 1_730_714,
}
# Zagoruyko & Komodakis report 36.5M; convs without bias, 1x1 projections
# without BN where the width changes (3 of them), 10 classes.
WRN28_10_PARAMS = 36_479_194


def _size(tree):
  return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def _abstract(name, **overrides):
  """(logits shape, variables incl. 'intermediates') of a batch of 2, as shapes,
  from one jax.eval_shape: nothing is allocated or computed."""
  entry = registry.model_info(name)
  model = registry.get_model(name, **overrides)
  x = jax.ShapeDtypeStruct((2,) + entry.input_shape, jnp.float32)
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False, mutable=True), x)
  return out.shape, variables


def _counts(name, **overrides):
  """(logits shape, trainable params, BN running statistics)."""
  shape, variables = _abstract(name, **overrides)
  return shape, _size(variables['params']), _size(variables.get('batch_stats', {}))


def test_registered_names():
  assert set(registry.list_models('resnet')) == (
      set(TORCHVISION_PARAMS) | set(PREACT_PARAMS) | {'resnet_tiny'})
  assert set(registry.list_models('cifar_resnet')) == (
      set(CIFAR_PARAMS_A) | {f'plain{d}' for d in resnet.CIFAR_DEPTHS}
      | {'wrn28_10', 'cifar_resnet_tiny'})
  assert registry.model_info('resnet20').input_shape == (32, 32, 3)
  assert registry.model_info('resnet18').num_classes == 1000


@pytest.mark.parametrize('name', sorted(TORCHVISION_PARAMS))
def test_imagenet_counts_equal_torchvision(name):
  shape, params, _ = _counts(name)
  assert shape == (2, 1000)
  assert params == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize('name', sorted(PREACT_PARAMS))
def test_preact_counts(name):
  shape, params, _ = _counts(name)
  assert shape == (2, 1000)
  assert params == PREACT_PARAMS[name]


@pytest.mark.parametrize('name,params', [('resnet_tiny', 2_466), ('cifar_resnet_tiny', 1_406)])
def test_tiny_registered_variants(name, params):
  shape, count, _ = _counts(name)
  assert shape == (2, 10) and count == params


def test_count_params_agrees_and_splits_batch_stats():
  count = count_params(registry.get_model('resnet18'), (224, 224, 3))
  assert count.trainable == TORCHVISION_PARAMS['resnet18']
  # Every BN channel has a running mean and variance: 2 per channel, like its
  # trainable scale and bias.
  assert count.batch_stats == _counts('resnet18')[2] == 9_600


@pytest.mark.parametrize('name', sorted(CIFAR_PARAMS_A))
def test_cifar_counts_option_a_b_and_plain_twin(name):
  depth = int(name[len('resnet'):])
  shape, a, _ = _counts(name)
  assert shape == (2, 10)
  assert a == CIFAR_PARAMS_A[name]
  assert CIFAR_PARAMS_B[name] == a + 2_752
  if depth in (20, 110):            # the rest follow: B adds the same two projections
    assert _counts(name, shortcut='B')[1] == CIFAR_PARAMS_B[name]
  plain_shape, plain, _ = _counts(f'plain{depth}')
  assert (plain_shape, plain) == (shape, a)


def test_wrn28_10_count_and_shape():
  shape, params, _ = _counts('wrn28_10')
  assert shape == (2, 10)
  assert params == WRN28_10_PARAMS
  assert _abstract('wrn28_10')[1]['params']['fc']['kernel'].shape == (640, 10)


def test_intermediates_and_layer_names():
  _, variables = _abstract('resnet50')
  shapes = {k: v[0].shape for k, v in variables['intermediates'].items()}
  assert shapes == {'stem': (2, 56, 56, 64), 'stage1': (2, 56, 56, 256),
                    'stage2': (2, 28, 28, 512), 'stage3': (2, 14, 14, 1024),
                    'stage4': (2, 7, 7, 2048), 'pre_logits': (2, 2048)}
  params = variables['params']
  assert {'conv_init', 'bn_init', 'fc', 'stage1_block1', 'stage4_block3'} <= set(params)
  # Projection + BN on the shape change only (option B), stride on the 3x3.
  assert {'proj', 'proj_bn'} <= set(params['stage2_block1'])
  assert 'proj' not in params['stage2_block2']
  assert params['stage2_block1']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert params['fc']['kernel'].shape == (2048, 1000)
  preact = _abstract('preact_resnet50')[1]['params']
  assert 'bn_final' in preact and 'proj_bn' not in preact['stage2_block1']
  # The first unit's pre-activation is bn_init's, taken before the max pool.
  assert 'bn1' not in preact['stage1_block1'] and 'bn1' in preact['stage1_block2']


def test_resnext_groups_and_wide_width():
  rx = _abstract('resnext50_32x4d')[1]['params']['stage1_block1']
  # 32 groups of 4 channels: the 3x3 kernel sees 128 / 32 = 4 inputs per group.
  assert rx['conv2']['kernel'].shape == (3, 3, 4, 128)
  wide = _abstract('wide_resnet50_2')[1]['params']['stage1_block1']
  assert wide['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert wide['conv3']['kernel'].shape == (1, 1, 128, 256)


def test_bottleneck_example_from_the_notes():
  """28x28x256 in: 1x1 conv 64 projects to 28x28x64, the 3x3 conv runs on 64
  maps, a 1x1 conv 256 projects back; identity shortcut, no extra parameters."""
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  block = resnet.BottleneckBlock(features=64, conv=resnet.cnn.Conv, norm=norm)
  x = jax.ShapeDtypeStruct((1, 28, 28, 256), jnp.float32)
  out, variables = jax.eval_shape(lambda x: block.init_with_output(jax.random.key(0), x), x)
  params = variables['params']
  assert out.shape == (1, 28, 28, 256)
  assert [params[c]['kernel'].shape for c in ('conv1', 'conv2', 'conv3')] == [
      (1, 1, 256, 64), (3, 3, 64, 64), (1, 1, 64, 256)]
  # 69,632 weights vs 2 * 3*3*256*256 = 1,179,648 for two 3x3 convs at full depth.
  assert sum(params[c]['kernel'].size for c in ('conv1', 'conv2', 'conv3')) == 69_632
  assert 'proj' not in params


# ----------------------------------------------------------------------------
# Option A shortcut, zero-init, errors.
# ----------------------------------------------------------------------------



def _shortcut_a_numpy(x, features, stride):
  """Reference: keep every stride-th row and column, append zero channels."""
  n, h, w, c = x.shape
  out = np.zeros((n, -(-h // stride), -(-w // stride), features), x.dtype)
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      out[:, i, j, :c] = x[:, i * stride, j * stride, :]
  return out


@pytest.mark.parametrize('hw,c,features,stride', [(8, 16, 32, 2), (7, 3, 5, 2), (4, 4, 4, 1)])
def test_shortcut_a_matches_numpy(hw, c, features, stride):
  x = np.random.default_rng(0).standard_normal((2, hw, hw, c)).astype(np.float32)
  np.testing.assert_array_equal(resnet.shortcut_a(jnp.asarray(x), features, stride),
                                _shortcut_a_numpy(x, features, stride))


def test_option_a_block_is_parameter_free_and_wired_as_the_paper(fast_compile):
  """With the last BN's gamma zeroed (and eval-mode BN at init), F(x) = 0, so a
  block outputs relu(shortcut(x)): the subsampled, zero-padded identity."""
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  block = resnet.BasicBlock(features=8, conv=resnet.cnn.Conv, norm=norm, strides=2,
                            shortcut='A', zero_init_last_bn=True)
  plain = block.clone(shortcut='none')
  x = np.random.default_rng(1).standard_normal((2, 6, 6, 4)).astype(np.float32)

  @jax.jit
  def run(x):
    variables = block.init(jax.random.key(0), x)
    return variables, block.apply(variables, x), plain.apply(variables, x)

  variables, y, y_plain = run(x)
  assert set(variables['params']) == {'conv1', 'bn1', 'conv2', 'bn2'}
  np.testing.assert_array_equal(variables['params']['bn2']['scale'], np.zeros(8))
  np.testing.assert_allclose(y, np.maximum(_shortcut_a_numpy(x, 8, 2), 0))
  # The plain twin has no identity path at all: F(x) = 0 gives 0.
  assert np.all(np.asarray(y_plain) == 0)


def test_cifar_option_a_net_has_no_projection_params():
  assert 'proj' not in _abstract('resnet20')[1]['params']['stage2_block1']
  assert 'proj' not in _abstract('plain20')[1]['params']['stage2_block1']
  assert 'proj' in _abstract('resnet20', shortcut='B')[1]['params']['stage2_block1']


def test_errors_name_the_problem():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  init = lambda m: jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
  with pytest.raises(ValueError, match=r'6n \+ 2'):
    init(resnet.CifarResNet(depth=21))
  with pytest.raises(ValueError, match='shortcut must be one of'):
    init(resnet.CifarResNet(depth=8, shortcut='D'))
  with pytest.raises(ValueError, match='no last BN'):
    init(resnet._PreActResNet1(num_classes=2, zero_init_last_bn=True))
  with pytest.raises(ValueError, match='BasicBlock has no groups'):
    init(resnet._ResNet1(num_classes=2, groups=2))
  with pytest.raises(ValueError, match='has no field'):
    registry.get_model('resnet18', widen_factor=2)


# ----------------------------------------------------------------------------
# Real forward/backward of tiny variants: our Conv vs flax.linen.Conv.
# ----------------------------------------------------------------------------



def check_ours_vs_flax(builder, input_shape, num_classes=5, compare=True):
  """`builder` with our Conv vs flax.linen.Conv: see check_train_step_ours_vs_flax."""
  ours, ref = builder(num_classes=num_classes), builder(num_classes=num_classes,
                                                        conv=nn.Conv)
  x = np.random.default_rng(0).standard_normal((2,) + input_shape).astype(np.float32)
  check_train_step_ours_vs_flax(ours, ref, x, num_classes, compare)


@pytest.mark.parametrize('builder,input_shape', [
    (resnet._ResNet1, (16, 16, 3)),          # BasicBlock, ImageNet stem
    (resnet._ResNeXt1, (16, 16, 3)),         # grouped bottleneck, 1x1 projection + BN
    (resnet._CifarResNet1, (8, 8, 3)),       # option A across a stride-2 stage
], ids=['resnet1', 'resnext1', 'cifar1'])
def test_tiny_forward_backward_ours_vs_flax(builder, input_shape, fast_compile):
  check_ours_vs_flax(builder, input_shape)


@pytest.mark.parametrize('builder,input_shape', [
    (resnet._PreActResNet1, (16, 16, 3)),    # pre-activation bottleneck, bn_final
    (resnet._WRN1, (8, 8, 3)),               # wide pre-activation blocks with dropout
], ids=['preact1', 'wrn1'])
def test_tiny_preact_gradients_reach_every_parameter(builder, input_shape, fast_compile):
  # The conv swap is covered above; here the pre-activation wiring (first unit
  # without its own BN, projection from the activated input) must leave no
  # parameter without gradient. Our Conv only, to halve the compiles.
  check_ours_vs_flax(builder, input_shape, compare=False)
