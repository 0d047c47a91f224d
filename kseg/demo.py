"""The training demo (`kseg demo`): synthetic data -> small DeepLab-LargeFOV on CPU -> scores -> PNGs -> ONNX.

    from kseg.demo import run_demo, print_summary
    summary = run_demo("demo_out")      # {"val_mean_iou": ..., "seconds": ..., "per_class": [...], ...}
    print_summary(summary)

`kseg demo --task detection` (run_detection_demo, print_detection_summary) does the same for
object detection: the synthetic shapes as a VOC detection set, SSD300 at width 0.125 trained
from scratch (the `synthetic_detection_demo` recipe), VOC mAP@0.5 of its decoded detections.

Everything runs from scratch and offline, deterministically from `seed` (as far as
TensorFlow's CPU kernels allow):

1. the synthetic shapes set (kseg.data.make_synthetic, VOC layout, 128x128) in out_dir/data;
2. the `synthetic_demo` recipe: DeepLab-LargeFOV at width 0.125 with BatchNorm (see the
   recipe for every choice and why), He-initialised, trained with kseg.train.train into
   out_dir/run (checkpoints, CSV log; killing the demo and running it again resumes);
3. evaluation of the final model at the images' own size: mean IoU and per-class IoU, of
   the network and of the network + dense CRF (the `crf` extra);
4. out_dir/predictions/*.png (palette label maps and colour overlays), out_dir/grid.png
   (image / ground truth / prediction), out_dir/curves.png (loss and mIoU per epoch),
   out_dir/model.onnx verified against Keras (the `onnx` extra) and out_dir/summary.json.

A time budget (`budget_s`, on training alone) stops training after the epoch that would
overrun it, so a much slower machine still finishes in time, with a lower score; the
summary says so (`stopped_by_budget`). Measured figures are in the README.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import keras
import numpy as np

import kseg.data as kd
from convert.api import convert

# The defaults live in kseg.cliutil, where `kseg demo --help` reads them without importing Keras.
from kseg.cliutil import DEMO_BUDGET_S as BUDGET_S
from kseg.cliutil import DEMO_SEED as SEED
from kseg.cliutil import DEMO_SIZE as SIZE
from kseg.cliutil import DEMO_TRAIN_IMAGES as TRAIN_IMAGES
from kseg.cliutil import DEMO_VAL_IMAGES as VAL_IMAGES
from kseg.inference import evaluate
from kseg.train import apply_overrides, load_recipe, train

RECIPE = "synthetic_demo"


class TimeBudget(keras.callbacks.Callback):
    """Stops fit after an epoch when another epoch of this run's average length would overrun `seconds`."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.start = None
        self.epochs_done = 0
        self.stopped = False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.epochs_done = 0  # this run's epochs: those restored by BackupAndRestore took no time here

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_done += 1
        elapsed = time.perf_counter() - self.start
        last = epoch + 1 >= self.params.get("epochs", epoch + 1)
        if not last and elapsed * (self.epochs_done + 1) / self.epochs_done > self.seconds:
            self.model.stop_training = True
            self.stopped = True


def he_init(model, seed=0, input_std=64.0, keep=None):
    """Re-initialise every conv kernel with He et al. 2015's normal init (biases zero); `keep(layer)`
    True leaves a layer as built (a detector's linear box and class heads: detection_init).

    The paper's networks start from ImageNet weights; from scratch, a 16-layer ReLU net trains
    faster with He's variance-preserving init than with Keras' default Glorot uniform. Caffe-
    preprocessed inputs have a standard deviation of about 64, not 1, so the first conv's kernel
    is divided by `input_std` (without BatchNorm every activation, and the first logits, would
    otherwise be ~64 times too large: a first-epoch loss of ~11).
    """
    rng = np.random.default_rng(seed)
    first = True
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and not (keep is not None and keep(layer)):
            kernel, *rest = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:3]))
            std = np.sqrt(2.0 / fan_in) / (input_std if first else 1.0)
            first = False
            new = rng.normal(0.0, std, kernel.shape).astype(kernel.dtype)
            layer.set_weights([new, *[np.zeros_like(r) for r in rest]])


def _plot_curves(log_csv, path, right=("mean_iou", "val_mean_iou", "val_pixel_accuracy"), right_title="scores"):
    """curves.png: the loss per epoch, and beside it the log's `right` columns."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "val_loss"):
        if key in rows[0]:
            ax1.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
    for key in right:
        if key in rows[0]:
            ax2.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
    ax1.set_xlabel("epoch"), ax2.set_xlabel("epoch"), ax1.legend(), ax2.legend()
    ax1.set_title("loss"), ax2.set_title(right_title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _grid(rows, path):
    """A PNG of rows [image | ground truth | prediction], with a 2-pixel white gutter."""
    from PIL import Image

    gap = 2
    h, w = rows[0][0].shape[:2]
    canvas = np.full((len(rows) * (h + gap) - gap, 3 * (w + gap) - gap, 3), 255, np.uint8)
    for i, tiles in enumerate(rows):
        for j, tile in enumerate(tiles):
            canvas[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = tile
    Image.fromarray(canvas).save(path)
    return path


def _make_data(data_dir, *, seed, train_images, val_images, size):
    """The synthetic set in data_dir, reused when it was made with the same parameters."""
    info_path = os.path.join(data_dir, "synth.json")
    want = {"seed": seed, "train": train_images, "val": val_images, "size": [size, size]}
    if os.path.exists(info_path):
        with open(info_path) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return False
        shutil.rmtree(data_dir)  # made by an earlier demo with other parameters
    kd.make_synthetic(data_dir, seed=seed, train=train_images, val=val_images, size=size)
    return True


def _clear_finished_run(run_dir):
    """Remove a finished run so the demo starts over; keep an interrupted one (it has a backup) to resume."""
    if os.path.isdir(run_dir) and not os.path.isdir(os.path.join(run_dir, "backup")):
        shutil.rmtree(run_dir)
        return True
    return False


def run_demo(out_dir, *, seed=SEED, train_images=TRAIN_IMAGES, val_images=VAL_IMAGES, size=SIZE, epochs=None,
             width=None, overrides=None, budget_s=BUDGET_S, predictions=8, crf=True, onnx=True, verbose=2,
             progress=True) -> dict:
    """Make the synthetic set, train, evaluate, write predictions and plots; returns the measured summary.

    epochs / width override the `synthetic_demo` recipe's, and so does `overrides` (a dict
    {"optimizer.learning_rate": 1e-3} or a list ["optimizer.learning_rate=1e-3"]); budget_s
    limits the training time (see the module docstring). A finished run in out_dir/run is replaced; an interrupted one
    (its BackupAndRestore state is there) resumes. crf: also score network + dense CRF (when
    pydensecrf is installed, the `crf` extra); onnx: export the trained model to
    out_dir/model.onnx and verify it against Keras (when tf2onnx and onnxruntime are installed,
    the `onnx` extra). Either is reported as None when skipped.

        >>> s = run_demo("/tmp/kseg_demo_doc", train_images=8, val_images=2, size=32, epochs=1,
        ...              width=0.125, predictions=1, verbose=0, progress=False)    # doctest: +SKIP
        >>> sorted(s)[:3], 0 <= s["val_mean_iou"] <= 1                              # doctest: +SKIP
        (['budget_s', 'cpus', 'curves'], True)
    """

    if min(train_images, val_images) < 1:
        raise ValueError(f"the demo needs at least one training and one validation image, got "
                         f"train_images={train_images}, val_images={val_images}")
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data_dir = os.path.join(out_dir, "data")
    made = _make_data(data_dir, seed=seed, train_images=train_images, val_images=val_images, size=size)
    data_seconds = time.perf_counter() - start

    fixed = {"data.crop": [size, size], "training.seed": seed}
    if epochs is not None:
        fixed["training.epochs"] = int(epochs)
    if width is not None:
        fixed["model_options.width"] = float(width)
    recipe = apply_overrides(load_recipe(RECIPE, fixed), overrides)
    run_dir = os.path.join(out_dir, "run")
    _clear_finished_run(run_dir)
    budget = TimeBudget(budget_s)
    result = train(recipe, data_dir, run_dir, init=lambda m: he_init(m, seed=seed), verbose=verbose,
                   extra_callbacks=[budget])
    model = result["model"]

    t = time.perf_counter()
    val = kd.synthetic(data_dir, "val", batch_size=1, preprocessing=recipe.model)
    crf_scores = None
    if crf and _installed("pydensecrf"):
        # One pass scores the network and the network + dense CRF (the paper's settings).
        raw_val = kd.synthetic(data_dir, "val", batch_size=1)
        after = evaluate(model, raw_val, class_names=list(kd.SYNTH_CLASSES), progress=progress,
                         preprocessing=recipe.model, crf=True)
        scores = after["before_crf"]
        crf_scores = {k: after[k] for k in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou", "per_class")}
    else:
        scores = evaluate(model, val, class_names=list(kd.SYNTH_CLASSES), progress=progress)
    eval_seconds = time.perf_counter() - t

    pred_dir = os.path.join(out_dir, "predictions")
    os.makedirs(pred_dir, exist_ok=True)
    with open(os.path.join(data_dir, "ImageSets", "Segmentation", "val.txt")) as f:
        names = f.read().split()
    rows = []
    for name, (x, y) in zip(names[:predictions], val.take(predictions)):
        label = np.argmax(np.asarray(model(x, training=False))[0], axis=-1).astype(np.uint8)
        image = _read_rgb(os.path.join(data_dir, "JPEGImages", name + ".jpg"))
        kd.write_label(os.path.join(pred_dir, f"{name}.png"), label)
        _save_rgb(os.path.join(pred_dir, f"{name}_overlay.png"), kd.overlay(image, label))
        rows.append((image, kd.colorize(np.asarray(y)[0]), kd.colorize(label)))
    grid = _grid(rows, os.path.join(out_dir, "grid.png")) if rows else None
    curves = _plot_curves(os.path.join(run_dir, "log.csv"), os.path.join(out_dir, "curves.png"))

    checkpoint = os.path.join(run_dir, "final.keras")
    export = _export_onnx(checkpoint, os.path.join(out_dir, "model.onnx"),
                          [os.path.join(data_dir, "JPEGImages", n + ".jpg") for n in names[:2]]) if onnx else None

    history = result["history"]
    summary = {
        "model": recipe.model, "model_options": dict(recipe.model_options), "params": int(model.count_params()),
        "recipe": recipe.name, "seed": seed, "data": {"train": train_images, "val": val_images, "size": size,
                                                       "made": made},
        "epochs_planned": result["epochs"], "epochs_run": len(history.get("loss", [])),
        "stopped_by_budget": budget.stopped, "budget_s": budget_s,
        "val_mean_iou": scores["mean_iou"], "val_pixel_accuracy": scores["pixel_accuracy"],
        "val_mean_accuracy": scores["mean_accuracy"], "val_fw_iou": scores["fw_iou"],
        "per_class": scores["per_class"], "val_mean_iou_per_epoch": history.get("val_mean_iou", []),
        "crf": crf_scores, "onnx": export,
        "data_seconds": round(data_seconds, 1), "train_seconds": round(result["train_seconds"], 1),
        "eval_seconds": round(eval_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
        "out_dir": out_dir, "predictions": pred_dir, "grid": grid, "curves": curves,
        "checkpoint": checkpoint,
        "load_average": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    return summary


def _installed(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _export_onnx(checkpoint, path, images):
    """model.onnx from the trained model, verified against Keras on validation images; None without the extra."""
    if not (_installed("tf2onnx") and _installed("onnxruntime")):
        return None
    t = time.perf_counter()
    report = convert(checkpoint, path, force=True, images=images)
    return {"path": path, "verified": report["summary"], "seconds": round(time.perf_counter() - t, 1)}


def _read_rgb(path):
    from kseg.images import read_image

    return read_image(path)


def _save_rgb(path, array):
    from PIL import Image

    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def print_summary(summary, console=None):
    """Print the demo's per-class IoU table (network, and + CRF when scored) and the measured figures."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    crf = summary.get("crf")
    table = Table(title=f"{summary['model']} {summary['model_options']} ({summary['params']:,} parameters): "
                        f"validation, {summary['data']['val']} images")
    columns = ["class", "IoU", "accuracy", "pixels"] + (["IoU + CRF"] if crf else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    fmt = (lambda v: "-" if v is None else f"{v:.3f}")  # noqa: E731
    for i, row in enumerate(summary["per_class"]):
        extra = [fmt(crf["per_class"][i]["iou"])] if crf else []
        table.add_row(row["class"], fmt(row["iou"]), fmt(row["accuracy"]), f"{row['pixels']:,}", *extra)
    console.print(table)
    budget = " (stopped by the time budget)" if summary["stopped_by_budget"] else ""
    with_crf = f" ({crf['mean_iou']:.3f} with the dense CRF)" if crf else ""
    console.print(
        f"val mIoU {summary['val_mean_iou']:.3f}{with_crf}, pixel accuracy {summary['val_pixel_accuracy']:.3f} after "
        f"{summary['epochs_run']}/{summary['epochs_planned']} epochs{budget}; {summary['seconds']:.0f} s in all "
        f"(data {summary['data_seconds']:.0f} s, training {summary['train_seconds']:.0f} s, evaluation "
        f"{summary['eval_seconds']:.0f} s) on {summary['cpus']} CPUs, load average {summary['load_average'][0]:.1f}."
    )
    if summary.get("onnx"):
        onnx = summary["onnx"]
        console.print(f"ONNX export {onnx['path']} verified against Keras: {onnx['verified']} "
                      f"({onnx['seconds']:.0f} s)")
    console.print(f"Outputs in {summary['out_dir']}: grid.png, curves.png, predictions/, summary.json, "
                  f"run/final.keras" + (", model.onnx" if summary.get("onnx") else ""))


# === detection: `kseg demo --task detection` ===

DETECTION_RECIPE = "synthetic_detection_demo"
# The synthetic detection set the demo trains on: images of DETECTION_SIZE pixels (the reader resizes them to
# SSD300's 300x300 input), DETECTION_TRAIN_IMAGES / DETECTION_VAL_IMAGES of them. Measured with these on 2
# cores (AMD EPYC): 12 epochs in 396 s of training, 409 s in all, VOC mAP@0.5 0.821 (VOC07 11-point) and
# 0.839 (all-point) on the 100 validation images. DETECTION_BUDGET_S caps the training time.
DETECTION_TRAIN_IMAGES = 1000
DETECTION_VAL_IMAGES = 100
DETECTION_SIZE = 128
DETECTION_BUDGET_S = 480.0
# Detections drawn in detections.png: those scoring at least this.
DRAW_SCORE = 0.5


def detection_init(model, seed=0):
    """he_init for the ReLU convs of a detector; its heads (`*_mbox_loc`, `*_mbox_conf`: linear box
    offsets and class logits) keep Keras' Glorot init, which starts the logits near zero (He's would
    start the MultiBox loss ~6 times higher)."""
    he_init(model, seed=seed, keep=lambda layer: "_mbox_" in layer.name)


def _make_detection_data(data_dir, *, seed, train_images, val_images, size):
    """The synthetic detection set in data_dir, reused when it was made with the same parameters."""
    info_path = os.path.join(data_dir, "synth.json")
    want = {"seed": seed, "train": train_images, "val": val_images, "size": [size, size], "layout": "voc-det"}
    if os.path.exists(info_path):
        with open(info_path) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return False
        shutil.rmtree(data_dir)  # made by an earlier demo with other parameters
    kd.make_synthetic_detection(data_dir, seed=seed, train=train_images, val=val_images, size=(size, size))
    return True


def evaluate_detector(model, dataset, class_names=None):
    """VOC mAP (VOC07 11-point and all-point, IoU 0.5) and COCO AP of a trained detector (raw outputs) on a
    kseg.data detection reader's batches (images at the network's input size, boxes in its pixels), with
    the Detection task's evaluator on kseg.inference_model's decoded detections."""
    import kseg
    from kseg.identity import task_of

    detector = kseg.inference_model(model)
    task = task_of(model)
    head = task.head(list(model.output_names))
    num_classes = int(model.outputs[head.output_index].shape[-1])
    evaluator = task.evaluator(num_classes, head, class_names)
    for images, target in dataset:
        found = detector(images, training=False)
        evaluator.update(target, {k: np.asarray(v) for k, v in found.items()})
    return evaluator.result()


def _draw_detections(model, dataset, path, class_names, count=8, preprocessing=None):
    """detections.png: validation images with their true boxes (green) and the detections scoring at
    least DRAW_SCORE (red, with class and score); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import kseg
    from kseg.train.pictures import _unpreprocess

    detector = kseg.inference_model(model)
    images, targets = next(iter(dataset.unbatch().batch(count)))
    found = {k: np.asarray(v) for k, v in detector(images, training=False).items()}
    cols = 4
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= len(images):
            continue
        image = np.clip(_unpreprocess(np.asarray(images[i]), preprocessing), 0, 255).astype(np.uint8)
        ax.imshow(image)
        for box, cls in zip(np.asarray(targets["boxes"][i]), np.asarray(targets["classes"][i])):
            if cls >= 0:
                ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="lime", lw=1))
        for j in range(int(found["num_detections"][i])):
            score, cls, box = found["detection_scores"][i, j], found["detection_classes"][i, j], \
                found["detection_boxes"][i, j]
            if score < DRAW_SCORE:
                break
            ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="red", lw=1.5))
            ax.text(box[0], box[1], f"{class_names[cls]} {score:.2f}", color="white", fontsize=7,
                    bbox=dict(facecolor="red", alpha=0.7, pad=1, lw=0))
    fig.suptitle("validation: true boxes (green), detections scoring >= 0.5 (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_detection_demo(out_dir, *, seed=SEED, train_images=DETECTION_TRAIN_IMAGES, val_images=DETECTION_VAL_IMAGES,
                       size=DETECTION_SIZE, epochs=None, width=None, overrides=None, budget_s=DETECTION_BUDGET_S,
                       verbose=2) -> dict:
    """`kseg demo --task detection`: the synthetic shapes as a VOC detection set (out_dir/data), the
    `synthetic_detection_demo` recipe (a width-reduced SSD300, from scratch) trained into out_dir/run,
    then VOC mAP@0.5 (VOC07 11-point and all-point) and COCO AP on the validation split; writes
    out_dir/detections.png, out_dir/curves.png and out_dir/summary.json; returns the summary.

    epochs / width / overrides / budget_s as run_demo's. The images are `size` pixels square; the
    reader resizes them to the network's 300x300.
    """
    from kseg.identity import identify

    if min(train_images, val_images) < 1:
        raise ValueError(f"the demo needs at least one training and one validation image, got "
                         f"train_images={train_images}, val_images={val_images}")
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data_dir = os.path.join(out_dir, "data")
    made = _make_detection_data(data_dir, seed=seed, train_images=train_images, val_images=val_images, size=size)
    data_seconds = time.perf_counter() - start

    fixed = {"training.seed": seed}
    if epochs is not None:
        fixed["training.epochs"] = int(epochs)
    if width is not None:
        fixed["model_options.width"] = float(width)
    recipe = apply_overrides(load_recipe(DETECTION_RECIPE, fixed), overrides)
    run_dir = os.path.join(out_dir, "run")
    _clear_finished_run(run_dir)
    budget = TimeBudget(budget_s)
    result = train(recipe, data_dir, run_dir, init=lambda m: detection_init(m, seed=seed), verbose=verbose,
                   extra_callbacks=[budget])
    model = result["model"]

    t = time.perf_counter()
    ident = identify(recipe.model, dict(recipe.model_options))
    prep = ident.preprocessing if not recipe.data.get("preprocessing") else recipe.data["preprocessing"]
    val = kd.voc_detection(data_dir, recipe.data.get("val_split", "val"), size=tuple(ident.input_shape[:2]),
                           preprocessing=prep, batch_size=16)
    scores = evaluate_detector(model, val, class_names=list(kd.SYNTH_CLASSES))
    eval_seconds = time.perf_counter() - t
    picture = _draw_detections(model, val, os.path.join(out_dir, "detections.png"), list(kd.SYNTH_CLASSES),
                               preprocessing=ident.preprocessing)
    curves = _plot_curves(os.path.join(run_dir, "log.csv"), os.path.join(out_dir, "curves.png"),
                          right=("mbox_loc_loss", "val_mbox_loc_loss", "mbox_conf_loss", "val_mbox_conf_loss"),
                          right_title="MultiBox loss terms")

    history = result["history"]
    summary = {
        "task": "detection", "model": recipe.model, "model_options": dict(recipe.model_options),
        "params": int(model.count_params()), "recipe": recipe.name, "seed": seed,
        "data": {"train": train_images, "val": val_images, "size": size, "made": made},
        "epochs_planned": result["epochs"], "epochs_run": len(history.get("loss", [])),
        "stopped_by_budget": budget.stopped, "budget_s": budget_s,
        "map_voc07": scores["map_voc07"], "map_voc": scores["map_voc"], "coco": scores["coco"],
        "per_class": scores["per_class"], "val_images": scores["count"],
        "loss": history.get("loss", []), "val_loss": history.get("val_loss", []),
        "data_seconds": round(data_seconds, 1), "train_seconds": round(result["train_seconds"], 1),
        "eval_seconds": round(eval_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
        "out_dir": out_dir, "detections": picture, "curves": curves,
        "checkpoint": os.path.join(run_dir, "final.keras"),
        "load_average": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
        f.write("\n")
    return summary


def print_detection_summary(summary, console=None):
    """Print the detection demo's per-class AP table and its mAP, time and outputs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{summary['model']} {summary['model_options']} ({summary['params']:,} parameters): "
                        f"validation, {summary['val_images']} images, IoU 0.5")
    for column in ("class", "AP (VOC07 11-point)", "AP (all-point)", "objects"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in summary["per_class"]:
        table.add_row(str(row.get("name", row.get("class"))), _fmt(row.get("ap_voc07")), _fmt(row.get("ap_voc")),
                      str(row["gt"]))
    console.print(table)
    budget = " (stopped by the time budget)" if summary["stopped_by_budget"] else ""
    console.print(
        f"VOC mAP@0.5 {summary['map_voc07']:.3f} (VOC07 11-point), {summary['map_voc']:.3f} (all-point); COCO AP "
        f"{summary['coco']['ap']:.3f} after {summary['epochs_run']}/{summary['epochs_planned']} epochs{budget}; "
        f"{summary['seconds']:.0f} s in all (data {summary['data_seconds']:.0f} s, training "
        f"{summary['train_seconds']:.0f} s, evaluation {summary['eval_seconds']:.0f} s) on {summary['cpus']} CPUs, "
        f"load average {summary['load_average'][0]:.1f}.")
    console.print(f"Outputs in {summary['out_dir']}: detections.png, curves.png, summary.json, run/final.keras")


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"
