"""Distribution, precision and XLA for model.fit: thin choices over tf.distribute and Keras.

    strategy = kseg.train.strategy()          # Mirrored on >1 GPU, OneDevice otherwise,
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
    cluster, MirroredStrategy over all visible GPUs when there are two or more, else
    OneDeviceStrategy on the GPU or the CPU. "mirrored" with `devices` (e.g. the logical
    CPUs "/cpu:0", "/cpu:1") forces MirroredStrategy; "one_device" and "multi_worker" force theirs.
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
    return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")


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
