"""Boxes: the box coder (encode / decode of regression deltas), IoU and clipping, as TensorFlow ops.

Boxes are xyxy float32 in absolute pixels of the network input, with widths `x2 - x1` (no Caffe +1):
torchvision's convention (torchvision/ops/boxes.py, torchvision/models/detection/_utils.py).
"""

from __future__ import annotations

import math

import tensorflow as tf

# SSD's variances (0.1, 0.1, 0.2, 0.2) as torchvision's BoxCoder weights, their inverses: Liu et al.,
# "SSD: Single Shot MultiBox Detector" (ECCV 2016); Caffe SSD's prior_variance; torchvision ssd.py.
SSD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

# torchvision BoxCoder's bbox_xform_clip: the largest log-scale step exp() gets (x62.5).
DEFAULT_CLIP = math.log(1000.0 / 16)


def _centre_size(boxes):
    """xyxy [..., 4] -> (cx, cy, w, h), each [...], in torchvision's operation order."""
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    w = x2 - x1
    h = y2 - y1
    return x1 + 0.5 * w, y1 + 0.5 * h, w, h


def encode(gt, ref, weights=SSD_WEIGHTS):
    """Regression targets (dx, dy, dw, dh) [..., 4] of boxes `gt` relative to reference boxes `ref`.

    dx = wx * (gcx - cx) / w, dy = wy * (gcy - cy) / h, dw = ww * log(gw / w), dh = wh * log(gh / h):
    torchvision `_utils.BoxCoder.encode_single(reference_boxes=gt, proposals=ref)` (`encode_boxes`).
    `gt` and `ref` broadcast against each other.
    """
    wx, wy, ww, wh = weights
    gt = tf.convert_to_tensor(gt, tf.float32)
    ref = tf.convert_to_tensor(ref, tf.float32)
    ex_cx, ex_cy, ex_w, ex_h = _centre_size(ref)
    gt_cx, gt_cy, gt_w, gt_h = _centre_size(gt)
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * tf.math.log(gt_w / ex_w)
    dh = wh * tf.math.log(gt_h / ex_h)
    return tf.stack([dx, dy, dw, dh], axis=-1)


def decode(deltas, ref, weights=SSD_WEIGHTS, clip=DEFAULT_CLIP):
    """Boxes xyxy [..., 4] from regression `deltas` [..., 4] relative to reference boxes `ref`.

    The deltas are divided by `weights`, dw and dh clamped at `clip` (above only) before exp():
    torchvision `_utils.BoxCoder.decode_single`, in its operation order. `deltas` and `ref` broadcast.
    """
    wx, wy, ww, wh = weights
    deltas = tf.convert_to_tensor(deltas, tf.float32)
    ref = tf.convert_to_tensor(ref, tf.float32)
    ctr_x, ctr_y, widths, heights = _centre_size(ref)
    dx, dy, dw, dh = tf.unstack(deltas, axis=-1)
    dx = dx / wx
    dy = dy / wy
    dw = tf.minimum(dw / ww, clip)
    dh = tf.minimum(dh / wh, clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = tf.exp(dw) * widths
    pred_h = tf.exp(dh) * heights
    return tf.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                     pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], axis=-1)


def box_area(boxes):
    """(x2 - x1) * (y2 - y1) of xyxy boxes [..., 4]: torchvision `ops.box_area`."""
    x1, y1, x2, y2 = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), axis=-1)
    return (x2 - x1) * (y2 - y1)


def box_iou(a, b):
    """Pairwise IoU [N, M] of xyxy boxes a [N, 4] and b [M, 4]: torchvision `ops.box_iou`
    (inter / (area(a) + area(b) - inter), no +1), except that 0 / 0 (two empty boxes) gives 0, not NaN."""
    a = tf.convert_to_tensor(a, tf.float32)
    b = tf.convert_to_tensor(b, tf.float32)
    lt = tf.maximum(a[:, None, :2], b[None, :, :2])
    rb = tf.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = tf.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return tf.math.divide_no_nan(inter, union)


def clip_boxes(boxes, height, width):
    """xyxy boxes [..., 4] with x clamped to [0, width], y to [0, height]: torchvision
    `ops.clip_boxes_to_image`."""
    x1, y1, x2, y2 = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), axis=-1)
    width = tf.cast(width, tf.float32)
    height = tf.cast(height, tf.float32)
    return tf.stack([tf.clip_by_value(x1, 0.0, width), tf.clip_by_value(y1, 0.0, height),
                     tf.clip_by_value(x2, 0.0, width), tf.clip_by_value(y2, 0.0, height)], axis=-1)
