"""The confusion-matrix metric (FCN paper definitions), per-class table, ODS/OIS; 2 replicas in a subprocess."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kseg.train import ConfusionMatrixMetric, confusion_matrix, edge_ods_ois, iou_table, scores_from_confusion


def _ref_scores(labels, preds, n):
    """The FCN paper's formulas written out per class, n_cl = classes present in the labels."""
    lab, pr = labels.ravel(), preds.ravel()
    keep = lab != 255
    lab, pr = lab[keep], pr[keep]
    nij = np.zeros((n, n))
    for a, b in zip(lab, pr):
        nij[a, b] += 1
    t = nij.sum(1)
    present = [i for i in range(n) if t[i] > 0]
    iu = {i: nij[i, i] / (t[i] + nij[:, i].sum() - nij[i, i]) for i in present}
    return {
        "pixel_accuracy": sum(nij[i, i] for i in range(n)) / t.sum(),
        "mean_accuracy": np.mean([nij[i, i] / t[i] for i in present]),
        "mean_iou": np.mean([iu[i] for i in present]),
        "fw_iou": sum(t[i] * iu[i] for i in present) / t.sum(),
    }


def _data(rng, n=5, shape=(4, 6, 7)):
    labels = rng.integers(0, n - 1, shape + (1,)).astype(np.int32)  # class n-1 never in the labels
    labels[rng.uniform(size=labels.shape) < 0.15] = 255
    logits = rng.normal(size=shape + (n,)).astype(np.float32)
    logits[..., 2] += 1.0  # the absent-elsewhere class gets predicted often
    return labels, logits


def test_scores_match_the_paper_definitions(rng):
    labels, logits = _data(rng)
    preds = logits.argmax(-1)
    metric = ConfusionMatrixMetric(5)
    metric.update_state(labels, logits)
    got = {k: float(v) for k, v in metric.result().items()}
    ref = _ref_scores(labels[..., 0], preds, 5)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-6), key
    # n_cl counts classes present: class 4 never occurs in the labels and does not dilute the mean.
    assert got["mean_iou"] > float(np.mean([r["iou"] or 0 for r in iou_table(metric.confusion())]))
    np.testing.assert_array_equal(metric.confusion(), confusion_matrix(labels, preds, 5))
    assert scores_from_confusion(metric.confusion()) == pytest.approx(ref)


def test_streaming_equals_one_shot_and_reset(rng):
    labels, logits = _data(rng)
    whole, parts = ConfusionMatrixMetric(5), ConfusionMatrixMetric(5)
    whole.update_state(labels, logits)
    for i in range(len(labels)):
        parts.update_state(labels[i:i + 1], logits[i:i + 1])
    np.testing.assert_array_equal(whole.confusion(), parts.confusion())
    whole.reset_state()
    assert whole.confusion().sum() == 0


def test_ignored_pixels_do_not_count(rng):
    labels, logits = _data(rng)
    metric = ConfusionMatrixMetric(5)
    metric.update_state(labels, logits)
    assert metric.confusion().sum() == int((labels != 255).sum())


def test_label_beyond_num_classes_raises(rng):
    labels, logits = _data(rng)
    labels[0, 0, 0] = 7
    with pytest.raises(Exception, match="num_classes"):
        ConfusionMatrixMetric(5).update_state(labels, logits)


def test_fit_logs_the_scores_with_val_prefix(rng):
    labels, logits = _data(rng, n=3, shape=(8, 6, 6))
    labels = np.where(labels == 255, 255, labels % 3).astype(np.int32)
    inputs = keras.Input((6, 6, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.compile("sgd", loss="mse" if False else keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=255), metrics=[ConfusionMatrixMetric(3)])
    x = rng.normal(size=(8, 6, 6, 2)).astype(np.float32)
    hist = model.fit(x, labels, validation_data=(x, labels), epochs=1, verbose=0).history
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou", "val_mean_iou"):
        assert key in hist
    ref = _ref_scores(labels[..., 0], model.predict(x, verbose=0).argmax(-1), 3)
    assert hist["val_mean_iou"][0] == pytest.approx(ref["mean_iou"], rel=1e-5)


def test_iou_table_rows():
    cm = np.array([[8, 2, 0], [1, 4, 0], [0, 0, 0]])
    rows = iou_table(cm, ["bg", "a", "b"])
    assert rows[0] == {"class": "bg", "index": 0, "iou": 8 / 11, "accuracy": 0.8, "pixels": 10, "predicted": 9}
    assert rows[2]["iou"] is None and rows[2]["pixels"] == 0
    with pytest.raises(ValueError, match="2 class names"):
        iou_table(cm, ["x", "y"])


def test_edge_ods_ois():
    # The matcher on one-pixel lines (no NMS: the maps are thin already); tests/test_edges_cli.py has the rest.
    gt = np.zeros((20, 20))
    gt[10, 2:18] = 1
    perfect = gt * 0.9
    assert edge_ods_ois([perfect], [gt], tolerance_px=1, nms=False)["ods"] == pytest.approx(1.0)
    shifted = np.roll(perfect, 1, axis=0)  # one pixel off: within a 1.5-pixel tolerance, not within 0.5
    assert edge_ods_ois([shifted], [gt], tolerance_px=1.5, nms=False)["ods"] == pytest.approx(1.0)
    assert edge_ods_ois([shifted], [gt], tolerance_px=0.5, nms=False)["ods"] == pytest.approx(0.0)
    # Half the predicted edge pixels spurious (at a high threshold too): precision 0.5, recall 1.
    noisy = perfect.copy()
    noisy[3, 2:18] = 0.9
    r = edge_ods_ois([noisy], [gt], tolerance_px=1, nms=False)
    assert r["ods"] == pytest.approx(2 * 0.5 / 1.5)
    # OIS picks each image's best threshold; ODS one for both.
    a = gt * 0.3 + (np.arange(20)[:, None] == 3) * 0.2
    b = gt * 0.8 + (np.arange(20)[:, None] == 3) * 0.5
    r = edge_ods_ois([a, b], [gt, gt], tolerance_px=1, nms=False)
    assert r["ois"] == pytest.approx(1.0) and r["ods"] < 1.0


MIRRORED = textwrap.dedent("""
    import os, json, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    import kseg
    from kseg.train import ConfusionMatrixMetric, strategy
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, (8, 6, 6, 1)).astype("int32")
    y[rng.uniform(size=y.shape) < 0.2] = 255
    s = strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    with s.scope():
        inputs = keras.Input((6, 6, 2))
        model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
                      metrics=[ConfusionMatrixMetric(3)])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    res = model.evaluate(ds, verbose=0, return_dict=True)
    print(json.dumps({"replicas": s.num_replicas_in_sync, "scores": {k: float(v) for k, v in res.items()},
                      "pred": model.predict(x, verbose=0).argmax(-1).tolist(), "y": y[..., 0].tolist()}))
""")


def test_metric_correct_under_mirrored_strategy_with_two_replicas(tmp_path):
    import json

    script = tmp_path / "mirrored_metric.py"
    script.write_text(MIRRORED)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    ref = _ref_scores(np.array(result["y"]), np.array(result["pred"]), 3)
    for key, value in ref.items():
        assert result["scores"][key] == pytest.approx(value, rel=1e-6), key
