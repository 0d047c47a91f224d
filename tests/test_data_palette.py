"""Palette I/O: the VOC colour map, index PNGs read as indices (PIL and in-graph), overlays."""

import numpy as np
import pytest
import tensorflow as tf
from data_fixtures import png_bytes
from PIL import Image

from kseg.data import colorize, overlay, read_label, rgb_to_index, voc_palette, write_label
from kseg.data import decode as dec


def test_voc_palette_matches_the_published_colour_map():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert tuple(pal[0]) == (0, 0, 0)
    assert tuple(pal[1]) == (128, 0, 0)  # aeroplane
    assert tuple(pal[15]) == (192, 128, 128)  # person
    assert tuple(pal[20]) == (0, 64, 128)  # tvmonitor
    assert tuple(pal[255]) == (224, 224, 192)  # boundary
    assert len({tuple(c) for c in pal}) == 256


def test_write_then_read_label_round_trips_indices_and_stores_a_palette_png(tmp_path, rng):
    label = rng.integers(0, 21, size=(17, 23)).astype(np.uint8)
    label[3:5] = 255
    path = tmp_path / "x.png"
    write_label(path, label)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im.getpalette()[:63]).reshape(21, 3), voc_palette(21))
    assert np.array_equal(read_label(path), label)
    # scores (H, W, C) are arg-maxed; (H, W, 1) is squeezed
    scores = np.eye(5)[label % 5].astype(np.float32)
    write_label(path, scores)
    assert np.array_equal(read_label(path), label % 5)
    write_label(path, label[..., None])
    assert np.array_equal(read_label(path), label)


def test_write_label_refuses_values_outside_0_255(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        write_label(tmp_path / "x.png", np.array([[0, 300]]))


def test_read_label_refuses_rgb_colour_masks_naming_the_file(tmp_path):
    path = tmp_path / "colour.png"
    Image.fromarray(colorize(np.array([[0, 1], [15, 255]]))).save(path)
    with pytest.raises(ValueError, match="colour.png.*colour"):
        read_label(path)


def test_colorize_overlay_and_rgb_to_index():
    label = np.array([[0, 1], [15, 255]], np.uint8)
    colours = colorize(label)
    assert tuple(colours[0, 1]) == (128, 0, 0) and tuple(colours[1, 1]) == (224, 224, 192)
    assert np.array_equal(rgb_to_index(colours, num_classes=21), label)
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay(image, label, alpha=0.5)
    assert tuple(blended[0, 0]) == (100, 100, 100)  # background stays clear
    assert tuple(blended[0, 1]) == (114, 50, 50)  # halfway to aeroplane red
    with pytest.raises(ValueError, match=r"not in the palette: \(1, 2, 3\)"):
        rgb_to_index(np.array([[[1, 2, 3]]], np.uint8))


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_in_graph_decoder_reads_palette_pngs_as_indices_at_every_bit_depth(bits, rng):
    n = 2 ** bits
    label = rng.integers(0, n, size=(9, 13)).astype(np.uint8)
    palette = rng.integers(0, 256, size=3 * n).astype(np.uint8).tolist()
    palette[:6] = [7, 7, 7, 7, 7, 7]  # two classes share a colour: an RGB round trip would merge them
    data = png_bytes(label, "P", palette=palette, bits=bits)
    values, problem = dec.decode_index_label(tf.constant(data), dec.index_spec(255))
    assert problem.numpy() == b""
    assert np.array_equal(values.numpy(), label)


def test_in_graph_decoder_reads_grayscale_and_refuses_rgb_and_16_bit():
    label = np.array([[0, 5], [255, 20]], np.uint8)
    spec = dec.index_spec(21)
    values, problem = dec.decode_index_label(tf.constant(png_bytes(label, "L")), spec)
    assert np.array_equal(values.numpy(), label) and problem.numpy() == b""
    _, problem = dec.decode_index_label(tf.constant(png_bytes(np.stack([label] * 3, -1), "RGB")), spec)
    assert b"colour (RGB) mask" in problem.numpy()
    _, problem = dec.decode_index_label(tf.constant(png_bytes(label.astype(np.uint16) * 256, None)), spec)
    assert b"16-bit" in problem.numpy()
