"""Where each published dataset layout keeps its files: listing only, no TensorFlow.

The readers (kseg.data.readers) and the checker (kseg.data.check) both list a dataset
here, so `kseg data check` looks at exactly the files a reader would read.
"""

from __future__ import annotations

import dataclasses
import os

from kseg.data.palette import IGNORE_LABEL, VOC_CLASSES, palette_table
from kseg.data.spec import LabelSpec, index_spec
from kseg.images import TF_IMAGE_EXTENSIONS


@dataclasses.dataclass
class Source:
    """What a layout lists: file pairs (or TFRecord shards), the label spec and class names.

    `problems` are (path, reason) pairs found while listing (a missing image or label): a
    reader raises on them unless skip_bad, the checker reports them.
    """

    images: list[str]
    labels: list  # label file paths, or int class ids for classification
    spec: LabelSpec
    class_names: tuple[str, ...]
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    records: list[str] | None = None


# The suffixes TensorFlow's decoders read (kseg.images keeps both extension lists).
IMAGE_EXTENSIONS = TF_IMAGE_EXTENSIONS

PETS_CLASSES = {
    # trimap values: 1 = pet, 2 = background, 3 = border / undetermined
    "own": (("background", "pet", "border"), {1: 1, 2: 0, 3: 2}),
    "ignore": (("background", "pet"), {1: 1, 2: 0, 3: IGNORE_LABEL}),
    "foreground": (("background", "pet"), {1: 1, 2: 0, 3: 1}),
}


# === listing ===

def _read_list(path) -> list[tuple[int, list[str]]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: list file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append((number, line.split()))
    if not rows:
        raise ValueError(f"{path}: list file has no entries")
    return rows


def _classes_txt(root) -> tuple[str, ...] | None:
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def _class_names(root, num_classes, default):
    names = _classes_txt(root)
    if num_classes is None:
        return names or default
    if names and len(names) == num_classes:
        return names
    if default and len(default) == num_classes:
        return default
    return tuple(f"class_{i}" for i in range(num_classes))


def _missing(images, labels):
    problems = []
    keep_i, keep_l = [], []
    for image, label in zip(images, labels):
        gone = [(p, "listed but missing") for p in (image, label) if not os.path.isfile(p)]
        if gone:
            problems.extend(gone)
        else:
            keep_i.append(image)
            keep_l.append(label)
    return keep_i, keep_l, problems


def _voc_root(root) -> str:
    root = os.fspath(root)
    for candidate in (root, os.path.join(root, "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise FileNotFoundError(f"{root}: no JPEGImages/ here or in VOC2012/; expected the "
                            f"VOCdevkit/VOC2012 layout (JPEGImages, SegmentationClass, ImageSets)")


def _find_list(root, split, folders) -> str:
    if os.path.isfile(split):
        return split
    tried = [os.path.join(root, *f, f"{split}.txt") for f in folders]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"split {split!r}: none of {tried} exists (or pass a list file's path)")


def voc_splits(root) -> list[str]:
    """The split names of a VOC layout: one per ImageSets/Segmentation/*.txt list file, sorted."""
    root = _voc_root(root)
    folder = os.path.join(root, "ImageSets", "Segmentation")
    names = sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".txt")) if os.path.isdir(folder) else []
    if not names:
        raise FileNotFoundError(f"{folder}: no split list files (*.txt); pass --split with a list name or file")
    return names


def list_voc(root, split="train", *, labels="SegmentationClass", num_classes=None) -> Source:
    """VOC 2012 (labels="SegmentationClass") or SBD-augmented ("SegmentationClassAug")."""
    root = _voc_root(root)
    list_path = _find_list(root, split, [("ImageSets", "Segmentation"), ("ImageSets", "SegmentationAug"), ()])
    images, label_paths = [], []
    for number, tokens in _read_list(list_path):
        if len(tokens) == 1:
            images.append(os.path.join(root, "JPEGImages", tokens[0] + ".jpg"))
            label_paths.append(os.path.join(root, labels, tokens[0] + ".png"))
        elif len(tokens) == 2:
            # DeepLab-style lists: "/JPEGImages/x.jpg /SegmentationClassAug/x.png", relative to root.
            images.append(os.path.join(root, tokens[0].lstrip("/")))
            label_paths.append(os.path.join(root, tokens[1].lstrip("/")))
        else:
            raise ValueError(f"{list_path}:{number}: expected 'name' or 'image_path label_path', got {tokens}")
    names = _class_names(root, num_classes, VOC_CLASSES)
    images, label_paths, problems = _missing(images, label_paths)
    return Source(images, label_paths, index_spec(len(names)), names, problems)


def list_pets(root, split="trainval", *, border="own") -> Source:
    """Oxford-IIIT Pet: images/*.jpg + annotations/trimaps/*.png, listed by annotations/<split>.txt."""
    if border not in PETS_CLASSES:
        raise ValueError(f"border must be one of {sorted(PETS_CLASSES)}, got {border!r}")
    root = os.fspath(root)
    if not os.path.isdir(os.path.join(root, "images")):
        raise FileNotFoundError(f"{root}: no images/ folder; expected the Oxford-IIIT Pet layout "
                                f"(images/, annotations/trimaps/, annotations/trainval.txt)")
    list_path = _find_list(root, split, [("annotations",)])
    images, labels = [], []
    for _, tokens in _read_list(list_path):
        images.append(os.path.join(root, "images", tokens[0] + ".jpg"))
        labels.append(os.path.join(root, "annotations", "trimaps", tokens[0] + ".png"))
    names, mapping = PETS_CLASSES[border]
    # Trimaps hold only 1, 2, 3: 0 and 255 in a trimap are errors, not classes.
    lut = [-1] * 256
    for raw, cls in mapping.items():
        lut[raw] = cls
    spec = LabelSpec("index", len(names), tuple(lut), "1, 2, 3 (pet, background, border)", None, False)
    images, labels, problems = _missing(images, labels)
    return Source(images, labels, spec, names, problems)


def list_edges(list_file, root=None) -> Source:
    """BSDS500 / HED list of 'image_path edge_map_path' pairs (relative to root or the list's folder)."""
    list_file = os.fspath(list_file)
    root = os.path.dirname(os.path.abspath(list_file)) if root is None else os.fspath(root)
    images, labels = [], []
    for number, tokens in _read_list(list_file):
        if len(tokens) != 2:
            raise ValueError(f"{list_file}:{number}: expected 'image_path edge_map_path', got {tokens}")
        images.append(os.path.join(root, tokens[0]))
        labels.append(os.path.join(root, tokens[1]))
    images, labels, problems = _missing(images, labels)
    return Source(images, labels, LabelSpec("edge", 1, expected="0..255 edge strength"),
                  ("edge",), problems)


def list_skeleton(root, split="train") -> Source:
    """SK-LARGE / SK-SMALL (SK506): images/<split>/*.jpg and groundTruth/<split>/*.mat matched by stem.

    Each .mat holds `symmetry` (the skeleton) and `edge` (the object boundary); kseg.data.skeleton
    reads them into scale maps.
    """
    root = os.fspath(root)
    folders = [os.path.join(root, sub, split) for sub in ("images", "groundTruth")]
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: folder not found; expected the SK-LARGE layout "
                                    f"(images/{split}/*.jpg, groundTruth/{split}/*.mat)")
    image_files = _by_stem(folders[0], IMAGE_EXTENSIONS)
    mat_files = _by_stem(folders[1], (".mat",))
    problems = [(p, "image has no groundTruth .mat with the same stem") for s, p in image_files.items()
                if s not in mat_files]
    problems += [(p, "groundTruth .mat has no image with the same stem") for s, p in mat_files.items()
                 if s not in image_files]
    stems = [s for s in image_files if s in mat_files]
    spec = LabelSpec("skeleton", 2, expected="a .mat with `symmetry` (skeleton) and `edge` (boundary) maps")
    return Source([image_files[s] for s in stems], [mat_files[s] for s in stems], spec, ("background", "skeleton"),
                  problems)


def _by_stem(folder, extensions) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found")
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions or name.startswith("."):
            continue
        if stem in found:
            raise ValueError(f"{folder}: two files share the stem {stem!r} "
                             f"({os.path.basename(found[stem])}, {name}); pairs are matched by stem")
        found[stem] = os.path.join(folder, name)
    return found


def list_folder(root, *, images="images", masks="masks", num_classes=None, palette=None,
                label_map=None, class_names=None) -> Source:
    """Generic images/ + masks/ matched by file stem; masks are index PNGs (or colour PNGs with palette=)."""
    root = os.fspath(root)
    image_files = _by_stem(os.path.join(root, images), IMAGE_EXTENSIONS)
    mask_files = _by_stem(os.path.join(root, masks), IMAGE_EXTENSIONS)
    if num_classes is None:
        names = class_names or _classes_txt(root)
        if names is None:
            raise ValueError(f"{root}: pass num_classes= (or class_names=, or put a classes.txt in the folder)")
        num_classes = len(names)
    names = tuple(class_names) if class_names else _class_names(root, num_classes, ())
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but num_classes={num_classes}")
    problems = [(p, "image has no mask with the same stem") for s, p in image_files.items() if s not in mask_files]
    problems += [(p, "mask has no image with the same stem") for s, p in mask_files.items() if s not in image_files]
    stems = [s for s in image_files if s in mask_files]
    colours = palette_table(palette, num_classes) if palette is not None else None
    spec = index_spec(num_classes, label_map=label_map, colours=colours)
    return Source([image_files[s] for s in stems], [mask_files[s] for s in stems], spec, names, problems)


def list_classification(root, *, class_names=None) -> Source:
    """One folder per class (ImageNet layout), images found recursively, classes sorted by name."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: folder not found")
    names = list(class_names) if class_names else sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not names:
        raise ValueError(f"{root}: no class folders; expected one folder per class (ImageNet layout)")
    images, labels = [], []
    for index, name in enumerate(names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: class folder not found")
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                       if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith("."))
        if not files:
            raise ValueError(f"{folder}: class {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        images += files
        labels += [index] * len(files)
    return Source(images, labels, LabelSpec("class", len(names)), tuple(names))


def find_classification_list(path, split=None) -> tuple[str, str]:
    """(list file, image root) of an annotation-list dataset: `path` is the list file itself
    (images relative to its folder), or a dataset folder and `split` names the list:
    DIR/<split>.txt (images relative to DIR), else mmpretrain's ImageNet layout
    DIR/meta/<split>.txt (images relative to DIR/<split>)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path, os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: neither an annotation list file nor a dataset folder")
    if split is None:
        raise ValueError(f"{path} is a folder: name the split whose list to read (DIR/SPLIT.txt or "
                         "DIR/meta/SPLIT.txt), or pass the list file itself")
    candidates = ((os.path.join(path, f"{split}.txt"), path),
                  (os.path.join(path, "meta", f"{split}.txt"), os.path.join(path, split)))
    for list_file, root in candidates:
        if os.path.isfile(list_file):
            return list_file, root
    raise FileNotFoundError(f"split {split!r}: none of {[c for c, _ in candidates]} exists "
                            "(an annotation list: 'relative/path.jpg LABEL' lines)")


def list_classification_list(path, split=None, *, root=None, class_names=None, num_classes=None) -> Source:
    """An annotation list (mmpretrain's CustomDataset form): 'relative/path.jpg LABEL' lines.

    `path`: the list file, or a dataset folder with `split` (see find_classification_list).
    Paths are relative to `root` (default: as find_classification_list says); the label is
    the last field on the line, a class index. Class names: class_names=, else a classes.txt
    (one name per line, line i is class i) next to the list file or in the image root, else
    num_classes= gives the count, else the largest label + 1 (names "0", "1", ...). A line
    without a label, a label that is not an integer, or one out of range raises ValueError
    naming the file and line: a label is never mapped silently. Blank lines and lines
    starting with # are skipped.
    """
    list_file, default_root = find_classification_list(path, split)
    root = default_root if root is None else os.fspath(root)
    names = tuple(class_names) if class_names else (
        _classes_txt(os.path.dirname(os.path.abspath(list_file))) or _classes_txt(root))
    if names and num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{list_file}: {len(names)} class names but num_classes={num_classes}")
    with open(list_file, encoding="utf-8") as f:
        rows = [(number, line.strip()) for number, line in enumerate(f, 1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise ValueError(f"{list_file}: list file has no entries")
    images, labels = [], []
    limit = len(names) if names else num_classes
    for number, line in rows:
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{list_file}:{number}: expected 'relative/path.jpg LABEL', got {line!r}")
        rel, raw = parts
        try:
            label = int(raw)
        except ValueError:
            raise ValueError(f"{list_file}:{number}: label {raw!r} is not an integer class index "
                             f"(line {line!r})") from None
        if label < 0 or (limit is not None and label >= limit):
            what = f"{limit} classes (0..{limit - 1})" if limit is not None else "class indices (>= 0)"
            raise ValueError(f"{list_file}:{number}: label {label} is out of range for {what}")
        images.append(os.path.join(root, rel))
        labels.append(label)
    if limit is None:
        limit = max(labels) + 1
    names = names or tuple(str(i) for i in range(limit))
    problems = [(p, "listed but missing") for p in images if not os.path.isfile(p)]
    missing = {p for p, _ in problems}
    keep = [(i, y) for i, y in zip(images, labels) if i not in missing]
    return Source([i for i, _ in keep], [y for _, y in keep], LabelSpec("class", len(names)), tuple(names),
                  problems)


LAYOUTS = {
    "voc": list_voc,
    "sbd": lambda root, split="train_aug", **kw: list_voc(root, split, labels="SegmentationClassAug", **kw),
    "pets": list_pets,
    "edges": list_edges,
    "folder": list_folder,
    "classification": list_classification,
    "classification_list": list_classification_list,
    "skeleton": list_skeleton,
}


def list_source(layout: str, root, **kwargs) -> Source:
    """The files and label spec of a dataset in one of LAYOUTS (used by the checker and TFRecord export)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](root, **kwargs)
