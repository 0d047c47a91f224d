"""The training demo: synthetic data -> reduced-width DeepLab-LargeFOV on CPU -> evaluation -> PNGs.

    from kseg.train.demo import run_demo
    summary = run_demo("demo_out")          # {"val_mean_iou": ..., "seconds": ..., ...}

Everything runs from scratch and offline: the synthetic dataset (kseg.data.make_synthetic),
the `synthetic_demo` recipe, a time budget that stops training in time, evaluation at the
images' own size, palette PNG predictions and, when matplotlib is installed, a plot of the
training curves.
"""

from __future__ import annotations

import csv
import json
import os
import time

import keras
import numpy as np


class TimeBudget(keras.callbacks.Callback):
    """Stops fit after the first epoch that ends past `seconds` since the start of training."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self.start
        # Stop when another epoch of the average length would overrun the budget.
        if elapsed * (epoch + 2) / (epoch + 1) > self.seconds:
            self.model.stop_training = True


def he_init(model, seed=0, input_std=64.0):
    """Re-initialise every conv kernel with He et al. 2015's normal init (biases zero).

    The paper's networks start from ImageNet weights; from scratch, a 16-layer plain ReLU
    net without BatchNorm trains far faster with He's variance-preserving init than with
    Keras' default Glorot uniform. Caffe-preprocessed inputs have a standard deviation of
    about 64, not 1, so the first conv's kernel is divided by `input_std`: otherwise every
    activation, and the first logits, are ~64 times too large (a first-epoch loss of ~11).
    """
    rng = np.random.default_rng(seed)
    first = True
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, *rest = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:3]))
            std = np.sqrt(2.0 / fan_in) / (input_std if first else 1.0)
            first = False
            new = rng.normal(0.0, std, kernel.shape).astype(kernel.dtype)
            layer.set_weights([new, *[np.zeros_like(r) for r in rest]])


def _plot_curves(log_csv, path):
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
        ax1.plot(epochs, [float(r[key]) for r in rows], label=key)
    for key in ("mean_iou", "val_mean_iou", "val_pixel_accuracy"):
        if key in rows[0]:
            ax2.plot(epochs, [float(r[key]) for r in rows], label=key)
    ax1.set_xlabel("epoch"), ax2.set_xlabel("epoch"), ax1.legend(), ax2.legend()
    ax1.set_title("loss"), ax2.set_title("scores")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_demo(out_dir, *, budget_s=480, train_images=200, val_images=50, size=128, epochs=None, width=None,
             predictions=8, verbose=2) -> dict:
    """Make the synthetic set, train, evaluate, write predictions; returns the measured summary."""
    import kseg.data as kd
    from kseg.train.fit import evaluate, train
    from kseg.train.recipes import load_recipe

    start = time.perf_counter()
    data_dir = os.path.join(out_dir, "data")
    if not os.path.exists(os.path.join(data_dir, "synth.json")):
        kd.make_synthetic(data_dir, seed=0, train=train_images, val=val_images, size=size)
    overrides = {"data.crop": [size, size]}
    if epochs is not None:
        overrides["training.epochs"] = epochs
    if width is not None:
        overrides["model_options.width"] = width
    recipe = load_recipe("synthetic_demo", overrides)
    result = train(recipe, data_dir, os.path.join(out_dir, "run"), init=he_init, verbose=verbose,
                   extra_callbacks=[TimeBudget(budget_s)])
    model = result["model"]
    val = kd.synthetic(data_dir, "val", batch_size=1, preprocessing=recipe.model)
    scores = evaluate(model, val, class_names=list(kd.SYNTH_CLASSES))

    pred_dir = os.path.join(out_dir, "predictions")
    os.makedirs(pred_dir, exist_ok=True)
    for i, (x, _) in enumerate(val.take(predictions)):
        label = np.argmax(np.asarray(model(x, training=False))[0], axis=-1).astype(np.uint8)
        kd.write_label(os.path.join(pred_dir, f"val_{i:03d}.png"), label)
    plot = _plot_curves(os.path.join(out_dir, "run", "log.csv"), os.path.join(out_dir, "curves.png"))
    summary = {
        "model": recipe.model, "model_options": recipe.model_options, "params": int(model.count_params()),
        "epochs_run": len(result["history"].get("loss", [])), "train_seconds": round(result["train_seconds"], 1),
        "seconds": round(time.perf_counter() - start, 1), "val_mean_iou": scores["mean_iou"],
        "val_pixel_accuracy": scores["pixel_accuracy"], "val_mean_accuracy": scores["mean_accuracy"],
        "val_fw_iou": scores["fw_iou"], "per_class": scores["per_class"], "predictions": pred_dir,
        "curves": plot, "load_average": list(os.getloadavg()), "cpus": os.cpu_count(),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
