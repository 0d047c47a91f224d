"""Image classification: one class per image from the model's (single) output."""

from __future__ import annotations

import keras
import numpy as np

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

    def evaluator(self, num_classes, head, class_names=None):
        return TopKEvaluator(num_classes, head, class_names=class_names)


CLASSIFICATION = Classification()


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
