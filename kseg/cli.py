"""The `kseg` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import importlib
import sys
import time


def _console():
    from rich.console import Console

    # Piped output (files, grep, CI logs) gets a wide table instead of rich's 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)


def _models_table(rows, title):
    from rich.table import Table

    table = Table(title=title)
    # Names and counts never wrap, so `kseg models | grep` finds them whatever the width.
    for column, justify, wrap in [("name", "left", False), ("task", "left", False), ("params", "right", False),
                                  ("default input", "left", False), ("reference", "left", True)]:
        table.add_column(column, justify=justify, no_wrap=not wrap, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def model_rows(task=None):
    """(name, task, params, default input, paper) for every registered model."""
    import kseg

    rows = []
    for name in kseg.list_models(task):
        spec = kseg.get_spec(name)
        h, w, c = spec.input_shape
        rows.append((name, spec.task, f"{spec.params:,}", f"{h}x{w}x{c}", spec.paper))
    return rows


def cmd_models(args):
    if args.run is not None:
        import kseg

        return run_models(args.run or kseg.list_models(args.task))
    _console().print(_models_table(model_rows(args.task), "kseg models"))
    return 0


def run_models(names):
    """Build each named model, run it on one input, check its parameter count against the registry."""
    import numpy as np
    from rich.progress import Progress

    import kseg

    console = _console()
    rng = np.random.default_rng(0)
    results, failed = [], 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building and running models", total=len(names))
        for name in names:
            spec = kseg.get_spec(name)
            progress.update(task, description=f"{name}")
            start = time.perf_counter()
            model = kseg.build_model(name)
            h, w, c = (d or 224 for d in spec.input_shape)
            image = rng.uniform(0, 255, size=(1, h, w, c)).astype("float32")
            # A direct call, not predict(): predict traces a new function per model and TF
            # warns about "excessive retracing" across a loop of models.
            out = model(spec.preprocessing.apply(image), training=False)
            outputs = [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
            seconds = time.perf_counter() - start
            params = model.count_params()
            ok = params == spec.params and all(np.all(np.isfinite(o)) for o in outputs)
            failed += not ok
            results.append((name, spec.task, f"{params:,}", "yes" if params == spec.params else f"NO ({spec.params:,})",
                            " ".join("x".join(map(str, o.shape)) for o in outputs), f"{seconds:.1f}"))
            progress.advance(task)
            del model
    from rich.table import Table

    table = Table(title="kseg: every registered model built and run on one input")
    for column in ("name", "task", "params", "matches reference", "output", "build+run s"):
        table.add_column(column, no_wrap=column != "output")
    for row in results:
        table.add_row(*row)
    console.print(table)
    console.print(f"{len(results) - failed} of {len(results)} models match their reference parameter counts.")
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(prog="kseg", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models (--run: build and run them)")
    p.add_argument("--task", choices=["classification", "segmentation", "edges"])
    p.add_argument("--run", nargs="*", metavar="MODEL",
                   help="build and run these models (default: all listed) on one input and check their "
                        "parameter counts")
    p.set_defaults(func=cmd_models)

    # Each feature package owns its subcommands.
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


SUBCOMMAND_MODULES = ("kseg.data.cli", "kseg.train.cli", "convert.cli", "kseg.serving.cli")


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kseg {version('kseg')}"
    except PackageNotFoundError:
        return "kseg (not installed)"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"kseg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
