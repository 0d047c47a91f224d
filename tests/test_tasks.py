"""kseg.tasks: each task object owns what its outputs mean; an unknown task is an error."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import kseg
from kseg.registry import register_model
from kseg.tasks import TASKS, get_task


def test_every_registered_model_names_a_known_task():
    assert set(TASKS) == {"classification", "segmentation", "edges", "detection", "skeleton"}
    for name in kseg.list_models():
        assert kseg.get_spec(name).task_object is TASKS[kseg.get_spec(name).task]


def test_an_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        get_task("depth")
    with pytest.raises(ValueError, match="task must be one of"):
        register_model("x_unknown_task", task="depth", paper="", input_shape=(8, 8, 3), num_classes=2,
                       preprocessing="unit", params=0)(lambda: None)


def test_heads_pick_the_prediction_among_the_outputs():
    assert get_task("segmentation").head(["logits", "stride8"]).output_index == 0
    assert get_task("edges").head(["dsn1", "dsn2", "fuse"]).output_index == 2
    assert get_task("edges").head(["dsn1", "dsn2", "fuse"]).activation == "sigmoid"
    cls = get_task("classification")
    assert cls.head(["predictions"], {"rbf_output": True}).activation == "softmax_negated"
    assert cls.head(["predictions"], {"classifier_activation": "softmax"}).activation is None
    with pytest.raises(ValueError, match="include_top=True"):
        cls.head(["features"], {}, output_rank=4)
    assert get_task("detection").head(["mbox_loc", "mbox_conf"]).output_index == 1


def test_labels_follow_the_task():
    probs = tf.constant([[[0.2, 0.8], [0.9, 0.1]]])
    np.testing.assert_array_equal(get_task("segmentation").labels(probs).numpy(), [[1, 0]])
    np.testing.assert_array_equal(get_task("edges").labels(tf.constant([[[0.7], [0.4]]])).numpy(), [[1, 0]])


def test_num_classes_minimum_is_the_tasks():
    with pytest.raises(ValueError, match=">= 2 for a segmentation model"):
        kseg.build_model("deeplab_largefov", num_classes=1, width=0.125)
    assert kseg.build_model("hed", num_classes=1, input_shape=(32, 32, 3)).outputs[-1].shape[-1] == 1


def test_compare_is_element_wise_with_argmax_near_ties_allowed():
    task = get_task("segmentation")
    tol = {"atol": 1e-3, "rtol": 0.0, "argmax": 0.5}
    ref = np.array([[0.0, 1.0], [0.5, 0.5004]])
    assert task.compare(ref, ref + 5e-4, "out", tol).passed
    swapped = ref.copy()
    swapped[1] = [0.5004, 0.5]  # a near-tie flips: allowed
    assert task.compare(ref, swapped, "out", tol).passed
    assert not task.compare(ref, ref[:, ::-1], "out", tol).passed  # a real disagreement


@pytest.mark.parametrize("rbf_output", [False, True])
def test_evaluate_scores_a_classifier_by_top1_and_top5(rbf_output):
    from kseg.inference import evaluate

    model = kseg.build_model("lenet5", rbf_output=rbf_output)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (6, 32, 32, 1)).astype("float32")
    out = np.asarray(model(x / 255.0))
    ranked = np.argsort(out if rbf_output else -out, axis=-1)  # the RBF units' lowest penalty wins
    y = np.array([ranked[0, 0], ranked[1, 0], ranked[2, 3], ranked[3, 4], ranked[4, 9], ranked[5, 8]])
    scores = evaluate(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4), preprocessing="unit", progress=False)
    assert {k: scores[k] for k in ("top1", "top5", "images", "count")} == \
        {"top1": 2 / 6, "top5": 4 / 6, "images": 6, "count": 6}
    assert sum(r["images"] for r in scores["per_class"]) == 6 and np.trace(scores["confusion"]) == 2


def test_evaluate_scores_edges_on_the_fused_map():
    from kseg.inference import evaluate
    from kseg.tasks.metrics import edge_ods_ois

    model = kseg.build_model("hed", input_shape=(None, None, 3))
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 40, 48, 3)).astype("float32")
    truth = (rng.uniform(size=(2, 40, 48, 1)) > 0.9).astype("float32")
    prep = kseg.get_spec("hed").preprocessing
    fuse = 1 / (1 + np.exp(-np.asarray(model(prep.apply(x))[-1])))
    scores = evaluate(model, tf.data.Dataset.from_tensor_slices((x, truth)).batch(1), preprocessing="hed",
                      progress=False, edge_output="fuse")
    expected = {**edge_ods_ois(list(fuse[..., 0]), list(truth[..., 0])), "output": "fuse"}
    assert scores.pop("images") == 2
    assert scores.pop("ois_thresholds") == expected.pop("ois_thresholds") and scores.pop("output") == "fuse"
    assert scores.pop("protocol").startswith("BSDS benchmark: NMS")
    expected.pop("output")
    assert scores == pytest.approx(expected, rel=1e-6)
