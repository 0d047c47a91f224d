#!/usr/bin/env python
"""Images/s of kseg.data's tf.data pipeline vs a plain PIL + NumPy Python generator, one run.

Both read the same JPEG + palette-PNG files (the synthetic dataset written at VOC's typical
375x500 size) and do the same work per image: decode, random scale 0.5-2.0, pad (mean /
255), random 321x321 crop, horizontal flip, brightness / contrast / saturation / hue jitter,
Caffe preprocessing, batching. The generator is the way several Keras segmentation
libraries load data (PIL resize of the whole image, np.pad, slicing, PIL ImageEnhance).

    python scripts/bench_data.py                  # 200 images, 3 epochs each, batch 16
    python scripts/bench_data.py --images 400 --epochs 3 --dir /tmp/bench_voc
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

import kseg  # noqa: E402, F401
import kseg.data as kd  # noqa: E402
from kseg.registry import CAFFE  # noqa: E402


def python_generator(root, names, crop, batch, rng):
    """PIL + NumPy, one image at a time, in the calling thread."""
    mean_rgb = np.array(kd.pipeline.pad_colour(CAFFE), np.float32)
    order = rng.permutation(len(names))
    for start in range(0, len(order) - batch + 1, batch):
        images, labels = [], []
        for i in order[start: start + batch]:
            image = Image.open(os.path.join(root, "JPEGImages", names[i] + ".jpg")).convert("RGB")
            label = Image.open(os.path.join(root, "SegmentationClass", names[i] + ".png"))  # "P": indices
            s = rng.uniform(0.5, 2.0)
            size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
            image = image.resize(size, Image.BILINEAR)
            label = label.resize(size, Image.NEAREST)
            # colour jitter on the PIL image, as torchvision's ColorJitter does
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.875, 1.125))
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
            image = ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))
            hsv = np.array(image.convert("HSV"))
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-0.02, 0.02) * 255)) % 256
            img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32)
            lab = np.asarray(label, np.uint8)
            ph, pw = max(crop - img.shape[0], 0), max(crop - img.shape[1], 0)
            if ph or pw:
                img = np.pad(img - mean_rgb, ((0, ph), (0, pw), (0, 0))) + mean_rgb
                lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=255)
            y = rng.integers(0, img.shape[0] - crop + 1)
            x = rng.integers(0, img.shape[1] - crop + 1)
            img, lab = img[y: y + crop, x: x + crop], lab[y: y + crop, x: x + crop]
            if rng.uniform() < 0.5:
                img, lab = img[:, ::-1], lab[:, ::-1]
            images.append(img)
            labels.append(lab[..., None].astype(np.int32))
        yield CAFFE.apply(np.stack(images)), np.stack(labels)


def measure(loaders: dict, rounds: int) -> dict:
    """Images/s and CPU ms/image per loader; epochs interleaved so all see the same machine load.

    Each loader is warmed up by one batch first (graph tracing, file cache). CPU time is the
    process's (all threads), so it counts tf.data's worker threads too.
    """
    for make_iter in loaders.values():
        next(iter(make_iter()))
    totals = {name: [0, 0.0, 0.0] for name in loaders}
    for _ in range(rounds):
        for name, make_iter in loaders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            count = sum(int(images.shape[0]) for images, _ in make_iter())
            totals[name][0] += count
            totals[name][1] += time.perf_counter() - wall
            totals[name][2] += time.process_time() - cpu
    return {name: (n / wall, 1e3 * cpu / n, n) for name, (n, wall, cpu) in totals.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="dataset folder (default: a temporary synthetic one)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="375x500", help="HxW of the generated images")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loader, interleaved")
    args = parser.parse_args(argv)

    tmp = None
    root = args.dir
    if root is None or not os.path.isdir(os.path.join(root, "JPEGImages")):
        if root is None:
            tmp = tempfile.TemporaryDirectory()
            root = tmp.name
        h, w = (int(v) for v in args.size.split("x"))
        t = time.perf_counter()
        kd.make_synthetic(root, seed=0, train=args.images, val=0, size=(h, w), band=2)
        print(f"wrote {args.images} synthetic {h}x{w} JPEG + palette PNG pairs in {time.perf_counter() - t:.1f} s")
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt")) as f:
        names = f.read().split()

    augment = kd.SegmentationAugment(scale=(0.5, 2.0), crop=args.crop, flip=True)
    rng = np.random.default_rng(0)
    generator = "python generator (PIL + NumPy)"
    loaders = {
        generator: lambda: python_generator(root, names, args.crop, args.batch, rng),
        "kseg.data (tf.data)": lambda: fast,
        "kseg.data (tf.data), seed=0 deterministic": lambda: seeded,
    }
    fast = kd.voc(root, "train", augment=augment, batch_size=args.batch, drop_remainder=True, preprocessing="caffe")
    seeded = kd.voc(root, "train", augment=augment, batch_size=args.batch, drop_remainder=True,
                    preprocessing="caffe", seed=0)
    load_before = os.getloadavg()[0]
    results = measure(loaders, args.epochs)
    load_after = os.getloadavg()[0]

    print(f"\n{os.cpu_count()} CPU cores (1-min load average {load_before:.1f} before, {load_after:.1f} after; "
          f"other processes' load slows every loader), {len(names)} images {args.size}, crop "
          f"{args.crop}x{args.crop}, batch {args.batch}, {args.epochs} interleaved epochs each; full augmentation "
          f"(scale 0.5-2.0, pad, crop, flip, colour jitter) + Caffe preprocessing")
    base = results[generator][0]
    for name, (rate, cpu_ms, count) in results.items():
        print(f"  {name:45s} {rate:7.1f} images/s  x{rate / base:4.2f}   {cpu_ms:5.1f} CPU ms/image  ({count} images)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
