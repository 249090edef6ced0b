"""YOLO v1-style detection on PASCAL VOC 2007 (needs prepared data; not runnable
offline here).

    make data DATASET=voc/2007
    python launch.py --config=configs/yolo_voc.py --workdir=runs/yolo_voc

Redmon et al.'s setting where this codebase can follow it: 448x448 inputs, a 7x7
grid, 2 boxes per cell, the 20 VOC classes (7 x 7 x 30 outputs), the YOLO v1 loss
with lambda_coord 5 and lambda_noobj 0.5, momentum SGD 0.9 with weight decay 5e-4
and a warmup before the main learning rate. Differences, stated: the backbone is
the registry's ResNet-18 (the paper's is a 24-layer GoogLeNet-like net pretrained on
ImageNet) and is trained from scratch unless `transfer.init_from` points at
ImageNet weights imported with `cnn_jax.transfer.torchvision` (see
docs/pretrained_weights.md), the head is the 'conv' head (model_kwargs.head='fc' for
the paper's two fully connected layers), and the data is VOC 2007 trainval only
(the paper adds VOC 2012) with no augmentation: random crops and flips would have to
move the boxes, which the pipeline does not do yet (config validation refuses them).
Evaluation: mAP@0.5 with VOC all-point interpolation on the 4,952 test images
(difficult objects count as ground truth here, which lowers mAP a little against
the official protocol), and COCO-style mAP@[.5:.95].

Expected (not run here: no VOC data offline, and 448x448 training needs an
accelerator): the paper reports 63.4 mAP on VOC 2007 test with ImageNet
pretraining and VOC 2007+2012 training; from scratch on 2007 alone expect far less.
Time: ~5,000 images per epoch, 135 epochs in the paper; hours per epoch on this
2-core CPU, minutes per epoch on one GPU.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.task = 'detection'
  config.model = 'yolo'                   # ResNet-18 backbone, 7x7 grid, B = 2
  config.model_kwargs = {'backbone': 'resnet18', 'grid_size': 7, 'boxes_per_cell': 2}
  config.num_classes = 20
  config.dataset = 'voc/2007'
  config.train_split = 'train'            # 2,501 images
  config.val_split = 'validation'         # 2,510
  config.eval_split = 'test'              # 4,952
  config.train_transform = 'resize(448, 448)|normalize(imagenet)'
  config.eval_transform = 'resize(448, 448)|normalize(imagenet)'
  config.detection.max_objects = 50       # VOC 2007 has at most 42 objects in an image
  config.batch_size = 64
  config.num_epochs = 135.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 1e-2
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 500
  config.best_metric = 'val/mAP50'
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
