"""Transfer learning: stages and heads, freezing with optax, BN policy, head
replacement, loading from a workdir, feature extraction, class selection."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import data as data_lib
from cnn_jax import models
from cnn_jax import transfer
from cnn_jax.models import registry
from cnn_jax.train import config as config_lib
from cnn_jax.train import loop, optim, state as state_lib, steps
from cnn_jax.transfer import freeze as freeze_lib
from cnn_jax.transfer import stages as stages_lib
from model_testing import random_variables

# Every test here compiles one-off programs (inits, masked train steps, short runs):
# XLA's optimisation passes would dominate their time.
pytestmark = pytest.mark.usefixtures('fast_compile')

# One small variant per family (tiny variants keep eval_shape cheap).
FAMILY_MODELS = ['cifar_resnet_tiny', 'resnet_tiny', 'vgg_tiny', 'alexnet_tiny',
                 'densenet_tiny', 'googlenet_bn_tiny', 'googlenet_tiny', 'mobilenet_v1_tiny',
                 'mobilenet_v2_tiny', 'nin_tiny', 'highway_cnn_tiny', 'highway_mlp_tiny',
                 'cnn1d_tiny', 'textcnn_tiny', 'resunetpp_tiny', 'unet_tiny', 'lenet5',
                 'example_ffcnn', 'ablation_cnn_tiny', 'mlp']


# The training tests use a net that compiles fast: two stages of one 3x3 conv + BN.
TINY = 'ablation_cnn_tiny'
TINY_KW = dict(kernels=(3,))


def _abstract(name, **kw):
  entry = registry.model_info(name)
  if name == TINY:
    kw = {**TINY_KW, **kw}
  model = models.get_model(name, **kw)
  dtype = jnp.int32 if name.startswith('textcnn') else jnp.float32
  return model, entry.input_shape, dtype


@pytest.mark.parametrize('name', FAMILY_MODELS)
def test_every_parameter_has_a_stage_and_the_head_is_found_by_shape(name):
  model, shape, dtype = _abstract(name)
  variables = stages_lib.abstract_variables(model, shape, dtype)
  heads = stages_lib.head_paths(model, shape, dtype)
  stage = stages_lib.param_stages(model, variables['params'], heads)
  assert set(stage) == set(stages_lib.flat_paths(variables['params']))
  order = stages_lib.ordered_stages(stage)
  assert order[-1] == 'head'
  assert {stage[p] for p in heads} == {'head'}
  assert len(order) >= 3


def test_stage_names_of_known_models():
  model, shape, _ = _abstract('resnet18')
  v = stages_lib.abstract_variables(model, shape)
  heads = stages_lib.head_paths(model, shape)
  assert heads == [('fc', 'bias'), ('fc', 'kernel')]
  stage = stages_lib.param_stages(model, v['params'], heads)
  assert stages_lib.ordered_stages(stage) == ['stem', 'stage1', 'stage2', 'stage3', 'stage4',
                                              'head']
  assert stage[('conv_init', 'kernel')] == 'stem'
  assert stage[('stage3_block2', 'conv1', 'kernel')] == 'stage3'
  # MobileNet v2: a stage is a row of its (t, c, n, s) table (1, 2, 3, 4, 3, 3, 1 blocks).
  model, shape, _ = _abstract('mobilenet_v2')
  v = stages_lib.abstract_variables(model, shape)
  stage = stages_lib.param_stages(model, v['params'], stages_lib.head_paths(model, shape))
  assert stage[('block1', 'dw', 'kernel')] == 'stage1'
  assert stage[('block3', 'dw', 'kernel')] == 'stage2'
  assert stage[('block17', 'dw', 'kernel')] == 'stage7'
  assert stage[('conv_last', 'kernel')] == 'stage7'
  # GoogLeNet: the aux classifiers' output layers depend on num_classes too.
  model, shape, _ = _abstract('googlenet_bn_tiny')
  tops = {p[0] for p in stages_lib.head_paths(model, shape)}
  assert tops == {'aux1', 'aux2', 'fc'}


def test_a_model_without_a_class_dependent_output_has_no_head():
  model, shape, _ = _abstract('lenet5_classic')   # fixed RBF prototypes
  with pytest.raises(ValueError, match='no parameter depends on num_classes'):
    stages_lib.head_paths(model, shape)


# ---------------------------------------------------------------------------
# The plan: freeze specs, lr multipliers, phases.
# ---------------------------------------------------------------------------

def _plan(name=TINY, **kw):
  model, shape, _ = _abstract(name, num_classes=5)
  v = stages_lib.abstract_variables(model, shape)
  return model, shape, v, freeze_lib.make_plan(model, v['params'], shape, **kw)


def test_freeze_by_stage_name_backbone_and_regex():
  _, _, v, plan = _plan(freeze='stage1')
  frozen = {plan.stage[p] for p, k in plan.unfreeze_phase.items() if k == freeze_lib.NEVER}
  assert frozen == {'stage1'}
  _, _, _, plan = _plan(freeze='backbone')
  assert all((k == 0) == (plan.stage[p] == 'head') for p, k in plan.unfreeze_phase.items())
  _, _, _, plan = _plan(freeze=r'conv\d/kernel$')
  frozen = sorted(stages_lib.path_str(p) for p, k in plan.unfreeze_phase.items() if k)
  assert frozen == ['stage1_conv1/kernel', 'stage2_conv1/kernel']
  assert plan.unfreeze_phase[('stage1_bn1', 'scale')] == 0


@pytest.mark.parametrize('spec,match', [
    ('stage9', 'matches no parameter'),
    ('stage1,[', 'neither a stage'),
    ('backbone,head', 'freezes every parameter'),
])
def test_bad_freeze_specs_name_the_problem(spec, match):
  with pytest.raises(ValueError, match=match):
    _plan(freeze=spec)


def test_lr_multipliers_and_stage_decay():
  _, _, _, plan = _plan(stage_lr_decay=0.5)
  assert plan.order == ['stage1', 'stage2', 'head']
  mult = {plan.stage[p]: m for p, m in plan.lr_mult.items()}
  assert mult == {'head': 1.0, 'stage2': 0.5, 'stage1': 0.25}
  _, _, _, plan = _plan(stage_lr_decay=0.5, lr_multipliers='stage1=0.01,fc/bias=2')
  assert plan.lr_mult[('stage1_conv1', 'kernel')] == 0.01
  assert plan.lr_mult[('stage2_conv1', 'kernel')] == 0.5
  assert plan.lr_mult[('fc', 'bias')] == 2.0
  assert plan.lr_mult[('fc', 'kernel')] == 1.0
  with pytest.raises(ValueError, match='stage_or_regex=number'):
    _plan(lr_multipliers='stage1:0.1')


def test_gradual_unfreezing_goes_top_down():
  _, _, _, plan = _plan(freeze='backbone', unfreeze_every_steps=10)
  phase_of = {plan.stage[p]: k for p, k in plan.unfreeze_phase.items()}
  assert phase_of == {'head': 0, 'stage2': 1, 'stage1': 2}
  assert [plan.phase(s) for s in (0, 9, 10, 19, 20, 1000)] == [0, 0, 1, 1, 2, 2]
  assert plan.num_phases == 3


# ---------------------------------------------------------------------------
# Training steps: frozen parameters and statistics do not move.
# ---------------------------------------------------------------------------

def _state_and_batch(plan_kw, name=TINY, opt=None):
  model, shape, v, plan = _plan(name, **plan_kw)
  opt = dict(name='momentum', lr=0.1, weight_decay=1e-3) if opt is None else opt
  tx = optim.make_optimizer(opt, split=lambda mc: plan.optimizer(mc, 0))[0]
  state = state_lib.create_train_state(model, tx, shape, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8,) + shape), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 5, 8), jnp.int32)}
  return model, plan, state, batch, v


def _step_fn(model, plan, v, phase=0):
  return jax.jit(lambda s, b: steps.train_step(
      s, b, grad_mask=plan.grad_mask(v['params'], phase),
      stats_mask=plan.stats_mask(v['batch_stats'], phase),
      apply_fn=(freeze_lib.eval_mode_bn_apply(model.apply, plan.frozen_bn_modules(phase))
                if plan.frozen_bn == 'eval' else None)))


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree))


@pytest.mark.parametrize('frozen_bn', ['eval', 'keep', 'update'])
def test_frozen_parameters_are_bit_identical_after_steps(frozen_bn):
  model, plan, state, batch, v = _state_and_batch(dict(freeze='stage1',
                                                       frozen_bn=frozen_bn))
  step = _step_fn(model, plan, v)
  before_p, before_s = _flat(state.params), _flat(state.batch_stats)
  for _ in range(3):
    state, _ = step(state, batch)
  after_p, after_s = _flat(state.params), _flat(state.batch_stats)
  for path, value in before_p.items():
    same = np.array_equal(value, after_p[path])
    assert same == (plan.stage[path] == 'stage1'), path
  for path, value in before_s.items():
    frozen_module = path[:-1] in plan.frozen_bn_modules(0)
    assert np.array_equal(value, after_s[path]) == (frozen_module and frozen_bn != 'update')


def test_frozen_parameters_have_no_optimizer_state():
  _, plan, state, _, _ = _state_and_batch(dict(freeze='stage1'))
  n_trainable = sum(int(np.prod(np.shape(x))) for p, x in _flat(state.params).items()
                    if plan.unfreeze_phase[p] == 0)
  # Momentum keeps one trace entry per trainable parameter, none for frozen ones.
  n_state = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(state.opt_state)
                if np.ndim(x) > 0)
  assert n_state == n_trainable


def test_eval_mode_bn_on_a_frozen_net_matches_the_eval_forward_pass():
  model, shape, _, plan = _plan(freeze='backbone')
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1,) + shape), train=False))(
      jax.random.PRNGKey(0))
  # Non-trivial running statistics, so that using them is visible.
  variables = dict(variables)
  variables['batch_stats'] = jax.tree_util.tree_map(
      lambda s: s + 0.3, variables['batch_stats'])
  x = jax.random.normal(jax.random.PRNGKey(1), (4,) + shape)
  apply = freeze_lib.eval_mode_bn_apply(model.apply, plan.frozen_bn_modules(0))
  train_out, mutated = apply(variables, x, train=True, mutable=['batch_stats'])
  eval_out = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(train_out), np.asarray(eval_out))
  plain_train = model.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  assert not np.allclose(np.asarray(plain_train), np.asarray(eval_out))
  for a, b in zip(jax.tree_util.tree_leaves(mutated['batch_stats']),
                  jax.tree_util.tree_leaves(variables['batch_stats'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_held_groups_keep_their_state_until_their_phase():
  model, plan, state, batch, v = _state_and_batch(dict(freeze='stage1,stage2',
                                                       unfreeze_every_steps=2))
  tx1 = optim.make_optimizer(dict(name='momentum', lr=0.1, weight_decay=1e-3),
                             split=lambda mc: plan.optimizer(mc, 1))[0]
  # Every phase's optimizer state has the layout of phase 0's.
  assert (jax.tree_util.tree_structure(tx1.init(state.params))
          == jax.tree_util.tree_structure(state.opt_state))
  step0 = _step_fn(model, plan, v, 0)
  state, _ = step0(state, batch)
  p0 = _flat(state.params)
  state = state.replace(tx=tx1)
  state, _ = _step_fn(model, plan, v, 1)(state, batch)
  p1 = _flat(state.params)
  for path in p0:
    moved = not np.array_equal(p0[path], p1[path])
    assert moved == (plan.stage[path] != 'stage1'), path   # stage2 trains from phase 1


# ---------------------------------------------------------------------------
# Head replacement and loading.
# ---------------------------------------------------------------------------

def _real_variables(name, num_classes, seed=0):
  """Concrete variables with the model's tree and shapes; different seeds give different
  values (filled in NumPy from jax.eval_shape, so no init is compiled)."""
  model, shape, _ = _abstract(name, num_classes=num_classes)
  v = random_variables(stages_lib.abstract_variables(model, shape), seed)
  return model, shape, {k: v[k] for k in ('params', 'batch_stats')}


def test_head_replacement_gives_the_new_shape_and_keeps_the_rest():
  _, _, pretrained = _real_variables(TINY, 10, seed=0)
  model, shape, fresh = _real_variables(TINY, 3, seed=1)
  heads = transfer.head_paths(model, shape)
  out, counts = transfer.adapt_variables(pretrained, fresh, heads)
  assert out['params']['fc']['kernel'].shape == (8, 3)
  np.testing.assert_array_equal(out['params']['fc']['kernel'], fresh['params']['fc']['kernel'])
  np.testing.assert_array_equal(out['params']['stage1_conv1']['kernel'],
                                pretrained['params']['stage1_conv1']['kernel'])
  np.testing.assert_array_equal(out['batch_stats']['stage1_bn1']['mean'],
                                pretrained['batch_stats']['stage1_bn1']['mean'])
  assert counts == {'fresh': 2, 'loaded': 10}
  with pytest.raises(ValueError, match="num_classes differs; use transfer.head='replace'"):
    transfer.adapt_variables(pretrained, fresh, heads, replace_head=False)


def test_adapt_names_missing_unexpected_and_misshaped_tensors():
  _, _, pretrained = _real_variables(TINY, 10)
  model, shape, fresh = _real_variables(TINY, 10)
  heads = transfer.head_paths(model, shape)
  bad = jax.tree_util.tree_map(lambda x: x, pretrained)
  del bad['params']['stage2_conv1']
  bad['params']['extra'] = {'kernel': np.zeros((2, 2))}
  bad['params']['stage1_conv1']['kernel'] = np.zeros((5, 5, 1, 4), np.float32)
  with pytest.raises(ValueError) as e:
    transfer.adapt_variables(bad, fresh, heads)
  msg = str(e.value)
  assert 'missing params/stage2_conv1/kernel' in msg
  assert 'unexpected params/extra/kernel' in msg
  assert 'shape of params/stage1_conv1/kernel: pretrained (5, 5, 1, 4)' in msg


# ---------------------------------------------------------------------------
# Class selection and config checks.
# ---------------------------------------------------------------------------

class _Labels:
  def __init__(self, labels):
    self.labels = labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {'image': np.full((2,), i, np.float32), 'label': np.int64(self.labels[i])}


def test_select_keeps_classes_relabels_and_takes_n_per_class():
  src = _Labels([0, 5, 6, 5, 7, 6, 5, 9, 6])
  sub = data_lib.select(src, [5, 6])
  assert len(sub) == 6
  assert [int(sub[i]['label']) for i in range(len(sub))] == [0, 1, 0, 1, 0, 1]
  few = data_lib.select(src, [6, 5], per_class=2, seed=3)
  labels = [int(few[i]['label']) for i in range(len(few))]
  assert sorted(labels) == [0, 0, 1, 1]
  assert few[0]['image'][0] in (1, 2, 3, 5, 6, 8)
  assert data_lib.select(src, [6, 5], per_class=2, seed=3)[1]['image'][0] == few[1]['image'][0]
  with pytest.raises(ValueError, match='class 3 has no examples'):
    data_lib.select(src, [3])
  with pytest.raises(ValueError, match='fewer than train_examples_per_class=4'):
    data_lib.select(src, [5, 6], per_class=4)


def test_parse_classes():
  assert config_lib.parse_classes('5-9') == [5, 6, 7, 8, 9]
  assert config_lib.parse_classes('3, 1,7-8') == [3, 1, 7, 8]
  assert config_lib.parse_classes('') is None
  for bad in ('a', '1,1', '2-x'):
    with pytest.raises(ValueError, match="'classes'"):
      config_lib.parse_classes(bad)


def _base_config(**transfer_kw):
  c = config_lib.default_config()
  c.model, c.dataset, c.num_train_steps = 'cifar_resnet_tiny', 'digits', 1
  for k, v in transfer_kw.items():
    c.transfer[k] = v
  return c


@pytest.mark.parametrize('kw,match', [
    (dict(mode='features'), "set 'transfer.init_from'"),
    (dict(init_from='/nonexistent/run'), 'does not exist'),
    (dict(unfreeze_every_epochs=1.0), "'transfer.freeze', which is empty"),
    (dict(frozen_bn='frozen'), "'transfer.frozen_bn'"),
    (dict(stage_lr_decay=0.0), 'must be positive'),
])
def test_bad_transfer_configs_fail_before_compute(kw, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(_base_config(**kw))


def test_features_mode_rejects_augmentation(tmp_path):
  c = _base_config(mode='features', init_from=str(tmp_path))
  c.train_transform = 'flip'
  with pytest.raises(ValueError, match='random augmentation cannot apply'):
    config_lib.validate(c)


def test_workdirs_written_before_new_keys_still_resume():
  import json
  current = json.loads(config_lib.to_json(config_lib.default_config()))
  saved = {k: v for k, v in current.items()
           if k not in ('transfer', 'classes', 'train_examples_per_class')}
  assert config_lib.differing_keys(saved, current) == []
  c = config_lib.default_config()
  c.transfer.freeze = 'stem'
  assert config_lib.differing_keys(saved, json.loads(config_lib.to_json(c))) == [
      'transfer.freeze']


# ---------------------------------------------------------------------------
# End to end: pretrain on digits 0-4, transfer to 5-9 from 10 examples per class.
# ---------------------------------------------------------------------------

def _digits_config(**kw):
  c = config_lib.default_config()
  c.model, c.dataset = TINY, 'digits'
  c.model_kwargs = dict(TINY_KW)
  c.batch_size, c.num_devices = 8, 2
  c.progress_bar, c.write_plots, c.print_summary = False, False, False
  c.best_metric = ''
  c.optimizer.lr = 0.05
  for k, v in kw.items():
    if k.startswith('transfer_'):
      c.transfer[k[len('transfer_'):]] = v
    else:
      c[k] = v
  return c


@pytest.fixture(scope='module')
def pretrained_dir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('transfer') / 'src')
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)   # compile time dominates
  try:
    loop.train_and_evaluate(_digits_config(classes='0-4', num_train_steps=6), wd)
  finally:
    jax.config.update('jax_disable_most_optimizations', old)
  return wd


def test_finetune_from_a_workdir_keeps_frozen_stages(pretrained_dir, tmp_path):
  wd = str(tmp_path / 'ft')
  c = _digits_config(classes='5-9', train_examples_per_class=4, num_train_steps=4,
                     transfer_init_from=pretrained_dir, transfer_freeze='stage1')
  final = loop.train_and_evaluate(c, wd)
  assert final['test_count'] == 180.0     # every test digit of 5-9
  src, _ = transfer.restore_workdir_variables(pretrained_dir)
  out, info = transfer.restore_workdir_variables(wd)
  assert info['step'] == 4
  a, b = _flat(src), _flat(out)
  stage = {('params',) + p: s for p, s in _plan(freeze='stage1')[3].stage.items()}
  for path, value in a.items():
    key = path if path[0] == 'params' else ('params',) + path[1:-1] + ('scale',)
    frozen = stage.get(key) == 'stage1'
    if path[1] == 'fc':
      continue
    assert np.array_equal(value, b[path]) == frozen, path
  assert b[('params', 'fc', 'kernel')].shape == (8, 5)


def test_features_mode_caches_and_matches_the_full_model(pretrained_dir, tmp_path):
  wd = str(tmp_path / 'feat')
  c = _digits_config(classes='5-9', train_examples_per_class=4, num_train_steps=5,
                     transfer_init_from=pretrained_dir, transfer_mode='features')
  final = loop.train_and_evaluate(c, wd)
  cache = os.path.join(wd, 'features', 'eval.npz')
  assert os.path.exists(cache) and final['test_count'] == 180.0
  mtime = os.path.getmtime(cache)
  run = loop.Run(c, wd)
  run.prepare_features()                  # served from the cache, not recomputed
  assert os.path.getmtime(cache) == mtime
  assert run.eval_source.features.shape == (180, 8)
  # The trained linear head on cached features = the backbone with that head merged in.
  head, _ = transfer.restore_workdir_variables(wd)
  backbone, _ = transfer.restore_workdir_variables(pretrained_dir)
  full = transfer.merge_head(backbone, head['params'], 'fc')
  src = data_lib.select(data_lib.get_source('digits', 'test'), [5, 6, 7, 8, 9])
  images = np.stack([data_lib.to_example(src[i])['image'] for i in range(6)])
  model = models.get_model(TINY, num_classes=5, **TINY_KW)
  logits_full = model.apply(full, images, train=False)
  logits_head = run.model.apply({'params': head['params']},
                                run.eval_source.features[:6])
  np.testing.assert_allclose(np.asarray(logits_full), np.asarray(logits_head), rtol=1e-5,
                             atol=1e-5)


def test_gradual_unfreezing_resumes_bit_identically(pretrained_dir, tmp_path):
  # 20 examples, batch 8: 2 steps per epoch; a stage unfreezes every epoch.
  kw = dict(classes='5-9', train_examples_per_class=4, num_train_steps=4,
            transfer_init_from=pretrained_dir, transfer_freeze='backbone',
            transfer_unfreeze_every_epochs=1.0, transfer_frozen_bn='eval')
  straight = str(tmp_path / 'straight')
  loop.train_and_evaluate(_digits_config(**kw), straight)
  resumed = str(tmp_path / 'resumed')
  out = loop.train_and_evaluate(_digits_config(**kw), resumed, stop_after_steps=3)
  assert out == {'status': 'stopped', 'step': 3}
  loop.train_and_evaluate(_digits_config(**kw), resumed)
  a, _ = transfer.restore_workdir_variables(straight)
  b, _ = transfer.restore_workdir_variables(resumed)
  src, _ = transfer.restore_workdir_variables(pretrained_dir)
  fa, fb, fs = _flat(a), _flat(b), _flat(src)
  for path in fa:
    np.testing.assert_array_equal(fa[path], fb[path], err_msg=str(path))
  # After 4 steps (phases: head at 0-1, + stage2 at 2-3) stage1 is still frozen and
  # stage2 has moved.
  assert np.array_equal(fa[('params', 'stage1_conv1', 'kernel')],
                        fs[('params', 'stage1_conv1', 'kernel')])
  assert not np.array_equal(fa[('params', 'stage2_conv1', 'kernel')],
                            fs[('params', 'stage2_conv1', 'kernel')])
