"""DenseNet-121 / 169 / 201: parameter counts (torchvision's and keras.applications'), keras.applications' layer
names, and weights from either ecosystem giving the reference's outputs: keras.applications' own models saved to
Keras files, and torchvision-layout state_dicts of a reference module with torchvision's module names
(tests/torch_reference_densenet.py)."""

import keras
import numpy as np
import pytest

import kseg
from kseg.identity import identify
from kseg.models.densenet import feature_names, rename_legacy_keys

torch = pytest.importorskip("torch")
import torch_reference_densenet as ref  # noqa: E402
from helpers import save_legacy_h5  # noqa: E402
from torch_reference import randomize_bn  # noqa: E402

TOL = 1e-4  # max |diff| <= TOL x max |output|
APPS = {"densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201"}
# torchvision's parameter counts (trainable here); keras.applications' count_params() adds the BatchNorm
# moving statistics, which torchvision keeps as buffers.
TORCHVISION = {"densenet121": 7_978_856, "densenet169": 14_149_480, "densenet201": 20_013_928}
KERAS_APPLICATIONS = {"densenet121": 8_062_504, "densenet169": 14_307_880, "densenet201": 20_242_984}


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _weights(model):
    return [(v.path, tuple(v.shape)) for v in model.weights]


def _epsilons(model):
    return {layer.epsilon for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}


def _torch_outputs(fn, x_nhwc):
    # One thread: on a busy 2-core machine each of torch's parallel ops waits for its second thread to be
    # scheduled (densenet121's forward: seconds instead of 0.1 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = fn(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        torch.set_num_threads(threads)
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    diff, scale = np.abs(got - want).max(), np.abs(want).max()
    assert diff <= TOL * scale, f"{what}: max |diff| {diff} vs max |output| {scale}"


def _randomize_keras_bn(model, rng):
    """Non-trivial BatchNorm parameters and statistics, so a mis-mapped one shows in the outputs."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.uniform(-0.2, 0.2, beta.shape),
                               rng.uniform(-0.2, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape)])


# --- counts and names (build only, full size) ---------------------------------------------------------


def _check_counts(name, theirs=None):
    """Both layouts at full size: torchvision's trainable count, keras.applications' total, the same weighted
    layers by name and shape, only BatchNorm's settings differing; with `theirs`, its layers too."""
    spec = kseg.get_spec(name)
    counts = (TORCHVISION[name], KERAS_APPLICATIONS[name])
    assert spec.params == KERAS_APPLICATIONS[name]
    weights = _weights(theirs) if theirs is not None else None
    # BatchNorm: keras.applications' epsilon and Keras' default momentum; torchvision's eps 1e-5, momentum 0.1.
    for layout, batchnorm in (("keras", (1.001e-5, 0.99)), ("torchvision", (1e-5, 0.9))):
        ours = kseg.build_model(name, layout=layout)
        assert (_trainable(ours), ours.count_params()) == counts, layout
        assert {(layer.epsilon, layer.momentum) for layer in ours.layers
                if isinstance(layer, keras.layers.BatchNormalization)} == {batchnorm}, layout
        weights = weights or _weights(ours)
        assert _weights(ours) == weights, layout
    # The torch map addresses every weighted layer once.
    mapped = [m.layer for m in spec.torch_map()]
    assert sorted(mapped) == sorted({layer.name for layer in ours.layers if layer.weights})
    keras.backend.clear_session()


def test_densenet121_counts():
    _check_counts("densenet121")  # keras.applications' names: test_densenet121_from_keras_applications_weights_file
    # keras.applications' notop file fits the trunk; pooling= as keras.applications.
    trunk = kseg.build_model("densenet121", include_top=False, pooling="avg")
    assert trunk.count_params() == KERAS_APPLICATIONS["densenet121"] - (1024 * 1000 + 1000)
    assert trunk.output.shape == (None, 1024)
    keras.backend.clear_session()


@pytest.mark.slow  # 10-20 s each (three full-size builds); densenet121's counts and names run the same code
@pytest.mark.parametrize("name", ["densenet169", "densenet201"])
def test_counts_and_keras_applications_names(name):
    theirs = getattr(keras.applications, APPS[name])(weights=None)
    assert (_trainable(theirs), theirs.count_params()) == (TORCHVISION[name], KERAS_APPLICATIONS[name])
    _check_counts(name, theirs)


def test_layouts_and_preprocessing():
    for name in APPS:
        spec = kseg.get_spec(name)
        # keras.applications.densenet.preprocess_input is "torch" mode, as torchvision's weights.
        assert (spec.preprocessing.kind, spec.preprocessing_for("torchvision").kind) == ("torch", "torch")
        assert spec.layouts == {"keras": {"layout": "keras"}, "torchvision": {"layout": "torchvision"}}
    assert identify("densenet169", {"layout": "torchvision"}).layout == "torchvision"
    with pytest.raises(ValueError, match="layout must be one of"):
        kseg.build_model("densenet121", layout="caffe")


def test_legacy_torchvision_keys_are_renamed(tmp_path):
    # torchvision's published densenet*.pth files store a dense layer's modules as norm.1 / conv.1 / norm.2 /
    # conv.2; rename_legacy_keys gives its modules' names (those of the torch map), leaving the others.
    state = ref.DenseNet("densenet121").state_dict()
    legacy = {}
    for key, value in state.items():
        if ".denselayer" in key:
            for module in ("norm1", "conv1", "norm2", "conv2"):
                key = key.replace(f".{module}.", f".{module[:-1]}.{module[-1]}.")
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.transition1.norm.weight" in legacy
    renamed = rename_legacy_keys(legacy)
    assert list(renamed) == list(state)
    assert all(renamed[k] is state[k] for k in state)
    # A file with the published names loads through build_model(weights=) as it is.
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, path)
    model = kseg.build_model("densenet121", include_top=False, weights=path)
    np.testing.assert_array_equal(model.get_layer("conv2_block1_1_conv").get_weights()[0],
                                  state["features.denseblock1.denselayer1.conv1.weight"].numpy().transpose(2, 3, 1, 0))
    keras.backend.clear_session()


# --- weights in: torchvision state_dicts and keras.applications files ---------------------------------


def test_densenet121_from_torchvision(tmp_path, rng):
    torch.manual_seed(0)
    module = randomize_bn(ref.DenseNet("densenet121")).eval()
    assert sum(p.numel() for p in module.parameters()) == TORCHVISION["densenet121"]
    path = tmp_path / "densenet121.pth"
    torch.save(module.state_dict(), path)
    # Odd, non-square input: the strided conv, max-pool and the transitions' average pools must floor alike.
    model = kseg.build_model("densenet121", input_shape=(67, 75, 3), weights=path)
    assert _epsilons(model) == {1e-5}  # a state_dict selects the torchvision layout
    features = keras.Model(model.input, [model.get_layer(n).output for n in feature_names("densenet121").values()]
                           + [model.output])
    x = rng.normal(size=(2, 67, 75, 3)).astype("float32")
    *maps, logits = (np.asarray(y) for y in features(x, training=False))  # eager: faster than predict here
    _assert_close(logits, _torch_outputs(module, x), "logits")
    _assert_close(maps[-1], _torch_outputs(module.trunk, x), "C5")
    # C1..C5 (named feature maps for heads) at strides 2..32.
    assert {k: m.shape[1:] for k, m in zip(feature_names("densenet121"), maps)} == {
        "C1": (34, 38, 64), "C2": (17, 19, 256), "C3": (8, 9, 512), "C4": (4, 4, 1024), "C5": (2, 2, 1024)}
    keras.backend.clear_session()


def test_densenet121_from_keras_applications_weights_file(tmp_path, rng):
    source = keras.applications.DenseNet121(weights=None, input_shape=(67, 75, 3), classifier_activation=None)
    _randomize_keras_bn(source, rng)
    path = tmp_path / "densenet121.weights.h5"
    source.save_weights(path)
    model = kseg.build_model("densenet121", input_shape=(67, 75, 3), weights=path)
    # keras.applications' weighted layers by name and shape, and its counts (none depends on the input size:
    # the head follows a global pooling).
    assert _weights(model) == _weights(source)
    assert (_trainable(model), model.count_params()) == (_trainable(source), source.count_params()) == \
        (TORCHVISION["densenet121"], KERAS_APPLICATIONS["densenet121"])
    assert _epsilons(model) == {1.001e-5}  # a Keras file keeps the default, keras.applications' layout
    x = rng.normal(size=(2, 67, 75, 3)).astype("float32")
    _assert_close(np.asarray(model(x, training=False)), np.asarray(source(x, training=False)), "densenet121")
    keras.backend.clear_session()


# --- full size (slow) -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet169", "densenet201"])
def test_from_torchvision_full(name, tmp_path, rng):
    torch.manual_seed(0)
    module = randomize_bn(ref.DenseNet(name)).eval()
    assert sum(p.numel() for p in module.parameters()) == TORCHVISION[name]
    path = tmp_path / f"{name}.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model(name, weights=path)
    x = rng.normal(size=(1, 224, 224, 3)).astype("float32")
    _assert_close(np.asarray(model(x, training=False)), _torch_outputs(module, x), name)
    keras.backend.clear_session()


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_densenet121_keras_applications_file_full(suffix, tmp_path, rng):
    # .keras: Keras 3's own model file; .h5: the legacy layout of keras.applications' published downloads.
    source = keras.applications.DenseNet121(weights=None, classifier_activation=None)
    _randomize_keras_bn(source, rng)
    path = tmp_path / f"densenet121{suffix}"
    if suffix == ".h5":
        save_legacy_h5(source, path)
    else:
        source.save(path)
    model = kseg.build_model("densenet121", weights=path)
    x = rng.normal(size=(1, 224, 224, 3)).astype("float32")
    _assert_close(np.asarray(model(x, training=False)), np.asarray(source(x, training=False)), "densenet121")
    keras.backend.clear_session()
