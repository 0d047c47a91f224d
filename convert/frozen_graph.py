"""Frozen GraphDef `.pb`: variables folded into constants, input "image" (then any further inputs of
the model by name: Fast R-CNN's "proposals"), outputs by name.

Written with TF's convert_variables_to_constants_v2 over the serving function; the
`<file>.kseg.json` sidecar holds the metadata, the input/output tensor names and, for each
Keras weight path, the constant node that holds it (so kseg rebuilds the Keras model by name).
"""

from __future__ import annotations

import os

from convert.verify import Runner, extra_inputs
from kseg import identity as md


def save(model, path, *, metadata=None, input_size=None, **_):
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from convert.saved_model import serving_function
    from kseg.api import deployment_model

    model = deployment_model(model)  # a detector: raw outputs and decoded detections
    concrete = serving_function(model, input_size).get_concrete_function()
    # Which placeholder carries which variable: after freezing, each becomes a Const node of
    # the same name.
    path_of = {id(v.value.handle): v.path for v in model.weights}
    constants = {}
    for external, internal in zip(concrete.captured_inputs, concrete.graph.internal_captures):
        if id(external) in path_of:
            constants[path_of[id(external)]] = internal.op.name
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    with open(path, "wb") as f:
        f.write(graph_def.SerializeToString())
    side = dict(metadata or {}, outputs=list(model.output_names))
    side["graph"] = {
        "inputs": ["image:0", *(f"{n}:0" for n in extra_inputs(model))],
        "outputs": [f"{n}:0" for n in model.output_names],
        "constants": constants,
    }
    md.write_sidecar(path, side)


def read_graph_def(path):
    import tensorflow as tf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as f:
            graph_def.ParseFromString(f.read())
    except Exception as e:
        raise ValueError(f"{path}: not a GraphDef protobuf ({e})") from None
    if not graph_def.node:
        raise ValueError(f"{path}: an empty GraphDef (not a frozen graph?)")
    return graph_def


def _io_names(graph_def, side, path):
    graph = (side or {}).get("graph")
    if graph:
        return graph["inputs"], graph["outputs"]
    # No sidecar: the placeholders are the inputs, the nodes nothing consumes the outputs.
    inputs = [f"{n.name}:0" for n in graph_def.node if n.op == "Placeholder"]
    consumed = {i.split(":")[0].lstrip("^") for n in graph_def.node for i in n.input}
    outputs = [f"{n.name}:0" for n in graph_def.node
               if n.name not in consumed and n.op not in ("Placeholder", "Const", "NoOp")]
    if len(inputs) != 1:
        raise ValueError(f"{path}: {len(inputs)} placeholders {inputs}; kseg runs single-input graphs")
    return inputs, outputs


def load(path, *, fold_constants=False, **_):
    """A runner over the frozen graph, imported into its own tf.Graph and run in a Session.

    fold_constants=False turns Grappler's constant folding off for this session: with the
    weights as constants it pushes BatchNorm's multipliers into the conv filters
    (MulConvPushDown), a float reassociation that moves deep BN networks' outputs by about 1e-6
    relative (ResNet-101 DeepLab: 1.2e-5 max-abs). With it off the graph reproduces the Keras
    model bit for bit, which is what verification checks; TF's default runtime folds.
    """
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    graph_def = read_graph_def(path)
    side = md.read_sidecar(path)
    inputs, outputs = _io_names(graph_def, side, path)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    config = tf.compat.v1.ConfigProto()
    if not fold_constants:
        config.graph_options.rewrite_options.constant_folding = rewriter_config_pb2.RewriterConfig.OFF
    session = tf.compat.v1.Session(graph=graph, config=config)
    nodes = {n.name: n for n in graph_def.node}
    shapes = [[d.size if d.size >= 0 else None for d in nodes[i.split(":")[0]].attr["shape"].shape.dim]
              for i in inputs]
    dims = shapes[0]
    extra = {i.split(":")[0]: tuple(s[1:]) for i, s in zip(inputs[1:], shapes[1:])}  # "image:0" first

    def run(x):
        feed = {f"{k}:0": v for k, v in x.items()} if extra else {inputs[0]: x}
        return [np.asarray(o) for o in session.run(outputs, feed)]

    meta = {k: v for k, v in side.items() if k != "graph"} if side else None
    names = [o.split(":")[0] for o in outputs]
    runner = Runner(run, tuple(dims[1:]) if dims else (None, None, None), meta, "tf", names,
                    extra_inputs=extra or None)
    runner.session = session
    return runner


def to_keras(path, *, model=None, build_kwargs=None, **_):
    """Rebuild a kseg-written frozen graph as Keras: weights from the constants the sidecar names."""
    import tensorflow as tf

    from kseg.weights import WeightsMismatchError

    side = md.read_sidecar(path)
    constants = ((side or {}).get("graph") or {}).get("constants")
    if not constants:
        raise ValueError(f"{path}: no {md.sidecar_path(path)} naming its weight constants; only frozen graphs "
                         "written by kseg convert back to Keras")
    nodes = {n.name: n for n in read_graph_def(path).node}
    meta = {k: v for k, v in side.items() if k != "graph"}
    keras_model = md.rebuild(meta, path, model=model, build_kwargs=build_kwargs)
    missing = [v.path for v in keras_model.weights if constants.get(v.path) not in nodes]
    if missing:
        raise WeightsMismatchError(f"{path}: no constants for {missing[:20]}")
    for v in keras_model.weights:
        value = tf.make_ndarray(nodes[constants[v.path]].attr["value"].tensor)
        if tuple(value.shape) != tuple(v.shape):
            raise WeightsMismatchError(f"{path}: {v.path}: model {tuple(v.shape)}, graph {value.shape}")
        v.assign(value)
    return md.attach(keras_model, meta)
