"""AlexNet in torchvision's layout (Krizhevsky 2014, "One weird trick"), weight-compatible with it.

The parts of torchvision's model (`model.features`, `model.avgpool`, `model.classifier`) are views
of kseg's model that share its layers and weights:

- `alexnet_features(model)`: the input to `pool5` (torchvision's `model.features`); the same net as
  `kseg.build_model("alexnet", include_top=False)`, which takes any input size >= 63 and, with
  `pooling="avg"` / `"max"`, ends in a global pooling of pool5 instead (vgg16's and resnet's options);
- `alexnet_classifier(model)`: pool5 to the logits: `avgpool`, the flatten and torchvision's
  `model.classifier` (dropout, fc6, dropout, fc7, fc8), so that
  `alexnet_classifier(m)(alexnet_features(m)(x)) == m(x)`.

    >>> import kseg
    >>> from kseg.models.alexnet import alexnet_classifier, alexnet_features
    >>> model = kseg.build_model("alexnet")
    >>> alexnet_features(model).output.shape, alexnet_classifier(model).output.shape
    ((None, 6, 6, 256), (None, 1000))
"""

from __future__ import annotations

import keras
from keras import layers

from kseg.models._common import classifier_head, global_pooling, model_input, scaled
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
# torchvision's model.classifier after avgpool and the flatten, in order (dropout before fc6 and fc7).
CLASSIFIER = ("fc6_dropout", "fc6", "fc7_dropout", "fc7", "fc8")


def torch_map():
    """torchvision.models.alexnet's state_dict keys for this model's layers."""
    convs = [TorchMapping(f"features.{i}", name, "conv") for i, (name, *_ ) in zip((0, 3, 6, 8, 10), CONVS)]
    return convs + [
        TorchMapping("classifier.1", "fc6", "dense_nchw", chw=(256, 6, 6)),
        TorchMapping("classifier.4", "fc7", "dense"),
        TorchMapping("classifier.6", "fc8", "dense"),
    ]


def alexnet_convs(x, width=1.0, *, conv1_pad=2, ceil_mode=False):
    """conv1 .. pool5 of torchvision's AlexNet features (ReLU after each conv); width: a channel
    multiplier (kseg's, for CPU tests of the models built on it).

    conv1_pad: conv1's zero padding (torchvision: 2; FCN's Caffe nets: 100). ceil_mode: the 3x3/2
    max-pools round their output size up, as Caffe's do (torchvision's round down): one zero row and
    column at the bottom and right before each pool (layers `pool{i}_pad`), exact because the pools
    read ReLU outputs (>= 0) and every window still holds a real value.
    """
    for name, filters, kernel, stride, pad, pool in CONVS:
        if name == "conv1":
            pad = conv1_pad
        # torchvision pads symmetrically; Keras "same" would not for stride 4.
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        x = layers.Conv2D(scaled(filters, width), kernel, strides=stride, activation="relu", name=name)(x)
        if pool:
            if ceil_mode:
                x = layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{pool}_pad")(x)
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
def alexnet(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, dropout=0.5,
            classifier_activation=None):
    """AlexNet, torchvision layout: 5 convs (64-192-384-256-256), adaptive 6x6 pool, 3 dense layers.

    include_top=False ends at pool5 (torchvision's `features`, 2,469,696 parameters, any input size
    >= 63), followed by a global pooling when `pooling` is "avg" or "max". See the module docstring for
    the features / classifier views of a full model.
    """
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x = alexnet_convs(inputs)
    if not include_top:
        return keras.Model(inputs, global_pooling(x, pooling), name="alexnet")
    x = layers.AdaptiveAveragePooling2D((6, 6), name="avgpool")(x)
    # Keras flattens NHWC, torchvision NCHW: imported fc6 kernels are permuted to match.
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="fc6_dropout")(x)
    x = layers.Dense(4096, activation="relu", name="fc6")(x)
    x = layers.Dropout(dropout, name="fc7_dropout")(x)
    x = layers.Dense(4096, activation="relu", name="fc7")(x)
    x = classifier_head(x, num_classes, classifier_activation, name="fc8")
    return keras.Model(inputs, x, name="alexnet")


def _layer(model, name, part):
    try:
        return model.get_layer(name)
    except ValueError:
        why = "built with include_top=False" if part == "classifier" and _has(model, "pool5") else "not kseg's alexnet"
        raise ValueError(f"{model.name} has no AlexNet {part}: no layer {name!r} ({why})") from None


def _has(model, name):
    return any(layer.name == name for layer in model.layers)


def alexnet_features(model) -> keras.Model:
    """torchvision's `model.features` of kseg's alexnet `model`: a keras.Model from its input to pool5
    (N, 6, 6, 256 at 224 x 224) that shares the model's layers, so its weights are the model's."""
    pool5 = _layer(model, "pool5", "features")
    return keras.Model(model.input, pool5.output, name=f"{model.name}_features")


def alexnet_classifier(model) -> keras.Model:
    """The classifier part of kseg's alexnet `model` (include_top=True): pool5 in, the model's output
    out, through its own layers (shared weights): avgpool, flatten, then torchvision's
    `model.classifier` (fc6_dropout, fc6, fc7_dropout, fc7, fc8)."""
    pool5 = _layer(model, "pool5", "features")
    stack = [_layer(model, name, "classifier") for name in ("avgpool", "flatten", *CLASSIFIER)]
    x = inputs = keras.Input(pool5.output.shape[1:], name="features")
    for layer in stack:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_classifier")
