"""Pure functional CNN ops with explicit (jax.custom_vjp) backward passes."""
from cnn_jax.ops.shapes import output_size, resolve_padding
from cnn_jax.ops.conv import conv, conv_transpose, true_convolution
