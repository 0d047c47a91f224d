"""`kseg evaluate`, `predict` and `crf-search`: parsing and printing around kseg.inference.

kseg/cli.py wires these in with `add_parser(subparsers)`; each sub-command's handler is in
`args.func`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kseg import cliutil

# kseg.inference.files' default (not imported: it loads TensorFlow).
SCORE_THRESHOLD = 0.3

# A missing file, a bad setting or a missing optional dependency: a one-line message, no traceback.
_EXPECTED = (*cliutil.INPUT_ERRORS, ImportError)
CLASSIFICATION_LAYOUTS = ("classification_folder", "classification_list")
DETECTION_LAYOUTS = ("voc_detection", "coco_detection")
_LAYOUT_CHOICES = ("voc", "sbd", "synthetic", "pets", *CLASSIFICATION_LAYOUTS, "edges", *DETECTION_LAYOUTS,
                   "skeleton")
# Layouts read as (root, split) with one raw (0..255) image per batch, by their kseg.data reader's name.
_SPLIT_READERS = {"voc": "voc", "sbd": "sbd", "synthetic": "synthetic", "pets": "pets", "skeleton": "sk_large"}
# Detection evaluation reads batches of this many images (all resized to the network input);
# a detector that takes any size reads one image at a time, at its own size.
DETECTION_BATCH = 8


def add_parser(subparsers):
    """Register `evaluate`, `predict` and `crf-search` on an argparse sub-parser collection."""
    e = subparsers.add_parser("evaluate", help="score a saved model on a dataset (FCN metrics, per-class IoU; "
                                               "classifiers: top-1/top-5, per-class accuracy, confusion matrix; "
                                               "detectors: VOC mAP (VOC07 11-point and all-point), COCO AP; "
                                               "edges and skeletons: ODS / OIS F-measures)")
    _model_args(e)
    e.add_argument("--data", required=True, help="dataset root (classification_list: the folder or the list file; "
                                                 "coco_detection: the image folder)")
    e.add_argument("--layout", choices=_LAYOUT_CHOICES,
                   help="default: the training run's layout, else the model's task's first (voc, "
                        "classification_folder, edges, voc_detection); "
                        "classification_folder: DATA/SPLIT/CLASS/*.jpg (or DATA/CLASS/*.jpg); "
                        "classification_list: 'relative/path.jpg LABEL' lines in DATA/SPLIT.txt, "
                        "DATA/meta/SPLIT.txt or the file DATA; edges: 'image edge_map' lines (BSDS / HED "
                        "lists) in the file DATA or DATA/SPLIT[.lst]; voc_detection: DATA/Annotations/*.xml, "
                        "JPEGImages/, ImageSets/Main/SPLIT.txt (DATA: VOC2007 or a VOCdevkit holding one year); "
                        "coco_detection: the images in DATA, the boxes in --annotations; skeleton: SK-LARGE's "
                        "DATA/images/SPLIT/*.jpg and DATA/groundTruth/SPLIT/*.mat (its splits: train, test)")
    e.add_argument("--split", default="val")
    e.add_argument("--annotations", metavar="JSON",
                   help="coco_detection: the instances JSON (e.g. annotations/instances_val2017.json); its file "
                        "name, not --split, names the scores file")
    e.add_argument("--crf", nargs="?", const="paper", metavar="SETTINGS",
                   help="refine with the dense CRF: the paper's defaults, or e.g. w1=5,sigma_alpha=80,sigma_beta=3")
    e.add_argument("--json", dest="json_out", nargs="?", const="-", metavar="PATH",
                   help="write the scores here (default: next to the model); --json alone prints them as JSON "
                        "instead of the tables (the file next to the model is still written)")
    _classifier_args(e)
    _edge_args(e)
    g = e.add_argument_group(*DETECTOR_GROUP)
    _scale_args(g)
    g.add_argument("--proposals", metavar="FILE",
                   help="detectors with a proposals input (Fast R-CNN, R-CNN): the region proposals of every image "
                        "of the split, a .npz / .json / .mat of boxes per image id in the image's pixels (`kseg "
                        "data proposals` writes one); {split} in the name is replaced by --split (default: the "
                        "training recipe's [data] proposals, when that file is in --data)")
    e.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("predict", help="label maps (palette PNGs) and colour overlays for image files; "
                                              "classifiers: predictions.json; detectors: detections.json and "
                                              "the images with their boxes drawn; edge and skeleton models: "
                                              "probability maps (grey PNGs)")
    _model_args(p)
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--out", required=True, help="output directory: STEM.png (class indices) and STEM_overlay.png; "
                                                "detectors: detections.json and STEM.png (boxes drawn)")
    p.add_argument("--crf", nargs="?", const="paper", metavar="SETTINGS",
                   help="refine with the dense CRF: the paper's defaults, or e.g. w1=5,sigma_alpha=80,sigma_beta=3")
    p.add_argument("--size", type=cliutil.parse_size, metavar="HxW",
                   help=cliutil.size_help("predict on a resized copy (outputs stay at the original size; "
                                          "fixed-input models always resize)"))
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _classifier_args(p)
    _edge_args(p)
    g = p.add_argument_group(*DETECTOR_GROUP)
    g.add_argument("--score-threshold", type=float, metavar="S",
                   help="keep the detections scoring >= S in detections.json and the drawings (default "
                        f"{SCORE_THRESHOLD}; kseg evaluate scores every detection the decoder keeps)")
    _scale_args(g)
    g.add_argument("--proposals", metavar="FILE|selective-search",
                   help="detectors with a proposals input (Fast R-CNN, R-CNN): a .npz / .json / .mat of boxes per "
                        "image id (the file name without its extension) in the image's pixels (`kseg data "
                        "proposals`), or selective-search to compute them for each image (needs kseg[proposals])")
    p.set_defaults(func=cmd_predict)

    c = subparsers.add_parser("crf-search", help="cross-validate the dense CRF's settings over the paper's ranges")
    _model_args(c)
    c.add_argument("--data", required=True, help="dataset root")
    c.add_argument("--layout", default="voc", choices=("voc", "sbd", "synthetic", "pets"))
    c.add_argument("--split", default="val")
    c.add_argument("--images", type=int, default=100, help="first N images of the split (default 100, the paper's)")
    c.add_argument("--w1", type=_values, help="appearance kernel weights, e.g. 5:10 or 4,5 (default 5:10)")
    c.add_argument("--sigma-alpha", type=_values, help="its spatial std, e.g. 50:100:10 (default)")
    c.add_argument("--sigma-beta", type=_values, help="its colour std, e.g. 3:10 (default)")
    c.add_argument("--base", default="paper", metavar="SETTINGS",
                   help="the fixed values (default: the paper's w2=3, sigma_gamma=3, iterations=10)")
    c.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    c.add_argument("--json", dest="json_out", help="write every setting's scores here (default: next to the model)")
    c.set_defaults(func=cmd_crf_search)
    return subparsers


DETECTOR_GROUP = ("detectors", "fixed-input detectors (SSD300) get each image resized to the network input "
                                "(per axis); detectors that take any size (Faster R-CNN) get one image at a time, "
                                "resized keeping its aspect ratio to their test scale (the shorter side "
                                "--min-size, the longer at most --max-size); the boxes are mapped back to each "
                                "image's pixels")


def _scale_args(g):
    g.add_argument("--min-size", type=int, metavar="N",
                   help="any-size detectors: resize each image's shorter side to N pixels (default: the scale of "
                        "the training run next to the file (its recipe's min_size / max_size), else the model's "
                        "layout's test scale: 600 for py-faster-rcnn's, 800 for torchvision's)")
    g.add_argument("--max-size", type=int, metavar="N",
                   help="any-size detectors: but never the longer side beyond N pixels (the scale is then N / "
                        "the longer side; default: 1000 for py-faster-rcnn's layout, 1333 for torchvision's)")


def _test_scale(args, inference, detection):
    """(min_size, max_size) given on the command line (either may be None), else the scale the model was
    trained at (its run's recipe [data] min_size / max_size, kseg_run.json next to the file: py-faster-rcnn
    tests at its training scale), else None (the registry's rule); refused for non-detectors."""
    if args.min_size is None and args.max_size is None:
        if not detection:
            return None
        from kseg.identity import run_record

        data = ((run_record(args.model) or {}).get("recipe_values") or {}).get("data") or {}
        trained = data.get("min_size"), data.get("max_size")
        return trained if None not in trained else None
    if not detection:
        raise ValueError(f"--min-size / --max-size set a detector's test scale; {args.model} is a "
                         f"{inference.task.name} model")
    return args.min_size, args.max_size


def scores_table(scores, title):
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("class", "left"), ("IoU", "right"), ("accuracy", "right"), ("pixels", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    def fmt(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for row in scores["per_class"]:
        table.add_row(row["class"], fmt(row["iou"]), fmt(row["accuracy"]), f"{row['pixels']:,}")
    table.add_section()
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
        table.add_row(key, f"{100 * scores[key]:.2f}", "", "")
    return table


def _model_args(p):
    p.add_argument("model", help="a .keras file (e.g. best.keras from kseg train) or a registry name with --weights")
    p.add_argument("--weights", help="weights for a registry name: registered pretrained weights (e.g. imagenet; "
                                     "`kseg weights list`) or a file (.h5, .weights.h5, .keras, .pth, .safetensors)")
    p.add_argument("--num-classes", type=int, help="output classes of a registry-name model")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="build option of a registry-name model, e.g. --option width=0.25 (repeatable)")
    p.add_argument("--preprocessing",
                   help="a preprocessing kind or model name (default: the run's kseg_run.json, the file's metadata "
                        "or the registry spec)")


def _classifier_args(p):
    g = p.add_argument_group("classifiers", "the evaluation transform (default: the training run's recipe, "
                                            "[data] eval_resize / eval_crop / interpolation, or the named "
                                            "weights' transform; else a plain resize "
                                            "to the model's input)")
    g.add_argument("--eval-resize", type=int, metavar="N", help="resize the shorter side to N (e.g. 256)")
    g.add_argument("--eval-crop", type=int, metavar="N", help="then keep the centre NxN (e.g. 224)")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5"),
                   help="the resize's interpolation (default bilinear)")


def _edge_args(p):
    g = p.add_argument_group("edge and skeleton models (HED, FSDS)")
    g.add_argument("--output", dest="edge_output", choices=("average", "fuse"),
                   help="the edge map: the average of the fused and side outputs (default, the HED paper's "
                        "result) or the fused output alone; a skeleton map is always FSDS's fused output's")


def _classifier_options(args, inference):
    """The InferenceModel with the command line's evaluation transform applied."""
    if (args.eval_resize is None) != (args.eval_crop is None):
        raise ValueError("--eval-resize and --eval-crop go together (resize the shorter side, then crop the centre)")
    if args.eval_resize is not None:
        inference.eval_transform = (args.eval_resize, args.eval_crop)
    if args.interpolation:
        inference.interpolation = args.interpolation
    return inference


def _values(text):
    """'5:10' (inclusive, step 1), '50:100:10' or '3,5,8' -> a list of numbers."""
    try:
        if ":" in text:
            parts = [float(v) for v in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0) or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts[0], parts[1], parts[2] if len(parts) == 3 else 1.0
            count = int(round((stop - start) / step)) + 1
            values = [start + i * step for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP[:STEP] or a comma list of numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"no values in {text!r}")
    return [int(v) if float(v).is_integer() else v for v in values]


def _option_values(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _load(args):
    from kseg.inference import load_inference_model

    return load_inference_model(args.model, weights=args.weights, num_classes=args.num_classes,
                                preprocessing=args.preprocessing, options=_option_values(args.option))


def _default_out(args, suffix):
    base = args.model if os.path.isfile(args.model) else (args.weights or args.model)
    return os.path.splitext(base)[0] + suffix


def _raw_data(args, inference=None):
    import kseg.data as kd

    if args.layout is None:
        args.layout = _default_layout(args.model, inference)
    if inference is not None and args.layout not in inference.task.data_layouts:
        task = inference.task
        raise ValueError(f"{args.model} is a model of the {task.name} task: pass --layout "
                         f"{' or '.join(lay for lay in task.data_layouts if lay in _LAYOUT_CHOICES)}")
    if args.layout in CLASSIFICATION_LAYOUTS:
        return _classification_data(args, inference)
    if args.layout == "edges":
        return kd.edges(edge_list(args.data, args.split), batch_size=1)
    if getattr(args, "annotations", None) and args.layout != "coco_detection":
        raise ValueError("--annotations goes with --layout coco_detection")
    if args.layout in DETECTION_LAYOUTS:
        return _detection_data(args, inference)
    reader = getattr(kd, _SPLIT_READERS[args.layout])
    # Raw RGB: the model's preprocessing is applied before the network, the CRF sees the colours.
    return reader(args.data, args.split, batch_size=1)


def _check_supported(inference, command):
    """A task without data layouts has no evaluate / predict here: say so."""
    if not inference.task.data_layouts:
        raise ValueError(f"kseg {command} does not handle {inference.task.name} models")


def _detection_data(args, inference):
    """Raw (0..255) batches of a detection set resized to the detector's input, boxes scaled with them
    (an any-size detector: single images at their own size); VOC's class ids from the training run's
    class names when it has them."""
    import kseg.data as kd
    from kseg.inference.proposals import split_proposals
    from kseg.inference.scoring import network_size

    size = network_size(inference.model)  # None: any size, one image at a time at its own size
    options = dict(size=size, batch_size=DETECTION_BATCH if size else 1)
    if args.layout == "coco_detection" and not args.annotations:
        raise ValueError("--layout coco_detection reads the images in --data and the boxes in --annotations "
                         "(an instances JSON)")
    extra = split_proposals(inference.model, getattr(args, "proposals", None), data=args.data, layout=args.layout,
                            split=args.split, annotations=args.annotations, run_of=args.model)
    if extra is not None:
        options["extra_boxes"] = {"proposals": extra}
    if args.layout == "coco_detection":
        return kd.coco_detection(args.data, args.annotations, **options)
    return kd.voc_detection(args.data, args.split, class_names=inference.class_names or None, **options)


def _default_layout(model, inference):
    """The training run's data layout (kseg_run.json next to the model), else the task's first."""
    from kseg.identity import run_record

    if inference is None:
        return "voc"
    layouts = [lay for lay in inference.task.data_layouts if lay in _LAYOUT_CHOICES]
    recorded = ((run_record(model) or {}).get("recipe_values") or {}).get("data", {}).get("layout")
    return recorded if recorded in layouts else layouts[0]


def edge_list(data, split):
    """The list of 'image edge_map' lines: the file DATA, or DATA/SPLIT, DATA/SPLIT.lst, DATA/SPLIT_pair.lst."""
    if os.path.isfile(data):
        return data
    candidates = [os.path.join(data, name) for name in (split, split + ".lst", split + "_pair.lst")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no edge list: --data takes a list file of 'image edge_map' lines, or a folder with "
                            f"one of {', '.join(candidates)}")


def _classification_data(args, inference):
    """Raw (0..255) batches of a classification split through the model's evaluation transform."""
    import kseg.data as kd
    from kseg.data.augment import check_eval_transform
    from kseg.inference.files import classifier_input_size

    model = inference.model
    transform = check_eval_transform(inference.eval_transform, inference.interpolation)
    size = classifier_input_size(model, None, transform)
    options = dict(image_size=None if transform else size, channels=int(model.input_shape[-1]),
                   eval_transform=transform, interpolation=inference.interpolation, batch_size=32)
    if args.layout == "classification_folder":
        split_dir = os.path.join(args.data, args.split)
        root = split_dir if os.path.isdir(split_dir) else args.data  # DATA/SPLIT/CLASS or DATA/CLASS
        return kd.classification_folder(root, class_names=inference.class_names, **options)
    return kd.classification_list(args.data, args.split, **options)


def _fail(command, e):
    return cliutil.fail(e, f"kseg {command}")


def cmd_evaluate(args):
    from kseg.inference import evaluate

    try:
        inference = _classifier_options(args, _load(args))
        _check_supported(inference, "evaluate")
        test_scale = _test_scale(args, inference, inference.task.target_kind == "boxes")
        if test_scale is not None:
            from kseg.inference.scoring import detection_scale

            detection_scale(inference.model, *test_scale)  # refused for fixed-input detectors before reading
        if args.proposals is not None and inference.task.target_kind != "boxes":
            raise ValueError(f"--proposals feeds a detector's region proposals; {args.model} is a "
                             f"{inference.task.name} model")
        ds = _raw_data(args, inference)
        edges = inference.task.target_kind == "edge_map"
        if args.edge_output and not edges:
            raise ValueError(f"--output chooses an edge model's map; {args.model} is a {inference.task.name} model")
        scores = evaluate(inference.model, ds, preprocessing=inference.preprocessing, crf=args.crf,
                          class_names=inference.class_names, progress=args.json_out != "-",
                          edge_output=args.edge_output, test_scale=test_scale)
    except _EXPECTED as e:
        return _fail("evaluate", e)
    name = os.path.basename(args.model)
    detection = inference.task.target_kind == "boxes"
    split = (os.path.splitext(os.path.basename(args.annotations))[0] if args.layout == "coco_detection"
             else args.split)
    title = f"{name} on {args.data} ({split}, {scores['images']} images)"
    to_stdout = args.json_out == "-"
    say = (lambda text: print(text, file=sys.stderr)) if to_stdout else print
    suffix = f"_{split}{'_crf' if args.crf else ''}_scores.json"
    out = _default_out(args, suffix) if args.json_out in (None, "-") else args.json_out
    drawn = None
    if detection:
        if not to_stdout:
            console = cliutil.console()
            console.print(detection_table(scores, title))
            console.print(coco_table(scores))
    elif not inference.task.dense:
        from kseg.inference.plots import plot_confusion

        stem = next((out[: -len(end)] for end in ("_scores.json", ".json") if out.endswith(end)), out)
        drawn = plot_confusion(scores["confusion"], stem + "_confusion.png",
                               class_names=[r["class"] for r in scores["per_class"]], title=title)
        if not to_stdout:
            console = cliutil.console()
            console.print(classification_table(scores, title))
            console.print(per_class_table(scores))
    elif edges:
        if not to_stdout:
            cliutil.console().print(edge_table(scores, title))
    elif not to_stdout:
        cliutil.console().print(scores_table(scores, title))
        if args.crf:
            before = scores["before_crf"]
            print(f"dense CRF: {scores['crf']}")
            print(f"mean IoU {100 * before['mean_iou']:.2f} without CRF -> {100 * scores['mean_iou']:.2f} with CRF; "
                  f"pixel accuracy {100 * before['pixel_accuracy']:.2f} -> {100 * scores['pixel_accuracy']:.2f}")
    with open(out, "w") as f:
        json.dump(scores, f, indent=1)
    if to_stdout:
        print(json.dumps(scores))
    say(f"scores written to {out}")
    if drawn:
        say(f"confusion matrix drawn in {drawn}")
    return cliutil.OK


def _percent(value):
    """An AP as a percentage; "-" where it is undefined (None, or COCO's -1)."""
    return "-" if value is None or value < 0 else f"{100 * value:.2f}"


def detection_table(scores, title):
    """Per-class VOC AP (VOC07 11-point and all-point, IoU > 0.5, difficult objects left out) and the mAPs.

    Classes with no ground truth and no detections (COCO's unused ids) are left out."""
    from rich.table import Table

    rows = [r for r in scores["per_class"] if r["gt"] or r["detections"]]
    hidden = len(scores["per_class"]) - len(rows)
    more = f"; {hidden} classes with neither left out" if hidden else ""
    table = Table(title=title, caption=f"VOC AP at IoU > 0.5, difficult objects ignored{more}")
    for column, justify in (("id", "right"), ("class", "left"), ("AP VOC07 %", "right"), ("AP %", "right"),
                            ("objects", "right"), ("detections", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for r in rows:
        table.add_row(str(r["class"]), r["name"], _percent(r["ap_voc07"]), _percent(r["ap_voc"]), f"{r['gt']:,}",
                      f"{r['detections']:,}")
    table.add_section()
    table.add_row("", "mAP", _percent(scores["map_voc07"]), _percent(scores["map_voc"]),
                  f"{sum(r['gt'] for r in rows):,}", f"{sum(r['detections'] for r in rows):,}")
    return table


def coco_table(scores):
    """COCO's box AP: AP@[.5:.95], AP50, AP75 and by object area (difficult objects as crowd regions)."""
    from rich.table import Table

    coco = scores["coco"]
    table = Table(title="COCO AP (100 detections per image; areas in the original pixels)")
    labels = {"ap": "AP@[.5:.95]", "ap50": "AP50", "ap75": "AP75", "ap_small": "AP small",
              "ap_medium": "AP medium", "ap_large": "AP large"}
    for key in labels:
        if key in coco:
            table.add_column(labels[key], justify="right", no_wrap=True)
    table.add_row(*(_percent(coco[key]) for key in labels if key in coco))
    return table


def edge_table(scores, title):
    """ODS and OIS F-measures, their thresholds, precision and recall, under the benchmark the scores'
    "protocol" names (the BSDS one of kseg.tasks.edges, the skeleton one of kseg.tasks.skeleton)."""
    from rich.table import Table

    table = Table(title=f"{title}: {scores['protocol']} ({scores['output']} map)")
    for column in ("", "F", "threshold", "precision", "recall"):
        table.add_column(column, justify="right" if column else "left", no_wrap=True)
    ois_t = scores["ois_thresholds"]
    table.add_row("ODS", f"{scores['ods']:.4f}", f"{scores['ods_threshold']:.3f}", f"{scores['ods_precision']:.4f}",
                  f"{scores['ods_recall']:.4f}")
    table.add_row("OIS", f"{scores['ois']:.4f}", f"{sum(ois_t) / max(len(ois_t), 1):.3f} (mean)",
                  f"{scores['ois_precision']:.4f}", f"{scores['ois_recall']:.4f}")
    return table


def classification_table(scores, title):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("score", no_wrap=True)
    table.add_column("%", justify="right", no_wrap=True)
    for key in ("top1", "top5"):
        if key in scores:
            table.add_row(f"top-{key[3:]} accuracy", f"{100 * scores[key]:.2f}")
    if "top5" not in scores:
        table.add_row("top-5 accuracy", "- (5 classes or fewer)")
    table.add_row("images", f"{scores['count']:,}")
    return table


PER_CLASS_ROWS = 40


def per_class_table(scores):
    """Per-class accuracy: every class with images (the PER_CLASS_ROWS worst when there are more)."""
    from rich.table import Table

    rows = [r for r in scores["per_class"] if r["images"]]
    shown = rows if len(rows) <= PER_CLASS_ROWS else sorted(rows, key=lambda r: r["accuracy"])[:PER_CLASS_ROWS]
    more = f" ({len(shown)} lowest of {len(rows)}; all in the JSON)" if len(shown) < len(rows) else ""
    table = Table(title=f"per-class accuracy{more}")
    for column, justify in (("index", "right"), ("class", "left"), ("accuracy %", "right"), ("images", "right"),
                            ("predicted", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for r in shown:
        table.add_row(str(r["index"]), r["class"], f"{100 * r['accuracy']:.2f}", f"{r['images']:,}",
                      f"{r['predicted']:,}")
    return table


def cmd_predict(args):
    from kseg.inference import classify_images, predict_edges, predict_images
    from kseg.inference.files import DETECTIONS_FILE, detect_images

    try:
        inference = _classifier_options(args, _load(args))
        _check_supported(inference, "predict")
        edges = inference.task.target_kind == "edge_map"
        detection = inference.task.target_kind == "boxes"
        if args.edge_output and not edges:
            raise ValueError(f"--output chooses an edge model's map; {args.model} is a {inference.task.name} model")
        if args.score_threshold is not None and not detection:
            raise ValueError(f"--score-threshold filters a detector's boxes; {args.model} is a "
                             f"{inference.task.name} model")
        if args.proposals is not None and not detection:
            raise ValueError(f"--proposals feeds a detector's region proposals; {args.model} is a "
                             f"{inference.task.name} model")
        test_scale = _test_scale(args, inference, detection) or (None, None)
        if detection:
            if args.crf:
                raise ValueError(f"{args.model} is a {inference.task.name} model; the dense CRF refines "
                                 "per-pixel class scores")
            threshold = SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
            results = detect_images(inference, args.images, args.out, score_threshold=threshold, size=args.size,
                                    overwrite=args.force, min_size=test_scale[0], max_size=test_scale[1],
                                    proposals=args.proposals)
        elif edges:
            if args.crf:
                raise ValueError(f"{args.model} is a {inference.task.name} model; the dense CRF refines "
                                 "per-pixel class scores")
            results = predict_edges(inference, args.images, args.out, output=args.edge_output, size=args.size,
                                    overwrite=args.force)
        elif not inference.task.dense:
            if args.crf:
                raise ValueError(f"{args.model} is a {inference.task.name} model; the dense CRF refines "
                                 "per-pixel class scores")
            results = classify_images(inference, args.images, args.out, size=args.size, overwrite=args.force)
        else:
            results = predict_images(inference, args.images, args.out, crf=args.crf, size=args.size,
                                     alpha=args.alpha, overwrite=args.force)
    except _EXPECTED as e:
        return _fail("predict", e)
    if detection:
        cliutil.console().print(detections_table(results, threshold))
        print(f"wrote the detections scoring >= {threshold:g} of {len(results)} images to "
              f"{os.path.join(args.out, DETECTIONS_FILE)} and the images with their boxes drawn (STEM.png) to "
              f"{args.out}")
        return cliutil.OK
    if edges:
        kind = inference.task.map_name  # what the task's maps are: edge, skeleton
        print(f"wrote {len(results)} {kind} maps (STEM.png, {kind} probability x 255, the {results[0]['output']} "
              f"map) to {args.out}" if results else f"no images: nothing written to {args.out}")
        return cliutil.OK
    if not inference.task.dense:
        cliutil.console().print(predictions_table(results))
        print(f"wrote the top {len(results[0]['top_k'])} classes of {len(results)} images to "
              f"{os.path.join(args.out, 'predictions.json')}")
        return cliutil.OK
    crf = f" (dense CRF {args.crf})" if args.crf else ""
    print(f"wrote {len(results)} label maps (STEM.png) and overlays (STEM_overlay.png) to {args.out}{crf}")
    return cliutil.OK


def predictions_table(results):
    from rich.table import Table

    table = Table(title=f"top classes of {len(results)} images")
    table.add_column("image", no_wrap=True)
    k = len(results[0]["top_k"]) if results else 0
    for i in range(k):
        table.add_column(f"#{i + 1}", no_wrap=True)
    for r in results:
        table.add_row(os.path.basename(r["file"]),
                      *(f"{t['name']} {100 * t['probability']:.1f}%" for t in r["top_k"]))
    return table


DETECTIONS_SHOWN = 5


def detections_table(results, threshold):
    """Per image: its size, how many detections, the best few as "name score"."""
    from rich.table import Table

    table = Table(title=f"detections scoring >= {threshold:g} in {len(results)} images")
    for column, justify in (("image", "left"), ("size", "right"), ("detections", "right"),
                            (f"best {DETECTIONS_SHOWN}", "left")):
        table.add_column(column, justify=justify, no_wrap=column != f"best {DETECTIONS_SHOWN}")
    for r in results:
        best = ", ".join(f"{d['name']} {d['score']:.2f}" for d in r["detections"][:DETECTIONS_SHOWN])
        table.add_row(os.path.basename(r["file"]), f"{r['size'][0]}x{r['size'][1]}", str(len(r["detections"])),
                      best or "-")
    return table


def crf_search_table(result, top):
    from rich.table import Table

    table = Table(title=f"dense CRF search on {result['images']} images: best {min(top, len(result['results']))} "
                        f"of {len(result['results'])} settings")
    for column in ("w1", "sigma_alpha", "sigma_beta", "mean IoU", "pixel acc.", "vs no CRF"):
        table.add_column(column, justify="right", no_wrap=True)
    base = result["baseline"]
    for row in result["results"][:top]:
        p = row["params"]
        table.add_row(f"{p['w1']:g}", f"{p['sigma_alpha']:g}", f"{p['sigma_beta']:g}", f"{100 * row['mean_iou']:.2f}",
                      f"{100 * row['pixel_accuracy']:.2f}", f"{100 * (row['mean_iou'] - base['mean_iou']):+.2f}")
    table.add_section()
    table.add_row("no CRF", "", "", f"{100 * base['mean_iou']:.2f}", f"{100 * base['pixel_accuracy']:.2f}", "")
    return table


def cmd_crf_search(args):
    from kseg.crf import CRFParams, check_installed, search_grid
    from kseg.inference import crf_search

    try:
        check_installed()
        grid = search_grid(CRFParams.parse(args.base), w1=args.w1, sigma_alpha=args.sigma_alpha,
                           sigma_beta=args.sigma_beta)
        if args.images < 1:
            raise ValueError(f"--images must be >= 1, got {args.images}")
        inference = _load(args)
        result = crf_search(inference, _raw_data(args), grid, images=args.images)
    except _EXPECTED as e:
        return _fail("crf-search", e)
    cliutil.console().print(crf_search_table(result, args.top))
    best = result["best"]
    print(f"best: --crf {best['crf']}  (mean IoU {100 * best['mean_iou']:.2f} vs "
          f"{100 * result['baseline']['mean_iou']:.2f} without CRF)")
    out = args.json_out or _default_out(args, f"_{args.split}_crf_search.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"all {len(result['results'])} settings written to {out}")
    return cliutil.OK
