"""TFLite export (float and dynamic-range int8), every file run in the TFLite interpreter vs Keras."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TRUNK_ONLY

import kseg
from convert.io import OutputExistsError
from convert.tflite_format import TFLiteFileError, _argmax_pool_builtin, export_tflite, load_tflite
from convert.verify import keras_runner, verify
from kseg import identity as md
from kseg.api import deployment_model

CASES = {name: ({}, (49, 67)) for name in kseg.list_models()}
CASES.update({
    "lenet5": ({}, (32, 32)),
    "alexnet": ({}, (224, 224)),
    "vgg16": ({}, (224, 224)),
    "ssd300": ({}, (300, 300)),
    **{name: ({"include_top": False}, (64, 64)) for name in TRUNK_ONLY},
    "rcnn_alexnet": ({"num_proposals": 16}, (49, 67)),  # an AlexNet pass per proposal: 16, not 2000
})
# R-CNN's warp (CropAndResize) is no TFLite builtin: its refusal is tested in tests/test_rcnn.py.
TFLITE_MODELS = [n for n in kseg.list_models() if n != "rcnn_alexnet"]
# Every layer type: argmax pooling + unpooling, dilated convs + align-corners resize, six outputs,
# LeNet's head; BatchNorm via segnet_basic. ResNet (18 s here) and FCN's crops + transposed convs
# (134M params) are in the slow set, covered fast by the ONNX tests and test_crop_and_transposed_conv.
FAST = ["lenet5", "segnet_basic", "deeplab_largefov", "hed"]


def _params(names):
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


def _check(model, runner, size, batch=2, tolerance=None):
    report = verify(keras_runner(model, md.build_metadata(model)), runner, input_size=size, batch=batch,
                    tolerance=tolerance)
    assert report.passed, report.summary()
    return report


@pytest.mark.parametrize("name", _params(TFLITE_MODELS))
def test_every_model_to_float_tflite(name, tmp_path):
    kwargs, size = CASES[name]
    model = kseg.build_model(name, **kwargs)
    path = export_tflite(model, tmp_path / f"{name}.tflite")
    runner = load_tflite(path)
    assert runner.metadata["architecture"] == name and runner.output_names == list(deployment_model(model).output_names)
    # Builtin ops only: the file runs on any TFLite runtime, no Flex delegate.
    assert runner.metadata["tflite"]["select_tf_ops"] == []
    report = _check(model, runner, size)
    assert report.kind == "runtime"
    # The interpreter resizes to the batch it is given.
    x = np.zeros((1, *[s if s else 33 for s in runner.input_shape[:2]], runner.input_shape[2]), np.float32)
    if runner.extra_inputs:  # Fast R-CNN: the proposals too
        x = {"image": x, **{k: np.zeros((1, *v), np.float32) for k, v in runner.extra_inputs.items()}}
    assert runner(x)[0].shape[0] == 1


def test_crop_and_transposed_conv(tmp_path):
    # FCN's head in miniature: transposed conv 2x, crop to the reference, skip connection.
    from kseg.layers import CropToReference

    inputs = keras.Input((None, None, 3), name="image")
    pooled = keras.layers.MaxPooling2D(2, name="pool")(keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs))
    up = keras.layers.Conv2DTranspose(4, 4, strides=2, use_bias=False, name="up")(pooled)
    out = CropToReference(offset=1, name="crop")([up, inputs])
    model = keras.Model(inputs, out)
    runner = load_tflite(export_tflite(model, tmp_path / "fcn_head.tflite", metadata={"outputs": ["crop"]}))
    x = np.random.default_rng(0).normal(size=(2, 31, 45, 3)).astype(np.float32)
    ref = np.asarray(model(x))
    # XNNPACK vs oneDNN: other kernels, other summation order (measured 1-2e-7 of the scale here);
    # the cross-runtime bound, 1e-4 of the scale, still 1e3 below a wrong offset or kernel.
    assert np.abs(runner(x)[0] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_argmax_pooling_rewrite_is_bit_exact():
    rng = np.random.default_rng(0)
    for shape in [(2, 7, 9, 5), (1, 8, 8, 3)]:
        for x in (rng.normal(size=shape), rng.integers(0, 3, size=shape), np.maximum(rng.normal(size=shape), 0)):
            x = tf.constant(x, tf.float32)
            for padding in ("same", "valid"):
                for k in (2, 3):
                    ref = tf.nn.max_pool_with_argmax(x, k, k, padding.upper(), output_dtype=tf.int64,
                                                     include_batch_in_index=False)
                    got = _argmax_pool_builtin(x, pool=(k, k), padding=padding)
                    np.testing.assert_array_equal(got[0], ref[0])
                    np.testing.assert_array_equal(got[1], ref[1])


def test_segnet_records_rewritten_layers(tmp_path):
    model = kseg.build_model("segnet_basic")
    meta = load_tflite(export_tflite(model, tmp_path / "s.tflite")).metadata["tflite"]
    assert meta["builtin_rewrites"] == ["block1_pool", "block2_pool", "block3_pool", "block4_pool"]
    assert os.path.exists(tmp_path / "s.tflite.kseg.json")
    # The rewrite applies to the trace only: the Keras model still calls the TF op.
    assert "call" not in vars(model.get_layer("block1_pool"))


@pytest.mark.parametrize("name, size", [
    ("deeplab_largefov", (49, 67)),
    pytest.param("hed", (49, 67), marks=pytest.mark.slow),
    ("lenet5", (32, 32)),
])
def test_dynamic_range_int8(name, size, tmp_path):
    # Seeded: int8's error depends on the weights (random HEDs: 2.4-6.0% of max|output|, bound 10%).
    keras.utils.set_random_seed(0)
    model = kseg.build_model(name)
    float_size = os.path.getsize(export_tflite(model, tmp_path / "f.tflite"))
    path = export_tflite(model, tmp_path / "q.tflite", quantize="dynamic")
    assert os.path.getsize(path) < 0.35 * float_size  # int8 weights
    runner = load_tflite(path)
    assert runner.quantized and runner.metadata["tflite"]["quantize"] == "dynamic"
    report = _check(model, runner, size)
    assert report.kind == "int8"


def test_fixed_input_size(tmp_path):
    model = kseg.build_model("deeplab_largefov")
    runner = load_tflite(export_tflite(model, tmp_path / "fixed.tflite", input_size=(49, 67)))
    assert runner.input_shape == (49, 67, 3)
    _check(model, runner, (49, 67))


def test_bad_arguments_and_files(tmp_path):
    model = kseg.build_model("lenet5")
    with pytest.raises(ValueError, match="quantize"):
        export_tflite(model, tmp_path / "m.tflite", quantize="int4")
    path = export_tflite(model, tmp_path / "m.tflite")
    with pytest.raises(OutputExistsError, match="m.tflite"):
        export_tflite(model, path)
    data = open(path, "rb").read()
    (tmp_path / "cut.tflite").write_bytes(data[:200])
    with pytest.raises(TFLiteFileError, match="cut.tflite"):
        load_tflite(tmp_path / "cut.tflite")
    with pytest.raises(FileNotFoundError, match="nope.tflite"):
        load_tflite(tmp_path / "nope.tflite")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_truncated_file_is_an_error_not_a_crash(keep, tmp_path):
    path = export_tflite(kseg.build_model("lenet5"), tmp_path / "m.tflite")
    data = open(path, "rb").read()
    (tmp_path / "cut.tflite").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TFLiteFileError, match="cut.tflite"):
        load_tflite(tmp_path / "cut.tflite")
