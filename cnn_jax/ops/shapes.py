"""Shape rules shared by every op: argument normalisation, padding resolution,
output sizes, and the checks that turn a bad layer into a clear ValueError
before any compute.

The one formula behind all of it (notes, seeds 002/004), per spatial dimension:

    F_eff = (F - 1) * D + 1                       # dilated kernel extent
    W2    = floor((W1 - F_eff + P_lo + P_hi) / S) + 1

With symmetric padding P this is the familiar W2 = (W1 - F + 2P)/S + 1.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

PaddingLike = Union[str, int, Sequence[int], Sequence[Tuple[int, int]]]

PADDING_MODES = ('VALID', 'SAME', 'FULL')


def as_tuple(value, nd: int, what: str, *, op: str = 'op') -> Tuple[int, ...]:
  """An int or a length-`nd` sequence of ints, as a tuple of `nd` ints."""
  if isinstance(value, bool):
    raise ValueError(f'{op}: {what} must be an int or {nd} ints, got {value!r}.')
  if isinstance(value, int) or (hasattr(value, '__index__') and not hasattr(value, '__len__')):
    return (int(value),) * nd
  try:
    items = tuple(value)
  except TypeError:
    raise ValueError(f'{op}: {what} must be an int or {nd} ints, got {value!r}.') from None
  if len(items) != nd or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
    raise ValueError(
        f'{op}: {what} must be an int or a tuple of {nd} ints (one per spatial '
        f'dimension), got {value!r}.')
  return items


def check_positive(values: Tuple[int, ...], what: str, *, op: str = 'op') -> None:
  for i, v in enumerate(values):
    if v < 1:
      raise ValueError(
          f'{op}: {what} must be >= 1 in every spatial dimension, got {what}={values} '
          f'(dimension {i} is {v}). A {what} of 0 would make the output size formula '
          f'W2 = (W1 - F + 2P)/S + 1 undefined.')


def effective_kernel(kernel: int, dilation: int) -> int:
  """Extent of a dilated kernel: (F - 1) * D + 1."""
  return (kernel - 1) * dilation + 1


def resolve_padding(padding: PaddingLike, in_spatial: Sequence[int],
                    kernel: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int], *, op: str = 'op'
                    ) -> Tuple[Tuple[int, int], ...]:
  """Explicit (lo, hi) pairs for every spatial dimension.

  Args:
    padding: 'VALID' (none), 'SAME' (output = ceil(W1 / S); odd totals put the
      extra row/column at the end, as XLA and TensorFlow do), 'FULL' (F_eff - 1
      each side: every partial overlap, as in the notes), an int P (P each side),
      a sequence of ints (one per dimension, both sides), or a sequence of
      (lo, hi) pairs.
    in_spatial, kernel, stride, dilation: per-dimension ints.
    op: name used in error messages.

  Returns:
    A tuple of (lo, hi) int pairs, one per spatial dimension.
  """
  nd = len(in_spatial)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode not in PADDING_MODES:
      raise ValueError(
          f"{op}: padding must be one of {PADDING_MODES}, an int, or per-dimension "
          f"(lo, hi) pairs; got {padding!r}.")
    pads = []
    for n, k, s, d in zip(in_spatial, kernel, stride, dilation):
      k_eff = effective_kernel(k, d)
      if mode == 'VALID':
        pads.append((0, 0))
      elif mode == 'FULL':
        pads.append((k_eff - 1, k_eff - 1))
      else:  # SAME
        out = -(-n // s)
        total = max((out - 1) * s + k_eff - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)
  if isinstance(padding, bool):
    raise ValueError(f'{op}: padding must not be a bool, got {padding!r}.')
  if isinstance(padding, int):
    pads = ((padding, padding),) * nd
  else:
    try:
      items = list(padding)
    except TypeError:
      raise ValueError(f'{op}: padding {padding!r} is not understood.') from None
    if len(items) != nd:
      raise ValueError(
          f'{op}: padding needs one entry per spatial dimension ({nd}), got '
          f'{len(items)} in {padding!r}.')
    pads = []
    for item in items:
      if isinstance(item, int) and not isinstance(item, bool):
        pads.append((item, item))
      else:
        try:
          lo, hi = item
        except (TypeError, ValueError):
          raise ValueError(
              f'{op}: each padding entry must be an int or a (lo, hi) pair, got '
              f'{item!r} in {padding!r}.') from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
          raise ValueError(f'{op}: padding values must be ints, got {item!r}.')
        pads.append((lo, hi))
    pads = tuple(pads)
  for i, (lo, hi) in enumerate(pads):
    if lo < 0 or hi < 0:
      raise ValueError(
          f'{op}: padding must be >= 0, got ({lo}, {hi}) in spatial dimension {i}. '
          f'To crop, slice the input instead.')
  return tuple(pads)


def output_size(n: int, kernel: int, stride: int = 1, padding=0,
                dilation: int = 1) -> int:
  """W2 = floor((W1 - F_eff + P_lo + P_hi) / S) + 1 for one spatial dimension.

  `padding` is an int P (both sides), a (lo, hi) pair, or 'VALID'/'SAME'/'FULL'.
  Raises ValueError when the window does not fit in the padded input.
  """
  if isinstance(padding, (str, int)) and not isinstance(padding, bool):
    pad_arg = padding
  else:
    pad_arg = [tuple(padding)]
  (k,), (s,), (d,) = (as_tuple(kernel, 1, 'kernel', op='output_size'),
                      as_tuple(stride, 1, 'stride', op='output_size'),
                      as_tuple(dilation, 1, 'dilation', op='output_size'))
  check_positive((k,), 'kernel size', op='output_size')
  check_positive((s,), 'stride', op='output_size')
  check_positive((d,), 'dilation', op='output_size')
  (pads,) = resolve_padding(pad_arg, (n,), (k,), (s,), (d,), op='output_size')
  (out,) = output_spatial((n,), (k,), (s,), (pads,), (d,), op='output_size')
  return out


def output_spatial(in_spatial, kernel, stride, pads, dilation, *, op: str = 'op'
                   ) -> Tuple[int, ...]:
  """Output spatial sizes; ValueError naming the numbers if a window cannot fit."""
  out = []
  for i, (n, k, s, (lo, hi), d) in enumerate(zip(in_spatial, kernel, stride, pads, dilation)):
    k_eff = effective_kernel(k, d)
    padded = n + lo + hi
    if k_eff > padded:
      dil = f', dilation {d} -> effective {k_eff}' if d != 1 else ''
      raise ValueError(
          f'{op}: window of {k_eff} (kernel {k}{dil}) is larger than the padded input '
          f'{padded} (input {n} + padding {lo} + {hi}) in spatial dimension {i}: '
          f'W2 = (W1 - F + P_lo + P_hi)/S + 1 = ({n} - {k_eff} + {lo} + {hi})/{s} + 1 '
          f'< 1. Use a smaller kernel or stride, more padding (e.g. "SAME"), or a '
          f'larger input.')
    out.append((padded - k_eff) // s + 1)
  return tuple(out)


def stride_remainder(n: int, k_eff: int, stride: int, lo: int, hi: int) -> int:
  """Rows/columns at the end of the padded input that the stride never reaches."""
  return (n + lo + hi - k_eff) % stride


def check_rank(x_ndim: int, nd: int, what: str, *, op: str = 'op') -> None:
  if x_ndim != nd + 2:
    raise ValueError(
        f'{op}: {what} must be channels-last (N, *spatial, C) with {nd} spatial '
        f'dimension(s), i.e. rank {nd + 2}; got rank {x_ndim}. Add a batch axis '
        f'with x[None] or a channel axis with x[..., None].')


def spatial_dims(ndim: int, *, op: str = 'op') -> int:
  nd = ndim - 2
  if nd not in (1, 2, 3):
    raise ValueError(
        f'{op}: inputs must be (N, *spatial, C) with 1, 2 or 3 spatial dimensions '
        f'(rank 3, 4 or 5); got rank {ndim}.')
  return nd


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


__all__ = [
    'PADDING_MODES', 'as_tuple', 'check_positive', 'effective_kernel',
    'resolve_padding', 'output_size', 'output_spatial', 'stride_remainder',
    'check_rank', 'spatial_dims', 'ceil_div',
]
