"""Evaluation as the papers measured it.

`ConfusionMatrixMetric`: one streaming Keras metric accumulating the confusion matrix
n_ij (pixels of class i predicted as j) and reporting the FCN paper's four scores (Long et
al. 2015, section 5; n_cl = classes present, i.e. with t_i > 0):

    pixel_accuracy  sum_i n_ii / sum_i t_i
    mean_accuracy   (1/n_cl) sum_i n_ii / t_i
    mean_iou        (1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
    fw_iou          (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)

Pixels labelled 255 are ignored. The matrix is a sum-aggregated Keras metric variable, so
under tf.distribute each replica counts its own pixels and reading the result sums them:
the scores are those of the whole global batch, not an average of per-replica scores.
The matrix is float64: float32 counts stop being exact at 2^24 pixels, a few dozen VOC images.

`iou_table` turns a confusion matrix into per-class rows for printing; `edge_ods_ois` is
the BSDS ODS/OIS F-measure for HED's edge maps (the benchmark's protocol, kseg.tasks.bsds).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kseg.tasks.bsds import edge_ods_ois
from kseg.tasks.losses import IGNORE_LABEL, resize_labels_nearest

SCORES = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")


def scores_from_confusion(cm) -> dict:
    """The FCN paper's four scores (floats) from a NumPy confusion matrix (rows: truth)."""
    cm = np.asarray(cm, dtype=np.float64)
    n_ii = np.diag(cm)
    t = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    present = t > 0
    union = t + pred - n_ii
    total = t.sum()
    if total == 0:
        return {k: float("nan") for k in SCORES}
    iou = n_ii[present] / union[present]
    return {
        "pixel_accuracy": float(n_ii.sum() / total),
        "mean_accuracy": float(np.mean(n_ii[present] / t[present])),
        "mean_iou": float(np.mean(iou)),
        "fw_iou": float(np.sum(t[present] * iou) / total),
    }


def confusion_matrix(labels, predictions, num_classes, ignore_class=IGNORE_LABEL) -> np.ndarray:
    """NumPy confusion matrix of integer label and prediction maps (any shapes, equal sizes)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    keep = labels != ignore_class if ignore_class is not None else np.ones_like(labels, bool)
    labels, predictions = labels[keep], predictions[keep]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"label {bad} is outside 0..{num_classes - 1} (and is not the ignore label {ignore_class})")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


@keras.saving.register_keras_serializable(package="kseg")
class ConfusionMatrixMetric(keras.metrics.Metric):
    """Streaming confusion matrix of a segmentation model; result() is a dict of the FCN scores.

    y_true: int labels [B, H, W, 1] or [B, H, W], `ignore_class` (255) ignored. y_pred: logits
    or probabilities [B, H, W, C] (argmax taken), or class maps when `sparse_y_pred=True`.
    `resize_labels=True` shrinks the labels (nearest) to the prediction's size, for stride-8
    logits. Labels other than 0..num_classes-1 and the ignore label raise at run time.
    In `model.fit` logs the scores appear as `mean_iou`, `val_mean_iou`, etc. (plus a
    `prefix` if given, for models with several such metrics).
    """

    def __init__(self, num_classes, ignore_class=IGNORE_LABEL, sparse_y_pred=False, resize_labels=False,
                 prefix="", name="confusion_matrix", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self.ignore_class = ignore_class
        self.sparse_y_pred = bool(sparse_y_pred)
        self.resize_labels = bool(resize_labels)
        self.prefix = prefix
        self.matrix = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", dtype="float64",
            aggregation="sum", name="matrix",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"{self.name}: sample_weight is not supported; label pixels 255 to ignore them")
        y_pred = tf.convert_to_tensor(y_pred)
        if not self.sparse_y_pred:
            y_pred = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        elif y_pred.shape.rank == 4:
            y_pred = y_pred[..., 0]
        y_true = tf.convert_to_tensor(y_true)
        if y_true.shape.rank == 4:
            y_true = y_true[..., 0]
        y_true = tf.cast(y_true, tf.int32)
        if self.resize_labels:
            y_true = resize_labels_nearest(y_true[..., None], (tf.shape(y_pred)[1], tf.shape(y_pred)[2]))[..., 0]
        y_true = tf.reshape(y_true, [-1])
        y_pred = tf.reshape(tf.cast(y_pred, tf.int32), [-1])
        if self.ignore_class is not None:
            keep = tf.not_equal(y_true, self.ignore_class)
            y_true, y_pred = tf.boolean_mask(y_true, keep), tf.boolean_mask(y_pred, keep)
        n = self.num_classes
        tf.debugging.assert_less(
            y_true, n,
            message=f"{self.name}: a label >= num_classes ({n}) that is not the ignore label {self.ignore_class}; "
                    "does the dataset have more classes than the model?",
        )
        tf.debugging.assert_non_negative(y_true, message=f"{self.name}: negative label")
        counts = tf.math.bincount(y_true * n + y_pred, minlength=n * n, maxlength=n * n, dtype=tf.float64)
        self.matrix.assign_add(tf.reshape(counts, (n, n)))

    def result(self):
        cm = tf.convert_to_tensor(self.matrix)
        n_ii = tf.linalg.diag_part(cm)
        t = tf.reduce_sum(cm, axis=1)
        pred = tf.reduce_sum(cm, axis=0)
        present = tf.cast(t > 0, tf.float64)
        n_cl = tf.reduce_sum(present)
        total = tf.reduce_sum(t)
        iou = tf.math.divide_no_nan(n_ii, t + pred - n_ii)
        scores = {
            "pixel_accuracy": tf.math.divide_no_nan(tf.reduce_sum(n_ii), total),
            "mean_accuracy": tf.math.divide_no_nan(tf.reduce_sum(tf.math.divide_no_nan(n_ii, t)), n_cl),
            "mean_iou": tf.math.divide_no_nan(tf.reduce_sum(iou * present), n_cl),
            "fw_iou": tf.math.divide_no_nan(tf.reduce_sum(t * iou), total),
        }
        return {self.prefix + k: tf.cast(v, tf.float32) for k, v in scores.items()}

    def confusion(self) -> np.ndarray:
        """The accumulated matrix as int64 NumPy (rows: truth, columns: prediction)."""
        return np.asarray(keras.ops.convert_to_numpy(self.matrix)).round().astype(np.int64)

    def reset_state(self):
        self.matrix.assign(tf.zeros_like(self.matrix))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_class": self.ignore_class,
                "sparse_y_pred": self.sparse_y_pred, "resize_labels": self.resize_labels, "prefix": self.prefix}


def iou_table(cm, class_names=None) -> list[dict]:
    """Per-class rows {class, index, iou, accuracy, pixels, predicted}; iou/accuracy None if absent."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}-class confusion matrix")
    rows = []
    for i in range(n):
        t, p, tp = cm[i].sum(), cm[:, i].sum(), cm[i, i]
        rows.append({
            "class": names[i], "index": i,
            "iou": float(tp / (t + p - tp)) if t > 0 else None,
            "accuracy": float(tp / t) if t > 0 else None,
            "pixels": int(t), "predicted": int(p),
        })
    return rows


# === Edges: BSDS ODS / OIS (kseg.tasks.bsds) ===

__all__ = ["ConfusionMatrixMetric", "SCORES", "confusion_matrix", "edge_ods_ois", "iou_table",
           "scores_from_confusion"]
