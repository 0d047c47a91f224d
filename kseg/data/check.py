"""`kseg data check`: find the label and file mistakes that cost segmentation users days.

The checker lists a dataset exactly as its reader does (kseg.data.readers.list_source)
and applies the reader's rules with Pillow (SciPy for the skeleton layout's .mat ground
truth), so every file it passes the reader accepts, plus what a reader cannot afford per
element: counts, sizes, per-class pixel histograms, image modes, and hints on how to fix
each problem.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from kseg.data import spec as rules
from kseg.data.detection import DETECTION_LAYOUTS, list_detection
from kseg.data.layouts import list_source
from kseg.data.palette import IGNORE_LABEL, palette_table, voc_palette
from kseg.progress import progress as progress_bar

CONVERTED_MODES = {
    "L": "grayscale", "LA": "grayscale+alpha", "1": "1-bit", "I;16": "16-bit grayscale", "I": "32-bit grayscale",
    "P": "palette", "PA": "palette+alpha", "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr",
}


@dataclasses.dataclass
class CheckReport:
    """What `check_dataset` found. `ok` is False when there is any error."""

    layout: str
    root: str
    class_names: tuple[str, ...]
    listed: int = 0
    checked: int = 0
    sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    image_modes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    pixels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(256, np.int64))
    images_with: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(256, np.int64))
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # Detection layouts: boxes and difficult boxes per class id, images per class id, images per box count.
    boxes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    difficult: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    images_with_class: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    boxes_per_image: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error_files(self) -> set[str]:
        return {path for path, _ in self.errors}


def bytes_problem(data: bytes) -> str:
    """The readers' byte-level image checks (kseg.data.decode.image_problem), in Python."""
    if len(data) < 16:
        return rules.SHORT
    jpeg, png = data[:3] == rules.JPEG_MAGIC, data[:8] == rules.PNG_MAGIC
    if not (jpeg or png or data[:4] == b"GIF8" or data[:2] == b"BM"):
        return rules.NOT_IMAGE
    if jpeg and b"\xff\xd9" not in data[-1024:]:
        return rules.TRUNCATED_JPEG
    if png and b"IEND" not in data[-64:]:
        return rules.TRUNCATED_PNG
    return ""


def _open(path) -> tuple[Image.Image | None, bytes, str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, b"", f"unreadable: {e.strerror or e}"
    problem = bytes_problem(data)
    if problem:
        return None, data, problem
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # Pillow raises many types for broken files
        return None, data, f"cannot be decoded: {e}"
    return im, data, ""


def _extension_warning(path, im):
    ext = os.path.splitext(path)[1].lower()
    fmt = (im.format or "").lower()
    expected = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".gif": "gif", ".bmp": "bmp"}.get(ext)
    if expected and fmt and fmt != expected:
        return f"a {im.format} file named {ext} (readers decode by content, so it still loads)"
    return ""


def _check_image(path, result):
    im, _, problem = _open(path)
    if problem:
        result["errors"].append((path, problem))
        return None
    result["mode"] = im.mode
    if im.mode != "RGB":
        result["converted"] = (path, CONVERTED_MODES.get(im.mode, im.mode))
    warning = _extension_warning(path, im)
    if warning:
        result["warnings"].append((path, warning))
    result["size"] = (im.height, im.width)
    return im


def _label_values(path, spec, result) -> np.ndarray | None:
    im, data, problem = _open(path)
    if problem:
        result["errors"].append((path, problem))
        return None
    if data[:8] != rules.PNG_MAGIC:
        result["errors"].append((path, rules.LABEL_NOT_PNG))
        return None
    if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"))
        if spec.colours is not None:
            table = dict(spec.colours)
            codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
            unknown = np.setdiff1d(np.unique(codes), list(table))
            if unknown.size:
                shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5])
                result["errors"].append((path, f"{rules.UNKNOWN_COLOUR}: {shown}"))
                return None
            lookup = np.vectorize(table.__getitem__, otypes=[np.uint8])
            return lookup(codes)
        result["errors"].append((path, rules.COLOUR_MASK + _colour_hint(rgb)))
        return None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        result["errors"].append((path, rules.DEEP_LABEL))
        return None
    if im.mode in ("LA", "PA"):
        im = im.getchannel(0)
    if im.mode not in ("P", "L", "1"):
        result["errors"].append((path, f"label image mode {im.mode!r}; expected an 8-bit palette or grayscale PNG"))
        return None
    return np.array(im.convert("L") if im.mode == "1" else im, dtype=np.uint8)


def _colour_hint(rgb) -> str:
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return " (its three channels are equal: save it as a single-channel 'L' PNG)"
    codes = np.unique((rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2])
    if np.isin(codes, list(palette_table(voc_palette()))).all():
        return " (its colours are all VOC palette colours: rgb_to_index(rgb) recovers the indices)"
    return ""


def _edge_values(path, spec, result) -> np.ndarray | None:
    """An edge map: any image Pillow decodes, as 8-bit grey strengths."""
    lbl, _, problem = _open(path)
    if problem:
        result["errors"].append((path, problem))
        return None
    return np.asarray(lbl.convert("L"))


def _skeleton_values(path, spec, result) -> np.ndarray | None:
    """An SK-LARGE ground truth .mat read as kseg.data.skeleton reads it (loadable, `symmetry` and `edge`
    H x W maps of one size, a boundary wherever there is a skeleton): 1 on the skeleton, 0 elsewhere."""
    from kseg.data.skeleton import read_ground_truth, scale_map

    try:
        skeleton, edge = read_ground_truth(path)
        scale_map(skeleton, edge)  # the reader's scales: undefined for a skeleton without a boundary
    except ValueError as e:
        text = str(e)
        result["errors"].append((path, text[len(path) + 2:] if text.startswith(f"{path}: ") else text))
        return None
    return skeleton.astype(np.uint8)


# How a label file of each LabelSpec kind is read into per-pixel values (index labels: _label_values).
LABEL_VALUES = {"edge": _edge_values, "skeleton": _skeleton_values}


def _check_pair(image_path, label_path, spec):
    result = {"errors": [], "warnings": [], "mode": None, "size": None, "converted": None, "counts": None}
    im = _check_image(image_path, result)
    if spec.kind == "class":
        return result
    values = LABEL_VALUES.get(spec.kind, _label_values)(label_path, spec, result)
    if values is None:
        return result
    if im is not None and values.shape != (im.height, im.width):
        result["errors"].append((image_path, f"image is {im.height}x{im.width} (HxW) but its label "
                                             f"{label_path} is {values.shape[0]}x{values.shape[1]}"))
    counts = np.bincount(values.ravel(), minlength=256)
    if spec.kind == "index":
        lut = np.asarray(spec.lut)
        present = counts > 0
        bad = np.flatnonzero(present & (lut < 0))
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8])
            result["errors"].append((label_path, f"label values {shown} found; expected {spec.expected}"))
            return result
        if spec.binary_check and present[0] and present[IGNORE_LABEL] and present.sum() == 2:
            result["errors"].append((label_path, rules.BINARY_MASK))
            return result
        mapped = np.zeros(256, np.int64)
        np.add.at(mapped, np.maximum(lut, 0), counts)
        counts = mapped
    result["counts"] = counts
    return result


def check_dataset(root, layout: str = "voc", *, limit: int | None = None, workers: int | None = None,
                  progress=False, **list_options) -> CheckReport:
    """Check every listed file of a dataset; see CheckReport. list_options go to the layout's
    listing (split=, num_classes=, border=, palette=, ...), as for the readers.

    progress: True (or the bar's text) draws a transient progress bar on standard error.

    Detection layouts ("voc-det", "coco": kseg.data.detection) report box statistics instead of
    pixels; for "coco" root is the image folder and annotations= the instances JSON.
    """
    if layout in DETECTION_LAYOUTS:
        return _check_detection(root, layout, limit, workers, progress, list_options)
    source = list_source(layout, root, **list_options)
    report = CheckReport(layout, os.fspath(root), source.class_names)
    report.listed = len(source.images) + len({p for p, _ in source.problems})
    report.errors.extend(source.problems)
    pairs = list(zip(source.images, source.labels))[:limit]
    text = progress if isinstance(progress, str) else f"checking {os.fspath(root)}"
    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool, \
            progress_bar(bool(progress), text, len(pairs)) as advance:
        results = pool.map(lambda p: _check_pair(p[0], p[1], source.spec), pairs)
        for (image_path, label), result in zip(pairs, results):
            advance()
            report.checked += 1
            report.errors.extend(result["errors"])
            report.warnings.extend(result["warnings"])
            if result["mode"]:
                report.image_modes[result["mode"]] += 1
            if result["size"]:
                report.sizes[result["size"]] += 1
            if result["converted"]:
                report.converted.append(result["converted"])
            if source.spec.kind == "class":
                if result["mode"]:
                    report.pixels[label] += 1
                    report.images_with[label] += 1
            elif result["counts"] is not None:
                report.pixels += result["counts"]
                report.images_with += result["counts"] > 0
    return report


# === detection ===

def _check_detection_image(path, annotation, expected, boxes):
    result = {"errors": [], "warnings": [], "mode": None, "size": None, "converted": None}
    im = _check_image(path, result)
    if im is None:
        return result
    h, w = im.height, im.width
    eh, ew = expected
    if eh and (eh, ew) != (h, w):
        result["errors"].append((path, f"image is {h}x{w} (HxW) but its annotation {annotation} says {eh}x{ew}"))
    elif not eh and len(boxes) and (boxes[:, 2].max() > w or boxes[:, 3].max() > h):
        result["errors"].append((path, f"a box of its annotation {annotation} reaches beyond the {h}x{w} (HxW) image"))
    return result


def _check_detection(root, layout, limit, workers, progress, list_options) -> CheckReport:
    """The detection readers' listing (every annotation parsed) plus each image opened with Pillow."""
    source = list_detection(layout, root, **list_options)
    report = CheckReport(layout, os.fspath(root), source.class_names)
    report.listed = len(source.images) + len({p for p, _ in source.problems})
    report.errors.extend(source.problems)
    report.warnings.extend(source.notes)
    items = list(zip(source.images, source.annotations, source.sizes, source.boxes, source.classes,
                     source.difficult))[:limit]
    text = progress if isinstance(progress, str) else f"checking {os.fspath(root)}"
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool, \
            progress_bar(bool(progress), text, len(items)) as advance:
        results = pool.map(lambda item: _check_detection_image(*item[:4]), items)
        for (_, _, _, _, classes, difficult), result in zip(items, results):
            advance()
            report.checked += 1
            report.errors.extend(result["errors"])
            report.warnings.extend(result["warnings"])
            if result["mode"]:
                report.image_modes[result["mode"]] += 1
            if result["size"]:
                report.sizes[result["size"]] += 1
            if result["converted"]:
                report.converted.append(result["converted"])
            if result["errors"]:  # statistics describe the images a reader would read
                continue
            report.boxes.update(classes.tolist())
            report.difficult.update(classes[difficult].tolist())
            report.images_with_class.update(set(classes.tolist()))
            report.boxes_per_image[len(classes)] += 1
    return report
