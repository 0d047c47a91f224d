"""kseg.train losses against NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.train import (
    BalancedSigmoidCrossEntropy,
    SparseCrossEntropy,
    SparseFocalLoss,
    hed_losses,
    resize_labels_nearest,
    stride8_model,
)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ref_ce(labels, logits, weights=None, gamma=None):
    lab = labels[..., 0].astype(int)
    valid = lab != 255
    safe = np.where(valid, lab, 0)
    logp = np.take_along_axis(_log_softmax(logits.astype(np.float64)), safe[..., None], -1)[..., 0]
    pix = -logp
    if gamma is not None:
        pix = (1 - np.exp(logp)) ** gamma * pix
    w = np.ones_like(pix) if weights is None else np.asarray(weights)[safe]
    w = w * valid
    return (w * pix).sum() / w.sum()


@pytest.fixture
def batch(rng):
    logits = rng.normal(0, 2, (2, 7, 9, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 7, 9, 1)).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < 0.2] = 255
    return labels, logits


def test_cross_entropy_ignores_255_like_numpy_and_keras(batch):
    labels, logits = batch
    got = float(SparseCrossEntropy()(labels, logits))
    np.testing.assert_allclose(got, _ref_ce(labels, logits), rtol=1e-5)
    keras_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)
    np.testing.assert_allclose(got, float(keras_ce(labels, logits)), rtol=1e-5)
    # Changing the logits of ignored pixels changes nothing.
    other = logits.copy()
    other[labels[..., 0] == 255] = 100.0
    np.testing.assert_allclose(float(SparseCrossEntropy()(labels, other)), got, rtol=1e-6)


def test_cross_entropy_class_weights_on_4d_targets(batch):
    labels, logits = batch
    weights = [0.5, 1.0, 2.0, 4.0]
    got = float(SparseCrossEntropy(class_weights=weights)(labels, logits))
    np.testing.assert_allclose(got, _ref_ce(labels, logits, weights), rtol=1e-5)
    assert abs(got - _ref_ce(labels, logits)) > 1e-3  # the weights matter
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        SparseCrossEntropy(class_weights=[1, 1, 1])(labels, logits)


def test_all_ignored_batch_gives_zero_not_nan(batch):
    labels, logits = batch
    assert float(SparseCrossEntropy()(np.full_like(labels, 255), logits)) == 0.0


def test_focal_loss_matches_numpy_and_reduces_to_ce(batch):
    labels, logits = batch
    np.testing.assert_allclose(float(SparseFocalLoss(gamma=2.0)(labels, logits)),
                               _ref_ce(labels, logits, gamma=2.0), rtol=1e-5)
    np.testing.assert_allclose(float(SparseFocalLoss(gamma=0.0)(labels, logits)),
                               float(SparseCrossEntropy()(labels, logits)), rtol=1e-5)
    w = [1.0, 0.25, 0.25, 3.0]
    np.testing.assert_allclose(float(SparseFocalLoss(gamma=1.0, class_weights=w)(labels, logits)),
                               _ref_ce(labels, logits, w, gamma=1.0), rtol=1e-5)


def _ref_hed(y, logits, threshold=0.5):
    total = 0.0
    for yi, xi in zip(y, logits.astype(np.float64)):
        pos = yi >= threshold
        beta = (~pos).sum() / pos.size
        sig = 1 / (1 + np.exp(-xi))
        total += -beta * np.log(sig[pos]).sum() - (1 - beta) * np.log(1 - sig[~pos]).sum()
    return total / len(y)


def test_hed_balanced_loss_matches_numpy(rng):
    y = (rng.uniform(size=(3, 8, 10, 1)) > 0.85).astype(np.float32)
    logits = rng.normal(0, 2, y.shape).astype(np.float32)
    got = float(BalancedSigmoidCrossEntropy()(y, logits))
    np.testing.assert_allclose(got, _ref_hed(y, logits), rtol=1e-5)
    # beta balances: with few edges, a missed edge pixel costs more than a false one.
    zeros = np.zeros_like(logits)
    one_edge = np.zeros_like(y)
    one_edge[:, 0, 0] = 1
    loss = BalancedSigmoidCrossEntropy()
    pushed_pos = zeros.copy()
    pushed_pos[:, 0, 0] = 5.0  # fixes the positive
    pushed_neg = zeros.copy()
    pushed_neg[:, 0, 1] = -5.0  # fixes one negative
    assert float(loss(one_edge, pushed_pos)) < float(loss(one_edge, pushed_neg))


def test_hed_losses_sum_over_side_outputs_and_fuse(rng):
    inputs = keras.Input((8, 8, 1))
    outs = [keras.layers.Conv2D(1, 1, name=f"o{i}")(inputs) for i in range(6)]
    model = keras.Model(inputs, outs)
    model.compile(loss=hed_losses())
    x = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    y = (rng.uniform(size=(2, 8, 8, 1)) > 0.8).astype(np.float32)
    total = model.evaluate(x, tuple([y] * 6), verbose=0, return_dict=True)["loss"]
    preds = model.predict(x, verbose=0)
    np.testing.assert_allclose(total, sum(_ref_hed(y, p) for p in preds), rtol=1e-4)


def test_labels_downsample_to_stride8_centres():
    labels = np.arange(321 * 321, dtype=np.int32).reshape(1, 321, 321, 1)
    small = resize_labels_nearest(labels, (41, 41)).numpy()
    assert small.shape == (1, 41, 41, 1)
    np.testing.assert_array_equal(small, labels[:, ::8, ::8])  # logit i sits on pixel 8i


def test_stride8_training_loss_uses_downsampled_labels(rng):
    logits = rng.normal(size=(1, 5, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (1, 33, 33, 1)).astype(np.int32)
    got = float(SparseCrossEntropy(resize_labels=True)(labels, logits))
    np.testing.assert_allclose(got, _ref_ce(labels[:, ::8, ::8], logits), rtol=1e-5)


def test_stride8_model_shares_weights():
    import kseg

    model = kseg.build_model("deeplab_largefov", num_classes=3, input_shape=(33, 33, 3), width=0.125)
    view = stride8_model(model)
    assert view.output.shape[1:] == (5, 5, 3)
    assert {id(w) for w in view.weights} == {id(w) for w in model.weights}
    with pytest.raises(ValueError, match="no layer 'fc8'"):
        stride8_model(kseg.build_model("segnet_basic", num_classes=3, input_shape=(32, 32, 3)))


def test_losses_serialize(tmp_path, batch):
    labels, logits = batch
    for loss in (SparseCrossEntropy(class_weights=[1, 2, 3, 4]), SparseFocalLoss(gamma=1.5),
                 BalancedSigmoidCrossEntropy(normalize=True)):
        again = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(again) is type(loss) and again.get_config() == loss.get_config()
    assert float(SparseCrossEntropy(class_weights=[1, 2, 3, 4])(labels, logits)) == pytest.approx(
        float(keras.losses.deserialize(keras.losses.serialize(SparseCrossEntropy(class_weights=[1, 2, 3, 4])))(
            labels, logits)))


def test_mixed_precision_logits_give_float32_loss(batch):
    labels, logits = batch
    loss = SparseCrossEntropy()(labels, tf.cast(logits, tf.float16))
    assert loss.dtype == tf.float32
