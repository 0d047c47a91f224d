"""`kseg data check`: every planted problem found with the right file name; clean data passes."""

import argparse
import os

import data_fixtures as fx
import numpy as np
import pytest
from PIL import Image

import kseg.data as kd
from kseg.data.cli import add_parser


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return fx.write_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def bad_voc(tmp_path_factory):
    data = fx.write_voc(tmp_path_factory.mktemp("badvoc"))
    data["expected"] = fx.plant_voc_problems(data["root"])
    return data


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_clean_voc_passes_with_counts_sizes_modes_and_histogram(voc):
    report = kd.check_dataset(voc["root"], "voc", split="trainval")
    assert report.ok and report.listed == report.checked == 4
    assert report.sizes[(40, 56)] == 1 and len(report.sizes) == 4
    assert dict(report.converted) == {
        os.path.join(voc["root"], "JPEGImages", voc["names"][1] + ".jpg"): "grayscale",
        os.path.join(voc["root"], "JPEGImages", voc["names"][2] + ".jpg"): "CMYK",
    }
    present = {i for i in range(256) if report.pixels[i]}
    assert present == {0, 3, 7, 15, 255}
    assert report.images_with[3] == 4
    assert report.pixels.sum() == sum(h * w for h, w in [(40, 56), (48, 40), (36, 36), (44, 52)])


def test_every_planted_problem_is_reported_with_its_file_and_nothing_else(bad_voc):
    report = kd.check_dataset(bad_voc["root"], "voc", split="trainval")
    assert not report.ok
    found = dict(report.errors)
    assert set(found) == set(bad_voc["expected"])
    for path, phrase in bad_voc["expected"].items():
        assert phrase in found[path], (path, found[path])
    assert "rgb_to_index" in found[os.path.join(bad_voc["root"], "SegmentationClass", "bad_colour_mask.png")]


def test_pets_trimap_values_outside_1_2_3_and_renamed_formats(tmp_path):
    data = fx.write_pets(tmp_path)
    bad = tmp_path / "annotations" / "trimaps" / (data["names"][0] + ".png")
    trimap = np.asarray(Image.open(bad)).copy()
    trimap[0, 0] = 0
    Image.fromarray(trimap, "L").save(bad)
    report = kd.check_dataset(tmp_path, "pets", split="trainval", border="ignore")
    assert report.errors == [(str(bad), "label values 0 found; expected 1, 2, 3 (pet, background, border)")]
    png_as_jpg = str(tmp_path / "images" / (data["names"][1] + ".jpg"))
    assert (png_as_jpg, "RGBA") in report.converted
    assert any(p == png_as_jpg and "PNG file named .jpg" in w for p, w in report.warnings)
    assert report.pixels[255] > 0 and report.pixels[2] == 0  # border -> ignore


def test_folder_orphans_and_colour_masks(tmp_path):
    fx.write_folder(tmp_path)
    fx.save_jpeg(tmp_path / "images" / "d.jpg", np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "masks" / "e.png")
    label = fx.label_array(np.random.default_rng(0), 32, 32, (0, 1, 2, 1))
    Image.fromarray(kd.colorize(label)).save(tmp_path / "masks" / "a.png")
    errors = dict(kd.check_dataset(tmp_path, "folder", num_classes=3).errors)
    assert "no mask" in errors[str(tmp_path / "images" / "d.jpg")]
    assert "no image" in errors[str(tmp_path / "masks" / "e.png")]
    assert "VOC palette colours" in errors[str(tmp_path / "masks" / "a.png")]
    with_palette = dict(kd.check_dataset(tmp_path, "folder", num_classes=3, palette="voc").errors)
    assert str(tmp_path / "masks" / "a.png") not in with_palette


def test_edges_and_classification_layouts(tmp_path):
    data = fx.write_edges(tmp_path / "edges")
    fx.truncate(tmp_path / "edges" / "edges" / "1.png")
    report = kd.check_dataset(data["list"], "edges")
    assert report.errors == [(str(tmp_path / "edges" / "edges" / "1.png"), "truncated PNG: no IEND chunk")]
    fx.write_classes(tmp_path / "cls")
    fx.truncate(tmp_path / "cls" / "dog" / "0.jpg")
    report = kd.check_dataset(tmp_path / "cls", "classification")
    assert [p for p, _ in report.errors] == [str(tmp_path / "cls" / "dog" / "0.jpg")]
    assert list(report.pixels[:2]) == [3, 1]  # images per class (the broken one not counted)
    assert {m for _, m in report.converted} == {"grayscale", "CMYK"}


def test_cli_check_exit_codes_and_file_names(voc, bad_voc, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps long paths at the terminal width
    assert _cli(["data", "check", voc["root"]]) == 0
    out = capsys.readouterr().out
    assert "no errors" in out and "person" in out and "ignore" in out and "CMYK" in out
    assert _cli(["data", "check", bad_voc["root"], "--max-shown", "100"]) == 1
    out = capsys.readouterr().out
    for path in bad_voc["expected"]:
        assert path in out
    assert "9 errors" in out
    fx.write_folder(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        _cli(["data", "check", str(tmp_path), "--layout", "folder"])
    assert _cli(["data", "check", str(tmp_path), "--layout", "folder", "--num-classes", "3"]) == 0
