"""SSD's MultiBox loss (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, section 2.2
"Training", eq. 1-3) with torchvision's `SSD.compute_loss` semantics (torchvision/models/detection/ssd.py)
and Caffe SSD's MultiBoxLossLayer settings (neg_pos_ratio 3, loc_weight 1, normalization VALID):

    L = (L_loc + L_conf) / N,  N = max(1, positive anchors in the batch)
    L_loc  = sum over positive anchors of SmoothL1 (beta 1) of the 4 predicted vs encoded offsets
    L_conf = sum of the softmax cross-entropy over the positives and the mined negatives

Hard negative mining, per image: the negatives ranked by cross-entropy (against background), the
top 3 * (the image's positives) kept; an image without positives mines none. The count is capped
at the image's negatives, as Caffe's MineHardExamples caps it; torchvision's rank test
`idx.sort(1)[1] < num_negative` instead re-counts positives (ranked last at -inf) once
3 * positives exceeds the negatives, which needs over a quarter of the anchors positive (over
2,183 of SSD300's 8,732) -- the two agree everywhere else.

Keras integration. The model outputs [mbox_loc (N, A, 4), mbox_conf (N, A, C) logits] and Keras
calls one loss per output with that output's targets only, so each term needs the labels: the
targets are

    y = {"mbox_loc": (N, A, 5) = the 4 encoded offsets, then the anchor's label,
         "mbox_conf": (N, A) int labels (0 background)}

(`multibox_y_true(loc_targets, labels)` builds it from targets.ssd_targets). The loc term cannot
take its positives from its own (N, A, 4) offsets: a GT box equal to its anchor encodes to
exactly zero (GT [43.5, 43.5, 256.5, 256.5] at 300x300, VOC priors: anchor 8708, offsets 0, label
kept). `model.compile(loss=MultiBoxLoss())` gives both outputs the same loss, which computes
the loc term for (N, A, 5) targets and the conf term for (N, A) or (N, A, 1) labels; Keras sums
them and reports each (`mbox_loc_loss`, `mbox_conf_loss`).

Distribution. Each replica returns its images' sum divided by the positives of the GLOBAL batch
(all-reduced over the replicas), with Keras reduction "sum", so Keras neither divides by a batch
size nor scales by 1 / replicas (keras.losses.Loss reduce_values does that for
"sum_over_batch_size" only), and the optimizer's all-reduced (summed) gradients equal the one-replica
gradients of the same global batch exactly: the sum of the replica sums over the global N.
"""

from __future__ import annotations

import keras
import tensorflow as tf

TERMS = ("loc", "conf")


def smooth_l1(x):
    """SmoothL1 with beta 1 (Fast R-CNN's; torch `F.smooth_l1_loss`): 0.5 x^2 if |x| < 1, else |x| - 0.5."""
    ax = tf.abs(x)
    return tf.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def loc_loss_sum(loc_pred, loc_targets, labels):
    """Sum of SmoothL1(pred - target) over the 4 offsets of the anchors with label > 0: a scalar."""
    loc_pred = tf.cast(loc_pred, tf.float32)
    positive = (tf.cast(labels, tf.int32) > 0)[..., None]
    diff = tf.where(positive, loc_pred - tf.where(positive, tf.cast(loc_targets, tf.float32), 0.0), 0.0)
    return tf.reduce_sum(smooth_l1(diff))


def mined_negatives(cross_entropy, labels, neg_pos_ratio=3.0):
    """Each image's hard negatives [N, A] bool: among the anchors with label 0, the
    floor(neg_pos_ratio * positives) (at most all of them) of highest cross-entropy; ties by index."""
    labels = tf.cast(labels, tf.int32)
    positive = labels > 0
    num_pos = tf.reduce_sum(tf.cast(positive, tf.int32), axis=1, keepdims=True)
    num_neg = tf.cast(tf.floor(float(neg_pos_ratio) * tf.cast(num_pos, tf.float32)), tf.int32)
    num_neg = tf.minimum(num_neg, tf.shape(labels)[1] - num_pos)
    ranked = tf.where(positive, tf.constant(-float("inf"), cross_entropy.dtype), cross_entropy)
    order = tf.argsort(tf.stop_gradient(ranked), axis=1, direction="DESCENDING", stable=True)
    rank = tf.argsort(order, axis=1, stable=True)  # each anchor's place in `order`
    return (rank < num_neg) & ~positive


def conf_loss_sum(logits, labels, neg_pos_ratio=3.0):
    """Sum of the softmax cross-entropy over the positives (label > 0) and the mined negatives: a scalar.
    `logits` [N, A, C], `labels` [N, A] int."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    keep = (labels > 0) | mined_negatives(ce, labels, neg_pos_ratio)
    return tf.reduce_sum(tf.where(keep, ce, 0.0))


def num_positives(labels):
    """Positive anchors (label > 0) of `labels`, float32 scalar."""
    return tf.reduce_sum(tf.cast(tf.cast(labels, tf.int32) > 0, tf.float32))


def global_num_positives(labels):
    """num_positives summed over the replicas of the current tf.distribute replica context (the
    local count in a one-replica or cross-replica context)."""
    count = tf.stop_gradient(num_positives(labels))
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return count


def multibox_loss(loc_pred, logits, loc_targets, labels, neg_pos_ratio=3.0):
    """(loc, conf) of one batch on one device, each divided by max(1, positives of the batch):
    torchvision SSD.compute_loss's "bbox_regression" and "classification" (see the module's note
    on an over-full image). `loc_targets` [N, A, 4], `labels` [N, A] (targets.batch_ssd_targets)."""
    n = tf.maximum(num_positives(labels), 1.0)
    return loc_loss_sum(loc_pred, loc_targets, labels) / n, conf_loss_sum(logits, labels, neg_pos_ratio) / n


def multibox_y_true(loc_targets, labels):
    """The Keras targets of an SSD model from targets.ssd_targets / batch_ssd_targets: {"mbox_loc":
    [..., A, 5] offsets and the label as float32, "mbox_conf": [..., A] int32 labels}."""
    labels = tf.cast(labels, tf.int32)
    loc = tf.concat([tf.cast(loc_targets, tf.float32), tf.cast(labels, tf.float32)[..., None]], axis=-1)
    return {"mbox_loc": loc, "mbox_conf": labels}


@keras.saving.register_keras_serializable(package="kseg")
class MultiBoxLoss(keras.losses.Loss):
    """SSD's MultiBox loss term of one output (see the module docstring for the targets' layout).

    `term`: "loc" (SmoothL1 over the positives; targets (N, A, 5)), "conf" (cross-entropy over the
    positives and the hard negatives; labels (N, A) or (N, A, 1)), or None: chosen per call from the
    targets' shape, so one instance serves both outputs (`model.compile(loss=MultiBoxLoss())`).
    Each is a sum over the batch divided by max(1, positives of the global batch), Keras reduction
    "sum" (the only one accepted). Summed over the two outputs: torchvision's bbox_regression +
    classification.
    Sample weights are not supported.
    """

    def __init__(self, term=None, neg_pos_ratio=3.0, name="multibox_loss", reduction="sum", dtype=None):
        if term not in (None, *TERMS):
            raise ValueError(f"term must be None or one of {TERMS}, got {term!r}")
        if reduction != "sum":
            raise ValueError(f"MultiBoxLoss normalises by the global batch's positives itself: reduction must be "
                             f"'sum', got {reduction!r}")
        if neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio must be >= 0, got {neg_pos_ratio}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.term = term
        self.neg_pos_ratio = float(neg_pos_ratio)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("MultiBoxLoss does not take sample weights (the SSD loss weighs anchors by mining)")
        return super().__call__(y_true, y_pred)

    def _term_of(self, y_true, y_pred):
        if self.term is not None:
            return self.term
        shape = tuple(y_true.shape)
        if len(shape) == 3 and shape[-1] == 5:
            return "loc"
        if len(shape) == 2 or (len(shape) == 3 and shape[-1] == 1):
            return "conf"
        if len(shape) == 3 and shape[-1] == 4 and y_pred.shape[-1] == 4:
            raise ValueError("MultiBoxLoss: mbox_loc targets must be (N, A, 5), the offsets and the anchor's "
                             "label (multibox_y_true), got (N, A, 4) offsets alone")
        raise ValueError(f"MultiBoxLoss: targets of shape {shape} are neither (N, A, 5) box targets nor (N, A) "
                         f"labels")

    def call(self, y_true, y_pred):
        term = self._term_of(y_true, y_pred)
        y_pred = tf.cast(y_pred, tf.float32)
        if term == "loc":
            if y_pred.shape[-1] != 4 or y_true.shape[-1] != 5:
                raise ValueError(f"MultiBoxLoss loc: predictions (N, A, 4) and targets (N, A, 5) expected, got "
                                 f"{tuple(y_pred.shape)} and {tuple(y_true.shape)}")
            labels = tf.cast(y_true[..., 4], tf.int32)
            total = loc_loss_sum(y_pred, y_true[..., :4], labels)
        else:
            labels = tf.cast(y_true[..., 0] if y_true.shape.rank == 3 else y_true, tf.int32)
            total = conf_loss_sum(y_pred, labels, self.neg_pos_ratio)
        # A scalar: Keras' "sum" reduction passes it through, unscaled by 1 / replicas.
        return total / tf.maximum(global_num_positives(labels), 1.0)

    def get_config(self):
        return {**super().get_config(), "term": self.term, "neg_pos_ratio": self.neg_pos_ratio}


def multibox_losses(neg_pos_ratio=3.0):
    """{"mbox_loc": loc term, "mbox_conf": conf term}: for `model.compile(loss=...)` by output name."""
    return {"mbox_loc": MultiBoxLoss("loc", neg_pos_ratio, name="multibox_loc"),
            "mbox_conf": MultiBoxLoss("conf", neg_pos_ratio, name="multibox_conf")}
