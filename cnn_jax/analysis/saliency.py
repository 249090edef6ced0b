"""Saliency maps: which pixels a class score depends on, and where in the image.

y_c below is the logit (the pre-softmax score) of class c, as in the papers; the
target class defaults to the model's prediction, argmax_c y_c.

Gradient saliency (Simonyan, Vedaldi & Zisserman 2014), per pixel p:

    M[p] = max_k | d y_c / d x[p, k] |         (k: the input's colour channels)

Guided backpropagation (Springenberg et al. 2015) is the same gradient with one
change at every ReLU y = max(x, 0): the backward rule. Their Fig. 1 puts the three
rules side by side, for the signal g arriving at the ReLU's output:

    gradient     g_in = g [x > 0]
    deconvnet    g_in = max(g, 0)                 (Zeiler & Fergus; deconvnet.py)
    guided       g_in = g [x > 0] [g > 0]

`backprop_with_relu_rule` applies any of them to any function. The ReLUs are found
in the traced computation (its jaxpr), not in the model's source: every
max(x, 0) with a literal zero, and every call whose body is just that
(`cnn_jax.ops.relu`, `jax.nn.relu` / `flax.linen.relu`, which carry their own
custom derivative rules), at any depth of plain `jax.jit` calls. Everything else
is differentiated as usual, so this works for residual, branching and BatchNorm
models alike. Note that "every max(x, 0)" is literal: a clamp such as
max(var, 0) inside a normalisation computed from the batch would get the rule too
(flax's BatchNorm does this only in training mode; these maps use evaluation
mode). relu6, leaky ReLU and other activations keep their ordinary gradient.

Grad-CAM (Selvaraju et al. 2017), for a layer A with K channel maps A_k over Z
positions:

    alpha_k = (1/Z) sum_p d y_c / d A_k[p]              (global-average gradients)
    L = ReLU( sum_k alpha_k A_k )                       (coarse map, layer resolution)

upsampled bilinearly to the input's size (`jax.image.resize`) and divided by its
maximum, so each map lies in [0, 1] (an all-zero map stays zero). For a net that
ends A -> global average pool -> dense (weights W, bias b), y_c = sum_k W_ck
mean_p A_k[p] + b_c, so alpha_k = W_ck / Z and L = ReLU(sum_k W_ck A_k) / Z: Zhou
et al.'s class activation map sum_k W_ck A_k (2016), rectified and scaled. The
tests check exactly this.

The default Grad-CAM layer is the feature map the classifier head reads: the
input of the first layer after the last spatial layer when that input is still a
spatial map (the global pool of ResNet or NiN, so it includes the final ReLU and
skip connection), otherwise the last spatial layer's output (VGG's and AlexNet's
adaptive pool, whose output is flattened). d y_c / d A comes from
`layers.apply_with_taps` (a zero tap added to A), or from the same construction
on a layer's input for the default.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from cnn_jax.analysis import layers
from cnn_jax.ops import activations

# The layer walk that list_layers, layer_outputs and apply_with_taps share.
walk = layers.walk

RULES = ('gradient', 'deconvnet', 'guided')


# ----------------------------------------------------------------------------
# Targets and logits
# ----------------------------------------------------------------------------

def _logits_fn(model: nn.Module, variables) -> Callable[[jax.Array], jax.Array]:
  return lambda x: model.apply(variables, x, train=False)


def _targets(logits, target, op: str) -> jax.Array:
  """(N,) int class per example: the prediction when target is None."""
  if logits.ndim != 2:
    raise ValueError(f'{op}: the model must return logits (N, num_classes); got shape '
                     f'{tuple(logits.shape)}.')
  n, classes = logits.shape
  if target is None:
    return jnp.argmax(logits, axis=-1)
  t = np.asarray(target)
  if not np.issubdtype(t.dtype, np.integer) or t.ndim > 1 or (t.ndim == 1 and len(t) != n):
    raise ValueError(f'{op}: target must be None (the predicted class), one int, or {n} '
                     f'ints (one per example); got {target!r}.')
  if ((t < 0) | (t >= classes)).any():
    raise ValueError(f'{op}: target class {target!r} out of range for {classes} classes '
                     f'(0 .. {classes - 1}).')
  return jnp.broadcast_to(jnp.asarray(t, jnp.int32), (n,))


def _selected(logits, target):
  """sum_n y_{target_n}(x_n): its gradient holds every example's own d y_c / d x."""
  return jnp.sum(jnp.take_along_axis(logits, target[:, None], axis=1))


# ----------------------------------------------------------------------------
# Gradient saliency
# ----------------------------------------------------------------------------

def gradient_saliency(model: nn.Module, variables, x, target=None) -> np.ndarray:
  """Simonyan et al.'s saliency map, max over channels of |d y_c / d x|.

  Args:
    model: a classifier, called as model.apply(variables, x, train=False) and
      returning logits (N, num_classes). Any registry classifier.
    variables: its variables.
    x: (N, *spatial, C) inputs.
    target: the class c whose score is explained: None (each example's predicted
      class), one int for all, or one int per example.

  Returns:
    float32 (N, *spatial): M[n, p] = max_k |d y_c / d x[n, p, k]|. In evaluation
    mode the examples do not interact, so the one backward pass of
    sum_n y_{c_n}(x_n) gives each example its own gradient.
  """
  x = jnp.asarray(x)
  logits, g = _logits_and_grad(model, variables, x, target, 'gradient_saliency')
  del logits
  return np.asarray(jnp.max(jnp.abs(g), axis=-1), np.float32)


def _logits_and_grad(model, variables, x, target, op):
  """(logits, d y_c / d x) in one compiled program (faster than eager ops)."""
  @jax.jit
  def run(variables, x):
    fn = _logits_fn(model, variables)
    logits = fn(x)
    t = _targets(logits, target, op)
    return logits, jax.grad(lambda x: _selected(fn(x), t))(x)

  return run(variables, x)


# ----------------------------------------------------------------------------
# Backpropagation with a replaced ReLU rule (deconvnet, guided backprop)
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _deconvnet_relu(x):
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _deconvnet_relu_fwd(x):
  return _deconvnet_relu(x), None


def _deconvnet_relu_bwd(_, g):
  return (jnp.maximum(g, jnp.zeros((), g.dtype)),)


_deconvnet_relu.defvjp(_deconvnet_relu_fwd, _deconvnet_relu_bwd)


@jax.custom_vjp
def _guided_relu(x):
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _guided_relu_fwd(x):
  return _guided_relu(x), x


def _guided_relu_bwd(x, g):
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros((), g.dtype)),)


_guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)

_RELU_BY_RULE = {'gradient': activations.relu, 'deconvnet': _deconvnet_relu,
                 'guided': _guided_relu}
# Calls without a derivative rule of their own: inlined when a ReLU is inside.
_PLAIN_CALLS = ('jit', 'pjit', 'closed_call', 'core_call')
# Calls with one: replaced when their body is exactly one ReLU, else kept whole.
_CUSTOM_CALLS = ('custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr')


def _inner(eqn) -> Optional[Tuple[Any, Sequence[Any]]]:
  """(jaxpr, consts) of the computation an equation calls, or None."""
  for key in ('call_jaxpr', 'jaxpr', 'fun_jaxpr'):
    j = eqn.params.get(key)
    if isinstance(j, jex.ClosedJaxpr):
      return j.jaxpr, j.consts
    if isinstance(j, jex.Jaxpr):
      return j, ()
  return None


def _zero_literal(v) -> bool:
  if not isinstance(v, jex.Literal):
    return False
  val = np.asarray(v.val)
  return val.ndim == 0 and val == 0


def _relu_input(eqn) -> Optional[int]:
  """Which input x an equation is ReLU of (max(x, 0) or a call of just that)."""
  name = eqn.primitive.name
  if name == 'max' and len(eqn.invars) == 2 and len(eqn.outvars) == 1:
    out = eqn.outvars[0].aval
    for i, (a, b) in enumerate((eqn.invars, eqn.invars[::-1])):
      if (not isinstance(a, jex.Literal) and _zero_literal(b)
          and a.aval.shape == out.shape and a.aval.dtype == out.dtype):
        return i
    return None
  if name in _PLAIN_CALLS + _CUSTOM_CALLS and len(eqn.invars) == 1:
    inner = _inner(eqn)
    if inner is None:
      return None
    jaxpr, _ = inner
    if len(jaxpr.eqns) != 1 or len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
      return None
    body = jaxpr.eqns[0]
    i = _relu_input(body)
    if i is not None and body.invars[i] is jaxpr.invars[0] and (
        body.outvars[0] is jaxpr.outvars[0]):
      return 0
  return None


def _contains_relu(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if _relu_input(eqn) is not None:
      return True
    inner = _inner(eqn) if eqn.primitive.name in _PLAIN_CALLS else None
    if inner is not None and _contains_relu(inner[0]):
      return True
  return False


def _eval_with_relu(jaxpr, consts, args, relu) -> List[Any]:
  """Evaluates a jaxpr, computing every ReLU it holds as `relu` (jax.core.eval_jaxpr
  otherwise)."""
  env: Dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val in zip(jaxpr.invars, args):
    env[v] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    which = _relu_input(eqn)
    inner = _inner(eqn) if eqn.primitive.name in _PLAIN_CALLS else None
    if which is not None:
      outvals = [relu(invals[which])]
    elif inner is not None and _contains_relu(inner[0]):
      outvals = _eval_with_relu(inner[0], inner[1], invals, relu)
    else:
      bound = eqn.primitive.get_bind_params(eqn.params)
      # jax >= 0.7 returns the params; older versions (subfunctions, params).
      subfuns, params = ((), bound) if isinstance(bound, dict) else bound
      out = eqn.primitive.bind(*subfuns, *invals, **params)
      outvals = out if eqn.primitive.multiple_results else [out]
    for v, val in zip(eqn.outvars, outvals):
      if not isinstance(v, jex.DropVar):
        env[v] = val
  return [read(v) for v in jaxpr.outvars]


def backprop_with_relu_rule(fn: Callable[[jax.Array], jax.Array], x, cotangent, *,
                            rule: str = 'guided', require_relu: bool = True) -> jax.Array:
  """The vector-Jacobian product of fn at x with every ReLU's backward rule replaced.

  Args:
    fn: a function of one array returning one array (e.g. a model's logits, or a
      layer's activations).
    x: where to differentiate.
    cotangent: the signal sent back, shaped like fn(x) (a one-hot class for a
      saliency map, a masked feature map for a deconvnet), or a function taking
      fn(x) and returning it (e.g. the one-hot of its argmax), so that the forward
      pass runs once.
    rule: 'gradient' (g [x > 0], the ordinary VJP), 'deconvnet' (max(g, 0)) or
      'guided' (g [x > 0][g > 0]); see the module docstring.
    require_relu: raise if the computation holds no ReLU (the rule would change
      nothing, which usually means the ReLUs were not recognised).

  Returns:
    An array shaped like x. One compiled program: the forward pass evaluated
    equation by equation from fn's jaxpr, ReLUs swapped for the rule's, and its VJP.
  """
  if rule not in RULES:
    raise ValueError(f'backprop_with_relu_rule: rule must be one of {RULES}, got {rule!r}.')
  x = jnp.asarray(x)
  closed = jax.make_jaxpr(fn)(x)
  if len(closed.jaxpr.outvars) != 1:
    raise ValueError('backprop_with_relu_rule: fn must return a single array, got '
                     f'{len(closed.jaxpr.outvars)} outputs.')
  out_aval = closed.out_avals[0]
  if not callable(cotangent):
    given = jnp.asarray(cotangent)
    if tuple(given.shape) != tuple(out_aval.shape):
      raise ValueError(f'backprop_with_relu_rule: cotangent shape {tuple(given.shape)} '
                       f'must match fn(x) {tuple(out_aval.shape)}.')
    cotangent = lambda _: given
  if require_relu and not _contains_relu(closed.jaxpr):
    raise ValueError(
        'backprop_with_relu_rule: found no ReLU (max(x, 0), cnn_jax.ops.relu, '
        'jax.nn.relu) in the computation, so the rule would change nothing and this '
        'is the plain gradient. Use jax.vjp (or gradient_saliency), or pass '
        'require_relu=False.')
  relu = _RELU_BY_RULE[rule]

  @jax.jit
  def run(consts, x):
    f = lambda x: _eval_with_relu(closed.jaxpr, consts, [x], relu)[0]
    out, vjp = jax.vjp(f, x)
    return vjp(jnp.asarray(cotangent(out), out_aval.dtype))[0]

  return run(closed.consts, x)


def guided_backprop(model: nn.Module, variables, x, target=None) -> np.ndarray:
  """Springenberg et al.'s guided backpropagation of the class score to the input.

  Args:
    model, variables, x, target: as in `gradient_saliency`.

  Returns:
    float32 array shaped like x: d y_c / d x computed with every ReLU passing
    back g [x > 0][g > 0] (signed; `plot_saliency` shows its magnitude). Raises
    ValueError when the model has no ReLU.
  """
  def onehot(logits):
    t = _targets(logits, target, 'guided_backprop')
    return jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype)

  g = backprop_with_relu_rule(_logits_fn(model, variables), x, onehot, rule='guided')
  return np.asarray(g, np.float32)


# ----------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------

def _apply_with_input_tap(model, variables, x, name: str, tap):
  """(logits, the layer's input) with `tap` added to the input of layer `name`.

  Layer names follow `layers`: the module path, ':k' on its k-th call.
  """
  seen: Dict[str, int] = {}
  got: Dict[str, jax.Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and args and hasattr(args[0], 'shape'):
      base = '/'.join(context.module.path) or type(context.module).__name__
      seen[base] = seen.get(base, 0) + 1
      call = base if seen[base] == 1 else f'{base}:{seen[base]}'
      if call == name:
        args = (args[0] + tap,) + tuple(args[1:])
        got['input'] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = model.apply(variables, x, train=False)
  if 'input' not in got:
    raise ValueError(f'grad_cam: layer {name!r} was not called.')
  return out, got['input']


def _input_shapes(model, variables, x) -> Dict[str, Tuple[int, ...]]:
  """Input shape of every layer, from a shape-only trace."""
  shapes: Dict[str, Tuple[int, ...]] = {}

  def note(name, module, args, out):
    del module
    if args and hasattr(args[0], 'shape'):
      shapes[name] = tuple(args[0].shape)
    return out

  jax.eval_shape(lambda v, x: walk(model, v, x, train=False, on_layer=note),
                 variables, x)
  return shapes


def default_cam_layer(model: nn.Module, variables, x) -> Tuple[str, str]:
  """(layer, 'input' or 'output'): the feature map Grad-CAM uses by default.

  The input of the layer after the last layer with a spatial output, if that
  input is spatial (a global pool reading the final, rectified maps); else the
  last spatial layer's output.
  """
  x = jnp.asarray(x)
  rows = layers.list_layers(model, x.shape[1:], variables=variables)
  spatial = [i for i, (_, _, shape) in enumerate(rows) if len(shape) == x.ndim - 1]
  if not spatial:
    raise ValueError('grad_cam: no layer of this model has a spatial output '
                     f'(N, *spatial, C) like the input {tuple(x.shape)}; Grad-CAM needs '
                     'feature maps.')
  last = spatial[-1]
  if last + 1 < len(rows):
    head = rows[last + 1][0]
    shape = _input_shapes(model, variables, x).get(head)
    if shape is not None and len(shape) == x.ndim:
      return head, 'input'
  return rows[last][0], 'output'


def grad_cam(model: nn.Module, variables, x, layer: Optional[str] = None,
             target=None) -> np.ndarray:
  """Selvaraju et al.'s Grad-CAM, upsampled to the input and scaled to [0, 1].

  Args:
    model, variables, x, target: as in `gradient_saliency`.
    layer: the layer whose output A is weighed (a full name or unique suffix, see
      `layers.list_layers`); None takes the feature map the head reads
      (`default_cam_layer`).

  Returns:
    float32 (N, *spatial of x) in [0, 1]: ReLU(sum_k alpha_k A_k) with alpha_k the
    spatial mean of d y_c / d A_k, resized bilinearly to the input and divided by
    its maximum (all zeros if it has none above zero).
  """
  x = jnp.asarray(x)
  rows = layers.list_layers(model, x.shape[1:], variables=variables)
  if layer is None:
    name, where = default_cam_layer(model, variables, x)
  else:
    name, where = layers.resolve(layer, [n for n, _, _ in rows]), 'output'
  if where == 'output':
    shape = (x.shape[0],) + next(s for n, _, s in rows if n == name)
  else:
    shape = _input_shapes(model, variables, x)[name]
  if len(shape) != x.ndim:
    raise ValueError(f'grad_cam: layer {name!r} has output shape {tuple(shape[1:])}, '
                     f'not a spatial map (*spatial, C) like the input '
                     f'{tuple(x.shape[1:])}; choose a conv, norm or pooling layer.')

  def score(tap, variables, x):
    """(sum_n y_{c_n}, A): the tap is added to A, so d score / d tap = d y_c / d A."""
    if where == 'output':
      logits, rec = layers.apply_with_taps(model, variables, x, {name: tap}, record=[name])
      a = rec[name]
    else:
      logits, a = _apply_with_input_tap(model, variables, x, name, tap)
    return _selected(logits, _targets(logits, target, 'grad_cam')), a

  @jax.jit
  def run(variables, x):
    grads, a = jax.grad(score, has_aux=True)(jnp.zeros(shape, x.dtype), variables, x)
    spatial_axes = tuple(range(1, x.ndim - 1))
    alpha = jnp.mean(grads, axis=spatial_axes, keepdims=True)       # (N, 1.., K)
    cam = jax.nn.relu(jnp.sum(alpha * a, axis=-1))                  # (N, *spatial')
    cam = jax.image.resize(cam, (x.shape[0],) + tuple(x.shape[1:-1]), method='linear')
    peak = jnp.max(cam, axis=spatial_axes, keepdims=True)
    cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1), 0)
    return jnp.clip(cam, 0, 1)

  return np.asarray(run(variables, x), np.float32)


# ----------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------

def plot_saliency(images, maps, path_png: str, titles: Optional[Sequence[str]] = None, *,
                  cmap: str = 'jet', alpha: float = 0.5, dpi: int = 100) -> str:
  """Rows of image | saliency heatmap | heatmap over the image, written to a PNG.

  Args:
    images: (N, H, W, C) inputs (any range; each is rescaled for display).
    maps: (N, H, W) maps (gradient_saliency, grad_cam), or (N, H, W, C) signed
      gradients (guided_backprop), shown as max_k |.| over channels. Each map is
      rescaled to [0, 1] on its own, as the titles say.
    path_png: where to write the PNG (parent directories are created).
    titles: one caption per row (e.g. 'Grad-CAM, class 3'), above the heatmap.
    cmap: the heatmap's colour map.
    alpha: the heatmap's opacity in the overlay.
    dpi: resolution.

  Returns:
    path_png.
  """
  from cnn_jax.analysis.plots import (  # pylint: disable=import-outside-toplevel
      channels_for_display, new_figure, save_figure, unit_range)
  images, maps = np.asarray(images), np.asarray(maps)
  if images.ndim != 4:
    raise ValueError(f'plot_saliency: images must be (N, H, W, C), got {images.shape}.')
  if maps.shape == images.shape:
    maps = np.abs(maps).max(axis=-1)
  if maps.shape != images.shape[:3]:
    raise ValueError(f'plot_saliency: maps must be (N, H, W) or shaped like the images '
                     f'{images.shape}; got {maps.shape}.')
  n = len(images)
  if titles is not None and len(titles) != n:
    raise ValueError(f'plot_saliency: {len(titles)} titles for {n} images.')
  fig = new_figure((7.5, 2.5 * n + 0.2))
  for i in range(n):
    image = channels_for_display(unit_range(images[i]))
    heat = unit_range(maps[i])
    caption = f'{titles[i]}\n' if titles is not None else ''
    grey = 'gray' if image.ndim == 2 else None
    for j, title in enumerate(('input', f'{caption}saliency (rescaled to [0, 1])',
                               'overlay'), start=1):
      ax = fig.add_subplot(n, 3, 3 * i + j)
      if j != 2:
        ax.imshow(image, cmap=grey, vmin=0, vmax=1, interpolation='nearest')
      if j == 2:
        im = ax.imshow(heat, cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
      elif j == 3:
        ax.imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=alpha, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0 or j == 2:
        ax.set_title(title, fontsize='small')
  fig.tight_layout()
  return save_figure(fig, path_png, dpi)


__all__ = ['gradient_saliency', 'guided_backprop', 'backprop_with_relu_rule', 'grad_cam',
           'default_cam_layer', 'plot_saliency', 'RULES']
