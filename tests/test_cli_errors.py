"""The shared CLI helpers: one size rule, exit codes (0 ok, 1 problems found, 2 bad usage or
input, 3 missing optional dependency), no traceback for expected errors, `--to pb`, `data check`
over every VOC split, and one image decoder that honours EXIF orientation everywhere."""

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from kseg import cliutil
from kseg.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


# === sizes ===


@pytest.mark.parametrize("text, size", [("321", (321, 321)), ("321x481", (321, 481)), ("32X40", (32, 40)),
                                        (" 7x9 ", (7, 9)), ("1", (1, 1))])
def test_parse_size_accepts_h_or_hxw(text, size):
    assert cliutil.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "0", "3x0", "-3", "3x4x5", "axb", "3.5", "3x", "x3"])
def test_parse_size_rejects_anything_else_clearly(text):
    with pytest.raises(argparse.ArgumentTypeError, match="H or HxW"):
        cliutil.parse_size(text)


def test_every_size_option_follows_the_one_rule():
    parser = build_parser()
    for argv, dest in ((["predict", "m", "a.png", "--out", "o", "--size", "{}"], "size"),
                       (["convert", "m.keras", "--input-size", "{}"], "input_size"),
                       (["verify", "a", "b", "--input-size", "{}"], "input_size"),
                       (["export", "m", "--serving", "s", "--image-size", "{}"], "image_size"),
                       (["data", "synth", "d", "--size", "{}"], "size")):
        for text, want in (("64", (64, 64)), ("64x96", (64, 96))):
            args = parser.parse_args([a.format(text) for a in argv])
            assert getattr(args, dest) == want, argv
        with pytest.raises(SystemExit) as e:
            parser.parse_args([a.format("64x") for a in argv])
        assert e.value.code == cliutil.USAGE


def test_data_synth_keeps_its_minimum_size(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "synth", "d", "--size", "8"])
    assert "sides >= 16" in capsys.readouterr().err


# === exit codes and messages ===


def test_input_errors_exit_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kseg.cli", "data", "check", str(tmp_path / "missing")],
                            capture_output=True, check=False, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == cliutil.USAGE
    assert result.stderr.startswith("kseg: error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("error, code, text", [
    (ValueError("bad value"), 2, "kseg: error: bad value"),
    (FileNotFoundError("x.png does not exist"), 2, "kseg: error: x.png does not exist"),
    (FileExistsError("out exists; pass --force"), 2, "--force"),
    (TypeError("not a model"), 2, "not a model"),
    (KeyError("no_such_key"), 2, "kseg: error: no_such_key"),
])
def test_fail_maps_input_errors_to_exit_2(error, code, text, capsys):
    assert cliutil.fail(error) == code
    err = capsys.readouterr().err
    assert text in err and "'no_such_key'" not in err


def _missing(module):
    try:
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)
    except ModuleNotFoundError as inner:
        try:
            raise ImportError(f"this needs {module}") from inner
        except ImportError as outer:
            return outer


@pytest.mark.parametrize("module, pip", [("tf2onnx", 'pip install "kseg[onnx]"'),
                                         ("pydensecrf", 'pip install "kseg[crf]"'),
                                         ("matplotlib", 'pip install "kseg[plot]"'),
                                         ("tensorflow", 'pip install "kseg[cpu]"')])
def test_missing_optional_dependency_exits_3_with_the_pip_command(module, pip, capsys):
    assert cliutil.fail(_missing(module)) == cliutil.MISSING_DEPENDENCY
    assert pip in capsys.readouterr().err


def test_unavailable_conversion_format_exits_3(monkeypatch, capsys):
    from convert import formats

    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(formats.FormatUnavailable) as e:
        formats.resolve("tf2onnx:convert")
    assert cliutil.fail(e.value) == cliutil.MISSING_DEPENDENCY
    assert 'pip install "kseg[onnx]"' in capsys.readouterr().err


def test_unexpected_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        cliutil.run(lambda args: 1 / 0, None)
    with pytest.raises(ImportError):  # an ImportError that names no optional dependency is a bug
        cliutil.run(lambda args: (_ for _ in ()).throw(ImportError("cannot import name 'x' from 'kseg.y'")), None)


def test_crf_search_without_pydensecrf_exits_3(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert main(["crf-search", "model.keras", "--data", "nowhere"]) == cliutil.MISSING_DEPENDENCY
    err = capsys.readouterr().err
    assert "kseg crf-search: error:" in err and 'pip install "kseg[crf]"' in err


def test_models_run_exits_1_on_a_parameter_mismatch(monkeypatch, capsys):
    import kseg

    real = kseg.get_spec
    monkeypatch.setattr(kseg, "get_spec", lambda name: dataclasses.replace(real(name), params=real(name).params + 1))
    assert main(["models", "--run", "lenet5"]) == cliutil.PROBLEMS
    assert "0 of 1 models match" in capsys.readouterr().out


# === convert --to pb ===


def test_convert_to_pb_is_the_frozen_graph_format():
    assert build_parser().parse_args(["convert", "m.keras", "--to", "pb"]).to == "frozen_graph"
    assert build_parser().parse_args(["convert", "m.keras", "--to", "onnx"]).to == "onnx"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "m.keras", "--to", "pbtxt"])


def test_convert_to_pb_writes_a_frozen_graph(tmp_path, capsys):
    import keras

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, padding="same", name="conv")(inputs))
    model.save(tmp_path / "tiny.keras")
    out = tmp_path / "tiny_graph"
    assert main(["convert", str(tmp_path / "tiny.keras"), "--to", "pb", "-o", str(out), "--json"]) == 0
    assert '"frozen_graph"' in capsys.readouterr().out and out.is_file()


# === data check: every VOC split ===


def test_data_check_without_split_checks_every_voc_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    voc = fx.write_voc(tmp_path)
    lists = os.path.join(voc["root"], "ImageSets", "Segmentation")
    os.remove(os.path.join(lists, "trainval.txt"))  # used to be the default: no longer needed
    assert main(["data", "check", voc["root"]]) == 0
    out = capsys.readouterr().out
    assert "split train" in out and "split val" in out and "no errors in 2 splits" in out
    with open(os.path.join(lists, "broken.txt"), "w") as f:
        f.write(voc["names"][0] + "\nno_such_image\n")
    assert main(["data", "check", voc["root"]]) == cliutil.PROBLEMS
    out = capsys.readouterr().out
    assert "split broken" in out and "no_such_image.jpg" in out and "errors in 1 of 3 splits: broken" in out
    # --split checks that one list only.
    assert main(["data", "check", voc["root"], "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "(voc)" in out and "split val" not in out and "broken" not in out and "no errors" in out
    assert main(["data", "check", voc["root"], "--split", "trainval"]) == cliutil.USAGE
    assert "trainval" in capsys.readouterr().err


# === one image decoder ===


def _oriented(path, fmt):
    """A 20x30 (HxW) image saved with EXIF Orientation=6 (the camera was turned 90 degrees clockwise)."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # a red band on the stored left edge: on top once turned upright
    pixels[:, 10:] = rng.integers(0, 256, (20, 20, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return pixels


@pytest.mark.parametrize("name, fmt", [("photo.png", "PNG"), ("photo.jpg", "JPEG")])
def test_predict_verify_and_demo_read_exif_rotated_images_alike(tmp_path, name, fmt):
    from convert.verify import _read_image as verify_read
    from kseg.demo import _read_rgb
    from kseg.images import read_image
    from kseg.inference.files import read_image as predict_read

    path = tmp_path / name
    stored = _oriented(path, fmt)
    upright = read_image(path)
    assert upright.shape == (30, 20, 3) and upright.dtype == np.uint8  # turned: W x H
    assert upright[:8, :, 0].mean() > 200 and upright[:8, :, 1:].mean() < 60  # the red band is on top
    if fmt == "PNG":
        np.testing.assert_array_equal(upright, np.rot90(stored, -1))
    np.testing.assert_array_equal(predict_read(path), upright)
    np.testing.assert_array_equal(_read_rgb(path), upright)
    as_verified = verify_read(path, 30, 20, 3)
    assert as_verified.dtype == np.float32
    np.testing.assert_array_equal(as_verified, upright.astype(np.float32))
    gray = verify_read(path, 30, 20, 1)
    assert gray.shape == (30, 20, 1)
    np.testing.assert_array_equal(gray, read_image(path, channels=1).astype(np.float32))


def test_read_image_names_an_unreadable_file(tmp_path):
    from kseg.images import read_image

    bad = tmp_path / "broken.jpg"
    bad.write_text("not a picture")
    with pytest.raises(ValueError, match="broken.jpg: cannot read the image"):
        read_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_one_extension_list():
    import importlib

    from kseg.data import layouts
    from kseg.images import IMAGE_EXTENSIONS, TF_IMAGE_EXTENSIONS

    predict = importlib.import_module("kseg.inference.files")

    assert predict.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert set(layouts.IMAGE_EXTENSIONS) <= set(IMAGE_EXTENSIONS) and layouts.IMAGE_EXTENSIONS is TF_IMAGE_EXTENSIONS
