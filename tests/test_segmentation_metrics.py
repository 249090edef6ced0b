"""Dice and Jaccard from a pixel confusion matrix, and the segmentation losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.train import metrics, steps, writers


# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


def _scores(truth, pred, num_classes):
  cm = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(truth), num_classes)
  return metrics.segmentation_scores(np.asarray(cm))


def test_dice_and_iou_hand_computed_with_an_absent_class():
  truth = [[0, 0, 1], [1, 2, 2]]
  pred = [[0, 1, 1], [1, 2, 0]]
  s = _scores(truth, pred, 4)
  # class 0: TP 1, FP 1, FN 1 -> Dice 2/4, IoU 1/3
  # class 1: TP 2, FP 1, FN 0 -> Dice 4/5, IoU 2/3
  # class 2: TP 1, FP 0, FN 1 -> Dice 2/3, IoU 1/2
  # class 3: in neither truth nor prediction -> no score, left out of the means
  assert s['dice'][:3] == pytest.approx([0.5, 0.8, 2 / 3])
  assert s['iou'][:3] == pytest.approx([1 / 3, 2 / 3, 0.5])
  assert s['dice'][3] is None and s['iou'][3] is None
  assert s['mean_dice'] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  assert s['mean_iou'] == pytest.approx(0.5)
  assert s['pixel_accuracy'] == pytest.approx(4 / 6)
  assert s['num_scored_classes'] == 3


def test_class_missing_from_the_prediction_scores_zero():
  truth = [[0, 2], [2, 1]]
  pred = [[0, 1], [1, 1]]   # class 2 is never predicted
  s = _scores(truth, pred, 3)
  assert s['dice'][2] == 0.0 and s['iou'][2] == 0.0
  # class 1: TP 1, FP 2, FN 0 -> Dice 2/4, IoU 1/3; class 0: perfect.
  assert s['dice'][:2] == pytest.approx([1.0, 0.5])
  assert s['mean_dice'] == pytest.approx(0.5)


def test_scores_accumulate_over_batches_not_averaged():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 3, (4, 8, 8))
  pred = np.where(rng.random((4, 8, 8)) < 0.7, truth, rng.integers(0, 3, (4, 8, 8)))
  whole = _scores(truth, pred, 3)
  cm = sum(np.asarray(metrics.confusion_matrix(jnp.asarray(pred[i:i + 1]),
                                               jnp.asarray(truth[i:i + 1]), 3))
           for i in range(4))
  assert metrics.segmentation_scores(cm) == whole
  per_image = np.mean([_scores(truth[i], pred[i], 3)['mean_dice'] for i in range(4)])
  assert whole['mean_dice'] != pytest.approx(per_image, abs=1e-9)


def test_dice_loss_limits_and_value():
  labels = jnp.array([[[0, 1], [2, 2]]])
  perfect = 50.0 * jax.nn.one_hot(labels, 3)
  assert float(steps.dice_loss(perfect, labels)[0]) == pytest.approx(0.0, abs=1e-6)
  # Uniform probabilities 1/3 on 4 pixels: class c has n_c pixels;
  # Dice_c = (2 n_c / 3 + 1) / (4/3 + n_c + 1).
  n = np.array([1, 1, 2])
  dice = (2 * n / 3 + 1) / (4 / 3 + n + 1)
  got = float(steps.dice_loss(jnp.zeros((1, 2, 2, 3)), labels)[0])
  assert got == pytest.approx(1 - dice.mean(), rel=1e-6)
  w = np.array([1.0, 2.0, 3.0])
  got_w = float(steps.dice_loss(jnp.zeros((1, 2, 2, 3)), labels, class_weights=(1, 2, 3))[0])
  assert got_w == pytest.approx(1 - (dice * w).sum() / w.sum(), rel=1e-6)


def test_pixel_cross_entropy_mean_and_class_weights():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, (2, 3, 3)))
  per_pixel = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                  np.asarray(labels)[..., None], -1)[..., 0]
  np.testing.assert_allclose(steps.cross_entropy(logits, labels), per_pixel.mean((1, 2)),
                             rtol=1e-5)
  w = np.array([0.5, 1.0, 2.0, 4.0])
  pw = w[np.asarray(labels)]
  want = (per_pixel * pw).sum((1, 2)) / pw.sum((1, 2))
  np.testing.assert_allclose(steps.cross_entropy(logits, labels, class_weights=tuple(w)),
                             want, rtol=1e-5)
  both = steps.LOSS_FNS['cross_entropy+dice'](logits, labels)
  np.testing.assert_allclose(both, steps.cross_entropy(logits, labels)
                             + steps.dice_loss(logits, labels), rtol=1e-6)


def test_eval_step_counts_pixels_in_the_confusion_matrix():
  class Fixed:
    @staticmethod
    def apply(variables, x, train):
      return x   # the "image" is already the logits

  from cnn_jax.train.state import TrainState
  state = TrainState(step=0, apply_fn=Fixed.apply, params={}, batch_stats={}, opt_state=(),
                     tx=None, rng=jax.random.PRNGKey(0))
  labels = jnp.array([[[0, 1], [2, 2]], [[1, 1], [0, 0]]])
  logits = 5.0 * jax.nn.one_hot(jnp.array([[[0, 1], [2, 0]], [[0, 0], [0, 0]]]), 3)
  batch = {'image': logits, 'label': labels, 'mask': jnp.array([1.0, 0.0])}
  out = steps.eval_step(state, batch, confusion=True)
  cm = np.asarray(out['confusion'])
  assert cm.sum() == 4   # the masked second image counts for nothing
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [1, 0, 1]])
  assert float(out['correct']) == pytest.approx(0.75)


def test_epoch_csv_rows_and_resume(tmp_path):
  path = str(tmp_path / 'epochs.csv')
  for step in (10, 20, 30):
    writers.append_csv_row(path, {'step': step, 'train/loss': 1.0 / step, 'val/dice': 0.5})
  writers.append_csv_row(path, {'step': 30, 'train/loss': 0.1, 'val/dice': 0.6},
                         resume_step=20)
  rows = writers.read_csv(path)
  assert [r['step'] for r in rows] == ['10', '20', '30'] and rows[-1]['val/dice'] == '0.6'
  with pytest.raises(ValueError, match='no column'):
    writers.append_csv_row(path, {'step': 40, 'new': 1})
