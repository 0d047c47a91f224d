"""Pictures of what a network sees: `kseg inspect MODEL --features IMAGE --out DIR` (feature-map
grids, convert.features) and `kseg models NAME --plot FILE` (keras.utils.plot_model)."""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import kseg
from convert import features
from kseg.cli import main
from kseg.images import read_image
from kseg.registry import UNIT

ROOT = Path(__file__).resolve().parent.parent
# LeNet-5's feature maps, one image: C1 28x28x6, S2 14x14x6, C3 10x10x16, S4 5x5x16 (C5 is 1x1x120).
LENET_DEFAULT = ["C1", "S2", "C3", "S4"]


def _picture(path, h=40, w=48, seed=0):
    """A small RGB PNG: gradients plus noise, so every map varies."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1) + rng.uniform(0, 40, (h, w, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def lenet():
    keras.utils.set_random_seed(3)
    return kseg.build_model("lenet5")


def _direct(model, name, image):
    """A layer's output for the image computed with Keras: the image resized as kseg does, preprocessed."""
    resized = np.asarray(Image.fromarray(image[..., 0]).resize((32, 32), Image.BILINEAR))[None, ..., None]
    probe = keras.Model(model.inputs[0], model.get_layer(name).output)
    return np.asarray(probe(UNIT.apply(resized.astype(np.float32)), training=False))


def _expected_size(h, w, n):
    """The picture's (width, height): n tiles in ceil(sqrt(n)) columns, tiles enlarged by a whole
    factor to at least 32 px, 1-px lines between them."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    zoom = max(1, math.ceil(32 / max(h, w)))
    return cols * w * zoom + cols - 1, rows * h * zoom + rows - 1


def _no_temporaries(directory):
    return [n for n in os.listdir(directory) if "tmp" in n]


def test_feature_grids_of_lenet5_equal_the_layer_outputs(tmp_path, lenet):
    image = read_image(_picture(tmp_path / "in.png"), channels=1)
    out = tmp_path / "maps"
    index = features.write_feature_maps(lenet, image, out, preprocessing=UNIT)
    assert [e["layer"] for e in index["layers"]] == LENET_DEFAULT
    assert sorted(os.listdir(out)) == sorted([f"{n}.png" for n in LENET_DEFAULT] + ["index.json"])
    assert json.loads((out / "index.json").read_text()) == index
    assert index["input_size"] == [32, 32] and index["preprocessing"] == "unit"
    for entry in index["layers"]:
        direct = _direct(lenet, entry["layer"], image)
        _, h, w, c = direct.shape
        assert entry["shape"] == list(direct.shape) and entry["channels"] == c == entry["channels_shown"]
        np.testing.assert_allclose([entry["min"], entry["max"]], [direct.min(), direct.max()], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(entry["channel_max"], direct[0].reshape(-1, c).max(0), rtol=1e-5, atol=1e-6)
        with Image.open(out / entry["file"]) as im:
            assert im.mode == "RGB" and im.size == _expected_size(h, w, c)
            picture = np.asarray(im)
        # A known channel: its tile, at its zoom, is the layer output scaled to 0..255 on its own.
        k = c - 2
        tile = features.tile_of(picture, entry["grid"], k)[::entry["grid"]["zoom"], ::entry["grid"]["zoom"]]
        channel = direct[0, ..., k].astype(np.float64)
        expected = (channel - channel.min()) * 255 / (channel.max() - channel.min())
        assert np.abs(tile.astype(np.float64) - expected).max() <= 0.501
        assert tile.min() == 0 and tile.max() == 255
        # The 1-px line below the first row of tiles has the separator's colour.
        th = entry["grid"]["tile"][0]
        assert (picture[th] == features.SEPARATOR).all()


def test_layers_by_name_and_glob_and_max_maps(tmp_path, lenet):
    image = read_image(_picture(tmp_path / "in.png", 32, 32), channels=1)
    index = features.write_feature_maps(lenet, image, tmp_path / "c", layers=["C*", "S2"], max_maps=4,
                                        preprocessing=UNIT)
    # Globs and names, in the model's order; C5's 1x1 maps when asked for by name or pattern.
    assert [e["layer"] for e in index["layers"]] == ["C1", "S2", "C3", "C5"]
    c5 = index["layers"][-1]
    assert c5["shape"] == [1, 1, 1, 120] and c5["channels_shown"] == 4 and len(c5["channel_min"]) == 4
    with Image.open(tmp_path / "c" / "C5.png") as im:
        assert im.size == _expected_size(1, 1, 4) == (65, 65)
    assert index["selection"] == ["C*", "S2"]
    # A glob that matches only layers without a [N, H, W, C] map is refused too.
    with pytest.raises(ValueError, match="F6"):
        features.select_layers(lenet, ["F*"])


def test_default_layers_are_stage_outputs_no_skip_connection_passes_by():
    image = keras.Input((16, 16, 3), name="image")
    stem = keras.layers.Conv2D(4, 3, padding="same", name="stem")(image)
    x = keras.layers.Conv2D(4, 3, padding="same", name="b1_conv1")(stem)
    x = keras.layers.Dropout(0.5, name="b1_drop")(x)
    out1 = keras.layers.Add(name="b1_out")([stem, x])
    reduce = keras.layers.Conv2D(4, 1, name="b2_reduce")(out1)  # ResNet (torchvision): stride in the 3x3
    down = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="b2_down")(reduce)
    shortcut = keras.layers.Conv2D(8, 1, strides=2, name="b2_shortcut")(out1)
    out2 = keras.layers.Add(name="b2_out")([shortcut, down])
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(out2)
    model = keras.Model(image, keras.layers.Dense(2, name="fc")(pooled))
    assert [layer.name for layer in features.default_layers(model)] == ["b1_out", "b2_out"]
    # A model that takes any size: sizes at the given input size.
    deeplab = kseg.build_model("deeplab_largefov", width=0.125, num_classes=3)
    assert [layer.name for layer in features.default_layers(deeplab, (65, 65))] == [
        "block1_conv2", "block2_conv2", "block3_conv3", "fc8", "fc8_interp"]


def test_layer_names_become_safe_file_names():
    assert features.safe_file_names(["block1/conv", "block1_conv", "Block1_Conv", "..", "a b:c"]) == [
        "block1_conv", "block1_conv-2", "Block1_Conv-3", "layer", "a_b_c"]


def _cli(argv):
    """kseg in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_unknown_layer_is_a_usage_error_listing_layers(tmp_path):
    picture = _picture(tmp_path / "in.png")
    code, _, err = _cli(["inspect", "lenet5", "--features", picture, "--out", str(tmp_path / "o"),
                         "--layers", "C1", "block*_conv*"])
    assert code == 2
    assert "block*_conv*" in err and "C1, S2, C3, S4, C5" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    code, _, err = _cli(["inspect", "lenet5", "--out", str(tmp_path / "o")])
    assert code == 2 and "--out goes with --features" in err


def test_cli_writes_the_feature_maps_of_a_saved_model(tmp_path, lenet):
    """`python -m kseg.cli inspect FILE.keras --features ...`: the file's weights and recorded preprocessing."""
    path = tmp_path / "lenet5.keras"
    lenet.save(path)
    picture = _picture(tmp_path / "in.png")
    out = tmp_path / "maps"
    result = subprocess.run([sys.executable, "-m", "kseg.cli", "inspect", str(path), "--features", picture,
                             "--out", str(out), "--layers", "S4", "C3", "--max-maps", "9", "--json"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads(result.stdout)
    assert [e["layer"] for e in index["layers"]] == ["C3", "S4"] and index["preprocessing"] == "unit"
    assert sorted(os.listdir(out)) == ["C3.png", "S4.png", "index.json"]
    entry = index["layers"][0]
    assert entry["channels_shown"] == 9 and entry["grid"]["rows"] == entry["grid"]["cols"] == 3
    direct = _direct(lenet, "C3", read_image(picture, channels=1))
    with Image.open(out / "C3.png") as im:
        assert im.size == _expected_size(10, 10, 9)
        tile = features.tile_of(np.asarray(im), entry["grid"], 8)[::4, ::4]
    assert (tile == features.normalise(direct[0, ..., 8])).mean() > 0.99  # float rounding at .5 at most


# === kseg models NAME --plot ==============================================================


def _plot(tmp_path, env_changes):
    env = {**os.environ, **env_changes}
    target = tmp_path / "lenet5.png"
    result = subprocess.run([sys.executable, "-m", "kseg.cli", "models", "lenet5", "--plot", str(target)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False)
    return result, target


def test_plot_without_graphviz_names_what_to_install_and_writes_nothing(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result, target = _plot(tmp_path, {"PATH": str(empty)})  # no `dot` on this PATH
    assert result.returncode == 3, result.stderr[-2000:]
    assert "dot" in result.stderr and "apt install graphviz" in result.stderr and "brew install graphviz" \
        in result.stderr and "Traceback" not in result.stderr
    assert not target.exists() and os.listdir(tmp_path) == ["bin"]


def test_plot_without_pydot_names_what_to_install_and_writes_nothing(tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "pydot.py").write_text("raise ImportError(\"No module named 'pydot'\", name='pydot')\n")
    result, target = _plot(tmp_path, {"PYTHONPATH": str(fake)})
    assert result.returncode == 3, result.stderr[-2000:]
    assert "pip install pydot" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists() and sorted(os.listdir(tmp_path)) == ["site"]


def _has_pydot():
    try:
        import pydot  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(shutil.which("dot") is None or not _has_pydot(),
                    reason="drawing a model needs pydot (pip install pydot) and Graphviz's dot program "
                           "(apt install graphviz); the missing-tool errors are tested above")
def test_plot_draws_the_architecture(tmp_path):
    target = tmp_path / "plots" / "lenet5.png"
    code, out, err = _cli(["models", "lenet5", "--plot", str(target), "--show-shapes", "--dpi", "72"])
    assert code == 0, err
    assert "wrote" in out and os.listdir(target.parent) == ["lenet5.png"]
    with Image.open(target) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] > 100  # nine boxes, one above the other
    code, _, err = _cli(["models", "lenet5", "--plot", str(tmp_path / "lenet5.gif")])
    assert code == 2 and ".png" in err and not (tmp_path / "lenet5.gif").exists()
