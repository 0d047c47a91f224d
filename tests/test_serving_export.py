"""convert.tf_serving (kseg.serving.export): the TF Serving layout, its signatures, loading without
kseg, saved_model_cli, the CLI."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import kseg
from convert.io import OutputExistsError
from convert.tf_serving import (
    ExportVerificationError,
    encode_png,
    export,
    reference_outputs,
)

SIZE = (32, 32)
VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def deeplab(tmp_path_factory):
    """A narrow DeepLab-LargeFOV (5 classes) exported once: (model, BASE/NAME, version dir, metadata)."""
    keras.utils.set_random_seed(0)
    model = kseg.build_model("deeplab_largefov", num_classes=5, width=0.125)
    name_dir = str(tmp_path_factory.mktemp("models") / "seg")
    version_dir = export(model, name_dir, image_size=SIZE)
    with open(os.path.join(version_dir, "assets", "kseg.json")) as f:
        meta = json.load(f)
    return model, name_dir, version_dir, meta


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = kseg.build_model("lenet5")
    name_dir = str(tmp_path_factory.mktemp("models") / "digits")
    return model, name_dir, export(model, name_dir)


def test_layout_metadata_and_versions(deeplab, tmp_path):
    _, name_dir, version_dir, meta = deeplab
    assert version_dir == os.path.join(name_dir, "1")
    assert sorted(os.listdir(version_dir)) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert meta["architecture"] == "deeplab_largefov" and meta["build_kwargs"]["width"] == 0.125
    assert meta["preprocessing"]["kind"] == "caffe"
    assert meta["serving"]["image_size"] == list(SIZE) and meta["serving"]["task"] == "segmentation"
    # Next version by default, an explicit one on request, an existing one refused unless forced.
    base = str(tmp_path / "seg")
    keras.utils.set_random_seed(1)
    small = kseg.build_model("lenet5")
    assert export(small, base, verify=False).endswith(os.sep + "1")
    assert export(small, base, verify=False).endswith(os.sep + "2")
    assert export(small, base, version=7, verify=False).endswith(os.sep + "7")
    with pytest.raises(OutputExistsError, match="exists"):
        export(small, base, version=2, verify=False)
    assert sorted(os.listdir(base)) == ["1", "2", "7"]  # no temporaries left behind


def test_serving_default_matches_keras(deeplab, rng):
    model, _, version_dir, meta = deeplab
    fn = tf.saved_model.load(version_dir).signatures["serving_default"]
    images = rng.uniform(0, 255, size=(3, 40, 24, 3)).astype("float32")  # any size: the network is dynamic
    out = fn(images=tf.constant(images))
    expected = reference_outputs(model, meta, images)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["label_map"].numpy(), out["probabilities"].numpy().argmax(-1))


def test_predict_images_label_maps_at_original_size(deeplab, rng):
    model, _, version_dir, meta = deeplab
    loaded = tf.saved_model.load(version_dir)
    exact = rng.integers(0, 256, size=(*SIZE, 3)).astype(np.uint8)     # at the network size
    tall = rng.integers(0, 256, size=(50, 20, 3)).astype(np.uint8)     # resized to 32x32 and back
    out = loaded.signatures["predict_images"](image_bytes=tf.constant([encode_png(exact), encode_png(tall)]))
    label_map, sizes = out["label_map"].numpy(), out["image_size"].numpy()
    assert sizes.tolist() == [[32, 32], [50, 20]]
    assert label_map.shape == (2, 50, 32) and out["probabilities"].shape == (2, 32, 32, 5)
    # Padding marks where each image ends; inside, classes are valid.
    assert (label_map[0, 32:] == -1).all() and (label_map[1, :, 20:] == -1).all()
    assert label_map[1, :, :20].min() >= 0 and label_map[1, :, :20].max() < 5
    expected = reference_outputs(model, meta, exact[None].astype("float32"))
    np.testing.assert_allclose(out["probabilities"].numpy()[0], expected[0], atol=1e-5)
    np.testing.assert_array_equal(label_map[0, :32, :32], expected[0].argmax(-1))
    labels_only = loaded.signatures["label_images"](image_bytes=tf.constant([encode_png(exact), encode_png(tall)]))
    assert sorted(labels_only) == ["image_size", "label_map"]
    np.testing.assert_array_equal(labels_only["label_map"].numpy(), label_map)
    with pytest.raises(tf.errors.InvalidArgumentError, match="image file format"):
        loaded.signatures["predict_images"](image_bytes=tf.constant([b"not an image"]))


def test_classifier_export_decodes_grey_and_colour(lenet, rng):
    model, _, version_dir = lenet
    loaded = tf.saved_model.load(version_dir)
    grey = rng.integers(0, 256, size=(32, 32, 1)).astype(np.uint8)
    colour = rng.integers(0, 256, size=(64, 48, 3)).astype(np.uint8)  # converted to grey, resized to 32x32
    out = loaded.signatures["predict_images"](image_bytes=tf.constant([encode_png(grey), encode_png(colour)]))
    probs = out["probabilities"].numpy()
    assert sorted(out) == ["classes", "image_size", "probabilities"] and probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["classes"].numpy(), probs.argmax(-1))
    meta = json.loads(Path(os.path.join(version_dir, "assets", "kseg.json")).read_text())
    np.testing.assert_allclose(probs[0], reference_outputs(model, meta, grey[None].astype("float32"))[0], atol=1e-5)


FRESH = textwrap.dedent("""
    import io, json, sys
    import numpy as np, tensorflow as tf
    from PIL import Image
    path, x_path, y_path = sys.argv[1:]
    loaded = tf.saved_model.load(path)
    x = np.load(x_path)
    probs = loaded.signatures["serving_default"](images=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(probs, np.load(y_path), atol=1e-5)
    def png(a):
        b = io.BytesIO(); Image.fromarray(a).save(b, format="PNG"); return b.getvalue()
    out = loaded.signatures["predict_images"](image_bytes=tf.constant([png(x[0].astype(np.uint8)),
                                                                        png(np.zeros((45, 17, 3), np.uint8))]))
    assert out["label_map"].shape == (2, 45, 32), out["label_map"].shape
    meta = json.load(open(path + "/assets/kseg.json"))
    assert "kseg" not in sys.modules and "convert" not in sys.modules
    print("OK", meta["architecture"], sorted(loaded.signatures))
""")


@pytest.fixture(scope="module")
def subprocess_runs(deeplab, tmp_path_factory):
    """The fresh-process load and `saved_model_cli show --all`, run side by side (each imports TF)."""
    model, _, version_dir, meta = deeplab
    tmp = tmp_path_factory.mktemp("fresh")
    x = np.random.default_rng(0).integers(0, 256, size=(2, *SIZE, 3)).astype("float32")
    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", reference_outputs(model, meta, x))
    (tmp / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = {"fresh": [sys.executable, str(tmp / "fresh.py"), version_dir, str(tmp / "x.npy"), str(tmp / "y.npy")]}
    cli = os.path.join(VENV_BIN, "saved_model_cli")
    if os.path.exists(cli):
        runs["cli"] = [cli, "show", "--dir", version_dir, "--all"]
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp, env=env)
             for k, c in runs.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[k] = (out, err, p.returncode)
    return results


def test_loads_in_a_process_that_never_imports_kseg(subprocess_runs):
    out, err, code = subprocess_runs["fresh"]
    assert code == 0, err[-3000:]
    assert "OK deeplab_largefov ['label_images', 'predict_images', 'raw_outputs', 'serving_default']" in out


def test_saved_model_cli_lists_both_signatures(subprocess_runs):
    if "cli" not in subprocess_runs:
        pytest.skip("saved_model_cli (shipped with TensorFlow) is not next to this Python")
    text, err, code = subprocess_runs["cli"]
    assert code == 0, err[-3000:]
    for sig in ("serving_default", "predict_images"):
        assert f"signature_def['{sig}']" in text
    block = text.split("signature_def['predict_images']")[1].split("signature_def[")[0]
    assert "inputs['image_bytes'] tensor_info:" in block and "dtype: DT_STRING" in block and "shape: (-1)" in block
    assert "outputs['label_map']" in block and "outputs['probabilities']" in block
    block = text.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert "inputs['images']" in block and "shape: (-1, -1, -1, 3)" in block


def test_converts_back_to_keras(deeplab, rng):
    from convert.api import load_keras

    model, name_dir, _, _ = deeplab
    again = load_keras(name_dir)
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def test_bad_exports_are_refused(tmp_path):
    fixed = kseg.build_model("lenet5")
    with pytest.raises(ValueError, match="image_size"):
        export(fixed, str(tmp_path / "m"), image_size=(16, 16))  # LeNet's input is fixed at 32x32
    assert not os.path.exists(tmp_path / "m" / "1")
    inputs = keras.Input((None, None, 3))
    plain = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    with pytest.raises(ValueError, match="preprocessing"):
        export(plain, str(tmp_path / "p"), image_size=(8, 8))
    # A model without kseg metadata exports once its preprocessing is named.
    path = export(plain, str(tmp_path / "p"), image_size=(8, 8), preprocessing="unit")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))


def test_verification_failure_writes_nothing(tmp_path, monkeypatch):
    ex = importlib.import_module("convert.tf_serving")  # the package's `export` attribute is the function

    def wrong(model, meta, images):
        return np.zeros(1)

    monkeypatch.setattr(ex, "reference_outputs", wrong)
    with pytest.raises(ExportVerificationError, match="nothing was written"):
        export(kseg.build_model("lenet5"), str(tmp_path / "m"))
    assert os.listdir(tmp_path / "m") == []


def test_cli_export(tmp_path, capsys):
    from kseg.cli import main

    base = tmp_path / "models"
    code = main(["export", "lenet5", "--serving", str(base / "digits"), "--num-classes", "4", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(base / "digits" / "1")
    meta = json.loads(Path(base / "digits" / "1" / "assets" / "kseg.json").read_text())
    assert meta["num_classes"] == 4 and meta["serving"]["signatures"][:2] == ["serving_default", "predict_images"]
    assert main(["export", "no_such_model", "--serving", str(base / "x")]) == 2
    assert "neither a model file nor a registered model name" in capsys.readouterr().err
