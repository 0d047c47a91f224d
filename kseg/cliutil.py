"""Helpers every `kseg` subcommand shares: the console, `--size` parsing, exit codes, error reporting.

This module imports only the standard library (rich inside `console()`), never TensorFlow or
Keras: `kseg --help`, every `kseg CMD --help`, `kseg models` and `kseg data check` start in a
fraction of a second because the parsers and these helpers are all they load.

Exit codes (every subcommand):

    OK (0)                  success
    PROBLEMS (1)            a check or verification ran and found problems (data check, verify,
                            models --run, convert's verification)
    USAGE (2)               bad usage or input: a wrong argument, a missing or unreadable file, ...
    MISSING_DEPENDENCY (3)  an optional dependency is missing; the message names the pip command
"""

from __future__ import annotations

import argparse
import re
import sys

OK = 0
PROBLEMS = 1
USAGE = 2
MISSING_DEPENDENCY = 3

# `kseg demo`'s defaults; kseg/demo.py imports them from here so the parser needs no Keras.
DEMO_SEED = 0
DEMO_TRAIN_IMAGES = 2000
DEMO_VAL_IMAGES = 100
DEMO_SIZE = 128
DEMO_BUDGET_S = 520.0

SIZE_HELP = "H or HxW in pixels (positive integers; H alone means HxH)"


def console():
    """A rich Console for a command's results: the terminal's width, or 200 columns when piped."""
    from rich.console import Console

    # Piped output (files, grep, CI logs) gets a wide table instead of rich's 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)


def parse_size(text, minimum: int = 1) -> tuple[int, int]:
    """Parse a size argument: "H" or "HxW" (also "HXW"), positive integers -> (h, w).

    "H" alone means a square HxH. Every side must be >= `minimum` (1 unless a command needs
    more, e.g. `kseg data synth` needs 16). Raises argparse.ArgumentTypeError, so argparse
    reports it as a usage error naming the option.
    """
    raw = str(text).strip()
    parts = raw.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected H or HxW (e.g. 321 or 321x481), got {text!r}")
    if min(sides) < minimum:
        need = "positive" if minimum <= 1 else f">= {minimum}"
        raise argparse.ArgumentTypeError(f"expected H or HxW with sides {need}, got {text!r}")
    return sides[0], sides[-1]


def size_type(minimum: int = 1):
    """An argparse `type=` for sizes with every side >= minimum (parse_size's rule otherwise)."""
    if minimum <= 1:
        return parse_size

    def size(text):
        return parse_size(text, minimum)

    size.__name__ = "size"  # argparse names the type in "invalid size value" messages
    return size


def size_help(text: str = "", minimum: int = 1) -> str:
    """The one wording of a size option's help, with `text` in front (e.g. the option's purpose)."""
    rule = SIZE_HELP if minimum <= 1 else f"H or HxW in pixels (integers >= {minimum}; H alone means HxH)"
    return f"{text}: {rule}" if text else rule


# === optional dependencies ===

# Top-level import name -> the command that installs it (the extras are in pyproject.toml).
INSTALL = {
    "tensorflow": 'pip install "kseg[cpu]"  (or "kseg[gpu]" for CUDA)',
    "tf2onnx": 'pip install "kseg[onnx]"',
    "onnx": 'pip install "kseg[onnx]"',
    "onnxruntime": 'pip install "kseg[onnx]"',
    "torch": 'pip install "kseg[torch]"',
    "matplotlib": 'pip install "kseg[plot]"',
    "pydensecrf": 'pip install "kseg[crf]"  (builds from source: needs g++ and the Python headers)',
    "pydensecrf2": 'pip install "kseg[crf]"  (builds from source: needs g++ and the Python headers)',
    "tensorboard": 'pip install "kseg[tensorboard]"',
    "orjson": 'pip install "kseg[serving]"',
    "redis": 'pip install "kseg[serving]"',
    "cv2": 'pip install "kseg[proposals]"  (opencv-contrib-python-headless: Selective Search)',
    "tensorflow_serving": 'pip install --no-deps "tensorflow-serving-api~=2.21.0"',
    "grpc": "pip install grpcio",
    "pydot": 'pip install "kseg[plot]"  (kseg models --plot also needs Graphviz: apt install graphviz)',
}

_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def missing_module(error: BaseException) -> str | None:
    """The top-level name of the missing module behind an ImportError (or convert's
    FormatUnavailable), following the exception's cause and context; None if none is named."""
    seen = set()
    e = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = getattr(e, "name", None) if isinstance(e, ImportError) else None
        if not name:
            match = _NO_MODULE.search(str(e))
            name = match.group(1) if match else None
        if name:
            return name.partition(".")[0]
        e = e.__cause__ or e.__context__
    return None


def _format_unavailable(error) -> bool:
    formats = sys.modules.get("convert.formats")
    return formats is not None and isinstance(error, getattr(formats, "FormatUnavailable", ()))


# Errors a user's input or environment causes; anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError)


def exit_code(error: BaseException) -> int | None:
    """USAGE or MISSING_DEPENDENCY for an expected error, None for one that is a bug."""
    if isinstance(error, ImportError) or _format_unavailable(error):
        module = missing_module(error)
        if module in INSTALL or "pip install" in str(error) or _format_unavailable(error):
            return MISSING_DEPENDENCY
        return None
    if isinstance(error, INPUT_ERRORS):
        return USAGE
    return None


def message(error: BaseException) -> str:
    """The error's text as a user should read it (a KeyError's key without repr quotes)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error) or type(error).__name__


def fail(error: BaseException, prog: str = "kseg") -> int:
    """Print `PROG: error: ...` (and the pip command for a missing dependency); return the exit code.

    Call it from an `except` block: an unexpected error (a bug) is re-raised with its traceback.
    """
    code = exit_code(error)
    if code is None:
        raise error
    print(f"{prog}: error: {message(error)}", file=sys.stderr)
    if code == MISSING_DEPENDENCY:
        module = missing_module(error)
        if module in INSTALL:
            print(f"{prog}: install it with: {INSTALL[module]}", file=sys.stderr)
    return code


def run(func, args, prog: str = "kseg") -> int:
    """Call a subcommand handler; expected errors become a one-line message and an exit code."""
    try:
        code = func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (fail() re-raises anything unexpected)
        return fail(e, prog)
    return OK if code is None else code
