"""RepVGG A0-B1: parameter counts of the train and deploy forms, structural re-parameterization
(kseg.models.repvgg.reparameterize), and timm-layout state_dicts giving the outputs of a reference module
written with timm's module names (tests/torch_reference_repvgg.py)."""

import keras
import numpy as np
import pytest

import kseg
from kseg.identity import identify
from kseg.models.repvgg import block_config, feature_names, reparameterize, repvgg_trunk
from kseg.statedict import save_state_dict
from kseg.weights import WeightsMismatchError

torch = pytest.importorskip("torch")
import torch_reference_repvgg as ref  # noqa: E402

TOL = 1e-4  # weight import: max |diff| <= TOL x max |output|
REPARAM_TOL = 1e-5  # train form vs its reparameterized deploy form

# name: (timm's parameter count = trainable here, Keras' count_params() of the train form, the deploy form's
# count, and the deploy form's in millions as mmpretrain's RepVGG table lists it; B0's: measured here).
COUNTS = {
    "repvgg_a0": (9_108_968, 9_132_616, 8_309_384, 8.31),
    "repvgg_a1": (14_092_264, 14_122_088, 12_789_864, 12.79),
    "repvgg_a2": (28_210_600, 28_253_160, 25_499_944, 25.50),
    "repvgg_b0": (15_817_960, 15_853_160, 14_339_048, 14.34),
    "repvgg_b1": (57_415_016, 57_483_112, 51_829_480, 51.83),
}


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _randomize_bn(model, rng):
    """Non-trivial BatchNorm parameters and moving statistics (the ranges of ref.randomize_bn), so a wrong fold
    shows in the outputs."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(lo, hi, c).astype("float32")
                               for lo, hi in ((0.6, 1.2), (-0.2, 0.2), (-0.2, 0.2), (0.5, 1.5))])
    return model


def _run(model, x):
    """Inference on a small batch: a direct call skips predict()'s tracing (seconds per model here)."""
    return keras.ops.convert_to_numpy(model(x, training=False))


def _torch_outputs(module, x_nhwc, fn=None):
    module.eval()
    with torch.no_grad():
        out = (fn or module)(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def _assert_close(got, want, tol, what):
    assert got.shape == want.shape, what
    diff, scale = np.abs(got - want).max(), np.abs(want).max()
    assert diff <= tol * scale, f"{what}: max |diff| {diff} vs max |output| {scale}"


# --- parameter counts (build only, full size) ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    timm, total, deploy, millions = COUNTS[name]
    train = kseg.build_model(name)
    assert (_trainable(train), train.count_params()) == (timm, total)
    assert total == kseg.get_spec(name).params
    deployed = kseg.build_model(name, deploy=True)
    assert deployed.count_params() == _trainable(deployed) == deploy  # no BatchNorm left
    assert round(deploy / 1e6, 2) == millions
    assert kseg.get_spec(name).preprocessing.kind == "torch"
    keras.backend.clear_session()


# --- reparameterize (small inputs) --------------------------------------------------------------


@pytest.fixture(scope="module")
def a0_pair():
    """A randomised train-form repvgg_a0 (10 classes, an odd input size: the strided convs' padding must
    match), its reparameterized form, an input batch and both outputs."""
    rng = np.random.default_rng(0)
    model = _randomize_bn(kseg.build_model("repvgg_a0", input_shape=(67, 75, 3), num_classes=10), rng)
    deployed = reparameterize(model)
    x = rng.normal(size=(2, 67, 75, 3)).astype("float32")
    yield model, deployed, x, _run(model, x), _run(deployed, x)
    keras.backend.clear_session()


def test_reparameterize_a0_equals_train_form(a0_pair):
    model, deployed, x, want, got = a0_pair
    _assert_close(got, want, REPARAM_TOL, "repvgg_a0 reparameterized")
    assert not np.allclose(want[0], want[1])
    assert (deployed.name, deployed.inputs[0].name, deployed.output_names) == \
           (model.name, model.inputs[0].name, model.output_names) == ("repvgg_a0", "image", ["predictions"])
    # The same layers and weights as build_model(deploy=True), so its files load into that by name.
    direct = kseg.build_model("repvgg_a0", input_shape=(67, 75, 3), num_classes=10, deploy=True)
    assert [(v.path, v.shape) for v in deployed.weights] == [(v.path, v.shape) for v in direct.weights]
    # It keeps the kseg identity, with deploy=True (what export and serving rebuild).
    assert identify(deployed).architecture == "repvgg_a0"
    assert identify(deployed).build_kwargs["deploy"] is True
    # C1..C5 at strides 2..32 in both forms.
    for form in (model, deployed):
        shapes = [form.get_layer(n).output.shape[1:3] for n in feature_names("repvgg_a0").values()]
        assert shapes == [(34, 38), (17, 19), (9, 10), (5, 5), (3, 3)]


def test_deploy_form_saves_reloads_and_is_plain(a0_pair, tmp_path):
    _, deployed, x, _, got = a0_pair
    path = tmp_path / "repvgg_a0_deploy.keras"
    deployed.save(path)
    reloaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(_run(reloaded, x), got)
    assert identify(str(path)).build_kwargs["deploy"] is True
    # Only 3x3 convs with a bias, their padding and ReLUs in the blocks: no BatchNorm, no 1x1, no sum.
    kinds = {type(layer).__name__ for layer in reloaded.layers if layer.name.startswith("stage")}
    assert kinds == {"Conv2D", "ReLU", "ZeroPadding2D"}
    convs = [layer for layer in reloaded.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.name for c in convs] == [f"{name}_conv" for name, _, _ in block_config("repvgg_a0")]
    assert all(c.kernel_size == (3, 3) and c.use_bias for c in convs)


def test_reparameterize_trunk_of_any_input_size():
    # include_top=False without pooling: the stride-32 map, and a deploy trunk that takes any input size.
    rng = np.random.default_rng(1)
    model = _randomize_bn(kseg.build_model("repvgg_a0", include_top=False), rng)
    deployed = reparameterize(model)
    assert deployed.output_names == model.output_names == ["stage5_block1_relu"]
    for size in ((40, 56), (33, 97)):
        x = rng.normal(size=(2, *size, 3)).astype("float32")
        _assert_close(_run(deployed, x), _run(model, x), REPARAM_TOL, f"trunk at {size}")
    keras.backend.clear_session()


def test_reparameterize_after_training_steps():
    # Training moves the weights and the BatchNorm moving statistics the fold reads.
    rng = np.random.default_rng(2)
    model = kseg.build_model("repvgg_a0", input_shape=(32, 32, 3), num_classes=4)
    watched = [model.get_layer(n) for n in ("stage1_block1_3x3_bn", "stage3_block2_identity_bn",
                                            "stage5_block1_1x1_conv")]
    before = [keras.ops.convert_to_numpy(layer.weights[-1]) for layer in watched]
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    x, y = rng.normal(size=(8, 32, 32, 3)).astype("float32"), rng.integers(0, 4, 8)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after = [keras.ops.convert_to_numpy(layer.weights[-1]) for layer in watched]
    assert all(not np.allclose(a, b) for a, b in zip(after, before))
    _assert_close(_run(reparameterize(model), x), _run(model, x), REPARAM_TOL,
                  "repvgg_a0 after two training steps")
    keras.backend.clear_session()


def test_reparameterize_refuses_what_it_would_not_copy():
    with pytest.raises(ValueError, match="already in the deploy form"):
        reparameterize(kseg.build_model("repvgg_a0", include_top=False, deploy=True))
    # A layer before the blocks would be lost: refused, not dropped.
    inputs = keras.Input((32, 32, 3), name="image")
    model = keras.Model(inputs, repvgg_trunk(keras.layers.Rescaling(1 / 255.0)(inputs), "repvgg_a0"))
    with pytest.raises(ValueError, match="stage1_block1 does not follow 'image'"):
        reparameterize(model)
    keras.backend.clear_session()


# --- timm's state_dicts -------------------------------------------------------------------------


def test_timm_state_dict_a0(tmp_path, rng):
    torch.manual_seed(0)
    module = ref.randomize_bn(ref.RepVGG("repvgg_a0"))
    assert sum(p.numel() for p in module.parameters()) == COUNTS["repvgg_a0"][0]
    path = tmp_path / "repvgg_a0.pth"
    torch.save(module.state_dict(), path)
    x = rng.normal(size=(2, 67, 75, 3)).astype("float32")
    want = _torch_outputs(module, x)
    model = kseg.build_model("repvgg_a0", input_shape=(67, 75, 3), weights=path)
    _assert_close(_run(model, x), want, TOL, "repvgg_a0 from timm's keys")
    # A train-form file does not fit the deploy form: the error names the keys it lacks.
    with pytest.raises(WeightsMismatchError, match="missing keys.*reparam_conv"):
        kseg.build_model("repvgg_a0", input_shape=(67, 75, 3), deploy=True, weights=path)
    # timm's reparameterized blocks (`reparam_conv`) load into the deploy form and agree with ours.
    path = tmp_path / "repvgg_a0_deploy.safetensors"
    save_state_dict({k: v.numpy() for k, v in module.reparameterize().state_dict().items()}, path)
    deployed = kseg.build_model("repvgg_a0", input_shape=(67, 75, 3), deploy=True, weights=path)
    _assert_close(_run(deployed, x), want, TOL, "repvgg_a0 deploy form from timm's keys")
    ours = reparameterize(model)
    for name, _, _ in block_config("repvgg_a0"):
        for a, b in zip(ours.get_layer(f"{name}_conv").get_weights(), deployed.get_layer(f"{name}_conv").get_weights()):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())
    keras.backend.clear_session()


# --- full size (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_reparameterize_b1_full_size():
    rng = np.random.default_rng(3)
    model = _randomize_bn(kseg.build_model("repvgg_b1"), rng)
    deployed = reparameterize(model)
    assert deployed.count_params() == COUNTS["repvgg_b1"][2]
    x = rng.normal(size=(2, 224, 224, 3)).astype("float32")
    _assert_close(deployed.predict(x, verbose=0), model.predict(x, verbose=0), REPARAM_TOL, "repvgg_b1")
    keras.backend.clear_session()


@pytest.mark.slow
def test_timm_state_dict_b0_full_size(tmp_path, rng):
    torch.manual_seed(0)
    module = ref.randomize_bn(ref.RepVGG("repvgg_b0"))
    assert sum(p.numel() for p in module.parameters()) == COUNTS["repvgg_b0"][0]
    path = tmp_path / "repvgg_b0.safetensors"
    save_state_dict({k: v.numpy() for k, v in module.state_dict().items()}, path)
    model = kseg.build_model("repvgg_b0", weights=path)
    x = rng.normal(size=(2, 224, 224, 3)).astype("float32")
    want = _torch_outputs(module, x)
    _assert_close(model.predict(x, verbose=0), want, TOL, "repvgg_b0 from timm's keys")
    _assert_close(reparameterize(model).predict(x, verbose=0), want, TOL, "repvgg_b0 reparameterized")
    keras.backend.clear_session()


def test_training_at_imagenet_sizes_does_not_crash(tmp_path):
    # TF 2.21's oneDNN filter gradient of a strided 1x1 conv over fewer than 16 channels corrupts the heap
    # from 128-pixel inputs on (the process dies): the first block samples the image before its 1x1 conv.
    # In a subprocess, so that a crash fails this test instead of ending the test run.
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import keras, numpy as np\nimport kseg\n"
        "model = kseg.build_model('repvgg_a0', input_shape=(128, 128, 3), num_classes=4)\n"
        "model.compile('sgd', keras.losses.SparseCategoricalCrossentropy(from_logits=True))\n"
        "x = np.random.default_rng(0).uniform(-1, 1, (4, 128, 128, 3)).astype('float32')\n"
        "print(model.fit(x, np.arange(4) % 4, batch_size=2, epochs=2, verbose=0).history['loss'])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stage1_block1_1x1_sample" in [layer.name for layer in kseg.build_model("repvgg_a0").layers]
