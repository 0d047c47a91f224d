"""Region proposals through the command line: `kseg data proposals` (Selective Search over a split, one .npz),
`kseg data synth --task detection --proposals`, and `kseg predict` / `kseg evaluate --proposals` for a
detector whose Keras model has a second input named "proposals" (kseg's fast_rcnn_vgg16 here, at width
0.125 with 24 proposal rows and the synthetic set's 5 classes; nothing in the code names the model).

The oracle for predictions is the Keras model with its decoder called directly: the image resized as
py-faster-rcnn's im_detect resizes it (an any-size detector to its test scale, by hand: EXPECTED; a
fixed-size one per axis), the image's boxes padded to the model's rows and multiplied by the same factors
(`_project_im_rois`), the detections divided by them. Detections compare as sets (kseg.detection.compare).
"""

import json
import os
import shutil

import data_fixtures as fx
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import detections_from_json
from PIL import Image

import kseg
import kseg.data as kd
from kseg.cli import main
from kseg.data.detection import voc_detection_ids
from kseg.data.proposals import read_stored_image
from kseg.data.synth import SYNTH_CLASSES, render_detection
from kseg.detection.compare import compare_detection_sets
from kseg.detection.eval_voc import voc_eval
from kseg.detection.precomputed import load_proposals, pad_proposals
from kseg.detection.selective_search import selective_search
from kseg.identity import identify

pytest.importorskip("cv2", reason="Selective Search needs opencv-contrib-python-headless (kseg[proposals])")

ROWS = 24  # the model's proposals input: (B, 24, 4); Selective Search finds 28-560 boxes on these images
SCALE = ["--min-size", "96", "--max-size", "160"]
# (H, W) -> (factor, resized (h, w)) at (96, 160), by hand: the shorter side to 96, the longer capped at 160.
EXPECTED = {(120, 180): (0.8, (96, 144)), (100, 300): (160 / 300, (53, 160)), (128, 128): (0.75, (96, 96))}
FIXED = (64, 96)  # the fixed-size variant's input (h, w)
DECODER_SCORE_THRESHOLD = 0.05  # FastRCNNDecoder's
HEAD_NMS = 0.3  # fast_rcnn_vgg16's decoder (py-faster-rcnn TEST.NMS)


def _build(seed, **options):
    """fast_rcnn_vgg16 at width 0.125, ROWS proposals, 5 classes, class biases spread so that its detections
    score well above the decoder's threshold (random heads give each class ~1/5)."""
    keras.utils.set_random_seed(seed)
    model = kseg.build_model("fast_rcnn_vgg16", width=0.125, num_proposals=ROWS, num_classes=len(SYNTH_CLASSES),
                             **options)
    kernel, bias = model.get_layer("cls_score").get_weights()
    model.get_layer("cls_score").set_weights([kernel, np.random.default_rng(seed).normal(0, 1.5, bias.shape)])
    return model


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory):
    model = _build(4)
    path = str(tmp_path_factory.mktemp("frcnn") / "frcnn.keras")
    model.save(path)
    yield model, path
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """`kseg data synth --task detection --proposals`: 3 train and 4 val images, 128x128, with both files."""
    root = str(tmp_path_factory.mktemp("synth") / "shapes")
    assert main(["data", "synth", root, "--task", "detection", "--train", "3", "--val", "4", "--proposals"]) == 0
    return root


def _direct(model, image, boxes, network_hw=None):
    """The oracle: the decoder's detections on the resized image and scaled padded proposals, in the image's
    pixels. network_hw: a fixed-size model's input (per-axis factors), else EXPECTED's test scale."""
    h, w = image.shape[:2]
    if network_hw is None:
        factor, size = EXPECTED[(h, w)]
        factors = (factor, factor)
    else:
        size = network_hw
        factors = (size[1] / w, size[0] / h)
    rows, _ = pad_proposals(boxes, ROWS, truncate=True, scale=factors)
    x = tf.image.resize(image[None].astype(np.float32), size, method="bilinear")
    out = kseg.inference_model(model)([identify(model).preprocessing.apply(x), tf.constant(rows[None])])
    out = {k: np.asarray(v) for k, v in out.items()}
    out["detection_boxes"] = np.clip(out["detection_boxes"].astype(np.float64) / np.tile(factors, 2), 0,
                                     [w, h, w, h])
    return out


def _sets_agree(want, got, box_atol, score_atol=2e-5):
    found = compare_detection_sets(want, got, score_atol=score_atol, box_atol=box_atol,
                                   score_threshold=DECODER_SCORE_THRESHOLD, iou_threshold=HEAD_NMS)
    assert found.passed, found.unmatched[:5]
    return found.matched


def _photos(folder):
    """Two PNGs (lossless: predict reads what was drawn) of two sizes and aspect ratios, and their boxes."""
    files, boxes = [], {}
    for i, size in enumerate(((120, 180), (100, 300))):
        image, _ = render_detection(7, i, size)
        path = os.path.join(folder, f"photo{i}.png")
        Image.fromarray(image).save(path)
        files.append(path)
        boxes[f"photo{i}"] = selective_search(image)
    return files, boxes


# --------------------------------------------------------------------------- kseg data proposals / synth


def test_synth_writes_both_split_files(synth):
    with open(os.path.join(synth, "synth.json")) as f:
        assert json.load(f)["proposals"] == {"train": "selective_search_train.npz", "val": "selective_search_val.npz"}
    for split in ("train", "val"):
        found = load_proposals(os.path.join(synth, f"selective_search_{split}.npz"))
        ids = voc_detection_ids(synth, split)
        assert sorted(found) == sorted(ids)
        for image_id in ids:  # the defaults (fast mode, 2000 boxes, min_size 20, seed 0) on the stored pixels
            image = read_stored_image(os.path.join(synth, "JPEGImages", image_id + ".jpg"))
            assert np.array_equal(found[image_id], selective_search(image))


def test_data_proposals_writes_one_entry_per_image(synth, tmp_path, capsys):
    out = str(tmp_path / "ss_val.npz")
    assert main(["data", "proposals", synth, "--split", "val", "--out", out, "--max-boxes", "30"]) == 0
    assert "proposals of 4 images" in capsys.readouterr().out
    found = load_proposals(out)
    assert list(found) == voc_detection_ids(synth, "val")  # the split's order
    for image_id, boxes in found.items():
        image = read_stored_image(os.path.join(synth, "JPEGImages", image_id + ".jpg"))
        assert boxes.dtype == np.float32 and 0 < len(boxes) <= 30
        assert np.array_equal(boxes, selective_search(image, max_boxes=30))
    # An existing output is kept without --force; bad usage is one line.
    before = os.path.getmtime(out)
    assert main(["data", "proposals", synth, "--split", "val", "--out", out]) == 2
    assert "--force" in capsys.readouterr().err and os.path.getmtime(out) == before
    for extra, phrase in ((["--split", "val", "--out", str(tmp_path / "x.json")], ".npz"),
                          (["--out", str(tmp_path / "x.npz")], "split"),
                          (["--split", "val", "--out", str(tmp_path / "x.npz"), "--max-boxes", "0"], "--max-boxes")):
        assert main(["data", "proposals", synth, *extra]) == 2
        assert phrase in capsys.readouterr().err
    # COCO: the images of the annotations file, keyed by file stem as the readers key them.
    names = [n + ".jpg" for n in voc_detection_ids(synth, "train")]
    coco = {"images": [{"id": 10 + i, "file_name": n, "width": 128, "height": 128} for i, n in enumerate(names)],
            "annotations": [], "categories": [{"id": 1, "name": "circle"}]}
    with open(tmp_path / "instances.json", "w") as f:
        json.dump(coco, f)
    out = str(tmp_path / "coco.npz")
    images = os.path.join(synth, "JPEGImages")
    assert main(["data", "proposals", images, "--layout", "coco", "--annotations", str(tmp_path / "instances.json"),
                 "--out", out, "--max-boxes", "5"]) == 0
    assert list(load_proposals(out)) == [n[:-4] for n in names]
    assert main(["data", "proposals", images, "--layout", "coco", "--split", "val", "--out", out, "--force",
                 "--annotations", str(tmp_path / "instances.json")]) == 2
    assert "split" in capsys.readouterr().err


def test_an_unreadable_image_leaves_no_file(synth, tmp_path, capsys):
    """The last image of the split is not an image: the error names it, no output and no temporary file appear,
    and an output already there (with --force) is left as it was: never half-written."""
    root = str(tmp_path / "copy")
    shutil.copytree(synth, root)
    bad = os.path.join(root, "JPEGImages", voc_detection_ids(root, "val")[-1] + ".jpg")
    with open(bad, "wb") as f:
        f.write(b"not a JPEG")
    out = os.path.join(root, "ss.npz")
    assert main(["data", "proposals", root, "--split", "val", "--out", out]) == 2
    assert bad in capsys.readouterr().err
    assert not os.path.exists(out) and not [n for n in os.listdir(root) if n.endswith(".tmp")]
    with open(out, "wb") as f:
        f.write(b"the previous run's file")
    assert main(["data", "proposals", root, "--split", "val", "--out", out, "--force"]) == 2
    with open(out, "rb") as f:
        assert f.read() == b"the previous run's file"
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


# --------------------------------------------------------------------------- kseg predict


def test_predict_with_a_proposals_file(frcnn, tmp_path, capsys):
    model, path = frcnn
    files, boxes = _photos(str(tmp_path))
    proposals = str(tmp_path / "photos.json")
    with open(proposals, "w") as f:
        json.dump({k: v.tolist() for k, v in boxes.items()}, f)
    out = tmp_path / "pred"
    assert main(["predict", path, *files, "--out", str(out), "--score-threshold", "0", "--proposals", proposals,
                 *SCALE]) == 0
    assert "detections scoring >= 0" in capsys.readouterr().out
    with open(out / "detections.json") as f:
        entries = json.load(f)
    matched = 0
    for entry, stem in zip(entries, boxes):
        image = np.asarray(Image.open(entry["file"]))
        assert entry["proposals"] == min(ROWS, len(boxes[stem]))
        want = _direct(model, image, boxes[stem])
        dets = entry["detections"]
        assert len(dets) > 5
        matched += _sets_agree(want, detections_from_json(dets, want["detection_scores"].shape[1]), box_atol=0.02)
        assert (out / f"{stem}.png").is_file()
    assert matched > 10
    # --proposals selective-search: the same boxes, computed on the fly (these photos are under 500 pixels).
    assert main(["predict", path, *files, "--out", str(tmp_path / "ss"), "--score-threshold", "0",
                 "--proposals", "selective-search", *SCALE]) == 0
    with open(tmp_path / "ss" / "detections.json") as f:
        assert [e["detections"] for e in json.load(f)] == [e["detections"] for e in entries]


def test_a_fixed_size_detector(voc, tmp_path, capsys):
    """A fixed-input variant: each image and its boxes scaled per axis to 64x96, the detections back; in
    predict (the library's detect_images, proposals as a dict) and in evaluate (batches of the reader's
    resized images and proposals)."""
    from kseg.inference import detect_images, load_inference_model

    model = _build(6, input_shape=(*FIXED, 3))
    path = str(tmp_path / "fixed.keras")
    model.save(path)
    files, boxes = _photos(str(tmp_path))
    entries = detect_images(load_inference_model(path), files, str(tmp_path / "out"), score_threshold=0,
                            proposals=boxes, progress=False)
    matched = 0
    for entry, stem in zip(entries, boxes):
        want = _direct(model, np.asarray(Image.open(entry["file"])), boxes[stem], network_hw=FIXED)
        matched += _sets_agree(want, detections_from_json(entry["detections"], want["detection_scores"].shape[1]),
                               box_atol=0.02)
    assert matched > 10
    out = str(tmp_path / "scores.json")
    proposals = os.path.join(voc, "selective_search_val.npz")
    assert main(["evaluate", path, "--data", voc, "--split", "val", "--proposals", proposals, "--json", out]) == 0
    capsys.readouterr()
    with open(out) as f:
        scores = json.load(f)
    given = load_proposals(proposals)
    dets, gts = [], []
    for image_id, (x, y) in zip(voc_detection_ids(voc, "val"), kd.voc_detection(voc, "val", batch_size=1)):
        dets.append({k: v[0] for k, v in _direct(model, x[0].numpy(), given[image_id], network_hw=FIXED).items()})
        gts.append({k: np.asarray(y[k][0]) for k in ("boxes", "classes", "difficult")})
    direct = voc_eval(dets, gts, len(SYNTH_CLASSES), plus_one=False)
    assert scores["images"] == 4 and scores["map_voc"] == pytest.approx(direct["map"], abs=1e-6)
    assert [r["detections"] for r in scores["per_class"]] == direct["detections"][1:]


def test_predict_without_proposals_says_what_to_pass(frcnn, tmp_path, capsys):
    _, path = frcnn
    files, boxes = _photos(str(tmp_path))
    out = tmp_path / "pred"
    assert main(["predict", path, *files, "--out", str(out), *SCALE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--proposals" in err and "kseg data proposals" in err
    # A file lacking an image: the image and the file named, nothing written.
    partial = str(tmp_path / "partial.npz")
    np.savez(partial, photo0=boxes["photo0"])
    assert main(["predict", path, *files, "--out", str(out), "--proposals", partial, *SCALE]) == 2
    err = capsys.readouterr().err
    assert "'photo1'" in err and partial in err and files[1] in err
    assert not out.exists()
    # A model without a proposals input refuses them.
    lenet = str(tmp_path / "lenet.keras")
    kseg.build_model("lenet5").save(lenet)
    assert main(["predict", lenet, files[0], "--out", str(out), "--proposals", partial]) == 2
    assert "--proposals" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- kseg evaluate


@pytest.fixture(scope="module")
def voc(frcnn, synth, tmp_path_factory):
    """The synthetic val images in a VOC layout whose ground truth is, per image, the oracle's two best
    detections (VOC's 1-based integer corners) and a cross no detection finds; the synth's proposals file."""
    model, _ = frcnn
    root = str(tmp_path_factory.mktemp("voc") / "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub))
    ids = voc_detection_ids(synth, "val")
    shutil.copy(os.path.join(synth, "ImageSets", "Main", "val.txt"), os.path.join(root, "ImageSets", "Main"))
    shutil.copy(os.path.join(synth, "classes.txt"), root)
    shutil.copy(os.path.join(synth, "selective_search_val.npz"), root)
    boxes = load_proposals(os.path.join(root, "selective_search_val.npz"))
    for image_id in ids:
        shutil.copy(os.path.join(synth, "JPEGImages", image_id + ".jpg"), os.path.join(root, "JPEGImages"))
        image = read_stored_image(os.path.join(root, "JPEGImages", image_id + ".jpg"))
        found = _direct(model, image, boxes[image_id])
        objs = []
        for (x1, y1, x2, y2), cls in zip(found["detection_boxes"][0][:2], found["detection_classes"][0][:2]):
            xmin, ymin = int(round(x1)) + 1, int(round(y1)) + 1
            objs.append((SYNTH_CLASSES[cls], xmin, ymin, max(int(round(x2)), xmin), max(int(round(y2)), ymin), 0, 0))
        objs.append(("cross", 1, 1, 12, 12, 0, 0))
        with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
            f.write(fx.voc_xml(image_id + ".jpg", image.shape[:2], objs))
    return root


def test_evaluate_with_a_proposals_file(frcnn, voc, tmp_path, capsys):
    model, path = frcnn
    out = str(tmp_path / "scores.json")
    pattern = os.path.join(voc, "selective_search_{split}.npz")
    assert main(["evaluate", path, "--data", voc, "--split", "val", "--proposals", pattern, "--json", out,
                 *SCALE]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "AP@[.5:.95]" in printed
    with open(out) as f:
        scores = json.load(f)
    assert scores["images"] == scores["count"] == 4
    rows = {r["name"]: r for r in scores["per_class"]}
    assert rows["cross"]["gt"] >= 4
    assert 0 < scores["map_voc"] < 1 and 0 < scores["coco"]["ap50"] < 1
    # The oracle's detections against the same ground truth, scored by kseg.detection.eval_voc: the same APs.
    boxes = load_proposals(pattern.format(split="val"))
    dets, gts = [], []
    for image_id, (x, y) in zip(voc_detection_ids(voc, "val"), kd.voc_detection(voc, "val", batch_size=1)):
        dets.append({k: v[0] for k, v in _direct(model, x[0].numpy(), boxes[image_id]).items()})
        gts.append({k: np.asarray(y[k][0]) for k in ("boxes", "classes", "difficult")})
    for metric, key in ((True, "map_voc07"), (False, "map_voc")):
        direct = voc_eval(dets, gts, len(SYNTH_CLASSES), use_07_metric=metric, plus_one=False)
        assert scores[key] == pytest.approx(direct["map"], abs=1e-6)
        assert [r["detections"] for r in scores["per_class"]] == direct["detections"][1:]

    # A training run's directory: its recipe's [data] proposals, found in --data, is the default.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "best.keras")
    with open(run / "kseg_run.json", "w") as f:
        json.dump({"model": "fast_rcnn_vgg16", "class_names": list(SYNTH_CLASSES),
                   "model_kwargs": {"width": 0.125, "num_proposals": ROWS, "num_classes": len(SYNTH_CLASSES)},
                   "recipe_values": {"data": {"layout": "voc_detection",
                                              "proposals": "selective_search_{split}.npz"}}}, f)
    again = str(tmp_path / "again.json")
    assert main(["evaluate", str(run / "best.keras"), "--data", voc, "--split", "val", "--json", again, *SCALE]) == 0
    assert "the training recipe's [data] proposals" in capsys.readouterr().err
    with open(again) as f:
        assert json.load(f)["map_voc"] == scores["map_voc"]


def test_evaluate_refuses_missing_proposals(frcnn, voc, tmp_path, capsys):
    _, path = frcnn
    assert main(["evaluate", path, "--data", voc, "--split", "val", *SCALE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--proposals" in err and "kseg data proposals" in err
    ids = voc_detection_ids(voc, "val")
    full = load_proposals(os.path.join(voc, "selective_search_val.npz"))
    partial = str(tmp_path / "partial.npz")
    np.savez(partial, **{k: full[k] for k in ids[:-1]})
    assert main(["evaluate", path, "--data", voc, "--split", "val", "--proposals", partial, *SCALE]) == 2
    err = capsys.readouterr().err
    assert repr(ids[-1]) in err and partial in err
    assert main(["evaluate", path, "--data", voc, "--split", "val", "--proposals", "selective-search", *SCALE]) == 2
    assert "kseg data proposals" in capsys.readouterr().err
