"""fast_rcnn_vgg16 (Girshick, "Fast R-CNN", ICCV 2015): the parameter count, the layer contract a
trainer cuts the head out by, equality with a plain-torch reference loaded from a state_dict with
torchvision's key scheme (vgg16().features[:-1] as `backbone`, roi_heads.box_head fc6 / fc7 with
dropout, roi_heads.box_predictor; RoIPool transcribed from torchvision's roi_pool_kernel.cpp), the
proposal files (kseg.detection.precomputed), and the two-input model through `.keras` in a fresh
process, SavedModel, ONNX and TFLite, each verified with detections as sets."""

import importlib.util
import json
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest

import kseg
from convert.verify import make_inputs
from kseg.detection.compare import compare_detection_sets
from kseg.detection.precomputed import PaddedProposals, batch_proposals, load_proposals, pad_proposals
from kseg.detection.proposals import PerImage, ProposalRoIs
from kseg.detection.roi import RoIPool
from kseg.models.fast_rcnn import torch_map
from kseg.weights import keras_to_torch, torch_to_keras

torch = pytest.importorskip("torch")
ref = pytest.importorskip("tests.torch_reference_frcnn")
nn, F = torch.nn, torch.nn.functional

SIZE = (64, 96)  # conv5_3: 4 x 6 cells
# The exports' size: proposals that round to the same RoI cells get the same scores, and NMS breaks
# such ties differently in TF, ONNX Runtime and TFLite; 8 x 12 cells make that rare for random boxes.
EXPORT_SIZE = (128, 192)


def _close(a, b, tol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max()
    assert err <= tol * max(1.0, np.abs(b).max()), err
    return err


# --------------------------------------------------------------------------- the torch reference


def torch_roi_pool(features, rois, size, spatial_scale):
    """torchvision.ops.roi_pool's CPU kernel (roi_pool_kernel.cpp) on NCHW features, RoI by RoI and
    bin by bin in float32: corners std::round-ed (half away from zero), RoI size max(end - start +
    1, 1) cells, bin p over floor(p * size / n) .. ceil((p + 1) * size / n) from the start, clamped
    to the map; the max over each bin, 0 for an empty one."""
    _, channels, height, width = features.shape
    out = features.new_zeros((len(rois), channels, size, size))
    scale = torch.tensor(spatial_scale, dtype=torch.float32)

    def rnd(v):
        return int(torch.sign(v) * torch.floor(torch.abs(v) + 0.5))

    for r, roi in enumerate(rois):
        b = int(roi[0])
        start_w, start_h, end_w, end_h = (rnd(v * scale) for v in roi[1:])
        bin_h = torch.tensor(max(end_h - start_h + 1, 1), dtype=torch.float32) / size
        bin_w = torch.tensor(max(end_w - start_w + 1, 1), dtype=torch.float32) / size
        for ph in range(size):
            hs = min(max(int(torch.floor(ph * bin_h)) + start_h, 0), height)
            he = min(max(int(torch.ceil((ph + 1) * bin_h)) + start_h, 0), height)
            for pw in range(size):
                ws = min(max(int(torch.floor(pw * bin_w)) + start_w, 0), width)
                we = min(max(int(torch.ceil((pw + 1) * bin_w)) + start_w, 0), width)
                if he > hs and we > ws:
                    out[r, :, ph, pw] = features[b, :, hs:he, ws:we].amax(dim=(1, 2))
    return out


class BoxRoIPool(nn.Module):
    """RoIHeads' box_roi_pool interface (features {"0": map}, boxes per image, image sizes) over
    torchvision.ops.RoIPool(7, 1/16): Fast R-CNN's roi_pool5."""

    def forward(self, features, proposals, image_shapes):
        return torch_roi_pool(features["0"], ref.convert_to_roi_format(proposals), 7, 1 / 16)


class TwoMLPHeadDropout(ref.TwoMLPHead):
    """torchvision's TwoMLPHead with py-faster-rcnn's drop6 / drop7 (dropout 0.5 after each ReLU)."""

    def forward(self, x):
        x = F.dropout(F.relu(self.fc6(x.flatten(start_dim=1))), 0.5, self.training)
        return F.dropout(F.relu(self.fc7(x)), 0.5, self.training)


class FastRCNNVGG16(nn.Module):
    """vgg16().features[:-1] and RoIHeads(RoIPool 7x7 at 1/16, TwoMLPHead + dropout, FastRCNNPredictor,
    NMS 0.3): Faster R-CNN's head keys without the RPN, fed with given proposals."""

    def __init__(self, num_classes=21):
        super().__init__()
        self.backbone = nn.Sequential(*list(ref._vgg16_features())[:-1])
        self.roi_heads = ref.RoIHeads(BoxRoIPool(), TwoMLPHeadDropout(512 * 7 * 7, 4096),
                                      ref.FastRCNNPredictor(4096, num_classes), nms_thresh=0.3)

    def forward(self, images, proposals):
        """images (B, 3, H, W) normalised, proposals (B, R, 4) with padding rows (x2 <= x1 or y2 <= y1):
        those are pooled as the zero box and left out of the detections."""
        batch, rows = proposals.shape[:2]
        valid = (proposals[..., 2] > proposals[..., 0]) & (proposals[..., 3] > proposals[..., 1])
        boxes = torch.where(valid[..., None], proposals, torch.zeros(()))
        sizes = [tuple(images.shape[-2:])] * batch
        heads = self.roi_heads
        pooled = heads.box_roi_pool({"0": self.backbone(images)}, list(boxes), sizes)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        keep = valid.reshape(-1)
        found = heads.postprocess_detections(logits[keep], deltas[keep], [b[v] for b, v in zip(boxes, valid)], sizes)
        return {"roi_features": pooled, "class_logits": logits.reshape(batch, rows, -1),
                "box_regression": deltas.reshape(batch, rows, -1),
                "detections": [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(*found)]}


def _proposals(rng, batch, h, w):
    """Per image 24 rows: boxes inside and across the edges, corners on half-way cells (multiples of
    8 px at 1/16: tests the rounding), one wholly outside, the whole image, a sub-cell box, then
    padding: x2 < x1, a NaN row, zeros."""
    out = np.zeros((batch, 24, 4), np.float32)
    for i in range(batch):
        xy = rng.uniform(-0.25, 1.0, size=(14, 2)) * (w, h)
        out[i, :14] = np.concatenate([xy, xy + rng.uniform(0.1, 0.8, size=(14, 2)) * (w, h)], axis=1)
        corner = rng.integers(0, 12, size=(3, 2)) * 8
        out[i, 14:17] = np.concatenate([corner, corner + rng.integers(1, 6, size=(3, 2)) * 8], axis=1)
        out[i, 17:20] = [[w + 40, h + 8, w + 90, h + 60], [0, 0, w, h], [20, 20, 23, 22]]
        out[i, 20:22] = [[50, 10, 40, 30], [np.nan] * 4]
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The full-size reference (weights that keep the maps input-dependent, some scores above 0.05)
    and kseg's model loaded from its state_dict by build_model(weights=) through torch_map."""
    torch.manual_seed(0)
    module = FastRCNNVGG16().eval()
    with torch.no_grad():
        for m in module.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        for name, p in module.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
        module.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.5)
    path = tmp_path_factory.mktemp("fast_rcnn") / "fast_rcnn_vgg16.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model("fast_rcnn_vgg16", num_proposals=24, weights=path)
    path.unlink()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *SIZE, 3)).astype(np.float32)
    proposals = _proposals(rng, 2, *SIZE)
    with torch.no_grad():
        want = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(proposals))
    pooled = keras.Model(model.inputs, model.get_layer("roi_pool5").output)([x, proposals])
    got = dict(zip(model.output_names, (np.asarray(o) for o in model([x, proposals]))))
    got["roi_features"] = np.asarray(pooled)
    found = {k: np.asarray(v) for k, v in kseg.inference_model(model)([x, proposals]).items()}
    yield got, want, found, proposals
    keras.backend.clear_session()


def test_head_outputs_equal_the_reference_on_every_row(pair):
    got, want, _, proposals = pair
    valid = np.all(np.isfinite(proposals), -1) & (proposals[..., 2] > proposals[..., 0]) & \
        (proposals[..., 3] > proposals[..., 1])
    np.testing.assert_array_equal(got["proposal_mask"], valid)
    assert valid.sum() == 2 * 20
    np.testing.assert_array_equal(got["proposals"], proposals)  # passed through as given
    # RoI pooling of every row (padding rows pooled as the zero box), NCHW -> NHWC.
    _close(got["roi_features"], want["roi_features"].numpy().transpose(0, 2, 3, 1))
    _close(got["class_logits"], want["class_logits"].numpy())
    _close(got["box_regression"], want["box_regression"].numpy())


def test_detections_equal_as_sets(pair):
    _, want, found, _ = pair
    theirs = {"detection_boxes": np.zeros((2, 100, 4), np.float32), "detection_scores": np.zeros((2, 100), np.float32),
              "detection_classes": np.full((2, 100), -1, np.int32), "num_detections": np.zeros(2, np.int32)}
    for i, det in enumerate(want["detections"]):
        n = len(det["scores"])
        theirs["num_detections"][i] = n
        theirs["detection_boxes"][i, :n] = det["boxes"].numpy()
        theirs["detection_scores"][i, :n] = det["scores"].numpy()
        theirs["detection_classes"][i, :n] = det["labels"].numpy()
    assert theirs["num_detections"].min() > 5, "the weights must give some detections above 0.05"
    result = compare_detection_sets(theirs, found, score_atol=1e-5, box_atol=1e-3 * max(SIZE),
                                    score_threshold=0.05, iou_threshold=0.3)
    assert result.passed and result.matched == theirs["num_detections"].sum(), result


def test_parameter_count_names_and_the_head_contract():
    model = kseg.build_model("fast_rcnn_vgg16")
    assert model.count_params() == 134_690_729
    convs = sum(model.get_layer(f"block{b}_conv{c}").count_params() for b, n in enumerate((2, 2, 3, 3, 3), 1)
                for c in range(1, n + 1))
    counts = [model.get_layer(n).count_params() for n in ("fc6", "fc7", "cls_score", "bbox_pred")]
    assert [convs, *counts] == [14_714_688, 102_764_544, 16_781_312, 86_037, 344_148]
    assert [t.name for t in model.inputs] == ["image", "proposals"]
    assert tuple(model.inputs[1].shape) == (None, 2000, 4)
    assert model.output_names == ["proposals", "proposal_mask", "class_logits", "box_regression"]
    keras.backend.clear_session()

    # The pieces a trainer cuts out: [features, rois] -> the flat (B*R, ...) logits and deltas.
    keras.utils.set_random_seed(1)
    model = kseg.build_model("fast_rcnn_vgg16", num_proposals=8, width=0.125)
    roi_op, rois = model.get_layer("roi_pool5"), model.get_layer("rois")
    assert isinstance(roi_op, RoIPool) and isinstance(rois, ProposalRoIs)
    features = roi_op.input[0]
    assert features is model.get_layer("block5_conv3").output and roi_op.input[1] is rois.output
    heads = [model.get_layer(n) for n in ("class_logits", "box_regression")]
    assert all(isinstance(h, PerImage) and len(h.input.shape) == 2 for h in heads)
    head = keras.Model([features, rois.output], [h.input for h in heads])
    trunk = keras.Model(model.get_layer("image").output, features)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, *SIZE, 3)).astype(np.float32)
    p = _proposals(rng, 2, *SIZE)[:, 16:24]  # 4 boxes, 4 padding rows
    out = dict(zip(model.output_names, model([x, p])))
    logits, deltas = head([trunk(x), ProposalRoIs()(PaddedProposals()(p)[0])])
    _close(np.reshape(logits, (2, 8, 21)), out["class_logits"], 1e-6)
    _close(np.reshape(deltas, (2, 8, 84)), out["box_regression"], 1e-6)
    # postprocess=True: the same weights decode as kseg.inference_model does, with py-faster-rcnn's NMS 0.3.
    detector = kseg.build_model("fast_rcnn_vgg16", num_proposals=8, width=0.125, postprocess=True)
    detector.set_weights(model.get_weights())
    assert detector.get_layer("frcnn_decoder").iou_threshold == 0.3
    found, again = detector([x, p]), kseg.inference_model(model)([x, p])
    for name in found:
        np.testing.assert_array_equal(found[name], again[name])
    # torch_map(width) follows the channel multiplier: a state_dict round trip by its keys.
    state = keras_to_torch(model, torch_map(width=0.125))
    assert state["roi_heads.box_head.fc6.weight"].shape == (512, 64 * 7 * 7)
    arrays = torch_to_keras(state, torch_map(width=0.125), model, "round trip")
    np.testing.assert_array_equal(arrays["fc6"][0], model.get_layer("fc6").get_weights()[0])
    for bad in ({"num_proposals": 0}, {"num_classes": 1}, {"width": 2.0}):
        with pytest.raises(ValueError, match="fast_rcnn_vgg16"):
            kseg.build_model("fast_rcnn_vgg16", **bad)
    keras.backend.clear_session()


# --------------------------------------------------------------------------- proposal files


def _write_mat73(path, boxes, images=None):
    """A MATLAB v7.3 .mat as MATLAB lays it out: HDF5 behind a 512-byte text header, a 1xN cell as an
    (N, 1) dataset of object references into #refs#, each matrix transposed (column-major), char as
    uint16, an empty matrix as its dims with MATLAB_empty = 1."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")

        def cell(name, items, make):
            ref_array = np.empty((len(items), 1), dtype=h5py.ref_dtype)
            for i, item in enumerate(items):
                ref_array[i, 0] = make(refs, f"{name}{i}", item).ref
            f.create_dataset(name, data=ref_array).attrs["MATLAB_class"] = np.bytes_("cell")

        def matrix(group, key, value):
            value = np.asarray(value, np.float64).reshape(-1, 4)
            if value.size:
                d = group.create_dataset(key, data=value.T)
            else:
                d = group.create_dataset(key, data=np.array([4, 0], np.uint64))
                d.attrs["MATLAB_empty"] = np.uint8(1)
            d.attrs["MATLAB_class"] = np.bytes_("double")
            return d

        def text(group, key, value):
            d = group.create_dataset(key, data=np.array([[ord(ch)] for ch in value], np.uint16))
            d.attrs["MATLAB_class"] = np.bytes_("char")
            d.attrs["MATLAB_int_decode"] = np.int32(2)
            return d

        cell("boxes", boxes, matrix)
        if images is not None:
            cell("images", images, text)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02IM")


# MATLAB's 1-based (y1, x1, y2, x2) and the 0-based (x1, y1, x2, y2) py-faster-rcnn reads from them.
SS_RAW = [[[1, 2, 10, 20], [5, 5, 6, 7]], [], [[3, 4, 30, 40]]]
SS_XYXY = [[[1, 0, 19, 9], [4, 4, 6, 5]], np.zeros((0, 4)), [[3, 2, 39, 29]]]
SS_IDS = ["000001", "000002", "000004"]


def test_selective_search_mat_v73(tmp_path):
    _write_mat73(tmp_path / "voc_2007_test.mat", SS_RAW, SS_IDS)
    got = load_proposals(tmp_path / "voc_2007_test.mat")
    assert list(got) == SS_IDS
    for image_id, want in zip(SS_IDS, SS_XYXY):
        np.testing.assert_array_equal(got[image_id], np.asarray(want, np.float32).reshape(-1, 4))
        assert got[image_id].dtype == np.float32
    _write_mat73(tmp_path / "no_ids.mat", SS_RAW)
    with pytest.raises(ValueError, match=r"no_ids\.mat: the file has no 'images' variable; pass image_ids="):
        load_proposals(tmp_path / "no_ids.mat")
    assert list(load_proposals(tmp_path / "no_ids.mat", image_ids=["a", "b", "c"])) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"no_ids\.mat: 3 box matrices but 2 image ids"):
        load_proposals(tmp_path / "no_ids.mat", image_ids=["a", "b"])


def test_selective_search_mat_v5_with_scipy(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    boxes = np.empty((1, 3), dtype=object)
    for i, raw in enumerate(SS_RAW):
        boxes[0, i] = np.asarray(raw, np.uint16).reshape(-1, 4)
    images = np.empty((1, 3), dtype=object)
    images[0, :] = SS_IDS
    scipy_io.savemat(tmp_path / "ss.mat", {"boxes": boxes, "images": images})
    got = load_proposals(tmp_path / "ss.mat")
    assert list(got) == SS_IDS
    for image_id, want in zip(SS_IDS, SS_XYXY):
        np.testing.assert_array_equal(got[image_id], np.asarray(want, np.float32).reshape(-1, 4))


def test_npz_json_padding_and_the_models_mask(tmp_path):
    boxes = {"000005": [[10, 20, 50, 60], [0, 0, 5, 5], [30, 5, 31, 90]], "img b": []}
    np.savez(tmp_path / "p.npz", **{k: np.asarray(v, np.float32).reshape(-1, 4) for k, v in boxes.items()})
    (tmp_path / "p.json").write_text(json.dumps(boxes))
    for name in ("p.npz", "p.json"):
        got = load_proposals(tmp_path / name)
        assert sorted(got) == sorted(boxes) and got["img b"].shape == (0, 4)
        np.testing.assert_array_equal(got["000005"], boxes["000005"])
    rows, mask = batch_proposals(got, ["000005", "img b"], 4, scales=[(2.0, 0.5), 1.0])
    np.testing.assert_array_equal(rows[0, :3], [[20, 10, 100, 30], [0, 0, 10, 2.5], [60, 2.5, 62, 45]])
    np.testing.assert_array_equal(mask, [[True, True, True, False], [False] * 4])
    assert not rows[0, 3].any() and not rows[1].any()
    # The model's mask from the padded rows agrees; a given box of zero size would count as padding.
    boxes_in, model_mask = PaddedProposals()(rows)
    np.testing.assert_array_equal(model_mask, mask)
    np.testing.assert_array_equal(boxes_in, rows)
    with pytest.raises(ValueError, match="3 proposals do not fit 2 rows"):
        pad_proposals(got["000005"], 2)
    rows, mask = pad_proposals(got["000005"], 2, truncate=True)
    np.testing.assert_array_equal(rows, boxes["000005"][:2])
    with pytest.raises(KeyError, match="no proposals for image 'x'"):
        batch_proposals(got, ["x"], 4)


def test_proposal_files_errors_name_the_file(tmp_path):
    cases = {
        "shape.json": ('{"a": [[1, 2, 3]]}', r"shape\.json: proposals of image 'a' must be \(N, 4\) boxes"),
        "list.json": ("[[1, 2, 3, 4]]", r"list\.json: expected an object"),
        "bad.json": ("{", r"bad\.json: not valid JSON"),
        "nan.json": ('{"a": [[1, 2, NaN, 4]]}', r"nan\.json: proposals of image 'a' hold non-finite values"),
        "text.json": ('{"a": [["x", 1, 2, 3]]}', r"text\.json: proposals of image 'a' are not numbers"),
        "p.txt": ("1 2 3 4", r"p\.txt: unknown proposals format '\.txt'"),
        "junk.mat": ("not a mat file", r"junk\.mat: not a MATLAB v5 or v7\.3 \.mat file"),
        "cut.npz": ("PK\x03\x04", r"cut\.npz: not a readable \.npz"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            load_proposals(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"none\.npz: no such proposals file"):
        load_proposals(tmp_path / "none.npz")
    np.savez(tmp_path / "objects.npz", a=np.array([None], dtype=object))
    with pytest.raises(ValueError, match=r"objects\.npz: cannot read the \.npz"):
        load_proposals(tmp_path / "objects.npz")
    (tmp_path / "v5.mat").write_bytes(b"MATLAB 5.0 MAT-file".ljust(128) + b"\0" * 16)
    scipy = importlib.util.find_spec("scipy") is not None
    message = r"cannot read the \.mat file" if scipy else r"a MATLAB v5 \.mat file; reading it needs scipy"
    with pytest.raises(ValueError, match=r"v5\.mat: " + message):
        load_proposals(tmp_path / "v5.mat")


# --------------------------------------------------------------------------- files and formats


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A width-0.125 model with 16 proposals per image (some scores above 0.05), saved as .keras,
    and proposals for three images from a .json file (one image's 20 boxes cut to 16)."""
    root = tmp_path_factory.mktemp("fast_rcnn_small")
    keras.utils.set_random_seed(2)
    model = kseg.build_model("fast_rcnn_vgg16", num_proposals=16, width=0.125)
    kernel, bias = model.get_layer("cls_score").get_weights()
    model.get_layer("cls_score").set_weights([kernel, np.random.default_rng(2).normal(0, 1.5, bias.shape)])
    model.save(root / "fast_rcnn.keras")
    # Boxes as verification makes them (convert.verify: on the 16-pixel grid, no two alike).
    grid = make_inputs((*EXPORT_SIZE, 3), batch=3, seed=3, extra={"proposals": (24, 4)})["proposals"]
    boxes = {f"im{i}": grid[i, :n].tolist() for i, n in enumerate((14, 20, 9))}
    (root / "proposals.json").write_text(json.dumps(boxes))
    rows, _ = batch_proposals(load_proposals(root / "proposals.json"), ["im0", "im1", "im2"], 16, truncate=True)
    yield model, root, rows
    keras.backend.clear_session()


def test_keras_file_loads_in_a_fresh_process(small, tmp_path):
    model, root, rows = small
    x = np.random.default_rng(4).normal(size=(3, *EXPORT_SIZE, 3)).astype(np.float32) * 50
    want = dict(zip(model.output_names, (np.asarray(o) for o in model([x, rows]))))
    np.savez(tmp_path / "io.npz", image=x, proposals=rows, **{f"out_{k}": v for k, v in want.items()})
    code = (
        "import keras, numpy as np, kseg\n"
        f"m = keras.models.load_model({str(root / 'fast_rcnn.keras')!r})\n"
        f"d = np.load({str(tmp_path / 'io.npz')!r})\n"
        "out = m([d['image'], d['proposals']])\n"
        "print(m.count_params(), max(float(np.abs(np.asarray(o, np.float64) - d['out_' + n]).max())"
        " for n, o in zip(m.output_names, out)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    count, diff = done.stdout.split()[-2:]
    assert int(count) == model.count_params() and float(diff) == 0.0


@pytest.mark.parametrize("target", ["fast_rcnn_saved_model", "fast_rcnn.onnx", "fast_rcnn.tflite"])
def test_exports_verified_with_detections_as_sets(small, tmp_path, target):
    """kseg.convert writes both inputs (`image`, `proposals`) and verifies raw outputs and decoded
    detections against Keras; then batches of 1 and 3, with the file's proposals too."""
    import tensorflow as tf

    from convert.api import convert, load_runner
    from convert.verify import keras_runner, verify
    from kseg import identity as md

    model, root, rows = small
    result = convert(str(root / "fast_rcnn.keras"), str(tmp_path / target), input_size=EXPORT_SIZE)
    assert result["verification"]["passed"], result["summary"]
    runner = load_runner(result["target"]["path"])
    assert runner.extra_inputs == {"proposals": (16, 4)}
    if target.endswith(".tflite"):
        assert runner.metadata["tflite"]["select_tf_ops"] == []
    if target.endswith("saved_model"):
        signature = tf.saved_model.load(result["target"]["path"]).signatures["serving_default"]
        assert sorted(signature.structured_input_signature[1]) == ["image", "proposals"]
    meta = md.build_metadata(model)
    found = 0
    for batch in (1, 3):
        x = make_inputs((*EXPORT_SIZE, 3), meta, batch=batch, seed=batch, extra=runner.extra_inputs)
        if batch == 3:
            x["proposals"] = rows
        report = verify(keras_runner(model, meta), runner, inputs=x)
        assert report.passed, report.summary()
        found += int(report.outputs[-1].note.split(" matched")[0].split()[-1])
    assert found > 10  # detections were compared, not only empty sets
