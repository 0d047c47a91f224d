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
    map_name = "edge"  # what the per-pixel maps are (kseg predict's words)

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

    def image_signatures(self, serving):
        """edge_images: encoded images in; `edge_png_bytes` (the average map, Edges.edge_map's
        default) and `fuse_png_bytes` (the fused map) out as 8-bit grey PNGs at each image's size,
        as `kseg predict` writes them (REST: {"b64": ...}, TF Serving's rule for *_bytes), and
        `image_size`. A model that takes any size runs on the image
        itself; a fixed-size one on a resized copy, its logits resized back before the sigmoid."""
        import tensorflow as tf

        head, (h, w) = serving.head, serving.network_size

        def png(p):
            return tf.io.encode_png(tf.cast(tf.clip_by_value(tf.round(p * 255.0), 0, 255), tf.uint8)[..., None])

        def maps(data):
            image, size = serving.decode(data)
            x = tf.cast(image, tf.float32)[None]
            if not serving.any_size:
                x = tf.image.resize(x, (h, w), method="bilinear")
            outs = [tf.cast(o, tf.float32) for o in serving.outputs(x)]
            if not serving.any_size:
                outs = [tf.image.resize(o, size, method="bilinear") for o in outs]
            probs = [tf.sigmoid(o[0, :, :, 0]) if head.activation == "sigmoid" else o[0, :, :, 0] for o in outs]
            return tf.stack([png(tf.add_n(probs) / len(probs)), png(probs[head.output_index])]), size

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def edge_images(image_bytes):
            # One image at a time, each at its own size.
            pngs, sizes = tf.map_fn(maps, image_bytes, parallel_iterations=1, fn_output_signature=(
                tf.TensorSpec([2], tf.string), tf.TensorSpec([2], tf.int32)))
            return {"edge_png_bytes": tf.identity(pngs[:, 0], name="edge_png_bytes"),
                    "fuse_png_bytes": tf.identity(pngs[:, 1], name="fuse_png_bytes"),
                    "image_size": tf.identity(sizes, name="image_size")}

        return {"edge_images": edge_images}


PROTOCOL = "BSDS benchmark: NMS, 99 thresholds, thinning, maxDist 0.0075"


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
        return {**edge_ods_ois(self.predictions, self.ground_truths), "output": self.output or EDGES.default_output,
                "protocol": PROTOCOL}


EDGES = Edges()
