"""The ablation nets: each field changes what the notes say it changes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.analysis import tables


# Every test compiles one-off programs (or runs op by op): XLA's optimisation
# passes would dominate their time (see conftest.fast_compile).
pytestmark = pytest.mark.usefixtures('fast_compile')


def _count(name, shape, **kw):
  return tables.count_params(models.get_model(name, **kw), shape).trainable


def test_three_3x3_vs_one_7x7_parameters_at_equal_width():
  # Input already C channels wide (widths (C, C), first stage's conv from 1 channel
  # counted separately): per stage 3 * 3^2 C^2 vs 7^2 C^2 weights, no biases with BN.
  c = 16
  kw = dict(widths=(c, c), batch_norm=False, num_classes=10)
  one7 = _count('ablation_cnn', (32, 32, 1), kernels=(7,), **kw)
  three3 = _count('ablation_cnn', (32, 32, 1), kernels=(3, 3, 3), **kw)
  head = c * 10 + 10
  assert one7 == (49 * 1 * c + c) + (49 * c * c + c) + head
  assert three3 == (9 * c + c) + 2 * (9 * c * c + c) + 3 * (9 * c * c + c) + head
  assert 3 * 9 * c * c < 49 * c * c


def test_padding_downsampling_and_shapes():
  x = jnp.zeros((2, 32, 32, 1))
  for kw, stage_shapes in [
      (dict(padding='same'), [(16, 16), (8, 8)]),
      (dict(padding='valid'), [(14, 14), (5, 5)]),           # 32-2-2=28 ->14; 14-4=10 -> 5
      (dict(padding=0), [(14, 14), (5, 5)]),                 # 0 is 'valid'
      (dict(padding=1), [(16, 16), (8, 8)]),                 # k // 2 is 'same' for 3x3
      (dict(padding=1, kernels=(5,)), [(15, 15), (6, 6)]),   # 32-4+2=30 -> 15; 15-2=13 -> 6
      (dict(padding=2, kernels=(5,)), [(16, 16), (8, 8)]),
      (dict(downsample='strided'), [(16, 16), (8, 8)]),
      (dict(downsample='none'), [(32, 32), (32, 32)]),
      (dict(downsample='l2', lrn=True), [(16, 16), (8, 8)])]:
    m = models.get_model('ablation_cnn', widths=(4, 8), **kw)
    # Shapes only: traced abstractly, nothing is computed.
    v = jax.eval_shape(lambda x: m.init(jax.random.PRNGKey(0), x, train=False), x)
    _, inter = jax.eval_shape(
        lambda v, x: m.apply(v, x, train=False, mutable=['intermediates']), v, x)
    got = [inter['intermediates'][f'stage{i}'][0].shape[1:3] for i in (1, 2)]
    assert got == stage_shapes, kw


def test_bad_fields_and_too_small_inputs_are_clear_errors():
  x = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(ValueError, match='downsample must be one of'):
    models.get_model('ablation_cnn', downsample='median').init(jax.random.PRNGKey(0), x,
                                                                 train=False)
  with pytest.raises(ValueError, match="needs maps of at least 7"):
    models.get_model('ablation_cnn', kernels=(7,), padding='valid', widths=(4, 4, 4)).init(
        jax.random.PRNGKey(0), x, train=False)
  for bad, msg in [(2, r'outside 0..k // 2 for kernel size\(s\) \[3\]'), (-1, 'outside'),
                   ('full', 'padding must be one of'), (True, 'or an int')]:
    with pytest.raises(ValueError, match=msg):
      models.get_model('ablation_cnn', kernels=(5, 3), padding=bad).init(
          jax.random.PRNGKey(0), x, train=False)


def test_residual_sigmoid_and_dropout_train():
  m = models.get_model('ablation_cnn', widths=(4, 4), kernels=(3, 3), residual=True,
                       activation='sigmoid', dropout_rate=0.5, downsample='avg')
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1))
  v = m.init(jax.random.PRNGKey(1), x, train=False)
  y, _ = m.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)},
                 mutable=['batch_stats'])
  assert y.shape == (4, 10) and np.all(np.isfinite(np.asarray(y)))


def test_mlp_and_logistic_regression_counts():
  assert _count('logistic_regression', (40, 1)) == 40 * 10 + 10
  assert _count('mlp', (40, 1)) == (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)
