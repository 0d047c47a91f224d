"""Numerical verification: run two artifacts on the same inputs and compare every output.

A *runner* is what loading any format returns: `runner(x)` maps a float32 NHWC batch to the
list of outputs in the model's order; `.input_shape` (NHWC, None where dynamic) and
`.metadata` describe it; `.runtime` ("tf", "onnxruntime", "tflite", "torch") and
`.quantized` choose the tolerance of a pair. A model with inputs besides the image (Fast
R-CNN's `proposals`) lists them in `.extra_inputs` and takes `x` as a dict {"image": batch,
name: array}, the same names in every format.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import numpy as np

from kseg.identity import of_metadata, resolve_preprocessing
from kseg.registry import get_spec
from kseg.tasks import OutputReport, Task, get_task

# Per pair kind: |a - b| <= atol * max(1, max|ref|) + rtol * |ref|, element-wise, and the
# per-pixel argmax must agree on at least `argmax` of the pixels, disagreeing only at near-ties
# (where the reference's top two scores are closer than the allowed error).
TOLERANCES = {
    # TF runtime vs TF runtime. Not guaranteed the same arithmetic: eager Keras (keras_runner, in
    # batches of 8) against a Grappler-optimised graph run on the whole batch, and oneDNN picks its
    # conv kernels by ISA and batch size (12 images, DeepLab-ResNet-50: 3.6e-6 max-abs, 9e-7 of
    # max|ref|, on AVX2; 0 with SSE4.1); frozen graphs run with constant folding off, bit-exact in
    # practice, but TF's default (folding) runtime is ~1e-6 relative off. So a float32 bound:
    # ~84 eps of the output's scale, 1e4 below a wrong weight or transposed kernel (>= 1e-1).
    "tf": {"atol": 1e-5, "rtol": 0.0, "argmax": 0.999},
    "runtime": {"atol": 1e-5, "rtol": 1e-3, "argmax": 0.999},  # TF vs ONNX Runtime / TFLite
    "torch": {"atol": 1e-4, "rtol": 0.0, "argmax": 0.999},  # PyTorch imports
    # Dynamic-range int8 TFLite: weights and (per batch) activations quantised to 8 bits; stated,
    # looser bounds. Measured max|a - b| / max|ref| over random weights (16 seeds HED, 8 DeepLab-
    # LargeFOV and LeNet-5): HED's 1-channel side outputs 2.4-6.0%, DeepLab 0.4-0.6%, LeNet 0.3-0.4%.
    "int8": {"atol": 1e-1, "rtol": 5e-2, "argmax": 0.95},
}


@dataclasses.dataclass
class Runner:
    """A loaded artifact that runs NHWC float32 batches; see the module docstring."""

    fn: Callable[[np.ndarray], list]
    input_shape: tuple
    metadata: dict | None = None
    runtime: str = "tf"
    output_names: list | None = None
    quantized: bool = False
    extra_inputs: dict | None = None  # {name: shape without the batch} of inputs besides the image

    def __call__(self, x):
        if isinstance(x, dict):
            x = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in x.items()}
        else:
            x = np.ascontiguousarray(x, dtype=np.float32)
        outputs = self.fn(x)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return [np.asarray(o) for o in outputs]


# The image input's name in every format kseg writes (and the key of a runner's dict input).
IMAGE = "image"


def image_shape(model) -> tuple:
    """(H, W, C) of a Keras model's image input: its only input, or the first of several."""
    return tuple(model.inputs[0].shape[1:])


def extra_inputs(model) -> dict:
    """{name: shape without the batch} of a Keras model's inputs after the image; {} for one input."""
    return {t.name: tuple(t.shape[1:]) for t in model.inputs[1:]}


def input_specs(model, image: list) -> list:
    """tf.TensorSpecs of a Keras model's inputs for a traced signature: `image` (the image input's
    shape, batch included) named IMAGE, then each extra input by its Keras name, batch dynamic."""
    import tensorflow as tf

    return [tf.TensorSpec(image, tf.float32, name=IMAGE)] + [
        tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=t.name) for t in model.inputs[1:]]


def keras_runner(model, metadata=None, batch_size=8) -> Runner:
    """A runner for an in-memory Keras model (inference mode, batches of `batch_size`), as the
    graph formats deploy it (kseg.api.deployment_model: a detector's decoded detections too)."""
    from kseg.api import deployment_model

    deployed = deployment_model(model)
    keys = [IMAGE, *extra_inputs(model)]  # a dict input's keys, in the model's input order

    def run(x):
        parts = []
        for i in range(0, len(x[IMAGE] if isinstance(x, dict) else x), batch_size):
            batch = [x[k][i : i + batch_size] for k in keys] if isinstance(x, dict) else x[i : i + batch_size]
            out = deployed(batch, training=False)
            parts.append([np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])])
        return [np.concatenate(col) for col in zip(*parts)]

    runner = Runner(run, image_shape(model), metadata, "tf", list(deployed.output_names),
                    extra_inputs=extra_inputs(model) or None)
    runner.keras_model = model
    return runner


def pair_kind(a, b) -> str:
    if getattr(a, "quantized", False) or getattr(b, "quantized", False):
        return "int8"
    runtimes = {getattr(a, "runtime", "tf"), getattr(b, "runtime", "tf")}
    if "torch" in runtimes:
        return "torch"
    return "tf" if runtimes == {"tf"} else "runtime"


@dataclasses.dataclass
class Report:
    kind: str
    tolerance: dict
    input_shape: tuple
    outputs: list
    passed: bool
    error: str | None = None
    unmatched: list | None = None  # outputs only one side has (not compared)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        if self.error:
            return f"FAIL ({self.error})"
        worst = max((o.max_abs for o in self.outputs), default=0.0)
        agree = [o.argmax_agreement for o in self.outputs if o.argmax_agreement is not None]
        tail = f", argmax agreement {min(agree):.4%}" if agree else ""
        notes = list(dict.fromkeys(o.note for o in self.outputs if o.note))
        tail += "".join(f"; detections {n}" for n in notes)
        return f"{'PASS' if self.passed else 'FAIL'} ({self.kind}: max-abs {worst:.3g}{tail})"


def make_inputs(input_shape, metadata=None, *, input_size=None, batch=2, seed=0, images=None, extra=None):
    """Seeded random RGB 0..255 images (or `images` files) through the model's preprocessing; with
    `extra` ({name: shape}: a runner's extra_inputs) a dict {"image": images, name: values}."""
    shape = list(input_shape)
    meta = metadata or {}
    if input_size is not None:
        shape[0], shape[1] = input_size
    for axis in (0, 1):
        if shape[axis] is None:
            shape[axis] = _default_size(meta, axis)
    h, w, c = shape
    if images:
        raw = np.stack([_read_image(p, h, w, c) for p in images])
    else:
        raw = np.random.default_rng(seed).uniform(0, 255, size=(batch, h, w, c)).astype(np.float32)
    x = preprocess(raw, meta)
    if not extra:
        return x
    rng = np.random.default_rng(seed + 1)
    return {IMAGE: x, **{name: _extra_values(name, shape, (h, w), len(x), rng) for name, shape in extra.items()}}


# The RoI pooling stride that verification proposals are laid out for (kseg's VGG16 detectors).
STRIDE = 16


def _extra_values(name, shape, image_hw, batch, rng):
    """Values for an input besides the image. kseg knows one kind: region proposals, (R, 4) xyxy
    pixels of the input (fast_rcnn_vgg16, RoI pooling at stride 16). Boxes on the 16-pixel grid,
    inside and across the image's edges, no two alike where the image has room (two boxes that pool
    the same cells tie in score, and each runtime's NMS breaks ties its own way), each overlapping the
    feature map; the last eighth of the rows padding (zeros)."""
    if len(shape) != 2 or shape[1] != 4 or shape[0] is None:
        raise ValueError(f"kseg makes verification values only for (R, 4) box inputs, not {name!r} {shape}; "
                         "pass inputs= explicitly")
    rows = int(shape[0])
    count = rows - rows // 8
    spans = []
    for size in image_hw:  # (start, end) grid lines per axis: start inside the map, end past its start
        cells = max(int(size) // STRIDE, 1)
        lines = np.arange(-1, cells + 2) * STRIDE
        spans.append([(a, b) for a in lines for b in lines if a < b and a < cells * STRIDE and b > 0])
    ys, xs = (np.asarray(s, np.float32) for s in spans)
    boxes = np.zeros((batch, rows, 4), np.float32)
    for i in range(batch):
        pick = rng.choice(len(ys) * len(xs), size=count, replace=count > len(ys) * len(xs))
        y, x = ys[pick // len(xs)], xs[pick % len(xs)]
        boxes[i, :count] = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=-1)
    return boxes


def preprocess(raw, metadata):
    spec = (metadata or {}).get("preprocessing")
    if not spec:
        return (raw / 255.0).astype(np.float32)
    return np.asarray(resolve_preprocessing(spec).apply(raw), dtype=np.float32)


def _default_size(meta, axis):
    """The model's fixed size on `axis`, else its registry default, else 224."""
    ident = of_metadata(meta)
    for shape in (ident.input_shape, ident.spec.input_shape if ident.spec else None):
        if shape and shape[axis]:
            return shape[axis]
    return 224


def _read_image(path, h, w, c):
    """An image file (kseg.images.read_image: EXIF orientation applied) resized to h x w, float32 [h, w, c]."""
    from PIL import Image

    from kseg.images import read_image

    image = read_image(path, 3 if c == 3 else 1)
    im = Image.fromarray(image if c == 3 else image[..., 0]).resize((w, h), Image.BILINEAR)
    a = np.asarray(im, dtype=np.float32)
    return a if a.ndim == 3 else a[..., None]


def compare(ref, out, name, tol, task=None) -> OutputReport:
    """One output of a pair, compared as the model's task compares (element-wise and argmax by default)."""
    return (get_task(task) if task else Task()).compare(ref, out, name, tol)


def verify(a, b, *, inputs=None, images=None, input_size=None, batch=2, seed=0, tolerance=None) -> Report:
    """Run runners `a` (the reference) and `b` on the same inputs and compare every output.

    inputs: an explicit NHWC float32 batch (already preprocessed; a dict with the extra inputs for
    a model that has some); else `images` (file paths) or seeded random images, at `input_size` or
    the model's input size, through the model's preprocessing from the metadata, and generated
    extra inputs (make_inputs). tolerance: a pair kind of TOLERANCES or a dict.
    """
    kind = tolerance if isinstance(tolerance, str) else pair_kind(a, b)
    tol = dict(TOLERANCES[kind]) if not isinstance(tolerance, dict) else {**TOLERANCES[pair_kind(a, b)], **tolerance}
    if isinstance(tolerance, dict):
        kind = "custom"
    if inputs is None:
        # Fixed dims of either side win over dynamic ones (a fixed-size export of a dynamic model).
        shape = [x if x is not None else y for x, y in zip(a.input_shape, b.input_shape)]
        inputs = make_inputs(shape, a.metadata or b.metadata, input_size=input_size, batch=batch,
                             seed=seed, images=images, extra=a.extra_inputs or b.extra_inputs)
    if isinstance(inputs, dict):
        inputs = {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    else:
        inputs = np.asarray(inputs, dtype=np.float32)
    ref_outputs, outputs = a(inputs), b(inputs)
    shown = inputs[IMAGE] if isinstance(inputs, dict) else inputs
    if a.output_names and b.output_names:
        # By name: a detector's export carries its decoded detections beside the raw outputs, a
        # TF Serving export's raw_outputs signature only the raw ones; the shared ones are compared.
        ref, out = dict(zip(a.output_names, ref_outputs)), dict(zip(b.output_names, outputs))
    elif len(ref_outputs) != len(outputs):
        return Report(kind, tol, tuple(shown.shape), [], False,
                      f"{len(ref_outputs)} outputs against {len(outputs)}")
    else:
        names = a.output_names or b.output_names or [f"output_{i}" for i in range(len(ref_outputs))]
        ref, out = dict(zip(names, ref_outputs)), dict(zip(names, outputs))
    unmatched = sorted(set(ref) ^ set(out))
    if not set(ref) & set(out):
        return Report(kind, tol, tuple(shown.shape), [], False,
                      f"no output in common: {sorted(ref)} against {sorted(out)}", unmatched)
    meta = a.metadata or b.metadata
    reports = _task_of(meta).compare_outputs(ref, out, tol, postprocess=_decoder_of(meta), images=shown)
    return Report(kind, tol, tuple(shown.shape), reports, all(r.passed for r in reports), None,
                  unmatched or None)


def _task_of(metadata):
    """The task whose comparison applies: the architecture's, else the generic one."""
    name = (metadata or {}).get("architecture")
    return get_spec(name).task_object if name else Task()


def _decoder_of(metadata):
    """The decoder layer of a detector's metadata (its thresholds), else None."""
    ident = of_metadata(metadata or {})
    make = getattr(ident.spec, "postprocess", None) if ident.spec is not None else None
    return make(ident.options) if make is not None else None
