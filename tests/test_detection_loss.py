"""SSD training targets and MultiBoxLoss against torch re-derivations of torchvision's semantics
(box_iou, Matcher + SSDMatcher, BoxCoder.encode_single, SSD.compute_loss written here with torch ops),
and the loss under MirroredStrategy (2 logical CPUs) against one replica."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.detection.anchors import ssd_anchors
from kseg.detection.losses import (
    MultiBoxLoss,
    conf_loss_sum,
    mined_negatives,
    multibox_loss,
    multibox_losses,
    multibox_y_true,
)
from kseg.detection.targets import batch_ssd_targets, ssd_targets

torch = pytest.importorskip("torch")
F = torch.nn.functional

INPUT_HW = (64, 64)
ANCHORS = ssd_anchors(INPUT_HW)  # 390 VOC priors on maps 8, 4, 2, 1, 1, 1
NUM_CLASSES = 5
MAX_BOXES = 6


# ---------------------------------------------------------------- torch references


def t_box_iou(a, b):
    """torchvision ops.box_iou."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b - inter)


def t_ssd_match(iou, threshold=0.5):
    """torchvision SSDMatcher(threshold): Matcher(threshold, threshold), then each GT's best anchor."""
    values, matches = iou.max(dim=0)
    matches[values < threshold] = -1
    _, best = iou.max(dim=1)
    matches[best] = torch.arange(iou.size(0), dtype=matches.dtype)
    return matches


def t_encode(gt, anchors, weights=(10.0, 10.0, 5.0, 5.0)):
    """torchvision BoxCoder.encode_single(gt, anchors) (encode_boxes)."""
    wx, wy, ww, wh = weights
    ex_w, ex_h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ex_x, ex_y = anchors[:, 0] + 0.5 * ex_w, anchors[:, 1] + 0.5 * ex_h
    gt_w, gt_h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gt_x, gt_y = gt[:, 0] + 0.5 * gt_w, gt[:, 1] + 0.5 * gt_h
    return torch.stack([wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                        ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)], dim=1)


def t_matched_idxs(targets, anchors):
    """SSD.forward's matching: all -1 for an image without boxes."""
    return [torch.full((anchors.size(0),), -1, dtype=torch.int64) if t["boxes"].numel() == 0
            else t_ssd_match(t_box_iou(t["boxes"], anchors)) for t in targets]


def t_compute_loss(targets, bbox_regression, cls_logits, anchors, matched_idxs, neg_to_pos_ratio=3.0):
    """torchvision SSD.compute_loss, op for op."""
    num_foreground, bbox_loss, cls_targets = 0, [], []
    for target, regression, logits, matched in zip(targets, bbox_regression, cls_logits, matched_idxs):
        fg = torch.where(matched >= 0)[0]
        fg_matched = matched[fg]
        num_foreground += fg_matched.numel()
        target_regression = t_encode(target["boxes"][fg_matched], anchors[fg])
        bbox_loss.append(F.smooth_l1_loss(regression[fg], target_regression, reduction="sum"))
        gt_classes = torch.zeros((logits.size(0),), dtype=target["labels"].dtype)
        gt_classes[fg] = target["labels"][fg_matched]
        cls_targets.append(gt_classes)
    bbox_loss, cls_targets = torch.stack(bbox_loss), torch.stack(cls_targets)
    num_classes = cls_logits.size(-1)
    cls_loss = F.cross_entropy(cls_logits.view(-1, num_classes), cls_targets.view(-1), reduction="none").view(
        cls_targets.size())
    foreground = cls_targets > 0
    num_negative = neg_to_pos_ratio * foreground.sum(1, keepdim=True)
    negative_loss = cls_loss.clone()
    negative_loss[foreground] = -float("inf")
    _, idx = negative_loss.sort(1, descending=True)
    background = idx.sort(1)[1] < num_negative
    n = max(1, num_foreground)
    return bbox_loss.sum() / n, (cls_loss[foreground].sum() + cls_loss[background].sum()) / n


# ---------------------------------------------------------------- data


def random_boxes(rng, n):
    """n boxes with positive sizes inside the 64x64 input, float32: anchors of 8 px or more moved by up
    to 3 px per coordinate, so that several anchors overlap each by IoU >= 0.5."""
    sizes = ANCHORS[:, 2:] - ANCHORS[:, :2]
    usable = np.flatnonzero((ANCHORS[:, :2] >= 0).all(1) & (ANCHORS[:, 2:] <= 64).all(1) & (sizes >= 8).all(1))
    boxes = ANCHORS[rng.choice(usable, n, replace=False)] + rng.uniform(-3, 3, (n, 4))
    return np.clip(boxes, 0, 64).astype(np.float32)


def images(rng):
    """Per image (boxes, classes): 3 random boxes + a 2x2 box (best IoU < 0.5), none, one box."""
    first = np.concatenate([random_boxes(rng, 3), [[40.3, 7.1, 42.3, 9.1]]]).astype(np.float32)
    return [(first, np.array([1, 4, 2, 3])), (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
            (random_boxes(rng, 1), np.array([2]))]


def padded(batch):
    """The images as a padded batch: boxes [N, MAX_BOXES, 4] (zeros), classes [N, MAX_BOXES] (-1)."""
    boxes = np.zeros((len(batch), MAX_BOXES, 4), np.float32)
    classes = np.full((len(batch), MAX_BOXES), -1, np.int32)
    for i, (b, c) in enumerate(batch):
        boxes[i, :len(b)], classes[i, :len(c)] = b, c
    return boxes, classes


def torch_targets(batch):
    return [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c).long()} for b, c in batch]


def reference_targets(batch):
    """(loc [N, A, 4], labels [N, A]) from the torch matching and encoding."""
    anchors = torch.from_numpy(ANCHORS)
    locs, labels = [], []
    for target, matched in zip(torch_targets(batch), t_matched_idxs(torch_targets(batch), anchors)):
        fg = matched >= 0
        loc = torch.zeros((anchors.size(0), 4))
        loc[fg] = t_encode(target["boxes"][matched[fg]], anchors[fg])
        label = torch.zeros(anchors.size(0), dtype=torch.int64)
        label[fg] = target["labels"][matched[fg]]
        locs.append(loc.numpy())
        labels.append(label.numpy())
    return np.stack(locs), np.stack(labels)


# ---------------------------------------------------------------- targets


def test_targets_match_torchvision_semantics(rng):
    batch = images(rng)
    ref_loc, ref_labels = reference_targets(batch)
    boxes, classes = padded(batch)
    loc, labels = batch_ssd_targets(boxes, classes, ANCHORS)
    assert loc.dtype == tf.float32 and labels.dtype == tf.int32
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    np.testing.assert_allclose(loc.numpy(), ref_loc, rtol=1e-5, atol=1e-5)
    # Both matching paths occur: IoU >= 0.5, and the 2x2 box's best anchor (IoU < 0.5) still matched.
    iou = t_box_iou(torch.from_numpy(batch[0][0]), torch.from_numpy(ANCHORS)).numpy()
    assert (iou[:3].max(axis=0) >= 0.5).sum() > 3
    assert iou[3].max() < 0.5 and labels.numpy()[0, iou[3].argmax()] == 3
    # The image without boxes: background everywhere, zero offsets.
    assert not labels.numpy()[1].any() and not loc.numpy()[1].any()
    # Unpadded single-image calls and a tf.data map (unknown G, G = 0 included) agree.
    for i, (b, c) in enumerate(batch):
        one_loc, one_labels = ssd_targets(b, c, ANCHORS)
        np.testing.assert_array_equal(one_labels.numpy(), ref_labels[i])
        np.testing.assert_allclose(one_loc.numpy(), loc.numpy()[i], rtol=0, atol=0)
    ds = tf.data.Dataset.from_generator(lambda: iter(batch), output_signature=(
        tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int64)))
    mapped = list(ds.map(lambda b, c: ssd_targets(b, c, ANCHORS)))
    np.testing.assert_array_equal(np.stack([m[1].numpy() for m in mapped]), ref_labels)


# ---------------------------------------------------------------- loss


def head_outputs(n, seed=0):
    """Continuous random predictions (no ties in the mining): loc [n, A, 4], logits [n, A, C]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(ANCHORS), 4, generator=g), 2.0 * torch.randn(n, len(ANCHORS), NUM_CLASSES, generator=g)


def keras_terms(loc_pred, logits, loc, labels):
    y = multibox_y_true(loc, labels)
    loss = MultiBoxLoss()
    return float(loss(y["mbox_loc"], loc_pred)), float(loss(y["mbox_conf"], logits))


@pytest.mark.parametrize("which", [[0, 2], [2, 0, 1]], ids=["two_images", "with_empty_image"])
def test_multibox_loss_matches_compute_loss(rng, which):
    batch = [images(rng)[i] for i in which]
    loc_pred, logits = head_outputs(len(batch))
    targets = torch_targets(batch)
    anchors = torch.from_numpy(ANCHORS)
    ref_loc, ref_conf = t_compute_loss(targets, loc_pred, logits, anchors, t_matched_idxs(targets, anchors))
    loc, labels = batch_ssd_targets(*padded(batch), ANCHORS)
    got = keras_terms(loc_pred.numpy(), logits.numpy(), loc, labels)
    np.testing.assert_allclose(got, [float(ref_loc), float(ref_conf)], rtol=1e-5)
    plain = [float(v) for v in multibox_loss(loc_pred.numpy(), logits.numpy(), loc, labels)]
    np.testing.assert_allclose(plain, got, rtol=1e-6)
    num_pos = (labels.numpy() > 0).sum(1)
    assert len(set(num_pos)) == len(num_pos)  # the images differ in positives


def test_image_without_boxes_adds_no_loc_and_mines_no_negatives(rng):
    batch = images(rng)
    loc_pred, logits = head_outputs(3)
    loc, labels = batch_ssd_targets(*padded(batch), ANCHORS)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits.numpy())
    mined = mined_negatives(ce, labels).numpy()
    num_pos = (labels.numpy() > 0).sum(1)
    np.testing.assert_array_equal(mined.sum(1), 3 * num_pos)
    assert num_pos[1] == 0 and not mined[1].any()
    # The mined negatives are each image's highest cross-entropies among its background anchors.
    for i in (0, 2):
        background = ce.numpy()[i][labels.numpy()[i] == 0]
        assert ce.numpy()[i][mined[i]].min() >= np.sort(background)[-3 * num_pos[i]]
    keep = [0, 2]
    with_empty = keras_terms(loc_pred.numpy(), logits.numpy(), loc, labels)
    without = keras_terms(loc_pred.numpy()[keep], logits.numpy()[keep], tf.gather(loc, keep), tf.gather(labels, keep))
    np.testing.assert_allclose(with_empty, without, rtol=1e-6)
    # A batch without any positive: N = 1 and both terms 0 (no positives, no negatives mined).
    assert keras_terms(loc_pred.numpy()[1:2], logits.numpy()[1:2], loc[1:2], labels[1:2]) == (0.0, 0.0)


def test_mining_caps_at_the_images_negatives():
    # 3 positives of 8 anchors: 9 negatives wanted, 5 exist -> all 5, each anchor counted once (Caffe's
    # MineHardExamples cap); torchvision's rank test would add the positives' loss a second time.
    logits = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(1))
    labels = np.array([[1, 0, 2, 0, 0, 1, 0, 0]])
    ce = F.cross_entropy(logits[0], torch.from_numpy(labels[0]), reduction="none").numpy()
    got = float(conf_loss_sum(logits.numpy(), labels))
    np.testing.assert_allclose(got, ce.sum(), rtol=1e-6)
    # torchvision's classification term on the same labels (one GT per class id; boxes do not matter).
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3), "labels": torch.tensor([0, 1, 2])}]
    matched = [torch.from_numpy(np.where(labels[0] > 0, labels[0], -1))]
    _, tv_conf = t_compute_loss(targets, torch.zeros(1, 8, 4), logits, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 8),
                                matched)
    np.testing.assert_allclose(float(tv_conf) * 3, ce.sum() + ce[labels[0] > 0].sum(), rtol=1e-6)


def test_config_round_trip_and_errors():
    loss = MultiBoxLoss("conf", neg_pos_ratio=2.0, name="conf")
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, MultiBoxLoss) and again.get_config() == loss.get_config()
    assert again.get_config()["neg_pos_ratio"] == 2.0 and again.reduction == "sum"
    assert sorted(multibox_losses()) == ["mbox_conf", "mbox_loc"]
    with pytest.raises(ValueError, match="reduction must be 'sum'"):
        MultiBoxLoss(reduction="sum_over_batch_size")
    with pytest.raises(ValueError, match="term must be"):
        MultiBoxLoss("box")
    loc_pred = np.zeros((1, len(ANCHORS), 4), np.float32)
    with pytest.raises(ValueError, match=r"must be \(N, A, 5\)"):
        MultiBoxLoss()(np.zeros((1, len(ANCHORS), 4), np.float32), loc_pred)
    with pytest.raises(ValueError, match="sample weights"):
        MultiBoxLoss()(np.zeros((1, len(ANCHORS)), np.float32), loc_pred, sample_weight=np.ones(1))


def test_compiles_by_output_name_with_xla(rng):
    # loss={"mbox_loc": ..., "mbox_conf": ...} and XLA (Keras' default on one GPU): the mining's sorts compile.
    loc, labels = batch_ssd_targets(*padded(images(rng)), ANCHORS)
    inputs = keras.Input((3,))
    outputs = [keras.layers.Reshape((len(ANCHORS), 4), name="mbox_loc")(keras.layers.Dense(len(ANCHORS) * 4)(inputs)),
               keras.layers.Reshape((len(ANCHORS), NUM_CLASSES), name="mbox_conf")(
                   keras.layers.Dense(len(ANCHORS) * NUM_CLASSES)(inputs))]
    model = keras.Model(inputs, outputs)
    model.compile("sgd", loss=multibox_losses(), jit_compile=True)
    x = rng.normal(size=(3, 3)).astype(np.float32)
    got = model.evaluate(x, multibox_y_true(loc, labels), verbose=0, return_dict=True)
    want = [float(v) for v in multibox_loss(*model(x), loc, labels)]
    np.testing.assert_allclose([got["mbox_loc_loss"], got["mbox_conf_loss"], got["loss"]], [*want, sum(want)],
                               rtol=1e-5)


# ---------------------------------------------------------------- MirroredStrategy


# One SGD step of a tiny two-output model on a global batch of 4 whose halves hold different numbers
# of positives, on 1 replica and on 2 (logical CPUs, each half the batch), from the same weights.
STEP = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    import kseg
    from kseg.detection.anchors import ssd_anchors
    from kseg.detection.losses import MultiBoxLoss, multibox_loss, multibox_y_true
    from kseg.detection.targets import batch_ssd_targets
    anchors = ssd_anchors((64, 64))
    A, C = len(anchors), 5
    rng = np.random.default_rng(0)
    sizes = anchors[:, 2:] - anchors[:, :2]
    usable = np.flatnonzero((anchors[:, :2] >= 0).all(1) & (anchors[:, 2:] <= 64).all(1) & (sizes >= 8).all(1))
    boxes = np.zeros((4, 4, 4), np.float32)
    classes = np.full((4, 4), -1, np.int32)
    for i, n in enumerate([4, 0, 1, 2]):
        boxes[i, :n] = np.clip(anchors[rng.choice(usable, n, replace=False)] + rng.uniform(-3, 3, (n, 4)), 0, 64)
        classes[i, :n] = rng.integers(1, C, n)
    loc, labels = batch_ssd_targets(boxes, classes, anchors)
    y = {k: v.numpy() for k, v in multibox_y_true(loc, labels).items()}
    x = rng.normal(size=(4, 8)).astype(np.float32)

    def build():
        inputs = keras.Input((8,))
        h = keras.layers.Dense(16, activation="relu")(inputs)
        mbox_loc = keras.layers.Reshape((A, 4), name="mbox_loc")(keras.layers.Dense(A * 4)(h))
        mbox_conf = keras.layers.Reshape((A, C), name="mbox_conf")(keras.layers.Dense(A * C)(h))
        model = keras.Model(inputs, [mbox_loc, mbox_conf])
        model.compile(keras.optimizers.SGD(0.05), loss=MultiBoxLoss())
        return model

    keras.utils.set_random_seed(0)
    init = build().get_weights()
    out = {"positives": (labels.numpy() > 0).sum(1).tolist()}
    for name, strategy in [("one", tf.distribute.get_strategy()),
                           ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
        with strategy.scope():
            model = build()
        model.set_weights(init)
        if name == "one":
            terms = multibox_loss(*model(x), loc, labels)
            out["direct_loss"] = float(terms[0] + terms[1])
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        out[name + "_loss"] = model.fit(ds, epochs=1, verbose=0).history["loss"][0]
        out[name + "_replicas"] = strategy.num_replicas_in_sync
        np.save(os.path.join(sys.argv[1], name + ".npy"), np.array(model.get_weights(), dtype=object),
                allow_pickle=True)
    np.save(os.path.join(sys.argv[1], "init.npy"), np.array(init, dtype=object), allow_pickle=True)
    print(json.dumps(out))
""")


def test_two_replicas_equal_one_replica(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STEP)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["one_replicas"] == 1 and out["two_replicas"] == 2
    pos = out["positives"]
    assert pos[0] + pos[1] != pos[2] + pos[3] and pos[1] == 0  # the replicas' halves differ in positives
    one, two, init = (np.load(tmp_path / f"{n}.npy", allow_pickle=True) for n in ("one", "two", "init"))
    assert max(float(np.abs(a - s).max()) for a, s in zip(one, init)) > 1e-3  # the step moved the weights
    for a, b in zip(one, two):  # 3.0e-8 when measured; normalising by each replica's positives: 6.5e-3
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The reported loss is the global batch's, on either strategy.
    np.testing.assert_allclose([out["one_loss"], out["two_loss"]], out["direct_loss"], rtol=1e-5)
