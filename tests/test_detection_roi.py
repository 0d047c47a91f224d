"""RoIPool and RoIAlign against loop references written from torchvision's CPU kernels
(roi_pool_kernel.cpp, roi_align_kernel.cpp: the same arithmetic, RoI by RoI, bin by bin), on
random RoIs that include half-way corners (x = 8, 24, ... at scale 1/16), sub-cell and
out-of-image boxes."""

import math

import keras
import numpy as np
import pytest

from kseg.detection.roi import RoIAlign, RoIPool, roi_align, roi_pool


def ref_roi_pool(features, rois, out, scale):
    """roi_pool_kernel.cpp, on NHWC."""
    _, h, w, c = features.shape
    result = np.zeros((len(rois), out, out, c), np.float32)
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
                result[r, ph, pw] = features[int(b), int(hs):int(he), int(ws):int(we)].max(axis=(0, 1))
    return result


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
