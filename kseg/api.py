"""build_model: the one entry point from a registry name to a ready keras.Model."""

from __future__ import annotations

import contextlib
import inspect
import os

from kseg.batchnorm import fuse_batch_norm
from kseg.layernorm import fuse_layer_norm
from kseg.registry import get_spec


def build_model(name, *, num_classes=None, input_shape=None, weights=None, backbone_weights=None, **kwargs):
    """Build the registered model `name`.

    Args:
        name: a name from `kseg.list_models()`.
        num_classes: classes of the output layer; the spec's default if None.
        input_shape: (height, width, channels); None dims accept any size at run time.
        weights: None; the name of registered pretrained weights (`kseg weights list NAME`, e.g.
            "imagenet" for keras.applications' file, "imagenet_torchvision"), found in the cache
            ($KSEG_HOME/weights) or downloaded and verified once (kseg.pretrained); or a path to a
            Keras weight file (.h5, .weights.h5, .keras; loaded by layer name) or a
            torchvision-layout state_dict (.pth, .pt, .safetensors, .npz). Named weights set the
            build options their file needs (layout, num_classes) unless given, and the model
            records their name, preprocessing, class names and evaluation transform (kseg.identity).
            For architectures with two published layouts (ResNet, MobileNet, DenseNet), a state_dict selects the
            torchvision layout unless `layout` is given.
        backbone_weights: for dense-prediction models, ImageNet weights of the backbone
            classifier (a registered name of the backbone's weights, a keras.applications file or a
            torchvision state_dict) to initialise from, as the papers did; the head keeps its own
            initialisation.
        **kwargs: architecture options (see the builder's signature).
    """
    spec = get_spec(name)
    from kseg import pretrained
    from kseg import weights as weights_mod

    if backbone_weights is not None and spec.backbone is None:
        raise ValueError(f"{name} has no ImageNet backbone to initialise from {os.fspath(backbone_weights)}")
    entry = pretrained.lookup(name, weights)
    backbone_entry = pretrained.lookup(spec.backbone, backbone_weights)
    implied = {}
    # A model whose layouts are all weight layouts (fcn_resnet: torchvision only) refuses the others' files
    # before downloading them.
    weight_layouts = set(spec.layouts) if set(spec.layouts) <= {"keras", "torchvision"} else set()
    if backbone_entry is not None and weight_layouts and backbone_entry.layout not in weight_layouts:
        usable = [e.name for e in pretrained.list_weights(spec.backbone) if e.layout in weight_layouts]
        raise ValueError(f"{name} takes {' or '.join(sorted(weight_layouts))}-layout {spec.backbone} weights; "
                         f"{backbone_weights!r} has the {backbone_entry.layout} layout (use {', '.join(usable)})")
    if backbone_entry is not None:
        implied.update(spec.layouts.get(backbone_entry.layout, {}))
    if entry is not None:
        implied.update(pretrained.build_options(entry, spec.layouts))
    files = (None if entry else weights, None if backbone_entry else backbone_weights)
    build_kwargs = {**layout_options(name, *files), **implied, **kwargs}
    if num_classes is None and "num_classes" in build_kwargs:  # named weights' classes (ssd300 coco: 91)
        num_classes = build_kwargs.pop("num_classes")
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
    # Named weights: the cached file, downloaded and verified first if needed (after the options are checked).
    if backbone_entry is not None:
        backbone_weights = pretrained.ensure(backbone_entry)
    if entry is not None:
        weights = pretrained.ensure(entry)
    model = spec.builder(**build_kwargs)
    # What rebuilds this model: conversion metadata and serving read it (see model_info).
    info = {"name": name, "kwargs": _jsonable(build_kwargs)}
    if entry is not None or backbone_entry is not None:
        info.update(pretrained_identity(spec, build_kwargs, entry, backbone_entry))
    remember_identity(model, info)
    if backbone_weights is not None:
        weights_mod.load_backbone(model, backbone_weights, spec)
    if weights is not None:
        weights_mod.load_weights(model, os.fspath(weights), spec=spec)
    # BatchNorm trains with TF's fused kernel (kseg.batchnorm), LayerNorm with its closed-form gradient
    # (kseg.layernorm): the layers and files stay Keras'.
    return fuse_layer_norm(fuse_batch_norm(model))


def pretrained_identity(spec, build_kwargs, entry=None, backbone_entry=None) -> dict:
    """What a model built with named weights records (model_info): the weights' names and the
    preprocessing, class names and evaluation transform they imply, so the model's files carry
    them without the weights registry. Class names and the transform only where the model keeps
    the weights' classifier (its output has as many classes as the names)."""
    info = {}
    if backbone_entry is not None:
        info["backbone_weights"] = backbone_entry.name
        layout_prep = spec.layout_preprocessing.get(_layout_name(spec, build_kwargs))
        info["preprocessing"] = (layout_prep or backbone_entry.resolved_preprocessing()).to_dict()
    if entry is not None:
        info["weights"] = entry.name
        info["preprocessing"] = entry.resolved_preprocessing().to_dict()
        names = entry.class_names
        classes = build_kwargs.get("num_classes", spec.num_classes)
        if names is not None and classes == len(names) and build_kwargs.get("include_top", True):
            info["class_names"] = list(names)
            resize, crop, interpolation = entry.eval_transform or (None, None, None)
            if crop is not None and spec.task == "classification":
                info["eval_transform"] = [resize, crop, interpolation]
    return info


def _layout_name(spec, build_kwargs):
    built = {**{k: p.default for k, p in inspect.signature(spec.builder).parameters.items()}, **build_kwargs}
    return next((n for n, o in spec.layouts.items() if o and all(built.get(k) == v for k, v in o.items())), None)


def inference_model(model):
    """A detector with its decoder appended: the raw outputs (SSD: mbox_loc, mbox_conf) become
    `detection_boxes` (N, K, 4, xyxy pixels of the input), `detection_scores`, `detection_classes`
    (class ids, background excluded, -1 padding) and `num_detections`, with the paper's defaults.
    The same as build_model(name, postprocess=True), for a model built, trained or loaded without."""
    import keras

    raw, decoder = _raw_and_decoder(model)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, _decode(model, raw, decoder), name=f"{model.name}_detector")


# A detector's decoded outputs, in the order deployment_model appends them.
DETECTION_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


def deployment_model(model):
    """The network a graph format (SavedModel, frozen graph, ONNX, TFLite) holds: for a kseg
    detector, its raw outputs followed by the decoded detections (DETECTION_OUTPUTS, each a named
    output), so one file serves training-style checks and deployment; any other model unchanged.
    The result shares the model's weights and identity; nms_variant picks the NMS a format traces.
    """
    import keras

    info = model_info(model)
    spec = get_spec(info["name"]) if info else None
    if spec is None or spec.postprocess is None:
        return model
    raw, decoder = _raw_and_decoder(model)
    found = _decode(model, raw, decoder)
    outputs = [keras.layers.Identity(name=name)(found[name]) for name in DETECTION_OUTPUTS]
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    deployed = keras.Model(inputs, [*raw.values(), *outputs], name=model.name)
    remember_identity(deployed, info)
    return deployed


@contextlib.contextmanager
def nms_variant(model, nms):
    """Trace `model` with every NMS-bearing layer (a decoder, Faster R-CNN's proposal layer: the
    layers with an `nms` attribute) set to the realisation `nms` (kseg.detection.nms.METHODS: "v5"
    for TFLite's builtin ops, "offset" for tf2onnx); restored afterwards."""
    layers = [layer for layer in model.layers if hasattr(layer, "nms")]
    before = [layer.nms for layer in layers]
    for layer in layers:
        layer.nms = nms
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.nms = value


def _raw_and_decoder(model):
    """({name: raw output tensor}, a decoder layer) of a kseg detector: a model built with
    postprocess=True gives its decoder and the tensors it reads, others their outputs and a fresh one."""
    info = model_info(model)
    spec = get_spec(info["name"]) if info else None
    if spec is None or spec.postprocess is None:
        raise ValueError(f"{model.name}: not a kseg detector (no decoder in its registry spec)")
    options = {**{k: p.default for k, p in inspect.signature(spec.builder).parameters.items()
                  if p.default is not inspect.Parameter.empty}, **info["kwargs"]}
    fresh = spec.postprocess(options)
    for layer in model.layers:
        if isinstance(layer, type(fresh)):
            return {n: model.get_layer(n).output for n in layer.inputs_from if n != "image"}, layer
    return dict(zip(model.output_names, model.outputs)), fresh


def _decode(model, raw, decoder):
    """The decoder called on the raw outputs it names (`inputs_from`; "image": the model's input)."""
    missing = [n for n in decoder.inputs_from if n != "image" and n not in raw]
    if missing:
        raise ValueError(f"{model.name}: its decoder reads outputs {missing}, which the model lacks "
                         f"(it has {sorted(raw)})")
    return decoder([model.inputs[0] if n == "image" else raw[n] for n in decoder.inputs_from])


def layout_options(name, *weight_files) -> dict:
    """The build options a weight file implies: a torchvision state_dict (full or backbone) selects
    the torchvision layout where `name` has two (ResNet, MobileNet, DenseNet); {} otherwise."""
    from kseg import weights as weights_mod

    for path in weight_files:
        if path is not None and weights_mod.detect_format(path) == "state_dict":
            return dict(get_spec(name).layouts.get("torchvision", {}))
    return {}


# The key of a kseg model's Keras config that names its architecture and build options.
IDENTITY_KEY = "kseg"


def remember_identity(model, info: dict):
    """Record {"name", "kwargs"} (and, for named weights, "weights", "backbone_weights",
    "preprocessing", "class_names", "eval_transform": see pretrained_identity) on `model` and in
    its Keras config.

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
    """{"name": registry name, "kwargs": build kwargs, ...} of a model made by build_model, else None."""
    info = getattr(model, "_kseg_info", None)
    return dict(info) if info is not None else None


def _jsonable(kwargs):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
