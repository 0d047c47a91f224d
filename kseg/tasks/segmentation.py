"""Semantic segmentation: per-pixel class scores; the first output is the full-size prediction."""

from __future__ import annotations

from kseg.tasks.base import Evaluator, Head, Task
from kseg.tasks.losses import SparseCrossEntropy
from kseg.tasks.metrics import ConfusionMatrixMetric, iou_table, scores_from_confusion


class Segmentation(Task):
    name = "segmentation"
    description = "a class per pixel (label maps; FCN's pixel accuracy, mean accuracy, mean IoU, fw IoU)"
    data_layouts = ("voc", "sbd", "synthetic", "pets", "folder")

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        # The first output is the full-resolution prediction: DeepLab's stride-8 logits and
        # FCN-ResNet's aux head come after it.
        return Head(0, "softmax")

    def loss(self, **options):
        return SparseCrossEntropy(**options)

    def metrics(self, num_classes, **options) -> list:
        return [ConfusionMatrixMetric(num_classes, **options)]

    def evaluator(self, num_classes, head, class_names=None):
        return ConfusionEvaluator(num_classes, head, class_names)


class ConfusionEvaluator(Evaluator):
    """The FCN paper's four scores and per-class IoU from one confusion matrix (255 ignored)."""

    def __init__(self, num_classes, head, class_names=None):
        self.metric = ConfusionMatrixMetric(num_classes)
        self.head, self.class_names = head, class_names

    def update(self, labels, outputs):
        out = outputs[self.head.output_index] if isinstance(outputs, (list, tuple)) else outputs
        self.metric.update_state(labels, out)  # the argmax of logits is the argmax of probabilities

    def result(self) -> dict:
        cm = self.metric.confusion()
        return {**scores_from_confusion(cm), "per_class": iou_table(cm, self.class_names), "confusion": cm.tolist()}


SEGMENTATION = Segmentation()
