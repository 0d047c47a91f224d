"""Prediction on image files: label maps as palette PNGs, colour overlays, optional dense CRF;
for classifiers, the top classes of each image in one predictions.json; for edge models, one
grey PNG of edge probabilities per image (predict_edges); for detectors, detections.json and
each image with its boxes drawn (detect_images).

    from kseg.inference import classify_images, load_inference_model, predict_images
    m = load_inference_model("runs/dl/best.keras")                 # preprocessing from kseg_run.json
    predict_images(m, ["a.jpg", "photos/"], "out", crf=True)        # out/a.png, out/a_overlay.png, ...
    classify_images(load_inference_model("runs/lenet/best.keras"), ["digits/"], "out")  # out/predictions.json

Each image is predicted at its original size (fixed-input models and `size=` predict on a
resized copy and the logits are resized back, bilinearly), so the PNGs line up with the
inputs pixel for pixel. `kseg predict` is the command-line face.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from kseg.crf import as_params, check_installed, dense_crf
from kseg.data.palette import overlay, write_label
from kseg.images import IMAGE_EXTENSIONS, list_images, read_image  # noqa: F401  (kseg.inference re-exports them)
from kseg.inference.loading import InferenceModel
from kseg.inference.traced import Predictor, predictor
from kseg.progress import progress as progress_bar

PREDICTIONS_FILE = "predictions.json"
DETECTIONS_FILE = "detections.json"
# detect_images keeps (in detections.json and the drawings) the detections scoring at least this.
SCORE_THRESHOLD = 0.3


def _check_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def output_paths(images, out_dir) -> list[tuple[str, str]]:
    """(label PNG, overlay PNG) per image: OUT/STEM.png and OUT/STEM_overlay.png."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    seen = {}
    for p, s in zip(images, stems):
        if s in seen:
            raise ValueError(f"{seen[s]} and {p} would both write {s}.png in {out_dir}; predict them into "
                             "separate --out directories")
        seen[s] = p
    return [(os.path.join(out_dir, s + ".png"), os.path.join(out_dir, s + "_overlay.png")) for s in stems]


def _atomic_save(path, save):
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def predict_images(inference: InferenceModel, images, out_dir, *, crf=None, size=None, alpha=0.5,
                   overwrite=False, progress=True, palette=None) -> list[dict]:
    """Write OUT/STEM.png (palette PNG of class indices) and OUT/STEM_overlay.png per image.

    Every input is checked and every output name decided before the first prediction: an
    unreadable image, two inputs with the same file stem, or an existing output (without
    overwrite=True) raise before anything is written. Each file is written to a temporary
    name and renamed, so none is ever half-written. Returns one dict per image.
    """
    params = as_params(crf)
    if params is not None:
        check_installed()  # the install hint now, not after the first image
    images = list_images(images)
    for p in images:
        _check_image(p)
    targets = output_paths(images, out_dir)
    if not overwrite:
        existing = [t for pair in targets for t in pair if os.path.exists(t)]
        if existing:
            raise FileExistsError(f"{len(existing)} output(s) exist already, e.g. {existing[0]}; pass --force "
                                  "(overwrite=True) to replace them")
    os.makedirs(out_dir, exist_ok=True)
    predictor = Predictor(inference.model, preprocessing=inference.preprocessing, size=size)
    results = []
    with progress_bar(progress, "predicting" + (" + CRF" if params else ""), len(images)) as advance:
        for path, (label_path, overlay_path) in zip(images, targets):
            image = read_image(path)
            probs = predictor.probabilities(image)
            if params is not None:
                probs = dense_crf(image, probs, params)
            label = probs.argmax(-1).astype(np.uint8)
            _atomic_save(label_path, lambda tmp: write_label(tmp, label, palette))
            _atomic_save(overlay_path, lambda tmp: Image.fromarray(overlay(image, label, alpha, palette))
                         .save(tmp, format="PNG"))
            counts = np.bincount(label.reshape(-1), minlength=probs.shape[-1])
            results.append({"image": path, "label": label_path, "overlay": overlay_path,
                            "size": list(label.shape), "class_pixels": counts.tolist()})
            advance()
    return results


def predict_edges(inference: InferenceModel, images, out_dir, *, output=None, size=None, overwrite=False,
                  progress=True) -> list[dict]:
    """Write OUT/STEM.png per image: the edge probability as 8-bit grey (0..255), at the image's size.

    output: which map (the task's Edges.edge_map): "average" (default, the HED paper's average of
    the fused and side outputs) or "fuse". Fixed-input models and `size=` predict on a resized
    copy; the logits are resized back (bilinear) before the sigmoid. Inputs and outputs are
    checked before anything is written, as predict_images does. Returns one dict per image.
    """
    import tensorflow as tf

    from kseg.identity import identify

    images = list_images(images)
    for p in images:
        _check_image(p)
    targets = [label for label, _ in output_paths(images, out_dir)]
    if not overwrite:
        existing = [t for t in targets if os.path.exists(t)]
        if existing:
            raise FileExistsError(f"{len(existing)} output(s) exist already, e.g. {existing[0]}; pass --force "
                                  "(overwrite=True) to replace them")
    model, task = inference.model, inference.task
    head = task.head(list(model.output_names), identify(model).options)
    output = output or task.default_output
    if output not in task.OUTPUTS:
        raise ValueError(f"unknown edge output {output!r}; choose one of {', '.join(task.OUTPUTS)}")
    run = Predictor(model, preprocessing=inference.preprocessing, size=size)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    with progress_bar(progress, "predicting edges", len(images)) as advance:
        for path, target in zip(images, targets):
            image = read_image(path)
            h, w = image.shape[:2]
            x = tf.convert_to_tensor(image[None].astype(np.float32))
            if run.size is not None:
                x = tf.image.resize(x, run.size, method="bilinear")
            outs = run(x)
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            if run.size is not None:
                outs = [tf.image.resize(tf.cast(o, tf.float32), (h, w), method="bilinear") for o in outs]
            edges = task.edge_map([np.asarray(o) for o in outs], head, output)[0]
            grey = np.clip(np.round(edges * 255.0), 0, 255).astype(np.uint8)
            _atomic_save(target, lambda tmp: Image.fromarray(grey, "L").save(tmp, format="PNG"))
            results.append({"image": path, "edges": target, "size": [h, w], "output": output,
                            "max_probability": float(edges.max())})
            advance()
    return results


def classifier_input_size(model, size=None, eval_transform=None) -> tuple[int, int]:
    """The (h, w) a classifier's images are brought to: its fixed input size, else the eval
    transform's crop, else `size`; a model that takes any size needs one of the last two."""
    h, w = tuple(model.input_shape[1:3])
    if h and w:
        return int(h), int(w)
    if eval_transform is not None:
        crop = eval_transform[1]
        return (crop, crop) if isinstance(crop, int) else tuple(crop)
    if size:
        return tuple(size)
    raise ValueError(f"{model.name} takes images of any size: pass --size HxW (the size it was trained at)")


def classify_images(inference: InferenceModel, images, out_dir, *, top_k=5, size=None, overwrite=False,
                    progress=True) -> list[dict]:
    """Write OUT/predictions.json: per image {"file", "top_k": [{"class", "name", "probability"}]}.

    k = min(top_k, classes), best first. Each image goes through the model's evaluation
    transform (inference.eval_transform: shorter side resized, centre crop, as kseg evaluate
    and the training run's validation) or a plain resize to its input size, in the model's
    channels (1: grayscale). Names come from inference.class_names (the training run's
    classes), else the class index as a string. Every input is checked first; an existing
    predictions.json is an error without overwrite=True. Returns the entries.
    """
    import tensorflow as tf

    from kseg.data.augment import check_eval_transform, eval_image
    from kseg.identity import identify
    from kseg.tasks.base import probabilities

    images = list_images(images)
    for p in images:
        _check_image(p)
    target = os.path.join(out_dir, PREDICTIONS_FILE)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists already; pass --force (overwrite=True) to replace it")
    model = inference.model
    task = inference.task
    head = task.head(list(model.output_names), identify(model).options, output_rank=len(model.outputs[0].shape))
    transform = check_eval_transform(inference.eval_transform, inference.interpolation)
    hw = classifier_input_size(model, size, transform)
    channels = int(model.input_shape[-1])
    run = predictor(model, preprocessing=inference.preprocessing)
    classes = int(model.outputs[head.output_index].shape[-1])
    names = list(inference.class_names or [])[:classes]
    names += [str(i) for i in range(len(names), classes)]
    k = min(int(top_k), classes)
    results = []
    with progress_bar(progress, "classifying", len(images)) as advance:
        for path in images:
            x = eval_image(tf.constant(read_image(path, channels)), hw, transform, inference.interpolation)
            probs = probabilities(run(x[None]), head)[0]
            best = np.argsort(-probs, kind="stable")[:k]
            results.append({"file": path, "top_k": [{"class": int(i), "name": names[i],
                                                     "probability": float(probs[i])} for i in best]})
            advance()
    os.makedirs(out_dir, exist_ok=True)

    def save(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)

    _atomic_save(target, save)
    return results


def detector_class_names(inference: InferenceModel, num_classes) -> list[str]:
    """Names indexed by class id (0 = background): the training run's classes, else VOC's for a
    21-class model (ssd300's default and the VOC readers'), else the ids as strings."""
    from kseg.data.palette import VOC_CLASSES
    from kseg.inference.scoring import with_background

    names = with_background(inference.class_names)
    if not names and num_classes == len(VOC_CLASSES):
        names = list(VOC_CLASSES)
    return names[:num_classes] + [str(i) for i in range(len(names), num_classes)]


def detect_images(inference: InferenceModel, images, out_dir, *, score_threshold=SCORE_THRESHOLD, size=None,
                  overwrite=False, progress=True, min_size=None, max_size=None, proposals=None) -> list[dict]:
    """Write OUT/detections.json and OUT/STEM.png (the image with its boxes and labels) per image.

    Each image is resized (bilinear, per axis) to the detector's fixed input, as the readers and
    the TF Serving predict_images signature do; the decoder's boxes are scaled back per axis to
    the original image's pixels. A detector that takes any size (Faster R-CNN) gets one image at a
    time, resized keeping its aspect ratio to its test scale: shorter side min_size, longer at most
    max_size (default: its layout's, the registry spec's test_scales: py-faster-rcnn's 600 / 1000,
    torchvision's 800 / 1333), its boxes divided by the scale (scoring.at_test_scale).
    detections.json holds one entry per image: {"file", "size":
    [h, w], "detections": [{"class", "name", "score", "box": [x1, y1, x2, y2]}]}, best first,
    the detections scoring >= score_threshold (default 0.3; the decoder itself keeps > 0.01 for
    mAP); boxes are continuous corners (x1 <= x < x2) of the original image. Names as
    detector_class_names. `size` (h, w) must be the model's input size if given (a fixed-input
    detector; min_size / max_size go with any-size ones). Inputs and
    outputs are checked before anything is written, every file written atomically; an existing
    output is an error without overwrite=True. Returns the entries.

    A detector with a proposals input (Fast R-CNN, R-CNN) needs `proposals`: a file (.npz, .json or
    .mat) or dict of boxes per image id (the file's name without its extension) in the image's pixels,
    or "selective-search" to compute them per image (kseg.inference.proposals: the first R boxes, scaled
    with the image; an image the file lacks is an error naming both); each entry then also has
    "proposals", the number of boxes fed.
    """
    import tensorflow as tf

    from kseg.inference.plots import draw_detections
    from kseg.inference.proposals import ProposalDetector, padded, proposal_source
    from kseg.inference.scoring import at_test_scale, detection_scale, detector, network_size

    if not 0 <= float(score_threshold) <= 1:
        raise ValueError(f"the score threshold must be in [0, 1], got {score_threshold}")
    images = list_images(images)
    for p in images:
        _check_image(p)
    drawings = [label for label, _ in output_paths(images, out_dir)]
    target = os.path.join(out_dir, DETECTIONS_FILE)
    if not overwrite:
        existing = [t for t in (target, *drawings) if os.path.exists(t)]
        if existing:
            raise FileExistsError(f"{len(existing)} output(s) exist already, e.g. {existing[0]}; pass --force "
                                  "(overwrite=True) to replace them")
    model = inference.model
    source = proposal_source(model, proposals, predict=True)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    if source is not None:
        source.check(stems, images)
    hw = network_size(model)
    if size and hw is None:
        raise ValueError(f"{model.name} takes images of any size: each is resized keeping its aspect ratio to the "
                         "test scale; set that with --min-size / --max-size (min_size=, max_size=), not --size")
    if size and tuple(size) != hw:
        raise ValueError(f"{model.name} detects on {hw[0]}x{hw[1]} images (its decoder's anchors are laid out "
                         "for that size); every image is resized to it: drop --size")
    scale = detection_scale(model, min_size, max_size)
    decoding, num_classes = detector(model)
    names = detector_class_names(inference, num_classes)
    if source is not None:  # boxes in the image's own pixels, the proposals scaled with the image
        run_proposals = ProposalDetector(decoding, inference.preprocessing, scale=scale,
                                         network_hw=hw if scale is None else None)
    elif scale is not None:
        detect = at_test_scale(predictor(decoding, preprocessing=inference.preprocessing), scale)
    else:
        run = predictor(decoding, preprocessing=inference.preprocessing)

        def detect(x):
            found = {k: np.asarray(v) for k, v in run(tf.image.resize(x, hw, method="bilinear")).items()}
            w, h = x.shape[2], x.shape[1]
            found["detection_boxes"] = found["detection_boxes"] * np.array([w / hw[1], h / hw[0], w / hw[1],
                                                                             h / hw[0]])
            return found
    os.makedirs(out_dir, exist_ok=True)
    results = []
    with progress_bar(progress, "detecting", len(images)) as advance:
        for path, stem, drawing in zip(images, stems, drawings):
            image = read_image(path)
            h, w = image.shape[:2]
            x = tf.constant(image[None], tf.float32)
            if source is not None:
                given, fed = padded(source, stem, image, run_proposals.rows)
                found = {k: np.asarray(v)[0] for k, v in run_proposals(x, given).items()}
            else:
                found = {k: np.asarray(v)[0] for k, v in detect(x).items()}
            n = int(found["num_detections"])
            limits = np.array([w, h, w, h], np.float64)
            detections = []
            for box, score, cls in zip(found["detection_boxes"][:n], found["detection_scores"][:n],
                                       found["detection_classes"][:n]):
                if cls < 0 or score < score_threshold:
                    continue
                box = np.clip(np.asarray(box, np.float64), 0, limits)
                detections.append({"class": int(cls), "name": names[int(cls)], "score": round(float(score), 5),
                                   "box": [round(float(v), 2) for v in box]})
            detections.sort(key=lambda d: -d["score"])
            picture = draw_detections(image, detections)
            _atomic_save(drawing, lambda tmp: picture.save(tmp, format="PNG"))
            results.append({"file": path, "size": [h, w], "detections": detections,
                            **({"proposals": fed} if source is not None else {})})
            advance()

    def save(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)

    _atomic_save(target, save)
    return results
