"""The training half of torchvision's Faster R-CNN, in plain torch (torchvision itself is not
installable beside the local CPU torch): what GeneralizedRCNN computes in training mode on top of
the inference modules of tests/torch_reference_frcnn.py (and _c4), written with torchvision's
names (models/detection/_utils.py: Matcher, BalancedPositiveNegativeSampler, BoxCoder.encode;
rpn.py: assign_targets_to_anchors, compute_loss; roi_heads.py: select_training_samples,
fastrcnn_loss).

`training_losses(module, images, targets)` returns the four losses of one batch as torchvision's
FasterRCNN does in train mode ({"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
"loss_box_reg"}), with its defaults: RPN 256 anchors per image at most half positive (IoU 0.7 /
0.3, low-quality matches kept), 2000 proposals before and after NMS; 512 RoIs per image, a quarter
foreground at IoU 0.5, the GT boxes appended to the proposals; SmoothL1 with beta 1/9.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch_reference_frcnn import box_iou

# ------------------------------------------------------------------- models/detection/_utils.py


class Matcher:
    """Each prediction (column) gets its best ground truth (row) index, or BELOW_LOW_THRESHOLD (-1)
    under `low_threshold`, BETWEEN_THRESHOLDS (-2) in [low, high); with allow_low_quality_matches,
    every prediction that is some ground truth's best match keeps it."""

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold, low_threshold, allow_low_quality_matches=False):
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix):
        matched_vals, matches = match_quality_matrix.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        below_low_threshold = matched_vals < self.low_threshold
        between_thresholds = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below_low_threshold] = self.BELOW_LOW_THRESHOLD
        matches[between_thresholds] = self.BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            highest_quality_foreach_gt, _ = match_quality_matrix.max(dim=1)
            pred_inds_to_update = torch.where(match_quality_matrix == highest_quality_foreach_gt[:, None])[1]
            matches[pred_inds_to_update] = all_matches[pred_inds_to_update]
        return matches


class BalancedPositiveNegativeSampler:
    """Per image, up to batch_size_per_image * positive_fraction positives (labels >= 1) and the
    rest negatives (labels == 0), each chosen by randperm. Returns per-image uint8 masks."""

    def __init__(self, batch_size_per_image, positive_fraction):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, matched_idxs):
        pos_idx, neg_idx = [], []
        for matched_idxs_per_image in matched_idxs:
            positive = torch.where(matched_idxs_per_image >= 1)[0]
            negative = torch.where(matched_idxs_per_image == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos_idx_per_image = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg_idx_per_image = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(matched_idxs_per_image, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched_idxs_per_image, dtype=torch.uint8)
            pos_mask[pos_idx_per_image] = 1
            neg_mask[neg_idx_per_image] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


def encode(reference_boxes, proposals, weights):
    """BoxCoder.encode_single: (dx, dy, dw, dh) of `reference_boxes` (the matched GT) against
    `proposals`, times `weights`."""
    wx, wy, ww, wh = weights
    ex_widths = proposals[:, 2] - proposals[:, 0]
    ex_heights = proposals[:, 3] - proposals[:, 1]
    ex_ctr_x = proposals[:, 0] + 0.5 * ex_widths
    ex_ctr_y = proposals[:, 1] + 0.5 * ex_heights
    gt_widths = reference_boxes[:, 2] - reference_boxes[:, 0]
    gt_heights = reference_boxes[:, 3] - reference_boxes[:, 1]
    gt_ctr_x = reference_boxes[:, 0] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[:, 1] + 0.5 * gt_heights
    return torch.stack((wx * (gt_ctr_x - ex_ctr_x) / ex_widths, wy * (gt_ctr_y - ex_ctr_y) / ex_heights,
                        ww * torch.log(gt_widths / ex_widths), wh * torch.log(gt_heights / ex_heights)), dim=1)


# ------------------------------------------------------------------------ models/detection/rpn.py


def assign_targets_to_anchors(anchors, targets, proposal_matcher):
    labels, matched_gt_boxes = [], []
    for anchors_per_image, targets_per_image in zip(anchors, targets):
        gt_boxes = targets_per_image["boxes"]
        if gt_boxes.numel() == 0:
            matched_gt_boxes.append(torch.zeros_like(anchors_per_image))
            labels.append(torch.zeros(anchors_per_image.shape[0], dtype=torch.float32))
            continue
        matched_idxs = proposal_matcher(box_iou(gt_boxes, anchors_per_image))
        matched_gt_boxes.append(gt_boxes[matched_idxs.clamp(min=0)])
        labels_per_image = (matched_idxs >= 0).to(dtype=torch.float32)
        labels_per_image[matched_idxs == Matcher.BELOW_LOW_THRESHOLD] = 0.0
        labels_per_image[matched_idxs == Matcher.BETWEEN_THRESHOLDS] = -1.0
        labels.append(labels_per_image)
    return labels, matched_gt_boxes


def rpn_compute_loss(objectness, pred_bbox_deltas, labels, regression_targets, fg_bg_sampler):
    sampled_pos_inds, sampled_neg_inds = fg_bg_sampler(labels)
    sampled_pos_inds = torch.where(torch.cat(sampled_pos_inds, dim=0))[0]
    sampled_neg_inds = torch.where(torch.cat(sampled_neg_inds, dim=0))[0]
    sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds], dim=0)
    objectness = objectness.flatten()
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    box_loss = F.smooth_l1_loss(pred_bbox_deltas[sampled_pos_inds], regression_targets[sampled_pos_inds],
                                beta=1 / 9, reduction="sum") / sampled_inds.numel()
    objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled_inds], labels[sampled_inds])
    return objectness_loss, box_loss


def rpn_forward_train(rpn, images, image_sizes, features, targets):
    """RegionProposalNetwork.forward in training mode: (proposals per image, losses). The module's
    pre/post NMS top-n are used as given (set them to the training values, 2000 / 2000)."""
    out = rpn(images, image_sizes, features)  # the inference half: anchors, raw outputs, proposals
    labels, matched_gt_boxes = assign_targets_to_anchors(out["anchors"], targets, Matcher(0.7, 0.3, True))
    regression_targets = [encode(m, a, (1.0, 1.0, 1.0, 1.0)) for m, a in zip(matched_gt_boxes, out["anchors"])]
    loss_objectness, loss_rpn_box_reg = rpn_compute_loss(out["objectness"], out["rpn_deltas"].reshape(-1, 4), labels,
                                                         regression_targets, BalancedPositiveNegativeSampler(256, 0.5))
    return out["proposals"], {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}


# ------------------------------------------------------------------ models/detection/roi_heads.py


def fastrcnn_loss(class_logits, box_regression, labels, regression_targets):
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels)
    pos_inds = torch.where(labels > 0)[0]
    labels_pos = labels[pos_inds]
    n, _ = class_logits.shape
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[pos_inds, labels_pos], regression_targets[pos_inds],
                                beta=1 / 9, reduction="sum") / labels.numel()
    return classification_loss, box_loss


def select_training_samples(proposals, targets, batch_size_per_image=512, positive_fraction=0.25):
    """RoIHeads.select_training_samples: GT boxes appended, matched at IoU 0.5 (background below it),
    sampled; returns (proposals, labels, regression targets) per image."""
    matcher = Matcher(0.5, 0.5, False)
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
    proposals = [torch.cat((p, t["boxes"])) for p, t in zip(proposals, targets)]
    matched_idxs, labels = [], []
    for proposals_in_image, t in zip(proposals, targets):
        matched_idxs_in_image = matcher(box_iou(t["boxes"], proposals_in_image))
        clamped = matched_idxs_in_image.clamp(min=0)
        labels_in_image = t["labels"][clamped].to(dtype=torch.int64)
        labels_in_image[matched_idxs_in_image == Matcher.BELOW_LOW_THRESHOLD] = 0
        labels_in_image[matched_idxs_in_image == Matcher.BETWEEN_THRESHOLDS] = -1
        matched_idxs.append(clamped)
        labels.append(labels_in_image)
    sampled_pos_inds, sampled_neg_inds = sampler(labels)
    regression_targets = []
    for i, (pos, neg) in enumerate(zip(sampled_pos_inds, sampled_neg_inds)):
        img_sampled_inds = torch.where(pos | neg)[0]
        proposals[i] = proposals[i][img_sampled_inds]
        labels[i] = labels[i][img_sampled_inds]
        matched = targets[i]["boxes"][matched_idxs[i][img_sampled_inds]]
        regression_targets.append(encode(matched, proposals[i], (10.0, 10.0, 5.0, 5.0)))
    return proposals, labels, regression_targets


def training_losses(module, images, targets):
    """The four losses of FasterRCNN in train mode (see the module docstring). images: normalised
    (B, 3, H, W); targets: [{"boxes" (M, 4) xyxy pixels, "labels" (M,) int64, 1..C-1}]."""
    image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
    features = OrderedDict([("0", module.backbone(images))])
    proposals, losses = rpn_forward_train(module.rpn, images, image_sizes, features, targets)
    heads = module.roi_heads
    proposals, labels, regression_targets = select_training_samples(proposals, targets)
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    losses["loss_classifier"], losses["loss_box_reg"] = fastrcnn_loss(class_logits, box_regression, labels,
                                                                       regression_targets)
    return losses
