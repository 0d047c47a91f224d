"""SSD300's prior (default) boxes, in NumPy: torchvision `anchor_utils.DefaultBoxGenerator`.

Per feature map k with scale s_k and s'_k = sqrt(s_k * s_{k+1}) the box sizes (w, h), relative to the
input, are (s_k, s_k), (s'_k, s'_k), then (s_k sqrt(a), s_k / sqrt(a)) and its transpose for each
aspect ratio a (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, section 2.2 "Choosing
scales and aspect ratios for default boxes"; Caffe SSD's PriorBox layer has the same order with
flip=true). They tile each map row-major, all of a location's boxes consecutively, centred on
((j + 0.5) * step / W, (i + 0.5) * step / H). Computed in float64, returned as float32 xyxy pixels.
"""

from __future__ import annotations

import math

import numpy as np

# Both SSD300s: the feature maps conv4_3, fc7, conv8_2 ... conv11_2 (ssd_pascal.py, torchvision ssd.py).
ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
STEPS = (8, 16, 32, 64, 100, 300)
SSD300_FEATURE_SIZES = (38, 19, 10, 5, 3, 1)

PRIORS = {
    # Caffe SSD300 (weiliu89/caffe examples/ssd/ssd_pascal.py): min_sizes [30, 60, 111, 162, 213, 264],
    # max_sizes [60, 111, 162, 213, 264, 315], divided by 300; clip=false.
    "voc": dict(scales=[0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05], clip=False),
    # torchvision ssd300_vgg16 (COCO): DefaultBoxGenerator(scales=..., clip=True, its default).
    "coco": dict(scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], clip=True),
}


def prior_set(priors="voc"):
    """The PRIORS entry named `priors`; ValueError naming the known ones otherwise."""
    if priors not in PRIORS:
        raise ValueError(f"unknown priors {priors!r}: known are {sorted(PRIORS)}")
    return PRIORS[priors]


def anchors_per_location(priors="voc"):
    """Boxes per location of each map, 2 + 2 per aspect ratio: [4, 6, 6, 6, 4, 4]
    (torchvision `DefaultBoxGenerator.num_anchors_per_location`)."""
    prior_set(priors)
    return [2 + 2 * len(ratios) for ratios in ASPECT_RATIOS]


def default_feature_sizes(input_hw=(300, 300)):
    """(rows, columns) of each map: SSD300's [38, 19, 10, 5, 3, 1] at 300x300, else ceil(side / step),
    the grid a map of that stride covers (also [38, 19, 10, 5, 3, 1] at 300). Pass `feature_sizes` to
    ssd_anchors for a backbone whose maps differ."""
    h, w = (int(v) for v in input_hw)
    if (h, w) == (300, 300):
        return [(f, f) for f in SSD300_FEATURE_SIZES]
    return [(math.ceil(h / step), math.ceil(w / step)) for step in STEPS]


def _normalise_sizes(feature_sizes):
    """Ints (square maps) or (rows, columns) pairs -> a list of (rows, columns)."""
    sizes = [(int(f), int(f)) if np.ndim(f) == 0 else (int(f[0]), int(f[1])) for f in feature_sizes]
    if len(sizes) != len(STEPS):
        raise ValueError(f"feature_sizes: {len(STEPS)} maps expected, got {len(sizes)}")
    if any(f < 1 for size in sizes for f in size):
        raise ValueError(f"feature_sizes must be positive, got {sizes}")
    return sizes


def box_sizes(scales, k, clip):
    """Map k's relative (w, h) pairs [n, 2], in torchvision `DefaultBoxGenerator._generate_wh_pairs`'s
    order; `clip` clamps them (the sizes, not the corners) to [0, 1] as its clip=True does."""
    s_k = scales[k]
    s_prime = math.sqrt(scales[k] * scales[k + 1])
    pairs = [[s_k, s_k], [s_prime, s_prime]]
    for ratio in ASPECT_RATIOS[k]:
        root = math.sqrt(ratio)
        pairs += [[s_k * root, s_k / root], [s_k / root, s_k * root]]
    pairs = np.asarray(pairs, np.float64)
    return np.clip(pairs, 0.0, 1.0) if clip else pairs


def _map_boxes(sizes, rows, cols, step, input_hw):
    """One map's relative (cx, cy, w, h) [rows * cols * n, 4]: locations row-major, each location's
    n boxes consecutively. Centres (arange + 0.5) / (side / step), torchvision's expression, but x over
    the width as Caffe's PriorBox (center_x / img_width): torchvision's `x_f_k, y_f_k = image_size /
    step` takes x over the height (image_size is (H, W)), which differs only for non-square inputs."""
    h, w = input_hw
    cx = (np.arange(cols, dtype=np.float64) + 0.5) / (w / step)
    cy = (np.arange(rows, dtype=np.float64) + 0.5) / (h / step)
    grid_y, grid_x = np.meshgrid(cy, cx, indexing="ij")
    centres = np.stack([grid_x.ravel(), grid_y.ravel()], axis=-1)  # [rows * cols, 2]
    n = len(sizes)
    centres = np.repeat(centres, n, axis=0)
    wh = np.tile(sizes, (rows * cols, 1))
    return np.concatenate([centres, wh], axis=-1)


def ssd_anchors(input_hw=(300, 300), priors="voc", feature_sizes=None):
    """SSD's prior boxes [A, 4] float32, xyxy pixels of an input of `input_hw` (height, width).

    8732 boxes at 300x300. `feature_sizes`: each map's size (an int for a square map, or (rows,
    columns)); default_feature_sizes(input_hw) when None.
    """
    prior = prior_set(priors)
    h, w = (int(v) for v in input_hw)
    sizes = _normalise_sizes(default_feature_sizes((h, w)) if feature_sizes is None else feature_sizes)
    rel = np.concatenate([
        _map_boxes(box_sizes(prior["scales"], k, prior["clip"]), rows, cols, STEPS[k], (h, w))
        for k, (rows, cols) in enumerate(sizes)])
    xyxy = np.concatenate([rel[:, :2] - 0.5 * rel[:, 2:], rel[:, :2] + 0.5 * rel[:, 2:]], axis=-1)
    return (xyxy * np.array([w, h, w, h], np.float64)).astype(np.float32)


# --- Faster R-CNN's region proposal anchors ----------------------------------------------------

RPN_LAYOUTS = ("torchvision", "pyfaster")


def rpn_cell_anchors(sizes=(128, 256, 512), ratios=(0.5, 1.0, 2.0), layout="torchvision"):
    """One location's RPN anchors [len(ratios) * len(sizes), 4] float32 xyxy, ratio-major then size
    (Ren et al., "Faster R-CNN", NIPS 2015, section 3.1.1: 3 scales x 3 aspect ratios, ratio = h / w).

    layout="torchvision" (`AnchorGenerator.generate_anchors`): centred on 0, h = sqrt(r) * s,
    w = s / sqrt(r), corners rounded (half to even, as torch.round). layout="pyfaster"
    (py-faster-rcnn `generate_anchors`, sizes = 16 x 2^(3..5)): Caffe's +1 pixel convention on a
    16x16 base box at (0, 0, 15, 15) (centre 7.5), width round(sqrt(256 / r)), height
    round(width * r), then scaled; the sizes must be multiples of 16.
    """
    if layout not in RPN_LAYOUTS:
        raise ValueError(f"unknown anchor layout {layout!r}: known are {list(RPN_LAYOUTS)}")
    sizes, ratios = np.asarray(sizes, np.float64), np.asarray(ratios, np.float64)
    if layout == "torchvision":
        h_ratios = np.sqrt(ratios.astype(np.float32)).astype(np.float32)
        w_ratios = (np.float32(1) / h_ratios).astype(np.float32)
        ws = (w_ratios[:, None] * sizes.astype(np.float32)[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * sizes.astype(np.float32)[None, :]).reshape(-1)
        return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)
    scales = sizes / 16.0
    if not np.allclose(scales, np.round(scales)):
        raise ValueError(f"pyfaster anchors scale a 16-pixel base box: sizes must be multiples of 16, got {sizes}")
    centre = 7.5
    base_ws = np.round(np.sqrt(256.0 / ratios))
    base_hs = np.round(base_ws * ratios)
    ws = (base_ws[:, None] * scales[None, :]).reshape(-1)
    hs = (base_hs[:, None] * scales[None, :]).reshape(-1)
    return np.stack([centre - 0.5 * (ws - 1), centre - 0.5 * (hs - 1),
                     centre + 0.5 * (ws - 1), centre + 0.5 * (hs - 1)], axis=1).astype(np.float32)


def rpn_anchors(feature_hw, stride, cell_anchors):
    """Every location's anchors [H * W * A, 4] float32: cell anchors shifted by (x, y) * stride,
    location-major (row, then column), a location's A anchors consecutively (torchvision
    `AnchorGenerator.grid_anchors`; py-faster-rcnn's proposal layer orders them the same).
    stride: (sy, sx) or one int; torchvision's is image size // feature size per axis."""
    rows, cols = (int(v) for v in feature_hw)
    sy, sx = (int(stride), int(stride)) if np.ndim(stride) == 0 else (int(v) for v in stride)
    grid_y, grid_x = np.meshgrid(np.arange(rows) * sy, np.arange(cols) * sx, indexing="ij")
    shifts = np.stack([grid_x.ravel(), grid_y.ravel(), grid_x.ravel(), grid_y.ravel()], axis=1)
    cells = np.asarray(cell_anchors, np.float32)
    return (shifts[:, None, :].astype(np.float32) + cells[None, :, :]).reshape(-1, 4)
