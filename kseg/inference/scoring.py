"""Evaluation as the papers measured it, and the dense CRF's cross-validation.

    raw = kseg.data.synthetic(root, "val", batch_size=1)
    evaluate(model, raw, preprocessing="deeplab_largefov", crf=True)["before_crf"]["mean_iou"]

`evaluate` scores a segmentation model at the labels' own resolution (one traced graph for
every image size) and a detector with its decoder appended (VOC mAP and COCO AP in the original
images' pixels, `score_detections`); `crf_search` scores a grid of CRF settings on the first images of a split,
running the network once per image. `kseg evaluate` and `kseg crf-search` are the faces.
"""

from __future__ import annotations

import numpy as np

from kseg.crf import as_params, check_installed, dense_crf
from kseg.identity import identify, resolve_preprocessing, task_of
from kseg.inference.loading import InferenceModel
from kseg.inference.proposals import ProposalDetector, image_input, proposal_rows
from kseg.inference.traced import Predictor, predictor
from kseg.progress import progress as progress_bar
from kseg.tasks.metrics import confusion_matrix, iou_table, scores_from_confusion


def evaluate(model, dataset, *, num_classes=None, class_names=None, progress=True, crf=None,
             preprocessing=None, edge_output=None, test_scale=None) -> dict:
    """Score a model on an (image, label) dataset as its task measures it.

    Segmentation (at the labels' own resolution; batch-1 datasets of unpadded images give
    original-size scores): {"pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou",
    "per_class": [...], "confusion": [[...]]}; classification: {"top1", "top5" (more than 5
    classes), "per_class": [{"class", "accuracy", "images", ...}], "confusion", "count"}; edges: the
    BSDS benchmark (kseg.tasks.bsds) {"ods", "ods_threshold", "ods_precision", "ods_recall", "ois",
    "ois_thresholds", ..., "output"} of `edge_output` ("average" of HED's outputs, or "fuse");
    detection (a kseg.data.voc_detection / coco_detection dataset resized to the network input,
    size=(300, 300) for SSD300, any batch size; for a detector that takes any size, Faster R-CNN,
    at the files' own size with batch_size=1: each image is resized to the test scale,
    `test_scale` = (min_size, max_size), either None for the model's rule: see detection_scale,
    at_test_scale; a detector with a proposals input, Fast R-CNN's: a reader with
    extra_boxes={"proposals": ...}, kseg.inference.proposals):
    {"map_voc07", "map_voc", "per_class": [{"class", "name", "ap_voc07", "ap_voc",
    "gt", "detections"}], "coco": {"ap", "ap50", "ap75", ...}, "count"}
    (kseg.tasks.detection.DetectionEvaluator) of every detection the decoder keeps, boxes mapped
    back to each image's original pixels (see score_detections). Always "images": N. The task is
    the model's kseg architecture's (kseg.identity.task_of).

    `preprocessing` (a kseg.Preprocessing, kind or model name) is applied to the dataset's images
    before the model; pass it with a raw dataset (a kseg.data reader without preprocessing=).
    `crf` (True, a kseg.crf.CRFParams or a "w1=5,sigma_alpha=80" string) refines each image's
    probabilities with the dense CRF, which needs the raw colours, so it requires a raw dataset
    (segmentation only). The scores are then the CRF's, with the network's own under
    "before_crf" and the setting under "crf".

        raw = kseg.data.synthetic(root, "val", batch_size=1)
        evaluate(model, raw, preprocessing="deeplab_largefov", crf=True)["before_crf"]["mean_iou"]
    """
    task = task_of(model)
    if task.target_kind == "boxes":
        if as_params(crf) is not None:
            raise ValueError(f"{model.name} is a {task.name} model; the dense CRF refines per-pixel class scores")
        return _evaluate_detection(model, dataset, task, class_names, preprocessing, progress, test_scale)
    if test_scale is not None:
        raise ValueError(f"test_scale (--min-size / --max-size) sets a detector's test scale; {model.name} is a "
                         f"{task.name} model")
    head = task.head(list(model.output_names), identify(model).options, output_rank=len(model.outputs[0].shape))
    num_classes = num_classes or model.outputs[head.output_index].shape[-1]
    names = class_names or getattr(dataset, "class_names", None)
    if names and len(names) < num_classes and not task.dense:
        # A classifier with more outputs than the dataset has classes: label i is still class i.
        names = [*names, *(str(i) for i in range(len(names), num_classes))]
    names = names if names and len(names) == num_classes else None
    params = as_params(crf)
    total = dataset.cardinality().numpy()
    total = int(total) if total >= 0 else None
    if params is not None:
        if task.target_kind != "class_map":
            raise ValueError(f"{model.name} is a {task.name} model; the dense CRF refines per-pixel class scores")
        return _evaluate_crf(model, dataset, params, preprocessing, num_classes, names, progress, total)
    scores = task.evaluator(num_classes, head, names, **({"output": edge_output} if edge_output else {}))
    run = predictor(model, preprocessing=resolve_preprocessing(preprocessing))  # one trace for every size
    images = 0
    with progress_bar(progress, "evaluating", total) as advance:
        for x, y in dataset:
            scores.update(y, run(x))
            images += int(x.shape[0])
            advance()
    return {**scores.result(), "images": images}


def detector(model):
    """(the model with its decoder, its class count incl. background) of a kseg detector: the model
    itself when it already decodes (built with postprocess=True), else kseg.inference_model(model)."""
    from kseg.api import inference_model

    output = getattr(model, "output", None)
    if isinstance(output, dict) and "detection_boxes" in output:
        ident = identify(model)
        if ident is None or not ident.num_classes:
            raise ValueError(f"{model.name}: a decoding model whose class count is unknown (not a kseg detector)")
        return model, int(ident.num_classes)
    task = task_of(model)
    head = task.head(list(model.output_names), identify(model).options, output_rank=len(model.outputs[0].shape))
    return inference_model(model), int(model.outputs[head.output_index].shape[-1])


def network_size(model) -> tuple[int, int] | None:
    """The fixed (h, w) input of a detector (SSD: its decoder's anchors are laid out for it), or None
    for one that takes any size (Faster R-CNN: it runs at each image's test scale, detection_scale). A model
    with several inputs (Fast R-CNN's image and proposals): its image input's."""
    h, w = tuple(image_input(model).shape[1:3])
    if not h or not w:
        return None
    return int(h), int(w)


def detection_scale(model, min_size=None, max_size=None) -> tuple[int, int] | None:
    """(min_size, max_size) an any-size detector runs at (its registry spec's test_scales for its
    layout, from its identity; each value given replaces the rule's), or None for a
    fixed-input detector, which refuses them."""
    from kseg.tasks.detection import resolve_scale

    hw = network_size(model)
    if hw is not None:
        if min_size is not None or max_size is not None:
            raise ValueError(f"{model.name} detects on {hw[0]}x{hw[1]} images (its input size): every image is "
                             "resized to it; --min-size / --max-size set the test scale of detectors that take "
                             "any size")
        return None
    ident = identify(model)
    spec = ident.spec if ident else None
    return resolve_scale(spec.test_scales if spec else None, (ident.options if ident else {}).get("layout"),
                         min_size, max_size, name=ident.architecture if ident else None)


def at_test_scale(run, scale):
    """detect(images) of an any-size detector: a batch (B, H, W, 3) of raw images sharing one size,
    resized keeping the aspect ratio to the test scale (min_size, max_size) (kseg.tasks.detection.rescale:
    py-faster-rcnn's TEST.SCALES / TEST.MAX_SIZE, torchvision's min_size / max_size), run through `run`
    (a decoding Predictor), its boxes divided by the scale and clipped to the images: detections in the
    given images' pixels, NumPy."""
    import tensorflow as tf

    from kseg.tasks.detection import rescale

    def detect(images):
        x = tf.convert_to_tensor(images, tf.float32)
        h, w = (int(v) for v in x.shape[1:3])
        factor, size = rescale(h, w, *scale)
        found = {k: np.asarray(v) for k, v in run(tf.image.resize(x, size, method="bilinear")).items()}
        boxes = found["detection_boxes"].astype(np.float64) / factor
        found["detection_boxes"] = np.clip(boxes, 0, np.array([w, h, w, h], np.float64))
        return found

    return detect


def with_background(names):
    """Class names indexed by class id: "background" put in front when the first is not it (a run's
    or a dataset's list of object classes)."""
    from kseg.data.detection import BACKGROUND_NAMES

    names = [str(n) for n in names or ()]
    if names and names[0].lower() not in BACKGROUND_NAMES:
        names = ["background", *names]
    return names


def to_original(boxes, image_shape, network_hw):
    """xyxy boxes (B, K, 4) in pixels of the network input -> each image's original pixels (per-axis
    scale by image_shape (B, 2) = (H, W) over the network's (h, w), as the readers' resize)."""
    boxes = np.asarray(boxes, np.float64)
    shape = np.asarray(image_shape, np.float64).reshape(-1, 1, 2)
    sy, sx = shape[..., 0] / network_hw[0], shape[..., 1] / network_hw[1]
    return boxes * np.stack([sx, sy, sx, sy], axis=-1)


def score_detections(detect, dataset, evaluator, network_hw=None, *, progress=True, total=None,
                     proposals=False) -> dict:
    """Feed a detection dataset's batches through `detect` into `evaluator` (a DetectionEvaluator).

    dataset: (images (B, h, w, 3), {"boxes", "classes", "difficult", "image_shape"}) batches read
    at the network size network_hw = (h, w) (kseg.data.voc_detection(..., size=(h, w))), or, with
    network_hw None, at whatever size each batch has (batch_size=1 at the files' own size for an
    any-size detector: then detect is at_test_scale's). detect: images -> the decoder's outputs
    (detection_boxes xyxy pixels of the input, detection_scores, detection_classes,
    num_detections). The ground truth and the detections are both scaled back to each image's
    original pixels (image_shape) before scoring: VOC AP does not change (IoU is invariant to a
    per-axis scale), COCO's small / medium / large areas are the original's. proposals=True: a detector
    with a proposals input, called as detect(images, target["proposals"]) (the readers' extra_boxes,
    resized with the images; kseg.inference.proposals.ProposalDetector).
    Returns evaluator.result() with "images": N.
    """
    images = 0
    with progress_bar(progress, "evaluating detections", total) as advance:
        for x, y in dataset:
            found = {k: np.asarray(v) for k, v in (detect(x, y["proposals"]) if proposals else detect(x)).items()}
            truth = {k: np.asarray(y[k]) for k in ("boxes", "classes", "difficult") if k in y}
            shape = np.asarray(y["image_shape"])
            hw = network_hw if network_hw is not None else tuple(int(v) for v in x.shape[1:3])
            truth["boxes"] = to_original(truth["boxes"], shape, hw)
            found["detection_boxes"] = to_original(found["detection_boxes"], shape, hw)
            evaluator.update(truth, found)
            images += int(shape.shape[0])
            advance()
    return {**evaluator.result(), "images": images}


def _evaluate_detection(model, dataset, task, class_names, preprocessing, progress, test_scale=None):
    scale = detection_scale(model, *(test_scale or (None, None)))
    decoding, num_classes = detector(model)
    names = with_background(class_names or getattr(dataset, "class_names", None))
    data_classes = getattr(dataset, "class_names", None)
    if data_classes is not None and len(data_classes) > num_classes:
        raise ValueError(f"the dataset has {len(data_classes)} class ids (background included) but {model.name} "
                         f"scores {num_classes}: evaluate it on a dataset of its own classes")
    total = dataset.cardinality().numpy()
    total = int(total) if total >= 0 else None
    evaluator = task.evaluator(num_classes, None, names)
    if proposal_rows(model) is not None:  # Fast R-CNN, R-CNN: the reader carries each image's proposals
        if "proposals" not in dataset.element_spec[1]:
            raise ValueError(f"{model.name} detects on region proposals: read the dataset with extra_boxes="
                             "{'proposals': {image_id: (R, 4) boxes}} (kseg.data.voc_detection / coco_detection; "
                             "kseg evaluate --proposals FILE)")
        detect = ProposalDetector(decoding, resolve_preprocessing(preprocessing), scale=scale,
                                  network_hw=None if scale is not None else network_size(model))
        return score_detections(detect, dataset, evaluator, None if scale is not None else network_size(model),
                                progress=progress, total=total, proposals=True)
    run = predictor(decoding, preprocessing=resolve_preprocessing(preprocessing))
    if scale is not None:  # any size: each batch (one image, at its own size) at the test scale
        return score_detections(at_test_scale(run, scale), dataset, evaluator, progress=progress, total=total)
    return score_detections(run, dataset, evaluator, network_size(model), progress=progress, total=total)


def _evaluate_crf(model, dataset, params, preprocessing, num_classes, names, progress, total):
    check_installed()  # the install hint before any work
    predictor = Predictor(model, preprocessing=preprocessing)
    before = np.zeros((num_classes, num_classes), np.int64)
    after = np.zeros_like(before)
    images = 0
    with progress_bar(progress, "evaluating + CRF", total) as advance:
        for image, label in raw_pairs(dataset):
            probs = predictor.probabilities(image)
            before += confusion_matrix(label, probs.argmax(-1), num_classes)
            after += confusion_matrix(label, dense_crf(image, probs, params).argmax(-1), num_classes)
            images += 1
            advance()
    return {**scores_from_confusion(after), "per_class": iou_table(after, names), "confusion": after.tolist(),
            "images": images, "crf": str(params), "before_crf": {**scores_from_confusion(before),
                                                                 "per_class": iou_table(before, names)}}


def crf_search(inference: InferenceModel, dataset, grid, *, images=100, progress=True) -> dict:
    """Score every CRF setting of `grid` on the first `images` (raw image, label) pairs of `dataset`.

    The dataset must yield raw RGB 0..255 images (a kseg.data reader without preprocessing=),
    batched or not; labels at the images' size, 255 ignored. The network runs once per image
    and every setting refines the same probabilities. Returns {"baseline": scores without CRF,
    "results": [{"params": {...}, "crf": "w1=...", **scores}, ...] best mean IoU first,
    "best": the first of them, "images": n}.
    """
    grid = [as_params(g) for g in grid]
    if not grid:
        raise ValueError("the CRF search grid is empty")
    predictor = Predictor(inference.model, preprocessing=inference.preprocessing)
    c = inference.num_classes
    base = np.zeros((c, c), np.int64)
    per_setting = np.zeros((len(grid), c, c), np.int64)
    n = 0
    total = images * len(grid) if images else None
    with progress_bar(progress, f"CRF search: {len(grid)} settings", total) as advance:
        for image, label in raw_pairs(dataset, images):
            probs = predictor.probabilities(image)
            base += confusion_matrix(label, probs.argmax(-1), c)
            for i, params in enumerate(grid):
                per_setting[i] += confusion_matrix(label, dense_crf(image, probs, params).argmax(-1), c)
                advance()
            n += 1
    if n == 0:
        raise ValueError("the dataset is empty: no images to search the CRF settings on")
    results = [{"params": p.to_dict(), "crf": str(p), **scores_from_confusion(cm)} for p, cm in zip(grid, per_setting)]
    results.sort(key=lambda r: -r["mean_iou"])
    return {"baseline": scores_from_confusion(base), "results": results, "best": results[0], "images": n}


def raw_pairs(dataset, limit=None):
    """(image [H, W, 3], label [H, W]) NumPy pairs from a batched or unbatched (image, label) dataset."""
    n = 0
    for x, y in dataset:
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 3:
            x, y = x[None], y[None]
        for image, label in zip(x, y):
            if limit is not None and n >= limit:
                return
            if image.size and image.min() < 0:
                raise ValueError("the dataset's images have negative values: they are preprocessed. The CRF needs "
                                 "the raw RGB colours: read the data without preprocessing= (the model's "
                                 "preprocessing is applied before the network)")
            yield image, label[..., 0] if label.ndim == 3 else label
            n += 1
