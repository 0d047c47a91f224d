"""`kseg train` and `kseg evaluate`: argument parsing and printing around kseg.train.

kseg/cli.py wires these in with `add_parser(subparsers)`; each sub-command's handler is in
`args.func`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def add_parser(subparsers):
    """Register `train` and `evaluate` on an argparse sub-parser collection."""
    p = subparsers.add_parser("train", help="train a model with a recipe (kseg/train/recipes/*.toml)")
    p.add_argument("--recipe", required=True, help="a shipped recipe name (e.g. deeplab_largefov_voc) or a .toml path")
    p.add_argument("--data", required=True, help="dataset root in the recipe's layout")
    p.add_argument("--out", required=True, help="output directory; rerun the same command to resume")
    p.add_argument("--epochs", type=int, help="override [training] epochs")
    p.add_argument("--batch-size", type=int, help="override [training] batch_size (the global batch)")
    p.add_argument("--lr", type=float, help="override [optimizer] learning_rate")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any recipe value, e.g. --set model_options.width=0.25 (repeatable)")
    p.add_argument("--precision", default="float32", choices=("float32", "mixed_float16", "mixed_bfloat16"))
    p.add_argument("--xla", action="store_true", help="compile train steps with XLA (jit_compile)")
    p.set_defaults(func=cmd_train)

    e = subparsers.add_parser("evaluate", help="score a saved model on a dataset (FCN metrics, per-class IoU)")
    e.add_argument("model", help="a .keras file saved by kseg train (best.keras / final.keras)")
    e.add_argument("--data", required=True, help="dataset root")
    e.add_argument("--layout", default="voc", choices=("voc", "sbd", "synthetic", "pets"))
    e.add_argument("--split", default="val")
    e.add_argument("--preprocessing", help="a preprocessing kind or model name (default: from the run's kseg_run.json)")
    e.add_argument("--json", dest="json_out", help="write the scores here (default: next to the model)")
    e.set_defaults(func=cmd_evaluate)
    return subparsers


def build_parser():
    """A standalone `kseg`-like parser with only these commands (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="kseg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def cmd_train(args):
    from kseg.train.fit import TrainingSetupError, train
    from kseg.train.recipes import RecipeError, load_recipe

    overrides = list(args.set)
    try:
        recipe = load_recipe(args.recipe, overrides)
        values = {}
        if args.lr is not None:
            values["optimizer.learning_rate"] = args.lr
        result = train(recipe, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                       overrides=values, precision=args.precision, jit_compile=args.xla)
    except (RecipeError, TrainingSetupError) as e:
        print(f"kseg train: error: {e}", file=sys.stderr)
        return 2
    _console().print(f"trained {result['epochs']} epochs in {result['train_seconds']:.0f} s; "
                     f"val mean IoU {result['val_mean_iou']}; outputs in {args.out}")
    return 0


def scores_table(scores, title):
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("class", "left"), ("IoU", "right"), ("accuracy", "right"), ("pixels", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for row in scores["per_class"]:
        fmt = (lambda v: "-" if v is None else f"{100 * v:.2f}")
        table.add_row(row["class"], fmt(row["iou"]), fmt(row["accuracy"]), f"{row['pixels']:,}")
    table.add_section()
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
        table.add_row(key, f"{100 * scores[key]:.2f}", "", "")
    return table


def cmd_evaluate(args):
    import keras

    import kseg  # noqa: F401  (registers kseg's layers for loading)
    import kseg.data as kd
    import kseg.train  # noqa: F401  (registers kseg's losses and metrics for loading)
    from kseg.train.fit import RUN_FILE, evaluate

    if not os.path.isfile(args.model):
        print(f"kseg evaluate: error: {args.model} does not exist", file=sys.stderr)
        return 2
    prep = args.preprocessing
    run_file = os.path.join(os.path.dirname(os.path.abspath(args.model)), RUN_FILE)
    if prep is None and os.path.exists(run_file):
        with open(run_file) as f:
            prep = json.load(f)["model"]
    model = keras.saving.load_model(args.model, compile=False)
    reader = {"voc": kd.voc, "sbd": kd.sbd, "synthetic": kd.synthetic, "pets": kd.pets}[args.layout]
    ds = reader(args.data, args.split, batch_size=1, preprocessing=prep)
    scores = evaluate(model, ds)
    _console().print(scores_table(scores, f"{os.path.basename(args.model)} on {args.data} ({args.split}, "
                                          f"{scores['images']} images)"))
    out = args.json_out or os.path.splitext(args.model)[0] + f"_{args.split}_scores.json"
    with open(out, "w") as f:
        json.dump(scores, f, indent=1)
    print(f"scores written to {out}")
    return 0
