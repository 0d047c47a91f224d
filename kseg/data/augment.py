"""Augmentation of an image and its label together, seeded per element.

Scale, pad, crop and flip are one `tf.image.crop_and_resize` per tensor: the crop window
is mapped back into the source image, so the op samples only the output pixels (cost
independent of the random scale), a window reaching past the image reads the
extrapolation value (the pad: mean colour for images, 255 for labels) and a flip is the
same box with its x-edges swapped. Keras' RandomZoom/RandomCrop accept segmentation masks
but fill them with the image's fill value and resize small images instead of padding with
the ignore label, so they cannot do this job. Labels are sampled with nearest neighbour
only, so no value that was not in the label can appear.

Every random draw is stateless and derived from a per-element seed, so a seeded pipeline
is reproducible however many threads run it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from kseg.data.erasing import FILLS as ERASING_FILLS
from kseg.data.erasing import random_erasing
from kseg.data.randaugment import rand_augment
from kseg.tasks.classification import center_crop, resize_shorter

# Fallback pad colour (RGB, 0..255) when the preprocessing has no mean: ImageNet's mean.
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)


def _pair(v, name):
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be an int or (height, width) of positive ints, got {v}")
    return v


@dataclasses.dataclass(frozen=True)
class SegmentationAugment:
    """Paired image/label augmentation (defaults: the DeepLab VOC recipe plus colour jitter).

    scale: random rescale factor range, or None. crop: output (height, width) of the random
    crop (padded first when the scaled image is smaller), or None to keep the scaled size.
    flip: random horizontal flip with probability 0.5. brightness: max shift as a fraction
    of 255; contrast / saturation: factor drawn from [max(0, 1 - x), 1 + x]; hue: max shift as a
    fraction of the colour circle. 0 disables a jitter.
    """

    scale: tuple[float, float] | None = (0.5, 2.0)
    crop: tuple[int, int] | int | None = (321, 321)
    flip: bool = True
    brightness: float = 0.125
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "crop", _pair(self.crop, "crop"))
        if self.scale is not None:
            lo, hi = self.scale
            if not 0 < lo <= hi:
                raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        _check_jitter(self)


@dataclasses.dataclass(frozen=True)
class ClassificationAugment:
    """Image augmentation for classifiers, plus batch-level MixUp / CutMix / Cutout.

    area / aspect: Inception-style random resized crop (fraction of the image area, width/
    height ratio), or area=None for a plain resize. mixup / cutmix: Beta(alpha, alpha) mixing
    of image pairs within a batch (keras.layers.MixUp / CutMix). With both, each batch gets
    CutMix with probability switch_prob, else MixUp (timm's Mixup(switch_prob=0.5), the DeiT
    recipe, Touvron et al. 2021 table 9); mix_prob: probability that a batch is mixed at all.
    cutout: probability of erasing one random patch per image (keras.layers.RandomErasing,
    filled with the mean colour). With mixup or cutmix the labels come out one-hot, soft.
    randaugment: (num_ops, magnitude) of RandAugment (Cubuk et al. 2020) on each crop, as
    torchvision's RandAugment with randaugment_bins magnitude bins (31: torchvision's; 11: timm's
    "rand-m9", magnitude out of 10). erasing: probability of Random Erasing (Zhong et al. 2020)
    per image before any mixing, a rectangle of erasing_area x the image area and aspect
    log-uniform in erasing_aspect, filled per erasing_fill: "random" (uniform pixels, the paper),
    "mean" (the preprocessing's mean colour, torchvision's value=0) or "normal" (per-pixel
    N(0, 1) in the model's input space, timm's mode="pixel", as DeiT trains).
    scale: (low, high) pixels: instead of the random resized crop, the image is resized so
    its shorter side is S, drawn uniformly from [low, high], and a random window of the
    output size is cut from it (VGG's scale jittering, Simonyan & Zisserman 2015 sec. 3.1;
    (256, 256): AlexNet's random 224 crops of 256 images, Krizhevsky et al. 2012 sec. 4.1).
    Pass area=None with it.
    """

    area: tuple[float, float] | None = (0.08, 1.0)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.125
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    mixup: float | None = None
    cutmix: float | None = None
    cutout: float | None = None
    scale: tuple[int, int] | None = None
    switch_prob: float = 0.5
    mix_prob: float = 1.0
    randaugment: tuple[int, int] | None = None
    randaugment_bins: int = 31
    erasing: float | None = None
    erasing_area: tuple[float, float] = (0.02, 1 / 3)
    erasing_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    erasing_fill: str = "random"

    def __post_init__(self):
        if self.scale is not None:
            lo, hi = (int(v) for v in self.scale)
            if not 0 < lo <= hi:
                raise ValueError(f"scale must be (low, high) pixels with 0 < low <= high, got {self.scale}")
            if self.area is not None:
                raise ValueError("ClassificationAugment: scale (shorter-side jitter + random crop) replaces the "
                                 "random resized crop: pass area=None with it")
            object.__setattr__(self, "scale", (lo, hi))
        if self.randaugment is not None:
            ops, magnitude = (int(v) for v in self.randaugment)
            if ops < 1 or not 0 <= magnitude < self.randaugment_bins:
                raise ValueError(f"ClassificationAugment: randaugment is (num_ops >= 1, magnitude in [0, "
                                 f"{self.randaugment_bins})), got {self.randaugment}")
            object.__setattr__(self, "randaugment", (ops, magnitude))
        if self.erasing_fill not in ERASING_FILLS:
            raise ValueError(f"ClassificationAugment: erasing_fill must be one of {ERASING_FILLS}, "
                             f"got {self.erasing_fill!r}")
        for name in ("switch_prob", "mix_prob", "cutout", "erasing"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"ClassificationAugment: {name} is a probability in [0, 1], got {value}")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"ClassificationAugment: {name} is a Beta(alpha, alpha) alpha >= 0, got {value}")
        if self.area is not None and not 0 < self.area[0] <= self.area[1] <= 1:
            raise ValueError(f"area must satisfy 0 < low <= high <= 1, got {self.area}")
        _check_jitter(self)


def _check_jitter(aug):
    if not 0 <= aug.brightness < 1:
        raise ValueError(f"brightness must be in [0, 1), got {aug.brightness}")
    for name in ("contrast", "saturation"):  # >= 1 reaches a factor of 0 (gray), as torchvision allows
        if getattr(aug, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(aug, name)}")
    if not 0 <= aug.hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {aug.hue}")


def augment_pair(image, label, seed, aug: SegmentationAugment, pad_rgb, label_pad: int, affine=None):
    """(uint8 [H, W, C], uint8 [H, W, 1], int64 [2]) -> (float32 image, uint8 label).

    `affine` (see preprocessing_affine) is the model's preprocessing, folded into the jitter.
    """
    # All draws from one op: scale, y offset, x offset, flip, then 4 for the colour jitter.
    u = tf.random.stateless_uniform([8], seed)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    s = aug.scale[0] + u[0] * (aug.scale[1] - aug.scale[0]) if aug.scale else tf.constant(1.0)
    if aug.crop:
        ch, cw = (tf.constant(float(v)) for v in aug.crop)
        out_size = list(aug.crop)
    else:
        ch, cw = tf.maximum(tf.round(h * s), 1.0), tf.maximum(tf.round(w * s), 1.0)
        out_size = tf.cast(tf.stack([ch, cw]), tf.int32)
    # Integer offset of the window in the scaled (and, if smaller, bottom/right padded) image.
    oy = tf.floor(u[1] * (tf.maximum(h * s - ch, 0.0) + 1.0))
    ox = tf.floor(u[2] * (tf.maximum(w * s - cw, 0.0) + 1.0))
    # crop_and_resize samples y1*(H-1) + i*(y2-y1)*(H-1)/(ch-1): pick the box so that output
    # row i reads source row (oy + i) / s, i.e. one scaled-image pixel per output pixel.
    hs, ws = s * tf.maximum(h - 1, 1.0), s * tf.maximum(w - 1, 1.0)
    y1, y2 = oy / hs, (oy + ch - 1) / hs
    x1, x2 = ox / ws, (ox + cw - 1) / ws
    if aug.flip:
        flip = u[3] < 0.5
        x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)
    box = tf.stack([y1, x1, y2, x2])[None]
    pad = tf.constant(pad_rgb[: image.shape[-1]], tf.float32)
    # crop_and_resize extrapolates with one scalar. A sample outside the image gets exactly
    # that value and one inside only mixes pixels >= 0, so -1 marks the pad, swapped for
    # the pad colour after (cheaper than shifting the whole float source by the colour).
    out = tf.image.crop_and_resize(image[None], box, [0], out_size, extrapolation_value=-1.0)[0]
    out = tf.where(out < 0.0, pad, out)
    lab = tf.image.crop_and_resize(label[None], box, [0], out_size, method="nearest",
                                   extrapolation_value=float(label_pad))[0]
    return _jitter(out, u[4:] * 2.0 - 1.0, aug, affine), tf.cast(lab, tf.uint8)


# Rec. 601 luma and the YIQ basis: a hue shift is a rotation of the (I, Q) plane about the
# gray axis, which YIQ keeps fixed, so the whole jitter stays one linear colour transform.
_LUMA = np.array([0.299, 0.587, 0.114])
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _jitter_basis():
    # hue(t) @ sat(s) = sum_k w_k B_k with w = (1, s, cos t, s cos t, sin t, s sin t), where
    # hue(t) = Y^-1 (E0 + cos t E1 + sin t E2) Y and sat(s) = L + s (I - L), L = 1 luma^T.
    yiq_inv = np.linalg.inv(_YIQ)
    e0, e1, e2 = np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 3))
    e0[0, 0] = 1
    e1[1, 1] = e1[2, 2] = 1
    e2[2, 1], e2[1, 2] = 1, -1
    gray = np.ones((3, 1)) @ _LUMA[None]
    hue = [yiq_inv @ e @ _YIQ for e in (e0, e1, e2)]
    return np.stack([h @ m for h in hue for m in (gray, np.eye(3) - gray)]).astype(np.float32)


_JITTER_BASIS = _jitter_basis()


def color_jitter(image, seed, aug, affine=None):
    """Random brightness, contrast, saturation and hue on float 0..255 RGB, as one affine map.

    tf.image's saturation and hue ops each convert every pixel to HSV and back (about 5 ms
    per 321x321 crop here, 40% of the whole pipeline); composing the four jitters into one
    3x3 matrix plus offset, as NVIDIA DALI's ColorTwist does, costs one matmul. Hue is the
    YIQ rotation (DALI's too), not HSV's; brightness adds up to +-brightness*255, contrast
    and saturation blend with the mean gray / the pixel's gray, like torchvision. The result
    is clipped to 0..255, then `affine` (the model's preprocessing) applied, in the same matmul.
    """
    return _jitter(image, tf.random.stateless_uniform([4], seed, minval=-1.0, maxval=1.0), aug, affine)


def apply_affine(image, affine):
    """x -> x @ A.T + a over the channel axis (any leading shape); identity for None."""
    if affine is None:
        return image
    matrix, offset = affine
    flat = tf.reshape(image, [-1, matrix.shape[0]]) @ tf.constant(matrix.T) + tf.constant(offset)
    return tf.reshape(flat, tf.shape(image))


def _factor(u, x):
    """A factor uniform in [max(0, 1 - x), 1 + x] (torchvision's ColorJitter range) from u in [-1, 1]."""
    lo = max(0.0, 1.0 - x)
    return lo + (u + 1.0) * (0.5 * (1.0 + x - lo))


def _jitter(image, u, aug, affine=None):
    if not (aug.brightness or aug.contrast or aug.saturation or aug.hue):
        return apply_affine(image, affine)
    channels = image.shape[-1]
    b = u[0] * (aug.brightness * 255.0)
    c = _factor(u[1], aug.contrast)
    if channels == 3:
        s = _factor(u[2], aug.saturation)
        theta = u[3] * (aug.hue * 2.0 * np.pi)
        cos, sin = tf.cos(theta), tf.sin(theta)
        weights = tf.stack([1.0, s, cos, s * cos, sin, s * sin])
        matrix = c * tf.tensordot(weights, _JITTER_BASIS, 1)
        mean = tf.tensordot(tf.reduce_mean(image, [0, 1]), tf.constant(_LUMA, tf.float32), 1)
    else:  # saturation and hue need colour (LeNet's gray input skips them)
        matrix = c * tf.eye(channels)
        mean = tf.reduce_mean(image)
    # Saturation and hue map the gray axis to itself, so the constant part is a gray offset.
    offset = (c * b + (1.0 - c) * (mean + b)) * tf.ones([channels])
    lo, hi = np.zeros(channels, np.float32), np.full(channels, 255.0, np.float32)
    if affine is not None:
        # Preprocessing is a positive per-channel scale after a channel permutation, so
        # clipping its output to the image of [0, 255] equals clipping before it.
        a_matrix, a_offset = affine
        matrix = tf.constant(a_matrix) @ matrix
        offset = tf.linalg.matvec(tf.constant(a_matrix), offset) + a_offset
        ends = a_offset + 255.0 * a_matrix.sum(1)
        lo, hi = np.minimum(a_offset, ends), np.maximum(a_offset, ends)
    flat = tf.reshape(image, [-1, channels]) @ tf.transpose(matrix) + offset
    return tf.clip_by_value(tf.reshape(flat, tf.shape(image)), lo, hi)


def augment_image(image, seed, aug: ClassificationAugment, size, affine=None, interpolation="bilinear"):
    """Random resized crop + flip + jitter (+ preprocessing `affine`) of one uint8 image to float32 `size`.

    interpolation: "bilinear" samples the crop's window directly (tf.image.crop_and_resize); another
    tf.image.resize method (DeiT's "bicubic") cuts the window at whole pixels and resizes it with that
    method, antialiased when shrinking, as torchvision's RandomResizedCrop on PIL images."""
    box_seed, draw_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = tf.random.stateless_uniform([5], draw_seed)  # flip, then 4 for the colour jitter
    if aug.scale is not None:
        # Shorter side -> S (uniform in aug.scale), then a random window of `size` in it.
        v = tf.random.stateless_uniform([3], box_seed)
        h = tf.cast(tf.shape(image)[0], tf.float32)
        w = tf.cast(tf.shape(image)[1], tf.float32)
        lo, hi = aug.scale
        target = tf.floor(lo + v[0] * (hi - lo + 1))  # an integer side, like torchvision's Resize
        s = tf.maximum(target / tf.minimum(h, w), max(size) / tf.minimum(h, w))  # the window fits
        ch, cw = float(size[0]), float(size[1])
        oy = tf.floor(v[1] * (tf.maximum(h * s - ch, 0.0) + 1.0))
        ox = tf.floor(v[2] * (tf.maximum(w * s - cw, 0.0) + 1.0))
        # As augment_pair: output row i reads source row (oy + i) / s.
        hs, ws = s * tf.maximum(h - 1, 1.0), s * tf.maximum(w - 1, 1.0)
        y1, y2 = oy / hs, (oy + ch - 1) / hs
        x1, x2 = ox / ws, (ox + cw - 1) / ws
    elif aug.area is not None:
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([1, 0, 4]), box_seed, area_range=aug.area,
            aspect_ratio_range=aug.aspect, max_attempts=10, use_image_if_no_bounding_boxes=True)
        hw = tf.cast(tf.maximum(tf.shape(image)[:2] - 1, 1), tf.float32)
        y1, x1 = tf.cast(begin[0], tf.float32) / hw[0], tf.cast(begin[1], tf.float32) / hw[1]
        y2 = tf.cast(begin[0] + extent[0] - 1, tf.float32) / hw[0]
        x2 = tf.cast(begin[1] + extent[1] - 1, tf.float32) / hw[1]
    else:
        y1, x1, y2, x2 = (tf.constant(v) for v in (0.0, 0.0, 1.0, 1.0))
    if aug.flip:
        flip = u[0] < 0.5
        x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)
    if interpolation != "bilinear" and aug.scale is None and aug.area is not None:
        window = tf.cast(tf.slice(image, begin, extent), tf.float32)
        out = tf.image.resize(window, list(size), method=interpolation, antialias=True)
        out.set_shape([*size, image.shape[-1]])  # the slice's extent is dynamic: its channels too
        if aug.flip:
            out = tf.where(u[0] < 0.5, tf.reverse(out, [1]), out)
    else:
        box = tf.stack([y1, x1, y2, x2])[None]
        out = tf.image.crop_and_resize(image[None], box, [0], list(size))[0]
    if aug.randaugment is not None:  # on the crop, before the jitter, as torchvision's presets order them
        ops, magnitude = aug.randaugment
        out = rand_augment(out, tf.random.experimental.stateless_fold_in(seed, 1), num_ops=ops,
                           magnitude=magnitude, num_magnitude_bins=aug.randaugment_bins)
    return _jitter(out, u[1:] * 2.0 - 1.0, aug, affine)


def batch_mixers(aug: ClassificationAugment, seed: int | None, pad_rgb, std_rgb=None):
    """The callables that mix a batch ({'images', 'labels'} with one-hot labels), in order.

    pad_rgb / std_rgb: the raw 0..255 colour the preprocessing maps to 0 and the raw step it maps to 1.
    """
    import keras

    layers = []
    if aug.erasing:
        layers.append(_Erasing(aug, pad_rgb, std_rgb, None if seed is None else seed + 4))
    mixup = keras.layers.MixUp(alpha=aug.mixup, seed=seed) if aug.mixup else None
    cutmix = keras.layers.CutMix(factor=aug.cutmix, seed=None if seed is None else seed + 1) if aug.cutmix else None
    if mixup or cutmix:
        layers.append(_MixOrCut(mixup, cutmix, aug.switch_prob, aug.mix_prob, None if seed is None else seed + 3))
    if aug.cutout:
        layers.append(keras.layers.RandomErasing(factor=(aug.cutout, aug.cutout), fill_value=tuple(pad_rgb),
                                                 value_range=(0, 255),
                                                 seed=None if seed is None else seed + 2))
    return layers


class _Erasing:
    """Random Erasing of each image of a batch (kseg.data.erasing), with a per-batch stateless seed."""

    def __init__(self, aug, mean, std, seed):
        import keras

        self.aug, self.mean, self.std = aug, mean, std if std is not None else (1.0, 1.0, 1.0)
        self.seed = keras.random.SeedGenerator(seed)

    def __call__(self, data):
        import keras

        seed = keras.random.randint((2,), 0, 2 ** 31 - 1, seed=self.seed, dtype="int32")
        images = random_erasing(data["images"], seed, self.aug.erasing, area=self.aug.erasing_area,
                                aspect=self.aug.erasing_aspect, fill=self.aug.erasing_fill, mean=self.mean,
                                std=self.std)
        return {**data, "images": images}


class _MixOrCut:
    """One batch: unmixed with probability 1 - mix_prob; else CutMix with probability switch_prob
    when both are given (MixUp otherwise), or the one given."""

    mixes_labels = True

    def __init__(self, mixup, cutmix, switch_prob, mix_prob, seed):
        import keras

        self.mixup, self.cutmix = mixup, cutmix
        self.switch_prob, self.mix_prob = float(switch_prob), float(mix_prob)
        self.seed = keras.random.SeedGenerator(seed)

    def __call__(self, data):
        import keras

        u = keras.random.uniform((2,), seed=self.seed)
        if self.mixup and self.cutmix:
            mixed = lambda: tf.cond(u[0] < self.switch_prob, lambda: self.cutmix(data),  # noqa: E731
                                    lambda: self.mixup(data))
        else:
            mixed = lambda: (self.mixup or self.cutmix)(data)  # noqa: E731
        if self.mix_prob >= 1:
            return mixed()
        return tf.cond(u[1] < self.mix_prob, mixed, lambda: data)


# === evaluation transform (classification) ===

# tf.image.resize methods a recipe may name ([data] interpolation).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5")


def check_eval_transform(eval_transform, interpolation="bilinear"):
    """(resize_shorter, (crop_h, crop_w)) from (int, int or (h, w)), checked; None passes through."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if eval_transform is None:
        return None
    try:
        shorter, crop = eval_transform
        shorter, crop = int(shorter), _pair(crop, "eval_transform crop")
    except (TypeError, ValueError) as e:
        raise ValueError(f"eval_transform must be (resize_shorter, crop) with crop an int or (h, w), got "
                         f"{eval_transform!r} ({e})") from None
    if shorter < 1 or max(crop) > shorter:
        raise ValueError(f"eval_transform={eval_transform!r}: the crop must fit in the resized image "
                         f"(crop <= resize_shorter)")
    return shorter, crop


def eval_image(image, size, eval_transform=None, interpolation="bilinear"):
    """One image for evaluation -> float32 [*size, C]: with eval_transform=(shorter, crop), the
    shorter side resized to `shorter` then the centre `crop` (the published VGG / ResNet /
    AlexNet accuracies; torchvision's reference scripts: 256 -> 224); else a plain resize to `size`."""
    if eval_transform is not None:
        shorter, crop = eval_transform
        out = center_crop(resize_shorter(image, shorter, interpolation), crop)
        return tf.ensure_shape(out, [*crop, image.shape[-1]])
    return tf.image.resize(tf.cast(image, tf.float32), size, method=interpolation)


def resize_pair(image, label, size):
    """Resize to a fixed size: bilinear for the image, nearest neighbour for the label."""
    image = tf.image.resize(tf.cast(image, tf.float32), size)
    label = tf.image.resize(label, size, method="nearest")
    return image, label


def pad_pair(image, label, size, pad_rgb, label_pad, name):
    """Pad bottom/right to `size` (mean colour / ignore label) so full images can be batched."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    fits = (h <= size[0]) & (w <= size[1])
    msg = tf.strings.join([name, ": image is ", tf.strings.as_string(h), "x", tf.strings.as_string(w),
                           f", larger than pad_to={size[0]}x{size[1]}"])
    with tf.control_dependencies([tf.debugging.Assert(fits, [msg])]):
        # The sizes themselves wait for the check, so no pad can run with a negative amount.
        h, w = tf.identity(h), tf.identity(w)
        paddings = [[0, size[0] - h], [0, size[1] - w], [0, 0]]
        pad = tf.constant(pad_rgb, tf.float32)[: image.shape[-1]]
        image = tf.pad(tf.cast(image, tf.float32) - pad, paddings) + pad
        label = tf.pad(label, paddings, constant_values=label_pad)
    image = tf.ensure_shape(image, [size[0], size[1], None])
    return image, tf.ensure_shape(label, [size[0], size[1], 1])
