"""Layers that classic segmentation CNNs need and Keras 3 lacks.

kseg runs on the TensorFlow backend only, so these layers call TF ops
directly. Every layer is registered under the ``kseg`` package, so models
that use them reload from ``.keras`` and ``.h5`` files without
``custom_objects``.
"""

import numbers

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
    "CropToReference",
    "ResizeToReference",
    "Scale",
    "ConnectionTableConv2D",
    "RBFOutput",
    "BilinearUpsampling",
    "DilatedConv2D",
    "L2Normalization",
]


def _pair(value, name):
    """Normalises an int or a pair of ints to a tuple of two ints."""
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(
            f"`{name}` must be an int or a pair of ints, got {value!r}."
        ) from None
    if len(pair) != 2:
        raise ValueError(
            f"`{name}` must be an int or a pair of ints, got {value!r}."
        )
    return pair


def _dims(tensor, out_type=tf.int32):
    """Per-axis sizes: Python ints where static, scalar tensors elsewhere.

    Mixing the two keeps the static shape inference of ops such as
    ``tf.reshape`` as precise as possible under tf.function.
    """
    static = tensor.shape.as_list()
    dynamic = tf.shape(tensor, out_type=out_type)
    return [d if d is not None else dynamic[i] for i, d in enumerate(static)]


def _check_inputs(inputs, count, layer):
    if not isinstance(inputs, (list, tuple)) or len(inputs) != count:
        raise ValueError(
            f"{layer} expects a list of {count} tensors, got {inputs!r}."
        )


def _pool_out_dim(size, pool, stride, padding):
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    return max((size - pool) // stride + 1, 0)


@keras.saving.register_keras_serializable(package="kseg")
class MaxPoolingWithArgmax2D(keras.layers.Layer):
    """Max pooling that also returns where each max was, for SegNet's unpooling.

    Called on a tensor of shape ``(batch, H, W, C)``; returns
    ``[pooled, argmax]``. ``argmax`` is int64 and indexes the flattened
    *single image* (the batch is not included): position ``(y, x, c)``
    of the input has index ``(y * W + x) * C + c``.
    """

    def __init__(
        self, pool_size=(2, 2), strides=(2, 2), padding="same", **kwargs
    ):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = _pair(strides, "strides")
        padding = str(padding).lower()
        if padding not in ("same", "valid"):
            raise ValueError(
                f"`padding` must be 'same' or 'valid', got {padding!r}."
            )
        self.padding = padding

    def call(self, inputs):
        # Per-image indices are what MaxUnpooling2D expects; batch-wide
        # indices would overflow into neighbouring images on scatter.
        pooled, argmax = tf.nn.max_pool_with_argmax(
            inputs,
            ksize=(1, *self.pool_size, 1),
            strides=(1, *self.strides, 1),
            padding=self.padding.upper(),
            output_dtype=tf.int64,
            include_batch_in_index=False,
        )
        return [pooled, argmax]

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        shape = (
            batch,
            _pool_out_dim(
                height, self.pool_size[0], self.strides[0], self.padding
            ),
            _pool_out_dim(
                width, self.pool_size[1], self.strides[1], self.padding
            ),
            channels,
        )
        return [shape, shape]

    def compute_output_spec(self, inputs):
        # The default spec gives every output the layer's float dtype, which
        # would mislabel the int64 indices in functional models.
        pooled_shape, argmax_shape = self.compute_output_shape(inputs.shape)
        return [
            keras.KerasTensor(pooled_shape, dtype=self.compute_dtype),
            keras.KerasTensor(argmax_shape, dtype="int64"),
        ]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pool_size": self.pool_size,
                "strides": self.strides,
                "padding": self.padding,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="kseg")
class MaxUnpooling2D(keras.layers.Layer):
    """SegNet's unpooling: puts values back where their maxima were, zeros elsewhere.

    Called on ``[x, argmax, reference]``: ``argmax`` comes from
    ``MaxPoolingWithArgmax2D`` (per-image indices ``(y * W + x) * C + c``)
    and ``reference`` is the tensor that was pooled, which fixes the output
    height and width (odd sizes pooled with ``"same"`` padding can't be
    recovered from the pooled size alone). The output has the channels
    of ``x``. Where overlapping windows share a max, their values add up,
    as in the max-pool gradient.
    """

    def call(self, inputs, training=None):
        _check_inputs(inputs, 3, "MaxUnpooling2D")
        x, argmax, reference = inputs
        argmax = tf.cast(argmax, tf.int64)
        # int64 throughout: batch * H * W * C overflows int32 for large
        # feature maps.
        batch, _, _, channels = _dims(x, tf.int64)
        _, height, width, _ = _dims(reference, tf.int64)
        image_size = tf.cast(height * width * channels, tf.int64)
        # The indices are per image, so each image gets its own block of
        # the flat output.
        batch_offset = tf.range(batch, dtype=tf.int64) * image_size
        indices = argmax + tf.reshape(batch_offset, (-1, 1, 1, 1))
        # A scatter touches only the pooled values, O(pooled size), unlike
        # one-hot or equality masks that cost O(output size * window).
        if training:
            # UnsortedSegmentSum, a kernel for this 1-D scatter-add, trains 1.7x
            # faster than ScatterNd at SegNet's shapes; inference graphs (what
            # the exports convert) keep ScatterNd. Same sums either way.
            flat = tf.math.unsorted_segment_sum(
                tf.reshape(x, (-1,)), tf.reshape(indices, (-1,)), batch * image_size
            )
        else:
            flat = tf.scatter_nd(
                tf.reshape(indices, (-1, 1)),
                tf.reshape(x, (-1,)),
                tf.reshape(batch * image_size, (1,)),
            )
        return tf.reshape(flat, (batch, height, width, channels))

    def compute_output_shape(self, input_shape):
        _check_inputs(input_shape, 3, "MaxUnpooling2D")
        x_shape, _, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package="kseg")
class CropToReference(keras.layers.Layer):
    """Caffe's Crop layer (axis=2), which FCN uses to align upsampled score maps.

    Called on ``[x, reference]``; returns
    ``x[:, oy:oy + H_ref, ox:ox + W_ref, :]``, where ``offset`` is an int
    (same for both axes, as in Caffe) or a pair ``(oy, ox)``.
    """

    def __init__(self, offset=(0, 0), **kwargs):
        super().__init__(**kwargs)
        self.offset = _pair(offset, "offset")
        if min(self.offset) < 0:
            raise ValueError(
                f"`offset` must be non-negative, got {self.offset}."
            )

    def _static_check(self, x_shape, reference_shape):
        for axis, name in ((1, "height"), (2, "width")):
            x_size, ref_size = x_shape[axis], reference_shape[axis]
            offset = self.offset[axis - 1]
            if x_size is not None and ref_size is not None:
                if x_size < offset + ref_size:
                    raise ValueError(
                        f"CropToReference: input {name} {x_size} is too "
                        f"small to crop {ref_size} at offset {offset}."
                    )

    def call(self, inputs):
        _check_inputs(inputs, 2, "CropToReference")
        x, reference = inputs
        self._static_check(x.shape, reference.shape)
        x_dims = _dims(x)
        ref_dims = _dims(reference)
        oy, ox = self.offset
        height, width = ref_dims[1], ref_dims[2]
        checks = []
        for axis, name, offset in ((1, "height", oy), (2, "width", ox)):
            if x.shape[axis] is None or reference.shape[axis] is None:
                # Without this, a too-small input silently yields a
                # smaller crop, and the error surfaces far away.
                checks.append(
                    tf.debugging.assert_greater_equal(
                        x_dims[axis],
                        ref_dims[axis] + offset,
                        message=(
                            f"CropToReference: input {name} is too small "
                            f"to crop the reference {name} at offset "
                            f"{offset}."
                        ),
                    )
                )
        # Asserts return None when eager; tf.function would run them
        # anyway, the dependency makes the order explicit.
        checks = [c for c in checks if c is not None]
        with tf.control_dependencies(checks):
            return tf.identity(x[:, oy : oy + height, ox : ox + width, :])

    def compute_output_shape(self, input_shape):
        _check_inputs(input_shape, 2, "CropToReference")
        x_shape, reference_shape = input_shape
        self._static_check(x_shape, reference_shape)
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update({"offset": self.offset})
        return config


@keras.saving.register_keras_serializable(package="kseg")
class ResizeToReference(keras.layers.Layer):
    """Resizes x to the reference's size; Keras 3.14-3.15.1 fails on traced sizes.

    ``keras.ops.image.resize`` calls ``len()`` / ``bool()`` on the size, so
    a size taken from ``tf.shape`` fails inside tf.function and functional
    models with dynamic spatial dims; this layer calls TF directly. Called
    on ``[x, reference]``. ``align_corners=True`` gives the semantics of
    DeepLab's Caffe Interp layer; ``False`` gives half-pixel centres as in
    torchvision and ``tf.image.resize``. The output keeps x's dtype.
    """

    def __init__(self, interpolation="bilinear", align_corners=False, **kwargs):
        super().__init__(**kwargs)
        interpolation = str(interpolation).lower()
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(
                "`interpolation` must be 'bilinear' or 'nearest', "
                f"got {interpolation!r}."
            )
        self.interpolation = interpolation
        self.align_corners = bool(align_corners)

    def call(self, inputs):
        _check_inputs(inputs, 2, "ResizeToReference")
        x, reference = inputs
        ref_dims = _dims(reference)
        size = tf.stack([ref_dims[1], ref_dims[2]])
        if self.align_corners:
            # tf.image.resize (v2) has no align_corners option. These are the
            # ops behind tf.compat.v1.image.resize_*, called directly to skip
            # its deprecation warning.
            if self.interpolation == "bilinear":
                resized = tf.raw_ops.ResizeBilinear(
                    images=x, size=size, align_corners=True
                )
            else:
                resized = tf.raw_ops.ResizeNearestNeighbor(
                    images=x, size=size, align_corners=True
                )
        else:
            resized = tf.image.resize(x, size, method=self.interpolation)
        # Bilinear resizing always returns float32.
        resized = tf.cast(resized, x.dtype)
        resized.set_shape(
            (x.shape[0], reference.shape[1], reference.shape[2], x.shape[3])
        )
        return resized

    def compute_output_shape(self, input_shape):
        _check_inputs(input_shape, 2, "ResizeToReference")
        x_shape, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "interpolation": self.interpolation,
                "align_corners": self.align_corners,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="kseg")
class Scale(keras.layers.Layer):
    """Fixed, weightless scaling, as FCN-8s at-once applies to pool4 and pool3.

    ``scale`` is a Python float (0.01 for pool4, 0.0001 for pool3 in FCN).
    """

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        return inputs * tf.cast(self.scale, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


@keras.saving.register_keras_serializable(package="kseg")
class ConnectionTableConv2D(keras.layers.Layer):
    """A valid convolution where output map j sees only the input maps table[j] (LeNet-5's C3).

    Keras has no sparse channel connectivity; only the connected kernels are weights,
    so the parameter count is the paper's.
    """

    def __init__(self, kernel_size, table, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)
        self.table = tuple(tuple(int(i) for i in row) for row in table)
        self.activation = keras.activations.get(activation)
        self._pairs = np.array([(i, j) for j, row in enumerate(self.table) for i in row], dtype=np.int32)

    def build(self, input_shape):
        k, n = self.kernel_size, len(self._pairs)
        self.in_channels = int(input_shape[-1])
        if self._pairs[:, 0].max() >= self.in_channels:
            raise ValueError(f"{self.name}: table names input map {self._pairs[:, 0].max()}, "
                             f"input has {self.in_channels}")
        self.kernel = self.add_weight(name="kernel", shape=(k, k, n), initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(len(self.table),), initializer="zeros")

    def call(self, x):
        k, filters = self.kernel_size, len(self.table)
        # Scatter the connected kernels into a dense (k, k, in, out) kernel with zeros elsewhere.
        updates = tf.transpose(self.kernel, (2, 0, 1))
        dense = tf.scatter_nd(self._pairs, updates, (self.in_channels, filters, k, k))
        kernel = tf.transpose(dense, (2, 3, 0, 1))
        y = tf.nn.conv2d(x, tf.cast(kernel, x.dtype), strides=1, padding="VALID")
        return self.activation(y + tf.cast(self.bias, x.dtype))

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        k = self.kernel_size
        return (input_shape[0], None if h is None else h - k + 1, None if w is None else w - k + 1, len(self.table))

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_size": self.kernel_size,
            "table": [list(r) for r in self.table],
            "activation": keras.activations.serialize(self.activation),
        }


@keras.saving.register_keras_serializable(package="kseg")
class RBFOutput(keras.layers.Layer):
    """LeNet-5's Euclidean RBF output units, returned negated: -||x - c_i||^2 works as logits.

    The paper's units output the squared distance (a penalty); negating keeps "argmax is
    the prediction" and lets from_logits losses train it.
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        self.centers = self.add_weight(
            name="centers", shape=(int(input_shape[-1]), self.units), initializer="random_uniform"
        )

    def call(self, x):
        c = tf.cast(self.centers, x.dtype)
        # ||x||^2 - 2 x.c + ||c||^2, without materialising the (batch, in, units) difference.
        sq = tf.reduce_sum(x * x, axis=-1, keepdims=True) - 2.0 * tf.matmul(x, c) + tf.reduce_sum(c * c, axis=0)
        return -sq

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="kseg")
class BilinearUpsampling(keras.initializers.Initializer):
    """Kernel initialiser that makes a Conv2DTranspose an exact bilinear upsampler.

    FCN and HED initialise (and in the reference nets freeze) their deconvolutions this way.
    Each channel is upsampled independently: kernel[:, :, c, c] is the bilinear filter,
    every cross-channel entry is zero. Keras' Conv2DTranspose kernel is (kh, kw, out, in).
    """

    def __call__(self, shape, dtype=None):
        kh, kw, out_channels, in_channels = shape
        if out_channels != in_channels:
            raise ValueError(f"bilinear upsampling maps channels one to one; got kernel shape {shape}")
        weights = np.zeros(shape, dtype="float32")
        filt = np.outer(_bilinear_1d(kh), _bilinear_1d(kw))
        for c in range(in_channels):
            weights[:, :, c, c] = filt
        return keras.ops.convert_to_tensor(weights, dtype=dtype or "float32")

    def get_config(self):
        return {}


def _bilinear_1d(size):
    # The same filter as the FCN reference code's upsample_filt.
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    return 1 - np.abs(np.arange(size) - center) / factor


# From this rate on, the fallback computes a dilated conv as one matmul rather than TF's
# SpaceToBatchND decomposition (docs/performance.md, slow spot 2).
IM2COL_MIN_RATE = 8
_NATIVE_GRADIENT = []


def native_dilated_gradient() -> bool:
    """Whether this process's CPU kernels differentiate a dilated Conv2D natively.

    oneDNN's do (TensorFlow's default on x86-64 Linux and Windows); with oneDNN off
    (``TF_ENABLE_ONEDNN_OPTS=0``) Conv2DBackpropInput refuses dilation rates above 1. Probed
    once, eagerly, on a 1x3x3x1 input.

        >>> native_dilated_gradient() in (True, False)
        True
    """
    if not _NATIVE_GRADIENT:
        with tf.init_scope(), tf.device("/CPU:0"):
            try:
                tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=[1, 3, 3, 1], filter=tf.ones([3, 3, 1, 1]), out_backprop=tf.ones([1, 3, 3, 1]),
                    strides=[1, 1, 1, 1], padding="SAME", dilations=[1, 2, 2, 1]).numpy()
                _NATIVE_GRADIENT.append(True)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
                _NATIVE_GRADIENT.append(False)
    return _NATIVE_GRADIENT[0]


@keras.saving.register_keras_serializable(package="kseg")
class DilatedConv2D(keras.layers.Conv2D):
    """A stride-1, "same"-padded dilated Conv2D that trains fast on the CPU; same weights as Conv2D.

    Keras' Conv2D decomposes a dilated conv into SpaceToBatchND -> Conv2D -> BatchToSpaceND,
    whose backward pass crawls when the rate is large against the map (DeepLab's fc6: rate 12
    on 41x41). This layer emits one Conv2D op with its ``dilations`` attribute, which oneDNN
    and cuDNN compute natively: fc6's forward + backward 347 ms against 811 (2 cores). Where
    the CPU kernels cannot differentiate that op (oneDNN off: ``native_dilated_gradient()``)
    it falls back to Keras' decomposition, and from rate 8 on to im2col: the kernel's taps as
    shifted slices of the padded input, concatenated, one 1x1 convolution. Every path
    computes Conv2D's function with Conv2D's kernel [kh, kw, in, out] and name, so weights
    load and export exactly as Conv2D's. Measurements: docs/performance.md, slow spot 2.

        >>> layer = DilatedConv2D(4, 3, dilation_rate=12, padding="same")
        >>> layer(np.zeros((1, 41, 41, 8), "float32")).shape
        TensorShape([1, 41, 41, 4])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if tuple(self.strides) != (1, 1) or self.padding != "same" or self.data_format != "channels_last":
            raise ValueError(f"{self.name}: DilatedConv2D computes stride-1, padding='same', channels_last "
                             f"convolutions; got strides={self.strides}, padding={self.padding!r}, "
                             f"data_format={self.data_format!r}")

    def convolution_op(self, inputs, kernel):
        if native_dilated_gradient():
            return tf.nn.conv2d(inputs, kernel, 1, "SAME", dilations=list(self.dilation_rate))
        if max(self.dilation_rate) < IM2COL_MIN_RATE:
            return super().convolution_op(inputs, kernel)
        kh, kw, cin, cout = kernel.shape
        rh, rw = self.dilation_rate
        # "same" padding of the dilated kernel: (r * (k - 1)) split as TF splits it (less on top/left).
        ph, pw = rh * (kh - 1), rw * (kw - 1)
        x = tf.pad(inputs, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2], [0, 0]])
        h, w = tf.shape(inputs)[1], tf.shape(inputs)[2]
        taps = [x[:, i * rh: i * rh + h, j * rw: j * rw + w, :] for i in range(kh) for j in range(kw)]
        cols = tf.concat(taps, axis=-1) if len(taps) > 1 else taps[0]
        return tf.nn.conv2d(cols, tf.reshape(kernel, [1, 1, kh * kw * cin, cout]), 1, "VALID")


@keras.saving.register_keras_serializable(package="kseg")
class L2Normalization(keras.layers.Layer):
    """SSD's conv4_3 normalisation: each pixel's channel vector scaled to unit L2 norm, then by a
    learnt per-channel ``gamma`` (ParseNet; Liu et al. 2016 initialise it to 20).

    ``y = x / max(||x||_2, epsilon) * gamma``, the norm over the last axis: torchvision's
    ``scale_weight.view(1, -1, 1, 1) * F.normalize(x)`` (epsilon 1e-12), so an all-zero pixel
    stays zero. (Caffe's Normalize layer divides by ``sqrt(sum x^2 + 1e-10)``: relatively about
    ``5e-11 / ||x||^2`` less, below 1e-10 wherever the norm is above 1.)

        >>> L2Normalization()(np.array([[[[3.0, 4.0]]]], "float32")).numpy().tolist()
        [[[[12.0, 16.0]]]]
    """

    def __init__(self, scale_init=20.0, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.scale_init = float(scale_init)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: L2Normalization needs a known channel count, got {input_shape}")
        self.gamma = self.add_weight(
            name="gamma", shape=(int(channels),), initializer=keras.initializers.Constant(self.scale_init)
        )

    def call(self, x):
        # In float32 under mixed precision: epsilon underflows to 0 in float16, and squares overflow.
        xf = tf.cast(x, tf.float32)
        norm = tf.sqrt(tf.reduce_sum(tf.square(xf), axis=-1, keepdims=True))
        y = xf / tf.maximum(norm, self.epsilon) * tf.cast(self.gamma, tf.float32)
        return tf.cast(y, x.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "scale_init": self.scale_init, "epsilon": self.epsilon}
