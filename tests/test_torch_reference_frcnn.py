"""The plain-torch FasterRCNN(VGG16) reference against torchvision's documented behaviour: its
state_dict keys and size, the anchor table, NMS at the threshold, RoIAlign's sampling and borders,
the RoI pooler's scale, the flatten order of the RPN outputs, and one full forward."""

import math

import pytest

torch = pytest.importorskip("torch")
import torch_reference_frcnn as frcnn  # noqa: E402

VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
HEAD_KEYS = [
    "rpn.head.conv.0.0.weight", "rpn.head.conv.0.0.bias",
    "rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias",
    "rpn.head.bbox_pred.weight", "rpn.head.bbox_pred.bias",
    "roi_heads.box_head.fc6.weight", "roi_heads.box_head.fc6.bias",
    "roi_heads.box_head.fc7.weight", "roi_heads.box_head.fc7.bias",
    "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
]
CELL_ANCHORS = [[-91, -45, 91, 45], [-181, -91, 181, 91], [-362, -181, 362, 181],
                [-64, -64, 64, 64], [-128, -128, 128, 128], [-256, -256, 256, 256],
                [-45, -91, 45, 91], [-91, -181, 91, 181], [-181, -362, 181, 362]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return frcnn.FasterRCNNVGG16(num_classes=21, rpn_pre_nms_top_n=6000, rpn_post_nms_top_n=300,
                                 box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100).eval()


def test_state_dict_keys_and_parameter_count(model):
    sd = model.state_dict()
    expected = [f"backbone.{i}.{k}" for i in VGG_CONVS for k in ("weight", "bias")] + HEAD_KEYS
    assert list(sd) == expected and len(sd) == 40
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["backbone.28.weight"] == (512, 512, 3, 3)
    assert shapes["rpn.head.conv.0.0.weight"] == (512, 512, 3, 3)
    assert shapes["rpn.head.cls_logits.weight"] == (9, 512, 1, 1)
    assert shapes["rpn.head.bbox_pred.weight"] == (36, 512, 1, 1)
    assert shapes["roi_heads.box_head.fc6.weight"] == (4096, 25088)
    assert shapes["roi_heads.box_head.fc7.weight"] == (4096, 4096)
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (21, 4096)
    assert shapes["roi_heads.box_predictor.bbox_pred.weight"] == (84, 4096)
    assert sum(p.numel() for p in model.parameters()) == 137_073_622
    assert model.backbone.out_channels == 512


def test_rpn_head_loads_pre_0_13_key_names():
    head = frcnn.RPNHead(8, 9)
    old = {k.replace("conv.0.0.", "conv."): v for k, v in head.state_dict().items()}  # a plain dict
    assert "conv.weight" in old
    fresh = frcnn.RPNHead(8, 9)
    fresh.load_state_dict(old)  # no version metadata: treated as the old layout
    assert torch.equal(fresh.conv[0][0].weight, head.conv[0][0].weight)


def test_cell_anchors_table():
    gen = frcnn.AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    assert gen.num_anchors_per_location() == [9]
    assert gen.cell_anchors[0].tolist() == CELL_ANCHORS


def test_grid_anchors_order_and_stride():
    gen = frcnn.AnchorGenerator()
    images, feat = torch.zeros(2, 3, 224, 288), torch.zeros(2, 512, 14, 18)
    anchors = gen(images, [feat])
    assert len(anchors) == 2 and anchors[0].shape == (14 * 18 * 9, 4)
    cell = torch.tensor(CELL_ANCHORS, dtype=torch.float32)
    for y, x, a in [(0, 0, 0), (0, 1, 4), (3, 7, 8), (13, 17, 2)]:
        i = (y * 18 + x) * 9 + a
        assert anchors[1][i].tolist() == (cell[a] + torch.tensor([16 * x, 16 * y, 16 * x, 16 * y])).tolist()


def test_nms_keeps_iou_equal_to_threshold():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.8, 0.9, 0.7])
    assert frcnn.box_iou(boxes[:1], boxes[1:2]).item() == 0.5
    assert frcnn.nms(boxes, scores, 0.5).tolist() == [1, 0, 2]  # IoU == threshold survives
    assert frcnn.nms(boxes, scores, 0.49).tolist() == [1, 2]
    # equal scores: stable order, the earlier index first
    assert frcnn.nms(boxes, torch.tensor([0.5, 0.5, 0.5]), 0.4).tolist() == [0, 2]


def test_batched_nms_paths_agree():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1500, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 20 + torch.rand(1500, 2, generator=g) * 60], 1)
    scores = torch.rand(1500, generator=g)
    idxs = torch.randint(0, 5, (1500,), generator=g)
    trick = frcnn._batched_nms_coordinate_trick(boxes, scores, idxs, 0.5)
    vanilla = frcnn._batched_nms_vanilla(boxes, scores, idxs, 0.5)
    assert trick.tolist() == vanilla.tolist()
    # the same two boxes in different categories do not suppress each other
    two = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    assert frcnn.batched_nms(two, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), 0.5).tolist() == [0, 1]
    assert frcnn.batched_nms(two, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), 0.5).tolist() == [0]


def test_box_coder_decode():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 15.0, 9.0]])
    coder = frcnn.BoxCoder((10.0, 10.0, 5.0, 5.0))
    assert torch.equal(coder.decode(torch.zeros(2, 8), [anchors]), torch.stack([anchors, anchors], 1))
    # dx = 10 -> the centre moves by one width (5 -> 15); dw = 5 * log 2 -> twice the width (20)
    out = coder.decode(torch.tensor([[10.0, 0.0, 5 * math.log(2.0), 0.0]]), [anchors[:1]])
    assert torch.allclose(out[0, 0], torch.tensor([5.0, 0.0, 25.0, 20.0]), atol=1e-5)
    # dw clamped at log(1000 / 16)
    big = frcnn.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(torch.tensor([[0.0, 0.0, 50.0, 0.0]]), [anchors[:1]])
    assert torch.allclose(big[0, 0, 2] - big[0, 0, 0], torch.tensor(10 * 1000 / 16))


def test_clip_and_remove_small_boxes():
    boxes = torch.tensor([[-5.0, -3.0, 300.0, 100.0], [10.0, 10.0, 10.0005, 50.0]])
    clipped = frcnn.clip_boxes_to_image(boxes, (64, 288))
    assert clipped[0].tolist() == [0.0, 0.0, 288.0, 64.0] and torch.equal(clipped[1], boxes[1])
    assert frcnn.remove_small_boxes(clipped, 1e-3).tolist() == [0]
    # (R, C, 4) boxes, as RoIHeads clips them
    assert frcnn.clip_boxes_to_image(boxes[:, None].repeat(1, 3, 1), (64, 288))[:, 2].tolist() == clipped.tolist()


def _ramp():
    """4x4 map f[y, x] = 4y + x, and a second channel x^2 (which bilinear interpolation does not
    reproduce between pixels), two images (the second one +100)."""
    y, x = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    one = torch.stack([4 * y + x, x * x])
    return torch.stack([one, one + 100])


def test_roi_align_hand_computed():
    f = _ramp()
    rois = torch.tensor([
        [0, 0.0, 0.0, 2.0, 2.0],  # samples at 0.5, 1.5 on both axes
        [0, 2.0, 2.0, 4.0, 4.0],  # samples 2.5, 3.5; 3.5 >= H - 1 -> the last row/column (3)
        [0, 3.0, 3.0, 6.0, 6.0],  # samples 3.75, 5.25; 5.25 > 4 -> weight 0; 3.75 -> 3
        [0, 1.0, 1.0, 1.2, 1.2],  # malformed: forced to 1x1 -> samples 1.25, 1.75
        [0, -2.0, -2.0, 0.0, 0.0],  # samples -1.5 (< -1: 0) and -0.5 (clamped to 0)
        [1, 0.0, 0.0, 2.0, 2.0],  # the second image
    ])
    out = frcnn.roi_align(f, rois, 1, spatial_scale=1.0, sampling_ratio=2, aligned=False)
    assert out.shape == (6, 2, 1, 1)
    ramp = out[:, 0, 0, 0].tolist()
    # 4 * mean(y) + mean(x) over the valid samples, / 4 samples
    assert ramp[0] == pytest.approx(4 * 1.0 + 1.0)
    assert ramp[1] == pytest.approx(4 * 2.75 + 2.75)
    assert ramp[2] == pytest.approx(15.0 / 4)
    assert ramp[3] == pytest.approx(4 * 1.5 + 1.5)
    assert ramp[4] == pytest.approx(0.0)
    assert ramp[5] == pytest.approx(105.0)
    square = out[:, 1, 0, 0].tolist()
    # x^2 interpolated linearly: x = 0.5 -> 0.5, x = 1.5 -> 2.5; mean 1.5
    assert square[0] == pytest.approx(1.5)
    # x = 2.5 -> (4 + 9) / 2 = 6.5, x = 3.5 -> 9 (clamped): mean 7.75
    assert square[1] == pytest.approx(7.75)
    # x = 1.25 -> 1 + 0.25 * 3 = 1.75, x = 1.75 -> 1 + 0.75 * 3 = 3.25: mean 2.5
    assert square[3] == pytest.approx(2.5)

    # 2x2 bins of a 4x4 RoI, one sample per bin: bin centres 1, 3 -> exact pixels
    out = frcnn.roi_align(f, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), 2, sampling_ratio=1)
    assert out[0, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    # spatial_scale applies to the box before everything else: (0, 0, 8, 8) * 0.5 == (0, 0, 4, 4)
    scaled = frcnn.roi_align(f, torch.tensor([[0, 0.0, 0.0, 8.0, 8.0]]), 2, spatial_scale=0.5, sampling_ratio=1)
    assert torch.equal(scaled, out)
    # aligned=True shifts the box by -0.5 cell: samples at 0.5 and 2.5 on each axis
    al = frcnn.roi_align(f, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), 2, sampling_ratio=1, aligned=True)
    assert al[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    # a list of per-image boxes is the same as the (K, 5) form
    listed = frcnn.roi_align(f, [rois[:5, 1:], rois[5:, 1:]], 1, sampling_ratio=2)
    assert torch.equal(listed, frcnn.roi_align(f, rois, 1, sampling_ratio=2))


def _roi_align_scalar(inp, rois, pooled, scale, sr):
    """The CPU kernel transliterated sample by sample (aligned=False)."""
    _, c, h, w = inp.shape
    out = torch.zeros(len(rois), c, pooled, pooled, dtype=torch.float64)

    def bilinear(img, y, x):
        if y < -1.0 or y > h or x < -1.0 or x > w:
            return torch.zeros(c, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        yl, xl = int(y), int(x)
        if yl >= h - 1:
            yh = yl = h - 1
            y = float(yl)
        else:
            yh = yl + 1
        if xl >= w - 1:
            xh = xl = w - 1
            x = float(xl)
        else:
            xh = xl + 1
        ly, lx = y - yl, x - xl
        hy, hx = 1 - ly, 1 - lx
        return hy * hx * img[:, yl, xl] + hy * lx * img[:, yl, xh] + ly * hx * img[:, yh, xl] + ly * lx * img[:, yh, xh]

    for n, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        img = inp[int(b)].double()
        sw, sh = x1 * scale, y1 * scale
        rw, rh = max(x2 * scale - sw, 1.0), max(y2 * scale - sh, 1.0)
        bw, bh = rw / pooled, rh / pooled
        gh = sr if sr > 0 else math.ceil(rh / pooled)
        gw = sr if sr > 0 else math.ceil(rw / pooled)
        for ph in range(pooled):
            for pw in range(pooled):
                acc = torch.zeros(c, dtype=torch.float64)
                for iy in range(gh):
                    for ix in range(gw):
                        acc += bilinear(img, sh + ph * bh + (iy + 0.5) * bh / gh, sw + pw * bw + (ix + 0.5) * bw / gw)
                out[n, :, ph, pw] = acc / max(gh * gw, 1)
    return out


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roi_align_matches_scalar_kernel(sampling_ratio):
    g = torch.Generator().manual_seed(1)
    inp = torch.randn(2, 3, 9, 11, generator=g)
    xy = torch.rand(12, 2, generator=g) * 200 - 20  # some boxes leave the 176x144 image
    wh = torch.rand(12, 2, generator=g) * 120
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).float(), xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([5.0, 5.0, 6.0, 6.0])  # smaller than one cell
    got = frcnn.roi_align(inp, rois, 7, spatial_scale=1 / 16, sampling_ratio=sampling_ratio)
    want = _roi_align_scalar(inp, rois, 7, 1 / 16, sampling_ratio)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_multiscale_roi_align_infers_one_sixteenth():
    pooler = frcnn.MultiScaleRoIAlign(["0"], 7, 2)
    assert pooler.output_size == (7, 7) and pooler.sampling_ratio == 2
    # a 608x800 input through VGG16 without its last pool: 38x50
    assert pooler.setup_scales([torch.zeros(1, 512, 38, 50)], [(608, 800)]) == [1 / 16]
    assert frcnn.infer_scale(torch.zeros(1, 1, 38, 50), (600, 800)) == 1 / 16  # rounded in log2
    feats = torch.randn(1, 4, 38, 50)
    boxes = [torch.tensor([[16.0, 32.0, 400.0, 300.0]])]
    out = pooler({"0": feats, "other": torch.zeros(1)}, boxes, [(608, 800)])
    assert out.shape == (1, 4, 7, 7)
    assert torch.equal(out, frcnn.roi_align(feats, torch.tensor([[0.0, 16.0, 32.0, 400.0, 300.0]]), 7, 1 / 16, 2))


def test_rpn_flatten_order():
    n, a, h, w = 2, 9, 3, 5
    logits = torch.randn(n, a, h, w)
    deltas = torch.randn(n, a * 4, h, w)
    cls, reg = frcnn.concat_box_prediction_layers([logits], [deltas])
    cls, reg = cls.reshape(n, -1), reg.reshape(n, -1, 4)
    for b, y, x, k in [(0, 0, 0, 0), (1, 2, 4, 8), (0, 1, 3, 5)]:
        i = (y * w + x) * a + k
        assert cls[b, i] == logits[b, k, y, x]
        assert reg[b, i].tolist() == deltas[b, 4 * k:4 * k + 4, y, x].tolist()


def test_forward(model):
    g = torch.Generator().manual_seed(0)
    # randomly initialised VGG16 features are tiny, so the class scores would all sit near 1/21 < 0.05:
    # spread the class biases so that some classes pass the threshold
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.5, generator=g)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.01, generator=g)
        x = torch.randn(1, 3, 224, 288, generator=g)
        out = model(x)
        features = out["features"]
        logits, deltas = model.rpn.head([features])
    assert features.shape == (1, 512, 14, 18)
    assert out["anchors"][0].shape == (14 * 18 * 9, 4)
    assert out["objectness"].shape == (1, 2268) and out["rpn_deltas"].shape == (1, 2268, 4)
    # torchvision's flatten order: location-major, the 9 anchors of a location next
    assert torch.equal(out["objectness"][0, (5 * 18 + 7) * 9 + 4], logits[0][0, 4, 5, 7])
    assert torch.equal(out["rpn_deltas"][0, (5 * 18 + 7) * 9 + 4], deltas[0][0, 16:20, 5, 7])

    proposals = out["proposals"][0]
    r = proposals.shape[0]
    assert 0 < r <= 300
    assert (proposals[:, 0::2] >= 0).all() and (proposals[:, 0::2] <= 288).all()
    assert (proposals[:, 1::2] >= 0).all() and (proposals[:, 1::2] <= 224).all()
    scores = out["proposal_scores"][0]
    assert (scores[:-1] >= scores[1:]).all()
    iou = frcnn.box_iou(proposals, proposals).fill_diagonal_(0)
    assert iou.max() <= 0.7 + 1e-6
    assert out["roi_features"].shape == (r, 512, 7, 7)
    assert out["box_features"].shape == (r, 4096)
    assert out["class_logits"].shape == (r, 21) and out["box_regression"].shape == (r, 84)

    det = out["detections"][0]
    k = det["boxes"].shape[0]
    assert 0 < k <= 100 and det["scores"].shape == (k,) and det["labels"].shape == (k,)
    assert (det["scores"] > 0.05).all() and (det["scores"][:-1] >= det["scores"][1:]).all()
    assert ((det["labels"] >= 1) & (det["labels"] <= 20)).all()
    for key in ("features", "objectness", "rpn_deltas", "roi_features", "box_features", "class_logits",
                "box_regression"):
        assert torch.isfinite(out[key]).all(), key
    assert torch.isfinite(proposals).all() and torch.isfinite(det["boxes"]).all()
