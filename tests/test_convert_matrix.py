"""Every registered model through every format kseg writes, each conversion verified numerically.

The source is a kseg-written `.h5` (full model + metadata); `convert.convert` writes each
target to a temporary path, opens it in its own runtime, verifies it against the source and
only then renames it into place. The fast default subset covers every layer type (SegNet
unpooling, DeepLab dilated convs + align-corners resize, HED's crops + transposed convs and
multiple outputs, ResNet BatchNorm, LeNet's fixed-size classifier); `-m slow` runs the rest.
"""

import importlib.util
import os
import shutil

import keras
import numpy as np
import pytest
from conftest import TRUNK_ONLY

import kseg
from convert import api, formats
from convert.io import existing_outputs
from convert.keras_format import save_keras
from kseg.identity import build_metadata

# Build options that keep a model small or fast where its default top is fixed-size and heavy.
SMALL = {
    "vgg16": {"include_top": False},
    **{name: {"include_top": False} for name in TRUNK_ONLY},
    "rcnn_alexnet": {"num_proposals": 16},  # every proposal is an AlexNet pass: 16, not 2000
}
# Detectors with a second input (region proposals) beside the image.
TWO_INPUTS = {"fast_rcnn_vgg16", "rcnn_alexnet"}
# Models with an op TFLite runs only through the Flex delegate (R-CNN's warp: CropAndResize).
FLEX_ONLY = {"rcnn_alexnet"}
# BatchNorm is covered by SegNet-Basic (conv-BN-ReLU); ResNet (30 s per path here) is slow.
FAST_MODELS = {"segnet_basic", "deeplab_largefov", "hed", "lenet5"}
TF_FORMATS = ["keras", "h5", "weights_h5", "saved_model", "tf_serving", "frozen_graph", "checkpoint"]
# Paths every model must pass in the fast subset; the rest of the matrix is slow.
FAST_FORMATS = {"saved_model", "frozen_graph"}
# ONNX and TFLite: written by convert/onnx_format.py and convert/tflite_format.py.
RUNTIME_FORMATS = {"onnx": "convert.onnx_format", "tflite": "convert.tflite_format"}
# SegNet's unpooling and DeepLab's dilated convs must pass every path, in the fast subset too.
EVERY_PATH_FAST = {"segnet_basic", "deeplab_largefov"}


def _input_size(spec, model):
    h, w = model.inputs[0].shape[1:3]  # the image (Fast R-CNN's second input: its proposals)
    return (h, w) if h is not None else (64, 64)


def _build_kwargs(name, fmt):
    kwargs = dict(SMALL.get(name, {}))
    if fmt == "safetensors":
        # A torchvision state_dict holds torchvision's network: ResNet in its v1.5 layout.
        kwargs.update(kseg.get_spec(name).layouts.get("torchvision", {}))
    return kwargs


def _has_torch_layout(name):
    return kseg.get_spec(name).torch_map is not None


def _cases():
    for name in kseg.list_models():
        targets = TF_FORMATS + list(RUNTIME_FORMATS) + (["safetensors"] if _has_torch_layout(name) else [])
        for fmt in targets:
            fast = name in FAST_MODELS and (fmt in FAST_FORMATS or name in EVERY_PATH_FAST)
            yield pytest.param(name, fmt, id=f"{name}-{fmt}", marks=() if fast else pytest.mark.slow)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (kseg-written .h5, input size), built once per model."""
    root = tmp_path_factory.mktemp("sources")
    cache = {}

    def get(name, fmt):
        kwargs = _build_kwargs(name, fmt)
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            keras.backend.clear_session()
            # Fixed weights: SegNet's argmax pooling is discontinuous at ties, so random weights that
            # happen to put two pooled values within float rounding can flip an unpooling position
            # between runtimes (see the report); a seed keeps the matrix reproducible.
            keras.utils.set_random_seed(0)
            model = kseg.build_model(name, **kwargs)
            path = os.path.join(root, f"{name}-{len(cache)}.h5")
            save_keras(model, path, metadata=build_metadata(model))
            cache[key] = (path, _input_size(kseg.get_spec(name), model))
        return cache[key]

    yield get
    shutil.rmtree(root, ignore_errors=True)  # the full-size sources are GBs


@pytest.mark.parametrize("name,fmt", list(_cases()))
def test_convert_and_verify(sources, name, fmt, tmp_path):
    if fmt in RUNTIME_FORMATS and importlib.util.find_spec(RUNTIME_FORMATS[fmt]) is None:
        pytest.skip(f"{RUNTIME_FORMATS[fmt]} is not in this tree")
    src, size = sources(name, fmt)
    suffix = formats.FORMATS[fmt].suffix
    dst = tmp_path / f"out{suffix}"
    # tf_serving: predict_images resizes to the test size (the default is the paper's, 321-520 px).
    if fmt == "tflite" and name in FLEX_ONLY:
        # CropAndResize is no TFLite builtin: the file would need the Flex delegate, which this interpreter
        # lacks, so it cannot be verified: refused, nothing written.
        with pytest.raises(RuntimeError, match="Flex delegate"):
            api.convert(src, dst, to=fmt, input_size=size)
        assert not os.listdir(tmp_path)
        return
    if fmt == "tf_serving" and name in TWO_INPUTS:
        # Its second input (proposals) has no place in the image-level signatures: a plain SavedModel
        # (serving_default takes every input), said in a warning.
        with pytest.warns(UserWarning, match="signatures take images only"):
            report = api.convert(src, dst, to=fmt, input_size=size, export_size=size)
    elif fmt == "tf_serving" and name.startswith("faster_rcnn_"):
        # An any-size detector is exported at a test scale (each image resized keeping its aspect ratio, as
        # kseg export --serving does), not at a fixed size: the shorter side to the test size.
        report = api.convert(src, dst, to=fmt, input_size=size, min_size=min(size), max_size=max(size))
    else:
        report = api.convert(src, dst, to=fmt, input_size=size, export_size=size if fmt == "tf_serving" else None)
    out = report["target"]["path"]
    assert existing_outputs(out), f"{out} was not written"
    assert formats.detect(dst) == fmt
    assert report["verification"]["passed"], report["summary"]
    for output in report["verification"]["outputs"]:
        assert output["max_abs"] <= output["allowed_max_abs"]
        if output["argmax_agreement"] is not None:
            assert output["argmax_agreement"] >= 0.999
    assert report["architecture"] == name
    # Nothing but the artifact (and its companions) is left: no temporaries.
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".kseg-tmp-")]
    # The metadata travelled: the artifact names its architecture and build options.
    if fmt not in RUNTIME_FORMATS:
        meta = api.load_runner(out).metadata
        assert meta["architecture"] == name
        assert meta["build_kwargs"] == _build_kwargs(name, fmt)


def test_matrix_covers_every_model_and_format():
    cases = list(_cases())
    names = {c.values[0] for c in cases}
    assert names == set(kseg.list_models())
    fast = [c for c in cases if not c.marks]
    # Every layer type is in the default run: unpooling, dilation, crops + deconvs, BN, fixed-size top.
    assert {c.values[0] for c in fast} == FAST_MODELS
    for name in EVERY_PATH_FAST:
        assert {c.values[1] for c in fast if c.values[0] == name} >= set(TF_FORMATS) | set(RUNTIME_FORMATS)
    assert np.all([c.values[1] in formats.FORMATS for c in cases])
