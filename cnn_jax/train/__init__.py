"""Training: TrainState, optax from config, pure train/eval steps."""
from cnn_jax.train.optim import make_optimizer, make_schedule
from cnn_jax.train.state import TrainState, abstract_train_state, create_train_state
from cnn_jax.train.steps import (eval_step, finalize_eval_metrics, make_eval_step,
                                 make_train_step, train_step)
