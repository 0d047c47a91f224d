"""The training demo (kseg.demo.run_demo) at toy size, its time budget, and the width options.

The full demo (2,000 images, ~6 minutes on 2 idle cores, val mIoU >= 0.70) is the slow test at the end.
"""

import csv
import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

import kseg
from kseg.demo import TimeBudget, print_summary, run_demo

TOY = dict(train_images=8, val_images=2, size=32, epochs=1, width=0.125, predictions=2, verbose=0, progress=False)


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(str(out), **TOY)


def test_demo_writes_scores_predictions_and_plots(toy_demo):
    out, summary = toy_demo
    assert summary["epochs_run"] == 1 and summary["epochs_planned"] == 1 and not summary["stopped_by_budget"]
    assert 0.0 <= summary["val_mean_iou"] <= 1.0 and summary["seconds"] > 0
    assert [r["class"] for r in summary["per_class"]] == list(kseg.data.SYNTH_CLASSES)
    assert summary["model"] == "deeplab_largefov" and summary["model_options"]["width"] == 0.125
    assert json.loads((out / "summary.json").read_text())["val_mean_iou"] == summary["val_mean_iou"]
    assert (out / "run" / "final.keras").exists() and (out / "data" / "synth.json").exists()
    # Palette label maps at the images' size, class indices only, plus RGB overlays.
    pngs = sorted(os.listdir(summary["predictions"]))
    assert pngs == ["synth_00008.png", "synth_00008_overlay.png", "synth_00009.png", "synth_00009_overlay.png"]
    label = Image.open(os.path.join(summary["predictions"], pngs[0]))
    assert label.mode == "P" and label.size == (32, 32) and np.asarray(label).max() < 5
    assert Image.open(os.path.join(summary["predictions"], pngs[1])).mode == "RGB"
    # The grid: 2 rows of image | ground truth | prediction, 2-pixel gutters.
    assert Image.open(summary["grid"]).size == (3 * 32 + 4, 2 * 32 + 2)
    # The network + dense CRF scores and the verified ONNX export (the test extra has both).
    crf = summary["crf"]
    assert 0.0 <= crf["mean_iou"] <= 1.0 and [r["class"] for r in crf["per_class"]] == list(kseg.data.SYNTH_CLASSES)
    assert summary["onnx"]["verified"].startswith("PASS") and (out / "model.onnx").exists()
    pytest.importorskip("matplotlib")
    assert summary["curves"] and Image.open(summary["curves"]).size[0] > 100


def test_a_finished_run_is_cleared_and_an_interrupted_one_kept(tmp_path):
    from kseg.demo import _clear_finished_run

    run = tmp_path / "run"
    assert not _clear_finished_run(str(run))  # nothing there
    (run / "backup").mkdir(parents=True)
    (run / "log.csv").write_text("epoch,loss\n0,1.0\n")
    assert not _clear_finished_run(str(run)) and (run / "log.csv").exists()  # interrupted: resume it
    (run / "backup").rmdir()
    assert _clear_finished_run(str(run)) and not run.exists()  # finished: start over, no appended log


@pytest.mark.slow
def test_demo_again_reuses_the_data_and_starts_training_over_deterministically(tmp_path):
    first = run_demo(str(tmp_path), **TOY)
    with open(tmp_path / "run" / "log.csv") as f:
        first_log = list(csv.DictReader(f))
    second = run_demo(str(tmp_path), **TOY)
    assert first["data"]["made"] and not second["data"]["made"]
    with open(tmp_path / "run" / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert [r["epoch"] for r in log] == ["0"]  # replaced, not appended to
    # Same seed, same data: the same training, loss for loss.
    assert float(log[0]["loss"]) == pytest.approx(float(first_log[0]["loss"]), rel=1e-4)
    assert second["val_mean_iou"] == pytest.approx(first["val_mean_iou"], abs=1e-4)


def test_demo_data_is_remade_when_its_parameters_change(tmp_path):
    from kseg.demo import _make_data

    data = tmp_path / "data"
    assert _make_data(str(data), seed=0, train_images=2, val_images=1, size=32)
    assert not _make_data(str(data), seed=0, train_images=2, val_images=1, size=32)  # reused
    assert _make_data(str(data), seed=0, train_images=2, val_images=1, size=33)
    assert json.loads((data / "synth.json").read_text())["size"] == [33, 33]
    assert Image.open(data / "JPEGImages" / "synth_00000.jpg").size == (33, 33)


def test_print_summary_shows_the_table_and_the_score(toy_demo):
    from rich.console import Console

    _, summary = toy_demo
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = console.export_text()
    for name in kseg.data.SYNTH_CLASSES:
        assert name in text
    assert f"val mIoU {summary['val_mean_iou']:.3f} ({summary['crf']['mean_iou']:.3f} with the dense CRF)" in text
    assert "load average" in text and "IoU + CRF" in text and "ONNX export" in text and "PASS" in text


def test_demo_refuses_an_empty_split(tmp_path):
    with pytest.raises(ValueError, match="at least one training and one validation image"):
        run_demo(str(tmp_path), **{**TOY, "val_images": 0})
    assert not (tmp_path / "data").exists()


def test_time_budget_stops_after_the_epoch_that_would_overrun():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32")
    budget = TimeBudget(0.0)
    history = model.fit(x, y, epochs=5, verbose=0, callbacks=[budget])
    assert len(history.history["loss"]) == 1 and budget.stopped
    generous = TimeBudget(3600.0)
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[generous])
    assert len(history.history["loss"]) == 3 and not generous.stopped


# --- width / batch_norm / dropout options of the VGG-based segmentation builders ---


@pytest.mark.parametrize("name, layer, full", [("fcn8s", "fc6", 4096), ("fcn32s", "block5_conv3", 512),
                                               ("segnet", "decoder1_conv1", 64), ("segnet_basic", "block1_conv1", 64)])
def test_width_scales_filters_and_keeps_the_geometry(name, layer, full):
    model = kseg.build_model(name, num_classes=3, width=0.125)
    assert model.get_layer(layer).filters == max(8, round(full * 0.125))
    x = np.zeros((1, 40, 48, 3), np.float32)
    assert model(x).shape == (1, 40, 48, 3)
    with pytest.raises(ValueError, match="width must be a channel multiplier"):
        kseg.build_model(name, width=1.5)
    keras.backend.clear_session()


def test_deeplab_batch_norm_and_dropout_options():
    model = kseg.build_model("deeplab_largefov", num_classes=5, width=0.125, batch_norm=True, dropout=0.0)
    names = {layer.name for layer in model.layers}
    assert {"block1_conv1_bn", "block1_conv1_relu", "block5_conv3_bn", "fc6_bn", "fc7_relu"} <= names
    assert model.get_layer("block1_conv1").activation.__name__ == "linear"
    assert model.get_layer("drop6").rate == 0.0 and "fc8_bn" not in names
    plain = kseg.build_model("deeplab_largefov", num_classes=5, width=0.125)
    assert not any(n.endswith("_bn") for n in (layer.name for layer in plain.layers))
    assert plain.get_layer("drop7").rate == 0.5  # the paper's
    with pytest.raises(ValueError, match="dropout must be"):
        kseg.build_model("deeplab_largefov", dropout=1.0)
    with pytest.raises(ValueError, match="batch_norm must be"):
        kseg.build_model("deeplab_largefov", batch_norm="yes")
    keras.backend.clear_session()


@pytest.mark.slow
def test_full_demo_meets_its_targets(tmp_path):
    """The README's figures: val mIoU >= 0.70 in under 10 minutes on this 2-core machine."""
    summary = run_demo(str(tmp_path), verbose=0, progress=False)
    print(json.dumps({k: summary[k] for k in ("val_mean_iou", "seconds", "train_seconds", "epochs_run",
                                              "load_average")}))
    assert summary["seconds"] < 600
    assert summary["val_mean_iou"] >= 0.70, summary["per_class"]
