"""build_model: the one entry point from a registry name to a ready keras.Model."""

from __future__ import annotations

import inspect
import os

from kseg.registry import get_spec


def build_model(name, *, num_classes=None, input_shape=None, weights=None, backbone_weights=None, **kwargs):
    """Build the registered model `name`.

    Args:
        name: a name from `kseg.list_models()`.
        num_classes: classes of the output layer; the spec's default if None.
        input_shape: (height, width, channels); None dims accept any size at run time.
        weights: None, or a path to a Keras weight file (.h5, .weights.h5, .keras; loaded
            by layer name) or a torchvision-layout state_dict (.pth, .pt, .safetensors, .npz).
            For architectures with two published layouts (ResNet), a state_dict selects the
            torchvision layout unless `layout` is given.
        backbone_weights: for dense-prediction models, ImageNet weights of the backbone
            classifier (a keras.applications file or a torchvision state_dict) to initialise
            from, as the papers did; the head keeps its own initialisation.
        **kwargs: architecture options (see the builder's signature).
    """
    spec = get_spec(name)
    from kseg import weights as weights_mod

    build_kwargs = {**layout_options(name, weights, backbone_weights), **kwargs}
    spec.task_object.check_num_classes(name, num_classes)
    if num_classes is not None:
        build_kwargs["num_classes"] = num_classes
    if input_shape is not None:
        build_kwargs["input_shape"] = tuple(input_shape)
    options = inspect.signature(spec.builder).parameters
    unknown = sorted(set(build_kwargs) - set(options))
    if unknown:
        raise TypeError(
            f"build_model({name!r}) got unknown option(s) {unknown}; "
            f"{name} accepts {sorted(options)}"
        )
    model = spec.builder(**build_kwargs)
    # What rebuilds this model: conversion metadata and serving read it (see model_info).
    remember_identity(model, {"name": name, "kwargs": _jsonable(build_kwargs)})
    if backbone_weights is not None:
        weights_mod.load_backbone(model, backbone_weights, spec)
    if weights is not None:
        weights_mod.load_weights(model, os.fspath(weights), spec=spec)
    return model


def inference_model(model):
    """A detector with its decoder appended: the raw outputs (SSD: mbox_loc, mbox_conf) become
    `detection_boxes` (N, K, 4, xyxy pixels of the input), `detection_scores`, `detection_classes`
    (class ids, background excluded, -1 padding) and `num_detections`, with the paper's defaults.
    The same as build_model(name, postprocess=True), for a model built, trained or loaded without."""
    import keras

    raw, decoder = _raw_and_decoder(model)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, decoder(raw), name=f"{model.name}_detector")


# A detector's decoded outputs, in the order deployment_model appends them.
DETECTION_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


def deployment_model(model, *, nms=None):
    """The network a graph format (SavedModel, frozen graph, ONNX, TFLite) holds: for a kseg
    detector, its raw outputs followed by the decoded detections (DETECTION_OUTPUTS, each a named
    output), so one file serves training-style checks and deployment; any other model unchanged.

    nms: the decoder's NMS realisation (kseg.detection.nms: "combined", or "v5" for TFLite's
    builtin ops); None keeps the decoder's. The result shares the model's weights and identity.
    """
    import keras

    info = model_info(model)
    spec = get_spec(info["name"]) if info else None
    if spec is None or spec.postprocess is None:
        return model
    raw, decoder = _raw_and_decoder(model)
    if nms is not None and nms != decoder.nms:
        decoder = type(decoder).from_config({**decoder.get_config(), "nms": nms})
    found = decoder(raw)
    outputs = [keras.layers.Identity(name=name)(found[name]) for name in DETECTION_OUTPUTS]
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    deployed = keras.Model(inputs, [*raw, *outputs], name=model.name)
    remember_identity(deployed, info)
    return deployed


def _raw_and_decoder(model):
    """(the raw output tensors, a decoder layer) of a kseg detector: a model built with
    postprocess=True gives its decoder and the decoder's inputs, others their outputs and a fresh one."""
    info = model_info(model)
    spec = get_spec(info["name"]) if info else None
    if spec is None or spec.postprocess is None:
        raise ValueError(f"{model.name}: not a kseg detector (no decoder in its registry spec)")
    options = {**{k: p.default for k, p in inspect.signature(spec.builder).parameters.items()
                  if p.default is not inspect.Parameter.empty}, **info["kwargs"]}
    fresh = spec.postprocess(options)
    for layer in model.layers:
        if isinstance(layer, type(fresh)):
            return list(layer.input), layer
    return list(model.outputs), fresh


def layout_options(name, *weight_files) -> dict:
    """The build options a weight file implies: a torchvision state_dict (full or backbone) selects
    the torchvision layout where `name` has two (ResNet); {} otherwise."""
    from kseg import weights as weights_mod

    for path in weight_files:
        if path is not None and weights_mod.detect_format(path) == "state_dict":
            return dict(get_spec(name).layouts.get("torchvision", {}))
    return {}


# The key of a kseg model's Keras config that names its architecture and build options.
IDENTITY_KEY = "kseg"


def remember_identity(model, info: dict):
    """Record {"name", "kwargs"} on `model` and in its Keras config.

    Keras' own saving (model.save to .keras or .h5, ModelCheckpoint) serializes get_config(), so
    the saved file names the architecture: kseg reads it back (kseg.identity), and plain Keras
    ignores the extra key when it loads the file (functional configs are read by their keys).
    """
    model._kseg_info = dict(info)
    keras_get_config = model.get_config

    def get_config():
        return {**keras_get_config(), IDENTITY_KEY: dict(model._kseg_info)}

    # Set on the instance, past Keras' attribute tracking: only this model carries the key.
    object.__setattr__(model, "get_config", get_config)


def model_info(model) -> dict | None:
    """{"name": registry name, "kwargs": build kwargs} of a model made by build_model, else None."""
    info = getattr(model, "_kseg_info", None)
    return dict(info) if info is not None else None


def _jsonable(kwargs):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
