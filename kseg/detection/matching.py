"""Matching anchors (predictions) to ground-truth boxes, as TensorFlow ops: torchvision
`_utils.Matcher` and `_utils.SSDMatcher` (the SSD paper's matching strategy, Liu et al., ECCV 2016,
section 2.2: each GT's best default box, then every box with IoU above 0.5).

`iou` is [num_gt, num_anchors], torchvision's match_quality_matrix; the result is int32
[num_anchors]: a GT index, or BELOW_LOW_THRESHOLD (-1) / BETWEEN_THRESHOLDS (-2). Ties in an argmax
go to the lowest index, as torch.max(dim) and tf.argmax both do. Zero GT gives all -1 (torchvision's
SSD.forward does so for an image without targets; its Matcher raises instead).
"""

from __future__ import annotations

import tensorflow as tf

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def _with_empty_row(iou):
    """iou with a last row of -inf: max / argmax over GT are defined with zero GT (-inf, index
    num_gt), and the row never wins while a real GT exists."""
    iou = tf.convert_to_tensor(iou, tf.float32)
    pad = tf.fill([1, tf.shape(iou)[1]], tf.constant(-float("inf"), tf.float32))
    return tf.concat([iou, pad], axis=0)


def match(iou, high, low, allow_low_quality=False):
    """torchvision `Matcher(high, low, allow_low_quality)(iou)`: per anchor its best GT (max IoU over
    GT); max < low -> -1, low <= max < high -> -2. With allow_low_quality, each anchor that attains
    some GT's highest IoU (ties included) keeps its own best GT (`all_matches`) whatever its IoU
    (`set_low_quality_matches_`)."""
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    iou = tf.convert_to_tensor(iou, tf.float32)
    padded = _with_empty_row(iou)
    best_val = tf.reduce_max(padded, axis=0)
    best_gt = tf.argmax(padded, axis=0, output_type=tf.int32)
    matches = tf.where(best_val < low, BELOW_LOW_THRESHOLD,
                       tf.where(best_val < high, BETWEEN_THRESHOLDS, best_gt))
    if allow_low_quality:
        best_per_gt = tf.reduce_max(iou, axis=1, keepdims=True)  # [G, 1]; no row for zero GT
        attains = tf.reduce_any(tf.equal(iou, best_per_gt), axis=0)
        matches = tf.where(attains, best_gt, matches)
    return matches


def best_anchor_per_gt(iou):
    """Each GT's highest-IoU anchor [num_gt] int32 (the first on ties)."""
    return tf.argmax(tf.convert_to_tensor(iou, tf.float32), axis=1, output_type=tf.int32)


def ssd_match(iou, threshold=0.5):
    """torchvision `SSDMatcher(threshold)(iou)`: Matcher(threshold, threshold) (IoU >= threshold ->
    its best GT, else -1), then each GT j forced onto its best anchor, `matches[argmax_a iou[j]] = j`;
    on a shared best anchor the later (higher) j wins, as torchvision's CPU index assignment does.
    Realised with a segment max, deterministic (a scatter with duplicate indices is not)."""
    iou = tf.convert_to_tensor(iou, tf.float32)
    matches = match(iou, threshold, threshold, allow_low_quality=False)
    num_gt = tf.shape(iou)[0]
    forced = tf.math.unsorted_segment_max(tf.range(num_gt, dtype=tf.int32), best_anchor_per_gt(iou),
                                          num_segments=tf.shape(iou)[1])  # int32 min where no GT
    return tf.where(forced >= 0, forced, matches)
