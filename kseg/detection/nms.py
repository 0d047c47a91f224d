"""Export-friendly, batched, per-class NMS with fixed-size (padded) outputs.

The semantics are torchvision SSD's (`SSD.postprocess_detections`): per class, the scores above a
threshold, the class's top_k of those, greedy NMS (`ops.batched_nms`: a box is suppressed by a kept
one of its class with IoU > iou_threshold, kept at IoU == iou_threshold), and the highest
max_detections over all classes, by score descending. Caffe SSD's DetectionOutput layer (confidence
threshold, nms top_k, keep_top_k) does the same. Two realisations with static output shapes and a
dynamic batch, selecting the same detections:

- "combined": `tf.math.top_k` and `tf.image.combined_non_max_suppression` with boxes shared by the
  classes. Fast in TF; tf2onnx turns it into ONNX `NonMaxSuppression` + `TopK`. TFLite has no
  builtin for it (it would need the Flex delegate, which the TFLite wheels do not link).
- "v5": per image (`tf.map_fn`, a TFLite WHILE) and per class (unrolled), the class's top_k then
  `NonMaxSuppressionV5` (TFLite's builtin NON_MAX_SUPPRESSION_V5), then the best max_detections
  of all classes. Builtin ops only, for TFLite. tf2onnx cannot run a `tf.map_fn` loop in ONNX
  Runtime, so ONNX exports use "offset".
- "offset": "combined" for boxes shared by the classes; per-class boxes (which tf2onnx's
  CombinedNonMaxSuppression handler refuses) are moved apart per class by class x (largest
  coordinate + 1), torchvision `batched_nms`'s coordinate trick, and go through one combined NMS
  with a single class. The boxes come back from the offsets within float32 rounding of the
  offset (2e-3 px for 20 classes at 1,000 px).
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


METHODS = ("combined", "v5", "offset")


def batched_class_nms(boxes, scores, *, top_k=400, iou_threshold=0.45, score_threshold=0.01,
                      max_detections=200, method="combined"):
    """Per-class NMS of boxes [B, A, 4] (shared by all classes, SSD) or [B, A, C, 4] (one box per
    class, Fast R-CNN's head) scored by scores [B, A, C] >= 0.

    Returns (boxes [B, K, 4], scores [B, K], classes [B, K] int32 column indices 0..C-1 with -1
    for padding, num_detections [B] int32), K = max_detections, sorted by score descending; padding
    rows hold zeros. Per class only scores > score_threshold among its top_k count (torchvision's
    `score > score_thresh` then `topk`); each class keeps at most top_k after NMS.

    combined_non_max_suppression runs with clip_boxes=False: True would clamp the pixel boxes to [0, 1].
    Its IoU is symmetric in x and y, so xyxy boxes serve for its [y1, x1, y2, x2]. method: see the
    module docstring.
    """
    if score_threshold < 0:
        raise ValueError(f"score_threshold must be >= 0 (scores below top_k are masked to 0), got {score_threshold}")
    if method not in METHODS:
        raise ValueError(f"NMS method must be one of {METHODS}, got {method!r}")
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    if method == "v5":
        return _class_nms_v5(boxes, tf.convert_to_tensor(scores, tf.float32), top_k=top_k,
                             iou_threshold=iou_threshold, score_threshold=score_threshold,
                             max_detections=max_detections)
    if method == "offset" and boxes.shape.rank == 4:
        return _class_nms_offset(boxes, tf.convert_to_tensor(scores, tf.float32), top_k=top_k,
                                 iou_threshold=iou_threshold, score_threshold=score_threshold,
                                 max_detections=max_detections)
    masked = per_class_top_k(scores, top_k)
    found = tf.image.combined_non_max_suppression(
        boxes if boxes.shape.rank == 4 else boxes[:, :, None, :], masked, max_output_size_per_class=top_k,
        max_total_size=max_detections, iou_threshold=iou_threshold, score_threshold=score_threshold,
        pad_per_class=False, clip_boxes=False)
    num = tf.cast(found.valid_detections, tf.int32)
    valid = padding_mask(num, max_detections)
    classes = tf.where(valid, tf.cast(found.nmsed_classes, tf.int32), -1)
    return found.nmsed_boxes, found.nmsed_scores, classes, num


def _class_nms_v5(boxes, scores, *, top_k, iou_threshold, score_threshold, max_detections):
    """batched_class_nms with NonMaxSuppressionV5 per image and class (needs a static class count)."""
    num_classes, num_boxes = scores.shape[-1], boxes.shape[1]
    per_class = boxes.shape.rank == 4
    if num_classes is None or num_boxes is None:
        raise ValueError(f"the v5 NMS needs static box and class counts, got boxes {boxes.shape}, "
                         f"scores {scores.shape}")
    k = min(int(top_k), int(num_boxes))
    keep = min(int(max_detections), 2 * k * num_classes)

    def one_image(args):
        image_boxes, image_scores = args
        found_scores, found_boxes, found_classes = [], [], []
        for c in range(num_classes):
            top, at = tf.math.top_k(image_scores[:, c], k=k, sorted=True)
            candidates = tf.gather(image_boxes[:, c] if per_class else image_boxes, at)
            # A box of zero area has IoU 0 with every box (TF's and torchvision's NMS): it neither
            # suppresses nor is suppressed. TFLite's NON_MAX_SUPPRESSION_V5 would select it again
            # and again (its IoU with itself is 0 too), so such boxes bypass the op.
            flat = (candidates[:, 2] - candidates[:, 0]) * (candidates[:, 3] - candidates[:, 1]) <= 0.0
            index, kept_scores, count = tf.raw_ops.NonMaxSuppressionV5(
                boxes=candidates, scores=tf.where(flat, 0.0, top), max_output_size=k, iou_threshold=iou_threshold,
                score_threshold=score_threshold, soft_nms_sigma=0.0, pad_to_max_output_size=True)
            # Strictly above score_threshold, suppressed at IoU > iou_threshold: torchvision's rules.
            found_scores += [tf.where(tf.range(k) < count, kept_scores, -1.0),  # padding sorts last
                             tf.where(flat & (top > score_threshold), top, -1.0)]
            found_boxes += [tf.gather(candidates, index), candidates]
            found_classes.append(tf.fill([2 * k], c))
        best, at = tf.math.top_k(tf.concat(found_scores, 0), k=keep, sorted=True)
        num = tf.reduce_sum(tf.cast(best >= 0.0, tf.int32))
        valid = tf.range(keep) < num
        pad = [[0, max_detections - keep]]
        return (tf.pad(tf.where(valid[:, None], tf.gather(tf.concat(found_boxes, 0), at), 0.0), pad + [[0, 0]]),
                tf.pad(tf.where(valid, best, 0.0), pad),
                tf.pad(tf.where(valid, tf.gather(tf.concat(found_classes, 0), at), -1), pad, constant_values=-1),
                num)

    return tf.map_fn(one_image, (boxes, scores), fn_output_signature=(
        tf.TensorSpec([max_detections, 4], tf.float32), tf.TensorSpec([max_detections], tf.float32),
        tf.TensorSpec([max_detections], tf.int32), tf.TensorSpec([], tf.int32)))


def _class_nms_offset(boxes, scores, *, top_k, iou_threshold, score_threshold, max_detections):
    """batched_class_nms of per-class boxes [B, A, C, 4] with the coordinate-offset trick (one NMS)."""
    num_classes = scores.shape[-1]
    masked = per_class_top_k(scores, top_k)
    shape = tf.shape(boxes)
    step = tf.reduce_max(boxes) + 1.0  # boxes are clipped to the image: >= 0
    offsets = tf.reshape(tf.range(num_classes, dtype=tf.float32), [1, 1, -1, 1]) * step
    flat = tf.reshape(boxes + offsets, tf.stack([shape[0], -1, 1, 4]))
    found = tf.image.combined_non_max_suppression(
        flat, tf.reshape(masked, tf.stack([shape[0], -1, 1])), max_output_size_per_class=max_detections,
        max_total_size=max_detections, iou_threshold=iou_threshold, score_threshold=score_threshold,
        pad_per_class=False, clip_boxes=False)
    num = tf.cast(found.valid_detections, tf.int32)
    valid = padding_mask(num, max_detections)
    x1 = tf.unstack(found.nmsed_boxes, axis=-1)[0]
    classes = tf.cast(tf.floor(x1 / step), tf.int32)
    back = found.nmsed_boxes - tf.expand_dims(tf.cast(classes, tf.float32) * step, -1)
    return (tf.where(tf.expand_dims(valid, -1), back, 0.0), found.nmsed_scores, tf.where(valid, classes, -1), num)
