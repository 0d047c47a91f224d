"""faster_rcnn_vgg16: parameter counts of both layouts, torchvision state_dict import, and every
stage equal to a reference with torchvision's module names and state_dict keys
(tests/torch_reference_frcnn.py: torchvision's generic FasterRCNN composed with
vgg16().features[:-1], MultiScaleRoIAlign(["0"], 7, 2), TwoMLPHead and FastRCNNPredictor):
RPN objectness and deltas, proposals, the head's logits and deltas, detections as sets."""

import keras
import numpy as np
import pytest

import kseg
from kseg.detection.compare import compare_detection_sets

torch = pytest.importorskip("torch")
ref = pytest.importorskip("tests.torch_reference_frcnn")
nn = torch.nn

SIZE = (224, 288)  # multiples of 32: no padding in torchvision's transform


def test_parameter_counts_and_names():
    paper = kseg.build_model("faster_rcnn_vgg16")
    assert paper.count_params() == 137_078_239
    assert paper.output_names == ["rpn_objectness", "rpn_deltas", "proposals", "proposal_mask", "class_logits",
                                  "box_regression"]
    assert paper.get_layer("rpn_cls_score").filters == 18 and paper.get_layer("roi_pool5") is not None
    tv = kseg.build_model("faster_rcnn_vgg16", layout="torchvision")
    assert tv.count_params() == 137_073_622 == sum(p.numel() for p in ref.FasterRCNNVGG16().parameters())
    assert tv.get_layer("rpn_cls_score").filters == 9 and tv.get_layer("roi_align5") is not None
    with pytest.raises(ValueError, match="rpn_head"):
        kseg.build_model("faster_rcnn_vgg16", rpn_head="tanh")
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def reference():
    """The reference with weights that keep the maps input-dependent and some scores above 0.05."""
    torch.manual_seed(0)
    module = ref.FasterRCNNVGG16(num_classes=21, rpn_pre_nms_top_n=6000, rpn_post_nms_top_n=300).eval()
    with torch.no_grad():
        for m in module.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        for name, p in module.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
        module.rpn.head.conv[0][0].weight.normal_(0, 0.05)
        module.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.5)
    return module


@pytest.fixture(scope="module")
def pair(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("frcnn") / "fasterrcnn_vgg16.pth"
    torch.save(reference.state_dict(), path)
    model = kseg.build_model("faster_rcnn_vgg16", layout="torchvision", weights=path)
    x = np.random.default_rng(0).normal(size=(1, *SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    got = dict(zip(model.output_names, (np.asarray(o) for o in model(x))))
    detector = kseg.inference_model(model)
    found = {k: np.asarray(v) for k, v in detector(x).items()}
    yield got, want, found
    keras.backend.clear_session()


def _close(a, b, tol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max()
    assert err <= tol * max(1.0, np.abs(b).max()), err
    return err


def test_rpn_outputs_equal(pair):
    got, want, _ = pair
    _close(got["rpn_objectness"], want["objectness"].numpy())
    _close(got["rpn_deltas"], want["rpn_deltas"].numpy())


def _match_proposals(got, want):
    """kseg's valid proposals against the reference's, one to one (L-inf distance < 1e-2 px)."""
    mine = got["proposals"][0][got["proposal_mask"][0]]
    theirs = want["proposals"][0].numpy()
    assert len(mine) == len(theirs) > 50
    distance = np.abs(mine[:, None, :] - theirs[None, :, :]).max(-1)
    pairs = [(i, int(np.argmin(distance[i]))) for i in range(len(mine))]
    assert all(distance[i, j] < 1e-2 for i, j in pairs) and len({j for _, j in pairs}) == len(pairs)
    return pairs, float(max(distance[i, j] for i, j in pairs))


def test_proposals_equal(pair):
    got, want, _ = pair
    pairs, worst = _match_proposals(got, want)
    # The deltas agree to float32 conv rounding (~1e-5 here); decoding multiplies dx, dy by the
    # anchor's size and dw, dh by exp() of it: up to 724 px for the 512-size, ratio-2 anchors.
    delta_err = np.abs(got["rpn_deltas"] - want["rpn_deltas"].numpy()).max()
    assert worst <= 2 * 724 * delta_err + 1e-4, (worst, delta_err)
    # Mostly the same order too (best first): only near-equal scores may swap.
    assert np.mean([i == j for i, j in pairs]) > 0.9


def test_head_outputs_equal_per_proposal(pair):
    got, want, _ = pair
    pairs, _ = _match_proposals(got, want)
    mine, theirs = [i for i, _ in pairs], [j for _, j in pairs]
    _close(got["class_logits"][0][mine], want["class_logits"].numpy()[theirs])
    _close(got["box_regression"][0][mine], want["box_regression"].numpy()[theirs])


def test_detections_equal_as_sets(pair):
    _, want, found = pair
    det = want["detections"][0]
    n = len(det["scores"])
    assert n > 5, "the weights must give some detections above 0.05"
    theirs = {"detection_boxes": np.zeros((1, 100, 4), np.float32), "detection_scores": np.zeros((1, 100), np.float32),
              "detection_classes": np.full((1, 100), -1, np.int32), "num_detections": np.array([n])}
    theirs["detection_boxes"][0, :n] = det["boxes"].numpy()
    theirs["detection_scores"][0, :n] = det["scores"].numpy()
    theirs["detection_classes"][0, :n] = det["labels"].numpy()
    result = compare_detection_sets(theirs, found, score_atol=1e-5, box_atol=1e-3 * max(SIZE),
                                    score_threshold=0.05, iou_threshold=0.5)
    assert result.passed and result.matched == n, result


def test_softmax_rpn_converts_exactly_to_sigmoid():
    # softmax(b, f)[1] = sigmoid(f - b): the paper's 2-way scores with w_sig = w_fg - w_bg give the
    # same proposals as torchvision's one logit (same anchors, so anchor_layout="torchvision").
    keras.utils.set_random_seed(1)
    paper = kseg.build_model("faster_rcnn_vgg16", anchor_layout="torchvision", post_nms_top_n=50)
    sigmoid = kseg.build_model("faster_rcnn_vgg16", anchor_layout="torchvision", rpn_head="sigmoid",
                               post_nms_top_n=50)
    for layer in paper.layers:
        if layer.weights and layer.name != "rpn_cls_score":
            sigmoid.get_layer(layer.name).set_weights(layer.get_weights())
    kernel, bias = paper.get_layer("rpn_cls_score").get_weights()  # channels: 9 background, 9 object
    sigmoid.get_layer("rpn_cls_score").set_weights([kernel[..., 9:] - kernel[..., :9], bias[9:] - bias[:9]])
    x = np.random.default_rng(1).normal(size=(1, 96, 128, 3)).astype(np.float32)
    a = dict(zip(paper.output_names, paper(x)))
    b = dict(zip(sigmoid.output_names, sigmoid(x)))
    fg = np.asarray(a["rpn_objectness"])
    _close(fg[..., 1] - fg[..., 0], b["rpn_objectness"], 1e-5)
    np.testing.assert_array_equal(a["proposal_mask"], b["proposal_mask"])
    _close(a["proposals"], b["proposals"], 1e-5)
    keras.backend.clear_session()


@pytest.mark.parametrize("target", ["frcnn.onnx", "frcnn.tflite"])
def test_exports_with_nms_inside(tmp_path, target):
    """ONNX (offset-trick NMS, batched proposal NMS) and TFLite (per-image WHILE, NMS V5, builtin ops
    only) at a dynamic batch, verified with detections as sets (a width-0.125 network and 20
    proposals keep it fast; the full size goes through every format in the slow matrix)."""
    from convert.api import convert, load_runner
    from convert.verify import keras_runner, make_inputs, verify
    from kseg import identity as md

    keras.utils.set_random_seed(2)
    model = kseg.build_model("faster_rcnn_vgg16", layout="torchvision", post_nms_top_n=20, width=0.125)
    kernel, bias = model.get_layer("cls_score").get_weights()  # some scores above 0.05
    model.get_layer("cls_score").set_weights([kernel, np.random.default_rng(2).normal(0, 1.5, bias.shape)])
    source = tmp_path / "frcnn.keras"
    model.save(source)
    result = convert(str(source), str(tmp_path / target), input_size=(96, 128))
    assert result["verification"]["passed"], result["summary"]
    runner = load_runner(result["target"]["path"])
    if target.endswith(".tflite"):
        assert runner.metadata["tflite"]["select_tf_ops"] == []
    found = 0
    for batch in (1, 3):
        x = make_inputs((96, 128, 3), md.build_metadata(model), batch=batch, seed=batch)
        report = verify(keras_runner(model, md.build_metadata(model)), runner, inputs=x)
        assert report.passed, report.summary()
        found += int(report.outputs[-1].note.split(" matched")[0].split()[-1])
    assert found > 10  # detections were compared, not only empty sets
    keras.backend.clear_session()


def test_saved_model_loads_in_a_fresh_process_and_predicts(tmp_path, capsys):
    """A .keras Faster R-CNN holds kseg's proposal and RoI layers: `import kseg` registers them, so a
    fresh process loads it; kseg predict runs it (fixed input size: the CLI resizes to it)."""
    import subprocess
    import sys

    from PIL import Image

    from kseg.cli import main

    keras.utils.set_random_seed(3)
    model = kseg.build_model("faster_rcnn_vgg16", num_classes=5, width=0.125, post_nms_top_n=20,
                             input_shape=(128, 128, 3))
    path = tmp_path / "frcnn.keras"
    model.save(path)
    code = (f"import kseg, keras; m = keras.models.load_model({str(path)!r}); "
            "print(m.count_params(), m.get_layer('roi_pool5').__class__.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [str(model.count_params()), "RoIPool"]
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 150, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    assert main(["predict", str(path), str(tmp_path / "a.jpg"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "detections.json").is_file() and (tmp_path / "out" / "a.png").is_file()
    keras.backend.clear_session()
