"""SSD's training targets, as TensorFlow ops for a tf.data map: each anchor's class label and
encoded box offsets from one image's ground-truth boxes.

The SSD paper's matching strategy (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016,
section 2.2 "Training": each GT's best default box, then every default box with IoU > 0.5), as
torchvision's SSD does it before `SSD.compute_loss` (torchvision/models/detection/ssd.py):
`SSDMatcher(0.5)(box_iou(gt, anchors))`, matched anchors take their GT's label and
`BoxCoder((10, 10, 5, 5)).encode_single(gt, anchor)`, the others label 0 (background). Caffe SSD's
MultiBoxLossLayer matches the same way (overlap_threshold 0.5, match_type PER_PREDICTION).
"""

from __future__ import annotations

import tensorflow as tf

from kseg.detection.boxes import SSD_WEIGHTS, box_iou, encode
from kseg.detection.matching import ssd_match

# Padding rows of a fixed-size GT tensor carry a negative class (-1 by convention).
PADDING_CLASS = -1


def ssd_targets(boxes, classes, anchors, threshold=0.5):
    """One image's targets: (loc_targets [A, 4] float32, labels [A] int32).

    `boxes` [G, 4] xyxy pixels of the network input (positive widths and heights), `classes` [G]
    model class ids 1..C-1; rows with a negative class (-1) are padding and dropped, so a padded
    fixed-size batch row works, and G may be 0 (every anchor background). `anchors` [A, 4] xyxy
    pixels (anchors.ssd_anchors). An anchor matched to GT j gets label classes[j] and
    encode(boxes[j], anchor, SSD_WEIGHTS); unmatched anchors get label 0 and zero offsets.
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    classes = tf.reshape(tf.cast(classes, tf.int32), [-1])
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    real = classes >= 0
    boxes = tf.boolean_mask(boxes, real)
    classes = tf.boolean_mask(classes, real)
    matches = ssd_match(box_iou(boxes, anchors), threshold)  # [A]: GT index or -1
    matched = matches >= 0
    # One extra row (a unit box, class 0) for the unmatched anchors to gather: defined with zero GT.
    num_gt = tf.shape(boxes)[0]
    index = tf.where(matched, matches, num_gt)
    gt = tf.gather(tf.concat([boxes, tf.constant([[0.0, 0.0, 1.0, 1.0]])], axis=0), index)
    labels = tf.gather(tf.concat([classes, tf.zeros([1], tf.int32)], axis=0), index)
    loc = tf.where(matched[:, None], encode(gt, anchors, SSD_WEIGHTS), 0.0)
    return loc, labels


def batch_ssd_targets(boxes, classes, anchors, threshold=0.5):
    """ssd_targets over a padded batch: `boxes` [N, G, 4], `classes` [N, G] (-1 rows are padding)
    -> (loc_targets [N, A, 4] float32, labels [N, A] int32)."""
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    num_anchors = anchors.shape[0]
    return tf.map_fn(
        lambda image: ssd_targets(image[0], image[1], anchors, threshold),
        (tf.cast(boxes, tf.float32), tf.cast(classes, tf.int32)),
        fn_output_signature=(tf.TensorSpec([num_anchors, 4], tf.float32), tf.TensorSpec([num_anchors], tf.int32)))
