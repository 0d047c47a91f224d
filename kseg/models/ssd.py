"""SSD300 (Liu et al., ECCV 2016) on VGG16: Caffe SSD's ssd_pascal.py and torchvision's ssd300_vgg16.

The network (NHWC, 300x300x3), Keras layer names after Caffe SSD's:
- block1_conv1 .. block4_conv3: VGG16's convs (keras.applications names), 2x2/2 max-pools
  block1_pool .. block3_pool; block3_pool in ceil mode (75 -> 38).
- conv4_3_norm: L2Normalization (unit L2 norm over channels times a learnt per-channel gamma,
  initialised to 20): source 1, 38x38x512.
- block4_pool 2x2/2 (38 -> 19), block5_conv1..3, pool5 3x3/1 pad 1, fc6 3x3/1024 dilation 6,
  fc7 1x1/1024: source 2, 19x19x1024.
- conv6_1 1x1/256, conv6_2 3x3/2 pad 1 /512: source 3, 10x10x512; conv7_1 1x1/128,
  conv7_2 3x3/2 pad 1 /256: source 4, 5x5x256; conv8_1 1x1/128, conv8_2 3x3 valid /256:
  source 5, 3x3x256; conv9_1 1x1/128, conv9_2 3x3 valid /256: source 6, 1x1x256. Every conv
  is followed by a ReLU. The stride-2 convs pad 1 on every side (ZeroPadding2D `conv6_2_pad`,
  `conv7_2_pad`): Keras' "same" would pad only bottom/right.
- Per source `{source}_mbox_loc` (3x3, 4 * A filters) and `{source}_mbox_conf` (3x3,
  num_classes * A filters), A = 4, 6, 6, 6, 4, 4 default boxes per cell; each reshaped to
  (H * W * A, 4) / (H * W * A, num_classes) and concatenated into the outputs `mbox_loc`
  (N, 8732, 4) box offsets and `mbox_conf` (N, 8732, num_classes) class logits (class 0 is
  background). Anchor order (row, column, box) with channel = box * K + k: Caffe's permute +
  flatten and torchvision's SSDScoringHead alike.
Parameters: 26,285,486 for 21 classes (VOC), 35,641,826 for torchvision's 91 COCO classes.

Layouts (build_model(..., layout=)):
- "paper" (default): Caffe SSD300 for VOC: BGR input minus the integer means (104, 117, 123)
  (preprocessing "caffe_ssd"), the VOC prior boxes; every 2x2 pool in Caffe's ceil mode.
- "torchvision": torchvision's ssd300_vgg16 (its state_dict loads by build_model(weights=)):
  RGB input minus 255 * (0.48235, 0.45882, 0.40784) (preprocessing "torch_ssd"), COCO priors;
  floor mode except block3_pool, as torchvision. At 300x300 the two geometries are the same.
The prior boxes the outputs are relative to are named in PRIORS (kseg.detection.anchors):
`postprocess=True` appends kseg.detection's SSDDecoder with them.

ImageNet initialisation (build_model(backbone_weights=...)) from keras.applications VGG16 or
torchvision's vgg16, as the paper did with VGG_ILSVRC_16_layers_fc_reduced: the 13 convs by
name and fc6/fc7 decimated from fc1/fc2 (fc6 keeps fc1's spatial taps 0, 3, 6 and every 4th
output channel, fc7 every 4th channel of fc2 both ways): DeepLab-LargeFOV's adapter
(kseg.models.deeplab), whose fc6/fc7 have the same shapes. conv4_3_norm keeps gamma = 20,
the extra layers and the heads their initialisation.
"""

from __future__ import annotations

import numbers

import keras
from keras import layers

from kseg.layers import DilatedConv2D, L2Normalization
from kseg.models._common import check_width, model_input, scaled
from kseg.models.deeplab import _adapt_vgg
from kseg.models.vgg import CFGS, VGG16_CONV_NAMES
from kseg.registry import TorchMapping, register_model

PAPER = (
    "Liu, Anguelov, Erhan, Szegedy, Reed, Fu, Berg, SSD: Single Shot MultiBox Detector, ECCV 2016"
)

LAYOUTS = ("paper", "torchvision")
# Prior boxes (kseg.detection.anchors) of each layout: Caffe SSD300 VOC, torchvision COCO.
PRIORS = {"paper": "voc", "torchvision": "coco"}

# The six sources, their channels and default boxes per cell.
SOURCES = ("conv4_3_norm", "fc7", "conv6_2", "conv7_2", "conv8_2", "conv9_2")
SOURCE_CHANNELS = (512, 1024, 512, 256, 256, 256)
NUM_ANCHORS = (4, 6, 6, 6, 4, 4)

# Extra layers after fc7: (name, filters, kernel, stride); a stride-2 conv pads 1 on every side,
# a stride-1 3x3 pads nothing.
EXTRA_LAYERS = (
    ("conv6_1", 256, 1, 1), ("conv6_2", 512, 3, 2),
    ("conv7_1", 128, 1, 1), ("conv7_2", 256, 3, 2),
    ("conv8_1", 128, 1, 1), ("conv8_2", 256, 3, 1),
    ("conv9_1", 128, 1, 1), ("conv9_2", 256, 3, 1),
)

# Max-pool padding of block1_pool .. block4_pool: "same" is ceil mode for 2x2/2 (one extra
# window on odd sizes, its padding ignored), "valid" floor mode.
POOL_PADDING = {
    "paper": ("same", "same", "same", "same"),  # Caffe pools in ceil mode
    "torchvision": ("valid", "valid", "same", "valid"),  # only maxpool3 patched to ceil_mode=True
}


def torch_map():
    """torchvision ssd300_vgg16's 71 state_dict keys (SSDFeatureExtractorVGG + SSDHead)."""
    indices, index = [], 0
    for convs in CFGS["D"][:4]:  # backbone.features = vgg16.features[:23], up to conv4_3's ReLU
        for _ in convs:
            indices.append(index)
            index += 2  # conv, ReLU
        index += 1  # max-pool
    out = [TorchMapping(f"backbone.features.{i}", n, "conv") for i, n in zip(indices, VGG16_CONV_NAMES[:10])]
    out.append(TorchMapping("backbone.scale_weight", "conv4_3_norm", "vector"))
    # extra.0 = (maxpool4, conv5_1, ReLU, conv5_2, ReLU, conv5_3, ReLU, (pool5, fc6, ReLU, fc7, ReLU)).
    out += [TorchMapping(f"backbone.extra.0.{i}", n, "conv") for i, n in zip((1, 3, 5), VGG16_CONV_NAMES[10:])]
    out += [TorchMapping("backbone.extra.0.7.1", "fc6", "conv"), TorchMapping("backbone.extra.0.7.3", "fc7", "conv")]
    # extra.1..4 = (1x1 conv, ReLU, 3x3 conv, ReLU).
    for i in range(4):
        first, second = EXTRA_LAYERS[2 * i][0], EXTRA_LAYERS[2 * i + 1][0]
        out += [TorchMapping(f"backbone.extra.{i + 1}.0", first, "conv"),
                TorchMapping(f"backbone.extra.{i + 1}.2", second, "conv")]
    for head, suffix in (("regression_head", "loc"), ("classification_head", "conf")):
        out += [TorchMapping(f"head.{head}.module_list.{i}", f"{s}_mbox_{suffix}", "conv")
                for i, s in enumerate(SOURCES)]
    return out


def _conv(x, filters, kernel, name, *, stride=1, dilation=1, padding="same"):
    if stride > 1:
        # torchvision / Caffe pad 1 on every side; Keras "same" would pad only bottom/right.
        x = layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid"
    conv = DilatedConv2D if dilation > 1 else layers.Conv2D  # fc6 (rate 6): one native dilated op
    return conv(filters, kernel, strides=stride, padding=padding, dilation_rate=dilation,
                activation="relu", name=name)(x)


def ssd_vgg16_sources(inputs, *, layout="paper", width=1.0):
    """The six feature maps SSD300 predicts from, in SOURCES order; `width` scales every conv's
    filters (kseg.models._common.scaled: rounded, at least 8)."""
    pool_padding = POOL_PADDING[layout]
    x, sources = inputs, []
    for b, convs in enumerate(CFGS["D"], start=1):
        for c, filters in enumerate(convs, start=1):
            x = layers.Conv2D(scaled(filters, width), 3, padding="same", activation="relu",
                              name=f"block{b}_conv{c}")(x)
        if b == 4:
            sources.append(L2Normalization(name="conv4_3_norm")(x))
        if b < 5:
            x = layers.MaxPooling2D(2, strides=2, padding=pool_padding[b - 1], name=f"block{b}_pool")(x)
    # pool5 3x3/1 pad 1: Keras' "same" pads 1 on each side, ignoring the padding, as PyTorch's -inf.
    x = layers.MaxPooling2D(3, strides=1, padding="same", name="pool5")(x)
    x = _conv(x, scaled(1024, width), 3, "fc6", dilation=6)
    x = _conv(x, scaled(1024, width), 1, "fc7")
    sources.append(x)
    for name, filters, kernel, stride in EXTRA_LAYERS:
        x = _conv(x, scaled(filters, width), kernel, name, stride=stride, padding="same" if kernel == 1 else "valid")
        if name.endswith("_2"):
            sources.append(x)
    return sources


def multibox_head(sources, num_classes):
    """Per source 3x3 loc/conf convs, flattened to (N, anchors, 4) / (N, anchors, C) and concatenated."""
    locs, confs = [], []
    for name, x, anchors in zip(SOURCES, sources, NUM_ANCHORS):
        loc = layers.Conv2D(4 * anchors, 3, padding="same", name=f"{name}_mbox_loc")(x)
        conf = layers.Conv2D(num_classes * anchors, 3, padding="same", name=f"{name}_mbox_conf")(x)
        # (H, W, A * K) -> (H * W * A, K): anchor (h, w, a) takes channels a * K .. a * K + K - 1.
        locs.append(layers.Reshape((-1, 4), name=f"{name}_mbox_loc_flat")(loc))
        confs.append(layers.Reshape((-1, num_classes), name=f"{name}_mbox_conf_flat")(conf))
    return (layers.Concatenate(axis=1, name="mbox_loc")(locs),
            layers.Concatenate(axis=1, name="mbox_conf")(confs))


def feature_sizes(height, width, layout="paper"):
    """The six sources' (rows, cols) at an input size, as the network computes them: 2x2/2 pools
    in ceil ("same") or floor ("valid") mode per POOL_PADDING, stride-2 extras padded by 1, the
    last two 3x3 valid."""
    sizes, (h, w) = [], (int(height), int(width))
    for b, padding in enumerate(POOL_PADDING[layout], start=1):
        if b == 4:
            sizes.append([h, w])  # conv4_3, before block4_pool
        h, w = ((h + 1) // 2, (w + 1) // 2) if padding == "same" else (h // 2, w // 2)
    sizes.append([h, w])  # fc7
    for _, _, kernel, stride in EXTRA_LAYERS[1::2]:
        h, w = ((h - 1) // 2 + 1, (w - 1) // 2 + 1) if stride == 2 else (h - kernel + 1, w - kernel + 1)
        sizes.append([h, w])
    return sizes


def decoder(options: dict):
    """The SSDDecoder of a model built with `options` (its layout's priors, its input size)."""
    from kseg.detection.postprocess import SSDDecoder

    layout = options.get("layout", "paper")
    height, width = (options.get("input_shape") or (300, 300, 3))[:2]
    if height is None or width is None:
        raise ValueError(f"ssd300: decoding needs a fixed input size, got input_shape={options.get('input_shape')}")
    return SSDDecoder(priors=PRIORS[layout], input_hw=(height, width),
                      feature_sizes=feature_sizes(height, width, layout), name="ssd_decoder")


@register_model(
    "ssd300",
    task="detection",
    paper=PAPER,
    input_shape=(300, 300, 3),
    num_classes=21,
    preprocessing="caffe_ssd",
    params=26_285_486,
    layouts={"paper": {"layout": "paper"}, "torchvision": {"layout": "torchvision"}},
    layout_preprocessing={"torchvision": "torch_ssd"},
    torch_map=torch_map,
    backbone="vgg16",
    backbone_adapt=_adapt_vgg,
    postprocess=decoder,
)
def ssd300(*, num_classes=21, input_shape=None, layout="paper", postprocess=False, width=1.0):
    """SSD300 on VGG16: raw mbox_loc (N, 8732, 4) and mbox_conf (N, 8732, C); layout="torchvision" for its weights.

    postprocess=True appends kseg.detection's SSDDecoder (the layout's prior boxes, PRIORS)
    and returns its decoded, padded detections instead of the raw outputs; it needs a fixed
    input size. width: a channel multiplier in (0, 1] for every conv of the trunk and the extra
    layers (rounded, at least 8; kseg's, for CPU demos: not the paper's); the heads keep their
    anchors and classes, so the outputs and the prior boxes are the same at any width.
    """
    check_width(width, "ssd300")
    if layout not in LAYOUTS:
        raise ValueError(f"ssd300: layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"ssd300: num_classes must be an int >= 2 (background + classes), got {num_classes!r}")
    inputs = model_input(input_shape, (300, 300, 3))
    sources = ssd_vgg16_sources(inputs, layout=layout, width=width)
    mbox_loc, mbox_conf = multibox_head(sources, int(num_classes))
    if not postprocess:
        return keras.Model(inputs, [mbox_loc, mbox_conf], name="ssd300")
    layer = decoder({"layout": layout, "input_shape": tuple(inputs.shape[1:])})
    return keras.Model(inputs, layer([mbox_loc, mbox_conf]), name="ssd300")


ssd300.PRIORS = PRIORS  # the prior boxes of each layout, for decoders and losses
