"""RandAugment (Cubuk, Zoph, Shlens & Le, "RandAugment: Practical automated data augmentation with
a reduced search space", NeurIPS workshops 2020) as torchvision.transforms.RandAugment defines it.

Each image gets `num_ops` operations in turn, each drawn uniformly from the 14 below and applied at
the one fixed `magnitude` (a bin of `num_magnitude_bins`), its sign flipped with probability 0.5
for the signed ones; torchvision's magnitude tables, op for op (`magnitude_value`).

The ops follow torchvision on PIL images (its reference training scripts' default), i.e. PIL's
own definitions, in TensorFlow graph ops on float32 [H, W, C] images with 0..255 values:

- ShearX / ShearY / TranslateX / TranslateY / Rotate: PIL's nearest-neighbour affine transform,
  torchvision's matrices (shears about the top-left corner with angle atan(magnitude), translations
  by int(magnitude) pixels, rotations about the centre); the area outside is `fill`. PIL samples the
  input at the output pixel's centre in 16.16 fixed point and floors; the same fixed-point matrix
  is handed to ImageProjectiveTransformV3 (which rounds) shifted by half a pixel, so it picks the
  same pixels: bit for bit on images up to 256 pixels a side (224 x 224 checked at every
  magnitude); beyond, float32 no longer holds every 1/65536 step and about one pixel in 10^5, one
  sitting exactly on a sampling edge, takes its neighbour's value.
- Brightness / Color / Contrast / Sharpness: PIL's ImageEnhance blend of the image with a
  degenerate image (black; its grey, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16; the grey's mean
  rounded; the 3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13 blur, rounded, the border left as is), with
  factor 1 + magnitude, clipped to 0..255. The degenerate images are rounded as PIL's (uint8) are;
  the blend itself is not, as PIL's final truncation to uint8 would only throw information away
  here: on integer input, floor(output) is PIL's output.
- Posterize (keep the top `bits` bits of floor(x)), Solarize (255 - x where x >= threshold),
  AutoContrast (per channel, min..max stretched to 0..255, as torchvision's tensor op; PIL's own
  truncates to integers, and its float64 lookup sets a few exact values one low: 25 in an image
  of 0..25 becomes 254), Equalize (PIL's per-channel histogram lookup, on floor(x); integer
  output; an image whose histogram has too few values is left as is, as PIL and torchvision do).

Every draw is stateless from the int [2] `seed`, so a pipeline's parallel maps reproduce.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness"})

# torchvision's magnitude ranges: linspace(low, high, bins), indexed by the magnitude.
_RANGES = {"ShearX": (0.0, 0.3), "ShearY": (0.0, 0.3), "Rotate": (0.0, 30.0), "Brightness": (0.0, 0.9),
           "Color": (0.0, 0.9), "Contrast": (0.0, 0.9), "Sharpness": (0.0, 0.9), "Solarize": (255.0, 0.0)}
_TRANSLATE = 150.0 / 331.0  # of the image's width (TranslateX) or height (TranslateY)
_FIX = 65536.0  # PIL's affine transform: 16.16 fixed point
# No Python control flow on tensors here: AutoGraph's conversion would only cost tracing time
# (seconds for the 14 branches).
_plain = tf.autograph.experimental.do_not_convert


def _check(magnitude, num_magnitude_bins):
    if int(num_magnitude_bins) != num_magnitude_bins or num_magnitude_bins < 2:
        raise ValueError(f"num_magnitude_bins must be an int >= 2, got {num_magnitude_bins!r}")
    if int(magnitude) != magnitude or not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(f"magnitude must be an int in [0, num_magnitude_bins - 1 = {num_magnitude_bins - 1}], "
                         f"got {magnitude!r}")
    return int(magnitude), int(num_magnitude_bins)


def _linspace_at(low, high, bins, index):
    """Element `index` of torch.linspace(low, high, bins) in float32, as torch computes it: from
    the low end for the first half, from the high end for the second."""
    f = np.float32
    low, high = f(low), f(high)
    step = f(f(high - low) / f(bins - 1))
    if index < bins // 2:
        return float(f(low + f(step * f(index))))
    return float(f(high - f(step * f(bins - 1 - index))))


def magnitude_value(op: str, magnitude: int = 9, num_magnitude_bins: int = 31, size=None):
    """torchvision's unsigned magnitude of `op` at bin `magnitude` (a Python number).

    Posterize: bits kept (8 - round(i / ((bins - 1) / 4)), half to even, as torch.round). TranslateX /
    TranslateY: pixels before int(), from `size` = the image's (height, width). Identity, AutoContrast
    and Equalize: 0.0 (unused).
    """
    magnitude, bins = _check(magnitude, num_magnitude_bins)
    if op in _RANGES:
        return _linspace_at(*_RANGES[op], bins, magnitude)
    if op == "Posterize":
        return 8 - int(np.round(np.float32(magnitude) / np.float32((bins - 1) / 4)))
    if op in ("TranslateX", "TranslateY"):
        if size is None:
            raise ValueError(f"{op}'s magnitude depends on the image size: pass size=(height, width)")
        length = size[1] if op == "TranslateX" else size[0]
        return _linspace_at(0.0, _TRANSLATE * length, bins, magnitude)
    if op in OPS:
        return 0.0
    raise ValueError(f"unknown RandAugment op {op!r}; one of {OPS}")


def _translate_pixels(length, magnitude, bins):
    """int(magnitude_value(Translate*)) for a tensor side length (torch's float32 linspace)."""
    high = tf.cast(tf.constant(_TRANSLATE, tf.float64) * tf.cast(length, tf.float64), tf.float32)
    step = high / float(bins - 1)
    if magnitude < bins // 2:
        value = step * float(magnitude)
    else:
        value = high - step * float(bins - 1 - magnitude)
    return tf.floor(value)


def _pick(negative, pos, neg):
    """pos, or neg where `negative` (a Python bool or a scalar bool tensor)."""
    if isinstance(negative, (bool, np.bool_)):
        return neg if negative else pos
    return tf.where(negative, neg, pos)


def _fill(fill, channels):
    fill = np.asarray(0.0 if fill is None else fill, np.float32).reshape(-1)
    if fill.size == 1:
        fill = np.repeat(fill, channels)
    if fill.shape != (channels,):
        raise ValueError(f"fill must be a number or one value per channel ({channels}), got {fill.tolist()}")
    return fill


# --- geometric ops: PIL's nearest-neighbour affine transform ---

def _pil_affine(image, coeffs, fill):
    """PIL's Image.transform(AFFINE, coeffs, NEAREST, fillcolor=fill) of float [H, W, C].

    coeffs (a0..a5, float64): the output pixel (x, y) reads input (a0 x' + a1 y' + a2, a3 x' + a4 y' + a5)
    at its centre x' = x + 0.5, y' = y + 0.5, floored. PIL runs this in 16.16 fixed point; with its
    coefficients rounded the same way, x_in * 65536 = A0 x + A1 y + A2 exactly, and
    ImageProjectiveTransformV3's round(x_in + 0.5) (halves away from zero) is floor(x_in) + 1: the
    column in the image padded by one column (and row) in front, which also sends floor = -1 to that
    pad and, like PIL, every point left of 0 outside.
    """
    a0, a1, a2, a3, a4, a5 = (tf.cast(c, tf.float64) for c in coeffs)

    def fix(v):
        return tf.floor(v * _FIX + 0.5)

    half = _FIX / 2
    t = tf.stack([fix(a0), fix(a1), fix(a2 + a0 * 0.5 + a1 * 0.5) + half,
                  fix(a3), fix(a4), fix(a5 + a3 * 0.5 + a4 * 0.5) + half]) / _FIX
    t = tf.concat([tf.cast(t, tf.float32), tf.zeros([2])], 0)
    fill = tf.constant(fill)
    padded = tf.pad(image - fill, [[1, 0], [1, 0], [0, 0]])  # 0 = fill after the shift back
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=padded[None], transforms=t[None], output_shape=tf.shape(image)[:2], fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT")[0]
    return out + fill


def _shear_coeffs(shear_x_deg, shear_y_deg):
    """torchvision's inverse affine matrix for a pure shear about (0, 0): the inverse of
    SHy(sy) SHx(sx) with SHx = [[1, -tan sx], [0, 1]], SHy = [[1, 0], [-tan sy, 1]], in its terms."""
    sx, sy = math.radians(shear_x_deg), math.radians(shear_y_deg)
    a = math.cos(-sy) / math.cos(sy)
    b = -math.cos(-sy) * math.tan(sx) / math.cos(sy) - math.sin(0.0)
    c = math.sin(-sy) / math.cos(sy)
    d = -math.sin(-sy) * math.tan(sx) / math.cos(sy) + math.cos(0.0)
    return [d, -b, 0.0, -c, a, 0.0]  # the centre (0, 0) adds nothing to the offsets


def _shear(image, value, negative, axis, fill):
    # torchvision: shear = degrees(atan(magnitude)) on the given axis.
    both = []
    for m in (value, -value):
        deg = math.degrees(math.atan(m))
        both.append(_shear_coeffs(deg, 0.0) if axis == "x" else _shear_coeffs(0.0, deg))
    coeffs = _pick(negative, *(tf.constant(c, tf.float64) for c in both))
    return _pil_affine(image, tf.unstack(coeffs), fill)


def _translate(image, magnitude, bins, negative, axis, fill):
    size = tf.shape(image)
    pixels = _translate_pixels(size[1] if axis == "x" else size[0], magnitude, bins)
    pixels = _pick(negative, pixels, -pixels)
    zero = tf.zeros([], tf.float32)
    tx, ty = (pixels, zero) if axis == "x" else (zero, pixels)
    # torchvision's matrix about the centre reduces exactly to a shift: (1, 0, -tx, 0, 1, -ty).
    return _pil_affine(image, (1.0, 0.0, -tx, 0.0, 1.0, -ty), fill)


def _rotation(angle):
    """PIL's Image.rotate matrix coefficients (before the centre terms) for `angle` degrees."""
    r = -math.radians(angle % 360.0)
    return [round(math.cos(r), 15), round(math.sin(r), 15), round(-math.sin(r), 15), round(math.cos(r), 15)]


def _rotate(image, value, negative, fill):
    m = _pick(negative, *(tf.constant(_rotation(a), tf.float64) for a in (value, -value)))
    m0, m1, m3, m4 = tf.unstack(m)
    size = tf.cast(tf.shape(image)[:2], tf.float64)
    cx, cy = size[1] / 2, size[0] / 2
    # PIL: (a, b, c) applied to -centre, then + centre, in this order (float64, as Python's).
    a2 = m0 * -cx + m1 * -cy + 0.0 + cx
    a5 = m3 * -cx + m4 * -cy + 0.0 + cy
    return _pil_affine(image, (m0, m1, a2, m3, m4, a5), fill)


# --- colour ops: PIL's ImageEnhance blends and ImageOps lookups ---

def _blend(degenerate, image, factor):
    """PIL's Image.blend(degenerate, image, factor) before its uint8 truncation."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grey(image):
    """PIL's convert("L"), rounded as PIL rounds: [H, W, 1]."""
    if image.shape[-1] == 1:
        return tf.floor(image)
    r, g, b = tf.unstack(image, axis=-1)
    return tf.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / _FIX)[..., None]


def _factor(value, negative):
    # torchvision: 1 + (-)magnitude in float64; PIL's blend takes it as a C float.
    return tf.convert_to_tensor(_pick(negative, np.float32(1.0 + value), np.float32(1.0 - value)))


def _color(image, factor):
    return image if image.shape[-1] == 1 else _blend(_grey(image), image, factor)


def _contrast(image, factor):
    mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
    return _blend(tf.cast(mean, tf.float32), image, factor)


def _sharpness(image, factor):
    channels = image.shape[-1]
    kernel = np.ones([3, 3, channels, 1], np.float32)
    kernel[1, 1] = 5.0
    total = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "SAME")[0]
    blurred = tf.floor(total / 13.0 + 0.5)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
    inside = (rows >= 1) & (rows < h - 1) & (cols >= 1) & (cols < w - 1)  # PIL keeps the border
    return _blend(tf.where(inside, blurred, image), image, factor)


def _posterize(image, bits):
    q = float(2 ** (8 - bits))  # PIL: x & ~(q - 1)
    return tf.floor(image / q) * q


def _solarize(image, threshold):
    return tf.where(image < threshold, image, 255.0 - image)


def _autocontrast(image):
    low = tf.reduce_min(image, [0, 1])
    span = tf.reduce_max(image, [0, 1]) - low
    stretched = tf.clip_by_value((image - low) * 255.0 / tf.where(span > 0, span, 1.0), 0.0, 255.0)
    return tf.where(span > 0, stretched, image)


def _equalize(image):
    channels = image.shape[-1]
    n = tf.shape(image)[0] * tf.shape(image)[1]
    bins = tf.cast(tf.clip_by_value(tf.floor(image), 0.0, 255.0), tf.int32) + tf.range(channels) * 256
    hist = tf.reshape(tf.math.bincount(tf.reshape(bins, [-1]), minlength=256 * channels,
                                       maxlength=256 * channels), [channels, 256])
    last = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1), axis=1)
    step = (n - tf.gather(hist, last, batch_dims=1)) // 255  # [C]; 0: too few values, left as is
    safe = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((safe // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // safe, 255)
    out = tf.cast(tf.gather(tf.reshape(lut, [-1]), bins), image.dtype)
    return tf.where(step > 0, out, image)


@_plain
def rand_augment_op(image, op: str, magnitude: int = 9, num_magnitude_bins: int = 31, negative=False,
                    fill=(0, 0, 0)):
    """One RandAugment op on float32 [H, W, C] (C = 3, or 1 for grey) 0..255 -> same shape and dtype.

    op: a name in OPS; magnitude: the bin (0..num_magnitude_bins - 1); negative: flip the sign of a
    signed op's magnitude (a Python bool or a scalar bool tensor); fill: the colour outside the
    image after a geometric op (a number or one per channel, 0..255).
    """
    magnitude, bins = _check(magnitude, num_magnitude_bins)
    image = tf.cast(image, tf.float32)
    channels = image.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"rand_augment works on [H, W, 3] (or grey [H, W, 1]) images, got shape {image.shape}")
    fill = _fill(fill, channels)
    if op == "Identity":
        return image
    if op in ("TranslateX", "TranslateY"):
        return _translate(image, magnitude, bins, negative, op[-1].lower(), fill)
    value = magnitude_value(op, magnitude, bins)
    if op in ("ShearX", "ShearY"):
        return _shear(image, value, negative, op[-1].lower(), fill)
    if op == "Rotate":
        return _rotate(image, value, negative, fill)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        factor = _factor(value, negative)
        if op == "Brightness":
            return _blend(0.0, image, factor)
        return {"Color": _color, "Contrast": _contrast, "Sharpness": _sharpness}[op](image, factor)
    if op == "Posterize":
        return _posterize(image, value)
    if op == "Solarize":
        return _solarize(image, value)
    if op == "AutoContrast":
        return _autocontrast(image)
    if op == "Equalize":
        return _equalize(image)
    raise ValueError(f"unknown RandAugment op {op!r}; one of {OPS}")


@_plain
def rand_augment_draws(seed, num_ops: int = 2):
    """The draws rand_augment makes from `seed`: int32 [num_ops, 2], (index into OPS, negative 0/1)
    per op, each uniform and independent (one draw from 0..2*len(OPS)-1, split)."""
    v = tf.random.stateless_uniform([int(num_ops)], seed, minval=0, maxval=2 * len(OPS), dtype=tf.int32)
    return tf.stack([v // 2, v % 2], axis=1)


@_plain
def rand_augment(image, seed, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
                 fill=(0, 0, 0)):
    """RandAugment of one float32 [H, W, 3] (or grey [H, W, 1]) image, 0..255, H and W possibly dynamic
    -> same shape, dtype and range.

    seed: a stateless int32/int64 [2] seed (a pipeline's per-element seed pair, or a split of it).
    num_ops ops in turn, each uniform over OPS, sign flipped with probability 0.5, at bin `magnitude`
    of `num_magnitude_bins` (torchvision's defaults: 2, 9, 31); fill: the colour uncovered by the
    geometric ops, a number or one per channel (None: black, torchvision's default). Only the drawn
    op of each step runs (tf.switch_case, in a tf.while_loop over the steps).
    """
    magnitude, bins = _check(magnitude, num_magnitude_bins)
    if int(num_ops) != num_ops or num_ops < 0:
        raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
    image = tf.cast(image, tf.float32)
    shape = image.shape
    draws = rand_augment_draws(seed, num_ops)

    def step(i, img):
        negative = draws[i, 1] > 0
        branches = [lambda op=op: rand_augment_op(img, op, magnitude, bins, negative, fill) for op in OPS]
        return i + 1, tf.ensure_shape(tf.switch_case(draws[i, 0], branches), shape)

    # One loop over the steps: the 14 branches are traced once, not once per step.
    _, image = tf.while_loop(lambda i, _: i < int(num_ops), step, (tf.constant(0), image))
    return tf.ensure_shape(image, shape)
