"""Transfer learning: pretrained weights, head replacement, freezing, feature extraction.

The notes give two recipes, both available from a training config
(cnn_jax.train.config, keys transfer.*):

  * feature extraction (transfer.mode='features'): the pretrained network minus
    its output layer is a fixed feature extractor; its features are computed once
    and cached, and a new classifier is trained on them;
  * fine-tuning (transfer.mode='finetune'): the output layer is replaced, the
    early stages are frozen (transfer.freeze), the higher ones train, with a lower
    learning rate (optimizer.lr, transfer.stage_lr_decay, transfer.lr_multipliers)
    and, if asked, gradual unfreezing (transfer.unfreeze_every_epochs).

Pieces, usable on their own:
  stages      stage names of a model's parameters; its head by shape
  load        variables from a workdir or a weights file; adapt_variables (new head)
  freeze      TransferPlan: optax.multi_transform optimizer, gradient masks, BN policy
  features    feature extraction, the cache, FeatureHead, merge_head
  torchvision import_torchvision: torchvision state_dicts -> our variables
"""
from cnn_jax.transfer.features import FeatureHead, FeatureSource, extract, merge_head
from cnn_jax.transfer.freeze import TransferPlan, eval_mode_bn_apply, make_plan
from cnn_jax.transfer.load import adapt_variables, load_pretrained, restore_workdir_variables
from cnn_jax.transfer.stages import head_paths, ordered_stages, param_stages


__all__ = ['FeatureHead', 'FeatureSource', 'SUPPORTED_MODELS', 'TransferPlan',
           'adapt_variables', 'eval_mode_bn_apply', 'extract', 'head_paths',
           'import_torchvision', 'load_pretrained', 'make_plan', 'merge_head',
           'ordered_stages', 'param_stages', 'restore_workdir_variables']


def __getattr__(name):
  # Imported on first use, so that `python -m cnn_jax.transfer.torchvision` (the
  # converter) does not find its own module already imported by the package.
  if name in ('import_torchvision', 'SUPPORTED_MODELS'):
    from cnn_jax.transfer import torchvision  # pylint: disable=import-outside-toplevel
    return getattr(torchvision, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
