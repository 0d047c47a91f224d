"""ONNX through tf2onnx, run with ONNX Runtime.

tf2onnx converts a *structure-only* graph: the model is traced with `stateless_call`, every
Keras variable a graph input, so the converter's optimizer passes (which deep-copy the graph,
constants included, on every pass) never see the weights. The real weights are then added as
ONNX initializers named by Keras variable path (`block1_conv1/kernel`), in Keras layout; the
layout changes tf2onnx needs (HWIO -> OIHW kernels, BatchNorm folding) are graph nodes on those
initializers that ONNX Runtime constant-folds when it opens the file. This keeps full-size
FCN-8s (134M parameters) under 2 GB peak RSS (a frozen-graph conversion needs over 12 GB), and
lets `onnx_to_keras` recover every weight by name with no layout guessing.

Dynamic H/W: tf2onnx rewrites a dilated convolution (SpaceToBatchND -> Conv2D -> BatchToSpaceND
in TF) into one ONNX Conv with `dilations` only when H and W are static; with dynamic H/W it
emits a SpaceToDepth/DepthToSpace chain, numerically the same but slower. `input_size=(H, W)`
gives the fixed-size export (dynamic batch kept).
"""

from __future__ import annotations

import json
import os

import numpy as np

from convert.io import atomic_output
from convert.verify import Runner, extra_inputs, input_specs
from kseg import identity as md

MIN_OPSET, MAX_OPSET = 13, 18  # tf2onnx 1.17 writes opsets up to 18; kseg's ops need >= 13
METADATA_KEY = "kseg"
INPUT_NAME = "image"
# A protobuf cannot exceed 2 GiB; bigger models keep their initializers in `<file>.data`.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


class OnnxConversionError(RuntimeError):
    """tf2onnx left TF ops it cannot convert in the graph; ONNX Runtime would refuse the file."""


class OnnxFileError(ValueError):
    """A file that ONNX Runtime cannot open (truncated, corrupt, not ONNX)."""


def export_onnx(model, path, *, opset=17, dynamic=True, nchw=False, input_size=None, metadata=None,
                external_data=None, force=False):
    """Write `model` to `path` as ONNX and return the path.

    opset: 13..18. dynamic: batch, H and W dynamic (where the Keras model allows); False fixes
    the batch to 1 and H/W to `input_size` or the model's input size. input_size=(H, W): fixed
    spatial size, batch still dynamic unless dynamic=False. nchw: the ONNX input is NCHW
    (torch-style clients); outputs keep the model's layout. metadata: the kseg metadata dict
    (default: build_metadata(model)), stored as JSON in metadata_props["kseg"]. external_data:
    keep initializers in `<path>.data`; None decides by size (> 1.9 GB).
    Raises OnnxConversionError naming the ops tf2onnx could not convert.
    """
    import onnx

    from kseg.api import deployment_model, nms_variant

    _check_opset(opset)
    if metadata is None:
        metadata = md.build_metadata(model)
    # A detector: its raw outputs and its decoded detections, NMS in the graph (ONNX NonMaxSuppression;
    # per-class boxes through the coordinate offset, which tf2onnx converts).
    model = deployment_model(model)
    metadata = dict(metadata, outputs=list(model.output_names))
    with nms_variant(model, "offset"):
        proto, values = _convert_structure(model, opset=opset, dynamic=dynamic, nchw=nchw, input_size=input_size)
    _check_loadable(proto, model)
    # The weights' names: tf2onnx adds small constant initializers of its own (shapes, axes).
    meta = dict(metadata, onnx={"opset": int(opset), "input_layout": "NCHW" if nchw else "NHWC",
                                "weights": [name for name, _ in values]})
    _set_metadata(proto, meta)
    for name, variable in values:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(variable.numpy()), name))
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    path = os.fspath(path)
    with atomic_output(path, force=force) as tmp:
        if external:
            # `location` is relative to the .onnx file, so it names the final file, and its temporary
            # copy (`tmp.data`) is renamed along with the model by atomic_output.
            data_name = os.path.basename(tmp) + ".data"
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            _relocate_external(tmp, data_name, os.path.basename(path) + ".data")
        else:
            onnx.save_model(proto, tmp)
    return path


def _check_opset(opset):
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"ONNX opset {opset!r} is not supported: tf2onnx 1.17 writes opsets {MIN_OPSET}..{MAX_OPSET} "
            f"(kseg's default is 17)"
        )


def _input_shape(model, dynamic, input_size):
    shape = list(model.inputs[0].shape)  # the image input (Fast R-CNN's proposals follow it)
    if len(shape) != 4:
        raise ValueError(f"{model.name}: ONNX export needs one NHWC image input, got input shape {shape}")
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        for axis, (want, have) in enumerate(((h, shape[1]), (w, shape[2])), start=1):
            if have is not None and have != want:
                raise ValueError(f"{model.name}: input_size {tuple(input_size)} does not fit the model's "
                                 f"fixed input {tuple(shape[1:3])}")
        shape[1], shape[2] = h, w
    if not dynamic:
        if shape[1] is None or shape[2] is None:
            raise ValueError(f"{model.name}: dynamic=False needs input_size=(H, W); the model accepts any size")
        shape[0] = 1
    else:
        shape[0] = None
    return shape


def _convert_structure(model, *, opset, dynamic, nchw, input_size):
    """tf2onnx on the model with its variables as graph inputs; returns (proto, [(name, variable)])."""
    import tensorflow as tf
    import tf2onnx

    trainable, frozen = list(model.trainable_variables), list(model.non_trainable_variables)
    variables = trainable + frozen
    names = [v.path for v in variables]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{model.name}: variable paths are not unique ({dupes[:5]}); cannot name initializers")
    placeholder = [f"kseg_weight_{i}" for i in range(len(variables))]
    signature = input_specs(model, _input_shape(model, dynamic, input_size))  # the image, then any others
    extra = len(signature) - 1
    signature += [tf.TensorSpec(v.shape, v.dtype, name=p) for v, p in zip(variables, placeholder)]
    count = len(trainable)

    @tf.function(input_signature=signature)
    def structure(image, *rest):
        inputs, weights = ([image, *rest[:extra]] if extra else image), rest[extra:]
        out, _ = model.stateless_call(list(weights[:count]), list(weights[count:]), inputs, training=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    proto, _ = tf2onnx.convert.from_function(
        structure, input_signature=signature, opset=opset, inputs_as_nchw=[INPUT_NAME] if nchw else None
    )
    graph = proto.graph
    renames = dict(zip(placeholder, names))
    renames.update(zip([o.name for o in graph.output], model.output_names))
    _pass_inputs_through(graph, renames)
    _rename(graph, renames)
    _repair_output_ranks(graph, model)
    _explicit_dilated_pads(graph)
    _name_dims(graph, nchw)
    return proto, list(zip(names, variables))


def _explicit_dilated_pads(graph):
    """Give every dilated stride-1 Conv explicit pads in place of auto_pad SAME_UPPER/LOWER.

    tf2onnx keeps a "SAME" TF conv as auto_pad, and ONNX Runtime refuses auto_pad on a dilated
    Conv ("Dilation not supported for AutoPadType::SAME_UPPER"). At stride 1 the padding does not
    depend on the input size: d * (k - 1) per axis, the odd pixel after (SAME_UPPER, TF's split)
    or before (SAME_LOWER), so the explicit pads are the same convolution.
    """
    import onnx

    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: a for a in node.attribute}
        auto_pad = onnx.helper.get_attribute_value(attrs["auto_pad"]) if "auto_pad" in attrs else b"NOTSET"
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else []
        if auto_pad not in (b"SAME_UPPER", b"SAME_LOWER") or max(dilations, default=1) == 1:
            continue
        strides, kernel = list(attrs["strides"].ints), list(attrs["kernel_shape"].ints)
        if any(s != 1 for s in strides):  # TF refuses stride > 1 with dilation > 1; never emitted
            raise ValueError(f"ONNX Conv {node.name}: dilations {dilations} with strides {strides}")
        totals = [d * (k - 1) for d, k in zip(dilations, kernel)]
        small = [t // 2 for t in totals]
        large = [t - t // 2 for t in totals]
        begins, ends = (small, large) if auto_pad == b"SAME_UPPER" else (large, small)
        node.attribute.remove(attrs["auto_pad"])
        node.attribute.append(onnx.helper.make_attribute("pads", begins + ends))


def _repair_output_ranks(graph, model):
    """Check every graph output has the Keras output's rank; undo tf2onnx's stray leading axis.

    tf2onnx 1.17's optimizers now and then (a few HED conversions in ten, varying from run to
    run) drop the final `Squeeze(axis 0)` after the `Reshape([1, -1, 0, 0, 1])` that they make of
    a 1-channel NCHW->NHWC transpose, leaving that output [1, N, H, W, 1]. The stray axis is
    always a leading 1, so a Squeeze on axis 0 restores the output exactly; any other rank
    mismatch is refused rather than written. The rest of the graph is consistent with the
    rank-5 tensor (when the pass cancelled a Squeeze -> Unsqueeze pair, HED's fuse branch reads
    it through a `Reshape([-1, 1, 0, 0])` whose zeros copy dims 2 and 3), so the nodes that
    read it keep reading it; only the graph output gets the Squeeze.
    """
    import onnx

    outputs = model.outputs
    for value, tensor in zip(graph.output, outputs):
        want = len(tensor.shape)
        dims = value.type.tensor_type.shape.dim
        if len(dims) == want:
            continue
        if len(dims) == want + 1 and dims[0].dim_value == 1:
            # The producer and every node reading its tensor move to a fresh name; a Squeeze right
            # after the producer (nodes stay in topological order) writes the output's name.
            index = next(i for i, n in enumerate(graph.node) if value.name in n.output)
            taken = {o for n in graph.node for o in n.output}
            stray = next(f"{value.name}__kseg_unsqueezed{i or ''}" for i in range(len(taken) + 1)
                         if f"{value.name}__kseg_unsqueezed{i or ''}" not in taken)
            _rename(graph, {value.name: stray}, outputs=False)
            axes = stray + "__axes"
            # A Constant node, not an initializer: initializers are the Keras weights, by name.
            graph.node.insert(index + 1, onnx.helper.make_node(
                "Constant", [], [axes], value=onnx.numpy_helper.from_array(np.array([0], dtype=np.int64))))
            graph.node.insert(index + 2, onnx.helper.make_node("Squeeze", [stray, axes], [value.name],
                                                               name=stray + "__squeeze"))
            del dims[0]
            continue
        raise OnnxConversionError(
            f"{model.name}: tf2onnx produced output {value.name!r} with rank {len(dims)}, the Keras model's "
            f"has rank {want}; nothing was written"
        )


def _pass_inputs_through(graph, renames):
    """An output that is an input passed through (Fast R-CNN's `proposals`) has the input's name, and
    an ONNX value has one name: the graph output becomes the input's value itself, without
    tf2onnx's Identity node."""
    inputs = {i.name for i in graph.input}
    for value in graph.output:
        if renames.get(value.name) not in inputs:
            continue
        node = next(n for n in graph.node if value.name in n.output)
        if node.op_type != "Identity" or node.input[0] != renames[value.name]:
            raise OnnxConversionError(f"output {renames[value.name]!r} has an input's name but is not that input")
        graph.node.remove(node)


def _rename(graph, renames, *, outputs=True):
    for value in list(graph.input) + (list(graph.output) if outputs else []):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _name_dims(graph, nchw):
    # tf2onnx names dynamic dims `unk__28`; readable names help whoever inspects the file.
    axes = ("batch", "channels", "height", "width") if nchw else ("batch", "height", "width", "channels")
    for dim, axis in zip(graph.input[0].type.tensor_type.shape.dim, axes):
        if dim.dim_param:
            dim.dim_param = axis


def _check_loadable(proto, model):
    """Refuse a graph with TF ops left in it; then let ONNX Runtime open the structure."""
    import onnx
    import onnxruntime as ort

    left = [n for n in proto.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type, n.domain)]
    left += [n for n in proto.graph.node if n.domain not in _ONNX_DOMAINS]
    if left:
        ops = sorted({n.op_type for n in left})
        nodes = sorted({n.name for n in left})
        raise OnnxConversionError(
            f"{model.name}: tf2onnx cannot convert TF op(s) {ops} (nodes {nodes[:10]}); ONNX Runtime would refuse "
            "the file, so nothing was written"
        )
    # Still weights-as-inputs: cheap to open, and ONNX Runtime checks every node's schema and types.
    # Then the weights stop being inputs: they become initializers.
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types, all bare Exception subclasses
        raise OnnxConversionError(f"{model.name}: the converted graph does not load in ONNX Runtime: {e}") from None
    graph = proto.graph
    keep = [i for i in graph.input if i.name == INPUT_NAME or i.name in extra_inputs(model)]
    del graph.input[:]
    graph.input.extend(keep)


def _set_metadata(proto, meta):
    import kseg

    proto.producer_name = "kseg"
    proto.producer_version = kseg.__version__
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)


def _relocate_external(tmp, data_name, final_name):
    """Point the initializers of the saved `tmp` at `final_name` (the data file's name after the rename)."""
    import onnx

    proto = onnx.load(tmp, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data_name:
                entry.value = final_name
    onnx.save_model(proto, tmp)


# --- reading ---------------------------------------------------------------------------


def _session(path):
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the warnings about folded initializers are expected
    try:
        return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxFileError(f"{path}: ONNX Runtime cannot open it (truncated, corrupt or not ONNX): {e}") from None


def read_metadata(path) -> dict | None:
    """The kseg metadata of an ONNX file, or None if kseg did not write it."""
    import onnx

    path = os.fspath(path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise OnnxFileError(f"{path}: not a readable ONNX file (truncated or corrupt?): {e}") from None
    return _metadata_from({p.key: p.value for p in proto.metadata_props}, path)


def _metadata_from(props, path):
    if METADATA_KEY not in props:
        return None
    try:
        meta = json.loads(props[METADATA_KEY])
    except ValueError as e:
        raise OnnxFileError(f"{path}: metadata_props[{METADATA_KEY!r}] is not valid JSON ({e})") from None
    return meta if isinstance(meta, dict) else None


def load_onnx(path, **_) -> Runner:
    """A runner over an ONNX file in ONNX Runtime (CPU): NHWC float32 in, outputs in the model's order.

    NCHW files (nchw=True exports) are fed transposed, so callers always pass NHWC.
    """
    session = _session(path)
    meta = _metadata_from(session.get_modelmeta().custom_metadata_map, os.fspath(path))
    inputs = session.get_inputs()
    if len(inputs) != 1 and INPUT_NAME not in [i.name for i in inputs]:
        raise ValueError(f"{path}: takes inputs {[i.name for i in inputs]}; kseg runs models with one image "
                         f"input, or an {INPUT_NAME!r} input and others")
    image = inputs[0] if len(inputs) == 1 else next(i for i in inputs if i.name == INPUT_NAME)
    extra = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape[1:]) for i in inputs if i is not image}
    nchw = ((meta or {}).get("onnx") or {}).get("input_layout") == "NCHW"
    dims = [d if isinstance(d, int) else None for d in image.shape]
    shape = (dims[2], dims[3], dims[1]) if nchw else tuple(dims[1:])
    input_name = image.name
    names = [o.name for o in session.get_outputs()]

    def run(x):
        feed = dict(x) if extra else {input_name: x}
        if nchw:
            feed[input_name] = np.ascontiguousarray(feed[input_name].transpose(0, 3, 1, 2))
        return session.run(None, feed)

    runner = Runner(run, shape, meta, "onnxruntime", names, extra_inputs=extra or None)
    runner.session = session
    return runner


def onnx_to_keras(path, *, model=None, build_kwargs=None, **_):
    """Rebuild a kseg-written ONNX file as a Keras model: architecture from its metadata, weights by name."""
    import onnx
    from onnx import numpy_helper

    from kseg.weights import WeightsMismatchError

    path = os.fspath(path)
    try:
        proto = onnx.load(path)
    except Exception as e:
        raise OnnxFileError(f"{path}: not a readable ONNX file (truncated or corrupt?): {e}") from None
    meta = _metadata_from({p.key: p.value for p in proto.metadata_props}, path)
    if meta is None and model is None:
        raise ValueError(f"{path}: not written by kseg (no metadata_props[{METADATA_KEY!r}]); only kseg ONNX files "
                         "convert back to Keras")
    keras_model = md.rebuild(meta, path, model=model, build_kwargs=build_kwargs)
    arrays = {t.name: t for t in proto.graph.initializer}
    expected = {v.path for v in keras_model.weights}
    missing = sorted(expected - set(arrays))
    mismatched = [f"{v.path}: model {tuple(v.shape)}, file {tuple(arrays[v.path].dims)}"
                  for v in keras_model.weights if v.path in arrays and tuple(v.shape) != tuple(arrays[v.path].dims)]
    if missing or mismatched:
        raise WeightsMismatchError(f"{path}: initializers do not fit {keras_model.name}: missing {missing[:20]}, "
                                   f"mismatched {mismatched[:20]}")
    # Initializers that are not Keras variables are graph constants tf2onnx made (shapes, axes).
    for v in keras_model.weights:
        v.assign(numpy_helper.to_array(arrays[v.path]))
    return md.attach(keras_model, meta)
