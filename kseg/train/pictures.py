"""Pictures of a training run: samples.png (image / ground truth / prediction rows for dense
tasks; images with their true and predicted class for classifiers; needs matplotlib, an optional
dependency: without it nothing is drawn and a note says why) and predictions.gif (`kseg train
--gif N`: one frame per epoch of N validation images, drawn with PIL).
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


GIF_FILE = "predictions.gif"


def prediction_gif(model, dataset, path, *, count=21, columns=7, preprocessing=None, palette=None, seconds=0.8):
    """A Keras callback that writes `path` (predictions.gif): one frame per epoch showing `count`
    images of `dataset` in three panels, the images, their ground truth and the model's prediction
    (label maps in colour; edge maps in grey), `columns` per row, and the epoch's validation
    figures as the title. The file is rewritten atomically after each epoch; a resumed run keeps
    the frames of the epochs it resumes after. Dense tasks only (one prediction per pixel).
    """
    import keras

    task = task_of(model)
    if not task.dense:
        raise ValueError(f"--gif draws per-pixel predictions; {model.name} is a {task.name} model (one prediction "
                         "per image): see samples.png instead")
    prep = resolve_preprocessing(preprocessing)
    if dataset.element_spec[0].shape.rank == 4:
        dataset = dataset.unbatch()
    examples = list(dataset.take(count))
    if not examples:
        raise ValueError(f"--gif: the validation set is empty, nothing to draw in {path}")
    inputs = np.stack([np.asarray(x) for x, _ in examples])
    shown = [np.clip(_unpreprocess(x, prep), 0, 255).astype(np.uint8) for x in inputs]
    shown = [np.repeat(s, 3, axis=-1) if s.shape[-1] == 1 else s for s in shown]
    edges = task.target_kind == "edge_map"
    head = task.head(list(model.output_names), identify(model).options)

    def picture(target):
        target = np.asarray(target)
        target = target[..., 0] if target.ndim == 3 else target
        if edges:
            grey = (255 - np.clip(target * 255.0, 0, 255)).astype(np.uint8)  # edges dark on white
            return np.repeat(grey[..., None], 3, axis=-1)
        return colorize(target.astype(np.int64), palette)

    truth = [picture(y) for _, y in examples]

    def predictions():
        outputs = model(inputs, training=False)
        if edges:
            return [picture(p) for p in task.edge_map(outputs, head)]
        return [picture(np.argmax(np.asarray(p), axis=-1)) for p in task.main_output(outputs, model.output_names)]

    class _Gif(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.frames = _read_frames(path)
            self.first = True

        def on_epoch_begin(self, epoch, logs=None):
            if self.first:  # resumed after `epoch` epochs: keep their frames only
                self.frames, self.first = self.frames[:epoch], False

        def on_epoch_end(self, epoch, logs=None):
            figures = ", ".join(f"{k} {v:.3f}" for k, v in sorted((logs or {}).items())
                                if k.startswith("val_") and isinstance(v, (int, float)))
            title = f"epoch {epoch + 1}" + (f": {figures}" if figures else "")
            self.frames.append(_frame([shown, truth, predictions()], ["image", "ground truth", "prediction"],
                                      columns, title))
            _write_gif(self.frames, path, seconds)

    return _Gif()


def _grid(pictures, columns, gap=2):
    h, w = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    rows = -(-len(pictures) // columns)
    out = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i, p in enumerate(pictures):
        r, c = divmod(i, columns)
        top, left = gap + r * (h + gap), gap + c * (w + gap)
        out[top:top + p.shape[0], left:left + p.shape[1]] = p
    return out


def _frame(panels, names, columns, title, line=14):
    from PIL import Image, ImageDraw

    grids = [_grid(p, min(columns, len(p))) for p in panels]
    width = max(g.shape[1] for g in grids)
    height = line + sum(g.shape[0] + line for g in grids)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    y = line
    for name, grid in zip(names, grids):
        draw.text((2, y + 1), name, fill="black")
        canvas.paste(Image.fromarray(grid), (0, y + line))
        y += line + grid.shape[0]
    return canvas


def _read_frames(path):
    import os

    from PIL import Image, ImageSequence

    if not os.path.isfile(path):
        return []
    with Image.open(path) as gif:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]


def _write_gif(frames, path, seconds):
    import os

    tmp = f"{path}.{os.getpid()}.tmp.gif"
    try:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=int(seconds * 1000), loop=0)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
