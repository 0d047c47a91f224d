"""Detection readers: PASCAL VOC XML and COCO JSON -> padded xyxy boxes, bad files named, the checker,
and the synthetic detection set written by `kseg data synth --task detection`."""

import argparse
import os
import warnings

import data_fixtures as fx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import kseg.data as kd
from kseg.data.cli import add_parser
from kseg.data.detection import voc_detection_splits
from kseg.data.synth import render_detection


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return fx.write_voc_detection(tmp_path_factory.mktemp("vocdet"))


@pytest.fixture(scope="module")
def bad_voc(tmp_path_factory):
    data = fx.write_voc_detection(tmp_path_factory.mktemp("badvocdet"))
    data["expected"] = fx.plant_voc_detection_problems(data["root"])
    return data


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return fx.write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthdet") / "shapes"
    assert _cli(["data", "synth", str(root), "--task", "detection", "--train", "16", "--val", "4", "--size", "48x64",
                 "--seed", "3"]) == 0
    return root


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _expected(objects, use_difficult=True):
    """VOC_DET_OBJECTS rows -> (continuous xyxy boxes, class ids, difficult) as the reader must give them."""
    rows = [o for o in objects if use_difficult or not o[5]]
    boxes = np.array([(x1 - 1, y1 - 1, x2, y2) for _, x1, y1, x2, y2, _, _ in rows], np.float32).reshape(-1, 4)
    return boxes, np.array([kd.VOC_CLASSES.index(o[0]) for o in rows], np.int32), np.array([o[5] for o in rows], bool)


def _elements(ds):
    return [(x.numpy(), {k: v.numpy() for k, v in t.items()}) for x, t in ds]


# === PASCAL VOC ===

def test_voc_boxes_are_continuous_corners_of_the_1_based_inclusive_pixels(voc):
    source = kd.list_voc_detection(voc["root"], "trainval")
    # (xmin - 1, ymin - 1, xmax, ymax): the whole-image box is (0, 0, W, H); a 1-pixel-wide box has width 1.
    assert source.boxes[0][0].tolist() == [0, 0, 56, 40]
    assert source.boxes[1][1].tolist() == [19, 19, 20, 25]
    ds = kd.voc_detection(voc["root"], "trainval", max_boxes=5)
    assert ds.class_names == list(kd.VOC_CLASSES) and ds.num_classes == 21 and ds.class_names[15] == "person"
    items = _elements(ds)
    assert len(items) == 4
    for name, size, objects, (image, target) in zip(voc["names"], fx.VOC_DET_SIZES, fx.VOC_DET_OBJECTS, items):
        boxes, classes, difficult = _expected(objects)
        n = len(classes)
        assert image.dtype == np.float32 and image.shape == (*size, 3)
        decoded = tf.io.decode_jpeg(tf.io.read_file(os.path.join(voc["root"], "JPEGImages", name + ".jpg")),
                                    dct_method="INTEGER_FAST").numpy()
        assert np.array_equal(image, decoded)
        assert target["boxes"].dtype == np.float32 and target["boxes"].shape == (5, 4)
        assert target["classes"].dtype == np.int32 and target["difficult"].dtype == bool
        assert np.array_equal(target["boxes"][:n], boxes) and np.array_equal(target["classes"][:n], classes)
        assert np.array_equal(target["difficult"][:n], difficult)
        # padding: -1 boxes and classes, not difficult
        assert (target["boxes"][n:] == -1).all() and (target["classes"][n:] == -1).all()
        assert not target["difficult"][n:].any()
        assert target["image_shape"].tolist() == list(size) and target["image_shape"].dtype == np.int32


def test_use_difficult_false_drops_difficult_objects(voc):
    items = _elements(kd.voc_detection(voc["root"], "trainval", use_difficult=False, max_boxes=4))
    for objects, (_, target) in zip(fx.VOC_DET_OBJECTS, items):
        boxes, classes, _ = _expected(objects, use_difficult=False)
        kept = target["classes"] >= 0
        assert np.array_equal(target["classes"][kept], classes) and np.array_equal(target["boxes"][kept], boxes)
        assert not target["difficult"].any()
    assert (items[2][1]["classes"] == -1).all()  # only a difficult object: no boxes left, still an element
    # max_boxes counts the objects kept: 3 objects, 1 difficult, fit max_boxes=2 only without difficult ones
    with pytest.raises(ValueError, match="3 objects but max_boxes=2: pass a larger max_boxes"):
        kd.voc_detection(voc["root"], "train", max_boxes=2)
    assert len(list(kd.voc_detection(voc["root"], "train", max_boxes=2, use_difficult=False))) == 2


def test_resize_scales_boxes_per_axis_and_batches_with_preprocessing(voc):
    raw = _elements(kd.voc_detection(voc["root"], "trainval"))
    ds = kd.voc_detection(voc["root"], "trainval", size=(30, 20), batch_size=4, preprocessing="caffe")
    images, target = next(iter(ds))
    assert images.shape == (4, 30, 20, 3) and target["boxes"].shape == (4, 100, 4)
    assert target["classes"].shape == (4, 100) and target["image_shape"].shape == (4, 2)
    for i, (_, original) in enumerate(raw):
        h, w = original["image_shape"]
        n = int((original["classes"] >= 0).sum())
        scale = np.array([20 / w, 30 / h, 20 / w, 30 / h], np.float32)
        assert np.allclose(target["boxes"][i, :n].numpy(), original["boxes"][:n] * scale, atol=1e-4)
        assert (target["boxes"][i, n:].numpy() == -1).all()
        assert target["image_shape"][i].numpy().tolist() == [h, w]
    # the image is resized by the same rule: a resize of the decoded file, then Caffe's BGR - mean
    first = tf.image.resize(raw[0][0], (30, 20)).numpy()
    assert np.allclose(images[0].numpy(), first[..., ::-1] - [103.939, 116.779, 123.68], atol=1e-3)
    with pytest.raises(ValueError, match="size="):
        kd.voc_detection(voc["root"], "trainval", batch_size=2)
    assert next(iter(kd.voc_detection(voc["root"], "trainval", batch_size=1)))[1]["boxes"].shape == (1, 100, 4)


def test_splits_leave_out_per_class_lists_and_class_names_add_the_background(voc, tmp_path):
    assert voc_detection_splits(voc["root"]) == ["train", "trainval", "val"]
    assert voc_detection_splits(os.path.dirname(voc["root"])) == ["train", "trainval", "val"]  # VOCdevkit/
    with pytest.raises(ValueError, match="one image id per line"):
        kd.voc_detection(voc["root"], "dog_train")
    names = ("aeroplane", "bicycle", "car", "dog", "horse", "person", "pottedplant", "tvmonitor")
    ds = kd.voc_detection(voc["root"], "train", class_names=names)
    assert ds.class_names == ["background", *names] and ds.num_classes == 9
    assert _elements(ds)[0][1]["classes"][:2].tolist() == [4, 6]  # dog, person
    with pytest.raises(FileNotFoundError, match="Annotations"):
        kd.voc_detection(tmp_path)


def test_every_bad_file_fails_the_reader_naming_the_file(bad_voc, tmp_path):
    for path, phrase in bad_voc["expected"].items():
        name = os.path.splitext(os.path.basename(path))[0]
        (tmp_path / "one.txt").write_text(name + "\n")
        with pytest.raises((ValueError, FileNotFoundError, tf.errors.InvalidArgumentError)) as info:
            list(kd.voc_detection(bad_voc["root"], str(tmp_path / "one.txt")))
        assert path in str(info.value) and phrase in str(info.value), (path, str(info.value)[:400])
    # listing problems raise when the reader is made; a decoded size that differs, when it is read
    (tmp_path / "one.txt").write_text("bad_size_mismatch\n")
    ds = kd.voc_detection(bad_voc["root"], str(tmp_path / "one.txt"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image is 32x40 .HxW. but its annotation .*says 30x40"):
        list(ds)
    (tmp_path / "one.txt").write_text("bad_missing_image\n")
    with pytest.raises(FileNotFoundError, match="bad_missing_image.jpg: listed but missing"):
        kd.voc_detection(bad_voc["root"], str(tmp_path / "one.txt"))


def test_skip_bad_skips_logs_and_warns_for_every_bad_file(bad_voc):
    log = kd.SkipLog()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = kd.voc_detection(bad_voc["root"], "trainval", skip_bad=log)
        kept = _elements(ds)
    assert len(kept) == 4 and ds.skipped is log
    assert {p for p, _ in log} == set(bad_voc["expected"])
    for path, reason in log:
        assert bad_voc["expected"][path] in reason, (path, reason)
    assert sum("skipped bad file" in str(w.message) for w in caught) == len(bad_voc["expected"])
    assert [t["image_shape"].tolist() for _, t in kept] == [list(s) for s in fx.VOC_DET_SIZES]
    # with max_boxes raised, the 101-object image is read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = kd.voc_detection(bad_voc["root"], "bad", max_boxes=101, skip_bad=True)
        [(_, target)] = [e for e in _elements(big) if (e[1]["classes"] >= 0).sum() == 101]
    assert (target["classes"] == kd.VOC_CLASSES.index("cat")).all()


# === COCO ===

def test_coco_boxes_classes_crowd_and_degenerate_boxes(coco):
    with pytest.warns(UserWarning, match=r"1 annotation\(s\) dropped: .*annotation 5: bbox .* zero width or height"):
        ds = kd.coco_detection(coco["images"], coco["annotations"], max_boxes=4)
    assert ds.num_classes == 19 and len(ds.class_names) == 19
    assert (ds.class_names[0], ds.class_names[1], ds.class_names[3], ds.class_names[18]) == (
        "background", "person", "car", "dog")
    assert ds.class_names[2] == "N/A"
    items = _elements(ds)
    # sorted by image id: 7 (b.jpg), 13 (c.jpg), 42 (a.jpg)
    assert [t["image_shape"].tolist() for _, t in items] == [[48, 40], [36, 36], [40, 56]]
    b, c, a = (t for _, t in items)
    # b: a car, the zero-height car dropped, a car 0.4 px past the right edge clamped to the image
    assert b["classes"].tolist() == [3, 3, -1, -1]
    assert np.allclose(b["boxes"][:2], [[5, 6, 15, 16], [30, 20, 40, 28]])
    assert (c["classes"] == -1).all() and (c["boxes"] == -1).all()  # no annotations: kept, no boxes
    # a: (x, y, x + w, y + h); the crowd region is dropped
    assert a["classes"].tolist() == [1, 18, -1, -1] and not a["difficult"].any()
    assert np.allclose(a["boxes"][:2], [[10.5, 5.0, 30.5, 35.25], [0, 0, 56, 40]])
    with pytest.raises(ValueError, match="annotation 5: bbox .* zero width or height"):
        kd.coco_detection(coco["images"], coco["annotations"], degenerate="error")
    with pytest.warns(UserWarning, match="dropped"):
        batched = kd.coco_detection(coco["images"], coco["annotations"], size=(32, 32), batch_size=3,
                                    shuffle=True, seed=0)
    assert next(iter(batched))[1]["boxes"].shape == (3, 100, 4)


def test_coco_bad_entries_are_named_and_skippable(tmp_path):
    coco = fx.write_coco(tmp_path)
    expected = fx.plant_coco_problems(coco)
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kd.coco_detection(coco["images"], coco["annotations"])
    for path, phrase in expected.items():
        if "says" not in phrase:  # the size mismatch is found when the image is decoded
            assert f"{path}: " in str(info.value) and phrase in str(info.value), (path, str(info.value))
    log = kd.SkipLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = list(kd.coco_detection(coco["images"], coco["annotations"], skip_bad=log))
    assert len(kept) == 3
    assert {p for p, _ in log} == set(expected)
    for path, reason in log:
        assert expected[path] in reason, (path, reason)
    report = kd.check_dataset(coco["images"], "coco", annotations=coco["annotations"])
    assert not report.ok and {p for p, _ in report.errors} == set(expected)
    assert any("zero width or height" in w for _, w in report.warnings)


# === ordering and the synthetic set ===

def test_seeded_shuffle_is_reproducible(synth):
    def order(seed, epochs=1):
        ds = kd.voc_detection(synth, "train", shuffle=True, seed=seed)
        return [tuple(t["boxes"][0].numpy().tolist()) for _ in range(epochs) for _, t in ds]

    first = order(3, epochs=2)
    assert first == order(3, epochs=2)
    assert first[:16] != first[16:]  # a new order each epoch
    assert first[:16] != order(4) and sorted(first[:16]) == sorted(order(4))
    plain = [tuple(t["boxes"][0].numpy().tolist()) for _, t in kd.voc_detection(synth, "train")]
    assert sorted(plain) == sorted(first[:16])


def test_synthetic_detection_set_round_trip(synth, tmp_path):
    names = (synth / "classes.txt").read_text().split()
    assert names == list(kd.SYNTH_CLASSES)
    train = (synth / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert len(train) == 16 and len((synth / "ImageSets" / "Main" / "val.txt").read_text().split()) == 4
    with Image.open(synth / "JPEGImages" / (train[0] + ".jpg")) as im:
        assert im.size == (64, 48) and im.mode == "RGB"
    ds = kd.voc_detection(synth, "trainval", max_boxes=4)
    assert ds.class_names == list(kd.SYNTH_CLASSES)
    counts = []
    for index, (image, target) in enumerate(_elements(ds)):
        real = target["classes"] >= 0
        boxes = target["boxes"][real]
        counts.append(int(real.sum()))
        assert real.sum() >= 1 and set(target["classes"][real]) <= {1, 2, 3, 4}
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 48).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()  # at least MIN_BOX pixels a side
        # the XML holds render_detection's boxes exactly (written 1-based, read back as corners)
        _, objects = render_detection(3, index, (48, 64))
        assert np.array_equal(boxes, np.array([b for _, b, _ in objects], np.float32))
        assert target["classes"][real].tolist() == [c for c, _, _ in objects]
    assert max(counts) > 1
    # byte-identical for the same seed
    kd.make_synthetic(tmp_path / "again", task="detection", train=16, val=4, size=(48, 64), seed=3)
    for sub in ("Annotations", "JPEGImages"):
        for name in os.listdir(synth / sub):
            assert (synth / sub / name).read_bytes() == (tmp_path / "again" / sub / name).read_bytes()


# === the checker ===

def test_checker_reports_box_statistics_and_exit_codes(voc, bad_voc, coco, synth, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    report = kd.check_dataset(voc["root"], "voc-det", split="trainval")
    assert report.ok and report.checked == 4
    person, car = kd.VOC_CLASSES.index("person"), kd.VOC_CLASSES.index("car")
    assert report.boxes[car] == 2 and report.difficult[person] == 1 and sum(report.difficult.values()) == 3
    assert report.boxes_per_image == {2: 1, 3: 2, 1: 1}
    assert _cli(["data", "check", voc["root"], "--layout", "voc-det"]) == 0
    out = capsys.readouterr().out
    for text in ("split train", "split val", "split trainval", "no errors in 3 splits", "boxes per class",
                 "boxes per image", "tvmonitor", "difficult boxes", "3 (33.3%)", "images listed"):
        assert text in out, text
    assert "dog_train" not in out
    assert _cli(["data", "check", bad_voc["root"], "--layout", "voc-det", "--split", "bad", "--max-shown", "100"]) == 1
    out = capsys.readouterr().out
    for path, phrase in bad_voc["expected"].items():
        assert path in out, path
    assert f"{len(bad_voc['expected'])} errors" in out
    # a larger --max-boxes passes the 101-object image
    report = kd.check_dataset(bad_voc["root"], "voc-det", split="bad", max_boxes=101)
    assert os.path.join(bad_voc["root"], "Annotations", "bad_too_many.xml") not in report.error_files()
    assert _cli(["data", "check", coco["images"], "--layout", "coco", "--annotations", coco["annotations"]]) == 0
    out = capsys.readouterr().out
    assert "dog" in out and "N/A" not in out and "zero width or height" in out
    with pytest.raises(ValueError, match="--annotations"):
        _cli(["data", "check", coco["images"], "--layout", "coco"])
    assert _cli(["data", "check", str(synth), "--layout", "voc-det", "--split", "trainval"]) == 0
    assert "circle" in capsys.readouterr().out
