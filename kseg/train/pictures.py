"""Pictures of a training run: samples.png (image / ground truth / prediction rows for dense
tasks; images with their true and predicted class for classifiers). Needs matplotlib, an
optional dependency: without it nothing is drawn and a note says why.
"""

from __future__ import annotations

import numpy as np

from kseg.data.palette import colorize, voc_palette
from kseg.identity import identify, resolve_preprocessing, task_of
from kseg.images import save_figure
from kseg.tasks import losses as losses_mod
from kseg.tasks.base import probabilities

SAMPLES_FILE = "samples.png"


def _unpreprocess(x, preprocessing):
    """Undo a Preprocessing on NumPy images, back to RGB 0..255 (for showing them)."""
    if preprocessing is None:
        return x
    p = preprocessing
    x = np.asarray(x, np.float32)
    if p.std is not None:
        x = x * np.asarray(p.std, np.float32)
    if p.mean is not None:
        x = x + np.asarray(p.mean, np.float32)
    if p.bgr:
        x = x[..., ::-1]
    return x / p.scale if p.scale != 1.0 else x


def plot_samples(model, dataset, path, *, count=4, preprocessing=None, class_names=None, palette=None):
    """A PNG grid of image / ground truth / prediction for the first `count` examples of `dataset`.

    `dataset` yields (image, label) batches or single examples, preprocessed with
    `preprocessing` (undone to show the image). Needs matplotlib (an optional dependency):
    without it nothing is written, a note goes to stderr and None is returned; else `path`.

        plot_samples(model, kseg.data.synthetic(root, "val", batch_size=1, preprocessing="deeplab_largefov"),
                     "samples.png", preprocessing="deeplab_largefov")
    """
    import sys

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print(f"note: matplotlib is not installed, so {path} was not drawn (pip install matplotlib)", file=sys.stderr)
        return None
    task = task_of(model)
    prep = resolve_preprocessing(preprocessing)
    names = class_names or getattr(dataset, "class_names", None)
    if dataset.element_spec[0].shape.rank == 4:
        dataset = dataset.unbatch()
    if not task.dense:
        return _plot_class_samples(plt, model, task, dataset, path, count, prep, names)
    if task.target_kind == "edge_map":
        return _plot_edge_samples(plt, model, task, dataset, path, count, prep)
    main_output = task.main_output
    rows = []
    for x, y in dataset.take(count):
        logits = main_output(model(x[None], training=False))[0]
        pred = np.argmax(np.asarray(logits), axis=-1)
        label = np.asarray(y)[..., 0] if np.ndim(y) == 3 else np.asarray(y)
        image = np.clip(_unpreprocess(np.asarray(x), prep), 0, 255).astype(np.uint8)
        keep = label != losses_mod.IGNORE_LABEL
        rows.append((image, label, pred, float((pred == label)[keep].mean()) if keep.any() else float("nan")))
    if not rows:
        raise ValueError(f"plot_samples: the dataset is empty, nothing to draw in {path}")
    num_classes = int(main_output(model.outputs).shape[-1])
    names = names or [str(i) for i in range(num_classes)]
    pal = voc_palette() if palette is None else np.asarray(palette)
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (image, label, pred, acc) in enumerate(rows):
        for c, (picture, title) in enumerate(((image, "image"), (colorize(label, palette), "ground truth"),
                                               (colorize(pred, palette), f"prediction ({100 * acc:.1f}% pixels)"))):
            axes[r, c].imshow(picture, interpolation="nearest")
            axes[r, c].set_title(title, fontsize=9)
            axes[r, c].axis("off")
    handles = [Patch(color=pal[i] / 255.0, label=names[i] if i < len(names) else str(i)) for i in range(num_classes)]
    handles.append(Patch(color=pal[losses_mod.IGNORE_LABEL] / 255.0, label="ignore (255)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if len(rows) > 1 else 0.12, 1, 1))
    return save_figure(fig, path)


def _plot_class_samples(plt, model, task, dataset, path, count, prep, names):
    """Classifiers: each image with its true class and the predicted class (and its probability)."""
    head = task.head(list(model.output_names), identify(model).options, output_rank=len(model.outputs[0].shape))
    rows = []
    for x, y in dataset.take(count):
        probs = probabilities(model(x[None], training=False), head)[0]
        y = np.asarray(y)
        label = int(y.argmax()) if y.ndim == 1 else int(y)
        image = np.clip(_unpreprocess(np.asarray(x), prep), 0, 255).astype(np.uint8)
        rows.append((image, label, int(probs.argmax()), float(probs.max())))
    if not rows:
        raise ValueError(f"plot_samples: the dataset is empty, nothing to draw in {path}")
    names = list(names or [])

    def name(i):
        return names[i] if i < len(names) else str(i)

    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3), squeeze=False)
    for ax, (image, label, pred, p) in zip(axes[0], rows):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", interpolation="nearest")
        ax.set_title(f"true: {name(label)}\npredicted: {name(pred)} ({100 * p:.0f}%)", fontsize=8,
                     color="green" if pred == label else "red")
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_edge_samples(plt, model, task, dataset, path, count, prep):
    head = task.head(list(model.output_names), identify(model).options)
    rows = []
    for x, y in dataset.take(count):
        edges = task.edge_map(model(x[None], training=False), head)[0]
        label = np.asarray(y)[..., 0] if np.ndim(y) == 3 else np.asarray(y)
        rows.append((np.clip(_unpreprocess(np.asarray(x), prep), 0, 255).astype(np.uint8), label, edges))
    if not rows:
        raise ValueError(f"plot_samples: the dataset is empty, nothing to draw in {path}")
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (image, label, edges) in enumerate(rows):
        for c, (picture, title) in enumerate(((image, "image"), (label, "ground truth"),
                                               (edges, "edge probability"))):
            axes[r, c].imshow(picture, cmap=None if c == 0 else "gray_r", vmin=0, vmax=1 if c else None,
                              interpolation="nearest")
            axes[r, c].set_title(title, fontsize=9)
            axes[r, c].axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
