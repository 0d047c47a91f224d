"""Region-of-interest pooling, as Keras layers on `[features (B, H, W, C), rois (R, 5)]`, each RoI
`(batch index, x1, y1, x2, y2)` in input pixels, mapped to the feature map by `spatial_scale`.

- RoIPool (Girshick, "Fast R-CNN", ICCV 2015, section 2.1; torchvision `ops.roi_pool`, its CPU
  kernel `roi_pool_kernel.cpp`): corners rounded half away from zero (C++ `std::round`; `tf.round`
  rounds half to even, which moves RoIs with half-way corners by a whole cell), RoI size
  `max(x2 - x1 + 1, 1)` cells, bin p covering cells `floor(p * size / n)` .. `ceil((p + 1) * size / n)`
  offset by the start and clamped to the map, the max over each bin (at least -FLT_MAX, the kernel's
  start value), 0 for an empty bin. The maxima come from a range-maximum table of the feature map:
  the sparse table of range-minimum queries (Bender & Farach-Colton, "The LCA problem revisited",
  LATIN 2000, section 3) along both axes. Level (i, j) holds the max over every 2^i x 2^j window,
  built by pairwise maxima of shifted copies of level (i-1, j) or (i, j-1), and a bin [y0, y1) x
  [x0, x1) is the max of the four windows of level (floor(log2(y1 - y0)), floor(log2(x1 - x0))) at
  its corners, exact since max is idempotent. Level (i, j) keeps the (H - 2^i + 1) (W - 2^j + 1)
  windows inside the map: 4.5 x 5.1 = 23 maps in all for 38x63 (a 600x1000 image at 1/16). With the
  gathers, (R, ph, pw, C) floats each, 300 RoIs on VGG16's 38x63x512 map peak at about 250 MB, where
  masking the whole map per RoI and bin column took R x H x pw x W x C floats (10 GB).
- RoIAlign (He et al., "Mask R-CNN", ICCV 2017, section 3; torchvision `ops.roi_align`, its
  kernel `roi_align_kernel.cpp`): no rounding; `aligned=False` (torchvision's default, Faster
  R-CNN's `MultiScaleRoIAlign`) sizes the RoI `max(x2 - x1, 1)` cells, `aligned=True` shifts the
  corners by -0.5 and keeps the size; `sampling_ratio` x `sampling_ratio` points per bin at
  `start + p * bin + (i + 0.5) * bin / sampling_ratio`, each bilinear with torchvision's border
  rules (a point beyond -1 or past the map's size counts 0; coordinates below 0 clamp to 0; a
  point on or past the last row/column takes that row/column), averaged. The adaptive sampling of
  `sampling_ratio <= 0` (a count per RoI) has no static shape and is not offered.

Both are plain TF ops on the whole batch of RoIs (gathers, slices, maxima, reductions; RoIAlign two
matrix products of separable bilinear weights with the map), so they trace into SavedModels,
tf2onnx graphs and builtin-only TFLite models without per-RoI loops, at any map size: the table's
levels are unrolled for up to 8191 cells a side where the size is dynamic.
"""

from __future__ import annotations

import collections
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
    b, h, w = shape[0], shape[1], shape[2]
    c = features.shape[-1] if features.shape[-1] is not None else shape[3]
    # Bilinear sampling is separable: a bin's mean over its sr x sr points is wy^T F wx, with wy (wx)
    # each row's (column's) bilinear weights averaged over the bin's sr sample rows (columns) and the
    # border rules folded in (a point outside counts 0 in both factors). Two matrix products instead of
    # four gathers of R x (ph sr) x (pw sr) x C values: 6x faster for 300 RoIs on a 38x50x512 map, and
    # the same sums (the float32 results differ from the gathers' in the last bits, ~5e-7 relative).
    wy = _axis_weights(*_bilinear_axis(ys, h), h, ph, sr)  # (R, ph, H)
    wx = _axis_weights(*_bilinear_axis(xs, w), w, pw, sr)  # (R, pw, W)
    # The RoI's image picked inside the first product: (R, ph, B * H) @ (B * H, W * C).
    wyb = tf.expand_dims(wy, 2) * tf.reshape(tf.one_hot(batch, b, dtype=features.dtype), [-1, 1, b, 1])
    rows = tf.matmul(tf.reshape(wyb, tf.stack([-1, b * h])), tf.reshape(features, tf.stack([b * h, w * c])))
    rows = tf.transpose(tf.reshape(rows, tf.stack([-1, ph, w, c])), [0, 2, 1, 3])  # (R, W, ph, C)
    cols = tf.matmul(wx, tf.reshape(rows, tf.stack([-1, w, ph * c])))  # (R, pw, ph * C)
    return tf.transpose(tf.reshape(cols, tf.stack([-1, pw, ph, c])), [0, 2, 1, 3])


def _axis_weights(low, high, fraction, inside, size, bins, sr):
    """(R, bins, size): per bin, the mean over its sr sample positions of each cell's bilinear weight."""
    weights = (tf.one_hot(low, size) * tf.expand_dims(1.0 - fraction, -1)
               + tf.one_hot(high, size) * tf.expand_dims(fraction, -1))
    weights *= tf.expand_dims(tf.cast(inside, tf.float32), -1)
    return tf.reduce_mean(tf.reshape(weights, tf.stack([-1, bins, sr, size])), axis=2)


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

    Each bin's max is the max of four entries of the feature map's range-maximum table
    (`_range_max_table`), gathered for all bins of all RoIs at once."""
    ph, pw = _pair(output_size)
    features = tf.convert_to_tensor(features)
    batch, x1, y1, x2, y2 = _split_rois(rois)
    shape = tf.shape(features)
    h, w = shape[1], shape[2]
    start_x, start_y = round_half_away(x1 * spatial_scale), round_half_away(y1 * spatial_scale)
    width = tf.maximum(round_half_away(x2 * spatial_scale) - start_x + 1.0, 1.0)
    height = tf.maximum(round_half_away(y2 * spatial_scale) - start_y + 1.0, 1.0)
    # The kernel starts each bin at -FLT_MAX and takes strictly greater cells: a bin of -inf gives -FLT_MAX.
    table, rows, cols = _range_max_table(tf.maximum(features, features.dtype.min))
    row_empty, row_level, row_starts = _bin_lookups(*_bin_bounds(start_y, height, ph, h), rows.levels)  # (R, ph)
    col_empty, col_level, col_starts = _bin_lookups(*_bin_bounds(start_x, width, pw, w), cols.levels)  # (R, pw)
    # Entry (b, y, x) of level (i, j): cols.offset[j] + (b * rows.total + rows.offset[i] + y) * cols.extent[j] + x;
    # the table's last row (cols.total) is zeros, read by the empty bins.
    image_rows = tf.expand_dims(batch * rows.total, 1) + tf.gather(rows.offset, row_level)  # (R, ph)
    extent = tf.expand_dims(tf.gather(cols.extent, col_level), 1)  # (R, 1, pw)
    offset = tf.expand_dims(tf.gather(cols.offset, col_level), 1)
    empty = tf.expand_dims(row_empty, 2) | tf.expand_dims(col_empty, 1)  # (R, ph, pw)
    pooled = None
    for y in row_starts:
        for x in col_starts:
            index = offset + tf.expand_dims(image_rows + y, 2) * extent + tf.expand_dims(x, 1)
            # One corner at a time (graph executors would gather all four at once): 3 outputs' worth of memory.
            with tf.control_dependencies([] if pooled is None else [pooled]):
                corner = tf.gather(table, tf.where(empty, cols.total, index))  # (R, ph, pw, C)
            pooled = corner if pooled is None else tf.maximum(pooled, corner)
    return pooled


# Table levels per axis where the map's size is dynamic: windows of 2^0 .. 2^12 cells, enough for
# maps of up to 8191 cells a side (131,071 px at 1/16); a static size gets its own count. A level
# longer than the map keeps one row (or column) of cells.
_MAX_LEVELS = 13
_POWERS = tuple(2 ** k for k in range(_MAX_LEVELS))
_Axis = collections.namedtuple("_Axis", "levels offset extent total")


def _range_max_table(features):
    """The 2-D sparse table (range-maximum structure) of (B, H, W, C) features, flat: (N, C).

    Level (i, j) holds max(features[b, y : y + 2^i, x : x + 2^j]) for y <= H - 2^i, x <= W - 2^j (every
    corner a lookup asks for), (H - 2^i + 1) (W - 2^j + 1) cells per image. The row levels are
    concatenated along H, image b's row y of level i at stack row b * rows.total + rows.offset[i] + y;
    each column level j of that stack is flattened to table rows from cols.offset[j] on,
    cols.extent[j] entries per stack row; a row of zeros follows, at cols.total."""
    static = features.shape
    channels = static[-1] if static[-1] is not None else tf.shape(features)[-1]
    levels_h, levels_w = (_MAX_LEVELS if n is None else max(int(n).bit_length(), 1) for n in static[1:3])
    row_levels, row_extents = _sparse_levels(features, 1, levels_h)
    stack = tf.concat(row_levels, axis=1) if levels_h > 1 else features  # (B, rows.total, W, C)
    del row_levels  # run eagerly, each step frees what the next no longer needs
    col_levels, col_extents = _sparse_levels(stack, 2, levels_w)
    del stack
    zeros = tf.zeros(tf.stack([1, channels]), features.dtype)
    table = tf.concat([tf.reshape(level, [-1, channels]) for level in col_levels] + [zeros], axis=0)
    del col_levels
    row_offsets = _exclusive_sums(row_extents)
    rows = _Axis(levels_h, tf.stack(row_offsets[:-1]), tf.stack(row_extents), row_offsets[-1])
    stack_rows = tf.shape(features)[0] * rows.total
    col_offsets = _exclusive_sums([stack_rows * extent for extent in col_extents])
    cols = _Axis(levels_w, tf.stack(col_offsets[:-1]), tf.stack(col_extents), col_offsets[-1])
    return table, rows, cols


def _sparse_levels(base, axis, levels):
    """Levels 0..levels-1 of the 1-D sparse table of a 4-D tensor along `axis` (1 rows, 2 columns):
    level i at position y is max(level i-1 at y, level i-1 at y + 2^(i-1)), the max over y .. y + 2^i - 1,
    kept for y <= extent - 2^i; a level whose window exceeds the extent keeps one position, never
    looked up. Returns the levels and their extents (int32 scalars)."""
    extent = tf.shape(base)[axis]
    levels_out, extents = [base], [extent]
    for i in range(1, levels):
        size = tf.maximum(extent - _POWERS[i] + 1, 1)
        shift = tf.minimum(_POWERS[i - 1], extents[-1] - size)  # 2^(i-1) but where the level is a stub
        begin, span = [0, 0, 0, 0], [-1, -1, -1, -1]
        span[axis] = size
        low = tf.slice(levels_out[-1], begin, span)
        begin[axis] = shift
        levels_out.append(tf.maximum(low, tf.slice(levels_out[-1], begin, span)))
        extents.append(size)
    return levels_out, extents


def _exclusive_sums(values):
    sums = [tf.constant(0, tf.int32)]
    for value in values:
        sums.append(sums[-1] + value)
    return sums


def _bin_lookups(lo, hi, levels):
    """Per axis, from (R, bins) clamped edges: the empty bins, the table level i = floor(log2(hi - lo))
    (counted by comparisons: a float log2 is inexact) and the two lookups' starts lo and hi - 2^i, which
    cover the bin between them (0 for an empty bin, which pools to 0)."""
    lo, hi = tf.cast(lo, tf.int32), tf.cast(hi, tf.int32)
    empty = hi <= lo
    size = tf.expand_dims(tf.maximum(hi - lo, 1), -1)
    level = tf.reduce_sum(tf.cast(size >= tf.constant(_POWERS[1:levels], tf.int32), tf.int32), axis=-1)
    second = hi - tf.gather(tf.constant(_POWERS[:levels], tf.int32), level)
    return empty, level, (tf.where(empty, 0, lo), tf.where(empty, 0, second))


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


def _bin_bounds(start, size, bins, extent):
    """(R, bins) first and one-past-last cell of each bin, clamped to [0, extent], as floats."""
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
    return lo, hi


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
