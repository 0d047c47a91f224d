"""The model registry: one decorator, one table of specs, duplicate names raise.

Every later feature (data pipelines, serving signatures, conversion metadata, the
CLI and the generic tests) reads a model's facts from its spec here, never from
the builder's code.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import Any, Callable

from kseg.tasks import TASKS, Task, get_task


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw images (RGB, uint8 values 0..255, NHWC) become the model's input.

    Models are built raw-input, like keras.applications and torchvision: the data
    pipelines and serving signatures call `apply`, so weights imported from either
    ecosystem see exactly the tensors they were trained on.
    """

    kind: str  # "caffe" | "torch" | "unit" | "tf" | "batchnorm" | "caffe_ssd" | "torch_ssd"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bgr: bool = False
    scale: float = 1.0  # multiply 0..255 values by this before mean/std

    def apply(self, images):
        """Preprocess a float batch (NumPy or TF tensor) of RGB 0..255 images."""
        x = images * self.scale if self.scale != 1.0 else images
        if self.bgr:
            x = x[..., ::-1]
        if self.mean is not None:
            x = x - _as_like(self.mean, x)
        if self.std is not None:
            x = x / _as_like(self.std, x)
        return x

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_like(values, x):
    # NumPy's and TF's broadcasting both accept a plain float list on the last axis,
    # but a float64 NumPy constant would silently upcast float32 NumPy inputs.
    import numpy as np

    dtype = getattr(x, "dtype", np.float32)
    try:
        return np.asarray(values, dtype=np.dtype(getattr(dtype, "as_numpy_dtype", dtype)))
    except TypeError:
        return np.asarray(values, dtype=np.float32)


# Caffe's VGG/ResNet convention (keras.applications "caffe" mode): BGR, 0..255, mean subtracted.
CAFFE = Preprocessing("caffe", mean=(103.939, 116.779, 123.68), bgr=True)
# torchvision's ImageNet convention: RGB scaled to [0, 1], then mean/std.
TORCH = Preprocessing(
    "torch", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=1 / 255.0
)
UNIT = Preprocessing("unit", scale=1 / 255.0)
# keras.applications' "tf" mode (MobileNet V2 / V3's published files): x / 127.5 - 1, RGB in [-1, 1].
TF = Preprocessing("tf", mean=(1.0, 1.0, 1.0), scale=1 / 127.5)
# Caffe SSD (ssd_pascal.py's transform_param): BGR, 0..255, minus the integer means 104, 117, 123.
CAFFE_SSD = Preprocessing("caffe_ssd", mean=(104.0, 117.0, 123.0), bgr=True)
# torchvision's ssd300_vgg16: GeneralizedRCNNTransform on [0, 1] RGB with image_mean
# (0.48235, 0.45882, 0.40784) and image_std 1/255, i.e. 0..255 RGB minus 255 * image_mean.
TORCH_SSD = Preprocessing("torch_ssd", mean=(122.99925, 116.9991, 103.9992))
# The model's first layer is a BatchNormalization that learns the normalisation
# (SegNet's Oxford-IIIT Pet recipe); the pipeline feeds raw 0..255 floats.
BATCHNORM = Preprocessing("batchnorm")

PREPROCESSING = {p.kind: p for p in (CAFFE, TORCH, UNIT, TF, BATCHNORM, CAFFE_SSD, TORCH_SSD)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything kseg knows about a registered architecture."""

    name: str
    builder: Callable[..., Any]
    task: str
    paper: str
    input_shape: tuple[int | None, int | None, int]
    num_classes: int
    preprocessing: Preprocessing
    params: int  # reference parameter count of build_model(name) with defaults
    # kwargs that select another published weight layout, e.g. {"torchvision": {"layout": "torchvision"}}
    layouts: dict[str, dict] = dataclasses.field(default_factory=dict)
    # preprocessing per weight layout, when it differs from `preprocessing`
    layout_preprocessing: dict[str, Preprocessing] = dataclasses.field(default_factory=dict)
    # torchvision state_dict layout as a table of TorchMapping; None if torchvision has no such net
    torch_map: Callable[[], list["TorchMapping"]] | None = None
    # renames a published state_dict's keys to torch_map's before the import (torchvision's DenseNet
    # files keep the pre-0.3 names `norm.1`, `conv.1` of their dense layers)
    torch_keys: Callable[[dict], dict] | None = None
    # ImageNet classifier whose weights initialise this model (build_model(backbone_weights=...)),
    # and adapt(arrays_by_backbone_layer, model, path) -> arrays_by_model_layer
    backbone: str | None = None
    backbone_adapt: Callable[[dict, Any, str], dict] | None = None
    # Detectors: postprocess(build options) -> the Keras layer that decodes the raw outputs into
    # padded detections (kseg.inference_model, serving).
    postprocess: Callable[[dict], Any] | None = None
    # Models that train through a wrapper with its own train_step (two-stage detectors):
    # trainer(model, build options, settings) -> the keras.Model to compile and fit; it takes the
    # readers' padded ground truth {"boxes", "classes"} as targets, not per-output labels.
    trainer: Callable[[Any, dict, dict], Any] | None = None
    # Detectors that take any input size: their test scale per weight layout, (min_size, max_size):
    # each image resized keeping its aspect ratio, shorter side min_size, longer at most max_size.
    test_scales: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    description: str = ""

    @property
    def task_object(self) -> Task:
        """The task (kseg.tasks) this model's outputs mean: heads, labels, loss, serving, verification."""
        return get_task(self.task)

    def preprocessing_for(self, layout: str | None = None) -> Preprocessing:
        return self.layout_preprocessing.get(layout, self.preprocessing)


@dataclasses.dataclass(frozen=True)
class TorchMapping:
    """One torchvision module (a state_dict key prefix) and the Keras layer holding its weights.

    kind: "conv" (OIHW <-> HWIO), "depthwise" (a groups=C conv's (C, 1, kh, kw) <-> DepthwiseConv2D's
    (kh, kw, C, 1); depth multiplier 1), "bn" (weight/bias/running_mean/running_var), "layernorm"
    (weight/bias as gamma/beta), "dense"
    (out,in <-> in,out), "in_proj" (torch.nn.MultiheadAttention's fused query / key / value projection,
    `in_proj_weight` (3D, D) and `in_proj_bias`, into a Dense of 3D units), "dense_nchw" (a dense layer
    right after a flatten of a (C, H, W) map: torchvision flattens NCHW, Keras NHWC, so rows are
    permuted) or "vector" (the prefix is itself the key of a parameter of any shape, the layer's only
    weight, as is, e.g. SSD's `backbone.scale_weight`, a ViT's class token).

    input_scale (kind "bn"): the Keras layer's inputs are the torch module's times this (an input
    BatchNorm fed 0..255 pixels where the module was fed 0..1: 255); its running statistics are
    scaled to match (mean x s, variance x s^2; the Keras layer's epsilon is the module's x s^2).
    """

    prefix: str
    layer: str
    kind: str
    chw: tuple[int, int, int] | None = None
    input_scale: float = 1.0


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    task: str,
    paper: str,
    input_shape: tuple,
    num_classes: int,
    preprocessing: str | Preprocessing,
    params: int,
    layouts: dict[str, dict] | None = None,
    layout_preprocessing: dict[str, str | Preprocessing] | None = None,
    torch_map: Callable | None = None,
    torch_keys: Callable | None = None,
    backbone: str | None = None,
    backbone_adapt: Callable | None = None,
    postprocess: Callable | None = None,
    trainer: Callable | None = None,
    test_scales: dict[str, tuple[int, int]] | None = None,
):
    """Register a builder under `name`. A second registration of a name raises."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r} for model {name!r}")

    def resolve(p):
        if isinstance(p, Preprocessing):
            return p
        if p not in PREPROCESSING:
            raise ValueError(
                f"unknown preprocessing {p!r} for model {name!r}; "
                f"known: {sorted(PREPROCESSING)}"
            )
        return PREPROCESSING[p]

    def decorator(builder):
        if name in _REGISTRY:
            other = _REGISTRY[name].builder
            raise ValueError(
                f"model name {name!r} is already registered by "
                f"{other.__module__}.{other.__qualname__}"
            )
        doc = inspect.getdoc(builder) or ""
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            task=task,
            paper=paper,
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            preprocessing=resolve(preprocessing),
            params=params,
            layouts=dict(layouts or {}),
            layout_preprocessing={k: resolve(v) for k, v in (layout_preprocessing or {}).items()},
            torch_map=torch_map,
            torch_keys=torch_keys,
            backbone=backbone,
            backbone_adapt=backbone_adapt,
            postprocess=postprocess,
            trainer=trainer,
            test_scales={k: tuple(v) for k, v in (test_scales or {}).items()},
            description=doc.splitlines()[0] if doc else "",
        )
        return builder

    return decorator


def _ensure_models_imported():
    # Importing the model modules runs their @register_model decorators. By name: the registry
    # sits below the models it lists (models import the registry, never the reverse).
    importlib.import_module("kseg.models")


def get_spec(name: str) -> ModelSpec:
    _ensure_models_imported()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} "
            f"`kseg models` or kseg.list_models() lists all {len(_REGISTRY)}."
        ) from None


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, sorted; optionally only those of one task."""
    _ensure_models_imported()
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    return sorted(n for n, s in _REGISTRY.items() if task is None or s.task == task)
