"""`kseg data synth|check`: registered on the main parser by kseg.cli via add_parser(subparsers)."""

from __future__ import annotations

import argparse

DEFAULT_SPLITS = {"voc": "trainval", "sbd": "train_aug", "pets": "trainval"}


def _size(text):
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"size must be N or HxW with sides >= 16, got {text!r}")
    return tuple(parts)


def add_parser(subparsers):
    """Register `data` with its `synth` and `check` subcommands on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="make the synthetic dataset, check a dataset")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="write the built-in synthetic dataset (VOC layout)",
                       description="Write the synthetic shapes dataset (background + circle, square, "
                                   "triangle, cross; 255 boundary bands) as JPEG + palette PNG in the "
                                   "VOC layout. Deterministic in --seed.")
    p.add_argument("dir", help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    p.add_argument("--size", type=_size, default=(128, 128), help="N or HxW (default 128)")
    p.add_argument("--band", type=int, default=1, help="boundary band radius in pixels, 0 for none (default 1)")
    p.add_argument("--max-shapes", type=int, default=4)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check", help="check a dataset's files and labels; non-zero exit on errors",
                       description="Check every listed pair: counts, sizes, per-class pixel histogram; "
                                   "errors (with file names) for colour masks, 0/255 masks, labels >= "
                                   "num_classes, size mismatches, missing pairs, unreadable or truncated "
                                   "files; grayscale/RGBA/CMYK images are reported (readers convert them).")
    p.add_argument("dir", help="dataset root (for --layout edges: the list file)")
    p.add_argument("--layout", default="voc", choices=["voc", "sbd", "pets", "folder", "edges", "classification"])
    p.add_argument("--split", help="list name or list file (default: trainval for voc and pets, train_aug for sbd)")
    p.add_argument("--num-classes", type=int, help="voc/sbd: default 21 or DIR/classes.txt; folder: required "
                                                   "unless DIR/classes.txt exists")
    p.add_argument("--border", default="own", choices=["own", "ignore", "foreground"], help="pets border class")
    p.add_argument("--images", default="images", help="folder layout: image subfolder")
    p.add_argument("--masks", default="masks", help="folder layout: mask subfolder")
    p.add_argument("--palette", choices=["voc"], help="folder layout: accept RGB colour masks in this palette")
    p.add_argument("--limit", type=int, help="check only the first N pairs")
    p.add_argument("--max-shown", type=int, default=50, help="errors / warnings listed (default 50)")
    p.set_defaults(func=cmd_check)
    return data


def cmd_synth(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kseg.data.synth import make_synthetic

    console = Console()
    with console.status(f"writing {args.train + args.val} synthetic images to {args.dir}"):
        info = make_synthetic(args.dir, seed=args.seed, train=args.train, val=args.val, size=args.size,
                              band=args.band, max_shapes=args.max_shapes)
    table = Table(title=f"kseg synthetic dataset: {args.dir}")
    table.add_column("")
    table.add_column("")
    for key in ("seed", "train", "val", "size", "band", "classes"):
        value = info[key]
        table.add_row(key, "x".join(map(str, value)) if key == "size" else
                      ", ".join(f"{i}={c}" for i, c in enumerate(value)) if key == "classes" else str(value))
    table.add_row("ignore", "255 (boundary bands)")
    console.print(table)
    console.print(f"read it with kseg.data.voc({args.dir!r}, 'train'); check it with "
                  f"`kseg data check {args.dir}`")
    return 0


def cmd_check(args) -> int:
    from rich.console import Console

    from kseg.data.check import check_dataset

    options = {}
    if args.layout in ("voc", "sbd", "pets"):
        options["split"] = args.split or DEFAULT_SPLITS[args.layout]
    elif args.split:
        raise ValueError(f"--split does not apply to --layout {args.layout}")
    if args.layout in ("voc", "sbd", "folder") and args.num_classes is not None:
        options["num_classes"] = args.num_classes
    if args.layout == "pets":
        options["border"] = args.border
    if args.layout == "folder":
        options.update(images=args.images, masks=args.masks, palette=args.palette)
    console = Console()
    with console.status(f"checking {args.dir}"):
        report = check_dataset(args.dir, args.layout, limit=args.limit, **options)
    print_report(report, console, args.max_shown)
    return 0 if report.ok else 1


def print_report(report, console, max_shown: int = 50) -> None:
    from rich.table import Table

    summary = Table(title=f"kseg data check: {report.root} ({report.layout})", show_header=False)
    summary.add_column()
    summary.add_column(justify="right")
    summary.add_row("pairs listed", f"{report.listed:,}")
    summary.add_row("pairs checked", f"{report.checked:,}")
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
    console.print(summary)

    total = int(report.pixels.sum())
    if total:
        classification = report.layout == "classification"
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
