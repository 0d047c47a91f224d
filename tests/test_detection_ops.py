"""kseg.detection against plain NumPy / Python references re-derived from torchvision's documented
semantics (BoxCoder, box_iou, DefaultBoxGenerator, Matcher / SSDMatcher, SSD.postprocess_detections
with greedy NMS), written as loops rather than vectorised TF."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.detection import anchors as anchors_mod
from kseg.detection.anchors import PRIORS, anchors_per_location, ssd_anchors
from kseg.detection.boxes import DEFAULT_CLIP, SSD_WEIGHTS, box_iou, clip_boxes, decode, encode
from kseg.detection.matching import match, ssd_match
from kseg.detection.nms import METHODS, batched_class_nms
from kseg.detection.postprocess import SSDDecoder, ssd_postprocess

F32 = np.float32


# ---------------------------------------------------------------- references


def ref_encode(gt, ref, weights):
    """BoxCoder.encode_single, box by box with float32 scalars in torchvision's operation order."""
    wx, wy, ww, wh = (F32(v) for v in weights)
    out = []
    for g, r in zip(gt.astype(F32), ref.astype(F32)):
        ew, eh = r[2] - r[0], r[3] - r[1]
        ecx, ecy = r[0] + F32(0.5) * ew, r[1] + F32(0.5) * eh
        gw, gh = g[2] - g[0], g[3] - g[1]
        gcx, gcy = g[0] + F32(0.5) * gw, g[1] + F32(0.5) * gh
        out.append([wx * (gcx - ecx) / ew, wy * (gcy - ecy) / eh, ww * np.log(gw / ew), wh * np.log(gh / eh)])
    return np.array(out, F32)


def ref_decode(deltas, ref, weights, clip=math.log(1000.0 / 16)):
    """BoxCoder.decode_single in float64, box by box."""
    out = []
    for d, r in zip(deltas.astype(np.float64), ref.astype(np.float64)):
        w, h = r[2] - r[0], r[3] - r[1]
        cx, cy = r[0] + 0.5 * w, r[1] + 0.5 * h
        dx, dy = d[0] / weights[0], d[1] / weights[1]
        dw, dh = min(d[2] / weights[2], clip), min(d[3] / weights[3], clip)
        pcx, pcy, pw, ph = dx * w + cx, dy * h + cy, math.exp(dw) * w, math.exp(dh) * h
        out.append([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph])
    return np.array(out)


def ref_iou_pair(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_iou(a, b):
    return np.array([[ref_iou_pair(x, y) for y in b] for x in a]).reshape(len(a), len(b))


def ref_anchors(input_hw, scales, clip, feature_sizes):
    """DefaultBoxGenerator as nested loops: map, row i, column j, then that location's boxes."""
    H, W = input_hw
    rows = []
    for k, (fh, fw) in enumerate(feature_sizes):
        step, s, s_next = anchors_mod.STEPS[k], scales[k], scales[k + 1]
        sizes = [(s, s), (math.sqrt(s * s_next), math.sqrt(s * s_next))]
        for a in anchors_mod.ASPECT_RATIOS[k]:
            sizes += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
        if clip:
            sizes = [(min(max(w, 0.0), 1.0), min(max(h, 0.0), 1.0)) for w, h in sizes]
        for i in range(fh):
            cy = (i + 0.5) / (H / step)
            for j in range(fw):
                cx = (j + 0.5) / (W / step)
                for w, h in sizes:
                    rows.append([(cx - 0.5 * w) * W, (cy - 0.5 * h) * H, (cx + 0.5 * w) * W, (cy + 0.5 * h) * H])
    return np.array(rows).astype(F32)


def _argmax_first(values):
    values = list(values)
    return values.index(max(values))


def ref_match(iou, high, low, allow_low_quality):
    """torchvision Matcher, anchor by anchor (zero GT: all -1, as SSD.forward)."""
    num_gt, num_anchors = iou.shape
    if num_gt == 0:
        return np.full(num_anchors, -1)
    best_gt = [_argmax_first(iou[:, a]) for a in range(num_anchors)]
    out = []
    for a in range(num_anchors):
        v = iou[best_gt[a], a]
        out.append(-1 if v < low else -2 if v < high else best_gt[a])
    if allow_low_quality:
        for g in range(num_gt):
            top = max(iou[g])
            for a in range(num_anchors):
                if iou[g, a] == top:
                    out[a] = best_gt[a]
    return np.array(out)


def ref_ssd_match(iou, threshold):
    out = ref_match(iou, threshold, threshold, False)
    for g in range(iou.shape[0]):
        out[_argmax_first(iou[g])] = g
    return out


def ref_nms(boxes, scores, thr):
    """Greedy NMS, scores descending: drop boxes with IoU > thr against a kept one."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        kept = boxes[keep].reshape(-1, 4)
        iw = np.clip(np.minimum(kept[:, 2], boxes[i, 2]) - np.maximum(kept[:, 0], boxes[i, 0]), 0, None)
        ih = np.clip(np.minimum(kept[:, 3], boxes[i, 3]) - np.maximum(kept[:, 1], boxes[i, 1]), 0, None)
        inter = iw * ih
        union = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1]) + (boxes[i, 2] - boxes[i, 0]) * (
            boxes[i, 3] - boxes[i, 1]) - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        if not (iou > thr).any():
            keep.append(i)
    return keep


def ref_softmax(logits):
    """Softmax over the last axis, row by row in float64."""
    out = np.empty(logits.shape)
    for idx in np.ndindex(logits.shape[:-1]):
        e = [math.exp(v - max(logits[idx])) for v in logits[idx].astype(np.float64)]
        out[idx] = [v / sum(e) for v in e]
    return out


def ref_postprocess(loc, probs, anchors, input_hw, score_threshold=0.01, top_k=400, iou_threshold=0.45,
                    max_detections=200):
    """SSD.postprocess_detections per image, from the class probabilities (the softmax of the
    logits): list of (boxes, scores, classes) arrays."""
    H, W = input_hw
    results = []
    for loc_i, scores in zip(loc, probs):
        boxes = ref_decode(loc_i, anchors, SSD_WEIGHTS)
        boxes = np.clip(boxes, 0.0, [W, H, W, H])
        found = []
        for c in range(1, scores.shape[1]):
            idx = [a for a in range(len(anchors)) if scores[a, c] > score_threshold]
            idx = sorted(idx, key=lambda a: -scores[a, c])[:top_k]
            kept = ref_nms(boxes[idx], scores[idx, c], iou_threshold)
            found += [(scores[idx[k], c], c, boxes[idx[k]]) for k in kept]
        found = sorted(found, key=lambda t: -t[0])[:max_detections]
        results.append((np.array([f[2] for f in found]).reshape(-1, 4), np.array([f[0] for f in found]),
                        np.array([f[1] for f in found], int)))
    return results


# ---------------------------------------------------------------- boxes


def _random_boxes(rng, n, lo=0.0, hi=300.0, min_size=1.0):
    xy = rng.uniform(lo, hi, size=(n, 2))
    wh = rng.uniform(min_size, 150.0, size=(n, 2))
    return np.concatenate([xy, xy + wh], -1).astype(F32)


def test_encode_matches_box_coder(rng):
    gt, ref = _random_boxes(rng, 200), _random_boxes(rng, 200)
    got = encode(gt, ref, SSD_WEIGHTS).numpy()
    np.testing.assert_allclose(got, ref_encode(gt, ref, SSD_WEIGHTS), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(encode(gt, ref, (1.0, 1.0, 1.0, 1.0)).numpy(),
                               ref_encode(gt, ref, (1, 1, 1, 1)), rtol=1e-6, atol=1e-6)


def test_decode_matches_box_coder_clamps_and_inverts_encode(rng):
    ref = _random_boxes(rng, 200)
    deltas = rng.normal(size=(200, 4)).astype(F32) * 3
    deltas[:20, 2:] = rng.uniform(21.0, 40.0, size=(20, 2))  # dw / 5 above log(62.5): clamped
    got = decode(deltas, ref, SSD_WEIGHTS).numpy()
    np.testing.assert_allclose(got, ref_decode(deltas, ref, SSD_WEIGHTS), rtol=1e-6, atol=1e-4)
    w = ref[:20, 2] - ref[:20, 0]
    np.testing.assert_allclose(got[:20, 2] - got[:20, 0], w * 62.5, rtol=1e-5)
    assert DEFAULT_CLIP == math.log(1000.0 / 16)
    gt, ref = _random_boxes(rng, 200, min_size=10), _random_boxes(rng, 200, min_size=10)  # size ratios < 62.5
    np.testing.assert_allclose(decode(encode(gt, ref, SSD_WEIGHTS), ref, SSD_WEIGHTS).numpy(), gt, atol=1e-3)


def test_box_iou_cases(rng):
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 15], [3, 3, 3, 3]], F32)
    b = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [10, 0, 20, 10], [20, 20, 30, 30], [2, 2, 4, 4],
                  [3, 3, 3, 3]], F32)
    got = box_iou(a, b).numpy()
    np.testing.assert_allclose(got, ref_iou(a, b), atol=1e-7)
    assert got[0, 0] == 1.0 and got[0, 2] == 0.0 and got[0, 3] == 0.0  # identical, touching, disjoint
    np.testing.assert_allclose(got[0, 1], 25.0 / 175.0, rtol=1e-6)
    assert not np.isnan(got).any() and got[3, 5] == 0.0  # two empty boxes: 0, not 0 / 0
    x, y = _random_boxes(rng, 30), _random_boxes(rng, 40)
    np.testing.assert_allclose(box_iou(x, y).numpy(), ref_iou(x, y), atol=1e-6)
    assert box_iou(np.zeros((0, 4), F32), y).shape == (0, 40)


def test_clip_boxes():
    got = clip_boxes(np.array([[-5, -3, 320, 290], [10, 20, 30, 40]], F32), 280, 300).numpy()
    np.testing.assert_array_equal(got, [[0, 0, 300, 280], [10, 20, 30, 40]])


# ---------------------------------------------------------------- anchors


@pytest.mark.parametrize("priors", ["voc", "coco"])
def test_anchors_equal_loop_reference(priors):
    got = ssd_anchors((300, 300), priors)
    assert got.shape == (8732, 4) and got.dtype == np.float32
    sizes = [(f, f) for f in (38, 19, 10, 5, 3, 1)]
    want = ref_anchors((300, 300), PRIORS[priors]["scales"], PRIORS[priors]["clip"], sizes)
    assert np.abs(got - want).max() == 0.0
    assert sum(f * f * n for (f, _), n in zip(sizes, anchors_per_location(priors))) == 8732


def test_voc_anchors_by_hand():
    a = ssd_anchors((300, 300), "voc").astype(np.float64)
    r2 = 42.42640687119285 / 2  # s' = sqrt(0.1 * 0.2) -> 42.43 px; 30 * sqrt(2) is the same length
    np.testing.assert_allclose(a[0], [-11, -11, 19, 19], atol=1e-5)  # centre (4, 4), 30 px
    np.testing.assert_allclose(a[1], [4 - r2, 4 - r2, 4 + r2, 4 + r2], atol=1e-5)
    np.testing.assert_allclose(a[2], [4 - r2, 4 - r2 / 2, 4 + r2, 4 + r2 / 2], atol=1e-5)  # a = 2
    np.testing.assert_allclose(a[3], [4 - r2 / 2, 4 - r2, 4 + r2 / 2, 4 + r2], atol=1e-5)  # a = 1/2
    np.testing.assert_allclose(a[4], [-3, -11, 27, 19], atol=1e-5)  # next column: centre (12, 4)
    np.testing.assert_allclose(a[38 * 4], [-11, -3, 19, 27], atol=1e-5)  # next row: centre (4, 12)
    np.testing.assert_allclose(a[38 * 38 * 4], [-22, -22, 38, 38], atol=1e-5)  # map 2: (8, 8), 60 px
    np.testing.assert_allclose(a[-4], [18, 18, 282, 282], atol=1e-4)  # map 6: (150, 150), 264 px
    half = 300 * math.sqrt(0.88 * 1.05) / 2
    np.testing.assert_allclose(a[-3], [150 - half, 150 - half, 150 + half, 150 + half], atol=1e-4)
    assert a[-2, 2] - a[-2, 0] > 300  # voc does not clip: 264 * sqrt(2) px wide


def test_coco_anchors_clip_sizes_not_corners():
    a = ssd_anchors((300, 300), "coco").astype(np.float64)
    np.testing.assert_allclose(a[0], [-6.5, -6.5, 14.5, 14.5], atol=1e-5)  # 0.07 * 300 = 21 px at (4, 4)
    w = a[-2:, 2] - a[-2:, 0]
    h = a[-2:, 3] - a[-2:, 1]
    np.testing.assert_allclose([w[0], h[1]], [300, 300], atol=1e-4)  # 0.87 * sqrt(2) > 1 -> 1
    np.testing.assert_allclose([h[0], w[1]], [300 * 0.87 / math.sqrt(2)] * 2, atol=1e-4)
    assert (a[:38 * 38 * 4] < 0).any()  # corners still leave the image


def test_anchors_other_sizes():
    fs = [(5, 7), (3, 4), 2, 1, 1, 1]
    got = ssd_anchors((40, 56), "voc", feature_sizes=fs)
    sizes = [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    assert np.abs(got - ref_anchors((40, 56), PRIORS["voc"]["scales"], False, sizes)).max() == 0.0
    np.testing.assert_allclose(got[4, :2] + got[4, 2:], [2 * 12, 2 * 4], atol=1e-5)  # x over the width
    assert len(ssd_anchors((64, 64), "coco")) == 8 * 8 * 4 + 4 * 4 * 6 + 2 * 2 * 6 + 6 + 4 + 4
    assert anchors_per_location("coco") == [4, 6, 6, 6, 4, 4]


def test_unknown_priors():
    with pytest.raises(ValueError, match="coco.*voc"):
        ssd_anchors(priors="pascal")
    with pytest.raises(ValueError, match="known"):
        anchors_per_location("x")


# ---------------------------------------------------------------- matching


def _gt_and_iou(anchors):
    gt = np.array([[100, 100, 180, 170], [10, 200, 60, 290],
                   [150, 10, 155, 15],  # 5 px: best IoU < 0.5
                   [100, 100, 180, 170]], F32)  # shares GT 0's best anchor: the later one wins
    return gt, box_iou(gt, anchors).numpy()


def test_ssd_match_vs_reference():
    anchors = ssd_anchors((300, 300), "voc")
    _, iou = _gt_and_iou(anchors)
    got = ssd_match(iou, 0.5).numpy()
    want = ref_ssd_match(iou, 0.5)
    np.testing.assert_array_equal(got, want)
    assert iou[2].max() < 0.5 and got[iou[2].argmax()] == 2
    shared = iou[0].argmax()
    assert iou[3].argmax() == shared and got[shared] == 3
    assert ((got == 0).sum() > 0) and set(np.unique(got)) <= {-1, 0, 1, 2, 3}  # IoU ties: first GT


@pytest.mark.parametrize("high,low,allow", [(0.5, 0.5, False), (0.5, 0.4, False), (0.7, 0.3, True),
                                             (0.5, 0.4, True)])
def test_match_vs_reference(high, low, allow):
    anchors = ssd_anchors((300, 300), "coco")
    _, iou = _gt_and_iou(anchors)
    np.testing.assert_array_equal(match(iou, high, low, allow).numpy(), ref_match(iou, high, low, allow))


def test_match_low_quality_keeps_the_anchors_own_best_gt():
    iou = np.array([[0.3, 0.1, 0.0], [0.4, 0.9, 0.2]], F32)
    # anchor 0 is GT 0's best, but its own best GT is 1 (0.4): torchvision assigns all_matches[0] = 1
    np.testing.assert_array_equal(match(iou, 0.5, 0.3, True).numpy(), [1, 1, -1])
    np.testing.assert_array_equal(match(iou, 0.5, 0.3, False).numpy(), [-2, 1, -1])
    np.testing.assert_array_equal(ref_match(iou, 0.5, 0.3, True), [1, 1, -1])


def test_match_zero_gt():
    iou = np.zeros((0, 7), F32)
    np.testing.assert_array_equal(ssd_match(iou).numpy(), [-1] * 7)
    np.testing.assert_array_equal(match(iou, 0.7, 0.3, True).numpy(), [-1] * 7)


# ---------------------------------------------------------------- decoder


def _raw(rng, batch, num_anchors, num_classes, conf_scale):
    loc = rng.normal(size=(batch, num_anchors, 4)).astype(F32)
    conf = (rng.normal(size=(batch, num_anchors, num_classes)) * conf_scale).astype(F32)
    return loc, conf


def _reference(loc, conf, anchors, input_hw, **kwargs):
    """ref_postprocess on TF's float32 softmax (checked against ref_softmax to 1e-6): float32 rounding
    alone would otherwise reorder detections whose scores differ by an ulp."""
    probs = tf.nn.softmax(conf).numpy()
    np.testing.assert_allclose(probs, ref_softmax(conf), atol=1e-6, rtol=0)
    return ref_postprocess(loc, probs.astype(np.float64), anchors, input_hw, **kwargs)


def _check_against_reference(out, want):
    for b, (boxes, scores, classes) in enumerate(want):
        n = int(out["num_detections"][b])
        assert n == len(scores)
        got_classes = out["detection_classes"][b].numpy()
        np.testing.assert_array_equal(got_classes[:n], classes)
        assert (got_classes[n:] == -1).all()
        np.testing.assert_allclose(out["detection_scores"][b, :n], scores, atol=1e-6)
        np.testing.assert_allclose(out["detection_boxes"][b, :n], boxes, atol=1e-3)
        got_order = np.lexsort((-out["detection_scores"][b, :n].numpy(), got_classes[:n]))
        want_order = np.lexsort((-scores, classes))
        np.testing.assert_array_equal(got_classes[:n][got_order], classes[want_order])
        np.testing.assert_allclose(out["detection_boxes"][b, :n].numpy()[got_order], boxes[want_order], atol=1e-3)


NMS = pytest.mark.parametrize("nms", METHODS)  # every realisation selects the reference's detections


@NMS
@pytest.mark.parametrize("conf_scale,kwargs", [(0.5, {}), (3.0, {}), (0.5, dict(top_k=30, max_detections=300))])
def test_ssd_postprocess_vs_reference(conf_scale, kwargs, nms):
    rng = np.random.default_rng(int(conf_scale * 10) + len(kwargs))
    anchors = ssd_anchors((300, 300), "voc")
    loc, conf = _raw(rng, 2, len(anchors), 21, conf_scale)
    out = ssd_postprocess(loc, conf, anchors, (300, 300), nms=nms, **kwargs)
    want = _reference(loc, conf, anchors, (300, 300), **kwargs)
    assert out["detection_boxes"].shape == (2, kwargs.get("max_detections", 200), 4)
    _check_against_reference(out, want)
    if conf_scale == 0.5:  # every class has > top_k candidates above 0.01 (top_k applies)
        probs = tf.nn.softmax(conf[0]).numpy()
        assert ((probs[:, 1:] > 0.01).sum(0) > 400).all()


@NMS
def test_nms_suppresses_above_threshold_only(nms):
    boxes = np.array([[[0, 0, 100, 100], [0, 0, 100, 45], [0, 0, 100, 46], [200, 200, 250, 250]]], F32)
    scores = np.array([[[0.9, 0.1], [0.8, 0.005], [0.7, 0.005], [0.6, 0.005]]], F32)  # IoU 0.45 kept, 0.46 not
    got_boxes, got_scores, got_classes, num = batched_class_nms(boxes, scores, max_detections=6, method=nms)
    assert int(num[0]) == 4
    np.testing.assert_array_equal(got_classes[0], [0, 0, 0, 1, -1, -1])
    np.testing.assert_allclose(got_scores[0], [0.9, 0.8, 0.6, 0.1, 0, 0])
    np.testing.assert_array_equal(got_boxes[0, :4], boxes[0, [0, 1, 3, 0]])  # pixels, not clamped to [0, 1]
    assert ref_nms(boxes[0], scores[0, :, 0], 0.45) == [0, 1, 3]


@NMS
def test_top_k_limits_candidates_before_nms(nms):
    # Class 1's 500 best anchors all regress onto one box B, its next 500 keep their own boxes: its
    # top 400 candidates collapse to B under NMS, and torchvision keeps nothing below them.
    anchors = ssd_anchors((300, 300), "voc")
    loc = np.zeros((1, len(anchors), 4), F32)
    loc[0, :500] = ref_encode(np.tile([[100, 100, 180, 170]], (500, 1)), anchors[:500], SSD_WEIGHTS)
    conf = np.full((1, len(anchors), 3), -5.0, F32)
    conf[..., 0] = 0.0
    conf[0, :500, 1] = 8.0 - 0.001 * np.arange(500)
    conf[0, 500:1000, 1] = 3.0 - 0.001 * np.arange(500)
    out = ssd_postprocess(loc, conf, anchors, (300, 300), nms=nms)
    want = _reference(loc, conf, anchors, (300, 300))
    _check_against_reference(out, want)
    assert int(out["num_detections"][0]) == 1
    np.testing.assert_allclose(out["detection_boxes"][0, 0], [100, 100, 180, 170], atol=1e-3)


@NMS
def test_ssd_postprocess_fewer_anchors_than_top_k(rng, nms):
    anchors = ssd_anchors((64, 64), "coco")
    assert len(anchors) < 400
    loc, conf = _raw(rng, 2, len(anchors), 4, 1.0)
    out = ssd_postprocess(loc, conf, anchors, (64, 64), nms=nms)
    _check_against_reference(out, _reference(loc, conf, anchors, (64, 64)))
    boxes = out["detection_boxes"].numpy()
    assert boxes.min() >= 0 and boxes.max() <= 64


@NMS
def test_zero_area_boxes_are_kept_once_and_suppress_nothing(nms):
    # Boxes clipped to a line (zero area) have IoU 0 with everything, themselves included: kept
    # once each (TF's and torchvision's NMS). TFLite's NMS op alone would repeat such a box.
    boxes = np.array([[[10, 0, 50, 0], [10, 0, 50, 0], [10, 0, 50, 30], [12, 0, 52, 30], [60, 60, 60, 90]]], F32)
    scores = np.array([[[0.9], [0.8], [0.7], [0.6], [0.5]]], F32)
    got_boxes, got_scores, got_classes, num = batched_class_nms(boxes, scores, max_detections=8, method=nms)
    assert int(num[0]) == 4  # box 3 (IoU 0.9 with box 2) is suppressed, the flat ones are not
    np.testing.assert_allclose(got_scores[0, :4], [0.9, 0.8, 0.7, 0.5])
    np.testing.assert_array_equal(got_boxes[0, :4], boxes[0, [0, 1, 2, 4]])
    assert ref_nms(boxes[0], scores[0, :, 0], 0.45) == [0, 1, 2, 4]


def test_unknown_nms_method():
    with pytest.raises(ValueError, match="v5"):
        batched_class_nms(np.zeros((1, 2, 4), F32), np.zeros((1, 2, 1), F32), method="soft")
    with pytest.raises(ValueError, match="combined"):
        SSDDecoder(nms="soft")


def test_decoder_layer_config_round_trip(rng):
    layer = SSDDecoder(priors="coco", input_hw=(64, 64), score_threshold=0.05, max_detections=50)
    config = layer.get_config()
    again = SSDDecoder.from_config(config)
    assert again.get_config() == config and "anchors" not in config
    np.testing.assert_array_equal(again.anchors, ssd_anchors((64, 64), "coco"))
    loc, conf = _raw(rng, 2, len(layer.anchors), 5, 1.0)
    out = again([loc, conf])
    want = ssd_postprocess(loc, conf, layer.anchors, (64, 64), score_threshold=0.05, max_detections=50)
    for key in want:
        np.testing.assert_array_equal(out[key], want[key])
    with pytest.raises(ValueError, match="anchors"):
        layer([loc[:, :10], conf[:, :10]])
    with pytest.raises(ValueError, match="known"):
        SSDDecoder(priors="nope")


def test_decoder_model_saves_and_loads_in_safe_mode(tmp_path, rng):
    decoder = SSDDecoder(priors="voc", input_hw=(64, 64), max_detections=20)
    a, c = len(decoder.anchors), 6
    loc_in, conf_in = keras.Input((a, 4), name="mbox_loc"), keras.Input((a, c), name="mbox_conf")
    model = keras.Model([loc_in, conf_in], decoder([loc_in, conf_in]))
    path = tmp_path / "decoder.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for batch in (1, 3):  # dynamic batch
        loc, conf = _raw(rng, batch, a, c, 1.0)
        want, got = model([loc, conf]), loaded([loc, conf])
        assert got["detection_boxes"].shape == (batch, 20, 4)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    fn = tf.function(lambda x, y: loaded([x, y]), input_signature=[
        tf.TensorSpec([None, a, 4], tf.float32), tf.TensorSpec([None, a, c], tf.float32)])
    assert fn.get_concrete_function().structured_outputs["detection_classes"].shape.as_list() == [None, 20]
