"""FSDS, fusing scale-associated deep side outputs (Shen et al., CVPR 2016), on a VGG16 trunk.

An extension of HED (kseg.models.hed) for object skeletons. Four scale-associated side
outputs (SSO) sit on conv2_2, conv3_3, conv4_3 and conv5_3, whose receptive fields are
14, 40, 92 and 196 pixels; conv1_2 has none (a 5-pixel field sees no skeleton). A side
output can only see skeleton points whose scale its receptive field covers, so SSO i
(i = 1..4 for conv2..conv5) predicts the classes 0..i: background and the scale classes up
to its own (2, 3, 4 and 5 classes; the task kseg.tasks.skeleton quantises the scales).
The scale-specific weighted fusion then learns, for each class k, one weight per side
output that predicts k (a 1x1 convolution over those sides' class-k maps): class 0 and 1
fuse all four sides, class 2 the last three, class 3 the last two, class 4 conv5's alone.
The fused output has the 5 classes; its skeleton map is 1 - P(background)
(Skeleton.skeleton_map).

Faithful to the authors' Caffe nets (zeakey/DeepSkeleton examples/DeepSkeleton/
train_val.prototxt, zeakey/skeleton models/fsds_train.prototxt): score-dsn convs with bias,
frozen bilinear deconvolutions (lr_mult 0, kernel 2s, stride s, each channel upsampled on its
own as train.py's interp_surgery sets them; their zero bias is left out, as in HED), Slice +
Concat into five `cat{k}-score` 1x1 convolutions with bias, initialised to the mean of their
inputs (the prototxt's constant fillers 0.25, 0.25, 0.333, 0.5, 1 are 1/n, rounded: kseg uses
1/n), concatenated into the fused scores. The geometry is HED's in kseg ('same' 3x3 convs,
Caffe's ceil-mode 2x2 pooling, 'same' deconvolutions): every side output is aligned with
the input with crop offset 0, for any input size (see kseg.models.hed).

The channel slices are keras.layers.Cropping2D with data_format="channels_first": read as
channels first, an NHWC map's last axis is the second spatial one, so the layer crops
channels. A built-in layer keeps .keras files loadable without kseg's registrations.

Parameters: VGG16 conv trunk 14,714,688 + side convs (128+1)*2 + (256+1)*3 + (512+1)*4 +
(512+1)*5 = 5,646 + fusion (4+1) + (4+1) + (3+1) + (2+1) + (1+1) = 19 trainable
(14,720,353); the frozen deconvolutions add 4^2*2^2 + 8^2*3^2 + 16^2*4^2 + 32^2*5^2 =
30,336 (count_params() 14,750,689).
"""

from __future__ import annotations

import keras
from keras import layers

from kseg.layers import BilinearUpsampling, CropToReference
from kseg.models._common import model_input
from kseg.models.vgg import VGG16_CONV_NAMES, vgg_trunk
from kseg.registry import register_model

PAPER = ("Shen, Zhao, Jiang, Wang, Zhang, Bai, Object Skeleton Extraction in Natural Images by Fusing "
         "Scale-associated Deep Side Outputs, CVPR 2016")

# (VGG16 feature, cumulative stride, classes) of the side outputs dsn2..dsn5: SSO i predicts
# background and the scale classes 1..i.
SIDES = (
    ("block2_conv2", 2, 2),
    ("block3_conv3", 4, 3),
    ("block4_conv3", 8, 4),
    ("block5_conv3", 16, 5),
)
NUM_CLASSES = SIDES[-1][2]  # background + 4 scale classes
OUTPUT_NAMES = tuple(f"dsn{i}" for i in range(2, 2 + len(SIDES))) + ("fuse",)


def fusion_sources(num_classes=NUM_CLASSES):
    """{class k: the side outputs (names) whose class-k maps the fused class k weighs}."""
    return {k: [OUTPUT_NAMES[i] for i, (_, _, classes) in enumerate(SIDES) if classes > k]
            for k in range(num_classes)}


def _adapt_vgg16(arrays, model, path):
    # Lazy import: models stay free of file handling at import time.
    from kseg.weights import copy_by_name

    return copy_by_name(arrays, VGG16_CONV_NAMES, path, "vgg16")


def _channel(x, k, channels, name):
    """x[..., k:k + 1] by a built-in layer (see the module docstring)."""
    return layers.Cropping2D(((0, 0), (k, channels - 1 - k)), data_format="channels_first", name=name)(x)


@register_model(
    "fsds",
    task="skeleton",
    paper=PAPER,
    input_shape=(300, 400, 3),  # SK-LARGE's images are about 300x400 (either orientation)
    num_classes=NUM_CLASSES,
    preprocessing="caffe",
    params=14_750_689,
    backbone="vgg16",
    backbone_adapt=_adapt_vgg16,
)
def fsds(*, num_classes=NUM_CLASSES, input_shape=None, trainable_upsampling=False):
    """FSDS: four scale-associated side outputs and their scale-specific fusion; logits [dsn2..dsn5, fuse].

    dsn2..dsn5 have 2, 3, 4 and 5 classes (background and the scale classes each side can
    see), fuse has 5. Any input size works. The bilinear deconvolutions are frozen by
    default, as in the reference net (lr_mult 0); trainable_upsampling=True lets them learn.
    """
    if num_classes != NUM_CLASSES:
        raise ValueError(f"fsds predicts background and {NUM_CLASSES - 1} skeleton scale classes (one per side "
                         f"output): num_classes must be {NUM_CLASSES}, got {num_classes}")
    inputs = model_input(input_shape, (None, None, 3))
    # Caffe's ceil-mode pooling is 'same' for 2x2/2; pool5 is not part of FSDS.
    _, features = vgg_trunk(inputs, "D", pool_padding="same", last_pool=False)

    sides = []
    for name, (feature, stride, classes) in zip(OUTPUT_NAMES, SIDES):
        i = name[3:]
        x = layers.Conv2D(classes, 1, name=f"score_dsn{i}")(features[feature])
        # The reference deconvolutions carry a bias that is zero and frozen: left out.
        x = layers.Conv2DTranspose(
            classes,
            2 * stride,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=BilinearUpsampling(),
            trainable=trainable_upsampling,
            name=f"upsample_{stride}",
        )(x)
        sides.append(CropToReference(0, name=name)([x, inputs]))

    # Scale-specific fusion: one 1x1 conv per class over the class-k maps of the sides that have it.
    by_name = dict(zip(OUTPUT_NAMES, sides))
    channels = {name: classes for name, (_, _, classes) in zip(OUTPUT_NAMES, SIDES)}
    scores = []
    for k, sources in fusion_sources(num_classes).items():
        maps = [_channel(by_name[s], k, channels[s], f"slice_{s}_{k}") for s in sources]
        x = maps[0] if len(maps) == 1 else layers.Concatenate(name=f"concat{k}")(maps)
        scores.append(layers.Conv2D(1, 1, kernel_initializer=keras.initializers.Constant(1.0 / len(maps)),
                                    name=f"cat{k}_score")(x))
    fuse = layers.Concatenate(name="fuse")(scores)
    return keras.Model(inputs, [*sides, fuse], name="fsds")
