"""Decoders: raw outputs -> padded detections, as functions and Keras layers: SSD's
(ssd_postprocess, SSDDecoder) and Fast R-CNN's head (fast_rcnn_postprocess, FastRCNNDecoder).

SSD's is torchvision `SSD.postprocess_detections` (ssd.py) with its defaults, which are the SSD
paper's (Liu et al., ECCV 2016: confidence 0.01, NMS IoU 0.45, top 200 per image) and Caffe SSD's
DetectionOutput layer's (nms top_k 400, keep_top_k 200).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kseg.detection.anchors import prior_set, ssd_anchors
from kseg.detection.boxes import SSD_WEIGHTS, clip_boxes, decode
from kseg.detection.nms import METHODS, batched_class_nms


def ssd_postprocess(mbox_loc, mbox_conf, anchors, input_hw, *, score_threshold=0.01, top_k=400,
                    iou_threshold=0.45, max_detections=200, nms="combined"):
    """Detections from SSD's mbox_loc (B, A, 4) deltas and mbox_conf (B, A, C) logits (class 0
    background) over `anchors` (A, 4) xyxy pixels of an `input_hw` (height, width) input.

    Softmax over classes, decode with SSD_WEIGHTS, clip to the input, then per class c >= 1 the
    scores > score_threshold, their top_k, NMS at iou_threshold, and the max_detections best overall
    (torchvision `SSD.postprocess_detections`). Returns {"detection_boxes" (B, K, 4) float32,
    "detection_scores" (B, K), "detection_classes" (B, K) int32 class ids 1..C-1 (-1 padding),
    "num_detections" (B,) int32}, K = max_detections, each image's rows by score descending.
    nms: kseg.detection.nms's realisation ("combined", or "v5" for TFLite's builtin ops).
    """
    height, width = (int(v) for v in input_hw)
    scores = tf.nn.softmax(tf.cast(mbox_conf, tf.float32), axis=-1)
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    boxes = decode(tf.cast(mbox_loc, tf.float32), anchors[None], SSD_WEIGHTS)
    boxes = clip_boxes(boxes, height, width)
    boxes, scores, classes, num = batched_class_nms(
        boxes, scores[..., 1:], top_k=top_k, iou_threshold=iou_threshold, score_threshold=score_threshold,
        max_detections=max_detections, method=nms)
    classes = tf.where(classes >= 0, classes + 1, classes)  # columns 0.. of classes 1..: model class ids
    return {"detection_boxes": boxes, "detection_scores": scores, "detection_classes": classes,
            "num_detections": num}


@keras.saving.register_keras_serializable(package="kseg")
class SSDDecoder(keras.layers.Layer):
    """[mbox_loc (B, A, 4), mbox_conf (B, A, C) logits] -> ssd_postprocess's padded detections.

    The anchors are recomputed from `priors` and `input_hw` (and `feature_sizes`, see
    anchors.ssd_anchors), not stored: the config holds those and the thresholds only. nms picks
    kseg.detection.nms's realisation (both select the same detections); TFLite exports trace
    the layer with "v5".
    """

    inputs_from = ("mbox_loc", "mbox_conf")  # the model outputs it reads, in call order

    def __init__(self, priors="voc", input_hw=(300, 300), score_threshold=0.01, top_k=400, iou_threshold=0.45,
                 max_detections=200, feature_sizes=None, nms="combined", **kwargs):
        super().__init__(**kwargs)
        prior_set(priors)
        if score_threshold < 0:
            raise ValueError(f"score_threshold must be >= 0, got {score_threshold}")
        if nms not in METHODS:
            raise ValueError(f"nms must be one of {METHODS}, got {nms!r}")
        self.priors = priors
        self.nms = nms
        self.input_hw = tuple(int(v) for v in input_hw)
        self.score_threshold = float(score_threshold)
        self.top_k = int(top_k)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        self.feature_sizes = None if feature_sizes is None else [
            int(f) if np.ndim(f) == 0 else [int(v) for v in f] for f in feature_sizes]
        self.anchors = ssd_anchors(self.input_hw, priors, self.feature_sizes)

    def _check(self, num_anchors):
        if num_anchors is not None and num_anchors != len(self.anchors):
            raise ValueError(f"{self.name}: {num_anchors} boxes in, but {len(self.anchors)} anchors for priors "
                             f"{self.priors!r} at {self.input_hw}")

    def call(self, inputs):
        mbox_loc, mbox_conf = inputs
        self._check(mbox_loc.shape[1])
        return ssd_postprocess(mbox_loc, mbox_conf, tf.constant(self.anchors), self.input_hw,
                               score_threshold=self.score_threshold, top_k=self.top_k,
                               iou_threshold=self.iou_threshold, max_detections=self.max_detections, nms=self.nms)

    def compute_output_spec(self, inputs):
        mbox_loc = inputs[0]
        self._check(mbox_loc.shape[1])
        batch, k = mbox_loc.shape[0], self.max_detections
        return {"detection_boxes": keras.KerasTensor((batch, k, 4), "float32"),
                "detection_scores": keras.KerasTensor((batch, k), "float32"),
                "detection_classes": keras.KerasTensor((batch, k), "int32"),
                "num_detections": keras.KerasTensor((batch,), "int32")}

    def get_config(self):
        return {**super().get_config(), "priors": self.priors, "input_hw": list(self.input_hw),
                "score_threshold": self.score_threshold, "top_k": self.top_k,
                "iou_threshold": self.iou_threshold, "max_detections": self.max_detections,
                "feature_sizes": self.feature_sizes, "nms": self.nms}


# How a Fast R-CNN-style head's class columns become scores.
SCORE_FUNCTIONS = ("softmax", "sigmoid")


def fast_rcnn_postprocess(proposals, proposal_mask, cls_score, bbox_pred, image_hw, *, score_threshold=0.05,
                          iou_threshold=0.5, max_detections=100, min_size=1e-2, nms="combined", scores="softmax"):
    """Detections from Fast R-CNN's head over padded proposals (B, R, 4) with their mask (B, R):
    cls_score (B, R, C) logits (class 0 background), bbox_pred (B, R, 4C) class-specific deltas.

    torchvision `RoIHeads.postprocess_detections`: softmax, each class's box decoded with weights
    (10, 10, 5, 5) (Fast R-CNN's target normalisation by 0.1 / 0.2), clipped to the image,
    background dropped, scores > score_threshold, boxes of width or height < min_size dropped, NMS
    per class at iou_threshold, the best max_detections per image. Returns ssd_postprocess's dict.
    scores="sigmoid": each class's score is the sigmoid of its own column (R-CNN's per-class SVM
    scores: a monotone map, so each class's ranking is the SVM's).
    """
    if scores not in SCORE_FUNCTIONS:
        raise ValueError(f"scores must be one of {SCORE_FUNCTIONS}, got {scores!r}")
    cls_score = tf.cast(cls_score, tf.float32)
    scores = tf.nn.softmax(cls_score, axis=-1) if scores == "softmax" else tf.sigmoid(cls_score)
    num_classes = scores.shape[-1]
    shape = tf.shape(bbox_pred)
    deltas = tf.reshape(tf.cast(bbox_pred, tf.float32), tf.stack([shape[0], shape[1], num_classes, 4]))
    boxes = decode(deltas, tf.expand_dims(tf.cast(proposals, tf.float32), 2), SSD_WEIGHTS)
    height, width = tf.cast(image_hw[0], tf.float32), tf.cast(image_hw[1], tf.float32)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    x1, y1 = tf.clip_by_value(x1, 0.0, width), tf.clip_by_value(y1, 0.0, height)
    x2, y2 = tf.clip_by_value(x2, 0.0, width), tf.clip_by_value(y2, 0.0, height)
    big = ((x2 - x1) >= min_size) & ((y2 - y1) >= min_size)
    scores = tf.where(big & tf.expand_dims(tf.cast(proposal_mask, tf.bool), 2), scores, 0.0)
    boxes = tf.stack([x1, y1, x2, y2], axis=-1)[:, :, 1:]  # background dropped
    scores = scores[:, :, 1:]
    found_boxes, found_scores, classes, num = batched_class_nms(
        boxes, scores, top_k=int(proposals.shape[1]), iou_threshold=iou_threshold, score_threshold=score_threshold,
        max_detections=max_detections, method=nms)
    classes = tf.where(classes >= 0, classes + 1, classes)
    return {"detection_boxes": found_boxes, "detection_scores": found_scores, "detection_classes": classes,
            "num_detections": num}


@keras.saving.register_keras_serializable(package="kseg")
class FastRCNNDecoder(keras.layers.Layer):
    """[proposals, proposal_mask, cls_score, bbox_pred, image] -> fast_rcnn_postprocess's padded
    detections (the image only gives the size boxes are clipped to)."""

    # The model outputs it reads, in call order ("image": the model's input, for its size).
    inputs_from = ("proposals", "proposal_mask", "class_logits", "box_regression", "image")

    def __init__(self, score_threshold=0.05, iou_threshold=0.5, max_detections=100, min_size=1e-2, nms="combined",
                 scores="softmax", **kwargs):
        super().__init__(**kwargs)
        if nms not in METHODS:
            raise ValueError(f"nms must be one of {METHODS}, got {nms!r}")
        if scores not in SCORE_FUNCTIONS:
            raise ValueError(f"scores must be one of {SCORE_FUNCTIONS}, got {scores!r}")
        self.scores = scores
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        self.min_size = float(min_size)
        self.nms = nms

    def call(self, inputs):
        proposals, mask, cls_score, bbox_pred, image = inputs
        return fast_rcnn_postprocess(proposals, mask, cls_score, bbox_pred, tf.shape(image)[1:3],
                                     score_threshold=self.score_threshold, iou_threshold=self.iou_threshold,
                                     max_detections=self.max_detections, min_size=self.min_size, nms=self.nms,
                                     scores=self.scores)

    def compute_output_spec(self, inputs):
        batch, k = inputs[0].shape[0], self.max_detections
        return {"detection_boxes": keras.KerasTensor((batch, k, 4), "float32"),
                "detection_scores": keras.KerasTensor((batch, k), "float32"),
                "detection_classes": keras.KerasTensor((batch, k), "int32"),
                "num_detections": keras.KerasTensor((batch,), "int32")}

    def get_config(self):
        return {**super().get_config(), "score_threshold": self.score_threshold, "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections, "min_size": self.min_size, "nms": self.nms,
                "scores": self.scores}
