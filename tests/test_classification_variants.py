"""VGG11/13/19 (+ _bn) and ResNet18/34/152: parameter counts, keras.applications names, and torchvision
state_dicts giving the reference modules' outputs (tests/torch_reference.py, torchvision's module names)."""

import keras
import numpy as np
import pytest

import kseg
from kseg.models.resnet import feature_names, resnet_trunk
from kseg.statedict import save_state_dict

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402
from helpers import save_legacy_h5  # noqa: E402

TOL = 1e-4  # max |diff| <= TOL x max |output|


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _torch_outputs(module, x_nhwc, fn=None):
    module.eval()
    with torch.no_grad():
        out = (fn or module)(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    diff, scale = np.abs(got - want).max(), np.abs(want).max()
    assert diff <= TOL * scale, f"{what}: max |diff| {diff} vs max |output| {scale}"


# --- parameter counts (build only, full size) ---------------------------------------------


# torchvision's counts (parameters, i.e. trainable here); Keras' count_params() adds the BatchNorm
# moving statistics, which torchvision keeps as buffers.
@pytest.mark.parametrize("name, torchvision, total", [
    ("vgg11", 132_863_336, 132_863_336),
    ("vgg11_bn", 132_868_840, 132_874_344),
    ("vgg13", 133_047_848, 133_047_848),
    ("vgg13_bn", 133_053_736, 133_059_624),
    ("vgg19", 143_667_240, 143_667_240),
    ("vgg19_bn", 143_678_248, 143_689_256),
    ("resnet18", 11_689_512, 11_699_112),
    ("resnet34", 21_797_672, 21_814_696),
])
def test_parameter_counts(name, torchvision, total):
    model = kseg.build_model(name)
    assert (_trainable(model), model.count_params()) == (torchvision, total)
    assert total == kseg.get_spec(name).params
    keras.backend.clear_session()


@pytest.mark.slow  # 11 s: resnet50's keras.applications names test runs the same naming code by default
def test_resnet152_counts_and_keras_applications_names():
    # keras.applications.ResNet152(weights=None): 60,268,520 trainable, 60,419,944 in all, the same
    # weighted layers by name and shape (so its files load by name); torchvision's v1.5: 60,192,808.
    ours, theirs = kseg.build_model("resnet152"), keras.applications.ResNet152(weights=None)
    assert (_trainable(ours), ours.count_params()) == (60_268_520, 60_419_944) == \
           (_trainable(theirs), theirs.count_params())
    assert [(v.path, v.shape) for v in ours.weights] == [(v.path, v.shape) for v in theirs.weights]
    assert _trainable(kseg.build_model("resnet152", layout="torchvision")) == 60_192_808
    keras.backend.clear_session()


def test_vgg19_keras_applications_names():
    ours, theirs = kseg.build_model("vgg19"), keras.applications.VGG19(weights=None)
    assert ours.count_params() == theirs.count_params() == 143_667_240
    assert [(v.path, v.shape) for v in ours.weights] == [(v.path, v.shape) for v in theirs.weights]
    assert kseg.build_model("vgg19", include_top=False).count_params() == 20_024_384  # keras' notop file
    keras.backend.clear_session()


def test_layouts_and_preprocessing():
    # keras.applications publishes VGG19 and ResNet152 (Caffe inputs); the others are torchvision's only.
    for name in ("vgg19", "resnet152"):
        spec = kseg.get_spec(name)
        assert (spec.preprocessing.kind, spec.preprocessing_for("torchvision").kind) == ("caffe", "torch")
    for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg19_bn", "resnet18", "resnet34"):
        assert (kseg.get_spec(name).preprocessing.kind, kseg.get_spec(name).layouts) == ("torch", {})


def test_basic_block_resnets_refuse_keras_layout_and_dilation():
    x = keras.Input((None, None, 3))
    with pytest.raises(ValueError, match="resnet18 exists in the torchvision layout at output stride 32 only"):
        resnet_trunk(x, "resnet18", layout="keras")
    with pytest.raises(ValueError, match="output_stride=8"):
        resnet_trunk(x, "resnet34", layout="torchvision", output_stride=8)
    with pytest.raises(TypeError, match="unknown option"):
        kseg.build_model("resnet18", output_stride=8)


# --- torchvision state_dicts --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg19", "vgg19_bn"])
def test_vgg_trunk_from_torchvision_features(name, tmp_path, rng):
    # The trunk's map (features.{i}: conv, [BatchNorm,] ReLU per conv, a pool per block); the classifier's
    # (classifier.0/3/6, the NCHW flatten) is vgg16's, tested at full size in test_weights.py and below (slow).
    torch.manual_seed(0)
    arch, batch_norm = name.removesuffix("_bn"), name.endswith("_bn")
    module = ref.VGGFeatures(arch, batch_norm)
    if batch_norm:
        ref.randomize_bn(module)
    path = tmp_path / f"{name}.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model(name, include_top=False, weights=path)
    assert _trainable(model) == sum(p.numel() for p in module.parameters())
    x = rng.normal(size=(1, 64, 96, 3)).astype("float32")
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), name)
    keras.backend.clear_session()


@pytest.mark.parametrize("name, blocks", [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))])
def test_basic_block_resnet_from_torchvision(name, blocks, tmp_path, rng):
    torch.manual_seed(0)
    module = ref.randomize_bn(ref.BasicResNet(blocks))
    assert sum(p.numel() for p in module.parameters()) == {"resnet18": 11_689_512, "resnet34": 21_797_672}[name]
    path = tmp_path / f"{name}.safetensors"
    save_state_dict({k: v.numpy() for k, v in module.state_dict().items()}, path)
    x = rng.normal(size=(2, 67, 75, 3)).astype("float32")  # odd sizes: the strided convs' padding must match
    model = kseg.build_model(name, input_shape=(67, 75, 3), weights=path)
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), name)
    # C1..C5 (named feature maps for heads) at strides 2..32 and torchvision's widths.
    shapes = {k: model.get_layer(v).output.shape[1:] for k, v in feature_names(name).items()}
    assert shapes == {"C1": (34, 38, 64), "C2": (17, 19, 64), "C3": (9, 10, 128), "C4": (5, 5, 256),
                      "C5": (3, 3, 512)}
    keras.backend.clear_session()


# --- full size (slow): the whole map through the file readers -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11_bn", "vgg19"])
def test_vgg_from_torchvision_full(name, tmp_path, rng):
    torch.manual_seed(0)
    arch, batch_norm = name.removesuffix("_bn"), name.endswith("_bn")
    module = ref.VGG(arch, batch_norm)
    if batch_norm:
        ref.randomize_bn(module)
    assert sum(p.numel() for p in module.parameters()) == {"vgg11_bn": 132_868_840, "vgg19": 143_667_240}[name]
    path = tmp_path / f"{name}.safetensors"
    save_state_dict({k: v.numpy() for k, v in module.state_dict().items()}, path)
    model = kseg.build_model(name, weights=path)
    x = rng.normal(size=(1, 224, 224, 3)).astype("float32")
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), name)


@pytest.mark.slow
def test_resnet152_from_torchvision(tmp_path, rng):
    torch.manual_seed(0)
    module = ref.randomize_bn(ref.ResNet((3, 8, 36, 3)))
    assert sum(p.numel() for p in module.parameters()) == 60_192_808
    path = tmp_path / "resnet152.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model("resnet152", input_shape=(97, 129, 3), weights=path)  # selects layout="torchvision"
    x = rng.normal(size=(1, 97, 129, 3)).astype("float32")
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), "resnet152")


@pytest.mark.slow
@pytest.mark.parametrize("name, app", [("vgg19", "VGG19"), ("resnet152", "ResNet152")])
def test_keras_applications_file(name, app, tmp_path, rng):
    source = getattr(keras.applications, app)(weights=None, classifier_activation=None)
    for layer in source.layers:  # non-trivial BatchNorm statistics, so a mis-mapped one shows
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])
    path = tmp_path / f"{name}.h5"
    save_legacy_h5(source, path)
    model = kseg.build_model(name, weights=path)
    x = rng.normal(size=(1, 224, 224, 3)).astype("float32")
    _assert_close(model.predict(x, verbose=0), source.predict(x, verbose=0), name)
