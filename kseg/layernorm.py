"""LayerNormalization in training mode with a hand-written gradient, on Keras' own layers.

Keras 3 normalises with `moments` and then `x * inv + (beta - mean * inv)`, and TensorFlow
differentiates that op by op: the gradient runs back through the rsqrt, the variance, the squared
difference and both means, about a dozen passes over every activation. PyTorch's
`native_layer_norm_backward` is one kernel. The standard closed form of the input gradient,

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * gamma,  xhat = (x - mean) * rstd,

(means over the normalised axis) needs four element-wise passes and two reductions, and the
gamma / beta gradients are sum(dy * xhat) and sum(dy) over the other axes.

`fuse_layer_norm(model)` gives each `keras.layers.LayerNormalization` of a model normalising over the
last axis that gradient, for training only (under `training=True`; inference, saved files and
conversions keep Keras' computation, and the layers keep Keras' class and config). Like Keras, the
statistics are computed in float32 at least and the output cast to the layer's compute dtype.
`kseg.build_model` and kseg's compile helpers apply it, beside kseg.batchnorm's fused BatchNorm.
Layers it does not cover keep Keras' computation: RMS scaling, an axis other than the last.
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf

from kseg.batchnorm import model_layers


def fuse_layer_norm(model):
    """Let every LayerNormalization layer of `model` (nested models included) over the last axis train
    with the hand-written gradient; returns `model`. Idempotent; other layers are left alone."""
    if keras.backend.backend() != "tensorflow":
        return model
    for layer in model_layers(model):
        if type(layer) is keras.layers.LayerNormalization and "call" not in vars(layer):
            layer.call = types.MethodType(_fused_call, layer)
    return model


def is_fused(layer) -> bool:
    """Whether `layer` trains with the hand-written gradient (fuse_layer_norm was applied to it)."""
    return getattr(vars(layer).get("call"), "__func__", None) is _fused_call


def _coverable(layer, inputs):
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    rank = len(inputs.shape)
    return not layer.rms_scaling and len(axes) == 1 and axes[0] in (-1, rank - 1) and inputs.shape[-1] is not None


def layer_norm(x, gamma, beta, epsilon):
    """Layer normalisation over the last axis of float `x` with (C,) `gamma` / `beta` (None: 1 / 0), with
    the closed-form gradient of the module docstring."""
    channels = x.shape[-1]
    gamma = tf.ones([channels], x.dtype) if gamma is None else gamma
    beta = tf.zeros([channels], x.dtype) if beta is None else beta

    @tf.custom_gradient
    def normalise(x, gamma, beta):
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        rstd = tf.math.rsqrt(variance + epsilon)
        xhat = (x - mean) * rstd

        def grad(dy):
            g = dy * gamma
            dx = rstd * (g - tf.reduce_mean(g, axis=-1, keepdims=True)
                         - xhat * tf.reduce_mean(g * xhat, axis=-1, keepdims=True))
            outer = list(range(len(x.shape) - 1))
            return dx, tf.reduce_sum(dy * xhat, axis=outer), tf.reduce_sum(dy, axis=outer)

        return xhat * gamma + beta, grad

    return normalise(x, gamma, beta)


def _training(layer) -> bool:
    """The `training` value of the Keras call this layer runs in (LayerNormalization.call takes none,
    Keras keeps it in the call context it propagates to nested layers); False where it cannot tell."""
    try:
        return bool(layer._get_call_context().get_value("training"))
    except AttributeError:
        return False


def _fused_call(self, inputs):
    if not (_training(self) and _coverable(self, inputs)):
        return type(self).call(self, inputs)
    # As Keras: statistics in float32 at least (half-precision inputs), output in the compute dtype.
    dtype = keras.backend.result_type(inputs.dtype, "float32")
    gamma = tf.cast(self.gamma, dtype) if self.scale else None
    beta = tf.cast(self.beta, dtype) if self.center else None
    return tf.cast(layer_norm(tf.cast(inputs, dtype), gamma, beta, self.epsilon), self.compute_dtype)
