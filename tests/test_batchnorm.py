"""kseg.batchnorm: Keras' BatchNormalization trained with TensorFlow's fused kernel gives Keras' numbers
(outputs, gradients, moving statistics), runs as one kernel each way, and leaves the layer Keras'."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.batchnorm import fuse_batch_norm, is_fused


def _pair(rng, **options):
    """Two identical BatchNormalization layers with non-trivial weights; the second fused."""
    layers = []
    for _ in range(2):
        bn = keras.layers.BatchNormalization(momentum=0.9, **options)
        bn.build((None, 5, 6, 4))
        layers.append(bn)
    for a, b in zip(*(bn.weights for bn in layers)):  # same order: gamma, beta, moving mean, moving variance
        positive = "variance" in a.path or "gamma" in a.path
        value = rng.uniform(0.5, 2.0, a.shape) if positive else rng.normal(size=a.shape)
        a.assign(value)
        b.assign(value)
    model = keras.Sequential([layers[1]])
    fuse_batch_norm(model)
    assert is_fused(layers[1]) and not is_fused(layers[0])
    return layers


def _step(bn, x, upstream, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training=training)
        loss = tf.reduce_sum(y * upstream)
    grads = tape.gradient(loss, [x, *bn.trainable_weights])
    return [y, *grads, *[tf.convert_to_tensor(w) for w in bn.non_trainable_weights]]


def _close(a, b):
    # Other summation orders (one kernel vs Keras' reductions): float32 rounding of sums over 60 values,
    # a few ulps of each tensor's scale; a wrong variance (biased vs unbiased: a factor 60/59) or a
    # missing momentum term is ~1e-2.
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("options", [{}, dict(center=False), dict(scale=False), dict(epsilon=1e-5)],
                         ids=["default", "no-center", "no-scale", "torch-epsilon"])
def test_fused_training_step_equals_keras(options):
    rng = np.random.default_rng(0)
    keras_bn, fused_bn = _pair(rng, **options)
    x = tf.constant(rng.normal(2.0, 3.0, (2, 5, 6, 4)), tf.float32)
    upstream = tf.constant(rng.normal(size=(2, 5, 6, 4)), tf.float32)
    for _ in range(2):  # the second step starts from the updated moving statistics
        expected, got = _step(keras_bn, x, upstream), _step(fused_bn, x, upstream)
        for a, b in zip(got, expected):
            _close(a, b)


def test_inference_and_frozen_layers_run_keras_ops():
    rng = np.random.default_rng(1)
    keras_bn, fused_bn = _pair(rng)
    x = tf.constant(rng.normal(size=(2, 5, 6, 4)), tf.float32)
    np.testing.assert_array_equal(fused_bn(x, training=False), keras_bn(x, training=False))
    fused_bn.trainable = keras_bn.trainable = False  # frozen BatchNorm (Faster R-CNN's C4 backbone)
    np.testing.assert_array_equal(fused_bn(x, training=True), keras_bn(x, training=True))


def test_training_graph_has_the_fused_kernels_only():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    model = fuse_batch_norm(keras.Model(inputs, outputs))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        return tape.gradient(loss, model.trainable_weights)

    ops = [op.type for op in step.get_concrete_function(tf.TensorSpec((2, 8, 8, 3))).graph.get_operations()]
    assert ops.count("FusedBatchNormV3") == 1 and ops.count("FusedBatchNormGradV3") == 1
    assert "SquaredDifference" not in ops  # Keras' moments


def test_fit_trains_as_keras_and_saves_a_plain_keras_layer(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(16, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 16)
    results = []
    for fused in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(6, 3), keras.layers.BatchNormalization(),
                                  keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
        if fused:
            fuse_batch_norm(model)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        results.append(model.get_weights())
    for a, b in zip(*results):  # 8 steps; BatchNorm's moving statistics included
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # plain Keras: no kseg object needed
    assert type(loaded.layers[1]) is keras.layers.BatchNormalization and not is_fused(loaded.layers[1])
    for a, b in zip(loaded.get_weights(), results[1]):
        np.testing.assert_array_equal(a, b)
