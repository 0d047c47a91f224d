"""Selective Search region proposals (Uijlings, van de Sande, Gevers, Smeulders, "Selective Search for
Object Recognition", IJCV 2013): the class-agnostic boxes R-CNN (CVPR 2014) and Fast R-CNN (ICCV 2015)
detect on, about 2000 per image in the fast mode.

    boxes = selective_search(rgb_uint8)              # (N, 4) float32 xyxy pixels, OpenCV's ranking
    boxes = selective_search(rgb_uint8, mode="quality", max_boxes=300)

The algorithm is OpenCV contrib's (modules/ximgproc/src/selectivesearchsegmentation.cpp,
`cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`, from the wheel
opencv-contrib-python-headless: `pip install 'kseg[proposals]'`): Felzenszwalb-Huttenlocher graph
segmentations, then greedy hierarchical grouping by colour, texture, size and fill similarities.
mode="fast" is `switchToSelectiveSearchFast()` (HSV and Lab, k = 150, 300, 450, two similarity
strategies: 12 hierarchies), "quality" `switchToSelectiveSearchQuality()` (five colour spaces,
k = 150 .. 750, four strategies). R-CNN's selective_search_boxes.m (rbgirshick/rcnn) ran the authors'
MATLAB code in its fast mode (HSV and Lab, k = 50, 100, two strategies), so the boxes are of the same
kind, not the same boxes.

Conventions:
- Boxes: OpenCV returns (x, y, w, h) with w, h the region's extent in pixels (cv::boundingRect of its
  pixels: a region covering columns 10..29 gives x = 10, w = 20). kseg returns corners
  (x1, y1, x2, y2) = (x, y, x + w, y + h): continuous pixel corners (x1 <= x < x2), the convention of
  kseg's ground truth and of fast_rcnn_vgg16's proposals input; every box lies within the image
  (0 <= x1 < x2 <= W). (py-faster-rcnn's .mat files hold inclusive pixel indices, x2 = x + w - 1:
  kseg.detection.precomputed reads those as they are.)
- Order: OpenCV ranks the boxes as the paper and R-CNN do: each region's hierarchy level times a
  random number, ascending (its `rank`; R-CNN: `priority .* rand`), so the first boxes mix small and
  large regions of every hierarchy; duplicates keep their first place. `max_boxes` keeps the first
  boxes of that order. OpenCV draws the random numbers from the C library's rand(); seed= reseeds it
  (srand) before each call, so an image always gives the same order (glibc and macOS; elsewhere the
  order may vary between runs, the set of boxes never does).
- Small boxes: R-CNN drops boxes narrower or lower than 20 pixels (selective_search_boxes.m,
  minBoxWidth = 20), py-faster-rcnn those under 2 pixels when it loads them (filter_small_boxes):
  min_size (default 20) keeps boxes with both sides >= min_size pixels.

Time per image (OpenCV 5.1, 2-core machine, one image at a time; cv2.setNumThreads(1) and (2) measured
the same, so kseg leaves OpenCV's threading alone): fast mode 75 ms at 128 x 128 (about 100-200
boxes), 1.0 s at 500 x 375 (about 750 boxes); quality mode 0.28 s and 3.4-3.9 s.
"""

from __future__ import annotations

import numpy as np

MODES = ("fast", "quality")
# R-CNN's selective_search_boxes.m keeps boxes whose sides are >= minBoxWidth = 20 pixels.
MIN_SIZE = 20
# ~2000 boxes per image: R-CNN (section 2.1) and Fast R-CNN's test-time proposals.
MAX_BOXES = 2000
INSTALL = "pip install 'kseg[proposals]'  (opencv-contrib-python-headless: OpenCV's ximgproc module)"


def check_installed():
    """cv2 with the contrib ximgproc module, or an ImportError saying what to install."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"Selective Search needs OpenCV's contrib package ({e}); install it with: {INSTALL}",
                          name="cv2") from None
    if not hasattr(cv2, "ximgproc"):
        raise ImportError("Selective Search needs OpenCV's contrib module ximgproc, which this cv2 lacks (the "
                          f"plain opencv-python wheel); install it with: pip uninstall opencv-python && {INSTALL}",
                          name="cv2")
    return cv2


def _as_rgb(image):
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"selective_search takes an RGB image (H, W, 3) (or grayscale (H, W)), got shape {a.shape}")
    if min(a.shape[:2]) < 1:
        raise ValueError(f"selective_search: an empty image of shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64)), 0, 255).astype(np.uint8)
    return a


def _seed_c_rand(seed):
    """srand(seed) in the C library OpenCV's rank draws from (glibc, macOS); a no-op where unreachable."""
    import ctypes

    try:
        ctypes.CDLL(None).srand(ctypes.c_uint(int(seed) & 0xFFFFFFFF))
    except (OSError, TypeError, AttributeError):  # Windows: no process-wide C library handle
        pass


def selective_search(image, *, mode="fast", max_boxes=MAX_BOXES, min_size=MIN_SIZE, max_side=None,
                     seed=0) -> np.ndarray:
    """Selective Search boxes of one image: (N, 4) float32 (x1, y1, x2, y2) pixels, N <= max_boxes.

    image: RGB uint8 (H, W, 3) (grayscale (H, W) is repeated; other dtypes are rounded and clipped to
    0..255). mode: "fast" (R-CNN's and Fast R-CNN's) or "quality". max_boxes: keep the first boxes of
    OpenCV's ranking (None: all). min_size: drop boxes with a side under min_size pixels (of `image`).
    max_side: run on a copy resized (area interpolation) so its longer side is at most max_side pixels
    and scale the boxes back (large photos: the time grows faster than the pixel count); None runs at
    the image's own size. seed: the C library's rand() seed OpenCV ranks with (module docstring), None
    to leave it alone. Duplicate boxes are dropped (OpenCV drops them already), the order kept.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_boxes is not None and (isinstance(max_boxes, bool) or int(max_boxes) != max_boxes or max_boxes < 1):
        raise ValueError(f"max_boxes must be a positive int or None, got {max_boxes!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0 pixels, got {min_size!r}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels or None, got {max_side!r}")
    cv2 = check_installed()
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    factor = 1.0
    if max_side is not None and max(h, w) > max_side:
        factor = max_side / max(h, w)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))  # cv2: (width, height)
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV's images are BGR
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    if seed is not None:
        _seed_c_rand(seed)
    rects = np.asarray(search.process(), np.float64).reshape(-1, 4)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if factor != 1.0:
        rh, rw = rgb.shape[:2]
        boxes = boxes * np.array([w / rw, h / rh, w / rw, h / rh])
        boxes = np.clip(boxes, 0, [w, h, w, h])
    boxes = boxes.astype(np.float32)
    keep = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    boxes = boxes[keep]
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    return boxes[:max_boxes] if max_boxes is not None else boxes
