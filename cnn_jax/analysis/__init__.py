"""Tables and figures about models: parameters, shapes, FLOPs, receptive fields."""
from cnn_jax.analysis.tables import (count_params, format_table, model_summary, parse_shape,
                                     receptive_field, summary)
