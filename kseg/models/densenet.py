"""DenseNet-121 / 169 / 201 (Huang et al. 2017) with keras.applications layer names.

DenseNet-BC as the paper's ImageNet nets: growth rate k = 32, a 7x7/2 conv of 2k = 64 filters and a 3x3/2
max-pool, four dense blocks of (BN, ReLU, 1x1 conv of 4k, BN, ReLU, 3x3 conv of k) layers whose outputs are
concatenated to their inputs, and between blocks a transition (BN, ReLU, 1x1 conv halving the channels, 2x2/2
average pool); a last BN and ReLU, global average pooling and the classifier.

Layer names are keras.applications.densenet's: `conv1_conv` / `conv1_bn` / `conv1_relu`, `pool1`; dense layer i
of block b (stages 2-5) is `conv{b}_block{i}_0_bn`, `_0_relu`, `_1_conv`, `_1_bn`, `_1_relu`, `_2_conv`,
`_concat`; the transitions after stages 2-4 are `pool{b}_bn`, `_relu`, `_conv`, `_pool`; then `bn`, `relu`,
`avg_pool`, `predictions`. So keras.applications' files load by name.

The two published weight layouts differ only in BatchNormalization's settings:
- "keras" (keras.applications): epsilon 1.001e-5, Keras' default momentum.
- "torchvision": nn.BatchNorm2d's epsilon 1e-5 and momentum 0.1 (Keras' 0.9).
The structure is the same (no conv biases in either; torchvision's 3x3/2 max-pool pads with -inf, Keras with
zeros, equal here as its inputs are post-ReLU). torchvision's module names map onto these layers through
`torch_map`; its published files' older dense-layer keys (`norm.1`, ...) through `rename_legacy_keys` first.
"""

from __future__ import annotations

import functools
import re

import keras
from keras import layers

from kseg.models._common import classifier_top, model_input
from kseg.registry import TorchMapping, register_model

PAPER = "Huang, Liu, van der Maaten, Weinberger, Densely Connected Convolutional Networks, CVPR 2017"

# Dense layers per block (the paper's Table 1).
BLOCKS = {"densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32)}
GROWTH_RATE = 32  # k
BOTTLENECK = 4  # the 1x1 conv's width, in multiples of k ("DenseNet-B")
STEM_FILTERS = 64  # 2k
COMPRESSION = 0.5  # transitions halve the channels ("DenseNet-C")
LAYOUTS = {
    "keras": {"epsilon": 1.001e-5},
    "torchvision": {"epsilon": 1e-5, "momentum": 0.9},
}


def feature_names(arch: str) -> dict[str, str]:
    """Named feature maps for heads, C1 (stride 2) .. C5 (stride 32), by keras.applications layer name.

    C2..C4 are the transitions' BN + ReLU of each block's concatenation, at the block's resolution (before
    the transition's conv and pooling); C5 the last block's, through the final BN + ReLU.
    """
    if arch not in BLOCKS:
        raise ValueError(f"unknown DenseNet {arch!r}; known: {sorted(BLOCKS)}")
    return {"C1": "conv1_relu", "C2": "pool2_relu", "C3": "pool3_relu", "C4": "pool4_relu", "C5": "relu"}


def torch_map(arch):
    """torchvision.models.densenet{121,169,201}'s state_dict keys for the layers of `arch`."""
    out = [TorchMapping("features.conv0", "conv1_conv", "conv"), TorchMapping("features.norm0", "conv1_bn", "bn")]
    n_blocks = len(BLOCKS[arch])
    for b, n in enumerate(BLOCKS[arch], start=1):
        for i in range(1, n + 1):
            torch_layer, keras_layer = f"features.denseblock{b}.denselayer{i}", f"conv{b + 1}_block{i}"
            out += [
                TorchMapping(f"{torch_layer}.norm1", f"{keras_layer}_0_bn", "bn"),
                TorchMapping(f"{torch_layer}.conv1", f"{keras_layer}_1_conv", "conv"),
                TorchMapping(f"{torch_layer}.norm2", f"{keras_layer}_1_bn", "bn"),
                TorchMapping(f"{torch_layer}.conv2", f"{keras_layer}_2_conv", "conv"),
            ]
        if b < n_blocks:
            out += [
                TorchMapping(f"features.transition{b}.norm", f"pool{b + 1}_bn", "bn"),
                TorchMapping(f"features.transition{b}.conv", f"pool{b + 1}_conv", "conv"),
            ]
    return out + [TorchMapping("features.norm5", "bn", "bn"), TorchMapping("classifier", "predictions", "dense")]


# torchvision's published files (densenet*-*.pth) predate its current module names: a dense layer's modules
# are saved as `norm.1`, `conv.1`, `norm.2`, `conv.2`; torchvision renames them on loading.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|conv))\.([12]\.\w+)$")


def rename_legacy_keys(state: dict) -> dict:
    """A state_dict with torchvision's published files' dense-layer keys (`...denselayer1.norm.1.weight`)
    under its modules' names (`...denselayer1.norm1.weight`); other keys unchanged, order kept."""
    out = {}
    for key, value in state.items():
        m = _LEGACY_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _batchnorm(x, layout, name):
    return layers.BatchNormalization(name=name, **LAYOUTS[layout])(x)


def _dense_layer(x, layout, name):
    """BN, ReLU, 1x1 conv (4k), BN, ReLU, 3x3 conv (k); the k new channels concatenated to the input."""
    y = _batchnorm(x, layout, f"{name}_0_bn")
    y = layers.Activation("relu", name=f"{name}_0_relu")(y)
    y = layers.Conv2D(BOTTLENECK * GROWTH_RATE, 1, use_bias=False, name=f"{name}_1_conv")(y)
    y = _batchnorm(y, layout, f"{name}_1_bn")
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = layers.Conv2D(GROWTH_RATE, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    return layers.Concatenate(name=f"{name}_concat")([x, y])


def _transition(x, layout, name):
    """BN, ReLU, 1x1 conv to half the channels, 2x2/2 average pool (floor, as torchvision's AvgPool2d)."""
    x = _batchnorm(x, layout, f"{name}_bn")
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.Conv2D(int(x.shape[-1] * COMPRESSION), 1, use_bias=False, name=f"{name}_conv")(x)
    return layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def densenet_trunk(x, arch, *, layout="keras"):
    """Stem, four dense blocks with transitions, the final BN + ReLU; returns the last feature map (C5)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(STEM_FILTERS, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = _batchnorm(x, layout, "conv1_bn")
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    blocks = BLOCKS[arch]
    for stage, n in enumerate(blocks, start=2):
        for i in range(1, n + 1):
            x = _dense_layer(x, layout, f"conv{stage}_block{i}")
        if stage < len(blocks) + 1:
            x = _transition(x, layout, f"pool{stage}")
    x = _batchnorm(x, layout, "bn")
    return layers.Activation("relu", name="relu")(x)


def _densenet(arch, *, num_classes, input_shape, include_top, pooling, layout, classifier_activation):
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x = densenet_trunk(inputs, arch, layout=layout)
    x = classifier_top(x, include_top=include_top, pooling=pooling, num_classes=num_classes,
                       classifier_activation=classifier_activation)
    return keras.Model(inputs, x, name=arch)


def _spec(arch, params):
    return dict(
        task="classification",
        paper=PAPER,
        input_shape=(224, 224, 3),
        num_classes=1000,
        # keras.applications.densenet.preprocess_input is "torch" mode, as torchvision's transforms.
        preprocessing="torch",
        layouts={"keras": {"layout": "keras"}, "torchvision": {"layout": "torchvision"}},
        params=params,
        torch_map=functools.partial(torch_map, arch),
        torch_keys=rename_legacy_keys,
    )


# params: Keras' count_params() with defaults, BatchNorm moving statistics included (= keras.applications'
# DenseNet121/169/201(weights=None)); torchvision's counts leave them out: 7,978,856 / 14,149,480 / 20,013,928.
@register_model("densenet121", **_spec("densenet121", 8_062_504))
def densenet121(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, layout="keras",
                classifier_activation=None):
    """DenseNet-121 (6-12-24-16 dense layers, k=32); layout="torchvision" for torchvision's weights."""
    return _densenet("densenet121", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                     pooling=pooling, layout=layout, classifier_activation=classifier_activation)


@register_model("densenet169", **_spec("densenet169", 14_307_880))
def densenet169(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, layout="keras",
                classifier_activation=None):
    """DenseNet-169 (6-12-32-32 dense layers, k=32); layout="torchvision" for torchvision's weights."""
    return _densenet("densenet169", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                     pooling=pooling, layout=layout, classifier_activation=classifier_activation)


@register_model("densenet201", **_spec("densenet201", 20_242_984))
def densenet201(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, layout="keras",
                classifier_activation=None):
    """DenseNet-201 (6-12-48-32 dense layers, k=32); layout="torchvision" for torchvision's weights."""
    return _densenet("densenet201", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                     pooling=pooling, layout=layout, classifier_activation=classifier_activation)
