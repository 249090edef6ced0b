"""Figures of a run: training curves from metrics.jsonl and confusion matrices.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing
needs a display and the process-wide backend is left alone.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Panels drawn when keys is None, in this order, if any split logged them.
DEFAULT_PANELS = ('loss', 'accuracy', 'top5_accuracy', 'lr')
_NOT_METRICS = ('step', 'time')
_ANNOTATE_MAX_CLASSES = 20


def _split(name: str) -> Tuple[str, str]:
  """'val/accuracy' -> ('val', 'accuracy'); 'loss' -> ('', 'loss')."""
  prefix, _, base = name.rpartition('/')
  return prefix, base


def new_figure(figsize) -> Figure:
  """A matplotlib Figure on an Agg canvas, without pyplot's global state."""
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)   # attaches itself: layout and savefig render with Agg
  return fig


def save_figure(fig: Figure, path_png: str, dpi: int) -> str:
  """Writes fig as a PNG, creating the parent directory; returns the path."""
  path_png = os.fspath(path_png)
  directory = os.path.dirname(path_png)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path_png, format='png', dpi=dpi)
  return path_png


def _panels(names: Sequence[str], keys: Optional[Sequence[str]]) -> Dict[str, List[str]]:
  """Panel title -> the series drawn in it."""
  by_base: Dict[str, List[str]] = {}
  for name in names:
    by_base.setdefault(_split(name)[1], []).append(name)
  if keys is None:
    keys = [b for b in DEFAULT_PANELS if b in by_base] or sorted(by_base)
  panels = {}
  for key in keys:
    # 'loss' draws every split's loss; 'train/loss' draws exactly that series.
    series = [key] if '/' in key else by_base.get(key, [])
    series = [s for s in series if s in names]
    if not series:
      raise ValueError(f'no logged metric matches {key!r}; logged: {sorted(names)}.')
    panels[key] = series
  return panels


def plot_training_curves(records: Sequence[dict], path_png: str,
                         keys: Optional[Sequence[str]] = None, *, dpi: int = 100) -> str:
  """Metric-vs-step panels, train and validation curves together.

  Args:
    records: dicts with a 'step' and metric values, as read_jsonl returns
      them from metrics.jsonl; names are prefixed by their split
      ('train/loss', 'val/accuracy', 'train/lr'). A record may hold a subset
      of the metrics (validation is logged less often).
    path_png: where to write the PNG (parent directories are created).
    keys: the panels. A bare name ('loss') draws that metric for every split
      in one panel; a prefixed one ('train/grad_norm') draws just that series.
      Default: whichever of loss, accuracy, top5_accuracy, lr were logged
      (every metric if none of them).
    dpi: resolution.
  Returns:
    path_png.
  """
  if not records:
    raise ValueError('no records to plot.')
  names = sorted({k for r in records for k in r if k not in _NOT_METRICS})
  panels = _panels(names, keys)
  ncols = min(len(panels), 2)
  nrows = math.ceil(len(panels) / ncols)
  fig = new_figure((5.5 * ncols, 3.6 * nrows))
  for i, (title, series) in enumerate(panels.items()):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    for name in series:
      pts = [(r['step'], r[name]) for r in records if name in r and r[name] is not None]
      pts.sort()
      steps = np.array([p[0] for p in pts], dtype=float)
      values = np.array([p[1] for p in pts], dtype=float)
      # Sparse series (evaluation every few thousand steps) get markers.
      marker = 'o' if len(pts) <= 30 else None
      ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2,
              label=_split(name)[0] or name)
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or _split(series[0])[0]:
      ax.legend(fontsize='small')
  fig.tight_layout()
  return save_figure(fig, path_png, dpi)


def plot_confusion_matrix(cm, path_png: str, class_names: Optional[Sequence[str]] = None,
                          normalize: bool = True, *, dpi: int = 100) -> str:
  """A confusion matrix as an image; rows = true class, columns = predicted.

  Args:
    cm: [C, C] counts (e.g. summed metrics.confusion_matrix outputs).
    path_png: where to write the PNG (parent directories are created).
    class_names: tick labels (shown for up to 40 classes).
    normalize: colour by row fraction (per-class recall) rather than raw count;
      rows of a class with no examples stay 0.
    dpi: resolution.
  Returns:
    path_png. Matrices up to 20 classes have each cell annotated with its
    count (and its row percentage when normalized).
  """
  cm = np.asarray(cm, dtype=np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square [C, C]; got shape {cm.shape}.')
  c = cm.shape[0]
  if class_names is not None and len(class_names) != c:
    raise ValueError(f'{len(class_names)} class names for {c} classes.')
  if normalize:
    rows = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  else:
    shown = cm
  side = min(max(4.0, 0.45 * c + 2.0), 14.0)
  fig = new_figure((side + 1.2, side))
  ax = fig.add_subplot(1, 1, 1)
  image = ax.imshow(shown, cmap='Blues', interpolation='nearest',
                    vmin=0.0, vmax=1.0 if normalize else max(float(shown.max()), 1.0))
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
               label='fraction of true class' if normalize else 'count')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if c <= 40:
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(c)]
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xticklabels(names, rotation=90 if class_names is not None else 0, fontsize='small')
    ax.set_yticklabels(names, fontsize='small')
  if c <= _ANNOTATE_MAX_CLASSES:
    threshold = 0.5 * (1.0 if normalize else max(float(shown.max()), 1.0))
    for i in range(c):
      for j in range(c):
        count = cm[i, j]
        text = f'{count:g}'
        if normalize and count:
          text += f'\n{100 * shown[i, j]:.0f}%'
        ax.text(j, i, text, ha='center', va='center', fontsize=7,
                color='white' if shown[i, j] > threshold else 'black')
  acc = np.trace(cm) / cm.sum() if cm.sum() > 0 else float('nan')
  ax.set_title(f'confusion matrix (accuracy {acc:.2%})')
  fig.tight_layout()
  return save_figure(fig, path_png, dpi)


# Class colours of segmentation masks, as in the notes' plant demo: black background,
# red and green for the two plant classes; further classes cycle through the rest.
SEGMENTATION_COLOURS = np.array([
    (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
    (0, 255, 255), (255, 128, 0), (128, 0, 255), (128, 128, 128)], np.uint8)


def colour_mask(mask) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 RGB with SEGMENTATION_COLOURS."""
  mask = np.asarray(mask).astype(np.int64)
  return SEGMENTATION_COLOURS[mask % len(SEGMENTATION_COLOURS)]


def unit_range(a) -> np.ndarray:
  """a min-max rescaled to [0, 1] for display (a constant array becomes zeros)."""
  a = np.asarray(a, np.float64)
  lo, hi = a.min(), a.max()
  return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def channels_for_display(a) -> np.ndarray:
  """(H, W, C) -> what imshow draws: (H, W) for one channel, RGB for three, else
  the mean over channels."""
  a = np.asarray(a)
  if a.shape[-1] == 1:
    return a[..., 0]
  return a if a.shape[-1] == 3 else a.mean(axis=-1)


def _display(image) -> np.ndarray:
  """An input image (any range, 1 or 3 channels) scaled to [0, 1] for imshow."""
  x = unit_range(image)
  return x[..., 0] if x.shape[-1] == 1 else x


def plot_segmentation_samples(images, truths, predictions, path_png: str, *,
                              class_names: Optional[Sequence[str]] = None,
                              dpi: int = 100) -> str:
  """A grid of rows input | ground truth | prediction, masks colour-coded.

  Args:
    images: (N, H, W, C) model inputs (normalised or not: each is rescaled for
      display).
    truths, predictions: (N, H, W) class ids.
    path_png: where to write the PNG.
    class_names: legend entries for the colours (default: class ids).
  Returns:
    path_png.
  """
  images, truths, predictions = (np.asarray(a) for a in (images, truths, predictions))
  if not (len(images) == len(truths) == len(predictions)) or truths.shape != predictions.shape:
    raise ValueError(f'need matching images {images.shape}, truths {truths.shape} and '
                     f'predictions {predictions.shape}.')
  n = len(images)
  fig = new_figure((7.5, 2.5 * n + 0.4))
  for i in range(n):
    for j, (panel, title) in enumerate(((_display(images[i]), 'input'),
                                        (colour_mask(truths[i]), 'ground truth'),
                                        (colour_mask(predictions[i]), 'prediction'))):
      ax = fig.add_subplot(n, 3, 3 * i + j + 1)
      ax.imshow(panel, cmap='gray' if panel.ndim == 2 else None, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title)
  num = int(max(truths.max(initial=0), predictions.max(initial=0))) + 1
  names = list(class_names) if class_names is not None else [str(c) for c in range(num)]
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
  fig.legend(handles=[Patch(color=SEGMENTATION_COLOURS[c % len(SEGMENTATION_COLOURS)] / 255,
                            label=names[c]) for c in range(min(num, len(names)))],
             loc='lower center', ncol=min(num, 6), fontsize='small')
  fig.tight_layout(rect=(0, 0.4 / (2.5 * n + 0.4), 1, 1))
  return save_figure(fig, path_png, dpi)
