"""Training detectors: the box datasets of `kseg train` (targets, augmentation), compile and fit with
MultiBoxLoss, the recipes, ssd300's width option and `kseg demo --task detection`.

Fixtures: a hand-written VOC detection set of one known box per image, and kseg's synthetic shapes
(kseg.data.make_synthetic_detection) at a few images.
"""

import csv
import json
import os
import re

import data_fixtures as fx
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import kseg
import kseg.data as kd
from kseg.api import remember_identity
from kseg.cli import main
from kseg.detection.boxes import SSD_WEIGHTS, decode
from kseg.identity import of_file
from kseg.train import TrainingSetupError, load_recipe
from kseg.train.fit import check_setup, compile_segmentation, datasets
from kseg.train.inputs import (
    DetectionAugment,
    augment_detection,
    detection_augment,
    model_anchors,
    window_to_size,
)
from kseg.train.recipes import RECIPE_DIR

DEMO = "synthetic_detection_demo"
# A 120x100 (WxH) image with one square: continuous corners (30, 20, 78, 68), VOC's bndbox 31 21 78 68.
KNOWN_SIZE = (100, 120)
KNOWN_BOX = (30.0, 20.0, 78.0, 68.0)
SQUARE = 3  # its class id in kseg.data.SYNTH_CLASSES (classes.txt)


def _recipe(**values):
    return load_recipe(DEMO, {"data.flip": False, "training.batch_size": 2, **values})


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A VOC detection set of 3 images (train and val alike), each one red square at KNOWN_BOX on grey."""
    root = str(tmp_path_factory.mktemp("known"))
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub))
    h, w = KNOWN_SIZE
    x1, y1, x2, y2 = (int(v) for v in KNOWN_BOX)
    names = ["a", "b", "c"]
    for name in names:
        image = np.full((h, w, 3), 128, np.uint8)
        image[y1:y2, x1:x2] = (220, 30, 30)
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=98)
        with open(os.path.join(root, "Annotations", name + ".xml"), "wb") as f:
            f.write(kd.synth.voc_annotation(name + ".jpg", (h, w), [(SQUARE, KNOWN_BOX, False)]))
    for split in ("train", "val"):
        with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in kd.SYNTH_CLASSES))
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    kd.make_synthetic_detection(root, seed=0, train=4, val=2, size=(64, 64))
    return root


@pytest.fixture(scope="module")
def small_ssd():
    model = kseg.build_model("ssd300", num_classes=5, width=0.125)
    yield model
    keras.backend.clear_session()


# === datasets ===


def _decoded_positives(y, anchors):
    labels = np.asarray(y["mbox_conf"])
    loc = np.asarray(y["mbox_loc"])
    positive = labels > 0
    assert np.array_equal(loc[..., 4], labels)  # the loc targets carry the anchor's label
    boxes = np.asarray(decode(loc[positive][:, :4], anchors[positive], SSD_WEIGHTS))
    return labels[positive], boxes


def test_targets_of_a_known_box_decode_back_to_it(known):
    recipe = _recipe()
    (h, w), anchors = model_anchors(recipe)
    assert (h, w) == (300, 300) and anchors.shape == (8732, 4)
    np.testing.assert_array_equal(anchors, kseg.get_spec("ssd300").postprocess({}).anchors)
    train, val = datasets(recipe, known)
    assert val.class_names == list(kd.SYNTH_CLASSES) and train.num_classes == 5
    images, y = next(iter(val))
    assert images.shape == (2, 300, 300, 3) and y["mbox_loc"].shape == (2, 8732, 5)
    assert y["mbox_conf"].shape == (2, 8732) and y["mbox_conf"].dtype == tf.int32
    # The box in the network's 300x300 input: x scaled by 300 / 120, y by 300 / 100.
    expected = np.array(KNOWN_BOX) * [300 / 120, 3, 300 / 120, 3]
    for i in range(2):
        labels, boxes = _decoded_positives({k: v[i] for k, v in y.items()}, anchors)
        assert len(labels) >= 1 and set(labels) == {SQUARE}
        np.testing.assert_allclose(boxes, np.broadcast_to(expected, boxes.shape), atol=1e-3)
    # No augmentation asked for: the training set is the same images, shuffled.
    x_train, y_train = next(iter(train))
    np.testing.assert_allclose(np.asarray(x_train[0]), np.asarray(images[0]), atol=1e-3)
    np.testing.assert_array_equal(y_train["mbox_conf"][0], y["mbox_conf"][0])


def test_flip_mirrors_image_and_boxes_and_is_seeded(known):
    recipe = _recipe(**{"data.flip": True})
    (h, w), anchors = model_anchors(recipe)
    _, val = datasets(recipe, known)
    plain = np.asarray(next(iter(val))[0][0])
    expected = np.array(KNOWN_BOX) * [300 / 120, 3, 300 / 120, 3]
    flipped_box = [w - expected[2], expected[1], w - expected[0], expected[3]]
    seen = set()
    for seed in range(2):
        train, _ = datasets(recipe, known, seed=seed)
        first = [(np.asarray(x), {k: np.asarray(v) for k, v in y.items()}) for x, y in train]
        again = [(np.asarray(x), {k: np.asarray(v) for k, v in y.items()}) for x, y in
                 datasets(recipe, known, seed=seed)[0]]
        for (x, y), (x2, y2) in zip(first, again):  # the same seed: the same flips
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y["mbox_loc"], y2["mbox_loc"])
        for x, y in first:
            for i in range(len(x)):
                labels, boxes = _decoded_positives({k: v[i] for k, v in y.items()}, anchors)
                flipped = abs(boxes[0, 0] - flipped_box[0]) < 1e-2
                seen.add(flipped)
                np.testing.assert_allclose(boxes[0], flipped_box if flipped else expected, atol=1e-3)
                np.testing.assert_allclose(x[i], plain[:, ::-1] if flipped else plain, atol=1e-3)
    assert seen == {True, False}


def test_flip_of_boxes_is_w_minus_x():
    image = tf.random.uniform([40, 60, 3], 0, 255, seed=1)
    boxes = tf.constant([[5.0, 6.0, 25.0, 30.0], [-1, -1, -1, -1]])
    classes = tf.constant([2, -1])
    aug = DetectionAugment(flip=True)
    results = [augment_detection(image, boxes, classes, tf.constant([s, 0], tf.int64), aug, (40, 60), (0, 0, 0))
               for s in range(8)]
    flips = 0
    for out, b, c in results:
        np.testing.assert_array_equal(c, [2, -1])
        np.testing.assert_array_equal(b[1], [-1, -1, -1, -1])
        if np.allclose(b[0], [60 - 25, 6, 60 - 5, 30]):
            flips += 1
            np.testing.assert_array_equal(out, image[:, ::-1])
        else:
            np.testing.assert_array_equal(b[0], boxes[0])
            np.testing.assert_array_equal(out, image)
    assert 0 < flips < 8


def test_whole_window_is_tf_image_resize():
    image = tf.random.uniform([37, 53, 3], 0, 255, seed=2)
    out = window_to_size(image, tf.constant([0.0, 0.0, 53.0, 37.0]), (80, 64))
    np.testing.assert_allclose(out, tf.image.resize(image, (80, 64)), atol=5e-3)  # float32 rounding
    flipped = window_to_size(image, tf.constant([0.0, 0.0, 53.0, 37.0]), (80, 64), flip=True)
    np.testing.assert_allclose(flipped, tf.image.resize(image, (80, 64))[:, ::-1], atol=5e-3)


def test_ssd_augmentation_keeps_boxes_on_their_objects():
    # A grey image with a red and a blue rectangle: after photometric distortion, zoom out, the
    # min-IoU crop and flip, every kept box still frames its own colour.
    h, w = 90, 120
    image = np.full((h, w, 3), 128.0, np.float32)
    image[10:50, 20:70] = (255, 0, 0)
    image[55:85, 80:110] = (0, 0, 255)
    boxes = tf.constant([[20.0, 10.0, 70.0, 50.0], [80.0, 55.0, 110.0, 85.0], [-1, -1, -1, -1]])
    classes = tf.constant([1, 2, -1])
    aug = DetectionAugment(photometric=False, zoom_out=4.0, iou_crop=True, flip=True)
    assert detection_augment({"flip": True, "zoom_out": 4.0, "iou_crop": True}) == aug
    assert detection_augment({}) is None
    kept = set()
    augment = tf.function(lambda seed: augment_detection(tf.constant(image), boxes, classes, seed, aug, (64, 64),
                                                         (128.0, 128.0, 128.0)))  # as tf.data runs it: a graph
    for s in range(24):
        out, b, c = (np.asarray(v) for v in augment(tf.constant([s, 7], tf.int64)))
        assert out.shape == (64, 64, 3) and (c >= 0).any()
        for box, cls in zip(b, c):
            if cls < 0:
                assert (box == -1).all()
                continue
            kept.add(int(cls))
            assert (box >= 0).all() and (box <= 64).all() and box[2] > box[0] and box[3] > box[1]
            x1, y1, x2, y2 = np.round(box).astype(int)
            inner = out[y1 + 1:y2 - 1, x1 + 1:x2 - 1]
            if inner.size:
                colour = inner.reshape(-1, 3).mean(0)
                assert colour[0 if cls == 1 else 2] > 200 and colour[1] < 40, (s, cls, box, colour)
    assert kept == {1, 2}
    photo = augment_detection(tf.constant(image), boxes, classes, tf.constant([3, 1], tf.int64),
                              DetectionAugment(photometric=True, flip=False), (90, 120), (0, 0, 0))[0]
    assert 0 <= np.min(photo) and np.max(photo) <= 255


def test_coco_layout_reads_the_2017_release_folders(tmp_path):
    coco = fx.write_coco(str(tmp_path))
    recipe = load_recipe(DEMO, {"data.layout": "coco_detection", "data.train_split": "val2017",
                                "data.val_split": "val2017", "model_options.num_classes": 19,
                                "data.flip": False, "training.batch_size": 3})
    with pytest.warns(UserWarning, match="dropped"):  # write_coco's zero-height box
        train, val = datasets(recipe, coco["root"])
    x, y = next(iter(val))
    assert x.shape == (3, 300, 300, 3) and set(np.unique(y["mbox_conf"])) == {0, 1, 3, 18}
    assert train.num_classes == 19
    with pytest.raises(TrainingSetupError, match="cannot read coco_detection"):
        datasets(recipe, str(tmp_path / "none"))


def test_check_setup_reads_the_class_labels_of_dict_targets(small_ssd, tmp_path):
    x = tf.zeros([1, 300, 300, 3])
    good = {"mbox_loc": tf.zeros([1, 8732, 5]), "mbox_conf": tf.fill([1, 8732], 4)}
    ds = tf.data.Dataset.from_tensors((x, good))
    info = {"model": "ssd300", "model_kwargs": {}}
    check_setup(small_ssd, ds, ds, str(tmp_path), info, task=kseg.get_spec("ssd300").task_object)
    bad = tf.data.Dataset.from_tensors((x, {**good, "mbox_conf": tf.fill([1, 8732], 7)}))
    with pytest.raises(TrainingSetupError, match="label 7 but the model outputs 5 classes"):
        check_setup(small_ssd, bad, ds, str(tmp_path), info, task=kseg.get_spec("ssd300").task_object)
    empty = ds.take(0)
    with pytest.raises(TrainingSetupError, match="training dataset is empty"):
        check_setup(small_ssd, empty, ds, str(tmp_path), info, task=kseg.get_spec("ssd300").task_object)


# === compile and fit ===


def test_multibox_loss_goes_down_on_a_fixed_batch(shapes):
    recipe = load_recipe(DEMO, {"data.flip": False, "training.batch_size": 4})
    train, _ = datasets(recipe, shapes)
    images, y = next(iter(train))
    keras.utils.set_random_seed(0)
    model = kseg.build_model("ssd300", num_classes=5, width=0.125)
    fit_model = compile_segmentation(model, recipe, steps_per_epoch=1, total_steps=100)
    assert type(fit_model.loss).__name__ == "MultiBoxLoss"  # the task's loss, for both outputs
    losses = [fit_model.train_on_batch(images, y, return_dict=True) for _ in range(12)]
    assert {"loss", "mbox_loc_loss", "mbox_conf_loss"} == set(losses[0])  # no metrics
    totals = [float(step["loss"]) for step in losses]
    assert totals[-1] < 0.7 * totals[0], totals


def test_kseg_train_writes_checkpoints_and_both_loss_columns(shapes, tmp_path):
    out = str(tmp_path / "run")
    code = main(["train", "--recipe", DEMO, "--data", shapes, "--out", out, "--epochs", "1",
                 "--set", "training.batch_size=2"])
    assert code == 0
    assert {"best.keras", "final.keras", "kseg_run.json", "log.csv"} <= set(os.listdir(out))
    assert "samples.png" not in os.listdir(out)  # plot_samples draws class and edge maps, not boxes
    with open(os.path.join(out, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    assert {"loss", "mbox_loc_loss", "mbox_conf_loss", "val_loss", "val_mbox_loc_loss", "val_mbox_conf_loss"} \
        <= set(rows[0])
    assert all(np.isfinite(float(rows[0][k])) for k in ("loss", "val_loss"))
    with open(os.path.join(out, "kseg_run.json")) as f:
        run = json.load(f)
    assert run["model"] == "ssd300" and run["model_kwargs"]["width"] == 0.125
    assert run["class_names"] == list(kd.SYNTH_CLASSES)
    path = os.path.join(out, "best.keras")
    model = keras.saving.load_model(path, compile=False)
    ident = of_file(path)  # the run's kseg_run.json: ssd300 and its options, for the decoder
    remember_identity(model, {"name": ident.architecture, "kwargs": dict(ident.build_kwargs)})
    found = kseg.inference_model(model)(np.zeros((1, 300, 300, 3), np.float32))
    assert found["detection_boxes"].shape == (1, 200, 4)


def test_mixed_precision_gives_the_named_targets_by_position(shapes, tmp_path):
    # Mixed precision renames the outputs (float32 casts after them): the dict targets follow by position.
    from kseg.train import train

    try:
        result = train(DEMO, shapes, str(tmp_path / "run"), epochs=1, batch_size=2, precision="mixed_bfloat16",
                       verbose=0, tensorboard=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(result["history"]["loss"][0]) and np.isfinite(result["history"]["val_loss"][0])


@pytest.mark.slow  # 10 s; kseg train of SSD runs by default (checkpoints, losses); the augmentation has own tests
def test_kseg_train_runs_the_ssd300_voc_recipe_with_ssd_augmentation(tmp_path, capsys):
    # The paper's recipe (photometric distortion, zoom out, min-IoU crop, flip) on a VOCdevkit/VOC2007
    # of 4 small images, at width 0.125 for time; the fixture has no test split: validated on val.
    voc = fx.write_voc_detection(str(tmp_path))
    out = str(tmp_path / "run")
    code = main(["train", "--recipe", "ssd300_voc", "--data", voc["root"], "--out", out, "--epochs", "1",
                 "--set", "data.val_split=val", "--set", "model_options.width=0.125", "--batch-size", "2"])
    assert code == 0
    assert "training from scratch" in capsys.readouterr().err  # backbone_init = "imagenet", no weights given
    with open(os.path.join(out, "log.csv")) as f:
        row = next(csv.DictReader(f))
    assert all(np.isfinite(float(row[k])) for k in ("loss", "mbox_loc_loss", "mbox_conf_loss", "val_loss"))
    recipe = load_recipe("ssd300_voc", {"data.val_split": "val", "model_options.width": 0.125,
                                        "training.batch_size": 4})
    train, _ = datasets(recipe, voc["root"])
    x, y = next(iter(train))
    assert x.shape == (4, 300, 300, 3) and train.num_classes == 21
    assert set(np.unique(y["mbox_conf"])) <= set(range(21)) and (np.asarray(y["mbox_conf"]) > 0).any()


def test_kseg_train_names_a_missing_dataset(tmp_path, capsys):
    code = main(["train", "--recipe", DEMO, "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code != 0
    assert "cannot read voc_detection data" in capsys.readouterr().err


# === recipes and the model ===


def test_ssd300_voc_recipe_is_caffe_ssds_solver():
    r = load_recipe("ssd300_voc")
    assert r.model == "ssd300" and r.backbone_init == "imagenet" and r.model_options == {"num_classes": 21}
    assert (r.optimizer["name"], r.optimizer["learning_rate"], r.optimizer["momentum"],
            r.optimizer["weight_decay"]) == ("sgd", 1e-3, 0.9, 5e-4)
    assert r.schedule["boundaries"] == [80000, 100000] and r.schedule["values"] == [1e-3, 1e-4, 1e-5]
    assert r.training["batch_size"] == 32 and r.training["iterations"] == 120000
    assert (r.data["layout"], r.data["train_split"], r.data["val_split"]) == ("voc_detection", "trainval", "test")
    assert detection_augment(r.data) == DetectionAugment(photometric=True, zoom_out=4.0, iou_crop=True, flip=True)
    assert r.loss == {"name": "multibox", "neg_pos_ratio": 3}
    lr = kseg.train.learning_rate(r)
    assert float(lr(80000)) == pytest.approx(1e-3) and float(lr(80001)) == pytest.approx(1e-4)
    assert float(lr(100001)) == pytest.approx(1e-5)
    for name in ("ssd300_voc", DEMO):
        with open(os.path.join(RECIPE_DIR, name + ".toml")) as f:
            for i, line in enumerate(f.read().splitlines(), 1):
                if re.match(r"^\s*[a-z_]+\s*=\s*\[?-?[0-9]", line):
                    assert "#" in line, f"{name}.toml:{i}: a number without a comment: {line!r}"
    demo = load_recipe(DEMO)
    assert demo.model_options["width"] < 1 and demo.loss["name"] == "multibox"


def _ssd_params(width, num_classes):
    """SSD300's parameters from its layer table with every conv's filters scaled (min 8)."""
    def f(c):
        return max(8, round(c * width)) if width != 1 else c

    convs = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, c_in = 0, 3
    for c in convs[1:]:
        total += 9 * c_in * f(c) + f(c)
        c_in = f(c)
    conv4_3 = f(512)
    total += conv4_3  # conv4_3_norm's gamma
    total += 9 * c_in * f(1024) + f(1024) + f(1024) * f(1024) + f(1024)  # fc6, fc7
    c_in, sources = f(1024), [conv4_3, f(1024)]
    for _, filters, kernel, _ in kseg.models.ssd.EXTRA_LAYERS:
        total += kernel * kernel * c_in * f(filters) + f(filters)
        c_in = f(filters)
        if kernel == 3:
            sources.append(c_in)
    for c, a in zip(sources, (4, 6, 6, 6, 4, 4)):
        total += 9 * c * 4 * a + 4 * a + 9 * c * num_classes * a + num_classes * a
    return total


def test_ssd300_width_scales_the_convs_not_the_heads(small_ssd):
    assert _ssd_params(1.0, 21) == kseg.get_spec("ssd300").params == 26_285_486
    assert small_ssd.count_params() == _ssd_params(0.125, 5) == 510_246
    assert small_ssd.get_layer("block1_conv1").filters == 8 and small_ssd.get_layer("fc7").filters == 128
    assert [tuple(o.shape) for o in small_ssd.outputs] == [(None, 8732, 4), (None, 8732, 5)]
    quarter = kseg.build_model("ssd300", num_classes=21, width=0.25)
    assert quarter.count_params() == _ssd_params(0.25, 21)
    with pytest.raises(ValueError, match="width must be a channel multiplier"):
        kseg.build_model("ssd300", width=1.5)


# === the demo ===


@pytest.mark.slow  # 17 s; its steps (kseg train, evaluate, predict of SSD) run by default here, test_detection_cli
def test_kseg_demo_detection_runs_end_to_end_on_a_few_images(tmp_path, capsys):
    out = str(tmp_path / "demo")
    code = main(["demo", "--task", "detection", "--out", out, "--train-images", "4", "--val-images", "2",
                 "--size", "64", "--epochs", "1", "--set", "training.batch_size=2"])
    assert code == 0
    text = capsys.readouterr().out
    assert re.search(r"VOC mAP@0\.5 \d\.\d{3} \(VOC07 11-point\), \d\.\d{3} \(all-point\)", text)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["task"] == "detection" and summary["val_images"] == 2 and summary["data"]["size"] == 64
    assert 0 <= summary["map_voc07"] <= 1 and 0 <= summary["map_voc"] <= 1
    assert [row["name"] for row in summary["per_class"]] == list(kd.SYNTH_CLASSES[1:])
    assert os.path.isfile(os.path.join(out, "run", "final.keras"))
    # `kseg demo --help` shows the detection demo's defaults without importing it (and Keras).
    from kseg import cli, demo

    assert cli.DETECTION_DEMO == {"train_images": demo.DETECTION_TRAIN_IMAGES, "val_images": demo.DETECTION_VAL_IMAGES,
                                  "size": demo.DETECTION_SIZE, "budget": demo.DETECTION_BUDGET_S}


@pytest.mark.slow
def test_detection_demo_reaches_map_half_within_ten_minutes(tmp_path):
    from kseg.demo import run_detection_demo

    summary = run_detection_demo(str(tmp_path / "demo"), verbose=0)
    assert summary["seconds"] < 600, summary["seconds"]
    assert summary["map_voc07"] >= 0.5 and summary["map_voc"] >= 0.5, summary
