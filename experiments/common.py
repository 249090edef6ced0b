"""The training protocol the digits ablations share, in one place.

Every experiment on the embedded `digits` (1,797 real 8x8 scans upsampled to 32x32)
trains the same way unless its own config says otherwise: the first 90% of the
training split to train on (1,293 digits), the last 10% to validate on (144), the
test split (360) for the headline number; batch 32; SGD with momentum 0.9, linear
warmup then cosine decay to zero; one checkpoint, at the end; no progress bar or
model table in the logs (a sweep prints many runs). Each experiment's config calls
`digits_config(...)` with what it varies and then sets its model.

On CIFAR-10 the same configs run by override; each experiment's README gives the
flags.
"""
from cnn_jax.train.config import default_config

DIGITS_AUGMENT = 'rotate(10)|zoom(0.9,1.1)'


def digits_config(*, num_epochs: float = 12.0, lr: float = 0.05,
                  weight_decay: float = 5e-4, warmup_steps: int = 50,
                  train_transform: str = DIGITS_AUGMENT, log_every_steps: int = 40):
  """A default config with the shared digits protocol (see the module docstring)."""
  config = default_config()
  config.dataset = 'digits'
  config.train_split = 'train[:90%]'
  config.val_split = 'train[90%:]'
  config.eval_split = 'test'
  config.train_transform = train_transform
  config.batch_size = 32
  config.num_epochs = float(num_epochs)
  config.optimizer.name = 'momentum'
  config.optimizer.lr = lr
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = weight_decay
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = warmup_steps
  config.log_every_steps = log_every_steps
  config.checkpoint_every_steps = 1000   # every run here is shorter: one save, at the end
  config.keep_checkpoints = 1
  config.progress_bar = False
  config.print_summary = False
  return config
