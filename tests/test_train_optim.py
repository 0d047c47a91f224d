"""kseg's fused optimizers give Keras' optimizers' weights, step for step, in one kernel per variable,
and survive a save/load."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.train import FusedSGD
from kseg.train.optim import Adam, AdamW, RMSprop


def _model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Flatten(), keras.layers.Dense(3)])


@pytest.mark.parametrize("kwargs", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                    dict(momentum=0.5, weight_decay=1e-2), dict(momentum=0.0)])
def test_fused_sgd_matches_keras_sgd(kwargs):
    _assert_same_training(keras.optimizers.SGD, FusedSGD, 0.1, kwargs)


# Each fused kernel with what changes its arithmetic: decoupled weight decay, centred RMSprop; AMSGrad
# and RMSprop without momentum take Keras' own path (the fallback).
FUSED = [(keras.optimizers.Adam, Adam, {}), (keras.optimizers.Adam, Adam, dict(amsgrad=True)),
         (keras.optimizers.AdamW, AdamW, dict(weight_decay=0.05, beta_2=0.99)),
         (keras.optimizers.RMSprop, RMSprop, dict(momentum=0.9, rho=0.9, epsilon=1e-3)),
         (keras.optimizers.RMSprop, RMSprop, dict(momentum=0.9, centered=True)),
         (keras.optimizers.RMSprop, RMSprop, dict(momentum=0.0))]


@pytest.mark.parametrize("keras_cls,kseg_cls,kwargs", FUSED, ids=lambda v: str(getattr(v, "__name__", v)))
def test_fused_adaptive_optimizers_match_keras(keras_cls, kseg_cls, kwargs):
    _assert_same_training(keras_cls, kseg_cls, 0.01, kwargs)


def _assert_same_training(keras_cls, kseg_cls, lr, kwargs):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6, 6, 3)).astype("float32"), rng.integers(0, 3, 16)
    schedule = lambda: keras.optimizers.schedules.PolynomialDecay(lr, 20, 0.0, power=0.9)  # noqa: E731
    weights = []
    for opt in (keras_cls(schedule(), **kwargs), kseg_cls(schedule(), **kwargs)):
        model = _model(0)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    assert any(np.abs(a - b).max() > 0 for a, b in zip(weights[1], _model(0).get_weights()))  # it trained
    for a, b in zip(*weights):
        # A fused kernel vs Keras' ops: other rounding per update, fed back through 12 steps (0 to
        # 2.4e-7 max-abs here, depending on oneDNN's ISA). 1e-5 of the tensor's scale (~84 eps);
        # a missing weight decay or momentum term moves weights by ~1e-2.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("opt,kernel", [
    (lambda: FusedSGD(0.1, momentum=0.9), "ResourceApplyKerasMomentum"),
    (lambda: Adam(0.1), "ResourceApplyAdam"), (lambda: AdamW(0.1, weight_decay=0.05), "ResourceApplyAdam"),
    (lambda: RMSprop(0.1, momentum=0.9), "ResourceApplyRMSProp"),
    (lambda: RMSprop(0.1, momentum=0.9, centered=True), "ResourceApplyCenteredRMSProp")],
    ids=["sgd", "adam", "adamw", "rmsprop", "rmsprop-centered"])
def test_fused_update_is_one_kernel_per_variable(opt, kernel):
    model = _model(0)
    opt = opt()
    opt.build(model.trainable_variables)

    @tf.function
    def step(grads):
        opt.apply(grads, model.trainable_variables)

    graph = step.get_concrete_function([tf.TensorSpec(v.shape) for v in model.trainable_variables]).graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count(kernel) == len(model.trainable_variables)


def test_a_model_compiled_with_fused_sgd_saves_and_loads(tmp_path):
    model = _model(0)
    model.compile(FusedSGD(0.1, momentum=0.9), "mse")
    model.fit(np.zeros((4, 6, 6, 3), "float32"), np.zeros((4, 3), "float32"), verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, FusedSGD) and loaded.optimizer.momentum == 0.9
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
