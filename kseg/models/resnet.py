"""ResNet18 / 34 / 50 / 101 / 152 (He et al. 2016) with keras.applications layer names.

ResNet50, 101 and 152 (bottleneck blocks) have two published weight layouts, which differ in more
than names:
- "keras" (keras.applications): conv biases, BN epsilon 1.001e-5, the stage's stride
  on the first 1x1 conv of its first block.
- "torchvision" ("v1.5"): no conv biases, BN epsilon 1e-5, the stride on the 3x3 conv,
  with symmetric padding 1 (Keras' "same" pads a stride-2 conv asymmetrically).
Both keep the keras.applications names, so heads and weight maps address one set of names.

ResNet18 and 34 (basic blocks: two 3x3 convs, no expansion) exist in torchvision's layout only
(keras.applications has no such nets); their layers follow the same names: `conv{stage}_block{b}_1_conv`
(the strided 3x3), `_1_bn`, `_1_relu`, `_2_conv`, `_2_bn`, `_0_conv` / `_0_bn` for the projection
shortcut (torchvision's `downsample`, in the first block of stages 3-5), `_add`, `_out`.
"""

from __future__ import annotations

import functools

import keras
from keras import layers

from kseg.layers import DilatedConv2D
from kseg.models._common import classifier_top, model_input
from kseg.registry import TorchMapping, register_model

PAPER = "He, Zhang, Ren, Sun, Deep Residual Learning for Image Recognition, CVPR 2016"

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3),
          "resnet152": (3, 8, 36, 3)}
# torchvision's BasicBlock nets; the others are built of bottlenecks (1x1, 3x3, 1x1 with 4x expansion).
BASIC = {"resnet18", "resnet34"}
STAGE_FILTERS = (64, 128, 256, 512)
LAYOUTS = {
    "keras": {"use_bias": True, "epsilon": 1.001e-5},
    "torchvision": {"use_bias": False, "epsilon": 1e-5},
}
# Which stages trade their stride for dilation at each output stride
# (torchvision's replace_stride_with_dilation, indexed by stage 3, 4, 5).
DILATE_STAGES = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


def feature_names(arch: str) -> dict[str, str]:
    """Named feature maps for heads: C1 (stride 2) .. C5, by keras.applications layer name."""
    blocks = BLOCKS[arch]
    names = {"C1": "conv1_relu"}
    for stage, n in enumerate(blocks, start=2):
        names[f"C{stage}"] = f"conv{stage}_block{n}_out"
    return names


def torch_map(arch):
    """torchvision.models.resnet{18,34,50,101,152}'s state_dict keys for the layers of `arch`."""
    blocks = BLOCKS[arch]
    basic = arch in BASIC
    out = [TorchMapping("conv1", "conv1_conv", "conv"), TorchMapping("bn1", "conv1_bn", "bn")]
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            keras_block, torch_block = f"conv{stage + 1}_block{b + 1}", f"layer{stage}.{b}"
            for k in (1, 2) if basic else (1, 2, 3):
                out.append(TorchMapping(f"{torch_block}.conv{k}", f"{keras_block}_{k}_conv", "conv"))
                out.append(TorchMapping(f"{torch_block}.bn{k}", f"{keras_block}_{k}_bn", "bn"))
            # torchvision's downsample: where the block changes the stride or the width (layer1's
            # bottlenecks widen 64 -> 256; its basic blocks keep 64 at stride 1 and have none).
            if b == 0 and not (basic and stage == 1):
                out.append(TorchMapping(f"{torch_block}.downsample.0", f"{keras_block}_0_conv", "conv"))
                out.append(TorchMapping(f"{torch_block}.downsample.1", f"{keras_block}_0_bn", "bn"))
    return out + [TorchMapping("fc", "predictions", "dense")]


def _bottleneck(x, filters, *, stride, dilation, conv_shortcut, layout, name):
    cfg = LAYOUTS[layout]
    bias, eps = cfg["use_bias"], cfg["epsilon"]
    if conv_shortcut:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, use_bias=bias, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(epsilon=eps, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x

    stride_1x1, stride_3x3 = (stride, 1) if layout == "keras" else (1, stride)
    x = layers.Conv2D(filters, 1, strides=stride_1x1, use_bias=bias, name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)

    if stride_3x3 > 1:
        # torchvision pads 1 on every side; Keras "same" would pad only bottom/right.
        x = layers.ZeroPadding2D(dilation, name=f"{name}_2_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    # Dilated stages (output_stride 8/16): one native dilated op (kseg.layers.DilatedConv2D).
    conv = DilatedConv2D if dilation > 1 and stride_3x3 == 1 else layers.Conv2D
    x = conv(
        filters,
        3,
        strides=stride_3x3,
        padding=padding,
        dilation_rate=dilation,
        use_bias=bias,
        name=f"{name}_2_conv",
    )(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)

    x = layers.Conv2D(4 * filters, 1, use_bias=bias, name=f"{name}_3_conv")(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _basic_block(x, filters, *, stride, conv_shortcut, name):
    """torchvision's BasicBlock (its layout: no conv biases, BN epsilon 1e-5): two 3x3 convs, the first strided."""
    eps = LAYOUTS["torchvision"]["epsilon"]
    if conv_shortcut:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(epsilon=eps, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x

    if stride > 1:
        # torchvision pads 1 on every side; Keras "same" would pad only bottom/right.
        x = layers.ZeroPadding2D(1, name=f"{name}_1_pad")(x)
    x = layers.Conv2D(filters, 3, strides=stride, padding="valid" if stride > 1 else "same", use_bias=False,
                      name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)

    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{name}_2_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def resnet_trunk(x, arch, *, layout="keras", output_stride=32):
    """Stem and four stages; returns the last feature map (C5)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if output_stride not in DILATE_STAGES:
        raise ValueError(f"output_stride must be one of {sorted(DILATE_STAGES)}, got {output_stride!r}")
    if arch in BASIC and (layout, output_stride) != ("torchvision", 32):
        # torchvision's BasicBlock refuses dilation; keras.applications has no basic-block nets.
        raise ValueError(f"{arch} exists in the torchvision layout at output stride 32 only, "
                         f"got layout={layout!r}, output_stride={output_stride!r}")
    cfg = LAYOUTS[layout]
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(64, 7, strides=2, use_bias=cfg["use_bias"], name="conv1_conv")(x)
    x = layers.BatchNormalization(epsilon=cfg["epsilon"], name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    # Zero padding equals torchvision's -inf padding here: inputs are post-ReLU (>= 0).
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    dilation = 1
    dilate = (False,) + DILATE_STAGES[output_stride]
    for stage, (filters, n_blocks) in enumerate(zip(STAGE_FILTERS, BLOCKS[arch]), start=2):
        stride = 1 if stage == 2 else 2
        # As torchvision: the first block of a dilated stage keeps the previous dilation.
        first_dilation = dilation
        if dilate[stage - 2]:
            dilation *= stride
            stride = 1
        for block in range(1, n_blocks + 1):
            if arch in BASIC:
                x = _basic_block(x, filters, stride=stride if block == 1 else 1,
                                 conv_shortcut=block == 1 and stage > 2, name=f"conv{stage}_block{block}")
                continue
            x = _bottleneck(
                x,
                filters,
                stride=stride if block == 1 else 1,
                dilation=first_dilation if block == 1 else dilation,
                conv_shortcut=block == 1,
                layout=layout,
                name=f"conv{stage}_block{block}",
            )
    return x


def _resnet(arch, *, num_classes, input_shape, include_top, pooling, layout, output_stride, classifier_activation):
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x = resnet_trunk(inputs, arch, layout=layout, output_stride=output_stride)
    x = classifier_top(x, include_top=include_top, pooling=pooling, num_classes=num_classes,
                       classifier_activation=classifier_activation)
    return keras.Model(inputs, x, name=arch)


def _spec(arch, params):
    return dict(params=params, torch_map=functools.partial(torch_map, arch), **_COMMON)


_COMMON = dict(
    task="classification",
    paper=PAPER,
    input_shape=(224, 224, 3),
    num_classes=1000,
    preprocessing="caffe",
    layouts={"keras": {"layout": "keras"}, "torchvision": {"layout": "torchvision"}},
    layout_preprocessing={"torchvision": "torch"},
)


# ResNet18 / 34: torchvision's weights only, so its layout and preprocessing.
_BASIC = dict(_COMMON, preprocessing="torch", layouts={}, layout_preprocessing={})


def _basic_spec(arch, params):
    return dict(params=params, torch_map=functools.partial(torch_map, arch), **_BASIC)


# params: Keras' count_params() with defaults, BatchNorm moving statistics included (torchvision's counts
# leave them out: resnet18 11,689,512, resnet34 21,797,672).
@register_model("resnet18", **_basic_spec("resnet18", 11_699_112))
def resnet18(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None):
    """ResNet18 (2-2-2-2 basic blocks), torchvision layout."""
    return _resnet("resnet18", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, layout="torchvision", output_stride=32,
                   classifier_activation=classifier_activation)


@register_model("resnet34", **_basic_spec("resnet34", 21_814_696))
def resnet34(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None):
    """ResNet34 (3-4-6-3 basic blocks), torchvision layout."""
    return _resnet("resnet34", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, layout="torchvision", output_stride=32,
                   classifier_activation=classifier_activation)


@register_model("resnet50", **_spec("resnet50", 25_636_712))
def resnet50(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
             layout="keras", output_stride=32, classifier_activation=None):
    """ResNet50 (3-4-6-3 bottlenecks); layout="torchvision" for v1.5 weights, output_stride 8/16 dilates."""
    return _resnet("resnet50", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, layout=layout, output_stride=output_stride,
                   classifier_activation=classifier_activation)


@register_model("resnet101", **_spec("resnet101", 44_707_176))
def resnet101(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
              layout="keras", output_stride=32, classifier_activation=None):
    """ResNet101 (3-4-23-3 bottlenecks); layout="torchvision" for v1.5 weights, output_stride 8/16 dilates."""
    return _resnet("resnet101", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, layout=layout, output_stride=output_stride,
                   classifier_activation=classifier_activation)


@register_model("resnet152", **_spec("resnet152", 60_419_944))
def resnet152(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
              layout="keras", output_stride=32, classifier_activation=None):
    """ResNet152 (3-8-36-3 bottlenecks); layout="torchvision" for v1.5 weights, output_stride 8/16 dilates."""
    return _resnet("resnet152", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, layout=layout, output_stride=output_stride,
                   classifier_activation=classifier_activation)
