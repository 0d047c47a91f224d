"""Two runs' padded detections compared as sets, per image: what verifies a detector's export.

NMS output order is not a property of a detector (ties in score may come out either way), and
the last detections can legitimately differ between two runtimes whose raw outputs differ by
float rounding: a candidate whose score is within rounding of the score threshold or of the
per-image cut (the K-th best), or whose IoU with a better box of its class is within rounding of
the NMS threshold, may be kept by one run and dropped by the other. Such a detection is
*excused*; every other one must be matched, one to one, by a detection of the same class whose
score and box are within tolerance.

Two runs of NMS over the same candidates (one decoder's and another's, on the same raw outputs) can
still differ where candidates tie: greedy NMS keeps whichever of two overlapping boxes of equal score
comes first, and the runtimes order ties differently (Faster R-CNN with torchvision's RoIAlign gives
every proposal under one feature cell the same features, hence the same scores). Given the
candidates (every box the decoder scored, before NMS), an unmatched detection is also excused when
it is one of them and the other run kept, unmatched, a candidate of its class scored at least as
high that overlaps it above the NMS threshold: the box that suppressed it there. A box no decoder
would produce, or a detection missing beside a box both runs kept, is still reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IOU_SLACK = 1e-4  # IoUs this close to the NMS threshold may compare either way after rounding


@dataclasses.dataclass
class SetComparison:
    """Matched detections' worst score and box differences, and what could not be matched."""

    matched: int
    excused: int
    unmatched: list  # (image, side "a"/"b", class, score) of detections with no partner
    max_score_diff: float
    max_box_diff: float
    score_diffs: list = dataclasses.field(default_factory=list, repr=False)
    box_diffs: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def passed(self) -> bool:
        return not self.unmatched


def compare_detection_sets(a, b, *, score_atol, box_atol, score_threshold=0.0, iou_threshold=0.5,
                            candidates=None):
    """Compare padded detections `a` (the reference) and `b`, dicts of detection_boxes (B, K, 4),
    detection_scores (B, K), detection_classes (B, K) and num_detections (B,), image by image.

    A detection of `a` matches one of `b` of the same class with |score difference| <= score_atol
    and every box coordinate within box_atol (greedy by score, best first). Unmatched detections
    are excused when near a boundary or, with `candidates` (the same kind of dict: what the decoder
    scored before NMS, from the raw outputs both runs decoded), at an NMS tie (module docstring);
    the rest are reported.
    """
    scores_a, scores_b = np.shape(a["detection_scores"]), np.shape(b["detection_scores"])
    num_a = np.asarray(a["num_detections"]).astype(int).reshape(-1)
    num_b = np.asarray(b["num_detections"]).astype(int).reshape(-1)
    result = SetComparison(0, 0, [], 0.0, 0.0)
    if scores_a != scores_b or np.shape(a["detection_boxes"]) != np.shape(b["detection_boxes"]):
        result.unmatched.append((-1, "shape", -1, float("nan")))
        return result
    capacity = scores_a[1]
    for i in range(len(num_a)):
        one_a, one_b = _image(a, i, num_a[i]), _image(b, i, num_b[i])
        pairs, left_a, left_b = _match(one_a, one_b, score_atol, box_atol)
        for j, k in pairs:
            result.score_diffs.append(float(abs(one_a[1][j] - one_b[1][k])))
            result.box_diffs.append(float(np.abs(one_a[0][j] - one_b[0][k]).max()))
        result.matched += len(pairs)
        pool = None
        if candidates is not None:
            pool = _image(candidates, i, int(np.asarray(candidates["num_detections"]).reshape(-1)[i]))
            # Each run's unmatched detections that the decoder could have produced: NMS-tie suspects.
            left_a = [(j, _is_candidate(j, one_a, pool, score_atol, box_atol)) for j in left_a]
            left_b = [(j, _is_candidate(j, one_b, pool, score_atol, box_atol)) for j in left_b]
        else:
            left_a, left_b = [(j, False) for j in left_a], [(j, False) for j in left_b]
        for side, mine, other, left, other_left in (("a", one_a, one_b, left_a, left_b),
                                                    ("b", one_b, one_a, left_b, left_a)):
            for j, candidate in left:
                if (_excused(j, mine, other, capacity, score_atol, score_threshold, iou_threshold)
                        or candidate and _suppressed_there(j, mine, other, [k for k, c in other_left if c],
                                                           score_atol, iou_threshold)):
                    result.excused += 1
                else:
                    result.unmatched.append((i, side, int(mine[2][j]), float(mine[1][j])))
    result.max_score_diff = max(result.score_diffs, default=0.0)
    result.max_box_diff = max(result.box_diffs, default=0.0)
    return result


def _image(found, i, n):
    """(boxes, scores, classes) of image i's first n detections, float64 boxes and scores."""
    return (np.asarray(found["detection_boxes"], np.float64)[i, :n],
            np.asarray(found["detection_scores"], np.float64)[i, :n],
            np.asarray(found["detection_classes"])[i, :n])


def _is_candidate(j, mine, pool, score_atol, box_atol):
    """Whether detection j of `mine` is, within tolerance, one of the decoder's candidates `pool`."""
    boxes, scores, classes = pool
    return bool(np.any((classes == mine[2][j]) & (np.abs(scores - mine[1][j]) <= score_atol)
                       & np.all(np.abs(boxes - mine[0][j]) <= box_atol, axis=-1)))


def _suppressed_there(j, mine, other, suspects, score_atol, iou_threshold):
    """Whether the other run kept, among its unmatched candidates `suspects`, one of j's class scored
    at least as high (within score_atol) that overlaps j above the NMS threshold (within rounding)."""
    boxes, scores, classes = other
    return any(classes[k] == mine[2][j] and scores[k] >= mine[1][j] - score_atol
               and _iou(boxes[k], mine[0][j]) > iou_threshold - IOU_SLACK for k in suspects)


def _match(one_a, one_b, score_atol, box_atol):
    boxes_a, scores_a, classes_a = one_a
    boxes_b, scores_b, classes_b = one_b
    taken = np.zeros(len(scores_b), bool)
    pairs, left_a = [], []
    for j in np.argsort(-scores_a, kind="stable"):
        fits = (~taken & (classes_b == classes_a[j]) & (np.abs(scores_b - scores_a[j]) <= score_atol)
                & np.all(np.abs(boxes_b - boxes_a[j]) <= box_atol, axis=-1))
        if fits.any():
            # The closest score among the fitting ones.
            k = int(np.flatnonzero(fits)[np.argmin(np.abs(scores_b[fits] - scores_a[j]))])
            taken[k] = True
            pairs.append((int(j), k))
        else:
            left_a.append(int(j))
    return pairs, left_a, [int(k) for k in np.flatnonzero(~taken)]


def _excused(j, mine, other, capacity, score_atol, score_threshold, iou_threshold):
    boxes, scores, classes = mine
    score = scores[j]
    if score <= score_threshold + score_atol:
        return True  # at the score threshold
    if len(other[1]) >= capacity and score <= other[1].min() + score_atol:
        return True  # the other run is full with detections scored at least as high: the top-K cut
    # A better box of its class, on either side, at an IoU within rounding of the NMS threshold.
    for side_boxes, side_scores, side_classes in (mine, other):
        better = (side_classes == classes[j]) & (side_scores >= score - score_atol)
        for box in side_boxes[better]:
            if abs(_iou(box, boxes[j]) - iou_threshold) <= IOU_SLACK and not np.array_equal(box, boxes[j]):
                return True
    return False


def _iou(p, q):
    w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = w * h
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return inter / union if union > 0 else 0.0
