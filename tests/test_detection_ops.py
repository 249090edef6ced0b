"""Detection ops: boxes and IoU, YOLO encoding, NMS, the YOLO v1 loss and mAP."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import detection as det
from cnn_jax.detection import metrics as det_metrics

# Every program here is tiny: XLA's optimisation passes would cost more than they save.
pytestmark = pytest.mark.usefixtures('fast_compile')


# ---------------------------------------------------------------- boxes and IoU

def test_box_formats_round_trip_and_area():
  xyxy = jnp.array([[1.0, 2.0, 4.0, 8.0], [0.0, 0.0, 0.0, 0.0]])
  cxcywh = det.xyxy_to_cxcywh(xyxy)
  np.testing.assert_allclose(cxcywh, [[2.5, 5.0, 3.0, 6.0], [0, 0, 0, 0]])
  np.testing.assert_allclose(det.cxcywh_to_xyxy(cxcywh), xyxy)
  # An inverted box counts as empty.
  np.testing.assert_allclose(det.box_area(jnp.array([[1.0, 2.0, 4.0, 8.0],
                                                     [4.0, 0.0, 1.0, 5.0]])), [18.0, 0.0])


def test_iou_hand_computed_cases():
  a = jnp.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
  b = jnp.array([[0.0, 0.0, 10.0, 10.0],     # identical: 1
                 [5.0, 0.0, 15.0, 10.0],     # half overlap: 50 / 150
                 [2.0, 2.0, 4.0, 4.0],       # contained: 4 / 100
                 [10.0, 0.0, 20.0, 10.0],    # touching edge: 0
                 [0.0, 0.0, 0.0, 0.0]])      # empty: 0
  expected = [[1.0, 1 / 3, 0.04, 0.0, 0.0], [0.0] * 5]   # an empty box has IoU 0, even with itself
  np.testing.assert_allclose(det.iou(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(det.elementwise_iou(a, b[:2]), [1.0, 0.0])
  # Leading batch axes; the gradient through an empty box pair is finite.
  assert det.iou(jnp.stack([a, a]), b).shape == (2, 2, 5)
  g = jax.grad(lambda x: det.iou(x, b).sum())(a)
  assert np.all(np.isfinite(g))


def test_clip_and_normalize():
  boxes = jnp.array([[-5.0, 10.0, 120.0, 70.0]])
  np.testing.assert_allclose(det.clip_boxes(boxes, height=60, width=100), [[0, 10, 100, 60]])
  norm = det.normalize_boxes(boxes, height=50, width=100)
  np.testing.assert_allclose(norm, [[-0.05, 0.2, 1.2, 1.4]], rtol=1e-6)
  np.testing.assert_allclose(det.denormalize_boxes(norm, 50, 100), boxes, rtol=1e-6)


def test_encode_yolo_hand_case():
  # S=2, C=2. Box 0 centre (0.25, 0.75): row 1, column 0, offsets (0.5, 0.5),
  # w = 0.36, h = 0.16. Box 1 (larger) and box 2 (smaller) share cell row 0,
  # column 1; the larger wins. Box 3 is padding.
  boxes = jnp.array([[0.07, 0.67, 0.43, 0.83],
                     [0.6, 0.1, 1.0, 0.3],
                     [0.7, 0.2, 0.8, 0.3],
                     [0.0, 0.0, 1.0, 1.0]])
  labels = jnp.array([1, 0, 1, 1], jnp.int32)
  valid = jnp.array([True, True, True, False])
  t = det.encode_yolo(boxes, labels, valid, 2, 2)
  assert t.shape == (2, 2, 7)
  np.testing.assert_allclose(t[..., 4], [[0, 1], [1, 0]])
  np.testing.assert_allclose(t[1, 0], [0.5, 0.5, 0.6, 0.4, 1, 0, 1], atol=1e-6)
  # box 1: centre (0.8, 0.2) -> offsets (0.6, 0.4), sqrt(0.4), sqrt(0.2), class 0.
  np.testing.assert_allclose(t[0, 1], [0.6, 0.4, math.sqrt(0.4), math.sqrt(0.2), 1, 1, 0],
                             atol=1e-6)
  np.testing.assert_array_equal(t[0, 0], 0)
  np.testing.assert_array_equal(t[1, 1], 0)


def _random_ground_truth(rng, s, num_classes, m, count):
  """`count` boxes with centres in distinct cells, padded to m rows."""
  cells = rng.choice(s * s, size=count, replace=False)
  row, col = cells // s, cells % s
  cx = (col + rng.uniform(0.05, 0.95, count)) / s
  cy = (row + rng.uniform(0.05, 0.95, count)) / s
  w = 2 * np.minimum(cx, 1 - cx) * rng.uniform(0.2, 1.0, count)   # inside the image
  h = 2 * np.minimum(cy, 1 - cy) * rng.uniform(0.2, 1.0, count)
  boxes = np.zeros((m, 4), np.float32)
  boxes[:count] = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
  labels = np.zeros(m, np.int32)
  labels[:count] = rng.integers(0, num_classes, count)
  return boxes, labels, np.arange(m) < count


def test_encode_decode_round_trip_batched_under_jit_and_vmap():
  s, b, c, m = 3, 2, 4, 5
  rng = np.random.default_rng(0)
  gts = [_random_ground_truth(rng, s, c, m, count) for count in (4, 1)]
  boxes, labels, valid = (np.stack(x) for x in zip(*gts))
  encode = jax.jit(jax.vmap(functools.partial(det.encode_yolo, grid_size=s, num_classes=c)))
  targets = encode(boxes, labels, valid)
  # Leading batch axes work without vmap too.
  np.testing.assert_allclose(det.encode_yolo(boxes, labels, valid, s, c), targets)
  pred = det.perfect_yolo_prediction(targets, b)
  assert pred.shape == (2, s, s, b * 5 + c)
  decode = jax.jit(functools.partial(det.decode_yolo, grid_size=s, num_boxes=b, num_classes=c))
  out_boxes, scores = decode(pred)
  assert out_boxes.shape == (2, s * s * b, 4) and scores.shape == (2, s * s * b, c)
  for n in range(2):
    for k in np.nonzero(valid[n])[0]:
      cx, cy = (boxes[n, k, :2] + boxes[n, k, 2:]) / 2
      row = (int(cy * s) * s + int(cx * s)) * b          # the cell's predictor 0
      np.testing.assert_allclose(out_boxes[n, row], boxes[n, k], atol=1e-5)
      np.testing.assert_allclose(scores[n, row], np.eye(c)[labels[n, k]], atol=1e-6)
    # Every other predictor scores 0.
    assert int(np.sum(np.asarray(scores[n]).max(-1) > 0.5)) == valid[n].sum()
  # End to end: per-class NMS of the decoded output finds every object, mAP 1.
  kept = jax.vmap(functools.partial(det.batched_class_nms, max_detections=6))(out_boxes, scores)
  dets = [{k: np.asarray(v[n]) for k, v in kept.items()} for n in range(2)]
  result = det.evaluate_detections(dets, list(zip(boxes, labels, valid)), c)
  assert result['map50'] == pytest.approx(1.0) and result['map_coco'] == pytest.approx(1.0)
  assert result['num_detections'].sum() == valid.sum()


def test_decode_layout_hand_case():
  # S=2, B=2, C=2: cell row 1, column 0, predictor 1 -> output row (1*2 + 0)*2 + 1 = 5.
  pred = np.zeros((2, 2, 12), np.float32)
  pred[1, 0, 5:10] = [0.0, 0.0, 0.5, 0.4, 100.0]   # tx, ty, tw, th, tc of predictor 1
  pred[1, 0, 10:] = [0.0, math.log(3.0)]            # softmax -> (1/4, 3/4)
  boxes, scores = det.decode_yolo(jnp.asarray(pred), 2, 2, 2)
  # centre ((0 + 0.5)/2, (1 + 0.5)/2) = (0.25, 0.75), w = 0.25, h = 0.16
  np.testing.assert_allclose(boxes[5], [0.125, 0.67, 0.375, 0.83], atol=1e-6)
  np.testing.assert_allclose(scores[5], [0.25, 0.75], atol=1e-6)
  np.testing.assert_allclose(scores[4], [0.125, 0.375], atol=1e-6)  # sigmoid(0) = 1/2
  # A box reaching past the image is clipped unless asked not to.
  pred[0, 0, 0:4] = [0.0, 0.0, 1.0, 1.0]
  np.testing.assert_allclose(det.decode_yolo(jnp.asarray(pred), 2, 2, 2)[0][0], [0, 0, 0.75, 0.75])
  np.testing.assert_allclose(det.decode_yolo(jnp.asarray(pred), 2, 2, 2, clip=False)[0][0],
                             [-0.25, -0.25, 0.75, 0.75])


def test_box_errors_name_the_problem():
  with pytest.raises(ValueError, match='last axis of 4'):
    det.iou(jnp.zeros((3, 5)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match=r'B\*5 \+ C'):
    det.decode_yolo(jnp.zeros((2, 2, 11)), 2, 2, 2)
  with pytest.raises(ValueError, match='grid_size must be a Python int'):
    det.encode_yolo(jnp.zeros((1, 4)), jnp.zeros(1, jnp.int32), jnp.ones(1, bool), 2.0, 2)


# ---------------------------------------------------------------- NMS

def _np_iou(a, b):
  lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(hi - lo, 0, None))
  union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
  return inter / union if union > 0 else 0.0


def _np_nms(boxes, scores, iou_thr, score_thr, max_det):
  keep, removed = [], np.zeros(len(scores), bool)
  for i in np.argsort(-scores, kind='stable'):
    if scores[i] <= score_thr or removed[i]:
      continue
    keep.append(i)
    removed |= np.array([_np_iou(boxes[i], bx) > iou_thr for bx in boxes])
  return keep[:max_det]


def _random_boxes(rng, n):
  xy = rng.uniform(0, 8, (n, 2))
  wh = rng.uniform(1, 4, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def test_nms_hand_cases():
  boxes = jnp.array([[0.0, 0.0, 10.0, 10.0],
                     [1.0, 0.0, 11.0, 10.0],    # IoU 90/110 with box 0
                     [20.0, 0.0, 30.0, 10.0],
                     [5.0, 0.0, 15.0, 10.0]])   # IoU 1/3 with box 0
  scores = jnp.array([0.9, 0.95, 0.5, 0.3])
  idx, valid = det.nms(boxes, scores, iou_threshold=0.5, max_detections=4)
  np.testing.assert_array_equal(idx[valid], [1, 2, 3])
  np.testing.assert_array_equal(valid, [True, True, True, False])
  # Score threshold (strict) and max_detections.
  idx, valid = det.nms(boxes, scores, 0.5, score_threshold=0.5, max_detections=4)
  np.testing.assert_array_equal(idx[valid], [1])
  idx, valid = det.nms(boxes, scores, 0.5, max_detections=2)
  np.testing.assert_array_equal(idx, [1, 2])
  np.testing.assert_array_equal(valid, [True, True])
  # Box 3 overlaps the kept box 1 with IoU 60/140 = 0.43: removed at threshold 0.3.
  idx, valid = det.nms(boxes, scores, 0.3, max_detections=4)
  np.testing.assert_array_equal(idx[valid], [1, 2])


def test_class_nms_same_class_suppresses_other_class_does_not():
  boxes = jnp.array([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
  same = det.batched_class_nms(boxes, jnp.array([[0.9, 0.0], [0.8, 0.0]]), max_detections=3)
  np.testing.assert_array_equal(same['valid'], [True, False, False])
  np.testing.assert_array_equal(same['indices'][:1], [0])
  other = det.batched_class_nms(boxes, jnp.array([[0.9, 0.0], [0.0, 0.8]]), max_detections=3)
  np.testing.assert_array_equal(other['valid'], [True, True, False])
  np.testing.assert_array_equal(other['classes'][:2], [0, 1])
  np.testing.assert_allclose(other['scores'], [0.9, 0.8, 0.0])
  np.testing.assert_allclose(other['boxes'][1], boxes[1])
  np.testing.assert_array_equal(other['boxes'][2], 0)           # padding rows are zeros


def test_nms_matches_numpy_reference_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  n, c, d = 30, 3, 12
  boxes = np.stack([_random_boxes(rng, n) for _ in range(2)])
  class_scores = rng.uniform(0, 1, (2, n, c)).astype(np.float32)
  single = jax.jit(jax.vmap(functools.partial(det.nms, iou_threshold=0.4, score_threshold=0.2,
                                              max_detections=d)))
  per_class = jax.jit(jax.vmap(functools.partial(det.batched_class_nms, iou_threshold=0.4,
                                                 score_threshold=0.2, max_detections=d)))
  idx, valid = single(boxes, class_scores[..., 0])
  out = per_class(boxes, class_scores)
  for i in range(2):
    expected = _np_nms(boxes[i], class_scores[i, :, 0], 0.4, 0.2, d)
    np.testing.assert_array_equal(np.asarray(idx[i])[np.asarray(valid[i])], expected)
    found = []
    for k in range(c):
      found += [(class_scores[i, j, k], j, k)
                for j in _np_nms(boxes[i], class_scores[i, :, k], 0.4, 0.2, n)]
    found = sorted(found, key=lambda x: -x[0])[:d]
    v = np.asarray(out['valid'][i])
    assert v.sum() == len(found)
    np.testing.assert_array_equal(out['indices'][i][v], [f[1] for f in found])
    np.testing.assert_array_equal(out['classes'][i][v], [f[2] for f in found])
    np.testing.assert_allclose(out['scores'][i][v], [f[0] for f in found])


def test_nms_errors():
  with pytest.raises(ValueError, match='max_detections must be a Python int'):
    det.nms(jnp.zeros((3, 4)), jnp.zeros(3), max_detections=0)
  with pytest.raises(ValueError, match=r'class_scores \(N, C\)'):
    det.batched_class_nms(jnp.zeros((3, 4)), jnp.zeros((2, 2)))


# ---------------------------------------------------------------- YOLO v1 loss

def _one_object_case(num_boxes):
  """S=2, C=2, one object of class 0 centred (0.25, 0.25) with w = h = 0.25:
  cell (0, 0), target [0.5, 0.5, 0.5, 0.5, 1, 1, 0]. Raw output all zeros
  (offsets 0.5 exact, conf 1/2, class probabilities 1/2)."""
  box = jnp.array([[0.125, 0.125, 0.375, 0.375]])
  targets = det.encode_yolo(box, jnp.array([0]), jnp.array([True]), 2, 2)[None]
  pred = np.zeros((1, 2, 2, num_boxes * 5 + 2), np.float32)
  return pred, targets


def test_loss_hand_computed_one_predictor():
  pred, targets = _one_object_case(1)
  pred[0, 0, 0, 2:4] = 0.25        # sqrt w = 0.25: w = 1/16, same centre -> IoU 1/16
  # coord = 5 * 2 * (0.25 - 0.5)^2 = 0.625; obj = (1/2 - 1/16)^2 = 0.19140625;
  # noobj = 0.5 * 3 cells * (1/2)^2 = 0.375; class mse = 2 * (1/2)^2 = 0.5, ce = ln 2.
  loss, terms = det.yolo_v1_loss(jnp.asarray(pred), targets)
  assert {k: float(v) for k, v in terms.items()} == pytest.approx(
      {'coord': 0.625, 'obj': 0.19140625, 'noobj': 0.375, 'class': 0.5}, rel=1e-6)
  assert float(loss) == pytest.approx(1.69140625, rel=1e-6)
  loss, terms = det.yolo_v1_loss(jnp.asarray(pred), targets, conf_target='one',
                                 class_loss='ce')
  assert float(terms['obj']) == pytest.approx(0.25)
  assert float(terms['class']) == pytest.approx(math.log(2), rel=1e-6)
  assert float(loss) == pytest.approx(0.625 + 0.25 + 0.375 + math.log(2), rel=1e-6)
  # A batch of the same image twice, or with a padded third image, has the same loss.
  batch = jnp.asarray(np.concatenate([pred, pred, pred + 3]))
  tbatch = jnp.concatenate([targets] * 3)
  masked, _ = det.yolo_v1_loss(batch, tbatch, conf_target='one', class_loss='ce',
                               mask=jnp.array([1.0, 1.0, 0.0]))
  assert float(masked) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize('better', [0, 1])
def test_loss_hand_computed_two_predictors(better):
  pred, targets = _one_object_case(2)
  worse = 1 - better
  pred[0, 0, 0, 5 * better + 2:5 * better + 4] = 0.5   # exact box: IoU 1, responsible
  pred[0, 0, 0, 5 * worse + 2:5 * worse + 4] = 0.25    # IoU 1/16
  # coord 0; obj (1/2 - 1)^2 = 0.25; noobj 0.5 * 7 predictors * 1/4 = 0.875; class 0.5.
  loss, terms = det.yolo_v1_loss(jnp.asarray(pred), targets)
  assert {k: float(v) for k, v in terms.items()} == pytest.approx(
      {'coord': 0.0, 'obj': 0.25, 'noobj': 0.875, 'class': 0.5}, abs=1e-6)
  assert float(loss) == pytest.approx(1.625, rel=1e-6)


@pytest.mark.parametrize('class_loss', ['mse', 'ce'])
def test_loss_of_a_perfect_prediction_is_zero(class_loss):
  rng = np.random.default_rng(2)
  gts = [_random_ground_truth(rng, 3, 3, 4, count) for count in (3, 2)]
  boxes, labels, valid = (np.stack(x) for x in zip(*gts))
  targets = det.encode_yolo(boxes, labels, valid, 3, 3)
  loss, terms = det.yolo_v1_loss(det.perfect_yolo_prediction(targets, 2), targets,
                                 class_loss=class_loss)
  assert float(loss) < 1e-8
  assert all(float(v) < 1e-8 for v in terms.values())


def test_each_loss_term_moves_only_its_own_outputs():
  pred, targets = _one_object_case(2)
  pred[0, 0, 0, 7:9] = 0.45         # predictor 1 responsible (IoU 0.81 vs 1/16), not exact
  pred[0, 0, 0, 2:4] = 0.25
  grads = jax.jacrev(lambda p: det.yolo_v1_loss(p, targets)[1])(jnp.asarray(pred))
  allowed = {k: np.zeros(pred.shape, bool) for k in det.loss.TERMS}
  allowed['coord'][0, 0, 0, 5:9] = True          # responsible x, y, sqrt w, sqrt h
  allowed['obj'][0, 0, 0, 9] = True              # responsible confidence (IoU target fixed)
  allowed['noobj'][..., [4, 9]] = True           # every confidence ...
  allowed['noobj'][0, 0, 0, 9] = False           # ... but the responsible one's
  allowed['class'][0, 0, 0, 10:] = True          # class logits of the object cell
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    assert np.all(g[~allowed[name]] == 0), name
    assert np.any(g[allowed[name]] != 0), name


def test_loss_gradient_finite_from_zero_boxes():
  pred, targets = _one_object_case(2)   # all-zero output: empty boxes, every IoU 0
  g = jax.grad(lambda p: det.yolo_v1_loss(p, targets)[0])(jnp.asarray(pred))
  assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_loss_errors():
  pred, targets = _one_object_case(2)
  with pytest.raises(ValueError, match='conf_target'):
    det.yolo_v1_loss(pred, targets, conf_target='max')
  with pytest.raises(ValueError, match=r'B\*5 \+ 2'):
    det.yolo_v1_loss(pred[..., :-1], targets)


# ---------------------------------------------------------------- AP and mAP

GT3 = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], np.float64)


def _single(det_boxes, scores, gt_boxes=GT3, **kwargs):
  dets = [(np.asarray(det_boxes, np.float64), np.asarray(scores), np.zeros(len(scores), int))]
  gts = [(gt_boxes, np.zeros(len(gt_boxes), int))]
  return det.evaluate_detections(dets, gts, num_classes=1, **kwargs)


def test_ap_hand_computed_three_gt_five_detections():
  # In descending score: TP (GT 0), FP (background), TP (GT 1), FP (duplicate of
  # GT 0), TP (GT 2). Precision 1, 1/2, 2/3, 2/4, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1.
  # Envelope: 1 up to recall 1/3, 2/3 up to 2/3, 3/5 up to 1.
  #   VOC2010: (1 + 2/3 + 3/5) / 3 = 34/45
  #   11-point: r = 0..0.3 -> 1 (4), 0.4..0.6 -> 2/3 (3), 0.7..1 -> 3/5 (4): 8.4/11
  #   101-point: r <= 0.33 -> 1 (34), 0.34..0.66 -> 2/3 (33), 0.67..1 -> 3/5 (34): 76.4/101
  boxes = [GT3[0], [60, 0, 70, 10], GT3[1], [0, 0, 10, 9], GT3[2]]
  scores = [0.9, 0.8, 0.7, 0.6, 0.5]
  expected = {'voc2010': 34 / 45, 'voc07_11pt': 8.4 / 11, 'coco101': 76.4 / 101}
  for method, value in expected.items():
    r = _single(boxes, scores, method=method)
    assert r['ap50'][0] == pytest.approx(value)
    assert r['map50'] == pytest.approx(value)
  np.testing.assert_allclose(r['precision'][0], [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
  np.testing.assert_allclose(r['recall'][0], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
  # The same straight from the curve; the input order of detections does not matter.
  assert det.average_precision(r['recall'][0], r['precision'][0]) == pytest.approx(34 / 45)
  shuffled = _single([boxes[i] for i in (4, 1, 3, 0, 2)], [scores[i] for i in (4, 1, 3, 0, 2)])
  assert shuffled['ap50'][0] == pytest.approx(34 / 45)


def test_perfect_detector_no_detections_and_duplicates():
  assert _single(GT3, [0.9, 0.8, 0.7])['map50'] == pytest.approx(1.0)
  assert _single(GT3, [0.9, 0.8, 0.7])['map_coco'] == pytest.approx(1.0)
  empty = _single(np.zeros((0, 4)), [])
  assert empty['map50'] == 0.0 and empty['map_coco'] == 0.0
  # One GT found twice: TP then FP. Precision 1, 1/2 at recall 1, 1 -> AP 1 all the same,
  # but a duplicate ranked first costs: FP then TP -> precision 0, 1/2 -> AP 1/2.
  one_gt = GT3[:1]
  r = _single([GT3[0], GT3[0]], [0.9, 0.8], gt_boxes=one_gt)
  np.testing.assert_allclose(r['precision'][0], [1.0, 0.5])
  r = _single([[0, 0, 10, 4], GT3[0]], [0.9, 0.8], gt_boxes=one_gt)   # IoU 0.4: FP first
  assert r['ap50'][0] == pytest.approx(0.5)


def test_coco_map_of_an_offset_box():
  # Shifted by 1 px: IoU = 90 / 110 = 0.818, a TP at IoU 0.5..0.8 (7 of the 10 COCO
  # thresholds, AP 1 each) and an FP at 0.85..0.95 (AP 0): mAP@[.5:.95] = 0.7.
  r = _single([[1, 0, 11, 10]], [0.9], gt_boxes=GT3[:1], iou_thresholds=(0.5, 0.8, 0.85))
  assert r['map50'] == pytest.approx(1.0)
  assert r['map_coco'] == pytest.approx(0.7)
  np.testing.assert_allclose(r['ap'][:, 0], [1.0, 1.0, 0.0])
  assert r['map_coco'] <= r['map50']


def test_voc_and_coco_matching_differ_on_a_taken_best_match():
  # GT A = [0,0,10,10], GT B = [2,0,12,10]. Detection 1 is A exactly. Detection 2's
  # best GT is A (IoU 95/105, taken): an FP for VOC; COCO falls back to B (IoU 85/115).
  gts = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], np.float64)
  boxes = [[0, 0, 10, 10], [0.5, 0, 10.5, 10]]
  voc = _single(boxes, [0.9, 0.8], gt_boxes=gts, matching='voc')
  coco = _single(boxes, [0.9, 0.8], gt_boxes=gts, matching='coco')
  np.testing.assert_allclose(voc['precision'][0], [1.0, 0.5])     # AP = 1/2 * 1 = 0.5
  assert voc['ap50'][0] == pytest.approx(0.5)
  assert coco['ap50'][0] == pytest.approx(1.0)


def test_classes_padding_and_ignored_ground_truth():
  # Two images, three classes. Class 2 has no GT anywhere: NaN, left out of the mean.
  dets = [
      {'boxes': np.array([GT3[0], GT3[1], [0, 0, 1, 1]]), 'scores': np.array([0.9, 0.8, 0.1]),
       'classes': np.array([0, 1, 2]), 'valid': np.array([True, True, True])},
      (np.array([GT3[2], GT3[0]]), np.array([0.7, 0.6]), np.array([0, 0]),
       np.array([True, False])),                     # the invalid row is dropped
  ]
  gts = [
      (np.array([GT3[0], GT3[1], GT3[2]]), np.array([0, 1, 1]), np.array([True, True, False])),
      {'boxes': np.array([GT3[2], GT3[1]]), 'labels': np.array([0, 1]),
       'ignore': np.array([False, True])},
  ]
  r = det.evaluate_detections(dets, gts, num_classes=3)
  # class 0: 2 GT, 2 TP -> AP 1; class 1: 1 counted GT (the other ignored), found -> AP 1.
  np.testing.assert_array_equal(r['num_gt'], [2, 1, 0])
  np.testing.assert_allclose(r['ap50'][:2], [1.0, 1.0])
  assert np.isnan(r['ap50'][2]) and r['num_scored_classes'] == 2
  assert r['map50'] == pytest.approx(1.0)
  # A detection on an ignored GT is neither TP nor FP.
  ign = det.evaluate_detections(
      [(np.array([GT3[1], GT3[0]]), np.array([0.9, 0.8]), np.array([0, 0]))],
      [{'boxes': GT3[:2], 'labels': np.array([0, 0]), 'ignore': np.array([False, True])}], 1)
  np.testing.assert_allclose(ign['precision'][0], [1.0])
  assert ign['ap50'][0] == pytest.approx(1.0)


def test_metric_errors_and_pr_plot(tmp_path):
  with pytest.raises(ValueError, match='method must be one of'):
    det.average_precision([0.5], [1.0], method='voc2012')
  with pytest.raises(ValueError, match='non-decreasing'):
    det.average_precision([0.5, 0.2], [1.0, 1.0])
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\)'):
    det.evaluate_detections([(GT3, np.ones(3), np.array([0, 1, 0]))],
                            [(GT3, np.zeros(3, int))], num_classes=1)
  r = _single([GT3[0], [60, 0, 70, 10], GT3[1]], [0.9, 0.8, 0.7])
  path = det_metrics.plot_pr_curves(r, str(tmp_path / 'pr' / 'curves.png'), ['thing'])
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
