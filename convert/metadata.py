"""The metadata kseg writes into every format it produces, and where each format keeps it.

One JSON dict (see build_metadata) stored as: a `kseg.json` member of a `.keras` zip, the
`kseg_metadata` attribute of an HDF5 file, `assets/kseg.json` in a SavedModel, a
`safetensors` header entry, and a `<path>.kseg.json` sidecar for frozen graphs and checkpoints.
"""

from __future__ import annotations

import json
import os
import zipfile

KERAS_MEMBER = "kseg.json"
H5_ATTR = "kseg_metadata"
SAVED_MODEL_ASSET = os.path.join("assets", "kseg.json")
SIDECAR_SUFFIX = ".kseg.json"


def build_metadata(model, *, class_names=None) -> dict:
    """Architecture, build kwargs, classes, preprocessing, input size and outputs of a Keras model."""
    import kseg
    from kseg.api import model_info

    info = model_info(model)
    spec = kseg.get_spec(info["name"]) if info else None
    kwargs = dict(info["kwargs"]) if info else {}
    num_classes = kwargs.get("num_classes", spec.num_classes if spec else None)
    if num_classes is None:
        last = model.outputs[-1].shape[-1]
        num_classes = int(last) if last is not None else None
    preprocessing = None
    if spec is not None:
        # A model built in a second weight layout (torchvision ResNet) has that layout's preprocessing.
        layout = next((k for k, v in spec.layouts.items() if v and all(kwargs.get(a) == b for a, b in v.items())), None)
        preprocessing = spec.preprocessing_for(layout).to_dict()
    return {
        "kseg_version": kseg.__version__,
        "architecture": info["name"] if info else None,
        "build_kwargs": kwargs,
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "preprocessing": preprocessing,
        "input_shape": [d for d in model.input_shape[1:]],
        "outputs": list(model.output_names),
    }


def _loads(text, where):
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: kseg metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: kseg metadata is not a JSON object")
    return meta


# --- .keras (zip member) ---------------------------------------------------------------


def write_keras(path, metadata):
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(KERAS_MEMBER, json.dumps(metadata, indent=1))


def read_keras(path):
    with zipfile.ZipFile(path) as zf:
        if KERAS_MEMBER not in zf.namelist():
            return None
        return _loads(zf.read(KERAS_MEMBER).decode("utf8"), f"{path}:{KERAS_MEMBER}")


# --- HDF5 (.h5, .weights.h5) ----------------------------------------------------------


def write_h5(path, metadata):
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs[H5_ATTR] = json.dumps(metadata)


def read_h5(path):
    import h5py

    with h5py.File(path, "r") as f:
        value = f.attrs.get(H5_ATTR)
    if value is None:
        return None
    return _loads(value.decode("utf8") if isinstance(value, bytes) else value, f"{path}[{H5_ATTR}]")


# --- SavedModel assets ----------------------------------------------------------------


def write_saved_model(directory, metadata):
    os.makedirs(os.path.join(directory, "assets"), exist_ok=True)
    with open(os.path.join(directory, SAVED_MODEL_ASSET), "w") as f:
        json.dump(metadata, f, indent=1)


def read_saved_model(directory):
    path = os.path.join(directory, SAVED_MODEL_ASSET)
    return read_json(path) if os.path.exists(path) else None


# --- sidecars (frozen graphs, checkpoints) --------------------------------------------


def sidecar_path(path) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def write_sidecar(path, metadata):
    with open(sidecar_path(path), "w") as f:
        json.dump(metadata, f, indent=1)


def read_sidecar(path):
    side = sidecar_path(path)
    return read_json(side) if os.path.exists(side) else None


def read_json(path):
    with open(path) as f:
        return _loads(f.read(), path)


# --- rebuilding a kseg architecture ---------------------------------------------------


def rebuild(metadata, path, *, model=None, build_kwargs=None):
    """A fresh kseg model for the weights in `path`: the architecture named by `model` or the metadata."""
    import kseg

    meta = metadata or {}
    name = model or meta.get("architecture")
    if not name:
        raise ValueError(
            f"{path}: holds weights only and names no kseg architecture; pass the architecture "
            "(--model NAME / model=NAME; `kseg models` lists them)"
        )
    kwargs = dict(meta.get("build_kwargs") or {}) if meta.get("architecture") == name else {}
    kwargs.update(build_kwargs or {})
    if "input_shape" in kwargs and kwargs["input_shape"] is not None:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    return kseg.build_model(name, **kwargs)


def model_info(model):
    from kseg.api import model_info as info

    return info(model)


def attach(model, metadata):
    """Record a file's kseg architecture on a loaded model, so re-saving keeps the metadata."""
    if metadata and metadata.get("architecture") and getattr(model, "_kseg_info", None) is None:
        model._kseg_info = {"name": metadata["architecture"], "kwargs": dict(metadata.get("build_kwargs") or {})}
    return model
