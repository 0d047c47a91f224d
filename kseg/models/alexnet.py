"""AlexNet in torchvision's layout (Krizhevsky 2014, "One weird trick"), weight-compatible with it."""

from __future__ import annotations

import keras
from keras import layers

from kseg.models._common import classifier_head, model_input, scaled
from kseg.registry import TorchMapping, register_model

PAPER = "Krizhevsky, One weird trick for parallelizing convolutional neural networks, arXiv:1404.5997, 2014"

# (name, filters, kernel, stride, padding, pool after) in torchvision's features order.
CONVS = [
    ("conv1", 64, 11, 4, 2, "pool1"),
    ("conv2", 192, 5, 1, 2, "pool2"),
    ("conv3", 384, 3, 1, 1, None),
    ("conv4", 256, 3, 1, 1, None),
    ("conv5", 256, 3, 1, 1, "pool5"),
]


def torch_map():
    """torchvision.models.alexnet's state_dict keys for this model's layers."""
    convs = [TorchMapping(f"features.{i}", name, "conv") for i, (name, *_ ) in zip((0, 3, 6, 8, 10), CONVS)]
    return convs + [
        TorchMapping("classifier.1", "fc6", "dense_nchw", chw=(256, 6, 6)),
        TorchMapping("classifier.4", "fc7", "dense"),
        TorchMapping("classifier.6", "fc8", "dense"),
    ]


def alexnet_convs(x, width=1.0):
    """conv1 .. pool5 of torchvision's AlexNet features (ReLU after each conv); width: a channel
    multiplier (kseg's, for CPU tests of the models built on it)."""
    for name, filters, kernel, stride, pad, pool in CONVS:
        # torchvision pads symmetrically; Keras "same" would not for stride 4.
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        x = layers.Conv2D(scaled(filters, width), kernel, strides=stride, activation="relu", name=name)(x)
        if pool:
            x = layers.MaxPooling2D(3, strides=2, name=pool)(x)
    return x


@register_model(
    "alexnet",
    task="classification",
    paper=PAPER,
    input_shape=(224, 224, 3),
    num_classes=1000,
    preprocessing="torch",
    params=61_100_840,
    torch_map=torch_map,
)
def alexnet(*, num_classes=1000, input_shape=None, dropout=0.5, classifier_activation=None):
    """AlexNet, torchvision layout: 5 convs (64-192-384-256-256), adaptive 6x6 pool, 3 dense layers."""
    inputs = model_input(input_shape, (224, 224, 3))
    x = alexnet_convs(inputs)
    x = layers.AdaptiveAveragePooling2D((6, 6), name="avgpool")(x)
    # Keras flattens NHWC, torchvision NCHW: imported fc6 kernels are permuted to match.
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="fc6_dropout")(x)
    x = layers.Dense(4096, activation="relu", name="fc6")(x)
    x = layers.Dropout(dropout, name="fc7_dropout")(x)
    x = layers.Dense(4096, activation="relu", name="fc7")(x)
    x = classifier_head(x, num_classes, classifier_activation, name="fc8")
    return keras.Model(inputs, x, name="alexnet")
