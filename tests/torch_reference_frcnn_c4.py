"""torchvision's generic FasterRCNN on a ResNet50 / ResNet101 "C4" split (He et al., CVPR 2016,
appendix A), inference only, in plain torch (torchvision itself is not installable beside the
local CPU torch). Composed as one would with torchvision.models.detection:

    resnet = torchvision.models.resnet50(norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                             resnet.layer1, resnet.layer2, resnet.layer3)   # out_channels = 1024
    box_head = nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    FasterRCNN(backbone, rpn_anchor_generator=AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),)),
               box_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), box_head=box_head,
               box_predictor=FastRCNNPredictor(2048, num_classes))

so the state_dict has torchvision's keys:

    backbone.0.weight, backbone.1.{weight,bias,running_mean,running_var}       conv1, bn1
    backbone.{4,5,6}.<i>.{conv1,conv2,conv3}.weight, ....{bn1,bn2,bn3}.*      layer1..layer3
    backbone.{4,5,6}.0.downsample.{0.weight,1.*}
    rpn.head.conv.0.0.*, rpn.head.cls_logits.*, rpn.head.bbox_pred.*          RPNHead(1024, 9)
    roi_heads.box_head.0.<i>.*                                                layer4
    roi_heads.box_predictor.{cls_score,bbox_pred}.*                           FastRCNNPredictor

The ResNet (tests/torch_reference.py) and the detection parts (tests/torch_reference_frcnn.py:
RegionProposalNetwork, RoIHeads, MultiScaleRoIAlign, ...) are imported, not repeated.
"""

from collections import OrderedDict

import torch
from torch import nn
from torch_reference import ResNet
from torch_reference_frcnn import (
    AnchorGenerator,
    FastRCNNPredictor,
    MultiScaleRoIAlign,
    RegionProposalNetwork,
    RoIHeads,
    RPNHead,
)

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: BatchNorm2d with fixed statistics and affine
    parameters, all four buffers (no num_batches_tracked, nothing trainable)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


def freeze_batchnorm(module):
    """Every nn.BatchNorm2d under `module` replaced by a FrozenBatchNorm2d with its values (what
    building the resnet with norm_layer=FrozenBatchNorm2d and loading its weights gives)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def randomize_frozen_bn(module, seed=0):
    """Non-trivial frozen statistics, so a wrong mapping of them shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-0.2, 0.2, generator=g)
            m.running_mean.uniform_(-0.2, 0.2, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return module


class FasterRCNNResNetC4(nn.Module):
    """The composition in the module docstring, inference only, without GeneralizedRCNNTransform."""

    def __init__(self, arch="resnet50", num_classes=21, rpn_pre_nms_top_n=6000, rpn_post_nms_top_n=300,
                 rpn_nms_thresh=0.7, rpn_score_thresh=0.0, box_score_thresh=0.05, box_nms_thresh=0.5,
                 box_detections_per_img=100):
        super().__init__()
        resnet = freeze_batchnorm(ResNet(BLOCKS[arch]))
        backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                 resnet.layer1, resnet.layer2, resnet.layer3)
        backbone.out_channels = 1024
        self.backbone = backbone
        anchor_generator = AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
        head = RPNHead(1024, anchor_generator.num_anchors_per_location()[0])
        self.rpn = RegionProposalNetwork(anchor_generator, head, rpn_pre_nms_top_n, rpn_post_nms_top_n,
                                         rpn_nms_thresh, score_thresh=rpn_score_thresh)
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(["0"], 14, 2),
            nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            FastRCNNPredictor(2048, num_classes),
            score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
        )

    def forward(self, images, image_sizes=None):
        """images: normalised (B, 3, H, W), H and W multiples of 16 (no padding needed). Returns
        FasterRCNNVGG16.forward's dict (tests/torch_reference_frcnn.py): features (B, 1024, H/16,
        W/16), objectness (B, A), rpn_deltas (B, A, 4), proposals, roi_features (sum R_i, 1024, 14,
        14), box_features (sum R_i, 2048), class_logits, box_regression, detections."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        features = self.backbone(images)
        feature_dict = OrderedDict([("0", features)])
        out = {"features": features}
        out.update(self.rpn(images, image_sizes, feature_dict))
        out.update(self.roi_heads(feature_dict, out["proposals"], image_sizes))
        return out
