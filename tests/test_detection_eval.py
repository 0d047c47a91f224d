"""Detection benchmarks in NumPy: VOC mAP (kseg.detection.eval_voc) against hand-worked cases and a
loop-by-loop transcription of py-faster-rcnn's `lib/datasets/voc_eval.py`; COCO AP / AR
(kseg.detection.eval_coco) against a worked fixture and, on seeded random cases, pycocotools'
COCOeval (the reference implementation; the `test` extra installs it)."""

import contextlib
import copy
import io

import numpy as np
import pytest

from kseg.detection.eval_coco import box_iou_xywh, coco_eval
from kseg.detection.eval_voc import VOCDetectionEvaluator, overlaps, voc_ap, voc_eval

# ---------------------------------------------------------------- VOC


def _gt(boxes, classes, difficult=None):
    out = {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "classes": np.array(classes, np.int32)}
    if difficult is not None:
        out["difficult"] = np.array(difficult, bool)
    return out


def _det(boxes, scores, classes):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
            "classes": np.array(classes, np.int32)}


AP07_GOLDEN = (6 * 1.0 + 5 * (2 / 3)) / 11  # 0.848484...: precision 1 up to recall 0.5, 2/3 to 1.0
AP_GOLDEN = 0.5 * 1.0 + 0.5 * (2 / 3)  # 0.833333...


def test_voc_ap_golden_tp_fp_tp():
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(0.8484848484848485, abs=1e-15)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.8333333333333333, abs=1e-15)
    assert voc_ap(rec, prec, True) == pytest.approx(AP07_GOLDEN) and voc_ap(rec, prec) == pytest.approx(AP_GOLDEN)
    # No recall point reached: 0; the 11-point grid is np.arange's (0.30000000000000004 > 3/10).
    assert voc_ap([], [], True) == 0.0 and voc_ap([], [], False) == 0.0
    assert voc_ap([0.3], [1.0], True) == pytest.approx(3 / 11)


def test_voc_eval_golden_ranking():
    gt = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    det = [_det([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    r07 = voc_eval(det, gt, num_classes=1, use_07_metric=True)
    r = voc_eval(det, gt, num_classes=1, use_07_metric=False)
    assert r07["ap"][0] == pytest.approx(AP07_GOLDEN, abs=1e-15) and r07["map_voc07"] == r07["map"] == r07["ap"][0]
    assert r["ap"][0] == pytest.approx(AP_GOLDEN, abs=1e-15) and r["map_voc"] == r["map"]
    assert r["gt"] == [2] and r["detections"] == [3]
    # The same detections listed in another order (ranking is by score).
    shuffled = [_det([[20, 20, 30, 30], [0, 0, 10, 10], [50, 50, 60, 60]], [0.7, 0.9, 0.8], [0, 0, 0])]
    assert voc_eval(shuffled, gt, 1, use_07_metric=True)["ap"][0] == pytest.approx(AP07_GOLDEN, abs=1e-15)


def test_voc_difficult_gt():
    # GT 0 difficult, GT 1 not: npos 1; the detection on the difficult GT is neither TP nor FP.
    gt = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [True, False])]
    det = [_det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])]
    r = voc_eval(det, gt, 1)
    assert r["gt"] == [1] and r["ap"][0] == pytest.approx(1.0)
    ev = VOCDetectionEvaluator(1)
    ev.update(gt, det)
    rec, prec, npos = ev.class_curve(0)
    assert npos == 1 and rec.tolist() == [0.0, 1.0] and prec.tolist() == [0.0, 1.0]  # tp, fp both 0 first
    # A second detection on the difficult GT is ignored too (no 'already matched' FP).
    det2 = [_det([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.85, 0.8], [0, 0, 0])]
    assert voc_eval(det2, gt, 1)["ap"][0] == pytest.approx(1.0)
    # use_difficult: an ordinary GT, counted and matched.
    r = voc_eval(det, gt, 1, use_difficult=True)
    assert r["gt"] == [2] and r["ap"][0] == pytest.approx(1.0)
    # Only difficult GT: no AP, no part in the mean.
    only = voc_eval([_det([[0, 0, 10, 10]], [0.9], [0])], [_gt([[0, 0, 10, 10]], [0], [True])], 1)
    assert only["ap"] == [None] and only["map"] is None and only["gt"] == [0]


def test_voc_duplicate_detection_is_a_false_positive():
    gt = [_gt([[0, 0, 10, 10]], [0])]
    det = [_det([[0, 0, 10, 10], [0, 0, 10, 11]], [0.9, 0.8], [0, 0])]
    ev = VOCDetectionEvaluator(1)
    ev.update(gt, det)
    rec, prec, _ = ev.class_curve(0)
    assert rec.tolist() == [1.0, 1.0] and prec.tolist() == [1.0, 0.5]
    # The duplicate scored higher takes the GT; the exact box becomes the FP.
    det = [_det([[0, 0, 10, 10], [0, 0, 10, 11]], [0.8, 0.9], [0, 0])]
    ev.reset()
    ev.update(gt, det)
    assert ev.class_curve(0)[1].tolist() == [1.0, 0.5]


def test_voc_threshold_is_strict_and_plus_one():
    # Continuous corners: 10x10 GT, 10x5 detection inside: IoU exactly 0.5 -> no match.
    assert overlaps([0, 0, 10, 5], [[0, 0, 10, 10]], plus_one=False)[0] == 0.5
    gt = [_gt([[0, 0, 10, 10]], [0])]
    assert voc_eval([_det([[0, 0, 10, 5]], [0.9], [0])], gt, 1, plus_one=False)["ap"][0] == 0.0
    assert voc_eval([_det([[0, 0, 10, 5.01]], [0.9], [0])], gt, 1, plus_one=False)["ap"][0] == 1.0
    # VOC's inclusive pixels: [0, 9] x [0, 9] is 10x10, [0, 9] x [0, 4] is 10x5: again exactly 0.5.
    assert overlaps([0, 0, 9, 4], [[0, 0, 9, 9]], plus_one=True)[0] == 0.5
    gt = [_gt([[0, 0, 9, 9]], [0])]
    assert voc_eval([_det([[0, 0, 9, 4]], [0.9], [0])], gt, 1, plus_one=True)["ap"][0] == 0.0
    # The +1 changes the overlap: 5x10 of 10x10 plus_one=False is 0.5, with +1 it is 60/110 > 0.5.
    assert voc_eval([_det([[0, 0, 9, 4]], [0.9], [0])], [_gt([[0, 0, 9, 9]], [0])], 1, plus_one=False)["ap"][0] == 0.0
    assert overlaps([0, 0, 9, 5], [[0, 0, 9, 9]], plus_one=True)[0] == pytest.approx(0.6)
    # iou_threshold is a parameter.
    assert voc_eval([_det([[0, 0, 10, 5]], [0.9], [0])], [_gt([[0, 0, 10, 10]], [0])], 1, iou_threshold=0.4,
                    plus_one=False)["ap"][0] == 1.0


def test_voc_padded_batches_and_classes_without_gt():
    # Two images, 4 classes (0 = background, never in GT), rows padded with class -1.
    gt_batch = {
        "boxes": np.array([[[0, 0, 10, 10], [20, 20, 40, 40], [-1, -1, -1, -1]],
                           [[5, 5, 15, 15], [-1, -1, -1, -1], [-1, -1, -1, -1]]], np.float32),
        "classes": np.array([[1, 2, -1], [1, -1, -1]], np.int32),
        "difficult": np.zeros((2, 3), bool),
        "image_shape": np.array([[50, 50], [50, 50]]),
    }
    det_batch = {  # the decoder's names; num_detections cuts image 1's third row (class 3, would be an FP)
        "detection_boxes": np.array([[[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 5, 5], [0, 0, 0, 0]],
                                     [[5, 5, 15, 15], [0, 0, 50, 50], [1, 1, 2, 2], [0, 0, 0, 0]]], np.float32),
        "detection_scores": np.array([[0.9, 0.8, 0.7, 0.0], [0.95, 0.3, 0.2, 0.0]], np.float32),
        "detection_classes": np.array([[1, 2, 3, -1], [1, 3, 3, -1]], np.int32),
        "num_detections": np.array([3, 2]),
    }
    ev = VOCDetectionEvaluator(4)
    ev.update(gt_batch, det_batch)
    res = ev.result()
    per = {p["class"]: p for p in res["per_class"]}
    assert per[0] == {"class": 0, "ap_voc07": None, "ap_voc": None, "gt": 0, "detections": 0}
    assert per[1]["gt"] == 2 and per[1]["detections"] == 2 and per[1]["ap_voc"] == pytest.approx(1.0)
    assert per[2]["gt"] == 1 and per[2]["ap_voc07"] == pytest.approx(1.0)
    assert per[3] == {"class": 3, "ap_voc07": None, "ap_voc": None, "gt": 0, "detections": 2}
    assert res["map_voc07"] == pytest.approx(1.0) and res["map_voc"] == pytest.approx(1.0)
    # A class with GT but no detections (4): AP 0, and it counts in the mean.
    gt_batch["boxes"][1, 1] = [30, 30, 45, 45]
    gt_batch["classes"][1, 1] = 4
    ev = VOCDetectionEvaluator(5)
    ev.update(gt_batch, det_batch)
    res = ev.result()
    assert [p["ap_voc"] for p in res["per_class"]] == [None, 1.0, 1.0, None, 0.0]
    assert res["map_voc"] == pytest.approx(2 / 3) and res["per_class"][4]["gt"] == 1
    with pytest.raises(ValueError, match="num_classes"):
        VOCDetectionEvaluator(4).update(gt_batch, det_batch)


def ref_voc_eval(dets, gts, classname, ovthresh=0.5, use_07_metric=False):
    """py-faster-rcnn voc_eval.py's loop, transcribed: detections as (image, score, box) rows of one class,
    GT as per-image records {"bbox", "difficult"}; +1 widths."""
    class_recs, npos = {}, 0
    for i, recs in enumerate(gts):
        r = [x for x in recs if x["name"] == classname]
        bbox = np.array([x["bbox"] for x in r]).reshape(-1, 4)
        difficult = np.array([x["difficult"] for x in r]).astype(bool)
        npos = npos + sum(~difficult)
        class_recs[i] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(r)}
    image_ids = [d[0] for d in dets]
    confidence = np.array([d[1] for d in dets])
    BB = np.array([d[2] for d in dets]).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="mergesort")
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_eval_matches_the_voc_eval_py_loop(seed):
    rng = np.random.default_rng(seed)
    num_classes, gts, dets, kseg_gt, kseg_det = 4, [], [], [], []
    for _ in range(12):
        m = int(rng.integers(0, 6))
        xy = rng.integers(0, 200, (m, 2))
        wh = rng.integers(8, 120, (m, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float64)
        classes = rng.integers(0, num_classes, m)
        difficult = rng.random(m) < 0.2
        gts.append([{"name": int(c), "bbox": b, "difficult": int(d)} for b, c, d in zip(boxes, classes, difficult)])
        kseg_gt.append(_gt(boxes, classes, difficult))
        rows = []
        for b, c in zip(boxes, classes):  # 0..3 jittered copies of each GT, some of another class
            for _ in range(int(rng.integers(0, 4))):
                cls = int(c) if rng.random() < 0.85 else int(rng.integers(0, num_classes))
                rows.append((b + rng.normal(0, 0.12, 4) * np.repeat(b[2:] - b[:2], 2), rng.random(), cls))
        for _ in range(int(rng.integers(0, 4))):  # background false positives
            xy = rng.integers(0, 200, 2)
            rows.append((np.concatenate([xy, xy + rng.integers(8, 80, 2)]).astype(float), rng.random(),
                         int(rng.integers(0, num_classes))))
        dets.append(rows)
        kseg_det.append(_det([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
    for use_07 in (True, False):
        # float64 boxes and scores (the helpers' float32 would differ from the reference in the last bits)
        kseg = voc_eval([{**d, "boxes": np.array([r[0] for r in rows]).reshape(-1, 4),
                          "scores": np.array([r[1] for r in rows])} for d, rows in zip(kseg_det, dets)],
                        kseg_gt, num_classes, use_07_metric=use_07, plus_one=True)
        for c in range(num_classes):
            rows = [(i, s, b) for i, img in enumerate(dets) for b, s, k in img if k == c]
            npos = sum(1 for img in gts for x in img if x["name"] == c and not x["difficult"])
            if npos == 0:
                assert kseg["ap"][c] is None
                continue
            assert kseg["ap"][c] == pytest.approx(ref_voc_eval(rows, gts, c, use_07_metric=use_07), abs=1e-12)
    # Accumulating in batches of 5 gives the same result as all images at once.
    ev = VOCDetectionEvaluator(num_classes, plus_one=True)
    for i in range(0, len(kseg_gt), 5):
        ev.update(kseg_gt[i: i + 5], kseg_det[i: i + 5])
    once = VOCDetectionEvaluator(num_classes, plus_one=True)
    once.update(kseg_gt, kseg_det)
    assert ev.result() == once.result() and ev.num_images == 12


# ---------------------------------------------------------------- COCO

GOLDEN_GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
    "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 0},
    ],
}
GOLDEN_DT = [
    {"image_id": 1, "category_id": 1, "bbox": [11, 11, 30, 30], "score": 0.9},
    {"image_id": 1, "category_id": 2, "bbox": [60, 60, 40, 40], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [0, 0, 60, 60], "score": 0.7},
    {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.6},
]
GOLDEN_STATS = [0.42524752475247524, 0.5, 0.5, 0.8, 0.5, -1, 0.45, 0.45, 0.45, 0.8, 0.5, -1]
KEYS = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small", "ar_medium",
        "ar_large"]


def pycocotools_eval(gt, dets):
    """pycocotools COCOeval(iouType="bbox") on copies of the dicts (loadRes writes into them), quietly."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_coco_golden_fixture():
    r = coco_eval(GOLDEN_GT, GOLDEN_DT)
    assert r["stats"] == pytest.approx(GOLDEN_STATS, abs=1e-12)
    assert [r[k] for k in KEYS] == r["stats"] and len(r["stats"]) == 12
    # Category 1: image 1's box has IoU 29² / (2 * 900 - 29²) = 0.877, image 2's 1. At thresholds
    # 0.50..0.85 both match: AP 1; at 0.90 and 0.95 the first-ranked (image 1) is an FP, then a TP:
    # precision 1/2 at the 51 recall points 0..0.5, 0 above.
    assert r["per_category"][0]["ap"] == pytest.approx((8 + 2 * 0.5 * 51 / 101) / 10, abs=1e-15)
    # Category 2: 30² / (2 * 1600 - 30²) = 0.391 < 0.5: AP 0.
    assert r["per_category"][1] == {"category_id": 2, "ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert r["precision"].shape == (10, 101, 2, 4, 3) and r["recall"].shape == (10, 2, 4, 3)


def test_coco_golden_fixture_agrees_with_pycocotools():
    ev = pycocotools_eval(GOLDEN_GT, GOLDEN_DT)
    r = coco_eval(GOLDEN_GT, GOLDEN_DT)
    np.testing.assert_allclose(ev.stats, GOLDEN_STATS, atol=1e-12)
    np.testing.assert_array_equal(r["stats"], ev.stats)
    np.testing.assert_array_equal(r["precision"], ev.eval["precision"])
    np.testing.assert_array_equal(r["recall"], ev.eval["recall"])


def test_coco_crowd_iou_and_edge_cases():
    # Against a crowd GT the union is the detection's area: a box inside a crowd region has IoU 1.
    ious = box_iou_xywh([[10, 10, 20, 20], [90, 90, 20, 20]], [[0, 0, 100, 100], [0, 0, 100, 100]], [True, False])
    np.testing.assert_allclose(ious, [[1.0, 0.04], [0.25, 100 / 10300]])
    # No detections (pycocotools' loadRes fails on an empty list): recall 0, AP 0 where GT exist.
    r = coco_eval(GOLDEN_GT, [])
    assert r["stats"] == [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="image_id 7"):
        coco_eval(GOLDEN_GT, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    # Detections of a category not in the ground truth are dropped.
    extra = GOLDEN_DT + [{"image_id": 1, "category_id": 99, "bbox": [10, 10, 30, 30], "score": 1.0}]
    assert coco_eval(GOLDEN_GT, extra)["stats"] == coco_eval(GOLDEN_GT, GOLDEN_DT)["stats"]


def random_coco(seed, num_images=8, size=320):
    """Seeded GT (3 categories with ids 1, 3, 7; boxes from small to large; ~15% crowd; "area" fields that
    differ from w * h as segmentation areas do) and detections near them, with tied scores, background
    false positives, one image with 130 detections (maxDets 100) and one image without GT."""
    rng = np.random.default_rng(seed)
    cats = [1, 3, 7]
    gt = {"images": [{"id": 10 + i, "width": size, "height": size} for i in range(num_images)],
          "categories": [{"id": c, "name": f"c{c}"} for c in cats], "annotations": []}
    dets = []
    integer = seed % 2 == 0  # integer boxes make IoUs land exactly on thresholds
    for i in range(num_images):
        img = 10 + i
        n = 0 if i == num_images - 1 else int(rng.integers(1, 9))
        box = None
        for _ in range(n):
            if box is not None and rng.random() < 0.3:  # a neighbour of the last GT: competing matches
                x, y = box[0] + rng.normal(0, 0.2) * box[2], box[1] + rng.normal(0, 0.2) * box[3]
                w, h = box[2] * rng.uniform(0.8, 1.2), box[3] * rng.uniform(0.8, 1.2)
            else:
                side = float(np.exp(rng.uniform(np.log(6), np.log(200))))
                w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
                x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
                cat = int(rng.choice(cats))
            box = [round(x), round(y), max(1, round(w)), max(1, round(h))] if integer else [x, y, w, h]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": img, "category_id": cat,
                                      "bbox": box, "area": box[2] * box[3] * rng.uniform(0.5, 1.0),
                                      "iscrowd": int(rng.random() < 0.15)})
            for _ in range(int(rng.integers(0, 4))):
                j = rng.normal(0, 0.1, 4) * [box[2], box[3], box[2], box[3]]
                b = [box[0] + j[0], box[1] + j[1], max(1.0, box[2] + j[2]), max(1.0, box[3] + j[3])]
                if integer:
                    b = [round(v) for v in b]
                label = cat if rng.random() < 0.85 else int(rng.choice(cats))
                dets.append({"image_id": img, "category_id": label, "bbox": b, "score": round(rng.random(), 2)})
        for _ in range(int(rng.integers(0, 5))):
            w, h = rng.uniform(4, 150, 2)
            dets.append({"image_id": img, "category_id": int(rng.choice(cats)),
                         "bbox": [rng.uniform(0, size - w), rng.uniform(0, size - h), w, h],
                         "score": round(rng.random(), 2)})
    busy = gt["annotations"][0]
    b = busy["bbox"]
    for _ in range(130):  # more than maxDets on one image and category
        j = rng.normal(0, 0.3, 4) * [b[2], b[3], b[2], b[3]]
        dets.append({"image_id": busy["image_id"], "category_id": busy["category_id"],
                     "bbox": [b[0] + j[0], b[1] + j[1], max(1.0, b[2] + j[2]), max(1.0, b[3] + j[3])],
                     "score": round(rng.random(), 2)})
    rng.shuffle(dets)
    return gt, [dict(d) for d in dets]


@pytest.mark.parametrize("seed", range(6))
def test_coco_random_cases_agree_with_pycocotools(seed):
    gt, dets = random_coco(seed)
    assert any(a["iscrowd"] for a in gt["annotations"])
    ev = pycocotools_eval(gt, dets)
    r = coco_eval(gt, dets)
    np.testing.assert_allclose(r["stats"], ev.stats, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["precision"], ev.eval["precision"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["recall"], ev.eval["recall"], rtol=0, atol=1e-9)
    areas = [a["area"] for a in gt["annotations"]]
    assert min(areas) < 32 ** 2 and max(areas) > 96 ** 2  # all three size ranges are exercised
