"""Random Erasing (Zhong, Zheng, Kang, Li & Yang, "Random Erasing Data Augmentation", AAAI 2020,
Algorithm 1) on a batch, vectorised, with a stateless seed.

Each image is erased with probability `probability`: up to `max_attempts` rectangles are drawn,
area uniform in area * H * W and aspect (height / width) log-uniform in `aspect`, sides rounded
(half to even, as Python's round); the first that fits (height < H and width < W) is placed
uniformly over the positions where it fits, as torchvision's RandomErasing does (the paper's
Algorithm 1 draws the corner with the size and retries when the rectangle runs past the image
edge, which favours smaller rectangles). None fits: the image is left as is.

fill: "random" = each pixel and channel uniform in [0, 255] (the paper); "mean" = the constant
colour `mean` (torchvision's value=0 on normalised input, i.e. the mean colour); "normal" = each
pixel and channel mean + std * N(0, 1) (timm's mode="pixel" on normalised input), mean and std in
raw 0..255 units, not clipped (as timm's draws in the normalised space are not).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

FILLS = ("random", "mean", "normal")


def _channel_values(value, channels, name):
    value = np.asarray(value, np.float32).reshape(-1)
    if value.size == 1 and channels is not None:
        value = np.repeat(value, channels)
    if channels is not None and value.shape != (channels,):
        raise ValueError(f"random_erasing: {name} must be a number or one value per channel ({channels}), "
                         f"got {value.tolist()}")
    return value


@tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: nothing to convert
def random_erasing(images, seed, probability, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), fill="random",
                   mean=None, std=None, max_attempts: int = 10):
    """Random Erasing of a batch [B, H, W, C] (B, H, W may be dynamic) -> same shape and dtype.

    seed: a stateless int32/int64 [2] seed; the batch's draws all come from it (image b's from row
    b of each draw, so an image's rectangle does not depend on the batch size). probability: of
    erasing each image (a number or a scalar tensor). area: (low, high) fraction of the image;
    aspect: (low, high) height / width. fill: "random", "mean" (needs mean) or "normal" (needs mean
    and std), see the module docstring.
    """
    if fill not in FILLS:
        raise ValueError(f"random_erasing: fill must be one of {FILLS}, got {fill!r}")
    if isinstance(probability, (int, float)) and not 0 <= probability <= 1:
        raise ValueError(f"random_erasing: probability must be in [0, 1], got {probability}")
    lo, hi = (float(v) for v in area)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"random_erasing: area must be (low, high) with 0 < low <= high <= 1, got {area}")
    r_lo, r_hi = (float(v) for v in aspect)
    if not 0 < r_lo <= r_hi:
        raise ValueError(f"random_erasing: aspect must be (low, high) with 0 < low <= high, got {aspect}")
    if int(max_attempts) != max_attempts or max_attempts < 1:
        raise ValueError(f"random_erasing: max_attempts must be an int >= 1, got {max_attempts!r}")
    k = int(max_attempts)
    images = tf.convert_to_tensor(images)
    channels = images.shape[-1]
    if fill in ("mean", "normal") and mean is None:
        raise ValueError(f"random_erasing: fill={fill!r} needs mean (the colour, raw 0..255 units)")
    if fill == "normal" and std is None:
        raise ValueError("random_erasing: fill='normal' needs std (raw 0..255 units)")

    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    param_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    # Per image: erase?, k areas, k log-aspects, then the corner of the chosen rectangle.
    u = tf.random.stateless_uniform(tf.stack([b, 2 * k + 3]), param_seed)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    target = hf * wf * (lo + u[:, 1:k + 1] * (hi - lo))
    ratio = tf.exp(math.log(r_lo) + u[:, k + 1:2 * k + 1] * (math.log(r_hi) - math.log(r_lo)))
    eh = tf.round(tf.sqrt(target * ratio))
    ew = tf.round(tf.sqrt(target / ratio))
    fits = (eh < hf) & (ew < wf)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)  # the first that fits
    eh = tf.gather(eh, first, batch_dims=1)
    ew = tf.gather(ew, first, batch_dims=1)
    top = tf.minimum(tf.floor(u[:, 2 * k + 1] * (hf - eh + 1.0)), hf - eh)
    left = tf.minimum(tf.floor(u[:, 2 * k + 2] * (wf - ew + 1.0)), wf - ew)
    erase = (u[:, 0] < probability) & tf.reduce_any(fits, axis=1)

    rows = tf.range(h, dtype=tf.float32)[None, :, None]
    cols = tf.range(w, dtype=tf.float32)[None, None, :]

    def per_image(v):
        return v[:, None, None]

    mask = (per_image(erase) & (rows >= per_image(top)) & (rows < per_image(top + eh))
            & (cols >= per_image(left)) & (cols < per_image(left + ew)))[..., None]  # [B, H, W, 1]

    if fill == "random":
        values = tf.random.stateless_uniform(shape, noise_seed, 0.0, 255.0)
    elif fill == "mean":
        values = tf.constant(_channel_values(mean, channels, "mean"))
    else:
        values = (tf.constant(_channel_values(mean, channels, "mean"))
                  + tf.constant(_channel_values(std, channels, "std")) * tf.random.stateless_normal(shape, noise_seed))
    return tf.where(mask, tf.cast(values, images.dtype), images)
