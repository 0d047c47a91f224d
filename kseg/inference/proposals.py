"""Detectors that take region proposals (a second Keras input named "proposals", (B, R, 4) xyxy pixels of
the network input, padding rows x2 <= x1: kseg's fast_rcnn_vgg16, rcnn_alexnet) in kseg predict and
kseg evaluate.

Where the boxes come from: a file of boxes per image id in the original image's pixels (.npz, .json or
py-faster-rcnn's .mat, kseg.detection.precomputed.load_proposals; `kseg data proposals` writes one), or,
for predict, Selective Search run on each image (`--proposals selective-search`,
kseg.detection.selective_search). Image ids are the image files' names without their extension, as the
detection readers key them.

How they reach the network, as py-faster-rcnn's lib/fast_rcnn/test.py im_detect does: each image's
boxes, its first R (the model's rows; R-CNN and Fast R-CNN rank Selective Search's boxes and test on
~2000), padded with zero rows, are scaled with the image: an any-size detector's image is resized to the
test scale (kseg.tasks.detection.rescale) and the boxes multiplied by the same factor
(`_project_im_rois`: `im_rois * im_scale_factor`); a fixed-size detector's image is resized per axis to
its input and the boxes scaled per axis. The decoder's detections are divided back into the original
image's pixels and clipped to it.
"""

from __future__ import annotations

import os

import numpy as np

from kseg.detection.precomputed import load_proposals, pad_proposals
from kseg.identity import resolve_preprocessing

PROPOSALS_INPUT = "proposals"
SELECTIVE_SEARCH = "selective-search"
# --proposals selective-search: each photo is searched on a copy whose longer side is at most this (VOC's
# images, on which R-CNN and Fast R-CNN ran it, are about 500 x 375; a 12-megapixel photo at its own size
# would take minutes). The boxes are scaled back to the photo.
SEARCH_MAX_SIDE = 500


def _input_name(tensor):
    return str(getattr(tensor, "name", "")).split(":")[0]


def proposal_rows(model) -> int | None:
    """R of a model's input named "proposals" ((B, R, 4)); None for a model without one."""
    for tensor in getattr(model, "inputs", None) or []:
        if _input_name(tensor) == PROPOSALS_INPUT:
            return int(tensor.shape[1])
    return None


def image_input(model):
    """The image input of a model (its first input of rank 4; a one-input model's input)."""
    inputs = list(getattr(model, "inputs", None) or [])
    if len(inputs) == 1:
        return inputs[0]
    for tensor in inputs:
        if len(tensor.shape) == 4 and _input_name(tensor) != PROPOSALS_INPUT:
            return tensor
    raise ValueError(f"{model.name}: no image input (B, H, W, C) among its inputs "
                     f"{[_input_name(t) for t in inputs]}")


def missing_error(name, *, predict) -> ValueError:
    """The one-line error for a proposals detector run without proposals."""
    also = " or --proposals selective-search (computed per image; proposals= in Python)" if predict else ""
    return ValueError(f"{name} detects on region proposals given with each image (its 'proposals' input): pass "
                      f"--proposals FILE (.npz, .json or .mat: boxes per image id in the image's pixels, e.g. written "
                      f"by `kseg data proposals`){also}")


def not_applicable_error(name) -> ValueError:
    return ValueError(f"--proposals feeds a detector's 'proposals' input; {name} has none")


class ProposalFile:
    """Boxes per image id from a proposals file (load_proposals); `check(ids)` names a missing image and the file."""

    def __init__(self, path, image_ids=None):
        self.path = os.fspath(path)
        self.boxes = load_proposals(self.path, image_ids=image_ids)

    def check(self, image_ids, paths=None):
        for i, image_id in enumerate(image_ids):
            if image_id not in self.boxes:
                where = f" ({paths[i]})" if paths is not None else ""
                shown = ", ".join(repr(k) for k in list(self.boxes)[:3])
                raise KeyError(f"{self.path}: no proposals for image {image_id!r}{where}; the file has "
                               f"{len(self.boxes):,} images' proposals (e.g. {shown}), keyed by image id (the "
                               f"image file's name without its extension)")

    def __call__(self, image_id, image):
        return self.boxes[image_id]


class ProposalDict(ProposalFile):
    """A {image_id: (N, 4) boxes} dict given directly."""

    def __init__(self, boxes):
        self.path = "the proposals given"
        self.boxes = {str(k): np.asarray(v, np.float32).reshape(-1, 4) for k, v in boxes.items()}


class SelectiveSearchProposals:
    """Selective Search on each image, on the fly (fast mode, SEARCH_MAX_SIDE)."""

    path = SELECTIVE_SEARCH

    def __init__(self, rows):
        from kseg.detection.selective_search import check_installed

        check_installed()  # the install hint before any work
        self.max_boxes = int(rows)  # the model's rows: the first R boxes of Selective Search's ranking

    def check(self, image_ids, paths=None):
        pass

    def __call__(self, image_id, image):
        from kseg.detection.selective_search import selective_search

        return selective_search(image, max_boxes=self.max_boxes, max_side=SEARCH_MAX_SIDE)


def proposal_source(model, proposals, *, predict, image_ids=None):
    """Where a model's proposals come from (a ProposalFile, ProposalDict or SelectiveSearchProposals), or None
    for a model without a proposals input. proposals: a file path, a dict, "selective-search" (predict only)
    or None (an error for a proposals detector). image_ids: a .mat file's image order (kseg.detection.precomputed)."""
    rows = proposal_rows(model)
    if rows is None:
        if proposals is not None:
            raise not_applicable_error(model.name)
        return None
    if proposals is None:
        raise missing_error(model.name, predict=predict)
    if isinstance(proposals, dict):
        return ProposalDict(proposals)
    if isinstance(proposals, str) and proposals == SELECTIVE_SEARCH:
        if not predict:
            raise ValueError("--proposals selective-search computes boxes for kseg predict's few images; for a "
                             "dataset write them once with `kseg data proposals` and pass the file")
        return SelectiveSearchProposals(rows)
    if hasattr(proposals, "check") and callable(proposals):
        return proposals
    return ProposalFile(proposals, image_ids=image_ids)


def fit_rows(proposals, rows):
    """(B, R', 4) padded proposals -> (B, rows, 4): the first rows, or zero rows appended."""
    p = np.asarray(proposals, np.float32)
    if p.shape[1] >= rows:
        return p[:, :rows]
    return np.concatenate([p, np.zeros((p.shape[0], rows - p.shape[1], 4), np.float32)], axis=1)


class ProposalDetector:
    """detect(images, proposals) of a decoding detector with image and proposals inputs (kseg.inference_model's),
    traced once for every batch and image size.

    images: raw RGB 0..255 (B, H, W, 3) sharing one size; proposals: (B, R', 4) xyxy boxes in those images'
    pixels, padding rows zero (made R rows: the first R, or zero rows added). The images are resized to the
    network's input (scale: an any-size detector's test scale (min_size, max_size), the boxes multiplied by
    the resize factor; network_hw: a fixed-size detector's (h, w), the boxes scaled per axis), preprocessed
    in the graph, detected, and the detections mapped back to the given images' pixels and clipped to them.
    Returns the decoder's outputs as NumPy."""

    def __init__(self, decoding, preprocessing, *, scale=None, network_hw=None):
        import tensorflow as tf

        if (scale is None) == (network_hw is None):
            raise ValueError("ProposalDetector: give scale= (any-size detector) or network_hw= (fixed size)")
        self.rows = proposal_rows(decoding)
        if self.rows is None:
            raise not_applicable_error(decoding.name)
        self.scale, self.network_hw = scale, network_hw
        prep = resolve_preprocessing(preprocessing)
        order = [_input_name(t) for t in decoding.inputs]
        image = image_input(decoding)
        image_name = _input_name(image)
        specs = {image_name: tf.TensorSpec((None, *image.shape[1:]), tf.float32),
                 PROPOSALS_INPUT: tf.TensorSpec((None, self.rows, 4), tf.float32)}

        def call(images, proposals):
            x = prep.apply(images) if prep is not None else images
            given = {image_name: x, PROPOSALS_INPUT: proposals}
            return decoding([given[n] for n in order], training=False)

        self._fn = tf.function(call, input_signature=[specs[image_name], specs[PROPOSALS_INPUT]])

    def __call__(self, images, proposals) -> dict:
        import tensorflow as tf

        from kseg.tasks.detection import rescale

        x = tf.convert_to_tensor(images, tf.float32)
        h, w = (int(v) for v in x.shape[1:3])
        if self.scale is not None:
            factor, size = rescale(h, w, *self.scale)
            factors = np.array([factor] * 4, np.float64)
        else:
            size = tuple(self.network_hw)
            factors = np.array([size[1] / w, size[0] / h] * 2, np.float64)
        if size != (h, w):
            x = tf.image.resize(x, size, method="bilinear")
        p = fit_rows(proposals, self.rows) * factors.astype(np.float32)
        found = {k: np.asarray(v) for k, v in self._fn(x, tf.constant(p)).items()}
        boxes = found["detection_boxes"].astype(np.float64) / factors
        found["detection_boxes"] = np.clip(boxes, 0, np.array([w, h, w, h], np.float64))
        return found

    @property
    def tracing_count(self) -> int:
        return self._fn.experimental_get_tracing_count()


def padded(source, image_id, image, rows):
    """(1, R, 4) float32 of one image's boxes from `source` (its first R, zero rows after) and how many are real."""
    boxes, mask = pad_proposals(source(image_id, image), rows, truncate=True)
    return boxes[None], int(mask.sum())


def recorded_proposals(model_path, data, split):
    """The training recipe's `[data] proposals` file for `split` ("{split}" replaced) in the data directory
    `data`, from the run's kseg_run.json next to model_path; None when there is none or it is not there."""
    from kseg.identity import run_record

    name = (((run_record(model_path) or {}).get("recipe_values") or {}).get("data") or {}).get("proposals")
    if not name or not os.path.isdir(data):
        return None
    path = os.path.join(data, str(name).replace("{split}", split))
    return path if os.path.isfile(path) else None


def split_proposals(model, proposals, *, data, layout, split, annotations=None, run_of=None):
    """{image_id: (R, 4) padded boxes in the original pixels} of every image of a detection split, for a reader's
    extra_boxes (kseg evaluate); None for a model without a proposals input.

    proposals: the file ("{split}" in its name replaced by `split`), else the training run's recipe's [data]
    proposals when it exists in `data` (run_of: the model file), else the missing-proposals error. layout:
    "voc_detection" or "coco_detection" (kseg evaluate's). An image the file lacks: an error naming it and the
    file."""
    import sys

    from kseg.data.proposals import split_images

    rows = proposal_rows(model)
    if rows is None:
        if proposals is not None:
            raise not_applicable_error(model.name)
        return None
    if proposals is not None:
        path = os.fspath(proposals).replace("{split}", split)
    else:
        path = recorded_proposals(run_of, data, split) if run_of else None
        if path is None:
            raise missing_error(model.name, predict=False)
        print(f"proposals: {path} (the training recipe's [data] proposals)", file=sys.stderr)
    if path == SELECTIVE_SEARCH:
        proposal_source(model, path, predict=False)  # its error
    coco = layout == "coco_detection"
    images = split_images(data, "coco" if coco else "voc-det", split=None if coco else split,
                          annotations=annotations if coco else None)
    ids = [i for i, _ in images]
    source = ProposalFile(path, image_ids=ids if path.lower().endswith(".mat") else None)
    source.check(ids, [p for _, p in images])
    return {i: pad_proposals(source.boxes[i], rows, truncate=True)[0] for i in ids}
