"""kseg predict / evaluate --crf / crf-search, and the samples grid written at the end of training."""

import json
import os
import sys
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

import kseg
import kseg.data as kd
from kseg.cli import build_parser
from kseg.crf import dense_crf
from kseg.inference import Predictor, load_inference_model
from kseg.train import train
from kseg.train.pictures import plot_samples

TINY = textwrap.dedent("""
    model = "deeplab_largefov"
    [model_options]
    num_classes = 5
    width = 0.125
    [data]
    layout = "synthetic"
    crop = [32, 32]
    [optimizer]
    name = "adam"
    learning_rate = 1e-3
    [training]
    batch_size = 4
    epochs = 1
    [loss]
    name = "sparse_cross_entropy"
""")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    kd.make_synthetic(root, seed=0, train=4, val=2, size=32)
    return str(root)


@pytest.fixture(scope="module")
def run(synth, tmp_path_factory):
    """One tiny training shared by the tests that need a trained run directory."""
    out = tmp_path_factory.mktemp("run")
    recipe = out / "tiny.toml"
    recipe.write_text(TINY)
    result = train(str(recipe), synth, str(out), verbose=0)
    return out, result


def colour_classifier(path, input_size=(None, None)):
    """A real Keras model whose classes are a known function of colour: 1x1 conv, 4 classes."""
    inputs = keras.Input((*input_size, 3))
    conv = keras.layers.Conv2D(4, 1, name="score")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.array([[1, 0, 0, 0.4], [0, 1, 0, 0.4], [0, 0, 1, 0.4]], np.float32)[None, None]
    conv.set_weights([kernel, np.array([0, 0, 0, -0.1], np.float32)])
    model.save(path)
    return model, kernel[0, 0], np.array([0, 0, 0, -0.1], np.float32)


def _images(tmp_path, sizes):
    paths = []
    for i, (h, w) in enumerate(sizes):
        image, _ = kd.synth.render(1, i, (h, w))
        path = tmp_path / f"img{i}.png"  # PNG: the pixels read back exactly
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def _cli(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_predict_writes_palette_pngs_and_overlays_at_the_original_size(tmp_path, capsys):
    _, kernel, bias = colour_classifier(str(tmp_path / "colour.keras"))
    paths = _images(tmp_path, [(37, 50), (64, 29)])
    out = tmp_path / "pred"
    assert _cli(["predict", str(tmp_path / "colour.keras"), *paths, "--out", str(out), "--preprocessing", "unit"]) == 0
    assert "wrote 2 label maps" in capsys.readouterr().out
    for path in paths:
        image = np.asarray(Image.open(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (image.shape[1], image.shape[0])
            label = np.asarray(im)
            assert tuple(im.getpalette()[3:6]) == (128, 0, 0)  # the VOC colour map
        expected = np.argmax(image.astype(np.float32) / 255.0 @ kernel + bias, axis=-1)
        np.testing.assert_array_equal(label, expected)
        assert len(np.unique(label)) >= 3  # a real test of the indices, not all one class
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        np.testing.assert_array_equal(overlay, kd.overlay(image, label))
    assert sorted(os.listdir(out)) == ["img0.png", "img0_overlay.png", "img1.png", "img1_overlay.png"]


def test_fixed_input_models_predict_resized_and_map_back(tmp_path):
    colour_classifier(str(tmp_path / "fixed.keras"), input_size=(16, 16))
    paths = _images(tmp_path, [(40, 56)])
    out = tmp_path / "pred"
    assert _cli(["predict", str(tmp_path / "fixed.keras"), paths[0], "--out", str(out), "--preprocessing", "unit"]) == 0
    with Image.open(out / "img0.png") as im:
        assert im.size == (56, 40) and im.mode == "P"


def test_predict_with_crf_and_a_registry_name_with_weights(tmp_path):
    model = kseg.build_model("deeplab_largefov", num_classes=5, width=0.125)
    model.save_weights(str(tmp_path / "dl.weights.h5"))
    paths = _images(tmp_path, [(33, 41)])
    out = tmp_path / "pred"
    argv = ["predict", "deeplab_largefov", "--weights", str(tmp_path / "dl.weights.h5"), "--num-classes", "5",
            "--option", "width=0.125", paths[0], "--out", str(out), "--crf", "w1=5,sigma_alpha=50"]
    assert _cli(argv) == 0
    inference = load_inference_model("deeplab_largefov", weights=str(tmp_path / "dl.weights.h5"), num_classes=5,
                                     options={"width": 0.125})
    assert inference.preprocessing.kind == "caffe"
    image = np.asarray(Image.open(paths[0]).convert("RGB"))
    probs = Predictor(inference.model, preprocessing=inference.preprocessing).probabilities(image)
    direct = np.asarray(model(kseg.get_spec("deeplab_largefov").preprocessing.apply(image[None].astype("float32"))))
    np.testing.assert_array_equal(probs.argmax(-1), direct[0].argmax(-1))
    expected = dense_crf(image, probs, w1=5, sigma_alpha=50).argmax(-1)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "img0.png")), expected)


def test_bad_input_fails_before_anything_is_written(tmp_path, capsys):
    colour_classifier(str(tmp_path / "colour.keras"))
    good = _images(tmp_path, [(20, 20)])[0]
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a picture")
    out = tmp_path / "pred"
    model = str(tmp_path / "colour.keras")
    assert _cli(["predict", model, good, str(bad), "--out", str(out), "--preprocessing", "unit"]) == 2
    assert "broken.jpg: not a readable image" in capsys.readouterr().err and not out.exists()
    # No recorded preprocessing: refused rather than guessed.
    assert _cli(["predict", model, good, "--out", str(out)]) == 2
    assert "pass --preprocessing" in capsys.readouterr().err
    assert _cli(["predict", model, str(tmp_path / "missing.png"), "--out", str(out), "--preprocessing", "unit"]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    os.makedirs(tmp_path / "other")
    twin = tmp_path / "other" / "img0.jpg"
    Image.open(good).convert("RGB").save(twin)
    assert _cli(["predict", model, good, str(twin), "--out", str(out), "--preprocessing", "unit"]) == 2
    assert "would both write img0.png" in capsys.readouterr().err
    assert _cli(["predict", model, good, "--out", str(out), "--preprocessing", "unit"]) == 0
    assert _cli(["predict", model, good, "--out", str(out), "--preprocessing", "unit"]) == 2
    assert "--force" in capsys.readouterr().err
    bad.unlink()
    assert _cli(["predict", model, str(tmp_path), "--out", str(out), "--preprocessing", "unit", "--force"]) == 0
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary files left


def test_training_writes_the_samples_grid(run):
    out, result = run
    assert result["samples"] == str(out / "samples.png")
    with Image.open(out / "samples.png") as im:
        # 2 validation images -> 2 rows of image / ground truth / prediction at 80 dpi.
        assert im.format == "PNG" and im.size[0] == 9 * 80 and im.size[1] == 2 * 3 * 80


def test_samples_grid_is_skipped_with_a_note_without_matplotlib(run, synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    val = kd.synthetic(synth, "val", batch_size=1, preprocessing="deeplab_largefov")
    assert plot_samples(run[1]["model"], val, str(tmp_path / "s.png"), preprocessing="deeplab_largefov") is None
    assert "matplotlib is not installed" in capsys.readouterr().err and not (tmp_path / "s.png").exists()


def test_evaluate_with_crf_prints_the_table_and_both_scores(run, synth, capsys):
    out, _ = run
    model = str(out / "final.keras")
    assert _cli(["evaluate", model, "--data", synth, "--layout", "synthetic"]) == 0
    plain = json.loads((out / "final_val_scores.json").read_text())
    capsys.readouterr()
    assert _cli(["evaluate", model, "--data", synth, "--layout", "synthetic", "--crf"]) == 0
    printed = capsys.readouterr().out
    assert "mean_iou" in printed and "circle" in printed and "without CRF" in printed
    assert "dense CRF: iterations=10,w1=4,sigma_alpha=121,sigma_beta=5,w2=3,sigma_gamma=3" in printed
    scores = json.loads((out / "final_val_crf_scores.json").read_text())
    assert scores["images"] == 2 and scores["crf"].startswith("iterations=10")
    # The network's own scores on the CRF path match plain evaluation.
    assert scores["before_crf"]["mean_iou"] == pytest.approx(plain["mean_iou"], abs=1e-6)
    assert 0 <= scores["mean_iou"] <= 1 and len(scores["per_class"]) == 5


def test_crf_search_prints_the_table_and_the_best_setting(run, synth, capsys):
    out, _ = run
    argv = ["crf-search", str(out / "final.keras"), "--data", synth, "--layout", "synthetic", "--images", "2",
            "--w1", "4:5", "--sigma-alpha", "50,121", "--sigma-beta", "3"]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "no CRF" in printed and "best: --crf iterations=10,w1=" in printed
    result = json.loads((out / "final_val_crf_search.json").read_text())
    assert result["images"] == 2 and len(result["results"]) == 4
    ious = [r["mean_iou"] for r in result["results"]]
    assert ious == sorted(ious, reverse=True) and result["best"] == result["results"][0]
    assert {(r["params"]["w1"], r["params"]["sigma_alpha"]) for r in result["results"]} == {(4, 50), (4, 121), (5, 50),
                                                                                            (5, 121)}
    bad = ["crf-search", str(out / "final.keras"), "--data", synth, "--layout", "synthetic", "--base", "gamma=2"]
    assert _cli(bad) == 2 and "bad CRF setting 'gamma=2'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_preprocessing_comes_from_conversion_metadata(tmp_path, suffix):
    from kseg import identity as md

    model = kseg.build_model("deeplab_largefov", num_classes=3, width=0.125)
    path = str(tmp_path / f"m{suffix}")
    model.save(path)
    (md.write_keras if suffix == ".keras" else md.write_h5)(path, md.build_metadata(model))
    inference = load_inference_model(path)
    assert inference.preprocessing.kind == "caffe"  # DeepLab's, from the file alone
    assert inference.num_classes == 3
