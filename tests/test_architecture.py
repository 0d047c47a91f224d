"""The layering the README states is a contract (import-linter, configured in pyproject.toml).

`cli -> serving / inference / train -> convert / data -> models -> registry / tasks / layers /
weights`, and no import circle inside any package. The contract is checked on the code as it
is, and on copies of the code with one forbidden import added, to show each rule bites.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint(root):
    env = {**os.environ, "PYTHONPATH": root}
    # Run in `root`: lint-imports reads its pyproject.toml and finds kseg/ and convert/ there first.
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_code_keeps_the_layers_and_has_no_import_circles():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tree"))
    for package in ("kseg", "convert"):
        shutil.copytree(os.path.join(ROOT, package), os.path.join(root, package),
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), root)
    return root


@pytest.mark.parametrize("module, line, broken", [
    ("convert/verify.py", "import kseg.serving", "convert is not allowed to import kseg.serving"),
    ("kseg/models/vgg.py", "import kseg.data", "kseg.models is not allowed to import kseg.data"),
    ("kseg/train/fit.py", "import kseg.inference", "kseg.train is not allowed to import kseg.inference"),
    ("kseg/registry.py", "import kseg.models", "kseg.registry is not allowed to import kseg.models"),
    ("kseg/tasks/base.py", "import kseg.registry", "kseg.tasks is not allowed to import kseg.registry"),
    ("kseg/inference/traced.py", "import kseg.inference.scoring", "No cycles are allowed in kseg.inference"),
])
def test_one_forbidden_import_breaks_the_contract(tree, module, line, broken):
    path = os.path.join(tree, module)
    with open(path) as f:
        original = f.read()
    try:
        with open(path, "a") as f:
            f.write(f"\n{line}  # added by the test\n")
        result = _lint(tree)
    finally:
        with open(path, "w") as f:
            f.write(original)
    assert result.returncode != 0
    assert broken in " ".join(result.stdout.split("Broken contracts")[-1].split())


@pytest.mark.parametrize("package", ["kseg.train", "kseg.inference", "kseg.serving", "convert"])
def test_no_lazy_name_is_also_a_submodule(package):
    # Importing a submodule sets the package attribute of its name to the module, which would
    # then hide a lazily loaded function of the same name (kseg._lazy).
    import importlib
    import pkgutil

    module = importlib.import_module(package)
    submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
    assert not submodules & set(module._EXPORTS)
    for name in module._EXPORTS:
        assert not isinstance(getattr(module, name), type(module)), name
