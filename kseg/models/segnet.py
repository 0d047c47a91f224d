"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017): a VGG16 encoder and a mirrored
decoder that upsamples with the encoder's max-pooling indices.

Layer names: the encoder keeps keras.applications' VGG16 names (`block1_conv1` ...
`block5_conv3`, plus `_bn` / `_relu`, pools `block{i}_pool`), so ImageNet VGG16 weights load by
name; decoder stage i (5 ... 1) is `decoder{i}_unpool` then `decoder{i}_conv{j}` (+ `_bn`,
`_relu`), and `classifier` is the last conv. The reference Caffe models
(alexgkendall/SegNet-Tutorial) name them `conv5_3_D` ... `conv1_1_D` and `conv_classifier`.
"""

from __future__ import annotations

import keras
from keras import layers

from kseg.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D
from kseg.models._common import check_width, model_input, scaled
from kseg.models.vgg import CFGS as VGG_CFGS
from kseg.models.vgg import VGG16_CONV_NAMES
from kseg.registry import register_model
from kseg.weights import copy_by_name

PAPER = (
    "Badrinarayanan, Kendall & Cipolla, SegNet: A Deep Convolutional Encoder-Decoder "
    "Architecture for Image Segmentation, TPAMI 2017"
)

# encoder: filters per conv in each stage (a 2x2/2 argmax pool ends every stage);
# decoder: filters per conv of decoder stage i, listed from the deepest stage to the first.
CFGS = {
    "vgg16": dict(
        encoder=VGG_CFGS["D"],
        decoder=[[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64]],
        kernel_size=3,
        # The paper's SegNet and its Caffe model end in a 3x3 conv (conv1_1_D) into the softmax.
        classifier_kernel_size=3,
        decoder_relu=True,
        # Biases kept as in the Caffe model (and needed to take VGG16's by name).
        use_bias=True,
    ),
    # Section 4.1: "No biases are used after convolutions and no ReLU non-linearity is present
    # in the decoder network"; 7x7 kernels everywhere "to provide a wide context".
    "basic": dict(
        encoder=[[64]] * 4,
        decoder=[[64]] * 4,
        kernel_size=7,
        classifier_kernel_size=1,
        decoder_relu=False,
        use_bias=False,
    ),
    # The Oxford-IIIT Pet tutorial's net (see segnet_tutorial): 4 stages, no biases, BatchNorm and
    # ReLU after every conv, the last decoder conv (to the classes) included; PyTorch's BatchNorm.
    "tutorial": dict(
        encoder=[[64, 64], [128, 128], [256, 256, 256], [512, 512, 512]],
        decoder=[[512, 512, 256], [256, 256, 128], [128, 64], [64, None]],  # None: num_classes
        kernel_size=3,
        classifier_kernel_size=None,  # no separate classifier: the last decoder conv is it
        decoder_relu=True,
        use_bias=False,
        batchnorm=dict(epsilon=1e-5, momentum=0.9),  # torch.nn.BatchNorm2d's eps 1e-5, momentum 0.1
        # The tutorial feeds ToTensor's 0..1 to its input BatchNorm; kseg feeds 0..255 (no rescaling in
        # front of the net, which graph optimisers fold differently from eager runs, flipping argmax
        # pooling ties): the same BatchNorm in 255x units, eps 1e-5 * 255^2 (tutorial_torch_map scales
        # the statistics).
        input_batchnorm=dict(epsilon=1e-5 * 255.0 ** 2, momentum=0.9),
    ),
}


def _conv_bn(x, filters, kernel_size, name, *, relu, use_bias, batchnorm=None):
    # The paper initialises encoder and decoder with He et al.'s method (Caffe's "msra").
    x = layers.Conv2D(
        filters, kernel_size, padding="same", use_bias=use_bias, kernel_initializer="he_normal", name=name
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn", **(batchnorm or {}))(x)
    if relu:
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def _segnet(cfg, *, num_classes, input_shape, input_bn, name, width=1.0):
    check_width(width, name)
    cfg = CFGS[cfg]
    inputs = model_input(input_shape, (None, None, 3))
    if input_bn not in (True, False):
        raise ValueError(f"input_bn must be True or False, got {input_bn!r}")
    batchnorm = cfg.get("batchnorm")
    x = layers.BatchNormalization(name="input_bn", **cfg.get("input_batchnorm", batchnorm or {}))(inputs) \
        if input_bn else inputs

    # === Encoder ===
    stages = []  # (pre-pool tensor, argmax) per stage, for the decoder
    for b, convs in enumerate(cfg["encoder"], start=1):
        for c, filters in enumerate(convs, start=1):
            x = _conv_bn(
                x, scaled(filters, width), cfg["kernel_size"], f"block{b}_conv{c}", relu=True,
                use_bias=cfg["use_bias"], batchnorm=batchnorm
            )
        # "same" padding pools odd sizes in ceil mode (the Caffe model's upsample_h/w);
        # the unpool takes its output size from the pre-pool tensor, so every input size,
        # odd ones included, comes back exactly.
        pooled, argmax = MaxPoolingWithArgmax2D(2, strides=2, padding="same", name=f"block{b}_pool")(x)
        stages.append((x, argmax))
        x = pooled

    # === Decoder ===
    for i, convs in zip(range(len(stages), 0, -1), cfg["decoder"]):
        reference, argmax = stages[i - 1]
        x = MaxUnpooling2D(name=f"decoder{i}_unpool")([x, argmax, reference])
        for j, filters in enumerate(convs, start=1):
            x = _conv_bn(
                x,
                num_classes if filters is None else scaled(filters, width),
                cfg["kernel_size"],
                f"decoder{i}_conv{j}",
                relu=cfg["decoder_relu"],
                use_bias=cfg["use_bias"],
                batchnorm=batchnorm,
            )
    if cfg["classifier_kernel_size"] is None:
        return keras.Model(inputs, x, name=name)
    # Logits: the paper's "trainable soft-max classifier" is this conv plus the loss's softmax.
    outputs = layers.Conv2D(
        num_classes,
        cfg["classifier_kernel_size"],
        padding="same",
        kernel_initializer="he_normal",
        name="classifier",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def backbone_adapt(arrays, model, path):
    """VGG16's 13 conv kernels and biases by name; the BatchNorm layers keep their init."""
    return copy_by_name(arrays, VGG16_CONV_NAMES, path, "vgg16")


# The Oxford-IIIT Pet recipe (input_bn=True) feeds raw 0..255 pixels to a first BatchNorm;
# spec.preprocessing_for("input_bn") gives that pipeline ("batchnorm"), build_model(name,
# **spec.layouts["input_bn"]) the matching model.
_LAYOUTS = {"paper": {}, "input_bn": {"input_bn": True}}
_LAYOUT_PREPROCESSING = {"input_bn": "batchnorm"}


@register_model(
    "segnet",
    task="segmentation",
    paper=PAPER,
    input_shape=(360, 480, 3),
    num_classes=11,
    preprocessing="caffe",
    # Encoder 14,731,584 = VGG16's conv trunk 14,714,688 + 16,896 BatchNorm values (8,448 of
    # them trainable); decoder 14,733,643 with 11 classes. Paper: 29.5M.
    params=29_465_227,
    layouts=_LAYOUTS,
    layout_preprocessing=_LAYOUT_PREPROCESSING,
    backbone="vgg16",
    backbone_adapt=backbone_adapt,
)
def segnet(*, num_classes=11, input_shape=None, input_bn=False, width=1.0):
    """SegNet: a VGG16 encoder (conv+BN+ReLU) and a mirrored decoder unpooling with its pool indices.

    num_classes defaults to CamVid's 11 (the paper's road-scene benchmark, 360x480 inputs; SUN
    RGB-D has 37). Inputs are Caffe-preprocessed (BGR, ImageNet mean subtracted) for the
    VGG16 ImageNet initialisation (`backbone_weights=`). `input_bn=True` adds a BatchNorm layer
    `input_bn` on the raw input instead (the Oxford-IIIT Pet recipe: 128x128, 3 classes); feed
    it raw 0..255 RGB (`spec.preprocessing_for("input_bn")`, kind "batchnorm"). Any input size
    works (no minimum): odd sizes are pooled in ceil mode and unpooled back to their exact size.
    `width` scales every encoder and decoder conv's filters by a multiplier in (0, 1] (rounded, at
    least 8; not the classifier) for small budgets; 1.0 is the paper's network.

        >>> import kseg
        >>> kseg.build_model("segnet", num_classes=3, width=0.25).get_layer("block5_conv3").filters
        128
    """
    return _segnet(
        "vgg16", num_classes=num_classes, input_shape=input_shape, input_bn=input_bn, name="segnet", width=width
    )


@register_model(
    "segnet_basic",
    task="segmentation",
    paper=PAPER,
    input_shape=(360, 480, 3),
    num_classes=11,
    preprocessing="unit",
    # Encoder 611,520 + decoder 802,816 conv weights (no biases), 8 BatchNorms x 256 values,
    # classifier 715 for 11 classes.
    params=1_417_099,
    layouts=_LAYOUTS,
    layout_preprocessing=_LAYOUT_PREPROCESSING,
)
def segnet_basic(*, num_classes=11, input_shape=None, input_bn=False, width=1.0):
    """SegNet-Basic: 4 encoders and 4 decoders of 64 7x7 filters, no decoder ReLU, 1x1 classifier.

    The paper's small variant (section 4.1), trained from scratch: convs have no biases, the
    decoder convs are followed by BatchNorm only. The reference Caffe model normalises its
    input with an LRN layer; kseg models are raw-input, so inputs are scaled to [0, 1]
    ("unit") instead, or `input_bn=True` learns the normalisation from raw 0..255 pixels
    ("batchnorm"). Any input size works (no minimum). `width` scales the 64 filters of every
    encoder and decoder conv (rounded, at least 8); 1.0 is the paper's network.
    """
    return _segnet(
        "basic", num_classes=num_classes, input_shape=input_shape, input_bn=input_bn, name="segnet_basic",
        width=width,
    )


TUTORIAL = ("the Oxford-IIIT Pet SegNet tutorial in PyTorch (its ImageSegmentation module), after "
            "Badrinarayanan, Kendall & Cipolla, TPAMI 2017")


def tutorial_torch_map():
    """The tutorial module's state_dict keys: bn_input, dc1..dc4 (DownConv2/3) and uc4..uc1 (UpConv3/2),
    each a `seq` of Conv2d(bias=False), BatchNorm2d, ReLU."""
    from kseg.registry import TorchMapping

    table = [TorchMapping("bn_input", "input_bn", "bn", input_scale=255.0)]
    stages = [("dc", f"block{b}_conv", n, b) for b, n in ((1, 2), (2, 2), (3, 3), (4, 3))]
    stages += [("uc", f"decoder{i}_conv", n, i) for i, n in ((4, 3), (3, 3), (2, 2), (1, 2))]
    for prefix, name, convs, stage in stages:
        for c in range(convs):
            table.append(TorchMapping(f"{prefix}{stage}.seq.{3 * c}", f"{name}{c + 1}", "conv"))
            table.append(TorchMapping(f"{prefix}{stage}.seq.{3 * c + 1}", f"{name}{c + 1}_bn", "bn"))
    return table


@register_model(
    "segnet_tutorial",
    task="segmentation",
    paper=TUTORIAL,
    input_shape=(128, 128, 3),
    num_classes=3,
    # Raw 0..255 pixels into the net's own input BatchNorm (the tutorial's ToTensor 0..1 is folded in it).
    preprocessing="batchnorm",
    # 15,274,892 trainable (convs 15,265,152 without biases + 2 x 4,870 BatchNorm scales and
    # offsets) + 9,740 BatchNorm statistics; the tutorial prints 15.27M trainable.
    params=15_284_632,
    torch_map=tutorial_torch_map,
)
def segnet_tutorial(*, num_classes=3, input_shape=None, width=1.0):
    """SegNet as the Oxford-IIIT Pet tutorial builds it: a 4-stage SegNet for 128x128 pets.

    An input BatchNorm instead of normalisation (`input_bn`), encoder stages of 64-128-256-512
    filters with 2, 2, 3, 3 convs, argmax pooling, a mirrored decoder unpooling with the indices,
    3x3 convs without bias each followed by BatchNorm and ReLU, the last one (to the 3 trimap
    classes: pet, background, border) included, so the logits are >= 0 as in the tutorial
    (its cross-entropy sees them after that ReLU). PyTorch's BatchNorm settings (eps 1e-5,
    momentum 0.1) and the tutorial's module names (`tutorial_torch_map`) load its state_dict
    exactly. Inputs are raw 0..255 RGB (preprocessing "batchnorm"): the tutorial's ToTensor
    scaling to 0..1 lives in `input_bn`'s statistics and epsilon, 255 and 255^2 times its own.
    The tutorial pools in floor mode; kseg in ceil mode, the same on its 128x128 (and every
    even-by-16) input. `width` scales every conv but the last (rounded, at least 8).

        >>> import kseg
        >>> kseg.build_model("segnet_tutorial").count_params()        # 15,274,892 of them trainable
        15284632
    """
    return _segnet("tutorial", num_classes=num_classes, input_shape=input_shape, input_bn=True,
                   name="segnet_tutorial", width=width)
