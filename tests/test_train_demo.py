"""run_demo end to end at toy size (the full demo is measured by hand; see the README)."""

import json
import os

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_trains_evaluates_and_writes_predictions(tmp_path):
    from kseg.train.demo import run_demo

    summary = run_demo(str(tmp_path), budget_s=60, train_images=8, val_images=2, size=32, epochs=1, width=0.125,
                       predictions=2, verbose=0)
    assert summary["epochs_run"] == 1 and 0.0 <= summary["val_mean_iou"] <= 1.0
    assert len(summary["per_class"]) == 5
    pngs = sorted(os.listdir(summary["predictions"]))
    assert pngs == ["val_000.png", "val_001.png"]
    image = Image.open(os.path.join(summary["predictions"], pngs[0]))
    assert image.mode == "P" and image.size == (32, 32) and np.asarray(image).max() < 5
    assert json.loads((tmp_path / "summary.json").read_text())["val_mean_iou"] == summary["val_mean_iou"]
