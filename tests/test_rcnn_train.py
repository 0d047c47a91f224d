"""Training two-stage detectors: anchor labels against torchvision's Matcher, the balanced sampler's
counts, RoI sampling with the GT appended, the four losses against torchvision's formulas (torch,
written with torchvision's function names: rpn.RegionProposalNetwork.compute_loss,
roi_heads.fastrcnn_loss), RCNNTrainer through model.fit and `kseg train` with the demo recipe, and
MirroredStrategy on 2 logical CPUs."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kseg
import kseg.data as kd
from kseg.detection import rcnn_targets as rt
from kseg.detection.rcnn_trainer import LOSS_NAMES, RCNNTrainer

torch = pytest.importorskip("torch")
from torch_reference_frcnn import box_iou  # noqa: E402  (torch is importable past this point)
from torch_reference_frcnn_train import Matcher, encode, fastrcnn_loss, rpn_compute_loss  # noqa: E402


def _boxes(rng, n, size=128, lo=8, hi=64):
    xy = rng.uniform(0, size - hi, (n, 2))
    wh = rng.uniform(lo, hi, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_anchor_labels_equal_torchvision_matcher_and_border_rule():
    rng = np.random.default_rng(0)
    anchors = _boxes(rng, 400, lo=10, hi=90)
    gt = np.stack([_boxes(rng, 5), _boxes(rng, 5)])
    classes = np.array([[1, 2, 3, -1, -1], [4, 1, 2, 3, 4]])
    labels, matched = rt.anchor_labels(tf.constant(anchors), gt, classes, (128, 128))
    for i in range(2):
        valid = classes[i] >= 0
        want = Matcher(0.7, 0.3, True)(box_iou(torch.from_numpy(gt[i][valid]), torch.from_numpy(anchors))).numpy()
        expected = np.where(want >= 0, 1, np.where(want == -1, 0, -1))
        np.testing.assert_array_equal(labels.numpy()[i], expected)
        positive = want >= 0
        np.testing.assert_array_equal(matched.numpy()[i][positive], gt[i][valid][want[positive]])
    # py-faster-rcnn's allowed_border 0: anchors leaving the image are ignored, the rest as before.
    bordered, _ = rt.anchor_labels(tf.constant(anchors), gt, classes, (100, 100), allowed_border=0.0)
    outside = (anchors[:, 2] >= 100) | (anchors[:, 3] >= 100)
    assert outside.any() and np.all(bordered.numpy()[:, outside] == -1)
    # An image without ground truth: every anchor background.
    empty, _ = rt.anchor_labels(tf.constant(anchors), np.zeros((1, 3, 4), np.float32), -np.ones((1, 3), int),
                                (128, 128))
    assert np.all(empty.numpy() == 0)


def test_balanced_sampler_counts_and_seed():
    labels = np.full((3, 1000), 0)
    labels[0, :10] = 1       # few positives: all 10 kept, 246 negatives
    labels[1, :500] = 1      # many: 128 positives, 128 negatives
    labels[2, :] = -1        # all ignored
    labels[2, :5] = 0
    pos, neg = rt.sample(tf.constant(labels), 256, 0.5, keras.random.SeedGenerator(1))
    pos, neg = pos.numpy(), neg.numpy()
    assert [p.sum() for p in pos] == [10, 128, 0] and [n.sum() for n in neg] == [246, 128, 5]
    assert np.all(labels[pos] == 1) and np.all(labels[neg] == 0)
    again = rt.sample(tf.constant(labels), 256, 0.5, keras.random.SeedGenerator(1))[0].numpy()
    np.testing.assert_array_equal(pos, again)


def test_roi_targets_append_gt_and_respect_thresholds():
    rng = np.random.default_rng(1)
    gt = np.stack([_boxes(rng, 4), _boxes(rng, 4)])
    classes = np.array([[3, 1, -1, -1], [2, 2, 4, 1]])
    proposals = np.stack([_boxes(rng, 60), _boxes(rng, 60)])
    mask = np.ones((2, 60), bool)
    mask[0, 50:] = False
    rois, labels, targets, valid = (t.numpy() for t in rt.roi_targets(
        proposals, mask, gt, classes, keras.random.SeedGenerator(0), batch_size=32, fg_fraction=0.25,
        bg_iou=(0.0, 0.5)))
    for i in range(2):
        real = classes[i] >= 0
        iou = box_iou(torch.from_numpy(rois[i]), torch.from_numpy(gt[i][real])).numpy().max(1)
        fg, bg = valid[i] & (labels[i] > 0), valid[i] & (labels[i] == 0)
        assert 0 < fg.sum() <= 8 and np.all(iou[fg] >= 0.5) and np.all(iou[bg] < 0.5)
        assert valid[i].sum() == min(32, fg.sum() + (iou[valid[i]] < 0.5).sum())
        # The appended GT are candidates: a foreground RoI equal to a GT box has zero targets.
        for box, cls in zip(gt[i][real], classes[i][real]):
            same = np.all(np.isclose(rois[i], box), axis=1) & fg
            if same.any():
                assert np.all(labels[i][same] == cls) and np.allclose(targets[i][same], 0.0, atol=1e-6)
        assert not np.any(rois[i][~valid[i]]) and not np.any(targets[i][~fg])
    # Proposals marked invalid by the mask are never sampled.
    invalid = proposals[0][50:]
    assert not any(np.all(np.isclose(rois[0], b), axis=1).any() for b in invalid)


def test_losses_equal_torchvision_formulas():
    rng = np.random.default_rng(2)
    b, a, c, n = 2, 300, 5, 40
    anchors = _boxes(rng, a, lo=10, hi=90)
    matched = np.stack([_boxes(rng, a), _boxes(rng, a)])
    objectness = rng.normal(size=(b, a)).astype(np.float32)
    deltas = rng.normal(scale=0.3, size=(b, a, 4)).astype(np.float32)
    positive = rng.uniform(size=(b, a)) < 0.1
    negative = ~positive & (rng.uniform(size=(b, a)) < 0.5)
    labels = np.where(positive, 1, np.where(negative, 0, -1))
    got = rt.rpn_losses(objectness, deltas, tf.constant(anchors), labels, matched, positive, negative)
    # torchvision rpn.RegionProposalNetwork.compute_loss (weights (1, 1, 1, 1), beta 1/9), given these samples.
    t_anchor = torch.from_numpy(np.broadcast_to(anchors, matched.shape).copy())
    regression_targets = [encode(torch.from_numpy(m), t, (1.0, 1.0, 1.0, 1.0)) for m, t in zip(matched, t_anchor)]
    given = lambda _: ([torch.from_numpy(p) for p in positive], [torch.from_numpy(q) for q in negative])  # noqa: E731
    objectness_loss, box_loss = rpn_compute_loss(
        torch.from_numpy(objectness), torch.from_numpy(deltas).reshape(-1, 4),
        [torch.from_numpy(lab).float() for lab in labels], regression_targets, given)
    np.testing.assert_allclose([float(v) for v in got], [objectness_loss.item(), box_loss.item()], rtol=1e-5)
    # The paper's 2-way softmax head: cross-entropy over (background, object) equals BCE on their difference.
    two = np.stack([np.zeros_like(objectness), objectness], -1)
    soft = rt.rpn_losses(two, deltas, tf.constant(anchors), labels, matched, positive, negative)
    np.testing.assert_allclose(float(soft[0]), objectness_loss.item(), rtol=1e-5)

    # torchvision roi_heads.fastrcnn_loss (beta 1/9).
    class_logits = rng.normal(size=(n, c)).astype(np.float32)
    box_regression = rng.normal(size=(n, 4 * c)).astype(np.float32)
    roi_labels = rng.integers(0, c, n)
    targets = rng.normal(size=(n, 4)).astype(np.float32)
    got = rt.head_losses(class_logits, box_regression, roi_labels, targets, np.ones(n, bool), beta=1 / 9)
    classification_loss, box_loss = fastrcnn_loss(torch.from_numpy(class_logits), torch.from_numpy(box_regression),
                                                  [torch.from_numpy(roi_labels)], [torch.from_numpy(targets)])
    np.testing.assert_allclose([float(v) for v in got], [classification_loss.item(), box_loss.item()], rtol=1e-5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    kd.make_synthetic_detection(root, seed=0, train=16, val=4, size=(128, 128))
    return root


def _small(**options):
    return kseg.build_model("faster_rcnn_vgg16", num_classes=5, width=0.125, input_shape=(128, 128, 3),
                            anchor_sizes=(32, 64, 128), pre_nms_top_n=200, post_nms_top_n=32, **options)


def _boxes_dataset(root, batch=4):
    ds = kd.voc_detection(root, "train", size=(128, 128), preprocessing="caffe", max_boxes=8)
    return ds.map(lambda x, t: (x, {"boxes": t["boxes"], "classes": t["classes"]})).batch(batch)


@pytest.mark.parametrize("layout", ["paper", "torchvision"])
def test_trainer_fits_and_changes_every_part(shapes, layout):
    keras.utils.set_random_seed(0)
    model = _small(layout=layout)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    trainer = RCNNTrainer(model, convention="pyfaster" if layout == "paper" else "torchvision",
                          allowed_border=None, pre_nms_top_n=576, post_nms_top_n=64, roi_batch=32)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    # One batch, learnt by heart: every loss term falls.
    batch = _boxes_dataset(shapes).take(1).cache()
    start = trainer.evaluate(batch, verbose=0, return_dict=True)
    history = trainer.fit(batch.repeat(), steps_per_epoch=10, epochs=2, verbose=0).history
    end = trainer.evaluate(batch, verbose=0, return_dict=True)
    assert set(history) == {"loss", *LOSS_NAMES} and set(end) == set(history)
    assert all(np.isfinite(v).all() for v in history.values())
    for name in ("loss", "rpn_objectness_loss", "classifier_loss"):
        assert end[name] < 0.7 * start[name], (name, start, end)
    changed = {p for p, v in before.items() if not np.array_equal(v, model.get_layer(p.split("/")[0]).weights[
        0 if p.endswith("kernel") else 1].numpy())}
    for layer in ("block1_conv1", "rpn_conv_3x3", "rpn_cls_score", "rpn_bbox_pred", "fc6", "cls_score", "bbox_pred"):
        assert any(p.startswith(layer + "/") for p in changed), f"{layer} did not train"


def test_trainer_rejects_a_detector_without_rois():
    with pytest.raises(ValueError, match="RoI op"):
        RCNNTrainer(kseg.build_model("ssd300", num_classes=3, width=0.125))


# kseg train with a trainer end to end: the default suite runs it for rcnn_alexnet (tests/test_rcnn.py)
@pytest.mark.slow
def test_kseg_train_demo_recipe_writes_a_detector(shapes, tmp_path):
    from kseg.train import train

    result = train("faster_rcnn_synthetic_demo", shapes, str(tmp_path), epochs=1, batch_size=4, verbose=0,
                   tensorboard=False)
    assert np.isfinite(result["history"]["val_loss"][0]) and result["monitor"] == "val_loss"
    for name in ("best.keras", "final.keras"):
        model = keras.saving.load_model(tmp_path / name)
        assert model.output_names[:2] == ["rpn_objectness", "rpn_deltas"]
        assert kseg.identity.of_file(str(tmp_path / name)).options["anchor_sizes"] == [32, 64, 128]
    with open(tmp_path / "kseg_run.json") as f:
        assert json.load(f)["recipe_values"]["loss"]["name"] == "rcnn"


def test_recipe_settings_are_checked(shapes, tmp_path):
    from kseg.train import train
    from kseg.train.recipes import RecipeError

    with pytest.raises(RecipeError, match="convention"):
        train("faster_rcnn_synthetic_demo", shapes, str(tmp_path), overrides={"loss.convention": "detectron"})
    with pytest.raises(ValueError, match="allowed_border"):
        train("faster_rcnn_synthetic_demo", shapes, str(tmp_path), epochs=1,
              overrides={"loss.allowed_border": "everywhere"})


MIRRORED = """
import sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, kseg, kseg.data as kd
from kseg.detection.rcnn_trainer import RCNNTrainer
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = kseg.build_model("faster_rcnn_vgg16", num_classes=5, width=0.125, input_shape=(128, 128, 3),
                             anchor_sizes=(32, 64, 128), pre_nms_top_n=200, post_nms_top_n=32)
    trainer = RCNNTrainer(model, allowed_border=None, pre_nms_top_n=576, post_nms_top_n=64, roi_batch=32)
    trainer.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
ds = kd.voc_detection(sys.argv[1], "train", size=(128, 128), preprocessing="caffe", max_boxes=8)
ds = ds.map(lambda x, t: (x, {"boxes": t["boxes"], "classes": t["classes"]})).batch(4)
history = trainer.fit(ds, epochs=1, verbose=0).history
print("REPLICAS", strategy.num_replicas_in_sync, "LOSS", history["loss"][-1])
"""


def test_mirrored_strategy_on_two_cpus_trains(shapes, tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    out = subprocess.run([sys.executable, str(script), shapes], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("REPLICAS"))
    assert line.split()[1] == "2" and np.isfinite(float(line.split()[3]))


def test_box_datasets_keep_aspect_pad_batches_and_flip_boxes():
    from kseg.train.rcnn_inputs import box_datasets

    images = [np.full((100, 120, 3), 50, np.float32), np.full((60, 80, 3), 90, np.float32)]
    boxes = [np.array([[10, 20, 50, 60], [0, 0, 0, 0]], np.float32), np.array([[4, 8, 40, 30], [0, 0, 0, 0]],
                                                                                np.float32)]
    classes = [np.array([2, -1]), np.array([1, -1])]

    def source():
        for image, box, cls in zip(images, boxes, classes):
            yield image, {"boxes": box, "classes": cls}

    sig = (tf.TensorSpec([None, None, 3], tf.float32), {"boxes": tf.TensorSpec([2, 4], tf.float32),
                                                         "classes": tf.TensorSpec([2], tf.int64)})
    ds = tf.data.Dataset.from_generator(source, output_signature=sig)
    train, val = box_datasets(ds, ds, batch=2, seed=0, min_size=96, max_size=150)
    x, y = next(iter(val))
    # 100x120 -> scale min(96/100, 150/120) = 0.96 -> 96x115; 60x80 -> min(1.6, 1.875) -> 96x128: padded to 96x128.
    assert x.shape == (2, 96, 128, 3)
    np.testing.assert_allclose(y["boxes"][0, 0], np.array([10, 20, 50, 60]) * [115 / 120, 0.96, 115 / 120, 0.96],
                               rtol=1e-5)
    np.testing.assert_allclose(y["boxes"][1, 0], np.array([4, 8, 40, 30]) * 1.6, rtol=1e-5)
    assert np.all(x[0, :, 115:] == 0) and np.all(x[0, :, :115] == 50)  # padding right of the smaller image
    np.testing.assert_array_equal(y["classes"], [[2, -1], [1, -1]])
    flipped = box_datasets(ds, ds, batch=1, seed=0, min_size=96, max_size=150, flip=True)[0]
    seen = set()
    for _ in range(8):  # a fresh coin per pass: both outcomes show, each consistent with its image
        for image, target in flipped:
            width = image.shape[2]
            first = tuple(np.round(target["boxes"][0, 0].numpy(), 3))
            unflipped = tuple(np.round(next(iter(val.unbatch().skip(0 if width == 115 else 1)))[1]["boxes"][0].numpy(),
                                       3))
            if first != unflipped:
                x1, y1, x2, y2 = unflipped
                assert first == pytest.approx((width - x2, y1, width - x1, y2), abs=1e-3)
                seen.add("flip")
            else:
                seen.add("same")
            assert not np.any(target["boxes"][0, 1].numpy())  # padding rows stay zero
    assert seen == {"flip", "same"}


def test_trainer_fits_fast_rcnn_on_given_proposals(shapes):
    """Fast R-CNN (no RPN): the RoIs are sampled from the proposals input, the RPN terms are zero."""
    keras.utils.set_random_seed(0)
    model = kseg.build_model("fast_rcnn_vgg16", num_classes=5, width=0.125, input_shape=(128, 128, 3),
                             num_proposals=48)
    trainer = RCNNTrainer(model, roi_batch=32)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))

    def with_proposals(x, y):
        # The GT jittered (foreground) and random boxes (mostly background), the last 8 rows padding.
        jitter = tf.random.stateless_uniform([4, 8, 4], (1, 2), -6.0, 6.0)
        near = tf.reshape(y["boxes"][:, None] + jitter[:, :, None], [4, -1, 4])[:, :24]
        corner = tf.random.stateless_uniform([4, 16, 2], (3, 4), 0.0, 90.0)
        far = tf.concat([corner, corner + tf.random.stateless_uniform([4, 16, 2], (5, 6), 16.0, 38.0)], -1)
        return {"image": x, "proposals": tf.concat([near, far, tf.zeros([4, 8, 4])], 1)}, y

    batch = _boxes_dataset(shapes).take(1).map(with_proposals).cache()
    start = trainer.evaluate(batch, verbose=0, return_dict=True)
    # 20 steps (0.46x of the start here): after 10, dropout's random stream alone moved it across 0.7x (0.72x)
    trainer.fit(batch.repeat(), steps_per_epoch=20, epochs=1, verbose=0)
    end = trainer.evaluate(batch, verbose=0, return_dict=True)
    assert start["rpn_objectness_loss"] == end["rpn_box_loss"] == 0.0
    assert end["classifier_loss"] < 0.7 * start["classifier_loss"] and np.isfinite(end["box_loss"]), (start, end)


def test_head_runs_on_the_sampled_rois_only(shapes):
    """Fewer candidates than roi_batch (an untrained RPN's few proposals): the head gets the sampled RoIs,
    as torchvision's sampler returns them, not roi_batch rows per image with padding."""
    keras.utils.set_random_seed(0)
    model = kseg.build_model("fast_rcnn_vgg16", num_classes=5, width=0.125, input_shape=(128, 128, 3),
                             num_proposals=12)
    trainer = RCNNTrainer(model, convention="torchvision", roi_batch=64)  # background from IoU 0: every candidate
    x, y = next(iter(_boxes_dataset(shapes)))
    corner = tf.random.stateless_uniform([4, 12, 2], (3, 4), 0.0, 90.0)
    proposals = tf.concat([corner, corner + tf.random.stateless_uniform([4, 12, 2], (5, 6), 16.0, 38.0)], -1)
    rows, head = [], trainer.head
    trainer.head = lambda inputs, training: rows.append(int(inputs[1].shape[0])) or head(inputs, training=training)
    parts = trainer.losses_of({"image": x, "proposals": proposals}, y, training=False)
    candidates = 4 * 12 + int(np.sum(y["classes"].numpy() >= 0))  # proposals + the GT boxes appended
    assert rows == [candidates] and all(np.isfinite(float(v)) for v in parts.values())


# the any-size scale path: the default suite trains the R-CNN demo recipe through it (tests/test_rcnn.py)
@pytest.mark.slow
def test_paper_recipe_trains_any_size_images_in_padded_batches(shapes, tmp_path):
    """faster_rcnn_vgg16_voc's path (shorter side min_size, padded batches, the paper's layout and
    settings) at a CPU size: width 0.125, images scaled to 96-160 pixels."""
    from kseg.train import train

    overrides = {"model_options.width": 0.125, "model_options.num_classes": 5,
                 "model_options.anchor_sizes": [32, 64, 128], "model_options.pre_nms_top_n": 300,
                 "model_options.post_nms_top_n": 32, "data.train_split": "train", "data.val_split": "val",
                 "data.min_size": 96, "data.max_size": 160, "training.iterations": 3, "loss.pre_nms_top_n": 400,
                 "loss.post_nms_top_n": 64, "loss.roi_batch": 16}
    with pytest.warns(UserWarning, match="from scratch"):
        result = train("faster_rcnn_vgg16_voc", shapes, str(tmp_path), batch_size=2, steps_per_epoch=3,
                       overrides=overrides, verbose=0, tensorboard=False)
    assert result["epochs"] == 1 and np.isfinite(result["history"]["val_loss"][0])
    assert keras.saving.load_model(tmp_path / "final.keras").get_layer("roi_pool5") is not None


def _write_proposals(root, split, rows=40):
    """Each image's GT boxes jittered (foreground) and random boxes (background), as a .npz by image id."""
    from kseg.data.detection import list_voc_detection

    rng = np.random.default_rng(7)
    source = list_voc_detection(root, split)
    found = {}
    for path, boxes in zip(source.images, source.boxes):
        near = np.repeat(boxes, 4, axis=0) + rng.uniform(-5, 5, (len(boxes) * 4, 4))
        corner = rng.uniform(0, 90, (rows - len(near), 2))
        found[os.path.splitext(os.path.basename(path))[0]] = np.concatenate(
            [near, np.concatenate([corner, corner + rng.uniform(12, 38, corner.shape)], 1)]).astype(np.float32)
    np.savez(os.path.join(root, f"props_{split}.npz"), **found)
    return found


# a proposals file through kseg train: the default suite does it for rcnn_alexnet (tests/test_rcnn.py)
@pytest.mark.slow
def test_kseg_train_fast_rcnn_with_a_proposals_file(shapes, tmp_path):
    from kseg.train import load_recipe, train
    from kseg.train.fit import datasets

    wanted = {split: _write_proposals(shapes, split) for split in ("train", "val")}
    overrides = {"model_options.width": 0.125, "model_options.num_classes": 5, "model_options.num_proposals": 48,
                 "data.train_split": "train", "data.val_split": "val", "data.proposals": "props_{split}.npz",
                 "data.min_size": 96, "data.max_size": 160, "training.iterations": 2, "loss.roi_batch": 16}
    recipe = load_recipe("fast_rcnn_vgg16_voc", overrides)
    _, val = datasets(recipe, shapes, batch_size=1)
    x, y = next(iter(val))
    first = sorted(wanted["val"])[0]  # the split list's order is the ids' sorted order here
    scale = 96 / 128
    np.testing.assert_allclose(x["proposals"][0, :40], wanted["val"][first] * scale, rtol=1e-5)
    assert x["image"].shape == (1, 96, 96, 3) and not np.any(x["proposals"][0, 40:])
    with pytest.warns(UserWarning, match="from scratch"):
        result = train(recipe, shapes, str(tmp_path), batch_size=2, steps_per_epoch=2, verbose=0,
                       tensorboard=False)
    assert np.isfinite(result["history"]["val_loss"][0]) and result["history"]["rpn_objectness_loss"] == [0.0]
    from kseg.train import TrainingSetupError

    with pytest.raises(TrainingSetupError, match="none_train.npz"):
        train(recipe.__class__(**{**recipe.to_dict(), "data": {**recipe.data, "proposals": "none_{split}.npz"}}),
              shapes, str(tmp_path / "again"), verbose=0)
