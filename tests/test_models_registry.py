"""Cross-family contract of the model zoo: names, errors, intermediates."""
import collections

import jax
import jax.numpy as jnp
import pytest

from cnn_jax import models


def _one_per_family():
  by_family = collections.defaultdict(list)
  for name in models.list_models():
    by_family[models.model_info(name).family].append(name)
  # The smallest registered variant of each family keeps the trace cheap.
  picks = []
  for family, names in sorted(by_family.items()):
    tiny = [n for n in names if 'tiny' in n]
    picks.append(tiny[0] if tiny else sorted(names, key=len)[0])
  return picks


def test_every_family_is_registered():
  families = {models.model_info(n).family for n in models.list_models()}
  assert {'alexnet', 'vgg', 'lenet', 'resnet', 'cifar_resnet', 'googlenet', 'densenet',
          'mobilenet', 'highway', 'sequence'} <= families
  assert len(models.list_models()) >= 60


@pytest.mark.parametrize('name', _one_per_family())
def test_models_sow_pre_logits_and_return_logits(name):
  info = models.model_info(name)
  model = models.get_model(name, num_classes=7)
  dtype = jnp.int32 if name.startswith('textcnn') else jnp.float32
  x = jax.ShapeDtypeStruct((2,) + info.input_shape, dtype)

  def run(x):
    variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                           x, train=False)
    return model.apply(variables, x, train=False, mutable=['intermediates'])

  logits, state = jax.eval_shape(run, x)
  if info.family == 'segmentation':   # per-pixel logits
    assert logits.shape == (2,) + info.input_shape[:-1] + (7,)
  elif info.family == 'detection':    # the S x S grid: B boxes of 5 numbers, 7 classes
    s, b = model.grid_size, model.boxes_per_cell
    assert logits.shape == (2, s, s, 5 * b + 7)
  else:
    assert logits.shape == (2, 7)
  sown = state['intermediates']
  assert 'pre_logits' in sown, f'{name} sows {sorted(sown)}'
  assert sown['pre_logits'][0].shape[0] == 2


def test_unknown_names_and_fields():
  with pytest.raises(ValueError, match=r"unknown model 'resnet5'\. Did you mean .*'resnet50'"):
    models.get_model('resnet5')
  with pytest.raises(ValueError, match=r"has no field\(s\) \['depth'\]"):
    models.get_model('resnet18', depth=3)
  with pytest.raises(ValueError, match='num_classes must be a positive int'):
    models.get_model('lenet5', num_classes=0)
