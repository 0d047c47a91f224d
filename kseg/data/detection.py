"""Object detection datasets: PASCAL VOC XML and COCO instances JSON -> padded box targets.

    ds = kseg.data.voc_detection("VOCdevkit/VOC2007", "trainval", size=(300, 300), batch_size=32,
                                 preprocessing="caffe")
    image, target = next(iter(ds))   # target: {"boxes", "classes", "difficult", "image_shape"}

Elements are (image float32 [H, W, 3], target) with

    boxes        float32 [max_boxes, 4]  xyxy corner coordinates in pixels of `image`, -1 padding
    classes      int32   [max_boxes]     model class ids (0 = background, never a box), -1 padding
    difficult    bool    [max_boxes]     VOC's difficult flag (False for COCO and padding)
    image_shape  int32   [2]             the decoded file's (H, W), before any resize

batched to [B, ...] with batch_size=. Boxes are dense and padded like Keras 3's
`keras.layers.MaxNumBoundingBoxes(max_number, fill_value=-1)`: a box is real when its class
is >= 0.

Box convention: torchvision's continuous corner coordinates. A box covers the pixel area
x1 <= x < x2, y1 <= y < y2, so its width is x2 - x1 (no +1) and a box of the whole W x H
image is (0, 0, W, H). PASCAL VOC XML stores 1-based inclusive integer pixel indices (the
devkit's `bndbox` xmin..xmax), so the reader emits (xmin - 1, ymin - 1, xmax, ymax): the
same pixels, as corners. (py-faster-rcnn's `pascal_voc.py` subtracts 1 from all four and keeps
Caffe's `x2 - x1 + 1` widths instead.) COCO's `bbox` [x, y, w, h] is already continuous:
(x, y, x + w, y + h). With size=(h, w) the image is resized bilinearly and the boxes scaled
per axis by w / W and h / H, which maps these corners exactly.

Classes: class_names lists the model's classes with index = class id. When its first name is
not "background" (or py-faster-rcnn's "__background__"), "background" is put in front, so
VOC's 20 names map to ids 1..20. The default is a classes.txt at the dataset root (one name
a line, as `kseg data synth --task detection` writes), else VOC's 20 classes in the devkit's
alphabetical order. COCO keeps its category ids (1..90, with gaps) as class ids: torchvision's
91-logit COCO models; `dataset.class_names` has "N/A" at the unused ids.

Listing parses every annotation once, in Python (xml.etree / json), into arrays; the tf.data
graph only reads and decodes images. An annotation that cannot be used (missing or
unparsable, an unknown class, a box with xmax < xmin or outside the image, more objects than
max_boxes) fails the reader naming its file, or with skip_bad=True is skipped and logged like
the segmentation readers' bad files; an image whose decoded size differs from its annotation's
fails (or is skipped) when it is read. `kseg data check --layout voc-det|coco` lists them all.

This module imports TensorFlow only inside the readers: listing serves `kseg data check`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import warnings
import xml.etree.ElementTree as ET

import numpy as np

from kseg.data.layouts import _classes_txt, _find_list, _read_list
from kseg.data.palette import VOC_CLASSES

DETECTION_LAYOUTS = ("voc-det", "coco")
BACKGROUND_NAMES = ("background", "__background__")
MISSING = "listed but missing"
# COCO boxes may reach this far (pixels) past the image edge and are clamped: polygon-derived
# float boxes overshoot by rounding; anything further is an error.
COCO_EDGE_TOLERANCE = 1.0
# Only "background" and the unused ids of a COCO category table carry no class.
UNUSED_CLASS = "N/A"


@dataclasses.dataclass
class DetectionSource:
    """What a detection layout lists: usable images with their boxes, class names, problems.

    boxes are float32 [n, 4] xyxy continuous pixel corners, classes int32 [n] model class ids,
    difficult bool [n]; sizes are the annotated (H, W), (0, 0) where the annotation has none.
    `problems` are (file, reason) pairs that make an image unusable (already left out of
    `images`); `notes` are (file, reason) pairs for annotations dropped with a warning.
    """

    layout: str
    images: list[str]
    annotations: list[str]
    boxes: list[np.ndarray]
    classes: list[np.ndarray]
    difficult: list[np.ndarray]
    sizes: list[tuple[int, int]]
    class_names: tuple[str, ...]
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def _add(self, image, annotation, boxes, classes, difficult, size):
        self.images.append(image)
        self.annotations.append(annotation)
        self.boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4))
        self.classes.append(np.asarray(classes, np.int32).reshape(-1))
        self.difficult.append(np.asarray(difficult, bool).reshape(-1))
        self.sizes.append(size)


def model_class_names(class_names) -> tuple[str, ...]:
    """class_names with "background" at index 0 (kept if already there), so index = class id."""
    names = tuple(str(n).strip() for n in class_names)
    if not names or not all(names):
        raise ValueError(f"class_names must be non-empty names, got {list(class_names)!r}")
    if names[0].lower() not in BACKGROUND_NAMES:
        names = ("background", *names)
    lowered = [n.lower() for n in names]
    dupes = sorted({n for n in lowered if lowered.count(n) > 1})
    if dupes:
        raise ValueError(f"class_names repeats {dupes}")
    return names


def _too_many(n, max_boxes):
    return (f"{n} objects but max_boxes={max_boxes}: pass a larger max_boxes= "
            f"(`kseg data check --max-boxes`) so no object is dropped")


def _check_max_boxes(max_boxes):
    if not isinstance(max_boxes, int) or isinstance(max_boxes, bool) or max_boxes < 1:
        raise ValueError(f"max_boxes must be a positive int (boxes are padded to it), got {max_boxes!r}")


# === PASCAL VOC ===

def find_voc_root(root) -> str:
    """The VOC year folder holding Annotations/: root itself, or its one VOC2007/ or VOC2012/."""
    root = os.fspath(root)
    if os.path.isdir(os.path.join(root, "Annotations")):
        return root
    found = [os.path.join(root, year) for year in ("VOC2007", "VOC2012")
             if os.path.isdir(os.path.join(root, year, "Annotations"))]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{root} holds {' and '.join(found)}: pass one of them as the dataset root")
    raise FileNotFoundError(f"{root}: no Annotations/ here or in VOC2007/ or VOC2012/; expected the VOC "
                            f"detection layout (Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/<split>.txt)")


def voc_detection_splits(root) -> list[str]:
    """The split lists of ImageSets/Main, sorted, without the devkit's per-class `<class>_<split>.txt`."""
    folder = os.path.join(find_voc_root(root), "ImageSets", "Main")
    names = sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".txt")) if os.path.isdir(folder) else []
    per_class = {n for n in names if "_" in n and n.split("_", 1)[1] in names}
    splits = [n for n in names if n not in per_class]
    if not splits:
        raise FileNotFoundError(f"{folder}: no split list files (*.txt); pass --split with a list name or file")
    return splits


def _text(node, tag):
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _number(node, tag, what):
    text = _text(node, tag)
    if text is None:
        raise ValueError(f"{what} has no <{tag}>")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: <{tag}> is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: <{tag}> is {text!r}")
    return value


def _flag(node, tag, what):
    text = _text(node, tag)
    if text in (None, ""):
        return False  # the devkit's files always have them; absent means 0, as py-faster-rcnn reads it
    if text not in ("0", "1"):
        raise ValueError(f"{what}: <{tag}> is {text!r}, expected 0 or 1")
    return text == "1"


def parse_voc_xml(path, class_ids: dict[str, int]):
    """One VOC annotation file -> (dict of arrays and size, [problems]); never raises for bad content.

    The dict: boxes float32 [n, 4] (continuous corners), classes int32 [n], difficult bool [n],
    truncated bool [n], size (H, W) or (0, 0) when the file has no <size>.
    """
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        return None, [f"cannot be parsed as XML: {e}"]
    except OSError as e:
        return None, [f"unreadable: {e.strerror or e}"]
    ann = tree.getroot()
    if ann.tag != "annotation":
        return None, [f"root element is <{ann.tag}>, expected <annotation> (a PASCAL VOC annotation)"]
    problems = []
    size = (0, 0)
    node = ann.find("size")
    if node is not None and _text(node, "width") not in (None, "", "0"):
        try:
            width, height = _number(node, "width", "<size>"), _number(node, "height", "<size>")
            if width < 1 or height < 1 or width != int(width) or height != int(height):
                raise ValueError(f"<size> is {width:g}x{height:g} (WxH), expected positive integers")
            size = (int(height), int(width))
        except ValueError as e:
            problems.append(str(e))
    boxes, classes, difficult, truncated = [], [], [], []
    for i, obj in enumerate(ann.findall("object")):
        name = _text(obj, "name") or ""
        what = f"object {i} ({name or 'no name'})"
        cls = class_ids.get(name.lower())
        if cls is None:
            known = [n for n, _ in sorted(class_ids.items(), key=lambda kv: kv[1])]
            shown = ", ".join(known[:25]) + (", ..." if len(known) > 25 else "")
            problems.append(f"{what}: unknown class name {name!r} (known: {shown}; pass class_names= "
                            f"or put a classes.txt at the dataset root)")
            continue
        bb = obj.find("bndbox")
        try:
            if bb is None:
                raise ValueError(f"{what} has no <bndbox>")
            xmin, ymin, xmax, ymax = (_number(bb, t, what) for t in ("xmin", "ymin", "xmax", "ymax"))
            flags = (_flag(obj, "difficult", what), _flag(obj, "truncated", what))
        except ValueError as e:
            problems.append(str(e))
            continue
        coords = f"xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}"
        if xmax < xmin or ymax < ymin:
            side = "xmax < xmin" if xmax < xmin else "ymax < ymin"
            problems.append(f"{what}: {side} ({coords}); an empty or inverted box")
            continue
        h, w = size
        if xmin < 1 or ymin < 1 or (w and (xmax > w or ymax > h)):
            limit = f"x 1..{w} and y 1..{h} for its {h}x{w} (HxW) <size>" if w else "from 1"
            problems.append(f"{what}: box {coords} is outside the image: VOC's 1-based pixel indices run {limit}")
            continue
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
        classes.append(cls)
        difficult.append(flags[0])
        truncated.append(flags[1])
    record = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "classes": np.asarray(classes, np.int32),
              "difficult": np.asarray(difficult, bool), "truncated": np.asarray(truncated, bool), "size": size}
    return record, problems


def voc_detection_ids(root, split="train") -> list[str]:
    """The image ids of a VOC detection split list, in its order (py-faster-rcnn's image_index)."""
    root = find_voc_root(root)
    return [tokens[0] for _, tokens in _read_list(_find_list(root, split, [("ImageSets", "Main"), ()])) if tokens]


def list_voc_detection(root, split="train", *, use_difficult=True, max_boxes=100, class_names=None) -> DetectionSource:
    """VOC detection layout: ImageSets/Main/<split>.txt ids -> Annotations/<id>.xml + JPEGImages/<id>.jpg.

    `split` is a list name or a list file's path. Every annotation is parsed here; see the module
    docstring for classes and box coordinates. use_difficult=False drops difficult objects
    (the VOC evaluation ignores them); max_boxes counts the objects kept.
    """
    _check_max_boxes(max_boxes)
    root = find_voc_root(root)
    list_path = _find_list(root, split, [("ImageSets", "Main"), ()])
    names = model_class_names(class_names if class_names is not None else (_classes_txt(root) or VOC_CLASSES))
    class_ids = {n.lower(): i for i, n in enumerate(names) if i > 0}
    source = DetectionSource("voc-det", [], [], [], [], [], [], names)
    for number, tokens in _read_list(list_path):
        if len(tokens) != 1:
            raise ValueError(f"{list_path}:{number}: expected one image id per line, got {tokens} (the devkit's "
                             f"<class>_<split>.txt lists are per-class flags: pass the split's own list)")
        image = os.path.join(root, "JPEGImages", tokens[0] + ".jpg")
        xml = os.path.join(root, "Annotations", tokens[0] + ".xml")
        gone = [(p, MISSING) for p in (xml, image) if not os.path.isfile(p)]
        if gone:
            source.problems.extend(gone)
            continue
        record, problems = parse_voc_xml(xml, class_ids)
        if record is not None and not problems:
            keep = np.ones(len(record["classes"]), bool) if use_difficult else ~record["difficult"]
            if keep.sum() > max_boxes:
                problems.append(_too_many(int(keep.sum()), max_boxes))
        if problems:
            source.problems.append((xml, "; ".join(problems)))
            continue
        source._add(image, xml, record["boxes"][keep], record["classes"][keep], record["difficult"][keep],
                    record["size"])
    return source


# === COCO ===

def _load_json(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be parsed as JSON: {e}") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} list; expected COCO instances JSON "
                         f"(images, annotations, categories)")
    return data


def coco_class_names(categories, where="categories") -> tuple[str, ...]:
    """COCO categories -> names indexed by category id, "background" at 0, "N/A" at unused ids."""
    table = {}
    for i, cat in enumerate(categories):
        try:
            cid, name = int(cat["id"]), str(cat["name"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}[{i}]: expected {{'id': int, 'name': str}}, got {cat!r}") from None
        if cid < 1:
            raise ValueError(f"{where}[{i}]: category id {cid}; ids start at 1 (0 is the background)")
        if cid in table:
            raise ValueError(f"{where}[{i}]: category id {cid} appears twice")
        table[cid] = name
    if not table:
        raise ValueError(f"{where}: no categories")
    return ("background", *(table.get(i, UNUSED_CLASS) for i in range(1, max(table) + 1)))


def list_coco(images_dir, annotations, *, max_boxes=100, degenerate="drop") -> DetectionSource:
    """COCO instances JSON + an image folder -> DetectionSource (images sorted by id).

    Boxes are (x, y, x + w, y + h), classes the category ids. Crowd annotations (iscrowd=1)
    are dropped: they mark regions, not objects to detect (COCO's evaluation ignores detections
    in them; torchvision's detection reference drops them for training). Zero-width or
    zero-height boxes (COCO train2017 has two, e.g. annotation 918 of image 200365: cocoapi
    issue #355) are dropped and noted with degenerate="drop", errors with "error"; a negative
    size is always an error. Boxes reaching up to 1 pixel past the image are clamped to it,
    further is an error. Images without annotations are kept (no boxes).
    """
    _check_max_boxes(max_boxes)
    if degenerate not in ("drop", "error"):
        raise ValueError(f"degenerate must be 'drop' or 'error', got {degenerate!r}")
    images_dir, json_path = os.fspath(images_dir), os.fspath(annotations)
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"{images_dir}: image folder not found")
    data = _load_json(json_path)
    names = coco_class_names(data["categories"], f"{json_path}: categories")
    source = DetectionSource("coco", [], [], [], [], [], [], names)
    images = {}
    for i, im in enumerate(data["images"]):
        try:
            iid, file_name = int(im["id"]), str(im["file_name"])
            size = (int(im["height"]), int(im["width"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{json_path}: images[{i}]: expected id, file_name, width and height, got "
                             f"{str(im)[:200]}") from None
        if iid in images:
            raise ValueError(f"{json_path}: images[{i}]: image id {iid} appears twice")
        images[iid] = (os.path.join(images_dir, file_name), size)
    per_image = collections.defaultdict(list)
    json_name = os.path.basename(json_path)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{json_path}: annotations[{i}] is not an object: {str(ann)[:200]}")
        iid = ann.get("image_id")
        if iid not in images:
            source.problems.append((json_path, f"annotations[{i}] (id {ann.get('id', '?')}): image_id {iid!r} "
                                               f"is not in images"))
            continue
        per_image[iid].append(ann)
    for iid in sorted(images):
        path, (h, w) = images[iid]
        boxes, classes, problems = [], [], []
        for ann in per_image.get(iid, []):
            what = f"{json_name} annotation {ann.get('id', '?')}"
            if ann.get("iscrowd", 0):
                continue
            cid = ann.get("category_id")
            if not isinstance(cid, int) or not 0 < cid < len(names) or names[cid] == UNUSED_CLASS:
                problems.append(f"{what}: category_id {cid!r} is not in categories")
                continue
            bbox = ann.get("bbox")
            try:
                x, y, bw, bh = (float(v) for v in bbox)
                if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"{what}: bbox {bbox!r} is not [x, y, width, height]")
                continue
            shown = f"bbox [{x:g}, {y:g}, {bw:g}, {bh:g}]"
            if bw < 0 or bh < 0 or ((bw == 0 or bh == 0) and degenerate == "error"):
                problems.append(f"{what}: {shown} has a {'negative' if min(bw, bh) < 0 else 'zero'} width or height")
                continue
            if bw == 0 or bh == 0:
                source.notes.append((path, f"{what}: {shown} has zero width or height; dropped"))
                continue
            tol = COCO_EDGE_TOLERANCE
            if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
                problems.append(f"{what}: {shown} is outside the {h}x{w} (HxW) image (x + width must be <= "
                                f"width, y + height <= height)")
                continue
            boxes.append((min(max(x, 0.0), w), min(max(y, 0.0), h), min(x + bw, w), min(y + bh, h)))
            classes.append(cid)
        if not os.path.isfile(path):
            source.problems.append((path, MISSING))
            continue
        if not problems and len(boxes) > max_boxes:
            problems.append(_too_many(len(boxes), max_boxes))
        if problems:
            source.problems.append((path, "; ".join(problems)))
            continue
        source._add(path, json_path, boxes, classes, np.zeros(len(classes), bool), (h, w))
    return source


def list_detection(layout: str, root, **options) -> DetectionSource:
    """`voc-det`: root is the VOC folder (split=, use_difficult=, max_boxes=, class_names=);
    `coco`: root is the image folder and annotations= the instances JSON (max_boxes=, degenerate=)."""
    if layout == "voc-det":
        return list_voc_detection(root, **options)
    if layout == "coco":
        if options.get("annotations") is None:
            raise ValueError("the coco layout needs annotations= (the instances_*.json file)")
        annotations = options.pop("annotations")
        return list_coco(root, annotations, **options)
    raise ValueError(f"unknown detection layout {layout!r}; known: {', '.join(DETECTION_LAYOUTS)}")


# === readers ===

def _aligned(source, name, by_id):
    """extra_boxes[name] as one (images, R, 4) float32 array in the source's image order."""
    rows = []
    for path in source.images:
        image_id = os.path.splitext(os.path.basename(path))[0]
        if image_id not in by_id:
            raise ValueError(f"kseg.data: no {name} for image {image_id} ({path}); every listed image needs them")
        rows.append(np.asarray(by_id[image_id], np.float32))
    if len({r.shape for r in rows}) > 1:
        raise ValueError(f"kseg.data: {name} must have the same (R, 4) shape for every image (pad them), got "
                         f"{sorted({r.shape for r in rows})[:3]}")
    return np.stack(rows) if rows else np.zeros((0, 0, 4), np.float32)


def voc_detection(root, split="train", *, use_difficult=True, max_boxes=100, class_names=None, **options):
    """PASCAL VOC detection: Annotations/<id>.xml + JPEGImages/<id>.jpg, listed by ImageSets/Main/<split>.txt.

    `root` is VOCdevkit/VOC2007 (or VOCdevkit holding one VOC year). Yields (image, target);
    see the module docstring for the target, box coordinates and classes. Options:
      size: None (the file's size) or (h, w): bilinear resize, boxes scaled per axis.
      batch_size: None or an int; full-size images batch only with size= (or batch_size=1).
      preprocessing: None (RGB 0..255), a kind ("caffe", "torch", ...), a model name or a Preprocessing.
      shuffle (default False), seed: seeded order. skip_bad: False (a bad file raises, naming
      it) or True / a SkipLog (skipped, warned about, recorded in `dataset.skipped`).
      use_difficult: False drops VOC's difficult objects. max_boxes: the padded box count;
      an image with more objects is an error (raise it), never truncated.
    """
    source = list_voc_detection(root, split, use_difficult=use_difficult, max_boxes=max_boxes,
                                class_names=class_names)
    return detection_dataset(source, max_boxes=max_boxes, **options)


def coco_detection(images_dir, annotations_json, *, max_boxes=100, degenerate="drop", **options):
    """COCO instances JSON (images, annotations with bbox [x, y, w, h], categories) -> (image, target).

    Boxes are (x, y, x + w, y + h); classes are COCO's category ids (1..90 for COCO itself,
    torchvision's 91 logits with 0 = background). Crowd annotations are dropped (see
    list_coco); zero-size boxes are dropped with a warning (degenerate="error" refuses them).
    Other options as voc_detection.
    """
    source = list_coco(images_dir, annotations_json, max_boxes=max_boxes, degenerate=degenerate)
    return detection_dataset(source, max_boxes=max_boxes, **options)


def detection_dataset(source: DetectionSource, *, max_boxes=100, size=None, batch_size=None, preprocessing=None,
                      shuffle=None, seed=None, skip_bad=False, drop_remainder=False, num_parallel_calls=None,
                      deterministic=True, extra_boxes=None):
    """The tf.data pipeline of a listed detection dataset: read -> validate -> resize -> preprocess -> pad.

    extra_boxes: {name: {image_id: (R, 4) xyxy pixels}} (the same R for every image; image_id the image
    file's name without its extension), e.g. Fast R-CNN's padded proposals: each becomes target[name],
    resized with the image. An image the dict lacks is an error naming it."""
    import tensorflow as tf

    from kseg.data import augment as aug_ops
    from kseg.data import pipeline as pl
    from kseg.data.decode import _first, read_image

    _check_max_boxes(max_boxes)
    size = aug_ops._pair(size, "size")
    if batch_size and batch_size > 1 and not size:
        raise ValueError("images of different sizes cannot be batched: pass size=(h, w) (e.g. (300, 300) "
                         "for SSD300) or batch_size=1")
    affine = pl.preprocessing_affine(pl.resolve_preprocessing(preprocessing))
    num_parallel_calls = pl.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    skip_log = None
    if isinstance(skip_bad, pl.SkipLog) or skip_bad:  # an empty SkipLog is falsy
        skip_log = skip_bad if isinstance(skip_bad, pl.SkipLog) else pl.SkipLog()
        for path, reason in source.problems:
            skip_log.add(path, reason)
    elif source.problems:
        shown = "\n  ".join(f"{p}: {r}" for p, r in source.problems[:10])
        more = f"\n  ... and {len(source.problems) - 10} more" if len(source.problems) > 10 else ""
        error = FileNotFoundError if all(r == MISSING for _, r in source.problems) else ValueError
        raise error(f"kseg.data: {len(source.problems)} bad annotations or missing files (skip_bad=True skips "
                    f"them; `kseg data check --layout {source.layout}` lists them all):\n  {shown}{more}")
    if source.notes:
        shown = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in source.notes[:3])
        warnings.warn(f"kseg.data: {len(source.notes)} annotation(s) dropped: {shown}"
                      + (" ..." if len(source.notes) > 3 else ""), stacklevel=3)
    if not source.images:
        raise ValueError("kseg.data: the dataset lists no usable images")

    counts = np.array([len(c) for c in source.classes], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    paths = tf.constant(source.images)
    annotations = tf.constant(source.annotations)
    table = {
        "boxes": tf.constant(np.concatenate([np.zeros((0, 4), np.float32), *source.boxes])),
        "classes": tf.constant(np.concatenate([np.zeros(0, np.int32), *source.classes])),
        "difficult": tf.constant(np.concatenate([np.zeros(0, bool), *source.difficult])),
    }
    extras = {name: tf.constant(_aligned(source, name, by_id)) for name, by_id in (extra_boxes or {}).items()}
    sizes = tf.constant(np.asarray(source.sizes, np.int32).reshape(-1, 2))
    starts, counts = tf.constant(starts), tf.constant(counts)
    guard = pl._guarded_decode(skip_bad)

    def read(i):
        path = tf.gather(paths, i)
        image, bad_path, problem = read_image(tf.io.read_file(path), path, 3, guard=guard)
        rows = tf.range(starts[i], starts[i] + counts[i])
        boxes, classes, difficult = (tf.gather(table[k], rows) for k in ("boxes", "classes", "difficult"))
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        eh, ew = sizes[i][0], sizes[i][1]
        mismatch = (eh > 0) & (tf.not_equal(eh, h) | tf.not_equal(ew, w))
        size_text = tf.strings.join([
            "image is ", tf.strings.as_string(h), "x", tf.strings.as_string(w), " (HxW) but its annotation ",
            tf.gather(annotations, i), " says ", tf.strings.as_string(eh), "x", tf.strings.as_string(ew)])
        # Annotations without a size were not checked against the image at listing: check here.
        outside = tf.equal(eh, 0) & (tf.reduce_any(boxes[:, 2] > tf.cast(w, tf.float32))
                                     | tf.reduce_any(boxes[:, 3] > tf.cast(h, tf.float32)))
        outside_text = tf.strings.join(["a box of its annotation ", tf.gather(annotations, i),
                                        " reaches beyond the ", tf.strings.as_string(h), "x",
                                        tf.strings.as_string(w), " (HxW) image"])
        reason = _first([(tf.not_equal(problem, ""), problem), (mismatch, size_text), (outside, outside_text)])
        more = {name: tf.gather(table_, i) for name, table_ in extras.items()}
        return (image, boxes, classes, difficult, more), bad_path, reason

    def post(image, boxes, classes, difficult, more):
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        image = tf.cast(image, tf.float32)
        if size:
            image = tf.image.resize(image, size)
            sx = size[1] / tf.cast(w, tf.float32)
            sy = size[0] / tf.cast(h, tf.float32)
            boxes = boxes * tf.stack([sx, sy, sx, sy])
            more = {name: value * tf.stack([sx, sy, sx, sy]) for name, value in more.items()}
        image = aug_ops.apply_affine(image, affine)
        pad = [[0, max_boxes - tf.shape(classes)[0]]]
        target = {
            "boxes": tf.ensure_shape(tf.pad(boxes, pad + [[0, 0]], constant_values=-1.0), [max_boxes, 4]),
            "classes": tf.ensure_shape(tf.pad(classes, pad, constant_values=-1), [max_boxes]),
            "difficult": tf.ensure_shape(tf.pad(difficult, pad, constant_values=False), [max_boxes]),
            "image_shape": tf.stack([h, w]),
            **more,
        }
        return tf.ensure_shape(image, [*(size or (None, None)), 3]), target

    plain = pl._plain
    par = dict(num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    ds = tf.data.Dataset.range(len(source.images))
    if shuffle:
        ds = ds.shuffle(len(source.images), seed=seed, reshuffle_each_iteration=True)
    if skip_log is None:
        def read_checked_post(i):  # one map: read, check, finish (as kseg.data.pipeline's default path)
            values, bad_path, reason = read(i)
            with tf.control_dependencies([pl._assert_good(bad_path, reason)]):
                values = tf.nest.map_structure(tf.identity, values)
            return post(*values)

        ds = ds.map(plain(read_checked_post), **par)
    else:
        ds = pl._validate(ds.map(plain(read), **par), skip_log, par, then=lambda values: post(*values))
    return pl._finish(ds, batch_size=batch_size, drop_remainder=drop_remainder, finish=None,
                      num_parallel_calls=num_parallel_calls, deterministic=deterministic, skip_log=skip_log,
                      class_names=source.class_names, num_classes=len(source.class_names))
