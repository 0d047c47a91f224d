"""kseg's optimizers: per-layer learning rates (Caffe's lr_mult) and a fused SGD update.

LayerRates gives an optimizer learning-rate multipliers and weight-decay exclusions chosen by
variable path globs, as Caffe's `param { lr_mult decay_mult }` did per layer (DeepLab trains
its classifier at 10x the base rate, its biases at 2x):

    opt = kseg.train.optim.FusedSGD(1e-3, momentum=0.9, weight_decay=5e-4,
                                    lr_multipliers={"fc8*/kernel": 10, "fc8*/bias": 20, "*/bias": 2},
                                    no_weight_decay=["*/bias"])

The first pattern that matches a variable's path (`layer/kernel`) gives its multiplier; a
pattern that matches no variable is an error when the optimizer is built. The multiplier scales
the learning rate inside the update (so it means the same for SGD, Adam and AdamW), not the
gradient. FusedSGD, Adam and AdamW here are Keras' with LayerRates.

FusedSGD: keras.optimizers.SGD with the momentum update as one TF kernel per variable.

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

import fnmatch

import keras
import tensorflow as tf


def _handle(variable):
    if isinstance(variable, keras.Variable):  # a Keras variable wraps a tf.Variable
        variable = variable.value
    return variable.handle if isinstance(variable, tf.Variable) else None


class LayerRates:
    """Mixin for a Keras optimizer: lr_multipliers {path glob: factor} and no_weight_decay [path globs]."""

    def __init__(self, *args, lr_multipliers=None, no_weight_decay=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.no_weight_decay = [str(p) for p in (no_weight_decay or [])]
        for pattern, factor in self.lr_multipliers.items():
            if factor < 0:
                raise ValueError(f"lr_multipliers[{pattern!r}] must be >= 0, got {factor}")
        self._rate_factors, self._no_decay = [], set()

    def build(self, variables):
        paths = [_path(v) for v in variables]
        unmatched = [p for p in [*self.lr_multipliers, *self.no_weight_decay]
                     if not any(fnmatch.fnmatchcase(path, p) for path in paths)]
        if unmatched:
            raise ValueError(f"optimizer patterns {unmatched} match no trainable variable; the variables are "
                             f"named like {paths[:4] + paths[-2:] if len(paths) > 6 else paths}")
        self._rate_factors = [next((f for p, f in self.lr_multipliers.items() if fnmatch.fnmatchcase(path, p)), 1.0)
                              for path in paths]
        self._no_decay = {i for i, path in enumerate(paths)
                          if any(fnmatch.fnmatchcase(path, p) for p in self.no_weight_decay)}
        super().build(variables)

    def _rate(self, variable, learning_rate):
        """The learning rate of `variable`: the optimizer's times the variable's multiplier."""
        if not self.lr_multipliers:
            return learning_rate
        factor = self._rate_factors[self._get_variable_index(variable)]
        return learning_rate if factor == 1.0 else learning_rate * factor

    def _use_weight_decay(self, variable):
        # TF's update hands over the tf.Variable behind each Keras variable: found by its index, not path.
        if self._no_decay and self._trainable_variables_indices.get(self._var_key(variable)) in self._no_decay:
            return False
        return super()._use_weight_decay(variable)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": dict(self.lr_multipliers),
                "no_weight_decay": list(self.no_weight_decay)}


def _path(variable):
    return getattr(variable, "path", None) or variable.name


@keras.saving.register_keras_serializable(package="kseg")
class Adam(LayerRates, keras.optimizers.Adam):
    """keras.optimizers.Adam with LayerRates."""

    def update_step(self, gradient, variable, learning_rate):
        return super().update_step(gradient, variable, self._rate(variable, learning_rate))


@keras.saving.register_keras_serializable(package="kseg")
class AdamW(LayerRates, keras.optimizers.AdamW):
    """keras.optimizers.AdamW with LayerRates."""

    def update_step(self, gradient, variable, learning_rate):
        return super().update_step(gradient, variable, self._rate(variable, learning_rate))


@keras.saving.register_keras_serializable(package="kseg")
class RMSprop(LayerRates, keras.optimizers.RMSprop):
    """keras.optimizers.RMSprop with LayerRates (MobileNet's and EfficientNet's optimizer).

    Its epsilon is added inside the square root (w -= lr * g / sqrt(v + eps)), as TensorFlow's RMSProp
    that MobileNet V2 / V3 were trained with; PyTorch's torch.optim.RMSprop adds eps outside it, so
    torchvision's eps=0.0316 recipe is this eps=0.001 (0.0316^2).
    """

    def update_step(self, gradient, variable, learning_rate):
        return super().update_step(gradient, variable, self._rate(variable, learning_rate))


@keras.saving.register_keras_serializable(package="kseg")
class FusedSGD(LayerRates, keras.optimizers.SGD):
    """keras.optimizers.SGD (momentum, Nesterov, weight decay, clipping, schedules) with a fused update
    and LayerRates."""

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._rate(variable, learning_rate)
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
