"""Label maps as files: the VOC colour map, index PNG read/write, colour overlays.

A segmentation label is a map of class indices. VOC ships them as palette ("P" mode)
PNGs, whose pixels *are* the indices and whose palette only says how to show them.
Reading such a file as RGB and mapping colours back is lossy (two classes may share a
colour) and is how colour masks end up fed as labels, so everything here reads indices
directly and refuses RGB label files with an error that says how to convert them.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

IGNORE_LABEL = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map as an (n, 3) uint8 array (entry 255 is the boundary colour)."""
    return np.array(_voc_palette(n), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _voc_palette(n: int) -> tuple:
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return tuple(map(tuple, palette.tolist()))


def _as_palette(palette) -> np.ndarray:
    if palette is None or (isinstance(palette, str) and palette == "voc"):
        return voc_palette(256)
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] > 256:
        raise ValueError(f"a palette is an (N, 3) array of RGB colours with N <= 256, got shape {pal.shape}")
    if pal.min() < 0 or pal.max() > 255:
        raise ValueError("palette colours must be 0..255")
    return pal.astype(np.uint8)


# PIL modes whose pixel values are the label values themselves.
INDEX_MODES = ("P", "L", "1")


def read_label(path) -> np.ndarray:
    """Read an index PNG ("P" palette or "L" grayscale) as an (H, W) uint8 array of indices.

    Palette PNGs are read as their indices, never through RGB. An RGB/RGBA file is a
    colour mask, not a label map, and raises ValueError naming the file.
    """
    path = os.fspath(path)
    with Image.open(path) as im:
        im.load()
        if im.mode not in INDEX_MODES:
            raise ValueError(label_mode_problem(path, im.mode))
        return np.array(im.convert("L") if im.mode == "1" else im, dtype=np.uint8)


def label_mode_problem(path, mode: str) -> str:
    """The error for a label file whose PIL mode is not an index mode (shared with the checker)."""
    if mode in ("RGB", "RGBA"):
        return (f"{path}: colour ({mode}) mask where a label map of class indices was expected "
                f"(a palette 'P' or single-channel 'L' PNG); convert it with "
                f"kseg.data.palette.rgb_to_index, or pass palette= to kseg.data.folder")
    return f"{path}: label image mode {mode!r}; expected an 8-bit palette ('P') or grayscale ('L') PNG"


def write_label(path, label, palette=None) -> None:
    """Write a label map (or per-class scores) as a palette PNG with the VOC colours by default.

    `label` is (H, W) or (H, W, 1) integer class indices 0..255, or (H, W, C) scores with
    C > 1, which are arg-maxed. Viewers show the colours; readers get the indices back.
    """
    arr = np.asarray(label)
    if arr.ndim == 3 and arr.shape[-1] > 1:
        arr = arr.argmax(-1)
    elif arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"write_label({os.fspath(path)!r}): expected (H, W), (H, W, 1) or (H, W, C), "
                         f"got {np.shape(label)}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
        raise ValueError(f"write_label({os.fspath(path)!r}): class indices must be integers")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"write_label({os.fspath(path)!r}): class indices must be 0..255, "
                         f"got {arr.min()}..{arr.max()}")
    pal = _as_palette(palette)
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = pal
    im.putpalette(full.tobytes())
    im.save(os.fspath(path), format="PNG")


def colorize(label, palette=None) -> np.ndarray:
    """(H, W) or (H, W, 1) indices -> (H, W, 3) uint8 colours (255 gets the palette's entry 255)."""
    arr = np.asarray(label)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    pal = _as_palette(palette)
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = pal
    return full[arr.astype(np.uint8)]


def overlay(image, label, alpha: float = 0.5, palette=None, ignore_label: int | None = IGNORE_LABEL) -> np.ndarray:
    """Blend a label map's colours over an RGB image for viewing; background (0) stays clear.

    Pixels labelled `ignore_label` are drawn too (in the palette's colour 255), so the
    boundary band is visible; pass ignore_label=None to draw them like any class.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    lab = np.asarray(label)
    if lab.ndim == 3:
        lab = lab[..., 0]
    if img.shape[:2] != lab.shape:
        raise ValueError(f"overlay: image is {img.shape[:2]} but label is {lab.shape}")
    colours = colorize(lab, palette).astype(np.float32)
    mask = (lab != 0)[..., None]
    out = np.where(mask, (1 - alpha) * img[..., :3] + alpha * colours, img[..., :3])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def rgb_to_index(rgb, palette=None, num_classes: int | None = None) -> np.ndarray:
    """Convert a colour mask to class indices with an explicit palette (VOC by default).

    Colour i of the palette becomes index i for i < num_classes (all entries if None); with
    a 256-entry palette, colour 255 (VOC's boundary cream) becomes 255. A colour that is not
    in the palette raises ValueError listing it: it is never mapped to a default class.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"rgb_to_index: expected an (H, W, 3) colour mask, got shape {arr.shape}")
    arr = arr[..., :3].astype(np.int64)
    table = palette_table(palette, num_classes)
    codes = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    keys = np.array(sorted(table), dtype=np.int64)
    values = np.array([table[k] for k in keys], dtype=np.uint8)
    pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    found = keys[pos] == codes
    if not found.all():
        bad = np.unique(codes[~found])[:8]
        colours = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in bad)
        raise ValueError(f"rgb_to_index: {int((~found).sum())} pixels have colours not in the palette: {colours}")
    return values[pos]


def palette_table(palette=None, num_classes: int | None = None) -> dict[int, int]:
    """{0xRRGGBB: index} for the colours of a palette that name classes (and 255 = ignore)."""
    pal = _as_palette(palette)
    n = len(pal) if num_classes is None else min(num_classes, len(pal))
    indices = list(range(n)) + ([IGNORE_LABEL] if len(pal) == 256 and n <= IGNORE_LABEL else [])
    table: dict[int, int] = {}
    for i in indices:
        code = (int(pal[i, 0]) << 16) | (int(pal[i, 1]) << 8) | int(pal[i, 2])
        if code in table:
            raise ValueError(f"palette colour {tuple(pal[i])} is used by both index {table[code]} and {i}")
        table[code] = i
    return table
