"""Tables and figures about models: parameters, shapes, FLOPs, receptive fields, and
what a trained CNN computes.

  tables        parameter counts, per-layer tables (MACs, memory, receptive field)
  layers        naming, reading and probing any model's layers
  kernels       classic hand-designed kernels applied with our conv
  feature_maps  learned filters, activation maps, top-activating patches
  deconvnet     Zeiler & Fergus's projection of an activation back to pixels
  saliency      gradient saliency, guided backprop, Grad-CAM
  receptive     theoretical and effective receptive fields
  plots         training curves, confusion matrices, segmentation samples
  visualize     every figure of one run (`launch.py --mode=visualize`)

The figure modules import matplotlib and are loaded on use: `from cnn_jax.analysis
import saliency`.
"""
from cnn_jax.analysis.tables import (count_params, format_table, model_summary, parse_shape,
                                     receptive_field, summary)
