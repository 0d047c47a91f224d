"""FCN-32s / FCN-16s / FCN-8s on VGG16 (Long, Shelhamer, Darrell, CVPR 2015), as the reference Caffe nets.

Geometry of the reference nets, which fixes every crop offset below. Follow one input
pixel x through the net as a coordinate (the centre of the receptive field, as Caffe's
coord_map does):
- conv1_1 has pad 100 and the other 3x3 convs pad 1, so x sits at x + 99 in conv1_1..conv5_3;
- each 2x2/2 max-pool maps c -> (c - 0.5) / 2, so pool3 is (x + 95.5) / 8, pool4 (x + 91.5) / 16,
  pool5 (x + 83.5) / 32;
- fc6 (7x7 valid) subtracts 3: (x - 12.5) / 32;
- a Deconvolution with kernel 2s and stride s maps f -> s * f + s - 0.5.
Hence upscore (k64 s32) puts x at x + 19 (FCN-32s crop offset 19); upscore2 puts it at
(x + 11.5) / 16, 80 / 16 = 5 left of pool4 (offset 5); upscore_pool4 at (x + 23.5) / 8, 9 left
of pool3 (offset 9); upscore16 at x + 27 and upscore8 at x + 31.

No input is too small: with the padding, a 1x1 image already gives pool5 7x7 and fc6 1x1, and
every crop fits (the upsampled maps are always at least offset + input size). Any size >= 1 works.

`width` (every builder) scales the filters of the 13 convs and fc6/fc7 by a multiplier in
(0, 1], rounded, at least 8, for small budgets such as CPU training; the score layers and the
geometry are unchanged, and 1.0 is the paper's network. A narrower net no longer takes the
ImageNet backbone weights:

    >>> import kseg
    >>> kseg.build_model("fcn8s", num_classes=5, width=0.125).get_layer("fc6").filters
    512
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from kseg.layers import BilinearUpsampling, CropToReference, Scale
from kseg.models._common import check_width, model_input, scaled
from kseg.models.vgg import CFGS, VGG16_CONV_NAMES
from kseg.registry import register_model

PAPER = "Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation, CVPR 2015"

# Per variant: the skips fused coarse to fine, each (trunk feature, reference name, fixed input
# scale of the at-once net or None, crop offset of its score), then the final upsampling stride
# (kernel 2 * stride) and the crop offset back to the input. Offsets: see the module docstring.
HEADS = {
    "fcn32s": ((), 32, 19),
    "fcn16s": ((("block4_pool", "pool4", None, 5),), 16, 27),
    "fcn8s": ((("block4_pool", "pool4", None, 5), ("block3_pool", "pool3", None, 9)), 8, 31),
    # Trained in one step instead of 32s -> 16s -> 8s: the reference scales the skips' inputs
    # so their scores start small against score_fr's (pool features are far larger than fc7's).
    "fcn8s_atonce": ((("block4_pool", "pool4", 0.01, 5), ("block3_pool", "pool3", 0.0001, 9)), 8, 31),
}


def _trunk(x, cfg):
    """VGG16's 13 convs with keras.applications names, in the Caffe FCN geometry."""
    features = {}
    # Caffe pad: 100 on conv1_1: it lets fc6's 7x7 valid conv (and so the net) run on any input
    # size, and leaves the margin that the crops below cut away again.
    x = layers.ZeroPadding2D(100, name="block1_pad")(x)
    for b, convs in enumerate(cfg, start=1):
        for c, filters in enumerate(convs, start=1):
            padding = "valid" if (b, c) == (1, 1) else "same"
            x = layers.Conv2D(filters, 3, padding=padding, activation="relu", name=f"block{b}_conv{c}")(x)
        # Caffe's pooling rounds up (ceil mode); for 2x2/2 Keras' "same" is the same thing: it
        # pads one row/column at the end only, and max-pooling ignores the padding.
        x = layers.MaxPooling2D(2, strides=2, padding="same", name=f"block{b}_pool")(x)
        features[f"block{b}_pool"] = x
    return x, features


def _upsample(x, num_classes, stride, trainable, name):
    # padding="valid" gives Caffe's Deconvolution size (in - 1) * stride + kernel, which the
    # crop offsets assume. Bilinear and frozen, as in the reference nets (lr_mult: 0).
    return layers.Conv2DTranspose(
        num_classes, 2 * stride, strides=stride, padding="valid", use_bias=False,
        kernel_initializer=BilinearUpsampling(), trainable=trainable, name=name,
    )(x)


def _fcn(variant, *, num_classes, input_shape, trainable_upsampling, score_initializer,
         trunk=CFGS["D"], fc_units=4096, width=1.0):
    # trunk / fc_units only let the tests build tiny nets of the same geometry.
    check_width(width, variant)
    trunk = [[scaled(f, width) for f in convs] for convs in trunk]
    fc_units = scaled(fc_units, width)
    skips, stride, offset = HEADS[variant]
    score_init = keras.initializers.get(score_initializer)

    def score(x, name):
        return layers.Conv2D(num_classes, 1, kernel_initializer=score_init, name=name)(x)

    inputs = model_input(input_shape, (None, None, 3))
    # === Backbone ===
    x, features = _trunk(inputs, trunk)
    x = layers.Conv2D(fc_units, 7, padding="valid", activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="drop6")(x)
    x = layers.Conv2D(fc_units, 1, activation="relu", name="fc7")(x)
    x = layers.Dropout(0.5, name="drop7")(x)
    # === Head ===
    x = score(x, "score_fr")
    upscore_name = "upscore2"
    for feature, ref, scale, skip_offset in skips:
        up = _upsample(x, num_classes, 2, trainable_upsampling, upscore_name)
        f = features[feature]
        if scale is not None:
            f = Scale(scale, name=f"scale_{ref}")(f)
        s = score(f, f"score_{ref}")
        s = CropToReference(skip_offset, name=f"score_{ref}c")([s, up])
        x = layers.Add(name=f"fuse_{ref}")([up, s])
        upscore_name = f"upscore_{ref}"
    final_name = f"upscore{stride}" if skips else "upscore"
    x = _upsample(x, num_classes, stride, trainable_upsampling, final_name)
    x = CropToReference(offset, name="score")([x, inputs])
    return keras.Model(inputs, x, name=variant)


def _adapt_vgg16(arrays, model, path):
    """VGG16 ImageNet arrays -> FCN layers: convs by name, fc1/fc2 convolutionalised into fc6/fc7.

    A trained FCN file (the previous stage: FCN-32s for FCN-16s, FCN-16s for FCN-8s) is read
    as the paper's staged training does it (section 4.2: "initialized with the parameters of
    the last, coarser net ... The new parameters acting on pool4 are zero-initialized so that
    the net starts with unmodified predictions"): every layer both nets have is copied, the
    score layers this net adds are zero.
    """
    # Lazy import: models stay free of file handling at import time.
    from kseg.weights import WeightsMismatchError, copy_by_name

    if "score_fr" in arrays:
        return _previous_stage(arrays, model, path)
    no_fc = [n for n in ("fc1", "fc2") if n not in arrays]
    if no_fc and all(n in arrays for n in VGG16_CONV_NAMES):
        raise WeightsMismatchError(
            f"{path}: VGG16 conv weights without {no_fc} (an include_top=False file?); FCN turns "
            "fc1/fc2 into fc6/fc7, so it needs the full ImageNet classifier file"
        )
    out = copy_by_name(arrays, VGG16_CONV_NAMES + ["fc1", "fc2"], path, "vgg16")
    (fc1, b1), (fc2, b2) = out.pop("fc1"), out.pop("fc2")
    if fc1.shape[0] != 7 * 7 * 512 or fc2.ndim != 2:
        raise WeightsMismatchError(
            f"{path}: fc1 kernel {fc1.shape} / fc2 kernel {fc2.shape}; expected (25088, n) / (n, m) of VGG16"
        )
    # Keras flattens pool5 NHWC, so fc1's row (h * 7 + w) * 512 + c is a C-order reshape to the
    # (7, 7, 512, out) conv kernel; read_backbone already permuted torchvision's NCHW rows to it.
    out["fc6"] = [fc1.reshape(7, 7, 512, fc1.shape[1]), b1]
    out["fc7"] = [fc2.reshape(1, 1, *fc2.shape), b2]
    return out


def _previous_stage(arrays, model, path):
    from kseg.weights import WeightsMismatchError

    absent = [n for n in VGG16_CONV_NAMES + ["fc6", "fc7"] if n not in arrays]
    if absent:
        raise WeightsMismatchError(f"{path}: an FCN file (it has score_fr) without the layers {absent[:4]}: "
                                   "not a kseg FCN-32s / FCN-16s to start the next stage from")
    out = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name in arrays:
            out[layer.name] = arrays[layer.name]
        elif layer.name.startswith("score_"):  # the skip this stage adds
            out[layer.name] = [np.zeros(tuple(v.shape), v.dtype) for v in layer.weights]
    return out


def _register(name, params):
    return register_model(
        name, task="segmentation", paper=PAPER, input_shape=(500, 500, 3), num_classes=21,
        preprocessing="caffe", params=params, backbone="vgg16", backbone_adapt=_adapt_vgg16,
    )


# Score layers: Keras defaults (glorot_uniform kernel, zero bias). The reference zero-fills them
# (Caffe's default filler; the paper found random init neither better nor faster), but an
# all-zero net gives constant output until trained; score_initializer="zeros" reproduces it.
@_register("fcn32s", 136_152_917)
def fcn32s(*, num_classes=21, input_shape=None, trainable_upsampling=False, score_initializer="glorot_uniform",
           width=1.0):
    """FCN-32s: VGG16 + score_fr upsampled 32x by one bilinear (frozen) deconvolution; any input size >= 1."""
    return _fcn("fcn32s", num_classes=num_classes, input_shape=input_shape,
                trainable_upsampling=trainable_upsampling, score_initializer=score_initializer, width=width)


@_register("fcn16s", 134_815_994)
def fcn16s(*, num_classes=21, input_shape=None, trainable_upsampling=False, score_initializer="glorot_uniform",
           width=1.0):
    """FCN-16s: FCN-32s plus a pool4 skip, upsampled 16x; any input size >= 1."""
    return _fcn("fcn16s", num_classes=num_classes, input_shape=input_shape,
                trainable_upsampling=trainable_upsampling, score_initializer=score_initializer, width=width)


@_register("fcn8s", 134_489_759)
def fcn8s(*, num_classes=21, input_shape=None, trainable_upsampling=False, score_initializer="glorot_uniform",
          width=1.0):
    """FCN-8s: FCN-16s plus a pool3 skip, upsampled 8x; any input size >= 1."""
    return _fcn("fcn8s", num_classes=num_classes, input_shape=input_shape,
                trainable_upsampling=trainable_upsampling, score_initializer=score_initializer, width=width)


@_register("fcn8s_atonce", 134_489_759)
def fcn8s_atonce(*, num_classes=21, input_shape=None, trainable_upsampling=False,
                 score_initializer="glorot_uniform", width=1.0):
    """FCN-8s trained at once: pool4 scaled by 0.01 and pool3 by 0.0001 before their scores."""
    return _fcn("fcn8s_atonce", num_classes=num_classes, input_shape=input_shape,
                trainable_upsampling=trainable_upsampling, score_initializer=score_initializer, width=width)
