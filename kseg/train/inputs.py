"""The training data of a recipe: `datasets(recipe, data_dir)` -> (train, val) tf.data in the
layout its [data] section names, for model.fit (kseg.train.fit re-exports everything here).

Segmentation, edges and classification read with kseg.data's readers and augmentations;
skeletons (layout "skeleton", SK-LARGE's) with kseg.data.sk_large (radius maps, which the
skeleton task quantises into scale classes for each output: Skeleton.fit_targets).
Detection (`voc_detection`, `coco_detection`) reads boxes with kseg.data.voc_detection /
coco_detection, augments image and boxes together (DetectionAugment: SSD's photometric
distortion, zoom out, min-IoU crop and horizontal flip) and encodes each image's boxes into the
model's training targets against its prior boxes (kseg.detection.targets.ssd_targets):
(image, {"mbox_loc": (A, 5), "mbox_conf": (A,)}) as kseg.detection.losses.MultiBoxLoss takes them.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

import kseg.data as kd
from kseg.identity import identify, resolve_preprocessing
from kseg.registry import get_spec
from kseg.train.recipes import Recipe, soft_labels


class TrainingSetupError(ValueError):
    """Bad input found before the first training step (data, model or output directory)."""


def datasets(recipe: Recipe, data_dir, *, batch_size=None, seed=0):
    """(train, val) tf.data from the recipe's [data] section, in the layouts of the model's task.

    Segmentation: val is batch 1 at full size unless resized or padded. Classification: the
    training set with the recipe's augmentation (classification_augment), the validation set
    with its evaluation transform (eval_resize, then the centre eval_crop), both batched.
    Detection: images at the model's input size with encoded box targets, the training set
    augmented (detection_augment), both batched (see detection_datasets). Skeletons: see
    skeleton_datasets.
    """
    d = recipe.data
    layout = d.get("layout", "voc")
    task = get_spec(recipe.model).task_object
    if layout not in task.data_layouts:
        raise TrainingSetupError(f"{recipe.source}: {recipe.model} is a {task.name} model; its data layouts are "
                                 f"{', '.join(task.data_layouts)}, not {layout!r}")
    batch = batch_size or recipe.training["batch_size"]
    if layout in DETECTION_READERS:
        return _detection_datasets(recipe, data_dir, batch, seed)
    if layout in LAYOUT_DATASETS:
        return LAYOUT_DATASETS[layout](recipe, data_dir, batch, seed)
    if not task.dense:
        return _classification_datasets(recipe, data_dir, batch, seed)
    readers = {"voc": kd.voc, "sbd": kd.sbd, "synthetic": kd.synthetic, "pets": kd.pets, "folder": kd.folder,
               "edges": kd.edges}
    if layout not in readers:
        raise TrainingSetupError(f"{recipe.source}: kseg train reads segmentation layouts {sorted(readers)}; "
                                 f"{layout!r} datasets are built with kseg.data in Python for now")
    reader = readers[layout]
    prep = input_preprocessing(recipe)
    crop = d.get("crop") or None
    scale = d.get("scale") or None
    aug_kwargs = dict(crop=crop, scale=scale, flip=d.get("flip", False))
    if not d.get("color_jitter"):
        aug_kwargs.update(brightness=0, contrast=0, saturation=0, hue=0)
    else:  # the recipe's own ranges where it gives them, SegmentationAugment's defaults otherwise
        aug_kwargs.update({k: d[k] for k in ("brightness", "contrast", "saturation", "hue") if k in d})
    augment = kd.SegmentationAugment(**aug_kwargs)
    common = dict(preprocessing=prep, resize=d.get("resize") or None, pad_to=d.get("pad_to") or None)
    split = (lambda s: s) if layout != "folder" else None
    try:
        if layout == "edges":
            train_list, val_list = edge_lists(d, data_dir)
            train = reader(train_list, augment=augment, batch_size=batch, seed=seed, **common)
            val = reader(val_list, batch_size=1, **common)
        elif layout == "folder":
            train = reader(os.path.join(data_dir, d.get("train_split", "train")), augment=augment, batch_size=batch,
                           seed=seed, **common)
            val = reader(os.path.join(data_dir, d.get("val_split", "val")), batch_size=1, **common)
        else:
            train = reader(data_dir, split(d.get("train_split", "train")), augment=augment, batch_size=batch,
                           seed=seed, **common)
            val = reader(data_dir, split(d.get("val_split", "val")), batch_size=1, **common)
    except (FileNotFoundError, OSError) as e:
        raise TrainingSetupError(f"cannot read {layout} data at {data_dir}: {e}") from None
    except ValueError as e:
        if layout != "edges":
            raise
        raise TrainingSetupError(f"cannot read {layout} data at {data_dir}: {e}") from None
    return train, val


def edge_lists(data: dict, data_dir) -> tuple[str, str]:
    """(training list, validation list) of an edges recipe: lists of 'image edge_map' lines.

    data_dir is a list file (trained on; validated on [data] val_split beside it when that
    exists, else on the same list) or a folder holding [data] train_split and val_split.
    """
    data_dir = os.fspath(data_dir)
    train_split, val_split = data.get("train_split", "train_pair.lst"), data.get("val_split", "val_pair.lst")
    if os.path.isfile(data_dir):
        val = os.path.join(os.path.dirname(os.path.abspath(data_dir)), val_split)
        return data_dir, val if os.path.isfile(val) else data_dir
    train, val = os.path.join(data_dir, train_split), os.path.join(data_dir, val_split)
    if not os.path.isfile(train):
        raise FileNotFoundError(f"no {train}: --data takes a list file of 'image edge_map' lines or a folder "
                                f"with {train_split} ([data] train_split)")
    return train, val if os.path.isfile(val) else train


def classification_augment(data: dict):
    """The training augmentation of a classifier's [data] section, or None (resize only).

    crop + scale: shorter side jittered in scale (pixels), random crop (VGG, AlexNet); crop
    alone: Inception-style random resized crop to crop; no crop: the whole image resized.
    flip: random horizontal flips; color_jitter: ClassificationAugment's default jitter;
    mixup / cutmix / switch_prob / mix_prob / cutout / erasing*: the batch mixing of ClassificationAugment;
    randaugment / randaugment_bins: its RandAugment on each crop.
    """
    crop, scale, flip = data.get("crop") or None, data.get("scale") or None, data.get("flip", False)
    jitter = {} if data.get("color_jitter") else dict(brightness=0, contrast=0, saturation=0, hue=0)
    mixing = {k: data[k] for k in ("mixup", "cutmix", "cutout", "switch_prob", "mix_prob", "randaugment_bins",
                                   "erasing", "erasing_fill") if k in data}
    mixing.update({k: tuple(data[k]) for k in ("randaugment", "erasing_area", "erasing_aspect") if k in data})
    if crop and scale:
        return kd.ClassificationAugment(area=None, scale=tuple(scale), flip=flip, **jitter, **mixing)
    if crop:
        return kd.ClassificationAugment(flip=flip, **jitter, **mixing)
    if flip or not jitter or mixing:
        return kd.ClassificationAugment(area=None, flip=flip, **jitter, **mixing)
    return None


def eval_transform(data: dict):
    """(resize_shorter, crop) of a classifier's [data] eval_resize / eval_crop, or None."""
    if not data.get("eval_resize"):
        return None
    return data["eval_resize"], data["eval_crop"]


def _classification_datasets(recipe, data_dir, batch, seed):
    d = recipe.data
    layout = d["layout"]
    ident = identify(recipe.model, dict(recipe.model_options))
    h, w, channels = ident.input_shape
    model_size = (h, w) if h and w else None
    train_size = d.get("crop") or d.get("resize") or model_size
    val_size = d.get("resize") or d.get("crop") or model_size
    if train_size is None:
        raise TrainingSetupError(f"{recipe.source}: {recipe.model} takes any input size: give [data] crop or "
                                 "resize")
    transform = eval_transform(d)
    # Soft targets (mixing, label smoothing): one-hot labels from both sets, for one loss.
    labels = "categorical" if soft_labels(recipe) else "int"
    common = dict(preprocessing=input_preprocessing(recipe), channels=channels, batch_size=batch, label_mode=labels)
    interpolation = d.get("interpolation", "bilinear")
    train_split, val_split = d.get("train_split", "train"), d.get("val_split", "val")
    try:
        if layout == "classification_list":
            train = kd.classification_list(data_dir, train_split, image_size=train_size,
                                           augment=classification_augment(d), shuffle=True, seed=seed,
                                           interpolation=interpolation, **common)
            val = kd.classification_list(data_dir, val_split, class_names=train.class_names,
                                         image_size=None if transform else val_size, eval_transform=transform,
                                         interpolation=interpolation, **common)
        else:
            folders = [os.path.join(data_dir, s) for s in (train_split, val_split)]
            missing = [f for f in folders if not os.path.isdir(f)]
            if missing:
                raise FileNotFoundError(f"no {' or '.join(missing)}: expected {data_dir}/{train_split}/CLASS/*.jpg "
                                        f"and {data_dir}/{val_split}/CLASS/*.jpg ([data] train_split, val_split)")
            train = kd.classification_folder(folders[0], image_size=train_size, augment=classification_augment(d),
                                             shuffle=True, seed=seed, interpolation=interpolation, **common)
            val = kd.classification_folder(folders[1], class_names=train.class_names,
                                           image_size=None if transform else val_size, eval_transform=transform,
                                           interpolation=interpolation, **common)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise TrainingSetupError(f"cannot read {layout} data at {data_dir}: {e}") from None
    outputs, classes = ident.num_classes, train.num_classes
    if labels == "categorical" and outputs and classes and outputs > classes:
        # One-hot rows as wide as the model's output (fewer data classes than outputs: the extra never occur).
        train, val = (_widen_one_hot(ds, outputs) for ds in (train, val))
    return train, val


def _widen_one_hot(ds, depth):
    out = ds.map(lambda x, y: (x, tf.pad(y, [[0, 0], [0, depth - tf.shape(y)[-1]]])))
    for name in ("class_names", "num_classes", "skipped"):
        setattr(out, name, getattr(ds, name, None))
    return out


# [data] keys the skeleton reader has no counterpart for: resizing or cropping would change the skeletons'
# scales, and its only augmentation is the left-right flip (exact for a skeleton and its scales).
SKELETON_UNSUPPORTED = ("crop", "scale", "resize", "pad_to", "color_jitter")


def skeleton_datasets(recipe: Recipe, data_dir, batch, seed):
    """(train, val) of a dataset in the SK-LARGE layout (kseg.data.sk_large): (images, radius maps
    [B, H, W, 1]), the training split shuffled and, with [data] flip, flipped left-right at random;
    the validation split as it is, batch 1. A batch of several images needs images of one size
    (the synthetic set's; SK-LARGE's differ): checked here, from the files' headers."""
    from kseg.data.layouts import list_skeleton

    d = recipe.data
    asked = [k for k in SKELETON_UNSUPPORTED if d.get(k)]
    if asked:
        raise TrainingSetupError(f"{recipe.source}: [data] {', '.join(asked)}: the skeleton reader keeps every image "
                                 "at its own size (its only augmentation is [data] flip)")
    prep = input_preprocessing(recipe)
    train_split, val_split = d.get("train_split", "train"), d.get("val_split", "val")
    try:
        train = kd.sk_large(data_dir, train_split, preprocessing=prep, batch_size=batch, shuffle=True, seed=seed,
                            flip=d.get("flip", False))
        val = kd.sk_large(data_dir, val_split, preprocessing=prep, batch_size=1)
        sizes = {_image_size(p) for p in list_skeleton(data_dir, train_split).images} if batch > 1 else ()
    except (FileNotFoundError, OSError, ValueError) as e:
        raise TrainingSetupError(f"cannot read skeleton data at {data_dir}: {e}") from None
    if len(sizes) > 1:
        raise TrainingSetupError(f"{data_dir} ({train_split}): batch_size {batch} needs images of one size, but they "
                                 f"come in {len(sizes)} sizes; train with batch_size 1 (--set training.batch_size=1)")
    return train, val


def _image_size(path):
    from PIL import Image

    with Image.open(path) as im:  # the header only
        return im.size


# Layouts with their own (train, val) builder: (recipe, data_dir, batch, seed) -> (train, val).
LAYOUT_DATASETS = {"skeleton": skeleton_datasets}


def input_preprocessing(recipe: Recipe):
    """What the recipe's images go through: its [data] preprocessing, else its model's (weight layout's)."""
    if recipe.data.get("preprocessing"):
        return resolve_preprocessing(recipe.data["preprocessing"])
    return identify(recipe.model, dict(recipe.model_options)).preprocessing




# === detection ===


@dataclasses.dataclass(frozen=True)
class DetectionAugment:
    """SSD's training augmentation of an image and its boxes (Liu et al., ECCV 2016, section 2.2
    "Data augmentation"; Caffe SSD's ssd_pascal.py train_transform_param and batch_sampler, in
    torchvision references/detection presets.py's order: distort, zoom out, crop, flip).

    photometric: with probability 0.5 each, brightness +-32, contrast [0.5, 1.5], saturation
      [0.5, 1.5] and hue +-18 degrees, contrast first or last (Caffe's distort_param values;
      contrast blends with the mean and hue turns HSV's circle, as torchvision's
      RandomPhotometricDistort, where Caffe scales the pixels and shifts 8-bit OpenCV hue).
    zoom_out: the largest expansion ratio (Caffe's expand_param max_expand_ratio 4; 1: none),
      applied with probability 0.5: the image at a random place on a canvas of the mean colour.
    iou_crop: Caffe's batch samplers: one of the whole image and, of the crops (scale [0.3, 1],
      aspect [0.5, 2]) meeting a minimum IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9 with some box or none,
      the first of 50 trials each; a crop keeps the boxes whose centre it contains (clipped to
      it), and must keep one (torchvision's RandomIoUCrop).
    flip: horizontal flip with probability 0.5 (a box x1, x2 becomes W - x2, W - x1).
    The window is then resized to the network input (bilinear, half-pixel centres). Every draw
    is stateless from a per-element seed: reproducible whatever the threads.
    """

    photometric: bool = False
    zoom_out: float = 1.0
    iou_crop: bool = False
    flip: bool = True

    def __post_init__(self):
        if not self.zoom_out >= 1.0:
            raise ValueError(f"zoom_out is the largest expansion ratio, >= 1 (1: none), got {self.zoom_out}")

    @property
    def geometric(self) -> bool:
        """Whether the window differs from the whole image (zoom out or crop): then the reader keeps
        the files' sizes and the augmentation resizes."""
        return self.zoom_out > 1.0 or self.iou_crop


# Caffe SSD's batch samplers (ssd_pascal.py): min IoU of the crop with some box; 0: no constraint.
IOU_CROP_MIN_IOU = (0.1, 0.3, 0.5, 0.7, 0.9, 0.0)
IOU_CROP_TRIALS = 50
IOU_CROP_SCALE = (0.3, 1.0)
IOU_CROP_ASPECT = (0.5, 2.0)
ZOOM_OUT_PROB = 0.5


def detection_augment(data: dict) -> DetectionAugment | None:
    """The DetectionAugment of a detection recipe's [data] section (flip, photometric_distort,
    zoom_out, iou_crop), or None when it asks for none."""
    aug = DetectionAugment(photometric=bool(data.get("photometric_distort", False)),
                           zoom_out=float(data.get("zoom_out") or 1.0), iou_crop=bool(data.get("iou_crop", False)),
                           flip=bool(data.get("flip", False)))
    return aug if aug.photometric or aug.geometric or aug.flip else None


def photometric_distort(image, seed):
    """Caffe SSD's RandomBrightness / Contrast / Saturation / Hue on float RGB 0..255 (see DetectionAugment)."""
    u = tf.random.stateless_uniform([9], seed)
    on = u[:5] < 0.5  # brightness, contrast, saturation, hue; then contrast last (u[4] < 0.5) or first
    image = tf.where(on[0], image + (u[5] * 64.0 - 32.0), image)
    image = tf.clip_by_value(image, 0.0, 255.0)

    def contrast(x):
        return tf.where(on[1], tf.clip_by_value(tf.image.adjust_contrast(x, 0.5 + u[6]), 0.0, 255.0), x)

    contrast_first = ~on[4]
    image = tf.where(contrast_first, contrast(image), image)
    x = image / 255.0
    x = tf.where(on[2], tf.image.adjust_saturation(x, 0.5 + u[7]), x)
    x = tf.where(on[3], tf.image.adjust_hue(x, (u[8] * 2.0 - 1.0) * 0.05), x)  # 18 / 360 of the circle
    image = tf.clip_by_value(x * 255.0, 0.0, 255.0)
    return tf.where(contrast_first, image, contrast(image))


def _iou_with(crops, boxes):
    """IoU [..., G] of crops [..., 4] with boxes [G, 4] (xyxy)."""
    crops = tf.expand_dims(crops, -2)  # [..., 1, 4] against [G, 4]
    lt = tf.maximum(crops[..., :2], boxes[:, :2])
    rb = tf.minimum(crops[..., 2:], boxes[:, 2:])
    wh = tf.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return tf.math.divide_no_nan(inter, area(crops) + area(boxes) - inter)


def _centres_inside(crops, boxes):
    """[..., G]: whether each box's centre lies strictly inside each crop."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return ((cx > crops[..., 0:1]) & (cx < crops[..., 2:3]) & (cy > crops[..., 1:2]) & (cy < crops[..., 3:4]))


def iou_crop_window(window, boxes, real, seed):
    """Caffe SSD's batch-sampler crop of `window` (x1, y1, x2, y2) given boxes [G, 4] (real [G]
    marks the boxes, not padding): the chosen window and which boxes it keeps (centre inside)."""
    samplers, trials = len(IOU_CROP_MIN_IOU), IOU_CROP_TRIALS
    u = tf.random.stateless_uniform([samplers, trials, 4], seed)
    pick = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1))
    lo, hi = IOU_CROP_SCALE
    scale = lo + u[..., 0] * (hi - lo)
    # Caffe's SampleBBox: aspect in [max(0.5, scale^2), min(2, 1 / scale^2)], sides relative to the window.
    a_lo = tf.maximum(IOU_CROP_ASPECT[0], scale ** 2)
    a_hi = tf.minimum(IOU_CROP_ASPECT[1], 1.0 / scale ** 2)
    aspect = a_lo + u[..., 1] * (a_hi - a_lo)
    w = tf.minimum(scale * tf.sqrt(aspect), 1.0)
    h = tf.minimum(scale / tf.sqrt(aspect), 1.0)
    x = u[..., 2] * (1.0 - w)
    y = u[..., 3] * (1.0 - h)
    ww, wh = window[2] - window[0], window[3] - window[1]
    crops = tf.stack([window[0] + x * ww, window[1] + y * wh, window[0] + (x + w) * ww,
                      window[1] + (y + h) * wh], axis=-1)  # [samplers, trials, 4]
    iou = _iou_with(crops, boxes)
    min_iou = tf.constant(IOU_CROP_MIN_IOU, tf.float32)[:, None, None]
    meets = tf.reduce_any(real & (iou >= min_iou), axis=-1)
    keeps = tf.reduce_any(real & _centres_inside(crops, boxes), axis=-1)
    ok = meets & keeps  # [samplers, trials]
    found = tf.reduce_any(ok, axis=1)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
    chosen = tf.gather_nd(crops, tf.stack([tf.range(samplers), first], axis=1))  # [samplers, 4]
    # Uniformly one of: the whole window, or each sampler's first crop that met its constraints.
    count = 1 + tf.reduce_sum(tf.cast(found, tf.int32))
    index = tf.minimum(tf.cast(pick * tf.cast(count, tf.float32), tf.int32), count - 1)
    position = tf.cumsum(tf.cast(found, tf.int32))  # 1-based rank among the found samplers
    sampler = tf.argmax(tf.cast(found & tf.equal(position, index), tf.int32), output_type=tf.int32)
    crop = tf.where(index > 0, tf.gather(chosen, sampler), tf.cast(window, tf.float32))
    keep = tf.where(index > 0, _centres_inside(crop, boxes), tf.ones_like(real))
    return crop, keep


def window_to_size(image, window, size, flip=False):
    """Resample window (x1, y1, x2, y2), continuous pixel corners of `image` (may reach outside:
    those pixels read -1), to `size` (h, w), bilinear with half-pixel centres as tf.image.resize;
    `flip` mirrors it. The image's edge pixels extend one pixel outward, so a window of the whole
    image is tf.image.resize's (which clamps at the edges)."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    out_h, out_w = (float(v) for v in size)
    x1, y1, x2, y2 = tf.unstack(tf.cast(window, tf.float32))
    # Output column j reads source column x1 + (j + 0.5) (x2 - x1) / out_w - 0.5, + 1 for the pad;
    # crop_and_resize reads bx1 (W' - 1) + j (bx2 - bx1) (W' - 1) / (out_w - 1) of the W' = W + 2 padded ones.
    sw = tf.cast(shape[1] + 1, tf.float32)
    sh = tf.cast(shape[0] + 1, tf.float32)
    dx, dy = 0.5 * (x2 - x1) / out_w, 0.5 * (y2 - y1) / out_h
    bx1, bx2 = (x1 + dx + 0.5) / sw, (x2 - dx + 0.5) / sw
    by1, by2 = (y1 + dy + 0.5) / sh, (y2 - dy + 0.5) / sh
    bx1, bx2 = tf.where(flip, bx2, bx1), tf.where(flip, bx1, bx2)
    box = tf.stack([by1, bx1, by2, bx2])[None]
    return tf.image.crop_and_resize(padded[None], box, [0], [int(out_h), int(out_w)], extrapolation_value=-1.0)[0]


def augment_detection(image, boxes, classes, seed, aug: DetectionAugment, size, fill_rgb):
    """One training image: float RGB 0..255 [H, W, 3], boxes [G, 4] xyxy pixels, classes [G] (-1
    padding) -> the augmented image at `size` (h, w), its boxes in its pixels and classes (boxes
    a crop leaves out become padding). `fill_rgb`: the zoom-out canvas colour (the mean)."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4))
    image = tf.cast(image, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    classes = tf.cast(classes, tf.int32)
    real = classes >= 0
    if aug.photometric:
        image = photometric_distort(image, seeds[0])
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    window = tf.stack([0.0, 0.0, w, h])
    if aug.zoom_out > 1.0:
        u = tf.random.stateless_uniform([4], seeds[1])
        ratio = tf.where(u[0] < ZOOM_OUT_PROB, 1.0 + u[1] * (aug.zoom_out - 1.0), 1.0)
        left, top = tf.floor(u[2] * (w * ratio - w)), tf.floor(u[3] * (h * ratio - h))
        window = tf.stack([-left, -top, w * ratio - left, h * ratio - top])
    if aug.iou_crop:
        window, keep = iou_crop_window(window, boxes, real, seeds[2])
        real = real & keep
    flip = tf.random.stateless_uniform([], seeds[3]) < 0.5 if aug.flip else tf.constant(False)
    out_h, out_w = (float(v) for v in size)
    sx, sy = out_w / (window[2] - window[0]), out_h / (window[3] - window[1])
    scaled = (boxes - tf.stack([window[0], window[1], window[0], window[1]])) * tf.stack([sx, sy, sx, sy])
    scaled = tf.clip_by_value(scaled, 0.0, tf.constant([out_w, out_h, out_w, out_h]))
    scaled = tf.where(flip, tf.stack([out_w - scaled[:, 2], scaled[:, 1], out_w - scaled[:, 0], scaled[:, 3]], 1),
                      scaled)
    boxes = tf.where(real[:, None], scaled, -1.0)
    classes = tf.where(real, classes, -1)
    if aug.geometric:
        out = window_to_size(image, window, size, flip)
        image = tf.where(out < 0.0, tf.constant(fill_rgb, tf.float32), out)  # outside the image: the canvas
    else:  # the reader resized already: only the flip
        image = tf.where(flip, tf.reverse(image, [1]), image)
    return tf.ensure_shape(image, [*size, 3]), boxes, classes


DETECTION_READERS = ("voc_detection", "coco_detection")


def model_anchors(recipe: Recipe):
    """(input (h, w), prior boxes [A, 4] xyxy pixels) of the recipe's model: its registry spec's
    decoder's (spec.postprocess(options).anchors), the boxes its outputs are relative to."""
    ident = identify(recipe.model, dict(recipe.model_options))
    make = ident.spec.postprocess
    if make is None:
        raise TrainingSetupError(f"{recipe.source}: {recipe.model} has no box decoder in its registry spec, so "
                                 "kseg train cannot encode box targets for it")
    h, w = ident.input_shape[:2]
    if not (h and w):
        raise TrainingSetupError(f"{recipe.source}: {recipe.model} needs a fixed input size to train on boxes "
                                 f"(model_options input_shape), got {ident.input_shape}")
    return (int(h), int(w)), np.asarray(make(ident.options).anchors, np.float32)


def _detection_reader(layout, data_dir, split, **options):
    if layout == "voc_detection":
        return kd.voc_detection(data_dir, split, **options)
    # COCO: data_dir/<split>/ images and data_dir/annotations/instances_<split>.json (the 2017 release's layout).
    return kd.coco_detection(os.path.join(data_dir, split),
                             os.path.join(data_dir, "annotations", f"instances_{split}.json"), **options)


def _detection_datasets(recipe, data_dir, batch, seed):
    """(train, val): (images [B, h, w, 3] preprocessed, {"mbox_loc": [B, A, 5], "mbox_conf": [B, A]}),
    the training set shuffled and augmented (detection_augment), the validation set as read."""
    from kseg.data.augment import apply_affine
    from kseg.data.pipeline import pad_colour, preprocessing_affine
    from kseg.detection.losses import multibox_y_true
    from kseg.detection.targets import ssd_targets

    d = recipe.data
    layout = d["layout"]
    if get_spec(recipe.model).trainer is not None:  # two-stage: targets are the boxes themselves
        return _box_datasets(recipe, data_dir, batch, seed)
    size, anchors = model_anchors(recipe)
    prep = input_preprocessing(recipe)
    affine = preprocessing_affine(prep)
    aug = detection_augment(d)
    train_split, val_split = d.get("train_split", "train"), d.get("val_split", "val")
    common = dict(max_boxes=d.get("max_boxes", 100))
    if layout == "voc_detection":
        common["use_difficult"] = d.get("use_difficult", True)
    try:
        train = _detection_reader(layout, data_dir, train_split, size=None if aug and aug.geometric else size,
                                  shuffle=True, seed=seed, preprocessing=None if aug else prep, **common)
        val = _detection_reader(layout, data_dir, val_split, size=size, preprocessing=prep, **common)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise TrainingSetupError(f"cannot read {layout} data at {data_dir}: {e}") from None
    anchors = tf.constant(anchors)
    par = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def encode(image, boxes, classes):
        return image, multibox_y_true(*ssd_targets(boxes, classes, anchors))

    def finish(ds, source):
        out = ds.batch(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
        for name in ("class_names", "num_classes", "skipped"):
            setattr(out, name, getattr(source, name, None))
        return out

    fit_val = val.map(lambda x, t: encode(x, t["boxes"], t["classes"]), **par)
    if aug is None:
        fit_train = train.map(lambda x, t: encode(x, t["boxes"], t["classes"]), **par)
    else:
        fill = pad_colour(prep)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

        def augmented(element, seed_pair):
            x, t = element
            image, boxes, classes = augment_detection(x, t["boxes"], t["classes"], seed_pair, aug, size, fill)
            return encode(apply_affine(image, affine), boxes, classes)

        fit_train = tf.data.Dataset.zip((train, seeds)).map(augmented, **par)
    return finish(fit_train, train), finish(fit_val, val)


def _box_datasets(recipe, data_dir, batch, seed):
    """(train, val) of a model trained by its registry spec's trainer (kseg.train.rcnn_inputs)."""
    from kseg.train.rcnn_inputs import box_datasets

    d = recipe.data
    h, w = identify(recipe.model, dict(recipe.model_options)).input_shape[:2]
    fixed = (int(h), int(w)) if h and w else None
    if fixed is None and "min_size" not in d:
        raise TrainingSetupError(f"{recipe.source}: {recipe.model} takes any input size: give [data] min_size "
                                 "(and max_size) for the images' scale, or model_options input_shape")
    common = dict(max_boxes=d.get("max_boxes", 100), preprocessing=input_preprocessing(recipe))
    if d["layout"] == "voc_detection":
        common["use_difficult"] = d.get("use_difficult", False)
    train_split, val_split = d.get("train_split", "train"), d.get("val_split", "val")
    try:
        extra = {split: _proposals(recipe, data_dir, split) for split in (train_split, val_split)}
        train = _detection_reader(d["layout"], data_dir, train_split, shuffle=True, seed=seed,
                                  extra_boxes=extra[train_split], **common)
        val = _detection_reader(d["layout"], data_dir, val_split, extra_boxes=extra[val_split], **common)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise TrainingSetupError(f"cannot read {d['layout']} data at {data_dir}: {e}") from None
    fit_train, fit_val = box_datasets(train, val, batch=batch, seed=seed, fixed_size=fixed,
                                      min_size=d.get("min_size"), max_size=d.get("max_size"),
                                      flip=d.get("flip", False))
    for out, source in ((fit_train, train), (fit_val, val)):
        for name in ("class_names", "num_classes", "skipped"):
            setattr(out, name, getattr(source, name, None))
    return fit_train, fit_val


def _proposals(recipe, data_dir, split):
    """A model with a proposals input (Fast R-CNN): {"proposals": {image_id: (R, 4) padded}} from the file
    [data] proposals names for `split` ("{split}" in its name is replaced; relative to the data directory),
    R = the model's num_proposals, each image's first R boxes; None for other models."""
    from kseg.data.detection import voc_detection_ids
    from kseg.detection.precomputed import load_proposals, pad_proposals

    options = identify(recipe.model, dict(recipe.model_options)).options
    if "num_proposals" not in options:
        return None
    if "proposals" not in recipe.data:
        raise TrainingSetupError(f"{recipe.source}: {recipe.model} detects on given proposals: name their file in "
                                 "[data] proposals (e.g. \"selective_search_{split}.mat\"; .npz, .json or .mat)")
    path = os.path.join(data_dir, recipe.data["proposals"].replace("{split}", split))
    boxes = load_proposals(path, image_ids=voc_detection_ids(data_dir, split)
                           if path.endswith(".mat") else None)
    return {"proposals": {k: pad_proposals(v, options["num_proposals"], truncate=True)[0] for k, v in boxes.items()}}
