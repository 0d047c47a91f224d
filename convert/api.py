"""convert / verify / inspect: the library entry points behind `kseg convert|verify|inspect`."""

from __future__ import annotations

import os
import time

from convert import formats
from convert.io import atomic_output
from convert.verify import keras_runner, verify
from kseg import identity as md
from kseg.progress import stages


class VerificationError(ValueError):
    """The converted artifact's outputs differ from the source's beyond tolerance."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def load_runner(path, *, model=None, build_kwargs=None, unsafe=False, fmt=None):
    """Any artifact as a runner in its own runtime (weights-only formats through Keras)."""
    fmt = fmt or formats.detect(path)
    return formats.call(fmt, "load", os.fspath(path), model=model, build_kwargs=build_kwargs, unsafe=unsafe)


def load_keras(path, *, model=None, build_kwargs=None, unsafe=False, fmt=None):
    """Any artifact that holds (or, with an architecture, gives) a Keras model."""
    fmt = fmt or formats.detect(path)
    if formats.FORMATS[fmt].to_keras is None:
        raise ValueError(f"{path}: {fmt} files do not convert back to Keras")
    return formats.call(fmt, "to_keras", os.fspath(path), model=model, build_kwargs=build_kwargs, unsafe=unsafe)


def convert(src, dst=None, *, to=None, model=None, force=False, unsafe=False, build_kwargs=None,
            input_size=None, export_size=None, images=None, tolerance=None, version=None, progress=False,
            **options) -> dict:
    """Convert `src` to `dst` (format `to` or from dst's suffix), verify it against `src`, return a report.

    model: registry architecture for weights-only sources (checkpoints, weight files,
    state_dicts) without kseg metadata. options go to the writer (onnx: opset, dynamic,
    nchw; tflite: quantize). input_size=(h, w) is the size verification runs at (default:
    the model's); export_size=(h, w) fixes the exported input size (SavedModel, frozen graph,
    ONNX with dynamic=False) and is verified at. The output is written to a
    temporary path, verified there, and renamed into place only when verification passes.
    progress=True shows the current step (loading, writing, verifying) on standard error.
    """
    src = os.fspath(src)
    src_fmt = formats.detect(src)
    if dst is None:
        if to is None:
            raise ValueError("name the output (dst) or its format (to)")
        dst = formats.default_output(src, to)
    to = formats.target_format(dst, to)
    dst = os.fspath(dst)
    loading = {"model": model, "build_kwargs": build_kwargs, "unsafe": unsafe}
    with stages(progress, f"{os.path.basename(src.rstrip('/'))} -> {to}") as stage:
        stage(f"loading {src_fmt}")
        return _convert(src, src_fmt, dst, to, loading, stage, force=force, input_size=input_size,
                        export_size=export_size, images=images, tolerance=tolerance, version=version, **options)


def _convert(src, src_fmt, dst, to, loading, stage, *, force, input_size, export_size, images, tolerance, version,
             **options):
    model, build_kwargs = loading["model"], loading["build_kwargs"]
    start = time.perf_counter()
    keras_model = load_keras(src, fmt=src_fmt, **loading)
    if model is not None and md.model_info(keras_model) is None:
        keras_model = as_kseg_model(keras_model, model, build_kwargs, src)
    # The reference is the source in its own runtime where it has one (so recovering the Keras
    # model from it is verified too); weights-only sources run as the model they initialise.
    if formats.FORMATS[to].weights_only and md.model_info(keras_model) is None:
        raise ValueError(f"{src}: a Keras model without kseg metadata; {to} holds weights only, so name "
                         "its kseg architecture (--model NAME / model=NAME)")
    own_runtime = not formats.FORMATS[src_fmt].weights_only and src_fmt not in ("keras", "h5")
    reference = load_runner(src, fmt=src_fmt, **loading) if own_runtime else None
    source_meta = (reference.metadata if reference is not None else None) or {}
    meta = md.build_metadata(keras_model, class_names=source_meta.get("class_names"))
    if reference is None:
        reference = keras_runner(keras_model, meta)
    loaded_s = time.perf_counter() - start

    out = dst
    if to == "tf_serving":
        from convert.saved_model import serving_version_dir

        out = serving_version_dir(dst, version)
    with atomic_output(out, force=force) as tmp:
        stage(f"writing {to}")
        start = time.perf_counter()
        formats.call(to, "save", keras_model, tmp, metadata=meta, input_size=export_size, **options)
        saved_s = time.perf_counter() - start
        stage("verifying against the source")
        target = load_runner(tmp, fmt=to, model=meta["architecture"])
        report = verify(reference, target, images=images, input_size=input_size or export_size, tolerance=tolerance)
        if not report.passed:
            raise VerificationError(
                f"{src} -> {out}: the converted outputs differ beyond tolerance: {report.summary()}; "
                "nothing was written", report)
    return {
        "source": {"path": src, "format": src_fmt},
        "target": {"path": out, "format": to},
        "architecture": meta["architecture"],
        "load_seconds": round(loaded_s, 3),
        "save_seconds": round(saved_s, 3),
        "verification": report.to_dict(),
        "summary": report.summary(),
    }


def as_kseg_model(keras_model, name, build_kwargs, path):
    """A file's plain Keras model as the kseg architecture `name` (weights copied by layer name).

    Makes a model saved without kseg metadata convertible to weights-only formats, and
    checks that it really is that architecture (a mismatch raises naming the layers).
    """
    from kseg.weights import assign_weights

    rebuilt = md.rebuild(None, path, model=name, build_kwargs=build_kwargs)
    assign_weights(rebuilt, {layer.name: layer.get_weights() for layer in keras_model.layers if layer.weights}, path)
    return rebuilt


def verify_files(a, b, *, model=None, build_kwargs=None, unsafe=False, images=None, input_size=None,
                 tolerance=None, batch=2, seed=0):
    """verify() of two artifacts on disk; `a` is the reference."""
    ra = load_runner(a, model=model, build_kwargs=build_kwargs, unsafe=unsafe)
    rb = load_runner(b, model=model, build_kwargs=build_kwargs, unsafe=unsafe)
    return verify(ra, rb, images=images, input_size=input_size, tolerance=tolerance, batch=batch, seed=seed)


def inspect(path, *, model=None, unsafe=False) -> dict:
    """Format, metadata, inputs/outputs and parameter count of an artifact."""
    fmt = formats.detect(path)
    runner = load_runner(path, fmt=fmt, model=model, unsafe=unsafe)
    return {
        "path": os.fspath(path),
        "format": fmt,
        "description": formats.FORMATS[fmt].description,
        "metadata": runner.metadata,
        "inputs": {"image": [None, *runner.input_shape],
                   **{k: [None, *v] for k, v in (runner.extra_inputs or {}).items()}},
        "outputs": runner.output_names,
        "runtime": getattr(runner, "runtime", None),
        "parameters": _parameters(fmt, path, runner),
    }


def _parameters(fmt, path, runner):
    import numpy as np

    if fmt in ("saved_model", "tf_serving"):
        loaded = getattr(runner, "_keep", None)
        variables = getattr(loaded, "kseg_weights", None)
        values = variables.values() if variables is not None else loaded.signatures["serving_default"].variables
        return int(sum(np.prod(v.shape) for v in values))
    if fmt == "frozen_graph":
        from convert.frozen_graph import read_graph_def

        side = md.read_sidecar(path) or {}
        names = set((side.get("graph") or {}).get("constants", {}).values())
        total = 0
        for node in read_graph_def(path).node:
            if node.op == "Const" and (node.name in names or not names):
                total += int(np.prod([d.size for d in node.attr["value"].tensor.tensor_shape.dim]))
        return total
    if fmt == "onnx":
        try:
            import onnx
        except ImportError:
            return None
        graph = onnx.load(os.fspath(path), load_external_data=False).graph
        # kseg's files list the Keras weights; tf2onnx's own constants (shapes, axes) are not parameters.
        weights = set(((runner.metadata or {}).get("onnx") or {}).get("weights") or [])
        return int(sum(np.prod(t.dims) for t in graph.initializer if not weights or t.name in weights))
    model = getattr(runner, "keras_model", None)
    if fmt == "tflite" or model is None:
        return None
    return int(model.count_params())
