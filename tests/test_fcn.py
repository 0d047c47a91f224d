"""FCN-32s/16s/8s on VGG16: reference parameter counts, Caffe geometry (crop offsets, output
size), bilinear frozen upsampling, and ImageNet initialisation by convolutionalising fc1/fc2."""

import keras
import numpy as np
import pytest
from helpers import save_legacy_h5  # noqa: E402

import kseg
from kseg.layers import BilinearUpsampling
from kseg.models.fcn import HEADS, _fcn
from kseg.models.vgg import CFGS, VGG16_CONV_NAMES
from kseg.weights import WeightsMismatchError, load_backbone

VARIANTS = list(HEADS)
SIZES = [(224, 224), (333, 417), (500, 375)]
UPSAMPLERS = {"fcn32s": ["upscore"], "fcn16s": ["upscore2", "upscore16"],
              "fcn8s": ["upscore2", "upscore_pool4", "upscore8"]}
UPSAMPLERS["fcn8s_atonce"] = UPSAMPLERS["fcn8s"]


def _tiny(variant, input_shape=(None, None, 1), **kw):
    """The same builder and geometry with one channel everywhere: cheap to build and run."""
    trunk = [[1] * len(convs) for convs in CFGS["D"]]
    kw.setdefault("trainable_upsampling", False)
    kw.setdefault("score_initializer", "zeros")
    return _fcn(variant, num_classes=1, input_shape=input_shape, trunk=trunk, fc_units=1, **kw)


@pytest.fixture(scope="module")
def fcn8s():
    model = kseg.build_model("fcn8s")
    yield model
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def fcn32s_trainable():
    model = kseg.build_model("fcn32s", trainable_upsampling=True)
    yield model
    keras.backend.clear_session()


# --- parameter counts ------------------------------------------------------------------


def test_parameter_counts_match_reference(fcn8s, fcn32s_trainable):
    assert fcn8s.count_params() == 134_489_759
    # Trainability does not change the count; the k64 upscore has 64 * 64 * 21 * 21 weights.
    assert fcn32s_trainable.count_params() == 136_152_917
    assert kseg.get_spec("fcn8s").params == 134_489_759
    assert kseg.get_spec("fcn32s").params == 136_152_917


def test_reference_layer_names(fcn8s):
    names = {layer.name for layer in fcn8s.layers}
    reference = {"fc6", "drop6", "fc7", "drop7", "score_fr", "upscore2", "score_pool4", "score_pool4c",
                 "fuse_pool4", "upscore_pool4", "score_pool3", "score_pool3c", "fuse_pool3", "upscore8",
                 "score", "block1_pad"}
    assert reference | set(VGG16_CONV_NAMES) <= names
    assert fcn8s.get_layer("block1_pad").padding == ((100, 100), (100, 100))
    assert fcn8s.get_layer("fc6").kernel.shape == (7, 7, 512, 4096)
    assert fcn8s.get_layer("upscore8").kernel.shape == (16, 16, 21, 21)
    assert fcn8s.get_layer("upscore8").use_bias is False


# --- output size == input size ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_nets():
    return {variant: _tiny(variant) for variant in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", SIZES + [(1, 1), (31, 2)])
def test_output_size_equals_input_size_static_and_dynamic(tiny_nets, variant, size):
    # The full builder's geometry with one channel per layer. Static shapes first (every crop is
    # checked symbolically), then a run of the (None, None) model.
    model = tiny_nets[variant]
    assert model(keras.Input((*size, 1))).shape == (None, *size, 1)
    assert model(np.ones((1, *size, 1), "float32")).shape == (1, *size, 1)


def test_static_input_shape_builds():
    for variant in VARIANTS:
        assert _tiny(variant, input_shape=(333, 417, 1)).output.shape == (None, 333, 417, 1)


def test_full_fcn8s_output_size_at_any_input_size(fcn8s):
    # Static inference on the full net at every size, then real runs of the (None, None) model at
    # two sizes, one the smallest possible input (with padding 100 nothing is too small).
    for size in SIZES + [(1, 1)]:
        assert fcn8s(keras.Input((*size, 3))).shape == (None, *size, 21)
    rng = np.random.default_rng(0)
    for size in [(1, 1), (45, 31)]:
        y = fcn8s.predict(rng.uniform(-100, 100, (1, *size, 3)).astype("float32"), verbose=0)
        assert y.shape == (1, *size, 21)
        assert np.all(np.isfinite(y))


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_full_models_run_at_reference_sizes(fcn8s, fcn32s_trainable, size):
    x = np.zeros((1, *size, 3), "float32")
    for model in (fcn8s, fcn32s_trainable):
        assert model.predict(x, verbose=0).shape == (1, *size, 21)


# --- crop offsets: an impulse comes back where the reference geometry puts it --------------

# Score layer that carries the impulse, and the stride of the map it reads.
PATHS = {"score_fr": 32, "score_pool4": 16, "score_pool3": 8}
VARIANT_PATHS = {"fcn32s": ["score_fr"], "fcn16s": ["score_fr", "score_pool4"],
                 "fcn8s": list(PATHS), "fcn8s_atonce": list(PATHS)}


def _centre_taps(model, open_scores):
    """Every conv a centre tap (identity on the one channel); score layers not named are closed."""
    for layer in model.layers:
        if type(layer) is keras.layers.Conv2D:
            kernel, bias = layer.get_weights()
            kernel[:] = 0
            if not layer.name.startswith("score") or layer.name in open_scores:
                kernel[kernel.shape[0] // 2, kernel.shape[1] // 2] = 1
            layer.set_weights([kernel, bias * 0])
    return model


def _impulse_net(variant, path):
    return _centre_taps(_tiny(variant), [path])


def _centre_of_mass(response, axis):
    profile = response.sum(axis=1 - axis)
    return float((profile * np.arange(profile.size)).sum() / profile.sum())


@pytest.mark.parametrize("variant, path", [(v, p) for v, paths in VARIANT_PATHS.items() for p in paths])
def test_impulse_comes_back_at_the_reference_location(variant, path):
    # An input pixel x sits at x + 99 in conv1_1's output (pad 100, valid 3x3); a map of stride S
    # holds it in cell floor((x + 99) / S), whose centre is S * cell + (S - 1) / 2 - 99 in input
    # coordinates. Centre-tap convs carry the impulse to that cell and the symmetric bilinear
    # deconvolutions spread it symmetrically about the cell's centre, so the response's centre of
    # mass lands there exactly iff every pad and crop offset on the path is the reference's
    # (an offset off by one moves it by a whole pixel or more).
    stride = PATHS[path]
    model = _impulse_net(variant, path)
    height, width = 176, 208
    for y0, x0 in [(70, 93), (81, 110)]:
        x = np.zeros((1, height, width, 1), "float32")
        x[0, y0, x0, 0] = 1.0
        response = np.asarray(model(x))[0, :, :, 0]
        assert response.sum() > 0, "the impulse did not reach the output"
        expected = [stride * ((p + 99) // stride) + (stride - 1) / 2 - 99 for p in (y0, x0)]
        got = [_centre_of_mass(response, axis) for axis in (0, 1)]
        np.testing.assert_allclose(got, expected, atol=1e-3, err_msg=f"{variant} via {path}")


def test_atonce_scales_the_skips():
    # Same weights, the pool4 path only: the at-once net's output is 0.01 times FCN-8s'.
    x = np.zeros((1, 96, 80, 1), "float32")
    x[0, 40, 30, 0] = 1.0
    for path, scale in (("score_pool4", 0.01), ("score_pool3", 0.0001)):
        plain = np.asarray(_impulse_net("fcn8s", path)(x))
        atonce = np.asarray(_impulse_net("fcn8s_atonce", path)(x))
        assert plain.max() > 0
        np.testing.assert_allclose(atonce, scale * plain, rtol=1e-5, atol=1e-12)


# --- bilinear upsampling: initialisation and freezing ------------------------------------


@pytest.mark.parametrize("name", ["upscore2", "upscore_pool4", "upscore8", "upscore"])
def test_upsampling_is_bilinear_interpolation(fcn8s, fcn32s_trainable, name):
    layer = (fcn32s_trainable if name == "upscore" else fcn8s).get_layer(name)
    stride = layer.strides[0]
    n = 5
    # Constant per channel: the interior (covered by two taps per axis) keeps each constant,
    # so channels do not mix.
    consts = np.arange(1, 22, dtype="float32")
    y = np.asarray(layer(np.broadcast_to(consts, (1, n, n, 21)).copy()))
    assert y.shape == (1, (n + 1) * stride, (n + 1) * stride, 21)  # Caffe: (n - 1) * s + 2s
    interior = slice(stride, n * stride)
    np.testing.assert_allclose(y[0, interior, interior], np.broadcast_to(consts, (n * stride - stride,) * 2 + (21,)),
                               rtol=1e-6)
    # A ramp along the height: input row i holds i, whose centre lands at output s * i + s - 0.5;
    # the interior is the linear interpolation (o - s + 0.5) / s, slope 1 / s, constant along width.
    ramp = np.broadcast_to(np.arange(n, dtype="float32")[:, None, None], (n, n, 21))[None].copy()
    y = np.asarray(layer(ramp))[0, interior, interior]
    rows = np.arange(stride, n * stride, dtype="float32")
    expected = ((rows - stride + 0.5) / stride)[:, None, None]
    np.testing.assert_allclose(y, np.broadcast_to(expected, y.shape), atol=1e-5)


def test_upsampling_frozen_by_default_trainable_on_request(fcn8s, fcn32s_trainable):
    trainable = {id(v) for v in fcn8s.trainable_weights}
    for name in UPSAMPLERS["fcn8s"]:
        layer = fcn8s.get_layer(name)
        assert layer.trainable is False and id(layer.kernel) not in trainable
    assert id(fcn8s.get_layer("score_fr").kernel) in trainable
    up = fcn32s_trainable.get_layer("upscore")
    assert up.trainable is True
    assert id(up.kernel) in {id(v) for v in fcn32s_trainable.trainable_weights}


@pytest.mark.parametrize("trainable_upsampling", [False, True])
def test_training_moves_upsampling_only_when_asked(trainable_upsampling):
    model = _tiny("fcn16s", trainable_upsampling=trainable_upsampling)
    _centre_taps(model, ["score_fr", "score_pool4"])  # positive weights: nothing dies in a ReLU
    names = ("upscore2", "upscore16", "score_fr")
    before = {name: model.get_layer(name).get_weights()[0].copy() for name in names}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    keras.utils.set_random_seed(0)
    # 4x4 fc7 positions per image: drop6/drop7 cannot silence the one channel everywhere.
    x = np.random.default_rng(0).uniform(0, 1, (2, 100, 100, 1)).astype("float32")
    model.fit(x, np.full(x.shape, 5.0, "float32"), epochs=1, verbose=0)
    for name, kernel in before.items():
        moved = not np.array_equal(model.get_layer(name).get_weights()[0], kernel)
        assert moved == (trainable_upsampling or name == "score_fr"), name


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_frozen_upsampling_survives_save_and_reload(suffix, tmp_path):
    for trainable_upsampling in (False, True):
        path = tmp_path / f"fcn8s_{trainable_upsampling}{suffix}"
        _tiny("fcn8s", trainable_upsampling=trainable_upsampling).save(path)
        reloaded = keras.saving.load_model(path, compile=False)
        for name in UPSAMPLERS["fcn8s"]:
            assert reloaded.get_layer(name).trainable is trainable_upsampling, (suffix, name)


def test_score_initializer_option():
    assert not np.any(_tiny("fcn8s", score_initializer="zeros").get_layer("score_pool3").get_weights()[0])
    with pytest.raises(ValueError):
        _tiny("fcn8s", score_initializer="no-such-initializer")


# --- ImageNet initialisation from VGG16 -----------------------------------------------------


def _check_fc_equivalence(fcn, pool5, fc1, fc2):
    """fc6/fc7 on a 7x7x512 pool5 block give the classifier's fc1/fc2 activations."""
    fc6 = np.asarray(fcn.get_layer("fc6")(pool5))
    assert fc6.shape == (1, 1, 1, 4096)
    assert np.count_nonzero(fc1) > 100, "a degenerate check: fc1 is (nearly) all zero"
    np.testing.assert_allclose(fc6[0, 0, 0], fc1[0], rtol=1e-4, atol=1e-4 * np.abs(fc1).max())
    fc7 = np.asarray(fcn.get_layer("fc7")(fc6))
    np.testing.assert_allclose(fc7[0, 0, 0], fc2[0], rtol=1e-4, atol=1e-4 * np.abs(fc2).max())


def _check_head_untouched(fcn):
    for name in UPSAMPLERS["fcn8s"]:
        kernel = fcn.get_layer(name).kernel
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(BilinearUpsampling()(kernel.shape)))


def _init_from(fcn, path):
    # What build_model(name, backbone_weights=path) runs after building; reusing the module's
    # model saves building a 134M-parameter net per test (the head is checked untouched).
    return load_backbone(fcn, path, kseg.get_spec(fcn.name))


def test_init_from_keras_applications_vgg16(fcn8s, tmp_path):
    vgg = keras.applications.VGG16(weights=None, classifier_activation=None)
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    save_legacy_h5(vgg, path)
    fcn = fcn8s
    assert set(_init_from(fcn, path)) == set(VGG16_CONV_NAMES) | {"fc6", "fc7"}
    for name in VGG16_CONV_NAMES:
        for got, want in zip(fcn.get_layer(name).get_weights(), vgg.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want, err_msg=name)
    probe = keras.Model(vgg.input, [vgg.get_layer(n).output for n in ("block5_pool", "fc1", "fc2")])
    x = np.random.default_rng(0).uniform(-120, 120, (1, 224, 224, 3)).astype("float32")
    pool5, fc1, fc2 = (np.asarray(t) for t in probe(x))
    _check_fc_equivalence(fcn, pool5, fc1, fc2)
    _check_head_untouched(fcn)


def test_init_from_torchvision_vgg16_state_dict(fcn8s, tmp_path):
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    torch.manual_seed(0)
    module = ref.VGG16().eval()
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(module.state_dict(), path)
    fcn = fcn8s
    _init_from(fcn, path)
    convs = [m for m in module.features if isinstance(m, torch.nn.Conv2d)]
    for name, conv in zip(VGG16_CONV_NAMES, convs):
        kernel, bias = fcn.get_layer(name).get_weights()
        np.testing.assert_array_equal(kernel, conv.weight.detach().numpy().transpose(2, 3, 1, 0), err_msg=name)
        np.testing.assert_array_equal(bias, conv.bias.detach().numpy(), err_msg=name)
    # torchvision flattens pool5 NCHW; fc6 must still see each (h, w, c) with fc1's weight for it.
    x = torch.from_numpy(np.random.default_rng(1).uniform(-2, 2, (1, 3, 224, 224)).astype("float32"))
    with torch.no_grad():
        pool5 = module.features(x)
        fc1 = module.classifier[1](module.classifier[0](torch.flatten(pool5, 1)))
        fc2 = module.classifier[4](module.classifier[3](fc1))
    _check_fc_equivalence(fcn, pool5.numpy().transpose(0, 2, 3, 1), fc1.numpy(), fc2.numpy())
    _check_head_untouched(fcn)


def test_init_from_resnet50_file_names_the_file(fcn8s, tmp_path):
    path = tmp_path / "resnet50_weights.h5"
    save_legacy_h5(kseg.build_model("resnet50"), path)
    before = fcn8s.get_layer("block1_conv1").get_weights()[0].copy()
    with pytest.raises(WeightsMismatchError, match=r"resnet50_weights\.h5: not vgg16 .*block1_conv1"):
        _init_from(fcn8s, path)
    np.testing.assert_array_equal(fcn8s.get_layer("block1_conv1").get_weights()[0], before)


def test_init_from_notop_vgg16_file_says_why(fcn8s, tmp_path):
    path = tmp_path / "vgg16_notop.h5"
    save_legacy_h5(keras.applications.VGG16(weights=None, include_top=False), path)
    with pytest.raises(WeightsMismatchError, match=r"vgg16_notop\.h5.*include_top=False"):
        _init_from(fcn8s, path)
