"""The built-in synthetic dataset: deterministic, VOC layout, 255 bands, shape not colour."""

import argparse
import os

import numpy as np
import pytest
from PIL import Image

import kseg.data as kd
from kseg.data.cli import add_parser


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    kd.make_synthetic(root, seed=0, train=24, val=8, size=64)
    return root


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(synth, tmp_path):
    kd.make_synthetic(tmp_path / "a", seed=0, train=24, val=8, size=64)
    kd.make_synthetic(tmp_path / "b", seed=1, train=24, val=8, size=64)
    same, other = _files(synth), _files(tmp_path / "b")
    assert _files(tmp_path / "a") == same
    assert len(same) == 2 * 32 + 5  # jpg + png per image, 3 lists, classes.txt, synth.json
    differing = [k for k in same if k.endswith((".jpg", ".png")) and same[k] != other[k]]
    assert len(differing) == 64


def test_layout_is_voc_with_palette_pngs_and_5_classes(synth):
    assert (synth / "classes.txt").read_text().split() == list(kd.SYNTH_CLASSES) and len(kd.SYNTH_CLASSES) == 5
    train = (synth / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (synth / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(train) == 24 and len(val) == 8 and not set(train) & set(val)
    with Image.open(synth / "SegmentationClass" / (train[0] + ".png")) as im:
        assert im.mode == "P" and im.size == (64, 64)
    with Image.open(synth / "JPEGImages" / (train[0] + ".jpg")) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    report = kd.check_dataset(synth, "voc", split="trainval")
    assert report.ok and report.checked == 32 and report.class_names == kd.SYNTH_CLASSES
    assert all(report.pixels[c] > 0 for c in (0, 1, 2, 3, 4, 255))


def test_different_classes_never_touch_without_a_255_band(synth):
    for name in (synth / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split():
        label = kd.read_label(synth / "SegmentationClass" / (name + ".png")).astype(np.int64)
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 255} and ((label > 0) & (label < 255)).any()
        for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), name


def test_colour_does_not_predict_the_shape_class(synth):
    pixels, classes = [], []
    for name in (synth / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split():
        image = np.asarray(Image.open(synth / "JPEGImages" / (name + ".jpg")), np.float32)
        label = kd.read_label(synth / "SegmentationClass" / (name + ".png"))
        keep = (label > 0) & (label < 255)
        pixels.append(image[keep])
        classes.append(label[keep])
    pixels, classes = np.concatenate(pixels), np.concatenate(classes)
    means = np.stack([pixels[classes == c].mean(0) for c in range(1, 5)])
    guess = 1 + np.argmin(((pixels[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == classes).mean() < 0.45  # near chance (0.25 to ~0.35 from class frequencies)


def test_the_voc_reader_reads_it_for_training(synth):
    ds = kd.synthetic(synth, "train", augment=kd.SegmentationAugment(crop=48), batch_size=8, seed=0)
    images, labels = next(iter(ds))
    assert ds.num_classes == 5 and images.shape == (8, 48, 48, 3) and labels.shape == (8, 48, 48, 1)
    assert set(np.unique(labels.numpy())) <= {0, 1, 2, 3, 4, 255}


def test_cli_synth_writes_the_dataset(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "synth", str(tmp_path / "s"), "--train", "3", "--val", "2", "--size", "32x40",
                              "--seed", "4"])
    assert args.func(args) == 0
    assert len(os.listdir(tmp_path / "s" / "JPEGImages")) == 5
    with Image.open(tmp_path / "s" / "JPEGImages" / "synth_00000.jpg") as im:
        assert im.size == (40, 32)
    assert "circle" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "x", "--size", "8"])
