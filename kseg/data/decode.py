"""Decoding and cheap validation of image / label files inside tf.data (graph ops only).

Every check here runs per element in the parallel map, so it must cost little next to
the JPEG decode: a few byte comparisons on the file header and tail, and one bincount
over the label (the rules and texts live in kseg.data.spec). A problem is returned as
(path, reason) strings instead of raised, so the pipeline can either fail with the file's
name or skip and count the file.
"""

from __future__ import annotations

import zlib

import tensorflow as tf

from kseg.data.palette import IGNORE_LABEL
from kseg.data.spec import (  # noqa: F401  (re-exported for the pipeline)
    BINARY_MASK,
    COLOUR_MASK,
    CORRUPT,
    DEEP_LABEL,
    JPEG_MAGIC,
    LABEL_NOT_PNG,
    NOT_IMAGE,
    PNG_MAGIC,
    SHORT,
    TRUNCATED_JPEG,
    TRUNCATED_PNG,
    UNKNOWN_COLOUR,
    LabelSpec,
    index_spec,
)

# === byte-level checks ===

def _head(data, n):
    # Pad so that fixed-offset reads of short (broken) files stay in range.
    return tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, n), b"\x00" * n]), 0, n)


def _tail_contains(data, pattern: bytes, n: int):
    # An end marker must be near the end; some writers append a few bytes after it.
    # StringSplit on the raw bytes is a one-op substring search (the raw op skips the
    # RaggedTensor plumbing that tf.strings.split adds to the graph).
    tail = tf.strings.substr(data, tf.maximum(tf.strings.length(data) - n, 0), n)
    parts = tf.raw_ops.StringSplitV2(input=tail[None], sep=pattern).values
    return tf.size(parts) > 1


def image_problem(data):
    """'' for bytes that look like a complete JPEG/PNG/GIF/BMP, else the reason."""
    head = _head(data, 8)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 3), JPEG_MAGIC)
    is_png = tf.equal(head, PNG_MAGIC)
    is_other = tf.equal(tf.strings.substr(head, 0, 4), b"GIF8") | tf.equal(tf.strings.substr(head, 0, 2), b"BM")
    too_short = tf.strings.length(data) < 16
    # JPEG entropy-coded data byte-stuffs 0xFF, so FF D9 near the end can only be the EOI marker.
    jpeg_cut = is_jpeg & ~_tail_contains(data, b"\xff\xd9", 1024)
    png_cut = is_png & ~_tail_contains(data, b"IEND", 64)
    return _first([(too_short, SHORT), (~(is_jpeg | is_png | is_other), NOT_IMAGE),
                   (jpeg_cut, TRUNCATED_JPEG), (png_cut, TRUNCATED_PNG)])


def _guarded(decode, data, dummy):
    """(decode(data), '') or, when the decoder raises, (dummy, CORRUPT).

    libjpeg and libpng fail on a corrupt header (a bad Huffman table, a broken chunk) with an
    error that names no file. Decoding inside a one-element dataset with ignore_errors() turns
    that error into "no element", which the fallback element then reports, so skip_bad can
    skip and count the file like any other bad one. It costs ~5 CPU-ms per image (the nested
    dataset), so only skip_bad pipelines pay it; without skip_bad such a file stops the
    pipeline with TF's decoder error, and kseg.train names it (kseg.data.check finds it).
    """
    decoded = tf.data.Dataset.from_tensors(data).map(lambda d: (decode(d), tf.constant(""))).ignore_errors()
    fallback = tf.data.Dataset.from_tensors((dummy, tf.constant(CORRUPT)))
    return decoded.concatenate(fallback).take(1).get_single_element()


def _first(cases):
    problem = tf.constant("")
    for cond, text in reversed(cases):
        problem = tf.where(cond, tf.constant(text) if isinstance(text, str) else text, problem)
    return problem


def decode_image(data, channels: int = 3):
    """Decode JPEG/PNG/GIF/BMP to uint8 [H, W, channels]; grayscale, RGBA and CMYK are converted."""
    head = _head(data, 3)

    def jpeg():
        # decode_jpeg on JPEGs: decode_image would route there too, but cannot take dct_method.
        # libjpeg cannot convert CMYK to gray, so 1-channel output goes through RGB.
        rgb = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_FAST")
        return rgb if channels == 3 else tf.image.rgb_to_grayscale(rgb)

    return tf.cond(
        tf.equal(head, JPEG_MAGIC), jpeg,
        lambda: tf.ensure_shape(tf.io.decode_image(data, channels=channels, expand_animations=False),
                                [None, None, channels]),
    )


# === index labels ===

# TF's PNG decoder expands a palette to RGB. Relabelling the IHDR colour type from 3
# (palette) to 0 (grayscale) makes libpng hand back the stored indices instead, with no
# RGB round trip. CRC-32 is linear, so the IHDR CRC is fixed by XOR with a constant.
_IHDR_FLIP = bytes(13) + b"\x03" + bytes(3)  # colour-type byte within "IHDR" + 13 data bytes
_CRC_XOR = (zlib.crc32(_IHDR_FLIP) ^ zlib.crc32(bytes(17))).to_bytes(4, "big")
_BYTE_TABLE = [bytes([i]) for i in range(256)]


def _palette_as_grayscale(data):
    crc = tf.io.decode_raw(tf.strings.substr(data, 29, 4), tf.uint8)
    fixed = tf.bitwise.bitwise_xor(crc, tf.constant(list(_CRC_XOR), tf.uint8))
    crc_bytes = tf.strings.reduce_join(tf.gather(tf.constant(_BYTE_TABLE), tf.cast(fixed, tf.int32)))
    # A PLTE chunk in a grayscale PNG makes libpng log a warning per image; drop it when it
    # directly follows IHDR (where Pillow, MATLAB and VOC's files put it), keep it otherwise.
    plte_len = tf.reduce_sum(tf.cast(tf.io.decode_raw(tf.strings.substr(data, 33, 4), tf.uint8), tf.int32)
                             * tf.constant([1 << 24, 1 << 16, 1 << 8, 1]))
    rest = tf.where(tf.equal(tf.strings.substr(data, 37, 4), b"PLTE"), 33 + 12 + plte_len, 33)
    return tf.strings.join([tf.strings.substr(data, 0, 25), b"\x00", tf.strings.substr(data, 26, 3),
                            crc_bytes, tf.strings.substr(data, rest, -1)])


def _png_header(data):
    head = _head(data, 26)
    raw = tf.io.decode_raw(head, tf.uint8)
    is_png = tf.equal(tf.strings.substr(head, 0, 8), PNG_MAGIC) & tf.equal(tf.strings.substr(head, 12, 4), b"IHDR")
    return is_png, tf.cast(raw[24], tf.int32), tf.cast(raw[25], tf.int32)


def decode_index_label(data, spec: LabelSpec):
    """Raw PNG bytes -> (uint8 [H, W] raw values, problem). Palette PNGs give their indices."""
    is_png, depth, ctype = _png_header(data)
    rgb = tf.equal(ctype, 2) | tf.equal(ctype, 6)
    allow_rgb = spec.colours is not None
    problem = _first([
        (~is_png, LABEL_NOT_PNG),
        (rgb & tf.constant(not allow_rgb), COLOUR_MASK),
        (tf.equal(depth, 16), DEEP_LABEL),
    ])

    def decode():
        def from_index():
            png = tf.cond(tf.equal(ctype, 3), lambda: _palette_as_grayscale(data), lambda: data)
            values = tf.io.decode_png(png, channels=1)[..., 0]
            # libpng scales 1/2/4-bit grayscale up to 0..255; undo it to get the indices back.
            scale = tf.cast(255 // (tf.bitwise.left_shift(1, tf.minimum(depth, 8)) - 1), tf.uint8)
            return values // scale, tf.constant("")

        if not allow_rgb:
            return from_index()
        return tf.cond(rgb, lambda: _colours_to_index(tf.io.decode_png(data, channels=3), spec), from_index)

    dummy = lambda: (tf.zeros([1, 1], tf.uint8), tf.constant(""))  # noqa: E731
    values, colour_problem = tf.cond(tf.equal(problem, ""), decode, dummy)
    return values, tf.where(tf.equal(problem, ""), colour_problem, problem)


def _colours_to_index(rgb, spec: LabelSpec):
    keys = tf.constant([k for k, _ in spec.colours], tf.int32)
    vals = tf.constant([v for _, v in spec.colours], tf.uint8)
    x = tf.cast(rgb, tf.int32)
    codes = tf.bitwise.left_shift(x[..., 0], 16) | tf.bitwise.left_shift(x[..., 1], 8) | x[..., 2]
    flat = tf.reshape(codes, [-1])
    pos = tf.minimum(tf.searchsorted(keys, flat), tf.size(keys) - 1)
    found = tf.equal(tf.gather(keys, pos), flat)
    out = tf.reshape(tf.gather(vals, pos), tf.shape(codes))
    problem = tf.where(tf.reduce_all(found), "", f"{UNKNOWN_COLOUR} ({spec.num_classes} classes)")
    return out, problem


def check_index_values(raw, spec: LabelSpec):
    """Map raw label values through the spec; (uint8 [H, W] classes, problem)."""
    lut = tf.constant(spec.lut, tf.int32)
    if spec.lut == index_spec(spec.num_classes).lut:
        # The usual case (0..n-1 and 255, nothing renamed): two compares, no per-pixel gather.
        values = raw
        any_bad = tf.reduce_any((raw >= spec.num_classes) & (raw != IGNORE_LABEL))
    else:
        mapped = tf.gather(lut, tf.cast(raw, tf.int32))
        any_bad = tf.reduce_any(mapped < 0)
        values = tf.cast(tf.maximum(mapped, 0), tf.uint8)

    def describe():
        # Only for a bad label: which values, for the error message.
        counts = tf.math.bincount(tf.cast(raw, tf.int32), minlength=256, maxlength=256)
        bad = tf.cast(tf.where((counts > 0) & (lut < 0))[:, 0], tf.int32)
        shown = tf.strings.reduce_join(tf.strings.as_string(bad[:8]), separator=", ")
        return tf.strings.join(["label values ", shown, " found; expected ", spec.expected])

    cases = [(any_bad, tf.cond(any_bad, describe, lambda: tf.constant("")))]
    if spec.binary_check:
        binary = (tf.reduce_all((raw == 0) | (raw == IGNORE_LABEL)) & tf.reduce_any(raw == 0)
                  & tf.reduce_any(raw == IGNORE_LABEL))
        cases.append((binary, BINARY_MASK))
    return values, _first(cases)


# === a pair ===

def _decode_checked(data, decode, dummy, guard):
    """(decoded, problem): the byte-level checks first, then the decode (with `guard`, one that cannot raise)."""
    problem = image_problem(data)
    checked = (lambda: _guarded(decode, data, dummy)) if guard else (lambda: (decode(data), tf.constant("")))
    value, decode_problem = tf.cond(tf.equal(problem, ""), checked, lambda: (dummy, tf.constant("")))
    return value, tf.where(tf.equal(problem, ""), decode_problem, problem)


def read_pair(image_bytes, label_bytes, image_name, label_name, spec: LabelSpec, channels: int = 3,
              guard: bool = False):
    """Decode and validate one (image, label) pair.

    Returns (image uint8 [H, W, C], label [H, W, 1] (uint8 classes, or uint8 edge strength),
    bad_path, reason); reason is '' for a good pair.
    """
    image, img_problem = _decode_checked(image_bytes, lambda d: decode_image(d, channels),
                                         tf.zeros([1, 1, channels], tf.uint8), guard)
    if spec.kind == "edge":
        label, lbl_problem = _decode_checked(label_bytes, lambda d: decode_image(d, 1)[..., 0],
                                             tf.zeros([1, 1], tf.uint8), guard)
        value_problem = tf.constant("")
    else:
        (label, decode_problem), lbl_problem = _decode_checked(
            label_bytes, lambda d: decode_index_label(d, spec), (tf.zeros([1, 1], tf.uint8), tf.constant("")), guard)
        lbl_problem = tf.where(tf.equal(lbl_problem, ""), decode_problem, lbl_problem)
        label, value_problem = check_index_values(label, spec)
    ih, iw = tf.shape(image)[0], tf.shape(image)[1]
    lh, lw = tf.shape(label)[0], tf.shape(label)[1]
    size_problem = tf.strings.join([
        "image is ", tf.strings.as_string(ih), "x", tf.strings.as_string(iw), " (HxW) but its label ",
        label_name, " is ", tf.strings.as_string(lh), "x", tf.strings.as_string(lw)])
    mismatch = tf.not_equal(ih, lh) | tf.not_equal(iw, lw)
    reason = _first([(tf.not_equal(img_problem, ""), img_problem),
                     (tf.not_equal(lbl_problem, ""), lbl_problem),
                     (mismatch, size_problem),
                     (tf.not_equal(value_problem, ""), value_problem)])
    bad_path = tf.where(tf.not_equal(img_problem, "") | (mismatch & tf.equal(lbl_problem, "")),
                        image_name, label_name)
    return image, label[..., None], bad_path, reason


def read_image(image_bytes, image_name, channels: int = 3, guard: bool = False):
    """Decode and validate one classification image: (uint8 [H, W, C], bad_path, reason)."""
    image, problem = _decode_checked(image_bytes, lambda d: decode_image(d, channels),
                                     tf.zeros([1, 1, channels], tf.uint8), guard)
    return image, image_name, problem

