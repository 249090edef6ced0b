"""Confusion matrix, top-k and classification report against NumPy loops and sklearn."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from cnn_jax.train import metrics

# One compiled program per input signature; eager mode would compile every op.
_confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)
_topk = jax.jit(metrics.topk_correct, static_argnums=2)


def _loop_confusion(preds, labels, num_classes, mask=None):
  cm = np.zeros((num_classes, num_classes), np.float64)
  mask = np.ones(len(labels)) if mask is None else mask
  for p, t, m in zip(preds, labels, mask):
    if 0 <= t < num_classes and 0 <= p < num_classes:
      cm[t, p] += m
  return cm


def test_confusion_matrix_matches_loop_with_mask():
  rng = np.random.default_rng(0)
  n, c = 97, 6
  logits = rng.normal(size=(n, c)).astype(np.float32)
  labels = rng.integers(0, c, n)
  mask = (rng.random(n) < 0.7).astype(np.int32)
  labels_padded = np.where(mask == 1, labels, -1)   # padding rows carry label -1
  cm = _confusion(logits, labels_padded, c, mask)
  assert cm.dtype == jnp.int32 and cm.shape == (c, c)
  want = _loop_confusion(logits.argmax(-1), labels, c, mask)
  np.testing.assert_array_equal(np.asarray(cm), want)
  assert int(cm.sum()) == mask.sum()
  # Predictions instead of logits, and float weights (kept fractional).
  w = rng.random(n).astype(np.float32)
  cm_w = _confusion(logits.argmax(-1), labels, c, w)
  assert cm_w.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(cm_w), _loop_confusion(logits.argmax(-1), labels, c, w),
                             rtol=1e-5)
  cm_i = jax.jit(functools.partial(metrics.confusion_matrix, dtype=jnp.int32),
                 static_argnums=2)(logits, labels, c, mask.astype(np.float32))
  assert cm_i.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(cm_i), want)
  # Without a mask, out-of-range labels are not counted.
  cm_nomask = _confusion(logits, labels_padded, c)
  np.testing.assert_array_equal(np.asarray(cm_nomask), want)


def test_confusion_matrix_segmentation_shape_and_binary_logit():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 4, 3))
  labels = rng.integers(0, 3, (2, 5, 4))
  cm = _confusion(logits, labels, 3)
  want = _loop_confusion(logits.argmax(-1).ravel(), labels.ravel(), 3)
  np.testing.assert_array_equal(np.asarray(cm), want)
  one_logit = rng.normal(size=(20, 1))
  y = rng.integers(0, 2, 20)
  cm2 = _confusion(one_logit, y, 2)
  np.testing.assert_array_equal(np.asarray(cm2), skm.confusion_matrix(y, one_logit[:, 0] > 0))


def test_confusion_matrix_errors():
  with pytest.raises(ValueError, match='predictions of shape'):
    metrics.confusion_matrix(np.zeros((4, 3, 2)), np.zeros(4, int), 3)
  with pytest.raises(ValueError, match='integer class ids'):
    metrics.confusion_matrix(np.zeros(4), np.zeros(4, int), 3)
  with pytest.raises(ValueError, match='mask shape'):
    metrics.confusion_matrix(np.zeros((4, 3)), np.zeros(4, int), 3, mask=np.ones(3))


def test_confusion_matrix_psum_over_devices_equals_full_batch():
  d = min(jax.local_device_count(), 4)
  if d < 2:
    pytest.skip('needs 2+ devices (tests/conftest.py asks XLA for 8 CPU devices)')
  rng = np.random.default_rng(2)
  c, per = 5, 8
  logits = rng.normal(size=(d * per, c)).astype(np.float32)
  labels = rng.integers(0, c, d * per)
  mask = (rng.random(d * per) < 0.8).astype(np.float32)

  @functools.partial(jax.pmap, axis_name='batch')
  def per_device(lg, lb, m):
    return jax.lax.psum(metrics.confusion_matrix(lg, lb, c, m), 'batch')

  split = lambda x: x.reshape((d, per) + x.shape[1:])
  out = per_device(split(logits), split(labels), split(mask))
  full = _confusion(logits, labels, c, mask)
  for i in range(d):   # every device holds the global matrix
    np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(full))


def test_topk_correct():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(50, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 50)
  top5 = np.asarray(_topk(logits, labels, 5))
  rank = (logits > logits[np.arange(50), labels][:, None]).sum(-1)   # distinct values
  np.testing.assert_array_equal(top5, (rank < 5).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(_topk(logits, labels, 1)),
                                (logits.argmax(-1) == labels).astype(np.float32))
  assert np.all(np.asarray(_topk(logits, labels, 50)) == 1)   # k clipped
  assert float(skm.top_k_accuracy_score(labels, logits, k=5, labels=range(10))) == top5.mean()
  with pytest.raises(ValueError, match='k must be'):
    metrics.topk_correct(logits, labels, 0)


def test_add_error_rates():
  m = {'accuracy': 0.75, 'val/accuracy': 0.5, 'val/top5_accuracy': 0.875, 'loss': 1.0,
       'train/top5_accuracy': jnp.float32(0.25)}
  out = metrics.add_error_rates(m)
  assert out['error'] == 0.25 and out['val/error'] == 0.5
  assert out['val/top5_error'] == 0.125 and float(out['train/top5_error']) == 0.75
  assert 'loss' in out and 'val/top5_accuracy' in out and 'top5_error' not in m
  assert set(out) - set(m) == {'error', 'val/error', 'val/top5_error', 'train/top5_error'}


def _sklearn_report(y, p):
  prec, rec, f1, sup = skm.precision_recall_fscore_support(y, p, zero_division=0)
  macro = skm.precision_recall_fscore_support(y, p, average='macro', zero_division=0)
  return prec, rec, f1, sup, macro


@pytest.mark.parametrize('seed', [0, 1])
def test_classification_report_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  c, n = 7, 300
  y = rng.integers(0, c, n)
  p = np.where(rng.random(n) < 0.6, y, rng.integers(0, c, n))
  p[p == 3] = 4                    # class 3 is never predicted: precision 0
  y = y[y != 5]; p = p[:len(y)]    # class 5 absent from the labels: recall 0
  cm = _loop_confusion(p, y, c)   # the report is host-side; no device work needed
  report = metrics.classification_report(cm)
  prec, rec, f1, sup, macro = _sklearn_report(y, p)
  present = sorted(set(y) | set(p))   # sklearn's default labels
  np.testing.assert_allclose(np.array(report['precision'])[present], prec)
  np.testing.assert_allclose(np.array(report['recall'])[present], rec)
  np.testing.assert_allclose(np.array(report['f1'])[present], f1)
  np.testing.assert_array_equal(np.array(report['support'])[present], sup)
  np.testing.assert_allclose([report['macro_precision'], report['macro_recall'],
                              report['macro_f1']], macro[:3], rtol=1e-12)
  assert report['accuracy'] == pytest.approx(skm.accuracy_score(y, p))
  assert report['error'] == pytest.approx(1 - report['accuracy'])
  assert report['count'] == len(y)


def test_classification_report_class_absent_everywhere_is_left_out_of_macro():
  cm = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])   # class 2: no labels, no predictions
  y = np.repeat([0, 0, 1, 1], [3, 1, 2, 4]); p = np.repeat([0, 1, 0, 1], [3, 1, 2, 4])
  report = metrics.classification_report(cm, class_names=['a', 'b', 'c'])
  assert report['macro_f1'] == pytest.approx(skm.f1_score(y, p, average='macro'))
  assert report['f1'][2] == 0.0 and report['support'][2] == 0
  assert report['class_names'] == ['a', 'b', 'c']
  with pytest.raises(ValueError, match='empty'):
    metrics.classification_report(np.zeros((3, 3)))
  with pytest.raises(ValueError, match='square'):
    metrics.classification_report(np.zeros((3, 2)))
