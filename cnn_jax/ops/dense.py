"""The fully connected layer with its backward written out (seed 003).

For an affine layer Y = X W + b over a batch of M rows (X: M x K, W: K x N, as
flax stores a Dense kernel), backpropagation gives

    dX = dY W^T        dW = X^T dY        db = sum_m dY[m]

`matmul` is X W as a `jax.custom_vjp` whose backward computes exactly those two
products; `dense` flattens the leading axes of X, calls it and adds the bias
(whose gradient, the column sums of dY, XLA forms on its own).

Each product is computed by a fixed rule on the shape class, never by timing:

  On CPU, with the native kernels available (cnn_jax/ops/native.py: built,
  AVX-512F, not switched off), float32, and at most NATIVE_MAX_ROWS rows
  (M, the flattened batch):
      Y, dX, dW -> cnn_jax/ops/csrc/dense_cpu.cc (each reads or writes W once,
                   in 2 KiB runs or whole rows, with the small operands in cache)
  Otherwise (more rows, other dtypes or platforms, the kernels off):
      lax.dot_general, the same contraction flax's Dense uses.

Why few rows: with M rows against a K x N weight matrix every product does
2 M K N flops over K N weights, so at small M the time is the weight traffic.
XLA's CPU GEMM took 141 ms for VGG's 16 x 25088 by 25088 x 4096 forward on this
machine against 39 ms for the native kernel (it contracts over W's strided axis);
at M >= 128 XLA's packed GEMMs are faster (benchmarks/README.md, "Session 9").

Each native product is itself a custom_vjp (the three are bilinear and each
one's cotangents are the other two products), so grad of grad works the same
with the kernels as without.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax.ops import native

# The native products are used up to this many rows (the flattened batch).
NATIVE_MAX_ROWS = 32

_FORWARD_DIMS = (((1,), (0,)), ((), ()))       # X (M, K) . W (K, N)
_INPUT_GRAD_DIMS = (((1,), (1,)), ((), ()))    # dY (M, N) . W (K, N) over N
_WEIGHT_GRAD_DIMS = (((0,), (0,)), ((), ()))   # X (M, K) . dY (M, N) over M


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.result_type(a, b))


def _xla(product, a, b):
  dims = {'forward': _FORWARD_DIMS, 'input_grad': _INPUT_GRAD_DIMS,
          'weight_grad': _WEIGHT_GRAD_DIMS}[product]
  return _dot(a, b, dims)


def uses_native(rows: int, a, b) -> bool:
  """The rule: whether a product with `rows` batch rows of operands a, b goes to
  the native kernel when traced on CPU now."""
  return (rows <= NATIVE_MAX_ROWS and native.supports_dense(a, b) and native.available())


def _native(product, a, b):
  return lax.platform_dependent(
      a, b, cpu=functools.partial(native._call_dense, product),
      default=functools.partial(_xla, product))


def forward(x, w):
  """Y = X W, X (M, K), W (K, N)."""
  if uses_native(x.shape[0], x, w):
    return _forward_native(x, w)
  return _xla('forward', x, w)


def input_grad(dy, w):
  """dX = dY W^T, dY (M, N), W (K, N)."""
  if uses_native(dy.shape[0], dy, w):
    return _input_grad_native(dy, w)
  return _xla('input_grad', dy, w)


def weight_grad(x, dy):
  """dW = X^T dY, X (M, K), dY (M, N): the sum over the batch of outer products."""
  if uses_native(x.shape[0], x, dy):
    return _weight_grad_native(x, dy)
  return _xla('weight_grad', x, dy)


def _with_vjp(primal, cotangents):
  """primal(a, b) as a custom_vjp: cotangents(a, b, g) gives the cotangents of
  its two operands for a cotangent g of its output."""

  @jax.custom_vjp
  def f(a, b):
    return primal(a, b)

  def f_fwd(a, b):
    return f(a, b), (a, b)

  def f_bwd(res, g):
    a, b = res
    da, db = cotangents(a, b, g)
    return da.astype(a.dtype), db.astype(b.dtype)

  f.defvjp(f_fwd, f_bwd)
  return f


# With cotangent G of the output (each product is bilinear, so its cotangents
# are the other two products):
#   Y  = X W     -> dX = G W^T,  dW = X^T G      (the notes' backward)
#   dX = dY W^T  -> d dY = G W,  dW = G^T dY
#   dW = X^T dY  -> dX = dY G^T, d dY = X G
def _forward_cotangents(x, w, g):
  return input_grad(g, w), weight_grad(x, g)


_forward_native = _with_vjp(functools.partial(_native, 'forward'), _forward_cotangents)
_input_grad_native = _with_vjp(functools.partial(_native, 'input_grad'),
                               lambda dy, w, g: (forward(g, w), weight_grad(g, dy)))
_weight_grad_native = _with_vjp(functools.partial(_native, 'weight_grad'),
                                lambda x, dy, g: (input_grad(dy, g), forward(x, g)))
_matmul = _with_vjp(forward, _forward_cotangents)


def matmul(x, w):
  """X W for X (M, K) and W (K, N), with the backward dX = dY W^T, dW = X^T dY.

  Each of the three products goes to the native CPU kernel or to XLA by the rule
  in the module docstring."""
  _check(x, w)
  return _matmul(x, w)


def _check(x, w):
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f'matmul expects X (M, K) and W (K, N); got shapes {x.shape} and '
                     f'{w.shape}. Flatten the leading axes of X first (dense does).')
  if x.shape[1] != w.shape[0]:
    raise ValueError(f'matmul: X has {x.shape[1]} features but W has {w.shape[0]} input '
                     f'rows (shapes {x.shape} and {w.shape}); W must be (in_features, '
                     'out_features).')


def dense(x, w, b=None):
  """Y = X W + b over the last axis of X (any leading axes), W (K, N), b (N,)."""
  if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f'dense: X of shape {x.shape} has {x.shape[-1] if x.ndim else None} '
                     f'features on its last axis but the kernel is {w.shape}; the kernel '
                     'must be (in_features, out_features) with in_features == X.shape[-1].')
  lead = x.shape[:-1]
  y = matmul(x.reshape((-1, x.shape[-1])), w).reshape(lead + (w.shape[1],))
  return y if b is None else y + b
