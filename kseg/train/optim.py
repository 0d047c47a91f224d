"""kseg's optimizers: per-layer learning rates (Caffe's lr_mult) and fused updates.

LayerRates gives an optimizer learning-rate multipliers and weight-decay exclusions chosen by
variable path globs, as Caffe's `param { lr_mult decay_mult }` did per layer (DeepLab trains
its classifier at 10x the base rate, its biases at 2x):

    opt = kseg.train.optim.FusedSGD(1e-3, momentum=0.9, weight_decay=5e-4,
                                    lr_multipliers={"fc8*/kernel": 10, "fc8*/bias": 20, "*/bias": 2},
                                    no_weight_decay=["*/bias"])

The first pattern that matches a variable's path (`layer/kernel`) gives its multiplier; a
pattern that matches no variable is an error when the optimizer is built. The multiplier scales
the learning rate inside the update (so it means the same for SGD, Adam and AdamW), not the
gradient. FusedSGD, Adam, AdamW and RMSprop here are Keras' with LayerRates and fused updates.

Fused updates: each optimizer's update as TensorFlow's one kernel per variable.

Keras' SGD writes the momentum update as separate element-wise ops (m * momentum, g * lr,
subtract, assign, assign_add): five passes over every weight and slot. TensorFlow's own
`ResourceApplyKerasMomentum` kernel does the same arithmetic (m = momentum * m - lr * g;
w += m, or the Nesterov form) in one pass. On VGG-sized models (134M weights) the update
is a large share of a CPU training step; see docs/performance.md for the measured step.

    opt = kseg.train.FusedSGD(learning_rate=1e-3, momentum=0.9)     # same arguments as SGD
    model.compile(optimizer=opt, ...)

Adam and AdamW run `ResourceApplyAdam` (Keras writes nine element-wise ops), RMSprop with
momentum `ResourceApply(Centered)RMSProp`. Anything a kernel does not cover (SGD or RMSprop
without momentum, AMSGrad, sparse gradients, non-TF variables) falls back to Keras' own update,
so results always equal Keras' optimizer's.
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


def _handles(*variables):
    """The resource handles of `variables` (Keras or TF), or None where one has none (a fused kernel
    needs them all)."""
    handles = [_handle(v) for v in variables]
    return None if any(h is None for h in handles) else handles


def _fusable(gradient):
    # TF's Apply* kernels take dense gradients; sparse ones (embedding lookups) go through Keras' ops.
    return not isinstance(gradient, tf.IndexedSlices)


class _FusedAdam:
    """Adam's update as TensorFlow's ResourceApplyAdam: one pass over weight, m and v per variable.

    Keras' Adam writes it as nine element-wise ops; the kernel does the same arithmetic
    (m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps))
    in one. AMSGrad and sparse gradients go through Keras' own update. AdamW's decoupled weight decay
    stays Keras' (applied before the update, `w -= w * wd * lr`).
    """

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._rate(variable, learning_rate)
        index = self._get_variable_index(variable)
        handles = _handles(variable, self._momentums[index], self._velocities[index])
        if self.amsgrad or handles is None or not _fusable(gradient):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=handles[0], m=handles[1], v=handles[2], beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False)


@keras.saving.register_keras_serializable(package="kseg")
class Adam(LayerRates, _FusedAdam, keras.optimizers.Adam):
    """keras.optimizers.Adam with LayerRates and a fused update (one TF kernel per variable)."""


@keras.saving.register_keras_serializable(package="kseg")
class AdamW(LayerRates, _FusedAdam, keras.optimizers.AdamW):
    """keras.optimizers.AdamW with LayerRates and a fused update (one TF kernel per variable)."""


@keras.saving.register_keras_serializable(package="kseg")
class RMSprop(LayerRates, keras.optimizers.RMSprop):
    """keras.optimizers.RMSprop with LayerRates (MobileNet's and EfficientNet's optimizer) and, with
    momentum, a fused update: TensorFlow's ResourceApply(Centered)RMSProp, one pass per variable over
    Keras' eight to twelve element-wise ops (same arithmetic; without momentum Keras keeps no slot the
    kernel needs, so Keras' ops run).

    Its epsilon is added inside the square root (w -= lr * g / sqrt(v + eps)), as TensorFlow's RMSProp
    that MobileNet V2 / V3 were trained with; PyTorch's torch.optim.RMSprop adds eps outside it, so
    torchvision's eps=0.0316 recipe is this eps=0.001 (0.0316^2).
    """

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._rate(variable, learning_rate)
        if self.momentum == 0:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        handles = _handles(variable, self._velocities[index], self._momentums[index],
                           *([self._average_gradients[index]] if self.centered else []))
        if handles is None or not _fusable(gradient):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        args = dict(var=handles[0], ms=handles[1], mom=handles[2], lr=tf.cast(learning_rate, dtype),
                    rho=tf.cast(self.rho, dtype), momentum=tf.cast(self.momentum, dtype),
                    epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False)
        if self.centered:
            tf.raw_ops.ResourceApplyCenteredRMSProp(mg=handles[3], **args)
        else:
            tf.raw_ops.ResourceApplyRMSProp(**args)


@keras.saving.register_keras_serializable(package="kseg")
class FusedSGD(LayerRates, keras.optimizers.SGD):
    """keras.optimizers.SGD (momentum, Nesterov, weight decay, clipping, schedules) with a fused update
    and LayerRates."""

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._rate(variable, learning_rate)
        if self.momentum == 0:  # no momentum slot: Keras' one op
            return super().update_step(gradient, variable, learning_rate)
        handles = _handles(variable, self.momentums[self._get_variable_index(variable)])
        if handles is None or not _fusable(gradient):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=handles[0], accum=handles[1], lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.cast(self.momentum, dtype), use_locking=False, use_nesterov=self.nesterov)
