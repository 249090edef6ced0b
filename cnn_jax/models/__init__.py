"""Model zoo. `get_model(name, num_classes=...)`, `list_models()`."""
from cnn_jax.models.registry import get_model, list_models, model_info, register
