"""Weights in: Keras weight files by layer name, and torchvision-layout state_dicts.

Loading is all-or-nothing: every array is read, matched and shape-checked first, and
the model is touched only when everything fits, so a bad file never leaves a model
half-loaded.
"""

from __future__ import annotations

import logging
import os
import zipfile

import numpy as np

from kseg.registry import ModelSpec, TorchMapping, get_spec
from kseg.statedict import WeightsFileError, load_state_dict

log = logging.getLogger(__name__)

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz")


class WeightsMismatchError(ValueError):
    """The file is readable but does not fit the model (missing, unexpected or misshapen)."""


def detect_format(path) -> str:
    """'keras' for Keras weight/model files, 'state_dict' for torchvision-layout files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    lower = path.lower()
    if lower.endswith(KERAS_SUFFIXES):
        return "keras"
    if lower.endswith(STATE_DICT_SUFFIXES):
        return "state_dict"
    raise ValueError(
        f"{path}: unknown weights format; expected a Keras file ({', '.join(KERAS_SUFFIXES)}) "
        f"or a state_dict ({', '.join(STATE_DICT_SUFFIXES)})"
    )


def load_weights(model, path, *, spec: ModelSpec | None = None):
    """Load `path` into `model` (Keras files by layer name; state_dicts via the spec's torch map)."""
    path = os.fspath(path)
    if detect_format(path) == "keras":
        arrays = _by_position_if_renamed(model, read_keras_weights(path), path)
    else:
        if spec is None or spec.torch_map is None:
            name = spec.name if spec else model.name
            raise ValueError(
                f"{path}: {name} has no torchvision layout, so a state_dict cannot be mapped onto it"
            )
        arrays = torch_to_keras(_published_keys(load_state_dict(path), spec), spec.torch_map(), model, path)
    assign_weights(model, arrays, path)


# --- Keras files -------------------------------------------------------------------


def read_keras_weights(path) -> dict[str, list[np.ndarray]]:
    """Layer name -> arrays in the layer's variable order, from any Keras weight file.

    Reads the legacy HDF5 layout (keras.applications downloads, tf.keras 2.x and Keras 3
    `.h5` model or weight files: attrs `layer_names` / `weight_names`) and Keras 3's
    `.weights.h5` / `.keras` layout (`layers/<class>/vars/<i>`, the layer name in an attr).
    """
    import h5py

    path = os.fspath(path)
    try:
        if path.lower().endswith(".keras"):
            with zipfile.ZipFile(path) as zf:
                if "model.weights.h5" not in zf.namelist():
                    raise WeightsFileError(f"{path}: a .keras file without model.weights.h5")
                import io

                with h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r") as f:
                    return _read_keras3_layers(f, path)
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            if "layer_names" in root.attrs:
                return _read_legacy_layers(root)
            if "layers" in f:
                return _read_keras3_layers(f, path)
            raise WeightsFileError(f"{path}: an HDF5 file, but not a Keras weights file (no layer_names or layers/)")
    except WeightsFileError:
        raise
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise WeightsFileError(f"{path}: cannot read Keras weights ({e}); is the file complete?") from None


def _by_position_if_renamed(model, arrays, path):
    """`arrays` keyed by the model's layer names where the file names its layers otherwise.

    keras.applications' DenseNet and MobileNetV3 files were written by older Keras code whose layer
    names (`conv1/conv`, `Conv/BatchNorm`, `fc1000`) differ from today's; Keras itself loads such
    files by position (the weighted layers in order). So does this, only when the names do not fit
    and every weighted layer's shapes agree in order; otherwise the names stand and assign_weights
    names what is missing.
    """
    weighted = [layer for layer in model.layers if layer.weights]
    if all(layer.name in arrays for layer in weighted) or len(arrays) != len(weighted):
        return arrays
    pairs = list(zip(weighted, arrays.items()))
    if any([tuple(a.shape) for a in got] != [tuple(v.shape) for v in layer.weights] for layer, (_, got) in pairs):
        return arrays
    renamed = [(name, layer.name) for layer, (name, _) in pairs if name != layer.name]
    log.info("%s: %d layers named otherwise (e.g. %s -> %s) loaded by position, as Keras loads this file",
             path, len(renamed), *renamed[0])
    return {layer.name: got for layer, (_, got) in pairs}


def _text(value):
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_legacy_layers(root):
    out = {}
    for layer_name in map(_text, root.attrs["layer_names"]):
        group = root[layer_name]
        names = [_text(n) for n in group.attrs.get("weight_names", [])]
        if names:
            out[layer_name] = [np.asarray(group[n]) for n in names]
    return out


def _read_keras3_layers(f, path):
    out = {}

    def visit(group):
        for key in group:
            item = group[key]
            if not hasattr(item, "keys"):
                continue
            if "vars" in item and len(item["vars"]):
                vars_group = item["vars"]
                name = _text(vars_group.attrs.get("name", key))
                out[name] = [np.asarray(vars_group[str(i)]) for i in range(len(vars_group))]
            if "layers" in item:
                visit(item["layers"])

    if "layers" not in f:
        raise WeightsFileError(f"{path}: no layers/ group; not a Keras 3 weights file")
    visit(f["layers"])
    return out


# --- torchvision state_dicts ---------------------------------------------------------


def torch_to_keras(state: dict, table: list[TorchMapping], model, path) -> dict[str, list[np.ndarray]]:
    """Convert a torchvision-layout state_dict to Keras arrays per layer name.

    With a model, keys of layers it does not have (e.g. `fc` with include_top=False) are
    skipped and biases follow the layer's use_bias; without one (reading a backbone file),
    every table entry is converted and a bias is taken when present. Any key not consumed,
    or a needed key that is absent, raises with the names.
    """
    layers = {layer.name: layer for layer in model.layers} if model is not None else None
    used, missing, out = set(), [], {}
    for entry in table:
        keys = [_torch_key(entry.prefix, s) for s in _TORCH_SUFFIXES[entry.kind]]
        used.add(f"{entry.prefix}.num_batches_tracked")
        if layers is not None and entry.layer not in layers:
            used.update(k for k in keys if k in state)
            continue
        if entry.kind in _BIASED:
            has_bias = getattr(layers[entry.layer], "use_bias", True) if layers else f"{keys[1]}" in state
            keys = keys if has_bias else keys[:1]
        used.update(k for k in keys if k in state)
        absent = [k for k in keys if k not in state]
        if absent:
            missing.extend(absent)
            continue
        out[entry.layer] = [_convert(state[k], entry, i) for i, k in enumerate(keys)]
    unexpected = [k for k in state if k not in used]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_some(unexpected)}")
        target = model.name if model is not None else "the expected torchvision layout"
        raise WeightsMismatchError(f"{path}: state_dict does not fit {target}: " + "; ".join(parts))
    return out


def _published_keys(state: dict, spec: ModelSpec) -> dict:
    """The state_dict under the torch map's keys (spec.torch_keys renames a published file's old ones)."""
    return spec.torch_keys(state) if spec.torch_keys is not None else state


def _some(names, n=20):
    return f"{names[:n]}" + (f" (+{len(names) - n} more)" if len(names) > n else "")


_TORCH_SUFFIXES = {
    "conv": ("weight", "bias"),
    "depthwise": ("weight", "bias"),
    "dense": ("weight", "bias"),
    "in_proj": ("in_proj_weight", "in_proj_bias"),  # torch.nn.MultiheadAttention's fused q, k, v projection
    "dense_nchw": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var"),
    "layernorm": ("weight", "bias"),  # nn.LayerNorm's scale and shift: Keras' gamma, beta as they are
    "vector": ("",),  # the prefix is the key
}
# Kinds whose bias follows the layer's use_bias.
_BIASED = ("conv", "depthwise", "dense", "in_proj", "dense_nchw")


def _torch_key(prefix, suffix):
    return f"{prefix}.{suffix}" if suffix else prefix


def _convert(array, entry: TorchMapping, index: int) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    if entry.kind == "bn" and index >= 2 and entry.input_scale != 1.0:  # running mean, running variance
        return a * np.float32(entry.input_scale ** (index - 1))
    if index != 0 or entry.kind in ("bn", "layernorm", "vector"):
        return a
    if entry.kind == "conv":
        return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if entry.kind == "depthwise":
        return a.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> DepthwiseConv2D's (kh, kw, C, 1)
    if entry.kind in ("dense", "in_proj"):
        return a.T
    c, h, w = entry.chw
    if a.ndim != 2 or a.shape[1] != c * h * w:
        raise WeightsMismatchError(
            f"{entry.prefix}.weight: expected (out, {c * h * w}) for a flatten of {c}x{h}x{w}, got {a.shape}"
        )
    # Row index c*H*W + h*W + w (NCHW flatten) -> (h*W + w)*C + c (NHWC flatten).
    return a.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def keras_to_torch(model, table: list[TorchMapping]) -> dict[str, np.ndarray]:
    """The inverse of torch_to_keras: a torchvision-layout state_dict from a Keras model."""
    have = {layer.name for layer in model.layers}
    state = {}
    for entry in table:
        if entry.layer not in have:
            continue
        arrays = [np.asarray(v) for v in model.get_layer(entry.layer).weights]
        for i, (suffix, a) in enumerate(zip(_TORCH_SUFFIXES[entry.kind], arrays)):
            if i == 0 and entry.kind == "conv":
                a = a.transpose(3, 2, 0, 1)
            elif i == 0 and entry.kind == "depthwise":
                a = a.transpose(2, 3, 0, 1)
            elif i == 0 and entry.kind in ("dense", "in_proj"):
                a = a.T
            elif i >= 2 and entry.kind == "bn" and entry.input_scale != 1.0:
                a = a / np.float32(entry.input_scale ** (i - 1))
            elif i == 0 and entry.kind == "dense_nchw":
                c, h, w = entry.chw
                a = a.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
            state[_torch_key(entry.prefix, suffix)] = np.ascontiguousarray(a)
    return state


# --- assignment --------------------------------------------------------------------


def assign_weights(model, arrays: dict[str, list[np.ndarray]], path, *, partial=False) -> None:
    """Set each layer's weights from `arrays` after checking every layer first.

    Every model layer with weights must be present with matching shapes; file layers the
    model lacks are ignored (a full ImageNet file loads into an include_top=False trunk).
    With partial=True only the layers named in `arrays` are set, and each must exist.
    """
    missing, mismatched, plan = [], [], []
    if partial:
        absent = sorted(set(arrays) - {layer.name for layer in model.layers})
        if absent:
            raise WeightsMismatchError(f"{path}: {model.name} has no layers {absent}")
    for layer in model.layers:
        variables = layer.weights
        if not variables or (partial and layer.name not in arrays):
            continue
        if layer.name not in arrays:
            missing.append(layer.name)
            continue
        got = arrays[layer.name]
        want = [tuple(v.shape) for v in variables]
        if [tuple(a.shape) for a in got] != want:
            mismatched.append(f"{layer.name}: model {want}, file {[tuple(a.shape) for a in got]}")
            continue
        plan.append((layer, got))
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"layers missing from the file: {missing}")
        if mismatched:
            parts.append("shape mismatches: " + "; ".join(mismatched))
        hint = ""
        if mismatched:
            hint = " (built with another num_classes, input_shape or layout than the file's?)"
        raise WeightsMismatchError(f"{path}: weights do not fit {model.name}: " + " | ".join(parts) + hint)
    for layer, got in plan:
        layer.set_weights(got)


# --- ImageNet backbones for dense-prediction models -----------------------------------


def read_backbone(path, backbone: str) -> dict[str, list[np.ndarray]]:
    """ImageNet weights of the registered classifier `backbone`, keyed by its Keras layer names.

    Reads keras.applications files (by name) and torchvision state_dicts (through the
    backbone's torch map), so dense-prediction models initialise from either ecosystem.
    """
    path = os.fspath(path)
    if detect_format(path) == "keras":
        return read_keras_weights(path)
    spec = get_spec(backbone)
    if spec.torch_map is None:
        raise ValueError(f"{path}: {backbone} has no torchvision layout, so a state_dict cannot be read as it")
    return torch_to_keras(_published_keys(load_state_dict(path), spec), spec.torch_map(), None, path)


def copy_by_name(arrays, names, path, backbone) -> dict[str, list[np.ndarray]]:
    """The arrays of `names`; raises naming the absent ones (a file of another architecture)."""
    absent = [n for n in names if n not in arrays]
    if absent:
        raise WeightsMismatchError(
            f"{path}: not {backbone} ImageNet weights: layers {_some(absent)} are missing "
            f"(the file has {_some(sorted(arrays), 8)})"
        )
    return {n: arrays[n] for n in names}


def load_backbone(model, path, spec: ModelSpec) -> list[str]:
    """Initialise `model`'s backbone from ImageNet weights; returns the layers that were set.

    `spec.backbone_adapt(arrays, model, path)` maps the backbone's arrays onto the model's
    layers (by name, and e.g. reshaping fc1/fc2 into FCN's fc6/fc7 convolutions).
    """
    path = os.fspath(path)
    if spec.backbone is None or spec.backbone_adapt is None:
        raise ValueError(f"{spec.name} has no ImageNet backbone to initialise from {path}")
    targets = spec.backbone_adapt(read_backbone(path, spec.backbone), model, path)
    assign_weights(model, targets, path, partial=True)
    return sorted(targets)
