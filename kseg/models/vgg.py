"""VGG16 (Simonyan & Zisserman 2014, configuration D) with keras.applications layer names."""

from __future__ import annotations

import keras
from keras import layers

from kseg.models._common import classifier_head, global_pooling, model_input, scaled
from kseg.registry import TorchMapping, register_model

PAPER = "Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, ICLR 2015"

# Filters per conv in each block; a 2x2/2 max-pool ends every block.
CFGS = {"D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]}

# Conv layer names in build order; torchvision's features.{i} indices follow the same order.
VGG16_CONV_NAMES = [
    f"block{b}_conv{c}" for b, convs in enumerate(CFGS["D"], start=1) for c in range(1, len(convs) + 1)
]


def vgg_trunk(x, cfg="D", *, pool_padding="valid", last_pool=True, width=1.0):
    """The 13-conv trunk; returns the output and a dict of named features (`block{i}_pool`).
    width: a channel multiplier (kseg.models._common.scaled), 1.0 for VGG16 itself."""
    features = {}
    blocks = CFGS[cfg]
    for b, convs in enumerate(blocks, start=1):
        for c, filters in enumerate(convs, start=1):
            x = layers.Conv2D(
                scaled(filters, width), 3, padding="same", activation="relu", name=f"block{b}_conv{c}"
            )(x)
        features[f"block{b}_conv{len(convs)}"] = x
        if b < len(blocks) or last_pool:
            x = layers.MaxPooling2D(2, strides=2, padding=pool_padding, name=f"block{b}_pool")(x)
            features[f"block{b}_pool"] = x
    return x, features


def torch_map():
    """torchvision.models.vgg16's state_dict keys: features.{i} skip ReLU/pool indices."""
    mapping, index = [], 0
    for convs in CFGS["D"]:
        for _ in convs:
            mapping.append(index)
            index += 2  # conv, ReLU
        index += 1  # max-pool
    out = [TorchMapping(f"features.{i}", n, "conv") for i, n in zip(mapping, VGG16_CONV_NAMES)]
    # torchvision's AdaptiveAvgPool2d(7) before the classifier is the identity at 224x224.
    return out + [
        TorchMapping("classifier.0", "fc1", "dense_nchw", chw=(512, 7, 7)),
        TorchMapping("classifier.3", "fc2", "dense"),
        TorchMapping("classifier.6", "predictions", "dense"),
    ]


def _vgg(cfg, *, num_classes, input_shape, include_top, pooling, classifier_activation, dropout, name):
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x, _ = vgg_trunk(inputs, cfg)
    if include_top:
        # keras.applications has no dropout layers (they have no weights); torchvision
        # and the paper train with 0.5 after fc1 and fc2. Dropout is identity at inference.
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(4096, activation="relu", name="fc1")(x)
        if dropout:
            x = layers.Dropout(dropout, name="fc1_dropout")(x)
        x = layers.Dense(4096, activation="relu", name="fc2")(x)
        if dropout:
            x = layers.Dropout(dropout, name="fc2_dropout")(x)
        x = classifier_head(x, num_classes, classifier_activation)
    else:
        x = global_pooling(x, pooling)
    return keras.Model(inputs, x, name=name)


@register_model(
    "vgg16",
    task="classification",
    paper=PAPER,
    input_shape=(224, 224, 3),
    num_classes=1000,
    preprocessing="caffe",
    params=138_357_544,
    layouts={"keras": {}, "torchvision": {}},
    layout_preprocessing={"torchvision": "torch"},
    torch_map=torch_map,
)
def vgg16(
    *,
    num_classes=1000,
    input_shape=None,
    include_top=True,
    pooling=None,
    classifier_activation=None,
    dropout=0.5,
):
    """VGG16, configuration D: 13 convs + 3 dense layers; include_top=False gives the 14.7M conv trunk."""
    return _vgg(
        "D",
        num_classes=num_classes,
        input_shape=input_shape,
        include_top=include_top,
        pooling=pooling,
        classifier_activation=classifier_activation,
        dropout=dropout,
        name="vgg16",
    )
