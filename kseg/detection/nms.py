"""Export-friendly, batched, per-class NMS with fixed-size (padded) outputs.

The semantics are torchvision SSD's (`SSD.postprocess_detections`): per class, the scores above a
threshold, the class's top_k of those, greedy NMS (`ops.batched_nms`: a box is suppressed by a kept
one of its class with IoU > iou_threshold, kept at IoU == iou_threshold), and the highest
max_detections over all classes, by score descending. Caffe SSD's DetectionOutput layer (confidence
threshold, nms top_k, keep_top_k) does the same. Realised with `tf.math.top_k` and
`tf.image.combined_non_max_suppression`, which have static output shapes and a dynamic batch.
"""

from __future__ import annotations

import tensorflow as tf


def per_class_top_k(scores, k):
    """scores [B, A, C] with each class's (column's) values outside its k highest over the A boxes set
    to 0 (k is capped at A). Ties with the k-th value are all kept."""
    scores = tf.convert_to_tensor(scores, tf.float32)
    by_class = tf.transpose(scores, [0, 2, 1])  # [B, C, A]
    k = tf.minimum(tf.constant(k, tf.int32), tf.shape(by_class)[-1])
    kth = tf.math.top_k(by_class, k=k, sorted=True).values[..., -1:]
    kept = tf.where(by_class >= kth, by_class, tf.zeros_like(by_class))
    return tf.transpose(kept, [0, 2, 1])


def padding_mask(num_detections, size):
    """[B, size] bool: True for the first num_detections[b] rows of each image."""
    return tf.range(size, dtype=tf.int32)[None, :] < tf.cast(num_detections, tf.int32)[:, None]


def batched_class_nms(boxes, scores, *, top_k=400, iou_threshold=0.45, score_threshold=0.01,
                      max_detections=200):
    """Per-class NMS of boxes [B, A, 4] (shared by all classes) scored by scores [B, A, C] >= 0.

    Returns (boxes [B, K, 4], scores [B, K], classes [B, K] int32 column indices 0..C-1 with -1
    for padding, num_detections [B] int32), K = max_detections, sorted by score descending; padding
    rows hold zeros. Per class only scores > score_threshold among its top_k count (torchvision's
    `score > score_thresh` then `topk`); each class keeps at most top_k after NMS.

    combined_non_max_suppression runs with clip_boxes=False: True would clamp the pixel boxes to [0, 1].
    Its IoU is symmetric in x and y, so xyxy boxes serve for its [y1, x1, y2, x2].
    """
    if score_threshold < 0:
        raise ValueError(f"score_threshold must be >= 0 (scores below top_k are masked to 0), got {score_threshold}")
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    masked = per_class_top_k(scores, top_k)
    found = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :], masked, max_output_size_per_class=top_k, max_total_size=max_detections,
        iou_threshold=iou_threshold, score_threshold=score_threshold, pad_per_class=False, clip_boxes=False)
    num = tf.cast(found.valid_detections, tf.int32)
    valid = padding_mask(num, max_detections)
    classes = tf.where(valid, tf.cast(found.nmsed_classes, tf.int32), -1)
    return found.nmsed_boxes, found.nmsed_scores, classes, num
