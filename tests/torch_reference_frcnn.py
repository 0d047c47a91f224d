"""torchvision's generic FasterRCNN with a VGG16 backbone, inference only, in plain torch
(torchvision itself is not installable beside the local CPU torch).

Module names follow torchvision (models/detection: generalized_rcnn, rpn, roi_heads,
anchor_utils, _utils.BoxCoder, faster_rcnn.TwoMLPHead/FastRCNNPredictor; ops: poolers,
roi_align, boxes), so the state_dict has torchvision's keys:

    backbone.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}   vgg16().features[:-1]
    rpn.head.conv.0.0.{weight,bias}                               RPNHead (Conv2dNormActivation)
    rpn.head.cls_logits.{weight,bias}, rpn.head.bbox_pred.{weight,bias}
    roi_heads.box_head.fc6.{weight,bias}, roi_heads.box_head.fc7.{weight,bias}
    roi_heads.box_predictor.cls_score.{weight,bias}, roi_heads.box_predictor.bbox_pred.{weight,bias}

GeneralizedRCNNTransform is left out: the model takes an already normalised NCHW batch and
returns its intermediate results (see FasterRCNNVGG16.forward) for comparisons.
"""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import _vgg16_features

# ----------------------------------------------------------------------------- ops/boxes.py


def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1, boxes2):
    """Plain IoU (no +1 on widths), (N, M)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2 - inter)


def nms(boxes, scores, iou_threshold):
    """torchvision's CPU nms kernel: stable descending sort on the scores, greedy, a later box is
    suppressed when its IoU with a kept one is > iou_threshold (equal survives). Returns the kept
    indices in decreasing score order."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, stable=True, descending=True)[1]
    b = boxes[order]
    x1, y1, x2, y2 = b.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    n = b.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        if i + 1 == n:
            break
        w = (torch.min(x2[i], x2[i + 1:]) - torch.max(x1[i], x1[i + 1:])).clamp(min=0)
        h = (torch.min(y2[i], y2[i + 1:]) - torch.max(y1[i], y1[i + 1:])).clamp(min=0)
        inter = w * h
        ovr = inter / (areas[i] + areas[i + 1:] - inter)
        suppressed[i + 1:] |= ovr > iou_threshold
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _batched_nms_vanilla(boxes, scores, idxs, iou_threshold):
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        curr = torch.where(idxs == class_id)[0]
        keep_mask[curr[nms(boxes[curr], scores[curr], iou_threshold)]] = True
    keep_indices = torch.where(keep_mask)[0]
    return keep_indices[scores[keep_indices].sort(descending=True)[1]]


def batched_nms(boxes, scores, idxs, iou_threshold):
    """NMS per category. Like torchvision, over 4000 box coordinates on CPU (100k elsewhere) it runs
    one nms per category, below it offsets each category's boxes by idx * (max coordinate + 1)."""
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):
        return _batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    return _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


def remove_small_boxes(boxes, min_size):
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def clip_boxes_to_image(boxes, size):
    """Clamp x to [0, width], y to [0, height]; boxes (..., 4), size (height, width)."""
    height, width = size
    boxes_x = boxes[..., 0::2].clamp(min=0, max=width)
    boxes_y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((boxes_x, boxes_y), dim=boxes.dim()).reshape(boxes.shape)


# ---------------------------------------------------------------------------- ops/roi_align


def _bilinear_axis(coord, size):
    """One axis of the CPU kernel's pre_calc_for_bilinear_interpolate, for sample coordinates that
    are in range (-1 <= c <= size): clamp below at 0, truncate, and at or past the last pixel use
    it twice. Returns (low, high, weight of low, weight of high)."""
    coord = torch.where(coord <= 0, torch.zeros_like(coord), coord)
    low = coord.to(torch.int64)  # coord >= 0 here, so truncation == floor
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    coord = torch.where(at_end, low.to(coord.dtype), coord)
    frac = coord - low.to(coord.dtype)
    return low, high, 1.0 - frac, frac


def _gather(flat, index):
    return flat.index_select(0, index.reshape(-1)).view(*index.shape, flat.shape[1])


def _roi_align_grid(feats, batch_idx, start_h, start_w, bin_h, bin_w, pooled_h, pooled_w, grid_h, grid_w):
    """Average of grid_h x grid_w bilinear samples per bin for RoIs sharing one sampling grid.
    feats (N, H, W, C) channels-last; the other tensors (R,). Returns (R, C, pooled_h, pooled_w)."""
    _, height, width, channels = feats.shape
    r = batch_idx.shape[0]
    dtype = feats.dtype
    ph = torch.arange(pooled_h, dtype=dtype, device=feats.device)
    pw = torch.arange(pooled_w, dtype=dtype, device=feats.device)
    out = torch.zeros((r, pooled_h, pooled_w, channels), dtype=dtype, device=feats.device)
    flat = feats.reshape(-1, channels)
    base = (batch_idx * (height * width))[:, None]
    count = max(grid_h * grid_w, 1)
    for iy in range(grid_h):
        # roi_start_h + ph * bin_size_h + (iy + .5) * bin_size_h / roi_bin_grid_h, in the kernel's order
        y = (start_h[:, None] + ph[None] * bin_h[:, None]) + ((iy + 0.5) * bin_h[:, None]) / grid_h  # (R, PH)
        y_ok = (y >= -1.0) & (y <= height)  # NaN fails both
        y_low, y_high, hy, ly = _bilinear_axis(torch.where(y_ok, y, torch.zeros_like(y)), height)
        for ix in range(grid_w):
            x = (start_w[:, None] + pw[None] * bin_w[:, None]) + ((ix + 0.5) * bin_w[:, None]) / grid_w  # (R, PW)
            x_ok = (x >= -1.0) & (x <= width)
            x_low, x_high, hx, lx = _bilinear_axis(torch.where(x_ok, x, torch.zeros_like(x)), width)
            valid = (y_ok[:, :, None] & x_ok[:, None, :]).to(dtype)  # out of range: all four weights 0
            w1 = (hy[:, :, None] * hx[:, None, :]) * valid
            w2 = (hy[:, :, None] * lx[:, None, :]) * valid
            w3 = (ly[:, :, None] * hx[:, None, :]) * valid
            w4 = (ly[:, :, None] * lx[:, None, :]) * valid
            row_low, row_high = (base + y_low * width)[:, :, None], (base + y_high * width)[:, :, None]
            v1 = _gather(flat, row_low + x_low[:, None, :])  # (R, PH, PW, C)
            v2 = _gather(flat, row_low + x_high[:, None, :])
            v3 = _gather(flat, row_high + x_low[:, None, :])
            v4 = _gather(flat, row_high + x_high[:, None, :])
            out += w1[..., None] * v1 + w2[..., None] * v2 + w3[..., None] * v3 + w4[..., None] * v4
    return (out / count).permute(0, 3, 1, 2)


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """torchvision.ops.roi_align as its CPU kernel computes it.

    input (N, C, H, W); rois (K, 5) [batch_index, x1, y1, x2, y2] in image coordinates, or a list
    of (L_i, 4) per image. Without `aligned` a RoI is at least 1x1 feature cells; the samples of
    bin (ph, pw) sit at start + p * bin + (i + 0.5) * bin / grid, each bilinear with the kernel's
    border rules (outside [-1, size] -> 0, below 0 -> 0, at or past size - 1 -> the last pixel)."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    pooled_h, pooled_w = output_size
    if not isinstance(rois, torch.Tensor):
        rois = convert_to_roi_format(rois)
    n, c, height, width = input.shape
    k = rois.shape[0]
    if k == 0:
        return input.new_zeros((0, c, pooled_h, pooled_w))
    scale = torch.tensor(spatial_scale, dtype=input.dtype)  # the kernel holds it as T
    offset = 0.5 if aligned else 0.0
    batch_idx = rois[:, 0].to(torch.int64)
    start_w = rois[:, 1] * scale - offset
    start_h = rois[:, 2] * scale - offset
    end_w = rois[:, 3] * scale - offset
    end_h = rois[:, 4] * scale - offset
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:  # force malformed RoIs to be 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    feats = input.permute(0, 2, 3, 1).contiguous()
    if sampling_ratio > 0:
        return _roi_align_grid(feats, batch_idx, start_h, start_w, bin_h, bin_w,
                               pooled_h, pooled_w, sampling_ratio, sampling_ratio)
    # adaptive: ceil(roi_size / pooled) samples per bin side, one pass per distinct grid
    grid_h = torch.ceil(roi_h / pooled_h).to(torch.int64)
    grid_w = torch.ceil(roi_w / pooled_w).to(torch.int64)
    out = input.new_zeros((k, c, pooled_h, pooled_w))
    for gh, gw in torch.unique(torch.stack([grid_h, grid_w], 1), dim=0).tolist():
        sel = torch.where((grid_h == gh) & (grid_w == gw))[0]
        out[sel] = _roi_align_grid(feats, batch_idx[sel], start_h[sel], start_w[sel], bin_h[sel], bin_w[sel],
                                   pooled_h, pooled_w, gh, gw)
    return out


# ---------------------------------------------------------------------------- ops/poolers.py


def convert_to_roi_format(boxes):
    concat = torch.cat(boxes, dim=0)
    ids = torch.cat([torch.full((len(b), 1), i, dtype=concat.dtype, device=concat.device)
                     for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def infer_scale(feature, original_size):
    """2 ** round(log2(feature_size / image_size)) from the height (torchvision takes [0])."""
    possible = []
    for s1, s2 in zip(feature.shape[-2:], original_size):
        approx = float(s1) / float(s2)
        possible.append(2 ** float(torch.tensor(approx).log2().round()))
    return possible[0]


class MultiScaleRoIAlign(nn.Module):
    """Only the single-level path (one featmap name), which is what a VGG16 backbone feeds."""

    def __init__(self, featmap_names, output_size, sampling_ratio):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales = None

    def setup_scales(self, features, image_shapes):
        max_x = max(s[0] for s in image_shapes)
        max_y = max(s[1] for s in image_shapes)
        self.scales = [infer_scale(f, (max_x, max_y)) for f in features]
        return self.scales

    def forward(self, x, boxes, image_shapes):
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if len(feats) != 1:
            raise NotImplementedError("only the single-level MultiScaleRoIAlign is written here")
        self.setup_scales(feats, image_shapes)  # torchvision re-infers the scales on every call
        rois = convert_to_roi_format(boxes)
        return roi_align(feats[0], rois, self.output_size, spatial_scale=self.scales[0],
                         sampling_ratio=self.sampling_ratio)


# ------------------------------------------------------------------- models/detection/_utils.py


class BoxCoder:
    def __init__(self, weights, bbox_xform_clip=math.log(1000.0 / 16)):
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def decode(self, rel_codes, boxes):
        """rel_codes (sum L_i, 4k) against a list of (L_i, 4) boxes -> (sum L_i, k, 4)."""
        boxes_per_image = [b.size(0) for b in boxes]
        concat_boxes = torch.cat(boxes, dim=0)
        box_sum = sum(boxes_per_image)
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred_boxes = self.decode_single(rel_codes, concat_boxes)
        if box_sum > 0:
            pred_boxes = pred_boxes.reshape(box_sum, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes, boxes):
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        half_w = torch.tensor(0.5, dtype=pred_ctr_x.dtype, device=pred_w.device) * pred_w
        half_h = torch.tensor(0.5, dtype=pred_ctr_y.dtype, device=pred_h.device) * pred_h
        return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
                           dim=2).flatten(1)


# -------------------------------------------------------------- models/detection/anchor_utils.py


class AnchorGenerator(nn.Module):
    """aspect ratio = height / width; cell anchors round([-w, -h, w, h] / 2), ratio-major; no buffers
    (torchvision keeps them in a plain list, so they are not in the state_dict)."""

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)):
        super().__init__()
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [self.generate_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]

    @staticmethod
    def generate_anchors(scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self):
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes, strides):
        anchors = []
        for (grid_h, grid_w), (stride_h, stride_w), base in zip(grid_sizes, strides, self.cell_anchors):
            shifts_x = torch.arange(0, grid_w, dtype=torch.int32, device=base.device) * stride_w
            shifts_y = torch.arange(0, grid_h, dtype=torch.int32, device=base.device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))  # (y, x, anchor)
        return anchors

    def forward(self, image_tensor, feature_maps):
        """Strides are the (padded) batch tensor's size // each feature map's size."""
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        image_size = image_tensor.shape[-2:]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [(torch.tensor(image_size[0] // g[0], dtype=torch.int64, device=device),
                    torch.tensor(image_size[1] // g[1], dtype=torch.int64, device=device)) for g in grid_sizes]
        self.cell_anchors = [a.to(dtype=dtype, device=device) for a in self.cell_anchors]
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in range(image_tensor.shape[0])]


# ----------------------------------------------------------------------- models/detection/rpn.py


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation with norm_layer=None: [Conv2d (bias), ReLU]."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1):
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=True),
            nn.ReLU(inplace=True),
        )
        self.out_channels = out_channels


class RPNHead(nn.Module):
    _version = 2

    def __init__(self, in_channels, num_anchors, conv_depth=1):
        super().__init__()
        self.conv = nn.Sequential(*[Conv2dNormActivation(in_channels, in_channels, kernel_size=3)
                                    for _ in range(conv_depth)])
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1, stride=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1, stride=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # torchvision < 0.13 checkpoints name the 3x3 conv `conv.weight`
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            for kind in ("weight", "bias"):
                old, new = f"{prefix}conv.{kind}", f"{prefix}conv.0.0.{kind}"
                if old in state_dict:
                    state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x):
        logits, bbox_reg = [], []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            bbox_reg.append(self.bbox_pred(t))
        return logits, bbox_reg


def permute_and_flatten(layer, n, c, h, w):
    """(N, A*C, H, W) -> (N, H*W*A, C): location-major, anchor next."""
    return layer.view(n, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, c)


def concat_box_prediction_layers(box_cls, box_regression):
    cls_flat, reg_flat = [], []
    for cls_lvl, reg_lvl in zip(box_cls, box_regression):
        n, axc, h, w = cls_lvl.shape
        a = reg_lvl.shape[1] // 4
        cls_flat.append(permute_and_flatten(cls_lvl, n, axc // a, h, w))
        reg_flat.append(permute_and_flatten(reg_lvl, n, 4, h, w))
    return torch.cat(cls_flat, dim=1).flatten(0, -2), torch.cat(reg_flat, dim=1).reshape(-1, 4)


class RegionProposalNetwork(nn.Module):
    """Inference half of torchvision's RegionProposalNetwork (the pre/post NMS top-n are the
    'testing' values)."""

    def __init__(self, anchor_generator, head, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh=0.0):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self._pre_nms_top_n = pre_nms_top_n
        self._post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = 1e-3

    def _get_top_n_idx(self, objectness, num_anchors_per_level):
        r, offset = [], 0
        for ob in objectness.split(num_anchors_per_level, 1):
            num_anchors = ob.shape[1]
            _, top_n_idx = ob.topk(min(self._pre_nms_top_n, num_anchors), dim=1)  # on the logits
            r.append(top_n_idx + offset)
            offset += num_anchors
        return torch.cat(r, dim=1)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), idx, dtype=torch.int64, device=device)
                            for idx, n in enumerate(num_anchors_per_level)], 0)
        levels = levels.reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        objectness_prob = torch.sigmoid(objectness)

        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, objectness_prob, levels, image_shapes):
            boxes = clip_boxes_to_image(boxes, img_shape)
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self._post_nms_top_n]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def forward(self, image_tensor, image_sizes, features):
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(image_tensor, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, image_sizes, num_anchors_per_level)
        return {
            "anchors": anchors,
            "objectness": objectness.reshape(num_images, -1),
            "rpn_deltas": pred_bbox_deltas.reshape(num_images, -1, 4),
            "proposals": boxes,
            "proposal_scores": scores,
        }


# -------------------------------------------------- models/detection/faster_rcnn.py, roi_heads.py


class TwoMLPHead(nn.Module):
    def __init__(self, in_channels, representation_size):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x):
        x = x.flatten(start_dim=1)  # NCHW order
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class FastRCNNPredictor(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x):
        if x.dim() == 4:
            assert list(x.shape[2:]) == [1, 1]
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Inference half of torchvision's RoIHeads (boxes only)."""

    def __init__(self, box_roi_pool, box_head, box_predictor, bbox_reg_weights=None,
                 score_thresh=0.05, nms_thresh=0.5, detections_per_img=100):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0) if bbox_reg_weights is None else bbox_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes.split(boxes_per_image, 0),
                                              pred_scores.split(boxes_per_image, 0), image_shapes):
            boxes = clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
            # drop the background column; every (proposal, class) becomes one candidate, class-minor
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def forward(self, features, proposals, image_shapes):
        roi_features = self.box_roi_pool(features, proposals, image_shapes)
        box_features = self.box_head(roi_features)
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return {
            "roi_features": roi_features,
            "box_features": box_features,
            "class_logits": class_logits,
            "box_regression": box_regression,
            "detections": [{"boxes": b, "labels": lb, "scores": s} for b, s, lb in zip(boxes, scores, labels)],
        }


class FasterRCNNVGG16(nn.Module):
    """FasterRCNN(vgg16().features[:-1] with out_channels 512, rpn_anchor_generator=AnchorGenerator(
    ((128, 256, 512),), ((0.5, 1.0, 2.0),)), box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
    box_head=TwoMLPHead(512 * 7 * 7, 4096), box_predictor=FastRCNNPredictor(4096, num_classes)),
    inference only, without GeneralizedRCNNTransform."""

    def __init__(self, num_classes=21, rpn_pre_nms_top_n=6000, rpn_post_nms_top_n=300, rpn_nms_thresh=0.7,
                 rpn_score_thresh=0.0, box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
                 representation_size=4096):
        super().__init__()
        backbone = nn.Sequential(*list(_vgg16_features())[:-1])  # vgg16().features[:-1]: keys 0..28
        backbone.out_channels = 512
        self.backbone = backbone
        anchor_generator = AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
        head = RPNHead(512, anchor_generator.num_anchors_per_location()[0])
        self.rpn = RegionProposalNetwork(anchor_generator, head, rpn_pre_nms_top_n, rpn_post_nms_top_n,
                                         rpn_nms_thresh, score_thresh=rpn_score_thresh)
        box_roi_pool = MultiScaleRoIAlign(["0"], 7, 2)
        self.roi_heads = RoIHeads(
            box_roi_pool,
            TwoMLPHead(512 * 7 * 7, representation_size),
            FastRCNNPredictor(representation_size, num_classes),
            score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
        )

    def forward(self, images, image_sizes=None):
        """images: normalised (B, 3, H, W), H and W multiples of 32. image_sizes: the (h, w) of each
        image before padding (default: the whole tensor); proposals and detections are clipped to
        them and RoIAlign's scale is inferred from their maxima, as GeneralizedRCNN's ImageList does.

        Returns features (B, 512, H/16, W/16); anchors [(A, 4)] per image; objectness logits (B, A)
        and rpn_deltas (B, A, 4) in torchvision's flatten order (location-major, anchor-minor);
        proposals [(R_i, 4)] and their sigmoid proposal_scores; roi_features (sum R_i, 512, 7, 7);
        box_features (sum R_i, 4096) after fc7; class_logits (sum R_i, C); box_regression
        (sum R_i, 4C); detections [{boxes, labels, scores}] (no rescaling to original sizes)."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        features = self.backbone(images)
        feature_dict = OrderedDict([("0", features)])
        out = {"features": features}
        out.update(self.rpn(images, image_sizes, feature_dict))
        out.update(self.roi_heads(feature_dict, out["proposals"], image_sizes))
        return out
