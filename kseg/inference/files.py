"""Prediction on image files: label maps as palette PNGs, colour overlays, optional dense CRF.

    from kseg.inference import load_inference_model, predict_images
    m = load_inference_model("runs/dl/best.keras")                 # preprocessing from kseg_run.json
    predict_images(m, ["a.jpg", "photos/"], "out", crf=True)        # out/a.png, out/a_overlay.png, ...

Each image is predicted at its original size (fixed-input models and `size=` predict on a
resized copy and the logits are resized back, bilinearly), so the PNGs line up with the
inputs pixel for pixel. `kseg predict` is the command-line face.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from kseg.crf import as_params, check_installed, dense_crf
from kseg.data.palette import overlay, write_label
from kseg.images import IMAGE_EXTENSIONS, list_images, read_image  # noqa: F401  (kseg.inference re-exports them)
from kseg.inference.loading import InferenceModel
from kseg.inference.traced import Predictor
from kseg.progress import progress as progress_bar


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
