"""ResUNet++ on the embedded SYNTHETIC `plants` scenes: the notes' segmentation demo, offline.

    python launch.py --config=configs/resunetpp_plants.py --workdir=runs/resunetpp_plants

The notes' demo segments wild plants into background and two plant classes with
ResUNet++ (softmax head, Dice and Jaccard after an argmax, a 60/10/30 split). The
`plants` dataset stands in for their photographs: 1,000 procedurally drawn 128x128
scenes (soil background, broad-leaved rosettes = class 1 (red), grass-like blades =
class 2 (green)), split 600/100/300. It is synthetic, generated from a seed.
To train in minutes on a 2-core CPU it runs ResUNet++ at half width (filters
8..128, 1.02 M parameters; the notes' model is 16..256, 4.06 M) on images and masks
resized together to 64x64. Drop the model_kwargs line below for the full model, and
the resize(64, 64) ops for 128x128.
Expected (seed 0, measured): test mean Dice 0.60 (background 0.90, rosettes 0.59,
grass 0.31: the thin blades are the hard class at 64x64), mean IoU 0.48, pixel
accuracy 0.80; 222 steps, ~3.5 min of training and ~4.3 min in all on this 2-core
CPU. Longer training and 128x128 inputs do better on the grass.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.task = 'segmentation'
  config.model = 'resunetpp'
  # Half the notes' widths (16..256 -> 8..128, 1.02 M parameters): a quarter of the
  # compute, so the demo trains in minutes on 2 CPU cores. Delete this line for the
  # full 4.06 M model (~4x slower).
  config.model_kwargs = {'filters': (8, 16, 32, 64, 128)}
  config.dataset = 'plants'
  config.train_split = 'train'
  config.val_split = 'validation'
  config.eval_split = 'test'
  # Image and mask move together (nearest neighbour for the mask).
  config.train_transform = 'resize(64, 64)|flip|rotate(15)'
  config.eval_transform = 'resize(64, 64)'
  config.batch_size = 16
  config.num_epochs = 6.0
  config.optimizer.name = 'adam'
  config.optimizer.lr = 2e-3
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule = 'cosine'
  config.loss.name = 'cross_entropy+dice'
  config.best_metric = 'val/mean_dice'
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100
  return config
