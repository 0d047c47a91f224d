"""The `kseg` command and the generated README table."""

import subprocess
import sys
from pathlib import Path

import kseg
from kseg.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_models_lists_every_registered_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in kseg.list_models():
        assert name in out
    assert "138,357,544" in out


def test_models_run_builds_runs_and_checks_counts(capsys):
    assert main(["models", "--run", "lenet5", "segnet_basic", "hed"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 models match" in out
    assert "1x10" in out and "1x360x480x11" in out
    assert out.count("1x321x481x1") == 6  # HED: five side outputs and the fuse


def test_unknown_model_is_a_clear_cli_error(capsys):
    assert main(["models", "--run", "vgg61"]) == 2
    assert "unknown model 'vgg61'" in capsys.readouterr().err


def test_readme_model_table_is_generated_from_registry():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_model_table.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| `resnet50` | classification | 25,636,712 |" in (ROOT / "README.md").read_text()


def test_fresh_cli_process_loads_files_with_kseg_layers(tmp_path):
    # `import kseg` alone must register kseg's layers: a fresh `kseg` process converting a
    # SegNet .h5 once failed with "Unknown layer: 'kseg>MaxPoolingWithArgmax2D'".
    model = kseg.build_model("segnet_basic", num_classes=3, input_shape=(32, 32, 3))
    path = tmp_path / "segnet.h5"
    model.save(path)
    result = subprocess.run(
        [sys.executable, "-m", "kseg.cli", "convert", str(path), "--to", "saved_model", "-o", str(tmp_path / "sm")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified: PASS" in result.stdout
    assert (tmp_path / "sm" / "saved_model.pb").exists()
