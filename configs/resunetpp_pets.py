"""ResUNet++ on the Oxford-IIIT Pet trimaps (tfds catalog; `make data DATASET=oxford_iiit_pet`).

    make data DATASET=oxford_iiit_pet
    python launch.py --config=configs/resunetpp_pets.py --workdir=runs/resunetpp_pets

3-class segmentation of the pet trimaps (0 pet, 1 background, 2 border: tfds'
values 1/2/3 minus 1). The dataset has its own train (3,680) and test (3,669)
splits; 10% of train is held out for validation. Images and masks are resized
together to 128x128 (nearest neighbour for the masks), flipped together in training.
Loss: pixel cross-entropy + soft Dice; Adam 1e-3 with cosine decay, 40 epochs.
Expected: mean Dice ~0.80 and pixel accuracy ~0.90 on the test split (typical for a
U-Net-like model of this size on 128x128 trimaps; the border class is the hardest).
Time: not run here (the dataset cannot be downloaded offline); ~4,600 steps of batch
32 at 128x128: hours on this 2-core CPU, ~15 minutes on one GPU.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.task = 'segmentation'
  config.model = 'resunetpp'
  config.num_classes = 3                 # the trimap classes, not the 37 breeds
  config.dataset = 'oxford_iiit_pet'
  config.train_split = 'train[:90%]'
  config.val_split = 'train[90%:]'
  config.eval_split = 'test'
  config.train_transform = 'resize(128, 128)|flip|normalize(imagenet)'
  config.eval_transform = 'resize(128, 128)|normalize(imagenet)'
  config.batch_size = 32
  config.num_epochs = 40.0
  config.optimizer.name = 'adam'
  config.optimizer.lr = 1e-3
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule = 'cosine'
  config.loss.name = 'cross_entropy+dice'
  config.best_metric = 'val/mean_dice'
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
