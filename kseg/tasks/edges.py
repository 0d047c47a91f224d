"""Edge detection: a probability of edge per pixel; HED's fused map is the prediction."""

from __future__ import annotations

import numpy as np

from kseg.tasks.base import Evaluator, Head, Task, probabilities
from kseg.tasks.losses import hed_losses
from kseg.tasks.metrics import edge_ods_ois


class Edges(Task):
    name = "edges"
    description = "an edge probability per pixel (BSDS ODS / OIS F-measure)"
    min_classes = 1
    target_kind = "edge_map"
    data_layouts = ("edges",)

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        # HED: side outputs then the fused map; the fused one is the paper's prediction.
        names = list(output_names)
        return Head(names.index("fuse") if "fuse" in names else len(names) - 1, "sigmoid")

    def labels(self, probabilities):
        import tensorflow as tf

        return tf.cast(probabilities[..., 0] > 0.5, tf.int32)

    def loss(self, num_outputs=6, **options):
        return hed_losses(num_outputs, **options)

    def evaluator(self, num_classes, head, class_names=None):
        return EdgeEvaluator(head)


class EdgeEvaluator(Evaluator):
    """BSDS ODS / OIS F-measures of the predicted edge maps (kept until the end: OIS is per image)."""

    def __init__(self, head):
        self.head = head
        self.predictions, self.ground_truths = [], []

    def update(self, labels, outputs):
        probs = probabilities(outputs, self.head)[..., 0]
        truth = np.asarray(labels)
        truth = truth[..., 0] if truth.ndim == probs.ndim + 1 else truth
        self.predictions.extend(probs)
        self.ground_truths.extend(truth)

    def result(self) -> dict:
        return edge_ods_ois(self.predictions, self.ground_truths)


EDGES = Edges()
