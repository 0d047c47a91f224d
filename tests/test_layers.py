"""Tests for kseg.layers against plain NumPy references."""

import inspect
import json
import os
import subprocess
import sys
import zipfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kseg.layers import (  # noqa: E402
    CropToReference,
    MaxPoolingWithArgmax2D,
    MaxUnpooling2D,
    ResizeToReference,
    Scale,
)

ALL_LAYERS = (
    MaxPoolingWithArgmax2D,
    MaxUnpooling2D,
    CropToReference,
    ResizeToReference,
    Scale,
)


def distinct_values(shape, seed):
    """Random values without ties, so every window has a unique max."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    return (rng.permutation(size).reshape(shape) / size - 0.5).astype(
        np.float32
    )


# --------------------------------------------------------------- references


def np_pool_with_argmax(x, pool, strides, padding):
    """Max pool returning per-image flat indices (y * W + x) * C + c."""
    batch, height, width, channels = x.shape
    if padding == "same":
        out_h = -(-height // strides[0])
        out_w = -(-width // strides[1])
        pad_top = max((out_h - 1) * strides[0] + pool[0] - height, 0) // 2
        pad_left = max((out_w - 1) * strides[1] + pool[1] - width, 0) // 2
    else:
        out_h = (height - pool[0]) // strides[0] + 1
        out_w = (width - pool[1]) // strides[1] + 1
        pad_top = pad_left = 0
    pooled = np.zeros((batch, out_h, out_w, channels), x.dtype)
    argmax = np.zeros((batch, out_h, out_w, channels), np.int64)
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(channels):
                    best, best_index = -np.inf, -1
                    y0 = i * strides[0] - pad_top
                    x0 = j * strides[1] - pad_left
                    for y in range(max(y0, 0), min(y0 + pool[0], height)):
                        for xx in range(max(x0, 0), min(x0 + pool[1], width)):
                            if x[b, y, xx, c] > best:
                                best = x[b, y, xx, c]
                                best_index = (y * width + xx) * channels + c
                    pooled[b, i, j, c] = best
                    argmax[b, i, j, c] = best_index
    return pooled, argmax


def np_unpool(x, argmax, height, width):
    batch, _, _, channels = x.shape
    out = np.zeros((batch, height * width * channels), x.dtype)
    for b in range(batch):
        np.add.at(out[b], argmax[b].ravel(), x[b].ravel())
    return out.reshape(batch, height, width, channels)


def np_bilinear(x, out_h, out_w, align_corners):
    def coords(in_size, out_size):
        dst = np.arange(out_size, dtype=np.float64)
        if align_corners:
            scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
            src = dst * scale
        else:
            src = (dst + 0.5) * in_size / out_size - 0.5
        src = np.clip(src, 0, in_size - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, src - low

    y0, y1, wy = coords(x.shape[1], out_h)
    x0, x1, wx = coords(x.shape[2], out_w)
    wy = wy[None, :, None, None]
    wx = wx[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
    bottom = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def np_nearest_half_pixel(x, out_h, out_w):
    # Float32 arithmetic as in TF's CPU kernel, so window edges agree.
    def coords(in_size, out_size):
        scale = np.float32(in_size) / np.float32(out_size)
        dst = np.arange(out_size, dtype=np.float32)
        src = np.floor((dst + np.float32(0.5)) * scale).astype(int)
        return np.minimum(src, in_size - 1)

    return x[:, coords(x.shape[1], out_h)][:, :, coords(x.shape[2], out_w)]


# -------------------------------------------------- MaxPoolingWithArgmax2D


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize(
    "pool,strides", [((2, 2), (2, 2)), ((3, 3), (2, 2)), ((2, 3), (2, 3))]
)
def test_argmax_pool_matches_numpy(padding, pool, strides):
    x = distinct_values((3, 7, 9, 4), seed=1)
    pooled, argmax = MaxPoolingWithArgmax2D(pool, strides, padding)(x)
    want_pooled, want_argmax = np_pool_with_argmax(x, pool, strides, padding)
    assert argmax.dtype == tf.int64
    np.testing.assert_array_equal(pooled.numpy(), want_pooled)
    np.testing.assert_array_equal(argmax.numpy(), want_argmax)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("pool,strides", [((2, 2), (2, 2)), ((3, 3), (2, 2))])
def test_argmax_pool_gradient_goes_to_maxima(padding, pool, strides):
    x = tf.constant(distinct_values((2, 5, 11, 3), seed=2))
    layer = MaxPoolingWithArgmax2D(pool, strides, padding)
    _, want_argmax = np_pool_with_argmax(x.numpy(), pool, strides, padding)
    upstream = np.random.default_rng(3).normal(size=want_argmax.shape)
    upstream = upstream.astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        pooled, _ = layer(x)
        loss = tf.reduce_sum(pooled * upstream)
    grad = tape.gradient(loss, x)
    assert grad is not None
    # Overlapping windows can share a max; its gradients add up.
    want = np_unpool(upstream, want_argmax, 5, 11)
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-6, atol=1e-6)


def test_argmax_pool_output_shapes_and_dtypes():
    inp = keras.Input((7, 9, 3))
    pooled, argmax = MaxPoolingWithArgmax2D(padding="same")(inp)
    assert tuple(pooled.shape) == (None, 4, 5, 3)
    assert pooled.dtype == "float32"
    assert argmax.dtype == "int64"
    pooled, argmax = MaxPoolingWithArgmax2D(padding="valid")(inp)
    assert tuple(pooled.shape) == (None, 3, 4, 3)
    assert tuple(argmax.shape) == (None, 3, 4, 3)
    pooled, _ = MaxPoolingWithArgmax2D()(keras.Input((None, 9, 3)))
    assert tuple(pooled.shape) == (None, None, 5, 3)


def test_argmax_pool_rejects_bad_padding():
    with pytest.raises(ValueError, match="padding"):
        MaxPoolingWithArgmax2D(padding="full")


# ----------------------------------------------------------- MaxUnpooling2D


# training=True scatters with UnsortedSegmentSum (training speed), inference with ScatterNd
# (what the exports convert): both must be the same unpooling.
@pytest.mark.parametrize("training", [False, True])
def test_unpool_matches_numpy_scatter(training):
    rng = np.random.default_rng(4)
    reference = np.zeros((3, 7, 9, 2), np.float32)
    x = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
    # Distinct positions per image, different in each image, in range.
    argmax = np.stack(
        [rng.choice(7 * 9 * 2, size=4 * 5 * 2, replace=False) for _ in range(3)]
    ).reshape(3, 4, 5, 2)
    out = MaxUnpooling2D()([x, tf.constant(argmax, tf.int64), reference], training=training)
    assert out.shape == (3, 7, 9, 2)
    np.testing.assert_array_equal(out.numpy(), np_unpool(x, argmax, 7, 9))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("shape", [(3, 7, 9, 4), (2, 5, 11, 3)])
def test_pool_unpool_round_trip_keeps_only_window_maxima(padding, shape, training):
    x = distinct_values(shape, seed=5)
    pooled, argmax = MaxPoolingWithArgmax2D(padding=padding)(x)
    out = MaxUnpooling2D()([pooled, argmax, x], training=training)
    # NumPy: keep the max of each window, zero elsewhere.
    _, want_argmax = np_pool_with_argmax(x, (2, 2), (2, 2), padding)
    keep = np.zeros(x.size, bool)
    image_size = x[0].size
    for b in range(x.shape[0]):
        keep[b * image_size + want_argmax[b].ravel()] = True
    want = np.where(keep.reshape(x.shape), x, 0)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("training", [False, True])
def test_unpool_gradient_gathers_from_argmax(training):
    source = distinct_values((2, 7, 9, 3), seed=6)
    _, argmax = np_pool_with_argmax(source, (2, 2), (2, 2), "same")
    x = tf.constant(distinct_values((2, 4, 5, 3), seed=7))
    upstream = np.random.default_rng(8).normal(size=source.shape)
    upstream = upstream.astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = MaxUnpooling2D()([x, tf.constant(argmax), source], training=training)
        loss = tf.reduce_sum(out * upstream)
    grad = tape.gradient(loss, x)
    flat = upstream.reshape(2, -1)
    want = np.stack([flat[b][argmax[b]] for b in range(2)])
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-6)


def test_unpool_sums_values_sharing_a_max_in_training_and_inference_alike():
    # 3x3/2 windows overlap: a pixel that is the max of several windows receives their sum.
    x = distinct_values((2, 9, 11, 3), seed=10)
    pooled, argmax = MaxPoolingWithArgmax2D(pool_size=3, strides=2, padding="same")(x)
    assert len(np.unique(argmax.numpy()[0])) < argmax.numpy()[0].size  # shared maxima occur
    values = tf.constant(distinct_values(pooled.shape, seed=11))
    outs = [MaxUnpooling2D()([values, argmax, x], training=t).numpy() for t in (False, True)]
    want = np_unpool(values.numpy(), argmax.numpy(), 9, 11)
    for out in outs:
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_unpool_in_functional_model_with_dynamic_sizes():
    inp = keras.Input((None, None, 3))
    pooled, argmax = MaxPoolingWithArgmax2D()(inp)
    out = MaxUnpooling2D()([Scale(2.0)(pooled), argmax, inp])
    assert tuple(out.shape) == (None, None, None, 3)
    model = keras.Model(inp, out)
    for shape in [(3, 7, 9, 3), (2, 5, 11, 3)]:
        x = distinct_values(shape, seed=9)
        pooled_np, argmax_np = np_pool_with_argmax(x, (2, 2), (2, 2), "same")
        want = np_unpool(2.0 * pooled_np, argmax_np, shape[1], shape[2])
        got = model.predict(x, verbose=0)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_unpool_output_shape_follows_reference_and_x_channels():
    x = keras.Input((4, 5, 6))
    argmax = keras.Input((4, 5, 6), dtype="int64")
    out = MaxUnpooling2D()([x, argmax, keras.Input((7, 9, 3))])
    assert tuple(out.shape) == (None, 7, 9, 6)
    out = MaxUnpooling2D()([x, argmax, keras.Input((None, 9, 3))])
    assert tuple(out.shape) == (None, None, 9, 6)


# ---------------------------------------------------------- CropToReference


@pytest.mark.parametrize("offset", [0, 5, 19, (9, 31), (31, 9)])
def test_crop_in_functional_model_with_dynamic_sizes(offset):
    oy, ox = (offset, offset) if isinstance(offset, int) else offset
    x_in = keras.Input((None, None, 3))
    ref_in = keras.Input((None, None, 2))
    out = CropToReference(offset)([x_in, ref_in])
    assert tuple(out.shape) == (None, None, None, 3)
    model = keras.Model([x_in, ref_in], out)
    rng = np.random.default_rng(10)
    for (h, w), (rh, rw) in [((45, 47), (7, 9)), ((52, 60), (5, 11))]:
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        ref = np.zeros((2, rh, rw, 2), np.float32)
        got = model.predict([x, ref], verbose=0)
        np.testing.assert_array_equal(got, x[:, oy : oy + rh, ox : ox + rw])


def test_crop_keeps_static_shape():
    out = CropToReference(3)([keras.Input((20, 21, 4)), keras.Input((7, 9, 1))])
    assert tuple(out.shape) == (None, 7, 9, 4)


def test_crop_too_small_raises_statically():
    with pytest.raises(ValueError, match="too small"):
        CropToReference((2, 0))(
            [keras.Input((8, 9, 3)), keras.Input((7, 9, 3))]
        )
    with pytest.raises(ValueError, match="too small"):
        CropToReference(1)([np.zeros((1, 8, 9, 3)), np.zeros((1, 7, 9, 3))])


def test_crop_too_small_raises_at_run_time_with_dynamic_shapes():
    layer = CropToReference((0, 3))
    spec = tf.TensorSpec((None, None, None, 3))
    crop = tf.function(lambda x, ref: layer([x, ref]), input_signature=[spec] * 2)
    np.testing.assert_array_equal(
        crop(tf.ones((1, 8, 12, 3)), tf.ones((1, 7, 9, 3))).shape, (1, 7, 9, 3)
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="too small"):
        crop(tf.ones((1, 8, 11, 3)), tf.ones((1, 7, 9, 3)))


# -------------------------------------------------------- ResizeToReference


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("sizes", [((4, 5), (7, 9)), ((11, 5), (5, 7))])
def test_resize_bilinear_matches_numpy_and_tf(align_corners, sizes):
    (h, w), (rh, rw) = sizes
    x = np.random.default_rng(11).normal(size=(2, h, w, 3)).astype(np.float32)
    ref = np.zeros((2, rh, rw, 1), np.float32)
    got = ResizeToReference("bilinear", align_corners)([x, ref]).numpy()
    want = np_bilinear(x.astype(np.float64), rh, rw, align_corners)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if align_corners:
        tf_want = tf.compat.v1.image.resize_bilinear(
            x, (rh, rw), align_corners=True
        )
    else:
        tf_want = tf.image.resize(x, (rh, rw), method="bilinear")
    np.testing.assert_allclose(got, tf_want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sizes", [((4, 5), (7, 9)), ((11, 5), (5, 7))])
def test_resize_nearest_matches_numpy_and_tf(sizes):
    (h, w), (rh, rw) = sizes
    x = np.random.default_rng(12).normal(size=(3, h, w, 2)).astype(np.float32)
    ref = np.zeros((3, rh, rw, 1), np.float32)
    got = ResizeToReference("nearest")([x, ref]).numpy()
    np.testing.assert_array_equal(got, np_nearest_half_pixel(x, rh, rw))
    np.testing.assert_array_equal(
        got, tf.image.resize(x, (rh, rw), method="nearest").numpy()
    )
    got = ResizeToReference("nearest", align_corners=True)([x, ref]).numpy()
    want = tf.compat.v1.image.resize_nearest_neighbor(
        x, (rh, rw), align_corners=True
    )
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_in_functional_model_with_dynamic_sizes(align_corners):
    x_in = keras.Input((None, None, 3))
    ref_in = keras.Input((None, None, 1))
    out = ResizeToReference(align_corners=align_corners)([x_in, ref_in])
    assert tuple(out.shape) == (None, None, None, 3)
    model = keras.Model([x_in, ref_in], out)
    rng = np.random.default_rng(13)
    for (h, w), (rh, rw) in [((4, 5), (7, 9)), ((3, 6), (5, 11))]:
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        ref = np.zeros((2, rh, rw, 1), np.float32)
        got = model.predict([x, ref], verbose=0)
        want = np_bilinear(x.astype(np.float64), rh, rw, align_corners)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resize_keeps_float16_and_static_shape():
    x = np.random.default_rng(14).normal(size=(2, 4, 5, 3))
    ref = np.zeros((2, 7, 9, 1), np.float16)
    for align_corners in (False, True):
        layer = ResizeToReference(align_corners=align_corners, dtype="float16")
        got = layer([x.astype(np.float16), ref])
        assert got.dtype == tf.float16
        want = np_bilinear(x, 7, 9, align_corners)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-2, atol=1e-2)
    out = ResizeToReference()([keras.Input((4, 5, 3)), keras.Input((7, 9, 1))])
    assert tuple(out.shape) == (None, 7, 9, 3)


def test_resize_rejects_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        ResizeToReference("bicubic")


# -------------------------------------------------------------------- Scale


@pytest.mark.parametrize("scale", [0.01, 0.0001, -3.0])
def test_scale_multiplies(scale):
    x = np.random.default_rng(15).normal(size=(2, 5, 11, 3)).astype(np.float32)
    layer = Scale(scale)
    np.testing.assert_allclose(layer(x).numpy(), x * scale, rtol=1e-6)
    assert not layer.weights
    half = Scale(scale, dtype="float16")(x.astype(np.float16))
    assert half.dtype == tf.float16
    np.testing.assert_allclose(
        half.numpy(), x.astype(np.float16) * np.float16(scale), rtol=1e-3
    )


# ---------------------------------------------------- config and saving


CONFIG_CASES = [
    (
        MaxPoolingWithArgmax2D,
        dict(pool_size=(3, 2), strides=(2, 1), padding="valid"),
    ),
    (MaxUnpooling2D, dict()),
    (CropToReference, dict(offset=(19, 5))),
    (ResizeToReference, dict(interpolation="nearest", align_corners=True)),
    (Scale, dict(scale=0.0001)),
]


@pytest.mark.parametrize(
    "cls,kwargs", CONFIG_CASES, ids=[c.__name__ for c, _ in CONFIG_CASES]
)
def test_config_round_trip_keeps_every_argument(cls, kwargs):
    layer = cls(name="custom_name", **kwargs)
    config = layer.get_config()
    init_args = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind is not p.VAR_KEYWORD
    ]
    assert set(init_args) <= set(config)
    # Through JSON, as in a saved file, where tuples become lists.
    clone = cls.from_config(json.loads(json.dumps(config)))
    assert clone.name == "custom_name"
    assert clone.get_config() == config
    for key, value in kwargs.items():
        assert getattr(clone, key) == value


def test_crop_offset_int_is_normalised_to_pair():
    assert CropToReference(9).get_config()["offset"] == (9, 9)


def build_all_layers_model():
    inp = keras.Input((None, None, 3))
    feat = keras.layers.Conv2D(4, 3, padding="same")(inp)
    pooled, argmax = MaxPoolingWithArgmax2D(padding="same")(feat)
    scaled = Scale(0.01)(pooled)
    unpooled = MaxUnpooling2D()([scaled, argmax, feat])
    resized = ResizeToReference(align_corners=True)([pooled, feat])
    # keras.layers.Add, not `+`: in .h5 files Keras saves the `+` op under
    # the class name "Add" and reloads it as the Add layer, which fails.
    merged = keras.layers.Add()([unpooled, resized])
    padded = keras.layers.ZeroPadding2D(((19, 2), (5, 1)))(merged)
    cropped = CropToReference((19, 5))([padded, inp])
    return keras.Model(inp, [cropped, argmax])


def test_model_with_all_layers_saves_and_reloads(tmp_path):
    model = build_all_layers_model()
    x = distinct_values((2, 7, 9, 3), seed=16)
    want = model.predict(x, verbose=0)
    registered = {f"kseg>{cls.__name__}" for cls in ALL_LAYERS}
    for cls in ALL_LAYERS:
        assert (
            keras.saving.get_registered_object(f"kseg>{cls.__name__}") is cls
        )

    keras_path = tmp_path / "model.keras"
    model.save(keras_path)
    with zipfile.ZipFile(keras_path) as archive:
        saved = archive.read("config.json").decode()
    assert all(f'"{name}"' in saved for name in registered)

    h5_path = tmp_path / "model.h5"
    keras.saving.save_model(model, h5_path)
    with h5py.File(h5_path, "r") as f:
        saved = f.attrs["model_config"]
        saved = saved.decode() if isinstance(saved, bytes) else saved
    assert all(f'"{name}"' in saved for name in registered)

    for path in (keras_path, h5_path):
        reloaded = keras.saving.load_model(path)
        kinds = {type(layer) for layer in reloaded.layers}
        assert set(ALL_LAYERS) <= kinds
        got = reloaded.predict(x, verbose=0)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        # And at another size, so the dynamic shapes survived the reload.
        other = distinct_values((3, 5, 11, 3), seed=17)
        for g, w in zip(
            reloaded.predict(other, verbose=0), model.predict(other, verbose=0)
        ):
            np.testing.assert_array_equal(g, w)


# === DilatedConv2D ===

@pytest.fixture(params=["native", "fallback"])
def dilated_path(request, monkeypatch):
    """Each DilatedConv2D path: the native op where this process differentiates it, and the
    fallback oneDNN-less CPUs take (SpaceToBatchND below rate 8, the im2col GEMM from 8 on)."""
    from kseg import layers as kseg_layers

    if request.param == "native" and not kseg_layers.native_dilated_gradient():
        pytest.skip("this process's CPU kernels cannot differentiate a native dilated Conv2D (oneDNN off)")
    monkeypatch.setattr(kseg_layers, "_NATIVE_GRADIENT", [request.param == "native"])
    return request.param


@pytest.mark.parametrize("kernel,rate,size",
                         [(3, 12, (41, 37)), (4, 8, (9, 10)), (3, 2, (5, 6)), ((3, 1), (6, 4), (13, 7))])
def test_dilated_conv_equals_keras_dilated_conv_forward_and_backward(kernel, rate, size, dilated_path):
    from kseg.layers import DilatedConv2D

    x = tf.constant(distinct_values((2, *size, 5), seed=3))
    ref = keras.layers.Conv2D(6, kernel, dilation_rate=rate, padding="same")
    ours = DilatedConv2D(6, kernel, dilation_rate=rate, padding="same")
    ref.build(x.shape), ours.build(x.shape)
    ours.set_weights(ref.get_weights())  # the same kernel shape [kh, kw, in, out]
    outs, grads = [], []
    for layer in (ref, ours):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.cos(y))
        outs.append(y.numpy())
        grads.append([g.numpy() for g in tape.gradient(loss, [x, *layer.trainable_weights])])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-4)
    for g_ours, g_ref in zip(grads[1], grads[0]):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-3 * max(1.0, np.abs(g_ref).max()))


def test_dilated_conv_works_with_dynamic_sizes_and_reloads(tmp_path):
    from kseg.layers import DilatedConv2D

    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, DilatedConv2D(4, 3, dilation_rate=12, padding="same", name="fc6")(inp))
    x = distinct_values((1, 17, 23, 3), seed=5)
    want = model.predict(x, verbose=0)
    assert want.shape == (1, 17, 23, 4)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.get_layer("fc6")) is DilatedConv2D
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), want)


def test_dilated_conv_trains_where_onednn_is_off(tmp_path):
    # TensorFlow's own CPU kernels (TF_ENABLE_ONEDNN_OPTS=0) refuse the native op's gradient;
    # the layer must notice and train through its fallback, in a real process configured so.
    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np, keras, tensorflow as tf\n"
        "from kseg.layers import DilatedConv2D, native_dilated_gradient\n"
        "layer = DilatedConv2D(2, 3, dilation_rate=2, padding='same')\n"
        "x = tf.constant(np.linspace(-1, 1, 2 * 9 * 9 * 3, dtype='float32').reshape(2, 9, 9, 3))\n"
        "with tf.GradientTape() as tape:\n"
        "    tape.watch(x)\n"
        "    loss = tf.reduce_sum(tf.square(layer(x)))\n"
        "g = tf.concat([tf.reshape(t, [-1]) for t in tape.gradient(loss, [x, layer.kernel])], 0)\n"
        "finite, nonzero = bool(tf.reduce_all(tf.math.is_finite(g))), float(tf.reduce_sum(tf.abs(g))) > 0\n"
        "print(native_dilated_gradient(), finite, nonzero)\n"
    )
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "True"]


def test_dilated_conv_refuses_what_it_does_not_compute():
    from kseg.layers import DilatedConv2D

    with pytest.raises(ValueError, match="stride-1, padding='same'"):
        DilatedConv2D(4, 3, dilation_rate=2, padding="valid")
    with pytest.raises(ValueError, match="stride-1"):
        DilatedConv2D(4, 3, strides=2, padding="same")
