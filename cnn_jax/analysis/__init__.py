"""Tables and figures about models: parameters, shapes, FLOPs, receptive fields."""
from cnn_jax.analysis.summary import count_params, format_table, receptive_field, summary
