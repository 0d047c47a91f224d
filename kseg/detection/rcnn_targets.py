"""Faster R-CNN's training targets and losses, batched TensorFlow ops (Ren, He, Girshick, Sun, "Faster
R-CNN", NIPS 2015, sections 3.1.2 "Loss Function" and 3.3 "Implementation Details"; Girshick, "Fast
R-CNN", ICCV 2015, section 2.3 "Fine-tuning for detection").

Reference implementations: torchvision models/detection rpn.py (`RegionProposalNetwork.assign_targets_to_anchors`,
`compute_loss`), roi_heads.py (`select_training_samples`, `fastrcnn_loss`), _utils.py (`Matcher`,
`BalancedPositiveNegativeSampler`); py-faster-rcnn lib/rpn/anchor_target_layer.py and
proposal_target_layer.py. Every function takes a whole padded batch: ground truth (B, M, 4) xyxy
pixels with classes (B, M), padding rows class -1 (kseg's detection readers pad so).

Anchor labels: 1 (object), 0 (background), -1 (ignored). An anchor is an object at IoU >= fg_iou
with some GT, or when it attains a GT's highest IoU (the paper's rule (i), torchvision's
`allow_low_quality_matches`; a GT that overlaps no anchor at all claims none, where both references
would claim every anchor at IoU 0); background below bg_iou; ignored in between and, with
`allowed_border` (py-faster-rcnn: 0), when it crosses the image border by more than that
(the paper ignores cross-boundary anchors in training, section 3.3).

Sampling (torchvision BalancedPositiveNegativeSampler): per image at most batch * fraction
positives at random, then negatives up to the batch. Random choice is a top-k of uniform keys, one
key per candidate, so a batch needs no per-image loop.
"""

from __future__ import annotations

import tensorflow as tf

from kseg.detection.boxes import encode

HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision RoIHeads' BoxCoder; py-faster-rcnn BBOX_NORMALIZE_STDS 0.1, 0.2
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def batch_iou(a, b):
    """IoU (B, N, M) of boxes a (B, N, 4) and b (B, M, 4), xyxy, no +1; 0 where both are empty."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    lt = tf.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = tf.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    wh = tf.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return tf.math.divide_no_nan(inter, area_a[:, :, None] + area_b[:, None, :] - inter)


def _best_gt(iou, gt_valid):
    """(best IoU (B, N), its GT index (B, N)) over the valid GT; 0 and index 0 where an image has none."""
    iou = tf.where(gt_valid[:, None, :], iou, -1.0)
    best = tf.reduce_max(iou, axis=2)
    return tf.maximum(best, 0.0), tf.argmax(iou, axis=2, output_type=tf.int32)


def anchor_labels(anchors, gt_boxes, gt_classes, image_hw, *, fg_iou=0.7, bg_iou=0.3, allowed_border=None):
    """RPN targets: (labels (B, A) int32 in {1, 0, -1}, matched GT boxes (B, A, 4)).

    anchors (A, 4) xyxy pixels; gt_boxes (B, M, 4), gt_classes (B, M) (< 0: padding); image_hw the
    (padded) input size, for allowed_border (None: every anchor takes part, torchvision)."""
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = gt_classes >= 0
    batch = tf.shape(gt_boxes)[0]
    tiled = tf.tile(tf.expand_dims(anchors, 0), [batch, 1, 1])
    iou = batch_iou(tiled, gt_boxes)  # (B, A, M)
    inside = tf.ones(tf.shape(anchors)[:1], tf.bool)
    if allowed_border is not None:
        h, w = tf.cast(image_hw[0], tf.float32), tf.cast(image_hw[1], tf.float32)
        border = float(allowed_border)
        inside = ((anchors[:, 0] >= -border) & (anchors[:, 1] >= -border) & (anchors[:, 2] < w + border)
                  & (anchors[:, 3] < h + border))
        iou = tf.where(inside[None, :, None], iou, -1.0)
    best, index = _best_gt(iou, gt_valid)
    labels = tf.where(best >= fg_iou, 1, tf.where(best < bg_iou, 0, -1))
    # Rule (i): the anchors with a GT's highest IoU (ties included), for GT that overlap some anchor.
    best_per_gt = tf.reduce_max(tf.where(gt_valid[:, None, :], iou, -1.0), axis=1, keepdims=True)  # (B, 1, M)
    attains = tf.reduce_any((iou == best_per_gt) & (best_per_gt > 0.0) & gt_valid[:, None, :], axis=2)
    labels = tf.where(attains, 1, labels)
    labels = tf.where(inside[None, :], labels, -1)
    return tf.cast(labels, tf.int32), tf.gather(gt_boxes, index, batch_dims=1)


def _choose(candidates, count, keys, k_max):
    """Per row, `count` (B,) of the `candidates` (B, N) bool with the largest keys: a (B, N) bool."""
    k = tf.minimum(tf.constant(int(k_max)), tf.shape(keys)[1])
    top = tf.math.top_k(tf.where(candidates, keys, -1.0), k=k, sorted=True).values  # (B, k)
    at = tf.clip_by_value(count - 1, 0, tf.maximum(k - 1, 0))
    threshold = tf.gather(top, at, batch_dims=1)
    return candidates & (keys >= threshold[:, None]) & (count > 0)[:, None]


def sample(labels, batch_size, positive_fraction, seed):
    """(positive, negative) (B, N) bool: per row at most int(batch_size * positive_fraction) of the
    labels == 1 and then batch_size minus those of the labels == 0, each at random (`seed`: a
    keras.random seed or SeedGenerator)."""
    import keras

    positive, negative = labels == 1, labels == 0
    cap = int(batch_size * positive_fraction)
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), cap)
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=1), int(batch_size) - num_pos)
    keys = keras.random.uniform(tf.shape(labels), seed=seed)
    return _choose(positive, num_pos, keys, cap), _choose(negative, num_neg, keys, batch_size)


def roi_targets(proposals, proposal_mask, gt_boxes, gt_classes, seed, *, batch_size=128, fg_fraction=0.25,
                fg_iou=0.5, bg_iou=(0.1, 0.5)):
    """Fast R-CNN's RoI sampling with the GT boxes appended to the proposals (torchvision
    `add_gt_proposals`, py-faster-rcnn proposal_target_layer): candidates at IoU >= fg_iou are
    foreground (their GT's class), at bg_iou[0] <= IoU < bg_iou[1] background; per image up to
    batch_size * fg_fraction foreground, the rest background, at random.

    Returns (rois (B, S, 4), labels (B, S) int32 (0 background), regression targets (B, S, 4) with
    weights (10, 10, 5, 5), valid (B, S) bool), S = batch_size (padding rows: valid False, zeros),
    sampled rows first. No gradient flows into the proposals."""
    proposals = tf.stop_gradient(tf.cast(proposals, tf.float32))
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = gt_classes >= 0
    candidates = tf.concat([proposals, gt_boxes], axis=1)
    usable = tf.concat([tf.cast(proposal_mask, tf.bool), gt_valid], axis=1)
    if candidates.shape[1] is None:  # fewer candidates than batch_size: unusable zero rows up to it
        shape = tf.shape(candidates)
        short = tf.maximum(int(batch_size) - shape[1], 0)
        candidates = tf.concat([candidates, tf.zeros(tf.stack([shape[0], short, 4]))], axis=1)
        usable = tf.concat([usable, tf.zeros(tf.stack([shape[0], short]), tf.bool)], axis=1)
    best, index = _best_gt(batch_iou(candidates, gt_boxes), gt_valid)
    foreground = usable & (best >= fg_iou)
    background = usable & (best < bg_iou[1]) & (best >= bg_iou[0])
    size = min(int(batch_size), int(candidates.shape[1])) if candidates.shape[1] is not None else int(batch_size)
    fg, bg = sample(tf.where(foreground, 1, tf.where(background, 0, -1)), size, fg_fraction, seed)
    chosen = fg | bg
    # The chosen rows first (foreground, then background), each image's padding after them.
    order = tf.math.top_k(tf.cast(fg, tf.float32) * 2.0 + tf.cast(chosen, tf.float32), k=size, sorted=True).indices
    valid = tf.gather(chosen, order, batch_dims=1)
    rois = tf.where(valid[..., None], tf.gather(candidates, order, batch_dims=1), 0.0)
    gt_index = tf.gather(index, order, batch_dims=1)
    classes = tf.gather(tf.cast(gt_classes, tf.int32), gt_index, batch_dims=1)
    labels = tf.where(tf.gather(fg, order, batch_dims=1), classes, 0)
    targets = encode(tf.gather(gt_boxes, gt_index, batch_dims=1), rois, HEAD_WEIGHTS)
    targets = tf.where(tf.gather(fg, order, batch_dims=1)[..., None], targets, 0.0)
    return tf.stop_gradient(rois), labels, tf.stop_gradient(targets), valid


def smooth_l1(x, beta):
    """torch `F.smooth_l1_loss(reduction="none")`: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta
    (py-faster-rcnn's sigma: beta = 1 / sigma^2)."""
    ax = tf.abs(x)
    return tf.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def rpn_losses(objectness, deltas, anchors, labels, matched, positive, negative, *, beta=1.0 / 9):
    """(objectness loss, box loss) of the RPN over the sampled anchors of the batch.

    objectness (B, A) logits (sigmoid head) or (B, A, 2) (background, object) scores (the paper's
    softmax head); deltas (B, A, 4); labels/matched from anchor_labels; positive/negative from
    sample. Classification: the mean cross-entropy over the sampled anchors; boxes: SmoothL1 over
    the positives' deltas against their GT encoded with weights (1, 1, 1, 1), summed and divided by
    the number sampled (torchvision rpn.compute_loss; py-faster-rcnn rpn_loss_bbox, sigma 3)."""
    sampled = positive | negative
    count = tf.maximum(tf.reduce_sum(tf.cast(sampled, tf.float32)), 1.0)
    target = tf.cast(positive, tf.int32)
    objectness = tf.cast(objectness, tf.float32)
    if objectness.shape.rank == 3:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=objectness)
    else:
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(target, tf.float32), logits=objectness)
    cls = tf.reduce_sum(tf.where(sampled, ce, 0.0)) / count
    goal = encode(matched, anchors[None], RPN_WEIGHTS)
    goal = tf.where(positive[..., None], goal, 0.0)
    diff = tf.where(positive[..., None], tf.cast(deltas, tf.float32) - goal, 0.0)
    return cls, tf.reduce_sum(smooth_l1(diff, beta)) / count


def head_losses(class_logits, box_regression, labels, targets, valid, *, beta=1.0):
    """(classification loss, box loss) of the Fast R-CNN head over the sampled RoIs.

    class_logits (N, C), box_regression (N, 4C), labels (N,), targets (N, 4), valid (N,) (flattened
    over the batch). The mean softmax cross-entropy over the valid RoIs; SmoothL1 on the foreground
    RoIs' deltas of their GT class, summed and divided by the valid count (torchvision
    fastrcnn_loss with beta 1/9; Fast R-CNN eq. 1-3 and py-faster-rcnn: beta 1)."""
    count = tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float32)), 1.0)
    class_logits = tf.cast(class_logits, tf.float32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=class_logits)
    cls = tf.reduce_sum(tf.where(valid, ce, 0.0)) / count
    num_classes = tf.shape(class_logits)[1]
    per_class = tf.reshape(tf.cast(box_regression, tf.float32), [-1, num_classes, 4])
    own = tf.gather(per_class, tf.maximum(labels, 0), batch_dims=1)
    foreground = valid & (labels > 0)
    diff = tf.where(foreground[:, None], own - targets, 0.0)
    return cls, tf.reduce_sum(smooth_l1(diff, beta)) / count
