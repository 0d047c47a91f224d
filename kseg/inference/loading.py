"""Models ready for inference: a saved file or a registry name with weights, and its preprocessing.

    m = load_inference_model("runs/dl/best.keras")                 # preprocessing from kseg_run.json
    m = load_inference_model("deeplab_largefov", weights="dl.h5", num_classes=5, options={"width": 0.25})

The preprocessing comes from kseg.identity: the run's kseg_run.json next to a checkpoint,
the file's conversion metadata, or the registry spec of the weight layout. A file with none
of these is refused: feeding a model the wrong input scale gives confident nonsense, not an error.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import keras

from kseg.api import build_model, model_info, remember_identity
from kseg.identity import identify, of_file, resolve_preprocessing, task_of
from kseg.registry import get_spec
from kseg.tasks import losses, metrics  # noqa: F401  (registers kseg's losses and metrics for loading)


@dataclasses.dataclass
class InferenceModel:
    """A model ready for inference: the network, how to preprocess for it, where it came from."""

    model: object
    preprocessing: object  # a kseg.Preprocessing, or None for raw 0..255 input
    source: str  # the .keras path or the registry name (and weights)
    class_names: list | None = None
    # Classifiers: (resize_shorter, crop) evaluation transform and its interpolation, from the
    # training run's recipe ([data] eval_resize, eval_crop, interpolation); None: a plain resize.
    eval_transform: tuple | None = None
    interpolation: str = "bilinear"

    @property
    def task(self):
        """The task object of the model's outputs (kseg.identity.task_of)."""
        return task_of(self.model)

    @property
    def num_classes(self) -> int:
        return int(main_output(self.model.outputs).shape[-1])


def main_output(outputs):
    """The segmentation logits among a model's outputs: the first (FCN's aux and DeepLab's
    stride-8 logits come after the main, full-size output)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def load_inference_model(model, *, weights=None, num_classes=None, preprocessing=None, options=None,
                         class_names=None) -> InferenceModel:
    """A saved .keras/.h5 file, or a registry name built with `weights=` (and `options=`).

    Preprocessing: `preprocessing=` (a kind or model name) if given; else, for a file, the
    run's kseg_run.json next to it or the file's conversion metadata; for a registry name,
    its weight layout's (the torchvision layout's for a state_dict), or its named weights'
    (`weights="imagenet"`: kseg.pretrained), which also give the class names and eval transform.
    """
    model = os.fspath(model)
    options = dict(options or {})
    looks_like_file = os.path.isfile(model) or model.lower().endswith((".keras", ".h5", ".hdf5")) or os.sep in model
    if looks_like_file:
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{model} does not exist")
        if weights is not None or num_classes is not None or options:
            raise ValueError(f"{model} is a saved model: --weights, --num-classes and --option go with a "
                             "registry name (kseg models lists them)")
        try:
            net = keras.saving.load_model(model, compile=False)
        except (ValueError, OSError, TypeError, zipfile.BadZipFile) as e:
            raise ValueError(f"{model}: cannot load the Keras model: {e}") from None
        ident = of_file(model)
        if ident is not None and ident.architecture and model_info(net) is None:
            # Keras' loader drops the attribute: the recorded architecture names the task (task_of).
            remember_identity(net, {"name": ident.architecture, "kwargs": dict(ident.build_kwargs)})
        if preprocessing is not None:
            prep = resolve_preprocessing(preprocessing)
        else:
            prep = ident.preprocessing if ident is not None else None
            if prep is None:
                raise ValueError(f"{model}: no kseg_run.json next to it and no kseg metadata inside, so the input "
                                 "preprocessing is unknown; pass --preprocessing (caffe, torch, unit, batchnorm or "
                                 "the architecture's name)")
        if class_names is None and ident is not None and ident.class_names:
            class_names = list(ident.class_names)
        resize, crop, interpolation = (ident.eval_transform if ident is not None and ident.eval_transform
                                       else (None, None, "bilinear"))
        transform = (resize, crop) if resize else None
        return InferenceModel(net, prep, model, class_names, transform, interpolation)

    get_spec(model)  # ValueError naming the known models
    if weights is None:
        raise ValueError(f"{model}: a registry name needs --weights (a trained file), or pass a saved .keras file")
    net = build_model(model, num_classes=num_classes, weights=weights, **options)
    # Named pretrained weights (kseg.pretrained) bring their preprocessing, class names and eval transform.
    ident = identify(net)
    prep = resolve_preprocessing(preprocessing) if preprocessing is not None else ident.preprocessing
    if class_names is None and ident.class_names:
        class_names = list(ident.class_names)
    resize, crop, interpolation = ident.eval_transform or (None, None, "bilinear")
    return InferenceModel(net, prep, f"{model} ({os.fspath(weights)})", class_names,
                          (resize, crop) if resize else None, interpolation)
