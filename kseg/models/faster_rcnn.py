"""Faster R-CNN on VGG16 (Ren, He, Girshick, Sun, "Faster R-CNN: Towards Real-Time Object Detection
with Region Proposal Networks", NIPS 2015): the conv5_3 map (stride 16) shared by a Region Proposal
Network (a 3x3 conv, then per location 9 anchors' objectness and box deltas: 3 scales x 3 aspect
ratios, section 3.1) and the Fast R-CNN head (RoI pooling 7x7 at 1/16, fc6 / fc7 with 4096 units,
class scores and class-specific box deltas; Girshick, "Fast R-CNN", ICCV 2015).

The paper's layout (py-faster-rcnn's VGG16 test prototxt and config: layer names `rpn_conv_3x3`
(Caffe's `rpn_conv/3x3`), `rpn_cls_score` with 2 scores per anchor (background, object) under a
softmax, `rpn_bbox_pred`, RoIPool, dropout 0.5 after fc6 and fc7, BGR minus (102.9801, 115.9465,
122.7717), 6000 / 300 proposals before / after NMS at test) has 137,078,239 parameters. With
`rpn_head="sigmoid", roi_op="align", anchor_layout="torchvision"` it is torchvision's generic
`FasterRCNN` composed with `vgg16().features[:-1]` (one objectness logit per anchor, RoIAlign 7x7
sampling 2, TwoMLPHead(25088, 4096), FastRCNNPredictor(4096, C)): 137,073,622 parameters, and
its state_dict loads by torchvision's keys.

Raw outputs (fixed shapes, R = post_nms_top_n): `rpn_objectness` (B, N) logits (paper: (B, N, 2)
scores), `rpn_deltas` (B, N, 4), N = feature cells x 9, anchor-major per cell; `proposals`
(B, R, 4) xyxy pixels and `proposal_mask` (B, R); `class_logits` (B, R, C) and `box_regression`
(B, R, 4C). `postprocess=True` (or kseg.inference_model) appends FastRCNNDecoder.
"""

from __future__ import annotations

import numbers

import keras
from keras import layers

from kseg.detection.anchors import RPN_LAYOUTS, rpn_cell_anchors
from kseg.detection.proposals import PerImage, ProposalLayer, ProposalRoIs, SoftmaxObjectness
from kseg.detection.roi import RoIAlign, RoIPool
from kseg.models._common import check_width, model_input, scaled
from kseg.models.vgg import CFGS, VGG16_CONV_NAMES, vgg_trunk
from kseg.registry import Preprocessing, TorchMapping, register_model

PAPER = ("Ren, He, Girshick, Sun, Faster R-CNN: Towards Real-Time Object Detection with Region Proposal "
         "Networks, NIPS 2015")
NUM_ANCHORS = 9  # 3 scales x 3 aspect ratios
SPATIAL_SCALE = 1 / 16  # conv5_3's stride
RPN_HEADS = ("softmax", "sigmoid")
ROI_OPS = ("pool", "align")
# Each layout's options (any of them can be overridden one by one).
LAYOUTS = {
    "paper": {"rpn_head": "softmax", "roi_op": "pool", "anchor_layout": "pyfaster", "dropout": 0.5},
    "torchvision": {"rpn_head": "sigmoid", "roi_op": "align", "anchor_layout": "torchvision", "dropout": 0.0},
}
# Detection NMS of the head at test: py-faster-rcnn TEST.NMS 0.3; torchvision box_nms_thresh 0.5.
HEAD_NMS = {"pyfaster": 0.3, "torchvision": 0.5}
# Test scales (min_size, max_size): py-faster-rcnn lib/fast_rcnn/config.py TEST.SCALES (600,), TEST.MAX_SIZE 1000;
# torchvision FasterRCNN(min_size=800, max_size=1333), its GeneralizedRCNNTransform's.
TEST_SCALES = {"paper": (600, 1000), "torchvision": (800, 1333)}
# py-faster-rcnn's PIXEL_MEANS (lib/fast_rcnn/config.py): BGR, 0..255.
CAFFE_FRCNN = Preprocessing("caffe_frcnn", mean=(102.9801, 115.9465, 122.7717), bgr=True)


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"faster_rcnn_vgg16: {name} must be one of {list(allowed)}, got {value!r}")


def rpn(features, rpn_head, width=1.0, channels=512):
    """The RPN head on `features`: (objectness for the proposal layer, rpn_objectness, rpn_deltas);
    its 3x3 conv has `channels` filters (the trunk's: 512 for VGG16, 1024 for ResNet C4) times width."""
    x = layers.Conv2D(scaled(channels, width), 3, padding="same", activation="relu", name="rpn_conv_3x3")(features)
    if rpn_head == "softmax":
        # Caffe's (B, 2A, H, W) blob holds the A background scores, then the A object scores.
        scores = layers.Conv2D(2 * NUM_ANCHORS, 1, name="rpn_cls_score")(x)
        scores = layers.Reshape((-1, 2, NUM_ANCHORS), name="rpn_cls_score_reshape")(scores)
        scores = layers.Permute((1, 3, 2), name="rpn_cls_score_anchor_major")(scores)
        raw = layers.Reshape((-1, 2), name="rpn_objectness")(scores)
        objectness = SoftmaxObjectness(name="rpn_object_logit")(raw)
    else:
        scores = layers.Conv2D(NUM_ANCHORS, 1, name="rpn_cls_score")(x)
        raw = objectness = layers.Reshape((-1,), name="rpn_objectness")(scores)
    deltas = layers.Conv2D(4 * NUM_ANCHORS, 1, name="rpn_bbox_pred")(x)
    deltas = layers.Reshape((-1, 4), name="rpn_deltas")(deltas)
    return objectness, raw, deltas


def box_head(pooled, num_classes, rows, dropout, width=1.0):
    """Fast R-CNN's head on pooled RoIs (B*R, 7, 7, 512): per image class logits and box deltas."""
    x = layers.Flatten(name="flatten")(pooled)
    x = layers.Dense(scaled(4096, width), activation="relu", name="fc6")(x)
    if dropout:
        x = layers.Dropout(dropout, name="drop6")(x)
    x = layers.Dense(scaled(4096, width), activation="relu", name="fc7")(x)
    if dropout:
        x = layers.Dropout(dropout, name="drop7")(x)
    logits = layers.Dense(num_classes, name="cls_score")(x)
    deltas = layers.Dense(4 * num_classes, name="bbox_pred")(x)
    return PerImage(rows, name="class_logits")(logits), PerImage(rows, name="box_regression")(deltas)


def torch_map():
    """torchvision FasterRCNN(vgg16().features[:-1], ...)'s state_dict keys (TwoMLPHead fc6 flattens NCHW)."""
    mapping, index = [], 0
    for convs in CFGS["D"]:
        for _ in convs:
            mapping.append(index)
            index += 2  # conv, ReLU
        index += 1  # max-pool
    out = [TorchMapping(f"backbone.{i}", n, "conv") for i, n in zip(mapping, VGG16_CONV_NAMES)]
    return out + [
        TorchMapping("rpn.head.conv.0.0", "rpn_conv_3x3", "conv"),
        TorchMapping("rpn.head.cls_logits", "rpn_cls_score", "conv"),
        TorchMapping("rpn.head.bbox_pred", "rpn_bbox_pred", "conv"),
        TorchMapping("roi_heads.box_head.fc6", "fc6", "dense_nchw", chw=(512, 7, 7)),
        TorchMapping("roi_heads.box_head.fc7", "fc7", "dense"),
        TorchMapping("roi_heads.box_predictor.cls_score", "cls_score", "dense"),
        TorchMapping("roi_heads.box_predictor.bbox_pred", "bbox_pred", "dense"),
    ]


def decoder(options: dict):
    """The FastRCNNDecoder of a model built with `options` (its layout's head NMS threshold)."""
    from kseg.detection.postprocess import FastRCNNDecoder

    resolved = _resolve(options.get("layout", "paper"), options)
    return FastRCNNDecoder(iou_threshold=HEAD_NMS[resolved["anchor_layout"]], name="frcnn_decoder")


def trainer(model, options: dict, settings: dict):
    """The RCNNTrainer of a model built with `options`: py-faster-rcnn's training settings for the
    pyfaster anchors (the paper's layout), torchvision's for its anchors; `settings` override them."""
    from kseg.detection.rcnn_trainer import RCNNTrainer

    resolved = _resolve(options.get("layout", "paper"), options)
    convention = "pyfaster" if resolved["anchor_layout"] == "pyfaster" else "torchvision"
    return RCNNTrainer(model, **{"convention": convention, **settings})


def _resolve(layout, options):
    """The layout's options, overridden by those given (not None)."""
    _check("layout", layout, LAYOUTS)
    return {**LAYOUTS[layout], **{k: options[k] for k in LAYOUTS[layout] if options.get(k) is not None}}


def _adapt_vgg(arrays, model, path):
    """ImageNet VGG16 -> the trunk's 13 convs and fc6 / fc7 from fc1 / fc2 unchanged (Fast R-CNN)."""
    from kseg.weights import copy_by_name

    out = copy_by_name(arrays, VGG16_CONV_NAMES + ["fc1", "fc2"], path, "vgg16")
    out["fc6"], out["fc7"] = out.pop("fc1"), out.pop("fc2")
    return out


@register_model(
    "faster_rcnn_vgg16",
    task="detection",
    paper=PAPER,
    input_shape=(None, None, 3),
    num_classes=21,
    preprocessing=CAFFE_FRCNN,
    params=137_078_239,
    layouts={"paper": {"layout": "paper"}, "torchvision": {"layout": "torchvision"}},
    layout_preprocessing={"torchvision": "torch"},
    torch_map=torch_map,
    backbone="vgg16",
    backbone_adapt=_adapt_vgg,
    postprocess=decoder,
    trainer=trainer,
    test_scales=TEST_SCALES,
)
def faster_rcnn_vgg16(*, num_classes=21, input_shape=None, layout="paper", rpn_head=None, roi_op=None,
                      anchor_layout=None, dropout=None, pre_nms_top_n=6000, post_nms_top_n=300, postprocess=False,
                      width=1.0, anchor_sizes=(128, 256, 512)):
    """Faster R-CNN, VGG16: raw named outputs (see the module docstring); postprocess=True decodes.

    layout: "paper" or "torchvision" (LAYOUTS: the four options below at once; each option given
    overrides its layout's value). rpn_head: "softmax" (the paper's 2 scores per anchor) or
    "sigmoid" (torchvision's 1 logit); roi_op: "pool" (RoIPool, the paper) or "align" (RoIAlign,
    torchvision); anchor_layout: "pyfaster" or "torchvision" anchors
    (kseg.detection.anchors.rpn_cell_anchors); dropout after fc6 / fc7 (0 for torchvision's
    TwoMLPHead); pre/post_nms_top_n: the test-time proposal counts. width: a channel multiplier in
    (0, 1] for the trunk, the RPN conv and fc6 / fc7 (kseg's, for CPU tests and demos; the anchors,
    outputs and their shapes stay). anchor_sizes: the 3 anchor scales in input pixels (the paper's
    128, 256, 512 for ~600-pixel images; smaller for small images or objects, as torchvision's
    AnchorGenerator(sizes=...) allows; multiples of 16 for the pyfaster layout).
    """
    options = _resolve(layout, {"rpn_head": rpn_head, "roi_op": roi_op, "anchor_layout": anchor_layout,
                                "dropout": dropout})
    rpn_head, roi_op, anchor_layout, dropout = (options[k] for k in ("rpn_head", "roi_op", "anchor_layout", "dropout"))
    _check("rpn_head", rpn_head, RPN_HEADS)
    _check("roi_op", roi_op, ROI_OPS)
    _check("anchor_layout", anchor_layout, RPN_LAYOUTS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"faster_rcnn_vgg16: num_classes must be an int >= 2, got {num_classes!r}")
    check_width(width, "faster_rcnn_vgg16")
    inputs = model_input(input_shape, (None, None, 3))
    features, _ = vgg_trunk(inputs, last_pool=False, width=width)
    objectness, rpn_objectness, rpn_deltas = rpn(features, rpn_head, width)
    cells = rpn_cell_anchors(tuple(anchor_sizes), layout=anchor_layout)
    proposals, mask = ProposalLayer(cells, pre_nms_top_n=pre_nms_top_n,
                                    post_nms_top_n=post_nms_top_n, name="proposal_layer")(
        [objectness, rpn_deltas, features, inputs])
    proposals = layers.Identity(name="proposals")(proposals)
    mask = layers.Identity(name="proposal_mask")(mask)
    rois = ProposalRoIs(name="rois")(proposals)
    pool = (RoIPool(7, SPATIAL_SCALE, name="roi_pool5") if roi_op == "pool"
            else RoIAlign(7, SPATIAL_SCALE, 2, name="roi_align5"))
    class_logits, box_regression = box_head(pool([features, rois]), int(num_classes), post_nms_top_n, dropout, width)
    raw = [rpn_objectness, rpn_deltas, proposals, mask, class_logits, box_regression]
    if not postprocess:
        return keras.Model(inputs, raw, name="faster_rcnn_vgg16")
    found = decoder(options)([proposals, mask, class_logits, box_regression, inputs])
    return keras.Model(inputs, found, name="faster_rcnn_vgg16")
