"""HED: six aligned logits maps at input size, fusion init, frozen bilinear sides, backbone init."""

import keras
import numpy as np
import pytest
from helpers import save_legacy_h5  # noqa: E402

import kseg
from kseg.models.hed import OUTPUT_NAMES, SIDES
from kseg.models.vgg import VGG16_CONV_NAMES
from kseg.weights import WeightsMismatchError

STRIDES = [s for _, s in SIDES if s > 1]


@pytest.fixture(scope="module")
def model():
    return kseg.build_model("hed")


def test_registry_facts():
    spec = kseg.get_spec("hed")
    assert (spec.task, spec.num_classes, spec.preprocessing.kind, spec.backbone) == ("edges", 1, "caffe", "vgg16")


def test_six_named_outputs_at_input_size(model, rng):
    assert model.output_names == list(OUTPUT_NAMES) == ["dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"]
    for h, w in [(224, 224), (333, 417)]:
        ys = model.predict(rng.uniform(0, 255, (1, h, w, 3)).astype("float32"), verbose=0)
        assert [y.shape for y in ys] == [(1, h, w, 1)] * 6
        assert all(np.isfinite(y).all() for y in ys)


@pytest.mark.parametrize("shape", [(224, 224, 3), (333, 417, 3), (1, 1, 3)])
def test_static_shapes(shape):
    m = kseg.build_model("hed", input_shape=shape)
    assert m.output_shape == [(None, shape[0], shape[1], 1)] * 6


def test_parameter_count(model):
    # VGG16 conv trunk + 5 side convs (C + 1) + fusion (5 + 1) are trained; deconvs are frozen.
    side = sum(c + 1 for c in (64, 128, 256, 512, 512))
    deconv = sum((2 * s) ** 2 for s in STRIDES)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == 14_714_688 + side + 6 == 14_716_171
    assert model.count_params() == trainable + deconv == 14_717_531 == kseg.get_spec("hed").params


def test_fusion_starts_as_mean_of_sides(model, rng):
    kernel, bias = model.get_layer("fuse").get_weights()
    np.testing.assert_array_equal(kernel, np.full((1, 1, 5, 1), 0.2, "float32"))
    np.testing.assert_array_equal(bias, [0.0])
    ys = model.predict(rng.uniform(0, 255, (1, 40, 56, 3)).astype("float32"), verbose=0)
    # oneDNN's 1x1 conv over 5 channels vs numpy's sum: reassociated, and the outputs reach ~20
    # (2.9e-6 max-abs here), so atol scales with them: 1e-5 of max|fuse|, ~84 eps.
    np.testing.assert_allclose(ys[5], 0.2 * sum(ys[:5]), rtol=1e-5, atol=1e-5 * np.abs(ys[5]).max())


@pytest.mark.parametrize("stride", STRIDES)
def test_upsampling_reproduces_constant_and_ramp(model, stride):
    layer = model.get_layer(f"upsample_{stride}")
    n = 6
    ones = np.ones((1, n, n, 1), "float32")
    ramp = np.tile(np.arange(n, dtype="float32")[None, :, None, None], (1, 1, n, 1))  # value = row
    up_ones, up_ramp = (keras.ops.convert_to_numpy(layer(a)) for a in (ones, ramp))
    assert up_ones.shape == (1, n * stride, n * stride, 1)
    inner = slice(stride, (n - 1) * stride)  # away from the zero padding at the borders
    np.testing.assert_allclose(up_ones[0, inner, inner, 0], 1.0, atol=1e-6)
    # Output row y lies at (y - (s - 1) / 2) / s in feature coordinates: the cell centres align.
    rows = np.arange(n * stride, dtype="float32")[inner]
    want = np.broadcast_to(((rows - (stride - 1) / 2) / stride)[:, None], up_ramp[0, inner, inner, 0].shape)
    np.testing.assert_allclose(up_ramp[0, inner, inner, 0], want, atol=1e-5)


def test_side_outputs_peak_at_the_edge_at_every_scale():
    # Centre-tap identity kernels pass channel 0 of the image through the trunk unchanged
    # (ReLU and max-pool keep a non-negative block); each side conv reads that channel.
    # A 16x16 block aligned with the stride-16 grid must come back centred where it is.
    m = kseg.build_model("hed")
    for layer in m.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.Conv2DTranspose):
            if layer.name == "fuse":
                continue
            kernel, bias = (np.zeros_like(w) for w in layer.get_weights())
            kernel[kernel.shape[0] // 2, kernel.shape[1] // 2, 0, 0] = 1.0
            layer.set_weights([kernel, bias])
    x = np.zeros((1, 101, 133, 3), "float32")
    top, left = 32, 64
    x[0, top : top + 16, left : left + 16, 0] = 1.0
    ys = m.predict(x, verbose=0)
    centre = np.array([top + 7.5, left + 7.5])
    grid = np.stack(np.meshgrid(np.arange(101), np.arange(133), indexing="ij"), -1)
    for name, y in zip(OUTPUT_NAMES, ys):
        w = y[0, :, :, 0]
        assert w.min() >= 0 and w.max() > 0
        com = (grid * w[..., None]).sum((0, 1)) / w.sum()
        np.testing.assert_allclose(com, centre, atol=1e-3, err_msg=f"{name} is not aligned with the input")
        peak = np.unravel_index(np.argmax(w), w.shape)
        assert top <= peak[0] < top + 16 and left <= peak[1] < left + 16, name


def test_upsampling_frozen_by_default_and_optionally_trainable(model):
    frozen = {v.path.split("/")[0] for v in model.non_trainable_weights}
    assert frozen == {f"upsample_{s}" for s in STRIDES}
    learned = kseg.build_model("hed", input_shape=(32, 32, 3), trainable_upsampling=True)
    assert not learned.non_trainable_weights
    assert all(learned.get_layer(f"upsample_{s}").trainable for s in STRIDES)


def test_num_classes_other_than_one_is_refused():
    with pytest.raises(ValueError, match="num_classes must be 1"):
        kseg.build_model("hed", num_classes=2)


# --- backbone initialisation -------------------------------------------------------------


def _assert_trunk_equals(model, arrays):
    for name in VGG16_CONV_NAMES:
        for got, want in zip(model.get_layer(name).get_weights(), arrays[name], strict=True):
            np.testing.assert_array_equal(got, want)


def test_backbone_from_keras_applications_file(tmp_path):
    source = keras.applications.VGG16(weights=None, include_top=False)
    path = tmp_path / "vgg16_notop.h5"
    save_legacy_h5(source, path)
    m = kseg.build_model("hed", backbone_weights=path)
    _assert_trunk_equals(m, {n: source.get_layer(n).get_weights() for n in VGG16_CONV_NAMES})
    # The head keeps its own initialisation.
    np.testing.assert_array_equal(m.get_layer("fuse").get_weights()[0], np.full((1, 1, 5, 1), 0.2, "float32"))


def test_backbone_from_torchvision_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    torch.manual_seed(0)
    module = ref.VGG16()
    state = module.state_dict()
    # Only the convs matter; shrinking the 102M-parameter classifier keeps the file small
    # (the reader checks fc6's input width, 512 * 7 * 7, not its output width).
    for i, shape in ((0, (4, 512 * 7 * 7)), (3, (4, 4)), (6, (4, 4))):
        state[f"classifier.{i}.weight"], state[f"classifier.{i}.bias"] = torch.zeros(shape), torch.zeros(4)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    m = kseg.build_model("hed", backbone_weights=path)
    convs = [c for c in module.features if isinstance(c, torch.nn.Conv2d)]
    want = {
        n: [c.weight.detach().numpy().transpose(2, 3, 1, 0), c.bias.detach().numpy()]
        for n, c in zip(VGG16_CONV_NAMES, convs, strict=True)
    }
    _assert_trunk_equals(m, want)


def test_backbone_file_of_another_architecture_is_named(tmp_path):
    path = tmp_path / "resnet50.weights.h5"
    kseg.build_model("resnet50", include_top=False).save_weights(path)
    with pytest.raises(WeightsMismatchError, match=r"resnet50.weights.h5: not vgg16 ImageNet weights.*block1_conv1"):
        kseg.build_model("hed", backbone_weights=path)
