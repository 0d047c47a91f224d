"""Fast R-CNN on VGG16 (Girshick, "Fast R-CNN", ICCV 2015): the detector of precomputed region
proposals (Selective Search's in the paper) that Faster R-CNN later fed from its RPN.

The network (py-faster-rcnn's models/pascal_voc/VGG16/fast_rcnn/test.prototxt): VGG16's 13 convs
without pool5 (conv5_3 at stride 16, kseg's `vgg_trunk(last_pool=False)`), RoI max pooling 7x7 at
1/16 of each proposal (`roi_pool5`, section 2.1), fc6 and fc7 with 4096 units, ReLU and dropout
0.5 (identity at test), then `cls_score` (C class logits, class 0 background) and `bbox_pred` (4C
class-specific box deltas). 134,690,729 parameters for C = 21: the convs 14,714,688, fc6
102,764,544, fc7 16,781,312, cls_score 86,037, bbox_pred 344,148. Preprocessing: py-faster-rcnn's
BGR PIXEL_MEANS (lib/fast_rcnn/config.py), as kseg's faster_rcnn_vgg16.

Inputs: `image` (B, H, W, 3) of any size, and `proposals` (B, R, 4), R = num_proposals, boxes as
(x1, y1, x2, y2) pixels of the network input (a data reader scales file proposals with the image,
as py-faster-rcnn's `_project_im_rois`). Images with fewer boxes are padded: a *padding row* is
any row with x2 <= x1 or y2 <= y1 (all zeros, say; NaN rows count as padding too). Padding rows are
pooled as the box (0, 0, 0, 0) and masked out (layer `proposal_input`, kseg.detection.precomputed's
PaddedProposals): `proposal_mask` is False there and the decoder ignores them. Boxes partly or
wholly outside the image are valid; RoI pooling clamps them to the feature map (an empty bin pools
0). kseg.detection.precomputed reads proposal files into such padded arrays.

Raw outputs (the naming of kseg's faster_rcnn_vgg16, whose head this is): `proposals` (the input,
passed through: the decoder reads it by this name), `proposal_mask` (B, R) bool, `class_logits`
(B, R, C) and `box_regression` (B, R, 4C) (deltas in torchvision's coder convention: weights
(10, 10, 5, 5), i.e. normalised by py-faster-rcnn's BBOX_NORMALIZE_STDS, no +1 widths). Inside:
the `rois` layer (ProposalRoIs) gives (B*R, 5) RoIs, `roi_pool5` is called on [features, rois],
and the `class_logits` / `box_regression` layers (PerImage) reshape the flat (B*R, ...) head
outputs, so [features, rois] -> flat logits and deltas can be cut out of the model for training.
`postprocess=True` (or kseg.inference_model) appends FastRCNNDecoder with py-faster-rcnn's test
settings: scores > 0.05, per-class NMS at 0.3 (TEST.NMS), 100 detections per image.
"""

from __future__ import annotations

import numbers

import keras
from keras import layers

from kseg.detection.precomputed import PaddedProposals
from kseg.detection.proposals import ProposalRoIs
from kseg.detection.roi import RoIPool
from kseg.models._common import check_width, model_input, scaled
from kseg.models.faster_rcnn import CAFFE_FRCNN, HEAD_NMS, SPATIAL_SCALE, TEST_SCALES, _adapt_vgg, box_head
from kseg.models.vgg import CFGS, VGG16_CONV_NAMES, vgg_trunk
from kseg.registry import TorchMapping, register_model

PAPER = "Girshick, Fast R-CNN, ICCV 2015"
# Proposals per image (the input's R): R-CNN and Fast R-CNN test on ~2000 Selective Search boxes per
# image (its fast mode); fewer are padded, more cut by the caller (precomputed.pad_proposals).
NUM_PROPOSALS = 2000


def torch_map(width=1.0):
    """torchvision-style keys of Faster R-CNN's VGG16 head (kseg's faster_rcnn_vgg16 without the
    RPN): backbone.N (vgg16().features[:-1]), roi_heads.box_head.fc6 / fc7 (TwoMLPHead: fc6
    flattens NCHW), roi_heads.box_predictor.cls_score / bbox_pred (FastRCNNPredictor). width: the
    model's channel multiplier (fc6's input is conv5_3's channels x 7 x 7)."""
    mapping, index = [], 0
    for convs in CFGS["D"]:
        for _ in convs:
            mapping.append(index)
            index += 2  # conv, ReLU
        index += 1  # max-pool
    out = [TorchMapping(f"backbone.{i}", n, "conv") for i, n in zip(mapping, VGG16_CONV_NAMES)]
    return out + [
        TorchMapping("roi_heads.box_head.fc6", "fc6", "dense_nchw", chw=(scaled(512, width), 7, 7)),
        TorchMapping("roi_heads.box_head.fc7", "fc7", "dense"),
        TorchMapping("roi_heads.box_predictor.cls_score", "cls_score", "dense"),
        TorchMapping("roi_heads.box_predictor.bbox_pred", "bbox_pred", "dense"),
    ]


def decoder(options: dict):
    """FastRCNNDecoder with py-faster-rcnn's test settings (TEST.NMS 0.3; thresh 0.05, 100 per image)."""
    from kseg.detection.postprocess import FastRCNNDecoder

    return FastRCNNDecoder(iou_threshold=HEAD_NMS["pyfaster"], name="frcnn_decoder")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"fast_rcnn_vgg16: {name} must be an int >= {low}, got {value!r}")


def trainer(model, options: dict, settings: dict):
    """The RCNNTrainer of a fast_rcnn_vgg16: RoIs sampled from the proposals input with py-faster-rcnn's
    Fast R-CNN settings (fg IoU >= 0.5, bg [0.1, 0.5), 25% foreground, SmoothL1 beta 1), `settings` over them."""
    from kseg.detection.rcnn_trainer import RCNNTrainer

    return RCNNTrainer(model, **{"convention": "pyfaster", **settings})


@register_model(
    "fast_rcnn_vgg16",
    task="detection",
    paper=PAPER,
    input_shape=(None, None, 3),
    num_classes=21,
    preprocessing=CAFFE_FRCNN,
    params=134_690_729,
    torch_map=torch_map,
    backbone="vgg16",
    backbone_adapt=_adapt_vgg,
    postprocess=decoder,
    trainer=trainer,
    test_scales=TEST_SCALES,
)
def fast_rcnn_vgg16(*, num_classes=21, input_shape=None, num_proposals=NUM_PROPOSALS, dropout=0.5,
                    postprocess=False, width=1.0):
    """Fast R-CNN, VGG16: inputs image and proposals, raw named outputs (module docstring).

    num_proposals: R, the proposals input's rows per image (padding rows allowed). dropout after
    fc6 / fc7 (training only). postprocess=True appends the decoder. width: a channel multiplier in
    (0, 1] for the trunk and fc6 / fc7 (kseg's, for CPU tests; the outputs keep their shapes).
    Memory: kseg's RoI pooling reads a range-maximum table of the feature map (about 23 maps at
    600x1000) and gathers (B*R, 7, 7, C) floats: about 250 MB for one 600x1000 image with 300
    proposals, about 1.1 GB with 2000.
    """
    _check_int("num_classes", num_classes, 2)
    _check_int("num_proposals", num_proposals, 1)
    check_width(width, "fast_rcnn_vgg16")
    image = model_input(input_shape, (None, None, 3))
    proposals = keras.Input((int(num_proposals), 4), name="proposals")
    features, _ = vgg_trunk(image, last_pool=False, width=width)
    boxes, mask = PaddedProposals(name="proposal_input")(proposals)  # padding rows: the zero box
    mask = layers.Identity(name="proposal_mask")(mask)
    rois = ProposalRoIs(name="rois")(boxes)
    pooled = RoIPool(7, SPATIAL_SCALE, name="roi_pool5")([features, rois])
    class_logits, box_regression = box_head(pooled, int(num_classes), int(num_proposals), dropout, width)
    raw = [proposals, mask, class_logits, box_regression]
    if not postprocess:
        return keras.Model([image, proposals], raw, name="fast_rcnn_vgg16")
    found = decoder({})([proposals, mask, class_logits, box_regression, image])
    return keras.Model([image, proposals], found, name="fast_rcnn_vgg16")
