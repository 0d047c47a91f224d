"""The `kseg` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from kseg import cliutil

# The registry's facts for `kseg models`, written by scripts/gen_model_table.py: listing models
# reads this file instead of importing every model module (and Keras).
CATALOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "catalog.json")


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


def catalog_entries():
    """The catalogue from the live registry (imports every model, and Keras): the tasks, and for
    every registered model its name, task, parameters, default input shape and paper."""
    import kseg
    from kseg.tasks import TASKS

    models = []
    for name in kseg.list_models():
        spec = kseg.get_spec(name)
        models.append({"name": name, "task": spec.task, "params": spec.params,
                       "input_shape": list(spec.input_shape), "paper": spec.paper})
    return {"tasks": list(TASKS), "models": models}


def load_catalog():
    """kseg/models/catalog.json (see catalog_entries); no Keras."""
    with open(CATALOG, encoding="utf-8") as f:
        return json.load(f)


def _rows(entries, task=None):
    rows = []
    for m in entries:
        if task is None or m["task"] == task:
            h, w, c = m["input_shape"]
            size = f"{h}x{w}x{c}" if h and w else f"any HxWx{c}"
            rows.append((m["name"], m["task"], f"{m['params']:,}", size, m["paper"]))
    return rows


def model_rows(task=None):
    """(name, task, params, default input, paper) for every registered model, from the live registry."""
    return _rows(catalog_entries()["models"], task)


def catalog_rows(task=None):
    """The same rows from the shipped catalogue, without importing Keras (from the live registry
    when the catalogue is missing, e.g. in a checkout before scripts/gen_model_table.py ran)."""
    if not os.path.exists(CATALOG):
        return model_rows(task)
    return _rows(load_catalog()["models"], task)


def _task_names():
    if not os.path.exists(CATALOG):
        return ["classification", "segmentation", "edges"]
    return load_catalog()["tasks"]


def _check_model_name(name):
    """ValueError for an unregistered name (naming close matches). A name the catalogue lists needs
    no Keras; any other is looked up in the live registry (a model added since the catalogue)."""
    if os.path.exists(CATALOG) and any(m["name"] == name for m in load_catalog()["models"]):
        return
    import kseg

    kseg.get_spec(name)


def cmd_models(args):
    if args.plot is not None:
        return cmd_models_plot(args)
    if args.show_shapes:
        raise ValueError("--show-shapes goes with --plot FILE")
    if args.name is not None:
        _check_model_name(args.name)
    if args.run is not None:
        import kseg

        names = ([args.name] if args.name else []) + args.run
        return run_models(list(dict.fromkeys(names)) or kseg.list_models(args.task))
    rows = catalog_rows(args.task)
    if args.name is not None:
        rows = [row for row in rows if row[0] == args.name] or \
            [row for row in model_rows(args.task) if row[0] == args.name]
        if not rows:
            raise ValueError(f"{args.name} is not a {args.task} model")
    cliutil.console().print(_models_table(rows, "kseg models"))
    return cliutil.OK


def cmd_models_plot(args):
    """`kseg models NAME --plot FILE`: the architecture drawn by keras.utils.plot_model. pydot and
    Graphviz's dot are checked first: without them nothing is built or written (exit 3)."""
    if args.name is None:
        raise ValueError("--plot FILE draws one model: name it (kseg models NAME --plot FILE.png)")
    if args.run is not None:
        raise ValueError("--plot draws a model and --run runs models: give one of them")
    _check_model_name(args.name)
    from convert.features import PlotUnavailable, plot_architecture

    try:  # checks the file's suffix, then pydot and dot, before Keras is imported or anything written
        path = plot_architecture(args.name, args.plot, show_shapes=args.show_shapes, dpi=args.dpi)
    except PlotUnavailable as e:
        print(f"kseg: error: {e}", file=sys.stderr)
        return cliutil.MISSING_DEPENDENCY
    cliutil.console().print(f"wrote {path} ({args.name}, drawn by keras.utils.plot_model)")
    return cliutil.OK


def run_models(names):
    """Build each named model, run it on one input, check its parameter count against the registry."""
    import numpy as np
    from rich.progress import Progress

    import kseg

    console = cliutil.console()
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
    return cliutil.PROBLEMS if failed else cliutil.OK


# `kseg demo --task detection`'s defaults (kseg.demo's DETECTION_*), for --help without importing Keras;
# tests/test_detection_train.py checks they agree.
DETECTION_DEMO = {"train_images": 1000, "val_images": 100, "size": 128, "budget": 480.0}


def cmd_demo(args):
    from kseg.train import RecipeError, TrainingSetupError

    detection = args.task == "detection"
    defaults = DETECTION_DEMO if detection else {
        "train_images": cliutil.DEMO_TRAIN_IMAGES, "val_images": cliutil.DEMO_VAL_IMAGES, "size": cliutil.DEMO_SIZE,
        "budget": cliutil.DEMO_BUDGET_S}
    given = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    options = dict(seed=args.seed, train_images=given["train_images"], val_images=given["val_images"],
                   size=given["size"], epochs=args.epochs, overrides=args.set, budget_s=given["budget"])
    try:
        if detection:
            from kseg.demo import print_detection_summary, run_detection_demo

            summary = run_detection_demo(args.out, **options)
        else:
            from kseg.demo import print_summary, run_demo

            summary = run_demo(args.out, **options)
    except (RecipeError, TrainingSetupError) as e:
        return cliutil.fail(e, "kseg demo")
    (print_detection_summary if detection else print_summary)(summary, cliutil.console())
    return cliutil.OK


def _weights_table(entries, title):
    from rich.table import Table

    table = Table(title=title)
    for column, justify in [("model", "left"), ("weights", "left"), ("from", "left"), ("layout", "left"),
                            ("size", "right"), ("metric", "left"), ("cached", "left")]:
        table.add_column(column, justify=justify, no_wrap=column in ("model", "weights", "size", "cached"),
                         overflow="fold")
    for e in entries:
        names = e.name + (f" ({', '.join(e.aliases)})" if e.aliases else "")
        size = f"{e.size_mb:g} MB" if e.size_mb is not None else "-"
        table.add_row(e.model, names, e.description, e.layout or "-", size, e.metric_text(),
                      "yes" if e.cached() else "no")
    return table


def cmd_weights(args):
    """`kseg weights list|fetch|path|verify`: the pretrained-weights registry and its cache (no Keras
    unless a model name needs checking)."""
    from kseg import pretrained

    console = cliutil.console()
    if args.weights_command == "list":
        entries = pretrained.list_weights(args.model)
        if args.model and not entries:
            raise ValueError(f"no weights are registered for {args.model!r}; `kseg weights list` shows them all")
        console.print(_weights_table(entries, f"kseg weights (cache: {pretrained.cache_dir()})"))
        return cliutil.OK
    if args.weights_command == "fetch":
        entry = pretrained.get_weights(args.model, args.name)
        path = pretrained.ensure(entry)
        print(path)
        return cliutil.OK
    if args.weights_command == "path":
        entry = pretrained.get_weights(args.model, args.name)
        print(entry.cache_path())
        if not entry.cached():
            print(f"kseg weights: not downloaded yet (`kseg weights fetch {entry.model} {entry.name}`, or put "
                  f"{entry.filename} from {entry.url} there)", file=sys.stderr)
            return cliutil.PROBLEMS
        return cliutil.OK
    results = pretrained.verify_cache(args.model)
    from rich.table import Table

    table = Table(title=f"kseg weights verify (cache: {pretrained.cache_dir()})")
    for column in ("model", "weights", "file", "hash"):
        table.add_column(column, overflow="fold")
    for entry, path, problem in results:
        table.add_row(entry.model, entry.name, path, "ok" if problem is None else f"MISMATCH: {problem}")
    console.print(table)
    bad = sum(problem is not None for _, _, problem in results)
    console.print(f"{len(results) - bad} of {len(results)} cached files match their registered hashes.")
    return cliutil.PROBLEMS if bad else cliutil.OK


def build_parser():
    parser = argparse.ArgumentParser(prog="kseg", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models (--run: build and run them; NAME --plot FILE.png: "
                                      "draw one)")
    p.add_argument("name", nargs="?", metavar="NAME", help="only this model (its row, --run, or --plot)")
    p.add_argument("--task", choices=_task_names())
    p.add_argument("--run", nargs="*", metavar="MODEL",
                   help="build and run these models (default: all listed) on one input and check their "
                        "parameter counts")
    p.add_argument("--plot", metavar="FILE",
                   help="draw NAME's architecture (default build options) into FILE (.png, .svg, .pdf, .jpg) with "
                        "keras.utils.plot_model; needs pydot (pip install pydot) and Graphviz's dot program "
                        "(apt install graphviz / brew install graphviz)")
    p.add_argument("--show-shapes", action="store_true", help="--plot: each layer's input and output shapes too")
    p.add_argument("--dpi", type=int, default=96, help="--plot: resolution of a PNG or JPEG (default 96)")
    p.set_defaults(func=cmd_models)

    d = sub.add_parser("demo", help="the main job: synthetic data -> train a small DeepLab-LargeFOV on the "
                                           "CPU -> evaluate (+CRF) -> predictions, plots, ONNX export (no downloads); "
                                           "--task detection: a small SSD300 -> VOC mAP")
    det = DETECTION_DEMO
    d.add_argument("--task", choices=("segmentation", "detection"), default="segmentation",
                   help="segmentation (default): DeepLab-LargeFOV, the synthetic_demo recipe; detection: SSD300 at "
                        "width 0.125, the synthetic_detection_demo recipe, scored by VOC mAP@0.5")
    d.add_argument("--out", default="kseg_demo", help="output directory (default ./kseg_demo); an interrupted "
                                                      "demo resumes there")
    d.add_argument("--budget", type=float, metavar="SECONDS",
                   help=f"training time limit; training stops after the epoch that would overrun it "
                        f"(default {cliutil.DEMO_BUDGET_S:.0f}; detection {det['budget']:.0f})")
    d.add_argument("--epochs", type=int, help="override the recipe's epochs")
    d.add_argument("--train-images", type=int,
                   help=f"default {cliutil.DEMO_TRAIN_IMAGES}; detection {det['train_images']}")
    d.add_argument("--val-images", type=int, help=f"default {cliutil.DEMO_VAL_IMAGES}; detection {det['val_images']}")
    d.add_argument("--size", type=int,
                   help=f"side of the square images in pixels (default {cliutil.DEMO_SIZE}; detection "
                        f"{det['size']}, resized to SSD300's 300x300 input)")
    d.add_argument("--seed", type=int, default=cliutil.DEMO_SEED)
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the demo's recipe, e.g. --set optimizer.learning_rate=1e-3")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("weights", help="pretrained weights by name: list, fetch (download + verify), path, verify",
                       description="The registered pretrained weights (keras.applications and torchvision files for "
                                   "kseg's models) and their cache ($KSEG_HOME/weights, default ~/.kseg/weights). "
                                   "build_model(NAME, weights=WEIGHTS) uses the same entries; KSEG_WEIGHTS_MIRROR=URL "
                                   "downloads every file from a mirror instead.")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    p = wsub.add_parser("list", help="a table: model, weights, source, layout, size, metric, cached")
    p.add_argument("model", nargs="?", help="only this model's weights")
    p = wsub.add_parser("fetch", help="download and verify one entry into the cache; prints its path")
    p.add_argument("model")
    p.add_argument("name", help="the weights name, e.g. imagenet or imagenet_torchvision")
    p = wsub.add_parser("path", help="print where an entry's file is (or goes) in the cache; exit 1 if not there yet")
    p.add_argument("model")
    p.add_argument("name")
    p = wsub.add_parser("verify", help="re-hash the cached files against the registry; exit 1 on a mismatch")
    p.add_argument("model", nargs="?", help="only this model's files")
    w.set_defaults(func=cmd_weights)

    # Each feature package owns its subcommands. Neither its cli module nor its (lazy) __init__
    # imports TensorFlow: the handlers do, when they run.
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


SUBCOMMAND_MODULES = ("kseg.data.cli", "kseg.train.cli", "kseg.inference.cli", "convert.cli", "kseg.serving.cli")


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kseg {version('kseg')}"
    except PackageNotFoundError:
        return "kseg (not installed)"


def main(argv=None):
    """`kseg ...`: the exit code (see kseg.cliutil: 0 ok, 1 problems found, 2 bad usage or input,
    3 a missing optional dependency). Expected errors print one line, never a traceback."""
    args = build_parser().parse_args(argv)
    return cliutil.run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
