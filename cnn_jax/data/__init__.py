"""Data: tfds data sources (embedded offline datasets + prepared catalog ones) and grain loaders."""
from cnn_jax.data.sources import (EMBEDDED, default_data_dir, get_source, make_loader,
                                  num_classes, prepare_embedded, read_options,
                                  select, steps_per_epoch, Subset, to_example)

__all__ = ['EMBEDDED', 'default_data_dir', 'get_source', 'make_loader', 'num_classes',
           'prepare_embedded', 'read_options', 'select', 'steps_per_epoch', 'Subset',
           'to_example']
