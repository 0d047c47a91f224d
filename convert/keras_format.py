"""Keras files: `.keras` and full-model `.h5` (Keras 3 and legacy tf.keras 2.x), `.weights.h5`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from convert.verify import keras_runner
from kseg import identity as md


def read_metadata(path):
    """The file's kseg metadata, or the identity its Keras config keeps (Keras' own model.save())."""
    return md.read_metadata(os.fspath(path))


def load_keras(path, *, unsafe=False, **_):
    """A full Keras model from `.keras` or `.h5`; Keras safe mode stays on unless unsafe=True."""
    import keras

    path = os.fspath(path)
    _check_readable(path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except TypeError as e:
        if "Conv2DTranspose" in str(e) and "groups" in str(e) and path.lower().endswith((".h5", ".hdf5")):
            model = _load_legacy_groups(path, unsafe)
        else:
            raise ValueError(f"{path}: cannot load the Keras model: {e}") from None
    except ValueError as e:
        if "Lambda" in str(e) or "safe_mode" in str(e) or "unsafe" in str(e):
            raise ValueError(
                f"{path}: the model contains a Lambda layer (Python code stored in the file); "
                "kseg loads it only with --unsafe (unsafe=True), for files you trust"
            ) from None
        raise ValueError(f"{path}: cannot load the Keras model: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the Keras file ({e}); is it complete?") from None
    return md.attach(model, read_metadata(path))


def _check_readable(path):
    import zipfile

    import h5py

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.lower().endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a .keras file (not a zip archive; truncated?)")
        return
    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                raise ValueError(
                    f"{path}: an HDF5 weights file without a model config; combine it with an "
                    "architecture (--model NAME) instead"
                )
    except OSError as e:
        raise ValueError(f"{path}: cannot read as HDF5 ({e}); truncated or not a Keras file") from None


def _load_legacy_groups(path, unsafe):
    """tf.keras 2.x wrote `groups` into Conv2DTranspose configs; Keras 3 rejects the argument.

    groups=1 is the only value tf.keras could run for a transposed conv, so it is dropped on
    a temporary copy of the file (the original is never modified); any other value raises.
    """
    import h5py
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "model.h5")
        shutil.copyfile(path, copy)
        with h5py.File(copy, "r+") as f:
            raw = f.attrs["model_config"]
            config = json.loads(raw.decode("utf8") if isinstance(raw, bytes) else raw)
            _strip_groups(config, path)
            f.attrs["model_config"] = json.dumps(config)
        return keras.saving.load_model(copy, compile=False, safe_mode=not unsafe)


def _strip_groups(node, path):
    if isinstance(node, dict):
        if node.get("class_name") == "Conv2DTranspose" and "groups" in node.get("config", {}):
            groups = node["config"].pop("groups")
            if groups != 1:
                raise ValueError(f"{path}: Conv2DTranspose {node['config'].get('name')!r} has groups={groups}; "
                                 "Keras 3 supports only groups=1")
        for value in node.values():
            _strip_groups(value, path)
    elif isinstance(node, list):
        for value in node:
            _strip_groups(value, path)


def load(path, *, unsafe=False, **_):
    model = load_keras(path, unsafe=unsafe)
    return keras_runner(model, read_metadata(path))


def save_keras(model, path, *, metadata=None, **_):
    """`.keras` (metadata as a `kseg.json` zip member) or full-model `.h5` (an HDF5 attribute)."""
    import warnings

    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' "HDF5 is legacy" notice: the user asked for .h5
        model.save(path)
    if metadata is not None:
        (md.write_keras if path.lower().endswith(".keras") else md.write_h5)(path, metadata)


# --- weights only ---------------------------------------------------------------------


def load_weights_model(path, *, model=None, build_kwargs=None, **_):
    """A kseg model (architecture from the file's metadata or `model`) with the file's weights by layer name."""
    from kseg.weights import assign_weights, read_keras_weights

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    meta = md.read_h5(path) if _is_hdf5(path) else None
    keras_model = md.rebuild(meta, path, model=model, build_kwargs=build_kwargs)
    assign_weights(keras_model, read_keras_weights(path), path)
    return keras_model


def _is_hdf5(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def load_weights(path, **options):
    keras_model = load_weights_model(path, **options)
    return keras_runner(keras_model, md.build_metadata(keras_model))


def save_weights(model, path, *, metadata=None, **_):
    model.save_weights(os.fspath(path))
    if metadata is not None:
        md.write_h5(path, metadata)
