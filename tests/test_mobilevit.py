"""MobileViT-XXS / -XS / -S: parameter counts, the patch unfold / fold and attention layers, and timm-layout
state_dicts giving the outputs of a reference module written with timm's module names
(tests/torch_reference_mobilevit.py)."""

import keras
import numpy as np
import pytest

import kseg
from kseg.models.mobilevit import MobileViTAttention, MobileViTFold, MobileViTUnfold
from kseg.statedict import save_state_dict

torch = pytest.importorskip("torch")
import torch_reference_mobilevit as ref  # noqa: E402
from torch_reference_mobilenet import calibrate_bn  # noqa: E402

TOL = 1e-4  # max |diff| <= TOL x max |output|
NAMES = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")
# timm's parameter counts (trainable here; timm lists 1.27M, 2.32M, 5.58M); Keras' count_params() adds the
# BatchNorm moving statistics.
TIMM = {"mobilevit_xxs": 1_272_024, "mobilevit_xs": 2_317_848, "mobilevit_s": 5_578_632}
TOTAL = {"mobilevit_xxs": 1_276_136, "mobilevit_xs": 2_326_296, "mobilevit_s": 5_590_888}


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _reference(name, calibrate):
    """The reference module with random LayerNorm and BatchNorm parameters and the BatchNorm statistics of the
    batch `calibrate` (NHWC), so that every layer's outputs stay of order one and matter."""
    torch.manual_seed(0)
    module = ref.randomize(ref.MobileViT(name), seed=1)
    return calibrate_bn(module, torch.from_numpy(calibrate.transpose(0, 3, 1, 2).copy()))


def _torch_outputs(fn, x_nhwc):
    with torch.no_grad():
        out = fn(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def _assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    diff, scale = np.abs(got - want).max(), np.abs(want).max()
    assert diff <= TOL * scale, f"{what}: max |diff| {diff} vs max |output| {scale}"
    # The outputs depend on the input (a network that lost its signal would pass the comparison).
    assert np.abs(want[0] - want[1]).max() > 1e-2 * scale, what


# --- counts and spec (build only, full size) ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_counts(name):
    model = kseg.build_model(name)
    assert model.input_shape == (None, 256, 256, 3) and model.output_shape == (None, 1000)
    assert (_trainable(model), model.count_params()) == (TIMM[name], TOTAL[name])
    assert TOTAL[name] == kseg.get_spec(name).params
    assert sum(p.numel() for p in ref.MobileViT(name).parameters()) == TIMM[name]
    # kseg.flops counts the attention's matrix products too: timm's benchmark table lists 0.42 / 1.05 / 2.03 GMACs
    # (ours 0.407 / 1.026 / 2.001: convolutions, dense layers and attention only, no element-wise ops).
    gmacs = kseg.flops(model).total_macs / 1e9
    assert gmacs == pytest.approx({"mobilevit_xxs": 0.42, "mobilevit_xs": 1.05, "mobilevit_s": 2.03}[name], rel=0.04)
    keras.backend.clear_session()


def test_spec_preprocessing_and_torch_map():
    # timm's MobileViTs take RGB in [0, 1] (mean 0, std 1): x / 255.
    for name in NAMES:
        spec = kseg.get_spec(name)
        assert (spec.preprocessing.kind, spec.input_shape, spec.task) == ("unit", (256, 256, 3), "classification")
    x = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")
    np.testing.assert_allclose(kseg.get_spec("mobilevit_xxs").preprocessing.apply(x), [[[[0.0, 0.5, 1.0]]]])
    # The torch map reads every key of timm's state_dict (num_batches_tracked aside), each once.
    suffixes = {"conv": ("weight",), "depthwise": ("weight",), "bn": ("weight", "bias", "running_mean", "running_var"),
                "dense": ("weight", "bias"), "layernorm": ("weight", "bias")}
    keys = [f"{m.prefix}.{s}" for m in kseg.get_spec("mobilevit_s").torch_map() for s in suffixes[m.kind]]
    state = ref.MobileViT("mobilevit_s").state_dict()
    assert sorted(keys) == sorted(k for k in state if not k.endswith("num_batches_tracked"))


# --- the MobileViT block's weightless layers ----------------------------------------------------


def test_unfold_fold_order_and_inverse(rng):
    # Sequence i holds pixel i (row-major in its 2x2 patch) of every patch, the patches row-major; the fold
    # undoes it, at static and at run-time sizes.
    x = rng.normal(size=(2, 4, 6, 3)).astype("float32")
    tokens = np.asarray(MobileViTUnfold(2)(x))
    assert tokens.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(tokens[:, 1, 4], x[:, 2, 3])  # pixel (0, 1) of patch (1, 1)
    np.testing.assert_array_equal(tokens[:, 2, 2], x[:, 1, 4])  # pixel (1, 0) of patch (0, 2)
    np.testing.assert_array_equal(MobileViTFold(2)([tokens, x]), x)
    inputs = keras.Input((None, None, 3))
    roundtrip = keras.Model(inputs, MobileViTFold(2)([MobileViTUnfold(2)(inputs), inputs]))
    np.testing.assert_array_equal(roundtrip(x), x)
    # The layers reload from their configs.
    assert MobileViTUnfold.from_config(MobileViTUnfold(2, name="u").get_config()).patch_size == 2
    assert MobileViTAttention.from_config(MobileViTAttention(4, name="a").get_config()).num_heads == 4


def test_attention_checks_its_width():
    with pytest.raises(ValueError, match="multiple of 3 x 4 heads"):
        MobileViTAttention(4)(np.zeros((1, 4, 5, 30), "float32"))


# --- outputs: timm state_dicts ------------------------------------------------------------------


def test_from_timm_state_dict(tmp_path, rng):
    # The whole classifier at 64x64 (MobileViT maps 8, 4, 2: even, no resizing).
    x, calibrate = (rng.uniform(0, 1, size=(n, 64, 64, 3)).astype("float32") for n in (2, 4))
    module = _reference("mobilevit_xxs", calibrate)
    path = tmp_path / "mobilevit_xxs.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model("mobilevit_xxs", input_shape=(64, 64, 3), weights=path)
    _assert_close(model(x, training=False), _torch_outputs(module, x), "mobilevit_xxs")
    keras.backend.clear_session()


def test_trunk_at_odd_sizes(tmp_path, rng):
    # 72x88: the stride-8, 16 and 32 maps are 9x11, 5x6 and 3x3, resized to even sizes around the transformer
    # as timm does; the trunk (include_top=False) built for any size and for this one gives timm's features.
    x, calibrate = (rng.uniform(0, 1, size=(n, 72, 88, 3)).astype("float32") for n in (2, 4))
    module = _reference("mobilevit_xxs", calibrate)
    path = tmp_path / "mobilevit_xxs.safetensors"
    save_state_dict({k: v.numpy() for k, v in module.state_dict().items()}, path)
    want = _torch_outputs(module.forward_features, x)
    assert want.shape == (2, 3, 3, 320)
    for input_shape in (None, (72, 88, 3)):
        model = kseg.build_model("mobilevit_xxs", include_top=False, input_shape=input_shape, weights=path)
        _assert_close(model(x, training=False), want, f"mobilevit_xxs trunk, input_shape={input_shape}")
    keras.backend.clear_session()


# --- full size (slow): 256x256 through the file readers -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, suffix", [("mobilevit_xxs", ".pth"), ("mobilevit_xs", ".pth"),
                                          ("mobilevit_s", ".safetensors")])
def test_from_timm_state_dict_full(name, suffix, tmp_path, rng):
    x, calibrate = (rng.uniform(0, 1, size=(n, 256, 256, 3)).astype("float32") for n in (2, 2))
    module = _reference(name, calibrate)
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".pth":
        torch.save(module.state_dict(), path)
    else:
        save_state_dict({k: v.numpy() for k, v in module.state_dict().items()}, path)
    model = kseg.build_model(name, weights=path)
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), name)
