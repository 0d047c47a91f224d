"""RoIPool and RoIAlign against loop references written from torchvision's CPU kernels
(roi_pool_kernel.cpp, roi_align_kernel.cpp: the same arithmetic, RoI by RoI, bin by bin), on
random RoIs that include half-way corners (x = 8, 24, ... at scale 1/16), sub-cell and
out-of-image boxes. RoIPool's range-maximum table against the masked algorithm it replaced (bit for
bit, static and dynamic map sizes), its gradient against the kernel's backward (argmax routing),
and its memory at a paper-sized map."""

import math
import subprocess
import sys

import keras
import numpy as np
import pytest

from kseg.detection.roi import RoIAlign, RoIPool, roi_align, roi_pool


def ref_roi_pool(features, rois, out, scale):
    """roi_pool_kernel.cpp, on NHWC."""
    _, h, w, c = features.shape
    result = np.zeros((len(rois), out, out, c), np.float32)
    for r, b, ph, pw, rows, cols in _kernel_bins(features.shape, rois, out, scale):
        result[r, ph, pw] = features[b, rows, cols].max(axis=(0, 1))
    return result


def ref_roi_pool_grad(features, rois, out, scale, upstream):
    """roi_pool_backward_kernel: each bin's gradient to its argmax cell (the first maximum; random
    features have no ties), per channel."""
    grad = np.zeros(features.shape, np.float64)
    for r, b, ph, pw, rows, cols in _kernel_bins(features.shape, rois, out, scale):
        window = features[b, rows, cols]
        flat = window.reshape(-1, window.shape[-1]).argmax(axis=0)
        ys, xs = np.unravel_index(flat, window.shape[:2])
        np.add.at(grad[b], (ys + rows.start, xs + cols.start, np.arange(window.shape[-1])), upstream[r, ph, pw])
    return grad


def _kernel_bins(shape, rois, out, scale):
    """roi_pool_kernel.cpp's non-empty bins: (roi, image, bin row, bin column, row slice, column slice)."""
    _, h, w, _ = shape
    for r, (b, x1, y1, x2, y2) in enumerate(rois):
        sx, sy = (math.copysign(math.floor(abs(v * scale) + 0.5), v) for v in (x1, y1))
        ex, ey = (math.copysign(math.floor(abs(v * scale) + 0.5), v) for v in (x2, y2))
        rw, rh = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
        bw, bh = np.float32(rw) / np.float32(out), np.float32(rh) / np.float32(out)  # float, as the kernel
        for ph in range(out):
            for pw in range(out):
                hs = min(max(math.floor(np.float32(ph) * bh) + sy, 0), h)
                he = min(max(math.ceil(np.float32(ph + 1) * bh) + sy, 0), h)
                ws = min(max(math.floor(np.float32(pw) * bw) + sx, 0), w)
                we = min(max(math.ceil(np.float32(pw + 1) * bw) + sx, 0), w)
                if he <= hs or we <= ws:
                    continue  # empty bin: 0
                yield r, int(b), ph, pw, slice(int(hs), int(he)), slice(int(ws), int(we))


def _bilinear(fmap, y, x):
    h, w = fmap.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(fmap.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yh = yl = h - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xh = xl = w - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * fmap[yl, xl] + hy * lx * fmap[yl, xh] + ly * hx * fmap[yh, xl] + ly * lx * fmap[yh, xh]


def ref_roi_align(features, rois, out, scale, sr, aligned):
    """roi_align_kernel.cpp (fixed sampling_ratio), in float64, on NHWC."""
    features = features.astype(np.float64)
    result = np.zeros((len(rois), out, out, features.shape[-1]))
    offset = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois):
        sx, sy = x1 * scale - offset, y1 * scale - offset
        rw, rh = x2 * scale - offset - sx, y2 * scale - offset - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / out, rh / out
        for ph in range(out):
            for pw in range(out):
                acc = 0.0
                for iy in range(sr):
                    y = sy + ph * bh + (iy + 0.5) * bh / sr
                    for ix in range(sr):
                        x = sx + pw * bw + (ix + 0.5) * bw / sr
                        acc = acc + _bilinear(features[int(b)], y, x)
                result[r, ph, pw] = acc / (sr * sr)
    return result


def _case(seed, batch=2, h=13, w=17, c=3, count=40, image=(208, 272)):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, h, w, c)).astype(np.float32)
    rois = []
    for i in range(count):
        kind = i % 4
        if kind == 0:  # half-way corners at 1/16: multiples of 8
            x1, y1 = rng.integers(0, 30) * 8, rng.integers(0, 24) * 8
            x2, y2 = x1 + rng.integers(1, 12) * 8, y1 + rng.integers(1, 12) * 8
        elif kind == 1:  # sub-cell boxes
            x1, y1 = rng.uniform(0, image[1]), rng.uniform(0, image[0])
            x2, y2 = x1 + rng.uniform(0, 10), y1 + rng.uniform(0, 10)
        elif kind == 2:  # partly or wholly outside the image
            x1, y1 = rng.uniform(-100, image[1] + 50), rng.uniform(-100, image[0] + 50)
            x2, y2 = x1 + rng.uniform(1, 200), y1 + rng.uniform(1, 200)
        else:
            x1, y1 = rng.uniform(0, image[1] - 20), rng.uniform(0, image[0] - 20)
            x2, y2 = x1 + rng.uniform(16, 180), y1 + rng.uniform(16, 180)
        rois.append([rng.integers(0, batch), x1, y1, x2, y2])
    return features, np.array(rois, np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roi_pool_equals_the_kernel(seed):
    features, rois = _case(seed)
    got = roi_pool(features, rois, 7, 1 / 16).numpy()
    np.testing.assert_array_equal(got, ref_roi_pool(features, rois, 7, 1 / 16))


def test_roi_pool_rounds_half_away_from_zero():
    # x1 = 8 px at 1/16 is 0.5 cells: std::round gives 1, round-half-to-even 0.
    features = np.arange(4 * 4, dtype=np.float32).reshape(1, 4, 4, 1)
    rois = np.array([[0, 8, 8, 8, 8]], np.float32)
    np.testing.assert_array_equal(roi_pool(features, rois, 1, 1 / 16).numpy().ravel(), [5.0])  # cell (1, 1)


@pytest.mark.parametrize("seed,aligned,sr,out",
                         [(0, False, 2, 7), (1, True, 2, 7), (2, False, 1, 14), (3, False, 3, 5)])
def test_roi_align_equals_the_kernel(seed, aligned, sr, out):
    features, rois = _case(seed)
    got = roi_align(features, rois, out, 1 / 16, sr, aligned).numpy()
    want = ref_roi_align(features, rois, out, 1 / 16, sr, aligned)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # float32 against float64


def test_layers_round_trip_and_shapes(tmp_path):
    features, rois = _case(4, count=6)
    fmap = keras.Input((13, 17, 3))
    boxes = keras.Input((5,), batch_size=None)
    for layer in (RoIAlign(7, 1 / 16, 2), RoIPool((7, 7), 1 / 16)):
        again = type(layer).from_config(layer.get_config())
        out = again([features, rois])
        assert tuple(out.shape) == (6, 7, 7, 3)
        np.testing.assert_array_equal(out, layer([features, rois]))
        assert layer.compute_output_shape(((None, 13, 17, 3), (None, 5))) == (None, 7, 7, 3)
    assert fmap.shape[-1] == 3 and boxes.shape[-1] == 5
    with pytest.raises(ValueError, match="sampling_ratio"):
        RoIAlign(7, 1 / 16, sampling_ratio=0)


# --- RPN anchors: the tables printed from torchvision and computed with py-faster-rcnn's algorithm

TORCHVISION_CELLS = [[-91, -45, 91, 45], [-181, -91, 181, 91], [-362, -181, 362, 181], [-64, -64, 64, 64],
                     [-128, -128, 128, 128], [-256, -256, 256, 256], [-45, -91, 45, 91], [-91, -181, 91, 181],
                     [-181, -362, 181, 362]]
PYFASTER_CELLS = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199], [-56, -56, 71, 71],
                  [-120, -120, 135, 135], [-248, -248, 263, 263], [-36, -80, 51, 95], [-80, -168, 95, 183],
                  [-168, -344, 183, 359]]


@pytest.mark.parametrize("layout,table", [("torchvision", TORCHVISION_CELLS), ("pyfaster", PYFASTER_CELLS)])
def test_rpn_cell_anchors_equal_the_published_tables(layout, table):
    from kseg.detection.anchors import rpn_cell_anchors

    np.testing.assert_array_equal(rpn_cell_anchors(layout=layout), np.array(table, np.float32))


def test_rpn_anchors_are_location_major():
    from kseg.detection.anchors import rpn_anchors, rpn_cell_anchors

    cells = rpn_cell_anchors()
    anchors = rpn_anchors((2, 3), 16, cells)
    assert anchors.shape == (2 * 3 * 9, 4)
    np.testing.assert_array_equal(anchors[:9], cells)  # location (0, 0)
    np.testing.assert_array_equal(anchors[9:18], cells + [16, 0, 16, 0])  # (0, 1): x moves first
    np.testing.assert_array_equal(anchors[27:36], cells + [0, 16, 0, 16])  # (1, 0)
    with pytest.raises(ValueError, match="known"):
        rpn_cell_anchors(layout="caffe")
    with pytest.raises(ValueError, match="multiples of 16"):
        rpn_cell_anchors(sizes=(100,), layout="pyfaster")


def test_roi_pool_bin_edges_are_the_kernels_float32_ones_in_a_graph_too():
    # 57 cells in 7 bins: float32 puts the last bin's end at ceil(7 * 8.142858) = 58 (torchvision's
    # kernel; exact arithmetic says 57), and a size of 3 must end at ceil(7 * (3 / 7)) = 3 even in a
    # tf.function, where Grappler would compute 3 * (1 / 7) * 7 = 3.0000002 -> 4.
    import tensorflow as tf

    features = np.random.default_rng(5).normal(size=(1, 70, 70, 2)).astype(np.float32)
    rois = np.array([[0, 0, 0, 56 * 16, 56 * 16], [0, 0, 0, 2 * 16, 2 * 16], [0, 16, 16, 3 * 16, 3 * 16]], np.float32)
    want = ref_roi_pool(features, rois, 7, 1 / 16)
    np.testing.assert_array_equal(roi_pool(features, rois, 7, 1 / 16).numpy(), want)
    graph = tf.function(lambda f, r: roi_pool(f, r, 7, 1 / 16))
    np.testing.assert_array_equal(graph(features, rois).numpy(), want)


# --- RoIPool's range-maximum table against the masked algorithm it replaced


def masked_roi_pool(features, rois, output_size, scale):
    """kseg's previous roi_pool: every RoI's whole map, masked per bin column then per bin row
    ((R, H, pw, W, C) floats), with the same bin edges."""
    import tensorflow as tf

    from kseg.detection.roi import _bin_bounds, _pair, round_half_away

    ph, pw = _pair(output_size)
    features = tf.convert_to_tensor(features)
    rois = tf.convert_to_tensor(rois, tf.float32)
    h, w = tf.shape(features)[1], tf.shape(features)[2]
    corners = [round_half_away(rois[:, k] * scale) for k in range(1, 5)]
    size_x, size_y = (tf.maximum(corners[k + 2] - corners[k] + 1.0, 1.0) for k in (0, 1))

    def mask(start, size, bins, extent):
        lo, hi = _bin_bounds(start, size, bins, extent)
        cells = tf.reshape(tf.range(extent, dtype=tf.float32), [1, 1, -1])
        return (cells >= tf.expand_dims(lo, -1)) & (cells < tf.expand_dims(hi, -1)), hi <= lo

    row_mask, row_empty = mask(corners[1], size_y, ph, h)
    col_mask, col_empty = mask(corners[0], size_x, pw, w)
    maps = tf.gather(features, tf.cast(rois[:, 0], tf.int32))
    lowest = features.dtype.min
    by_col = tf.reduce_max(tf.where(col_mask[:, None, :, :, None], maps[:, :, None], lowest), axis=3)
    pooled = tf.reduce_max(tf.where(row_mask[:, :, :, None, None], by_col[:, None], lowest), axis=2)
    empty = row_empty[:, :, None] | col_empty[:, None, :]
    return tf.where(empty[..., None], tf.zeros_like(pooled), pooled)


def _map_rois(rng, count, batch, h, w):
    """RoIs in 16-px cells of an h x w map: half-way corners, sub-cell boxes, boxes partly or wholly
    outside, the whole image and more, and any size up to twice the image."""
    rois = []
    for i in range(count):
        kind = i % 5
        if kind == 0:
            x1, y1 = rng.integers(-2, w * 2 + 2) * 8, rng.integers(-2, h * 2 + 2) * 8
            x2, y2 = x1 + rng.integers(0, w * 2 + 2) * 8, y1 + rng.integers(0, h * 2 + 2) * 8
        elif kind == 1:
            x1, y1 = rng.uniform(-8, w * 16), rng.uniform(-8, h * 16)
            x2, y2 = x1 + rng.uniform(0, 12), y1 + rng.uniform(0, 12)
        elif kind == 2:
            x1, y1 = rng.uniform(-40 * w, 20 * w), rng.uniform(-40 * h, 20 * h)
            x2, y2 = x1 + rng.uniform(0, 40 * w), y1 + rng.uniform(0, 40 * h)
        elif kind == 3:
            margin = rng.choice([0.0, 0.0, 100.0, 1000.0])
            x1, y1, x2, y2 = -margin, -margin, w * 16 - 1 + margin, h * 16 - 1 + margin
        else:
            x1, y1 = rng.uniform(-16, w * 16), rng.uniform(-16, h * 16)
            x2, y2 = x1 + rng.uniform(0, 32 * w), y1 + rng.uniform(0, 32 * h)
        rois.append([rng.integers(0, batch), x1, y1, x2, y2])
    return np.array(rois, np.float32)


@pytest.mark.parametrize("h,w,out", [(1, 1, 7), (2, 3, 7), (13, 17, (2, 5)), (38, 63, 7), (64, 5, 7), (33, 129, 14)])
def test_roi_pool_equals_the_masked_algorithm_bit_for_bit(h, w, out):
    import tensorflow as tf

    rng = np.random.default_rng(h * 1000 + w)
    features = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    rois = _map_rois(rng, 60, 2, h, w)
    want = masked_roi_pool(features, rois, out, 1 / 16).numpy()
    any_size = tf.function(lambda f, r: roi_pool(f, r, out, 1 / 16),  # dynamic H and W: every table level
                           input_signature=[tf.TensorSpec([None, None, None, 3]), tf.TensorSpec([None, 5])])
    for got in (roi_pool(features, rois, out, 1 / 16).numpy(), any_size(features, rois).numpy()):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    if out == 7:
        np.testing.assert_array_equal(want, ref_roi_pool(features, rois, 7, 1 / 16))
        # A bin of -inf pools to -FLT_MAX, the kernel's start value (`input > maxval` never holds); the
        # masked algorithm gave -inf where a bin spanned a whole axis of the map.
        features[1, : (h + 1) // 2, : (w + 1) // 2, 0] = -np.inf
        want = np.maximum(ref_roi_pool(features, rois, 7, 1 / 16), np.finfo(np.float32).min)
        np.testing.assert_array_equal(any_size(features, rois).numpy(), want)


def test_roi_pool_gradient_goes_to_each_bins_argmax():
    import tensorflow as tf

    rng = np.random.default_rng(7)
    features = rng.normal(size=(2, 13, 17, 4)).astype(np.float32)
    rois = _map_rois(rng, 40, 2, 13, 17)
    upstream = rng.normal(size=(40, 7, 7, 4)).astype(np.float32)
    x = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(roi_pool(x, rois, 7, 1 / 16) * upstream)
    want = ref_roi_pool_grad(features, rois, 7, 1 / 16, upstream)
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), want, atol=1e-4 * max(1, np.abs(want).max()), rtol=0)


MEMORY_SCRIPT = """
import resource, sys, time
import numpy as np, tensorflow as tf
from kseg.detection.roi import roi_pool
data = np.load(sys.argv[1])
features, rois = tf.constant(data["features"]), tf.constant(data["rois"])
graph = tf.function(lambda f, r: roi_pool(f, r, 7, 1 / 16),
                    input_signature=[tf.TensorSpec([None, None, None, 512]), tf.TensorSpec([None, 5])])
graph(features[:, :3, :3], rois[:2]), roi_pool(features[:, :3, :3], rois[:2], 7, 1 / 16)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
eager = roi_pool(features, rois, 7, 1 / 16).numpy()
middle = time.perf_counter()
traced = graph(features, rois).numpy()
end = time.perf_counter()
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
np.save(sys.argv[2], eager)
print(grown, middle - start, end - middle, np.array_equal(eager.view(np.uint32), traced.view(np.uint32)))
"""


def test_roi_pool_memory_at_a_paper_sized_map(tmp_path):
    """300 RoIs on a 38x63x512 map (a 600x1000 image at 1/16, VGG16's conv5_3): the masked algorithm
    needed R x H x pw x W x C floats (10 GB); the table about 23 maps (120 MB) and the gathers."""
    rng = np.random.default_rng(8)
    features = rng.normal(size=(1, 38, 63, 512)).astype(np.float32)
    rois = _map_rois(rng, 300, 1, 38, 63)
    np.savez(tmp_path / "in.npz", features=features, rois=rois)
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    grown, eager_s, graph_s, same = done.stdout.split()[-4:]
    print(f"roi_pool 300 RoIs on 38x63x512: peak RSS +{float(grown):.0f} MB, eager {float(eager_s):.2f} s, "
          f"tf.function {float(graph_s):.2f} s")
    assert float(grown) < 1000 and same == "True"
    pooled = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(pooled[:50], ref_roi_pool(features, rois[:50], 7, 1 / 16))
