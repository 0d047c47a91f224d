"""VGG (Simonyan & Zisserman 2014): configurations A, B, D and E (VGG11, VGG13, VGG16, VGG19), with
keras.applications layer names, and torchvision's `_bn` variants (BatchNorm after every conv).

keras.applications has VGG16 and VGG19; the others follow their names: `block{b}_conv{c}`,
`block{b}_pool`, `fc1`, `fc2`, `predictions`, and in the `_bn` variants each conv's BatchNormalization
and ReLU are `block{b}_conv{c}_bn` and `block{b}_conv{c}_relu` (as kseg's DeepLab and SegNet name theirs).
"""

from __future__ import annotations

import functools

import keras
from keras import layers

from kseg.models._common import classifier_head, global_pooling, model_input, scaled
from kseg.registry import TorchMapping, register_model

PAPER = "Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, ICLR 2015"

# Filters per conv in each block of the paper's Table 1 configurations; a 2x2/2 max-pool ends every block.
CFGS = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],  # VGG11
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # VGG13
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],  # VGG16
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],  # VGG19
}


def conv_names(cfg: str = "D") -> list[str]:
    """Conv layer names in build order; torchvision's features.{i} indices follow the same order."""
    return [f"block{b}_conv{c}" for b, convs in enumerate(CFGS[cfg], start=1) for c in range(1, len(convs) + 1)]


VGG16_CONV_NAMES = conv_names("D")

# torchvision's vgg*_bn: nn.BatchNorm2d's eps 1e-5 and momentum 0.1 (Keras counts momentum the other way).
BATCHNORM = dict(epsilon=1e-5, momentum=0.9)


def vgg_trunk(x, cfg="D", *, pool_padding="valid", last_pool=True, width=1.0, batch_norm=False):
    """The conv trunk of configuration `cfg`; returns the output and a dict of named features
    (`block{i}_conv{last}`, `block{i}_pool`).
    width: a channel multiplier (kseg.models._common.scaled), 1.0 for VGG itself.
    batch_norm: conv, BatchNormalization, ReLU per conv (torchvision's vgg*_bn) instead of conv + ReLU."""
    features = {}
    blocks = CFGS[cfg]
    for b, convs in enumerate(blocks, start=1):
        for c, filters in enumerate(convs, start=1):
            name = f"block{b}_conv{c}"
            x = layers.Conv2D(
                scaled(filters, width), 3, padding="same", activation=None if batch_norm else "relu", name=name
            )(x)
            if batch_norm:
                x = layers.BatchNormalization(name=f"{name}_bn", **BATCHNORM)(x)
                x = layers.ReLU(name=f"{name}_relu")(x)
        features[f"block{b}_conv{len(convs)}"] = x
        if b < len(blocks) or last_pool:
            x = layers.MaxPooling2D(2, strides=2, padding=pool_padding, name=f"block{b}_pool")(x)
            features[f"block{b}_pool"] = x
    return x, features


def torch_map(cfg="D", batch_norm=False):
    """torchvision.models.vgg{11,13,16,19}(_bn)'s state_dict keys: features.{i} counts every module of
    the Sequential (conv, [BatchNorm,] ReLU per conv, a max-pool per block); only convs and BatchNorms
    hold weights."""
    out, index = [], 0
    for b, convs in enumerate(CFGS[cfg], start=1):
        for c in range(1, len(convs) + 1):
            out.append(TorchMapping(f"features.{index}", f"block{b}_conv{c}", "conv"))
            if batch_norm:
                out.append(TorchMapping(f"features.{index + 1}", f"block{b}_conv{c}_bn", "bn"))
            index += 3 if batch_norm else 2
        index += 1  # max-pool
    # torchvision's AdaptiveAvgPool2d(7) before the classifier is the identity at 224x224.
    return out + [
        TorchMapping("classifier.0", "fc1", "dense_nchw", chw=(512, 7, 7)),
        TorchMapping("classifier.3", "fc2", "dense"),
        TorchMapping("classifier.6", "predictions", "dense"),
    ]


def _vgg(cfg, *, num_classes, input_shape, include_top, pooling, classifier_activation, dropout, name,
         batch_norm=False):
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x, _ = vgg_trunk(inputs, cfg, batch_norm=batch_norm)
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


_COMMON = dict(task="classification", paper=PAPER, input_shape=(224, 224, 3), num_classes=1000)
# keras.applications publishes VGG16 and VGG19 (Caffe BGR-mean inputs), torchvision all of them; VGG11,
# VGG13 and every _bn variant have torchvision's weights only, hence its preprocessing.
_KERAS_AND_TORCHVISION = dict(
    preprocessing="caffe", layouts={"keras": {}, "torchvision": {}}, layout_preprocessing={"torchvision": "torch"}
)
_TORCHVISION = dict(preprocessing="torch")


@register_model("vgg16", params=138_357_544, torch_map=torch_map, **_COMMON, **_KERAS_AND_TORCHVISION)
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


# params: Keras' count_params() with defaults, BatchNorm moving statistics included (torchvision's
# counts of the _bn variants leave them out: 132,868,840 / 133,053,736 / 143,678,248).
@register_model("vgg11", params=132_863_336, torch_map=functools.partial(torch_map, "A"), **_COMMON, **_TORCHVISION)
def vgg11(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
          dropout=0.5):
    """VGG11, configuration A: 8 convs + 3 dense layers (torchvision's weights)."""
    return _vgg("A", num_classes=num_classes, input_shape=input_shape, include_top=include_top, pooling=pooling,
                classifier_activation=classifier_activation, dropout=dropout, name="vgg11")


@register_model("vgg11_bn", params=132_874_344, torch_map=functools.partial(torch_map, "A", True), **_COMMON,
                **_TORCHVISION)
def vgg11_bn(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
             dropout=0.5):
    """VGG11 with BatchNorm after every conv (torchvision's vgg11_bn)."""
    return _vgg("A", num_classes=num_classes, input_shape=input_shape, include_top=include_top, pooling=pooling,
                classifier_activation=classifier_activation, dropout=dropout, name="vgg11_bn", batch_norm=True)


@register_model("vgg13", params=133_047_848, torch_map=functools.partial(torch_map, "B"), **_COMMON, **_TORCHVISION)
def vgg13(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
          dropout=0.5):
    """VGG13, configuration B: 10 convs + 3 dense layers (torchvision's weights)."""
    return _vgg("B", num_classes=num_classes, input_shape=input_shape, include_top=include_top, pooling=pooling,
                classifier_activation=classifier_activation, dropout=dropout, name="vgg13")


@register_model("vgg13_bn", params=133_059_624, torch_map=functools.partial(torch_map, "B", True), **_COMMON,
                **_TORCHVISION)
def vgg13_bn(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
             dropout=0.5):
    """VGG13 with BatchNorm after every conv (torchvision's vgg13_bn)."""
    return _vgg("B", num_classes=num_classes, input_shape=input_shape, include_top=include_top, pooling=pooling,
                classifier_activation=classifier_activation, dropout=dropout, name="vgg13_bn", batch_norm=True)


@register_model("vgg19", params=143_667_240, torch_map=functools.partial(torch_map, "E"), **_COMMON,
                **_KERAS_AND_TORCHVISION)
def vgg19(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
          dropout=0.5):
    """VGG19, configuration E: 16 convs + 3 dense layers; include_top=False gives the 20.0M conv trunk."""
    return _vgg("E", num_classes=num_classes, input_shape=input_shape, include_top=include_top, pooling=pooling,
                classifier_activation=classifier_activation, dropout=dropout, name="vgg19")


@register_model("vgg19_bn", params=143_689_256, torch_map=functools.partial(torch_map, "E", True), **_COMMON,
                **_TORCHVISION)
def vgg19_bn(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
             dropout=0.5):
    """VGG19 with BatchNorm after every conv (torchvision's vgg19_bn)."""
    return _vgg("E", num_classes=num_classes, input_shape=input_shape, include_top=include_top, pooling=pooling,
                classifier_activation=classifier_activation, dropout=dropout, name="vgg19_bn", batch_norm=True)
