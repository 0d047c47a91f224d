"""Selective Search proposals for every image of a detection split, in one .npz (`kseg data proposals`).

    write_proposals("VOCdevkit/VOC2007", "selective_search_test.npz", split="test")
    write_proposals("val2017", "ss_val2017.npz", layout="coco", annotations="instances_val2017.json")

The file holds one float32 (N, 4) array of (x1, y1, x2, y2) pixel corners per image, keyed by the
image's id as kseg's detection readers key extra boxes (kseg.data.detection_dataset's extra_boxes): the
image file's name without its extension (VOC: the split list's id, `000005`; COCO: the file name's stem,
`000000397133`). kseg.detection.precomputed.load_proposals reads it; a recipe names it in `[data]
proposals` (`"selective_search_{split}.npz"`), `kseg evaluate` / `kseg predict` take it with
`--proposals`. This is what R-CNN's and Fast R-CNN's authors precomputed (rbgirshick/rcnn
selective_search_boxes.m; py-faster-rcnn's data/selective_search_data/*.mat), with OpenCV's Selective
Search (kseg.detection.selective_search) on the stored pixels the readers decode: no EXIF rotation, as
TensorFlow's decoders.

The output is streamed into a temporary file next to it, one array at a time (memory stays flat on
COCO's 118k images), and renamed into place at the end: an error, an unreadable image or an interrupt
leaves no output file, never a half-written one.
"""

from __future__ import annotations

import os
import time
import zipfile

import numpy as np

from kseg.detection.selective_search import MAX_BOXES, MIN_SIZE, check_installed, selective_search
from kseg.progress import progress as progress_bar

LAYOUTS = ("voc-det", "coco")


def split_images(root, layout="voc-det", *, split=None, annotations=None) -> list[tuple[str, str]]:
    """(image id, image path) of every image of a detection split, in the readers' order.

    voc-det: root is the VOC year folder (or a VOCdevkit holding one), split a list name or file
    (ImageSets/Main/<split>.txt; kseg.data.detection.voc_detection_ids), JPEGImages/<id>.jpg.
    coco: root is the image folder, annotations the instances JSON: its `images`, sorted by id; the
    id is the file name's stem (the readers' key). Two images with the same id are an error."""
    from kseg.data.detection import _load_json, find_voc_root, voc_detection_ids

    if layout == "voc-det":
        if not split:
            raise ValueError("the voc-det layout needs a split (an ImageSets/Main list name, e.g. trainval or test)")
        if annotations:
            raise ValueError("annotations (--annotations) go with the coco layout")
        folder = os.path.join(find_voc_root(root), "JPEGImages")
        out = [(i, os.path.join(folder, i + ".jpg")) for i in voc_detection_ids(root, split)]
    elif layout == "coco":
        if not annotations:
            raise ValueError("the coco layout reads its images from an instances JSON: pass annotations= "
                             "(--annotations instances_val2017.json); root is the image folder")
        if split:
            raise ValueError("a split goes with the voc-det layout; coco's images are its annotations file's")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: image folder not found")
        data = _load_json(annotations)
        rows = []
        for k, im in enumerate(data["images"]):
            try:
                rows.append((int(im["id"]), str(im["file_name"])))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{annotations}: images[{k}]: expected an id and a file_name, got "
                                 f"{str(im)[:200]}") from None
        out = [(os.path.splitext(os.path.basename(name))[0], os.path.join(root, name)) for _, name in sorted(rows)]
    else:
        raise ValueError(f"unknown detection layout {layout!r}; known: {', '.join(LAYOUTS)}")
    seen = {}
    for image_id, path in out:
        if image_id in seen:
            raise ValueError(f"{path} and {seen[image_id]} have the same image id {image_id!r} (the file name "
                             "without its extension): the proposals file could not tell them apart")
        seen[image_id] = path
    if not out:
        raise ValueError(f"{root}: the split lists no images")
    return out


def read_stored_image(path) -> np.ndarray:
    """An image file's stored pixels as RGB uint8 (H, W, 3), as TensorFlow's decoders give them (no EXIF
    rotation, unlike kseg.images.read_image): the frame of the readers' boxes. ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def _write_array(archive, key, array):
    with archive.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def write_proposals(root, out, *, layout="voc-det", split=None, annotations=None, mode="fast",
                    max_boxes=MAX_BOXES, min_size=MIN_SIZE, max_side=None, seed=0, overwrite=False,
                    progress=True) -> dict:
    """Selective Search on every image of a split -> one .npz at `out` (module docstring); returns a summary
    {"out", "images", "boxes", "min_boxes", "max_boxes_found", "mean_boxes", "seconds", "mode", ...}.

    root / layout / split / annotations: as split_images. mode, max_boxes, min_size, max_side, seed: as
    kseg.detection.selective_search.selective_search. An existing `out` is an error without overwrite=True.
    An unreadable image raises a ValueError naming its file; nothing is written then."""
    out = os.fspath(out)
    if not out.lower().endswith(".npz"):
        raise ValueError(f"{out}: the proposals file is a .npz (one array per image id)")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists already; pass --force (overwrite=True) to replace it")
    check_installed()  # the install hint before listing a large split
    images = split_images(root, layout, split=split, annotations=annotations)
    missing = [p for _, p in images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of the split are missing, e.g. {missing[0]}")
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(out)}.{os.getpid()}.tmp")
    counts = []
    start = time.perf_counter()
    what = f"selective search ({mode}) on {len(images)} images"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive, \
                progress_bar(progress, what, len(images)) as advance:
            for image_id, path in images:
                boxes = selective_search(read_stored_image(path), mode=mode, max_boxes=max_boxes,
                                         min_size=min_size, max_side=max_side, seed=seed)
                _write_array(archive, image_id, boxes)
                counts.append(len(boxes))
                advance()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    seconds = time.perf_counter() - start
    return {"out": out, "images": len(counts), "boxes": int(sum(counts)), "min_boxes": int(min(counts)),
            "max_boxes_found": int(max(counts)), "mean_boxes": float(np.mean(counts)), "seconds": seconds,
            "seconds_per_image": seconds / len(counts), "mode": mode, "max_boxes": max_boxes, "min_size": min_size,
            "max_side": max_side, "layout": layout, "split": split}
