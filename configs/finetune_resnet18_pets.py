"""Fine-tune an ImageNet ResNet-18 on the 37 Oxford-IIIT Pet breeds (needs prepared data
and imported weights; not runnable offline here).

    make data DATASET=oxford_iiit_pet
    # once, on a machine with network access and torchvision (docs/pretrained_weights.md):
    #   python -c "import torch, torchvision; torch.save(torchvision.models.resnet18(
    #       weights='IMAGENET1K_V1').state_dict(), 'pretrained/resnet18_imagenet.pth')"
    #   python -m cnn_jax.transfer.torchvision --model resnet18 \\
    #       --input pretrained/resnet18_imagenet.pth --output pretrained/resnet18_imagenet.npz
    python launch.py --config=configs/finetune_resnet18_pets.py --workdir=runs/resnet18_pets

The notes' fine-tuning recipe, step by step:
  * replace the head: ResNet-18's 1000-way 'fc' becomes a fresh 37-way one
    (transfer.head='replace'); every other tensor comes from the ImageNet weights;
  * freeze, then unfreeze gradually from the top: at first only the new head trains
    (transfer.freeze='backbone', so the random head cannot wreck the pretrained
    features with large early gradients); every 2 epochs the next stage down joins
    (stage4 at epoch 2, stage3 at 4, stage2 at 6, stage1 at 8, the stem at 10);
    frozen BatchNorm layers use their ImageNet running statistics (frozen_bn='eval');
  * lower learning rate for lower layers: the head at optimizer.lr (0.01, ten times
    below a from-scratch run), each stage below it x0.5 (transfer.stage_lr_decay);
  * augment: random 224 crops of the 256-resized image, mirroring, colour jitter,
    and ImageNet mean/std normalisation (what the pretrained weights expect).
Feature extraction instead: transfer.mode='features', train_transform='' (trains a
linear classifier on cached 512-d pre_logits features in seconds per epoch).

Expected (not run here: no data or weights offline): roughly 88-92% test accuracy,
the range commonly reported for an ImageNet ResNet-18 fine-tuned on Oxford-IIIT Pet;
a linear classifier on its frozen features typically lands a few points lower. Time: ~1,560 steps of batch
32 at 224x224: about 3 hours on this 2-core CPU, ~5 minutes on one GPU.
"""
from cnn_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = 'resnet18'
  config.num_classes = 37
  config.dataset = 'oxford_iiit_pet'
  config.train_split = 'train[:90%]'     # 3,312 images
  config.val_split = 'train[90%:]'       # 368 held out
  config.eval_split = 'test'             # 3,669
  config.train_transform = ('resize(256)|random_crop(224)|flip|'
                            'color_jitter(brightness=0.2, contrast=0.2, saturation=0.2)|'
                            'normalize(imagenet)')
  config.eval_transform = 'resize(256)|center_crop(224)|normalize(imagenet)'
  config.batch_size = 32
  config.num_epochs = 15.0
  config.optimizer.name = 'momentum'
  config.optimizer.lr = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'cosine'
  config.transfer.init_from = 'pretrained/resnet18_imagenet.npz'
  config.transfer.init_model = 'resnet18'
  config.transfer.head = 'replace'
  config.transfer.mode = 'finetune'
  config.transfer.freeze = 'backbone'
  config.transfer.unfreeze_every_epochs = 2.0
  config.transfer.frozen_bn = 'eval'
  config.transfer.stage_lr_decay = 0.5
  config.best_metric = 'val/accuracy'
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  return config
