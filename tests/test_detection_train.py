"""Detection through the one training loop: the YOLO model on any backbone, the
shapes data, config checks, and a few steps of training on the embedded scenes."""
import json
import os

import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.analysis import tables
from cnn_jax.data import embedded
from cnn_jax.data import sources
from cnn_jax.train import config as config_lib
from cnn_jax.train import loop


# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


def _abstract(model, shape):
  return tables.abstract_variables(model, shape)['params']


def test_yolo_reads_the_backbone_where_it_stops_being_spatial():
  # ResNet-18 at 448: its global pool reads a 14x14x512 map, pooled to the 7x7 grid.
  model = models.get_model('yolo', num_classes=20)
  params = _abstract(model, (448, 448, 3))
  assert 'fc' not in params['net']                        # the classifier never ran
  resnet = _abstract(models.get_model('resnet18', num_classes=1), (448, 448, 3))
  n = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
  assert n(params['net']) == n(resnet) - (512 * 1 + 1)    # all of ResNet-18 but its fc
  # head: 3x3 conv 512->256 (no bias) + BN + 1x1 conv 256 -> 2 * 5 + 20 = 30.
  assert n(params) - n(params['net']) == 9 * 512 * 256 + 2 * 256 + 256 * 30 + 30
  variables = tables.abstract_variables(model, (448, 448, 3))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((2, 448, 448, 3), jnp.float32))
  assert out.shape == (2, 7, 7, 30)


def test_yolo_feature_layer_fc_head_and_errors():
  model = models.get_model('yolo_tiny', feature_layer='stage1_conv1', grid_size=2)
  x = jnp.zeros((1, 16, 16, 3))
  v = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  assert set(v['params']['net']) == {'stage1_conv1'}     # stopped after that layer
  fc = models.get_model('yolo_tiny', head='fc', fc_features=16)
  v = jax.eval_shape(lambda x: fc.init(jax.random.PRNGKey(0), x, train=False), x)
  assert v['params']['fc2']['kernel'].shape == (16, 4 * 4 * (2 * 5 + 3))
  for kw, msg in [(dict(feature_layer='stage9'), "no layer named 'stage9'"),
                  (dict(feature_layer='fc'), 'not a spatial map'),
                  (dict(grid_size=16), 'smaller than the 16x16 grid'),
                  (dict(head='dense'), 'head must be one of'),
                  (dict(backbone='unet_tiny'), 'is not a classifier')]:
    with pytest.raises(ValueError, match=msg):
      m = models.get_model('yolo_tiny', **kw)
      jax.eval_shape(lambda x, m=m: m.init(jax.random.PRNGKey(0), x, train=False), x)


def test_detection_examples_from_tfds_objects_and_shapes_records():
  voc_like = {'image': np.zeros((10, 20, 3), np.uint8),
              'objects': {'bbox': np.array([[0.1, 0.2, 0.5, 0.6]], np.float32),
                          'label': np.array([7])}}
  ex = sources.to_example(voc_like, task='detection', max_objects=3)
  np.testing.assert_allclose(ex['boxes'][0], [0.2, 0.1, 0.6, 0.5])   # yxyx -> xyxy
  assert ex['label'].tolist() == [7, 0, 0] and ex['valid'].tolist() == [True, False, False]
  shapes_like = {'image': np.zeros((8, 8, 3), np.uint8), 'num_objects': np.int64(2),
                 'boxes': np.arange(16, dtype=np.float32).reshape(4, 4) / 16,
                 'labels': np.array([1, 2, 0, 0])}
  ex = sources.to_example(shapes_like, task='detection', max_objects=2)
  assert ex['label'].tolist() == [1, 2] and ex['valid'].all()
  with pytest.raises(ValueError, match='detection.max_objects=1'):
    sources.to_example(shapes_like, task='detection', max_objects=1)


def _config(data_dir, **kw):
  c = config_lib.default_config()
  c.task, c.model, c.dataset, c.data_dir = 'detection', 'yolo_tiny', 'shapes', data_dir
  c.num_classes = 4
  c.train_split, c.val_split, c.eval_split = 'train', 'validation', 'test'
  c.train_transform = c.eval_transform = 'resize(32, 32)'
  c.detection.max_objects = 4
  c.batch_size, c.num_devices = 8, 1
  c.optimizer.name, c.optimizer.lr = 'adam', 3e-3
  c.best_metric = 'val/mAP50'
  c.progress_bar, c.print_summary = False, False
  c.num_sample_predictions = 2
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize('kw,match', [
    (dict(model='resnet_tiny'), 'needs a detection model'),
    (dict(train_transform='resize(32, 32)|flip'), 'flip move pixels'),
    (dict(best_metric='val/accuracy'), "use 'val/mAP50'"),
    (dict(task='classification', best_metric='val/accuracy'), 'is a detector'),
])
def test_bad_detection_configs_fail_before_compute(kw, match):
  c = _config('/nonexistent', num_train_steps=1, **kw)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, monkeypatch_module):
  # 64 / 16 / 24 scenes instead of 2,000 / 200 / 500: the same builder, fewer scenes.
  monkeypatch_module.setattr(embedded, 'SHAPES_SPLITS',
                             {'train': (0, 64), 'validation': (64, 80), 'test': (80, 104)})
  d = str(tmp_path_factory.mktemp('shapes_data'))
  sources.prepare_embedded('shapes', d)
  return d


@pytest.fixture(scope='module')
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


def test_a_few_steps_lower_the_loss_and_write_the_figures(data_dir, tmp_path, fast_compile):
  workdir = str(tmp_path / 'run')
  final = loop.train_and_evaluate(_config(data_dir, num_train_steps=40, log_every_steps=8,
                                          eval_every_steps=20), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    train = [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r]
  assert len(train) >= 4 and train[-1] < 0.7 * train[0], train
  assert final['test_count'] == 24 and 0.0 <= final['test_mAP50'] <= 1.0
  assert 0.0 <= final['test_mAP'] <= final['test_mAP50'] + 1e-9
  terms = sum(final[f'test_{t}_loss'] for t in ('coord', 'obj', 'noobj', 'class'))
  assert np.isclose(terms, final['test_loss'], rtol=1e-5)
  assert 'best_val_mAP50' in final
  for name in ('sample_detections.png', 'pr_curves.png', 'training_curves.png'):
    image = mpimg.imread(os.path.join(workdir, name))
    assert image.ndim == 3 and image[..., :3].std() > 0.01, name


def test_classifier_weights_fill_the_detector_backbone(fast_compile):
  from cnn_jax import transfer  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((1, 16, 16, 3))
  init = lambda m: jax.device_get(jax.jit(  # noqa: E731
      lambda k: m.init(k, x, train=False))(jax.random.PRNGKey(1)))
  classifier = init(models.get_model('ablation_cnn_tiny', num_classes=10, kernels=(3,)))
  detector = models.get_model('yolo_tiny')
  fresh = init(detector)
  nested = loop._nest_backbone(classifier, fresh)  # pylint: disable=protected-access
  heads = [p for p in transfer.stages.flat_paths(fresh['params']) if p[0] != 'net']
  variables, counts = transfer.adapt_variables(nested, fresh, heads)
  np.testing.assert_array_equal(variables['params']['net']['stage2_conv1']['kernel'],
                                classifier['params']['stage2_conv1']['kernel'])
  np.testing.assert_array_equal(variables['params']['out']['kernel'],
                                fresh['params']['out']['kernel'])
  assert 'fc' not in variables['params']['net']
  assert counts['fresh'] == len(heads)
