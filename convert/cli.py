"""`kseg convert`, `kseg verify`, `kseg inspect`: argument parsing and printing only.

kseg/cli.py calls add_parser(subparsers); each handler returns the exit code.
"""

from __future__ import annotations

import json
import sys

from kseg import cliutil

# Other names `--to` accepts: pb is the frozen GraphDef's usual suffix.
FORMAT_ALIASES = {"pb": "frozen_graph"}


def _target_format(text):
    return FORMAT_ALIASES.get(text, text)


def add_parser(subparsers):
    from convert import formats  # the standard library only

    writable = sorted(n for n, f in formats.FORMATS.items() if f.save)
    p = subparsers.add_parser("convert", help="convert a model between formats and verify the result")
    p.add_argument("src", help="model file, SavedModel directory or checkpoint prefix")
    p.add_argument("--to", type=_target_format, choices=writable,
                   help="output format (default: from the output's suffix; pb is frozen_graph)")
    p.add_argument("-o", "--output", help="output path (default: SRC's name with the format's suffix)")
    p.add_argument("--model", help="kseg architecture for weights-only sources without kseg metadata")
    p.add_argument("--num-classes", type=int, help="build option of --model")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (tf2onnx supports up to 18)")
    p.add_argument("--static", action="store_true",
                   help="fixed input size --input-size (SavedModel, .pb, ONNX: static shapes, e.g. single-Conv "
                   "dilations; tf_serving: the size predict_images resizes to)")
    p.add_argument("--nchw", action="store_true", help="ONNX: NCHW input")
    p.add_argument("--quantize", choices=["dynamic"], help="TFLite: dynamic-range int8")
    p.add_argument("--input-size", type=cliutil.parse_size, metavar="HxW",
                   help=cliutil.size_help("the verification size; with --static also the fixed export size"))
    p.add_argument("--version", type=int, help="tf_serving: version directory (default: next free)")
    p.add_argument("--min-size", type=int, metavar="N",
                   help="tf_serving, detectors that take any size (Faster R-CNN): serving_default and predict_images "
                        "resize each image keeping its aspect ratio so its shorter side is N (default: the layout's "
                        "test scale, 600 py-faster-rcnn, 800 torchvision), as kseg export --serving does")
    p.add_argument("--max-size", type=int, metavar="N",
                   help="tf_serving, detectors that take any size: but never the longer side beyond N pixels "
                        "(default 1000 py-faster-rcnn, 1333 torchvision)")
    p.add_argument("--images", nargs="+", help="verify on these images instead of seeded random ones")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--unsafe", action="store_true", help="allow Lambda layers (runs code stored in the file)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("verify", help="run two artifacts on the same inputs and compare outputs")
    p.add_argument("a", help="reference artifact")
    p.add_argument("b", help="artifact to check")
    p.add_argument("--model", help="kseg architecture for weights-only files")
    p.add_argument("--images", nargs="+", help="image files (default: seeded random images)")
    p.add_argument("--input-size", type=cliutil.parse_size, metavar="HxW",
                   help=cliutil.size_help("the size to run at (default: the model's)"))
    p.add_argument("--tolerance", choices=["tf", "runtime", "torch", "int8"], help="override the pair's tolerance")
    p.add_argument("--unsafe", action="store_true", help="allow Lambda layers")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "inspect", help="format, metadata, inputs/outputs and parameters of a model file; --features: pictures of "
                        "its layers' feature maps for an image",
        description="Without --features: the format, kseg metadata, inputs/outputs and parameter count of a model "
                    "file. With --features IMAGE --out DIR: runs the image through the model (its preprocessing, "
                    "resized to its input size when that is fixed) and writes DIR/<layer>.png for each chosen layer, "
                    "a grid of its first --max-maps channels, each scaled to 0..255 on its own, with 1-px "
                    "separators, and DIR/index.json (each layer's output shape, channels shown, min/max).")
    p.add_argument("file", metavar="MODEL",
                   help="model file; with --features also a registered model name (random weights unless --weights)")
    p.add_argument("--model", help="kseg architecture for weights-only files")
    p.add_argument("--features", metavar="IMAGE", help="draw the feature maps this image gives (needs --out)")
    p.add_argument("--out", metavar="DIR", help="--features: the directory for <layer>.png and index.json")
    p.add_argument("--layers", nargs="+", metavar="NAME_OR_GLOB",
                   help="--features: layer names or fnmatch patterns (e.g. 'block*_conv*'; quote them). Default: "
                        "each stage's output, the last layer no skip connection passes by of every run of "
                        "consecutive layers with one spatial size (padding, cropping and dropout layers passed over; "
                        "1x1 maps left out)")
    p.add_argument("--max-maps", type=_positive, default=64, metavar="N",
                   help="--features: channels drawn per layer, the first N (default 64)")
    p.add_argument("--weights", help="--features with a registered model name: its weights (a file or a "
                                     "registered name, see kseg weights list)")
    p.add_argument("--preprocessing", help="--features: the input preprocessing (caffe, torch, unit, batchnorm or "
                                           "an architecture's name) of a file that records none")
    p.add_argument("--input-size", type=cliutil.parse_size, metavar="HxW",
                   help=cliutil.size_help("--features: resize the image to this (default: the model's input size "
                                          "when fixed, else the image's own)"))
    p.add_argument("--unsafe", action="store_true", help="allow Lambda layers (runs code stored in the file)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def _positive(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _report_table(report, title):
    from rich.table import Table

    table = Table(title=title)
    for column in ("output", "shape", "max abs", "mean abs", "max rel", "allowed", "argmax agree", "ok"):
        table.add_column(column, no_wrap=True)
    for o in report.outputs:
        agree = "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.4%}"
        table.add_row(o.name, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.mean_abs:.3g}",
                      f"{o.max_rel:.3g}", f"{o.allowed_max_abs:.3g}", agree, "yes" if o.passed else "NO")
    notes = list(dict.fromkeys(o.note for o in report.outputs if o.note))  # a detector's: detections as sets
    if notes or report.unmatched:
        table.caption = "; ".join(notes + ([f"only on one side, not compared: {', '.join(report.unmatched)}"]
                                           if report.unmatched else []))
    return table


def cmd_convert(args):
    from convert.api import VerificationError, convert

    options = {"opset": args.opset, "dynamic": not args.static, "nchw": args.nchw}
    if args.quantize:
        options["quantize"] = args.quantize
    scale = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}
    if scale:
        from convert import formats

        to = formats.target_format(args.output, args.to) if args.output else args.to
        if to != "tf_serving":
            raise ValueError("--min-size / --max-size set the test scale of a TF Serving export (--to tf_serving) "
                             f"of a detector that takes any size; not of {to or 'this output'}")
        options.update(scale)
    build_kwargs = {"num_classes": args.num_classes} if args.num_classes else None
    console = cliutil.console()
    try:
        result = convert(args.src, args.output, to=args.to, model=args.model, force=args.force, unsafe=args.unsafe,
                         build_kwargs=build_kwargs, input_size=args.input_size, images=args.images,
                         export_size=args.input_size if args.static else None,
                         version=args.version, progress=sys.stderr.isatty(), **options)
    except VerificationError as e:
        console.print(_report_table(e.report, "verification FAILED"))
        print(f"kseg: error: {e}", file=sys.stderr)
        return cliutil.PROBLEMS
    if args.json:
        print(json.dumps(result, indent=1))
        return cliutil.OK
    from convert.verify import Report

    report = Report(**{**result["verification"], "outputs": [
        _output(o) for o in result["verification"]["outputs"]]})
    console.print(_report_table(report, f"{result['source']['format']} -> {result['target']['format']}"))
    console.print(f"wrote {result['target']['path']} ({result['target']['format']}); verified: {result['summary']}")
    return cliutil.OK


def _output(d):
    from convert.verify import OutputReport

    return OutputReport(**d)


def cmd_verify(args):
    from convert.api import verify_files

    report = verify_files(args.a, args.b, model=args.model, unsafe=args.unsafe, images=args.images,
                          input_size=args.input_size, tolerance=args.tolerance)
    if args.json:
        print(report.to_json())
    else:
        console = cliutil.console()
        console.print(_report_table(report, f"{args.a} vs {args.b} ({report.kind} tolerance)"))
        console.print(report.summary())
    return cliutil.OK if report.passed else cliutil.PROBLEMS


# Options that only --features reads.
FEATURE_OPTIONS = {"out": "--out", "layers": "--layers", "weights": "--weights", "preprocessing": "--preprocessing",
                   "input_size": "--input-size"}


def cmd_inspect(args):
    if args.features is not None:
        return cmd_features(args)
    given = [flag for dest, flag in FEATURE_OPTIONS.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with --features IMAGE")
    from convert.api import inspect

    info = inspect(args.file, model=args.model, unsafe=args.unsafe)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return cliutil.OK
    from rich.table import Table
    from rich.text import Text

    table = Table(title=args.file, show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value")
    meta = info["metadata"] or {}
    params = info["parameters"]
    rows = [("format", f"{info['format']}: {info['description']}"),
            ("architecture", str(meta.get("architecture"))),
            ("build kwargs", json.dumps(meta.get("build_kwargs"))),
            ("num classes", str(meta.get("num_classes"))),
            ("preprocessing", json.dumps(meta.get("preprocessing"))),
            ("inputs", json.dumps(info["inputs"])),
            ("outputs", ", ".join(info["outputs"] or [])),
            ("parameters", f"{params:,}" if params is not None else "unknown"),
            ("kseg version", str(meta.get("kseg_version")))]
    for row in rows:
        # Text, not markup: rich would read "[null, null, null, 3]" as a style tag and drop it.
        table.add_row(*(Text(v) for v in row))
    cliutil.console().print(table)
    return cliutil.OK


def cmd_features(args):
    """`kseg inspect MODEL --features IMAGE --out DIR`: feature-map pictures (convert.features)."""
    if args.out is None:
        raise ValueError("--features IMAGE needs --out DIR, the directory for the pictures")
    import os

    from convert.features import feature_maps

    source = os.fspath(args.file)
    index = feature_maps(source, args.features, args.out, layers=args.layers, max_maps=args.max_maps,
                         model=args.model, weights=args.weights, preprocessing=args.preprocessing,
                         input_size=args.input_size, unsafe=args.unsafe)
    if args.weights is None and not (os.path.exists(source) or os.path.exists(source + ".index")):
        print(f"kseg inspect: note: {source} was built with random weights (pass --weights for trained ones)",
              file=sys.stderr)
    if args.json:
        print(json.dumps(index, indent=1))
        return cliutil.OK
    from rich.table import Table

    size = "x".join(map(str, index["input_size"]))
    table = Table(title=f"{source}: feature maps of {args.features} at {size}")
    for column in ("layer", "output", "shown", "min", "max", "file"):
        table.add_column(column, no_wrap=column != "file", overflow="fold")
    for e in index["layers"]:
        table.add_row(e["layer"], "x".join(map(str, e["shape"])), f"{e['channels_shown']} of {e['channels']}",
                      f"{e['min']:.4g}", f"{e['max']:.4g}", e["file"])
    console = cliutil.console()
    console.print(table)
    console.print(f"wrote {len(index['layers'])} pictures and {os.path.join(args.out, 'index.json')}")
    return cliutil.OK
