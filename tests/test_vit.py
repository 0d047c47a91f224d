"""ViT-B/16 and DeiT-Ti / S / B (with and without distillation): parameter counts, torchvision / timm
state_dicts giving the reference modules' outputs (tests/torch_reference_vit.py, torchvision's and timm's module
names), the position embedding resampled for other input sizes as each reference resamples it, the options."""

import keras
import numpy as np
import pytest

import kseg
from kseg.models.vit import resample_matrix
from kseg.statedict import save_state_dict

torch = pytest.importorskip("torch")
import torch_reference_vit as ref  # noqa: E402

TOL = 1e-4  # max |diff| <= TOL x max |output|
# The references' parameter counts (torchvision's vit_b_16: 86,567,656; timm's, published rounded as 5.72M,
# 22.05M, 86.57M and distilled 5.91M, 22.44M, 87.34M): all trainable, so also Keras' count_params().
COUNTS = {"vit_b_16": 86_567_656, "deit_tiny": 5_717_416, "deit_small": 22_050_664, "deit_base": 86_567_656,
          "deit_tiny_distilled": 5_910_800, "deit_small_distilled": 22_436_432, "deit_base_distilled": 87_338_192}
PUBLISHED_MILLIONS = {"deit_tiny": 5.72, "deit_small": 22.05, "deit_base": 86.57, "deit_tiny_distilled": 5.91,
                      "deit_small_distilled": 22.44, "deit_base_distilled": 87.34, "vit_b_16": 86.57}
GMACS = {"deit_tiny": 1.3, "deit_small": 4.6, "deit_base": 17.6, "vit_b_16": 17.6}
SLOW_BUILD = {"vit_b_16", "deit_small", "deit_base", "deit_small_distilled", "deit_base_distilled"}  # 1.5-3.5 s


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _nchw(x_nhwc):
    return torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())


def _torch_outputs(module, x_nhwc, method="forward"):
    with torch.no_grad():
        out = getattr(module, method)(_nchw(x_nhwc))
    return [o.numpy() for o in out] if isinstance(out, tuple) else out.numpy()


def _timm(name, image_size=224, seed=0):
    return ref.randomize(ref.TimmViT(name, image_size), seed)


def _save(module, path, state=None):
    state = module.state_dict() if state is None else state
    if str(path).endswith(".safetensors"):
        save_state_dict({k: v.numpy() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def _assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    diff, scale = np.abs(got - want).max(), np.abs(want).max()
    assert diff <= TOL * scale, f"{what}: max |diff| {diff} vs max |output| {scale}"


# --- counts (build only, full size) ---------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BUILD else n
                                  for n in sorted(COUNTS)])
def test_counts(name):
    model = kseg.build_model(name)
    assert (_trainable(model), model.count_params()) == (COUNTS[name], COUNTS[name]) == \
           (COUNTS[name], kseg.get_spec(name).params)
    assert round(COUNTS[name] / 1e6, 2) == PUBLISHED_MILLIONS[name]
    module = (ref.TorchvisionViT if name == "vit_b_16" else ref.TimmViT)(name)
    assert sum(p.numel() for p in module.parameters()) == COUNTS[name]
    if name in GMACS:
        # Multiply-adds at 224x224 (kseg.flops: the patch conv, the dense layers and the attention's two products,
        # 2 x tokens^2 x width per block), as torchvision lists vit_b_16 (17.6 GFLOPS, multiply-adds) and timm
        # the DeiT models.
        report = kseg.flops(model)
        width = model.get_layer("norm").gamma.shape[0]
        assert report.by_kind()["ViTAttention"] == 2 * 12 * 2 * 197 ** 2 * width
        assert round(report.total_macs / 1e9, 1) == GMACS[name], report.total_macs
    keras.backend.clear_session()


def test_spec_and_preprocessing():
    for name in COUNTS:
        spec = kseg.get_spec(name)
        assert spec.preprocessing.kind == "torch" and spec.input_shape == (224, 224, 3)
        assert spec.paper.startswith("Touvron" if name.startswith("deit") else "Dosovitskiy")
    x = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")
    np.testing.assert_allclose(kseg.get_spec("deit_tiny").preprocessing.apply(x),
                               [[[[-0.485 / 0.229, (0.5 - 0.456) / 0.224, (1 - 0.406) / 0.225]]]], rtol=1e-5)


# --- the position embedding's resampling ----------------------------------------------------------------


@pytest.mark.parametrize("grid, size", [((14, 14), (18, 18)), ((14, 14), (10, 10)), ((14, 14), (6, 8)),
                                        ((4, 4), (14, 14)), ((14, 14), (1, 1))])
def test_resampling_equals_torch_interpolate(grid, size, rng):
    # torchvision's interpolate_embeddings: bicubic, align_corners=True; timm's resample_abs_pos_embed: bicubic,
    # antialias=True; growing, shrinking, non-square and down to one patch.
    values = rng.normal(size=(1, 5, *grid)).astype("float32")
    for mode, options in (("torchvision", dict(align_corners=True)), ("timm", dict(antialias=True))):
        want = torch.nn.functional.interpolate(torch.from_numpy(values), size=size, mode="bicubic", **options)
        rows, columns = (np.asarray(resample_matrix(s, g, mode)) for s, g in zip(size, grid))
        got = np.einsum("ip,cpq,jq->cij", rows, values[0], columns)
        np.testing.assert_allclose(got, want[0].numpy(), atol=1e-5, err_msg=mode)


# --- outputs: timm / torchvision state_dicts ----------------------------------------------------------


def test_deit_tiny_from_timm_state_dict_with_training_options(tmp_path, rng):
    # A reference trained at 64x64 (a 4x4 patch grid; pos_embed_size=64 keeps its embedding as it is), loaded
    # into a model with dropout, attention_dropout and drop_path (stochastic depth, rates rising linearly over
    # the blocks): they act in training only, the inference outputs are the reference's; the custom layers
    # and their options come back from a .keras file.
    module = _timm("deit_tiny", 64)
    path = _save(module, tmp_path / "deit_tiny.pth")
    model = kseg.build_model("deit_tiny", input_shape=(64, 64, 3), pos_embed_size=64, weights=path, dropout=0.1,
                             attention_dropout=0.1, drop_path=0.1)
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    y = np.asarray(model(x, training=False))
    _assert_close(y, _torch_outputs(module, x), "deit_tiny")
    rates = {layer.name: layer.rate for layer in model.layers if "drop_path" in layer.name}
    assert "block_0_drop_path1" not in rates and rates["block_11_drop_path2"] == pytest.approx(0.1)
    assert rates["block_1_drop_path1"] == pytest.approx(0.1 / 11) and len(rates) == 22
    assert model.get_layer("block_3_attn").dropout == 0.1 and model.get_layer("pos_drop").rate == 0.1
    assert np.abs(np.asarray(model(x, training=True)) - y).max() > 1e-3 * np.abs(y).max()
    model.save(tmp_path / "deit.keras")
    reloaded = keras.saving.load_model(tmp_path / "deit.keras", compile=False)
    np.testing.assert_array_equal(reloaded(x, training=False), y)
    assert reloaded.get_layer("block_11_drop_path2").rate == pytest.approx(0.1)
    keras.backend.clear_session()


@pytest.mark.parametrize("size", [(96, 128), pytest.param((288, 288), marks=pytest.mark.slow)])
def test_distilled_224_file_at_other_sizes(size, tmp_path, rng):
    # A 224 file (14x14 grid) at 96x128 (6x8, shrunk, non-square) and 288 (18x18, grown): kseg resamples the
    # position embedding in the graph as timm's resample_abs_pos_embed does to the checkpoint (the two prefix
    # tokens' positions kept). Averaged heads by default; both logits with distilled_training=True.
    source = _timm("deit_tiny_distilled")
    path = _save(source, tmp_path / "deit_tiny_distilled.safetensors")
    grid = (size[0] // 16, size[1] // 16)
    module = ref.TimmViT("deit_tiny_distilled", size).eval()
    module.load_state_dict(ref.resample_abs_pos_embed(source.state_dict(), grid, prefix=2))
    x = rng.normal(size=(1, *size, 3)).astype("float32")
    model = kseg.build_model("deit_tiny_distilled", input_shape=(*size, 3), weights=path)
    _assert_close(model(x, training=False), _torch_outputs(module, x), f"deit_tiny_distilled at {size}")
    if size == (96, 128):
        both = kseg.build_model("deit_tiny_distilled", input_shape=(*size, 3), distilled_training=True,
                                weights=path)
        assert both.output_names == ["predictions", "predictions_dist"]
        for got, want, head in zip(both(x, training=False), _torch_outputs(module, x, "forward_heads"),
                                   ("head", "head_dist")):
            _assert_close(got, want, head)
    keras.backend.clear_session()


def test_trunk_at_any_size(tmp_path, rng):
    # Built for any size (include_top=False, input (None, None, 3)), a 224 file's model resamples its position
    # embedding for each input it is given: the final tokens equal the reference's at that size, the patch
    # tokens come back as a map; pooling="token" is the class token (distilled: the mean of the two tokens).
    source = _timm("deit_tiny")
    path = _save(source, tmp_path / "deit_tiny.pth")
    model = kseg.build_model("deit_tiny", include_top=False, weights=path)
    assert model.inputs[0].shape == (None, None, None, 3)
    everything = keras.Model(model.input, [model.output, model.get_layer("norm").output])
    for size in ((64, 64), (48, 80)):
        module = ref.TimmViT("deit_tiny", size).eval()
        module.load_state_dict(ref.resample_abs_pos_embed(source.state_dict(), (size[0] // 16, size[1] // 16)))
        x = rng.normal(size=(1, *size, 3)).astype("float32")
        want = _torch_outputs(module, x, "forward_features")
        patch_map, tokens = (np.asarray(t) for t in everything(x, training=False))
        assert patch_map.shape == (1, size[0] // 16, size[1] // 16, 192)
        _assert_close(tokens, want, f"tokens at {size}")
        np.testing.assert_array_equal(patch_map.reshape(1, -1, 192), tokens[:, 1:])
    pooled = kseg.build_model("deit_tiny_distilled", include_top=False, pooling="token", input_shape=(32, 32, 3))
    features, tokens = keras.Model(pooled.input, [pooled.output, pooled.get_layer("norm").output])(x[:, :32, :32])
    assert features.shape == (1, 192)
    np.testing.assert_allclose(features, (tokens[:, 0] + tokens[:, 1]) / 2, rtol=1e-6, atol=1e-6)
    keras.backend.clear_session()


# --- options ------------------------------------------------------------------------------------------


def test_options_are_checked():
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        kseg.build_model("deit_tiny", input_shape=(100, 100, 3))
    with pytest.raises(ValueError, match="pos_embed_size must be"):
        kseg.build_model("deit_tiny", pos_embed_size=200)
    with pytest.raises(ValueError, match="pos_embed_resample must be one of"):
        kseg.build_model("deit_tiny", pos_embed_resample="bilinear")
    with pytest.raises(ValueError, match="drop_path must be a rate"):
        kseg.build_model("deit_tiny", drop_path=1.0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        kseg.build_model("deit_tiny", include_top=False, pooling="cls")
    with pytest.raises(TypeError, match="unknown option"):
        kseg.build_model("deit_tiny", distilled_training=True)


# --- full size (slow): 224x224 through the file readers ------------------------------------------------


@pytest.mark.slow
def test_vit_b_16_from_torchvision_state_dict_full(tmp_path, rng):
    module = ref.randomize(ref.TorchvisionViT())
    path = _save(module, tmp_path / "vit_b_16.pth")
    x = rng.normal(size=(1, 224, 224, 3)).astype("float32")
    model = kseg.build_model("vit_b_16", weights=path)
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), "vit_b_16")


@pytest.mark.slow
def test_vit_b_16_224_file_at_288(tmp_path, rng):
    # torchvision's interpolate_embeddings (bicubic, align_corners=True) on the file vs kseg's in-graph resampling.
    source = ref.randomize(ref.TorchvisionViT())
    path = _save(source, tmp_path / "vit_b_16.pth")
    module = ref.TorchvisionViT(image_size=288).eval()
    module.load_state_dict(ref.interpolate_embeddings(source.state_dict(), 288))
    x = rng.normal(size=(1, 288, 288, 3)).astype("float32")
    model = kseg.build_model("vit_b_16", input_shape=(288, 288, 3), weights=path)
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), "vit_b_16 at 288")


@pytest.mark.slow
def test_deit_small_distilled_from_timm_safetensors_full(tmp_path, rng):
    module = _timm("deit_small_distilled")
    path = _save(module, tmp_path / "deit_small_distilled.safetensors")
    x = rng.normal(size=(1, 224, 224, 3)).astype("float32")
    model = kseg.build_model("deit_small_distilled", weights=path)
    _assert_close(model.predict(x, verbose=0), _torch_outputs(module, x), "deit_small_distilled")
