"""`kseg train`: parsing and printing around kseg.train.

kseg/cli.py wires it in with `add_parser(subparsers)`; the handler is in `args.func`.
"""

from __future__ import annotations

import sys
import warnings

from kseg import cliutil


def add_parser(subparsers):
    """Register `train` on an argparse sub-parser collection."""
    p = subparsers.add_parser("train", help="train a model with a recipe (kseg/train/recipes/*.toml)")
    p.add_argument("--recipe", required=True, help="a shipped recipe name (e.g. deeplab_largefov_voc) or a .toml path")
    p.add_argument("--data", required=True, help="dataset root in the recipe's layout")
    p.add_argument("--out", required=True, help="output directory; rerun the same command to resume")
    p.add_argument("--epochs", type=int, help="override [training] epochs")
    p.add_argument("--batch-size", type=int, help="override [training] batch_size (the global batch)")
    p.add_argument("--lr", type=float, help="override [optimizer] learning_rate")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any recipe value, e.g. --set model_options.width=0.25 (repeatable)")
    p.add_argument("--backbone-weights", metavar="FILE|NAME",
                   help="ImageNet weights of the backbone to start from, as the recipe's paper does (a "
                        "keras.applications .h5, a torchvision state_dict, or a registered name such as imagenet "
                        "or imagenet_torchvision: `kseg weights list`); without them such a recipe "
                        "trains from scratch and says so")
    p.add_argument("--precision", default="float32", choices=("float32", "mixed_float16", "mixed_bfloat16"))
    p.add_argument("--xla", action="store_true", help="compile train steps with XLA (jit_compile)")
    p.add_argument("--gif", type=int, nargs="?", const=21, metavar="N",
                   help="after every epoch, add a frame to OUT/predictions.gif: N validation images (default 21), "
                        "their ground truth and the predictions (segmentation and edges)")
    p.set_defaults(func=cmd_train)

    return subparsers


def cmd_train(args):
    from kseg.train import RecipeError, TrainingSetupError, load_recipe, train
    from kseg.train.fit import FromScratchWarning, from_scratch_notice

    overrides = list(args.set)
    try:
        recipe = load_recipe(args.recipe, overrides)
        values = {}
        if args.lr is not None:
            values["optimizer.learning_rate"] = args.lr
        notice = from_scratch_notice(recipe, args.backbone_weights)
        if notice:
            print(f"kseg train: warning: {notice}", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FromScratchWarning)  # said above
            result = train(recipe, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                           overrides=values, precision=args.precision, jit_compile=args.xla,
                           backbone_weights=args.backbone_weights, gif=args.gif)
    except (RecipeError, TrainingSetupError) as e:
        return cliutil.fail(e, "kseg train")
    score = result["val_score"]
    shown = f"{score:.4f}" if isinstance(score, float) else str(score)
    stages = result.get("stages")
    if stages:  # R-CNN's SVMs and box regressors after fit
        cliutil.console().print("later stages: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    cliutil.console().print(f"trained {result['epochs']} epochs in {result['train_seconds']:.0f} s; "
                            f"{result['monitor']} {shown}; outputs in {args.out}")
    return cliutil.OK
