"""Model zoo. `get_model(name, num_classes=...)`, `list_models()`.

Importing this package registers every family.
"""
from cnn_jax.models.registry import get_model, list_models, model_info, register
from cnn_jax.models import (  # noqa: F401  (each module registers its variants)
    ablation, alexnet, densenet, ffcnn, googlenet, highway, lenet, mobilenet, nin, resnet, segmentation,
    sequence, vgg, yolo)
