"""Batch norm with the explicit backward (cnn_jax/ops/batch_norm.py, cnn_jax.nn.BatchNorm).

The layer must be flax.linen.BatchNorm to float32 rounding -- outputs, running
statistics, gradients of x and the parameters, second-order gradients, and
cross-device statistics under pmap -- and fall back to flax's own path where it
does not apply; the op's VJP must be the derivative of its forward, also for
the (normally undifferentiated) mean and variance outputs."""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

bn_ops = importlib.import_module('cnn_jax.ops.batch_norm')
cnn = importlib.import_module('cnn_jax.nn')


def _input(shape, seed=0, offset=0.5):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * 1.5 + offset, jnp.float32)


def _both(shape, kwargs, seed=0):
  """(ours, flax) modules with kwargs, their shared variables and an input."""
  x = _input(shape, seed)
  ours, theirs = cnn.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  variables = theirs.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  params = dict(variables.get('params', {}))
  for name in params:   # non-trivial parameters, so their gradients are tested
    params[name] = params[name] + jnp.linspace(-0.3, 0.4, params[name].shape[0])
  if params:
    variables = {**variables, 'params': params}
  return ours, theirs, variables, x


def _close(a, b, rtol=2e-5, err_msg=''):
  scale = max(float(jnp.max(jnp.abs(b))), 1e-30)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * scale,
                             err_msg=err_msg)


def _loss_and_grads(module, variables, x, g):
  def loss(params, x):
    y, upd = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.vdot(y, g), (y, upd)
  (_, (y, upd)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables.get('params', {}), x)
  return y, upd, grads


@pytest.mark.parametrize('shape,kwargs', [
    ((6, 5, 7, 8), {}),
    ((6, 5, 7, 8), {'momentum': 0.8, 'epsilon': 1e-3}),
    ((16, 12), {}),                                         # BatchNorm1d (N, C)
    ((3, 4, 4, 2, 5), {}),                                  # 3-D maps
    ((6, 5, 7, 8), {'use_scale': False}),
    ((6, 5, 7, 8), {'use_bias': False, 'use_scale': False}),
])
def test_equals_flax_batch_norm_in_training(shape, kwargs):
  kwargs = {'use_running_average': False, **kwargs}
  ours, theirs, variables, x = _both(shape, kwargs)
  g = _input(shape, seed=1, offset=0.0)
  y1, s1, (gp1, gx1) = _loss_and_grads(ours, variables, x, g)
  y2, s2, (gp2, gx2) = _loss_and_grads(theirs, variables, x, g)
  _close(y1, y2, err_msg='y')
  for k in ('mean', 'var'):
    _close(s1['batch_stats'][k], s2['batch_stats'][k], err_msg=k)
  _close(gx1, gx2, err_msg='dx')
  for k in gp2:
    _close(gp1[k], gp2[k], err_msg=f'd{k}')


def test_the_fast_path_is_taken_and_the_fallbacks_are_flax():
  """Training mode on float32 traces the custom VJP; evaluation, init, masks and
  other dtypes are flax's own code (identical programs, so identical results)."""
  x = _input((4, 3, 3, 6))
  m = cnn.BatchNorm(use_running_average=False)
  variables = m.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(lambda v, x: m.apply(v, x, mutable=['batch_stats']))(variables, x))
  assert 'custom_vjp_call' in jaxpr

  eval_m, flax_eval = cnn.BatchNorm(use_running_average=True), nn.BatchNorm(use_running_average=True)
  stats = {'params': variables['params'],
           'batch_stats': {'mean': jnp.arange(6.0), 'var': jnp.linspace(0.5, 2.0, 6)}}
  np.testing.assert_array_equal(eval_m.apply(stats, x), flax_eval.apply(stats, x))
  assert 'custom_vjp_call' not in str(jax.make_jaxpr(lambda v, x: eval_m.apply(v, x))(stats, x))

  mask = jnp.asarray(np.random.default_rng(0).random((4, 3, 3, 1)) > 0.3)
  a = m.apply(variables, x, mask=mask, mutable=['batch_stats'])
  b = nn.BatchNorm(use_running_average=False).apply(variables, x, mask=mask,
                                                    mutable=['batch_stats'])
  np.testing.assert_array_equal(a[0], b[0])

  xb = x.astype(jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(lambda v, x: m.apply(v, x, mutable=['batch_stats']))(variables, xb))
  assert 'custom_vjp_call' not in jaxpr


def test_the_registry_models_build_it():
  """resnet20 from the registry normalizes with cnn_jax.nn.BatchNorm (whose
  variables are flax's: _both checks the trees match)."""
  from cnn_jax.models import get_model
  model = get_model('resnet20', num_classes=10)
  x = _input((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  found = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      found.append(type(context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert found and all(t is cnn.BatchNorm for t in found)


def _reference_forward(x, scale, bias, eps):
  """The forward written plainly, differentiated by autodiff."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(0.0, jnp.mean(x * x, axes) - mean * mean)
  y = (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
  return y, mean, var


def test_vjp_is_the_derivative_including_the_statistics_outputs():
  x = _input((5, 4, 6, 7), offset=1.0)
  scale = jnp.linspace(0.5, 1.5, 7)
  bias = jnp.linspace(-1.0, 1.0, 7)
  cts = (_input((5, 4, 6, 7), seed=2, offset=0.0), jnp.linspace(-2.0, 1.0, 7),
         jnp.linspace(0.3, -0.7, 7))
  out, vjp = jax.vjp(lambda x, s, b: bn_ops.batch_norm_train(x, s, b, epsilon=1e-3), x, scale, bias)
  ref_out, ref_vjp = jax.vjp(lambda x, s, b: _reference_forward(x, s, b, 1e-3), x, scale, bias)
  for a, b in zip(out, ref_out):
    _close(a, b)
  for name, a, b in zip(('dx', 'dscale', 'dbias'), vjp(cts), ref_vjp(cts)):
    _close(a, b, rtol=1e-4, err_msg=name)


def test_second_order_gradients_equal_flax():
  """grad of (grad norm): differentiates through the explicit backward."""
  ours, theirs, variables, x = _both((4, 3, 5, 6), {'use_running_average': False})
  g = _input((4, 3, 5, 6), seed=3, offset=0.0)

  def outer(module):
    def inner(params, x):
      y, _ = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
      return jnp.vdot(jnp.tanh(y), g)
    def f(params, x):
      gp, gx = jax.grad(inner, argnums=(0, 1))(params, x)
      return jnp.sum(gx ** 2) + sum(jnp.sum(v ** 2) for v in gp.values())
    return jax.jit(jax.grad(f, argnums=(0, 1)))(variables['params'], x)

  (gp1, gx1), (gp2, gx2) = outer(ours), outer(theirs)
  _close(gx1, gx2, rtol=1e-4, err_msg='dx')
  for k in gp2:
    _close(gp1[k], gp2[k], rtol=1e-4, err_msg=k)


def test_cross_device_statistics_under_pmap_equal_flax():
  n = min(jax.local_device_count(), 4)
  if n < 2:
    pytest.skip('needs 2+ devices (tests set --xla_force_host_platform_device_count=8)')
  kwargs = {'use_running_average': False, 'axis_name': 'batch'}
  ours, theirs, variables, _ = _both((8, 3, 3, 5), {'use_running_average': False})
  x = _input((n, 3, 4, 4, 5), seed=4)
  g = _input((n, 3, 4, 4, 5), seed=5, offset=0.0)

  def run(cls):
    m = cls(**kwargs)
    def step(params, x, g):
      def loss(params, x):
        y, upd = m.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.vdot(y, g), upd
      (gp, gx), upd = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
      return gp, gx, upd
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), variables['params'])
    return jax.pmap(step, axis_name='batch')(params, x, g)

  gp1, gx1, s1 = run(cnn.BatchNorm)
  gp2, gx2, s2 = run(nn.BatchNorm)
  _close(gx1, gx2, err_msg='dx')
  for k in gp2:   # each device's own contribution, as autodiff gives
    _close(gp1[k], gp2[k], err_msg=k)
  for k in ('mean', 'var'):
    _close(s1['batch_stats'][k], s2['batch_stats'][k], err_msg=k)
  # The statistics are global: every device holds the same running mean.
  np.testing.assert_allclose(s1['batch_stats']['mean'][0], s1['batch_stats']['mean'][-1],
                             rtol=1e-6)
  del ours, theirs


def _float64_grads(x, g, eps=1e-5):
  x = np.asarray(x, np.float64)
  g = np.asarray(g, np.float64)
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  mean, var = x.mean(axes), x.var(axes)
  rstd = 1.0 / np.sqrt(var + eps)
  xhat = (x - mean) * rstd
  db, ds = g.sum(axes), (g * xhat).sum(axes)
  return rstd / m * (m * g - db - xhat * ds), ds


@pytest.mark.parametrize('offset', [10.0, 100.0])
def test_rounding_with_a_large_mean_is_no_worse_than_flax(offset):
  """sum(g * x) - mean * sum(g) cancels like flax's fast variance does; the
  errors against float64 must stay of the size of flax's own."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((32, 8, 8, 4)) + offset, jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ours, theirs, variables, _ = _both((2, 2, 2, 4), {'use_running_average': False})
  variables = {**variables, 'params': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}}
  dx_true, ds_true = _float64_grads(x, g)
  errs = {}
  for name, module in (('ours', ours), ('flax', theirs)):
    _, _, (gp, gx) = _loss_and_grads(module, variables, x, g)
    errs[name] = (np.max(np.abs(np.asarray(gx) - dx_true)) / np.max(np.abs(dx_true)),
                  np.max(np.abs(np.asarray(gp['scale']) - ds_true)) / np.max(np.abs(ds_true)))
  assert errs['ours'][0] <= 2 * errs['flax'][0] + 1e-6, errs
  assert errs['ours'][1] <= 2 * errs['flax'][1] + 1e-6, errs


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match='at least one axis to reduce'):
    bn_ops.batch_norm_train(jnp.ones((4,)), jnp.ones((4,)), jnp.zeros((4,)))
  with pytest.raises(ValueError, match=r'scale and bias must have shape \(3,\)'):
    bn_ops.batch_norm_train(jnp.ones((2, 3)), jnp.ones((4,)), jnp.zeros((3,)))
