"""FusedSGD: keras.optimizers.SGD with the momentum update as one TF kernel per variable.

Keras' SGD writes the momentum update as separate element-wise ops (m * momentum, g * lr,
subtract, assign, assign_add): five passes over every weight and slot. TensorFlow's own
`ResourceApplyKerasMomentum` kernel does the same arithmetic (m = momentum * m - lr * g;
w += m, or the Nesterov form) in one pass. On VGG-sized models (134M weights) the update
is a large share of a CPU training step; see docs/performance.md for the measured step.

    opt = kseg.train.FusedSGD(learning_rate=1e-3, momentum=0.9)     # same arguments as SGD
    model.compile(optimizer=opt, ...)

Anything the kernel does not cover (no momentum, sparse gradients, non-TF variables) falls
back to keras.optimizers.SGD's own update, so results always equal SGD's.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _handle(variable):
    if isinstance(variable, keras.Variable):  # a Keras variable wraps a tf.Variable
        variable = variable.value
    return variable.handle if isinstance(variable, tf.Variable) else None


@keras.saving.register_keras_serializable(package="kseg")
class FusedSGD(keras.optimizers.SGD):
    """keras.optimizers.SGD (momentum, Nesterov, weight decay, clipping, schedules) with a fused update."""

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0 or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        m = self.momentums[self._get_variable_index(variable)]
        var_handle, m_handle = _handle(variable), _handle(m)
        if var_handle is None or m_handle is None:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=var_handle, accum=m_handle, lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.cast(self.momentum, dtype), use_locking=False, use_nesterov=self.nesterov)
