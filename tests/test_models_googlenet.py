"""GoogLeNet: pinned counts, the paper's Table 1, Inception modules, aux heads
in train mode only, and tiny nets run with our Conv and flax.linen.Conv."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn_jax.models.googlenet as googlenet  # registers the family
from cnn_jax.models import registry
from model_testing import random_variables as _random_variables

# torchvision's googlenet (BN layout) has 6,624,904 parameters without its aux
# heads (the pretrained model drops them) and 13,004,888 with them (each head:
# 1x1 conv 128 + BN, FC 2048 -> 1024, FC 1024 -> 1000).
GOOGLENET_BN_PARAMS = 6_624_904
GOOGLENET_BN_PARAMS_AUX = 13_004_888
# The paper's net, computed here: Table 1's filter counts with 5x5 kernels in
# the 5x5 branches, a bias per filter and no BN. Table 1's "params" column sums
# to ~6.8M "K" (weights only, in units of 1024, conv1 misprinted); in plain
# units that is 6,990,272 weights + 8,280 biases = 6,998,552. It differs from
# torchvision's by the 5x5-vs-3x3 kernels (+16 * sum(#5x5 reduce * #5x5) =
# +380,928) and a bias instead of BN's scale and shift (-7,280).
GOOGLENET_PARAMS = 6_998_552
GOOGLENET_PARAMS_AUX = 13_378_280
# Table 1's params column, in K = 1024 weights (biases not counted).
TABLE1_K = {'conv2': 112, 'inception3a': 159, 'inception3b': 380, 'inception4a': 364,
            'inception4b': 437, 'inception4c': 463, 'inception4d': 580,
            'inception4e': 840, 'inception5a': 1072, 'inception5b': 1388, 'fc': 1000}


def _size(tree):
  return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def _abstract(name, **overrides):
  """The model and its variables (shapes only, one jax.eval_shape)."""
  model = registry.get_model(name, **overrides)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def test_registered_names():
  assert registry.list_models('googlenet') == ['googlenet', 'googlenet_bn',
                                                'googlenet_bn_tiny', 'googlenet_tiny']
  assert registry.model_info('googlenet').input_shape == (224, 224, 3)


@pytest.mark.parametrize('name,aux,params,stats', [
    ('googlenet', False, GOOGLENET_PARAMS, 0),
    ('googlenet', True, GOOGLENET_PARAMS_AUX, 0),
    ('googlenet_bn', False, GOOGLENET_BN_PARAMS, 14_560),
    ('googlenet_bn', True, GOOGLENET_BN_PARAMS_AUX, 14_560 + 2 * 2 * 128),
])
def test_param_counts(name, aux, params, stats):
  _, variables = _abstract(name, aux_logits=aux)
  assert _size(variables['params']) == params
  assert _size(variables.get('batch_stats', {})) == stats


@pytest.mark.parametrize('name', ['googlenet_tiny', 'googlenet_bn_tiny'])
def test_tiny_registered_variants(name):
  model = registry.get_model(name)
  x = jax.ShapeDtypeStruct((2,) + registry.model_info(name).input_shape, jnp.float32)
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
  assert out.shape == (2, 10)
  assert {'aux1', 'aux2', 'inception3a', 'inception4a'} <= set(variables['params'])


def test_paper_table1_params_column():
  """Table 1's column is rounded and not exactly reproducible from its own
  filter counts (4c is 7% low, 5a 5% high, conv1 reads 2.7K for 7*7*3*64 =
  9,408 weights), but every entry is within 8% and the totals agree to 0.5%."""
  _, variables = _abstract('googlenet', aux_logits=False)
  params = variables['params']
  weights = lambda tree: sum(math.prod(a.shape) for path, a in
                             jax.tree_util.tree_leaves_with_path(tree)
                             if jax.tree_util.keystr(path).endswith("['kernel']"))
  got = {'conv2': weights(params['conv2_reduce']) + weights(params['conv2'])}
  got.update({k: weights(params[k]) for k in TABLE1_K if k != 'conv2'})
  for k, table in TABLE1_K.items():
    assert abs(got[k] / 1024 - table) < 0.08 * table, (k, got[k] / 1024, table)
  # Exact where the table is: the stem, 3a and the classifier.
  assert got['conv2'] == 112 * 1024 and got['fc'] == 1000 * 1024
  assert got['inception3a'] // 1024 == 159
  assert weights(params['conv1']) == 9_408
  total_weights = weights(params)
  assert total_weights == 6_990_272
  assert abs(total_weights / 1024 - (sum(TABLE1_K.values()) + 2.7)) < 0.005 * total_weights / 1024
  assert _size(params) - total_weights == 8_280       # one bias per filter and class


@pytest.mark.parametrize('name', ['googlenet', 'googlenet_bn'])
def test_aux_logits_in_train_mode_only(name):
  model, variables = _abstract(name)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

  def run(train):
    return jax.eval_shape(
        lambda v, x: model.apply(v, x, train=train, mutable=['intermediates', 'batch_stats'],
                                 rngs={'dropout': jax.random.key(0)}), variables, x)

  for train in (True, False):
    out, state = run(train)
    assert out.shape == (2, 1000)
    inter = {k: v[0].shape for k, v in state['intermediates'].items()}
    expected = {'stem': (2, 28, 28, 192), 'stage1': (2, 28, 28, 480),
                'stage2': (2, 14, 14, 832), 'stage3': (2, 7, 7, 1024),
                'pre_logits': (2, 1024)}
    if train:
      expected.update(aux1_logits=(2, 1000), aux2_logits=(2, 1000))
    assert inter == expected, train
  # Heads after 4a (512 channels) and 4d (528): 5x5/3 pooling gives 4x4x128.
  assert variables['params']['aux1']['fc1']['kernel'].shape == (4 * 4 * 128, 1024)
  assert 'aux1' not in _abstract(name, aux_logits=False)[1]['params']


def test_bn_layout_matches_torchvision():
  params = _abstract('googlenet_bn')[1]['params']
  unit = params['inception3a']['conv5x5']
  assert set(unit) == {'conv', 'bn'} and 'bias' not in unit['conv']
  assert unit['conv']['kernel'].shape == (3, 3, 16, 32)        # torchvision's 3x3
  paper = _abstract('googlenet')[1]['params']['inception3a']['conv5x5']
  assert set(paper) == {'conv'} and paper['conv']['kernel'].shape == (5, 5, 16, 32)


def test_naive_and_reduced_inception_modules():
  """The lecture example on a 28x28x256 input: the naive module's pool branch
  passes all 256 channels on (672 out) and its convs cost 854M multiply-adds;
  1x1 reductions to 64 cut that to 271M for a 480-channel output."""
  x = jax.ShapeDtypeStruct((1, 28, 28, 256), jnp.float32)

  def shapes(module):
    return jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x), x)

  def macs(params):   # stride-1 'same' convs: one multiply-add per weight per position
    return 28 * 28 * sum(math.prod(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(
        params) if jax.tree_util.keystr(p).endswith("['kernel']"))

  out, variables = shapes(googlenet.InceptionNaive(128, 192, 96))
  assert out.shape == (1, 28, 28, 128 + 192 + 96 + 256)
  assert macs(variables['params']) == 854_196_224
  out, variables = shapes(googlenet.Inception((128, 64, 192, 64, 96, 64)))
  assert out.shape == (1, 28, 28, 480)
  assert macs(variables['params']) == 271_351_808
  assert sorted(variables['params']) == ['conv1x1', 'conv3x3', 'conv3x3_reduce', 'conv5x5',
                                         'conv5x5_reduce', 'pool_proj']


def _torch_ceil_out(n, k, s):
  out = math.ceil((n - k) / s) + 1
  return out - 1 if (out - 1) * s >= n else out


def test_ceil_mode_pooling_sizes():
  for n in range(3, 30):
    for k, s in ((3, 2), (2, 2), (3, 1)):
      lo, hi = googlenet.ceil_mode_padding(n, k, s)
      assert lo == 0 and (n + hi - k) // s + 1 == _torch_ceil_out(n, k, s), (n, k, s)
  # 'SAME' would differ on odd sizes: 113 -> 57, ceil mode gives 56.
  assert googlenet.ceil_mode_padding(113, 3, 2) == (0, 0)
  y = googlenet.max_pool_ceil(jnp.arange(7.0).reshape(1, 7, 1, 1), 2, 2)
  np.testing.assert_array_equal(y[0, :, 0, 0], [1, 3, 5, 6])


def test_bad_aux_position_is_a_clear_error():
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  with pytest.raises(ValueError, match='aux_after'):
    jax.eval_shape(lambda x: googlenet.GoogLeNet(aux_after=('4f',)).init(
        jax.random.key(0), x, train=False), x)


def test_aux_pool_larger_than_the_maps_is_a_clear_error():
  """At 64x64 stage 4's maps are 4x4, smaller than the paper's 5x5/3 aux pool: the
  error names both ways out, and both work (shapes only)."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  init = lambda m: jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
  with pytest.raises(ValueError, match=r"aux1.*4x4.*aux_pool_size=\(4, 4\).*aux_logits=False"):
    init(googlenet.GoogLeNet(num_classes=10))
  adaptive = init(googlenet.GoogLeNet(num_classes=10, aux_pool_size=(4, 4)))
  assert adaptive['params']['aux1']['fc1']['kernel'].shape == (4 * 4 * 128, 1024)
  assert 'aux1' not in init(googlenet.GoogLeNet(num_classes=10, aux_logits=False))['params']


# ----------------------------------------------------------------------------
# Real forward/backward of tiny variants: our Conv vs flax.linen.Conv.
# ----------------------------------------------------------------------------





@pytest.mark.parametrize('builder,compare', [(googlenet._GoogLeNet1, True),
                                             (googlenet._GoogLeNetBN1, False)],
                         ids=['paper', 'bn'])
def test_tiny_forward_backward(builder, compare, fast_compile):
  """One train step, loss = main + 0.3 * (aux1 + aux2) as in the paper: every
  parameter (aux heads included) gets a gradient and BN statistics move; with
  `compare`, flax.linen.Conv on the same variables gives the same logits,
  gradients. (One comparison keeps the file fast: compiling dominates, and the
  conv swap is the same in both layouts; the BN layout's is the costlier compile.)"""
  x = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype(np.float32)
  models = [builder(num_classes=5), builder(num_classes=5, conv=nn.Conv)]
  init = lambda m: jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
  variables = _random_variables(init(models[0]), seed=1)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      init(models[1]))
  weights = jnp.arange(1.0, 6.0)

  def step(model):
    def loss(p):
      out, state = model.apply({**variables, 'params': p}, x, train=True,
                               mutable=['batch_stats', 'intermediates'],
                               rngs={'dropout': jax.random.key(2)})
      inter = state['intermediates']
      aux = inter['aux1_logits'][0] + inter['aux2_logits'][0]
      return (jnp.sum(out * weights) + 0.3 * jnp.sum(aux * weights),
              (out, state.get('batch_stats', {})))
    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params'])
    return out, stats, grads

  out, stats, grads = step(models[0])
  assert out.shape == (2, 5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.any(np.asarray(g) != 0), f'no gradient reaches {jax.tree_util.keystr(path)}'
  if 'batch_stats' in variables:
    moved = jax.tree_util.tree_map(lambda new, old: bool(np.any(np.asarray(new) != old)),
                                   stats, variables['batch_stats'])
    assert all(jax.tree_util.tree_leaves(moved))
  if not compare:
    return
  out_ref, stats_ref, grads_ref = step(models[1])
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree_util.tree_leaves(grads_ref)):
    scale = max(float(jnp.max(jnp.abs(g_ref))), 1.0)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         stats, stats_ref)
