"""The BSDS edge benchmark as HED and its successors report it, in NumPy.

Per image (Dollár & Zitnick's edgesEvalImg with the HED-family non-maximum suppression):

1. NMS (`edge_nms`, edgesNmsMex with r=1, s=5, m=1.01): the edge orientation from second
   derivatives of the map smoothed by a triangle filter of radius 4 (convTri, gradient2:
   O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi)); a pixel survives when 1.01 times its
   value is not below the bilinearly interpolated values one pixel away on either side along
   the normal; values within 5 pixels of the border are scaled down linearly.
2. For each of 99 thresholds t = 0.01 .. 0.99: the map >= t, thinned to one pixel
   (`thin`: MATLAB's bwmorph(.., 'thin', inf), Guo & Hall's two-subiteration algorithm).
3. One-to-one matching of predicted and ground-truth edge pixels within maxDist = 0.0075 of
   the image diagonal (`match_edges`). The benchmark's correspondPixels solves a min-cost
   assignment in which leaving a pixel unmatched costs 100 * maxDist and a match costs its
   distance (<= maxDist): each extra match saves more than any rearrangement of distances
   can cost, so its matched counts are those of a maximum-cardinality matching. kseg computes
   one exactly (greedy nearest-first, then Kuhn's augmenting paths from every unmatched
   predicted pixel); which pixels pair up may differ, the counts do not (the benchmark's
   sparse outlier graph is itself an approximation: tests/test_edges_cli.py measures the
   agreement with pyEdgeEval's build of correspondPixels).
4. ODS: one threshold for the dataset, F from the counts summed over images, interpolated
   between thresholds as findBestRPF does; OIS: each image's best threshold, F from the
   counts summed at those thresholds.
"""

from __future__ import annotations

import numpy as np

MAX_DIST = 0.0075  # the BSDS benchmark's maxDist, a fraction of the image diagonal


# === NMS ===


def conv_tri(image, r):
    """Dollár's convTri: a separable triangle filter of radius r, symmetric padding."""
    image = np.asarray(image, np.float64)
    if r <= 0:
        return image
    if r <= 1:
        p = 12 / r / (r + 2) - 2
        f = np.array([1.0, p, 1.0]) / (2 + p)
        r = 1
    else:
        r = int(r)
        f = np.array([*range(1, r + 2), *range(r, 0, -1)], np.float64) / (r + 1) ** 2
    h, w = image.shape
    padded = np.pad(image, r, mode="symmetric")
    rows = sum(f[k] * padded[k: k + h, :] for k in range(len(f)))
    return sum(f[k] * rows[:, k: k + w] for k in range(len(f)))


def _gradient2(image):
    """MATLAB's gradient: (d/dx along columns, d/dy along rows), central inside, one-sided at borders."""
    gx = np.gradient(image, axis=1) if image.shape[1] > 1 else np.zeros_like(image)
    gy = np.gradient(image, axis=0) if image.shape[0] > 1 else np.zeros_like(image)
    return gx, gy


def edge_orientation(edges):
    """The normal's angle in [0, pi) per pixel, from second derivatives of convTri(edges, 4)."""
    ox, oy = _gradient2(conv_tri(edges, 4))
    oxx, _ = _gradient2(ox)
    oxy, oyy = _gradient2(oy)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = oyy * np.sign(-oxy) / (oxx + 1e-5)
    return np.mod(np.arctan(ratio), np.pi)


def _interp(image, x, y):
    h, w = image.shape
    x = np.clip(x, 0, w - 1.001)
    y = np.clip(y, 0, h - 1.001)
    x0, y0 = x.astype(np.int64), y.astype(np.int64)
    dx0, dy0 = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    return (image[y0, x0] * (1 - dx0) * (1 - dy0) + image[y0, x1] * dx0 * (1 - dy0)
            + image[y1, x0] * (1 - dx0) * dy0 + image[y1, x1] * dx0 * dy0)


def edge_nms(edges, orientation=None, r=1, s=5, m=1.01):
    """edgesNmsMex: suppress pixels weaker (times m) than their neighbours along the normal."""
    edges = np.asarray(edges, np.float64)
    o = edge_orientation(edges) if orientation is None else np.asarray(orientation, np.float64)
    h, w = edges.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cos_o, sin_o = np.cos(o), np.sin(o)
    keep = edges != 0
    e = edges * m
    for d in range(-r, r + 1):
        if d:
            keep &= ~(e < _interp(edges, xs + d * cos_o, ys + d * sin_o))
    out = np.where(keep, edges, 0.0)
    s = min(s, w // 2, h // 2)
    if s > 0:
        for size, axis in ((w, 1), (h, 0)):
            i = np.arange(size)
            factor = np.minimum(np.minimum(i, size - 1 - i), s) / s
            out = out * (factor[None, :] if axis == 1 else factor[:, None])
    return out


# === thinning ===


def _thin_luts():
    """Guo & Hall's deletion tables over the 8 neighbours (bit k: x_{k+1}, x1 east, counter-clockwise)."""
    first, second = np.zeros(256, bool), np.zeros(256, bool)
    for n in range(256):
        x = [bool(n >> k & 1) for k in range(8)]
        x += x[:1]
        g1 = sum(1 for i in (0, 2, 4, 6) if not x[i] and (x[i + 1] or x[i + 2])) == 1
        n1 = sum(1 for k in (0, 2, 4, 6) if x[k] or x[k + 1])
        n2 = sum(1 for k in (1, 3, 5, 7) if x[k] or x[k + 1])
        g2 = 2 <= min(n1, n2) <= 3
        g3 = not ((x[1] or x[2] or not x[7]) and x[0])
        g3p = not ((x[5] or x[6] or not x[3]) and x[4])
        first[n], second[n] = g1 and g2 and g3, g1 and g2 and g3p
    return first, second


_LUTS = _thin_luts()
# (row, column) offset of neighbour x1..x8: E, NE, N, NW, W, SW, S, SE.
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def thin(mask, max_iterations=None):
    """bwmorph(mask, 'thin', inf): thin binary regions to one-pixel lines, keeping 8-connectivity."""
    skel = np.asarray(mask, bool).copy()
    h, w = skel.shape
    iterations = 0
    while max_iterations is None or iterations < max_iterations:
        before = int(skel.sum())
        for lut in _LUTS:
            padded = np.pad(skel, 1)
            code = np.zeros((h, w), np.int64)
            for k, (dy, dx) in enumerate(_NEIGHBOURS):
                code |= padded[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w].astype(np.int64) << k
            skel &= ~(lut[code] & skel)
        iterations += 1
        if int(skel.sum()) == before:
            break
    return skel


# === matching ===


def match_edges(pred, gt, max_dist_px):
    """One-to-one matching of edge pixels within `max_dist_px`: (matched pred mask, matched gt mask).

    A maximum-cardinality matching (see the module docstring), computed exactly: candidate
    pairs within the radius, nearest-first greedy, then an augmenting-path search from each
    unmatched predicted pixel.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    h, w = gt.shape
    py, px = np.nonzero(pred)
    gid = np.full((h, w), -1, np.int64)
    gy, gx = np.nonzero(gt)
    gid[gy, gx] = np.arange(len(gy))
    r = int(np.ceil(max_dist_px))
    ps, gs, ds = [], [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            d2 = dy * dy + dx * dx
            if d2 > max_dist_px * max_dist_px:
                continue
            y, x = py + dy, px + dx
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            idx = np.nonzero(inside)[0]
            g = gid[y[idx], x[idx]]
            hit = g >= 0
            ps.append(idx[hit])
            gs.append(g[hit])
            ds.append(np.full(int(hit.sum()), d2))
    match_p = np.full(len(py), -1, np.int64)
    match_g = np.full(len(gy), -1, np.int64)
    if ps:
        p_all, g_all, d_all = np.concatenate(ps), np.concatenate(gs), np.concatenate(ds)
        order = np.lexsort((g_all, p_all, d_all))
        p_all, g_all = p_all[order], g_all[order]
        for p, g in zip(p_all.tolist(), g_all.tolist()):  # nearest first
            if match_p[p] < 0 and match_g[g] < 0:
                match_p[p], match_g[g] = g, p
        by_p = np.argsort(p_all, kind="stable")
        starts = np.searchsorted(p_all[by_p], np.arange(len(py) + 1))
        neighbours = g_all[by_p]
        _augment(match_p, match_g, neighbours, starts)
    matched_pred = np.zeros((h, w), bool)
    matched_gt = np.zeros((h, w), bool)
    matched_pred[py[match_p >= 0], px[match_p >= 0]] = True
    matched_gt[gy[match_g >= 0], gx[match_g >= 0]] = True
    return matched_pred, matched_gt


def _augment(match_p, match_g, neighbours, starts):
    """Kuhn's algorithm: one breadth-first augmenting-path search from each unmatched left vertex.

    Right vertices reached by a failed search stay marked until the next augmentation: the
    matching has not changed, so no augmenting path runs through them (each failed search
    costs at most the edges it has not seen before).
    """
    seen = np.full(len(match_g), -1, np.int64)
    parent = np.full(len(match_g), -1, np.int64)
    free = [p for p in np.nonzero(match_p < 0)[0].tolist() if starts[p + 1] > starts[p]]
    phase = 0
    for root in free:
        queue, head, end = [root], 0, -1
        while head < len(queue) and end < 0:
            p = queue[head]
            head += 1
            for g in neighbours[starts[p]: starts[p + 1]].tolist():
                if seen[g] == phase:
                    continue
                seen[g], parent[g] = phase, p
                if match_g[g] < 0:
                    end = g
                    break
                queue.append(int(match_g[g]))
        if end >= 0:
            phase += 1
        g = end
        while g >= 0:  # flip the path back to the root
            p = int(parent[g])
            previous = int(match_p[p])
            match_p[p], match_g[g] = g, p
            g = previous


# === the benchmark ===


def thresholds_of(thresholds=99):
    """edgesEvalImg's thresholds: a count K gives linspace(1/(K+1), 1-1/(K+1), K); a sequence passes."""
    if np.isscalar(thresholds):
        k = int(thresholds)
        return np.linspace(1 / (k + 1), 1 - 1 / (k + 1), k)
    return np.asarray(thresholds, np.float64)


def image_counts(pred, gt, thresholds=99, max_dist=MAX_DIST, tolerance_px=None, nms=True, thinning=True):
    """[K, 4] counts of one image per threshold: (matched predicted, predicted, matched gt, gt)."""
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    radius = float(tolerance_px) if tolerance_px is not None else max_dist * float(np.hypot(*gt.shape))
    if nms:
        pred = edge_nms(pred)
    ts = thresholds_of(thresholds)
    counts = np.zeros((len(ts), 4))
    for k, t in enumerate(ts):
        e = pred >= t
        if thinning:
            e = thin(e)
        if gt.any() and e.any():
            matched_e, matched_g = match_edges(e, gt, radius)
        else:
            matched_e = matched_g = np.zeros(0)
        counts[k] = (matched_e.sum(), e.sum(), matched_g.sum(), gt.sum())
    return counts


def _f(precision, recall):
    return np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)


def _pr(c):
    return c[..., 0] / np.maximum(c[..., 1], 1e-12), c[..., 2] / np.maximum(c[..., 3], 1e-12)


def best_rpf(ts, recall, precision):
    """findBestRPF: the best F along the R/P curve, linearly interpolated (100 steps) between thresholds."""
    if len(ts) == 1:
        return float(ts[0]), float(recall[0]), float(precision[0]), float(_f(precision[0], recall[0]))
    a = np.linspace(0, 1, 100)
    best = (float(ts[0]), float(recall[0]), float(precision[0]), -1.0)
    for j in range(1, len(ts)):
        rj = recall[j] * a + recall[j - 1] * (1 - a)
        pj = precision[j] * a + precision[j - 1] * (1 - a)
        tj = ts[j] * a + ts[j - 1] * (1 - a)
        fj = _f(pj, rj)
        k = int(np.argmax(fj))
        if fj[k] > best[3]:
            best = (float(tj[k]), float(rj[k]), float(pj[k]), float(fj[k]))
    return best


def scores_from_counts(counts, ts) -> dict:
    """ODS / OIS from [images, K, 4] counts (edgesEvalDir's definitions)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum(axis=0)
    precision, recall = _pr(total)
    ods_t, ods_r, ods_p, ods_f = best_rpf(ts, recall, precision)
    p_img, r_img = _pr(counts)
    best = np.argmax(_f(p_img, r_img), axis=1)
    chosen = counts[np.arange(len(counts)), best].sum(axis=0)
    ois_p, ois_r = _pr(chosen)
    return {"ods": ods_f, "ods_threshold": ods_t, "ods_precision": ods_p, "ods_recall": ods_r,
            "ois": float(_f(ois_p, ois_r)), "ois_thresholds": [float(ts[k]) for k in best],
            "ois_precision": float(ois_p), "ois_recall": float(ois_r)}


def edge_ods_ois(predictions, ground_truths, thresholds=99, max_dist=MAX_DIST, tolerance_px=None, nms=True,
                 thinning=True) -> dict:
    """ODS and OIS F-measures of edge probability maps by the BSDS protocol (module docstring).

    predictions: edge probabilities in [0, 1], one [H, W] array per image. ground_truths:
    [H, W] arrays, > 0 is an edge. thresholds: a count (the benchmark's 99) or a sequence.
    max_dist: the matching radius as a fraction of the image diagonal (0.0075: 4.3 pixels on
    481x321); tolerance_px: the radius in pixels instead. nms / thinning: the protocol's two
    thinning steps (off: the thresholded map is matched as it is).
    Returns {"ods", "ods_threshold", "ods_precision", "ods_recall", "ois", "ois_thresholds"
    (one per image), "ois_precision", "ois_recall"}.
    """
    if len(predictions) != len(ground_truths) or not len(predictions):
        raise ValueError(f"need as many predictions as ground truths (>0), "
                         f"got {len(predictions)} and {len(ground_truths)}")
    ts = thresholds_of(thresholds)
    counts = []
    for i, (p, g) in enumerate(zip(predictions, ground_truths)):
        try:
            counts.append(image_counts(p, g, ts, max_dist, tolerance_px, nms, thinning))
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from None
    return scores_from_counts(np.stack(counts), ts)
