"""DeepLab v1: Caffe geometry, parameter counts, MSc alignment, ImageNet initialisation."""

import math

import keras
import numpy as np
import pytest

import kseg
from kseg.models import deeplab, resnet
from kseg.weights import WeightsMismatchError

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402
from helpers import save_legacy_h5  # noqa: E402


def caffe_pool_size(n, kernel, stride, pad):
    """Caffe's PoolingLayer::Reshape: ceil mode, minus a last window that starts in the padding."""
    out = math.ceil((n + 2 * pad - kernel) / stride) + 1
    if pad and (out - 1) * stride >= n + pad:
        out -= 1
    return out


def caffe_pool(x, kernel, stride, pad, mode):
    """Caffe's CPU pooling loops on one (H, W, C) map; AVE divides by the window clipped to H + pad."""
    h, w = x.shape[:2]
    oh, ow = caffe_pool_size(h, kernel, stride, pad), caffe_pool_size(w, kernel, stride, pad)
    out = np.zeros((oh, ow, x.shape[2]), np.float64)
    for i in range(oh):
        hs = i * stride - pad
        he = min(hs + kernel, h + pad)
        for j in range(ow):
            ws = j * stride - pad
            we = min(ws + kernel, w + pad)
            size = (he - hs) * (we - ws)
            window = x[max(hs, 0) : min(he, h), max(ws, 0) : min(we, w)]
            out[i, j] = window.max(axis=(0, 1)) if mode == "max" else window.sum(axis=(0, 1)) / size
    return out


def stride8(n):
    for _ in range(3):
        n = caffe_pool_size(n, 3, 2, 1)
    return n


@pytest.fixture(scope="module")
def largefov():
    """deeplab_largefov on any input size, returning [full-size logits, stride-8 logits]."""
    model = kseg.build_model("deeplab_largefov", return_stride8=True)
    yield model
    keras.backend.clear_session()


def _call(model, x):
    # Eager calls: model.predict traces a graph per new input size, slower than the run itself here.
    out = model(x, training=False)
    return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else np.asarray(out)


def _run(model, h, w, seed=0):
    x = np.random.default_rng(seed).normal(0, 50, size=(1, h, w, 3)).astype("float32")
    return x, _call(model, x)


# --- parameter counts ----------------------------------------------------------------


def test_largefov_parameter_count_exact(largefov):
    assert largefov.count_params() == 20_505_429
    assert kseg.get_spec("deeplab_largefov").params == 20_505_429


@pytest.mark.parametrize(
    "fc6, paper_millions, exact, taps",
    [
        ("4x4_4096_r4", 65.1, 65_140_565, [0, 2, 4, 6]),
        ("4x4_4096_r8", 65.1, 65_140_565, [0, 2, 4, 6]),
        ("7x7_4096_r4", 134.3, 134_346_581, np.arange(7)),  # fc1 reshaped, nothing dropped
    ],
)
def test_table2_fc6_variants_match_the_paper(vgg_keras_file, fc6, paper_millions, exact, taps):
    model = kseg.build_model("deeplab_largefov", fc6=fc6, input_shape=(33, 33, 3))
    kernel, channels, rate = deeplab.parse_fc6(fc6)
    fc6_layer = model.get_layer("fc6")
    assert fc6_layer.kernel_size == (kernel, kernel) and fc6_layer.dilation_rate == (rate, rate)
    assert model.get_layer("fc7").filters == channels  # fc7 follows fc6's width
    assert round(model.count_params() / 1e6, 1) == paper_millions
    assert model.count_params() == exact
    # ImageNet init of the variant (the adapter alone; the file round trip is tested below).
    path, source = vgg_keras_file
    adapted = kseg.get_spec("deeplab_largefov").backbone_adapt(dict(source), model, str(path))
    (w1, b1), (w2, b2) = source["fc1"], source["fc2"]
    tap_step = 6 // (kernel - 1)  # fc1's taps 0..6 in steps: 4x4 keeps 0, 2, 4, 6; 7x7 all
    np.testing.assert_array_equal(np.arange(7)[::tap_step], taps)
    expected = _expected_fc(w1.reshape(7, 7, 512, 4096), b1, w2, b2, tap_step, 1)
    _assert_fc([adapted["fc6"], adapted["fc7"]], expected)
    assert [a.shape for a in adapted["fc6"]] == [tuple(v.shape) for v in fc6_layer.weights]
    keras.backend.clear_session()


def test_msc_adds_five_128_channel_branches():
    model = kseg.build_model("deeplab_msc_largefov", input_shape=(41, 41, 3))
    branch_inputs = (3, 64, 128, 256, 512)  # image, pool1..pool4
    branches = sum(9 * c * 128 + 128 + 128 * 128 + 128 for c in branch_inputs)
    assert model.count_params() == 20_505_429 + branches + 640 * 21 == 21_711_445
    assert model.get_layer("fc8").kernel.shape == (1, 1, 1024 + 640, 21)
    for i, stride in enumerate((8, 4, 2, 1, 1)):
        assert model.get_layer(f"msc{i}_conv1").strides == (stride, stride)
        assert model.get_layer(f"msc{i}_conv2").kernel.shape == (1, 1, 128, 128)
    keras.backend.clear_session()


def test_bad_options_raise():
    with pytest.raises(ValueError, match="3x3_1024_r12"):
        kseg.build_model("deeplab_largefov", fc6="large")
    with pytest.raises(ValueError, match="minimum input size is 1x1"):
        kseg.build_model("deeplab_largefov", input_shape=(0, 64, 3))


# --- geometry ------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(32, 33), (50, 47), (98, 97)])
def test_pool_sizes_follow_caffe_at_even_and_odd_sizes(largefov, h, w):
    names = ["pool1", "pool2", "pool3", "pool4", "pool5", "pool5a", "fc8"]
    probe = keras.Model(largefov.input, [largefov.get_layer(n).output for n in names])
    sizes = [o.shape[1:3] for o in _call(probe, np.zeros((1, h, w, 3), "float32"))]
    expect, hw = [], (h, w)
    for stride in (2, 2, 2, 1, 1):
        hw = tuple(caffe_pool_size(n, 3, stride, 1) for n in hw)
        expect.append(hw)
    expect += [hw, hw]  # pool5a and fc8 keep pool5's size
    assert sizes == expect
    # Keras' "same" pooling would give ceil(n / 2): one short of Caffe for even n.
    assert expect[0] == (h // 2 + 1, w // 2 + 1)


@pytest.mark.parametrize("h, w", [(10, 11), (12, 9)])
def test_pooling_values_match_caffe(largefov, h, w):
    names = ["block1_conv2", "pool1", "pool4", "pool5", "pool5a"]
    probe = keras.Model(largefov.input, [largefov.get_layer(n).output for n in names])
    x = np.random.default_rng(1).normal(0, 50, size=(1, h, w, 3)).astype("float32")
    conv1_2, pool1, pool4, pool5, pool5a = (o[0] for o in _call(probe, x))
    np.testing.assert_allclose(pool1, caffe_pool(conv1_2, 3, 2, 1, "max"), rtol=1e-6)
    # Caffe's AVE pool counts the zero padding in the divisor (border pixels are divided by 9).
    np.testing.assert_allclose(pool5a, caffe_pool(pool5, 3, 1, 1, "ave"), rtol=1e-5, atol=1e-6)
    assert pool4.shape == pool5.shape == pool5a.shape


@pytest.mark.parametrize("h, w", [(224, 224), (333, 417), (500, 375)])
def test_output_size_equals_input_size_static(h, w):
    model = kseg.build_model("deeplab_largefov", input_shape=(h, w, 3), return_stride8=True)
    assert model.output_shape == [(None, h, w, 21), (None, stride8(h), stride8(w), 21)]
    keras.backend.clear_session()


@pytest.mark.parametrize("h, w", [(224, 224), (333, 417)])
def test_output_size_equals_input_size_dynamic(largefov, h, w):
    _, (full, logits8) = _run(largefov, h, w)
    assert full.shape == (1, h, w, 21)
    assert logits8.shape == (1, stride8(h), stride8(w), 21)
    assert np.all(np.isfinite(full))


def test_default_model_has_one_output_and_fc8_holds_stride8_logits():
    model = kseg.build_model("deeplab_largefov", input_shape=(65, 49, 3))
    assert model.output_shape == (None, 65, 49, 21)
    assert tuple(model.get_layer("fc8").output.shape) == (None, stride8(65), stride8(49), 21)
    keras.backend.clear_session()


def test_upsampling_puts_stride8_logit_i_on_input_pixel_8i(largefov):
    # align_corners=True (Caffe's Interp): for 8k+1 sizes logit (i, j) lands on pixel (8i, 8j).
    _, (full, logits8) = _run(largefov, 57, 41)
    assert logits8.shape[1:3] == (8, 6)
    np.testing.assert_allclose(full[0, ::8, ::8], logits8[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h, w", [(99, 101), (106, 75)])
def test_msc_branches_align_with_fc7_at_any_size(h, w):
    model = kseg.build_model("deeplab_msc_largefov", input_shape=(h, w, 3), return_stride8=True)
    fc7 = tuple(model.get_layer("fc7").output.shape[1:3])
    assert fc7 == (stride8(h), stride8(w))
    for i in range(5):
        assert tuple(model.get_layer(f"msc{i}_conv2").output.shape[1:3]) == fc7
    full, logits8 = _call(model, np.ones((1, h, w, 3), "float32"))
    assert full.shape == (1, h, w, 21) and logits8.shape == (1, *fc7, 21)
    keras.backend.clear_session()


@pytest.mark.parametrize("name", ["deeplab_largefov_resnet50", "deeplab_largefov_resnet101"])
def test_resnet_variants_output_size(name):
    model = kseg.build_model(name, return_stride8=True)
    assert model.count_params() == kseg.get_spec(name).params
    full, logits8 = _call(model, np.ones((1, 45, 66, 3), "float32"))
    assert full.shape == (1, 45, 66, 21)
    assert logits8.shape == (1, math.ceil(45 / 8), math.ceil(66 / 8), 21)  # output stride 8
    assert model.get_layer("conv5_block3_2_conv").dilation_rate == (4, 4)
    keras.backend.clear_session()


# --- ImageNet initialisation ---------------------------------------------------------


def test_documented_decimation_indices():
    np.testing.assert_array_equal(deeplab.fc6_taps(7), np.arange(7))
    np.testing.assert_array_equal(deeplab.fc6_taps(4), [0, 2, 4, 6])
    np.testing.assert_array_equal(deeplab.fc6_taps(3), [0, 3, 6])
    np.testing.assert_array_equal(deeplab.fc_channels(1024), np.arange(0, 4096, 4))
    with pytest.raises(ValueError, match="5x5"):
        deeplab.fc6_taps(5)


@pytest.fixture(scope="module")
def vgg_keras_file(tmp_path_factory):
    source = keras.applications.VGG16(weights=None)
    path = tmp_path_factory.mktemp("vgg") / "vgg16_keras.h5"
    save_legacy_h5(source, path)
    arrays = {n: source.get_layer(n).get_weights() for n in deeplab.VGG16_CONV_NAMES + ["fc1", "fc2"]}
    del source
    keras.backend.clear_session()
    return path, arrays


@pytest.fixture(scope="module")
def vgg_torch_file(tmp_path_factory):
    torch.manual_seed(0)
    state = ref.VGG16().state_dict()
    path = tmp_path_factory.mktemp("vgg") / "vgg16_torchvision.pth"
    torch.save(state, path)
    return path, {k: v.numpy() for k, v in state.items()}


def _expected_fc(fc1_hwio, fc1_b, fc2, fc2_b, tap_step, channel_step):
    taps, channels = slice(None, None, tap_step), slice(None, None, channel_step)
    kernel7 = fc2[channels, channels]
    return fc1_hwio[taps, taps, :, channels], fc1_b[channels], kernel7.reshape(1, 1, *kernel7.shape), fc2_b[channels]


def _assert_fc(got, expected):
    """got: [[fc6 kernel, bias], [fc7 kernel, bias]]; np.array_equal, as 400 MB arrays make assert_array_equal slow."""
    (k6, b6), (k7, b7) = got
    for g, e in zip((k6, b6, k7, b7), expected):
        assert g.shape == e.shape and np.array_equal(g, e)


def test_init_from_keras_applications_vgg16(vgg_keras_file):
    path, source = vgg_keras_file
    model = kseg.build_model("deeplab_largefov", input_shape=(33, 33, 3), backbone_weights=path)
    for name in deeplab.VGG16_CONV_NAMES:
        for got, want in zip(model.get_layer(name).get_weights(), source[name]):
            np.testing.assert_array_equal(got, want)
    (w1, b1), (w2, b2) = source["fc1"], source["fc2"]
    # keras.applications flattens the NHWC 7x7x512 pool5, so fc1's rows are an HWIO kernel.
    expected = _expected_fc(w1.reshape(7, 7, 512, 4096), b1, w2, b2, 3, 4)  # taps 0, 3, 6; channels 0, 4, ..
    _assert_fc([model.get_layer("fc6").get_weights(), model.get_layer("fc7").get_weights()], expected)
    keras.backend.clear_session()


def test_init_from_torchvision_vgg16(vgg_torch_file):
    path, state = vgg_torch_file
    model = kseg.build_model("deeplab_msc_largefov", input_shape=(33, 33, 3), backbone_weights=path)
    features = [i for i, m in enumerate(ref.VGG16().features) if isinstance(m, torch.nn.Conv2d)]
    for index, name in zip(features, deeplab.VGG16_CONV_NAMES):
        kernel, bias = model.get_layer(name).get_weights()
        np.testing.assert_array_equal(kernel, state[f"features.{index}.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(bias, state[f"features.{index}.bias"])
    # torchvision's classifier.0 reads an NCHW flatten: (4096, 512*7*7) -> (7, 7, 512, 4096).
    fc1 = state["classifier.0.weight"].reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0)
    fc2 = state["classifier.3.weight"].T
    expected = _expected_fc(fc1, state["classifier.0.bias"], fc2, state["classifier.3.bias"], 3, 4)
    _assert_fc([model.get_layer("fc6").get_weights(), model.get_layer("fc7").get_weights()], expected)
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def resnet_torch_file(tmp_path_factory):
    torch.manual_seed(0)
    source = ref.randomize_bn(ref.ResNet((3, 4, 6, 3)))
    path = tmp_path_factory.mktemp("resnet") / "resnet50_torchvision.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def test_init_resnet50_from_torchvision(resnet_torch_file):
    path, state = resnet_torch_file
    model = kseg.build_model("deeplab_largefov_resnet50", layout="torchvision", backbone_weights=path)
    checked = 0
    for m in resnet.torch_map("resnet50"):
        if m.layer == "predictions":
            continue
        got = model.get_layer(m.layer).get_weights()
        if m.kind == "conv":
            want = [state[f"{m.prefix}.weight"].numpy().transpose(2, 3, 1, 0)]
        else:
            want = [state[f"{m.prefix}.{s}"].numpy() for s in ("weight", "bias", "running_mean", "running_var")]
        assert len(got) == len(want), m.layer
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        checked += 1
    assert checked == 106  # 53 convs + 53 BNs

    # The dilated trunk computes torchvision's replace_stride_with_dilation=[False, True, True].
    dilated = ref.ResNet((3, 4, 6, 3), replace_stride_with_dilation=(False, True, True)).eval()
    dilated.load_state_dict(state)
    x = np.random.default_rng(0).normal(size=(1, 37, 50, 3)).astype("float32")
    with torch.no_grad():
        want = dilated.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    trunk = keras.Model(model.input, model.get_layer("conv5_block3_out").output)
    got = _call(trunk, x)
    assert got.shape == want.shape == (1, 5, 7, 2048)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)

    # An explicit keras layout cannot take a torchvision file (a state_dict alone selects torchvision).
    with pytest.raises(WeightsMismatchError, match="layout='torchvision'"):
        kseg.build_model("deeplab_largefov_resnet50", layout="keras", backbone_weights=path)
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def resnet_keras_file(tmp_path_factory):
    source = keras.applications.ResNet50(weights=None)
    path = tmp_path_factory.mktemp("resnet") / "resnet50_keras.h5"
    save_legacy_h5(source, path)
    arrays = {n: source.get_layer(n).get_weights() for n in ("conv1_conv", "conv4_block6_3_bn", "conv5_block3_2_conv")}
    del source
    keras.backend.clear_session()
    return path, arrays


def test_init_resnet50_from_keras_applications(resnet_keras_file):
    path, source = resnet_keras_file
    model = kseg.build_model("deeplab_largefov_resnet50", backbone_weights=path)
    for name, want in source.items():
        for g, w in zip(model.get_layer(name).get_weights(), want):
            np.testing.assert_array_equal(g, w)
    keras.backend.clear_session()


def test_resnet50_file_into_vgg_deeplab_names_the_file(resnet_keras_file, resnet_torch_file):
    for path in (resnet_keras_file[0], resnet_torch_file[0]):
        with pytest.raises(WeightsMismatchError) as info:
            kseg.build_model("deeplab_largefov", input_shape=(33, 33, 3), backbone_weights=path)
        assert str(path) in str(info.value)
    keras.backend.clear_session()
