"""SSD300 with its decoder: kseg.inference_model, the decoder's feature sizes at any input size, and the
TF Serving export with the Object Detection API's outputs (serving_default, predict_images) served
over REST by `kseg serve`. Detections compare as sets (sorted by class, then score)."""

import base64
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import request, start_server

import kseg
from convert.tf_serving import encode_png
from kseg.cli import main
from kseg.identity import identify
from kseg.models.ssd import SOURCES, feature_sizes
from kseg.serving import export
from kseg.tasks.detection import od_api_outputs


@pytest.fixture(scope="module")
def ssd():
    keras.utils.set_random_seed(0)
    model = kseg.build_model("ssd300")
    # Small class logits: softmax far from saturation, so the NMS order has no exact ties.
    for name in SOURCES:
        layer = model.get_layer(f"{name}_mbox_conf")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 0.02, bias])
    return model


def _as_sets(out, i):
    """Image i's detections sorted by (class, -score): (classes, scores, boxes)."""
    n = int(out["num_detections"][i])
    classes, scores, boxes = (np.asarray(out[k][i][:n]) for k in ("detection_classes", "detection_scores",
                                                                    "detection_boxes"))
    order = np.lexsort((-scores, classes))
    return classes[order], scores[order], boxes[order]


def _assert_same_detections(a, b, batch, box_atol):
    for i in range(batch):
        (ca, sa, ba), (cb, sb, bb) = _as_sets(a, i), _as_sets(b, i)
        assert len(ca) == len(cb) > 0
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_allclose(sa, sb, atol=1e-5)
        np.testing.assert_allclose(ba, bb, atol=box_atol)


@pytest.mark.parametrize("layout, size", [("paper", (512, 384)), ("torchvision", (512, 384)),
                                          ("torchvision", (301, 299))])
def test_decoder_feature_sizes_are_the_networks(layout, size):
    model = kseg.build_model("ssd300", layout=layout, input_shape=(*size, 3), postprocess=True)
    sources = [list(model.get_layer(s).output.shape[1:3]) for s in SOURCES]
    assert feature_sizes(*size, layout) == sources
    assert model.get_layer("ssd_decoder").anchors.shape[0] == sum(h * w * a for (h, w), a in
                                                                    zip(sources, (4, 6, 6, 6, 4, 4)))


def test_inference_model_appends_the_decoder(ssd):
    detector = kseg.inference_model(ssd)
    images = np.random.default_rng(1).uniform(0, 255, (2, 300, 300, 3)).astype("float32")
    x = identify(ssd).preprocessing.apply(images)
    out = {k: np.asarray(v) for k, v in detector(x).items()}
    assert sorted(out) == ["detection_boxes", "detection_classes", "detection_scores", "num_detections"]
    assert out["detection_boxes"].shape == (2, 200, 4) and out["num_detections"].shape == (2,)
    classes = out["detection_classes"]
    assert classes.max() <= 20 and classes.min() >= -1 and 0 not in classes  # background never a detection
    with pytest.raises(ValueError, match="not a kseg detector"):
        kseg.inference_model(kseg.build_model("lenet5"))


def test_export_has_object_detection_api_outputs_and_is_served(ssd, tmp_path):
    base = tmp_path / "models"
    path = export(ssd, str(base / "ssd"))  # verified against the functions before saving
    loaded = tf.saved_model.load(path)
    assert {"serving_default", "predict_images", "raw_outputs"} <= set(loaded.signatures)
    images = np.random.default_rng(2).integers(0, 256, (2, 300, 300, 3)).astype("float32")
    got = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(images)).items()}
    assert got["detection_boxes"].shape == (2, 200, 4) and got["detection_classes"].dtype == np.float32
    # The Keras model + decoder in process, converted to the OD API convention.
    keras_out = od_api_outputs(kseg.inference_model(ssd)(identify(ssd).preprocessing.apply(images)), (300, 300))
    _assert_same_detections(got, {k: v.numpy() for k, v in keras_out.items()}, 2, box_atol=1e-5)
    assert got["detection_boxes"].min() >= 0 and got["detection_boxes"].max() <= 1  # normalised, clipped
    # predict_images: any size, resized to 300x300 inside; boxes are normalised to the image.
    photo = np.random.default_rng(3).integers(0, 256, (200, 260, 3)).astype(np.uint8)
    out = loaded.signatures["predict_images"](image_bytes=tf.constant([encode_png(photo)]))
    resized = tf.image.resize(photo[None].astype("float32"), (300, 300), method="bilinear")
    direct = loaded.signatures["serving_default"](images=resized)
    assert out["image_size"].numpy().tolist() == [[200, 260]]
    _assert_same_detections({k: v.numpy() for k, v in out.items()}, {k: v.numpy() for k, v in direct.items()}, 1,
                            box_atol=1e-5)
    # kseg serve answers predict_images over REST with the same detections.
    proc, where = start_server(base, log_path=tmp_path / "server.log")
    try:
        body = json.dumps({"signature_name": "predict_images",
                           "instances": [{"b64": base64.b64encode(encode_png(photo)).decode()}]})
        status, reply = request(where["rest_url"], "POST", "/v1/models/ssd:predict", body)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert status == 200, reply
    served = {k: np.asarray([v]) for k, v in reply["predictions"][0].items()}
    _assert_same_detections(served, {k: v.numpy() for k, v in out.items()}, 1, box_atol=1e-5)


def test_predict_runs_a_detector(ssd, tmp_path, capsys):
    """kseg predict takes a detector now (tests/test_detection_cli.py checks its outputs); evaluate reads
    the VOC detection layout and says so when it is missing."""
    path = str(tmp_path / "ssd.keras")
    ssd.save(path)
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_png(np.zeros((20, 30, 3), np.uint8)))
    assert main(["predict", path, str(photo), "--out", str(tmp_path / "out"), "--score-threshold", "0"]) == 0
    with open(tmp_path / "out" / "detections.json") as f:
        (entry,) = json.load(f)
    assert entry["size"] == [20, 30] and len(entry["detections"]) == 200  # the decoder's max_detections
    assert (tmp_path / "out" / "photo.png").is_file()
    assert main(["evaluate", path, "--data", str(tmp_path)]) == 2
    assert "no Annotations/" in capsys.readouterr().err
