"""Image classification: one class per image from the model's (single) output."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kseg.tasks.base import Evaluator, Head, Task, probabilities


class Classification(Task):
    name = "classification"
    description = "a class per image (top-1 / top-5 accuracy)"
    dense = False
    serving_key = "classes"
    target_kind = "class"
    data_layouts = ("classification_folder", "classification_list")
    checkpoint_metric = "top1"

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        kwargs = build_kwargs or {}
        if output_rank is not None and output_rank != 2:
            raise ValueError(f"a classifier without its top (output rank {output_rank}) has no classes to serve; "
                             "build it with include_top=True")
        if kwargs.get("rbf_output"):
            # LeNet-5's RBF units output a penalty per class: the lowest is the prediction.
            return Head(0, "softmax_negated")
        activation = kwargs.get("classifier_activation")
        if activation in (None, "linear"):
            return Head(0, "softmax")
        if activation == "softmax":
            return Head(0, None)
        raise ValueError(f"classifier_activation={activation!r}: serving needs logits (None) or softmax outputs")

    def loss(self, **options):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **options)

    def metrics(self, num_classes, **options) -> list:
        return [keras.metrics.SparseCategoricalAccuracy(name="top1"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5")]

    def soft_loss(self, label_smoothing=0.0):
        # Smoothing after mixing equals timm's smoothing before it (both linear in the one-hot rows).
        return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=float(label_smoothing))

    def soft_metrics(self, num_classes) -> list:
        # On mixed rows these score the argmax of the mix (the larger share), as timm reports train accuracy.
        return [keras.metrics.CategoricalAccuracy(name="top1"),
                keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5")]

    def evaluator(self, num_classes, head, class_names=None):
        return TopKEvaluator(num_classes, head, class_names=class_names)

    # The ImageNet evaluation crop: the shorter side resized to crop / 0.875 (256 for 224, as in
    # torchvision's and keras.applications' reference evaluation), then the centre crop.
    EVAL_CROP_FRACTION = 0.875

    def eval_transform(self, image, size, transform=None):
        """An image (uint8 or float, [H, W, C]) -> float32 [h, w, C]: the shorter side resized to
        round(max(size) / 0.875), then the centre crop of `size`; or by `transform`, a training
        run's (resize_shorter, crop, interpolation), whose crop must be `size`."""
        h, w = size
        if transform is None:
            return center_crop(resize_shorter(image, round(max(h, w) / self.EVAL_CROP_FRACTION)), (h, w))
        shorter, crop, interpolation = transform
        crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        if crop != (h, w):
            raise ValueError(f"the evaluation crop {crop} differs from the network input {(h, w)}")
        return center_crop(resize_shorter(image, int(shorter), interpolation), (h, w))

    def image_signatures(self, serving):
        h, w = serving.network_size
        c = serving.channels
        k = min(5, len(serving.class_names))
        names = tf.constant(list(serving.class_names))

        def decode(data):
            image, _ = serving.decode(data)
            return tf.ensure_shape(self.eval_transform(image, (h, w), serving.eval_transform), [h, w, c])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def classify_images(image_bytes):
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([h, w, c], tf.float32))
            scores, classes = tf.math.top_k(serving.probabilities(images), k=k)
            return {"classes": tf.identity(classes, name="classes"), "scores": tf.identity(scores, name="scores"),
                    "class_names": tf.gather(names, classes, name="class_names")}

        return {"classify_images": classify_images}


CLASSIFICATION = Classification()


def resize_shorter(image, shorter: int, method="bilinear"):
    """Resize [H, W, C] so its shorter side is `shorter`, the longer int(shorter * long / short)
    (torchvision's Resize(int)); antialiased when shrinking, as PIL's and torchvision's resize."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.cast(tf.cast(shorter, tf.int64) * tf.cast(long, tf.int64) // tf.cast(short, tf.int64), tf.int32)
    size = tf.where(h <= w, tf.stack([shorter, new_long]), tf.stack([new_long, shorter]))
    return tf.image.resize(tf.cast(image, tf.float32), size, method=method, antialias=True)


def center_crop(image, size):
    """The centre (h, w) window of [H, W, C] (torchvision's CenterCrop: offsets round((H - h) / 2))."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top = tf.cast(tf.round(tf.cast(h - size[0], tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(w - size[1], tf.float32) / 2.0), tf.int32)
    return image[top: top + size[0], left: left + size[1]]


class TopKEvaluator(Evaluator):
    """Top-1 and top-k accuracy, per-class accuracy and the confusion matrix over images.

    Labels: class ids, or one-hot rows. Top-k (k = 5) is reported only for more than k classes:
    with k classes or fewer it is 1.0 whatever the model does, so the key is left out.
    `result()`: {"top1", "top5" (more than 5 classes), "per_class": [{"class", "index",
    "accuracy" (None without images), "images", "predicted"}], "confusion": [[...]] (rows: true
    class, columns: predicted), "count": images}.
    """

    def __init__(self, num_classes, head, k=5, class_names=None):
        self.head, self.num_classes = head, int(num_classes)
        self.k = k if self.num_classes > k else None
        names = list(class_names or [])[: self.num_classes]
        self.class_names = names + [str(i) for i in range(len(names), self.num_classes)]
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.images = self.top1 = self.topk = 0

    def update(self, labels, outputs):
        scores = probabilities(outputs, self.head)
        y = np.asarray(labels)
        y = y.argmax(-1) if y.ndim == 2 else y.reshape(-1)
        y = y.astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            bad = y[(y < 0) | (y >= self.num_classes)][0]
            raise ValueError(f"label {bad} is outside 0..{self.num_classes - 1}: the model outputs "
                             f"{self.num_classes} classes")
        ranked = np.argsort(-scores, axis=-1, kind="stable")[:, : self.k or 1]
        self.top1 += int(np.sum(ranked[:, 0] == y))
        if self.k:
            self.topk += int(np.sum(np.any(ranked == y[:, None], axis=1)))
        self.confusion += np.bincount(y * self.num_classes + ranked[:, 0],
                                      minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)
        self.images += len(y)

    def result(self) -> dict:
        n = max(self.images, 1)
        out = {"top1": self.top1 / n}
        if self.k:
            out[f"top{self.k}"] = self.topk / n
        cm = self.confusion
        out["per_class"] = [{"class": self.class_names[i], "index": i,
                             "accuracy": float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None,
                             "images": int(cm[i].sum()), "predicted": int(cm[:, i].sum())}
                            for i in range(self.num_classes)]
        out["confusion"] = cm.tolist()
        out["count"] = self.images
        return out
