"""Region-of-interest pooling, as Keras layers on `[features (B, H, W, C), rois (R, 5)]`, each RoI
`(batch index, x1, y1, x2, y2)` in input pixels, mapped to the feature map by `spatial_scale`.

- RoIPool (Girshick, "Fast R-CNN", ICCV 2015, section 2.1; torchvision `ops.roi_pool`, its CPU
  kernel `roi_pool_kernel.cpp`): corners rounded half away from zero (C++ `std::round`; `tf.round`
  rounds half to even, which moves RoIs with half-way corners by a whole cell), RoI size
  `max(x2 - x1 + 1, 1)` cells, bin p covering cells `floor(p * size / n)` .. `ceil((p + 1) * size / n)`
  offset by the start and clamped to the map, the max over each bin, 0 for an empty bin.
- RoIAlign (He et al., "Mask R-CNN", ICCV 2017, section 3; torchvision `ops.roi_align`, its
  kernel `roi_align_kernel.cpp`): no rounding; `aligned=False` (torchvision's default, Faster
  R-CNN's `MultiScaleRoIAlign`) sizes the RoI `max(x2 - x1, 1)` cells, `aligned=True` shifts the
  corners by -0.5 and keeps the size; `sampling_ratio` x `sampling_ratio` points per bin at
  `start + p * bin + (i + 0.5) * bin / sampling_ratio`, each bilinear with torchvision's border
  rules (a point beyond -1 or past the map's size counts 0; coordinates below 0 clamp to 0; a
  point on or past the last row/column takes that row/column), averaged. The adaptive sampling of
  `sampling_ratio <= 0` (a count per RoI) has no static shape and is not offered.

Both are plain TF ops on the whole batch of RoIs (gathers and masked reductions), so they trace
into SavedModels and tf2onnx graphs without per-RoI loops.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf


def _pair(size):
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)


def _split_rois(rois):
    rois = tf.convert_to_tensor(rois, tf.float32)
    return tf.cast(rois[:, 0], tf.int32), rois[:, 1], rois[:, 2], rois[:, 3], rois[:, 4]


def round_half_away(x):
    """C++ std::round: half-way values away from zero (tf.round rounds them to even)."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio=2, aligned=False):
    """torchvision `roi_align` on NHWC features: (R, ph, pw, C) float32 (see the module docstring)."""
    ph, pw = _pair(output_size)
    if int(sampling_ratio) <= 0:
        raise ValueError(f"sampling_ratio must be > 0 (adaptive sampling has no static shape), got {sampling_ratio}")
    sr = int(sampling_ratio)
    features = tf.convert_to_tensor(features)
    batch, x1, y1, x2, y2 = _split_rois(rois)
    offset = 0.5 if aligned else 0.0
    start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    width, height = x2 * spatial_scale - offset - start_x, y2 * spatial_scale - offset - start_y
    if not aligned:
        width, height = tf.maximum(width, 1.0), tf.maximum(height, 1.0)
    # Sample positions along each axis: (R, bins * sr), bin-major.
    steps_y = tf.constant(np.repeat(np.arange(ph), sr) + (np.tile(np.arange(sr), ph) + 0.5) / sr, tf.float32)
    steps_x = tf.constant(np.repeat(np.arange(pw), sr) + (np.tile(np.arange(sr), pw) + 0.5) / sr, tf.float32)
    # Explicit expand_dims rather than `[:, None]` indexing throughout: TFLite has no builtin for
    # StridedSlice with new or ellipsis axes (it would need the Flex delegate).
    ys = tf.expand_dims(start_y, 1) + tf.expand_dims(steps_y, 0) * tf.expand_dims(height / ph, 1)
    xs = tf.expand_dims(start_x, 1) + tf.expand_dims(steps_x, 0) * tf.expand_dims(width / pw, 1)
    shape = tf.shape(features)
    h, w = shape[1], shape[2]
    y_low, y_high, ly, y_in = _bilinear_axis(ys, h)
    x_low, x_high, lx, x_in = _bilinear_axis(xs, w)
    # Corner values (R, ph*sr, pw*sr, C) weighted and summed; out-of-range points weigh 0.
    inside = tf.cast(tf.expand_dims(y_in, 2) & tf.expand_dims(x_in, 1), features.dtype)
    b = tf.broadcast_to(tf.reshape(batch, [-1, 1, 1]), tf.shape(inside))
    channels = features.shape[-1] if features.shape[-1] is not None else tf.shape(features)[-1]
    corners = []
    for rows, wy in ((y_low, 1.0 - ly), (y_high, ly)):
        for cols, wx in ((x_low, 1.0 - lx), (x_high, lx)):
            index = tf.stack([b, tf.broadcast_to(tf.expand_dims(rows, 2), tf.shape(b)),
                              tf.broadcast_to(tf.expand_dims(cols, 1), tf.shape(b))], axis=-1)
            weight = tf.expand_dims(wy, 2) * tf.expand_dims(wx, 1) * inside
            corner = tf.gather_nd(features, index) * tf.expand_dims(weight, -1)
            # Each corner's share averaged over the bin's samples first: (R, ph, pw, C), sr^2 times smaller.
            corners.append(tf.reduce_mean(tf.reshape(corner, tf.stack([-1, ph, sr, pw, sr, channels])), axis=[2, 4]))
    # One reduce_sum over the stacked shares, not a chain of `+`: Grappler turns such a chain into AddN,
    # whose oneDNN kernel (TF's default on CPU) is not bitwise repeatable from run to run.
    return tf.reduce_sum(tf.stack(corners), axis=0)


def _bilinear_axis(coords, size):
    """Per-axis bilinear terms with torchvision's border rules: (low, high, fraction, inside)."""
    size_f = tf.cast(size, tf.float32)
    inside = (coords >= -1.0) & (coords <= size_f)
    coords = tf.maximum(coords, 0.0)
    low = tf.cast(tf.floor(coords), tf.int32)
    last = low >= size - 1
    low = tf.where(last, size - 1, low)
    high = tf.where(last, size - 1, low + 1)
    fraction = tf.where(last, 0.0, coords - tf.cast(low, tf.float32))
    return low, high, fraction, inside


def roi_pool(features, rois, output_size, spatial_scale):
    """torchvision `roi_pool` on NHWC features: (R, ph, pw, C) float32 (see the module docstring).

    The max over each bin is separable: first over the columns of each bin column (R, H, pw, C),
    then over the rows of each bin row. Cells outside a bin are masked to the lowest float.
    """
    ph, pw = _pair(output_size)
    features = tf.convert_to_tensor(features)
    batch, x1, y1, x2, y2 = _split_rois(rois)
    shape = tf.shape(features)
    h, w = shape[1], shape[2]
    start_x, start_y = round_half_away(x1 * spatial_scale), round_half_away(y1 * spatial_scale)
    width = tf.maximum(round_half_away(x2 * spatial_scale) - start_x + 1.0, 1.0)
    height = tf.maximum(round_half_away(y2 * spatial_scale) - start_y + 1.0, 1.0)
    row_mask, row_empty = _bin_mask(start_y, height, ph, h)  # (R, ph, H), (R, ph)
    col_mask, col_empty = _bin_mask(start_x, width, pw, w)  # (R, pw, W), (R, pw)
    lowest = features.dtype.min
    maps = tf.gather(features, batch)  # (R, H, W, C)
    # (R, 1, pw, W, 1) mask over (R, H, 1, W, C) maps -> (R, H, pw, C); then over rows.
    col = tf.expand_dims(tf.expand_dims(col_mask, 1), -1)
    by_col = tf.reduce_max(tf.where(col, tf.expand_dims(maps, 2), lowest), axis=3)
    row = tf.expand_dims(tf.expand_dims(row_mask, -1), -1)  # (R, ph, H, 1, 1)
    pooled = tf.reduce_max(tf.where(row, tf.expand_dims(by_col, 1), lowest), axis=2)
    empty = tf.expand_dims(row_empty, 2) | tf.expand_dims(col_empty, 1)
    return tf.where(tf.expand_dims(empty, -1), tf.zeros_like(pooled), pooled)


# RoIPool's bin edges for RoI sizes up to this many cells come from a table (see _bin_edges).
_TABLE_SIZE = 4096


@functools.lru_cache(maxsize=None)
def _bin_edges(bins):
    """(floor(p * step), ceil((p + 1) * step)) for every RoI size 1.._TABLE_SIZE cells and bin p,
    step = size / bins, in float32 exactly as torchvision's kernel computes them.

    Exact integer arithmetic would differ (step rounds: for 57 cells in 7 bins the last bin ends at
    ceil(7 * 8.142858) = 58, not 57), and so would a TF graph: Grappler turns `size / bins` into
    `size * (1 / bins)`, one ulp off, which moved a bin edge in a SavedModel. A table is immune."""
    size = np.arange(_TABLE_SIZE + 1, dtype=np.float32)[:, None]
    step = size / np.float32(bins)
    p = np.arange(bins, dtype=np.float32)[None, :]
    return (np.floor(p * step).astype(np.float32), np.ceil((p + np.float32(1)) * step).astype(np.float32))


def _bin_mask(start, size, bins, extent):
    """(R, bins, extent) membership of each cell in each bin, and (R, bins) empty bins."""
    table_lo, table_hi = _bin_edges(bins)
    index = tf.cast(tf.minimum(size, _TABLE_SIZE), tf.int32)
    lo, hi = tf.gather(table_lo, index), tf.gather(table_hi, index)
    # Larger RoIs (over 4096 cells: 65,536 px at 1/16) compute the edges in the graph.
    p = tf.expand_dims(tf.range(bins, dtype=tf.float32), 0)
    step = tf.expand_dims(size / bins, 1)
    huge = tf.expand_dims(size > _TABLE_SIZE, 1)
    lo = tf.where(huge, tf.floor(p * step), lo)
    hi = tf.where(huge, tf.math.ceil((p + 1.0) * step), hi)
    extent_f = tf.cast(extent, tf.float32)
    lo = tf.clip_by_value(lo + tf.expand_dims(start, 1), 0.0, extent_f)
    hi = tf.clip_by_value(hi + tf.expand_dims(start, 1), 0.0, extent_f)
    cells = tf.reshape(tf.range(extent, dtype=tf.float32), [1, 1, -1])
    return (cells >= tf.expand_dims(lo, -1)) & (cells < tf.expand_dims(hi, -1)), hi <= lo


@keras.saving.register_keras_serializable(package="kseg")
class RoIAlign(keras.layers.Layer):
    """[features (B, H, W, C), rois (R, 5)] -> (R, ph, pw, C): torchvision `roi_align`."""

    def __init__(self, output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=False, **kwargs):
        super().__init__(**kwargs)
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        if int(sampling_ratio) <= 0:
            raise ValueError(f"sampling_ratio must be > 0, got {sampling_ratio}")
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def call(self, inputs):
        features, rois = inputs
        return roi_align(features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def compute_output_shape(self, input_shape):
        features, rois = input_shape
        return (rois[0], *self.output_size, features[-1])

    def get_config(self):
        return {**super().get_config(), "output_size": list(self.output_size), "spatial_scale": self.spatial_scale,
                "sampling_ratio": self.sampling_ratio, "aligned": self.aligned}


@keras.saving.register_keras_serializable(package="kseg")
class RoIPool(keras.layers.Layer):
    """[features (B, H, W, C), rois (R, 5)] -> (R, ph, pw, C): Fast R-CNN's RoI max pooling."""

    def __init__(self, output_size=7, spatial_scale=1 / 16, **kwargs):
        super().__init__(**kwargs)
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def call(self, inputs):
        features, rois = inputs
        return roi_pool(features, rois, self.output_size, self.spatial_scale)

    def compute_output_shape(self, input_shape):
        features, rois = input_shape
        return (rois[0], *self.output_size, features[-1])

    def get_config(self):
        return {**super().get_config(), "output_size": list(self.output_size), "spatial_scale": self.spatial_scale}
