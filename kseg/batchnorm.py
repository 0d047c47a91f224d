"""BatchNormalization in training mode as TensorFlow's fused kernel, on Keras' own layers.

Keras 3 computes a training-mode BatchNormalization as separate ops: `moments` (mean, squared
difference, mean), then `x * scale + offset` with the scale and offset built from them. Forward
and backward that is a dozen passes over every activation; PyTorch runs one kernel each way.
TensorFlow has that kernel too (`FusedBatchNormV3` and its gradient, oneDNN's on the CPU): on
SegNet-sized activations it takes about half the time of Keras' ops (scripts/profile_train.py).

`fuse_batch_norm(model)` gives each `keras.layers.BatchNormalization` of a model that kernel for
training. The layers stay Keras' own class with Keras' config, so saved files, conversions and
inference are unchanged; a model loaded from a file gets it again from `kseg.build_model` or kseg's
compile helpers (`kseg.train.compile_segmentation`), which call this. The arithmetic is Keras':
batch mean and biased variance normalise the batch, and the moving statistics move by
`moving * momentum + batch * (1 - momentum)` with the biased variance (the kernel returns the
unbiased one, PyTorch's running_var; it is rescaled by (n - 1) / n).

Layers the kernel does not cover keep Keras' computation: masks, batch renormalisation,
synchronised statistics, an axis other than the last of a 4-D input, and inference.
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf


def fuse_batch_norm(model):
    """Let every BatchNormalization layer of `model` (nested models included) train with TensorFlow's
    fused kernel; returns `model`. Idempotent; other layers are left alone."""
    if keras.backend.backend() != "tensorflow":
        return model
    for layer in model_layers(model):
        if type(layer) is keras.layers.BatchNormalization and "call" not in vars(layer):
            layer.call = types.MethodType(_fused_call, layer)
    return model


def is_fused(layer) -> bool:
    """Whether `layer` trains with the fused kernel (fuse_batch_norm was applied to it)."""
    return getattr(vars(layer).get("call"), "__func__", None) is _fused_call


def model_layers(model):
    """Every layer of `model`, nested models and layers included, each once (the model first)."""
    seen = set()
    stack = [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        stack.extend(getattr(layer, "_layers", None) or getattr(layer, "layers", None) or [])


def _coverable(layer, inputs, mask):
    axis = layer.axis if isinstance(layer.axis, int) else None
    return (mask is None and not layer.renorm and not layer.synchronized and len(inputs.shape) == 4
            and axis in (-1, 3))


def _fused_call(self, inputs, training=None, mask=None):
    keras_call = type(self).call
    if not (training and self.trainable) or not _coverable(self, inputs, mask):
        return keras_call(self, inputs, training=training, mask=mask)
    # As Keras: statistics in float32 at least (float16 / bfloat16 inputs overflow), output in the
    # layer's compute dtype.
    dtype = keras.backend.result_type(inputs.dtype, "float32")
    x = tf.cast(inputs, dtype)
    channels = x.shape[-1]
    scale = tf.cast(self.gamma, dtype) if self.scale else tf.ones([channels], dtype)
    offset = tf.cast(self.beta, dtype) if self.center else tf.zeros([channels], dtype)
    empty = tf.zeros([0], dtype)
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    # The kernel's variance has Bessel's correction; Keras' moving variance takes the biased one.
    n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), dtype)
    biased = tf.where(n > 1, variance * ((n - 1) / tf.maximum(n, 1)), tf.zeros_like(variance))
    momentum = tf.cast(self.momentum, dtype)
    self.moving_mean.assign(tf.cast(self.moving_mean, dtype) * momentum + mean * (1 - momentum))
    self.moving_variance.assign(tf.cast(self.moving_variance, dtype) * momentum + biased * (1 - momentum))
    return tf.cast(y, self.compute_dtype)
