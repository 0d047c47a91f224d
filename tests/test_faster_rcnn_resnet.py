"""faster_rcnn_resnet50_c4 / faster_rcnn_resnet101_c4: parameter counts, layer names, frozen
BatchNorm, torchvision state_dict import, and every stage equal to a reference with torchvision's
module names and state_dict keys (tests/torch_reference_frcnn_c4.py: torchvision's generic
FasterRCNN on nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3) with
FrozenBatchNorm2d, RPNHead(1024, 9), MultiScaleRoIAlign(["0"], 14, 2), box head
nn.Sequential(layer4, AdaptiveAvgPool2d(1), Flatten()) and FastRCNNPredictor(2048, C)): RPN
objectness and deltas, proposals, the head's logits and deltas, detections as sets. ResNet101-C4's
equivalence is in the slow set (its counts and keys are checked here)."""

import keras
import numpy as np
import pytest

import kseg
from kseg.api import DETECTION_OUTPUTS, deployment_model
from kseg.detection.compare import compare_detection_sets
from kseg.identity import of_name
from kseg.weights import keras_to_torch

torch = pytest.importorskip("torch")
ref = pytest.importorskip("tests.torch_reference_frcnn_c4")
nn = torch.nn

SIZE = (160, 224)  # multiples of 16: no padding in torchvision's transform (the trunk's stride)
# The best 64 of the ~200 proposals left after NMS: conv5_x on each RoI is most of the run time, and
# the one-to-one checks below are as strict with 64 as with 300.
PROPOSALS = 64
RAW = ["rpn_objectness", "rpn_deltas", "proposals", "proposal_mask", "class_logits", "box_regression"]
# arch -> (Keras count_params with BN moving statistics, torch-style count: state_dict less the
# running statistics, trainable: torchvision's parameters() with FrozenBatchNorm2d)
COUNTS = {"resnet50": (33_260_630, 33_207_510, 33_154_390), "resnet101": (52_304_982, 52_199_638, 52_094_294)}


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_parameter_counts_names_and_state_dict_keys(arch):
    model = kseg.build_model(f"faster_rcnn_{arch}_c4")
    keras_count, torch_count, trainable = COUNTS[arch]
    assert model.count_params() == keras_count == kseg.get_spec(model.name).params
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == trainable
    reference = ref.FasterRCNNResNetC4(arch)
    state = reference.state_dict()
    assert sum(v.numel() for k, v in state.items() if "running_" not in k) == torch_count
    assert sum(p.numel() for p in reference.parameters()) == trainable
    # Every key of torchvision's state_dict, and only those, maps to a layer, with its shape.
    mine = keras_to_torch(model, kseg.get_spec(model.name).torch_map())
    assert sorted(mine) == sorted(state)
    assert all(tuple(mine[k].shape) == tuple(state[k].shape) for k in state)
    # The layer names a trainer cuts sub-models by (faster_rcnn_vgg16's).
    assert model.output_names == RAW
    features = model.get_layer(f"conv4_block{6 if arch == 'resnet50' else 23}_out").output
    assert model.get_layer("proposal_layer").input[2] is features
    assert model.get_layer("roi_align5").input[0] is features
    assert model.get_layer("roi_align5").input[1] is model.get_layer("rois").output
    assert model.get_layer("roi_align5").output.shape[1:] == (14, 14, 1024)
    assert model.get_layer("avg_pool").input.shape[1:] == (7, 7, 2048)
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn) and {layer.epsilon for layer in bn} == {1e-5}
    keras.backend.clear_session()


def test_paper_layout_and_options():
    paper = kseg.build_model("faster_rcnn_resnet50_c4", layout="paper")
    # 2 scores per anchor instead of 1: 9 more filters of 1024 weights + bias.
    assert paper.count_params() == COUNTS["resnet50"][0] + 9 * 1025
    assert paper.get_layer("rpn_cls_score").filters == 18 and paper.get_layer("roi_pool5").output_size == (14, 14)
    assert paper.get_layer("proposal_layer").cell_anchors[0] == [-84.0, -40.0, 99.0, 55.0]  # py-faster-rcnn's
    assert of_name("faster_rcnn_resnet50_c4", {"layout": "paper"}).layout == "paper"
    assert of_name("faster_rcnn_resnet50_c4").layout == "torchvision"
    assert of_name("faster_rcnn_resnet50_c4").preprocessing.kind == "torch"
    with pytest.raises(ValueError, match="faster_rcnn_resnet50_c4: roi_op"):
        kseg.build_model("faster_rcnn_resnet50_c4", roi_op="warp")
    with pytest.raises(ValueError, match="width"):
        kseg.build_model("faster_rcnn_resnet101_c4", width=2)
    keras.backend.clear_session()


def test_small_width_runs_with_frozen_batchnorm_and_a_cut_head():
    """width=0.125 (kseg's CPU option): training=True leaves every output as in inference (frozen
    BN, no dropout), and the head cut as keras.Model([features, rois], flat logits / deltas) gives
    the model's own rows."""
    keras.utils.set_random_seed(4)
    model = kseg.build_model("faster_rcnn_resnet50_c4", width=0.125, post_nms_top_n=16, layout="paper")
    assert model.get_layer("conv4_block6_out").output.shape[-1] == 128
    x = np.random.default_rng(4).normal(size=(2, 96, 128, 3)).astype(np.float32)
    inference, training = model(x), model(x, training=True)
    for name, a, b in zip(model.output_names, inference, training):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6, err_msg=name)
    features, rois = model.get_layer("roi_pool5").input
    head = keras.Model([features, rois], [model.get_layer("class_logits").input,
                                          model.get_layer("box_regression").input])
    trunk = keras.Model(model.input, [features, rois])
    logits, deltas = head(trunk(x))
    np.testing.assert_allclose(np.asarray(logits).reshape(2, 16, -1), inference[4], atol=1e-5)
    np.testing.assert_allclose(np.asarray(deltas).reshape(2, 16, -1), inference[5], atol=1e-5)
    keras.backend.clear_session()


def test_backbone_weights_from_torchvision_resnet50(tmp_path):
    """backbone_weights= a torchvision resnet50 state_dict sets conv1 .. conv5_x (by the keras.applications
    names both share); the RPN and the predictor keep their initialisation, fc is ignored."""
    torch.manual_seed(1)
    resnet = pytest.importorskip("tests.torch_reference").randomize_bn(ref.ResNet(ref.BLOCKS["resnet50"]), seed=1)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    model = kseg.build_model("faster_rcnn_resnet50_c4", backbone_weights=tmp_path / "resnet50.pth")
    np.testing.assert_array_equal(model.get_layer("conv1_conv").kernel,
                                  resnet.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("conv5_block3_3_bn").moving_variance,
                                  resnet.layer4[2].bn3.running_var.numpy())
    np.testing.assert_array_equal(model.get_layer("conv4_block6_2_conv").kernel,
                                  resnet.layer3[5].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert not np.any(model.get_layer("cls_score").bias)
    keras.backend.clear_session()


def test_registry_trainer_trains_all_but_the_frozen_batchnorm():
    """The registry's trainer (RCNNTrainer, torchvision's settings for the default layout) cuts its
    backbone and head from the layer names; two SGD steps move every conv and dense variable and no
    BatchNorm variable (gamma, beta and the moving statistics stay: FrozenBatchNorm2d)."""
    import tensorflow as tf

    from kseg.identity import identify

    keras.utils.set_random_seed(0)
    model = kseg.build_model("faster_rcnn_resnet50_c4", num_classes=5, width=0.125, anchor_sizes=(32, 64, 128),
                             pre_nms_top_n=200, post_nms_top_n=32)
    trainer = kseg.get_spec(model.name).trainer(model, identify(model).options,
                                                {"pre_nms_top_n": 200, "post_nms_top_n": 32, "roi_batch": 16})
    assert trainer.convention == "torchvision"
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 64, (2, 3, 2))
    targets = {"boxes": np.concatenate([xy, xy + rng.uniform(16, 64, (2, 3, 2))], -1).astype(np.float32),
               "classes": np.array([[1, 2, -1], [3, 4, 1]], np.int32)}
    before = {v.path: v.numpy().copy() for v in model.weights}
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    data = tf.data.Dataset.from_tensors((rng.normal(size=(2, 128, 128, 3)).astype(np.float32), targets))
    history = trainer.fit(data.repeat(), steps_per_epoch=2, epochs=1, verbose=0).history
    assert all(np.isfinite(v).all() for v in history.values())
    changed = {v.path for v in model.weights if not np.array_equal(before[v.path], v.numpy())}
    assert changed == {v.path for v in model.trainable_weights}
    assert all("_bn/" not in p for p in changed) and any("conv5_block3_3_conv" in p for p in changed)
    keras.backend.clear_session()


def _reference(arch):
    """The reference with weights that keep the activations O(1) through the residual sums, spread
    the RPN's scores, and leave a few dozen class scores above 0.05."""
    torch.manual_seed(0)
    module = ref.FasterRCNNResNetC4(arch, num_classes=21, rpn_pre_nms_top_n=6000,
                                    rpn_post_nms_top_n=PROPOSALS).eval()
    with torch.no_grad():
        for m in [*module.backbone.modules(), *module.roi_heads.box_head.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.kernel_size == (1, 1) and m.out_channels > m.in_channels:  # conv3, downsample
                    m.weight *= 0.2
        ref.randomize_frozen_bn(module)
        for name, p in module.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
        module.rpn.head.conv[0][0].weight.normal_(0, 0.05)
        module.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.5)
        module.roi_heads.box_predictor.cls_score.bias[0] += 4.0  # background: fewer than 100 detections
    return module


@pytest.fixture(scope="module", params=["resnet50", pytest.param("resnet101", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory):
    arch = request.param
    reference = _reference(arch)
    path = tmp_path_factory.mktemp("frcnn_c4") / f"fasterrcnn_{arch}_c4.pth"
    torch.save(reference.state_dict(), path)
    model = kseg.build_model(f"faster_rcnn_{arch}_c4", weights=path, post_nms_top_n=PROPOSALS)
    x = np.random.default_rng(0).normal(size=(1, *SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    deployed = deployment_model(model)  # the raw outputs and the decoded detections in one pass
    out = {name: np.asarray(v) for name, v in zip(deployed.output_names, deployed(x))}
    yield {k: out[k] for k in RAW}, want, {k: out[k] for k in DETECTION_OUTPUTS}
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
    assert len(mine) == len(theirs) == PROPOSALS
    distance = np.abs(mine[:, None, :] - theirs[None, :, :]).max(-1)
    pairs = [(i, int(np.argmin(distance[i]))) for i in range(len(mine))]
    assert all(distance[i, j] < 1e-2 for i, j in pairs) and len({j for _, j in pairs}) == len(pairs)
    return pairs


def test_proposals_equal(pair):
    got, want, _ = pair
    pairs = _match_proposals(got, want)
    assert np.mean([i == j for i, j in pairs]) > 0.9  # mostly the same order: only near-equal scores swap


def test_head_outputs_equal_per_proposal(pair):
    got, want, _ = pair
    pairs = _match_proposals(got, want)
    mine, theirs = [i for i, _ in pairs], [j for _, j in pairs]
    _close(got["class_logits"][0][mine], want["class_logits"].numpy()[theirs])
    _close(got["box_regression"][0][mine], want["box_regression"].numpy()[theirs])


def test_detections_equal_as_sets(pair):
    _, want, found = pair
    det = want["detections"][0]
    n = len(det["scores"])
    assert 5 < n < 100, "the weights must give some detections above 0.05, fewer than the cap"
    theirs = {"detection_boxes": np.zeros((1, 100, 4), np.float32), "detection_scores": np.zeros((1, 100), np.float32),
              "detection_classes": np.full((1, 100), -1, np.int32), "num_detections": np.array([n])}
    theirs["detection_boxes"][0, :n] = det["boxes"].numpy()
    theirs["detection_scores"][0, :n] = det["scores"].numpy()
    theirs["detection_classes"][0, :n] = det["labels"].numpy()
    result = compare_detection_sets(theirs, found, score_atol=1e-5, box_atol=1e-3 * max(SIZE),
                                    score_threshold=0.05, iou_threshold=0.5)
    assert result.passed and result.matched == n, result


def _plausible_weights(model, seed):
    """He-normal convs (the expanding 1x1s scaled by 0.2, as _reference does), random frozen BN
    statistics, small RPN deltas and class biases that leave a few dozen detections: with Keras'
    default initialisation the residual sums grow to logits ~70 and the RPN keeps a handful of
    degenerate boxes, which would test nothing."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            k = tuple(layer.kernel.shape)
            std = 0.01 if layer.name == "rpn_bbox_pred" else np.sqrt(2.0 / np.prod(k[:3]))
            std *= 0.2 if k[:2] == (1, 1) and k[3] > k[2] else 1.0
            layer.set_weights([rng.normal(0, std, k)] + [rng.uniform(-0.1, 0.1, k[3])] * layer.use_bias)
        elif isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.2, 0.2, n), rng.uniform(-0.2, 0.2, n),
                               rng.uniform(0.5, 1.5, n)])
    kernel, bias = model.get_layer("cls_score").get_weights()
    bias = rng.normal(0, 1.5, bias.shape)
    bias[0] += 2.0
    model.get_layer("cls_score").set_weights([kernel, bias])


@pytest.mark.slow  # 19 s; faster_rcnn_vgg16's ONNX export with NMS inside runs in the default suite
def test_onnx_export_with_nms_inside(tmp_path):
    """R50-C4 to ONNX (RoIAlign 14x14, conv5_x on the RoIs, both NMS inside) at a dynamic batch,
    verified with detections as sets; width 0.125 and 20 proposals keep it fast (the full size goes
    through every format in the slow conversion matrix)."""
    from convert.api import convert, load_runner
    from convert.verify import keras_runner, make_inputs, verify
    from kseg import identity as md

    keras.utils.set_random_seed(2)
    model = kseg.build_model("faster_rcnn_resnet50_c4", post_nms_top_n=20, width=0.125)
    _plausible_weights(model, 2)
    model.save(tmp_path / "frcnn_c4.keras")
    result = convert(str(tmp_path / "frcnn_c4.keras"), str(tmp_path / "frcnn_c4.onnx"), input_size=(96, 128))
    assert result["verification"]["passed"], result["summary"]
    runner = load_runner(result["target"]["path"])
    found = 0
    for batch in (1, 3):
        x = make_inputs((96, 128, 3), md.build_metadata(model), batch=batch, seed=batch)
        report = verify(keras_runner(model, md.build_metadata(model)), runner, inputs=x)
        assert report.passed, report.summary()
        found += int(report.outputs[-1].note.split(" matched")[0].split()[-1])
    assert found > 20  # detections were compared, not only empty sets
    keras.backend.clear_session()
