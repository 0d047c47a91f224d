"""Format detection and the load/save dispatch table.

Each format names functions as "module:function" strings, imported only when used, so a
missing optional dependency (onnx, tflite) affects only its own formats.

- load(path, **options) -> runner: the artifact in its own runtime, for verification;
- to_keras(path, *, model=None, build_kwargs=None, unsafe=False) -> keras.Model;
- save(model, path, *, metadata, **options): write the artifact at `path`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import zipfile


class FormatUnavailable(RuntimeError):
    """The format's module or its dependencies are not installed."""


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    description: str
    suffix: str  # the default suffix of an output ("" for directories / prefixes)
    load: str | None
    to_keras: str | None
    save: str | None
    weights_only: bool = False


FORMATS = {f.name: f for f in [
    Format("keras", "Keras 3 .keras archive", ".keras",
           "convert.keras_format:load", "convert.keras_format:load_keras", "convert.keras_format:save_keras"),
    Format("h5", "Keras full model in HDF5 (Keras 3 or legacy tf.keras 2.x)", ".h5",
           "convert.keras_format:load", "convert.keras_format:load_keras", "convert.keras_format:save_keras"),
    Format("weights_h5", "Keras weights in HDF5 (.weights.h5 or legacy) + an architecture", ".weights.h5",
           "convert.keras_format:load_weights", "convert.keras_format:load_weights_model",
           "convert.keras_format:save_weights", weights_only=True),
    Format("saved_model", "TensorFlow SavedModel (serving_default signature)", "",
           "convert.saved_model:load", "convert.saved_model:to_keras", "convert.saved_model:save"),
    Format("tf_serving", "SavedModel in the TF Serving layout BASE/NAME/VERSION/", "",
           "convert.saved_model:load", "convert.saved_model:to_keras", "convert.tf_serving:save_format"),
    Format("frozen_graph", "frozen GraphDef .pb (constants, input 'image', named outputs)", ".pb",
           "convert.frozen_graph:load", "convert.frozen_graph:to_keras", "convert.frozen_graph:save"),
    Format("checkpoint", "TF2 object-based checkpoint (tf.train.Checkpoint) + an architecture", "",
           "convert.checkpoint:load", "convert.checkpoint:to_keras", "convert.checkpoint:save", weights_only=True),
    Format("tf1_checkpoint", "TF1 name-based checkpoint, read through name maps (slim vgg_16)", "",
           "convert.checkpoint:load_tf1", "convert.checkpoint:tf1_to_keras", None, weights_only=True),
    Format("onnx", "ONNX through tf2onnx, run with ONNX Runtime", ".onnx",
           "convert.onnx_format:load_onnx", "convert.onnx_format:onnx_to_keras", "convert.formats:_save_onnx"),
    Format("tflite", "TFLite flatbuffer (float or dynamic-range int8), run with the TFLite interpreter", ".tflite",
           "convert.tflite_format:load_tflite", None, "convert.formats:_save_tflite"),
    Format("safetensors", "torchvision-layout state_dict as .safetensors", ".safetensors",
           "convert.formats:_load_state_dict", "convert.formats:_state_dict_to_keras",
           "convert.formats:_save_safetensors", weights_only=True),
    Format("state_dict", "torchvision-layout state_dict (.pth/.pt/.npz; read only)", "",
           "convert.formats:_load_state_dict", "convert.formats:_state_dict_to_keras", None, weights_only=True),
]}

SUFFIXES = {".keras": "keras", ".onnx": "onnx", ".tflite": "tflite", ".pb": "frozen_graph",
            ".safetensors": "safetensors", ".pth": "state_dict", ".pt": "state_dict", ".npz": "state_dict"}


def resolve(spec: str):
    """Import "module:function"; a missing module raises FormatUnavailable."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise FormatUnavailable(f"{module} is unavailable ({e}); install the matching kseg extra") from None


def call(format_name: str, role: str, *args, **kwargs):
    fmt = FORMATS[format_name]
    spec = getattr(fmt, role)
    if spec is None:
        raise ValueError(f"format {format_name!r} cannot {role.replace('_', ' ')}")
    return resolve(spec)(*args, **kwargs)


# --- detection ---------------------------------------------------------------------


def detect(path) -> str:
    """The format of an existing file, directory or checkpoint prefix, by layout, content and suffix."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return "saved_model"
        if any(n.isdigit() and os.path.isfile(os.path.join(path, n, "saved_model.pb")) for n in os.listdir(path)):
            return "tf_serving"
        if os.path.isfile(os.path.join(path, "checkpoint")):
            return _checkpoint_kind(path)
        raise ValueError(f"{path}: a directory, but not a SavedModel (no saved_model.pb), a TF Serving "
                         "model (no VERSION/saved_model.pb) or a checkpoint directory")
    if not os.path.exists(path):
        if os.path.exists(path + ".index"):
            return _checkpoint_kind(path)
        raise FileNotFoundError(f"{path}: no such file or directory")
    lower = path.lower()
    if lower.endswith(".index"):
        return _checkpoint_kind(path)
    if os.path.basename(lower) == "saved_model.pb":
        return "saved_model"
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        return _h5_kind(path)
    if lower.endswith((".h5", ".hdf5")):
        raise ValueError(f"{path}: not an HDF5 file (bad signature; truncated or another format?)")
    if head[4:8] == b"TFL3":
        return "tflite"
    if lower.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a .keras archive (not a zip file; truncated?)")
        return "keras"
    for suffix, name in SUFFIXES.items():
        if lower.endswith(suffix):
            return name
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if "config.json" in zf.namelist() and "model.weights.h5" in zf.namelist():
                return "keras"
    raise ValueError(f"{path}: unknown model format; known: {', '.join(sorted(FORMATS))}")


def _h5_kind(path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "h5" if "model_config" in f.attrs else "weights_h5"
    except OSError as e:
        raise ValueError(f"{path}: cannot read as HDF5 ({e}); truncated or corrupt") from None


def _checkpoint_kind(path):
    from convert import checkpoint

    return "checkpoint" if checkpoint.is_object_based(path) else "tf1_checkpoint"


def target_format(dst, to=None) -> str:
    """The output format: `to`, else from the destination's suffix (none: a SavedModel directory)."""
    if to is not None:
        if to not in FORMATS or FORMATS[to].save is None:
            writable = sorted(n for n, f in FORMATS.items() if f.save)
            raise ValueError(f"cannot write format {to!r}; writable formats: {', '.join(writable)}")
        return to
    lower = os.fspath(dst).lower()
    if lower.endswith(".weights.h5"):
        return "weights_h5"
    if lower.endswith((".h5", ".hdf5")):
        return "h5"
    for suffix, name in SUFFIXES.items():
        if lower.endswith(suffix) and FORMATS[name].save:
            return name
    if os.path.splitext(lower)[1] in ("", ".savedmodel"):
        return "saved_model"
    raise ValueError(f"{dst}: cannot tell the output format from the suffix; pass --to FORMAT")


def default_output(src, fmt) -> str:
    """SRC's name with the format's suffix (a directory for SavedModels, a prefix for checkpoints)."""
    src = os.fspath(src).rstrip("/")
    base = os.path.basename(src)
    for suffix in (".weights.h5", ".kseg.json", ".index", ".keras", ".h5", ".hdf5", ".pb", ".onnx", ".tflite",
                   ".safetensors", ".pth", ".pt", ".npz"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    if os.path.basename(src) == "saved_model.pb" or base.isdigit():
        base = os.path.basename(os.path.dirname(src)) or "model"
    tail = {"saved_model": "_saved_model", "tf_serving": "_serving", "checkpoint": "_ckpt"}.get(fmt, "")
    return os.path.join(os.path.dirname(src) or ".", base + tail + FORMATS[fmt].suffix)


# --- adapters for the formats implemented in other modules ----------------------------


def _save_onnx(model, path, *, metadata=None, opset=17, dynamic=True, nchw=False, input_size=None, **_):
    export = resolve("convert.onnx_format:export_onnx")
    export(model, path, opset=opset, dynamic=dynamic, nchw=nchw, input_size=input_size, metadata=metadata)


def _save_tflite(model, path, *, metadata=None, quantize=None, input_size=None, **_):
    export = resolve("convert.tflite_format:export_tflite")
    export(model, path, quantize=quantize, input_size=input_size, metadata=metadata)


def _spec_with_torch_map(name, path):
    import kseg

    spec = kseg.get_spec(name)
    if spec.torch_map is None:
        raise ValueError(f"{path}: {name} has no torchvision layout (only "
                         f"{', '.join(n for n in kseg.list_models() if kseg.get_spec(n).torch_map)} have one)")
    return spec


def _save_safetensors(model, path, *, metadata=None, **_):
    import safetensors.numpy

    from kseg.identity import of_metadata
    from kseg.weights import keras_to_torch

    name = (metadata or {}).get("architecture")
    if not name:
        raise ValueError(f"{path}: only kseg architectures with a torchvision layout export to a state_dict")
    spec = _spec_with_torch_map(name, path)
    built = of_metadata(metadata).options  # the builder's defaults and the model's build options
    wrong = {k: built.get(k) for k, v in spec.layouts.get("torchvision", {}).items() if built.get(k) != v}
    if wrong:
        # ResNet's keras layout is v1 (stride on the 1x1 conv, conv biases); torchvision's is v1.5:
        # another network, not a renaming, so no state_dict of it exists.
        raise ValueError(f"{path}: {name} built with {wrong} is not torchvision's network; build it with "
                         f"{spec.layouts['torchvision']} to export a torchvision state_dict")
    state = keras_to_torch(model, spec.torch_map())
    safetensors.numpy.save_file(state, os.fspath(path), metadata={"kseg": json.dumps(metadata)})


def _state_dict_to_keras(path, *, model=None, build_kwargs=None, **_):
    from kseg import identity as md

    meta = md.read_safetensors(path) if os.fspath(path).lower().endswith(".safetensors") else None
    name = model or (meta or {}).get("architecture")
    if not name:
        raise ValueError(f"{path}: a state_dict names no architecture; pass --model NAME")
    spec = _spec_with_torch_map(name, path)
    kwargs = dict(build_kwargs or {})
    if meta and meta.get("architecture") == name:
        kwargs = {**(meta.get("build_kwargs") or {}), **kwargs}
    for key, value in spec.layouts.get("torchvision", {}).items():
        kwargs.setdefault(key, value)
    keras_model = md.rebuild({"architecture": name, "build_kwargs": kwargs}, path, model=name)
    from kseg.weights import load_weights

    load_weights(keras_model, os.fspath(path), spec=spec)
    return keras_model


def _load_state_dict(path, **options):
    from convert.verify import keras_runner
    from kseg import identity as md

    keras_model = _state_dict_to_keras(path, **options)
    return keras_runner(keras_model, md.build_metadata(keras_model))
