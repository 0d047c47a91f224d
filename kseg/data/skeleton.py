"""Skeleton datasets with a scale per skeleton point: SK-LARGE / SK-SMALL, and the synthetic skeleton set.

The layout (kseg.data.layouts.list_skeleton, layout name "skeleton") is the one SK-LARGE
(Shen et al., TIP 2017) and SK-SMALL, i.e. SK506 (Shen et al., CVPR 2016), are released in:

    ROOT/images/train/NAME.jpg    ROOT/groundTruth/train/NAME.mat
    ROOT/images/test/NAME.jpg     ROOT/groundTruth/test/NAME.mat

Each .mat (MATLAB format, read with scipy.io.loadmat) holds two H x W arrays: `symmetry`,
nonzero on the object skeleton, and `edge`, nonzero on the object boundary, as the authors'
own scripts read them (zeakey/DeepSkeleton tools/aug_data/aug_sk506_3_2.m: `gt.edge`,
`gt.symmetry`). A skeleton point's scale comes from them as in that script: the distance
to the nearest boundary pixel, `bwdist(edge)`, at least 1 on the skeleton (`scale(scale < 1
& symmetry) = 1`). kseg keeps it as the radius (`scale_map`); the script stores twice it,
the paper's scale (the skeleton's width), and kseg.tasks.skeleton quantises from the
radius with that factor.

`sk_large(root, split)` is a tf.data.Dataset of (image float32 [H, W, 3] RGB 0..255, or
preprocessed with preprocessing=; radius float32 [H, W, 1], 0 off the skeleton): the labels
kseg.tasks.skeleton trains and evaluates on (Skeleton.fit_targets quantises them). The
.mat files are read in a tf.numpy_function (SciPy). flip=True flips image and skeleton
left-right at random (exact for skeletons and their scales); the authors' offline
augmentation (3 scales x 4 rotations x 3 flips, the ground truth recomputed) is not part of
the reader. The images of SK-LARGE differ in size: batch_size > 1 needs images of one size
(the synthetic set's).

The synthetic skeleton set (`kseg data synth DIR --task skeleton`, kseg.data.synth) writes
kseg's synthetic shapes in this layout (splits train and val): each shape class's region
gets its medial axis (`medial_axis`) as `symmetry` and its contour as `edge`, so the same
reader gives each skeleton point its distance to the shape's boundary.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from kseg.data.layouts import list_skeleton

CLASS_NAMES = ("background", "skeleton")
SKELETON_FIELD, EDGE_FIELD = "symmetry", "edge"


# === ground truth ===


def read_ground_truth(path) -> tuple[np.ndarray, np.ndarray]:
    """(skeleton bool [H, W], boundary bool [H, W]) of one SK-LARGE .mat file."""
    from scipy.io import loadmat

    path = os.fspath(path)
    try:
        mat = loadmat(path)
    except Exception as e:  # SciPy raises many types for a broken or truncated file (IndexError, MatReadError, ...)
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({e or type(e).__name__})") from None
    found = sorted(k for k in mat if not k.startswith("__"))
    arrays = []
    for field in (SKELETON_FIELD, EDGE_FIELD):
        if field not in mat:
            raise ValueError(f"{path}: no `{field}` array (found: {', '.join(found) or 'nothing'}); an SK-LARGE "
                             f"ground truth holds `{SKELETON_FIELD}` (the skeleton) and `{EDGE_FIELD}` (the boundary)")
        value = np.asarray(mat[field])
        if value.ndim != 2:
            raise ValueError(f"{path}: `{field}` is {value.shape}, expected an H x W map")
        arrays.append(value != 0)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"{path}: `{SKELETON_FIELD}` is {arrays[0].shape} but `{EDGE_FIELD}` is {arrays[1].shape}")
    return arrays[0], arrays[1]


def scale_map(skeleton, edge) -> np.ndarray:
    """float32 [H, W]: on each skeleton pixel its distance to the nearest boundary pixel (at least 1), else 0."""
    from scipy.ndimage import distance_transform_edt

    skeleton, edge = np.asarray(skeleton, bool), np.asarray(edge, bool)
    if not skeleton.any():
        return np.zeros(skeleton.shape, np.float32)
    if not edge.any():
        raise ValueError("a skeleton without a boundary: its scales (distances to the boundary) are undefined")
    distance = distance_transform_edt(~edge)
    return np.where(skeleton, np.maximum(distance, 1.0), 0.0).astype(np.float32)


def load_scale_map(path) -> np.ndarray:
    """scale_map of one .mat file (read_ground_truth)."""
    return scale_map(*read_ground_truth(path))


def skeleton_splits(root) -> list[str]:
    """The splits of a dataset in the SK-LARGE layout: the folders in images/ or groundTruth/, sorted
    (SK-LARGE's train and test; the synthetic set's train and val)."""
    root = os.fspath(root)
    found = {name for sub in ("images", "groundTruth") if os.path.isdir(os.path.join(root, sub))
             for name in os.listdir(os.path.join(root, sub))
             if not name.startswith(".") and os.path.isdir(os.path.join(root, sub, name))}
    if not found:
        raise FileNotFoundError(f"{root}: no split folders in images/ or groundTruth/; expected the SK-LARGE layout "
                                f"(images/SPLIT/*.jpg, groundTruth/SPLIT/*.mat)")
    return sorted(found)


# === reader ===


def sk_large(root, split="train", *, preprocessing=None, batch_size=None, shuffle=None, seed=None, flip=False,
             cache=False, num_parallel_calls=None):
    """SK-LARGE / SK-SMALL (or the synthetic skeleton set) as (image, radius map) pairs; see the module docstring.

    shuffle defaults to flip (augmenting); cache=True keeps decoded pairs in memory (before the flips).
    """
    import tensorflow as tf

    from kseg.identity import resolve_preprocessing

    source = list_skeleton(root, split)
    if source.problems:
        shown = "\n  ".join(f"{p}: {r}" for p, r in source.problems[:10])
        raise FileNotFoundError(f"kseg.data.skeleton: {len(source.problems)} files have no partner:\n  {shown}")
    if not source.images:
        raise ValueError(f"{root}: no images in images/{split}")
    prep = resolve_preprocessing(preprocessing)
    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    shuffle = flip if shuffle is None else shuffle
    ds = tf.data.Dataset.from_tensor_slices((source.images, source.labels))
    if shuffle:
        ds = ds.shuffle(len(source.images), seed=seed, reshuffle_each_iteration=True)

    def radius_of(path):
        return load_scale_map(path.decode("utf-8"))

    def load(image_path, mat_path):
        image = tf.io.decode_image(tf.io.read_file(image_path), channels=3, expand_animations=False)
        radius = tf.numpy_function(radius_of, [mat_path], tf.float32, stateful=False)
        radius = tf.ensure_shape(radius, [None, None])[..., None]
        same = tf.debugging.assert_equal(tf.shape(image)[:2], tf.shape(radius)[:2], message=tf.strings.join(
            ["kseg.data.skeleton: the image and its ground truth differ in size: ", image_path, " ", mat_path]))
        with tf.control_dependencies([same]):
            return tf.cast(image, tf.float32), tf.identity(radius)

    ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    if cache:
        ds = ds.cache()
    if flip:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

        def flipped(pair, seed_pair):
            image, radius = pair
            mirror = tf.random.stateless_uniform([], seed=seed_pair) < 0.5
            return (tf.where(mirror, image[:, ::-1], image), tf.where(mirror, radius[:, ::-1], radius))

        ds = tf.data.Dataset.zip((ds, seeds)).map(flipped, num_parallel_calls=parallel, deterministic=True)
    if batch_size:
        ds = ds.batch(batch_size)
    if prep is not None:
        ds = ds.map(lambda x, y: (prep.apply(x), y), num_parallel_calls=parallel, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    ds.class_names = list(CLASS_NAMES)
    ds.num_classes = len(CLASS_NAMES)
    return ds


# === the synthetic skeleton set ===

# A region pixel is on the medial axis where the average outward flux of the distance map's gradient
# through its 8 neighbours is below -FLUX: the gradient converges there from two sides (Siddiqi,
# Bouix, Tannenbaum & Zucker, Hamilton-Jacobi Skeletons, IJCV 2002). Where two boundary parts meet at
# an angle 2a the flux is about -0.6 sin(a): 0.3 keeps every corner of the synthetic shapes (90 and
# 60 degrees) and the centre line between opposite sides, and none of the staircase of a digital
# circle (whose flux stays near -1 / (2 x radius)).
FLUX = 0.3
_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def medial_axis(mask, flux=FLUX) -> tuple[np.ndarray, np.ndarray]:
    """(skeleton bool [H, W], distance float [H, W]) of a binary region; outside the image is outside it.

    `distance` is each pixel's Euclidean distance to the nearest pixel outside the region. The
    ridge where the average outward flux of its gradient is below -flux (see FLUX), one to three
    pixels wide, is thinned to one pixel (kseg.tasks.bsds.thin: bwmorph 'thin').
    """
    from scipy.ndimage import distance_transform_edt

    from kseg.tasks.bsds import thin  # kseg.tasks loads TensorFlow: only when skeletons are computed

    mask = np.asarray(mask, bool)
    h, w = mask.shape
    padded = np.pad(mask, 2)
    distance = distance_transform_edt(padded)
    gy, gx = np.gradient(distance)
    outward = np.zeros((h, w))
    for dy, dx in _NEIGHBOURS:
        rows, cols = slice(2 + dy, 2 + dy + h), slice(2 + dx, 2 + dx + w)
        outward += (gy[rows, cols] * dy + gx[rows, cols] * dx) / np.hypot(dy, dx)
    ridge = mask & (outward / len(_NEIGHBOURS) < -flux)
    return thin(ridge), distance[2:-2, 2:-2].astype(np.float32)


def contour(mask) -> np.ndarray:
    """The region's pixels with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(np.asarray(mask, bool), 1)
    core = padded[1:-1, 1:-1]
    interior = core & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return core & ~interior


def skeleton_ground_truth(label) -> tuple[np.ndarray, np.ndarray]:
    """(symmetry, edge) bool maps of a label map (one region per class value > 0): each region's
    medial axis and contour."""
    label = np.asarray(label)
    skeleton = np.zeros(label.shape, bool)
    edge = np.zeros(label.shape, bool)
    for value in np.unique(label):
        if value == 0:
            continue
        region = label == value
        skeleton |= medial_axis(region)[0]
        edge |= contour(region)
    return skeleton, edge


def write_skeleton_set(root, samples, *, train, quality=90, info=None) -> dict:
    """Write (image uint8 [H, W, 3], label [H, W]) samples in the SK-LARGE layout; returns the description.

    The first `train` samples go to the train split, the rest to val: images/<split>/synth_NNNNN.jpg,
    groundTruth/<split>/synth_NNNNN.mat (`symmetry`, `edge` as uint8 0/1: skeleton_ground_truth
    of the label), and root/synth.json (`info` plus the counts). The content is a function of the
    samples; the .mat headers carry their creation time (scipy.io.savemat's), so the files are not
    byte-identical from run to run.
    """
    from scipy.io import savemat

    root = os.fspath(root)
    counts = {"train": 0, "val": 0}
    pixels = 0
    for i, (image, label) in enumerate(samples):
        split = "train" if i < train else "val"
        for sub in ("images", "groundTruth"):
            os.makedirs(os.path.join(root, sub, split), exist_ok=True)
        name = f"synth_{i:05d}"
        skeleton, edge = skeleton_ground_truth(label)
        Image.fromarray(image).save(os.path.join(root, "images", split, name + ".jpg"), quality=quality)
        savemat(os.path.join(root, "groundTruth", split, name + ".mat"),
                {SKELETON_FIELD: skeleton.astype(np.uint8), EDGE_FIELD: edge.astype(np.uint8)}, do_compression=True)
        counts[split] += 1
        pixels += int(skeleton.sum())
    description = {**(info or {}), "layout": "skeleton", "splits": counts, "skeleton_pixels": pixels}
    with open(os.path.join(root, "synth.json"), "w") as f:
        json.dump(description, f, indent=1)
        f.write("\n")
    return description
