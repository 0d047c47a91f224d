"""The built-in synthetic segmentation dataset (`kseg data synth DIR`), in the VOC layout.

Nothing can be downloaded at run time, so the demo and the end-to-end tests train on
this. Each image is a textured background with 1-4 shapes (circle, square, triangle,
cross) of random size, position and rotation. Shapes and background draw their colours
and textures (stripes, checkers, blobs, gradients) from the same distribution, so no
colour or texture predicts a class: a model has to learn shape. Labels carry a 255 band
on every class boundary, like VOC's object outlines.

Output is deterministic in the seed (per-image generators seeded by (seed, index)) and
byte-identical for the same seed and Pillow build. It is read by kseg.data.voc (or
kseg.data.synthetic), so the demo exercises the same reader as real data.

With task="detection" (`kseg data synth DIR --task detection`) the same shapes and textures
are written in the PASCAL VOC detection layout instead (make_synthetic_detection): one
Annotations/<id>.xml per image with each shape's class name and tight box, read by
kseg.data.voc_detection with the classes.txt written next to it. proposals=True (`--proposals`)
adds Selective Search's boxes of the train and val splits (selective_search_{split}.npz, kseg.data.proposals)
for detectors that take proposals (a recipe's `[data] proposals = "selective_search_{split}.npz"`).

With task="skeleton" (`--task skeleton`) each shape region's medial axis and contour are written in
the SK-LARGE layout (kseg.data.skeleton), read by kseg.data.skeleton.sk_large with each skeleton
point's distance to the boundary as its scale.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from kseg.data.palette import IGNORE_LABEL, write_label

SYNTH_CLASSES = ("background", "circle", "square", "triangle", "cross")


def _texture(rng, yy, xx):
    """A random two-colour texture over the grid; the same distribution for every class."""
    h, w = yy.shape
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    kind = rng.integers(4)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == 0:  # stripes
        period = rng.uniform(4, 20)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    elif kind == 1:  # checkerboard
        period = rng.uniform(5, 20)
        t = (np.floor(u / period) + np.floor(v / period)) % 2
    elif kind == 2:  # smooth blobs: coarse noise, bilinearly upsampled
        coarse = rng.uniform(0, 1, size=(rng.integers(3, 9), rng.integers(3, 9))).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
    else:  # gradient
        t = (u - u.min()) / max(np.ptp(u), 1e-6)
    return c0 + (c1 - c0) * t[..., None]


def _shape_sdf(cls, yy, xx, cy, cx, r, angle):
    """Signed distance-like field, negative inside the shape (exact enough for masks)."""
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    name = SYNTH_CLASSES[cls]
    if name == "circle":
        return np.hypot(u, v) - r
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if name == "triangle":
        # Equilateral with circumradius r: three edges at inradius r / 2.
        normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        return np.max([u * nx + v * ny - r / 2 for nx, ny in normals], axis=0)
    if name == "cross":
        arm, half = r, 0.33 * r
        bar1 = np.maximum(np.abs(u) - arm, np.abs(v) - half)
        bar2 = np.maximum(np.abs(u) - half, np.abs(v) - arm)
        return np.minimum(bar1, bar2)
    raise ValueError(cls)


def _boundary(label, band):
    """Pixels within `band` of a pixel of another class (VOC-style outline on both sides)."""
    h, w = label.shape
    padded = np.pad(label, band, mode="edge")
    edge = np.zeros_like(label, dtype=bool)
    for dy in range(-band, band + 1):
        for dx in range(-band, band + 1):
            if dy * dy + dx * dx <= band * band and (dy or dx):
                edge |= padded[band + dy: band + dy + h, band + dx: band + dx + w] != label
    return edge


def render(seed: int, index: int, size=(128, 128), band: int = 1, max_shapes: int = 4):
    """One (image uint8 [H, W, 3], label uint8 [H, W]) sample, a pure function of (seed, index)."""
    h, w = size
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    while True:
        image = _texture(rng, yy, xx)
        label = np.zeros((h, w), dtype=np.uint8)
        for _ in range(rng.integers(1, max_shapes + 1)):
            cls = int(rng.integers(1, len(SYNTH_CLASSES)))
            r = rng.uniform(0.12, 0.28) * min(h, w)
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            # Every shape fits in the circle of radius r: render only its bounding box.
            box = (slice(max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)),
                   slice(max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)))
            inside = _shape_sdf(cls, yy[box], xx[box], cy, cx, r, rng.uniform(0, 2 * np.pi)) <= 0
            patch = image[box]
            patch[inside] = _texture(rng, yy[box], xx[box])[inside]
            label[box][inside] = cls
        if band:
            label[_boundary(label, band)] = IGNORE_LABEL
        # Occlusion can hide every shape; draw again rather than emit a background-only image.
        if ((label > 0) & (label != IGNORE_LABEL)).sum() >= 0.01 * h * w:
            break
    image = image + rng.normal(0, 6, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def _check_options(size, train, val):
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(v) for v in size)
    if min(size) < 16:
        raise ValueError(f"size must be at least 16x16, got {size}")
    if train < 0 or val < 0 or train + val == 0:
        raise ValueError(f"train and val must be >= 0 and not both 0, got {train}, {val}")
    return size


def make_synthetic(root, *, seed: int = 0, train: int = 200, val: int = 50, size=(128, 128), band: int = 1,
                   max_shapes: int = 4, quality: int = 90, task: str = "segmentation", proposals: bool = False,
                   progress: bool = False) -> dict:
    """Write the synthetic dataset to `root` in the VOC layout; returns its description.

    root/JPEGImages/synth_NNNNN.jpg, root/SegmentationClass/synth_NNNNN.png (palette PNGs),
    root/ImageSets/Segmentation/{train,val,trainval}.txt, root/classes.txt, root/synth.json.
    task="detection" writes the detection layout instead (make_synthetic_detection; band unused;
    proposals=True adds the Selective Search files); task="skeleton" the shapes' skeletons in the
    SK-LARGE layout (kseg.data.skeleton.write_skeleton_set: images/ and groundTruth/ .mat with
    `symmetry` and `edge`, splits train and val; band unused).
    """
    if task == "detection":
        return make_synthetic_detection(root, seed=seed, train=train, val=val, size=size, max_shapes=max_shapes,
                                        quality=quality, proposals=proposals, progress=progress)
    if task not in ("segmentation", "skeleton"):
        raise ValueError(f"task must be 'segmentation', 'detection' or 'skeleton', got {task!r}")
    if proposals:
        raise ValueError("proposals (Selective Search boxes) go with task='detection' (--task detection)")
    if task == "skeleton":
        from kseg.data.skeleton import write_skeleton_set

        size = _check_options(size, train, val)
        info = {"dataset": "kseg synthetic skeletons", "seed": seed, "train": train, "val": val, "size": list(size),
                "max_shapes": max_shapes, "quality": quality, "classes": list(SYNTH_CLASSES)}
        samples = (render(seed, i, size, 0, max_shapes) for i in range(train + val))
        return write_skeleton_set(root, samples, train=train, quality=quality, info=info)
    size = _check_options(size, train, val)
    root = os.fspath(root)
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    names = [f"synth_{i:05d}" for i in range(train + val)]
    for i, name in enumerate(names):
        image, label = render(seed, i, size, band, max_shapes)
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=quality)
        write_label(os.path.join(root, "SegmentationClass", name + ".png"), label)
    lists = {"train": names[:train], "val": names[train:], "trainval": names}
    for split, members in lists.items():
        with open(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n in members))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in SYNTH_CLASSES))
    info = {"dataset": "kseg synthetic shapes", "layout": "voc", "seed": seed, "train": train, "val": val,
            "size": list(size), "band": band, "max_shapes": max_shapes, "quality": quality,
            "classes": list(SYNTH_CLASSES), "ignore_label": IGNORE_LABEL}
    with open(os.path.join(root, "synth.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return info


# === detection ===

# A shape's box must be at least this many pixels on each side, or the shape is drawn again.
MIN_BOX = 4
# make_synthetic_detection(proposals=True)'s Selective Search files, one per split.
PROPOSALS_FILE = "selective_search_{split}.npz"


def render_detection(seed: int, index: int, size=(128, 128), max_shapes: int = 4, min_box: int = MIN_BOX):
    """One (image uint8 [H, W, 3], objects) detection sample, a pure function of (seed, index).

    objects: (class id, (x1, y1, x2, y2), truncated) per shape, the box in continuous pixel
    corners (x2 - x1 = width in pixels) tight around the shape's pixels. Shapes do not
    overlap: a shape whose bounding circle comes within 2 pixels of an earlier one's is not
    drawn, so every box is its shape's whole visible mask, never an occluded remnant.
    `truncated` marks a shape whose pixels reach the image border (cut by it, or just touching
    it). Shapes whose box is under `min_box` pixels on a side are not drawn either; an image
    gets at least one shape.
    """
    h, w = size
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    while True:
        image = _texture(rng, yy, xx)
        objects, circles = [], []
        for _ in range(rng.integers(1, max_shapes + 1)):
            cls = int(rng.integers(1, len(SYNTH_CLASSES)))
            r = rng.uniform(0.12, 0.28) * min(h, w)
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            angle = rng.uniform(0, 2 * np.pi)
            if any(np.hypot(cy - oy, cx - ox) < r + orad + 2 for oy, ox, orad in circles):
                continue
            top, left = max(int(cy - r) - 1, 0), max(int(cx - r) - 1, 0)
            box = (slice(top, min(int(cy + r) + 2, h)), slice(left, min(int(cx + r) + 2, w)))
            inside = _shape_sdf(cls, yy[box], xx[box], cy, cx, r, angle) <= 0
            rows, cols = np.nonzero(inside)
            if not rows.size:
                continue
            y1, y2 = top + int(rows.min()), top + int(rows.max()) + 1
            x1, x2 = left + int(cols.min()), left + int(cols.max()) + 1
            if y2 - y1 < min_box or x2 - x1 < min_box:
                continue
            patch = image[box]
            patch[inside] = _texture(rng, yy[box], xx[box])[inside]
            circles.append((cy, cx, r))
            truncated = y1 == 0 or x1 == 0 or y2 == h or x2 == w
            objects.append((cls, (x1, y1, x2, y2), truncated))
        if objects:
            break
    image = image + rng.normal(0, 6, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def voc_annotation(filename: str, size, objects, class_names=SYNTH_CLASSES, database="kseg synthetic shapes") -> bytes:
    """A PASCAL VOC annotation XML for `objects` [(class id, (x1, y1, x2, y2), truncated)] in continuous
    pixel corners: written as the devkit's 1-based inclusive bndbox (xmin = x1 + 1, xmax = x2)."""
    h, w = size
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = filename
    ET.SubElement(ET.SubElement(ann, "source"), "database").text = database
    node = ET.SubElement(ann, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(node, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for cls, (x1, y1, x2, y2), truncated in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = class_names[cls]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(truncated))
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(int(value))
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def make_synthetic_detection(root, *, seed: int = 0, train: int = 200, val: int = 50, size=(128, 128),
                             max_shapes: int = 4, quality: int = 90, proposals: bool = False,
                             progress: bool = False) -> dict:
    """Write the synthetic shapes as a PASCAL VOC detection dataset to `root`; returns its description.

    root/JPEGImages/synth_NNNNN.jpg, root/Annotations/synth_NNNNN.xml (render_detection's
    boxes: tight, non-overlapping, at least MIN_BOX pixels a side), root/ImageSets/Main/
    {train,val,trainval}.txt, root/classes.txt (SYNTH_CLASSES, background first: the class ids
    kseg.data.voc_detection reads from it), root/synth.json. Deterministic in seed.
    proposals=True also writes root/selective_search_{train,val}.npz (PROPOSALS_FILE: Selective
    Search's fast mode, kseg.data.proposals.write_proposals' defaults; about 75 ms per 128 x 128 image),
    each split that has images; synth.json's "proposals" names them.
    """
    size = _check_options(size, train, val)
    if proposals:
        from kseg.detection.selective_search import check_installed

        check_installed()  # the install hint before writing any image
    root = os.fspath(root)
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    names = [f"synth_{i:05d}" for i in range(train + val)]
    boxes = 0
    for i, name in enumerate(names):
        image, objects = render_detection(seed, i, size, max_shapes)
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=quality)
        with open(os.path.join(root, "Annotations", name + ".xml"), "wb") as f:
            f.write(voc_annotation(name + ".jpg", size, objects))
        boxes += len(objects)
    lists = {"train": names[:train], "val": names[train:], "trainval": names}
    for split, members in lists.items():
        with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n in members))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in SYNTH_CLASSES))
    info = {"dataset": "kseg synthetic shapes", "layout": "voc-det", "seed": seed, "train": train, "val": val,
            "size": list(size), "max_shapes": max_shapes, "min_box": MIN_BOX, "quality": quality,
            "classes": list(SYNTH_CLASSES), "boxes": boxes}
    if proposals:
        from kseg.data.proposals import write_proposals

        info["proposals"] = {}
        for split in ("train", "val"):
            if lists[split]:
                name = PROPOSALS_FILE.format(split=split)
                write_proposals(root, os.path.join(root, name), split=split, overwrite=True, progress=progress)
                info["proposals"][split] = name
    with open(os.path.join(root, "synth.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return info
