"""Kernel initializers by name, for `kernel_init='he'` in the conv layers.

All are `jax.nn.initializers.variance_scaling`, whose fan computation is the
right one for conv kernels (*kernel_size, C_in // groups, C_out): the in axis is
-2, the out axis -1 and every other axis is a receptive-field axis, so

    fan_in  = prod(kernel_size) * C_in // groups
    fan_out = prod(kernel_size) * C_out

and Var(W) = scale / fan. The named schemes:

    'he' / 'kaiming'    normal (truncated), scale 2, fan_in: Var = 2 / fan_in, which
                        keeps activation variance constant through ReLU layers.
    'glorot' / 'xavier' uniform, scale 1, fan_avg: Var = 2 / (fan_in + fan_out).
    'lecun'             normal (truncated), scale 1, fan_in: Var = 1 / fan_in;
                        identical to flax.linen's default kernel_init.
    'zeros'             all zeros (biases, or a zero-initialised last layer).

The truncated normals are rescaled so that the variance is exactly the target.
"""
from __future__ import annotations

from typing import Any, Callable, Union

from jax.nn import initializers

Initializer = Callable[..., Any]
InitializerLike = Union[str, Initializer]

_FACTORIES = {
    'he': initializers.he_normal,
    'kaiming': initializers.he_normal,
    'glorot': initializers.glorot_uniform,
    'xavier': initializers.glorot_uniform,
    'lecun': initializers.lecun_normal,
    'zeros': lambda: initializers.zeros,
}

NAMES = tuple(_FACTORIES)


def get_initializer(name: str) -> Initializer:
  """The initializer called `name` (case-insensitive); see the module docstring.

  Args:
    name: one of 'he', 'kaiming', 'glorot', 'xavier', 'lecun', 'zeros'.

  Returns:
    A `jax.nn.initializers` function `init(key, shape, dtype=float32)`.

  Raises:
    ValueError: for an unknown name or a non-string, listing the valid names.
  """
  if not isinstance(name, str) or name.lower() not in _FACTORIES:
    raise ValueError(
        f'Unknown initializer {name!r}; valid names are {", ".join(NAMES)} (or pass '
        f'an initializer function such as jax.nn.initializers.he_uniform()).')
  return _FACTORIES[name.lower()]()


def resolve(init: InitializerLike, *, what: str = 'kernel_init') -> Initializer:
  """A name through `get_initializer`, a callable as it is."""
  if isinstance(init, str):
    return get_initializer(init)
  if callable(init):
    return init
  raise ValueError(
      f'{what} must be an initializer name ({", ".join(NAMES)}) or a function '
      f'init(key, shape, dtype); got {init!r}.')


__all__ = ['Initializer', 'InitializerLike', 'NAMES', 'get_initializer', 'resolve']
