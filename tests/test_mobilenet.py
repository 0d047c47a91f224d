"""MobileNetV2 and MobileNetV3-Large / -Small: parameter counts, keras.applications' names and outputs (its
files load by name), and torchvision state_dicts giving the reference modules' outputs
(tests/torch_reference_mobilenet.py, torchvision's module names)."""

import keras
import numpy as np
import pytest

import kseg

torch = pytest.importorskip("torch")
import torch_reference_mobilenet as ref  # noqa: E402

TOL = 1e-4  # max |diff| <= TOL x max |output|
APPS = {"mobilenet_v2": "MobileNetV2", "mobilenet_v3_large": "MobileNetV3Large",
        "mobilenet_v3_small": "MobileNetV3Small"}
# torchvision's parameter counts (trainable here); Keras' count_params() adds the BatchNorm moving statistics.
TORCHVISION = {"mobilenet_v2": 3_504_872, "mobilenet_v3_large": 5_483_032, "mobilenet_v3_small": 2_542_856}
TOTAL = {"mobilenet_v2": 3_538_984, "mobilenet_v3_large": 5_507_432, "mobilenet_v3_small": 2_554_968}
PAPER_MADDS = {"mobilenet_v2": 300, "mobilenet_v3_large": 219, "mobilenet_v3_small": 56}  # millions
ODD = (67, 75, 3)  # odd, non-square: both padding branches (odd and even sizes) of the strided convs run


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _keras_application(name, calibrate=None, **kwargs):
    """keras.applications' model (weights=None) as kseg takes input (no V3 rescaling layer); with images
    `calibrate`, random biases and BatchNorm scales and shifts, and that batch's BatchNorm statistics (so the
    outputs depend on every layer, see torch_reference_mobilenet.calibrate_bn)."""
    if name != "mobilenet_v2":
        kwargs["include_preprocessing"] = False
    model = getattr(keras.applications, APPS[name])(weights=None, **kwargs)
    if calibrate is None:
        return model
    rng = np.random.default_rng(1)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in model.layers:
        if getattr(layer, "use_bias", False):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.uniform(-0.2, 0.2, bias.shape).astype("float32")])
    for layer in norms:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                           rng.uniform(-0.2, 0.2, beta.shape).astype("float32"), mean, var])
    for layer in norms:
        layer.momentum = 0.0  # the moving statistics become this batch's
    model(calibrate, training=True)
    for layer in norms:
        layer.momentum = 0.999
    return model


def _reference(name, calibrate):
    torch.manual_seed(0)
    module = ref.MobileNetV2() if name == "mobilenet_v2" else ref.MobileNetV3(name.rsplit("_", 1)[1])
    return ref.calibrate_bn(module, torch.from_numpy(calibrate.transpose(0, 3, 1, 2).copy()))


def _torch_outputs(module, x_nhwc):
    with torch.no_grad():
        return module(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    diff, scale = np.abs(got - want).max(), np.abs(want).max()
    assert diff <= TOL * scale, f"{what}: max |diff| {diff} vs max |output| {scale}"


# --- counts and names (build only, full size) ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(APPS))
def test_counts_and_keras_applications_names(name):
    # The keras layout has keras.applications' weighted layers by name and shape (so its files load by name);
    # both layouts have torchvision's trainable count, and the same total.
    ours, theirs = kseg.build_model(name), _keras_application(name)
    assert [(v.path, v.shape) for v in ours.weights] == [(v.path, v.shape) for v in theirs.weights]
    assert (_trainable(ours), ours.count_params()) == (TORCHVISION[name], TOTAL[name]) == \
           (_trainable(theirs), theirs.count_params())
    assert TOTAL[name] == kseg.get_spec(name).params
    torchvision = kseg.build_model(name, layout="torchvision")
    assert (_trainable(torchvision), torchvision.count_params()) == (TORCHVISION[name], TOTAL[name])
    # Multiply-adds at 224x224 (kseg.flops), as the papers count them: Sandler et al. 300M; Howard et al.,
    # Table 3: Large 219M, Small 56M.
    for model in (ours, torchvision):
        macs = kseg.flops(model).total_macs / 1e6
        assert abs(macs - PAPER_MADDS[name]) / PAPER_MADDS[name] < 0.015, macs
    keras.backend.clear_session()


# keras.applications' counts at these widths (weights=None, V3 without its rescaling layer): trainable, total.
@pytest.mark.parametrize("name, alpha, trainable, total", [
    ("mobilenet_v2", 0.5, 1_968_680, 1_987_224),
    pytest.param("mobilenet_v2", 1.4, 6_108_776, 6_156_712, marks=pytest.mark.slow),  # widens the last conv too
    pytest.param("mobilenet_v3_large", 0.75, 3_993_528, 4_012_616, marks=pytest.mark.slow),
])
def test_alpha_matches_keras_applications(name, alpha, trainable, total):
    model = kseg.build_model(name, alpha=alpha)
    assert (_trainable(model), model.count_params()) == (trainable, total)
    keras.backend.clear_session()


def test_layouts_and_preprocessing():
    # keras.applications' files take x / 127.5 - 1 ("tf"), torchvision's its mean/std normalisation.
    for name in APPS:
        spec = kseg.get_spec(name)
        assert (spec.preprocessing.kind, spec.preprocessing_for("torchvision").kind) == ("tf", "torch")
        assert set(spec.layouts) == {"keras", "torchvision"}
    x = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")
    np.testing.assert_allclose(kseg.get_spec("mobilenet_v2").preprocessing.apply(x), [[[[-1.0, 0.0, 1.0]]]])


def test_options_are_checked():
    with pytest.raises(ValueError, match="layout must be one of"):
        kseg.build_model("mobilenet_v2", layout="timm")
    with pytest.raises(ValueError, match="alpha must be a positive width multiplier"):
        kseg.build_model("mobilenet_v3_small", alpha=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        kseg.build_model("mobilenet_v3_small", activation="gelu")
    with pytest.raises(TypeError, match="unknown option"):
        kseg.build_model("mobilenet_v2", activation="relu")


def test_v3_activation_option():
    # activation= replaces hard-swish (the stem, the paper's "HS" rows, the head); the "RE" rows stay ReLU.
    model = kseg.build_model("mobilenet_v3_small", activation="silu", include_top=False, input_shape=(32, 32, 3))
    kinds = {layer.name: layer.get_config()["activation"] for layer in model.layers
             if isinstance(layer, keras.layers.Activation) and layer.name.endswith("_activation")}
    assert set(kinds.values()) == {"silu", "relu"}
    assert [kinds[n] for n in ("conv_activation", "expanded_conv_1_expand_activation",
                               "expanded_conv_3_expand_activation", "conv_1_activation")] == \
           ["silu", "relu", "silu", "silu"]
    keras.backend.clear_session()


# --- outputs: torchvision state_dicts, keras.applications files ---------------------------------


# Large's blocks are built by the same code as Small's: its outputs are compared at 224 (slow) and, in the keras
# layout, by test_keras_layout_trunk_at_any_size.
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_from_torchvision_state_dict(name, tmp_path, rng):
    x, calibrate = (rng.normal(size=(n, *ODD)).astype("float32") for n in (2, 4))
    module = _reference(name, calibrate)
    assert sum(p.numel() for p in module.parameters()) == TORCHVISION[name]
    path = tmp_path / f"{name}.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model(name, input_shape=ODD, weights=path)  # a state_dict selects layout="torchvision"
    _assert_close(model(x, training=False), _torch_outputs(module, x), name)
    keras.backend.clear_session()


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_from_keras_applications_file(name, tmp_path, rng):
    x, calibrate = (rng.normal(size=(n, *ODD)).astype("float32") for n in (2, 4))
    source = _keras_application(name, calibrate, input_shape=ODD, classifier_activation=None)
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    model = kseg.build_model(name, input_shape=ODD, weights=path)
    _assert_close(model(x, training=False), source(x, training=False), name)
    keras.backend.clear_session()


def test_keras_layout_trunk_at_any_size(tmp_path, rng):
    # Built for any size, keras.applications pads its strided depthwise convs bottom/right only; so does the
    # keras layout, and the trunk (include_top=False) runs at sizes other than the file's.
    x, calibrate = (rng.normal(size=(n, 64, 97, 3)).astype("float32") for n in (1, 4))
    source = _keras_application("mobilenet_v3_large", calibrate, input_shape=(None, None, 3), include_top=False)
    path = tmp_path / "trunk.weights.h5"
    source.save_weights(path)
    model = kseg.build_model("mobilenet_v3_large", include_top=False, weights=path)
    out = model(x, training=False)
    assert out.shape == (1, 2, 3, 960)
    _assert_close(out, source(x, training=False), "mobilenet_v3_large trunk")
    keras.backend.clear_session()


# --- full size (slow): 224x224 through the file readers -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPS))
def test_from_torchvision_state_dict_full(name, tmp_path, rng):
    x, calibrate = (rng.normal(size=(n, 224, 224, 3)).astype("float32") for n in (1, 2))
    module = _reference(name, calibrate)
    path = tmp_path / f"{name}.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model(name, weights=path)
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPS))
def test_from_keras_applications_file_full(name, tmp_path, rng):
    x, calibrate = (rng.normal(size=(n, 224, 224, 3)).astype("float32") for n in (1, 2))
    source = _keras_application(name, calibrate, classifier_activation=None)
    path = tmp_path / f"{name}.keras"
    source.save(path)
    model = kseg.build_model(name, weights=path)
    _assert_close(model.predict(x, verbose=0), source.predict(x, verbose=0), name)
