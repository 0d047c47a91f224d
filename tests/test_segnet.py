"""SegNet: index unpooling inside the real network, exact output sizes, the paper's parameter
counts, the input_bn option and VGG16 ImageNet initialisation from both ecosystems."""

import re

import keras
import numpy as np
import pytest
from helpers import save_legacy_h5  # noqa: E402

import kseg
from kseg.models.vgg import VGG16_CONV_NAMES
from kseg.registry import BATCHNORM, CAFFE, UNIT
from kseg.weights import WeightsMismatchError, load_backbone

VGG16_CONV_PARAMS = 14_714_688  # keras.applications.VGG16(include_top=False).count_params()


@pytest.fixture(scope="module")
def segnet():
    model = kseg.build_model("segnet")
    yield model
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def basic():
    return kseg.build_model("segnet_basic")


# --- unpooling ---------------------------------------------------------------------------


def _windows(a, fill):
    """(N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C, 4): the 2x2 pooling windows, odd edges padded."""
    n, h, w, c = a.shape
    a = np.pad(a, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=fill)
    a = a.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c)
    return a.transpose(0, 1, 3, 5, 2, 4).reshape(n, (h + 1) // 2, (w + 1) // 2, c, 4)


def _assert_argmax_unpool(encoder, x, out, where):
    """out must be x with each value placed at the max of its encoder window, zeros elsewhere."""
    assert out.shape == (*encoder.shape[:3], x.shape[-1]), where
    enc_w, out_w = _windows(encoder, -np.inf), _windows(out, 0.0)
    is_max = enc_w == enc_w.max(axis=-1, keepdims=True)
    # ReLU zeros tie; where a window's max is unique its position is fully determined.
    assert (is_max.sum(-1) == 1).mean() > 0.3, f"{where}: too few unique maxima for a meaningful check"
    assert np.all((out_w == 0) | is_max), f"{where}: a value landed off its window's max position"
    assert np.all(np.count_nonzero(out_w, axis=-1) <= 1), f"{where}: a window holds more than one value"
    np.testing.assert_array_equal(out_w.sum(-1), x, err_msg=f"{where}: values lost or moved between windows")


def test_unpooling_restores_values_at_the_encoder_argmax(segnet, rng):
    stages = range(1, 6)
    last_conv = {b: len(c) for b, c in enumerate(kseg.models.vgg.CFGS["D"], start=1)}
    probes = []
    for i in stages:
        unpool = segnet.get_layer(f"decoder{i}_unpool")
        encoder = segnet.get_layer(f"block{i}_conv{last_conv[i]}_relu").output
        probes += [encoder, unpool.input[0], unpool.output]
    probes.append(segnet.get_layer("block5_pool").output[0])
    probe = keras.Model(segnet.input, probes)
    # Batch of 2 different images: indices are per image, so a batch-offset bug would mix them.
    # 45x61 is odd at every stage but the last (45, 23, 12, 6, 3 rows).
    x = rng.uniform(0, 255, size=(2, 45, 61, 3)).astype("float32")
    got = probe.predict(x, verbose=0)
    for k, i in enumerate(stages):
        encoder, decoder_in, unpooled = got[3 * k : 3 * k + 3]
        assert decoder_in.shape[1:3] == _windows(encoder, 0).shape[1:3]
        _assert_argmax_unpool(encoder, decoder_in, unpooled, f"decoder{i}_unpool")
    # The deepest decoder unpools the pooled map itself: the result keeps only each window's max.
    pool5 = got[-1]
    np.testing.assert_array_equal(pool5, _windows(got[12], -np.inf).max(-1))


# --- geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (333, 417), (500, 375)])
def test_output_size_equals_input_size(basic, size, rng):
    h, w = size
    static = kseg.build_model("segnet_basic", input_shape=(h, w, 3))
    assert static.output_shape == (None, h, w, 11)
    x = rng.uniform(0, 1, size=(1, h, w, 3)).astype("float32")
    assert basic.predict(x, verbose=0).shape == (1, h, w, 11)


def test_segnet_at_odd_size_with_dynamic_and_static_input(segnet, rng):
    assert segnet.input_shape == (None, None, None, 3)
    # 65 and 33 stay odd through all five pools (65, 33, 17, 9, 5, 3): ceil mode at every stage.
    x = rng.uniform(0, 255, size=(1, 65, 33, 3)).astype("float32")
    assert segnet.predict(x, verbose=0).shape == (1, 65, 33, 11)
    static = kseg.build_model("segnet", input_shape=(333, 417, 3), num_classes=37)
    assert static.output_shape == (None, 333, 417, 37)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 2)])
def test_tiny_inputs_have_no_minimum_size(basic, size, rng):
    x = rng.uniform(0, 1, size=(2, *size, 3)).astype("float32")
    y = basic.predict(x, verbose=0)
    assert y.shape == (2, *size, 11) and np.all(np.isfinite(y))


# --- architecture and parameter counts ---------------------------------------------------


def test_segnet_parameter_counts(segnet):
    spec = kseg.get_spec("segnet")
    encoder = [layer for layer in segnet.layers if layer.name.startswith("block")]
    convs = [layer for layer in encoder if isinstance(layer, keras.layers.Conv2D)]
    bns = [layer for layer in encoder if isinstance(layer, keras.layers.BatchNormalization)]
    assert [c.name for c in convs] == VGG16_CONV_NAMES
    assert [b.name for b in bns] == [f"{n}_bn" for n in VGG16_CONV_NAMES]
    assert sum(c.count_params() for c in convs) == VGG16_CONV_PARAMS
    # 4,224 channels x (gamma, beta) trainable + (moving mean, variance).
    assert sum(b.count_params() for b in bns) == 16_896
    assert sum(int(np.prod(v.shape)) for b in bns for v in b.trainable_weights) == 8_448
    assert sum(layer.count_params() for layer in encoder) == 14_731_584  # paper: 14.7M
    assert segnet.count_params() == spec.params == 29_465_227  # paper: 29.5M
    decoder_convs = [layer.name for layer in segnet.layers if re.fullmatch(r"decoder\d_conv\d", layer.name)]
    assert len(decoder_convs) + 1 == 13  # "the decoder network has 13 layers", classifier included
    filters = [segnet.get_layer(n).filters for n in decoder_convs]
    assert filters == [512] * 5 + [256, 256, 256, 128, 128, 64, 64]
    classifier = segnet.get_layer("classifier")
    assert classifier.kernel_size == (3, 3) and classifier.filters == 11
    assert classifier.activation is keras.activations.linear  # logits


def test_segnet_basic_follows_the_paper(basic):
    spec = kseg.get_spec("segnet_basic")
    assert basic.count_params() == spec.params == 1_417_099
    convs = [
        layer for layer in basic.layers if isinstance(layer, keras.layers.Conv2D) and layer.name != "classifier"
    ]
    assert len(convs) == 8
    assert all(c.kernel_size == (7, 7) and c.filters == 64 and not c.use_bias for c in convs)
    names = {layer.name for layer in basic.layers}
    assert {f"block{i}_conv1_relu" for i in range(1, 5)} <= names
    assert not any(n.startswith("decoder") and n.endswith("_relu") for n in names), "no ReLU in the decoder"
    assert {f"decoder{i}_conv1_bn" for i in range(1, 5)} <= names
    assert basic.get_layer("classifier").kernel_size == (1, 1)


# --- input_bn (the Oxford-IIIT Pet recipe) -----------------------------------------------


def test_input_bn_option_and_its_preprocessing(segnet):
    spec = kseg.get_spec("segnet")
    assert spec.preprocessing is CAFFE and "input_bn" not in {layer.name for layer in segnet.layers}
    assert spec.preprocessing_for("input_bn") is BATCHNORM
    model = kseg.build_model("segnet", num_classes=3, input_shape=(128, 128, 3), **spec.layouts["input_bn"])
    first = model.layers[1]
    assert first.name == "input_bn" and isinstance(first, keras.layers.BatchNormalization)
    assert first.input is model.input
    assert model.count_params() == spec.params - 11 * (9 * 64 + 1) + 3 * (9 * 64 + 1) + 4 * 3
    raw = np.array([[[[0.0, 127.0, 255.0]]]], dtype="float32")
    np.testing.assert_array_equal(BATCHNORM.apply(raw), raw)  # the pipeline feeds raw 0..255
    assert kseg.get_spec("segnet_basic").preprocessing is UNIT
    assert kseg.get_spec("segnet_basic").preprocessing_for("input_bn") is BATCHNORM


def test_input_bn_must_be_a_bool():
    with pytest.raises(ValueError, match="input_bn must be True or False"):
        kseg.build_model("segnet_basic", input_bn="yes")


# --- VGG16 ImageNet initialisation -------------------------------------------------------


def _bn_and_decoder_weights(model):
    return {
        layer.name: [np.array(w) for w in layer.get_weights()]
        for layer in model.layers
        if layer.weights and layer.name not in VGG16_CONV_NAMES
    }


def test_backbone_from_keras_applications_vgg16_file(tmp_path):
    source = keras.applications.VGG16(weights=None, include_top=False)
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    save_legacy_h5(source, path)
    model = kseg.build_model("segnet")
    before = _bn_and_decoder_weights(model)
    assert load_backbone(model, path, kseg.get_spec("segnet")) == sorted(VGG16_CONV_NAMES)
    for name in VGG16_CONV_NAMES:
        got, want = model.get_layer(name).get_weights(), source.get_layer(name).get_weights()
        assert len(got) == len(want) == 2, name
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, err_msg=name)
    after = _bn_and_decoder_weights(model)
    assert after.keys() == before.keys()
    for name in before:  # BatchNorm (encoder too) and decoder keep their initialisation
        for a, b in zip(after[name], before[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_backbone_from_torchvision_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    torch.manual_seed(0)
    module = ref.VGG16(num_classes=10)
    # torchvision's keys and conv shapes; a narrow classifier keeps the file small (the
    # reader still checks that classifier.0 takes the 512x7x7 flatten).
    module.classifier = torch.nn.Sequential(
        torch.nn.Linear(512 * 49, 4), torch.nn.ReLU(), torch.nn.Dropout(),
        torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(4, 10),
    )
    path = tmp_path / "vgg16.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model("segnet", backbone_weights=path)
    convs = [m for m in module.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(VGG16_CONV_NAMES)
    for name, conv in zip(VGG16_CONV_NAMES, convs):
        kernel, bias = model.get_layer(name).get_weights()
        oihw = conv.weight.detach().numpy()
        np.testing.assert_array_equal(kernel, oihw.transpose(2, 3, 1, 0), err_msg=name)
        np.testing.assert_array_equal(bias, conv.bias.detach().numpy(), err_msg=name)
    gamma, beta, mean, var = model.get_layer("block1_conv1_bn").get_weights()
    assert np.all(gamma == 1) and np.all(beta == 0) and np.all(mean == 0) and np.all(var == 1)


def test_resnet50_file_as_backbone_names_the_file(tmp_path):
    source = keras.applications.ResNet50(weights=None, include_top=False)
    path = tmp_path / "resnet50_notop.h5"
    save_legacy_h5(source, path)
    expected = re.escape(str(path)) + r".*not vgg16 ImageNet weights.*block1_conv1"
    with pytest.raises(WeightsMismatchError, match=expected):
        kseg.build_model("segnet", backbone_weights=path)


def test_segnet_basic_has_no_imagenet_backbone(tmp_path):
    path = tmp_path / "vgg16.h5"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="segnet_basic has no ImageNet backbone"):
        kseg.build_model("segnet_basic", backbone_weights=path)
