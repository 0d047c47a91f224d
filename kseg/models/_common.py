"""Small helpers shared by the model builders."""

from __future__ import annotations

import keras


def model_input(input_shape, default, name="image"):
    """A named Keras input; `None` spatial dims accept any size at run time."""
    shape = tuple(default if input_shape is None else input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {shape}")
    return keras.Input(shape=shape, name=name)


def classifier_head(x, num_classes, activation, name="predictions"):
    """The final dense layer; logits by default, as torchvision and the losses expect."""
    return keras.layers.Dense(num_classes, activation=activation, name=name)(x)


def global_pooling(x, pooling):
    """keras.applications' `pooling` option for include_top=False: None, "avg" or "max"."""
    if pooling is None:
        return x
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")


def classifier_top(x, *, include_top, pooling, num_classes, classifier_activation):
    """keras.applications' top on a trunk's last map: global average pooling (`avg_pool`) and the classifier,
    or with include_top=False the `pooling` option."""
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        return classifier_head(x, num_classes, classifier_activation)
    return global_pooling(x, pooling)


def scaled(filters: int, width: float) -> int:
    """A conv's filters under the channel multiplier `width`: rounded, at least 8 (1.0: unchanged)."""
    return filters if width == 1.0 else max(8, int(round(filters * width)))


def check_width(width, name):
    """Refuse a channel multiplier outside (0, 1] with an error naming the model."""
    if isinstance(width, bool) or not (isinstance(width, (int, float)) and 0 < width <= 1.0):
        raise ValueError(f"{name}: width must be a channel multiplier in (0, 1], got {width!r}")
