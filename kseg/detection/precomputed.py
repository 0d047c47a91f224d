"""Precomputed region proposals, for Fast R-CNN (Girshick, ICCV 2015) and R-CNN, which detect on
Selective Search's boxes: reading proposal files, padding them to the fixed R rows kseg's
fast_rcnn_vgg16 takes, and the PaddedProposals layer that marks the padding rows in the model.

Files (load_proposals) give `{image_id: (N, 4) float32 (x1, y1, x2, y2)}`:
- `.npz`: one array per image, keyed by its id (`np.savez(path, **{image_id: boxes})`), xyxy.
- `.json`: `{"image_id": [[x1, y1, x2, y2], ...], ...}`.
- `.mat`: py-faster-rcnn's Selective Search data (data/selective_search_data/voc_2007_test.mat
  ...): a cell array `boxes` of (N, 4) matrices in MATLAB's 1-based (y1, x1, y2, x2), read as
  py-faster-rcnn's lib/datasets/pascal_voc.py `_load_selective_search_roidb` reads it,
  `raw[:, (1, 0, 3, 2)] - 1`: its 0-based (x1, y1, x2, y2), the boxes its networks were trained
  and tested on (unlike kseg's VOC ground-truth reader, x2 and y2 are not corners: one pixel less).
  That function then also drops duplicate boxes and boxes under 2 pixels; this reader keeps every
  box. Image ids come from the file's cell array `images` if it has one, else from `image_ids`
  (the split's ImageSets order: py-faster-rcnn's `image_index`). MATLAB v5 files (what
  py-faster-rcnn ships) are read with scipy.io.loadmat, v7.3 (HDF5) files with h5py.
Every malformed file or entry raises a ValueError naming the file (and the image).

Padding (pad_proposals, batch_proposals): zero rows after an image's boxes. In the model a row is
padding when x2 <= x1 or y2 <= y1 (so also a given box of zero width, and a NaN row).
"""

from __future__ import annotations

import json
import os
import zipfile

import keras
import numpy as np
import tensorflow as tf

SUFFIXES = (".npz", ".json", ".mat")


def load_proposals(path, *, image_ids=None) -> dict[str, np.ndarray]:
    """`{image_id: (N, 4) float32 xyxy}` from a .npz, .json or .mat file (module docstring).
    image_ids: the images of a .mat file without an `images` variable, in the file's order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such proposals file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        out = _read_npz(path)
    elif suffix == ".json":
        out = _read_json(path)
    elif suffix == ".mat":
        out = _read_mat(path, image_ids)
    else:
        raise ValueError(f"{path}: unknown proposals format {suffix!r}; kseg reads {', '.join(SUFFIXES)}")
    return {str(k): _check_boxes(v, path, k) for k, v in out.items()}


def _check_boxes(boxes, path, image_id):
    try:
        a = np.asarray(boxes, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: proposals of image {image_id!r} are not numbers ({e})") from None
    if a.size == 0:
        return np.zeros((0, 4), np.float32)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{path}: proposals of image {image_id!r} must be (N, 4) boxes, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{path}: proposals of image {image_id!r} hold non-finite values")
    return a


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:  # object arrays need pickle, which could run code: refused
        raise ValueError(f"{path}: cannot read the .npz ({e}); store one float array per image id") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e}); truncated?") from None


def _read_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{image_id: [[x1, y1, x2, y2], ...]}}, "
                         f"got a JSON {type(data).__name__}")
    return data


# --- MATLAB .mat ------------------------------------------------------------------------


def _read_mat(path, image_ids):
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"MATLAB 7.3"):
        boxes, names = _read_mat73(path)
    elif head.startswith(b"MATLAB 5.0"):
        boxes, names = _read_mat5(path)
    else:
        raise ValueError(f"{path}: not a MATLAB v5 or v7.3 .mat file (header {head[:20]!r})")
    if names is None:
        if image_ids is None:
            raise ValueError(f"{path}: the file has no 'images' variable; pass image_ids= (the split's "
                             "image ids in the file's order, as py-faster-rcnn's image_index)")
        names = [str(i) for i in image_ids]
    if len(names) != len(boxes):
        raise ValueError(f"{path}: {len(boxes)} box matrices but {len(names)} image ids")
    out = {}
    for name, raw in zip(names, boxes):
        raw = _check_boxes(raw, path, name)
        # py-faster-rcnn pascal_voc.py: 1-based (y1, x1, y2, x2) -> 0-based (x1, y1, x2, y2).
        out[name] = raw[:, (1, 0, 3, 2)] - 1 if len(raw) else raw
    return out


def _read_mat5(path):
    try:
        import scipy.io
    except ImportError:
        raise ValueError(f"{path}: a MATLAB v5 .mat file; reading it needs scipy "
                         "(pip install 'kseg[proposals]')") from None
    try:
        data = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises a zoo of types for damaged files
        raise ValueError(f"{path}: cannot read the .mat file ({type(e).__name__}: {e})") from None
    if "boxes" not in data:
        raise ValueError(f"{path}: no 'boxes' variable (has {sorted(k for k in data if not k.startswith('__'))})")
    boxes = list(np.asarray(data["boxes"]).ravel())
    names = None
    if "images" in data:
        names = [_mat5_text(n) for n in np.asarray(data["images"]).ravel()]
    return boxes, names


def _mat5_text(value):
    """A cell of MATLAB char as scipy gives it (array(['000001'], dtype='<U6')) -> '000001'."""
    value = np.asarray(value).ravel()
    return "".join(str(v) for v in value)


def _read_mat73(path):
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the v7.3 .mat file as HDF5 ({e}); truncated?") from None
    with f:
        if "boxes" not in f:
            raise ValueError(f"{path}: no 'boxes' variable (has {sorted(k for k in f if not k.startswith('#'))})")
        # MATLAB writes column-major: a cell's references and each matrix come transposed.
        boxes = [_mat73_matrix(f[ref]).T for ref in np.asarray(f["boxes"]).ravel()]
        names = None
        if "images" in f:
            # MATLAB char: UTF-16 code units.
            names = ["".join(map(chr, _mat73_matrix(f[ref]).ravel().astype(int)))
                     for ref in np.asarray(f["images"]).ravel()]
    return boxes, names


def _mat73_matrix(dataset):
    if dataset.attrs.get("MATLAB_empty", 0):
        return np.zeros((4, 0))  # an empty matrix stores its dims as data
    return np.asarray(dataset)


# --- padding ------------------------------------------------------------------------------


def pad_proposals(boxes, num_proposals, *, truncate=False, scale=1.0):
    """(N, 4) boxes -> ((R, 4) float32 rows, (R,) bool mask), R = num_proposals, padded with zero
    rows (the model's padding: x2 <= x1). scale: a factor (or (sx, sy)) for the input's resize, as
    py-faster-rcnn's `_project_im_rois`. More than R boxes raise unless truncate=True, which keeps
    the first R in the given order. The model itself also masks a given box with x2 <= x1 or y2 <= y1."""
    a = np.asarray(boxes, np.float32).reshape(-1, 4)
    r = int(num_proposals)
    if len(a) > r and not truncate:
        raise ValueError(f"{len(a)} proposals do not fit {r} rows; build the model with num_proposals={len(a)} "
                         "or pass truncate=True to keep the first rows")
    a = a[:r] * np.tile(np.broadcast_to(np.asarray(scale, np.float32), (2,)), 2)
    rows = np.zeros((r, 4), np.float32)
    rows[: len(a)] = a
    return rows, np.arange(r) < len(a)


def batch_proposals(proposals: dict, image_ids, num_proposals, *, truncate=False, scales=None):
    """Padded (B, R, 4) rows and (B, R) masks of `image_ids` from a load_proposals dict;
    scales: per image a factor or (sx, sy) (pad_proposals), default 1."""
    rows, masks = [], []
    for i, image_id in enumerate(image_ids):
        key = str(image_id)
        if key not in proposals:
            raise KeyError(f"no proposals for image {key!r} ({len(proposals)} images have some)")
        r, m = pad_proposals(proposals[key], num_proposals, truncate=truncate,
                             scale=1.0 if scales is None else scales[i])
        rows.append(r)
        masks.append(m)
    return np.stack(rows), np.stack(masks)


# --- in the model ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="kseg")
class PaddedProposals(keras.layers.Layer):
    """proposals (B, R, 4) xyxy -> [boxes (B, R, 4), mask (B, R) bool]: mask is False on padding
    rows (x2 <= x1 or y2 <= y1, NaN included), whose boxes become (0, 0, 0, 0), so RoI pooling
    sees finite boxes whatever the padding holds. Registered as `kseg>PaddedProposals`: a saved
    model loads in a process that imported this module (kseg.models imports it)."""

    def call(self, proposals):
        proposals = tf.cast(proposals, tf.float32)
        x1, y1, x2, y2 = tf.unstack(proposals, 4, axis=-1)  # no ellipsis slice: TFLite builtins
        mask = tf.logical_and(x2 > x1, y2 > y1)
        return [tf.where(tf.expand_dims(mask, -1), proposals, 0.0), mask]

    def compute_output_spec(self, proposals):
        return [keras.KerasTensor(proposals.shape, "float32"), keras.KerasTensor(proposals.shape[:-1], "bool")]
