"""Distribution, precision and XLA for model.fit: thin choices over tf.distribute and Keras.

    strategy = kseg.train.strategy()          # Mirrored on >1 GPU, TF's default otherwise,
    with strategy.scope():                     # MultiWorkerMirrored when TF_CONFIG is set
        model = kseg.build_model(...)
        kseg.train.compile_segmentation(model, recipe)
    model.fit(dataset)                         # the dataset batch is the GLOBAL batch

Mixed precision: `set_precision("mixed_float16")` before building the model; then
`float32_outputs(model)` puts a float32 linear activation on every output so the logits, the
softmax and the loss are float32 (Keras' own advice; the losses also cast to float32).
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def strategy(kind: str = "auto", devices=None):
    """A tf.distribute strategy.

    kind "auto": MultiWorkerMirroredStrategy when the TF_CONFIG environment variable names a
    cluster, MirroredStrategy over all visible GPUs when there are two or more, else TF's
    default strategy (one replica; TF places the ops, on the GPU when there is one).
    "mirrored" with `devices` (e.g. the logical CPUs "/cpu:0", "/cpu:1") forces
    MirroredStrategy; "one_device" (OneDeviceStrategy) and "multi_worker" force theirs.

    Why not OneDeviceStrategy for one device: on the CPU, pinning every op to "/cpu:0" made
    the demo's DeepLab train step 3x slower (693 vs 233 ms per batch of 8 at 128x128 on 2
    cores, TF 2.21), with the same weights and results.
    Create it before any other TensorFlow work (multi-worker collectives need that).
    """
    if kind not in STRATEGIES:
        raise ValueError(f"strategy kind must be one of {STRATEGIES}, got {kind!r}")
    tf_config = os.environ.get("TF_CONFIG")
    if kind == "multi_worker" or (kind == "auto" and tf_config):
        if not tf_config:
            raise ValueError("multi_worker needs the TF_CONFIG environment variable (cluster and task)")
        try:
            json.loads(tf_config)
        except ValueError as e:
            raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if kind == "mirrored" or (kind == "auto" and devices is None and len(gpus) > 1):
        return tf.distribute.MirroredStrategy(devices=devices)
    if devices:
        if len(devices) != 1:
            raise ValueError(f"one_device takes one device, got {devices}")
        return tf.distribute.OneDeviceStrategy(devices[0])
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")
    return tf.distribute.get_strategy()


def set_precision(precision: str = "float32"):
    """Set Keras' global dtype policy; call before building the model."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    keras.mixed_precision.set_global_policy(precision)


def float32_outputs(model):
    """`model` itself if every output is float32, else a model sharing its weights with float32 outputs."""
    outputs = model.outputs
    if all(o.dtype == "float32" for o in outputs):
        return model
    cast = [keras.layers.Activation("linear", dtype="float32", name=f"{o.name.split('/')[0]}_float32")(o)
            for o in outputs]
    wrapped = keras.Model(model.inputs, cast if len(cast) > 1 else cast[0], name=model.name)
    if hasattr(model, "_kseg_info"):
        wrapped._kseg_info = model._kseg_info
    return wrapped


def multi_worker_fit(model):
    """Let `model.fit` run under MultiWorkerMirroredStrategy on Keras 3 (returns `model`).

    Keras 3.15's TF trainer starts fit by reducing the first distributed batch to one batch
    (`strategy.reduce("MEAN", ...)`) only to learn its shapes; MultiWorkerMirroredStrategy cannot
    reduce PerReplica values eagerly, so fit fails with "Attempt to convert a value (PerReplica:
    ...)" (keras-team/keras#20585, unfixed upstream). This takes the shapes from the first local
    replica's part of the batch instead. Then every train/test step reduces its logs with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on scalar logs ("Invalid reduction
    dimension 0 for input with 0 dimensions"). The logs are metric results (the loss tracker
    included) whose variables are summed across all replicas on every update, so each replica
    already holds the global value: kseg has Keras take the local replica's value ("first")
    for the steps' "auto" reduction under MultiWorkerMirroredStrategy only (predict's
    "concat" is untouched). A no-op for any other strategy;
    `kseg.train.compile_segmentation` applies it, plain-Keras users call it after `compile`.
    """
    strat = model.distribute_strategy
    if not isinstance(strat, tf.distribute.MultiWorkerMirroredStrategy) or getattr(model, "_kseg_mw_fit", False):
        return model
    keras_build = model._maybe_symbolic_build

    def local_part(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strat.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = keras.tree.map_structure(local_part, next(it))
                break
        return keras_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build
    model._kseg_mw_fit = True
    _multi_worker_step_logs()
    return model


def _multi_worker_step_logs():
    from keras.src.backend.tensorflow import trainer as tf_trainer

    keras_reduce = tf_trainer.reduce_per_replica
    if getattr(keras_reduce, "_kseg_multi_worker", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            reduction = "first"
        return keras_reduce(values, strategy, reduction)

    reduce_per_replica._kseg_multi_worker = True
    tf_trainer.reduce_per_replica = reduce_per_replica
