"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3-Large / -Small (Howard et al. 2019), with
keras.applications layer names.

Both have two weight layouts, which differ in more than names:
- "keras" (keras.applications.MobileNetV2 / MobileNetV3Large / MobileNetV3Small, the default): the same
  layers, names and structure, so keras.applications files load by name. BatchNorm epsilon 1e-3, and the
  strided convolutions pad as Keras does: the stem conv "same" (bottom/right only at even sizes), the strided
  depthwise convs by keras.applications' `correct_pad` (an explicit ZeroPadding2D `*_pad`: symmetric at odd
  sizes, bottom/right only at even ones and wherever the size is unknown when the model is built).
  keras.applications' MobileNetV3 rescales its input itself (include_preprocessing=True); kseg models take
  preprocessed input, so the layers are those of include_preprocessing=False, fed x / 127.5 - 1 ("tf").
- "torchvision" (torchvision.models.mobilenet_v2 / mobilenet_v3_large / mobilenet_v3_small): the same layer
  names, with torchvision's BatchNorm epsilon (V2: 1e-5, V3: 1e-3) and momentum, symmetric padding of every
  strided conv (k // 2 on each side, `Conv1_pad` / `conv_pad` before the stem) and, in V3, torchvision's
  head: Dense 960 -> 1280 (named `conv_2`, the 1x1 conv it equals on the pooled map), hard-swish, dropout,
  Dense `predictions`. Fed torchvision's mean/std normalisation ("torch").

Layer names (keras.applications'): V2 `Conv1`, `bn_Conv1`, `Conv1_relu`; block 0 `expanded_conv_{depthwise,
project}[_BN]`, blocks 1-16 `block_{i}_{expand,depthwise,project}` with `_BN`, `_relu`, `_pad`, `_add`;
`Conv_1`, `Conv_1_bn`, `out_relu`, `predictions`. V3 `conv`, `conv_bn`; blocks `expanded_conv[_{i}]_{expand,
depthwise,project}` with `_bn`, `squeeze_excite_{conv,conv_1}` for the SE block; `conv_1`, `conv_1_bn`,
`conv_2`, `logits`, `predictions`. keras.applications leaves V3's activations unnamed; here they are
`..._activation` (weightless, so files load all the same).

The width multiplier `alpha` follows keras.applications' channel rounding (multiples of 8, never more than
10% down) in both layouts; torchvision publishes width 1.0 only.
"""

from __future__ import annotations

import functools

import keras
from keras import layers

from kseg.models._common import classifier_head, global_pooling, model_input
from kseg.registry import TorchMapping, register_model

V2_PAPER = "Sandler, Howard, Zhu, Zhmoginov, Chen, MobileNetV2: Inverted Residuals and Linear Bottlenecks, CVPR 2018"
V3_PAPER = "Howard et al., Searching for MobileNetV3, ICCV 2019"

# BatchNorm per layout. torchvision's momentum m updates running = (1 - m) running + m batch; Keras' the other way.
V2_BATCHNORM = {"keras": dict(epsilon=1e-3, momentum=0.999), "torchvision": dict(epsilon=1e-5, momentum=0.9)}
V3_BATCHNORM = {"keras": dict(epsilon=1e-3, momentum=0.999), "torchvision": dict(epsilon=1e-3, momentum=0.99)}
LAYOUTS = ("keras", "torchvision")

# MobileNetV2, the paper's Table 2: expansion t, output channels c, repeats n, first stride s.
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))

# MobileNetV3, the paper's Tables 1 and 2, one row per bottleneck: expansion (of the block's input channels),
# output channels, depthwise kernel, stride, squeeze-and-excite, nonlinearity ("relu" or "hs": hard-swish,
# or what `activation=` names).
V3_BLOCKS = {
    "large": (
        (1, 16, 3, 1, False, "relu"),
        (4, 24, 3, 2, False, "relu"),
        (3, 24, 3, 1, False, "relu"),
        (3, 40, 5, 2, True, "relu"),
        (3, 40, 5, 1, True, "relu"),
        (3, 40, 5, 1, True, "relu"),
        (6, 80, 3, 2, False, "hs"),
        (2.5, 80, 3, 1, False, "hs"),
        (2.3, 80, 3, 1, False, "hs"),
        (2.3, 80, 3, 1, False, "hs"),
        (6, 112, 3, 1, True, "hs"),
        (6, 112, 3, 1, True, "hs"),
        (6, 160, 5, 2, True, "hs"),
        (6, 160, 5, 1, True, "hs"),
        (6, 160, 5, 1, True, "hs"),
    ),
    "small": (
        (1, 16, 3, 2, True, "relu"),
        (72 / 16, 24, 3, 2, False, "relu"),
        (88 / 24, 24, 3, 1, False, "relu"),
        (4, 40, 5, 2, True, "hs"),
        (6, 40, 5, 1, True, "hs"),
        (6, 40, 5, 1, True, "hs"),
        (3, 48, 5, 1, True, "hs"),
        (3, 48, 5, 1, True, "hs"),
        (6, 96, 5, 2, True, "hs"),
        (6, 96, 5, 1, True, "hs"),
        (6, 96, 5, 1, True, "hs"),
    ),
}
# The width of the head's hidden layer (after pooling): the paper's 1280 (Large) and 1024 (Small).
V3_LAST_POINT = {"large": 1280, "small": 1024}
V3_ACTIVATIONS = ("hard_swish", "relu", "silu")


def make_divisible(value, divisor=8):
    """`value` rounded to the nearest multiple of `divisor` (at least `divisor`), one step up where that
    would lose more than 10%: the channel rounding of the MobileNets' reference code."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _check(layout, alpha, name):
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{name}: alpha must be a positive width multiplier, got {alpha!r}")


def _strided_padding(x, kernel, layout, name):
    """Explicit zero padding before a strided conv with padding "valid": torchvision's k // 2 on each side,
    or keras.applications' correct_pad (k // 2 after; as much before at odd sizes, one less at even or unknown
    ones -- at known sizes the same as TensorFlow's "same")."""
    half = kernel // 2
    if layout == "torchvision":
        return layers.ZeroPadding2D(half, name=name)(x)
    pads = tuple((half if size is not None and size % 2 else half - 1, half) for size in x.shape[1:3])
    return layers.ZeroPadding2D(pads, name=name)(x)


# --- MobileNetV2 -------------------------------------------------------------------------------


def _v2_block(x, *, expansion, filters, stride, alpha, block_id, layout):
    """An inverted residual with a linear bottleneck: 1x1 expand (not in block 0), ReLU6, 3x3 depthwise,
    ReLU6, 1x1 linear projection; the identity added where the shape is kept."""
    bn = V2_BATCHNORM[layout]
    in_channels = x.shape[-1]
    out_channels = make_divisible(int(filters * alpha))
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    y = x
    if block_id:
        y = layers.Conv2D(expansion * in_channels, 1, use_bias=False, name=f"{prefix}expand")(y)
        y = layers.BatchNormalization(name=f"{prefix}expand_BN", **bn)(y)
        y = layers.ReLU(6.0, name=f"{prefix}expand_relu")(y)
    if stride > 1:
        y = _strided_padding(y, 3, layout, f"{prefix}pad")
    y = layers.DepthwiseConv2D(3, strides=stride, padding="valid" if stride > 1 else "same", use_bias=False,
                               name=f"{prefix}depthwise")(y)
    y = layers.BatchNormalization(name=f"{prefix}depthwise_BN", **bn)(y)
    y = layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(y)
    y = layers.Conv2D(out_channels, 1, use_bias=False, name=f"{prefix}project")(y)
    y = layers.BatchNormalization(name=f"{prefix}project_BN", **bn)(y)
    if stride == 1 and in_channels == out_channels:
        y = layers.Add(name=f"{prefix}add")([x, y])
    return y


def mobilenet_v2_trunk(x, *, alpha=1.0, layout="keras"):
    """The stem, the 17 inverted residuals and the last 1x1 conv (`out_relu`, stride 32)."""
    _check(layout, alpha, "mobilenet_v2")
    bn = V2_BATCHNORM[layout]
    if layout == "torchvision":
        x = layers.ZeroPadding2D(1, name="Conv1_pad")(x)
    x = layers.Conv2D(make_divisible(32 * alpha), 3, strides=2, padding="same" if layout == "keras" else "valid",
                      use_bias=False, name="Conv1")(x)
    x = layers.BatchNormalization(name="bn_Conv1", **bn)(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    block_id = 0
    for expansion, filters, repeats, stride in V2_STAGES:
        for i in range(repeats):
            x = _v2_block(x, expansion=expansion, filters=filters, stride=stride if i == 0 else 1, alpha=alpha,
                          block_id=block_id, layout=layout)
            block_id += 1
    # The last conv widens with alpha > 1 only (the paper: "we apply it to all layers except the last").
    x = layers.Conv2D(make_divisible(1280 * alpha) if alpha > 1.0 else 1280, 1, use_bias=False, name="Conv_1")(x)
    x = layers.BatchNormalization(name="Conv_1_bn", **bn)(x)
    return layers.ReLU(6.0, name="out_relu")(x)


def v2_torch_map():
    """torchvision.models.mobilenet_v2's state_dict keys: features.0 the stem (conv, BN), features.1-17 the
    blocks (conv.0 = 1x1 expand (conv, BN) except in features.1, then the depthwise (conv, BN), the projection
    conv and its BN), features.18 the last 1x1 conv; classifier.1 the dense layer (classifier.0: dropout)."""
    out = [TorchMapping("features.0.0", "Conv1", "conv"), TorchMapping("features.0.1", "bn_Conv1", "bn")]
    n_blocks = sum(repeats for _, _, repeats, _ in V2_STAGES)
    for block_id in range(n_blocks):
        torch_block, keras_block = f"features.{block_id + 1}.conv", f"block_{block_id}_" if block_id else \
            "expanded_conv_"
        index = 0
        if block_id:
            out.append(TorchMapping(f"{torch_block}.0.0", f"{keras_block}expand", "conv"))
            out.append(TorchMapping(f"{torch_block}.0.1", f"{keras_block}expand_BN", "bn"))
            index = 1
        out.append(TorchMapping(f"{torch_block}.{index}.0", f"{keras_block}depthwise", "depthwise"))
        out.append(TorchMapping(f"{torch_block}.{index}.1", f"{keras_block}depthwise_BN", "bn"))
        out.append(TorchMapping(f"{torch_block}.{index + 1}", f"{keras_block}project", "conv"))
        out.append(TorchMapping(f"{torch_block}.{index + 2}", f"{keras_block}project_BN", "bn"))
    last = n_blocks + 1
    out += [TorchMapping(f"features.{last}.0", "Conv_1", "conv"), TorchMapping(f"features.{last}.1", "Conv_1_bn", "bn")]
    return out + [TorchMapping("classifier.1", "predictions", "dense")]


# --- MobileNetV3 -------------------------------------------------------------------------------


def _activation(x, kind, activation, name):
    """The block's nonlinearity: ReLU, or for the paper's hard-swish rows `activation` (hard-swish by default)."""
    return layers.Activation("relu" if kind == "relu" else activation, name=name)(x)


def _squeeze_excite(x, prefix):
    """Squeeze-and-excite (Hu et al. 2018) as MobileNetV3 places it, after the depthwise conv: global average,
    1x1 conv to a quarter of the channels (rounded to 8), ReLU, 1x1 conv back, hard-sigmoid gate."""
    channels = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}squeeze_excite_avg_pool")(x)
    s = layers.Conv2D(make_divisible(channels * 0.25), 1, name=f"{prefix}squeeze_excite_conv")(s)
    s = layers.ReLU(name=f"{prefix}squeeze_excite_relu")(s)
    s = layers.Conv2D(channels, 1, name=f"{prefix}squeeze_excite_conv_1")(s)
    s = layers.Activation("hard_sigmoid", name=f"{prefix}squeeze_excite_hard_sigmoid")(s)  # relu6(x + 3) / 6
    return layers.Multiply(name=f"{prefix}squeeze_excite_mul")([x, s])


def _v3_block(x, *, expansion, filters, kernel, stride, se, kind, activation, block_id, layout):
    bn = V3_BATCHNORM[layout]
    in_channels = x.shape[-1]
    prefix = f"expanded_conv_{block_id}_" if block_id else "expanded_conv_"
    y = x
    if block_id:
        y = layers.Conv2D(make_divisible(in_channels * expansion), 1, use_bias=False, name=f"{prefix}expand")(y)
        y = layers.BatchNormalization(name=f"{prefix}expand_bn", **bn)(y)
        y = _activation(y, kind, activation, f"{prefix}expand_activation")
    if stride > 1:
        y = _strided_padding(y, kernel, layout, f"{prefix}depthwise_pad")
    y = layers.DepthwiseConv2D(kernel, strides=stride, padding="valid" if stride > 1 else "same", use_bias=False,
                               name=f"{prefix}depthwise")(y)
    y = layers.BatchNormalization(name=f"{prefix}depthwise_bn", **bn)(y)
    y = _activation(y, kind, activation, f"{prefix}depthwise_activation")
    if se:
        y = _squeeze_excite(y, prefix)
    y = layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}project")(y)
    y = layers.BatchNormalization(name=f"{prefix}project_bn", **bn)(y)
    if stride == 1 and in_channels == filters:
        y = layers.Add(name=f"{prefix}add")([x, y])
    return y


def mobilenet_v3_trunk(x, size, *, alpha=1.0, layout="keras", activation="hard_swish"):
    """The stem, the bottlenecks and the last 1x1 conv (`conv_1`, 960 / 576 channels at stride 32)."""
    name = f"mobilenet_v3_{size}"
    _check(layout, alpha, name)
    if activation not in V3_ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {V3_ACTIVATIONS}, got {activation!r}")
    bn = V3_BATCHNORM[layout]
    if layout == "torchvision":
        x = layers.ZeroPadding2D(1, name="conv_pad")(x)
    # keras.applications keeps the stem at 16 filters whatever alpha.
    x = layers.Conv2D(16, 3, strides=2, padding="same" if layout == "keras" else "valid", use_bias=False,
                      name="conv")(x)
    x = layers.BatchNormalization(name="conv_bn", **bn)(x)
    x = _activation(x, "hs", activation, "conv_activation")
    for block_id, (expansion, filters, kernel, stride, se, kind) in enumerate(V3_BLOCKS[size]):
        x = _v3_block(x, expansion=expansion, filters=make_divisible(filters * alpha), kernel=kernel, stride=stride,
                      se=se, kind=kind, activation=activation, block_id=block_id, layout=layout)
    x = layers.Conv2D(make_divisible(x.shape[-1] * 6), 1, use_bias=False, name="conv_1")(x)
    x = layers.BatchNormalization(name="conv_1_bn", **bn)(x)
    return _activation(x, "hs", activation, "conv_1_activation")


def v3_torch_map(size):
    """torchvision.models.mobilenet_v3_{large,small}'s state_dict keys: features.0 the stem (conv, BN), then one
    InvertedResidual per block (block.0 the 1x1 expand where the width changes, then the depthwise, the
    SqueezeExcitation's fc1 / fc2 where present, the projection; each conv module .0 conv, .1 BN), the last 1x1
    conv; classifier.0 and classifier.3 the dense layers (classifier.1: hard-swish, classifier.2: dropout)."""
    out = [TorchMapping("features.0.0", "conv", "conv"), TorchMapping("features.0.1", "conv_bn", "bn")]
    blocks = V3_BLOCKS[size]
    for block_id, (_, _, _, _, se, _) in enumerate(blocks):
        torch_block, prefix = f"features.{block_id + 1}.block", f"expanded_conv_{block_id}_" if block_id else \
            "expanded_conv_"
        parts = ([("expand", "conv")] if block_id else []) + [("depthwise", "depthwise")]
        index = 0
        for part, kind in parts:
            out.append(TorchMapping(f"{torch_block}.{index}.0", f"{prefix}{part}", kind))
            out.append(TorchMapping(f"{torch_block}.{index}.1", f"{prefix}{part}_bn", "bn"))
            index += 1
        if se:
            out.append(TorchMapping(f"{torch_block}.{index}.fc1", f"{prefix}squeeze_excite_conv", "conv"))
            out.append(TorchMapping(f"{torch_block}.{index}.fc2", f"{prefix}squeeze_excite_conv_1", "conv"))
            index += 1
        out.append(TorchMapping(f"{torch_block}.{index}.0", f"{prefix}project", "conv"))
        out.append(TorchMapping(f"{torch_block}.{index}.1", f"{prefix}project_bn", "bn"))
    last = len(blocks) + 1
    out += [TorchMapping(f"features.{last}.0", "conv_1", "conv"), TorchMapping(f"features.{last}.1", "conv_1_bn", "bn")]
    return out + [TorchMapping("classifier.0", "conv_2", "dense"), TorchMapping("classifier.3", "predictions", "dense")]


# --- builders ------------------------------------------------------------------------------------


def _mobilenet_v2(*, num_classes, input_shape, include_top, pooling, classifier_activation, alpha, layout,
                  dropout):
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x = mobilenet_v2_trunk(inputs, alpha=alpha, layout=layout)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # torchvision's classifier.0 (keras.applications has no dropout layer; it has no weights either).
        if dropout:
            x = layers.Dropout(dropout, name="dropout")(x)
        x = classifier_head(x, num_classes, classifier_activation)
    else:
        x = global_pooling(x, pooling)
    return keras.Model(inputs, x, name="mobilenet_v2")


def _mobilenet_v3(size, *, num_classes, input_shape, include_top, pooling, classifier_activation, alpha, layout,
                  activation, dropout):
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x = mobilenet_v3_trunk(inputs, size, alpha=alpha, layout=layout, activation=activation)
    if not include_top:
        return keras.Model(inputs, global_pooling(x, pooling), name=f"mobilenet_v3_{size}")
    last_point = make_divisible(V3_LAST_POINT[size] * alpha) if alpha > 1.0 else V3_LAST_POINT[size]
    if layout == "keras":
        # keras.applications: 1x1 convs on the pooled 1x1 map, then flattened.
        x = layers.GlobalAveragePooling2D(keepdims=True, name="avg_pool")(x)
        x = layers.Conv2D(last_point, 1, name="conv_2")(x)
        x = _activation(x, "hs", activation, "conv_2_activation")
        if dropout:
            x = layers.Dropout(dropout, name="dropout")(x)
        x = layers.Conv2D(num_classes, 1, name="logits")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Activation(classifier_activation, name="predictions")(x)
    else:
        # torchvision: Linear, Hardswish, Dropout, Linear on the pooled vector.
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(last_point, name="conv_2")(x)
        x = _activation(x, "hs", activation, "conv_2_activation")
        if dropout:
            x = layers.Dropout(dropout, name="dropout")(x)
        x = classifier_head(x, num_classes, classifier_activation)
    return keras.Model(inputs, x, name=f"mobilenet_v3_{size}")


_COMMON = dict(
    task="classification",
    input_shape=(224, 224, 3),
    num_classes=1000,
    # keras.applications' files take x / 127.5 - 1, torchvision's its mean/std normalisation.
    preprocessing="tf",
    layouts={"keras": {"layout": "keras"}, "torchvision": {"layout": "torchvision"}},
    layout_preprocessing={"torchvision": "torch"},
)


# params: Keras' count_params() with defaults, BatchNorm moving statistics included, the same in both layouts
# (torchvision's counts leave the statistics out: 3,504,872 / 5,483,032 / 2,542,856).
@register_model("mobilenet_v2", params=3_538_984, paper=V2_PAPER, torch_map=v2_torch_map, **_COMMON)
def mobilenet_v2(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
                 alpha=1.0, layout="keras", dropout=0.2):
    """MobileNetV2: 17 inverted residuals with linear bottlenecks; alpha scales the widths (keras.applications')."""
    return _mobilenet_v2(num_classes=num_classes, input_shape=input_shape, include_top=include_top, pooling=pooling,
                         classifier_activation=classifier_activation, alpha=alpha, layout=layout, dropout=dropout)


@register_model("mobilenet_v3_large", params=5_507_432, paper=V3_PAPER,
                torch_map=functools.partial(v3_torch_map, "large"), **_COMMON)
def mobilenet_v3_large(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
                       classifier_activation=None, alpha=1.0, layout="keras", activation="hard_swish", dropout=0.2):
    """MobileNetV3-Large: 15 bottlenecks with squeeze-and-excite and hard-swish (activation: or relu, silu)."""
    return _mobilenet_v3("large", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                         pooling=pooling, classifier_activation=classifier_activation, alpha=alpha, layout=layout,
                         activation=activation, dropout=dropout)


@register_model("mobilenet_v3_small", params=2_554_968, paper=V3_PAPER,
                torch_map=functools.partial(v3_torch_map, "small"), **_COMMON)
def mobilenet_v3_small(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
                       classifier_activation=None, alpha=1.0, layout="keras", activation="hard_swish", dropout=0.2):
    """MobileNetV3-Small: 11 bottlenecks with squeeze-and-excite and hard-swish (activation: or relu, silu)."""
    return _mobilenet_v3("small", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                         pooling=pooling, classifier_activation=classifier_activation, alpha=alpha, layout=layout,
                         activation=activation, dropout=dropout)
