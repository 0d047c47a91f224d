"""Model identity: what a model is (architecture, build options, weight layout, preprocessing,
input size, classes), whatever form it comes in, and the metadata kseg writes into every format.

`identify(x)` is the one answer for a registry name (+ build options), a model built by
`kseg.build_model`, a model file of any format kseg writes, or a metadata dict:

    >>> from kseg.identity import identify
    >>> identify("resnet50", layout="torchvision").preprocessing.kind
    'torch'

The weight layout (keras.applications vs torchvision), not the architecture's name, decides
the preprocessing. Every reader, trainer, predictor, converter and exporter asks here.

The metadata is one JSON dict (see build_metadata) stored as: a `kseg.json` member of a
`.keras` zip, the `kseg_metadata` attribute of an HDF5 file, `assets/kseg.json` in a
SavedModel, a `safetensors` header entry, and a `<path>.kseg.json` sidecar for frozen graphs
and checkpoints. Training runs write `kseg_run.json` next to their checkpoints.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import zipfile

from kseg.api import IDENTITY_KEY, build_model, model_info, remember_identity
from kseg.registry import PREPROCESSING, ModelSpec, Preprocessing, get_spec
from kseg.tasks import Task, get_task

KERAS_MEMBER = "kseg.json"
H5_ATTR = "kseg_metadata"
SAVED_MODEL_ASSET = os.path.join("assets", "kseg.json")
SIDECAR_SUFFIX = ".kseg.json"
# Written by kseg.train next to a run's checkpoints: the recipe, model and build options.
RUN_FILE = "kseg_run.json"


# --- identity ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a model is. `architecture` is None for a plain Keras model kseg did not build."""

    architecture: str | None = None
    build_kwargs: dict = dataclasses.field(default_factory=dict)
    layout: str | None = None  # the weight layout: None (the spec's default) or a key of spec.layouts
    preprocessing: Preprocessing | None = None
    input_shape: tuple | None = None  # (H, W, C); None dims accept any size
    num_classes: int | None = None
    class_names: tuple | None = None
    source: str = ""  # where the answer came from: a registry name, "model", a file
    # Classifiers: (resize_shorter, crop, interpolation) of the training run's evaluation
    # transform (its recipe's [data] eval_resize, eval_crop, interpolation) or of its named
    # pretrained weights; None: not recorded.
    eval_transform: tuple | None = None
    weights: str | None = None  # the registered pretrained weights it was built with (kseg.pretrained)

    @property
    def spec(self) -> ModelSpec | None:
        return get_spec(self.architecture) if self.architecture else None

    @property
    def options(self) -> dict:
        """Every build option: the builder's defaults updated with build_kwargs ({} for a plain model)."""
        if self.spec is None:
            return dict(self.build_kwargs)
        defaults = {k: p.default for k, p in inspect.signature(self.spec.builder).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **self.build_kwargs}

    @property
    def task(self) -> str | None:
        """The task's name (see kseg.tasks), None when the architecture is unknown."""
        return self.spec.task if self.architecture else None


def resolve_preprocessing(value) -> Preprocessing | None:
    """None, a Preprocessing, a kind ("caffe", "torch", ...), a registry model name or a metadata dict."""
    if value is None or isinstance(value, Preprocessing):
        return value
    if isinstance(value, dict):
        return Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    if isinstance(value, str):
        if value in PREPROCESSING:
            return PREPROCESSING[value]
        try:
            return get_spec(value).preprocessing
        except ValueError as e:
            raise ValueError(f"preprocessing={value!r} is neither a kind ({', '.join(sorted(PREPROCESSING))}) "
                             f"nor a model name: {e}") from None
    raise TypeError(f"preprocessing must be None, a kseg.Preprocessing, a kind or a model name, "
                    f"got {type(value).__name__}")


def layout_of(spec: ModelSpec, build_kwargs: dict) -> str | None:
    """The weight layout a model built with `build_kwargs` has: the spec's layout whose options it matches."""
    defaults = {k: p.default for k, p in inspect.signature(spec.builder).parameters.items()}
    built = {**defaults, **(build_kwargs or {})}
    return next((name for name, options in spec.layouts.items()
                 if options and all(built.get(k) == v for k, v in options.items())), None)


def of_name(name: str, build_kwargs: dict | None = None, *, class_names=None) -> Identity:
    """The identity of `kseg.build_model(name, **build_kwargs)`, without building it."""
    spec = get_spec(name)
    kwargs = dict(build_kwargs or {})
    layout = layout_of(spec, kwargs)
    shape = kwargs.get("input_shape")
    return Identity(name, kwargs, layout, spec.preprocessing_for(layout),
                    tuple(shape) if shape is not None else spec.input_shape,
                    kwargs.get("num_classes", spec.num_classes), _tuple(class_names), name)


def of_model(model, *, class_names=None) -> Identity:
    """The identity of a built Keras model (a plain one has no architecture or preprocessing)."""
    info = model_info(model)
    shape = tuple(model.inputs[0].shape[1:])  # the image (Fast R-CNN's second input: its proposals)
    last = model.outputs[-1].shape[-1]
    if info is None:
        return Identity(None, {}, None, None, shape, int(last) if last is not None else None,
                        _tuple(class_names), "model")
    named = of_name(info["name"], info["kwargs"], class_names=class_names)
    return dataclasses.replace(with_recorded(named, info), input_shape=shape, source="model")


# What a model's info (kseg.api.model_info) and kseg metadata may record beyond the architecture and
# build options: named pretrained weights and what they imply (kseg.api.pretrained_identity), or what
# a file's metadata said. Recorded values win over the registry's.
RECORDED = ("weights", "backbone_weights", "preprocessing", "class_names", "eval_transform")


def with_recorded(ident: Identity, recorded: dict) -> Identity:
    """`ident` with the preprocessing, class names, evaluation transform and weights name `recorded`
    (a model's info or a metadata dict) holds; explicitly given class names stay."""
    changes = {}
    if recorded.get("preprocessing"):
        changes["preprocessing"] = resolve_preprocessing(recorded["preprocessing"])
    if recorded.get("class_names") and ident.class_names is None:
        changes["class_names"] = tuple(recorded["class_names"])
    if recorded.get("eval_transform"):
        changes["eval_transform"] = tuple(recorded["eval_transform"])
    if recorded.get("weights"):
        changes["weights"] = recorded["weights"]
    return dataclasses.replace(ident, **changes)


def of_metadata(meta: dict, source: str = "metadata") -> Identity:
    """The identity recorded in kseg metadata (what build_metadata wrote, or only the architecture
    and build options a Keras config carries): recorded values win, the registry fills the rest."""
    meta = meta or {}
    name = meta.get("architecture")
    kwargs = dict(meta.get("build_kwargs") or {})
    ident = of_name(name, kwargs) if name else Identity(build_kwargs=kwargs)
    shape = meta.get("input_shape")
    recorded = {
        "input_shape": tuple(shape) if shape is not None else None,
        "num_classes": meta.get("num_classes"),
    }
    ident = with_recorded(ident, meta)
    return dataclasses.replace(ident, source=source, **{k: v for k, v in recorded.items() if v is not None})


def run_record(path) -> dict | None:
    """The training run's kseg_run.json next to a model file (model, build options, recipe values,
    class names), or None."""
    path = os.fspath(path)
    run_file = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_FILE)
    if os.path.isfile(path) and os.path.exists(run_file):
        return read_json(run_file)
    return None


def of_file(path) -> Identity | None:
    """The identity a model file records: a training run's kseg_run.json next to it, else the
    file's kseg metadata; None when it records neither."""
    path = os.fspath(path)
    run_file = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_FILE)
    run = run_record(path)
    if run is not None:
        kwargs = dict(run.get("model_kwargs") or {})
        ident = of_name(run["model"], kwargs, class_names=run.get("class_names")) if run.get("model") \
            else Identity(source=run_file)
        data = (run.get("recipe_values") or {}).get("data") or {}
        if data.get("preprocessing"):
            ident = dataclasses.replace(ident, preprocessing=resolve_preprocessing(data["preprocessing"]))
        if data.get("eval_resize"):
            ident = dataclasses.replace(ident, eval_transform=(
                data["eval_resize"], data["eval_crop"], data.get("interpolation", "bilinear")))
        return dataclasses.replace(ident, source=run_file)
    meta = read_metadata(path)
    return of_metadata(meta, path) if meta is not None else None


def postprocess_of(model):
    """A detector's decoder for a kseg-built model: its registry spec's `postprocess(options)` (a
    Keras layer: raw outputs -> padded detections); None for other models."""
    ident = of_model(model)
    make = getattr(ident.spec, "postprocess", None) if ident.spec is not None else None
    return make(ident.options) if make is not None else None


def task_of(model) -> Task:
    """The task a Keras model's outputs mean: its kseg architecture's; for a plain Keras model, a
    guess from the first output (one row per image: classification; a map: segmentation)."""
    ident = of_model(model)
    if ident.spec is not None:
        return ident.spec.task_object
    return get_task("classification" if len(model.outputs[0].shape) == 2 else "segmentation")


def identify(obj, build_kwargs: dict | None = None, *, class_names=None) -> Identity | None:
    """The Identity of a registry name (+ build kwargs), a Keras model, a model file or a metadata dict."""
    if isinstance(obj, Identity):
        return obj
    if isinstance(obj, dict):
        return of_metadata(obj)
    if isinstance(obj, (str, os.PathLike)):
        text = os.fspath(obj)
        if os.path.exists(text) or os.path.exists(text + ".index"):
            return of_file(text)
        return of_name(text, build_kwargs, class_names=class_names)
    return of_model(obj, class_names=class_names)


def _tuple(values):
    return tuple(values) if values is not None else None


# --- the metadata dict ------------------------------------------------------------------


def build_metadata(model, *, class_names=None) -> dict:
    """Architecture, build kwargs, classes, preprocessing, input size and outputs of a Keras model."""
    from kseg import __version__

    ident = of_model(model, class_names=class_names)
    info = model_info(model)
    return {
        "kseg_version": __version__,
        "architecture": ident.architecture,
        "build_kwargs": dict(info["kwargs"]) if info else {},
        "num_classes": ident.num_classes,
        "class_names": list(ident.class_names) if ident.class_names is not None else None,
        "preprocessing": ident.preprocessing.to_dict() if ident.preprocessing else None,
        "input_shape": list(model.inputs[0].shape[1:]),
        "outputs": list(model.output_names),
        # Named pretrained weights (kseg.pretrained) and their evaluation transform, when recorded.
        "weights": ident.weights,
        "backbone_weights": (info or {}).get("backbone_weights"),
        "eval_transform": list(ident.eval_transform) if ident.eval_transform else None,
    }


def read_metadata(path) -> dict | None:
    """The kseg metadata a file or directory of any format kseg writes carries, else None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return read_saved_model(path)
        versions = sorted((int(n) for n in os.listdir(path) if n.isdigit()
                           and os.path.isfile(os.path.join(path, n, "saved_model.pb"))), reverse=True)
        return read_saved_model(os.path.join(path, str(versions[0]))) if versions else read_sidecar(path)
    if os.path.exists(sidecar_path(path)):
        return read_sidecar(path)
    if not os.path.isfile(path):
        return read_sidecar(path)  # a checkpoint prefix
    if zipfile.is_zipfile(path):
        return read_keras(path) or _from_keras_config(_keras_config(path), path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        return read_h5(path) or _from_keras_config(_h5_config(path), path)
    if path.lower().endswith(".safetensors"):
        return read_safetensors(path)
    return None


def _keras_config(path):
    with zipfile.ZipFile(path) as zf:
        return zf.read("config.json").decode("utf8") if "config.json" in zf.namelist() else None


def _h5_config(path):
    import h5py

    with h5py.File(path, "r") as f:
        value = f.attrs.get("model_config")
    return value.decode("utf8") if isinstance(value, bytes) else value


def _from_keras_config(text, path) -> dict | None:
    """The metadata of the identity a kseg model keeps in its Keras config (kseg.api.remember_identity),
    for files written by Keras' own model.save(); None for other Keras files."""
    if not text:
        return None
    config = _loads(text, f"{path}: Keras config")
    info = (config.get("config") or {}).get(IDENTITY_KEY)
    if not isinstance(info, dict) or not info.get("name"):
        return None
    ident = with_recorded(of_name(info["name"], dict(info.get("kwargs") or {})), info)
    return {"architecture": ident.architecture, "build_kwargs": ident.build_kwargs, "num_classes": ident.num_classes,
            "class_names": list(ident.class_names) if ident.class_names else None,
            "preprocessing": ident.preprocessing.to_dict() if ident.preprocessing else None,
            "input_shape": list(ident.input_shape) if ident.input_shape else None,
            "weights": ident.weights, "backbone_weights": info.get("backbone_weights"),
            "eval_transform": list(ident.eval_transform) if ident.eval_transform else None}


def read_safetensors(path) -> dict | None:
    import safetensors

    try:
        with safetensors.safe_open(os.fspath(path), "np") as f:
            text = (f.metadata() or {}).get("kseg")
    except Exception:
        return None
    return _loads(text, f"{path}[kseg]") if text else None


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
    return build_model(name, **kwargs)


def attach(model, metadata):
    """Record a file's kseg architecture on a loaded model, so re-saving keeps the metadata: its
    build options, and the weights names, preprocessing, class names and evaluation transform it
    records where they differ from what the registry gives for the architecture."""
    if not metadata or not metadata.get("architecture"):
        return model
    info = model_info(model)
    if info is None:
        info = {"name": metadata["architecture"], "kwargs": dict(metadata.get("build_kwargs") or {})}
    elif info["name"] != metadata["architecture"]:
        return model
    registry = of_name(info["name"], info["kwargs"])
    extra = {k: metadata[k] for k in RECORDED if metadata.get(k) is not None and k not in info}
    if "preprocessing" in extra and resolve_preprocessing(extra["preprocessing"]) == registry.preprocessing:
        del extra["preprocessing"]
    if extra or model_info(model) is None:
        remember_identity(model, {**info, **extra})
    return model
