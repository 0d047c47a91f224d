"""Classification networks, registry and package behaviour beyond the generic model test."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kseg
from kseg.layers import ConnectionTableConv2D, RBFOutput
from kseg.models.lenet import C3_TABLE
from kseg.models.resnet import feature_names
from kseg.registry import CAFFE, TORCH, register_model


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


# --- parameter counts (REFERENCE.md) -------------------------------------------------


def test_lenet5_counts():
    model = kseg.build_model("lenet5")
    assert model.get_layer("C1").count_params() == 156
    assert model.get_layer("C3").count_params() == 2_416
    assert model.count_params() == 61_706
    partial = kseg.build_model("lenet5", c3_table=True)
    assert partial.get_layer("C3").count_params() == 1_516
    assert partial.count_params() == 61_706 - 2_416 + 1_516
    rbf = kseg.build_model("lenet5", rbf_output=True)
    assert rbf.get_layer("output").count_params() == 84 * 10


@pytest.mark.parametrize("name, trainable", [("resnet50", 25_557_032), ("resnet101", 44_549_160)])
def test_resnet_torchvision_layout_counts(name, trainable):
    # torchvision counts parameters only; BN running statistics are buffers (non-trainable here).
    model = kseg.build_model(name, layout="torchvision")
    assert _trainable(model) == trainable
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert not any(layer.use_bias for layer in convs)


def test_vgg16_trunk_and_pooling():
    trunk = kseg.build_model("vgg16", include_top=False)
    assert trunk.count_params() == 14_714_688
    assert trunk.output_shape == (None, None, None, 512)
    pooled = kseg.build_model("vgg16", include_top=False, pooling="avg")
    assert pooled.output_shape == (None, 512)
    with pytest.raises(ValueError, match="pooling"):
        kseg.build_model("vgg16", include_top=False, pooling="mean")


@pytest.mark.parametrize("layout", ["keras", "torchvision"])
@pytest.mark.parametrize("output_stride, size", [(32, 7), (16, 14), (8, 28)])
def test_resnet_output_stride(layout, output_stride, size):
    model = kseg.build_model("resnet50", include_top=False, layout=layout, output_stride=output_stride,
                             input_shape=(224, 224, 3))
    assert model.output_shape == (None, size, size, 2048)
    # Dilation keeps the weights: same parameter count at every output stride.
    assert model.count_params() == kseg.build_model("resnet50", include_top=False, layout=layout).count_params()
    # Named feature maps for heads.
    strides = {"C1": 2, "C2": 4, "C3": 8, "C4": min(16, output_stride), "C5": output_stride}
    for key, layer in feature_names("resnet50").items():
        assert model.get_layer(layer).output.shape[1] == 224 // strides[key], key


def test_resnet_dilation_rates():
    model = kseg.build_model("resnet50", include_top=False, output_stride=8)
    rate = lambda n: model.get_layer(n).dilation_rate[0]  # noqa: E731
    # torchvision: the first block of a dilated stage keeps the previous dilation.
    assert [rate("conv4_block1_2_conv"), rate("conv4_block2_2_conv")] == [1, 2]
    assert [rate("conv5_block1_2_conv"), rate("conv5_block3_2_conv")] == [2, 4]
    with pytest.raises(ValueError, match="output_stride"):
        kseg.build_model("resnet50", output_stride=4)


# --- LeNet-5's own layers --------------------------------------------------------------


def test_connection_table_conv_matches_masked_dense_conv(rng):
    layer = ConnectionTableConv2D(5, C3_TABLE)
    x = rng.normal(size=(2, 14, 14, 6)).astype("float32")
    y = layer(x).numpy()
    kernel, bias = (w.numpy() for w in layer.weights)
    dense = np.zeros((5, 5, 6, 16), "float32")
    n = 0
    for j, inputs in enumerate(C3_TABLE):
        for i in inputs:
            dense[:, :, i, j] = kernel[:, :, n]
            n += 1
    want = tf.nn.conv2d(x, dense, 1, "VALID").numpy() + bias
    np.testing.assert_allclose(y, want, atol=1e-5)
    # Each output map depends only on its table's inputs.
    x2 = x.copy()
    x2[..., 5] += 1.0
    changed = np.abs(layer(x2).numpy() - y).max(axis=(0, 1, 2)) > 0
    assert changed.tolist() == [5 in row for row in C3_TABLE]


def test_rbf_output_is_negative_squared_distance(rng):
    layer = RBFOutput(10)
    x = rng.normal(size=(3, 84)).astype("float32")
    y = layer(x).numpy()
    centers = layer.weights[0].numpy()
    want = -((x[:, :, None] - centers[None]) ** 2).sum(axis=1)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lenet5_paper_options_reload(suffix, tmp_path, rng):
    model = kseg.build_model("lenet5", c3_table=True, rbf_output=True)
    path = tmp_path / f"lenet{suffix}"
    model.save(path)
    reloaded = keras.saving.load_model(path, compile=False)
    x = rng.uniform(size=(2, 32, 32, 1)).astype("float32")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert reloaded.count_params() == model.count_params()


# --- registry ------------------------------------------------------------------------


def test_registry_lists_and_filters():
    assert kseg.list_models(task="classification") == [
        "alexnet", "deit_base", "deit_base_distilled", "deit_small", "deit_small_distilled", "deit_tiny",
        "deit_tiny_distilled", "densenet121", "densenet169", "densenet201", "lenet5", "mobilenet_v2",
        "mobilenet_v3_large", "mobilenet_v3_small", "mobilevit_s", "mobilevit_xs", "mobilevit_xxs", "repvgg_a0",
        "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "resnet101", "resnet152", "resnet18", "resnet34",
        "resnet50", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg19", "vgg19_bn", "vit_b_16"]
    assert set(kseg.list_models(task="classification")) <= set(kseg.list_models())
    assert kseg.list_models(task="detection") == ["fast_rcnn_vgg16", "faster_rcnn_resnet101_c4",
                                                  "faster_rcnn_resnet50_c4", "faster_rcnn_vgg16", "rcnn_alexnet",
                                                  "ssd300"]
    with pytest.raises(ValueError, match="task"):
        kseg.list_models(task="depth")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'vgg16' is already registered by kseg.models.vgg.vgg16"):
        register_model("vgg16", task="classification", paper="", input_shape=(1, 1, 1), num_classes=1,
                       preprocessing="unit", params=0)(lambda: None)


def test_spec_metadata():
    spec = kseg.get_spec("resnet50")
    assert spec.paper.startswith("He, Zhang, Ren, Sun")
    assert spec.input_shape == (224, 224, 3)
    assert spec.preprocessing_for() is CAFFE
    assert spec.preprocessing_for("torchvision") is TORCH
    assert kseg.get_spec("alexnet").preprocessing is TORCH


def test_preprocessing_values():
    pixel = np.array([[[[255.0, 128.0, 0.0]]]], "float32")  # RGB
    np.testing.assert_allclose(CAFFE.apply(pixel)[0, 0, 0], [0 - 103.939, 128 - 116.779, 255 - 123.68], rtol=1e-6)
    np.testing.assert_allclose(
        TORCH.apply(pixel)[0, 0, 0],
        [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225],
        rtol=1e-5,
    )
    # Same result on a TF tensor, so data pipelines and serving graphs share the spec.
    np.testing.assert_allclose(CAFFE.apply(tf.constant(pixel)).numpy(), CAFFE.apply(pixel), rtol=1e-6)
    assert CAFFE.apply(pixel).dtype == np.float32


# --- backend pinning ------------------------------------------------------------------


def _import_kseg(backend):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    if backend:
        env["KERAS_BACKEND"] = backend
    code = "import kseg, keras; print(keras.backend.backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_backend_defaults_to_tensorflow():
    result = _import_kseg(None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "tensorflow"


def test_other_backend_is_refused_with_fix():
    result = _import_kseg("jax")
    assert result.returncode != 0
    assert "KERAS_BACKEND='jax'" in result.stderr and "KERAS_BACKEND=tensorflow" in result.stderr
