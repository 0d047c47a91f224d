"""kseg.layernorm: Keras' LayerNormalization trained with the closed-form gradient gives Keras' numbers
(outputs and the gradients of input, gamma and beta), leaves inference and the layer Keras', and is what
kseg's models train with."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kseg
from kseg.layernorm import fuse_layer_norm, is_fused


def _pair(rng, shape, **options):
    """Two identical LayerNormalization layers with non-trivial weights; the second fused."""
    layers = []
    for _ in range(2):
        ln = keras.layers.LayerNormalization(**options)
        ln.build(shape)
        layers.append(ln)
    for a, b in zip(*(ln.weights for ln in layers)):
        value = rng.normal(1.0 if "gamma" in a.path else 0.0, 0.5, a.shape)
        a.assign(value)
        b.assign(value)
    fuse_layer_norm(keras.Sequential([layers[1]]))
    assert is_fused(layers[1]) and not is_fused(layers[0])
    return layers


def _step(ln, x, upstream, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = ln(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return [y, *tape.gradient(loss, [x, *ln.trainable_weights])]


def _close(a, b, scale=1e-5):
    # Other summation orders of the same float32 arithmetic: a few ulps of each tensor's scale. A wrong
    # gradient term (a missing mean(g * xhat) projection, gamma left out) is of the tensor's own size.
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=scale * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("shape, options", [
    ((3, 7, 16), dict(epsilon=1e-6)),               # ViT's token sequences
    ((2, 4, 5, 16), {}),                            # MobileViT's (N, patch, tokens, C)
    ((3, 7, 16), dict(center=False)),
    ((3, 7, 16), dict(scale=False, epsilon=1e-5)),
], ids=["vit", "4d", "no-center", "no-scale"])
def test_fused_training_step_equals_keras(shape, options):
    rng = np.random.default_rng(0)
    keras_ln, fused_ln = _pair(rng, shape, **options)
    x = tf.constant(rng.normal(2.0, 3.0, shape), tf.float32)
    upstream = tf.constant(rng.normal(size=shape), tf.float32)
    expected, got = _step(keras_ln, x, upstream), _step(fused_ln, x, upstream)
    assert len(got) == len(expected) == 2 + options.get("center", True) + options.get("scale", True)
    for a, b in zip(got, expected):
        _close(a, b)


def test_inference_and_uncovered_layers_run_keras_ops():
    rng = np.random.default_rng(1)
    keras_ln, fused_ln = _pair(rng, (2, 5, 8))
    x = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    np.testing.assert_array_equal(fused_ln(x, training=False), keras_ln(x, training=False))
    np.testing.assert_array_equal(fused_ln(x), keras_ln(x))
    for options in (dict(axis=1), dict(rms_scaling=True)):  # not covered: Keras' computation, bit for bit
        keras_other, fused_other = _pair(rng, (2, 5, 8), **options)
        np.testing.assert_array_equal(fused_other(x, training=True), keras_other(x, training=True))


def test_training_graph_uses_the_closed_form_gradient():
    inputs = keras.Input((6, 8))
    outputs = keras.layers.LayerNormalization()(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, outputs)

    def gradient_ops():
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x, training=True) ** 2)
            return tape.gradient(loss, model.trainable_weights)

        graph = step.get_concrete_function(tf.TensorSpec((2, 6, 8))).graph
        return [op.type for op in graph.get_operations()]

    keras_ops = gradient_ops()
    fuse_layer_norm(model)
    fused_ops = gradient_ops()
    # Keras' autodiff differentiates its rsqrt of the variance; the closed form needs no such gradient.
    assert "RsqrtGrad" in keras_ops and "RsqrtGrad" not in fused_ops
    assert len(fused_ops) < len(keras_ops)


def test_mixed_bfloat16_keeps_the_layer_dtypes():
    rng = np.random.default_rng(3)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras_ln, fused_ln = _pair(rng, (2, 5, 8))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    upstream = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    expected, got = _step(keras_ln, x, upstream), _step(fused_ln, x, upstream)
    assert got[0].dtype == expected[0].dtype == tf.bfloat16
    assert [g.dtype for g in got[2:]] == [tf.float32, tf.float32]  # gamma / beta stay float32 variables
    for a, b in zip(got, expected):
        _close(tf.cast(a, tf.float32), tf.cast(b, tf.float32), scale=2e-2)  # bfloat16: 8 bits of mantissa


def test_built_models_train_with_it_and_save_plain_keras_layers(tmp_path):
    keras.utils.set_random_seed(0)
    model = kseg.build_model("deit_tiny", input_shape=(32, 32, 3), num_classes=5, pos_embed_size=32)
    norms = [la for la in model.layers if isinstance(la, keras.layers.LayerNormalization)]
    assert len(norms) == 25 and all(is_fused(la) for la in norms)
    x = tf.constant(np.random.default_rng(4).normal(size=(2, 32, 32, 3)), tf.float32)
    model.save(tmp_path / "m.keras")
    plain = keras.models.load_model(tmp_path / "m.keras")
    assert not any(is_fused(la) for la in plain.layers)
    grads = []
    for m in (model, plain):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(m(x, training=True) ** 2)
        grads.append(tape.gradient(loss, m.trainable_weights))
    for a, b in zip(*grads):
        _close(a, b, scale=1e-4)  # 12 blocks of float32 reassociation
