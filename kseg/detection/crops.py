"""R-CNN's region warping (Girshick et al., "Rich feature hierarchies for accurate object detection
and semantic segmentation", CVPR 2014, section 2.1 and appendix A): every proposal, dilated so that
the warped crop holds `context` pixels of image around the box, is warped anisotropically to a
fixed square, the CNN's input.

The reference is R-CNN's `rcnn_im_crop.m` (rbgirshick/rcnn, crop_mode "warp", padding 16): it scales
the box about its centre by crop_size / (crop_size - 2 * padding), rounds it to whole pixels, clips it
to the image, resizes the clipped window bilinearly (MATLAB imresize, no antialiasing) to the
proportional part of the crop and pastes it at the offset of the clipped-away part, the rest of the
crop being the (subtracted) image mean. kseg samples the same dilated box in continuous coordinates
with `tf.image.crop_and_resize` on the preprocessed image, sample points at the crop's pixel centres
(half-pixel convention, as imresize), and 0 (the mean, after mean subtraction) outside the image,
blended with the edge pixels over the pixel beyond them: the same warp without the two integer
roundings of the reference (a sub-pixel shift of the sample grid), its edge at the image's border
(half a pixel out) a one-pixel ramp instead of a step.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def context_boxes(boxes, crop_size, context):
    """Boxes (..., 4) xyxy pixels dilated about their centres so that a crop_size warp of the result
    has `context` pixels around the original box: scale crop_size / (crop_size - 2 * context)."""
    scale = float(crop_size) / (float(crop_size) - 2.0 * float(context))
    x1, y1, x2, y2 = tf.unstack(tf.cast(boxes, tf.float32), 4, axis=-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    return tf.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=-1)


def warp_regions(images, boxes, crop_size, context=16):
    """images (B, H, W, C) preprocessed (mean-subtracted), boxes (B, R, 4) xyxy pixels ->
    crops (B*R, crop_size, crop_size, C), image-major: each box with its context, warped bilinearly
    from the image padded with 0 (the mean), module docstring.

    The image is sampled as if one pixel of 0 surrounded it: a sample point within a pixel of the
    edge blends the edge pixel with the mean (at the image's border, half a pixel out, half each),
    further out it is 0. crop_and_resize alone would switch to 0 at the outer pixel centres, and
    runtimes disagree there (ONNX Runtime's Resize, tf2onnx's conversion of it, clamps within half
    a pixel outside instead): on the padded image, clamping and extrapolating both give 0."""
    images = tf.pad(tf.cast(images, tf.float32), [[0, 0], [1, 1], [1, 1], [0, 0]])
    shape = tf.shape(boxes)
    b, r = shape[0], shape[1]
    x1, y1, x2, y2 = tf.unstack(tf.reshape(context_boxes(boxes, crop_size, context), [-1, 4]), 4, axis=-1)
    size = float(crop_size)
    hw = tf.cast(tf.shape(images)[1:3], tf.float32)  # of the padded image: at least 3 x 3
    # Output pixel j samples the continuous point lo + (j + 0.5) * (hi - lo) / size, i.e. pixel index
    # lo + (j + 0.5) * (hi - lo) / size - 0.5 of the image, + 1 of the padded one; crop_and_resize
    # samples y1n * (H' - 1) + j * step of the padded H' = H + 2.
    def ends(lo, hi, extent):
        step = (hi - lo) / size
        first, last = lo + 0.5 * step + 0.5, lo + (size - 0.5) * step + 0.5
        return first / (extent - 1.0), last / (extent - 1.0)

    ny1, ny2 = ends(y1, y2, hw[0])
    nx1, nx2 = ends(x1, x2, hw[1])
    index = tf.repeat(tf.range(b), r)
    return tf.image.crop_and_resize(images, tf.stack([ny1, nx1, ny2, nx2], axis=1), index,
                                    [crop_size, crop_size], method="bilinear", extrapolation_value=0.0)


@keras.saving.register_keras_serializable(package="kseg")
class RegionCrops(keras.layers.Layer):
    """[image (B, H, W, C), boxes (B, R, 4)] -> warped crops (B*R, crop_size, crop_size, C), R-CNN's
    input windows (warp_regions). Registered as `kseg>RegionCrops`."""

    def __init__(self, crop_size=224, context=16, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= 2 * context < crop_size:
            raise ValueError(f"context must be in [0, crop_size / 2), got {context} for crop_size {crop_size}")
        self.crop_size = int(crop_size)
        self.context = int(context)

    def call(self, inputs):
        images, boxes = inputs
        return warp_regions(images, boxes, self.crop_size, self.context)

    def compute_output_spec(self, inputs):
        images, boxes = inputs
        rows = None if boxes.shape[0] is None or boxes.shape[1] is None else boxes.shape[0] * boxes.shape[1]
        return keras.KerasTensor((rows, self.crop_size, self.crop_size, images.shape[-1]), "float32")

    def get_config(self):
        return {**super().get_config(), "crop_size": self.crop_size, "context": self.context}
