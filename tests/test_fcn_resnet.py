"""torchvision's FCN-ResNet: its state_dicts give its outputs (out and aux), its parameter counts."""

import numpy as np
import pytest

import kseg
from kseg.weights import WeightsMismatchError

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
import torch_reference as ref  # noqa: E402
from torch import nn  # noqa: E402

TOL = 1e-4
BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class _Backbone(ref.ResNet):
    """IntermediateLayerGetter semantics: no avgpool/fc, returns layer3 ("aux") and layer4 ("out")."""

    def __init__(self, blocks):
        super().__init__(blocks, replace_stride_with_dilation=(False, True, True))
        del self.avgpool, self.fc

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        aux = self.layer3(x)
        return {"aux": aux, "out": self.layer4(aux)}


def _fcn_head(channels, num_classes):
    inter = channels // 4
    return nn.Sequential(
        nn.Conv2d(channels, inter, 3, padding=1, bias=False),
        nn.BatchNorm2d(inter),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Conv2d(inter, num_classes, 1),
    )


class TorchFCN(nn.Module):
    """torchvision.models.segmentation.fcn.FCN with its module names."""

    def __init__(self, arch, num_classes=21, aux=True):
        super().__init__()
        self.backbone = _Backbone(BLOCKS[arch])
        self.classifier = _fcn_head(2048, num_classes)
        self.aux_classifier = _fcn_head(1024, num_classes) if aux else None

    def forward(self, x):
        size = x.shape[-2:]
        features = self.backbone(x)
        up = lambda y: F.interpolate(y, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        result = {"out": up(self.classifier(features["out"]))}
        if self.aux_classifier is not None:
            result["aux"] = up(self.aux_classifier(features["aux"]))
        return result


def _torch_params(module):
    return sum(p.numel() for p in module.parameters())


def _keras_trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _case(arch, tmp_path, x):
    torch.manual_seed(0)
    module = ref.randomize_bn(TorchFCN(arch)).eval()
    path = tmp_path / f"fcn_{arch}.pth"
    torch.save(module.state_dict(), path)
    with torch.no_grad():
        out = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return module, path, {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}


@pytest.fixture(scope="module")
def x():
    # Odd sizes: the stride-2 paddings and the half-pixel resize must match torchvision's.
    return np.random.default_rng(0).normal(size=(2, 97, 129, 3)).astype("float32")


@pytest.fixture(scope="module")
def r50(tmp_path_factory, x):
    return _case("resnet50", tmp_path_factory.mktemp("fcn"), x)


@pytest.fixture(scope="module")
def r50_aux(r50):
    _, path, _ = r50
    return kseg.build_model("fcn_resnet50", aux=True, weights=path)


def test_torchvision_state_dict_gives_torchvision_outputs(r50, r50_aux, x):
    _, _, want = r50
    assert r50_aux.output_names == ["out", "aux"]
    got = dict(zip(["out", "aux"], r50_aux.predict(x, verbose=0)))
    for key in ("out", "aux"):
        assert got[key].shape == want[key].shape == (2, 97, 129, 21)
        diff = np.abs(got[key] - want[key]).max()
        assert diff <= TOL, f"{key}: max abs diff {diff}"


def test_aux_keys_are_skipped_without_aux(r50, x):
    # torchvision's published fcn_resnet50 state_dict has aux_classifier.* keys.
    _, path, want = r50
    model = kseg.build_model("fcn_resnet50", weights=path)
    assert model.output_names == ["out"]
    assert np.abs(model.predict(x, verbose=0) - want["out"]).max() <= TOL
    assert model.count_params() == kseg.get_spec("fcn_resnet50").params == 33_011_157
    assert _keras_trainable(model) == _torch_params(TorchFCN("resnet50", aux=False)) == 32_957_013


def test_parameter_count_with_aux_matches_torchvision(r50, r50_aux):
    module, _, _ = r50
    # torchvision's documented figure for fcn_resnet50 (built with aux_loss for its weights).
    assert _keras_trainable(r50_aux) == _torch_params(module) == 35_322_218


def test_aux_model_needs_aux_keys(r50, tmp_path):
    module, _, _ = r50
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("aux_classifier.")}
    path = tmp_path / "no_aux.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"no_aux.pth.*missing keys \['aux_classifier.0.weight'"):
        kseg.build_model("fcn_resnet50", aux=True, weights=path)


def test_output_size_equals_input_size(r50_aux):
    # (None, None, 3) runs at 97x129 above; running the dilated net at 333x417 costs ~20 s here,
    # so the static sizes are checked by shape inference.
    assert r50_aux.output_shape == [(None, None, None, 21)] * 2
    for shape in [(224, 224, 3), (333, 417, 3)]:
        model = kseg.build_model("fcn_resnet50", input_shape=shape, num_classes=5)
        assert model.output_shape == (None, shape[0], shape[1], 5)


def test_backbone_from_torchvision_resnet(tmp_path):
    torch.manual_seed(1)
    source = ref.randomize_bn(ref.ResNet((3, 4, 6, 3)))
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = kseg.build_model("fcn_resnet50", backbone_weights=path)
    np.testing.assert_array_equal(
        model.get_layer("conv4_block6_2_conv").get_weights()[0],
        source.layer3[5].conv2.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        model.get_layer("conv5_block1_0_bn").get_weights()[3], source.layer4[0].downsample[1].running_var.numpy()
    )


def test_keras_applications_resnet_backbone_is_refused():
    spec = kseg.get_spec("fcn_resnet50")
    arrays = {"conv1_conv": [np.zeros((7, 7, 3, 64)), np.zeros(64)]}
    with pytest.raises(WeightsMismatchError,
                       match=r"r50.h5: keras.applications resnet50 .*torchvision's resnet50 state_dict"):
        spec.backbone_adapt(arrays, None, "r50.h5")


def test_torch_map_prefixes():
    prefixes = [m.prefix for m in kseg.get_spec("fcn_resnet101").torch_map()]
    assert prefixes[:2] == ["backbone.conv1", "backbone.bn1"]
    assert "backbone.layer3.22.conv3" in prefixes and not any(p.startswith("backbone.fc") for p in prefixes)
    assert prefixes[-6:] == [f"{m}.{i}" for m in ("classifier", "aux_classifier") for i in (0, 1, 4)]


@pytest.mark.slow
def test_fcn_resnet101_state_dict(tmp_path):
    x = np.random.default_rng(1).normal(size=(1, 65, 81, 3)).astype("float32")
    module, path, want = _case("resnet101", tmp_path, x)
    model = kseg.build_model("fcn_resnet101", aux=True, weights=path)
    got = dict(zip(["out", "aux"], model.predict(x, verbose=0)))
    for key in ("out", "aux"):
        assert np.abs(got[key] - want[key]).max() <= TOL, key
    assert _keras_trainable(model) == _torch_params(module) == 54_314_346
