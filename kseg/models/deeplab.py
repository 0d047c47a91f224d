"""DeepLab v1 (Chen et al., ICLR 2015): DeepLab-LargeFOV, its MSc variant and ResNet backbones.

Geometry follows the released Caffe prototxts (DeepLab-LargeFOV, DeepLab-MSc-LargeFOV):
- VGG16 convs with keras.applications names; pool1-3 are 3x3/2 max-pools with pad 1 in
  Caffe's ceil mode, pool4/pool5 3x3/1 pad 1, conv5_1..3 dilated 2, then "pool5a", a 3x3/1
  pad-1 average pool. Output stride 8: an HxW input gives a stride-8 map of
  s(s(s(H))) x s(s(s(W))), s(n) = floor(n / 2) + 1 (41x41 at 321x321).
- fc6 (3x3, 1024, dilation 12) + ReLU + dropout 0.5, fc7 (1x1, 1024) + ReLU + dropout 0.5,
  fc8 (1x1, num_classes): 20,505,429 parameters for 21 classes. `fc6` selects the other
  variants of the paper's Table 2 (fc7 follows fc6's width):
      "3x3_1024_r12" 20,505,429 (paper 20.5M, LargeFOV)   "4x4_4096_r4" 65,140,565 (65.1M)
      "4x4_4096_r8"  65,140,565 (65.1M)                   "7x7_4096_r4" 134,346,581 (134.3M)
  (the paper's figures are these counts rounded to 0.1M).
- The layer "fc8" holds the stride-8 logits; "fc8_interp" resizes them bilinearly to the
  input. Default align_corners=True, the semantics of DeepLab's Caffe Interp layer and the
  network's geometry: stride-8 pixel i is centred on input pixel 8i, so for the 8k+1 sizes
  DeepLab uses (321, 513) align-corners resizing puts every logit exactly on its pixel,
  where half-pixel resizing would shift the map by about 3.5 input pixels.
- MSc: on the image and on pool1..pool4, conv 3x3/128 (strides 8, 4, 2, 1, 1, pad 1) + ReLU
  + dropout 0.5, conv 1x1/128 + ReLU + dropout 0.5 (msc{i}_conv1, msc{i}_conv2), concatenated
  with fc7 before fc8: 640 more channels, 21,711,445 parameters for 21 classes. The released
  prototxt gives each branch its own classifier and sums the six score maps; that is the same
  function as one fc8 over the concatenation, up to five redundant bias vectors.
- ResNet50/101: the same fc6/fc7/fc8 head on C5 of kseg's ResNet dilated to output stride 8
  (stages 4 and 5 trade stride for dilation 2 and 4), no pool5a; 43,534,229 / 62,604,693
  parameters for 21 classes in the keras layout (no conv biases in the torchvision layout).

Any input of at least 1x1 works: every pooling and strided conv is padded so that a map of
n >= 1 pixels gives at least one output, and every window holds at least one real pixel.

ImageNet initialisation (build_model(backbone_weights=...)) from keras.applications VGG16 or
torchvision's vgg16: the 13 convs by name; fc6/fc7 from fc1/fc2 as the paper did. fc1
(25088 = 7*7*512 inputs, NHWC flatten) is the 7x7x512x4096 conv kernel; a k x k fc6 keeps the
spatial taps `range(0, 7, 6 // (k - 1))` of it (4x4: 0, 2, 4, 6; 3x3: 0, 3, 6 -- the taps
span the full 7x7 field, which the dilation rates of Table 2 preserve); a fc6/fc7 of width
c keeps the channels `range(0, 4096, 4096 // c)` (1024: 0, 4, 8, ..., 4092), for fc6's outputs
and for both fc7's inputs and outputs. fc8 and the MSc branches keep their initialisation.
"""

from __future__ import annotations

import functools
import re

import keras
import numpy as np
from keras import layers

from kseg.layers import DilatedConv2D, ResizeToReference
from kseg.models import resnet
from kseg.models._common import check_width, model_input, scaled
from kseg.models.vgg import CFGS, VGG16_CONV_NAMES
from kseg.registry import register_model

PAPER = (
    "Chen, Papandreou, Kokkinos, Murphy, Yuille, Semantic Image Segmentation with Deep "
    "Convolutional Nets and Fully Connected CRFs, ICLR 2015"
)

# The paper's Table 2: kernel x kernel, channels, dilation rate of fc6.
FC6_VARIANTS = ("3x3_1024_r12", "4x4_4096_r4", "4x4_4096_r8", "7x7_4096_r4")
_FC6_PATTERN = re.compile(r"^(\d+)x(\d+)_(\d+)_r(\d+)$")

MIN_INPUT_SIZE = 1  # see the module docstring: the geometry admits any size
DROPOUT = 0.5
MSC_FILTERS = 128
# (branch, source feature, stride of its 3x3 conv): each reaches output stride 8.
MSC_BRANCHES = ((0, "image", 8), (1, "pool1", 4), (2, "pool2", 2), (3, "pool3", 1), (4, "pool4", 1))


def stride8_size(n: int) -> int:
    """Caffe's size after pool1-3 (3x3, stride 2, pad 1, ceil mode): s(s(s(n))), s(n) = n // 2 + 1."""
    for _ in range(3):
        n = n // 2 + 1
    return n


def parse_fc6(fc6: str) -> tuple[int, int, int]:
    """'3x3_1024_r12' -> (kernel 3, channels 1024, rate 12)."""
    match = _FC6_PATTERN.match(str(fc6))
    if not match or match.group(1) != match.group(2) or min(map(int, match.groups())) < 1:
        raise ValueError(
            f"fc6 must be '<k>x<k>_<channels>_r<rate>', e.g. one of the paper's {FC6_VARIANTS}; got {fc6!r}"
        )
    kernel, _, channels, rate = map(int, match.groups())
    return kernel, channels, rate


def _check_input(inputs, name):
    for axis, size in zip(("height", "width"), inputs.shape[1:3]):
        if size is not None and size < MIN_INPUT_SIZE:
            raise ValueError(
                f"{name}: input {axis} {size} is too small; the minimum input size is "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
            )


# === Backbones ===


def _caffe_pool(x, stride, name):
    """3x3 max-pool, pad 1, in Caffe's geometry (ceil mode for stride 2)."""
    if stride == 1:
        # Keras' "same" pads 1 on each side with -inf, exactly Caffe's pad 1 at stride 1.
        return layers.MaxPooling2D(3, strides=1, padding="same", name=name)(x)
    # Caffe: out = ceil((n + 2 - 3) / 2) + 1 = n // 2 + 1, windows starting at -1. Padding
    # 1 before and 2 after gives that count for odd and even n alike ("same" would give
    # ceil(n / 2), one short for even n); the second trailing pixel is only read for even n,
    # by the window ceil mode adds. Zeros instead of -inf are exact: the input is post-ReLU
    # (>= 0) and every window holds at least one real pixel, so its max never comes from a pad.
    x = layers.ZeroPadding2D(((1, 2), (1, 2)), name=f"{name}_pad")(x)
    return layers.MaxPooling2D(3, strides=2, padding="valid", name=name)(x)


def _conv_relu(x, filters, kernel, name, *, dilation=1, batch_norm=False):
    """Conv + ReLU, or with batch_norm Conv + BatchNormalization (`{name}_bn`) + ReLU (`{name}_relu`)."""
    # Every dilated conv (conv5's rate 2, fc6's 12) as one native dilated op (kseg.layers.DilatedConv2D).
    conv = DilatedConv2D if dilation > 1 else layers.Conv2D
    x = conv(filters, kernel, padding="same", dilation_rate=dilation,
             activation=None if batch_norm else "relu", name=name)(x)
    if batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def _vgg_deeplab_trunk(inputs, width=1.0, batch_norm=False):
    """VGG16 convs at output stride 8; returns pool5a and the pooled features by name."""
    x, features = inputs, {"image": inputs}
    for b, convs in enumerate(CFGS["D"], start=1):
        for c, filters in enumerate(convs, start=1):
            x = _conv_relu(x, scaled(filters, width), 3, f"block{b}_conv{c}", dilation=2 if b == 5 else 1,
                           batch_norm=batch_norm)
        x = _caffe_pool(x, 2 if b <= 3 else 1, f"pool{b}")
        features[f"pool{b}"] = x
    # Caffe's AVE pooling with pad divides by the whole 3x3 window, padding included; Keras'
    # "same" average pool divides by the valid pixels only, so pad explicitly and pool "valid".
    x = layers.ZeroPadding2D(1, name="pool5a_pad")(x)
    x = layers.AveragePooling2D(3, strides=1, padding="valid", name="pool5a")(x)
    return x, features


def _msc_branches(features):
    outputs = []
    for i, source, stride in MSC_BRANCHES:
        # Caffe pads 1 on each side, which gives the fc7 size only for 8k+1 inputs. Padding
        # `stride` pixels after instead gives floor((n + stride - 2) / stride) + 1 outputs, equal
        # to fc7's size for every n, with the same top-left alignment (output i centred on
        # input 8i); for 8k+1 inputs the extra pad is never read, so the result is Caffe's.
        x = layers.ZeroPadding2D(((1, stride), (1, stride)), name=f"msc{i}_pad")(features[source])
        x = layers.Conv2D(MSC_FILTERS, 3, strides=stride, activation="relu", name=f"msc{i}_conv1")(x)
        x = layers.Dropout(DROPOUT, name=f"msc{i}_drop1")(x)
        x = layers.Conv2D(MSC_FILTERS, 1, activation="relu", name=f"msc{i}_conv2")(x)
        outputs.append(layers.Dropout(DROPOUT, name=f"msc{i}_drop2")(x))
    return outputs


# === Head ===


def _head(x, inputs, *, num_classes, fc6, msc_features, align_corners, return_stride8, name, width=1.0,
          batch_norm=False, dropout=DROPOUT):
    kernel, channels, rate = parse_fc6(fc6)
    channels = scaled(channels, width)
    x = _conv_relu(x, channels, kernel, "fc6", dilation=rate, batch_norm=batch_norm)
    x = layers.Dropout(dropout, name="drop6")(x)
    x = _conv_relu(x, channels, 1, "fc7", batch_norm=batch_norm)
    x = layers.Dropout(dropout, name="drop7")(x)
    if msc_features:
        x = layers.Concatenate(name="fc7_msc")([x, *msc_features])
    stride8 = layers.Conv2D(num_classes, 1, name="fc8")(x)
    full = ResizeToReference("bilinear", align_corners=align_corners, name="fc8_interp")([stride8, inputs])
    return keras.Model(inputs, [full, stride8] if return_stride8 else full, name=name)


def _deeplab_vgg(*, num_classes, input_shape, fc6, msc, align_corners, return_stride8, name, width=1.0,
                 batch_norm=False, dropout=DROPOUT):
    parse_fc6(fc6)
    check_width(width, name)
    inputs = model_input(input_shape, (None, None, 3))
    _check_input(inputs, name)
    if batch_norm not in (True, False):
        raise ValueError(f"{name}: batch_norm must be True or False, got {batch_norm!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"{name}: dropout must be a rate in [0, 1), got {dropout!r}")
    x, features = _vgg_deeplab_trunk(inputs, width, batch_norm)
    return _head(
        x,
        inputs,
        num_classes=num_classes,
        fc6=fc6,
        msc_features=_msc_branches(features) if msc else None,
        align_corners=align_corners,
        return_stride8=return_stride8,
        name=name,
        width=width,
        batch_norm=batch_norm,
        dropout=dropout,
    )


def _deeplab_resnet(arch, *, num_classes, input_shape, layout, align_corners, return_stride8, name):
    inputs = model_input(input_shape, (None, None, 3))
    _check_input(inputs, name)
    x = resnet.resnet_trunk(inputs, arch, layout=layout, output_stride=8)
    return _head(
        x,
        inputs,
        num_classes=num_classes,
        fc6=FC6_VARIANTS[0],
        msc_features=None,
        align_corners=align_corners,
        return_stride8=return_stride8,
        name=name,
    )


# === ImageNet initialisation ===


def _tap_step(kernel: int) -> int:
    if kernel == 7:
        return 1
    if kernel < 2 or 6 % (kernel - 1):
        raise ValueError(f"a {kernel}x{kernel} fc6 cannot be decimated from VGG16's 7x7 fc1; use 2, 3, 4 or 7")
    return 6 // (kernel - 1)


def _channel_step(width: int) -> int:
    if 4096 % width:
        raise ValueError(f"fc6/fc7 width {width} does not divide VGG16's 4096 channels; no decimation exists")
    return 4096 // width


def fc6_taps(kernel: int) -> np.ndarray:
    """Which of fc1's 7 spatial taps a kernel x kernel fc6 keeps (decimation)."""
    return np.arange(0, 7, _tap_step(kernel))


def fc_channels(width: int) -> np.ndarray:
    """Which of fc1/fc2's 4096 channels a fc6/fc7 of `width` channels keeps (decimation)."""
    return np.arange(0, 4096, _channel_step(width))


def _adapt_vgg(arrays, model, path):
    from kseg.weights import WeightsMismatchError, copy_by_name

    extra = sorted(n for n in arrays if re.fullmatch(r"block[345]_conv4", n))
    if extra:
        raise WeightsMismatchError(f"{path}: not vgg16 ImageNet weights: it has {extra} (VGG19?)")
    out = copy_by_name(arrays, VGG16_CONV_NAMES + ["fc1", "fc2"], path, "vgg16")
    (w1, b1), (w2, b2) = out.pop("fc1"), out.pop("fc2")
    if w1.shape != (7 * 7 * 512, 4096) or w2.shape != (4096, 4096):
        raise WeightsMismatchError(
            f"{path}: vgg16 fc1/fc2 must be (25088, 4096) and (4096, 4096), got {w1.shape} and {w2.shape}"
        )
    fc6 = model.get_layer("fc6")
    # Strided slices, the same indices as fc6_taps / fc_channels, without copying 400 MB per step.
    taps = slice(0, 7, _tap_step(fc6.kernel_size[0]))
    c6 = slice(0, 4096, _channel_step(fc6.filters))
    c7 = slice(0, 4096, _channel_step(model.get_layer("fc7").filters))
    # Keras' Flatten of the 7x7x512 pool5 is NHWC, so fc1's rows are already an HWIO kernel
    # (torchvision files arrive in that order too: read_backbone permutes their NCHW rows).
    kernel6 = w1.reshape(7, 7, 512, 4096)[taps, taps, :, c6]
    kernel7 = w2[c6, c7]
    out["fc6"] = [np.ascontiguousarray(kernel6), np.ascontiguousarray(b1[c6])]
    out["fc7"] = [np.ascontiguousarray(kernel7).reshape(1, 1, *kernel7.shape), np.ascontiguousarray(b2[c7])]
    return out


def _adapt_resnet(arch, arrays, model, path):
    from kseg.weights import WeightsMismatchError, copy_by_name

    file_bias = len(arrays.get("conv1_conv", ())) == 2
    model_bias = model.get_layer("conv1_conv").use_bias
    if "conv1_conv" in arrays and file_bias != model_bias:
        have, want = ("keras", "torchvision") if file_bias else ("torchvision", "keras")
        raise WeightsMismatchError(
            f"{path}: {have}-layout {arch} weights do not fit {model.name} built with layout={want!r}; "
            f"build it with layout={have!r}"
        )
    names = [m.layer for m in resnet.torch_map(arch) if m.layer != "predictions"]
    return copy_by_name(arrays, names, path, arch)


# === Registry ===

_COMMON = dict(task="segmentation", paper=PAPER, input_shape=(321, 321, 3), num_classes=21)
_VGG = dict(
    _COMMON,
    preprocessing="caffe",
    # torchvision's vgg16 initialisation expects its own normalisation.
    layouts={"keras": {}, "torchvision": {}},
    layout_preprocessing={"torchvision": "torch"},
    backbone="vgg16",
    backbone_adapt=_adapt_vgg,
)


def _resnet_spec(arch, params):
    return dict(
        _COMMON,
        params=params,
        preprocessing="caffe",
        layouts={"keras": {"layout": "keras"}, "torchvision": {"layout": "torchvision"}},
        layout_preprocessing={"torchvision": "torch"},
        backbone=arch,
        backbone_adapt=functools.partial(_adapt_resnet, arch),
    )


@register_model("deeplab_largefov", params=20_505_429, **_VGG)
def deeplab_largefov(*, num_classes=21, input_shape=None, fc6="3x3_1024_r12", align_corners=True,
                     return_stride8=False, width=1.0, batch_norm=False, dropout=DROPOUT):
    """DeepLab-LargeFOV: dilated VGG16 at output stride 8, fc6 3x3/1024/rate 12; fc6= picks Table 2's variants.

    width scales every conv's filters (VGG16 convs, fc6, fc7; not fc8) by a multiplier in (0, 1],
    rounded, at least 8, for small budgets such as CPU training; 1.0 is the paper's network.
    Such a network no longer takes ImageNet backbone weights.

    Two options that are not the paper's, for training from scratch (the paper starts from
    ImageNet weights): batch_norm=True puts a BatchNormalization (`<conv>_bn`) between every
    conv up to fc7 and its ReLU (`<conv>_relu`), and dropout sets the rate of drop6/drop7
    (the paper's 0.5). kseg's CPU training demo uses both (recipe `synthetic_demo`):

        >>> import kseg
        >>> m = kseg.build_model("deeplab_largefov", num_classes=5, width=0.125, batch_norm=True, dropout=0.0)
        >>> m.get_layer("block1_conv1").filters, m.get_layer("fc6_bn").name, m.get_layer("drop6").rate
        (8, 'fc6_bn', 0.0)
    """
    return _deeplab_vgg(num_classes=num_classes, input_shape=input_shape, fc6=fc6, msc=False,
                        align_corners=align_corners, return_stride8=return_stride8, name="deeplab_largefov",
                        width=width, batch_norm=batch_norm, dropout=dropout)


@register_model("deeplab_msc_largefov", params=21_711_445, **_VGG)
def deeplab_msc_largefov(*, num_classes=21, input_shape=None, fc6="3x3_1024_r12", align_corners=True,
                         return_stride8=False):
    """DeepLab-MSc-LargeFOV: LargeFOV plus 128-channel two-layer branches on the image and pool1-4 before fc8."""
    return _deeplab_vgg(num_classes=num_classes, input_shape=input_shape, fc6=fc6, msc=True,
                        align_corners=align_corners, return_stride8=return_stride8, name="deeplab_msc_largefov")


@register_model("deeplab_largefov_resnet50", **_resnet_spec("resnet50", 43_534_229))
def deeplab_largefov_resnet50(*, num_classes=21, input_shape=None, layout="keras", align_corners=True,
                              return_stride8=False):
    """The LargeFOV head (fc6 3x3/1024/rate 12, fc7, fc8) on ResNet50 dilated to output stride 8."""
    return _deeplab_resnet("resnet50", num_classes=num_classes, input_shape=input_shape, layout=layout,
                           align_corners=align_corners, return_stride8=return_stride8,
                           name="deeplab_largefov_resnet50")


@register_model("deeplab_largefov_resnet101", **_resnet_spec("resnet101", 62_604_693))
def deeplab_largefov_resnet101(*, num_classes=21, input_shape=None, layout="keras", align_corners=True,
                               return_stride8=False):
    """The LargeFOV head (fc6 3x3/1024/rate 12, fc7, fc8) on ResNet101 dilated to output stride 8."""
    return _deeplab_resnet("resnet101", num_classes=num_classes, input_shape=input_shape, layout=layout,
                           align_corners=align_corners, return_stride8=return_stride8,
                           name="deeplab_largefov_resnet101")
