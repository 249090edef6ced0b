"""A short, checkable tour of the ops: the notes' worked examples computed with
our convolution and pooling, and our explicit backward passes compared with JAX
autodiff of the plain lax ops. `make train` runs this until training lands.
"""
from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_jax import ops
from cnn_jax.ops import conv_grads
from cnn_jax.ops.conv import make_spec

SEED004_IMAGE = np.array([[6, 3, 4, 4, 5, 0, 3], [4, 7, 4, 0, 4, 0, 4],
                          [7, 0, 2, 3, 4, 5, 2], [3, 7, 5, 0, 3, 0, 7],
                          [5, 8, 1, 2, 5, 4, 2], [8, 0, 1, 0, 6, 0, 0],
                          [6, 4, 1, 3, 0, 4, 5]], np.float32)
SEED004_FILTER = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 2]], np.float32)
SEED004_POOL = np.array([[1, 3, 2, 4, 8, 6], [5, 6, 1, 8, 7, 3], [9, 2, 7, 3, 6, 5],
                         [4, 5, 6, 1, 9, 2], [8, 3, 4, 7, 2, 1], [5, 7, 9, 2, 3, 6]],
                        np.float32)


def _as_image(a):
  return jnp.asarray(a)[None, :, :, None]


def _matrix(a) -> str:
  a = np.asarray(a)
  return '\n'.join('    ' + ' '.join(f'{v:4g}' for v in row) for row in a)


def _grad_check(out: io.StringIO) -> float:
  """Largest |ours - autodiff| over a few conv configurations (float32)."""
  rng = np.random.default_rng(0)
  worst = 0.0
  for stride, padding, dilation, groups in [(1, 'SAME', 1, 1), (2, 'VALID', 1, 2),
                                            (2, 'FULL', 2, 1), (3, 1, 1, 4)]:
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4 // groups, 8)), jnp.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    spec = make_spec(x.shape, w.shape, **kw)
    ref_fn = lambda a, b: lax.conv_general_dilated(
        a, b, spec.stride, spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=conv_grads.dimension_numbers(2), feature_group_count=groups)
    loss = lambda f: (lambda a, b: jnp.sum(jnp.sin(f(a, b))))
    ours = jax.grad(loss(lambda a, b: ops.conv(a, b, **kw)), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(ref_fn), argnums=(0, 1))(x, w)
    err = max(float(jnp.max(jnp.abs(o - r))) for o, r in zip(ours, ref))
    worst = max(worst, err)
    out.write(f'  conv stride={stride} padding={padding!s:5} dilation={dilation} '
              f'groups={groups}: max |dL/dX, dL/dW - autodiff| = {err:.2e}\n')
  return worst


def run() -> str:
  """Returns the demo report (and raises if any check fails)."""
  out = io.StringIO()
  out.write('cnn_jax ops demo (devices: %s)\n\n' % ', '.join(str(d) for d in jax.devices()[:2]))
  y = ops.conv(_as_image(SEED004_IMAGE), SEED004_FILTER[:, :, None, None])[0, :, :, 0]
  out.write('Seed 004: 7x7 image correlated with a 3x3 filter (VALID) -> 5x5\n')
  out.write(_matrix(y) + '\n\n')
  edge = ops.conv(_as_image(np.array([[10, 10, 10, 0, 0, 0]] * 6, np.float32)),
                  np.array([[1, 0, -1]] * 3, np.float32)[:, :, None, None])[0, :, :, 0]
  out.write('Seed 002: vertical edge detector on a 6x6 step image -> 4x4\n')
  out.write(_matrix(edge) + '\n\n')
  pooling = getattr(ops, 'max_pool', None)
  if pooling is not None:
    pooled = pooling(_as_image(SEED004_POOL), 2)[0, :, :, 0]
    out.write('Seed 004: 2x2 max-pooling, stride 2, of a 6x6 map -> 3x3\n')
    out.write(_matrix(pooled) + '\n\n')
  out.write('Output sizes, W2 = (W1 - F + 2P)/S + 1:\n')
  for n, f, s, p in [(5, 3, 1, 0), (5, 3, 2, 0), (5, 3, 3, 0), (227, 11, 4, 0), (32, 5, 1, 2)]:
    out.write(f'  W1={n:3d} F={f:2d} S={s} P={p} -> {ops.output_size(n, f, s, p)}\n')
  out.write('\nExplicit backward (custom_vjp) vs JAX autodiff of lax.conv_general_dilated:\n')
  worst = _grad_check(out)
  if worst > 1e-3:
    raise AssertionError(f'gradient mismatch {worst:.2e}')
  out.write(f'\nAll gradient checks passed (worst {worst:.1e}).\n')
  return out.getvalue()
