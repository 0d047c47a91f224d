"""The `kseg` command starts without TensorFlow: parsers, `kseg models` and `kseg data check`
import neither TensorFlow nor Keras, and `import kseg` stays light while still registering
kseg's layers once Keras is imported."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import data_fixtures as fx
import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [[], ["models"], ["demo"], ["data"], ["data", "synth"], ["data", "check"], ["train"], ["evaluate"],
            ["predict"], ["crf-search"], ["convert"], ["verify"], ["inspect"], ["export"], ["serve"], ["weights"],
            ["weights", "list"], ["weights", "fetch"], ["weights", "path"], ["weights", "verify"]]


def _run(code, *args, timeout=120):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, check=False,
                            text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Runs `kseg ARGV...` in this fresh process, then prints the exit code and the heavy modules loaded.
CLI = """
    import contextlib, io, json, sys
    from kseg.cli import main
    argv = json.loads(sys.argv[1])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    print(json.dumps({"code": code, "heavy": heavy[:5], "out": out.getvalue()}))
"""


def test_help_of_every_command_imports_no_tensorflow_or_keras():
    code = """
        import contextlib, io, json, sys
        from kseg.cli import main
        results = {}
        for argv in json.loads(sys.argv[1]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main(argv + ["--help"])
                except SystemExit as e:
                    results[" ".join(argv)] = [e.code, out.getvalue()]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        print(json.dumps({"results": results, "heavy": heavy[:5]}))
    """
    result = _run(code, json.dumps(COMMANDS))
    assert result["heavy"] == []
    assert set(result["results"]) == {" ".join(c) for c in COMMANDS}
    for command, (exit_code, text) in result["results"].items():
        assert exit_code == 0 and text.startswith("usage: kseg"), command
    # Every size option states the one rule.
    for command in ("predict", "convert", "verify", "export", "data synth"):
        assert "H or HxW" in " ".join(result["results"][command][1].split()), command


def test_kseg_help_in_a_fresh_process_does_not_import_tensorflow():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "kseg.cli", "--help"], capture_output=True,
                            check=False, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "usage: kseg" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "tensorflow" not in imported and "keras" not in imported


def test_models_lists_from_the_catalogue_without_keras():
    result = _run(CLI, json.dumps(["models", "--task", "edges"]))
    assert result["code"] == 0 and result["heavy"] == []
    assert "hed" in result["out"] and "vgg16" not in result["out"]


def test_data_check_imports_no_tensorflow(tmp_path):
    voc = fx.write_voc(tmp_path)
    result = _run(CLI, json.dumps(["data", "check", voc["root"]]))
    assert result["code"] == 0 and result["heavy"] == []
    assert "no errors" in result["out"]


def test_catalogue_equals_the_live_registry():
    from kseg.cli import CATALOG, catalog_entries

    with open(CATALOG, encoding="utf-8") as f:
        committed = json.load(f)
    assert committed == catalog_entries(), "kseg/models/catalog.json is stale: run scripts/gen_model_table.py"


def test_models_table_from_the_catalogue_matches_the_registry():
    from kseg.cli import catalog_rows, model_rows

    assert catalog_rows() == model_rows(), "run scripts/gen_model_table.py"
    assert catalog_rows("segmentation") == model_rows("segmentation")


def test_import_kseg_is_light_and_still_registers_layers_for_keras(tmp_path):
    import kseg

    path = tmp_path / "segnet.keras"
    kseg.build_model("segnet_basic", num_classes=3, input_shape=(32, 32, 3)).save(path)
    code = """
        import json, sys
        import kseg
        light = not any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules)
        import keras
        model = keras.saving.load_model(sys.argv[1])  # no custom_objects
        pools = sorted({type(l).__name__ for l in model.layers if type(l).__module__ == "kseg.layers"})
        print(json.dumps({"light": light, "layers": pools, "hooks": [type(f).__name__ for f in sys.meta_path]}))
    """
    result = _run(code, str(path), timeout=300)
    assert result["light"]
    assert "MaxPoolingWithArgmax2D" in result["layers"]
    assert "_ImportHooks" not in result["hooks"]  # the one-shot hook removed itself


def test_import_kseg_after_keras_registers_layers_at_once():
    code = """
        import json, sys
        import keras
        import kseg
        print(json.dumps({"layers": "kseg.layers" in sys.modules,
                          "registered": "kseg>MaxPoolingWithArgmax2D" in keras.saving.get_custom_objects()}))
    """
    assert _run(code, timeout=300) == {"layers": True, "registered": True}


@pytest.mark.parametrize("name", ["build_model", "get_spec", "list_models", "register_model", "Preprocessing",
                                  "register_weights", "list_weights"])
def test_lazy_public_names(name):
    import kseg

    assert name in dir(kseg) and callable(getattr(kseg, name))
    assert callable(kseg.flops) and kseg.flops.__module__ == "kseg.flops"
