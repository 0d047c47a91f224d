"""PASCAL VOC detection mAP in NumPy, as py-faster-rcnn's `lib/datasets/voc_eval.py` computes it
(Girshick; the same rules as the VOC devkit's VOCevaldet.m and Caffe SSD's DetectionEvaluate).

Per class:

1. The class's detections of all images, sorted by score, highest first. kseg's sort is stable
   (ties keep image order, then the order within the image); voc_eval.py's `np.argsort(-confidence)`
   is not, so with tied scores it may rank them either way.
2. Each detection in turn: its overlap with the class's ground truth (GT) boxes of its image, IoU with
   VOC's inclusive pixel widths `x2 - x1 + 1` (`plus_one=True`, for VOC's 1-based integer corners) or
   plain `x2 - x1` (`plus_one=False`, for continuous corners such as kseg's (xmin - 1, ymin - 1,
   xmax, ymax), whose widths are already VOC's). The max-IoU GT (first on ties) is a match when the
   IoU is strictly above the threshold (`ovmax > ovthresh`; VOCevaldet.m writes `ovmax >= 0.5`).
   A match on a difficult GT counts as neither a true nor a false positive; a match on a GT already
   taken by a higher-scoring detection, or no match, is a false positive.
3. Recall = cumulative TP / npos, npos the number of non-difficult GT; precision = TP / max(TP + FP,
   eps). AP by `voc_ap`: VOC2007's 11-point interpolation (Caffe SSD's `ap_version "11point"`) or
   VOC2010's all-point area under the precision envelope.

`use_difficult=True` treats difficult GT as ordinary ones (counted in npos, matched as TP), as the
`use_diff` option of later voc_eval.py versions does. A class with npos = 0 has no AP (None) and is
left out of the mean.

Input: one mapping per image (or a batch of them, `VOCDetectionEvaluator.update`), NumPy arrays or
anything `np.asarray` accepts:

- ground truth: "boxes" (M, 4) xyxy, "classes" (M,) int, optional "difficult" (M,) bool;
- detections: "boxes" (K, 4) xyxy, "scores" (K,), "classes" (K,) int, or kseg's decoder names
  "detection_boxes", "detection_scores", "detection_classes"; an optional "num_detections" keeps only
  the first rows.

Class ids are in [0, num_classes); a negative class marks a padding row, which is skipped (kseg's
padded batches use -1). Boxes of a detection and its GT must share one coordinate frame.
"""

from __future__ import annotations

import numpy as np

# np.arange(0., 1.1, 0.1), as voc_eval.py writes it: 0.30000000000000004, 0.6000000000000001 and
# 0.7000000000000001 lie just above 0.3, 0.6, 0.7, so a recall of exactly 3/10 does not reach t = 0.3.
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


def voc_ap(recall, precision, use_07_metric=False):
    """AP from a ranked list's recall and precision arrays: voc_eval.py's `voc_ap`.

    use_07_metric: the mean over the 11 recall points t = 0, 0.1, ..., 1.0 of the highest precision at
    recall >= t (0 where no recall reaches t). Otherwise the all-point AP: the precision envelope
    (precision made non-increasing from the right, with sentinels recall 0 / 1, precision 0 / 0),
    summed as delta-recall x precision over the points where recall changes.
    """
    rec = np.asarray(recall, np.float64).reshape(-1)
    prec = np.asarray(precision, np.float64).reshape(-1)
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_POINTS:
            reached = rec >= t
            p = np.max(prec[reached]) if np.any(reached) else 0.0
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def overlaps(box, boxes, plus_one=True):
    """IoU [M] of one xyxy box against boxes [M, 4], in voc_eval.py's operation order; with plus_one,
    widths and heights are `x2 - x1 + 1` (VOC's inclusive pixels)."""
    one = 1.0 if plus_one else 0.0
    bb = np.asarray(box, np.float64)
    gt = np.asarray(boxes, np.float64).reshape(-1, 4)
    ixmin = np.maximum(gt[:, 0], bb[0])
    iymin = np.maximum(gt[:, 1], bb[1])
    ixmax = np.minimum(gt[:, 2], bb[2])
    iymax = np.minimum(gt[:, 3], bb[3])
    iw = np.maximum(ixmax - ixmin + one, 0.0)
    ih = np.maximum(iymax - iymin + one, 0.0)
    inters = iw * ih
    uni = ((bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
           + (gt[:, 2] - gt[:, 0] + one) * (gt[:, 3] - gt[:, 1] + one) - inters)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(uni > 0, inters / np.where(uni > 0, uni, 1.0), 0.0)


def match_image(det_boxes, det_scores, gt_boxes, gt_difficult, iou_threshold=0.5, plus_one=True):
    """TP and FP flags of one image's detections of one class against that image's GT of the class.

    Returns (order, tp, fp): `order` the detections' indices by score, highest first (stable), `tp` and
    `fp` float64 [K] in that order. A detection on a difficult GT has tp = fp = 0.
    """
    det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
    det_scores = np.asarray(det_scores, np.float64).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    gt_difficult = np.asarray(gt_difficult, bool).reshape(-1)
    order = np.argsort(-det_scores, kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    taken = np.zeros(len(gt_boxes), bool)
    for d, k in enumerate(order):
        ovmax = -np.inf
        if len(gt_boxes):
            ov = overlaps(det_boxes[k], gt_boxes, plus_one)
            jmax = int(np.argmax(ov))
            ovmax = ov[jmax]
        if ovmax > iou_threshold:
            if not gt_difficult[jmax]:
                if not taken[jmax]:
                    tp[d] = 1.0
                    taken[jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    return order, tp, fp


# === inputs ===


def _field(mapping, *names, default=None):
    for name in names:
        if name in mapping and mapping[name] is not None:
            return mapping[name]
    if default is not None:
        return default
    raise KeyError(f"missing {' / '.join(repr(n) for n in names)} (has {sorted(mapping)})")


def _ground_truth(gt):
    """(boxes [M, 4], classes [M], difficult [M]) of one image, padding rows dropped."""
    boxes = np.asarray(_field(gt, "boxes"), np.float64).reshape(-1, 4)
    classes = np.asarray(_field(gt, "classes"), np.int64).reshape(-1)
    difficult = gt.get("difficult")
    difficult = np.zeros(len(classes), bool) if difficult is None else np.asarray(difficult, bool).reshape(-1)
    if not len(boxes) == len(classes) == len(difficult):
        raise ValueError(f"ground truth rows differ: {len(boxes)} boxes, {len(classes)} classes, "
                         f"{len(difficult)} difficult flags")
    keep = classes >= 0
    return boxes[keep], classes[keep], difficult[keep]


def _detections(det):
    """(boxes [K, 4], scores [K], classes [K]) of one image, rows past num_detections and padding dropped."""
    boxes = np.asarray(_field(det, "boxes", "detection_boxes"), np.float64).reshape(-1, 4)
    scores = np.asarray(_field(det, "scores", "detection_scores"), np.float64).reshape(-1)
    classes = np.asarray(_field(det, "classes", "detection_classes"), np.float64).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(f"detection rows differ: {len(boxes)} boxes, {len(scores)} scores, {len(classes)} classes")
    n = det.get("num_detections")
    if n is not None:
        n = int(np.asarray(n).reshape(-1)[0])
        boxes, scores, classes = boxes[:n], scores[:n], classes[:n]
    classes = classes.astype(np.int64)
    keep = classes >= 0
    return boxes[keep], scores[keep], classes[keep]


def _unbatch(batch):
    """A mapping of arrays with a leading batch axis -> one mapping per image; a list passes."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    arrays = {k: np.asarray(v) for k, v in batch.items() if v is not None}
    sizes = {len(v) for v in arrays.values() if v.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(f"a batch's arrays need one leading batch size, got {sorted(sizes)}")
    (size,) = sizes
    return [{k: (v[i] if v.ndim > 0 else v) for k, v in arrays.items()} for i in range(size)]


# === the evaluator ===


class VOCDetectionEvaluator:
    """Accumulates images' detections and ground truth, and gives both VOC APs per class and their means.

    Each image is matched when added (a detection's TP / FP depends only on higher-scoring
    detections of its own image), so memory grows with the detection count, not the images.
    `plus_one` defaults to False here: kseg's boxes are continuous corners (see the module docstring);
    pass True for VOC's own integer pixel boxes.
    """

    def __init__(self, num_classes, iou_threshold=0.5, use_difficult=False, plus_one=False):
        self.num_classes = int(num_classes)
        self.iou_threshold = float(iou_threshold)
        self.use_difficult = bool(use_difficult)
        self.plus_one = bool(plus_one)
        self.reset()

    def reset(self):
        self._npos = np.zeros(self.num_classes, np.int64)
        self._scores = [[] for _ in range(self.num_classes)]
        self._tp = [[] for _ in range(self.num_classes)]
        self._fp = [[] for _ in range(self.num_classes)]
        self.num_images = 0

    def _check(self, classes, what):
        if len(classes) and classes.max() >= self.num_classes:
            raise ValueError(f"{what} class {int(classes.max())} is not below num_classes={self.num_classes}")

    def add_image(self, ground_truth, detections):
        """One image: mappings as in the module docstring."""
        gt_boxes, gt_classes, difficult = _ground_truth(ground_truth)
        boxes, scores, classes = _detections(detections)
        self._check(gt_classes, "a ground-truth")
        self._check(classes, "a detection")
        if self.use_difficult:
            difficult = np.zeros_like(difficult)
        self._npos += np.bincount(gt_classes[~difficult], minlength=self.num_classes)
        for c in np.unique(classes).tolist():
            mine = classes == c
            in_class = gt_classes == c
            order, tp, fp = match_image(boxes[mine], scores[mine], gt_boxes[in_class], difficult[in_class],
                                        self.iou_threshold, self.plus_one)
            self._scores[c].append(scores[mine][order])
            self._tp[c].append(tp)
            self._fp[c].append(fp)
        self.num_images += 1

    def update(self, ground_truth_batch, detection_batch):
        """A batch: mappings of arrays with a leading batch axis (a reader's targets, a decoder's
        outputs; tensors are converted with np.asarray), or lists of per-image mappings."""
        gts, dets = _unbatch(ground_truth_batch), _unbatch(detection_batch)
        if len(gts) != len(dets):
            raise ValueError(f"{len(gts)} ground-truth images but {len(dets)} detection images")
        for gt, det in zip(gts, dets):
            self.add_image(gt, det)

    def class_curve(self, c):
        """(recall, precision, npos) of class c over the images so far, voc_eval.py's arrays."""
        npos = int(self._npos[c])
        if self._scores[c]:
            scores = np.concatenate(self._scores[c])
            order = np.argsort(-scores, kind="stable")
            tp = np.cumsum(np.concatenate(self._tp[c])[order])
            fp = np.cumsum(np.concatenate(self._fp[c])[order])
        else:
            tp = fp = np.zeros(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        return rec, prec, npos

    def result(self):
        """{"map_voc07", "map_voc", "per_class": [{"class", "ap_voc07", "ap_voc", "gt", "detections"}]}.

        "gt" is npos (non-difficult GT unless use_difficult), "detections" the class's detection count;
        a class with npos = 0 has APs None and no part in the means, which are None when no class has GT.
        """
        per_class = []
        for c in range(self.num_classes):
            rec, prec, npos = self.class_curve(c)
            ap07 = voc_ap(rec, prec, True) if npos > 0 else None
            ap = voc_ap(rec, prec, False) if npos > 0 else None
            per_class.append({"class": c, "ap_voc07": ap07, "ap_voc": ap, "gt": npos, "detections": len(rec)})
        present = [p for p in per_class if p["gt"] > 0]
        return {
            "map_voc07": float(np.mean([p["ap_voc07"] for p in present])) if present else None,
            "map_voc": float(np.mean([p["ap_voc"] for p in present])) if present else None,
            "per_class": per_class,
        }


def voc_eval(detections, ground_truths, num_classes, iou_threshold=0.5, use_07_metric=False, use_difficult=False,
             plus_one=True):
    """VOC mAP of per-image detections against per-image ground truth (lists of mappings, or batched
    mappings with a leading image axis; see the module docstring), voc_eval.py's rules.

    Returns {"ap": [num_classes] AP or None (no GT), "map": mean over classes with GT (None if none),
    "map_voc07" (use_07_metric) or "map_voc": the same mean, "gt": npos per class, "detections": per class}.
    py-faster-rcnn's default, use_07_metric=False, is the all-point AP; VOC2007 papers report 11-point.
    """
    evaluator = VOCDetectionEvaluator(num_classes, iou_threshold, use_difficult, plus_one)
    evaluator.update(ground_truths, detections)
    result = evaluator.result()
    key = "ap_voc07" if use_07_metric else "ap_voc"
    mean = result["map_voc07" if use_07_metric else "map_voc"]
    return {
        "ap": [p[key] for p in result["per_class"]],
        "map": mean,
        "map_voc07" if use_07_metric else "map_voc": mean,
        "gt": [p["gt"] for p in result["per_class"]],
        "detections": [p["detections"] for p in result["per_class"]],
    }
