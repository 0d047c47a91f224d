"""Object skeletons with their scales: a skeleton probability per pixel (FSDS, Shen et al., CVPR 2016).

Targets. A skeleton label is a float map [H, W, 1] per image: 0 off the skeleton, and on
each skeleton pixel its radius, the distance in pixels to the nearest object boundary
(kseg.data.skeleton computes it as SK-LARGE's authors do, bwdist(edge) on the skeleton,
at least 1). Training targets are quantised from it (`quantize_scales`, in `fit_targets`):

- The paper's scale of a skeleton point is its diameter, s = 2 x radius: the authors' data
  preparation writes `2 * bwdist(edge)` as the scale (zeakey/DeepSkeleton
  tools/aug_data/aug_sk506_3_2.m) and their reconstruction draws disks of radius s / 2
  (examples/scale-reg/recover/util/mexScale2seg.cc). A side output sees a skeleton point
  when its receptive field exceeds the scale by a margin, r_i > lambda * s with
  lambda = 1.2, so a point gets the class of the first side output that can see it:
  z = min{i : r_i > 1.2 s} with r = (14, 40, 92, 196) for conv2_2 .. conv5_3; 0 is
  background. In radii: class 1 below 5.83 pixels, 2 below 16.67, 3 below 38.33, 4 below
  81.67. The authors' data layers threshold their stored 2 x bwdist values with rounded
  bounds near these (10, 32, 80, 180 in zeakey/skeleton's ImageLabelmapData layer).
- A scale no receptive field covers (radius >= 81.67) has no class under the paper's rule;
  kseg gives it the largest class (conv5_3 sees most of it), so every point that the
  F-measure counts as skeleton is trained as skeleton. (The released data layers make
  scales >= 180 background instead.)
- Side output i predicts the classes 0..i; a point of a larger class is background for it
  (the released SoftmaxWithLoss: `label_value *= (label_value < nch)`), so every output
  gets the same quantised map and `ScaleBalancedCrossEntropy` folds the classes it cannot
  predict into background.

Loss (`fsds_losses`): per output a class-balanced softmax cross-entropy. balance="paper"
(default) weighs class k by beta_k = (1 / |Y_k|) / sum_k' (1 / |Y_k'|) over the classes
present in the image (the paper's per-class weights); balance="caffe" is the released
layer's two weights (skeleton pixels |Y_0| / |Y|, background (|Y| - |Y_0|) / |Y|, equal to
the paper's for two classes). The two differ on an image without a skeleton point an output can
see: the paper's weights put all the weight on its background, the released layer's none.
Reduction as the reference (normalize: false): the sum over
the pixels, averaged over the images of the batch. Keras sums the five (four sides and the
fuse), as the paper's objective does.

Prediction. The fused output's skeleton map is 1 - P(background) (zeakey/skeleton
forward_all.py: `1 - softmax_fuse[0]`); labels (argmax) are the scale classes.

Evaluation (`skeleton_f_measure`): the skeleton benchmark of the SK-LARGE releases
(zeakey/skeval, skeval_demo.m) on kseg.tasks.bsds: each map divided by its maximum, 100
thresholds, each thresholded map thinned to one pixel (bwmorph 'thin') and matched one to
one to the ground-truth skeleton within 0.0075 of the image diagonal. No edge NMS: the
skeleton benchmark thins but does not suppress. The score is the F-measure at the best
threshold for the whole set (ODS; interpolated between thresholds as the BSDS code's
findBestRPF does, where skeval_demo.m prints the best of the 100 sampled ones: at most a hair
lower); OIS is reported beside it. Ground truth > 0 is skeleton.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kseg.tasks.base import Evaluator, Head, Task
from kseg.tasks.bsds import MAX_DIST, edge_ods_ois

# FSDS's side outputs: conv2_2, conv3_3, conv4_3, conv5_3 of VGG16.
RECEPTIVE_FIELDS = (14, 40, 92, 196)
LAMBDA = 1.2
SCALE_PER_RADIUS = 2.0  # the paper's scale is the skeleton's diameter
THRESHOLDS = 100  # skeval_demo.m's opts.nthresh
BALANCES = ("paper", "caffe", None)
PROTOCOL = (f"skeleton benchmark: maps divided by their maximum, {THRESHOLDS} thresholds, thinning, no NMS, "
            f"maxDist {MAX_DIST}")


def quantize_scales(radius, receptive_fields=RECEPTIVE_FIELDS, lam=LAMBDA, scale_per_radius=SCALE_PER_RADIUS):
    """Radius maps (0 off the skeleton) -> int32 scale classes: 0 background, else the first side
    output i (1-based) with receptive_fields[i - 1] > lam * scale_per_radius * radius, capped at
    len(receptive_fields) (see the module docstring). Any shape; NumPy in, TF tensor out."""
    radius = tf.cast(radius, tf.float32)
    scale = lam * scale_per_radius * radius
    fields = tf.constant(sorted(receptive_fields), tf.float32)
    too_small = tf.reduce_sum(tf.cast(fields <= scale[..., None], tf.int32), axis=-1)
    classes = tf.minimum(too_small + 1, len(receptive_fields))
    return tf.where(radius > 0, classes, tf.zeros_like(classes))


@keras.saving.register_keras_serializable(package="kseg")
class ScaleBalancedCrossEntropy(keras.losses.Loss):
    """FSDS's class-balanced softmax cross-entropy of one output, from logits, on scale classes.

    Targets: int scale classes [B, H, W, 1] (or [B, H, W]); a class the output does not have
    (>= its number of channels) is background. balance: "paper" (per-class inverse-frequency
    weights, normalised to sum 1 over the classes present), "caffe" (the released layer's
    positive / negative weights) or None (plain). Per image: sum over pixels (normalize=True:
    divided by the pixel count), averaged over the batch.
    """

    def __init__(self, balance="paper", normalize=False, name="scale_balanced_cross_entropy",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.balance = balance
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.float32)
        labels = tf.cast(y_true, tf.int32)
        if labels.shape.rank == logits.shape.rank:
            labels = labels[..., 0]
        num_classes = logits.shape[-1]
        labels = tf.where((labels > 0) & (labels < num_classes), labels, tf.zeros_like(labels))
        one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
        counts = tf.reduce_sum(one_hot, axis=[1, 2])  # [B, C]
        if self.balance == "paper":
            inverse = tf.math.divide_no_nan(tf.ones_like(counts), counts)
            beta = tf.math.divide_no_nan(inverse, tf.reduce_sum(inverse, axis=-1, keepdims=True))
        elif self.balance == "caffe":
            total = tf.reduce_sum(counts, axis=-1, keepdims=True)
            negatives = counts[:, :1]
            beta = tf.math.divide_no_nan(tf.concat([total - negatives, tf.repeat(negatives, num_classes - 1, -1)],
                                                   axis=-1), total)
        else:
            beta = tf.ones_like(counts)
        weights = tf.reduce_sum(one_hot * beta[:, None, None, :], axis=-1)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        per_image = tf.reduce_sum(weights * ce, axis=[1, 2])
        if self.normalize:
            per_image = per_image / tf.cast(tf.shape(labels)[1] * tf.shape(labels)[2], tf.float32)
        return per_image  # [B]: Keras averages over the batch

    def get_config(self):
        return {**super().get_config(), "balance": self.balance, "normalize": self.normalize}


def fsds_losses(num_outputs=5, **kwargs):
    """One ScaleBalancedCrossEntropy per FSDS output (dsn2..dsn5, fuse); Keras sums them."""
    return [ScaleBalancedCrossEntropy(**kwargs) for _ in range(num_outputs)]


def skeleton_f_measure(predictions, ground_truths, thresholds=THRESHOLDS, max_dist=MAX_DIST, tolerance_px=None,
                       normalize=True) -> dict:
    """The skeleton benchmark's F-measure (module docstring) of skeleton probability maps.

    predictions: [H, W] maps, one per image; ground_truths: [H, W], > 0 is skeleton.
    normalize: divide each map by its maximum first, as skeval does. Returns
    kseg.tasks.bsds.edge_ods_ois' scores (no NMS, thinning) with "f" = the ODS F-measure.
    """
    maps = []
    for p in predictions:
        p = np.asarray(p, np.float64)
        top = float(p.max(initial=0.0))
        maps.append(p / top if normalize and top > 0 else p)
    scores = edge_ods_ois(maps, [np.asarray(g) > 0 for g in ground_truths], thresholds, max_dist, tolerance_px,
                          nms=False, thinning=True)
    return {"f": scores["ods"], **scores}


def _softmax(z):
    z = np.asarray(z, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Skeleton(Task):
    name = "skeleton"
    description = "a skeleton probability per pixel with its scale class (skeleton F-measure)"
    min_classes = 2
    # Dense float maps per pixel like edges (the radius of each skeleton pixel, 0 elsewhere): the
    # commands treat them alike (grey probability PNGs, an F-measure, no class-range check).
    target_kind = "edge_map"
    # "skeleton": SK-LARGE / SK-SMALL (kseg.data.skeleton), with scales. "edges": lists of 'image
    # skeleton_map' PNG pairs: enough to evaluate (> 0 is skeleton), but they carry no scale, so a
    # model trained on them learns every skeleton pixel as the smallest scale class.
    data_layouts = ("skeleton", "edges")
    checkpoint_metric = "loss"
    checkpoint_mode = "min"
    OUTPUTS = ("fuse",)
    default_output = "fuse"
    # What the per-pixel probability maps are called (`kseg predict` writes "skeleton maps").
    map_name = "skeleton"
    # A recipe's [loss] name for this task's own loss (`loss`, with the [loss] section's other keys:
    # balance, normalize).
    loss_name = "scale_balanced_cross_entropy"

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        names = list(output_names)
        return Head(names.index("fuse") if "fuse" in names else len(names) - 1, "softmax")

    def loss(self, num_outputs=5, **options):
        return fsds_losses(num_outputs, **options)

    def fit_targets(self, labels, num_outputs):
        # Deep supervision: every output learns the same quantised scale map (the loss folds the
        # classes an output lacks into background).
        classes = quantize_scales(labels)
        return classes if num_outputs == 1 else tuple(classes for _ in range(num_outputs))

    def skeleton_map(self, outputs, head: Head, output=None) -> np.ndarray:
        """Skeleton probabilities [B, H, W]: 1 - P(background) of the fused output (the head's)."""
        output = output or self.default_output
        if output not in self.OUTPUTS:
            raise ValueError(f"unknown skeleton output {output!r}; choose one of {', '.join(self.OUTPUTS)}")
        outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        z = np.asarray(outs[head.output_index], np.float32)
        probs = _softmax(z) if head.activation == "softmax" else z
        return 1.0 - probs[..., 0]

    # The seam `kseg predict` and training's samples.png use for per-pixel probability maps.
    edge_map = skeleton_map

    def evaluator(self, num_classes, head, class_names=None, output=None):
        return SkeletonEvaluator(head, output)

    def random_targets(self, rng, batch, height, width, num_classes):
        on = rng.uniform(size=(batch, height, width, 1)) > 0.95
        return np.where(on, rng.uniform(1, 100, size=on.shape), 0.0).astype("float32")

    def image_signatures(self, serving):
        """skeleton_images: encoded images in; `skeleton_png_bytes` (Skeleton.skeleton_map: 1 -
        P(background) of the fused output) as 8-bit grey PNGs at each image's size, as `kseg
        predict` writes them, and `image_size`. A fixed-size model runs on a resized copy, its
        fused logits resized back before the softmax."""
        head, (h, w) = serving.head, serving.network_size

        def skeleton(data):
            image, size = serving.decode(data)
            x = tf.cast(image, tf.float32)[None]
            if not serving.any_size:
                x = tf.image.resize(x, (h, w), method="bilinear")
            z = tf.cast(serving.outputs(x)[head.output_index], tf.float32)
            if not serving.any_size:
                z = tf.image.resize(z, size, method="bilinear")
            p = 1.0 - tf.nn.softmax(z[0])[..., 0] if head.activation == "softmax" else 1.0 - z[0, ..., 0]
            grey = tf.cast(tf.clip_by_value(tf.round(p * 255.0), 0, 255), tf.uint8)
            return tf.io.encode_png(grey[..., None]), size

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def skeleton_images(image_bytes):
            # One image at a time, each at its own size.
            pngs, sizes = tf.map_fn(skeleton, image_bytes, parallel_iterations=1, fn_output_signature=(
                tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int32)))
            return {"skeleton_png_bytes": tf.identity(pngs, name="skeleton_png_bytes"),
                    "image_size": tf.identity(sizes, name="image_size")}

        return {"skeleton_images": skeleton_images}


class SkeletonEvaluator(Evaluator):
    """The skeleton benchmark's F-measure of the predicted skeleton maps (skeleton_f_measure), kept
    until the end (the best threshold is the whole set's). Ground truth > 0 is skeleton."""

    def __init__(self, head, output=None):
        self.head, self.output = head, output
        self.predictions, self.ground_truths = [], []

    def update(self, labels, outputs):
        probs = SKELETON.skeleton_map(outputs, self.head, self.output)
        truth = np.asarray(labels)
        truth = truth[..., 0] if truth.ndim == probs.ndim + 1 else truth
        self.predictions.extend(probs)
        self.ground_truths.extend(truth > 0)

    def result(self) -> dict:
        return {**skeleton_f_measure(self.predictions, self.ground_truths),
                "output": self.output or SKELETON.default_output, "protocol": PROTOCOL}


SKELETON = Skeleton()
