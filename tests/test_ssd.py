"""SSD300: the layer table, parameter counts, torchvision ssd300_vgg16 state_dicts, ImageNet init."""

import keras
import numpy as np
import pytest

import kseg
from kseg.layers import L2Normalization
from kseg.models import ssd
from kseg.statedict import save_state_dict
from kseg.weights import WeightsMismatchError

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402
from helpers import save_legacy_h5  # noqa: E402
from torch import nn  # noqa: E402

TOL = 1e-4
# Default boxes per source: 38^2 * 4, 19^2 * 6, 10^2 * 6, 5^2 * 6, 3^2 * 4, 1 * 4 = 8732.
SEGMENTS = (5776, 2166, 600, 150, 36, 4)
SOURCE_SHAPES = ((38, 38, 512), (19, 19, 1024), (10, 10, 512), (5, 5, 256), (3, 3, 256), (1, 1, 256))
# torchvision's GeneralizedRCNNTransform for ssd300_vgg16: images in [0, 1], this mean, std 1/255.
TV_MEAN = (0.48235, 0.45882, 0.40784)
TV_STD = 1.0 / 255.0


def _params(model, names):
    return sum(model.get_layer(n).count_params() for n in names)


@pytest.fixture(scope="module")
def paper():
    model = kseg.build_model("ssd300")
    yield model
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def reference():
    """torchvision's ssd300_vgg16 (21 classes) with weights that keep every source image-dependent."""
    torch.manual_seed(0)
    module = ref.SSD300(num_classes=21).eval()
    with torch.no_grad():
        # PyTorch's default init shrinks the activations ~6x per conv: past conv4_3 the maps would be
        # nearly constant (bias-driven), where a spatially flipped kernel would go unnoticed.
        for m in module.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        for name, p in module.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
        module.backbone.scale_weight.uniform_(10, 30)
        for m in module.head.classification_head.module_list:
            m.weight.mul_(0.02)
    return module


@pytest.fixture(scope="module")
def state_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("ssd") / "ssd300_vgg16.pth"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def raw():
    return np.random.default_rng(0).uniform(0, 255, size=(2, 300, 300, 3)).astype("float32")


@pytest.fixture(scope="module")
def torchvision_model(state_file):
    model = kseg.build_model("ssd300", layout="torchvision", num_classes=21, weights=state_file)
    yield model
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def torch_outputs(reference, raw):
    x = torch.from_numpy(raw.transpose(0, 3, 1, 2).copy())
    x = (x / 255.0 - torch.tensor(TV_MEAN).view(1, 3, 1, 1)) / TV_STD  # as torchvision's transform
    with torch.no_grad():
        sources = reference.backbone(x)
        loc, conf = reference.head(sources)
    return [s.numpy().transpose(0, 2, 3, 1) for s in sources], loc.numpy(), conf.numpy()


# --- the network -----------------------------------------------------------------------


def test_parameter_counts(paper):
    assert paper.count_params() == kseg.get_spec("ssd300").params == 26_285_486
    assert _params(paper, ssd.VGG16_CONV_NAMES[:10]) == 7_635_264  # the trunk to conv4_3
    assert _params(paper, [f"{s}_mbox_loc" for s in ssd.SOURCES]) == 534_648
    assert _params(paper, [f"{s}_mbox_conf" for s in ssd.SOURCES]) == 2_806_902
    coco = kseg.build_model("ssd300", layout="torchvision", num_classes=91)
    assert coco.count_params() == 35_641_826
    assert _params(coco, [f"{s}_mbox_conf" for s in ssd.SOURCES]) == 12_163_242
    assert sum(p.numel() for p in ref.SSD300(91).parameters()) == 35_641_826
    keras.backend.clear_session()


# (name, filters, kernel, stride, dilation, padding) of every conv, in build order.
CONVS = (
    [(n, f, 3, 1, 1, "same") for n, f in zip(ssd.VGG16_CONV_NAMES, [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6)]
    + [("fc6", 1024, 3, 1, 6, "same"), ("fc7", 1024, 1, 1, 1, "same"),
       ("conv6_1", 256, 1, 1, 1, "same"), ("conv6_2", 512, 3, 2, 1, "valid"),
       ("conv7_1", 128, 1, 1, 1, "same"), ("conv7_2", 256, 3, 2, 1, "valid"),
       ("conv8_1", 128, 1, 1, 1, "same"), ("conv8_2", 256, 3, 1, 1, "valid"),
       ("conv9_1", 128, 1, 1, 1, "same"), ("conv9_2", 256, 3, 1, 1, "valid")]
)


def test_layer_table(paper):
    convs = [layer for layer in paper.layers if isinstance(layer, keras.layers.Conv2D)]
    trunk = [c for c in convs if "_mbox_" not in c.name]
    assert [(c.name, c.filters, c.kernel_size[0], c.strides[0], c.dilation_rate[0], c.padding) for c in trunk] == CONVS
    assert all(c.activation is keras.activations.relu for c in trunk)
    heads = sorted((c.name, c.filters, c.kernel_size, c.padding, c.activation is keras.activations.linear)
                   for c in convs if "_mbox_" in c.name)
    assert heads == sorted((f"{s}_mbox_{kind}", (4 if kind == "loc" else 21) * a, (3, 3), "same", True)
                           for kind in ("loc", "conf") for s, a in zip(ssd.SOURCES, ssd.NUM_ANCHORS))
    # The stride-2 convs pad 1 on every side, as torchvision and Caffe.
    for name in ("conv6_2", "conv7_2"):
        assert paper.get_layer(f"{name}_pad").padding == ((1, 1), (1, 1))
    norm = paper.get_layer("conv4_3_norm")
    assert isinstance(norm, L2Normalization) and [w.name for w in norm.weights] == ["gamma"]
    np.testing.assert_array_equal(norm.get_weights()[0], np.full(512, 20.0, "float32"))
    pool5 = paper.get_layer("pool5")
    assert (pool5.pool_size, pool5.strides, pool5.padding) == ((3, 3), (1, 1), "same")
    pools = [paper.get_layer(f"block{b}_pool") for b in range(1, 5)]
    assert all(p.pool_size == (2, 2) and p.strides == (2, 2) for p in pools)
    assert [p.padding for p in pools] == list(ssd.POOL_PADDING["paper"])
    assert ssd.POOL_PADDING["torchvision"] == ("valid", "valid", "same", "valid")
    assert tuple(pools[2].output.shape[1:3]) == (38, 38)  # ceil mode: 75 -> 38


def test_sources_and_outputs(paper):
    assert [tuple(paper.get_layer(s).output.shape[1:]) for s in ssd.SOURCES] == list(SOURCE_SHAPES)
    assert paper.output_names == ["mbox_loc", "mbox_conf"]
    assert [tuple(o.shape) for o in paper.outputs] == [(None, 8732, 4), (None, 8732, 21)]
    assert sum(h * w * a for (h, w, _), a in zip(SOURCE_SHAPES, ssd.NUM_ANCHORS)) == sum(SEGMENTS) == 8732
    loc, conf = paper.predict(np.zeros((2, 300, 300, 3), "float32"), verbose=0)
    assert loc.shape == (2, 8732, 4) and conf.shape == (2, 8732, 21)
    assert np.all(np.isfinite(loc)) and np.all(np.isfinite(conf))


def test_layouts_preprocessing_and_priors():
    spec = kseg.get_spec("ssd300")
    assert spec.task == "detection" and spec.input_shape == (300, 300, 3) and spec.num_classes == 21
    assert spec.layouts == {"paper": {"layout": "paper"}, "torchvision": {"layout": "torchvision"}}
    caffe, tv = spec.preprocessing_for("paper"), spec.preprocessing_for("torchvision")
    assert (caffe.kind, caffe.mean, caffe.bgr, caffe.std, caffe.scale) == ("caffe_ssd", (104, 117, 123), True, None, 1)
    assert tv.kind == "torch_ssd" and not tv.bgr
    images = np.random.default_rng(1).uniform(0, 255, (2, 4, 5, 3)).astype("float32")
    np.testing.assert_array_equal(caffe.apply(images), images[..., ::-1] - np.float32([104, 117, 123]))
    np.testing.assert_allclose(tv.apply(images), (images / 255.0 - np.float32(TV_MEAN)) / np.float32(TV_STD),
                               rtol=0, atol=1e-4)
    assert ssd.PRIORS == spec.builder.PRIORS == {"paper": "voc", "torchvision": "coco"}
    with pytest.raises(ValueError, match="layout must be one of"):
        kseg.build_model("ssd300", layout="caffe")
    with pytest.raises(ValueError, match="fixed input size"):
        kseg.build_model("ssd300", input_shape=(None, None, 3), postprocess=True)
    keras.backend.clear_session()


def test_l2_normalization_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 7)).astype("float32")
    x[0, 1, 2] = 0.0  # an all-zero pixel stays zero (F.normalize's eps = 1e-12)
    x[1, 3, 4] = 1e-20  # below the eps: divided by 1e-12, not by its norm
    layer = L2Normalization()
    layer.build(x.shape)
    gamma = rng.uniform(10, 30, size=7).astype("float32")
    layer.set_weights([gamma])
    got = np.asarray(layer(x))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    want = (torch.from_numpy(gamma).view(1, -1, 1, 1) * nn.functional.normalize(xt)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[0, 1, 2], 0.0)
    np.testing.assert_allclose(np.linalg.norm(got / gamma, axis=-1)[0, 0], 1.0, rtol=1e-6)
    # Under mixed precision the norm is taken in float32 (1e-12 is 0 in float16): zeros stay finite.
    half = L2Normalization(dtype="mixed_float16")(x.astype("float16"))
    assert half.dtype == "float16" and np.all(np.isfinite(np.asarray(half)))
    config = layer.get_config()
    assert (config["scale_init"], config["epsilon"]) == (20.0, 1e-12)
    clone = L2Normalization.from_config(config)
    assert (clone.scale_init, clone.epsilon) == (20.0, 1e-12)


# --- torchvision state_dicts -------------------------------------------------------------


def test_torch_map_covers_the_71_keys(reference):
    table = kseg.get_spec("ssd300").torch_map()
    keys = set(reference.state_dict())
    assert len(keys) == 71
    mapped = {m.prefix if m.kind == "vector" else f"{m.prefix}.{s}" for m in table for s in ("weight", "bias")}
    assert mapped == keys
    assert [m.prefix for m in table if m.layer in ("fc6", "fc7", "conv6_2", "conv9_2")] == [
        "backbone.extra.0.7.1", "backbone.extra.0.7.3", "backbone.extra.1.2", "backbone.extra.4.2"]


def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    tol = TOL * max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(got - want).max())
    assert diff <= tol, f"{what}: max abs diff {diff} > {tol}"


def test_torchvision_state_dict_gives_torchvision_outputs(torchvision_model, reference, torch_outputs, raw):
    model = torchvision_model
    np.testing.assert_array_equal(model.get_layer("conv4_3_norm").get_weights()[0],
                                  reference.backbone.scale_weight.detach().numpy())
    x = kseg.get_spec("ssd300").preprocessing_for("torchvision").apply(raw)
    probe = keras.Model(model.input, [model.get_layer(s).output for s in ssd.SOURCES] + model.outputs)
    *sources, loc, conf = (np.asarray(o) for o in probe(x, training=False))
    want_sources, want_loc, want_conf = torch_outputs
    for name, got, want in zip(ssd.SOURCES, sources, want_sources):
        _assert_close(got, want, name)
    # Per source: the conv4_3 boxes' outputs are ~100x smaller than the others' with these weights.
    bounds = np.cumsum((0,) + SEGMENTS)
    for name, a, b in zip(ssd.SOURCES, bounds[:-1], bounds[1:]):
        _assert_close(loc[:, a:b], want_loc[:, a:b], f"{name} loc")
        _assert_close(conf[:, a:b], want_conf[:, a:b], f"{name} conf")
    assert not np.allclose(loc[0, -4:], loc[1, -4:])  # the last source still depends on the image


def test_missing_or_unexpected_key_is_named(reference, tmp_path):
    state = reference.state_dict()
    missing = {k: v for k, v in state.items() if k != "backbone.scale_weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing.pth.*missing keys \['backbone.scale_weight'\]"):
        kseg.build_model("ssd300", layout="torchvision", weights=tmp_path / "missing.pth")
    extra = dict(state)
    extra["head.classification_head.module_list.6.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \['head.classification_head.module_list.6"):
        kseg.build_model("ssd300", layout="torchvision", weights=tmp_path / "extra.pth")
    keras.backend.clear_session()


def test_safetensors_and_keras_round_trip(torchvision_model, reference, tmp_path, raw):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    path = tmp_path / "ssd300.safetensors"
    save_state_dict(state, path)
    x = raw[:1] - np.float32([123.0, 117.0, 104.0])
    want = [np.asarray(o) for o in torchvision_model(x, training=False)]
    # A state_dict alone selects the torchvision layout.
    model = kseg.build_model("ssd300", weights=path)
    assert model.get_layer("block1_pool").padding == "valid"
    for a, b in zip(model.weights, torchvision_model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    del model
    # .keras in safe mode, no custom_objects: L2Normalization is registered serialisable.
    saved = tmp_path / "ssd300.keras"
    torchvision_model.save(saved)
    reloaded = keras.saving.load_model(saved, compile=False, safe_mode=True)
    assert isinstance(reloaded.get_layer("conv4_3_norm"), L2Normalization)
    for got, w in zip(reloaded(x, training=False), want):
        np.testing.assert_array_equal(np.asarray(got), w)
    keras.backend.clear_session()


def test_postprocess_appends_the_decoder(paper):
    postprocess = pytest.importorskip("kseg.detection.postprocess")
    if not hasattr(postprocess, "SSDDecoder"):
        pytest.skip("kseg.detection.postprocess has no SSDDecoder yet")
    model = kseg.build_model("ssd300", postprocess=True)
    decoder = model.get_layer("ssd_decoder")
    assert isinstance(decoder, postprocess.SSDDecoder)
    assert (decoder.priors, decoder.input_hw) == ("voc", (300, 300))
    assert [tuple(f) for f in decoder.feature_sizes] == [s[:2] for s in SOURCE_SHAPES]
    # The decoder sits on the raw outputs: the same weights as the raw model give its detections.
    model.set_weights(paper.get_weights())
    x = np.random.default_rng(2).uniform(-100, 100, (1, 300, 300, 3)).astype("float32")
    loc, conf = (np.asarray(o) for o in paper(x, training=False))
    got = model(x, training=False)
    assert sorted(got) == ["detection_boxes", "detection_classes", "detection_scores", "num_detections"]
    want = postprocess.ssd_postprocess(loc, conf, decoder.anchors, (300, 300))
    for key in got:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-4)
    coco = kseg.build_model("ssd300", layout="torchvision", input_shape=(512, 384, 3), postprocess=True)
    decoder = coco.get_layer("ssd_decoder")
    assert (decoder.priors, decoder.input_hw) == ("coco", (512, 384))
    # Its maps' own sizes (the 3x3 valid convs of conv8_2 / conv9_2 shrink by 2, not by the stride).
    assert [tuple(f) for f in decoder.feature_sizes] == [(64, 48), (32, 24), (16, 12), (8, 6), (6, 4), (4, 2)]
    keras.backend.clear_session()


# --- ImageNet initialisation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_keras_file(tmp_path_factory):
    source = kseg.build_model("vgg16")  # weights=None: its random initialisation
    path = tmp_path_factory.mktemp("vgg") / "vgg16_keras.h5"
    save_legacy_h5(source, path)
    arrays = {n: source.get_layer(n).get_weights() for n in ssd.VGG16_CONV_NAMES + ["fc1", "fc2"]}
    del source
    keras.backend.clear_session()
    return path, arrays


def test_backbone_weights_from_vgg16(vgg_keras_file):
    path, source = vgg_keras_file
    model = kseg.build_model("ssd300", backbone_weights=path)
    for name in ssd.VGG16_CONV_NAMES:
        for got, want in zip(model.get_layer(name).get_weights(), source[name]):
            np.testing.assert_array_equal(got, want)
    # fc_reduced: fc6 = fc1's 7x7 kernel at taps 0, 3, 6 and every 4th output; fc7 every 4th of fc2.
    (w1, b1), (w2, b2) = source["fc1"], source["fc2"]
    k6, c6 = model.get_layer("fc6").get_weights()
    k7, c7 = model.get_layer("fc7").get_weights()
    assert np.array_equal(k6, w1.reshape(7, 7, 512, 4096)[::3, ::3, :, ::4]) and np.array_equal(c6, b1[::4])
    assert np.array_equal(k7, w2[::4, ::4].reshape(1, 1, 1024, 1024)) and np.array_equal(c7, b2[::4])
    # conv4_3_norm and everything after fc7 keep their initialisation.
    np.testing.assert_array_equal(model.get_layer("conv4_3_norm").get_weights()[0], np.full(512, 20.0, "float32"))
    keras.backend.clear_session()


def test_backbone_weights_from_torchvision_vgg16(tmp_path):
    torch.manual_seed(0)
    state = ref.VGG16().state_dict()
    path = tmp_path / "vgg16_torchvision.pth"
    torch.save(state, path)
    model = kseg.build_model("ssd300", backbone_weights=path)
    # A torchvision state_dict selects the torchvision layout (as for a full ssd300_vgg16 file).
    assert model.get_layer("block1_pool").padding == "valid"
    features = [i for i, m in enumerate(ref._vgg16_features()) if isinstance(m, nn.Conv2d)]
    for index, name in zip(features, ssd.VGG16_CONV_NAMES):
        kernel, bias = model.get_layer(name).get_weights()
        np.testing.assert_array_equal(kernel, state[f"features.{index}.weight"].numpy().transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(bias, state[f"features.{index}.bias"].numpy())
    # classifier.0 reads an NCHW flatten: (4096, 512*7*7) -> (7, 7, 512, 4096).
    fc1 = state["classifier.0.weight"].numpy().reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0)
    k6, c6 = model.get_layer("fc6").get_weights()
    assert np.array_equal(k6, fc1[::3, ::3, :, ::4]) and np.array_equal(c6, state["classifier.0.bias"].numpy()[::4])
    k7, _ = model.get_layer("fc7").get_weights()
    assert np.array_equal(k7[0, 0], state["classifier.3.weight"].numpy().T[::4, ::4])
    keras.backend.clear_session()
