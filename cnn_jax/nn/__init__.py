"""Thin flax.linen modules over `cnn_jax.ops`: layers hold config and params."""
from cnn_jax.nn.blocks import ASPP, AttentionBlock, SqueezeExcite
from cnn_jax.nn.conv import (Conv, ConvTranspose, DepthwiseConv, SeparableConv,
                             SpatiallySeparableConv)
from cnn_jax.nn.dense import Dense
from cnn_jax.nn.dropout import Dropout
from cnn_jax.nn.initializers import get_initializer
from cnn_jax.nn.normalization import LRN, BatchNorm
from cnn_jax.nn.reshape import Flatten
from cnn_jax.nn.pooling import (AvgPool, GlobalAvgPool, GlobalMaxPool, LpPool, MaxPool,
                                MixedPool, SpatialPyramidPool, SumPool)
