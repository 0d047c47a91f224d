"""`kseg convert --to tf_serving` of a detector that takes any input size (faster_rcnn_vgg16): the same module
as `kseg export --serving`, each image resized keeping its aspect ratio to the test scale (shorter side
min_size, longer at most max_size: py-faster-rcnn's TEST.SCALES / TEST.MAX_SIZE, torchvision's
GeneralizedRCNNTransform min_size / max_size) and its boxes reported normalised to the original image, as the
TF Object Detection API's exported Faster R-CNNs report them (tensorflow/models
research/object_detection/exporter_lib_v2.py).

The oracle is the Keras model with its decoder called directly on each image resized to the hand-computed
size, its boxes divided by the hand-computed scale. A width-0.125 network and a small test scale (96 / 160) keep
it fast. Detections compare as sets (kseg.detection.compare).
"""

import json
import os

import data_fixtures as fx
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import saved_frcnn

import kseg
from convert.tf_serving import encode_png, serving_size
from kseg.cli import main
from kseg.detection.compare import compare_detection_sets
from kseg.identity import identify

SCALE = ["--min-size", "96", "--max-size", "160"]
# (H, W) -> (scale, resized (h, w)) at (96, 160), by hand: the shorter side to 96 (96 / 120 = 0.8), and the
# longer side capped at 160 (160 / 300; 100 x 160 / 300 = 53.3 rounds to 53).
EXPECTED = {(120, 180): (0.8, (96, 144)), (100, 300): (160 / 300, (53, 160))}
DECODER_SCORE_THRESHOLD = 0.05  # FastRCNNDecoder's default
HEAD_NMS = 0.3  # the paper layout's (py-faster-rcnn TEST.NMS)


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory):
    yield saved_frcnn(tmp_path_factory.mktemp("frcnn"))
    keras.backend.clear_session()


def _oracle(model, image):
    """The decoder's detections on `image` resized to EXPECTED's size, boxes / EXPECTED's scale, as the Object
    Detection API reports them: [ymin, xmin, ymax, xmax] normalised to the original image, 1-based classes."""
    scale, size = EXPECTED[image.shape[:2]]
    x = tf.image.resize(image[None].astype(np.float32), size, method="bilinear")
    out = {k: np.asarray(v) for k, v in kseg.inference_model(model)(identify(model).preprocessing.apply(x)).items()}
    h, w = image.shape[:2]
    x1, y1, x2, y2 = np.moveaxis(np.clip(out["detection_boxes"].astype(np.float64) / scale, 0, [w, h, w, h]), -1, 0)
    return {"detection_boxes": np.stack([y1 / h, x1 / w, y2 / h, x2 / w], -1),
            "detection_scores": out["detection_scores"], "num_detections": out["num_detections"],
            "detection_classes": np.maximum(out["detection_classes"], 0).astype(np.float32)}


def _sets_agree(want, got, box_atol, score_atol=2e-5):
    found = compare_detection_sets(want, got, score_atol=score_atol, box_atol=box_atol,
                                   score_threshold=DECODER_SCORE_THRESHOLD, iou_threshold=HEAD_NMS)
    assert found.passed, found.unmatched[:5]
    return found.matched


def _row(out, i):
    return {k: np.asarray(v)[i:i + 1] for k, v in out.items() if k != "image_size"}


@pytest.mark.slow  # 23 s; the any-size scale logic runs by default in test_detection_anysize
def test_convert_writes_the_export_servings_any_size_module(frcnn, tmp_path, capsys):
    model, path = frcnn
    assert serving_size(model) == ((600, 600), (600, 1000, "bilinear"))  # py-faster-rcnn's scale by default
    assert serving_size(model, min_size=96, max_size=160) == ((96, 96), (96, 160, "bilinear"))
    converted, exported = tmp_path / "c" / "frcnn", tmp_path / "e" / "frcnn"
    assert main(["convert", path, "--to", "tf_serving", "-o", str(converted), *SCALE]) == 0
    assert "verified: PASS" in capsys.readouterr().out
    assert main(["export", path, "--serving", str(exported), *SCALE]) == 0
    loaded = {}
    for which, base in (("convert", converted), ("export", exported)):
        with open(base / "1" / "assets" / "kseg.json") as f:
            serving = json.load(f)["serving"]
        assert serving["eval_transform"] == [96, 160, "bilinear"] and serving["image_size"] == [96, 96]
        loaded[which] = tf.saved_model.load(str(base / "1"))
        assert loaded[which].signatures["serving_default"].structured_input_signature[1]["images"].shape.as_list() \
            == [None, None, None, 3]
        signatures = serving["signatures"]
    assert sorted(loaded["convert"].signatures) == sorted(loaded["export"].signatures) == sorted(signatures)

    rng = np.random.default_rng(2)
    pictures = [fx.image_array(rng, h, w) for h, w in EXPECTED]  # two sizes, the second capped by max_size
    want = [_oracle(model, p) for p in pictures]
    data = tf.constant([encode_png(p) for p in pictures])
    matched = 0
    got = {}
    for which, module in loaded.items():
        # predict_images: both encoded images in one request, each at its own scale.
        got[which] = {k: v.numpy() for k, v in module.signatures["predict_images"](image_bytes=data).items()}
        assert got[which]["image_size"].tolist() == [list(hw) for hw in EXPECTED]
        for i in range(len(pictures)):
            matched += _sets_agree(want[i], _row(got[which], i), box_atol=1e-4)
    # serving_default: one float batch per size, from the converted module.
    for i, picture in enumerate(pictures):
        out = {k: v.numpy() for k, v in loaded["convert"].signatures["serving_default"](
            images=tf.constant(picture[None], tf.float32)).items()}
        assert 0 <= out["detection_boxes"].min() and out["detection_boxes"].max() <= 1
        matched += _sets_agree(want[i], out, box_atol=1e-4)
    # The converted module gives what the exported one gives.
    for i in range(len(pictures)):
        _sets_agree(_row(got["export"], i), _row(got["convert"], i), box_atol=1e-6, score_atol=1e-6)
    assert matched > 20  # detections were compared, not only empty sets
    assert min(int(w["num_detections"][0]) for w in want) > 5


def test_scale_options_that_do_not_fit_are_refused(frcnn, tmp_path, capsys):
    model, path = frcnn
    # A fixed size (the old fixed-size module) has no meaning for an any-size detector.
    base = tmp_path / "fixed"
    assert main(["convert", path, "--to", "tf_serving", "-o", str(base), "--static", "--input-size", "64x64"]) == 2
    assert "--min-size / --max-size" in capsys.readouterr().err
    assert not (base / "1").exists()
    with pytest.raises(ValueError, match="any size"):
        serving_size(model, image_size=(64, 64))
    # The scale is a TF Serving export's: other formats refuse it.
    assert main(["convert", path, "--to", "onnx", "-o", str(tmp_path / "f.onnx"), "--min-size", "96"]) == 2
    assert "--to tf_serving" in capsys.readouterr().err
    assert main(["convert", path, "--to", "tf_serving", "-o", str(tmp_path / "zero"), "--min-size", "0"]) == 2
    assert "positive" in capsys.readouterr().err
    # A model that is not an any-size detector refuses it too.
    lenet = tmp_path / "lenet.keras"
    kseg.build_model("lenet5", num_classes=4).save(lenet)
    assert main(["convert", str(lenet), "--to", "tf_serving", "-o", str(tmp_path / "lenet"), *SCALE]) == 2
    assert "a classification model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "f.onnx") and not (tmp_path / "lenet" / "1").exists()


def test_fast_rcnn_keeps_the_plain_saved_model(tmp_path, capsys):
    """fast_rcnn_vgg16 takes proposals beside the image: the image-level signatures have no place for them, so
    its tf_serving conversion stays a plain SavedModel (serving_default takes both inputs), with a warning, and
    a test scale is refused."""
    keras.utils.set_random_seed(0)
    model = kseg.build_model("fast_rcnn_vgg16", width=0.125)
    path = str(tmp_path / "fast.keras")
    model.save(path)
    assert main(["convert", path, "--to", "tf_serving", "-o", str(tmp_path / "m"), *SCALE]) == 2
    assert "proposals" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="signatures take images only"):
        assert main(["convert", path, "--to", "tf_serving", "-o", str(tmp_path / "fast"), "--input-size", "64x64"]) \
            == 0
    signature = tf.saved_model.load(str(tmp_path / "fast" / "1")).signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["image", "proposals"]
    keras.backend.clear_session()
