#!/usr/bin/env python
"""How long a training step waits for its input: `kseg train`'s model.fit fed by the recipe's tf.data
readers (decode, augmentation, batching, prefetch) against the same fit fed one batch held in memory.

    python scripts/bench_input.py --recipe deit_small_imagenet               # RandAugment, Mixup/CutMix, erasing
    python scripts/bench_input.py --recipe deeplab_largefov_voc --set training.batch_size=4
    python scripts/bench_input.py --recipe mobilenet_v2_imagenet --steps 30 --images 300

The data is written first in the recipe's layout: the synthetic shapes (`kseg data synth`, VOC
layout, 375x500 as VOC's typical image) for segmentation recipes, class folders of random 375x500
JPEGs for classification recipes. Three timings, each the median of `--steps` steps after a
warm-up step:

- **pipeline alone**: the training dataset iterated with no model (ms per batch);
- **fit, pipeline**: model.fit on the recipe's training dataset (what `kseg train` runs);
- **fit, in memory**: model.fit on its first batch cached and repeated.

Stall per step = fit, pipeline - fit, in memory: the time the step spends on its input, waiting or
competing with the readers for the cores (on 2 cores the readers' threads and the step's share
them, so a pipeline faster than the step alone can still cost step time).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_classes(root, images, size, classes=4, seed=0):
    """ROOT/{train,val}/CLASS/i.jpg, random JPEGs (content does not change the speed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", 2 * classes)):
        for i in range(count):
            folder = os.path.join(root, split, f"class{i % classes}")
            os.makedirs(folder, exist_ok=True)
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def median_intervals(times):
    import numpy as np

    gaps = np.diff(times)
    return float(np.median(gaps)) if len(gaps) else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="a shipped recipe name or a .toml file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override, as kseg train --set")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--images", type=int, default=200, help="training images written")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from kseg.api import build_model
    from kseg.data.synth import make_synthetic
    from kseg.registry import get_spec
    from kseg.train.fit import compile_segmentation
    from kseg.train.inputs import datasets
    from kseg.train.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    task = get_spec(recipe.model).task_object
    root = tempfile.mkdtemp(prefix="kseg_bench_input_")
    overrides = list(args.set)
    if task.dense:
        make_synthetic(root, train=args.images, val=4, size=(375, 500))
        overrides += ['data.layout="voc"', 'data.train_split="train"', 'data.val_split="val"']
    else:
        write_classes(root, args.images, (375, 500))
        overrides += ['data.train_split="train"', 'data.val_split="val"']
    recipe = load_recipe(args.recipe, overrides)
    train_ds, _ = datasets(recipe, root, seed=0)
    batch = recipe.training["batch_size"]
    print(f"{recipe.name}: {recipe.model}, batch {batch}, {args.images} training images in {root}", flush=True)

    ends = []
    iterator = iter(train_ds.repeat())
    for _ in range(args.steps + 1):
        next(iterator)
        ends.append(time.perf_counter())
    alone = median_intervals(ends)

    keras.utils.set_random_seed(0)
    model = build_model(recipe.model, **recipe.model_options)
    total = 10 * (args.steps + 1)
    fit_model = compile_segmentation(model, recipe, steps_per_epoch=args.steps + 1, total_steps=total)
    outputs = len(fit_model.outputs)
    fed = train_ds.map(lambda x, y: (x, task.fit_targets(y, outputs))).repeat()
    in_memory = fed.take(1).cache().repeat()

    class StepEnds(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    results = {}
    for name, data in (("fit, pipeline", fed), ("fit, in memory", in_memory), ("fit, pipeline (again)", fed)):
        ends = []
        fit_model.fit(data, epochs=1, steps_per_epoch=args.steps + 1, shuffle=False, verbose=0,
                      callbacks=[StepEnds()])
        results[name] = median_intervals(ends)
    piped = min(results["fit, pipeline"], results["fit, pipeline (again)"])
    stall = piped - results["fit, in memory"]
    print(f"pipeline alone:  {1000 * alone:8.1f} ms per batch ({batch / alone:.1f} images/s)")
    for name, seconds in results.items():
        print(f"{name:<22} {1000 * seconds:8.1f} ms per step")
    print(f"stall per step:  {1000 * stall:8.1f} ms ({100 * stall / piped:.0f}% of the step; "
          f"the better of the two pipeline runs)")
    tf.io.gfile.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
