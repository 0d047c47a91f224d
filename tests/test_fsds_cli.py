"""FSDS (skeletons) end to end from the command line: `kseg data synth --task skeleton`, `kseg train --recipe
fsds_sklarge` on the SK-LARGE layout, `kseg evaluate` (the skeleton benchmark's table and JSON), `kseg predict`
(skeleton maps) and `kseg data check --layout skeleton` (the .mat ground truth).

The data: 3 + 2 synthetic images of 64x80 (kseg.data.synth, task="skeleton"); FSDS trains one epoch of
batch 1 from scratch in the test process (the commands run through kseg.cli.main: one TensorFlow import).
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

import kseg.data as kd
from kseg.cli import main
from kseg.tasks.skeleton import PROTOCOL, ScaleBalancedCrossEntropy
from kseg.train import load_recipe
from kseg.train.inputs import TrainingSetupError, datasets

TINY = ["--epochs", "1", "--set", "data.val_split=val"]  # the synthetic set's splits are train and val


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("skeletons"))
    assert main(["data", "synth", root, "--task", "skeleton", "--train", "3", "--val", "2", "--size", "64x80"]) == 0
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsds_run"))
    code = main(["train", "--recipe", "fsds_sklarge", "--data", data, "--out", out, *TINY])
    return code, out


# === the recipe ===


def test_the_recipe_is_the_released_solver_on_the_skeleton_layout():
    from kseg.train.fit import make_loss

    r = load_recipe("fsds_sklarge")
    assert (r.model, r.backbone_init, r.data["layout"]) == ("fsds", "imagenet", "skeleton")
    assert (r.data["train_split"], r.data["val_split"], r.data["flip"]) == ("train", "test", True)
    o = r.optimizer
    assert (o["name"], o["learning_rate"], o["momentum"], o["weight_decay"]) == ("sgd", 1e-7, 0.9, 2e-4)
    assert (r.schedule["kind"], r.schedule["step_size"], r.schedule["gamma"]) == ("step", 30000, 0.1)
    assert (r.training["batch_size"], r.training["iterations"]) == (1, 150000)
    # The released net's lr_mult: conv5 100 (bias 200), score-dsn 0.01 (0.02), cat2-score 0.01, the other fusion
    # convs 0.05 (biases 0.002), every other bias 2; the first matching pattern wins.
    assert list(o["lr_multipliers"].items())[:5] == [("block5_conv*/kernel", 100), ("block5_conv*/bias", 200),
                                                     ("score_dsn*/kernel", 0.01), ("score_dsn*/bias", 0.02),
                                                     ("cat2_score/kernel", 0.01)]
    # One scale-balanced softmax loss per output (dsn2..dsn5, fuse), the paper's weights, summed over the pixels.
    losses = make_loss(r)
    assert len(losses) == 5 and all(isinstance(loss, ScaleBalancedCrossEntropy) for loss in losses)
    assert {(loss.balance, loss.normalize) for loss in losses} == {("paper", False)}


def test_skeleton_datasets_and_what_they_refuse(data, tmp_path):
    recipe = load_recipe("fsds_sklarge", {"data.val_split": "val", "training.batch_size": 2})
    train, val = datasets(recipe, data)
    x, y = next(iter(train))
    assert x.shape == (2, 64, 80, 3) and y.shape == (2, 64, 80, 1) and float(y.numpy().max()) >= 1  # radii
    assert next(iter(val))[0].shape == (1, 64, 80, 3)
    with pytest.raises(TrainingSetupError, match=r"\[data\] crop: the skeleton reader keeps every image"):
        datasets(load_recipe("fsds_sklarge", {"data.crop": [32, 32]}), data)
    with pytest.raises(TrainingSetupError, match="cannot read skeleton data.*images/test"):
        datasets(load_recipe("fsds_sklarge"), data)  # the synthetic set has no test split
    # SK-LARGE's images differ in size: a batch of several is refused before training, naming the fix.
    mixed = str(tmp_path / "mixed")
    shutil.copytree(data, mixed)
    Image.new("RGB", (40, 32)).save(os.path.join(mixed, "images", "train", "synth_00000.jpg"))
    savemat(os.path.join(mixed, "groundTruth", "train", "synth_00000.mat"),
            {"symmetry": np.zeros((32, 40), np.uint8), "edge": np.zeros((32, 40), np.uint8)})
    with pytest.raises(TrainingSetupError, match="batch_size 2 needs images of one size.*training.batch_size=1"):
        datasets(recipe, mixed)


# === kseg train, evaluate, predict ===


def test_train_writes_a_checkpoint(run):
    code, out = run
    assert code == 0
    assert {"best.keras", "final.keras", "log.csv", "kseg_run.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "log.csv")) as f:
        header = f.readline().strip().split(",")
    assert {"loss", "val_loss", "dsn2_loss", "dsn5_loss", "fuse_loss", "val_fuse_loss"} <= set(header)
    with open(os.path.join(out, "kseg_run.json")) as f:
        assert json.load(f)["recipe_values"]["data"]["layout"] == "skeleton"


def test_evaluate_prints_the_skeleton_benchmark_and_json(run, data, capsys):
    _, out = run
    model = os.path.join(out, "best.keras")
    assert main(["evaluate", model, "--data", data]) == 0  # the run's layout: skeleton; --split val
    text = capsys.readouterr().out
    title = " ".join(text.split())  # rich wraps the title to the table's width
    assert f"best.keras on {data} (val, 2 images): {PROTOCOL} (fuse map)" in title
    assert "no NMS" in PROTOCOL and "thinning" in PROTOCOL and "maxDist 0.0075" in PROTOCOL
    assert re.search(r"ODS\s.*\d\.\d{4}\s.*\d\.\d{3}", text) and re.search(r"OIS\s.*\d\.\d{4}", text)
    assert main(["evaluate", model, "--data", data, "--layout", "skeleton", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert (scores["images"], scores["output"], scores["protocol"]) == (2, "fuse", PROTOCOL)
    assert 0 <= scores["f"] == scores["ods"] <= 1 and scores["ois"] >= scores["ods"] - 1e-9
    assert main(["evaluate", model, "--data", data, "--layout", "voc"]) != 0
    assert "--layout skeleton or edges" in capsys.readouterr().err


def test_predict_writes_skeleton_maps(run, data, tmp_path, capsys):
    _, out = run
    images = [os.path.join(data, "images", "val", n) for n in ("synth_00003.jpg", "synth_00004.jpg")]
    assert main(["predict", os.path.join(out, "best.keras"), *images, "--out", str(tmp_path)]) == 0
    assert "wrote 2 skeleton maps (STEM.png, skeleton probability x 255, the fuse map)" in capsys.readouterr().out
    for name in ("synth_00003.png", "synth_00004.png"):
        png = np.asarray(Image.open(tmp_path / name))
        assert png.shape == (64, 80) and png.dtype == np.uint8


# === kseg data check ===


def test_data_check_reads_the_mat_files(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps long paths at the terminal width
    assert main(["data", "check", data, "--layout", "skeleton"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"│\s+1 │ skeleton\s+│\s+[1-9]", text) and "no errors in 2 splits" in text  # train and val
    bad = str(tmp_path / "bad")
    shutil.copytree(data, bad)
    truncated = os.path.join(bad, "groundTruth", "train", "synth_00001.mat")
    with open(truncated, "rb") as f:
        head = f.read(100)
    with open(truncated, "wb") as f:
        f.write(head)
    small = os.path.join(bad, "groundTruth", "val", "synth_00003.mat")
    savemat(small, {"symmetry": np.zeros((32, 40), np.uint8), "edge": np.zeros((32, 40), np.uint8)})
    assert main(["data", "check", bad, "--layout", "skeleton"]) == 1
    text = capsys.readouterr().out
    assert re.search(re.escape(truncated) + r"\s+│ not a readable MATLAB \.mat file", text)
    assert f"image is 64x80 (HxW) but its label {small} is 32x40" in text
    report = kd.check_dataset(bad, "skeleton", split="train")
    assert report.error_files() == {truncated} and report.class_names == ("background", "skeleton")
    assert kd.sk_large is kd.skeleton.sk_large and kd.skeleton_splits(bad) == ["train", "val"]
