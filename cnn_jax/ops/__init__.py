"""Pure functional CNN ops with explicit (jax.custom_vjp) backward passes.

Every op is channels-last, (N, *spatial, C) with 1, 2 or 3 spatial dimensions,
checks its arguments before any compute, and states its forward and backward
equations in its docstring.
"""
from cnn_jax.ops.shapes import output_size, resolve_padding
from cnn_jax.ops.conv import conv, conv_transpose, true_convolution
from cnn_jax.ops.dense import dense, matmul
from cnn_jax.ops.im2col import col2im, conv_matmul, im2col
from cnn_jax.ops.lrn import lrn
from cnn_jax.ops.activations import (
    get_activation, identity, leaky_relu, list_activations, log_softmax, relu,
    scaled_tanh, sigmoid, softmax, tanh)
from cnn_jax.ops.pooling import (
    avg_pool, global_avg_pool, global_max_pool, lp_pool, max_pool, max_pool_with_argmax,
    max_unpool, mixed_pool, rms_pool, spatial_pyramid_pool, sum_pool)
