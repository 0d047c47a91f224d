"""Object detection: boxes, classes and scores per image from a detector's raw outputs.

A detector's Keras model returns its raw, fixed-shape training outputs (SSD: `mbox_loc`
(N, anchors, 4) box deltas and `mbox_conf` (N, anchors, classes) logits, class 0 background);
its decoder (kseg.detection) turns them into padded detections: `detection_boxes` (N, K, 4)
xyxy pixels of the network input, `detection_scores`, `detection_classes` (model class ids,
background excluded, -1 padding) and `num_detections`.

Exports follow the TF Object Detection API's serving outputs, so its clients work unchanged:
boxes normalised [ymin, xmin, ymax, xmax], classes 1-based as float32, num_detections float32
(tensorflow/models research/object_detection/exporter_lib_v2.py).

Detectors that take any input size (Faster R-CNN) run one image at a time at their test scale:
resized keeping the aspect ratio so that the shorter side is `min_size` and the longer at most
`max_size` (the registry spec's test_scales, `rescale`), their boxes divided by the scale back to the image's pixels.
"""

from __future__ import annotations

import math

import numpy as np

from kseg.tasks.base import Evaluator, Head, OutputReport, Task


def scale_rule(scales, layout=None) -> tuple[int, int] | None:
    """(min_size, max_size) of an any-size detector: `scales` is its registry spec's test_scales
    (per weight layout; each image is resized keeping its aspect ratio so that its shorter side is
    min_size, unless its longer side would then exceed max_size), `layout` the one it was built with
    (the first layout's when None or unknown); None when the spec gives none."""
    if not scales:
        return None
    return tuple(scales.get(layout, next(iter(scales.values()))))


def resolve_scale(scales, layout=None, min_size=None, max_size=None, name=None) -> tuple[int, int]:
    """The test scale of an any-size detector: its rule (scale_rule(scales, layout)), each of `min_size` /
    `max_size` given replacing the rule's value. Without a rule both must be given."""
    rule = scale_rule(scales, layout)
    if rule is None and (min_size is None or max_size is None):
        raise ValueError(f"{name or 'the detector'} takes images of any size and kseg knows no test scale "
                         "for it: pass both min_size and max_size (--min-size, --max-size)")
    values = (rule[0] if min_size is None else min_size, rule[1] if max_size is None else max_size)
    for name, value in zip(("min_size", "max_size"), values):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
    return int(values[0]), int(values[1])


def rescale(height, width, min_size, max_size) -> tuple[float, tuple[int, int]]:
    """(scale, (new_height, new_width)) of an image at the test scale (min_size, max_size).

    scale = min(min_size / shorter side, max_size / longer side), as py-faster-rcnn's
    lib/fast_rcnn/test.py `_get_image_blob` and torchvision's GeneralizedRCNNTransform.resize;
    the new sides are the scaled ones rounded to the nearest pixel (cv2.resize's, which
    py-faster-rcnn calls with fx = fy = scale), at least 1. Boxes found on the resized image map
    back to the original's pixels divided by `scale`. tf_rescale is the same in a graph.
    """
    h, w = float(height), float(width)
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return scale, (max(1, math.floor(h * scale + 0.5)), max(1, math.floor(w * scale + 0.5)))


def tf_rescale(images, min_size, max_size, method="bilinear"):
    """(resized images, scale float64) of a float batch (B, H, W, C) sharing one size: `rescale` in a graph."""
    import tensorflow as tf

    hw = tf.cast(tf.shape(images)[1:3], tf.float64)
    scale = tf.minimum(min_size / tf.reduce_min(hw), max_size / tf.reduce_max(hw))
    size = tf.maximum(tf.cast(tf.floor(hw * scale + 0.5), tf.int32), 1)
    return tf.image.resize(images, size, method=method), scale


class Detection(Task):
    name = "detection"
    description = "boxes, classes and scores per image (VOC mAP, COCO AP)"
    dense = False
    serving_key = "detection_classes"
    target_kind = "boxes"
    data_layouts = ("voc_detection", "coco_detection")
    # No validation score during fit (mAP needs the decoder and the whole set): the lowest val_loss.
    checkpoint_metric = "loss"
    checkpoint_mode = "min"

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        # The class scores (softmax over classes, background first): SSD's mbox_conf, Fast R-CNN's
        # head's class_logits.
        names = list(output_names)
        index = next((names.index(n) for n in ("mbox_conf", "class_logits") if n in names), len(names) - 1)
        return Head(index, "softmax")

    def loss(self, **options):
        """SSD's MultiBox loss, one instance for both outputs (targets: kseg.detection.losses)."""
        from kseg.detection.losses import MultiBoxLoss

        return MultiBoxLoss(**options)

    def fit_targets(self, labels, num_outputs):
        # The readers' encoded targets are already {"mbox_loc": (A, 5), "mbox_conf": (A,)}.
        return labels

    def random_targets(self, rng, batch, height, width, num_classes):
        raise NotImplementedError("detection targets are boxes matched to a model's anchors: "
                                  "kseg.detection.targets.ssd_targets")

    def compare_outputs(self, ref, out, tol, postprocess=None, images=None):
        """Raw outputs element-wise; the decoded detections (both runs must have all four) as sets
        per image (kseg.detection.compare): one report per detection output, their differences
        over matched detections. Scores within max(1e-5, tol["atol"]), boxes within 1e-3 of the
        input's larger side (tol["box"] overrides, as a fraction).

        Where both runs carry the raw outputs the decoder `postprocess` reads (and `images`, the
        batch they ran on, when it reads the image's size), each run's detections are compared with
        the decoder run on that run's own raw outputs, ties in NMS excused against the decoder's
        candidates: with the raw outputs equal within tolerance, that proves the detections. Two
        runs' detections compared with each other can also differ wherever two overlapping
        candidates score closer than the runs' raw outputs differ: that count is reported, not
        failed. Otherwise the runs' detections are compared directly."""
        from kseg.detection.compare import compare_detection_sets

        names = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")
        reports = super().compare_outputs({k: v for k, v in ref.items() if k not in names}, out, tol)
        if not all(k in ref and k in out for k in names):
            return reports
        size = max(getattr(postprocess, "input_hw", (300, 300)))
        score_atol, box_atol = max(1e-5, tol["atol"]), tol.get("box", 1e-3) * size
        settings = dict(score_atol=score_atol, box_atol=box_atol,
                        score_threshold=getattr(postprocess, "score_threshold", 0.0),
                        iou_threshold=getattr(postprocess, "iou_threshold", 0.5))
        direct = compare_detection_sets(ref, out, **settings)
        if _decodable(postprocess, ref, images) and _decodable(postprocess, out, images):
            sides = [compare_detection_sets(_decode(postprocess, run, images), run,
                                            candidates=_decode(postprocess, run, images, candidates=True), **settings)
                     for run in (ref, out)]
            found = _merged(sides)
            note = (f"as sets against the decoder on each run's raw outputs: {found.matched} matched, "
                    f"{found.excused} excused at a threshold, cut or NMS tie, {len(found.unmatched)} unmatched"
                    + (f" (first: {found.unmatched[:3]})" if found.unmatched else "")
                    + f"; run against run: {direct.matched} matched, {len(direct.unmatched)} apart")
        else:
            found = direct
            note = (f"as sets: {found.matched} matched, {found.excused} excused at a threshold or cut, "
                    f"{len(found.unmatched)} unmatched"
                    + (f" (first: {found.unmatched[:3]})" if found.unmatched else ""))
        diffs = {"detection_boxes": (direct.box_diffs, box_atol), "detection_scores": (direct.score_diffs, score_atol),
                 "detection_classes": ([0.0], 0.0), "num_detections": ([0.0], 0.0)}
        for name in names:
            diff, allowed = diffs[name]
            worst, mean = max(diff, default=0.0), float(np.mean(diff)) if diff else 0.0
            reports.append(OutputReport(name, tuple(np.shape(out[name])), worst, mean, 0.0, allowed, found.passed,
                                        None, 0, found.passed, note))
        return reports

    def evaluator(self, num_classes, head, class_names=None):
        return DetectionEvaluator(num_classes, class_names)

    def core_signatures(self, serving):
        """serving_default (float RGB 0..255 batch at the network size) and predict_images (encoded
        images, any size, each resized to the network input as torchvision's SSD transform does)
        with the Object Detection API's outputs; predict_images adds `image_size`.

        A detector that takes any input size, exported with its test scale as the serving's
        eval_transform (min_size, max_size[, interpolation]; kseg.serving.export gives it), gets
        any_size_signatures instead."""
        import tensorflow as tf

        if serving.postprocess is None:
            raise ValueError("this detector has no decoder to export (its registry spec names none)")
        if serving.any_size and serving.eval_transform:
            return any_size_signatures(serving)
        h, w = serving.network_size
        c = serving.channels

        def detect(images):
            found = serving.postprocess(serving.outputs(images), images)
            return od_api_outputs(found, (h, w))

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="images")])
        def serving_default(images):
            return detect(images)

        def decode(data):
            image, size = serving.decode(data)
            resized = tf.image.resize(tf.cast(image, tf.float32), (h, w), method="bilinear")
            return tf.ensure_shape(resized, [h, w, c]), size

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def predict_images(image_bytes):
            images, sizes = tf.map_fn(decode, image_bytes, fn_output_signature=(
                tf.TensorSpec([h, w, c], tf.float32), tf.TensorSpec([2], tf.int32)))
            # Boxes are normalised: the same numbers for the original image (the resize is per axis).
            return {**detect(images), "image_size": tf.identity(sizes, name="image_size")}

        return {"serving_default": serving_default, "predict_images": predict_images}


def _decodable(decoder, run, images):
    """Whether `decoder` can run on a run's outputs: it is a kseg decoder layer and the run has what it reads."""
    reads = getattr(decoder, "inputs_from", None)
    return reads is not None and all(n in run if n != "image" else images is not None for n in reads)


def _decode(decoder, run, images, candidates=False):
    """The decoder's padded detections of a run's raw outputs ({name: array}); candidates=True:
    every box it scores, before NMS (IoU threshold 1: no box suppresses another)."""
    if candidates:
        capacity = max(int(np.prod(np.shape(run[n])[1:])) for n in decoder.inputs_from if n != "image")
        decoder = type(decoder).from_config({**decoder.get_config(), "iou_threshold": 1.0,
                                             "max_detections": capacity})
    found = decoder([images if n == "image" else run[n] for n in decoder.inputs_from])
    return {k: np.asarray(v) for k, v in found.items()}


def _merged(sides):
    """One SetComparison of several (each run against its own decoding), unmatched ones labelled by run."""
    from kseg.detection.compare import SetComparison

    found = SetComparison(sum(s.matched for s in sides), sum(s.excused for s in sides), [], 0.0, 0.0)
    for run, side in zip(("reference", "converted"), sides):
        found.unmatched += [(image, run if where == "b" else f"{run}'s decoder", cls, score)
                            for image, where, cls, score in side.unmatched]
    return found


def any_size_signatures(serving):
    """An any-size detector's serving_default and predict_images at its test scale
    (serving.eval_transform = (min_size, max_size[, interpolation])), Object Detection API outputs.

    serving_default: a float RGB 0..255 batch of any H x W (one size for the batch), resized by
    tf_rescale and run as one batch. predict_images: encoded images of any sizes, each decoded,
    resized by its own scale and run alone (tf.map_fn, one image at a time), with `image_size`.
    Boxes are normalised to the original image: the decoder's pixels of the resized image divided
    by the scale and by the original size, clipped to [0, 1] (as the OD API's exported
    keep-aspect-ratio Faster R-CNNs report them).
    """
    import tensorflow as tf

    min_size, max_size = (int(v) for v in serving.eval_transform[:2])
    method = serving.eval_transform[2] if len(serving.eval_transform) > 2 else "bilinear"
    c = serving.channels

    def detect(images):
        resized, scale = tf_rescale(images, min_size, max_size, method)
        found = serving.postprocess(serving.outputs(resized), resized)
        # Normalising by the original size times the scale = mapping back, then normalising.
        out = od_api_outputs(found, tf.cast(tf.cast(tf.shape(images)[1:3], tf.float64) * scale, tf.float32))
        return {**out, "detection_boxes": tf.clip_by_value(out["detection_boxes"], 0.0, 1.0,
                                                           name="detection_boxes")}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, c], tf.float32, name="images")])
    def serving_default(images):
        return detect(images)

    def one(data):
        image, size = serving.decode(data)
        found = detect(tf.cast(image, tf.float32)[None])
        return {k: v[0] for k, v in found.items()}, size

    outputs = {"detection_boxes": tf.TensorSpec([None, 4], tf.float32),
               **{k: tf.TensorSpec([None], tf.float32) for k in ("detection_scores", "detection_classes")},
               "num_detections": tf.TensorSpec([], tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def predict_images(image_bytes):
        found, sizes = tf.map_fn(one, image_bytes, parallel_iterations=1,
                                 fn_output_signature=(outputs, tf.TensorSpec([2], tf.int32)))
        return {**{k: tf.identity(v, name=k) for k, v in found.items()},
                "image_size": tf.identity(sizes, name="image_size")}

    return {"serving_default": serving_default, "predict_images": predict_images}


class DetectionEvaluator(Evaluator):
    """VOC mAP (VOC07 11-point and all-point, difficult objects excluded, IoU > 0.5) and COCO AP
    (AP@[.5:.95], AP50, AP75) of decoded detections against a reader's padded ground truth; for
    COCO, difficult objects count as crowd regions (detections on them are ignored, as VOC ignores them).

    update(ground_truth, detections): ground truth {"boxes" (B, M, 4), "classes" (B, M) (-1
    padding), "difficult" (B, M)} in the detections' pixel frame; detections the decoder's
    (detection_boxes, detection_scores, detection_classes, num_detections). result():
    {"map_voc07", "map_voc", "per_class": [...], "coco": {"ap", "ap50", "ap75", ...}, "count"}.
    """

    def __init__(self, num_classes, class_names=None):
        from kseg.detection.eval_voc import VOCDetectionEvaluator

        self.num_classes = int(num_classes)
        self.class_names = list(class_names or [])
        self.voc = VOCDetectionEvaluator(self.num_classes)
        self.coco_gt, self.coco_dt = [], []
        self.images = 0

    def update(self, labels, outputs):
        import numpy as np

        gt = {k: np.asarray(labels[k]) for k in ("boxes", "classes", "difficult") if k in labels}
        det = {k: np.asarray(v) for k, v in outputs.items()}
        self.voc.update(gt, det)
        for i in range(len(gt["classes"])):
            image_id = self.images + i + 1
            keep = gt["classes"][i] >= 0
            for box, cls, hard in zip(gt["boxes"][i][keep], gt["classes"][i][keep],
                                      gt.get("difficult", np.zeros_like(gt["classes"]))[i][keep]):
                w, h = float(box[2] - box[0]), float(box[3] - box[1])
                self.coco_gt.append({"id": len(self.coco_gt) + 1, "image_id": image_id, "category_id": int(cls),
                                     "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h,
                                     "iscrowd": int(bool(hard))})
            n = int(det["num_detections"][i])
            for box, score, cls in zip(det["detection_boxes"][i][:n], det["detection_scores"][i][:n],
                                       det["detection_classes"][i][:n]):
                self.coco_dt.append({"image_id": image_id, "category_id": int(cls), "score": float(score),
                                     "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                              float(box[3] - box[1])]})
        self.images += len(gt["classes"])

    def result(self) -> dict:
        from kseg.detection.eval_coco import coco_eval

        out = self.voc.result()
        for row in out["per_class"]:
            c = row["class"]
            row["name"] = self.class_names[c] if c < len(self.class_names) else str(c)
        out["per_class"] = out["per_class"][1:]  # class 0 is background
        ground_truth = {"images": [{"id": i + 1} for i in range(self.images)],
                        "annotations": self.coco_gt,
                        "categories": [{"id": c} for c in range(1, self.num_classes)]}
        coco = coco_eval(ground_truth, self.coco_dt)
        out["coco"] = {k: coco[k] for k in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")}
        out["count"] = self.images
        return out


def od_api_outputs(found, network_size):
    """Decoder outputs (xyxy pixels of the network input, model class ids, -1 padding) -> the Object
    Detection API's: normalised [ymin, xmin, ymax, xmax], 1-based classes and counts as float32.
    network_size: the input's (h, w), numbers or a float32 tensor of two."""
    import tensorflow as tf

    if isinstance(network_size, tf.Tensor):
        h, w = tf.unstack(network_size)
    else:
        h, w = (float(v) for v in network_size)
    x1, y1, x2, y2 = tf.unstack(tf.cast(found["detection_boxes"], tf.float32), axis=-1)
    boxes = tf.stack([y1 / h, x1 / w, y2 / h, x2 / w], axis=-1)
    classes = tf.cast(tf.maximum(found["detection_classes"], 0), tf.float32)  # padding: 0, score 0
    return {"detection_boxes": tf.identity(boxes, name="detection_boxes"),
            "detection_scores": tf.identity(tf.cast(found["detection_scores"], tf.float32), name="detection_scores"),
            "detection_classes": tf.identity(classes, name="detection_classes"),
            "num_detections": tf.identity(tf.cast(found["num_detections"], tf.float32), name="num_detections")}


DETECTION = Detection()
