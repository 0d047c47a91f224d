"""Edge detection: a probability of edge per pixel; HED's fused map is the prediction."""

from __future__ import annotations

import numpy as np

from kseg.tasks.base import Evaluator, Head, Task
from kseg.tasks.bsds import edge_ods_ois
from kseg.tasks.losses import hed_losses


class Edges(Task):
    name = "edges"
    description = "an edge probability per pixel (BSDS ODS / OIS F-measure)"
    min_classes = 1
    target_kind = "edge_map"
    data_layouts = ("edges",)
    # No validation score during fit (ODS needs the whole set): the best checkpoint has the lowest val_loss.
    checkpoint_metric = "loss"
    checkpoint_mode = "min"
    # Which map is the edge prediction: the HED paper's average of the fused and side outputs
    # (Xie & Tu 2015, section 4: "we average the fusion output and the side outputs"), or "fuse".
    OUTPUTS = ("average", "fuse")
    default_output = "average"

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        # HED: side outputs then the fused map; the fused one is the paper's prediction.
        names = list(output_names)
        return Head(names.index("fuse") if "fuse" in names else len(names) - 1, "sigmoid")

    def labels(self, probabilities):
        import tensorflow as tf

        return tf.cast(probabilities[..., 0] > 0.5, tf.int32)

    def loss(self, num_outputs=6, **options):
        return hed_losses(num_outputs, **options)

    def fit_targets(self, labels, num_outputs):
        # Deep supervision: every output (dsn1..dsn5, fuse) learns the same edge map.
        return labels if num_outputs == 1 else tuple(labels for _ in range(num_outputs))

    def edge_map(self, outputs, head: Head, output=None) -> np.ndarray:
        """Edge probabilities [B, H, W] from a model's outputs (logits, a list for HED).

        output: "average" (default): the mean of every output through the sigmoid; "fuse": the
        head's output (HED's fused map) only.
        """
        output = output or self.default_output
        if output not in self.OUTPUTS:
            raise ValueError(f"unknown edge output {output!r}; choose one of {', '.join(self.OUTPUTS)}")
        outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if output == "fuse":
            outs = [outs[head.output_index]]
        probs = [_activate(np.asarray(o, np.float32), head.activation)[..., 0] for o in outs]
        return np.mean(probs, axis=0)

    def evaluator(self, num_classes, head, class_names=None, output=None):
        return EdgeEvaluator(head, output)


def _activate(z, activation):
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-z))
    return z


class EdgeEvaluator(Evaluator):
    """BSDS ODS / OIS F-measures of the predicted edge maps (kept until the end: OIS is per image).

    The benchmark of kseg.tasks.bsds: NMS, 99 thresholds, thinning, one-to-one matching within
    0.0075 of the diagonal. `output`: which map is scored (Edges.edge_map; default the average).
    Ground truth: > 0 is an edge.
    """

    def __init__(self, head, output=None):
        self.head, self.output = head, output
        self.predictions, self.ground_truths = [], []

    def update(self, labels, outputs):
        probs = EDGES.edge_map(outputs, self.head, self.output)
        truth = np.asarray(labels)
        truth = truth[..., 0] if truth.ndim == probs.ndim + 1 else truth
        self.predictions.extend(probs)
        self.ground_truths.extend(truth)

    def result(self) -> dict:
        return {**edge_ods_ois(self.predictions, self.ground_truths), "output": self.output or EDGES.default_output}


EDGES = Edges()
