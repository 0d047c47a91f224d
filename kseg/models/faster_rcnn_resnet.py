"""Faster R-CNN on ResNet50 / ResNet101, the "C4" setup of He, Zhang, Ren, Sun, "Deep Residual
Learning for Image Recognition", CVPR 2016 (appendix A) with Ren et al.'s Faster R-CNN (NIPS 2015):
conv1 .. conv4_x (stride 16, 1024 channels) computed once per image and shared by the Region
Proposal Network and the detection head; RoI features are taken before conv5_1, and all of conv5_x
(three bottlenecks, stride 2 in the first: 14x14 RoIs -> 7x7x2048) plus a global average pool play
the role of VGG16's fc6 / fc7, followed by the class scores and class-specific box deltas. BatchNorm
is frozen (the paper fixes the ImageNet statistics for detection; torchvision's detection backbones
use `FrozenBatchNorm2d`, eps 1e-5): every BatchNormalization layer has trainable=False, so it
always normalises with its moving statistics.

`layout="torchvision"` (the default) is torchvision's generic `FasterRCNN` composed with
`nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3)` of `resnet50()` / `resnet101()`
(`out_channels` 1024), `RPNHead(1024, 9)` (one sigmoid logit per anchor), torchvision's anchors
(`AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))`), `MultiScaleRoIAlign(["0"], 14, 2)`,
`box_head = nn.Sequential(layer4, AdaptiveAvgPool2d(1), Flatten())` and
`FastRCNNPredictor(2048, C)`, head NMS 0.5. Its state_dict keys (see torch_map):

    backbone.0.weight                                   conv1
    backbone.1.{weight,bias,running_mean,running_var}   bn1 (FrozenBatchNorm2d buffers)
    backbone.{4,5,6}.<block>.{conv1,bn1,...,downsample.0,downsample.1}.*   layer1..layer3
    rpn.head.conv.0.0.*, rpn.head.cls_logits.*, rpn.head.bbox_pred.*
    roi_heads.box_head.0.<block>.*                      layer4 (conv5_x)
    roi_heads.box_predictor.cls_score.*, roi_heads.box_predictor.bbox_pred.*

Parameters (21 classes): R50-C4 33,207,510 torch-style (conv, dense and BN affine; torchvision's
trainable part, without the frozen BN's weight and bias, is 33,154,390), 33,260,630 in Keras'
count_params with the BN moving statistics; R101-C4 52,199,638 / 52,304,982.

`layout="paper"` keeps that trunk (torchvision's v1.5 bottleneck: stride on the 3x3, so
torchvision's ImageNet weights initialise it) and uses py-faster-rcnn's head conventions
(py-faster-rcnn `lib/rpn/proposal_layer.py`, `generate_anchors.py`; `models/*/faster_rcnn_end2end`
prototxts): the 2-way softmax RPN (9,225 parameters more), its anchors, RoIPool (14x14, the C4
resolution of Detectron's ResNet configs), head NMS 0.3 and test scale 600 / 1000. Both layouts take
torchvision's preprocessing (their trunk's ImageNet weights). The raw outputs and layer names are
faster_rcnn_vgg16's (kseg.models.faster_rcnn): `proposal_layer`, `rois`, `roi_align5` / `roi_pool5`
on [features, rois], then plain Keras layers (conv5_x, `avg_pool`, `cls_score`, `bbox_pred`) up to the
flat (B*R, C) / (B*R, 4C) inputs of the PerImage outputs `class_logits` / `box_regression`.
"""

from __future__ import annotations

import functools
import numbers

import keras
from keras import layers

from kseg.detection.anchors import RPN_LAYOUTS, rpn_cell_anchors
from kseg.detection.proposals import PerImage, ProposalLayer, ProposalRoIs
from kseg.detection.roi import RoIAlign, RoIPool
from kseg.models import resnet
from kseg.models._common import check_width, model_input, scaled
from kseg.models.faster_rcnn import HEAD_NMS, ROI_OPS, RPN_HEADS, SPATIAL_SCALE, TEST_SCALES, rpn
from kseg.registry import TorchMapping, register_model

PAPER = ("Ren, He, Girshick, Sun, Faster R-CNN: Towards Real-Time Object Detection with Region Proposal "
         "Networks, NIPS 2015; He, Zhang, Ren, Sun, Deep Residual Learning for Image Recognition, CVPR 2016 "
         "(ResNet-C4)")
POOLED = 14  # RoI features 14x14 at 1/16; conv5_1's stride 2 makes them 7x7
TRUNK = "torchvision"  # kseg.models.resnet.LAYOUTS: no conv biases, BN eps 1e-5, stride on the 3x3
LAYOUTS = {
    "paper": {"rpn_head": "softmax", "roi_op": "pool", "anchor_layout": "pyfaster"},
    "torchvision": {"rpn_head": "sigmoid", "roi_op": "align", "anchor_layout": "torchvision"},
}
# torchvision's resnet children in FasterRCNN's backbone nn.Sequential(conv1, bn1, relu, maxpool,
# layer1, layer2, layer3) and box head nn.Sequential(layer4, AdaptiveAvgPool2d(1), Flatten()).
TORCH_MODULES = {"conv1": "backbone.0", "bn1": "backbone.1", "layer1": "backbone.4", "layer2": "backbone.5",
                 "layer3": "backbone.6", "layer4": "roi_heads.box_head.0"}


def _check(model, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{model}: {name} must be one of {list(allowed)}, got {value!r}")


def _resolve(layout, options, model="faster_rcnn_resnet"):
    """The layout's options, overridden by those given (not None)."""
    _check(model, "layout", layout, LAYOUTS)
    return {**LAYOUTS[layout], **{k: options[k] for k in LAYOUTS[layout] if options.get(k) is not None}}


def trunk(x, arch, width=1.0):
    """conv1 .. conv4_x of kseg.models.resnet (torchvision layout), keras.applications names:
    the shared stride-16 map `conv4_block{6,23}_out` (1024 x width channels)."""
    eps = resnet.LAYOUTS[TRUNK]["epsilon"]
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(scaled(64, width), 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.BatchNormalization(epsilon=eps, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)  # post-ReLU: zeros pad like torchvision's -inf
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage in (2, 3, 4):
        x = _stage(x, arch, stage, width)
    return x


def _stage(x, arch, stage, width):
    """Stage `stage` (2..5) of ResNet `arch`: its bottlenecks, stride 2 in the first but for stage 2."""
    filters, blocks = resnet.STAGE_FILTERS[stage - 2], resnet.BLOCKS[arch][stage - 2]
    for block in range(1, blocks + 1):
        x = resnet._bottleneck(x, scaled(filters, width), stride=2 if block == 1 and stage > 2 else 1, dilation=1,
                               conv_shortcut=block == 1, layout=TRUNK, name=f"conv{stage}_block{block}")
    return x


def box_head(pooled, arch, num_classes, rows, width=1.0):
    """conv5_x on the pooled RoIs (B*R, 14, 14, 1024) -> 7x7x2048, averaged, then the class logits and
    box deltas (B*R, C) / (B*R, 4C), back per image as `class_logits` / `box_regression` (B, R, ...)."""
    x = _stage(pooled, arch, 5, width)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(num_classes, name="cls_score")(x)
    deltas = layers.Dense(4 * num_classes, name="bbox_pred")(x)
    return PerImage(rows, name="class_logits")(logits), PerImage(rows, name="box_regression")(deltas)


def torch_map(arch):
    """torchvision FasterRCNN's state_dict keys for the composition in the module docstring."""
    table = []
    for m in resnet.torch_map(arch):
        if m.layer == "predictions":
            continue
        module, _, rest = m.prefix.partition(".")
        prefix = TORCH_MODULES[module] + (f".{rest}" if rest else "")
        table.append(TorchMapping(prefix, m.layer, m.kind))
    return table + [
        TorchMapping("rpn.head.conv.0.0", "rpn_conv_3x3", "conv"),
        TorchMapping("rpn.head.cls_logits", "rpn_cls_score", "conv"),
        TorchMapping("rpn.head.bbox_pred", "rpn_bbox_pred", "conv"),
        TorchMapping("roi_heads.box_predictor.cls_score", "cls_score", "dense"),
        TorchMapping("roi_heads.box_predictor.bbox_pred", "bbox_pred", "dense"),
    ]


def decoder(options: dict):
    """The FastRCNNDecoder of a model built with `options` (its layout's head NMS threshold)."""
    from kseg.detection.postprocess import FastRCNNDecoder

    resolved = _resolve(options.get("layout", "torchvision"), options)
    return FastRCNNDecoder(iou_threshold=HEAD_NMS[resolved["anchor_layout"]], name="frcnn_decoder")


def trainer(model, options: dict, settings: dict):
    """The RCNNTrainer of a model built with `options`: py-faster-rcnn's training settings for the
    pyfaster anchors (the paper's layout), torchvision's for its anchors; `settings` override them.
    Frozen BN: its variables are not trainable, so the trainer leaves them."""
    from kseg.detection.rcnn_trainer import RCNNTrainer

    resolved = _resolve(options.get("layout", "torchvision"), options)
    convention = "pyfaster" if resolved["anchor_layout"] == "pyfaster" else "torchvision"
    return RCNNTrainer(model, **{"convention": convention, **settings})


def _adapt_resnet(arch, arrays, model, path):
    """ImageNet ResNet (torchvision's layout) -> conv1 .. conv5_x by name; the RPN and predictor keep theirs."""
    from kseg.weights import WeightsMismatchError, copy_by_name

    if len(arrays.get("conv1_conv", ())) == 2:
        raise WeightsMismatchError(
            f"{path}: keras.applications {arch} weights (conv biases, stride on the 1x1) do not fit "
            f"faster_rcnn_{arch}_c4, which uses torchvision's layout; pass torchvision's {arch} state_dict")
    return copy_by_name(arrays, [m.layer for m in resnet.torch_map(arch) if m.layer != "predictions"], path, arch)


def _faster_rcnn_c4(arch, *, num_classes, input_shape, layout, rpn_head, roi_op, anchor_layout, pre_nms_top_n,
                    post_nms_top_n, postprocess, width, anchor_sizes):
    name = f"faster_rcnn_{arch}_c4"
    options = _resolve(layout, {"rpn_head": rpn_head, "roi_op": roi_op, "anchor_layout": anchor_layout}, name)
    rpn_head, roi_op, anchor_layout = (options[k] for k in ("rpn_head", "roi_op", "anchor_layout"))
    _check(name, "rpn_head", rpn_head, RPN_HEADS)
    _check(name, "roi_op", roi_op, ROI_OPS)
    _check(name, "anchor_layout", anchor_layout, RPN_LAYOUTS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"{name}: num_classes must be an int >= 2, got {num_classes!r}")
    check_width(width, name)
    inputs = model_input(input_shape, (None, None, 3))
    features = trunk(inputs, arch, width)
    objectness, rpn_objectness, rpn_deltas = rpn(features, rpn_head, width, channels=1024)
    cells = rpn_cell_anchors(tuple(anchor_sizes), layout=anchor_layout)
    proposals, mask = ProposalLayer(cells, pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
                                    name="proposal_layer")(
        [objectness, rpn_deltas, features, inputs])
    proposals = layers.Identity(name="proposals")(proposals)
    mask = layers.Identity(name="proposal_mask")(mask)
    rois = ProposalRoIs(name="rois")(proposals)
    pool = (RoIPool(POOLED, SPATIAL_SCALE, name="roi_pool5") if roi_op == "pool"
            else RoIAlign(POOLED, SPATIAL_SCALE, 2, name="roi_align5"))
    class_logits, box_regression = box_head(pool([features, rois]), arch, int(num_classes), post_nms_top_n, width)
    outputs = [rpn_objectness, rpn_deltas, proposals, mask, class_logits, box_regression]
    if postprocess:
        outputs = decoder({**options, "layout": layout})([proposals, mask, class_logits, box_regression, inputs])
    model = keras.Model(inputs, outputs, name=name)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False  # frozen BN (FrozenBatchNorm2d): moving statistics in training too
    return model


def _spec(arch, params):
    return dict(
        task="detection",
        paper=PAPER,
        input_shape=(None, None, 3),
        num_classes=21,
        preprocessing="torch",
        params=params,
        layouts={"paper": {"layout": "paper"}, "torchvision": {"layout": "torchvision"}},
        torch_map=functools.partial(torch_map, arch),
        backbone=arch,
        backbone_adapt=functools.partial(_adapt_resnet, arch),
        postprocess=decoder,
        trainer=trainer,
        test_scales=TEST_SCALES,
    )


@register_model("faster_rcnn_resnet50_c4", **_spec("resnet50", 33_260_630))
def faster_rcnn_resnet50_c4(*, num_classes=21, input_shape=None, layout="torchvision", rpn_head=None, roi_op=None,
                            anchor_layout=None, pre_nms_top_n=6000, post_nms_top_n=300, postprocess=False,
                            width=1.0, anchor_sizes=(128, 256, 512)):
    """Faster R-CNN, ResNet50-C4: raw named outputs (kseg.models.faster_rcnn); postprocess=True decodes.

    layout: "torchvision" (default) or "paper" (LAYOUTS: the three options below at once; each
    option given overrides its layout's value). rpn_head: "sigmoid" (torchvision's one logit per
    anchor) or "softmax" (the paper's 2 scores); roi_op: "align" (RoIAlign 14x14, sampling 2) or
    "pool" (RoIPool 14x14); anchor_layout: "torchvision" or "pyfaster"
    (kseg.detection.anchors.rpn_cell_anchors); pre/post_nms_top_n: the test-time proposal counts;
    postprocess=True appends FastRCNNDecoder (head NMS 0.5 with torchvision's anchors, 0.3 with
    py-faster-rcnn's). width: a channel multiplier in (0, 1] for the trunk, conv5_x and the RPN
    conv (kseg's, for CPU tests and demos; the anchors, outputs and their shapes stay).
    anchor_sizes: the 3 anchor scales in input pixels (torchvision's AnchorGenerator(sizes=...);
    multiples of 16 for the pyfaster layout).
    """
    return _faster_rcnn_c4("resnet50", num_classes=num_classes, input_shape=input_shape, layout=layout,
                           rpn_head=rpn_head, roi_op=roi_op, anchor_layout=anchor_layout, pre_nms_top_n=pre_nms_top_n,
                           post_nms_top_n=post_nms_top_n, postprocess=postprocess, width=width,
                           anchor_sizes=anchor_sizes)


@register_model("faster_rcnn_resnet101_c4", **_spec("resnet101", 52_304_982))
def faster_rcnn_resnet101_c4(*, num_classes=21, input_shape=None, layout="torchvision", rpn_head=None, roi_op=None,
                             anchor_layout=None, pre_nms_top_n=6000, post_nms_top_n=300, postprocess=False,
                             width=1.0, anchor_sizes=(128, 256, 512)):
    """Faster R-CNN, ResNet101-C4 (conv4_x: 23 bottlenecks); the options of faster_rcnn_resnet50_c4."""
    return _faster_rcnn_c4("resnet101", num_classes=num_classes, input_shape=input_shape, layout=layout,
                           rpn_head=rpn_head, roi_op=roi_op, anchor_layout=anchor_layout, pre_nms_top_n=pre_nms_top_n,
                           post_nms_top_n=post_nms_top_n, postprocess=postprocess, width=width,
                           anchor_sizes=anchor_sizes)
