"""`kseg data synth|check|proposals`: registered on the main parser by kseg.cli via add_parser(subparsers)."""

from __future__ import annotations

import sys

# `from kseg import cliutil`, not `import kseg.cliutil`: kseg.data's import test forbids "kseg.cli*" names.
from kseg import cliutil

# The layouts checked split by split: the default split, or None for every split present (SPLIT_LISTS).
DEFAULT_SPLITS = {"voc": None, "sbd": "train_aug", "pets": "trainval", "voc-det": None, "skeleton": None}
# layout -> (module, function) listing every split of a dataset (imported only when used).
SPLIT_LISTS = {"voc": ("kseg.data.layouts", "voc_splits"), "voc-det": ("kseg.data.detection", "voc_detection_splits"),
               "skeleton": ("kseg.data.skeleton", "skeleton_splits")}
DETECTION_LAYOUTS = ("voc-det", "coco")  # kseg.data.detection's, without importing it for the parser


def add_parser(subparsers):
    """Register `data` with its `synth` and `check` subcommands on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="make the synthetic dataset, check a dataset, compute region proposals")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="write the built-in synthetic dataset (VOC layout)",
                       description="Write the synthetic shapes dataset (background + circle, square, "
                                   "triangle, cross; 255 boundary bands) as JPEG + palette PNG in the "
                                   "VOC layout; with --task detection as JPEG + Annotations XML (each "
                                   "shape's tight box) in the VOC detection layout. Deterministic in --seed.")
    p.add_argument("dir", help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    p.add_argument("--size", type=cliutil.size_type(16), default=(128, 128), metavar="HxW",
                   help=cliutil.size_help("image size (default 128)", 16))
    p.add_argument("--band", type=int, default=1, help="boundary band radius in pixels, 0 for none (default 1)")
    p.add_argument("--max-shapes", type=int, default=4)
    p.add_argument("--task", default="segmentation", choices=["segmentation", "detection", "skeleton"],
                   help="segmentation (SegmentationClass PNGs), detection (Annotations XML, ImageSets/Main) or "
                        "skeleton (the SK-LARGE layout: images/, groundTruth/*.mat with symmetry and edge)")
    p.add_argument("--proposals", action="store_true",
                   help="--task detection: also write Selective Search's boxes of each split to "
                        "DIR/selective_search_{train,val}.npz (for detectors that take proposals; needs "
                        "kseg[proposals]; about 75 ms per 128x128 image)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check", help="check a dataset's files and labels; non-zero exit on errors",
                       description="Check every listed pair: counts, sizes, per-class pixel histogram; "
                                   "errors (with file names) for colour masks, 0/255 masks, labels >= "
                                   "num_classes, size mismatches, missing pairs, unreadable or truncated "
                                   "files; grayscale/RGBA/CMYK images are reported (readers convert them).")
    p.add_argument("dir", help="dataset root (for --layout edges: the list file; for --layout coco: the image folder)")
    p.add_argument("--layout", default="voc", choices=["voc", "sbd", "pets", "folder", "edges", "classification",
                                                       "classification_list", *DETECTION_LAYOUTS, "skeleton"],
                   help="skeleton: SK-LARGE's images/SPLIT/*.jpg with groundTruth/SPLIT/*.mat (`symmetry` and "
                        "`edge` maps, each checked to load and to match its image's size)")
    p.add_argument("--split", help="list name or list file (default: voc: every ImageSets/Segmentation/*.txt "
                                   "list present, each checked; voc-det: every ImageSets/Main split list; "
                                   "pets: trainval; sbd: train_aug; skeleton: every images/SPLIT folder; "
                                   "classification_list: DIR/SPLIT.txt or DIR/meta/SPLIT.txt when DIR is a folder)")
    p.add_argument("--annotations", metavar="JSON", help="coco layout: the instances_*.json file (required)")
    p.add_argument("--max-boxes", type=int, default=100,
                   help="voc-det / coco: the readers' max_boxes; an image with more objects is an error (default 100)")
    p.add_argument("--num-classes", type=int, help="voc/sbd: default 21 or DIR/classes.txt; folder: required "
                                                   "unless DIR/classes.txt exists")
    p.add_argument("--border", default="own", choices=["own", "ignore", "foreground"], help="pets border class")
    p.add_argument("--images", default="images", help="folder layout: image subfolder")
    p.add_argument("--masks", default="masks", help="folder layout: mask subfolder")
    p.add_argument("--palette", choices=["voc"], help="folder layout: accept RGB colour masks in this palette")
    p.add_argument("--limit", type=int, help="check only the first N pairs")
    p.add_argument("--max-shown", type=int, default=50, help="errors / warnings listed (default 50)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("proposals", help="Selective Search region proposals of every image of a split, in one .npz",
                       description="Run Selective Search (Uijlings et al., IJCV 2013; OpenCV contrib's, needs "
                                   "kseg[proposals]) on every image of a detection split and write one .npz: per "
                                   "image id (the image file's name without its extension) an (N, 4) float32 array "
                                   "of x1, y1, x2, y2 pixel corners, in OpenCV's ranked order. Detectors that take "
                                   "proposals read it: a recipe's [data] proposals, kseg evaluate / predict "
                                   "--proposals. The file appears only when every image is done.")
    p.add_argument("dir", help="dataset root (voc-det: the VOC year folder; coco: the image folder)")
    p.add_argument("--layout", default="voc-det", choices=list(DETECTION_LAYOUTS), help="default voc-det")
    p.add_argument("--split", help="voc-det: the ImageSets/Main list name or a list file (required)")
    p.add_argument("--annotations", metavar="JSON", help="coco: the instances_*.json whose images to process")
    p.add_argument("--out", required=True, metavar="FILE.npz",
                   help="the output file, e.g. DIR/selective_search_test.npz (a recipe names it with {split})")
    p.add_argument("--mode", default="fast", choices=["fast", "quality"],
                   help="Selective Search's fast mode (R-CNN's and Fast R-CNN's; default) or its quality mode "
                        "(more boxes, about 3.5x slower)")
    p.add_argument("--max-boxes", type=int, default=2000,
                   help="keep the first N boxes of each image in Selective Search's ranking (default 2000)")
    p.add_argument("--min-size", type=int, default=20,
                   help="drop boxes with a side under N pixels (default 20, R-CNN's minBoxWidth)")
    p.add_argument("--max-side", type=int, metavar="N",
                   help="run on a copy of each image whose longer side is at most N pixels (boxes scaled back; "
                        "default: each image at its own size)")
    p.add_argument("--seed", type=int, default=0, help="the seed of Selective Search's random ranking (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_proposals)
    return data


def cmd_synth(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kseg.data.synth import make_synthetic

    console = Console()
    detection = args.task == "detection"
    if args.proposals and not detection:
        raise ValueError("--proposals (Selective Search boxes) goes with --task detection")
    with console.status(f"writing {args.train + args.val} synthetic images to {args.dir}"):
        info = make_synthetic(args.dir, seed=args.seed, train=args.train, val=args.val, size=args.size,
                              band=args.band, max_shapes=args.max_shapes, task=args.task, proposals=args.proposals)
    table = Table(title=f"kseg synthetic dataset: {args.dir}")
    table.add_column("")
    table.add_column("")
    if args.task == "skeleton":
        for key in ("seed", "train", "val", "size", "skeleton_pixels"):
            table.add_row(key, "x".join(map(str, info[key])) if key == "size" else str(info[key]))
        console.print(table)
        console.print(f"read it with kseg.data.sk_large({args.dir!r}, 'train'); check it with "
                      f"`kseg data check {args.dir} --layout skeleton`")
        return 0
    for key in ("seed", "train", "val", "size", "boxes" if detection else "band", "classes"):
        value = info[key]
        table.add_row(key, "x".join(map(str, value)) if key == "size" else
                      ", ".join(f"{i}={c}" for i, c in enumerate(value)) if key == "classes" else str(value))
    if detection:
        if info.get("proposals"):
            table.add_row("proposals", ", ".join(info["proposals"].values()))
        console.print(table)
        console.print(f"read it with kseg.data.voc_detection({args.dir!r}, 'train'); check it with "
                      f"`kseg data check {args.dir} --layout voc-det`")
        if info.get("proposals"):
            console.print("a recipe reads the proposals with \\[data] proposals = \"selective_search_{split}.npz\"")
        return 0
    table.add_row("ignore", "255 (boundary bands)")
    console.print(table)
    console.print(f"read it with kseg.data.voc({args.dir!r}, 'train'); check it with "
                  f"`kseg data check {args.dir}`")
    return 0


def cmd_proposals(args) -> int:
    from kseg.data.proposals import write_proposals

    if args.max_boxes < 1:
        raise ValueError(f"--max-boxes must be >= 1, got {args.max_boxes}")
    if args.min_size < 0:
        raise ValueError(f"--min-size must be >= 0, got {args.min_size}")
    if args.max_side is not None and args.max_side < 1:
        raise ValueError(f"--max-side must be >= 1, got {args.max_side}")
    summary = write_proposals(args.dir, args.out, layout=args.layout, split=args.split, annotations=args.annotations,
                              mode=args.mode, max_boxes=args.max_boxes, min_size=args.min_size,
                              max_side=args.max_side, seed=args.seed, overwrite=args.force,
                              progress=sys.stderr.isatty())
    low, high = summary["min_boxes"], summary["max_boxes_found"]
    print(f"wrote Selective Search ({summary['mode']}) proposals of {summary['images']:,} images to "
          f"{summary['out']}: {summary['mean_boxes']:.0f} boxes per image on average ({low}..{high}), "
          f"{summary['seconds_per_image']:.2f} s per image")
    return cliutil.OK


def cmd_check(args) -> int:
    from kseg.data.check import check_dataset

    options = {}
    splits = [None]
    if args.layout in DETECTION_LAYOUTS:
        options["max_boxes"] = args.max_boxes
    if args.layout == "coco":
        if not args.annotations:
            raise ValueError("--layout coco needs --annotations INSTANCES.json (DIR is the image folder)")
        options["annotations"] = args.annotations
    elif args.annotations:
        raise ValueError(f"--annotations applies to --layout coco, not {args.layout}")
    if args.layout in DEFAULT_SPLITS:
        if args.split or DEFAULT_SPLITS[args.layout]:
            splits = [args.split or DEFAULT_SPLITS[args.layout]]
        else:
            import importlib

            module, function = SPLIT_LISTS[args.layout]
            splits = getattr(importlib.import_module(module), function)(args.dir)
    elif args.layout == "classification_list":
        options["split"] = args.split
    elif args.split:
        raise ValueError(f"--split does not apply to --layout {args.layout}")
    if args.layout in ("voc", "sbd", "folder") and args.num_classes is not None:
        options["num_classes"] = args.num_classes
    if args.layout == "pets":
        options["border"] = args.border
    if args.layout == "folder":
        options.update(images=args.images, masks=args.masks, palette=args.palette)
    from rich.console import Console

    console = Console()  # the terminal's width (tests set COLUMNS): long file names stay on one line
    reports = {}
    for split in splits:
        split_options = options if split is None else {**options, "split": split}
        what = f"{args.dir} ({split})" if split is not None else args.dir
        # The bar is drawn on a terminal only: piped or captured standard error stays empty.
        report = check_dataset(args.dir, args.layout, limit=args.limit,
                               progress=sys.stderr.isatty() and f"checking {what}", **split_options)
        print_report(report, console, args.max_shown, split=split if len(splits) > 1 else None)
        reports[split] = report
    if len(reports) > 1:
        _print_splits(reports, console)
    return cliutil.OK if all(r.ok for r in reports.values()) else cliutil.PROBLEMS


def _print_splits(reports, console) -> None:
    from rich.table import Table

    table = Table(title="kseg data check: splits")
    unit = "images" if next(iter(reports.values())).layout in DETECTION_LAYOUTS else "pairs"
    for column in ("split", f"{unit} listed", f"{unit} checked", "errors", "warnings"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, r in reports.items():
        errors = f"[{'red' if r.errors else 'green'}]{len(r.errors):,}[/]"
        table.add_row(split, f"{r.listed:,}", f"{r.checked:,}", errors, f"{len(r.warnings):,}")
    console.print(table)
    bad = [s for s, r in reports.items() if not r.ok]
    console.print(f"[red]errors in {len(bad)} of {len(reports)} splits: {', '.join(bad)}[/]" if bad else
                  f"[green]no errors in {len(reports)} splits[/]")


def print_report(report, console, max_shown: int = 50, split: str | None = None) -> None:
    from rich.table import Table

    what = report.layout if split is None else f"{report.layout}, split {split}"
    summary = Table(title=f"kseg data check: {report.root} ({what})", show_header=False)
    summary.add_column()
    summary.add_column(justify="right")
    unit = "images" if report.layout in DETECTION_LAYOUTS else "pairs"
    summary.add_row(f"{unit} listed", f"{report.listed:,}")
    summary.add_row(f"{unit} checked", f"{report.checked:,}")
    if report.sizes:
        (h, w), n = report.sizes.most_common(1)[0]
        hs = [s[0] for s in report.sizes]
        ws = [s[1] for s in report.sizes]
        summary.add_row("image sizes (HxW)", f"{len(report.sizes)} distinct; most common {h}x{w} ({n}); "
                                             f"H {min(hs)}..{max(hs)}, W {min(ws)}..{max(ws)}")
    if report.image_modes:
        summary.add_row("image modes", ", ".join(f"{m} {n}" for m, n in report.image_modes.most_common()))
    summary.add_row("converted images (grayscale/RGBA/CMYK/...)", f"{len(report.converted):,}")
    summary.add_row("errors", f"[{'red' if report.errors else 'green'}]{len(report.errors):,}[/]")
    summary.add_row("warnings", f"{len(report.warnings):,}")
    if report.layout in DETECTION_LAYOUTS:
        _box_summary(report, summary)
    console.print(summary)
    if report.layout in DETECTION_LAYOUTS:
        _print_boxes(report, console)

    total = int(report.pixels.sum())
    if total:
        classification = report.layout in ("classification", "classification_list")
        hist = Table(title="images per class" if classification else "pixels per class")
        for column in ("index", "class", "images" if classification else "pixels", "%",
                       "" if classification else "images containing"):
            hist.add_column(column, justify="left" if column == "class" else "right")
        names = list(report.class_names)
        for i in range(256):
            if report.pixels[i] == 0 and i >= len(names):
                continue
            name = names[i] if i < len(names) else ("ignore" if i == 255 else "?")
            hist.add_row(str(i), name, f"{int(report.pixels[i]):,}", f"{100 * report.pixels[i] / total:.2f}",
                         "" if classification else f"{int(report.images_with[i]):,}")
        console.print(hist)

    for title, rows, style in (("converted images", report.converted, "yellow"),
                               ("warnings", report.warnings, "yellow"), ("errors", report.errors, "red")):
        if not rows:
            continue
        table = Table(title=f"{title} ({len(rows):,})", title_style=style)
        table.add_column("file", overflow="fold")
        table.add_column("problem" if title != "converted images" else "mode", overflow="fold")
        for path, text in rows[:max_shown]:
            table.add_row(path, text)
        if len(rows) > max_shown:
            table.add_row(f"... and {len(rows) - max_shown:,} more", "")
        console.print(table)
    console.print("[green]no errors[/]" if report.ok else f"[red]{len(report.errors):,} errors[/]")


# Buckets of the boxes-per-image histogram: (low, high) inclusive, None = no upper bound.
BOX_BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 9), (10, 19), (20, 49), (50, 99), (100, None))


def _box_summary(report, summary) -> None:
    total, difficult = sum(report.boxes.values()), sum(report.difficult.values())
    images = sum(report.boxes_per_image.values())
    summary.add_row("boxes", f"{total:,}")
    summary.add_row("difficult boxes", f"{difficult:,} ({100 * difficult / total if total else 0:.1f}%)")
    if images:
        counts = sorted(report.boxes_per_image.elements())
        summary.add_row("boxes per image", f"min {counts[0]}, mean {total / images:.2f}, "
                                           f"median {counts[len(counts) // 2]}, max {counts[-1]}")


def _print_boxes(report, console) -> None:
    from rich.table import Table

    total = sum(report.boxes.values())
    if not total:
        return
    table = Table(title="boxes per class")
    for column in ("id", "class", "boxes", "%", "difficult", "difficult %", "images containing"):
        table.add_column(column, justify="left" if column == "class" else "right")
    names = list(report.class_names)
    for i in sorted(set(range(1, len(names))) | set(report.boxes)):
        n, d = report.boxes[i], report.difficult[i]
        name = names[i] if i < len(names) else "?"
        if not n and name == "N/A":  # COCO's unused category ids
            continue
        table.add_row(str(i), name, f"{n:,}", f"{100 * n / total:.2f}", f"{d:,}",
                      f"{100 * d / n if n else 0:.1f}", f"{report.images_with_class[i]:,}")
    console.print(table)
    images = sum(report.boxes_per_image.values())
    hist = Table(title="boxes per image")
    for column in ("boxes", "images", "%", ""):
        hist.add_column(column, justify="left" if not column else "right")
    for low, high in BOX_BUCKETS:
        n = sum(c for k, c in report.boxes_per_image.items() if k >= low and (high is None or k <= high))
        label = str(low) if low == high else f"{low}+" if high is None else f"{low}-{high}"
        hist.add_row(label, f"{n:,}", f"{100 * n / images:.1f}", "#" * round(40 * n / images))
    console.print(hist)
