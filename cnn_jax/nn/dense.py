"""The fully connected layer over `cnn_jax.ops.dense` (explicit backward)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax.ops.dense import dense


class Dense(nn.Dense):
  """`flax.linen.Dense` whose product is `cnn_jax.ops.dense`.

  Same fields, parameters ('kernel' (in, out), 'bias'), initialization and
  results (to float32 rounding), so checkpoints and code written for flax's layer
  carry over and `isinstance(m, flax.linen.Dense)` holds. On float32 inputs and
  parameters with the default contraction (no dot_general override, no
  precision) it computes Y = X W + b with the explicit backward dX = dY W^T,
  dW = X^T dY (the native CPU kernels for small batches, see cnn_jax.ops.dense);
  every other case is flax's own code path.
  """

  @nn.compact
  def __call__(self, inputs):
    f32 = jnp.dtype(jnp.float32)
    plain = (self.dot_general is None and self.dot_general_cls is None
             and self.precision is None and getattr(inputs, 'ndim', 0) >= 1
             and jnp.dtype(inputs.dtype) == f32 and jnp.dtype(self.param_dtype) == f32
             and (self.dtype is None or jnp.dtype(self.dtype) == f32))
    if not plain:
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return dense(inputs, kernel, bias)
