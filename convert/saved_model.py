"""TensorFlow SavedModel: plain, and the TF Serving layout BASE/NAME/VERSION/.

The SavedModel holds a `tf.Module`, not the Keras model: it loads with plain
`tf.saved_model.load` in a process that never imports kseg or Keras. It has one
`serving_default` signature taking a float32 NHWC batch `image` (dynamic batch, and dynamic
H/W where the model allows), plus any further inputs of the model by their names (Fast R-CNN's
`proposals`), and returning a dict of named outputs; `kseg_weights` maps each Keras weight path
to its variable, so kseg rebuilds the Keras model by name.
"""

from __future__ import annotations

import os

from convert.verify import IMAGE, Runner, image_shape, input_specs, keras_runner
from kseg import identity as md


def serving_function(model, input_size=None):
    """A tf.function(image, *extra inputs) -> {output name: tensor} over the Keras model, with an
    input signature."""
    import tensorflow as tf

    shape = [None, *image_shape(model)]
    if input_size is not None:
        shape[1], shape[2] = input_size
    names = list(model.output_names)
    several = len(model.inputs) > 1

    @tf.function(input_signature=input_specs(model, shape))
    def serve(image, *extra):
        out = model([image, *extra] if several else image, training=False)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return {n: tf.identity(o, name=n) for n, o in zip(names, outs)}

    return serve


def save(model, path, *, metadata=None, input_size=None, **_):
    """Write the SavedModel; a detector's serving_default returns its raw outputs and its decoded
    detections (kseg.api.deployment_model)."""
    import tensorflow as tf

    from kseg.api import deployment_model

    model = deployment_model(model)
    path = os.fspath(path)
    module = tf.Module()
    module.kseg_weights = {v.path: v.value for v in model.weights}
    module.serve = serving_function(model, input_size)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    if metadata is not None:
        md.write_saved_model(path, dict(metadata, outputs=list(model.output_names)))


def serving_version_dir(base, version=None) -> str:
    """BASE/NAME/VERSION for TF Serving: `version`, or one more than the highest present (1 if none)."""
    base = os.fspath(base)
    if version is None:
        present = [int(n) for n in os.listdir(base) if n.isdigit()] if os.path.isdir(base) else []
        version = max(present, default=0) + 1
    return os.path.join(base, str(int(version)))


def resolve(path) -> str:
    """The SavedModel directory of `path`: itself, or the highest version of a TF Serving model dir."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isdir(path):
        versions = sorted(int(n) for n in os.listdir(path)
                          if n.isdigit() and os.path.isfile(os.path.join(path, n, "saved_model.pb")))
        if versions:
            return os.path.join(path, str(versions[-1]))
        raise ValueError(f"{path}: a directory, but not a SavedModel (no saved_model.pb) "
                         "nor a TF Serving model directory (no VERSION/saved_model.pb)")
    raise FileNotFoundError(f"{path}: no such SavedModel directory")


def _load(path):
    import tensorflow as tf

    directory = resolve(path)
    try:
        loaded = tf.saved_model.load(directory)
    except Exception as e:  # TF raises a zoo of types for damaged protos
        raise ValueError(f"{directory}: cannot load the SavedModel ({type(e).__name__}: {e})") from None
    return directory, loaded


def load(path, **_):
    """A runner over the `serving_default` signature (outputs in the metadata's order)."""
    import numpy as np
    import tensorflow as tf

    directory, loaded = _load(path)
    # kseg.serving exports keep the model's own outputs as `raw_outputs` (their serving_default
    # returns probabilities and a label map).
    key = "raw_outputs" if "raw_outputs" in loaded.signatures else "serving_default"
    if key not in loaded.signatures:
        raise ValueError(f"{directory}: no serving_default signature (has {list(loaded.signatures)})")
    fn = loaded.signatures[key]
    meta = md.read_saved_model(directory)
    _, specs = fn.structured_input_signature
    if len(specs) != 1 and IMAGE not in specs:
        raise ValueError(f"{directory}: serving_default takes {list(specs)}; kseg runs models with one image "
                         f"input, or an {IMAGE!r} input and others")
    arg = IMAGE if len(specs) > 1 else next(iter(specs))
    extra = {k: tuple(s.shape[1:]) for k, s in specs.items() if k != arg}
    names = (meta or {}).get("outputs") or sorted(fn.structured_outputs)

    def run(x):
        feed = {k: tf.constant(v) for k, v in x.items()} if extra else {arg: tf.constant(x)}
        out = fn(**feed)
        return [np.asarray(out[n]) for n in names]

    runner = Runner(run, tuple(specs[arg].shape[1:]), meta, "tf", names, extra_inputs=extra or None)
    runner._keep = loaded  # the signature's variables live as long as the loaded object
    return runner


def to_keras(path, *, model=None, build_kwargs=None, **_):
    """Rebuild a kseg-written SavedModel as Keras: the architecture from metadata, weights by path."""
    from kseg.weights import WeightsMismatchError

    directory, loaded = _load(path)
    meta = md.read_saved_model(directory)
    weights = getattr(loaded, "kseg_weights", None)
    if weights is None:
        raise ValueError(f"{directory}: not written by kseg (no kseg_weights); only kseg SavedModels convert "
                         "back to Keras")
    keras_model = md.rebuild(meta, directory, model=model, build_kwargs=build_kwargs)
    by_path = {k: v for k, v in weights.items()}
    expected = {v.path for v in keras_model.weights}
    missing, unexpected = sorted(expected - set(by_path)), sorted(set(by_path) - expected)
    mismatched = [f"{v.path}: model {tuple(v.shape)}, file {tuple(by_path[v.path].shape)}"
                  for v in keras_model.weights if v.path in by_path and tuple(v.shape) != tuple(by_path[v.path].shape)]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(f"{directory}: variables do not fit {keras_model.name}: missing {missing[:20]}, "
                                   f"unexpected {unexpected[:20]}, mismatched {mismatched[:20]}")
    for v in keras_model.weights:
        v.assign(by_path[v.path].numpy())
    return md.attach(keras_model, meta)


def keras_runner_of(path, **options):
    keras_model = to_keras(path, **options)
    return keras_runner(keras_model, md.build_metadata(keras_model))
