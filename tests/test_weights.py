"""Weights in: keras.applications files and torchvision-layout state_dicts give the source's outputs."""

import keras
import numpy as np
import pytest

import kseg
from kseg.statedict import WeightsFileError, save_state_dict
from kseg.weights import WeightsMismatchError, keras_to_torch

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402
from helpers import save_legacy_h5  # noqa: E402

TOL = 1e-4


def _torch_outputs(module, x_nhwc, fn=None):
    module.eval()
    with torch.no_grad():
        out = (fn or module)(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    out = out.numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


# --- keras.applications files --------------------------------------------------------


# The file reader is per format, not per model: each format once on ResNet50 (BatchNorm),
# VGG16 in the published-download layout.
@pytest.mark.parametrize(
    "name, app, fmt",
    [
        ("vgg16", keras.applications.VGG16, "legacy.h5"),
        ("resnet50", keras.applications.ResNet50, "legacy.h5"),
        ("resnet50", keras.applications.ResNet50, "weights.h5"),
    ],
)
def test_keras_applications_weights(name, app, fmt, tmp_path, rng):
    source = app(weights=None, classifier_activation=None)
    # Non-trivial BN statistics, so a mis-mapped moving mean/variance shows.
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])
    path = tmp_path / f"source.{fmt}"
    if fmt == "legacy.h5":
        save_legacy_h5(source, path)
    else:
        source.save_weights(path)
    model = kseg.build_model(name, weights=path)
    x = rng.normal(size=(2, 224, 224, 3)).astype("float32")
    diff = np.abs(model.predict(x, verbose=0) - source.predict(x, verbose=0)).max()
    assert diff <= TOL, f"{name} from {fmt}: max abs diff {diff}"


def test_keras_applications_notop_weights_load_into_trunk(tmp_path, rng):
    source = keras.applications.VGG16(weights=None, include_top=False)
    path = tmp_path / "notop.h5"
    save_legacy_h5(source, path)
    model = kseg.build_model("vgg16", include_top=False, weights=path)
    x = rng.normal(size=(1, 64, 96, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), source.predict(x, verbose=0), atol=TOL)


# --- torchvision state_dicts -------------------------------------------------------------


def _torch_case(name):
    torch.manual_seed(0)
    if name == "alexnet":
        return ref.AlexNet(), {}
    if name == "vgg16":
        return ref.VGG16(), {}
    if name == "resnet50":
        return ref.randomize_bn(ref.ResNet((3, 4, 6, 3))), {}
    if name == "resnet101":
        return ref.randomize_bn(ref.ResNet((3, 4, 23, 3))), {}
    raise KeyError(name)


@pytest.mark.parametrize(
    "name, suffix",
    [
        ("alexnet", ".pth"),
        # 11 s at full size; VGG's map runs by default in test_classification_variants (features, small input)
        # and the flatten permutation of its classifier in alexnet's case.
        pytest.param("vgg16", ".safetensors", marks=pytest.mark.slow),
        ("resnet50", ".pth"),
        # Same mapping code as resnet50 with more blocks; 20 s on 2 cores.
        pytest.param("resnet101", ".npz", marks=pytest.mark.slow),
    ],
)
def test_torchvision_state_dict(name, suffix, tmp_path, rng):
    module, _ = _torch_case(name)
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".pth":
        torch.save(module.state_dict(), path)
    else:
        save_state_dict({k: v.numpy() for k, v in module.state_dict().items()}, path)
    model = kseg.build_model(name, weights=path)
    x = rng.normal(size=(2, 224, 224, 3)).astype("float32")
    diff = np.abs(model.predict(x, verbose=0) - _torch_outputs(module, x)).max()
    assert diff <= TOL, f"{name} from {suffix}: max abs diff {diff}"


@pytest.mark.parametrize("output_stride, dilation", [(8, (False, True, True)), (16, (False, False, True))])
def test_dilated_resnet_matches_torchvision(output_stride, dilation, tmp_path, rng):
    torch.manual_seed(1)
    module = ref.randomize_bn(ref.ResNet((3, 4, 6, 3), replace_stride_with_dilation=dilation))
    path = tmp_path / "r50.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model("resnet50", include_top=False, output_stride=output_stride, weights=path)
    x = rng.normal(size=(1, 97, 129, 3)).astype("float32")  # odd sizes: padding must match too
    got = model.predict(x, verbose=0)
    want = _torch_outputs(module, x, module.features)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL


def test_state_dict_export_round_trips_into_torch(rng):
    model = kseg.build_model("alexnet")
    module = ref.AlexNet()
    state = keras_to_torch(model, kseg.get_spec("alexnet").torch_map())
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = rng.normal(size=(1, 224, 224, 3)).astype("float32")
    assert np.abs(model.predict(x, verbose=0) - _torch_outputs(module, x)).max() <= TOL


# --- bad inputs --------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet05'.*'resnet50'"):
        kseg.build_model("resnet05")


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['depth'\]"):
        kseg.build_model("lenet5", depth=3)


def test_wrong_num_classes_for_weights_file(tmp_path):
    source = kseg.build_model("lenet5")
    path = tmp_path / "lenet.weights.h5"
    source.save_weights(path)
    with pytest.raises(WeightsMismatchError, match=r"lenet.weights.h5.*output: model \[\(84, 3\), \(3,\)\], "
                                                   r"file \[\(84, 10\), \(10,\)\].*num_classes"):
        kseg.build_model("lenet5", num_classes=3, weights=path)


def test_truncated_keras_file(tmp_path):
    path = tmp_path / "lenet.weights.h5"
    kseg.build_model("lenet5").save_weights(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="lenet.weights.h5"):
        kseg.build_model("lenet5", weights=path)


def test_truncated_state_dict(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save(ref.AlexNet().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="alexnet.pth"):
        kseg.build_model("alexnet", weights=path)


def test_state_dict_with_missing_and_unexpected_keys(tmp_path):
    state = ref.AlexNet().state_dict()
    del state["features.3.bias"]
    state["classifier.9.weight"] = torch.zeros(2)
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"alexnet.pth.*missing keys \['features.3.bias'\]"
                                                   r".*unexpected keys \['classifier.9.weight'\]"):
        kseg.build_model("alexnet", weights=path)


def test_failed_load_leaves_model_untouched(tmp_path):
    model = kseg.build_model("lenet5")
    before = [w.copy() for w in model.get_weights()]
    other = kseg.build_model("lenet5", num_classes=3)
    path = tmp_path / "three.weights.h5"
    other.save_weights(path)
    from kseg.weights import load_weights

    with pytest.raises(WeightsMismatchError):
        load_weights(model, path)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.h5"):
        kseg.build_model("lenet5", weights=tmp_path / "nowhere.h5")
    odd = tmp_path / "weights.tar"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights.tar: unknown weights format"):
        kseg.build_model("lenet5", weights=odd)


def test_state_dict_for_model_without_torchvision_layout(tmp_path):
    path = tmp_path / "lenet.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(ValueError, match="lenet5 has no torchvision layout"):
        kseg.build_model("lenet5", weights=path)


def _renamed_legacy_copy(src, dst, rename):
    """A copy of a legacy-HDF5 weights file with layers renamed as older Keras named them (nested groups
    for names with '/', weight names under the new name, as tf.keras 2 wrote them)."""
    import h5py

    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        layer_names = []
        for name in map(text, f.attrs["layer_names"]):
            new = rename.get(name, name)
            group = g.require_group(new)
            weight_names = []
            for w in map(text, f[name].attrs["weight_names"]):
                key = f"{new}/{w.split('/', 1)[1]}:0"
                group[key] = f[name][w][()]
                weight_names.append(key.encode())
            group.attrs["weight_names"] = weight_names
            layer_names.append(new.encode())
        g.attrs["layer_names"] = layer_names


def test_keras_file_with_older_layer_names_loads_by_position_as_keras_does(tmp_path, rng, caplog):
    # keras.applications' MobileNetV3 files name layers `Conv`, `Conv/BatchNorm`, ... (tf.keras 2's code);
    # DenseNet's `conv1/conv`, `fc1000`. Keras loads them by position; so does kseg when every shape agrees.
    keras.utils.set_random_seed(0)
    source = kseg.build_model("mobilenet_v3_small", include_top=False, input_shape=(64, 64, 3))
    save_legacy_h5(source, tmp_path / "new.h5")
    old = tmp_path / "old_names.h5"
    _renamed_legacy_copy(tmp_path / "new.h5", old, {"conv": "Conv", "conv_bn": "Conv/BatchNorm",
                                                   "expanded_conv_depthwise": "expanded_conv/depthwise"})
    with caplog.at_level("INFO", logger="kseg.weights"):
        model = kseg.build_model("mobilenet_v3_small", include_top=False, input_shape=(64, 64, 3), weights=old)
    assert "loaded by position" in caplog.text and "Conv -> conv" in caplog.text
    x = rng.uniform(-1, 1, (1, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), source.predict(x, verbose=0))
    # Another architecture's file (shapes differ in order): no positional guess, the missing names are named.
    with pytest.raises(WeightsMismatchError, match="layers missing from the file: .*'conv'"):
        kseg.build_model("mobilenet_v3_small", include_top=False, input_shape=(64, 64, 3), alpha=0.75, weights=old)
    keras.backend.clear_session()
