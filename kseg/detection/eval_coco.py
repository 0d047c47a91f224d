"""COCO box AP / AR in NumPy: pycocotools' `COCOeval(gt, gt.loadRes(dets), iouType="bbox")` with its
default `Params`, then `evaluate()`, `accumulate()` and `summarize()` (cocoapi `PythonAPI/pycocotools/
cocoeval.py`, Dollár & Lin), re-implemented so that kseg needs no pycocotools at run time.

The rules, as cocoeval.py applies them:

- Images: every image of the ground truth's "images"; categories: every id of its "categories".
  Ground-truth annotations of other images or categories are dropped, so are detections of other
  categories; a detection of an unknown image is an error (loadRes asserts).
- Per image and category: the detections sorted by score (stable: ties keep their order in the
  list), the best 100 kept. IoU of [x, y, w, h] boxes as the cocoapi's C `bbIou`; against a crowd GT
  (iscrowd 1) the union is the detection's own area.
- Per area range (all [0, 1e10], small [0, 32²], medium [32², 96²], large [96², 1e10], both ends
  inclusive, on the GT's "area" field) a GT is ignored when crowd or outside the range; GT are
  ordered non-ignored first. For each IoU threshold t in 0.50:0.05:0.95 each detection in score order
  takes the free GT of highest IoU >= min(t, 1 - 1e-10) (the last such GT on ties), preferring any
  non-ignored GT to an ignored one; crowd GT stay free. A detection matched to an ignored GT is
  ignored, so is an unmatched detection whose own area (w * h) lies outside the range.
- Per category, area range and maxDets m in [1, 10, 100]: each image's best m detections, pooled
  and sorted by score (stable, images in id order); recall = TP / (non-ignored GT), precision =
  TP / (TP + FP + eps), precision made non-increasing from the right and read at the 101 recall
  points 0:0.01:1 (searchsorted left; 0 past the last recall reached). A category without non-ignored
  GT in the range has precision and recall -1 and is left out of the means.
- The 12 stats: AP = mean of the valid precisions over IoU thresholds, recall points and categories,
  AR = mean of the final recalls over IoU thresholds and categories; -1 where nothing is valid.

One deliberate difference: cocoeval.py records a match by the GT's "id" and later reads id 0 as "no
match"; kseg records matches by position, so a GT annotation with id 0 matches like any other.
"""

from __future__ import annotations

import numpy as np

# Params.setDetParams(): np.linspace, not np.arange, so that 0.75 and the recall points are exact.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RANGES = {"all": (0.0, 1e5 ** 2), "small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
               "large": (96.0 ** 2, 1e5 ** 2)}

# (key, AP?, IoU threshold or None for all, area range, maxDets): summarize()'s _summarizeDets order.
STATS = (
    ("ap", True, None, "all", 100),
    ("ap50", True, 0.5, "all", 100),
    ("ap75", True, 0.75, "all", 100),
    ("ap_small", True, None, "small", 100),
    ("ap_medium", True, None, "medium", 100),
    ("ap_large", True, None, "large", 100),
    ("ar1", False, None, "all", 1),
    ("ar10", False, None, "all", 10),
    ("ar100", False, None, "all", 100),
    ("ar_small", False, None, "small", 100),
    ("ar_medium", False, None, "medium", 100),
    ("ar_large", False, None, "large", 100),
)


def box_iou_xywh(dt, gt, gt_crowd):
    """IoU [D, G] of [x, y, w, h] boxes dt [D, 4] and gt [G, 4]: the cocoapi's `bbIou` (maskApi.c), in
    its operation order; a crowd GT's union is the detection's area."""
    dt = np.asarray(dt, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    crowd = np.asarray(gt_crowd, bool).reshape(-1)
    ga = gt[:, 2] * gt[:, 3]
    da = dt[:, 2] * dt[:, 3]
    w = np.minimum(dt[:, None, 2] + dt[:, None, 0], gt[None, :, 2] + gt[None, :, 0]) - np.maximum(dt[:, None, 0],
                                                                                                gt[None, :, 0])
    h = np.minimum(dt[:, None, 3] + dt[:, None, 1], gt[None, :, 3] + gt[None, :, 1]) - np.maximum(dt[:, None, 1],
                                                                                                gt[None, :, 1])
    inter = w * h
    union = np.where(crowd[None, :], da[:, None], da[:, None] + ga[None, :] - inter)
    hit = (w > 0) & (h > 0)
    return np.where(hit, inter / np.where(hit, union, 1.0), 0.0)


def match(ious, gt_ignore, gt_crowd, thresholds=IOU_THRESHOLDS):
    """cocoeval.py's evaluateImg greedy matching, vectorised over IoU thresholds.

    ious [D, G] with detections in score order and GT ordered non-ignored first; returns (matched
    [T, D] bool, ignored [T, D] bool: matched to an ignored GT).
    """
    gt_ignore = np.asarray(gt_ignore, bool)
    gt_crowd = np.asarray(gt_crowd, bool)
    n_dt, n_gt = ious.shape
    t = len(thresholds)
    matched = np.zeros((t, n_dt), bool)
    ignored = np.zeros((t, n_dt), bool)
    if n_dt == 0 or n_gt == 0:
        return matched, ignored
    limit = np.minimum(np.asarray(thresholds, np.float64), 1 - 1e-10)[:, None]
    taken = np.zeros((t, n_gt), bool)
    rows = np.arange(t)
    regular = ~gt_ignore
    for d in range(n_dt):
        ok = (~taken | gt_crowd) & (ious[d] >= limit)  # [T, G]
        best = np.full(t, -1)
        for part in (regular, gt_ignore):  # a non-ignored GT first; the ignored ones only without one
            cand = np.where(ok & part & (best[:, None] < 0), ious[d], -1.0)
            last = n_gt - 1 - np.argmax(cand[:, ::-1], axis=1)  # the last of equal maxima
            found = cand[rows, last] >= 0
            best = np.where(found, last, best)
        hit = best >= 0
        matched[hit, d] = True
        ignored[hit, d] = gt_ignore[best[hit]]
        taken[rows[hit], best[hit]] = True
    return matched, ignored


def _index(ground_truth, detections):
    """Image ids, category ids and the (image, category) groups of GT and detections, as COCOeval._prepare."""
    img_ids = sorted({img["id"] for img in ground_truth.get("images", [])})
    cat_ids = sorted({cat["id"] for cat in ground_truth.get("categories", [])})
    images, categories = set(img_ids), set(cat_ids)
    gts, dts = {}, {}
    for ann in ground_truth.get("annotations", []):
        if ann["image_id"] in images and ann["category_id"] in categories:
            gts.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
    for det in detections:
        if det["image_id"] not in images:
            raise ValueError(f"a detection's image_id {det['image_id']!r} is not among the ground truth's images")
        if det["category_id"] in categories:
            dts.setdefault((det["image_id"], det["category_id"]), []).append(det)
    return img_ids, cat_ids, gts, dts


def _evaluate_image(gt, dt, max_det):
    """One image and category: per area range, (scores [D], matched [T, D], dt ignored [T, D], gt ignored [G])."""
    gt_boxes = np.array([a["bbox"] for a in gt], np.float64).reshape(-1, 4)
    gt_crowd = np.array([int(a.get("iscrowd", 0)) for a in gt], np.int64).astype(bool)
    gt_area = np.array([a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in gt], np.float64)
    scores = np.array([d["score"] for d in dt], np.float64)
    order = np.argsort(-scores, kind="mergesort")[:max_det]
    scores = scores[order]
    dt_boxes = np.array([dt[i]["bbox"] for i in order], np.float64).reshape(-1, 4)
    dt_area = dt_boxes[:, 2] * dt_boxes[:, 3]
    ious = box_iou_xywh(dt_boxes, gt_boxes, gt_crowd)
    out = {}
    for name, (lo, hi) in AREA_RANGES.items():
        gt_ignore = gt_crowd | (gt_area < lo) | (gt_area > hi)
        gt_order = np.argsort(gt_ignore, kind="mergesort")
        matched, ignored = match(ious[:, gt_order], gt_ignore[gt_order], gt_crowd[gt_order])
        outside = (dt_area < lo) | (dt_area > hi)
        ignored = ignored | (~matched & outside[None, :])
        out[name] = (scores, matched, ignored, gt_ignore[gt_order])
    return out


def _precision_recall(per_image, max_det):
    """One category, area range and maxDets: (precision [T, R], recall [T]) or None without valid GT
    (cocoeval.py's accumulate)."""
    scores = np.concatenate([e[0][:max_det] for e in per_image])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e[1][:, :max_det] for e in per_image], axis=1)[:, order]
    ignored = np.concatenate([e[2][:, :max_det] for e in per_image], axis=1)[:, order]
    npig = int(np.count_nonzero(~np.concatenate([e[3] for e in per_image])))
    if npig == 0:
        return None
    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    n_thr, n_det = tp_sum.shape
    precision = np.zeros((n_thr, len(RECALL_POINTS)))
    recall = np.zeros(n_thr)
    for t in range(n_thr):
        rc = tp_sum[t] / npig
        pr = tp_sum[t] / (fp_sum[t] + tp_sum[t] + np.spacing(1))
        if n_det:
            recall[t] = rc[-1]
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        inds = np.searchsorted(rc, RECALL_POINTS, side="left")
        valid = inds < n_det
        precision[t, valid] = pr[inds[valid]]
    return precision, recall


def _mean_valid(values):
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def coco_eval(ground_truth, detections):
    """COCO bbox AP / AR of `detections` against `ground_truth`, as pycocotools' COCOeval summarize().

    ground_truth: an `instances_*.json` dict ("images" [{"id"}], "categories" [{"id"}], "annotations"
    [{"image_id", "category_id", "bbox" [x, y, w, h], "area", "iscrowd"}]; a missing "iscrowd" is 0, a
    missing "area" w * h). detections: a list of {"image_id", "category_id", "bbox" [x, y, w, h], "score"}
    (the results file); it may be empty.

    Returns {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100",
    "ar_small", "ar_medium", "ar_large"} (floats, -1 where undefined), "stats" (those 12 in
    COCOeval.stats order), "per_category" [{"category_id", "ap", "ap50", "ap75"}] (AP at IoU .50:.95,
    .50, .75, area all, 100 detections; -1 without GT) and "precision" [T, R, K, A, M] / "recall"
    [T, K, A, M] (cocoeval.py's eval["precision"] / ["recall"]; A over all, small, medium, large).
    """
    img_ids, cat_ids, gts, dts = _index(ground_truth, detections)
    areas = list(AREA_RANGES)
    n_thr, n_rec, n_area, n_max = len(IOU_THRESHOLDS), len(RECALL_POINTS), len(areas), len(MAX_DETS)
    precision = -np.ones((n_thr, n_rec, len(cat_ids), n_area, n_max))
    recall = -np.ones((n_thr, len(cat_ids), n_area, n_max))
    for k, cat in enumerate(cat_ids):
        evaluated = [_evaluate_image(gts.get((img, cat), []), dts.get((img, cat), []), MAX_DETS[-1])
                     for img in img_ids if (img, cat) in gts or (img, cat) in dts]
        if not evaluated:
            continue
        for a, name in enumerate(areas):
            per_image = [e[name] for e in evaluated]
            for m, max_det in enumerate(MAX_DETS):
                pr = _precision_recall(per_image, max_det)
                if pr is not None:
                    precision[:, :, k, a, m], recall[:, k, a, m] = pr
    stats = []
    for _, is_ap, iou, area, max_det in STATS:
        t = slice(None) if iou is None else np.where(IOU_THRESHOLDS == iou)[0]
        a, m = areas.index(area), MAX_DETS.index(max_det)
        stats.append(_mean_valid(precision[t, :, :, a, m] if is_ap else recall[t, :, a, m]))
    result = {key: value for (key, *_), value in zip(STATS, stats)}
    result["stats"] = stats
    result["per_category"] = [
        {"category_id": cat, "ap": _mean_valid(precision[:, :, k, 0, -1]),
         "ap50": _mean_valid(precision[0, :, k, 0, -1]), "ap75": _mean_valid(precision[5, :, k, 0, -1])}
        for k, cat in enumerate(cat_ids)]
    result["precision"] = precision
    result["recall"] = recall
    return result
