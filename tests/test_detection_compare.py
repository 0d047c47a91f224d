"""Detections compared as sets (kseg.detection.compare): what verifies a detector's export."""

import numpy as np
import pytest

from kseg.detection.compare import compare_detection_sets

F32 = np.float32


def _dets(rows, capacity=6):
    """Padded detections of one image from (class, score, x1, y1, x2, y2) rows."""
    boxes = np.zeros((1, capacity, 4), F32)
    scores = np.zeros((1, capacity), F32)
    classes = np.full((1, capacity), -1, np.int32)
    for i, (c, s, *box) in enumerate(rows):
        boxes[0, i], scores[0, i], classes[0, i] = box, s, c
    return {"detection_boxes": boxes, "detection_scores": scores, "detection_classes": classes,
            "num_detections": np.array([len(rows)], np.int32)}


ROWS = [(1, 0.9, 10, 10, 50, 50), (2, 0.8, 100, 100, 150, 160), (1, 0.7, 60, 60, 90, 90)]
TOL = dict(score_atol=1e-5, box_atol=0.3, score_threshold=0.01, iou_threshold=0.45)


def test_order_does_not_matter_and_differences_are_measured():
    moved = [(c, s + 2e-6, x1 + 0.1, y1, x2, y2) for c, s, x1, y1, x2, y2 in ROWS]
    found = compare_detection_sets(_dets(ROWS), _dets(moved[::-1]), **TOL)
    assert found.passed and found.matched == 3 and found.excused == 0
    assert found.max_box_diff == pytest.approx(0.1, abs=1e-5)
    assert found.max_score_diff == pytest.approx(2e-6, abs=1e-7)


@pytest.mark.parametrize("change", [
    lambda r: (3, *r[1:]),  # another class
    lambda r: (r[0], r[1] - 1e-3, *r[2:]),  # another score
    lambda r: (*r[:2], r[2] + 1.0, *r[3:]),  # a box moved by 1 px
])
def test_a_changed_detection_is_unmatched(change):
    rows = [ROWS[0], change(ROWS[1]), ROWS[2]]
    found = compare_detection_sets(_dets(ROWS), _dets(rows), **TOL)
    assert not found.passed
    assert {(side, cls) for _, side, cls, _ in found.unmatched} >= {("a", 2)}


def test_a_missing_or_extra_detection_fails():
    assert not compare_detection_sets(_dets(ROWS), _dets(ROWS[:2]), **TOL).passed
    assert not compare_detection_sets(_dets(ROWS[:2]), _dets(ROWS), **TOL).passed


def test_near_the_score_threshold_is_excused():
    edge = (3, 0.010004, 200, 200, 220, 220)
    found = compare_detection_sets(_dets(ROWS + [edge]), _dets(ROWS), **TOL)
    assert found.passed and found.excused == 1


def test_the_top_k_cut_is_excused_only_when_the_other_run_is_full():
    full = ROWS + [(3, 0.5, 0, 0, 5, 5), (3, 0.4, 200, 0, 205, 5), (4, 0.3, 0, 200, 5, 205)]
    swapped = full[:-1] + [(4, 0.3 - 5e-6, 250, 250, 260, 260)]  # a near-tie for the last place
    assert compare_detection_sets(_dets(full), _dets(swapped), **TOL).passed
    # The same difference in a run that is not full is a real one.
    assert not compare_detection_sets(_dets(full[:-1] + [full[-1]], 8), _dets(swapped, 8), **TOL).passed


def test_an_iou_tie_at_the_nms_threshold_is_excused():
    # [0, 0, 100, 45] against [0, 0, 100, 100]: IoU exactly 0.45, kept by one rounding, not by another.
    tie = (1, 0.85, 0, 0, 100, 45)
    better = (1, 0.95, 0, 0, 100, 100)
    found = compare_detection_sets(_dets([better, tie] + ROWS[1:]), _dets([better] + ROWS[1:]), **TOL)
    assert found.passed and found.excused == 1
    clear = (1, 0.85, 0, 0, 100, 60)  # IoU 0.6: one run suppressed it and the other did not
    assert not compare_detection_sets(_dets([better, clear] + ROWS[1:]), _dets([better] + ROWS[1:]), **TOL).passed


# NMS ties: candidates are what the decoder scored before NMS (here: the rows plus two suppressed ones).
P = (1, 0.9, 10, 10, 50, 50)
Q = (1, 0.9, 20, 10, 60, 50)  # P's twin in score (say, the same pooled features), IoU 0.6 with P
R = (1, 0.8, 34, 10, 74, 50)  # IoU 0.48 with Q, 0.25 with P: Q suppresses it, P does not
CANDIDATES = [P, Q, R] + ROWS[1:]


def test_an_nms_tie_is_excused_against_the_candidates():
    # One run kept P (and so R), the other its twin Q, which suppressed R there.
    kept_p, kept_q = [P, R] + ROWS[1:], [Q] + ROWS[1:]
    assert not compare_detection_sets(_dets(kept_p), _dets(kept_q), **TOL).passed
    found = compare_detection_sets(_dets(kept_p), _dets(kept_q), candidates=_dets(CANDIDATES), **TOL)
    assert found.passed and found.excused == 3 and found.matched == 2


def test_a_box_no_decoder_made_is_not_excused_as_a_tie():
    moved = (1, 0.9, 11, 10, 51, 50)  # P shifted by a pixel: overlaps P, but is no candidate
    found = compare_detection_sets(_dets([P] + ROWS[1:]), _dets([moved] + ROWS[1:]), candidates=_dets(CANDIDATES),
                                   **TOL)
    assert not found.passed and sorted(side for _, side, _, _ in found.unmatched) == ["a", "b"]


def test_a_candidate_missing_beside_a_box_both_runs_kept_is_reported():
    # R is a candidate, but P (kept by both, IoU 0.25 with R) cannot have suppressed it at 0.45.
    found = compare_detection_sets(_dets([P, R] + ROWS[1:]), _dets([P] + ROWS[1:]), candidates=_dets(CANDIDATES),
                                   **TOL)
    assert not found.passed and found.unmatched == [(0, "a", 1, pytest.approx(0.8))]


def test_a_lower_box_kept_instead_of_a_better_one_is_reported():
    # An NMS that kept R over Q (IoU 0.48, Q better by 0.1): Q is missing and nothing better explains it.
    found = compare_detection_sets(_dets([Q] + ROWS[1:]), _dets([R] + ROWS[1:]), candidates=_dets(CANDIDATES), **TOL)
    assert not found.passed and found.unmatched == [(0, "a", 1, pytest.approx(0.9))]


def _two_stage_runs(shift=0.0):
    """A reference run and another of a Fast R-CNN head's raw outputs with their detections (kseg's
    decoder): two proposals under the same features (equal logits) overlapping at IoU 0.82, and a third.
    The other run reports the same raw outputs, its detections decoded with the twins in the other order
    (its NMS kept the second twin) and moved by `shift` px."""
    from kseg.detection.postprocess import FastRCNNDecoder

    decoder = FastRCNNDecoder(score_threshold=0.05, iou_threshold=0.5, max_detections=10)
    proposals = np.array([[[10, 10, 50, 50], [14, 10, 54, 50], [60, 60, 90, 90], [0, 0, 0, 0]]], np.float32)
    raw = {"proposals": proposals, "proposal_mask": np.array([[1, 1, 1, 0]], np.float32),
           "class_logits": np.array([[[0, 2, -1], [0, 2, -1], [0, -1, 2], [0, 0, 0]]], np.float32),
           "box_regression": np.zeros((1, 4, 12), np.float32)}
    images = np.zeros((1, 100, 100, 3), np.float32)

    def decode(r):
        found = decoder([r[n] if n != "image" else images for n in decoder.inputs_from])
        return {k: np.asarray(v) for k, v in found.items()}

    other = decode({k: v[:, [1, 0, 2, 3]] for k, v in raw.items()})
    other["detection_boxes"] = other["detection_boxes"] + np.float32(shift) * (other["detection_scores"] > 0)[..., None]
    return {**raw, **decode(raw)}, {**raw, **other}, decoder, images


def test_a_detectors_verification_excuses_its_nms_tie_only():
    from kseg.tasks.detection import Detection

    tol = {"atol": 1e-5, "rtol": 1e-3, "argmax": 0.999}
    ref, out, decoder, images = _two_stage_runs()
    assert ref["detection_boxes"][0, 0, 0] != out["detection_boxes"][0, 0, 0]  # the runs kept different twins
    reports = Detection().compare_outputs(ref, out, tol, postprocess=decoder, images=images)
    assert all(r.passed for r in reports)
    # The other run: its twin and the decoder's excused as a tie; the run against run: the twins apart.
    assert "3 matched, 2 excused" in reports[-1].note and "run against run: 1 matched, 2 apart" in reports[-1].note
    # Without the decoder, the two runs are compared with each other: the twins differ.
    assert not all(r.passed for r in Detection().compare_outputs(ref, out, tol, postprocess=decoder))
    # A twin 3 px off is no candidate of the decoder: reported.
    ref, out, decoder, images = _two_stage_runs(shift=3.0)
    reports = Detection().compare_outputs(ref, out, tol, postprocess=decoder, images=images)
    assert not reports[-1].passed and "unmatched" in reports[-1].note
