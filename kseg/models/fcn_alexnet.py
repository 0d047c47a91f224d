"""FCN-AlexNet (Long, Shelhamer, Darrell, CVPR 2015, Table 1; PAMI 2016): AlexNet with fc6/fc7 turned
into convolutions, a 1x1 score layer and one frozen bilinear x32 upsampling, as the reference net
voc-fcn-alexnet of fcn.berkeleyvision.org, on kseg's AlexNet trunk (torchvision's layout, so the
ImageNet initialisation is torchvision's AlexNet or kseg's alexnet file).

Layers: conv1 .. pool5 of kseg's `alexnet` (same names and weights, torchvision's 64-192-384-256-256
channels) with the reference's geometry: conv1 padded by 100 (`conv1_pad`, torchvision: 2) and the
three 3x3/2 max-pools rounding up as Caffe's do (`pool{i}_pad`: one zero row and column at the end,
see kseg.models.alexnet.alexnet_convs); fc6 a 6x6 valid conv (4096, ReLU), drop6, fc7 1x1 (4096,
ReLU), drop7 (dropout 0.5 as the reference), score_fr 1x1 (num_classes), upscore a Conv2DTranspose
of kernel 63 and stride 32 (the reference's: an odd kernel, whose bilinear filter centres on tap 31,
not the 2 x stride kernel of FCN-32s on VGG16), bilinear and frozen, and `score`, the crop back to
the input.

Geometry, as for FCN on VGG16 (kseg.models.fcn): follow an input pixel x through the net as the
centre of its receptive field (Caffe's coord_map):
- conv1 (11x11, stride 4, pad 100) maps x -> (x - 5 + 100) / 4 = (x + 95) / 4; conv2 .. conv5 pad
  (k - 1) / 2 and keep coordinates;
- each 3x3/2 max-pool maps c -> (c - 1) / 2: pool1 (x + 91) / 8, pool2 (x + 83) / 16, pool5
  (x + 67) / 32 (rounding the size up or down adds or drops windows at the end only);
- fc6 (6x6 valid) subtracts 2.5: score_fr cell j is centred on input pixel 32 j + 13, and its
  receptive field is 11 + 2*4 + 4*8 + 2*8 + 3*2*16 + 2*16 + 5*32 = 355 pixels wide (Table 1's 355);
- upscore (kernel 63, stride 32) maps f -> 32 f + 31, so x lands at x - 13 + 31 = x + 18: crop
  offset 18, the reference's crop_param.
With the pools rounding up, every input size >= 1 works (a 1x1 image gives fc6 1x1 and a 63-pixel
upscore, enough for the crop at 18). torchvision's rounding down would not do: a 500-pixel side, for
one, would leave upscore 511 pixels, short of 18 + 500.

Parameters, 21 classes: convs 2,469,696, fc6 37,752,832, fc7 16,781,312, score_fr 86,037 and the
frozen upscore 63 * 63 * 21 * 21 = 1,750,329: 58,840,206 (Keras' count_params, the registry's figure);
57,089,877 learned. Table 1 lists 57M for FCN-AlexNet: the learned parameters (its 134M for FCN-VGG16
likewise leaves out the frozen upsampling: kseg's fcn32s counts 136,152,917 with its 1,806,336).
The Caffe original (96-256-384-384-256 channels, groups of 2 in conv2, conv4 and conv5) has convs of
2,334,080, so 58,704,590 with upscore and 56,954,261 learned: both layouts round to 57M.

`width` scales the five convs and fc6/fc7 (kseg.models._common.scaled) for small CPU budgets, as
for the other FCNs; a narrower net no longer takes the ImageNet weights.
"""

from __future__ import annotations

import keras
from keras import layers

from kseg.layers import BilinearUpsampling, CropToReference
from kseg.models._common import check_width, model_input, scaled
from kseg.models.alexnet import CONVS, alexnet_convs
from kseg.models.fcn import PAPER
from kseg.registry import register_model

CONV1_PAD = 100  # the reference's pad on conv1 (torchvision's AlexNet: 2)
UPSCORE_KERNEL, UPSCORE_STRIDE = 63, 32  # the reference's upscore Deconvolution
CROP_OFFSET = 18  # module docstring
FC6_KERNEL = 6  # AlexNet's pool5 is 6x6 at 224 x 224: fc6 (9216 inputs) becomes a 6x6 conv
ALEXNET_CONV_NAMES = [c[0] for c in CONVS]


def _adapt_alexnet(arrays, model, path):
    """ImageNet AlexNet arrays -> FCN layers: conv1 .. conv5 by name, fc6/fc7 convolutionalised."""
    # Lazy import: models stay free of file handling at import time.
    from kseg.weights import WeightsMismatchError, copy_by_name

    no_fc = [n for n in ("fc6", "fc7") if n not in arrays]
    if no_fc and all(n in arrays for n in ALEXNET_CONV_NAMES):
        raise WeightsMismatchError(
            f"{path}: AlexNet conv weights without {no_fc} (an include_top=False file?); FCN-AlexNet turns "
            "fc6/fc7 into convolutions, so it needs the full ImageNet classifier file"
        )
    out = copy_by_name(arrays, ALEXNET_CONV_NAMES + ["fc6", "fc7"], path, "alexnet")
    (fc6, b6), (fc7, b7) = out.pop("fc6"), out.pop("fc7")
    channels = FC6_KERNEL * FC6_KERNEL * 256
    if fc6.ndim != 2 or fc6.shape[0] != channels or fc7.ndim != 2:
        raise WeightsMismatchError(
            f"{path}: fc6 kernel {fc6.shape} / fc7 kernel {fc7.shape}; expected ({channels}, n) / (n, m) of AlexNet"
        )
    # Keras flattens pool5 NHWC, so fc6's row (h * 6 + w) * 256 + c is a C-order reshape to the
    # (6, 6, 256, out) conv kernel; read_backbone already permuted torchvision's NCHW rows to it.
    out["fc6"] = [fc6.reshape(FC6_KERNEL, FC6_KERNEL, 256, fc6.shape[1]), b6]
    out["fc7"] = [fc7.reshape(1, 1, *fc7.shape), b7]
    return out


@register_model(
    "fcn_alexnet",
    task="segmentation",
    paper=PAPER,
    input_shape=(500, 500, 3),
    num_classes=21,
    preprocessing="torch",
    params=58_840_206,
    backbone="alexnet",
    backbone_adapt=_adapt_alexnet,
)
def fcn_alexnet(*, num_classes=21, input_shape=None, trainable_upsampling=False, score_initializer="glorot_uniform",
                width=1.0):
    """FCN-AlexNet: AlexNet + score_fr upsampled 32x by one bilinear (frozen) k63 deconvolution; any input size >= 1.

    score_initializer: Keras' default here; "zeros" is the reference's (see kseg.models.fcn).
    trainable_upsampling: learn upscore (the reference keeps it fixed). width: module docstring.
    """
    check_width(width, "fcn_alexnet")
    score_init = keras.initializers.get(score_initializer)
    fc_units = scaled(4096, width)
    inputs = model_input(input_shape, (None, None, 3))
    # === Backbone ===
    x = alexnet_convs(inputs, width, conv1_pad=CONV1_PAD, ceil_mode=True)
    x = layers.Conv2D(fc_units, FC6_KERNEL, padding="valid", activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="drop6")(x)
    x = layers.Conv2D(fc_units, 1, activation="relu", name="fc7")(x)
    x = layers.Dropout(0.5, name="drop7")(x)
    # === Head ===
    x = layers.Conv2D(num_classes, 1, kernel_initializer=score_init, name="score_fr")(x)
    # padding="valid": Caffe's Deconvolution size (in - 1) * 32 + 63, which the crop offset assumes.
    x = layers.Conv2DTranspose(
        num_classes, UPSCORE_KERNEL, strides=UPSCORE_STRIDE, padding="valid", use_bias=False,
        kernel_initializer=BilinearUpsampling(), trainable=trainable_upsampling, name="upscore",
    )(x)
    x = CropToReference(CROP_OFFSET, name="score")([x, inputs])
    return keras.Model(inputs, x, name="fcn_alexnet")
