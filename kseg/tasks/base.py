"""What a task means, in one object: the base class every task module subclasses.

A task answers, for a model of its kind: which output is the prediction and how raw outputs
become probabilities and labels (`head`, `labels`), what `model.compile` uses by default
(`loss`, `metrics`), which data layouts train it, what the serving signatures return
(`serving_key`), and how two runs of the model are compared when a conversion is verified
(`compare`). Train, inference, serving and convert ask the task; none of them branches on
a task's name.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Head:
    """Which model output is the prediction, and the activation that turns it into probabilities.

    activation: "softmax", "softmax_negated" (scores where the lowest wins: LeNet-5's RBF
    penalties), "sigmoid", or None (the output is already probabilities).
    """

    output_index: int
    activation: str | None


class Task:
    """The base task. Subclasses set the class attributes and override what differs."""

    name: str = ""
    description: str = ""
    dense: bool = True  # one prediction per pixel (False: one per image)
    min_classes: int = 2  # background counts as a class for dense tasks
    serving_key: str = "label_map"  # the serving signatures' label output
    # What a training target is: "class" (an int per image), "class_map" (an int per pixel, 255
    # ignored) or "edge_map" (a float 0/1 map per pixel, [H, W, 1], for every output).
    target_kind: str = "class_map"
    data_layouts: tuple[str, ...] = ()  # kseg.data layouts whose labels train this task
    # The validation score (a name among `metrics`' results) training keeps the best checkpoint by.
    checkpoint_metric: str = "mean_iou"
    checkpoint_mode: str = "max"  # "min" for a loss

    def __repr__(self):
        return f"<task {self.name}>"

    # --- what a prediction is --------------------------------------------------------------

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        """The prediction among the model's outputs (the first, by default) and its activation."""
        return Head(0, "softmax")

    def main_output(self, outputs, output_names=None):
        """The prediction output among `outputs` (a tensor, or a list in the model's order)."""
        if not isinstance(outputs, (list, tuple)):
            return outputs
        return outputs[self.head(list(output_names or range(len(outputs)))).output_index]

    def labels(self, probabilities):
        """Probabilities (a TF tensor, classes last) -> int32 labels."""
        import tensorflow as tf

        return tf.argmax(probabilities, axis=-1, output_type=tf.int32)

    def check_num_classes(self, model_name, num_classes):
        if num_classes is not None and num_classes < self.min_classes:
            raise ValueError(f"build_model({model_name!r}): num_classes must be >= {self.min_classes} "
                             f"for a {self.name} model, got {num_classes}")

    # --- training --------------------------------------------------------------------------

    def loss(self, **options):
        """The default loss for model.compile."""
        raise NotImplementedError(f"the {self.name} task has no default loss")

    def metrics(self, num_classes, **options) -> list:
        """The default metrics for model.compile."""
        return []

    def soft_loss(self, label_smoothing=0.0):
        """The loss on soft (one-hot, mixed or smoothed) targets: MixUp / CutMix / label smoothing."""
        raise ValueError(f"the {self.name} task does not train on mixed or smoothed labels "
                         "([data] mixup / cutmix, [loss] label_smoothing)")

    def soft_metrics(self, num_classes) -> list:
        """The default metrics on soft targets (see soft_loss)."""
        return []

    def fit_targets(self, labels, num_outputs):
        """A dataset's labels -> the targets model.fit needs for a model with `num_outputs` losses."""
        return labels

    # --- evaluation ------------------------------------------------------------------------

    def evaluator(self, num_classes, head: Head, class_names=None) -> "Evaluator":
        """A fresh accumulator of this task's scores over (labels, model outputs) batches."""
        raise NotImplementedError(f"the {self.name} task has no evaluation")

    def random_targets(self, rng, batch, height, width, num_classes):
        """Seeded random training targets of this task's kind (benchmarks, smoke tests)."""
        if self.target_kind == "class":
            return rng.integers(0, num_classes, (batch,))
        if self.target_kind == "edge_map":
            return (rng.uniform(size=(batch, height, width, 1)) > 0.9).astype("float32")
        return rng.integers(0, num_classes, (batch, height, width))

    # --- serving ---------------------------------------------------------------------------

    def core_signatures(self, serving: "Serving") -> dict | None:
        """The task's own serving_default and predict_images (and what else replaces the generic
        probability / label-map signatures), or None for the generic ones."""
        return None

    def image_signatures(self, serving: "Serving") -> dict:
        """This task's own TF Serving signatures over encoded images, {name: tf.function}, beside
        the generic serving_default / predict_images / label_images / raw_outputs."""
        return {}

    # --- verification ----------------------------------------------------------------------

    def compare_outputs(self, ref: dict, out: dict, tol, postprocess=None, images=None) -> list:
        """Every output two runs of a model share ({name: array} each; `ref` the reference) ->
        OutputReports, in ref's order. By default each output on its own (`compare`).
        postprocess: the model's decoder layer, where it has one (a detector's thresholds);
        images: the batch both ran on."""
        return [self.compare(ref[name], out[name], name, tol) for name in ref if name in out]

    def compare(self, ref, out, name, tol):
        """One output of two runs of a model (e.g. Keras and its ONNX export) -> an OutputReport.

        Element-wise within `tol` (|a - b| <= atol * max(1, max|ref|) + rtol * |ref|); for
        outputs with a class axis, the argmax must also agree on `tol["argmax"]` of the
        positions, disagreeing only at near-ties (where the reference's two scores are closer
        than twice the allowed error).
        """
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            return OutputReport(name, tuple(out.shape), float("inf"), float("inf"), float("inf"), 0.0, False, None,
                                0, False)
        diff = np.abs(ref - out)
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        allowed = tol["atol"] * scale + tol["rtol"] * np.abs(ref)
        within = bool(np.all(diff <= allowed)) and bool(np.all(np.isfinite(out)) == bool(np.all(np.isfinite(ref))))
        rel = diff / np.maximum(np.abs(ref), 1e-12)
        agreement, bad_ties = None, 0
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            a_ref, a_out = ref.argmax(-1), out.argmax(-1)
            agree = a_ref == a_out
            agreement = float(agree.mean())
            if not agree.all():
                top = np.take_along_axis(ref, a_ref[..., None], -1)[..., 0]
                other = np.take_along_axis(ref, a_out[..., None], -1)[..., 0]
                slack = 2 * (tol["atol"] * scale + tol["rtol"] * np.abs(top))
                bad_ties = int(np.sum(~agree & (top - other > slack)))
        passed = within and (agreement is None or (agreement >= tol["argmax"] and bad_ties == 0))
        return OutputReport(
            name, tuple(out.shape), float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0,
            float(rel.max(initial=0.0)), float(np.max(allowed, initial=0.0)), within, agreement, bad_ties,
            bool(passed),
        )


@dataclasses.dataclass(frozen=True)
class Serving:
    """What a task's serving signatures build on (convert.tf_serving makes it).

    decode(image_bytes) -> (uint8 [H, W, channels] image, int32 [2] size), with the export's
    pixel limit; probabilities(float32 RGB 0..255 batch at network_size) -> the head's
    probabilities (preprocessing and the model inside); outputs(the same) -> every raw model
    output, a list; class_names: one string per class; head: the task's Head; any_size: the
    model takes any input size (else network_size is its fixed input); eval_transform:
    (resize_shorter, crop, interpolation) of a classifier's training run, or None; postprocess:
    a detector's decoder ((raw outputs list, the images) -> padded detections), or None.
    """

    decode: object
    probabilities: object
    network_size: tuple
    channels: int
    class_names: tuple
    outputs: object = None
    head: Head | None = None
    any_size: bool = False
    eval_transform: tuple | None = None
    postprocess: object = None


class Evaluator:
    """Scores accumulated batch by batch: `update(labels, outputs)` then `result()` (a dict)."""

    def update(self, labels, outputs):
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError


def probabilities(outputs, head: Head) -> np.ndarray:
    """The head's output of a batch of model outputs, through its activation, as float32 NumPy."""
    out = outputs[head.output_index] if isinstance(outputs, (list, tuple)) else outputs
    z = np.asarray(out, dtype=np.float32)
    if head.activation in ("softmax", "softmax_negated"):
        z = -z if head.activation == "softmax_negated" else z
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if head.activation == "sigmoid":
        return 1 / (1 + np.exp(-z))
    return z


@dataclasses.dataclass
class OutputReport:
    """How one output of a verified pair compares."""

    name: str
    shape: tuple
    max_abs: float
    mean_abs: float
    max_rel: float
    allowed_max_abs: float
    within_tolerance: bool
    argmax_agreement: float | None  # None for single-channel outputs
    argmax_disagreements_not_near_tie: int
    passed: bool
    note: str | None = None  # how the output was compared, where not element-wise
