"""FCN-AlexNet (fcn_alexnet): parameter counts against the FCN paper's Table 1 (this layout and the Caffe
original), the reference geometry (receptive field 355, crop offset 18, output size = input size,
ceil-mode pools against torch's), the bilinear frozen k63 upsampling, and the ImageNet initialisation
from torchvision's AlexNet and from kseg's alexnet files (fc6 / fc7 convolutionalised)."""

import copy

import keras
import numpy as np
import pytest

import kseg
from kseg.layers import BilinearUpsampling
from kseg.models.alexnet import CONVS
from kseg.weights import WeightsMismatchError, load_backbone

CONV_NAMES = [c[0] for c in CONVS]
TINY = {"width": 0.002, "num_classes": 2}  # 8 channels in every conv, fc6 and fc7: the same geometry


@pytest.fixture(scope="module")
def fcn():
    model = kseg.build_model("fcn_alexnet")
    yield model
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def tiny():
    return kseg.build_model("fcn_alexnet", **TINY)


# --- parameter counts ------------------------------------------------------------------


def test_parameter_count_and_reference_layers(fcn):
    assert fcn.count_params() == 58_840_206 == kseg.get_spec("fcn_alexnet").params
    # Table 1's 57M counts the learned parameters: all but the frozen 63 x 63 x 21 x 21 upscore.
    learned = sum(int(np.prod(v.shape)) for v in fcn.trainable_weights)
    assert learned == 57_089_877 and round(learned / 1e6) == 57
    assert fcn.count_params() - learned == 63 * 63 * 21 * 21
    shapes = {n: tuple(fcn.get_layer(n).kernel.shape) for n in ("conv1", "conv5", "fc6", "fc7", "score_fr", "upscore")}
    assert shapes == {"conv1": (11, 11, 3, 64), "conv5": (3, 3, 256, 256), "fc6": (6, 6, 256, 4096),
                      "fc7": (1, 1, 4096, 4096), "score_fr": (1, 1, 4096, 21), "upscore": (63, 63, 21, 21)}
    assert fcn.get_layer("conv1_pad").padding == ((100, 100), (100, 100))
    assert fcn.get_layer("upscore").strides == (32, 32) and fcn.get_layer("upscore").use_bias is False
    assert fcn.get_layer("score").offset == (18, 18)
    assert [fcn.get_layer(n).rate for n in ("drop6", "drop7")] == [0.5, 0.5]
    spec = kseg.get_spec("fcn_alexnet")
    assert (spec.task, spec.backbone, spec.num_classes, spec.preprocessing.kind) == ("segmentation", "alexnet", 21,
                                                                                     "torch")


def test_caffe_original_also_rounds_to_57m():
    # The reference's CaffeNet layout (voc-fcn-alexnet): 96-256-384-384-256 channels, groups of 2 in
    # conv2, conv4 and conv5; build only (the module docstring's comparison).
    x = inputs = keras.Input((None, None, 3))
    for filters, kernel, groups in ((96, 11, 1), (256, 5, 2), (384, 3, 1), (384, 3, 2), (256, 3, 2), (4096, 6, 1),
                                    (4096, 1, 1), (21, 1, 1)):
        x = keras.layers.Conv2D(filters, kernel, groups=groups)(x)
    x = keras.layers.Conv2DTranspose(21, 63, strides=32, use_bias=False)(x)
    caffe = keras.Model(inputs, x)
    assert caffe.count_params() == 58_704_590
    learned = caffe.count_params() - 63 * 63 * 21 * 21
    assert learned == 56_954_261 and round(learned / 1e6) == 57


# --- output size == input size ---------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (31, 2), (97, 129), (333, 417), (500, 375), (500, 500)])
def test_output_size_equals_input_size(fcn, tiny, size):
    # Static shapes of the full net; then a run of the tiny (None, None) net where it is cheap. With
    # torchvision's floor-mode pools, 500 would leave the upsampled map short of the crop.
    assert fcn(keras.Input((*size, 3))).shape == (None, *size, 21)
    assert tiny(keras.Input((*size, 3))).shape == (None, *size, 2)
    if size[0] * size[1] < 20_000:
        y = np.asarray(tiny(np.ones((1, *size, 3), "float32")))
        assert y.shape == (1, *size, 2) and np.all(np.isfinite(y))


def test_static_input_shape_builds():
    assert kseg.build_model("fcn_alexnet", input_shape=(333, 417, 3), **TINY).output.shape == (None, 333, 417, 2)


# --- geometry: receptive field and crop offset ------------------------------------------


def _uniform(model):
    """Every conv a box filter (all taps 1 / taps), biases 0: an impulse on a zero image spreads over
    exactly its cone, symmetrically, and max-pooling and ReLU pass it on."""
    for layer in model.layers:
        if type(layer) is keras.layers.Conv2D:
            kernel, bias = layer.get_weights()
            layer.set_weights([np.full_like(kernel, 1.0 / kernel[..., 0].size), bias * 0])
    return model


@pytest.fixture(scope="module")
def box():
    return _uniform(kseg.build_model("fcn_alexnet", input_shape=(None, None, 1), **TINY))


def test_score_fr_receptive_field_is_355_centred_on_32j_plus_13(box):
    # One impulse per image along a 1 x W row: score_fr cell j responds exactly to the pixels
    # 32 j + 13 +- 177 (Table 1's receptive field 355; the centre from the geometry in the module
    # docstring), clipped to the image.
    width = 400
    x = np.zeros((width, 1, width, 1), "float32")
    x[np.arange(width), 0, np.arange(width), 0] = 1.0
    probe = keras.Model(box.input, box.get_layer("score_fr").output)
    reached = np.asarray(probe(x))[:, 0, :, 0] > 0  # (impulse position, cell)
    assert reached.shape[1] >= 9
    for j in range(reached.shape[1]):
        want = np.zeros(width, bool)
        want[max(0, 32 * j + 13 - 177):32 * j + 13 + 178] = True
        np.testing.assert_array_equal(reached[:, j], want, err_msg=f"cell {j}")


@pytest.mark.parametrize("axis", [0, 1])
def test_impulse_comes_back_at_its_own_position(box, axis):
    # Box filters and max-pools keep a response symmetric about the impulse's coordinate wherever that
    # coordinate is an integer or half-integer at every layer: x = 13 (mod 16) (conv1 (x + 95) / 4, pool1
    # (x + 91) / 8, pool2 (x + 83) / 16 integers). The symmetric bilinear upscore then centres it on
    # x + 18, and the crop at 18 on x: the output's centre of mass is the impulse's position, and a pad
    # or crop off by one moves it by a pixel. Every map is separable, so a 1-pixel-thick image tests
    # each axis; positions 13 and 29 mod 32 sit at the two phases of score_fr's stride.
    length = 608
    for position in (301, 317):
        shape = [1, 1, 1]
        shape[axis] = length
        x = np.zeros((1, *shape), "float32")
        x[(0, *(position if a == axis else 0 for a in range(2)), 0)] = 1.0
        profile = np.asarray(box(x))[0, ..., 0].reshape(-1)
        assert profile[0] == 0 and profile[-1] == 0, "the response reaches the border: centre of mass biased"
        centre = float((profile * np.arange(length)).sum() / profile.sum())
        assert abs(centre - position) < 1e-3, (axis, position, centre)


# --- the bilinear upsampling ------------------------------------------------------------


def test_upscore_is_frozen_bilinear_interpolation(fcn):
    layer = fcn.get_layer("upscore")
    kernel = np.asarray(layer.kernel)
    np.testing.assert_array_equal(kernel, np.asarray(BilinearUpsampling()(kernel.shape)))
    assert layer.trainable is False and id(layer.kernel) not in {id(v) for v in fcn.trainable_weights}
    # Odd kernel 63: the filter peaks at tap 31 (weight 1), and taps t and t + 32 sum to 1, so input
    # cell i lands at 32 i + 31 and the interior is linear interpolation: a ramp i gives (o - 31) / 32.
    filt = kernel[:, 31, 0, 0] / kernel[31, 31, 0, 0]
    assert kernel[31, 31, 0, 0] == 1 and np.argmax(filt) == 31
    np.testing.assert_allclose(filt[:31] + filt[32:], 1, rtol=1e-6)
    n = 4
    ramp = np.broadcast_to(np.arange(n, dtype="float32")[:, None, None], (n, n, 21))[None].copy()
    y = np.asarray(layer(ramp))[0]
    assert y.shape == ((n - 1) * 32 + 63,) * 2 + (21,)
    rows = np.arange(31, (n - 1) * 32 + 32)
    np.testing.assert_allclose(y[rows, 40, :], np.broadcast_to(((rows - 31) / 32)[:, None], (rows.size, 21)),
                               atol=1e-5)


def test_options():
    model = kseg.build_model("fcn_alexnet", trainable_upsampling=True, score_initializer="zeros", **TINY)
    assert model.get_layer("upscore").trainable is True
    assert not np.any(model.get_layer("score_fr").get_weights()[0])
    assert model.get_layer("fc6").filters == 8
    with pytest.raises(ValueError, match="fcn_alexnet: width"):
        kseg.build_model("fcn_alexnet", width=0)


# --- ImageNet initialisation from AlexNet -------------------------------------------------


def _init_from(model, path):
    # What build_model("fcn_alexnet", backbone_weights=path) runs after building; the module's model
    # saves building another 59M-parameter net per test (the head is checked untouched).
    return load_backbone(model, path, kseg.get_spec("fcn_alexnet"))


def _check_fc(fcn, pool5, fc6, fc7):
    """fc6 / fc7 of the FCN on a 6x6 pool5 block inside a larger map: the 6x6 conv at the position
    whose window is the block gives the classifier's Linear fc6 (and fc7 after it)."""
    assert np.count_nonzero(fc6) > 100, "a degenerate check: fc6 is (nearly) all zero"
    field = np.zeros((1, 8, 9, 256), "float32")
    field[0, 1:7, 2:8] = pool5[0]
    got6 = np.asarray(fcn.get_layer("fc6")(field))
    assert got6.shape == (1, 3, 4, 4096)
    np.testing.assert_allclose(got6[0, 1, 2], fc6[0], rtol=1e-4, atol=1e-4 * np.abs(fc6).max())
    got7 = np.asarray(fcn.get_layer("fc7")(got6))
    np.testing.assert_allclose(got7[0, 1, 2], fc7[0], rtol=1e-4, atol=1e-4 * np.abs(fc7).max())


def _check_head_untouched(fcn):
    kernel = fcn.get_layer("upscore").kernel
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(BilinearUpsampling()(kernel.shape)))


def test_init_from_torchvision_alexnet_state_dict(fcn, tmp_path):
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    torch.manual_seed(0)
    module = ref.AlexNet().eval()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(module.state_dict(), path)
    score_fr = fcn.get_layer("score_fr").get_weights()[0].copy()
    assert _init_from(fcn, path) == sorted(CONV_NAMES + ["fc6", "fc7"])
    convs = [m for m in module.features if isinstance(m, torch.nn.Conv2d)]
    for name, conv in zip(CONV_NAMES, convs):
        kernel, bias = fcn.get_layer(name).get_weights()
        np.testing.assert_array_equal(kernel, conv.weight.detach().numpy().transpose(2, 3, 1, 0), err_msg=name)
        np.testing.assert_array_equal(bias, conv.bias.detach().numpy(), err_msg=name)
    # torchvision flattens pool5 NCHW; fc6 must still weigh each (h, w, c) as classifier.1 does.
    x = torch.from_numpy(np.random.default_rng(1).uniform(-2, 2, (1, 3, 224, 224)).astype("float32"))
    with torch.no_grad():
        pool5 = module.features(x)
        fc6 = module.classifier[2](module.classifier[1](torch.flatten(pool5, 1)))
        fc7 = module.classifier[5](module.classifier[4](fc6))
    _check_fc(fcn, pool5.numpy().transpose(0, 2, 3, 1), fc6.numpy(), fc7.numpy())
    _check_head_untouched(fcn)
    np.testing.assert_array_equal(fcn.get_layer("score_fr").get_weights()[0], score_fr)

    # The whole trunk against torch's AlexNet features in the reference's geometry (conv1 pad 100,
    # ceil-mode pools) on an odd-sized image, and fc6 / fc7 against the Linear layers run as convs.
    reference = copy.deepcopy(module.features)
    reference[0].padding = (100, 100)
    for m in reference:
        if isinstance(m, torch.nn.MaxPool2d):
            m.ceil_mode = True
    image = np.random.default_rng(2).uniform(-2, 2, (1, 65, 98, 3)).astype("float32")
    probe = keras.Model(fcn.input, [fcn.get_layer(n).output for n in ("pool5", "fc7")])
    got_pool5, got_fc7 = (np.asarray(t) for t in probe(image))
    with torch.no_grad():
        want_pool5 = reference(torch.from_numpy(image.transpose(0, 3, 1, 2).copy()))
        fc6 = torch.relu(torch.nn.functional.conv2d(want_pool5, module.classifier[1].weight.view(4096, 256, 6, 6),
                                                    module.classifier[1].bias))
        want_fc7 = torch.relu(torch.nn.functional.conv2d(fc6, module.classifier[4].weight[:, :, None, None],
                                                         module.classifier[4].bias))
    want_pool5, want_fc7 = (t.numpy().transpose(0, 2, 3, 1) for t in (want_pool5, want_fc7))
    assert got_pool5.shape == want_pool5.shape == (1, 8, 9, 256)  # floor-mode pools: 7 x 8
    np.testing.assert_allclose(got_pool5, want_pool5, rtol=1e-4, atol=1e-4 * np.abs(want_pool5).max())
    assert got_fc7.shape == want_fc7.shape == (1, 3, 4, 4096)
    np.testing.assert_allclose(got_fc7, want_fc7, rtol=1e-4, atol=1e-4 * np.abs(want_fc7).max())


def test_init_from_kseg_alexnet_keras_file(fcn, tmp_path):
    from kseg.models.alexnet import alexnet_features

    keras.utils.set_random_seed(3)
    alexnet = kseg.build_model("alexnet")
    path = tmp_path / "alexnet.weights.h5"
    alexnet.save_weights(path)
    assert set(_init_from(fcn, path)) == set(CONV_NAMES) | {"fc6", "fc7"}
    for name in CONV_NAMES:
        for got, want in zip(fcn.get_layer(name).get_weights(), alexnet.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want, err_msg=name)
    x = np.random.default_rng(0).uniform(-2, 2, (1, 224, 224, 3)).astype("float32")
    pool5 = np.asarray(alexnet_features(alexnet)(x))
    probe = keras.Model(alexnet.input, [alexnet.get_layer(n).output for n in ("fc6", "fc7")])
    fc6, fc7 = (np.asarray(t) for t in probe(x))
    _check_fc(fcn, pool5, fc6, fc7)
    _check_head_untouched(fcn)


def test_init_from_include_top_false_alexnet_says_why(fcn, tmp_path):
    path = tmp_path / "alexnet_notop.weights.h5"
    kseg.build_model("alexnet", include_top=False).save_weights(path)
    before = fcn.get_layer("conv1").get_weights()[0].copy()
    with pytest.raises(WeightsMismatchError, match=r"alexnet_notop\.weights\.h5.*include_top=False"):
        _init_from(fcn, path)
    np.testing.assert_array_equal(fcn.get_layer("conv1").get_weights()[0], before)

