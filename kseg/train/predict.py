"""Inference on image files: label maps as palette PNGs, colour overlays, optional dense CRF.

    from kseg.train.predict import load_inference_model, predict_images
    m = load_inference_model("runs/dl/best.keras")                 # preprocessing from kseg_run.json
    m = load_inference_model("deeplab_largefov", weights="dl.h5", num_classes=5, options={"width": 0.25})
    predict_images(m, ["a.jpg", "photos/"], "out", crf=True)        # out/a.png, out/a_overlay.png, ...

Each image is predicted at its original size (fixed-input models and `size=` predict on a
resized copy and the logits are resized back, bilinearly), so the PNGs line up with the
inputs pixel for pixel. `crf_search` runs the paper's CRF cross-validation on a dataset.
`kseg predict`, `kseg evaluate --crf` and `kseg crf-search` are the command-line faces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# === models ===


@dataclasses.dataclass
class InferenceModel:
    """A model ready for inference: the network, how to preprocess for it, where it came from."""

    model: object
    preprocessing: object  # a kseg.Preprocessing, or None for raw 0..255 input
    source: str  # the .keras path or the registry name (and weights)
    class_names: list | None = None

    @property
    def num_classes(self) -> int:
        return int(main_output(self.model.outputs).shape[-1])


def main_output(outputs):
    """The segmentation logits among a model's outputs: the first (FCN's aux and DeepLab's
    stride-8 logits come after the main, full-size output)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def _preprocessing_from_keras_file(path):
    """The preprocessing recorded next to or inside a .keras file, or None when there is none."""
    from kseg.data.pipeline import resolve_preprocessing
    from kseg.registry import Preprocessing
    from kseg.train.fit import RUN_FILE

    run_file = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_FILE)
    if os.path.exists(run_file):
        with open(run_file) as f:
            run = json.load(f)
        prep = run.get("recipe_values", {}).get("data", {}).get("preprocessing") or run.get("model")
        if prep:
            return resolve_preprocessing(prep), run_file
    # Files written by `kseg convert` carry its metadata: a kseg.json zip member in .keras, an
    # HDF5 attribute in .h5 (see convert/metadata.py).
    meta = None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if "kseg.json" in zf.namelist():
                meta = json.loads(zf.read("kseg.json").decode("utf8"))
    elif path.lower().endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as f:
            text = f.attrs.get("kseg_metadata")
        meta = json.loads(text) if text is not None else None
    if meta and meta.get("preprocessing"):
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()}
        return Preprocessing(**values), path
    return None, None


def load_inference_model(model, *, weights=None, num_classes=None, preprocessing=None, options=None,
                         class_names=None) -> InferenceModel:
    """A saved .keras/.h5 file, or a registry name built with `weights=` (and `options=`).

    Preprocessing: `preprocessing=` (a kind or model name) if given; else, for a file, the
    run's kseg_run.json next to it or the file's conversion metadata; for a registry name,
    its spec (the torchvision layout's for a state_dict). A file with neither is refused:
    feeding a model the wrong input scale gives confident nonsense, not an error.
    """
    import keras

    import kseg
    import kseg.train  # noqa: F401  (registers kseg's losses and metrics for loading)
    from kseg.data.pipeline import resolve_preprocessing

    model = os.fspath(model)
    options = dict(options or {})
    looks_like_file = os.path.isfile(model) or model.lower().endswith((".keras", ".h5", ".hdf5")) or os.sep in model
    if looks_like_file:
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{model} does not exist")
        if weights is not None or num_classes is not None or options:
            raise ValueError(f"{model} is a saved model: --weights, --num-classes and --option go with a "
                             "registry name (kseg models lists them)")
        try:
            net = keras.saving.load_model(model, compile=False)
        except (ValueError, OSError, TypeError, zipfile.BadZipFile) as e:
            raise ValueError(f"{model}: cannot load the Keras model: {e}") from None
        if preprocessing is not None:
            prep = resolve_preprocessing(preprocessing)
        else:
            prep, _ = _preprocessing_from_keras_file(model)
            if prep is None:
                raise ValueError(f"{model}: no kseg_run.json next to it and no kseg metadata inside, so the input "
                                 "preprocessing is unknown; pass --preprocessing (caffe, torch, unit, batchnorm or "
                                 "the architecture's name)")
        return InferenceModel(net, prep, model, class_names)

    spec = kseg.get_spec(model)  # ValueError naming the known models
    if spec.task != "segmentation":
        raise ValueError(f"{model} is a {spec.task} model; prediction writes class maps of segmentation models")
    if weights is None:
        raise ValueError(f"{model}: a registry name needs --weights (a trained file), or pass a saved .keras file")
    net = kseg.build_model(model, num_classes=num_classes, weights=weights, **options)
    if preprocessing is not None:
        prep = resolve_preprocessing(preprocessing)
    else:
        from kseg.api import model_info

        kwargs = model_info(net)["kwargs"]
        layout = next((k for k, v in spec.layouts.items() if v and all(kwargs.get(a) == b for a, b in v.items())),
                      None)
        prep = spec.preprocessing_for(layout)
    return InferenceModel(net, prep, f"{model} ({os.fspath(weights)})", class_names)


# === prediction ===


class Predictor:
    """Class probabilities [H, W, C] of one RGB image at its own size.

    `size=(h, w)` predicts on a resized copy; a model with a fixed input size always does.
    Logits are resized back bilinearly before the softmax, as DeepLab upsamples its scores.
    """

    def __init__(self, inference: InferenceModel, size=None):
        import tensorflow as tf

        self.inference = inference
        model = inference.model
        fixed = tuple(model.input_shape[1:3]) if isinstance(model.input_shape, tuple) else (None, None)
        self.size = tuple(fixed) if None not in fixed else (tuple(size) if size else None)
        prep = inference.preprocessing
        out_size = self.size

        # Eager calls, not a tf.function: images come in many sizes, and a trace per size (or a
        # new function per Predictor) costs more than it saves for one image at a time.
        def run(image):
            h, w = tf.shape(image)[0], tf.shape(image)[1]
            x = tf.cast(image, tf.float32)[None]
            if out_size is not None:
                x = tf.image.resize(x, out_size, method="bilinear")
            if prep is not None:
                x = prep.apply(x)
            out = tf.cast(main_output(model(x, training=False)), tf.float32)
            if out_size is not None:
                out = tf.image.resize(out, tf.stack([h, w]), method="bilinear")
            return out[0]

        self._run = run

    def probabilities(self, image) -> np.ndarray:
        """image: RGB uint8 or float 0..255 [H, W, 3] -> float32 softmax probabilities [H, W, C]."""
        from kseg.crf import softmax

        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
        out = np.asarray(self._run(img.astype(np.float32)))
        if out.shape[-1] < 2:
            raise ValueError(f"{self.inference.source} outputs {out.shape[-1]} channel(s); prediction needs "
                             "per-class scores (a segmentation model)")
        # Models output logits; one ending in a softmax already gives probabilities.
        if out.min() >= 0 and np.allclose(out.sum(-1), 1.0, atol=1e-3):
            return out
        return softmax(out)


def _crf_params(crf):
    from kseg.crf import CRFParams

    if crf is None or crf is False:
        return None
    if crf is True:
        return CRFParams()
    if isinstance(crf, str):
        return CRFParams.parse(crf)
    if not isinstance(crf, CRFParams):
        raise TypeError(f"crf must be None, True, a CRFParams or a 'w1=...,sigma_alpha=...' string, got {crf!r}")
    return crf


def list_images(paths) -> list[str]:
    """Image files from files and directories (a directory gives its image files, sorted; not recursive)."""
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"{p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this directory")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not out:
        raise ValueError("no images given")
    return out


def read_image(path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3], turned upright by its EXIF orientation (as viewers show it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


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
    from PIL import Image

    from kseg.crf import dense_crf
    from kseg.data.palette import overlay, write_label

    params = _crf_params(crf)
    if params is not None:
        from kseg.crf import _densecrf

        _densecrf()  # the install hint now, not after the first image
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
    predictor = Predictor(inference, size)
    results = []
    with _progress(progress, "predicting" + (" + CRF" if params else ""), len(images)) as advance:
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


class _progress:
    """A rich progress bar (transient) or nothing; `with _progress(on, text, total) as advance:`."""

    def __init__(self, on, description, total):
        self.on, self.description, self.total = on, description, total
        self.bar = None

    def __enter__(self):
        if not self.on:
            return lambda n=1: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n=1: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


# === CRF cross-validation ===


def crf_search(inference: InferenceModel, dataset, grid, *, images=100, progress=True) -> dict:
    """Score every CRF setting of `grid` on the first `images` (raw image, label) pairs of `dataset`.

    The dataset must yield raw RGB 0..255 images (a kseg.data reader without preprocessing=),
    batched or not; labels at the images' size, 255 ignored. The network runs once per image
    and every setting refines the same probabilities. Returns {"baseline": scores without CRF,
    "results": [{"params": {...}, "crf": "w1=...", **scores}, ...] best mean IoU first,
    "best": the first of them, "images": n}.
    """
    from kseg.crf import dense_crf
    from kseg.train.metrics import confusion_matrix, scores_from_confusion

    grid = [_crf_params(g) for g in grid]
    if not grid:
        raise ValueError("the CRF search grid is empty")
    predictor = Predictor(inference)
    c = inference.num_classes
    base = np.zeros((c, c), np.int64)
    per_setting = np.zeros((len(grid), c, c), np.int64)
    n = 0
    total = images * len(grid) if images else None
    with _progress(progress, f"CRF search: {len(grid)} settings", total) as advance:
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
