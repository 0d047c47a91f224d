"""Plain-Keras helpers around model.compile / model.fit / evaluation; not a framework.

    model = kseg.build_model("deeplab_largefov", num_classes=5, width=0.25)
    model = kseg.train.compile_segmentation(model, recipe, steps_per_epoch=len_train)
    model.fit(train_ds, validation_data=val_ds, epochs=..., callbacks=kseg.train.callbacks(recipe, out))

`train(recipe, data_dir, out_dir)` strings these together for `kseg train`; the datasets are
kseg.train.inputs' (`datasets(recipe, data_dir)`, re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from kseg.api import build_model, layout_options
from kseg.batchnorm import fuse_batch_norm
from kseg.data.check import check_dataset
from kseg.identity import RUN_FILE
from kseg.layernorm import fuse_layer_norm
from kseg.progress import progress
from kseg.registry import get_spec
from kseg.tasks import losses as losses_mod
from kseg.train.distribute import float32_outputs, multi_worker_fit, set_precision
from kseg.train.distribute import strategy as make_strategy
from kseg.train.inputs import (  # noqa: F401 (the dataset builders, re-exported from here as before)
    TrainingSetupError,
    _classification_datasets,
    _widen_one_hot,
    classification_augment,
    datasets,
    edge_lists,
    eval_transform,
    input_preprocessing,
)
from kseg.train.optim import Adam, AdamW, FusedSGD, RMSprop
from kseg.train.pictures import GIF_FILE, SAMPLES_FILE, plot_samples, prediction_gif
from kseg.train.recipes import Recipe, apply_overrides, load_recipe, soft_labels


class FromScratchWarning(UserWarning):
    """A recipe whose paper starts from ImageNet weights is trained without them."""


# === compile ===


def learning_rate(recipe: Recipe, steps_per_epoch: int | None = None, total_steps: int | None = None):
    """The recipe's learning rate as a float or a keras.optimizers.schedules schedule (per iteration)."""
    lr = float(recipe.optimizer["learning_rate"])
    s = recipe.schedule
    kind = s.get("kind", "constant")
    per = 1
    if s.get("step_unit") == "epochs":
        if not steps_per_epoch:
            raise ValueError(f"{recipe.source}: schedule in epochs needs steps_per_epoch")
        per = steps_per_epoch
    if kind == "constant":
        return lr
    if kind == "step":
        return keras.optimizers.schedules.ExponentialDecay(lr, s["step_size"] * per, s.get("gamma", 0.1),
                                                           staircase=True)
    if kind == "piecewise":
        return keras.optimizers.schedules.PiecewiseConstantDecay([b * per for b in s["boundaries"]],
                                                                 [float(v) for v in s["values"]])
    if kind in ("poly", "cosine") and not total_steps:
        raise ValueError(f"{recipe.source}: a {kind} schedule needs the total number of steps")
    if kind == "poly":
        return keras.optimizers.schedules.PolynomialDecay(lr, total_steps, 0.0, power=s.get("power", 0.9))
    if kind == "cosine":
        warmup = s.get("warmup", 0) * per
        if warmup >= total_steps:
            raise ValueError(f"{recipe.source}: [schedule] warmup ({warmup} steps) must be shorter than the "
                             f"training ({total_steps} steps)")
        alpha = float(s.get("min_lr", 0.0)) / lr
        if not warmup:
            return keras.optimizers.schedules.CosineDecay(lr, total_steps, alpha=alpha)
        return keras.optimizers.schedules.CosineDecay(float(s.get("warmup_start", 0.0)), total_steps - warmup,
                                                      alpha=alpha, warmup_target=lr, warmup_steps=warmup)
    raise ValueError(f"{recipe.source}: unknown schedule {kind!r}")


def make_optimizer(recipe: Recipe, steps_per_epoch=None, total_steps=None):
    o = recipe.optimizer
    lr = learning_rate(recipe, steps_per_epoch, total_steps)
    # Keras applies weight_decay to the weights directly (w -= lr * wd * w) rather than adding
    # wd * w to the gradient as Caffe does; with momentum the two differ slightly.
    wd = o.get("weight_decay") or None
    # Caffe's per-layer lr_mult / decay_mult 0, by variable path globs (kseg.train.optim.LayerRates).
    layers = {"lr_multipliers": o.get("lr_multipliers"), "no_weight_decay": o.get("no_weight_decay")}
    # Clipping the global norm, as torch.nn.utils.clip_grad_norm_; an EMA of the weights (see callbacks).
    layers.update(global_clipnorm=o.get("clip_grad_norm"))
    if "ema" in o:
        layers.update(use_ema=True, ema_momentum=float(o["ema"]))
    if "epsilon" in o:
        layers.update(epsilon=float(o["epsilon"]))
    if o["name"] == "sgd":
        return FusedSGD(lr, momentum=o.get("momentum", 0.0), weight_decay=wd, **layers)
    if o["name"] == "adam":
        return Adam(lr, weight_decay=wd, **layers)
    if o["name"] == "rmsprop":
        return RMSprop(lr, rho=float(o.get("rho", 0.9)), momentum=o.get("momentum", 0.0), weight_decay=wd, **layers)
    return AdamW(lr, weight_decay=wd or 0.004, **layers)


def make_loss(recipe: Recipe):
    spec = recipe.loss
    if soft_labels(recipe):  # mixed or smoothed one-hot targets
        return get_spec(recipe.model).task_object.soft_loss(spec.get("label_smoothing", 0.0))
    stride8 = spec.get("stride8", False)
    task = get_spec(recipe.model).task_object
    if spec["name"] == getattr(task, "loss_name", None):  # the task's own loss, with the [loss] section's options
        return task.loss(**{k: v for k, v in spec.items() if k != "name"})
    if spec["name"] == "multibox":  # the detection task's: SSD's MultiBox loss for both outputs
        return get_spec(recipe.model).task_object.loss(neg_pos_ratio=spec.get("neg_pos_ratio", 3.0))
    if spec["name"] == "sparse_cross_entropy":
        return losses_mod.SparseCrossEntropy(class_weights=spec.get("class_weights"), resize_labels=stride8)
    if spec["name"] == "sparse_focal_loss":
        return losses_mod.SparseFocalLoss(gamma=spec.get("gamma", 2.0), class_weights=spec.get("class_weights"),
                                          resize_labels=stride8)
    return losses_mod.hed_losses()


def compile_segmentation(model, recipe, *, steps_per_epoch=None, total_steps=None, jit_compile=False):
    """model.compile with the recipe's optimizer, schedule, loss and the confusion-matrix metric.

    Returns the model to fit: `model` itself, or for `[loss] stride8 = true` a view of it
    whose output is the stride-8 logits (same weights). Outputs that are not float32 (mixed
    precision) are cast to float32 first.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    # A model loaded from a file: BatchNorm's fused training kernel (kseg.batchnorm), LayerNorm's gradient.
    fuse_layer_norm(fuse_batch_norm(model))
    if recipe.loss.get("stride8"):
        model = losses_mod.stride8_model(model)
    model = float32_outputs(model)
    num_classes = model.outputs[0].shape[-1]
    loss = make_loss(recipe)
    metrics = None
    if isinstance(loss, list) and len(loss) != len(model.outputs):
        raise ValueError(f"{recipe.source}: {len(loss)} losses for the {len(model.outputs)} outputs of {model.name}")
    if not isinstance(loss, list):
        task = get_spec(recipe.model).task_object
        metrics = (task.soft_metrics(num_classes) if soft_labels(recipe) else
                   task.metrics(num_classes, resize_labels=recipe.loss.get("stride8", False)))
    model.compile(optimizer=make_optimizer(recipe, steps_per_epoch, total_steps), loss=loss, metrics=metrics,
                  jit_compile=jit_compile)
    return multi_worker_fit(model)


def rcnn_settings(recipe: Recipe) -> dict:
    """A two-stage detector's training settings from the recipe's [loss] (name "rcnn"): every key but
    name, allowed_border "none" -> None (kseg.detection.rcnn_trainer.SETTINGS)."""
    spec = recipe.loss
    if spec.get("name") != "rcnn":
        raise ValueError(f"{recipe.source}: {recipe.model} trains with [loss] name = 'rcnn', not {spec.get('name')!r}")
    settings = {k: v for k, v in spec.items() if k != "name"}
    border = settings.get("allowed_border")
    if isinstance(border, str):
        if border != "none":
            raise ValueError(f"{recipe.source}: [loss] allowed_border is a number of pixels or 'none', got {border!r}")
        settings["allowed_border"] = None
    if "bg_iou" in settings:
        if len(settings["bg_iou"]) != 2:
            raise ValueError(f"{recipe.source}: [loss] bg_iou is [low, high], got {settings['bg_iou']!r}")
        settings["bg_iou"] = tuple(float(v) for v in settings["bg_iou"])
    return settings


def compile_trainer(model, recipe, *, steps_per_epoch=None, total_steps=None, jit_compile=False):
    """The model's registry trainer (a two-stage detector's RCNNTrainer) with the recipe's [loss]
    settings, compiled with the recipe's optimizer and schedule; returns the trainer to fit."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    from kseg.identity import identify

    ident = identify(fuse_layer_norm(fuse_batch_norm(model)))
    trainer = get_spec(recipe.model).trainer(model, dict(ident.options), rcnn_settings(recipe))
    trainer.compile(optimizer=make_optimizer(recipe, steps_per_epoch, total_steps), jit_compile=jit_compile)
    return trainer


def callbacks(recipe, out_dir, *, monitor=None, tensorboard="auto"):
    """BackupAndRestore (out_dir/backup), best checkpoint (out_dir/best.keras), CSV log, TensorBoard.

    The best checkpoint is the highest `monitor` (the lowest for a loss): by default the recipe
    model's task's validation score (val_mean_iou for segmentation, val_top1 for classification,
    the lowest val_loss for edges).

    Run the same command again after a crash or a SIGKILL: BackupAndRestore restores the
    weights, optimizer and epoch of the last completed epoch and fit continues from the next;
    it deletes the backup when fit finishes. The CSV log appends, so it covers the whole run.
    """
    mode = "min" if monitor is not None and monitor.endswith("loss") else "max"
    if monitor is None:
        monitor = checkpoint_monitor(recipe)
        mode = checkpoint_mode(recipe)
    os.makedirs(out_dir, exist_ok=True)
    cbs = [keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup"))]
    if "ema" in recipe.optimizer:
        # After the backup (it keeps the raw weights and their average as they are), before the
        # checkpoint: validation and best.keras see the averaged weights, training the raw ones.
        cbs.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    cbs += [
        keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "best.keras"), monitor=monitor, mode=mode,
                                        save_best_only=True),
        keras.callbacks.CSVLogger(os.path.join(out_dir, "log.csv"), append=True),
    ]
    if tensorboard == "auto":
        # Keras' TensorBoard callback needs the tensorboard package (tf.summary's writer).
        import importlib.util

        tensorboard = importlib.util.find_spec("tensorboard") is not None
    if tensorboard:
        cbs.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "tensorboard"), write_graph=False))
    return cbs


def checkpoint_monitor(recipe) -> str:
    """The validation score the best checkpoint is chosen by: "val_" + the task's checkpoint_metric."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return "val_" + get_spec(recipe.model).task_object.checkpoint_metric


def checkpoint_mode(recipe) -> str:
    """"max" or "min": whether the best checkpoint has the highest or the lowest checkpoint_monitor."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return get_spec(recipe.model).task_object.checkpoint_mode


def _count(ds, limit=None):
    n = ds.cardinality().numpy()
    if n >= 0:
        return int(n)
    return sum(1 for _ in ds.take(limit) if True) if limit else sum(1 for _ in ds)


def check_setup(model, train, val, out_dir, run_info, task=None):
    """Clear errors before any training step: class counts, empty data, a foreign resume directory.

    With several outputs the class scores are the task's head output (a detector's mbox_conf), and
    labels given as a dict by output name (a detector's encoded targets) are checked by that name.
    """
    names = list(model.output_names)
    head = task.head(names).output_index if task is not None and len(names) > 1 else 0
    num_classes = model.outputs[head].shape[-1]
    class_labels = task is None or task.target_kind != "edge_map"  # edge maps are strengths in [0, 1]
    declared = getattr(train, "num_classes", None)
    if declared is not None and num_classes is not None and declared > num_classes:
        raise TrainingSetupError(
            f"the dataset has {declared} classes ({', '.join(getattr(train, 'class_names', [])[:8])}...) but "
            f"the model outputs {num_classes}; build it with num_classes={declared}"
        )
    for name, ds in (("training", train), ("validation", val)):
        first = next(iter(ds.take(1)), None)
        if first is None:
            raise TrainingSetupError(f"the {name} dataset is empty: no image/label pairs were found")
        target = first[1]
        if isinstance(target, dict):  # by output name; a two-stage detector's ground truth: "classes"
            target = target[names[head]] if names[head] in target else target["classes"]
        labels = np.asarray(target)
        seen = labels[labels != losses_mod.IGNORE_LABEL]
        if class_labels and seen.size and seen.max() >= num_classes:
            raise TrainingSetupError(
                f"the {name} data has label {int(seen.max())} but the model outputs {num_classes} classes "
                f"(labels must be 0..{num_classes - 1} or 255 = ignore)"
            )
    path = os.path.join(out_dir, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        keys = ("model", "model_kwargs")
        if {k: previous.get(k) for k in keys} != {k: run_info[k] for k in keys}:
            raise TrainingSetupError(
                f"{out_dir} holds a run of {previous.get('model')} {previous.get('model_kwargs')}, not "
                f"{run_info['model']} {run_info['model_kwargs']}: use another --out directory, "
                "or delete it to start over"
            )


# === train ===


def _named_backbone(recipe: Recipe, backbone_weights: str):
    """(recipe, file, name) for --backbone-weights: a registered name of the backbone's pretrained weights
    (kseg.pretrained) becomes its cached file (downloaded and verified once), and the recipe's images get
    the weights' preprocessing unless its [data] names one; a file path passes unchanged (name None)."""
    from kseg import pretrained

    spec = get_spec(recipe.model)
    try:
        entry = pretrained.lookup(spec.backbone, backbone_weights) if spec.backbone else None
        if entry is None:  # a file (build_model refuses a model without a backbone)
            return recipe, backbone_weights, None
        path = pretrained.ensure(entry)
    except (ValueError, OSError) as e:
        raise TrainingSetupError(f"--backbone-weights {backbone_weights}: {e}") from None
    options = {**spec.layouts.get(entry.layout, {}), **recipe.model_options}
    recipe = dataclasses.replace(recipe, model_options=options)
    if not recipe.data.get("preprocessing"):
        from kseg.identity import identify

        own = identify(recipe.model, options)
        # The layout's own normalisation (SegNet's input BatchNorm) wins over the backbone's.
        if own.layout is None or own.layout not in spec.layout_preprocessing:
            from kseg.registry import PREPROCESSING

            prep = entry.resolved_preprocessing()
            value = prep.kind if PREPROCESSING.get(prep.kind) == prep else prep.to_dict()
            recipe = dataclasses.replace(recipe, data={**recipe.data, "preprocessing": value})
    return recipe, path, entry.name


def from_scratch_notice(recipe: Recipe, backbone_weights=None) -> str | None:
    """What to tell a user who trains a recipe whose paper starts from ImageNet weights (or from the
    previous stage of a staged training) without them."""
    if recipe.init_from and backbone_weights is None:
        return (f"{recipe.name} starts from a trained {recipe.init_from} in its paper ({recipe.source}: "
                f"init_from = {recipe.init_from!r}), but no weights were given: training from scratch, which will "
                f"not reach the paper's scores. Pass --backbone-weights FILE: the {recipe.init_from} run's "
                f"best.keras (its layers are copied by name and the layers {recipe.model} adds start at zero), "
                f"or ImageNet weights of the backbone to skip the earlier stage.")
    if recipe.backbone_init and backbone_weights is None:
        return (f"{recipe.name} starts from an ImageNet-trained {get_spec(recipe.model).backbone or 'backbone'} in "
                f"its paper ({recipe.source}: backbone_init = {recipe.backbone_init!r}), but no backbone weights "
                "were given: training from scratch, which will not reach the paper's scores. Pass "
                "--backbone-weights FILE (a keras.applications file or a torchvision state_dict).")
    return None


def train(recipe, data_dir, out_dir, *, epochs=None, batch_size=None, overrides=None, strategy=None,
          precision="float32", jit_compile=False, steps_per_epoch=None, init=None, verbose="auto",
          tensorboard="auto", extra_callbacks=(), backbone_weights=None, gif=None):
    """Train a recipe's model on data_dir, writing checkpoints and logs to out_dir; returns a summary dict.

    Running the same call again after an interruption resumes from the last completed epoch.
    `init(model)` may modify the fresh model before training (e.g. re-initialise it).
    backbone_weights: ImageNet weights of the backbone (kseg.build_model's backbone_weights=: a file, or
    a registered name such as "imagenet", whose preprocessing the data then gets), as the recipe's
    paper starts from; without them a recipe with backbone_init warns.
    gif: draw out_dir/predictions.gif, the predictions on this many validation images after every
    epoch (kseg.train.pictures.prediction_gif; dense tasks).
    """
    overrides = dict(overrides or {})
    if gif is not None and gif < 1:
        raise TrainingSetupError(f"--gif N draws N validation images per epoch: N must be >= 1, got {gif}")
    if epochs is not None:
        overrides["training.epochs"] = int(epochs)
    if batch_size is not None:
        overrides["training.batch_size"] = int(batch_size)
    if isinstance(recipe, Recipe):
        recipe = apply_overrides(recipe, overrides)
    else:
        recipe = load_recipe(recipe, overrides)
    notice = from_scratch_notice(recipe, backbone_weights)
    if notice:
        warnings.warn(notice, FromScratchWarning, stacklevel=2)
    backbone_name = None
    if backbone_weights is not None:
        backbone_weights = os.fspath(backbone_weights)
        recipe, backbone_weights, backbone_name = _named_backbone(recipe, backbone_weights)
        if not os.path.isfile(backbone_weights):
            raise TrainingSetupError(f"--backbone-weights {backbone_weights}: no such file")
        # A torchvision backbone selects the torchvision layout (and its preprocessing) where there are two.
        recipe = dataclasses.replace(recipe, model_options={**layout_options(recipe.model, backbone_weights),
                                                            **recipe.model_options})
    seed = recipe.training.get("seed", 0)
    keras.utils.set_random_seed(seed)
    set_precision(precision)
    train_ds, val_ds = datasets(recipe, data_dir, seed=seed)
    strategy = strategy or make_strategy()
    run_info = {"model": recipe.model, "model_kwargs": dict(recipe.model_options), "recipe": recipe.name,
                "class_names": list(getattr(train_ds, "class_names", None) or []) or None,
                "backbone_weights": os.path.abspath(backbone_weights) if backbone_weights else None,
                "backbone_weights_name": backbone_name}
    with strategy.scope():
        try:
            model = build_model(recipe.model, backbone_weights=backbone_name or backbone_weights,
                                **recipe.model_options)
        except (ValueError, OSError, KeyError) as e:
            if backbone_weights is None:
                raise
            raise TrainingSetupError(f"--backbone-weights {backbone_weights}: {e}") from None
        with _naming_undecodable(recipe, data_dir):
            check_setup(model, train_ds, val_ds, out_dir, run_info, task=get_spec(recipe.model).task_object)
        if init is not None:
            init(model)
        steps = steps_per_epoch or _count(train_ds)
        if steps == 0:
            raise TrainingSetupError(f"the training dataset at {data_dir} is empty")
        t = recipe.training
        epochs_ = t["epochs"] if "epochs" in t else math.ceil(t["iterations"] / steps)
        if get_spec(recipe.model).trainer is not None:
            fit_model = compile_trainer(model, recipe, steps_per_epoch=steps, total_steps=steps * epochs_,
                                        jit_compile=jit_compile)
        else:
            fit_model = compile_segmentation(model, recipe, steps_per_epoch=steps, total_steps=steps * epochs_,
                                             jit_compile=jit_compile)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RUN_FILE), "w") as f:
        json.dump({**run_info, "recipe_file": recipe.source, "recipe_values": recipe.to_dict()}, f, indent=1)
    # One target per loss (HED's deep supervision: every output learns the same edge map); a trainer
    # takes the readers' targets as they are.
    task, wrapped = get_spec(recipe.model).task_object, get_spec(recipe.model).trainer is not None
    num_losses = 1 if wrapped else len(fit_model.outputs)
    names = list(model.output_names)
    renamed = not wrapped and list(fit_model.output_names) != names

    def fit_targets(y):
        if wrapped:
            return y
        y = task.fit_targets(y, num_losses)
        # Targets by output name (a detector's), for outputs renamed by the float32 casts of mixed precision:
        # by position instead.
        return tuple(y[n] for n in names) if renamed and isinstance(y, dict) else y

    fit_train, fit_val = (ds.map(lambda x, y: (x, fit_targets(y))) for ds in (train_ds, val_ds))
    if gif is not None:
        try:
            drawn = prediction_gif(model, val_ds, os.path.join(out_dir, GIF_FILE), count=gif,
                                   preprocessing=input_preprocessing(recipe))
        except ValueError as e:
            raise TrainingSetupError(str(e)) from None
        extra_callbacks = [*extra_callbacks, drawn]
    start = time.perf_counter()
    # shuffle=False: kseg's readers shuffle (seeded); Keras only warns that it ignores shuffle=True.
    with _naming_undecodable(recipe, data_dir):
        history = fit_model.fit(fit_train, validation_data=fit_val, epochs=epochs_, steps_per_epoch=steps_per_epoch,
                                shuffle=False, verbose=verbose,
                                callbacks=[*callbacks(recipe, out_dir, tensorboard=tensorboard), *extra_callbacks])
    stages = None
    if hasattr(fit_model, "finish"):  # a trainer with stages after fit (R-CNN's SVMs and box regressors)
        with progress(verbose != 0, "training the later stages", 2 * steps) as advance:
            stages = fit_model.finish(fit_train, on_batch=advance)
        # The stages complete the model of the last epoch: that is the run's result.
        model.save(os.path.join(out_dir, "best.keras"))
    seconds = time.perf_counter() - start
    model.save(os.path.join(out_dir, "final.keras"))
    logs = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    samples = None
    if task.target_kind in DRAWN_TARGETS:
        samples = plot_samples(model, val_ds, os.path.join(out_dir, SAMPLES_FILE),
                               preprocessing=input_preprocessing(recipe))
    monitor = checkpoint_monitor(recipe)
    return {"model": model, "history": logs, "train_seconds": seconds, "epochs": epochs_, "out_dir": out_dir,
            "val_mean_iou": logs.get("val_mean_iou", [None])[-1] if logs.get("val_mean_iou") else None,
            "monitor": monitor, "val_score": logs[monitor][-1] if logs.get(monitor) else None,
            "samples": samples, "stages": stages}


# The targets kseg.train.pictures.plot_samples draws (class maps, edge maps, image classes):
# samples.png is drawn for those.
DRAWN_TARGETS = ("class_map", "edge_map", "class")


# Phrases of libjpeg / libpng failures as TF reports them (they name no file).
_DECODER_ERRORS = ("Uncompress failed", "Invalid JPEG data", "Invalid PNG data", "Huffman", "corrupt", "PNG",
                   "JPEG")


@contextlib.contextmanager
def _naming_undecodable(recipe, data_dir):
    """Turn TF's nameless decoder error into a TrainingSetupError that names the files."""
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        bad = _undecodable_files(e, recipe, data_dir)
        if not bad:
            raise
        shown = "\n  ".join(f"{p}: {r}" for p, r in bad[:10])
        raise TrainingSetupError(f"{len(bad)} file(s) in {data_dir} cannot be decoded (TF's decoder stopped; "
                                 f"rerunning resumes from the last completed epoch):\n  {shown}\n"
                                 "fix or remove them, or read the data with skip_bad=True") from e


def _undecodable_files(error, recipe, data_dir):
    """After a decoder error in fit: the dataset's files that cannot be decoded, found with the checker."""
    if not any(phrase in str(error) for phrase in _DECODER_ERRORS):
        return []
    d = recipe.data
    layout = {"synthetic": "voc", "voc_detection": "voc-det"}.get(d.get("layout", "voc"), d.get("layout", "voc"))
    bad = []
    for split in dict.fromkeys((d.get("train_split", "train"), d.get("val_split", "val"))):
        try:
            if layout == "folder":
                report = check_dataset(os.path.join(data_dir, split), "folder",
                                       num_classes=recipe.model_options.get("num_classes"))
            elif layout == "classification_folder":
                report = check_dataset(os.path.join(data_dir, split), "classification")
            else:
                report = check_dataset(data_dir, layout, split=split)
        except (OSError, ValueError):
            continue
        bad += [(p, r) for p, r in report.errors if "cannot be decoded" in r]
    return bad
