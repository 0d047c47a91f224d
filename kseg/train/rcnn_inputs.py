"""The datasets of two-stage detectors (Fast / Faster R-CNN): images with their padded ground truth.

Their trainers match anchors and sample RoIs inside the train step, so the targets stay the boxes:
(image (h, w, 3) preprocessed, {"boxes": (M, 4) xyxy pixels of the resized image, "classes": (M,)},
padding rows class -1). Images are resized either to the model's fixed input size (per axis), or,
with [data] min_size, keeping their aspect ratio so the shorter side is min_size and the longer at
most max_size (Fast R-CNN section 5.5 / py-faster-rcnn's TRAIN.SCALES 600 and MAX_SIZE 1000);
such batches are padded at the bottom and right to their largest image with zeros (the mean colour
after preprocessing), as py-faster-rcnn's im_list_to_blob and torchvision's batch_images pad.
Training images are flipped horizontally at random with [data] flip (Fast R-CNN section 2.3's only
augmentation); the validation set is read as is.

Fast R-CNN's precomputed proposals (a reader's target["proposals"], (R, 4) pixels, padding rows
empty) are resized and flipped with their image, and the model input becomes {"image", "proposals"}.
"""

from __future__ import annotations

import tensorflow as tf

PADDING_CLASS = -1


def aspect_size(hw, min_size, max_size):
    """(h, w) int32 of an image of size hw resized so its shorter side is min_size, its longer at most max_size."""
    h, w = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
    scale = tf.minimum(float(min_size) / tf.minimum(h, w), float(max_size or 1e9) / tf.maximum(h, w))
    return tf.cast(tf.round(h * scale), tf.int32), tf.cast(tf.round(w * scale), tf.int32)


def resize_with_boxes(image, boxes, size):
    """image resized (bilinear) to size (h, w), boxes (M, 4) scaled per axis with it."""
    old = tf.cast(tf.shape(image)[:2], tf.float32)
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    sy, sx = tf.cast(size[0], tf.float32) / old[0], tf.cast(size[1], tf.float32) / old[1]
    return image, boxes * tf.stack([sx, sy, sx, sy])


def flip_with_boxes(image, boxes, classes, seed):
    """A horizontal flip with probability 0.5 (stateless, `seed` (2,)): x1 -> W - x2, x2 -> W - x1."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    width = tf.cast(tf.shape(image)[1], tf.float32)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    flipped = tf.stack([width - x2, y1, width - x1, y2], axis=-1)
    flipped = tf.where((classes >= 0)[:, None], flipped, boxes)  # padding rows stay zeros
    return tf.cond(flip, lambda: (tf.reverse(image, [1]), flipped), lambda: (image, boxes))


def box_datasets(train, val, *, batch, seed, fixed_size=None, min_size=None, max_size=None, flip=False,
                 preprocess=None):
    """(train, val) batched: readers' (image RGB 0..255, target) -> (image preprocessed, {"boxes", "classes"}).

    fixed_size: (h, w) of a fixed-size model; else min_size / max_size (see the module docstring).
    preprocess: image (h, w, 3) RGB 0..255 float -> the model's input."""
    par = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    with_proposals = "proposals" in train.element_spec[1]

    def shape(image, target, seed_pair=None):
        boxes, classes = tf.cast(target["boxes"], tf.float32), tf.cast(target["classes"], tf.int32)
        if fixed_size is not None:
            size = tf.constant(fixed_size, tf.int32)
        else:
            size = tf.stack(aspect_size(tf.shape(image)[:2], min_size, max_size))
        old_hw = tf.cast(tf.shape(image)[:2], tf.float32)
        image, boxes = resize_with_boxes(image, boxes, size)
        if seed_pair is not None:
            image, boxes = flip_with_boxes(image, boxes, classes, seed_pair)
        if preprocess is not None:
            image = preprocess(image)
        if not with_proposals:
            return image, {"boxes": boxes, "classes": classes}
        proposals = tf.cast(target["proposals"], tf.float32)
        real = (proposals[:, 2] > proposals[:, 0]) & (proposals[:, 3] > proposals[:, 1])
        sy, sx = tf.cast(size[0], tf.float32) / old_hw[0], tf.cast(size[1], tf.float32) / old_hw[1]
        proposals = proposals * tf.stack([sx, sy, sx, sy])
        if seed_pair is not None:  # the same coin as the image's (same seed)
            _, proposals = flip_with_boxes(image, proposals, tf.where(real, 0, -1), seed_pair)
            proposals = tf.where(real[:, None], proposals, 0.0)
        return {"image": image, "proposals": proposals}, {"boxes": boxes, "classes": classes}

    def batched(ds):
        image = {"image": [None, None, 3], "proposals": [None, 4]} if with_proposals else [None, None, 3]
        pad = {"image": 0.0, "proposals": 0.0} if with_proposals else 0.0
        shapes = (image, {"boxes": [None, 4], "classes": [None]})
        values = (pad, {"boxes": 0.0, "classes": PADDING_CLASS})
        return ds.padded_batch(batch, padded_shapes=shapes, padding_values=values).prefetch(tf.data.AUTOTUNE)

    if flip:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        fit_train = tf.data.Dataset.zip((train, seeds)).map(lambda e, s: shape(e[0], e[1], s), **par)
    else:
        fit_train = train.map(shape, **par)
    return batched(fit_train), batched(val.map(shape, **par))
