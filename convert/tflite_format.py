"""TFLite (float, and dynamic-range int8), run with the TFLite interpreter.

The converter takes a tf.function over the Keras model with a `serving_default` signature:
input `image` (NHWC float32; batch, and H/W where the model allows, dynamic: the interpreter
resizes the input to each batch it is given), outputs named by the model's output names.
SELECT_TF_OPS are allowed, so an op TFLite lacks becomes a Flex op instead of failing; the Flex
ops in the result and the layers that use them are recorded in the metadata. But neither
`tf.lite.Interpreter` of the tensorflow 2.21 wheel nor the ai-edge-litert wheel links the Flex
delegate, so such a file does not run on a stock Python install. kseg's only such op is
`MaxPoolWithArgmax` (SegNet's MaxPoolingWithArgmax2D; the ScatterNd of its unpooling is a
builtin): for TFLite those layers are traced with an equivalent made of builtin ops (see
`_argmax_pool_builtin`, bit-identical to the TF op, ties included), so every kseg model
converts to builtins only.

Metadata goes to a `<file>.kseg.json` sidecar (with a "tflite" entry: quantize, select ops).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings

import numpy as np

from convert.io import atomic_output
from convert.verify import IMAGE, Runner, image_shape, input_specs
from kseg import identity as md

QUANTIZE = (None, "dynamic")
SIGNATURE = "serving_default"


class TFLiteFileError(ValueError):
    """A file the TFLite interpreter cannot open (truncated, corrupt, not TFLite)."""


def export_tflite(model, path, *, quantize=None, input_size=None, metadata=None, force=False):
    """Write `model` to `path` as a TFLite flatbuffer (+ `path.kseg.json`) and return the path.

    quantize: None (float32) or "dynamic" (dynamic-range int8: weights stored as int8, activations
    float; no representative data needed). input_size=(H, W) fixes the input's spatial size.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    from kseg.api import deployment_model, nms_variant

    if metadata is None:
        metadata = md.build_metadata(model)
    # A detector: its raw outputs and its decoded detections, with the NMS made of builtin ops.
    model = deployment_model(model)
    metadata = dict(metadata, outputs=list(model.output_names))
    with _builtin_argmax_pooling(model) as rewritten, nms_variant(model, "v5"):
        function, module = _serving_function(model, input_size)
        data = _converter(function, module, quantize).convert()
        select_ops = flex_ops(data)
        layers = _layers_using(function, model, select_ops)
    meta = dict(metadata, tflite={"quantize": quantize, "select_tf_ops": select_ops, "select_tf_layers": layers,
                                  "builtin_rewrites": rewritten})
    path = os.fspath(path)
    with atomic_output(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        md.write_sidecar(tmp, meta)
    return path


def _serving_function(model, input_size):
    import tensorflow as tf

    shape = [None, *image_shape(model)]
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        if any(have is not None and have != want for have, want in zip(shape[1:3], (h, w))):
            raise ValueError(f"{model.name}: input_size {(h, w)} does not fit the model's fixed input "
                             f"{tuple(shape[1:3])}")
        shape[1], shape[2] = h, w
    names = list(model.output_names)
    several = len(model.inputs) > 1

    @tf.function(input_signature=input_specs(model, shape))  # the image, then any other inputs (proposals)
    def serve(image, *extra):
        out = model([image, *extra] if several else image, training=False)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return {n: o for n, o in zip(names, outs)}

    # The converter freezes the variables the trackable object reaches; Keras 3 variables are
    # reached through their tf.Variable, not through the model object.
    module = tf.Module()
    module.variables_ = [v.value for v in model.weights]
    module.serve = serve
    return serve, module


def _converter(function, module, quantize):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], module)
    if quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # Builtins wherever they exist; Flex (TF kernels) only for ops with no builtin.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    return converter


def flex_ops(data) -> list[str]:
    """The TF ops a TFLite flatbuffer runs through the Flex delegate (custom op codes `Flex<Op>`)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(data, 0)
    codes = (model.OperatorCodes(i).CustomCode() for i in range(model.OperatorCodesLength()))
    return sorted({c.decode()[len("Flex"):] for c in codes if c and c.startswith(b"Flex")})


@contextlib.contextmanager
def _builtin_argmax_pooling(model):
    """Trace the model's MaxPoolingWithArgmax2D layers with builtin ops; yields their names."""
    from kseg.layers import MaxPoolingWithArgmax2D

    layers = [
        layer for layer in _all_layers(model)
        if isinstance(layer, MaxPoolingWithArgmax2D) and layer.pool_size == layer.strides
    ]
    for layer in layers:
        # An instance attribute shadows the class's call for this trace only.
        layer.call = functools.partial(_argmax_pool_builtin, pool=layer.pool_size, padding=layer.padding)
    try:
        yield [layer.name for layer in layers]
    finally:
        for layer in layers:
            del layer.call


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _argmax_pool_builtin(x, *, pool, padding):
    """tf.nn.max_pool_with_argmax (per-image indices) for non-overlapping windows, in TFLite builtins.

    Windows become a last axis (reshape/transpose); max and first-max argmax over it match the
    TF kernel bit for bit, ties included (both take the first maximum in row-major order).
    Written here because TFLite has no argmax pooling op and no Flex delegate in its wheels.
    """
    import tensorflow as tf

    kh, kw = pool
    # Shape arithmetic in int32 (TFLite's FloorDiv is int32-only), the indices in int64.
    shape = tf.shape(x, out_type=tf.int32)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    if padding == "same":
        ho, wo = (h + kh - 1) // kh, (w + kw - 1) // kw
        pad_h, pad_w = ho * kh - h, wo * kw - w
        top, left = pad_h // 2, pad_w // 2
        # -inf padding never wins a window: a "same" window always holds a real element.
        x = tf.pad(x, [[0, 0], [top, pad_h - top], [left, pad_w - left], [0, 0]], constant_values=float("-inf"))
    else:
        ho, wo = h // kh, w // kw
        top = left = tf.constant(0, tf.int32)
        x = x[:, : ho * kh, : wo * kw, :]
    windows = tf.reshape(x, tf.stack([b * ho, kh, wo, kw, c]))
    windows = tf.reshape(tf.transpose(windows, (0, 2, 4, 1, 3)), tf.stack([b, ho, wo, c, kh * kw]))
    pooled = tf.reduce_max(windows, axis=-1)
    k = tf.argmax(windows, axis=-1, output_type=tf.int64)
    dy = tf.gather(tf.constant(np.repeat(np.arange(kh), kw), tf.int64), k)
    dx = tf.gather(tf.constant(np.tile(np.arange(kw), kh), tf.int64), k)
    oy = tf.reshape(tf.cast(tf.range(ho) * kh - top, tf.int64), (-1, 1, 1))
    ox = tf.reshape(tf.cast(tf.range(wo) * kw - left, tf.int64), (1, -1, 1))
    w64, c64 = tf.cast(w, tf.int64), tf.cast(c, tf.int64)
    index = ((oy + dy) * w64 + (ox + dx)) * c64 + tf.range(c64, dtype=tf.int64)
    return [pooled, index]


def _layers_using(function, model, ops):
    """Names of the Keras layers whose traced ops include any of `ops`."""
    if not ops:
        return []
    graph = function.get_concrete_function().graph
    names = {layer.name for layer in model.layers}
    found = set()
    for op in graph.get_operations():
        if op.type in ops:
            for part in op.name.split("/"):
                # Keras scopes a layer's ops as `<layer>_<call index>`.
                base = re.sub(r"_\d+$", "", part)
                if part in names or base in names:
                    found.add(part if part in names else base)
    return sorted(found)


# --- reading ---------------------------------------------------------------------------


def _check_flatbuffer(path):
    """Walk the flatbuffer's tables in Python first: the interpreter segfaults on a truncated file."""
    import mmap

    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 16:
            raise TFLiteFileError(f"{path}: too short for a TFLite file (truncated?)")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if data[4:8] != b"TFL3":
            raise TFLiteFileError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
        model = schema.Model.GetRootAsModel(data, 0)
        for i in range(model.SubgraphsLength()):
            graph = model.Subgraphs(i)
            for t in range(graph.TensorsLength()):
                graph.Tensors(t).ShapeAsNumpy()
            for o in range(graph.OperatorsLength()):
                graph.Operators(o).InputsAsNumpy()
        for b in range(model.BuffersLength()):
            buffer = model.Buffers(b)
            if buffer.DataLength():
                buffer.Data(buffer.DataLength() - 1)  # raises past the end of a truncated file
            if buffer.Offset() > 1 and buffer.Offset() + buffer.Size() > len(data):
                raise TFLiteFileError(f"{path}: buffer {b} ends past the end of the file (truncated?)")
    except TFLiteFileError:
        raise
    except Exception as e:  # flatbuffers raises struct.error / IndexError on out-of-range offsets
        raise TFLiteFileError(f"{path}: corrupt or truncated TFLite file ({type(e).__name__}: {e})") from None
    finally:
        data.close()


def _interpreter(path):
    import tensorflow as tf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such TFLite file")
    _check_flatbuffer(path)
    try:
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it moves to ai_edge_litert; it is the one with Flex linked.
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=path, num_threads=os.cpu_count())
    except (ValueError, RuntimeError) as e:
        raise TFLiteFileError(f"{path}: the TFLite interpreter cannot open it (truncated, corrupt or not TFLite): "
                              f"{e}") from None
    return interpreter


def load_tflite(path, **_) -> Runner:
    """A runner over a TFLite file: NHWC float32 in (any batch; the input is resized), outputs in model order."""
    path = os.fspath(path)
    interpreter = _interpreter(path)
    meta = md.read_sidecar(path)
    signatures = interpreter.get_signature_list()
    if SIGNATURE not in signatures:
        raise TFLiteFileError(f"{path}: no {SIGNATURE!r} signature (has {sorted(signatures)})")
    runner_fn = interpreter.get_signature_runner(SIGNATURE)
    inputs = runner_fn.get_input_details()
    if len(inputs) != 1 and IMAGE not in inputs:
        raise ValueError(f"{path}: takes inputs {sorted(inputs)}; kseg runs models with one image input, "
                         f"or an {IMAGE!r} input and others")
    input_name = next(iter(inputs)) if len(inputs) == 1 else IMAGE
    shape = tuple(int(d) if d >= 0 else None for d in inputs[input_name]["shape_signature"][1:])
    extra = {k: tuple(int(d) if d >= 0 else None for d in v["shape_signature"][1:])
             for k, v in inputs.items() if k != input_name}
    names = (meta or {}).get("outputs") or sorted(signatures[SIGNATURE]["outputs"])
    quantized = ((meta or {}).get("tflite") or {}).get("quantize") is not None

    needs_flex = ((meta or {}).get("tflite") or {}).get("select_tf_ops")

    def run(x):
        try:
            out = runner_fn(**(x if extra else {input_name: x}))
        except RuntimeError as e:
            if "Flex delegate" in str(e) or needs_flex:
                raise RuntimeError(f"{path}: needs the TFLite Flex delegate for TF op(s) {needs_flex or '?'}, which "
                                   f"this interpreter does not link: {e}") from None
            raise
        return [out[n] for n in names]

    runner = Runner(run, shape, meta, "tflite", names, quantized, extra_inputs=extra or None)
    runner.interpreter = interpreter
    return runner
