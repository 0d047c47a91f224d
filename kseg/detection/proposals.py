"""Faster R-CNN's region proposals at inference: objectness and box deltas over the anchors ->
a fixed number of proposals per image, padded, with a validity mask.

torchvision `RegionProposalNetwork.filter_proposals` (one feature level), which is
py-faster-rcnn's proposal layer with torchvision's small-box rule (Ren et al., "Faster R-CNN",
NIPS 2015, section 3.3): per image the `pre_nms_top_n` best anchors by objectness logit, their
deltas decoded with weights (1, 1, 1, 1) (dw, dh clamped at log(1000/16)), clipped to the image,
boxes narrower or shorter than `min_size` dropped, sigmoid scores >= `score_threshold` kept, NMS at
`iou_threshold`, the best `post_nms_top_n` kept. The anchors are generated in the graph from the
feature map's size (kseg.detection.anchors.rpn_anchors' order), so any input size works.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kseg.detection.boxes import decode

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def grid_anchors(cell_anchors, feature_hw, image_hw):
    """rpn_anchors in TF: (H*W*A, 4) for a feature map of `feature_hw` over an image of `image_hw`
    (dynamic sizes allowed); the stride per axis is image size // feature size (torchvision)."""
    fh, fw = feature_hw[0], feature_hw[1]
    sy, sx = image_hw[0] // fh, image_hw[1] // fw
    ys = tf.cast(tf.range(fh) * sy, tf.float32)
    xs = tf.cast(tf.range(fw) * sx, tf.float32)
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    gy, gx = tf.reshape(grid_y, [-1]), tf.reshape(grid_x, [-1])
    shifts = tf.stack([gx, gy, gx, gy], axis=1)
    cells = tf.constant(np.asarray(cell_anchors, np.float32))
    return tf.reshape(tf.expand_dims(shifts, 1) + tf.expand_dims(cells, 0), [-1, 4])


def filter_proposals(objectness, deltas, anchors, image_hw, *, pre_nms_top_n=6000, post_nms_top_n=300,
                     iou_threshold=0.7, min_size=1e-3, score_threshold=0.0, nms="combined"):
    """objectness (B, A) logits, deltas (B, A, 4), anchors (A, 4) -> (proposals (B, R, 4) xyxy pixels,
    scores (B, R) sigmoid, mask (B, R) bool), R = post_nms_top_n, best first; padding rows are zeros.
    The proposals carry no gradient (torchvision detaches them).

    nms: "combined" (the whole batch in one `combined_non_max_suppression` with one class, which
    tf2onnx turns into ONNX NonMaxSuppression) or "v5" (per image in a `tf.map_fn`, TFLite's
    builtin NON_MAX_SUPPRESSION_V5); both are greedy NMS keeping the best post_nms_top_n.
    """
    objectness = tf.stop_gradient(tf.cast(objectness, tf.float32))
    deltas = tf.stop_gradient(tf.cast(deltas, tf.float32))
    height, width = tf.cast(image_hw[0], tf.float32), tf.cast(image_hw[1], tf.float32)
    k = tf.minimum(tf.constant(int(pre_nms_top_n)), tf.shape(objectness)[1])
    post = int(post_nms_top_n)
    top, at = tf.math.top_k(objectness, k=k, sorted=True)  # (B, k)
    boxes = decode(tf.gather(deltas, at, batch_dims=1), tf.gather(anchors, at), RPN_WEIGHTS)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    x1, x2 = tf.clip_by_value(x1, 0.0, width), tf.clip_by_value(x2, 0.0, width)
    y1, y2 = tf.clip_by_value(y1, 0.0, height), tf.clip_by_value(y2, 0.0, height)
    boxes = tf.stack([x1, y1, x2, y2], axis=-1)
    scores = tf.sigmoid(top)
    keep = ((x2 - x1) >= min_size) & ((y2 - y1) >= min_size) & (scores >= score_threshold)
    # Dropped boxes get a score below any kept one and below NMS's threshold.
    scores = tf.where(keep, scores, -1.0)
    if nms in ("combined", "offset"):  # one class: the offset trick is the combined NMS
        found = tf.image.combined_non_max_suppression(
            tf.expand_dims(boxes, 2), tf.expand_dims(scores, 2), max_output_size_per_class=post,
            max_total_size=post, iou_threshold=iou_threshold, score_threshold=-0.5, pad_per_class=False,
            clip_boxes=False)
        valid = tf.expand_dims(tf.range(post), 0) < tf.expand_dims(tf.cast(found.valid_detections, tf.int32), 1)
        return (tf.where(tf.expand_dims(valid, -1), found.nmsed_boxes, 0.0), tf.where(valid, found.nmsed_scores, 0.0),
                valid)
    if nms != "v5":
        raise ValueError(f"proposal NMS must be 'combined', 'offset' or 'v5', got {nms!r}")

    def one_image(args):
        image_boxes, image_scores = args
        index, kept, count = tf.raw_ops.NonMaxSuppressionV5(
            boxes=image_boxes, scores=image_scores, max_output_size=post, iou_threshold=iou_threshold,
            score_threshold=-0.5, soft_nms_sigma=0.0, pad_to_max_output_size=True)
        valid = tf.range(post) < count
        return (tf.where(tf.expand_dims(valid, 1), tf.gather(image_boxes, index), 0.0), tf.where(valid, kept, 0.0),
                valid)

    return tf.map_fn(one_image, (boxes, scores), fn_output_signature=(
        tf.TensorSpec([post, 4], tf.float32), tf.TensorSpec([post], tf.float32), tf.TensorSpec([post], tf.bool)))


@keras.saving.register_keras_serializable(package="kseg")
class ProposalLayer(keras.layers.Layer):
    """[objectness (B, A) logits, deltas (B, A, 4), features (B, h, w, C), image (B, H, W, c)] ->
    [proposals (B, R, 4), proposal_mask (B, R)]: filter_proposals over the anchors of the feature
    map's grid (cell_anchors: kseg.detection.anchors.rpn_cell_anchors)."""

    def __init__(self, cell_anchors, pre_nms_top_n=6000, post_nms_top_n=300, iou_threshold=0.7, min_size=1e-3,
                 score_threshold=0.0, nms="combined", **kwargs):
        super().__init__(**kwargs)
        self.cell_anchors = np.asarray(cell_anchors, np.float32).tolist()
        self.pre_nms_top_n = int(pre_nms_top_n)
        self.post_nms_top_n = int(post_nms_top_n)
        self.iou_threshold = float(iou_threshold)
        self.min_size = float(min_size)
        self.score_threshold = float(score_threshold)
        self.nms = nms  # TFLite exports trace it with "v5" (see filter_proposals)

    def call(self, inputs):
        objectness, deltas, features, image = inputs
        image_hw = tf.shape(image)[1:3]
        anchors = grid_anchors(self.cell_anchors, tf.shape(features)[1:3], image_hw)
        proposals, _, mask = filter_proposals(
            objectness, deltas, anchors, image_hw, pre_nms_top_n=self.pre_nms_top_n,
            post_nms_top_n=self.post_nms_top_n, iou_threshold=self.iou_threshold, min_size=self.min_size,
            score_threshold=self.score_threshold, nms=self.nms)
        return [proposals, mask]

    def compute_output_spec(self, inputs):
        batch = inputs[0].shape[0]
        return [keras.KerasTensor((batch, self.post_nms_top_n, 4), "float32"),
                keras.KerasTensor((batch, self.post_nms_top_n), "bool")]

    def get_config(self):
        return {**super().get_config(), "cell_anchors": self.cell_anchors, "pre_nms_top_n": self.pre_nms_top_n,
                "post_nms_top_n": self.post_nms_top_n, "iou_threshold": self.iou_threshold,
                "min_size": self.min_size, "score_threshold": self.score_threshold, "nms": self.nms}


@keras.saving.register_keras_serializable(package="kseg")
class ProposalRoIs(keras.layers.Layer):
    """proposals (B, R, 4) -> RoIs (B*R, 5) = (image index, x1, y1, x2, y2), image-major, for the
    RoI pooling layers (padding rows included: their features are computed and masked later)."""

    def call(self, proposals):
        shape = tf.shape(proposals)
        index = tf.repeat(tf.range(shape[0]), shape[1])
        return tf.concat([tf.expand_dims(tf.cast(index, tf.float32), 1), tf.reshape(proposals, [-1, 4])], axis=1)

    def compute_output_shape(self, input_shape):
        b, r = input_shape[0], input_shape[1]
        return (None if b is None or r is None else b * r, 5)


@keras.saving.register_keras_serializable(package="kseg")
class PerImage(keras.layers.Layer):
    """(B*R, ...) rows -> (B, R, ...): the head's per-RoI outputs back per image."""

    def __init__(self, rows, **kwargs):
        super().__init__(**kwargs)
        self.rows = int(rows)

    def call(self, x):
        return tf.reshape(x, tf.concat([[-1, self.rows], tf.shape(x)[1:]], axis=0))

    def compute_output_shape(self, input_shape):
        return (None, self.rows, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "rows": self.rows}


@keras.saving.register_keras_serializable(package="kseg")
class SoftmaxObjectness(keras.layers.Layer):
    """The paper's 2-way RPN scores (B, N, 2) = (background, object) -> one logit per anchor,
    object - background: its sigmoid is the softmax's object probability (torchvision's form)."""

    def call(self, scores):
        background, foreground = tf.unstack(scores, 2, axis=-1)  # no ellipsis slice: TFLite builtins
        return foreground - background

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])


@keras.saving.register_keras_serializable(package="kseg")
class BackgroundColumns(keras.layers.Layer):
    """(N, k (C - 1)) -> (N, k C): `count` zero columns first, the background's place in kseg's
    per-class outputs (R-CNN scores and regresses foreground classes only)."""

    def __init__(self, count, **kwargs):
        super().__init__(**kwargs)
        self.count = int(count)

    def call(self, x):
        return tf.concat([tf.zeros_like(x[:, : self.count]), x], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None if input_shape[1] is None else input_shape[1] + self.count)

    def get_config(self):
        return {**super().get_config(), "count": self.count}
