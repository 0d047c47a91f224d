"""HED, holistically-nested edge detection (Xie & Tu, ICCV 2015), on a VGG16 trunk.

Geometry. The reference Caffe net pads conv1_1 by 35 and lets Caffe's Crop layer find
per-side offsets (34, 35, 36, 38, 42 for an exact 3x3/ceil-pool chain). kseg keeps the
keras.applications trunk instead ('same' 3x3 convs) and pools in Caffe's ceil mode
(2x2/2 'same'), so feature i of a stride-s map covers input pixels [s*i, s*i + s); a
transposed conv with kernel 2s, stride s and 'same' padding (s/2 cut before) puts the
centre of its bilinear kernel exactly on s*i + (s - 1) / 2, the centre of that cell.
Every side output is therefore aligned with the input with crop offset 0, for every
input size (the upsampled map is s * ceil(H / s) >= H); tests check it with an impulse.

Parameters: VGG16 conv trunk 14,714,688 + side convs 65 + 129 + 257 + 513 + 513 + fusion
6 = 14,716,171 trainable; the four bilinear deconvolutions add
16 + 64 + 256 + 1,024 = 1,360 frozen weights (count_params() 14,717,531).
"""

from __future__ import annotations

import keras
from keras import layers

from kseg.layers import BilinearUpsampling, CropToReference
from kseg.models._common import model_input
from kseg.models.vgg import VGG16_CONV_NAMES, vgg_trunk
from kseg.registry import register_model

PAPER = "Xie & Tu, Holistically-Nested Edge Detection, ICCV 2015"

# (VGG16 feature, cumulative stride) for side outputs dsn1..dsn5.
SIDES = (
    ("block1_conv2", 1),
    ("block2_conv2", 2),
    ("block3_conv3", 4),
    ("block4_conv3", 8),
    ("block5_conv3", 16),
)
OUTPUT_NAMES = tuple(f"dsn{i}" for i in range(1, len(SIDES) + 1)) + ("fuse",)


def _adapt_vgg16(arrays, model, path):
    # Lazy import: models stay free of file handling at import time.
    from kseg.weights import copy_by_name

    return copy_by_name(arrays, VGG16_CONV_NAMES, path, "vgg16")


@register_model(
    "hed",
    task="edges",
    paper=PAPER,
    input_shape=(321, 481, 3),  # BSDS500 images (portrait ones are 481x321)
    num_classes=1,
    preprocessing="caffe",
    params=14_717_531,
    backbone="vgg16",
    backbone_adapt=_adapt_vgg16,
)
def hed(*, num_classes=1, input_shape=None, trainable_upsampling=False):
    """HED: five deeply supervised VGG16 side outputs and their learned fusion; logits [dsn1..dsn5, fuse].

    Any input size works (no minimum). The bilinear deconvolutions are frozen by default,
    as in the reference net (lr_mult 0); trainable_upsampling=True lets them learn.
    """
    if num_classes != 1:
        raise ValueError(f"hed predicts one edge map per pixel: num_classes must be 1, got {num_classes}")
    inputs = model_input(input_shape, (None, None, 3))
    # Caffe's ceil-mode pooling is 'same' for 2x2/2; pool5 is not part of HED.
    _, features = vgg_trunk(inputs, "D", pool_padding="same", last_pool=False)

    sides = []
    for i, (feature, stride) in enumerate(SIDES, start=1):
        x = layers.Conv2D(num_classes, 1, name=f"score_dsn{i}")(features[feature])
        if stride == 1:
            sides.append(layers.Identity(name=f"dsn{i}")(x))
            continue
        # The reference deconvolutions carry a bias that is zero and frozen: left out.
        x = layers.Conv2DTranspose(
            num_classes,
            2 * stride,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=BilinearUpsampling(),
            trainable=trainable_upsampling,
            name=f"upsample_{stride}",
        )(x)
        sides.append(CropToReference(0, name=f"dsn{i}")([x, inputs]))

    # The reference "new-score-weighting": a 1x1 conv that starts as the mean of the sides.
    x = layers.Concatenate(name="concat_dsn")(sides)
    fuse = layers.Conv2D(
        num_classes, 1, kernel_initializer=keras.initializers.Constant(0.2), name="fuse"
    )(x)
    return keras.Model(inputs, [*sides, fuse], name="hed")
