"""kseg's inference path does not retrace per call, and at most once per new input size.

Traces are counted two ways: tf.function's own tracing counter, and a layer whose Python
`call` runs only while a graph is traced (inside tf.function a layer's Python code runs at
trace time, never per call), so the count does not depend on TF internals.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kseg
from kseg.inference import Predictor, evaluate, predict, predictor


class TraceCounter(keras.layers.Layer):
    """Identity whose Python body counts how often it is traced."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.traces = 0

    def call(self, x):
        self.traces += 1
        return x


def counted(model):
    """`model` behind a TraceCounter; returns (wrapped model, counter) with the count at 0."""
    counter = TraceCounter(name="trace_counter")
    inputs = keras.Input(model.inputs[0].shape[1:])
    wrapped = keras.Model(inputs, model(counter(inputs)), name=f"counted_{model.name}")
    counter.traces = 0  # building the functional model ran call() symbolically
    return wrapped, counter


@pytest.fixture(scope="module")
def small_deeplab():
    # The real DeepLab-LargeFOV graph (dilated convs, Caffe pools, align-corners resize), narrow.
    keras.utils.set_random_seed(0)
    return kseg.build_model("deeplab_largefov", num_classes=3, width=0.125)


def images(n, h, w, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, 3)).astype("float32")


def test_same_size_calls_trace_once(small_deeplab):
    model, counter = counted(small_deeplab)
    run = Predictor(model)
    x = images(2, 33, 33)
    first = np.asarray(run(x))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(run(x)), first)
    assert run.tracing_count == 1
    assert counter.traces == 1


def test_new_sizes_and_batch_sizes_reuse_the_one_trace(small_deeplab):
    model, counter = counted(small_deeplab)
    run = Predictor(model)
    for n, h, w in ((1, 33, 33), (2, 33, 33), (1, 41, 25), (3, 17, 49), (1, 41, 25)):
        out = run(images(n, h, w))
        assert out.shape == (n, h, w, 3)
    # The target allows one trace per new size (4 here); the relaxed signature needs one in all.
    assert run.tracing_count == 1
    assert counter.traces == 1
    # And the relaxed graph computes what the model computes eagerly.
    x = images(1, 41, 25, seed=3)
    np.testing.assert_allclose(np.asarray(run(x)), np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-5)


def test_xla_predictor_traces_once(small_deeplab):
    run = Predictor(small_deeplab, jit_compile=True)
    for n, h in ((1, 17), (1, 17), (2, 17)):
        run(images(n, h, h))
    # XLA compiles per shape in its own cache; the TF graph is traced once.
    assert run.tracing_count == 1


def test_fixed_size_model_any_batch_one_trace():
    model = kseg.build_model("lenet5")
    run = Predictor(model)
    for n in (1, 4, 7, 1):
        assert run(np.zeros((n, 32, 32, 1), "float32")).shape == (n, 10)
    assert run.tracing_count == 1
    with pytest.raises(ValueError, match="does not fit the model.s input"):
        run(np.zeros((1, 28, 28, 1), "float32"))


def test_predictor_is_shared_per_model_and_predict_batches(small_deeplab):
    assert predictor(small_deeplab) is predictor(small_deeplab)
    assert predictor(small_deeplab, jit_compile=True) is not predictor(small_deeplab)
    model = kseg.build_model("hed")
    x = images(5, 20, 28)
    out = predict(model, x, batch_size=2)  # chunks of 2, 2 and 1: one graph
    assert len(out) == 6 and all(o.shape == (5, 20, 28, 1) for o in out)
    assert predictor(model).tracing_count == 1
    np.testing.assert_allclose(out[-1], np.asarray(model(x, training=False)[-1]), rtol=1e-5, atol=1e-5)


def test_predict_rejects_bad_input(small_deeplab):
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        predict(small_deeplab, np.zeros((33, 33, 3), "float32"))
    with pytest.raises(ValueError, match="batch_size"):
        predict(small_deeplab, images(1, 9, 9), batch_size=0)


def _dataset(sizes, per_size=3):
    xs, ys = [], []
    for h, w in sizes:
        for i in range(per_size):
            xs.append(images(1, h, w, seed=i)[0])
            ys.append(np.random.default_rng(i).integers(0, 3, (h, w, 1)).astype("int32"))

    def gen():
        yield from zip(xs, ys)

    sig = (tf.TensorSpec((None, None, 3), tf.float32), tf.TensorSpec((None, None, 1), tf.int32))
    return tf.data.Dataset.from_generator(gen, output_signature=sig).batch(1)


def test_evaluate_does_not_retrace_for_same_size_batches(small_deeplab):
    model, counter = counted(small_deeplab)
    scores = evaluate(model, _dataset([(33, 33)], per_size=4), num_classes=3, progress=False)
    assert scores["images"] == 4
    assert counter.traces == 1


def test_evaluate_traces_once_for_all_sizes(small_deeplab):
    model, counter = counted(small_deeplab)
    sizes = [(33, 33), (25, 41), (33, 33), (17, 17)]
    scores = evaluate(model, _dataset(sizes, per_size=2), num_classes=3, progress=False)
    assert scores["images"] == 8
    assert counter.traces == 1  # kseg.inference.Predictor: one trace for every size
