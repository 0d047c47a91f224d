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
    data_layouts = ("classification_folder",)

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
        return TopKEvaluator(num_classes, head)


CLASSIFICATION = Classification()


class TopKEvaluator(Evaluator):
    """Top-1 and top-5 accuracy over images (labels: class ids, or one-hot rows)."""

    def __init__(self, num_classes, head, k=5):
        self.head, self.k = head, min(k, num_classes)
        self.images = self.top1 = self.topk = 0

    def update(self, labels, outputs):
        scores = probabilities(outputs, self.head)
        y = np.asarray(labels)
        y = y.argmax(-1) if y.ndim == 2 else y.reshape(-1)
        ranked = np.argsort(-scores, axis=-1, kind="stable")[:, : self.k]
        self.top1 += int(np.sum(ranked[:, 0] == y))
        self.topk += int(np.sum(np.any(ranked == y[:, None], axis=1)))
        self.images += len(y)

    def result(self) -> dict:
        n = max(self.images, 1)
        return {"top1": self.top1 / n, f"top{self.k}": self.topk / n}
