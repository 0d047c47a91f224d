"""Inference without retracing: one traced graph per model, reused for every call and input size.

`tf.function(lambda x: model(x))` traces a new graph for every new input shape (batch size
or image size). For a model that accepts any size that means one trace, plus Grappler's
optimisation of the graph, per distinct image size: evaluating VOC val at original sizes
pays a few seconds of tracing for each of its sizes. A `Predictor` traces once with the
batch and the model's free spatial dimensions left unknown, so every size after the first
runs the same graph (XLA, with jit_compile=True, still compiles per shape, in its own cache).

    >>> import numpy as np, kseg
    >>> from kseg.inference import predictor
    >>> model = kseg.build_model("deeplab_largefov", num_classes=3, width=0.125)
    >>> predict = predictor(model)
    >>> [predict(np.zeros((n, s, s, 3), "float32")).shape for n, s in ((1, 33), (2, 33), (1, 41))]
    [TensorShape([1, 33, 33, 3]), TensorShape([2, 33, 33, 3]), TensorShape([1, 41, 41, 3])]
    >>> predict.tracing_count
    1

`predictor(model)` caches its Predictor on the model, so library code (evaluation, serving,
benchmarks) shares one trace; `predict(model, images, batch_size=8)` returns NumPy arrays.

With `preprocessing=` the Predictor takes raw RGB 0..255 images and preprocesses them inside
the graph; `probabilities(image)` gives one image's class probabilities at its own size
(a fixed-input model, or `size=`, predicts on a resized copy and the logits are resized back,
bilinearly, before the softmax, as DeepLab upsamples its scores).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kseg.crf import softmax
from kseg.identity import resolve_preprocessing

__all__ = ["Predictor", "predict", "predictor"]

_CACHE_ATTR = "_kseg_predictors"


class Predictor:
    """A model's inference function (training=False) traced once for all input shapes it accepts.

    The input signature is `(None, H, W, C)` where H, W are the model's declared input dims: None
    for models that accept any size, so one trace serves every batch size and image size; fixed
    dims stay fixed (a call with another size fails with TF's shape error, as the model would).
    Outputs are TF tensors, a list for multi-output models.
    """

    def __init__(self, model, *, preprocessing=None, size=None, jit_compile: bool = False):
        inputs = getattr(model, "inputs", None)
        if not inputs or len(inputs) != 1:
            raise ValueError(f"{getattr(model, 'name', model)!r}: a Predictor runs single-input Keras models")
        spec = inputs[0]
        self.model = model
        self.jit_compile = bool(jit_compile)
        self.input_spec = tf.TensorSpec((None, *spec.shape[1:]), spec.dtype or tf.float32, name="image")
        self.preprocessing = prep = resolve_preprocessing(preprocessing)
        fixed = tuple(spec.shape[1:3])
        # The size probabilities() predicts at: the model's fixed size, else `size`, else the image's own.
        self.size = fixed if None not in fixed else (tuple(size) if size else None)

        def call(x):
            return model(prep.apply(x) if prep is not None else x, training=False)

        self._fn = tf.function(call, input_signature=[self.input_spec], jit_compile=self.jit_compile)
        self._concrete = None  # traced on the first call, not at construction

    def __call__(self, images):
        x = images
        if not (isinstance(x, tf.Tensor) and x.dtype == self.input_spec.dtype):
            x = tf.convert_to_tensor(x, dtype=self.input_spec.dtype)
        if not self.input_spec.shape.is_compatible_with(x.shape):
            raise ValueError(f"{self.model.name}: input of shape {x.shape} does not fit the model's input "
                             f"{self.input_spec.shape} (batch, height, width, channels)")
        if self._concrete is None:
            self._concrete = self._fn.get_concrete_function()
        # The concrete function skips tf.function's per-call signature matching (~0.2 ms, a
        # quarter of a small model's call).
        return self._concrete(x)

    def probabilities(self, image) -> np.ndarray:
        """One RGB image (uint8 or float 0..255, [H, W, 3]) -> float32 class probabilities [H, W, C].

        The main output (the first: FCN's aux and DeepLab's stride-8 logits come after it) at the
        image's own size. Pass preprocessing= to the Predictor: the image goes in raw.
        """
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
        h, w = img.shape[:2]
        x = tf.convert_to_tensor(img[None].astype(np.float32))
        if self.size is not None:
            x = tf.image.resize(x, self.size, method="bilinear")
        out = self(x)
        out = tf.cast(out[0] if isinstance(out, (list, tuple)) else out, tf.float32)
        if self.size is not None:
            out = tf.image.resize(out, (h, w), method="bilinear")
        out = np.asarray(out[0])
        if out.shape[-1] < 2:
            raise ValueError(f"{self.model.name} outputs {out.shape[-1]} channel(s); class probabilities need "
                             "per-class scores (a segmentation model)")
        # Models output logits; one ending in a softmax already gives probabilities.
        if out.min() >= 0 and np.allclose(out.sum(-1), 1.0, atol=1e-3):
            return out
        return softmax(out)

    @property
    def tracing_count(self) -> int:
        """How many times the graph was traced (1 after the first call, whatever the later sizes)."""
        return self._fn.experimental_get_tracing_count()

    @property
    def function(self):
        """The underlying tf.function (for get_concrete_function, SavedModel export...)."""
        return self._fn


def predictor(model, *, preprocessing=None, jit_compile: bool = False) -> Predictor:
    """The model's shared Predictor (created on first use, then cached on the model)."""
    cache = getattr(model, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        # Keras tracks attributes it is given; a plain dict set through object.__setattr__ stays
        # out of the model's config, weights and saved files.
        object.__setattr__(model, _CACHE_ATTR, cache)
    prep = resolve_preprocessing(preprocessing)
    key = (bool(jit_compile), prep)
    if key not in cache:
        cache[key] = Predictor(model, preprocessing=prep, jit_compile=jit_compile)
    return cache[key]


def predict(model, images, *, batch_size: int = 8, jit_compile: bool = False):
    """Run `model` on a NumPy batch (N, H, W, C) in chunks of batch_size; NumPy outputs.

    A list of arrays for multi-output models. Every chunk, the last smaller one included,
    runs the same traced graph.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run = predictor(model, jit_compile=jit_compile)
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{model.name}: predict expects a batch (N, H, W, C), got shape {images.shape}")
    parts = []
    for start in range(0, len(images), batch_size):
        out = run(images[start : start + batch_size])
        parts.append([np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])])
    if not parts:
        raise ValueError(f"{model.name}: predict got an empty batch")
    outputs = [np.concatenate(col) for col in zip(*parts)]
    return outputs if len(outputs) > 1 or isinstance(model.output, (list, tuple)) else outputs[0]
