"""Losses for dense prediction: plain `keras.losses.Loss` subclasses, registered serializable.

- `SparseCrossEntropy`: softmax cross-entropy from logits against integer labels [B, H, W, 1]
  (or [B, H, W]), pixels labelled `ignore_class` (255) contribute nothing, optional per-class
  weights (Keras' `class_weight` does not support 4-D targets). Reduction: the weighted mean
  over the non-ignored pixels of the batch, sum(w_y * ce) / sum(w_y) -- torch's
  `CrossEntropyLoss(weight=..., ignore_index=255)`; without weights this equals
  `keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)`.
- `SparseFocalLoss`: Lin et al. 2017's focal loss, -(1 - p_t)^gamma log p_t, same labels,
  ignore and weights (alpha per class), same reduction.
- `BalancedSigmoidCrossEntropy`: HED's class-balanced sigmoid cross-entropy (Xie & Tu 2015,
  eq. 2): per image beta = |Y-| / |Y|, loss = -beta sum_{Y+} log s(x) - (1 - beta) sum_{Y-}
  log(1 - s(x)). Compile HED with one instance per output (`hed_losses()`): Keras then sums
  the losses of the five side outputs and the fuse, as the paper's objective does.

DeepLab trains against labels downsampled to the stride-8 logits (the released prototxt
shrinks the label map with nearest-neighbour "Interp" by 8 instead of upsampling the scores).
kseg does this in the loss (and the metric), not in the dataset: `resize_labels=True` resizes
the labels (nearest, align-corners, DeepLab's geometry: stride-8 logit i sits on pixel 8i)
to the logits' size when they differ. Train the stride-8 logits with `stride8_model(model)`,
a plain Keras view sharing the weights of a `return_stride8=True` or default DeepLab model.
A dataset map could not know the network's output size; the loss sees it.
"""

from __future__ import annotations

import keras
import tensorflow as tf

IGNORE_LABEL = 255


def resize_labels_nearest(labels, size):
    """Integer labels [B, H, W, 1] -> [B, h, w, 1] by nearest neighbour with align-corners geometry.

    Output pixel i takes input pixel round(i * (H - 1) / (h - 1)): for DeepLab's 8k+1 sizes
    (321 -> 41) that is pixel 8i, exactly the centre of stride-8 logit i.
    """
    labels = tf.convert_to_tensor(labels)
    out = []
    for axis, n_out in zip((1, 2), size):
        n_in = tf.shape(labels)[axis]
        scale = tf.cast(n_in - 1, tf.float32) / tf.cast(tf.maximum(n_out - 1, 1), tf.float32)
        idx = tf.cast(tf.round(tf.range(n_out, dtype=tf.float32) * scale), tf.int32)
        labels = tf.gather(labels, tf.minimum(idx, n_in - 1), axis=axis)
        out.append(n_out)
    return labels


def _prepare(y_true, y_pred, resize_labels, ignore_class):
    """Labels int32 [B, H, W] matching the logits' spatial size, and the valid-pixel mask."""
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == y_pred.shape.rank:
        y_true = y_true[..., 0]
    y_true = tf.cast(y_true, tf.int32)
    if resize_labels:
        pred_hw = tf.shape(y_pred)[1:3]
        y_true = tf.cond(
            tf.reduce_all(tf.shape(y_true)[1:3] == pred_hw),
            lambda: y_true,
            lambda: resize_labels_nearest(y_true[..., None], (pred_hw[0], pred_hw[1]))[..., 0],
        )
    valid = tf.ones_like(y_true, tf.bool) if ignore_class is None else tf.not_equal(y_true, ignore_class)
    return tf.where(valid, y_true, 0), valid


def _class_weights(class_weights, labels, dtype):
    if class_weights is None:
        return tf.ones_like(labels, dtype)
    return tf.gather(tf.constant(class_weights, dtype), labels)


class _SparseSegmentationLoss(keras.losses.Loss):
    def __init__(self, ignore_class=IGNORE_LABEL, class_weights=None, resize_labels=False, name=None,
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_class = ignore_class
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.resize_labels = bool(resize_labels)

    def _pixel_losses(self, labels, logits):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        # Softmax and the loss in float32 whatever the compute dtype (mixed precision).
        logits = tf.cast(y_pred, tf.float32)
        labels, valid = _prepare(y_true, logits, self.resize_labels, self.ignore_class)
        if self.class_weights is not None:
            num_classes = logits.shape[-1]
            if num_classes is not None and len(self.class_weights) != num_classes:
                raise ValueError(
                    f"{self.name}: class_weights has {len(self.class_weights)} entries, the logits have "
                    f"{num_classes} classes"
                )
        weights = _class_weights(self.class_weights, labels, tf.float32) * tf.cast(valid, tf.float32)
        losses = self._pixel_losses(labels, logits)
        mean = tf.math.divide_no_nan(tf.reduce_sum(weights * losses), tf.reduce_sum(weights))
        # Shape [1], not a scalar: Keras' reduction passes scalars through untouched, skipping its
        # 1 / num_replicas scaling under tf.distribute (the gradients would be summed N times).
        return tf.reshape(mean, [1])

    def get_config(self):
        config = super().get_config()
        config.update(ignore_class=self.ignore_class, class_weights=self.class_weights,
                      resize_labels=self.resize_labels)
        return config


@keras.saving.register_keras_serializable(package="kseg")
class SparseCrossEntropy(_SparseSegmentationLoss):
    """Softmax cross-entropy from logits, ignoring `ignore_class`, with optional per-class weights."""

    def __init__(self, ignore_class=IGNORE_LABEL, class_weights=None, resize_labels=False,
                 name="sparse_cross_entropy", **kwargs):
        super().__init__(ignore_class, class_weights, resize_labels, name=name, **kwargs)

    def _pixel_losses(self, labels, logits):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


@keras.saving.register_keras_serializable(package="kseg")
class SparseFocalLoss(_SparseSegmentationLoss):
    """Focal loss -(1 - p_t)^gamma log p_t from logits (Lin et al., ICCV 2017); class_weights is alpha."""

    def __init__(self, gamma=2.0, ignore_class=IGNORE_LABEL, class_weights=None, resize_labels=False,
                 name="sparse_focal_loss", **kwargs):
        super().__init__(ignore_class, class_weights, resize_labels, name=name, **kwargs)
        self.gamma = float(gamma)

    def _pixel_losses(self, labels, logits):
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        p_t = tf.exp(-ce)
        return tf.pow(1.0 - p_t, self.gamma) * ce

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="kseg")
class BalancedSigmoidCrossEntropy(keras.losses.Loss):
    """HED's class-balanced sigmoid cross-entropy from logits, beta = |negatives| / |all| per image.

    Targets are edge maps in [0, 1] ([B, H, W, 1], as kseg.data.edges gives them): a pixel is
    an edge when its value >= `threshold`. `ignore_ambiguous=True` drops pixels with
    0 < value < threshold (some annotators only; RCF's rule) from the loss and from beta.
    Reduction: the sum over pixels, averaged over the images of the batch (the HED Caffe
    layer normalises by the batch size, not the pixel count); `normalize=True` also divides
    by each image's pixel count, which keeps the scale independent of the image size.
    """

    def __init__(self, threshold=0.5, ignore_ambiguous=False, normalize=False,
                 name="balanced_sigmoid_cross_entropy", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.threshold = float(threshold)
        self.ignore_ambiguous = bool(ignore_ambiguous)
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.float32)
        y = tf.cast(y_true, tf.float32)
        if y.shape.rank == logits.shape.rank - 1:
            y = y[..., None]
        pos = tf.cast(y >= self.threshold, tf.float32)
        valid = tf.ones_like(y)
        if self.ignore_ambiguous:
            valid = tf.cast((y <= 0) | (y >= self.threshold), tf.float32)
        neg = (1.0 - pos) * valid
        axes = list(range(1, logits.shape.rank))
        n_pos = tf.reduce_sum(pos, axes, keepdims=True)
        n_neg = tf.reduce_sum(neg, axes, keepdims=True)
        beta = tf.math.divide_no_nan(n_neg, n_pos + n_neg)
        # -log s(x) = softplus(-x), -log(1 - s(x)) = softplus(x): stable for any logit.
        per_pixel = beta * pos * tf.nn.softplus(-logits) + (1.0 - beta) * neg * tf.nn.softplus(logits)
        per_image = tf.reduce_sum(per_pixel, axes)
        if self.normalize:
            per_image = tf.math.divide_no_nan(per_image, tf.reduce_sum(valid, axes))
        return per_image  # [B]: Keras averages over the batch

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "ignore_ambiguous": self.ignore_ambiguous,
                "normalize": self.normalize}


def hed_losses(num_outputs=6, **kwargs):
    """One BalancedSigmoidCrossEntropy per HED output (dsn1..dsn5, fuse); Keras sums them."""
    return [BalancedSigmoidCrossEntropy(**kwargs) for _ in range(num_outputs)]


def stride8_model(model):
    """A Keras model sharing `model`'s weights that outputs DeepLab's stride-8 logits (layer fc8).

    Train it with `SparseCrossEntropy(resize_labels=True)` for the paper's setup: the labels
    are shrunk to the logits, not the logits blown up to the labels.
    """
    try:
        fc8 = model.get_layer("fc8")
    except ValueError:
        raise ValueError(f"{model.name} has no layer 'fc8': stride-8 training applies to the DeepLab models") from None
    return keras.Model(model.inputs, fc8.output, name=f"{model.name}_stride8")
