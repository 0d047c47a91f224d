"""torchvision's FCN-ResNet50/101 (torchvision.models.segmentation.fcn), weight-compatible.

Not the paper's VGG16 FCN: a ResNet dilated to output stride 8 (stages 4 and 5 trade
their stride for dilation 2 and 4), an FCNHead (3x3 conv to in/4 channels, BN, ReLU,
dropout 0.1, 1x1 conv) on C5, optionally the same head on C4 as an auxiliary output for
training, each resized bilinearly (half-pixel centres, align_corners=False) to the input.

Parameters (21 classes), trainable / torchvision's module parameters:
fcn_resnet50 32,957,013 (35,322,218 with aux, torchvision's published figure);
fcn_resnet101 51,949,141 (54,314,346 with aux). count_params() adds BN moving statistics.

torchvision's published state_dicts carry aux_classifier.* keys. Loaded into a model
built without aux they are skipped (the aux head only helps training), so
build_model("fcn_resnet50", weights=file) works as is; aux=True loads them too.
"""

from __future__ import annotations

import functools

import keras
from keras import layers

from kseg.layers import ResizeToReference
from kseg.models import resnet
from kseg.models._common import model_input
from kseg.registry import TorchMapping, register_model

PAPER = (
    "Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation, CVPR 2015 "
    "(torchvision's dilated-ResNet variant)"
)

# (Keras layer prefix, torchvision module, ResNet feature it reads, output name)
HEADS = (("head", "classifier", "C5", "out"), ("aux_head", "aux_classifier", "C4", "aux"))


def _head(x, num_classes, name):
    channels = x.shape[-1] // 4
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.Dropout(0.1, name=f"{name}_dropout")(x)
    return layers.Conv2D(num_classes, 1, name=f"{name}_classifier")(x)


def _fcn_resnet(arch, *, num_classes, input_shape, aux, name):
    inputs = model_input(input_shape, (None, None, 3))
    c5 = resnet.resnet_trunk(inputs, arch, layout="torchvision", output_stride=8)
    # resnet_trunk returns C5 only; a throwaway Model looks C4 up by its layer name.
    trunk = keras.Model(inputs, c5)
    features = {"C5": c5, "C4": trunk.get_layer(resnet.feature_names(arch)["C4"]).output}
    outputs = []
    for prefix, _, feature, out_name in HEADS[: 2 if aux else 1]:
        x = _head(features[feature], num_classes, prefix)
        outputs.append(ResizeToReference("bilinear", align_corners=False, name=out_name)([x, inputs]))
    return keras.Model(inputs, outputs if aux else outputs[0], name=name)


def torch_map(arch):
    """torchvision's FCN state_dict keys: backbone.<resnet key>, classifier.{0,1,4}, aux_classifier.{0,1,4}."""
    table = [
        TorchMapping(f"backbone.{m.prefix}", m.layer, m.kind)
        for m in resnet.torch_map(arch)
        if m.layer != "predictions"  # IntermediateLayerGetter drops avgpool and fc
    ]
    for prefix, module, _, _ in HEADS:
        table += [
            TorchMapping(f"{module}.0", f"{prefix}_conv", "conv"),
            TorchMapping(f"{module}.1", f"{prefix}_bn", "bn"),
            TorchMapping(f"{module}.4", f"{prefix}_classifier", "conv"),
        ]
    return table


def _adapt_resnet(arch, arrays, model, path):
    from kseg.weights import WeightsMismatchError, copy_by_name

    if len(arrays.get("conv1_conv", ())) == 2:
        raise WeightsMismatchError(
            f"{path}: keras.applications {arch} weights (conv biases, stride on the 1x1) do not fit "
            f"fcn_{arch}, which uses torchvision's layout; pass torchvision's {arch} state_dict"
        )
    names = [m.layer for m in resnet.torch_map(arch) if m.layer != "predictions"]
    return copy_by_name(arrays, names, path, arch)


def _spec(arch, params):
    return dict(
        task="segmentation",
        paper=PAPER,
        input_shape=(520, 520, 3),
        num_classes=21,
        preprocessing="torch",
        params=params,
        layouts={"torchvision": {}},
        torch_map=functools.partial(torch_map, arch),
        backbone=arch,
        backbone_adapt=functools.partial(_adapt_resnet, arch),
    )


@register_model("fcn_resnet50", **_spec("resnet50", 33_011_157))
def fcn_resnet50(*, num_classes=21, input_shape=None, aux=False):
    """FCN on a dilated (output stride 8) ResNet50, torchvision layout; aux=True adds the layer3 head."""
    return _fcn_resnet("resnet50", num_classes=num_classes, input_shape=input_shape, aux=aux, name="fcn_resnet50")


@register_model("fcn_resnet101", **_spec("resnet101", 52_055_509))
def fcn_resnet101(*, num_classes=21, input_shape=None, aux=False):
    """FCN on a dilated (output stride 8) ResNet101, torchvision layout; aux=True adds the layer3 head."""
    return _fcn_resnet("resnet101", num_classes=num_classes, input_shape=input_shape, aux=aux, name="fcn_resnet101")
