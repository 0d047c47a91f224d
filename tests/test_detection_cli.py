"""Detectors from the command line: `kseg evaluate` (VOC mAP, COCO AP) and `kseg predict` (detections.json and
the images with their boxes drawn).

Fixtures: a seeded ssd300 with random weights (its class kernels scaled so that a few detections per image
score over 0.3) saved as .keras without a kseg_run.json (the task comes from the file's identity), and a VOC
layout set whose ground truth is, in part, the model's own best detections, so its mAP is neither 0 nor 1.
"""

import json
import os

import data_fixtures as fx
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import kseg
import kseg.data as kd
from kseg.cli import main
from kseg.data.palette import VOC_CLASSES
from kseg.detection.eval_voc import voc_eval
from kseg.identity import identify
from kseg.images import read_image
from kseg.inference import cli as inference_cli
from kseg.inference import files
from kseg.inference.plots import class_colour
from kseg.inference.scoring import score_detections
from kseg.models.ssd import SOURCES
from kseg.tasks import get_task

NET = (300, 300)
SIZES = ((120, 160), (90, 90), (150, 100))  # (H, W): three aspect ratios, scaled per axis to 300x300


@pytest.fixture(scope="module")
def ssd(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = kseg.build_model("ssd300")
    for name in SOURCES:  # 10 to 13 detections of 3 classes score >= 0.3 on noise images
        layer = model.get_layer(f"{name}_mbox_conf")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 0.7, bias])
    path = str(tmp_path_factory.mktemp("ssd") / "ssd.keras")
    model.save(path)
    return model, path


def _detect(model, images):
    """The decoder's detections of a batch of raw 0..255 images at the network size, as NumPy."""
    out = kseg.inference_model(model)(identify(model).preprocessing.apply(images))
    return {k: np.asarray(v) for k, v in out.items()}


def _write_annotations(voc, names, objects):
    for name, size, objs in zip(names, SIZES, objects):
        with open(os.path.join(voc, "Annotations", name + ".xml"), "w") as f:
            f.write(fx.voc_xml(name + ".jpg", size, objs))


@pytest.fixture(scope="module")
def voc(ssd, tmp_path_factory):
    """VOC2007 layout, split "test": per image the model's two best detections (VOC's 1-based integer
    corners, rounded), a sheep no detection finds and a difficult object."""
    model, _ = ssd
    voc = str(tmp_path_factory.mktemp("voc") / "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub))
    rng = np.random.default_rng(0)
    names = [f"{i + 1:06d}" for i in range(len(SIZES))]
    for name, (h, w) in zip(names, SIZES):
        fx.save_jpeg(os.path.join(voc, "JPEGImages", name + ".jpg"), fx.image_array(rng, h, w))
    with open(os.path.join(voc, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    # The images as the reader decodes and resizes them, then the model's detections on them.
    _write_annotations(voc, names, [(("sheep", 1, 1, 5, 5, 0, 0),)] * len(names))
    images = np.concatenate([x for x, _ in kd.voc_detection(voc, "test", size=NET, batch_size=1)])
    found = _detect(model, images)
    objects = []
    for i, (h, w) in enumerate(SIZES):
        objs = []
        for box, cls in zip(found["detection_boxes"][i][:2], found["detection_classes"][i][:2]):
            x1, y1, x2, y2 = box * np.array([w, h, w, h]) / np.array([*NET[::-1], *NET[::-1]])
            xmin, ymin = int(round(x1)) + 1, int(round(y1)) + 1
            objs.append((VOC_CLASSES[cls], xmin, ymin, max(int(round(x2)), xmin), max(int(round(y2)), ymin), 0, 0))
        objs += [("sheep", 1, 1, w // 3, h // 3, 0, 0), ("cow", w // 2, h // 2, w, h, 1, 0)]
        objects.append(objs)
    _write_annotations(voc, names, objects)
    return voc


def _images(voc):
    return sorted(os.path.join(voc, "JPEGImages", n) for n in os.listdir(os.path.join(voc, "JPEGImages")))


# === kseg evaluate ===


def test_evaluate_prints_voc_and_coco_ap_and_matches_voc_eval(ssd, voc, capsys):
    model, path = ssd
    assert main(["evaluate", path, "--data", voc, "--split", "test"]) == 0  # layout: the task's first
    table = capsys.readouterr().out
    for text in ("AP VOC07 %", "sheep", "mAP", "AP@[.5:.95]", "AP50", "AP75", "images"):
        assert text in table
    written = os.path.splitext(path)[0] + "_test_scores.json"
    assert main(["evaluate", path, "--data", voc, "--split", "test", "--layout", "voc_detection", "--json"]) == 0
    out = capsys.readouterr()
    scores = json.loads(out.out)
    assert f"scores written to {written}" in out.err
    with open(written) as f:
        assert json.load(f) == scores
    assert {"map_voc07", "map_voc", "coco", "per_class", "count"} <= set(scores)
    assert scores["count"] == scores["images"] == len(SIZES)
    assert [r["name"] for r in scores["per_class"]] == list(VOC_CLASSES[1:])
    assert [r["class"] for r in scores["per_class"]] == list(range(1, 21))
    rows = {r["name"]: r for r in scores["per_class"]}
    assert rows["sheep"]["gt"] == 3 and rows["sheep"]["ap_voc"] == 0.0  # found by no detection
    assert rows["cow"]["gt"] == 0 and rows["cow"]["ap_voc"] is None  # difficult only: no AP
    assert 0 < scores["map_voc"] < 1 and 0 < scores["map_voc07"] < 1
    assert {"ap", "ap50", "ap75"} <= set(scores["coco"])
    assert all(-1 <= v <= 1 for v in scores["coco"].values()) and 0 < scores["coco"]["ap50"] < 1

    # The oracle: the same detections computed directly, scored by kseg.detection.eval_voc in the
    # network's frame (the command scores in the original pixels: IoU does not change).
    dets, gts = [], []
    for x, y in kd.voc_detection(voc, "test", size=NET, batch_size=2):
        found = _detect(model, x.numpy())
        for i in range(len(x)):
            dets.append({k: v[i] for k, v in found.items()})
            gts.append({k: np.asarray(y[k][i]) for k in ("boxes", "classes", "difficult")})
    for metric, key in ((True, "ap_voc07"), (False, "ap_voc")):
        direct = voc_eval(dets, gts, 21, use_07_metric=metric, plus_one=False)
        assert scores[f"map_{key[3:]}"] == pytest.approx(direct["map"], abs=1e-9)
        assert [r[key] for r in scores["per_class"]] == pytest.approx(direct["ap"][1:], abs=1e-9)
        assert [r["detections"] for r in scores["per_class"]] == direct["detections"][1:]


def test_a_perfect_detector_scores_one(voc):
    """score_detections (evaluate's loop) with the ground truth as the detections: mAP 1, COCO AP 1."""
    ds = kd.voc_detection(voc, "test", size=NET, batch_size=2)
    truth = {}
    for x, y in ds:
        for i in range(len(x)):
            truth[x[i].numpy().tobytes()] = (y["boxes"][i].numpy(), y["classes"][i].numpy())

    def detect(images):
        boxes, classes = zip(*(truth[im.numpy().tobytes()] for im in images))
        classes = np.stack(classes)
        return {"detection_boxes": np.stack(boxes), "detection_classes": classes,
                "detection_scores": np.where(classes >= 0, 0.9, 0.0), "num_detections": (classes >= 0).sum(1)}

    evaluator = get_task("detection").evaluator(21, None, list(VOC_CLASSES))
    scores = score_detections(detect, ds, evaluator, NET, progress=False)
    assert scores["images"] == scores["count"] == len(SIZES)
    assert scores["map_voc07"] == pytest.approx(1.0) and scores["map_voc"] == pytest.approx(1.0)
    assert scores["coco"]["ap"] == pytest.approx(1.0) and scores["coco"]["ap75"] == pytest.approx(1.0)


def test_evaluate_reads_the_coco_layout(ssd, tmp_path, capsys):
    _, path = ssd
    coco = fx.write_coco(str(tmp_path))
    out = str(tmp_path / "coco_scores.json")
    assert main(["evaluate", path, "--data", coco["images"], "--layout", "coco_detection"]) == 2
    assert "--annotations" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="annotation"):  # the fixture's zero-height box is dropped
        assert main(["evaluate", path, "--data", coco["images"], "--layout", "coco_detection",
                     "--annotations", coco["annotations"], "--json", out]) == 0
    with open(out) as f:
        scores = json.load(f)
    assert scores["count"] == 3
    named = {r["name"]: r["gt"] for r in scores["per_class"] if r["gt"]}
    assert named == {"person": 1, "car": 2, "dog": 1}  # COCO's category ids 1, 3, 18 as class ids
    assert main(["evaluate", path, "--data", coco["images"], "--annotations", coco["annotations"]]) == 2
    assert "--annotations goes with --layout coco_detection" in capsys.readouterr().err


# === kseg predict ===


def test_predict_writes_detections_and_drawings_in_the_original_pixels(ssd, voc, tmp_path, capsys):
    model, path = ssd
    images = _images(voc)
    out = tmp_path / "pred"
    assert main(["predict", path, *images, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "detections scoring >= 0.3" in printed and "000001.jpg" in printed
    assert inference_cli.SCORE_THRESHOLD == files.SCORE_THRESHOLD == 0.3  # the help's default is the writer's
    assert sorted(os.listdir(out)) == ["000001.png", "000002.png", "000003.png", "detections.json"]
    with open(out / "detections.json") as f:
        entries = json.load(f)
    assert [e["file"] for e in entries] == images
    total = 0
    for entry, (h, w) in zip(entries, SIZES):
        assert entry["size"] == [h, w]
        image = read_image(entry["file"])
        # The oracle: the decoder on the image resized per axis, its boxes scaled back.
        resized = tf.image.resize(image[None].astype("float32"), NET, method="bilinear").numpy()
        found = {k: v[0] for k, v in _detect(model, resized).items()}
        keep = found["detection_scores"][: int(found["num_detections"])] >= 0.3
        assert len(entry["detections"]) == int(keep.sum())
        total += len(entry["detections"])
        expected = found["detection_boxes"][: len(keep)][keep] * np.array([w, h, w, h]) / 300.0
        for d, box, cls in zip(entry["detections"], expected, found["detection_classes"][: len(keep)][keep]):
            assert d["score"] >= 0.3 and d["class"] == cls and d["name"] == VOC_CLASSES[cls]
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            np.testing.assert_allclose(d["box"], box, atol=0.01)
        drawing = np.asarray(Image.open(out / (os.path.basename(entry["file"])[:-4] + ".png")).convert("RGB"))
        assert drawing.shape == (h, w, 3)
        for d in entry["detections"]:  # each class's colour is drawn where the image has none of it
            colour = np.array(class_colour(d["class"]))
            assert (drawing == colour).all(-1).sum() > 0 and (image == colour).all(-1).sum() == 0
        if not entry["detections"]:
            np.testing.assert_array_equal(drawing, image)
    assert total > 0


def test_predict_keeps_its_outputs_without_force(ssd, voc, tmp_path, capsys):
    _, path = ssd
    images = _images(voc)[:2]
    out = tmp_path / "pred"
    assert main(["predict", path, *images, "--out", str(out), "--score-threshold", "0.2"]) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    capsys.readouterr()
    assert main(["predict", path, *images, "--out", str(out), "--score-threshold", "0.35"]) == 2
    err = capsys.readouterr().err
    assert "exist already" in err and "--force" in err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # nothing touched
    assert main(["predict", path, *images, "--out", str(out), "--score-threshold", "0.35", "--force"]) == 0
    assert sorted(os.listdir(out)) == sorted(before)  # replaced in place, no temporary files left
    with open(out / "detections.json") as f:
        entries = json.load(f)
    low = json.loads(before["detections.json"])
    assert all(d["score"] >= 0.35 for e in entries for d in e["detections"])
    assert sum(len(e["detections"]) for e in entries) < sum(len(e["detections"]) for e in low)
    # Options that mean nothing to a detector are refused before anything is written.
    for extra, phrase in ((["--crf"], "dense CRF"), (["--size", "200x200"], "drop --size"),
                          (["--score-threshold", "1.5"], "in [0, 1]")):
        assert main(["predict", path, images[0], "--out", str(tmp_path / "x"), *extra]) == 2
        assert phrase in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
