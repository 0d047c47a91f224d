"""R-CNN's three training stages (Girshick et al., CVPR 2014, sections 2.3 and appendices B, C) for
kseg's rcnn_alexnet, run by one `model.fit` plus `finish`:

1. **Fine-tuning** (`fit`, the train_step here): the CNN learns a (C)-way softmax classifier on warped
   proposals, a new layer replacing ImageNet's 1000-way fc8 and dropped afterwards. Windows at IoU
   >= 0.5 with a ground-truth box are that box's class, the rest background; each batch holds 25%
   foreground (the paper: 32 foreground and 96 background windows in batches of 128). The ground-truth
   boxes join the candidates (as R-CNN's window files list them). Unlike R-CNN's window data layer,
   which draws windows from the whole training set, a batch's windows come from its images
   (`rois_per_image` each).
2. **SVMs** (`finish`): one linear SVM per class on fc7 features scaled to a mean norm of 20
   (rcnn_feature_stats / feat_norm_mean in rbgirshick/rcnn), positives the ground-truth boxes only,
   negatives the windows under 0.3 IoU with every box of the class, with R-CNN's hard negative mining
   (rbgirshick/rcnn rcnn_train.m: every positive collected first; then one pass over the images, all
   of the first image's negatives taken and the SVMs trained, afterwards a window is hard when its
   score is > -1.0001, the SVMs retrain once a class has gained 2000 hard negatives and after the last
   image, and each retraining evicts the negatives scoring < -1.2). kseg's SVMs are the detector's
   `svm` Dense layer trained with the squared hinge loss (0.5 ||w||^2 + C sum_i c_i max(0, 1 - y_i
   s_i)^2, C = 0.001, positives weighted 2, Adam on mini-batches with a cosine decay; within 1% of
   the optimum in tests/test_rcnn.py) where R-CNN ran liblinear's L1-hinge dual solver (-s 3) with a
   regularised bias feature of 10: the same margin idea with a smooth loss, an unregularised bias
   and an approximate optimum.
3. **Box regression** (`finish`, appendix C): per class, ridge regression (lambda = 1000) from pool5
   features (scaled as above) of the windows at IoU > 0.6 with a ground-truth box to that box's
   deltas, solved in closed form (float64, the bias unregularised). R-CNN additionally whitened the
   targets; kseg regresses the deltas of its Fast R-CNN coder (weights 10, 10, 5, 5), a per-column
   scale that ridge regression carries through to the same boxes up to the regularisation's weight.

The feature scales are folded into the `svm` and `bbox_reg` kernels, so the saved detector takes
raw features. `save` writes the detector.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kseg.detection import rcnn_targets as rt
from kseg.detection.boxes import SSD_WEIGHTS, encode

SETTINGS = dict(
    rois_per_image=64, fg_fraction=0.25, fg_iou=0.5, bg_iou=(0.0, 0.5),  # stage 1
    feature_norm=20.0, svm_c=1e-3, svm_pos_weight=2.0, svm_neg_iou=0.3, hard_threshold=-1.0001,
    evict_threshold=-1.2, retrain_limit=2000, svm_epochs=30, svm_batch=256, svm_lr=3e-2,  # stage 2
    bbox_iou=0.6, bbox_lambda=1000.0,  # stage 3
)


@keras.saving.register_keras_serializable(package="kseg")
class RCNNStages(keras.Model):
    """R-CNN training of `detector` (an rcnn_alexnet with raw outputs): module docstring."""

    def __init__(self, detector, seed=0, **settings):
        super().__init__(name=f"{detector.name}_trainer")
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown R-CNN training settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
        try:
            crops, svm, regression = (detector.get_layer(n) for n in ("crops", "svm", "bbox_reg"))
        except ValueError:
            raise ValueError(f"{detector.name}: RCNNStages trains kseg's rcnn_alexnet built with postprocess=False "
                             "(layers crops, svm, bbox_reg)") from None
        self.detector = detector
        self.settings = {**SETTINGS, **settings}
        self.seed = int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.crops, self.svm, self.regression = crops, svm, regression
        self.features = keras.Model(crops.output, [regression.input, svm.input], name="rcnn_features")
        self.num_classes = svm.units + 1
        self.classifier = keras.layers.Dense(self.num_classes, name="finetune_cls")
        self.classifier.build(svm.input.shape)
        self.trackers = {"loss": keras.metrics.Mean(name="loss"), "accuracy": keras.metrics.Mean(name="accuracy")}
        self.built = True

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        return self.detector(inputs, training=training)

    # --- stage 1 ---------------------------------------------------------------------------

    def _windows(self, x, y):
        s = self.settings
        proposals = tf.cast(x["proposals"], tf.float32)
        mask = (proposals[..., 2] > proposals[..., 0]) & (proposals[..., 3] > proposals[..., 1])
        rois, labels, _, valid = rt.roi_targets(
            proposals, mask, y["boxes"], tf.cast(y["classes"], tf.int32), self.seed_generator,
            batch_size=s["rois_per_image"], fg_fraction=s["fg_fraction"], fg_iou=s["fg_iou"],
            bg_iou=tuple(s["bg_iou"]))
        return rois, tf.reshape(labels, [-1]), tf.reshape(valid, [-1])

    def _loss(self, x, y, training):
        rois, labels, valid = self._windows(x, y)
        _, fc7 = self.features(self.crops([x["image"], rois]), training=training)
        logits = self.classifier(fc7)
        weight = tf.cast(valid, tf.float32)
        count = tf.maximum(tf.reduce_sum(weight), 1.0)
        loss = tf.reduce_sum(weight * tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)) / count
        right = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        return loss, tf.reduce_sum(weight * right) / count

    def train_step(self, data):
        x, y = data[0], data[1]
        with tf.GradientTape() as tape:
            loss, accuracy = self._loss(x, y, training=True)
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.features.trainable_variables + self.classifier.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        return self._report(loss, accuracy)

    def test_step(self, data):
        return self._report(*self._loss(data[0], data[1], training=False))

    def _report(self, loss, accuracy):
        self.trackers["loss"].update_state(loss)
        self.trackers["accuracy"].update_state(accuracy)
        return {n: t.result() for n, t in self.trackers.items()}

    # --- stages 2 and 3 ----------------------------------------------------------------------

    def finish(self, dataset, *, on_batch=None):
        """Stages 2 and 3 on `dataset` (the fine-tuning batches): a first pass for the feature scale and
        the positives (every ground-truth box's fc7), a second for hard negative mining and the box
        regression samples; sets the detector's `svm` and `bbox_reg` weights. on_batch(): called after
        each batch of either pass (a progress bar over 2 x the batches). Returns a summary dict."""
        s = self.settings
        extract = tf.function(self._extract)
        k = self.num_classes - 1
        scales, positives, labels = None, [], []
        for x, y in dataset:  # pass 1 (rcnn_feature_stats, get_positive_pool5_features)
            boxes, valid, _, gt_classes = _windows_of(x, y)
            if scales is None:  # R-CNN scales features to a mean norm of 20; kseg measures the first batch
                pool5, fc7 = (a.numpy().reshape(valid.shape + (-1,)) for a in extract(x["image"], boxes))
                scales = tuple(s["feature_norm"] / max(float(np.mean(np.linalg.norm(f[valid], axis=1))), 1e-12)
                               for f in (pool5, fc7))
            gt = gt_classes >= 0
            _, fc7 = extract(x["image"], y["boxes"])
            positives.append(fc7.numpy().reshape(gt.shape + (-1,))[gt] * scales[1])
            labels.append(np.eye(k, dtype=np.float32)[gt_classes[gt] - 1])
            if on_batch is not None:
                on_batch()
        if scales is None:
            raise ValueError("R-CNN's SVM stage got an empty dataset")
        miner = _HardNegatives(np.concatenate(positives), np.concatenate(labels), s, self.seed)
        regression = {"x": [], "t": [], "c": []}
        images = 0
        for x, y in dataset:  # pass 2 (rcnn_train.m's hard negative epoch; rcnn_train_bbox_regressor.m)
            boxes, valid, iou, gt_classes = _windows_of(x, y)
            pool5, fc7 = (a.numpy().reshape(valid.shape + (-1,)) for a in extract(x["image"], boxes))
            for b in range(len(valid)):
                keep = valid[b]
                negatives = np.minimum(_svm_labels(iou[b][keep], gt_classes[b], k, s["svm_neg_iou"]), 0.0)
                miner.add(fc7[b][keep] * scales[1], negatives)
                best = iou[b][keep].max(axis=1) if iou[b].shape[1] else np.zeros(keep.sum())
                near = best > s["bbox_iou"]
                if near.any():
                    match = iou[b][keep][near].argmax(axis=1)
                    gt = y["boxes"][b].numpy()[match]
                    regression["x"].append(pool5[b][keep][near] * scales[0])
                    regression["t"].append(encode(gt, boxes[b].numpy()[keep][near], SSD_WEIGHTS).numpy())
                    regression["c"].append(gt_classes[b][match] - 1)
                images += 1
            if on_batch is not None:
                on_batch()
        miner.retrain()  # the last image's update
        kernel, bias = miner.weights()
        self.svm.set_weights([kernel * scales[1], bias])
        w, b, counts = ridge_per_class(regression, k, s["bbox_lambda"], self.regression.kernel.shape[0])
        self.regression.set_weights([w * scales[0], b])
        return {"images": images, "svm_cache": miner.size, "svm_retrainings": miner.retrainings,
                "svm_positives": miner.positives, "regression_windows": counts.tolist(),
                "feature_scales": {"pool5": scales[0], "fc7": scales[1]}}

    def _extract(self, image, boxes):
        return self.features(self.crops([image, boxes]), training=False)

    def save(self, filepath, *args, **kwargs):
        """Save the wrapped detector (a checkpoint of the trainer is a detector file)."""
        return self.detector.save(filepath, *args, **kwargs)

    def get_config(self):
        return {"detector": keras.saving.serialize_keras_object(self.detector), "seed": self.seed, **self.settings}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        detector = keras.saving.deserialize_keras_object(config.pop("detector"))
        return cls(detector, **config)


def _windows_of(x, y):
    """A batch's windows: its ground-truth boxes then its proposals, (B, M + R, 4); valid (B, M + R);
    IoU (B, M + R, M) with the image's ground truth (numpy, -1 for padding boxes); classes (B, M), -1 padding."""
    proposals = tf.cast(x["proposals"], tf.float32)
    gt_boxes, gt_classes = tf.cast(y["boxes"], tf.float32), y["classes"].numpy().astype(np.int64)
    boxes = tf.concat([gt_boxes, proposals], axis=1)
    real = (proposals[..., 2] > proposals[..., 0]) & (proposals[..., 3] > proposals[..., 1])
    valid = np.concatenate([gt_classes >= 0, real.numpy()], axis=1)
    iou = rt.batch_iou(boxes, gt_boxes).numpy()
    iou = np.where((gt_classes >= 0)[:, None, :], iou, -1.0)
    return boxes, valid, iou, gt_classes


def _svm_labels(iou, gt_classes, num_foreground, neg_iou):
    """(N, K) labels in {+1, -1, 0} of N windows (the first ones may be the image's GT boxes, IoU 1
    with themselves): +1 a ground-truth box of the class, -1 under neg_iou with every box of it."""
    n = len(iou)
    labels = np.zeros((n, num_foreground), np.float32)
    for k in range(num_foreground):
        of_class = gt_classes == k + 1
        best = iou[:, of_class].max(axis=1) if of_class.any() else np.zeros(n)
        labels[best < neg_iou, k] = -1.0
        labels[(iou[:, of_class] >= 1.0 - 1e-6).any(axis=1) if of_class.any() else np.zeros(n, bool), k] = 1.0
    return labels


class _HardNegatives:
    """R-CNN's SVM training with a hard-negative cache (rcnn_train.m), over scaled fc7 rows: the
    positives fixed, negatives added when hard (all of the first image's), the SVMs retrained after the
    first image, whenever a class has gained retrain_limit hard negatives, and at the end; each
    retraining evicts the class's negatives scoring below evict_threshold. R-CNN retrains only the class
    over its limit; kseg fits all classes at once (a convex fit on the current cache, so an extra
    update changes nothing the next one would not)."""

    def __init__(self, x_pos, y_pos, settings, seed):
        self.s, self.seed = settings, seed
        self.x_pos, self.y_pos = x_pos.astype(np.float32), y_pos.astype(np.float32)
        self.k = self.y_pos.shape[1]
        self.x = np.zeros((0, self.x_pos.shape[1]), np.float32)
        self.y = np.zeros((0, self.k), np.float32)
        self.kernel = self.bias = None
        self.added = np.zeros(self.k, np.int64)
        self.retrainings = 0

    @property
    def size(self):
        return len(self.x_pos) + len(self.x)

    @property
    def positives(self):
        return len(self.x_pos)

    def _scores(self, x):
        if self.kernel is None:
            return np.zeros((len(x), self.k), np.float32)
        return x @ self.kernel + self.bias

    def add(self, x, negatives):
        """x (n, D) windows of one image, negatives (n, K): -1 where a window is a negative of the class."""
        first = self.kernel is None
        hard = (negatives < 0) & (first | (self._scores(x) > self.s["hard_threshold"]))
        keep = hard.any(axis=1)
        if keep.any():
            self.x = np.concatenate([self.x, x[keep].astype(np.float32)])
            self.y = np.concatenate([self.y, np.where(hard[keep], -1.0, 0.0).astype(np.float32)])
        self.added += hard.sum(axis=0)
        if first or (self.added > self.s["retrain_limit"]).any():
            self.retrain()

    def retrain(self):
        if not len(self.x) and not len(self.x_pos):
            return
        x, y = np.concatenate([self.x_pos, self.x]), np.concatenate([self.y_pos, self.y])
        self.kernel, self.bias = fit_linear_svms(x, y, c=self.s["svm_c"], pos_weight=self.s["svm_pos_weight"],
                                                 epochs=self.s["svm_epochs"], batch=self.s["svm_batch"],
                                                 lr=self.s["svm_lr"], seed=self.seed + self.retrainings,
                                                 init=(self.kernel, self.bias))
        easy = (self.y < 0) & (self._scores(self.x) < self.s["evict_threshold"])
        self.y = np.where(easy, 0.0, self.y).astype(np.float32)
        keep = (self.y != 0).any(axis=1)
        self.x, self.y = self.x[keep], self.y[keep]
        self.added[:] = 0
        self.retrainings += 1

    def weights(self):
        if self.kernel is None:
            raise ValueError("R-CNN's SVM stage found no training windows")
        return self.kernel, self.bias


def svm_objective(kernel, bias, x, y, *, c, pos_weight):
    """Per class k: 0.5 ||w_k||^2 + c sum_i c_i max(0, 1 - y_ik s_ik)^2 over the rows with y_ik != 0
    (c_i = pos_weight for positives): the L2-regularised squared-hinge SVM (liblinear -s 1/2's primal)."""
    scores = x @ kernel + bias
    weight = np.where(y > 0, pos_weight, np.where(y < 0, 1.0, 0.0))
    return 0.5 * (kernel ** 2).sum(axis=0) + c * (weight * np.maximum(0.0, 1.0 - y * scores) ** 2).sum(axis=0)


def fit_linear_svms(x, y, *, c=1e-3, pos_weight=2.0, epochs=30, batch=256, lr=3e-2, seed=0, init=(None, None)):
    """One linear SVM per column of y (n, K) in {+1, -1, 0 (not an example of that class)} on x (n, D):
    svm_objective minimised with Adam on mini-batches (each class's objective divided by c times its
    example count, so one learning rate suits every class). Returns (kernel (D, K), bias (K,)) numpy."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    n, d = x.shape
    k = y.shape[1]
    kernel = tf.Variable(np.zeros((d, k), np.float32) if init[0] is None else init[0].astype(np.float32))
    bias = tf.Variable(np.zeros((k,), np.float32) if init[1] is None else init[1].astype(np.float32))
    counts = tf.constant(np.maximum((y != 0).sum(axis=0), 1).astype(np.float32))
    steps = max(1, int(epochs) * -(-n // int(batch)))
    # Adam with a cosine decay to 0: the noise of the mini-batch gradients dies out at the end.
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps))
    rows = float(n)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            scores = tf.matmul(xb, kernel) + bias
            weight = tf.where(yb > 0, pos_weight, tf.where(yb < 0, 1.0, 0.0))
            data = tf.reduce_sum(weight * tf.square(tf.nn.relu(1.0 - yb * scores)), axis=0)
            share = rows / tf.cast(tf.shape(xb)[0], tf.float32)  # the batch's estimate of the sum
            loss = tf.reduce_sum((0.5 * tf.reduce_sum(tf.square(kernel), axis=0) / c + share * data) / counts)
        optimizer.apply(tape.gradient(loss, [kernel, bias]), [kernel, bias])

    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(n, seed=seed).batch(batch)
    for _ in range(int(epochs)):
        for xb, yb in data:
            step(xb, yb)
    return kernel.numpy(), bias.numpy()


def ridge_per_class(samples, num_classes, lam, dims):
    """Class-specific ridge regression: samples {"x": [(n, D)], "t": [(n, 4)], "c": [(n,) 0-based]} ->
    (kernel (D, 4K), bias (4K,), counts (K,)); a class without samples regresses 0. The bias is not
    regularised (centred data); the smaller of the primal (D x D) and dual (n x n) systems is solved."""
    kernel = np.zeros((dims, 4 * num_classes), np.float32)
    bias = np.zeros((4 * num_classes,), np.float32)
    counts = np.zeros(num_classes, np.int64)
    if not samples["x"]:
        return kernel, bias, counts
    x, t, c = (np.concatenate(samples[key]) for key in ("x", "t", "c"))
    for k in range(num_classes):
        rows = c == k
        counts[k] = rows.sum()
        if not counts[k]:
            continue
        w, b = ridge(x[rows], t[rows], lam)
        kernel[:, 4 * k:4 * k + 4], bias[4 * k:4 * k + 4] = w, b
    return kernel, bias, counts


def ridge(x, t, lam):
    """argmin_w,b ||x w + b - t||^2 + lam ||w||^2 in float64: (w (D, m), b (m,))."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    mx, mt = x.mean(axis=0), t.mean(axis=0)
    xc, tc = x - mx, t - mt
    n, d = xc.shape
    if d <= n:
        w = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ tc)
    else:  # (X'X + lam I)^-1 X' = X' (X X' + lam I)^-1
        w = xc.T @ np.linalg.solve(xc @ xc.T + lam * np.eye(n), tc)
    return w, mt - mx @ w
