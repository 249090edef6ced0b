"""SYNTHETIC wild-plant scenes for 3-class semantic segmentation (the ``plants`` dataset).

Nothing here is a photograph. Each scene is drawn procedurally, in the spirit of the
notes' ResUNet++ demo (wild plants, pixels labelled class 0 background / 1 / 2 and
shown black / red / green), so that segmentation models can be trained and tested
offline:

  class 0  background: soil with multi-scale grain, pebbles, dry twigs and, in about
           half the scenes, patches of green moss (green, but speckled and shapeless);
  class 1  broad-leaved rosettes: 5-10 pointed-ellipse leaves around a crown, shaded
           along and across each leaf, with a midrib, faint lateral veins and, on some
           plants, a coloured rim;
  class 2  grass tufts: 10-26 thin, tapering, curved blades from one base, lighter
           towards the tip and along the centre line, some dried to straw colour.

Colour alone does not separate the classes: rosettes are mostly green but also
reddish-purple or yellow-green, grass is mostly green but also straw or reddish, and
moss makes green background; shape and texture decide. (A per-pixel colour rule --
the majority class of each 16x16x16 RGB bin, fitted on scenes 0-119 and scored on
120-199 -- reaches IoU 0.85 / 0.37 / 0.21 for background / rosette / grass.)

Plants overlap each other (a random painter's order: later plants occlude earlier
ones and the mask holds the top one) and cast soft shadows on the soil; each scene
has its own exposure, colour temperature, illumination gradient and cloud shading, a
slight blur in half the scenes, and pixel noise. Class fractions of the 1,000 scenes:
0.759 background, 0.125 rosette, 0.116 grass; all three classes appear in 94% of them.

Determinism: scene ``i`` is drawn from ``np.random.default_rng([seed, i])`` alone, so
it does not depend on which other scenes are generated or in what order (with the same
NumPy version: NumPy does not promise identical streams across releases, which is one
more reason the ``plants`` builder stores the scenes once). ``scene(i)`` returns
``(image (128, 128, 3) uint8, mask (128, 128) uint8)``.

Speed: every object is drawn with whole-array NumPy operations into "fragments"
(pixel, priority, class, colour) that are resolved in one pass; colour work is done
channel-planar (3, H, W), where NumPy broadcasts fast; noise is uniform (with the
variance of a Gaussian: Gaussian sampling costs 4x more). The 1,000 scenes take
about 10 s on one core of the 2-core development machine.
"""
from __future__ import annotations

import bisect
import colorsys
import functools
import math

import numpy as np

SIZE = 128
NUM_CLASSES = 3
CLASS_NAMES = ('background', 'rosette', 'grass')
# The notes' demo colour code: class 0 black, class 1 red, class 2 green.
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
PALETTE.flags.writeable = False
SEED = 1110
NUM_SCENES = 1000
# The notes' 60/10/30 split of 1,000 scenes: [start, stop) scene indices per split.
SPLITS = {'train': (0, 600), 'validation': (600, 700), 'test': (700, 1000)}

# Running sums of the probabilities of 0, 1, ... 6 plants of each kind in a scene.
_COUNT_CDF = tuple(np.cumsum([0.03, 0.12, 0.2, 0.25, 0.2, 0.12, 0.08]))
# Fragment priority: plant p (1, 2, ... in painter's order) covers p - 1; inside a
# plant, blade j covers blades < j. Rank 0 is the background clutter.
_RANK = 64


def _colours(*rows):
  """A colour family: (running sums of p, low (k, 3), high (k, 3)) from rows of
  (p, hue range in degrees, saturation range, value range)."""
  cdf = tuple(np.cumsum([r[0] for r in rows]))
  lo = np.array([[r[1][0], r[2][0], r[3][0]] for r in rows])
  hi = np.array([[r[1][1], r[2][1], r[3][1]] for r in rows])
  return cdf, lo, hi


# The green ranges of the three classes overlap on purpose.
_ROSETTE_COLOURS = _colours((0.55, (75, 135), (0.4, 0.8), (0.3, 0.65)),
                            (0.30, (325, 375), (0.35, 0.7), (0.3, 0.55)),  # red / purple
                            (0.15, (50, 75), (0.45, 0.8), (0.45, 0.7)))    # yellow-green
_GRASS_COLOURS = _colours((0.70, (65, 125), (0.35, 0.75), (0.35, 0.7)),
                          (0.20, (35, 55), (0.3, 0.6), (0.45, 0.75)),      # straw
                          (0.10, (0, 25), (0.35, 0.6), (0.35, 0.6)))       # reddish
_SOIL_COLOURS = _colours((0.5, (18, 35), (0.3, 0.55), (0.22, 0.45)),       # loam / clay
                         (0.3, (30, 45), (0.2, 0.4), (0.4, 0.6)),          # sandy
                         (0.2, (20, 60), (0.02, 0.12), (0.3, 0.5)))        # grey gravel
_MOSS_COLOURS = _colours((1.0, (60, 115), (0.3, 0.65), (0.25, 0.5)))


def _pick(rng, cdf) -> int:
  """An index drawn with the probabilities whose running sums are `cdf`."""
  return min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), len(cdf) - 1)


def _mixture(rng, family) -> tuple[float, float, float]:
  """(hue, saturation, value) from one row, drawn by probability, of a family."""
  cdf, lo, hi = family
  i = _pick(rng, cdf)
  h, s, v = rng.uniform(lo[i], hi[i])
  return float(h), float(s), float(v)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  """One colour, (3,) float32, from hue in degrees and saturation, value in [0, 1]."""
  return np.array(colorsys.hsv_to_rgb((h % 360) / 360, min(max(s, 0.0), 1.0),
                                      min(max(v, 0.0), 1.0)), np.float32)


def _hsv_many(h, s, v) -> np.ndarray:
  """Colours (3, n) float32 from arrays (n,) of hue (degrees), saturation and value:
  channel k is v (1 - s clip(d_k - 1, 0, 1)), d_k the hue distance in sextants to
  where channel k is full (red 0, green 2, blue 4); this is colorsys.hsv_to_rgb."""
  h = (np.asarray(h, np.float32) % 360) / 60
  s = np.clip(np.asarray(s, np.float32), 0, 1)
  v = np.clip(np.asarray(v, np.float32), 0, 1)
  d = np.abs(h - np.array([[0.0], [2.0], [4.0]], np.float32))
  d = np.minimum(d, 6 - d)
  return v * (1 - s * np.clip(d - 1, 0, 1))


def _noise(rng, shape) -> np.ndarray:
  """Zero-mean, unit-variance uniform noise, float32."""
  out = rng.random(shape, np.float32)
  out -= np.float32(0.5)
  out *= np.float32(math.sqrt(12))
  return out


@functools.lru_cache(maxsize=16)
def _upsample_taps(n_in: int, n_out: int):
  """(lo, hi, frac) of a bilinear upsampling n_in -> n_out, half-pixel centres, edges
  clamped: out[i] = in[lo[i]] * (1 - frac[i]) + in[hi[i]] * frac[i]."""
  coord = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(coord).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (coord - lo).astype(np.float32)


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling of the last two axes to (size, size), by gathers rather than
  matrix products (small BLAS calls are slow when the CPU is shared)."""
  lo, hi, f = _upsample_taps(field.shape[-1], size)
  field = field[..., lo] * (1 - f) + field[..., hi] * f
  lo, hi, f = _upsample_taps(field.shape[-2], size)
  f = f[:, None]
  return field[..., lo, :] * (1 - f) + field[..., hi, :] * f


def _fbm(rng, size: int, grids=(4, 8, 16, 32), decay=0.6) -> np.ndarray:
  """Fractal noise (size, size): lattices grids[k] x grids[k] of noise with amplitude
  decay^k, summed coarse to fine (each sum upsampled to the next lattice, so only the
  last upsampling is full size), scaled to zero mean and unit variance."""
  total = _noise(rng, (grids[0], grids[0]))
  for k, grid in enumerate(grids[1:], 1):
    total = _upsample(total, grid) + np.float32(decay**k) * _noise(rng, (grid, grid))
  total = _upsample(total, size)
  total -= total.mean()
  total /= total.std() + np.float32(1e-6)
  return total


class _Fragments:
  """Pixels of drawn objects -- flat index, priority, class, colour (3, n) -- resolved
  at the end: each pixel shows its highest-priority fragment (among equals, the one
  added last)."""

  def __init__(self, size: int):
    self.size = size
    self.parts = []

  def add(self, ys, xs, priority, cls: int, rgb):
    keep = (ys >= 0) & (ys < self.size) & (xs >= 0) & (xs < self.size)
    n = ys.size
    self.parts.append((
        ys[keep] * self.size + xs[keep],
        np.broadcast_to(np.asarray(priority, np.int64), (n,))[keep],
        np.full(int(keep.sum()), cls, np.uint8),
        np.broadcast_to(np.asarray(rgb, np.float32).reshape(3, -1), (3, n))[:, keep]))

  def paint(self, image: np.ndarray, mask: np.ndarray):
    """Writes the winning fragments into image (3, H, W) and mask (H, W)."""
    if not self.parts:
      return
    flat, priority, cls, rgb = zip(*self.parts)
    flat, priority, cls = (np.concatenate(a) for a in (flat, priority, cls))
    rgb = np.concatenate(rgb, axis=1)
    n = flat.size
    key = priority * n + np.arange(n)         # unique: priority, then order added
    best = np.full(self.size * self.size, -1, np.int64)
    np.maximum.at(best, flat, key)            # well defined, unlike x[i] = v
    pixels = np.flatnonzero(best >= 0)
    pick = best[pixels] % n
    image.reshape(3, -1)[:, pixels] = rgb[:, pick]
    mask.reshape(-1)[pixels] = cls[pick]


@functools.lru_cache(maxsize=32)
def _disc_offsets(reach: float):
  """Integer (dy, dx) offsets with dy^2 + dx^2 <= reach^2, float32."""
  k = int(math.floor(reach))
  r = np.arange(-k, k + 1, dtype=np.float32)
  dy, dx = np.meshgrid(r, r, indexing='ij')
  keep = dy * dy + dx * dx <= reach * reach
  return dy[keep], dx[keep]


def _stamp(points: np.ndarray, radii: np.ndarray):
  """Pixels whose centres lie within `radii` of `points` (a radius counts as at least
  0.72, so that a thin stroke sampled every 0.8 pixel never breaks).

  points (P, 2) as (y, x), radii (P,). Returns (ys, xs, index of the point,
  distance / radius), in point order.
  """
  pts = points.astype(np.float32)
  r = np.maximum(radii, 0.72).astype(np.float32)
  # A pixel within r of a point is within r + sqrt(2) / 2 of the point's nearest pixel.
  dy, dx = _disc_offsets(math.ceil((float(r.max()) + 0.7072) * 4) / 4)
  centre = np.rint(pts)
  oy = (centre[:, :1] - pts[:, :1]) + dy                    # (P, K) pixel - point
  ox = (centre[:, 1:] - pts[:, 1:]) + dx
  d2 = oy * oy
  d2 += ox * ox
  src, k = np.nonzero(d2 <= (r * r)[:, None])
  rel = np.sqrt(d2[src, k]) / r[src]
  return ((centre[src, 0] + dy[k]).astype(np.int64),
          (centre[src, 1] + dx[k]).astype(np.int64), src, rel)


@functools.lru_cache(maxsize=64)
def _bezier_weights(samples: int) -> tuple[np.ndarray, np.ndarray]:
  """t = 0 .. 1 (samples,) and the quadratic Bezier (Bernstein) weights (3, samples)."""
  t = np.linspace(0, 1, samples)
  return t, np.stack([(1 - t)**2, 2 * t * (1 - t), t**2])


def _blades(frags: _Fragments, cls: int, p0, angle, length, bend, radius, colours,
            taper: float, priority):
  """Thin strokes (grass blades, twigs), n at once: quadratic Bezier curves from p0
  (n, 2) along angle, bent sideways by bend * length, radius tapering by `taper` to
  the tip, stamped as discs every <= 0.8 pixel. colours (3, n); priority (n,)."""
  samples = int(math.ceil(length.max() / 0.8)) + 1
  direction = np.stack([np.sin(angle), np.cos(angle)], -1)         # (y, x)
  normal = direction[:, ::-1] * np.array([1, -1])
  p2 = p0 + length[:, None] * direction
  p1 = (p0 + p2) / 2 + (bend * length)[:, None] * normal
  t, w = _bezier_weights(samples)
  pts = (w[0][None, :, None] * p0[:, None] + w[1][None, :, None] * p1[:, None]
         + w[2][None, :, None] * p2[:, None])                       # (n, samples, 2)
  radii = radius[:, None] * (1 - taper * t)[None]
  ys, xs, src, rel = _stamp(pts.reshape(-1, 2), radii.reshape(-1))
  blade, step = np.divmod(src, samples)
  shade = (0.72 + 0.45 * t[step].astype(np.float32)) * (1.18 - 0.18 * rel)  # tip, centre
  frags.add(ys, xs, priority[blade], cls, colours[:, blade] * shade)


def _rosette(rng, frags: _Fragments, priority: int, scale: float):
  """A broad-leaved rosette (class 1) of pointed-ellipse leaves around a crown."""
  size = frags.size
  cy, cx = rng.uniform(-4, size + 4, 2)
  h, s, v = _mixture(rng, _ROSETTE_COLOURS)
  base = _hsv(h, s, v)
  dh, fs, fv = rng.uniform((-25, 0.7, 0.8), (25, 1.2, 1.3))
  second = _hsv(h + dh, s * fs, v * fv)
  rim = None
  if rng.random() < 0.35:
    rh, rs = rng.uniform((-20, 0.4), (30, 0.8))
    rim = _hsv(rh, rs, v)
  n = int(rng.integers(5, 11))
  length0 = rng.uniform(13, 29) * scale
  width_ratio, r0, vein_spacing, theta0 = rng.uniform((0.32, 0.5, 2.5, 0),
                                                     (0.55, 2.5, 4.0, 2 * np.pi))
  pointed = rng.random() < 0.5   # leaf outline |2u - 1|^1.5 + w^2 = 1, else an ellipse
  # Per leaf: length, width jitter, angle jitter, brightness, hue mix (uniforms).
  leaf = rng.random((5, n))
  lengths = length0 * (0.75 + 0.4 * leaf[0])
  half = lengths * width_ratio * (0.9 + 0.2 * leaf[1]) / 2
  theta = theta0 + 2 * np.pi * np.arange(n) / n + 0.5 * (leaf[2] - 0.5)
  bright = (0.88 + 0.24 * leaf[3]).astype(np.float32)
  hue_mix = (0.5 * leaf[4]).astype(np.float32)
  depth = rng.permutation(n)

  reach = r0 + lengths.max() + 1
  y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 2)
  x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 2)
  if y0 >= y1 or x0 >= x1:
    return
  dy = (np.arange(y0, y1) - cy).astype(np.float32)[:, None]
  dx = (np.arange(x0, x1) - cx).astype(np.float32)[None, :]
  c = np.cos(theta).astype(np.float32)[:, None, None]
  s_ = np.sin(theta).astype(np.float32)[:, None, None]
  u = (dx * c + dy * s_ - np.float32(r0)) * (1 / lengths).astype(np.float32)[:, None, None]
  w = (dy * c - dx * s_) * (1 / half).astype(np.float32)[:, None, None]  # -1..1 across
  a = np.abs(2 * u - 1)
  inside = (a * np.sqrt(a) if pointed else a * a) + w * w <= 1
  top = np.full(inside.shape[1:], -1, np.int64)
  for k in np.argsort(depth):          # back to front: the top leaf of each pixel
    top[inside[k]] = k
  crown = dy * dy + dx * dx <= np.float32((r0 + 1.3)**2)
  ys, xs = np.nonzero((top >= 0) | crown)
  k = top[ys, xs]
  is_leaf = k >= 0
  k = np.maximum(k, 0)
  uu, ww = u[k, ys, xs], w[k, ys, xs]
  # Shading: darker base and edges, a lighter midrib and faint lateral veins.
  shade = (0.78 + 0.3 * uu) * (1 - 0.3 * ww * ww) * bright[k]
  across = np.abs(ww) * half[k].astype(np.float32)
  midrib = (across < 0.6) & (uu > 0.03) & (uu < 0.9)
  veins = np.cos((2 * np.pi / vein_spacing) * (uu * lengths[k] - 0.8 * across)) > 0.8
  colour = base[:, None] + hue_mix[k] * (second - base)[:, None]       # (3, P)
  if rim is not None:
    colour = np.where(np.abs(ww) > 0.75, 0.5 * colour + 0.5 * rim[:, None], colour)
  shade = np.where(midrib, 1.25 * shade, np.where(veins, 1.1 * shade, shade))
  colour = colour * shade + np.where(midrib, np.float32(0.04), np.float32(0))
  colour = np.where(is_leaf, colour, 0.55 * base[:, None])             # the crown
  frags.add(ys + y0, xs + x0, priority * _RANK, 1, colour)


def _grass(rng, size: int, priority: int, scale: float) -> dict:
  """The blades of a grass tuft (class 2): thin tapering strokes from one base."""
  n = int(rng.integers(10, 27))
  by, bx, spread, theta0, r_base = rng.uniform((0, 0, 0.4, 0, 1.1),
                                               (size, size, 1.8, 2 * np.pi, 1.8))
  p0 = np.array([by, bx]) + rng.normal(0, 1.5, (n, 2))
  angle = theta0 + rng.normal(0, spread, n)
  blade = rng.random((4, n))
  length = (20 + 32 * blade[0]) * scale
  bend = rng.normal(0, 0.2, n)
  radius = r_base * (0.85 + 0.3 * blade[1])
  h, s, v = _mixture(rng, _GRASS_COLOURS)
  colours = _hsv_many(h + rng.normal(0, 8, n), s * (0.85 + 0.3 * blade[2]),
                      v * (0.85 + 0.3 * blade[3]))
  dried = rng.random(n) < 0.12
  if dried.any():
    colours[:, dried] = _hsv(*rng.uniform((35, 0.3, 0.55), (50, 0.5, 0.75)))[:, None]
  return dict(p0=p0, angle=angle, length=length, bend=bend, radius=radius,
              colours=colours, priority=priority * _RANK + rng.permutation(n))


def _soil(rng, size: int) -> np.ndarray:
  """Background (3, size, size): two blended soil colours, grain at several scales,
  and in half the scenes moss."""
  h, s, v = _mixture(rng, _SOIL_COLOURS)
  a = _hsv(h, s, v)[:, None, None]
  dh, fs, fv = rng.uniform((-10, 0.6, 0.6), (10, 1.3, 1.2))
  b = _hsv(h + dh, s * fs, v * fv)[:, None, None]
  blend = np.clip(0.5 + 0.35 * _fbm(rng, size, (4, 8)), 0, 1)
  grain = 1 + 0.14 * _fbm(rng, size, (16, 32, 64)) + 0.08 * _noise(rng, (size, size))
  soil = (a + blend * (b - a)) * grain
  if rng.random() < 0.5:                                      # moss patches (class 0)
    field = _fbm(rng, size, (4, 8, 16))
    threshold = rng.uniform(0.6, 1.4)
    alpha = np.clip((field - threshold) / 0.3, 0, 1)
    moss = _hsv(*_mixture(rng, _MOSS_COLOURS))[:, None, None]
    speckle = 1 + 0.35 * _noise(rng, (size, size))
    soil += alpha * (moss * speckle - soil)
  return soil


def _clutter(rng, frags: _Fragments):
  """Background objects (class 0, under every plant): pebbles and dry twigs."""
  size = frags.size
  n = int(rng.integers(5, 40))
  centres = rng.uniform(0, size, (n, 2))
  radii = rng.uniform(0.7, 2.6, n)
  ys, xs, src, rel = _stamp(centres, radii)
  tone = rng.uniform(0.35, 0.8, n)[src] * (1.15 - 0.35 * rel)       # lit centre
  frags.add(ys, xs, 0, 0, _hsv(rng.uniform(20, 45), 0.15, 1)[:, None] * tone)
  m = int(rng.integers(0, 4))
  if m:
    twig = rng.random((7, m))
    _blades(frags, 0, twig[:2].T * size, 2 * np.pi * twig[2], 10 + 25 * twig[3],
            rng.normal(0, 0.05, m), 0.6 + 0.5 * twig[4],
            _hsv_many(20 + 20 * twig[5], 0.2 + 0.25 * twig[6], rng.uniform(0.3, 0.55, m)),
            0.1, 1 + np.arange(m))


def _blur(image: np.ndarray) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur of (C, H, W), edges replicated."""
  out = 2 * image
  out[:, 1:] += image[:, :-1]
  out[:, 0] += image[:, 0]
  out[:, :-1] += image[:, 1:]
  out[:, -1] += image[:, -1]
  rows = 2 * out
  rows[:, :, 1:] += out[:, :, :-1]
  rows[:, :, 0] += out[:, :, 0]
  rows[:, :, :-1] += out[:, :, 1:]
  rows[:, :, -1] += out[:, :, -1]
  rows *= np.float32(1 / 16)
  return rows


def _shadow(mask: np.ndarray, rng) -> np.ndarray:
  """A soft shadow of the plants: their coverage averaged over 4x4 cells, upsampled
  and shifted away from the light."""
  size = mask.shape[0]
  cover = (mask > 0).astype(np.float32).reshape(size // 4, 4, size // 4, 4).mean((1, 3))
  soft = _upsample(cover, size)
  dy, dx = (int(d) for d in rng.integers(-4, 5, 2))
  out = np.zeros_like(soft)
  out[max(dy, 0):size + min(dy, 0), max(dx, 0):size + min(dx, 0)] = (
      soft[max(-dy, 0):size + min(-dy, 0), max(-dx, 0):size + min(-dx, 0)])
  return out


def scene(index: int, seed: int = SEED, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
  """SYNTHETIC scene `index`: (image (size, size, 3) uint8, mask (size, size) uint8).

  Mask values are class ids: 0 background, 1 rosette, 2 grass. The same (index, seed,
  size) always gives the same scene. size must be a multiple of 4 (128 for the
  dataset; other sizes scale the plants).
  """
  if size % 4 or size <= 0:
    raise ValueError(f'size must be a positive multiple of 4, got {size}.')
  rng = np.random.default_rng([seed, index])
  scale = size / SIZE
  image = _soil(rng, size)
  frags = _Fragments(size)
  _clutter(rng, frags)
  n_rosettes = _pick(rng, _COUNT_CDF)
  n_grass = _pick(rng, _COUNT_CDF)
  if n_rosettes + n_grass == 0:
    n_rosettes = 1
  tufts = []
  kinds = rng.permutation([1] * n_rosettes + [2] * n_grass)   # painter's order
  for rank, kind in enumerate(kinds, 1):
    if kind == 1:
      _rosette(rng, frags, rank, scale)
    else:
      tufts.append(_grass(rng, size, rank, scale))
  if tufts:  # all blades of all tufts in one pass; priorities keep the order
    blades = {key: np.concatenate([t[key] for t in tufts], axis=-1 if key == 'colours'
                                  else 0) for key in tufts[0]}
    _blades(frags, 2, taper=0.8, **blades)
  mask = np.zeros((size, size), np.uint8)
  frags.paint(image, mask)
  # Lighting: shadows on the soil, exposure, colour temperature, a gradient, clouds.
  shadow = rng.uniform(0.15, 0.5) * _shadow(mask, rng)
  shadow[mask > 0] = 0
  light = 1 - shadow
  ramp = np.linspace(-1, 1, size, dtype=np.float32)
  phi, slope, cloud, exposure = rng.uniform((0, 0, 0, 0.7), (2 * np.pi, 0.3, 0.15, 1.25))
  light *= 1 + slope * (math.cos(phi) * ramp[None, :] + math.sin(phi) * ramp[:, None])
  light *= 1 + cloud * _fbm(rng, size, (3,))
  gains = (exposure * (1 + rng.normal(0, 0.05, 3))).astype(np.float32)[:, None, None]
  image *= light
  image *= gains
  if rng.random() < 0.5:
    image = _blur(image)
  image += np.float32(rng.uniform(0.008, 0.035)) * _noise(rng, image.shape)
  image *= 255
  image += 0.5
  np.clip(image, 0, 255, out=image)
  return np.ascontiguousarray(image.astype(np.uint8).transpose(1, 2, 0)), mask


def scenes(start: int, stop: int, seed: int = SEED, size: int = SIZE):
  """Scenes start..stop-1 stacked: (images (N, size, size, 3), masks (N, size, size))."""
  images = np.zeros((max(stop - start, 0), size, size, 3), np.uint8)
  masks = np.zeros((max(stop - start, 0), size, size), np.uint8)
  for j, i in enumerate(range(start, stop)):
    images[j], masks[j] = scene(i, seed, size)
  return images, masks


def colorize(mask: np.ndarray) -> np.ndarray:
  """Class ids -> the demo's colours (black / red / green), (..., 3) uint8."""
  return PALETTE[np.asarray(mask)]


__all__ = ['CLASS_NAMES', 'NUM_CLASSES', 'NUM_SCENES', 'PALETTE', 'SEED', 'SIZE',
           'SPLITS', 'colorize', 'scene', 'scenes']
