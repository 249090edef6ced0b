"""Single-stage (YOLO v1 style) object detection: boxes, NMS, loss and mAP.

  boxes    box formats, IoU, clipping; YOLO v1 grid targets (encode_yolo), the
           head-output layout and its decoding (decode_yolo)
  nms      greedy non-maximum suppression, class-agnostic and per class
           (jit-able, fixed-size output with a valid mask)
  loss     the YOLO v1 sum-squared loss with its coordinate, objectness,
           no-object and class terms
  metrics  precision-recall, Average Precision (VOC 2007 / 2010, COCO) and
           mAP@0.5 / mAP@[.5:.95] on the host, precision-recall figures

Boxes are (x0, y0, x1, y1), x the column axis, y the row axis, in pixels or
normalised [0, 1] coordinates; ground truth of an image is padded to M rows:
boxes (M, 4), labels (M,) int32, valid (M,) bool. Nothing here imports
matplotlib until a figure is drawn.
"""
from cnn_jax.detection.boxes import (box_area, cell_boxes_to_xyxy, clip_boxes, cxcywh_to_xyxy,
                                     decode_yolo, denormalize_boxes, elementwise_iou,
                                     encode_yolo, iou, normalize_boxes, perfect_yolo_prediction,
                                     split_yolo_output, xyxy_to_cxcywh)
from cnn_jax.detection.nms import batched_class_nms, nms
from cnn_jax.detection.loss import yolo_v1_loss
from cnn_jax.detection.metrics import (COCO_IOU_THRESHOLDS, average_precision,
                                       evaluate_detections, plot_pr_curves)
