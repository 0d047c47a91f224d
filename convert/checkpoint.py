"""TensorFlow checkpoints: TF2 object-based (write and read) and TF1 name-based (read, via name maps).

A checkpoint holds weights only: the architecture comes from the `<prefix>.kseg.json` sidecar
kseg writes, or from `model=NAME`.
"""

from __future__ import annotations

import os

import numpy as np

from convert.verify import keras_runner
from kseg import identity as md

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def resolve(path) -> str:
    """The checkpoint prefix of `path`: a prefix, its `.index` file, or a directory with a `checkpoint` file."""
    import tensorflow as tf

    path = os.fspath(path)
    if path.endswith(".index"):
        path = path[: -len(".index")]
    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path}: a directory without a TF checkpoint (no `checkpoint` state file)")
        return latest
    if not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"{path}: no checkpoint ({path}.index not found)")
    return path


def reader(path):
    import tensorflow as tf

    prefix = resolve(path)
    try:
        return prefix, tf.train.load_checkpoint(prefix)
    except Exception as e:
        raise ValueError(f"{prefix}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


def is_object_based(path) -> bool:
    _, r = reader(path)
    return r.has_tensor(OBJECT_GRAPH_KEY)


# --- TF2 object-based -----------------------------------------------------------------


def save(model, path, *, metadata=None, **_):
    import tensorflow as tf

    tf.train.Checkpoint(model=model).write(os.fspath(path))
    if metadata is not None:
        md.write_sidecar(path, metadata)


def to_keras(path, *, model=None, build_kwargs=None, **_):
    import tensorflow as tf

    from kseg.weights import WeightsMismatchError

    prefix = resolve(path)
    meta = md.read_sidecar(prefix)
    keras_model = md.rebuild(meta, prefix, model=model, build_kwargs=build_kwargs)
    try:
        # Both ways: every variable of the model restored, every value in the file used.
        tf.train.Checkpoint(model=keras_model).read(prefix).assert_consumed()
    except (AssertionError, ValueError) as e:
        raise WeightsMismatchError(f"{prefix}: checkpoint does not fit {keras_model.name}: {str(e)[:2000]}") from None
    return md.attach(keras_model, meta)


def load(path, **options):
    keras_model = to_keras(path, **options)
    return keras_runner(keras_model, md.build_metadata(keras_model))


# --- TF1 name-based, through name maps ------------------------------------------------


def _slim_vgg16(get):
    """TF-slim `vgg_16` -> kseg vgg16 layer names.

    slim's fc6/fc7/fc8 are convolutions (7x7x512x4096, 1x1x4096x4096, 1x1x4096xN); on a
    7x7x512 pool5 they equal Keras' Flatten (NHWC, C order) + Dense, so a C-order reshape
    gives fc1/fc2/predictions. slim feeds RGB minus the mean; kseg's vgg16 expects Caffe BGR
    (the registry's preprocessing), so conv1_1's input channels are reversed.
    """
    from kseg.models.vgg import CFGS

    out = {}
    for b, convs in enumerate(CFGS["D"], start=1):
        for c in range(1, len(convs) + 1):
            scope = f"vgg_16/conv{b}/conv{b}_{c}"
            kernel, bias = get(f"{scope}/weights"), get(f"{scope}/biases")
            if (b, c) == (1, 1) and kernel is not None:
                kernel = kernel[:, :, ::-1, :]
            out[f"block{b}_conv{c}"] = [kernel, bias]
    for slim, keras_name in (("fc6", "fc1"), ("fc7", "fc2"), ("fc8", "predictions")):
        kernel, bias = get(f"vgg_16/{slim}/weights", optional=True), get(f"vgg_16/{slim}/biases", optional=True)
        if kernel is not None and bias is not None:
            out[keras_name] = [kernel.reshape(-1, kernel.shape[-1]), bias]
    return out


# name map: (prefix that identifies the layout, the registry classifier it fills, function)
NAME_MAPS = {"vgg_16": ("vgg16", _slim_vgg16)}


def detect_layout(names, path):
    for layout in NAME_MAPS:
        if any(n.startswith(layout + "/") for n in names):
            return layout
    raise ValueError(f"{path}: no known TF1 name layout (known: {sorted(NAME_MAPS)}); "
                     f"variables include {sorted(names)[:8]}")


def read_tf1(path) -> tuple[str, dict[str, list[np.ndarray]]]:
    """(layout's classifier name, arrays by kseg layer name) of a TF1 name-based checkpoint."""
    prefix, r = reader(path)
    names = set(r.get_variable_to_shape_map())
    layout = detect_layout(names, prefix)
    missing = []

    def get(name, optional=False):
        if name in names:
            return np.asarray(r.get_tensor(name), dtype=np.float32)
        if not optional:
            missing.append(name)
        return None

    classifier, fn = NAME_MAPS[layout]
    arrays = fn(get)
    if missing:
        from kseg.weights import WeightsMismatchError

        raise WeightsMismatchError(f"{prefix}: not a complete {layout} checkpoint: missing {missing[:20]}")
    return classifier, arrays


def tf1_to_keras(path, *, model=None, build_kwargs=None, **_):
    """A kseg model initialised from a TF1 checkpoint: the classifier itself, or a model whose backbone it is."""
    import kseg
    from kseg.weights import assign_weights

    prefix = resolve(path)
    classifier, arrays = read_tf1(prefix)
    name = model or classifier
    spec = kseg.get_spec(name)
    keras_model = md.rebuild(None, prefix, model=name, build_kwargs=build_kwargs)
    if name == classifier:
        assign_weights(keras_model, arrays, prefix)
    elif spec.backbone == classifier and spec.backbone_adapt is not None:
        assign_weights(keras_model, spec.backbone_adapt(arrays, keras_model, prefix), prefix, partial=True)
    else:
        raise ValueError(f"{prefix}: a {classifier} checkpoint; {name} is neither {classifier} nor built on it")
    return keras_model


def load_tf1(path, **options):
    keras_model = tf1_to_keras(path, **options)
    return keras_runner(keras_model, md.build_metadata(keras_model))
