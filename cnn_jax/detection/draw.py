"""A PNG grid of detections: each image's ground-truth boxes beside the predicted ones.

Boxes are normalised ``(x0, y0, x1, y1)`` (x along columns, y along rows, [0, 1] of
the image width and height), as the detection data and models use them; they are
scaled to pixels here. Figures are drawn on matplotlib's Agg canvas without pyplot
(``cnn_jax.analysis.plots.new_figure``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.patches import Patch, Rectangle

from cnn_jax.analysis.plots import new_figure, save_figure

_PAIRS_PER_ROW = 4
_PANEL_INCHES = 2.3


def class_colours(num_classes: int) -> np.ndarray:
  """(num_classes, 3) RGB in [0, 1]: tab10, then tab20 beyond 10 classes."""
  cmap = colormaps['tab10' if num_classes <= 10 else 'tab20']
  return np.array([cmap(c % cmap.N)[:3] for c in range(num_classes)])


def _display(image) -> np.ndarray:
  """An image for imshow: uint8 as is, floats in [0, 1] as is, any other range
  rescaled to [0, 1]; one channel drops to (H, W)."""
  x = np.asarray(image)
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f'each image must be (H, W, 1) or (H, W, 3), got {x.shape}.')
  if x.dtype != np.uint8:
    x = x.astype(np.float64)
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 1:
      x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
  return x[..., 0] if x.shape[-1] == 1 else x


def _objects(name: str, i: int, boxes, labels, scores=None, valid=None):
  """Image i's (boxes (n, 4), labels (n,), scores (n,) or None) with valid rows only."""
  b = np.asarray(boxes[i], np.float64).reshape(-1, 4)
  lab = np.asarray(labels[i]).reshape(-1).astype(np.int64)
  sc = None if scores is None else np.asarray(scores[i], np.float64).reshape(-1)
  keep = np.ones(len(b), bool) if valid is None else np.asarray(valid[i], bool).reshape(-1)
  lengths = {len(b), len(lab), len(keep)} | ({len(sc)} if sc is not None else set())
  if len(lengths) != 1:
    raise ValueError(f'image {i}: the {name} boxes, labels, scores and valid flags must '
                     f'have one row per object, got lengths {sorted(lengths)}.')
  return b[keep], lab[keep], (None if sc is None else sc[keep])


def _draw_boxes(ax, boxes, labels, scores, width: int, height: int, colours,
                class_names: Sequence[str]):
  """Rectangles with a 'name' or 'name 0.87' tag at each box's top-left corner
  (above the box, or inside it where the box touches the image's top)."""
  for k in range(len(boxes)):
    x0, y0, x1, y1 = boxes[k] * [width, height, width, height]
    colour = colours[labels[k]]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor=colour, linewidth=1.6))
    text = class_names[labels[k]] + ('' if scores is None else f' {scores[k]:.2f}')
    dark = colour @ [0.299, 0.587, 0.114] < 0.55
    inside = y0 < 0.1 * height   # no room above the box: put the tag inside it
    ax.text(x0 - 0.5, y0 - 0.5, text, fontsize=6.5, va='top' if inside else 'bottom',
            ha='left',
            color='white' if dark else 'black', clip_on=True,
            bbox=dict(facecolor=colour, edgecolor='none', pad=0.8, alpha=0.85))


def plot_detections(images, gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels,
                    path_png: str, class_names: Sequence[str], *,
                    gt_valid=None, pred_valid=None, score_threshold: float = 0.3,
                    max_images: int = 8, title: Optional[str] = None,
                    dpi: int = 120) -> str:
  """Draws test images with ground-truth boxes (left) and predictions (right).

  Every argument indexed by image may be an array with a leading image axis or a
  list with one entry per image (so per-image object counts may differ).

  Args:
    images: (N, H, W, C) images, C 1 or 3: uint8, floats in [0, 1], or any other
      range (each image is then rescaled to [0, 1] for display).
    gt_boxes: (N, M, 4) normalised (x0, y0, x1, y1) ground-truth boxes.
    gt_labels: (N, M) ground-truth class ids.
    pred_boxes: (N, K, 4) normalised (x0, y0, x1, y1) predicted boxes.
    pred_scores: (N, K) confidence of each prediction.
    pred_labels: (N, K) predicted class ids.
    path_png: where to write the PNG (parent directories are created).
    class_names: the name of each class id.
    gt_valid: (N, M) bool, False on padding rows (default: all valid).
    pred_valid: (N, K) bool, False on padding rows (default: all valid).
    score_threshold: predictions scoring below it are not drawn.
    max_images: draw at most the first max_images images.
    title: the figure's heading (default: says what the panels show).
    dpi: resolution.
  Returns:
    path_png.
  """
  class_names = [str(c) for c in class_names]
  n = min(len(images), max_images)
  if n < 1:
    raise ValueError(f'nothing to draw: got {len(images)} images and '
                     f'max_images={max_images}; pass at least one image.')
  for name, arg in (('gt_boxes', gt_boxes), ('gt_labels', gt_labels),
                    ('pred_boxes', pred_boxes), ('pred_scores', pred_scores),
                    ('pred_labels', pred_labels), ('gt_valid', gt_valid),
                    ('pred_valid', pred_valid)):
    if arg is not None and len(arg) < n:
      raise ValueError(f'{name} covers {len(arg)} images but {n} are drawn; pass one '
                       'entry per image.')
  colours = class_colours(len(class_names))
  pairs = min(n, _PAIRS_PER_ROW)
  rows = math.ceil(n / pairs)
  # Inches: a heading band, rows of panels each with a title line, a legend band; a
  # wider gap between image pairs than inside one.
  head, title_in, legend_in, gap, pair_gap = 0.45, 0.3, 0.4, 0.06, 0.3
  fig_w = 2 * pairs * _PANEL_INCHES + (pairs - 1) * pair_gap + pairs * gap + 0.1
  fig_h = head + rows * (_PANEL_INCHES + title_in) + legend_in
  fig = new_figure((fig_w, fig_h))
  ratios = [1, 1, pair_gap / _PANEL_INCHES] * pairs
  grid = fig.add_gridspec(rows, 3 * pairs - 1, width_ratios=ratios[:-1],
                          left=0.05 / fig_w, right=1 - 0.05 / fig_w,
                          bottom=legend_in / fig_h, top=1 - (head + title_in) / fig_h,
                          wspace=gap / _PANEL_INCHES, hspace=title_in / _PANEL_INCHES)
  for i in range(n):
    image = _display(images[i])
    height, width = image.shape[:2]
    gt = _objects('ground-truth', i, gt_boxes, gt_labels, valid=gt_valid)
    pred = _objects('predicted', i, pred_boxes, pred_labels, pred_scores, pred_valid)
    shown = pred[2] >= score_threshold
    order = np.argsort(pred[2][shown], kind='stable')   # the best drawn last, on top
    pred = tuple(a[shown][order] for a in pred)
    for labels in (gt[1], pred[1]):
      bad = labels[(labels < 0) | (labels >= len(class_names))]
      if bad.size:
        raise ValueError(f'image {i}: class id {int(bad[0])} has no name; class_names '
                         f'has {len(class_names)} entries ({class_names}).')
    for j, ((boxes, labels, scores), panel) in enumerate(
        ((gt, f'{i}: ground truth ({len(gt[0])})'),
         (pred, f'{i}: predicted ({len(pred[0])})'))):
      ax = fig.add_subplot(grid[i // pairs, 3 * (i % pairs) + j])
      ax.imshow(image, cmap='gray' if image.ndim == 2 else None, interpolation='nearest',
                vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
      _draw_boxes(ax, boxes, labels, scores, width, height, colours, class_names)
      ax.set_xlim(-0.5, width - 0.5)
      ax.set_ylim(height - 0.5, -0.5)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(panel, fontsize=8)
  if title is None:
    title = ('Detections on test images: ground-truth boxes (left of each pair) and '
             f'predicted boxes with class and score >= {score_threshold:g} (right)')
  fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig_h, va='top')
  fig.legend(handles=[Patch(facecolor='none', edgecolor=colours[c], linewidth=1.6,
                            label=name) for c, name in enumerate(class_names)],
             loc='lower center', ncol=min(len(class_names), 10), fontsize='small',
             frameon=False)
  return save_figure(fig, path_png, dpi)


__all__ = ['class_colours', 'plot_detections']
