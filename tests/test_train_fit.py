"""kseg.train end to end: tiny trainings, bad input, kill-and-resume, the CLI parser, DeepLab's width option."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

import kseg
import kseg.data as kd
from kseg.cli import build_parser
from kseg.inference import evaluate
from kseg.train import TrainingSetupError, train

TINY = textwrap.dedent("""
    model = "deeplab_largefov"
    [model_options]
    num_classes = {num_classes}
    width = 0.125
    [data]
    layout = "synthetic"
    crop = [32, 32]
    flip = true
    [optimizer]
    name = "adam"
    learning_rate = 1e-3
    [training]
    batch_size = 4
    epochs = {epochs}
    [loss]
    name = "sparse_cross_entropy"
""")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    kd.make_synthetic(root, seed=0, train=8, val=2, size=32)
    return str(root)


def _recipe(tmp_path, epochs=1, num_classes=5):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(epochs=epochs, num_classes=num_classes))
    return str(path)


def test_train_writes_checkpoints_logs_and_scores(synth, tmp_path):
    out = tmp_path / "run"
    result = train(_recipe(tmp_path, epochs=2), synth, str(out), verbose=0, gif=2)  # kseg train --gif 2
    assert len(result["history"]["loss"]) == 2 and 0 <= result["val_mean_iou"] <= 1
    for name in ("best.keras", "final.keras", "log.csv", "kseg_run.json"):
        assert (out / name).exists(), name
    with Image.open(out / "predictions.gif") as gif:  # a frame per epoch (its drawing: test_segnet_tutorial.py)
        assert gif.n_frames == 2
    assert not (out / "backup").exists()  # BackupAndRestore removes it once fit completes
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and "val_mean_iou" in rows[0]
    scores = evaluate(result["model"], kd.synthetic(synth, "val", batch_size=1, preprocessing="deeplab_largefov"),
                      progress=False)
    assert scores["images"] == 2 and len(scores["per_class"]) == 5
    assert scores["mean_iou"] == pytest.approx(result["val_mean_iou"], abs=1e-5)
    assert [r["class"] for r in scores["per_class"]] == list(kd.SYNTH_CLASSES)


def test_class_count_mismatch_is_refused_before_training(synth, tmp_path):
    with pytest.raises(TrainingSetupError, match="the dataset has 5 classes .* model outputs 3"):
        train(_recipe(tmp_path, num_classes=3), synth, str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run" / "log.csv").exists()


def test_empty_dataset_is_refused(tmp_path):
    root = tmp_path / "empty"
    kd.make_synthetic(root, seed=0, train=2, val=1, size=32)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    with pytest.raises((TrainingSetupError, ValueError), match="(?i)empty|no image"):
        train(_recipe(tmp_path), str(root), str(tmp_path / "run"), verbose=0)


def test_a_file_the_decoder_rejects_is_named(tmp_path):
    from data_fixtures import corrupt_huffman_table

    root = tmp_path / "data"
    kd.make_synthetic(root, seed=0, train=4, val=1, size=32)
    bad = root / "JPEGImages" / "synth_00002.jpg"
    corrupt_huffman_table(bad)  # passes the byte checks, fails inside libjpeg with no file name
    with pytest.raises(TrainingSetupError, match="(?s)1 file.*cannot be decoded.*synth_00002.jpg"):
        train(_recipe(tmp_path), str(root), str(tmp_path / "run"), verbose=0)


def test_resume_directory_of_another_model_is_refused(synth, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "kseg_run.json").write_text(json.dumps({"model": "fcn8s", "model_kwargs": {"num_classes": 5}}))
    with pytest.raises(TrainingSetupError, match="holds a run of fcn8s"):
        train(_recipe(tmp_path), synth, str(out), verbose=0)


def test_cli_parser_maps_flags_to_overrides(tmp_path):
    args = build_parser().parse_args(["train", "--recipe", "synthetic_demo", "--data", "d", "--out", "o",
                                      "--epochs", "3", "--batch-size", "2", "--set", "model_options.width=0.5"])
    assert (args.recipe, args.epochs, args.batch_size, args.set) == \
           ("synthetic_demo", 3, 2, ["model_options.width=0.5"])
    assert args.func.__name__ == "cmd_train"
    bad = build_parser().parse_args(["train", "--recipe", "synthetic_demo", "--data", "d", "--out", str(tmp_path),
                                     "--set", "optimizer.momentun=0.9"])
    assert bad.func(bad) == 2  # a clear error, not a traceback


def test_cli_evaluate_prints_table_and_writes_json(synth, tmp_path, capsys):
    out = tmp_path / "run"
    train(_recipe(tmp_path), synth, str(out), verbose=0)
    args = build_parser().parse_args(["evaluate", str(out / "final.keras"), "--data", synth, "--layout", "synthetic"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "mean_iou" in printed and "circle" in printed
    scores = json.loads((out / "final_val_scores.json").read_text())
    assert scores["images"] == 2 and set(scores) >= {"mean_iou", "pixel_accuracy", "per_class", "confusion"}


RUN = textwrap.dedent("""
    import sys
    from kseg.cli import build_parser
    args = build_parser().parse_args(sys.argv[1:])
    sys.exit(args.func(args))
""")


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sigkill_then_rerun_resumes_from_the_next_epoch(synth, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    out = tmp_path / "run"
    cmd = [sys.executable, str(script), "train", "--recipe", _recipe(tmp_path, epochs=30), "--data", synth,
           "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while len(_rows(out / "log.csv")) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_rows(out / "log.csv"))
    assert 1 <= done_before < 30 and (out / "backup").exists()
    # The same command again, shortened so the test stays fast: the length is an override, not the model.
    cmd[cmd.index("--recipe") + 1] = _recipe(tmp_path, epochs=done_before + 2)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    epochs = [int(r["epoch"]) for r in _rows(out / "log.csv")]
    assert epochs == list(range(done_before + 2)), epochs  # resumed at the next epoch, none repeated
    assert (out / "final.keras").exists() and not (out / "backup").exists()


def test_deeplab_width_scales_filters_and_default_is_the_paper():
    full = kseg.build_model("deeplab_largefov")
    assert full.count_params() == 20_505_429
    small = kseg.build_model("deeplab_largefov", num_classes=5, width=0.25)
    assert small.get_layer("block1_conv1").filters == 16 and small.get_layer("block5_conv3").filters == 128
    assert small.get_layer("fc6").filters == 256 and small.get_layer("fc8").filters == 5
    assert kseg.build_model("deeplab_largefov", width=0.01).get_layer("block1_conv1").filters == 8  # min 8
    x = np.zeros((1, 33, 33, 3), np.float32)
    assert small(x).shape == (1, 33, 33, 5)
    with pytest.raises(ValueError, match="width must be"):
        kseg.build_model("deeplab_largefov", width=0)
