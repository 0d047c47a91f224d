"""Detectors that take any input size (faster_rcnn_vgg16) in `kseg predict`, `kseg evaluate` and `kseg export
--serving`: each image resized keeping its aspect ratio to the test scale (shorter side min_size, longer at most
max_size: py-faster-rcnn's TEST.SCALES / TEST.MAX_SIZE, torchvision's GeneralizedRCNNTransform min_size /
max_size), run alone, its boxes divided by the scale back to its own pixels.

The oracle for every case is the Keras model with its decoder called directly on the image resized to the
hand-computed size, its boxes divided by the hand-computed scale. A width-0.125 network saved as .keras with
kseg's identity (Keras' own save) and a small test scale (96 / 160) keep it fast. Detections compare as sets
(kseg.detection.compare).
"""

import json
import os

import data_fixtures as fx
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import detections_from_json, saved_frcnn

import kseg
import kseg.data as kd
from convert.tf_serving import encode_png
from kseg.cli import main
from kseg.data.palette import VOC_CLASSES
from kseg.detection.compare import compare_detection_sets
from kseg.detection.eval_voc import voc_eval
from kseg.identity import identify
from kseg.images import read_image
from kseg.inference.scoring import detection_scale, network_size
from kseg.serving import export
from kseg.tasks.detection import rescale, resolve_scale, scale_rule, tf_rescale

SCALE = ["--min-size", "96", "--max-size", "160"]
# (H, W) -> (scale, resized (h, w)) at (96, 160), by hand: the shorter side to 96 (0.8), the longer side
# capped at 160 (160 / 300), and an upscale (96 / 90; 149.33 rounds to 149).
EXPECTED = {(120, 180): (0.8, (96, 144)), (100, 300): (160 / 300, (53, 160)), (140, 90): (96 / 90, (149, 96))}
SIZES = tuple(EXPECTED)
DECODER_SCORE_THRESHOLD = 0.05  # FastRCNNDecoder's default (py-faster-rcnn's visualisation uses 0.05 too)


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory):
    yield saved_frcnn(tmp_path_factory.mktemp("frcnn"))
    keras.backend.clear_session()


def _direct(model, image):
    """The oracle: the decoder's detections on `image` resized to EXPECTED's size, boxes / EXPECTED's scale."""
    scale, size = EXPECTED[image.shape[:2]]
    x = tf.image.resize(image[None].astype(np.float32), size, method="bilinear")
    out = {k: np.asarray(v) for k, v in kseg.inference_model(model)(identify(model).preprocessing.apply(x)).items()}
    h, w = image.shape[:2]
    out["detection_boxes"] = np.clip(out["detection_boxes"].astype(np.float64) / scale, 0, [w, h, w, h])
    return out


def _sets_agree(want, got, box_atol, score_atol=2e-5):
    found = compare_detection_sets(want, got, score_atol=score_atol, box_atol=box_atol,
                                   score_threshold=DECODER_SCORE_THRESHOLD, iou_threshold=0.3)
    assert found.passed, found.unmatched[:5]
    return found.matched


def _picture(rng, h, w):
    return fx.image_array(rng, h, w)


def test_the_scale_rule():
    scales = kseg.get_spec("faster_rcnn_vgg16").test_scales
    assert scale_rule(scales, "paper") == (600, 1000)  # py-faster-rcnn TEST.SCALES
    assert scale_rule(scales, "torchvision") == (800, 1333)  # GeneralizedRCNNTransform
    assert scale_rule(scales, identify("faster_rcnn_vgg16").options.get("layout")) == (600, 1000)  # the default
    assert scale_rule(kseg.get_spec("ssd300").test_scales, None) is None
    assert resolve_scale(scales, "torchvision", max_size=1000) == (800, 1000)
    with pytest.raises(ValueError, match="min_size and max_size"):
        resolve_scale(None, None, min_size=96)
    with pytest.raises(ValueError, match="positive"):
        resolve_scale(scales, None, min_size=0)
    for (h, w), (scale, size) in EXPECTED.items():
        got_scale, got_size = rescale(h, w, 96, 160)
        assert got_size == size and got_scale == pytest.approx(scale, rel=1e-12)
        resized, tf_scale = tf_rescale(tf.zeros((2, h, w, 3)), 96, 160)  # the serving graph's: the same
        assert tuple(resized.shape) == (2, *size, 3) and float(tf_scale) == got_scale
    assert rescale(600, 800, 600, 1000) == (1.0, (600, 800))


def test_predict_gives_boxes_in_each_images_pixels(frcnn, tmp_path, capsys):
    model, path = frcnn
    assert network_size(model) is None and detection_scale(model) == (600, 1000)  # no refusal: any size
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate(SIZES[:2]):  # two sizes and aspect ratios (the second capped by max_size)
        files.append(str(tmp_path / f"im{i}.png"))
        with open(files[-1], "wb") as f:
            f.write(encode_png(_picture(rng, h, w)))
    out = tmp_path / "pred"
    assert main(["predict", path, *files, "--out", str(out), "--score-threshold", "0", *SCALE]) == 0
    assert "detections scoring >= 0" in capsys.readouterr().out
    with open(out / "detections.json") as f:
        entries = json.load(f)
    matched = 0
    for entry, (h, w) in zip(entries, SIZES):
        assert entry["size"] == [h, w]
        want = _direct(model, read_image(entry["file"]))
        dets = entry["detections"]
        assert len(dets) > 5
        got = detections_from_json(dets, want["detection_scores"].shape[1])
        matched += _sets_agree(want, got, box_atol=0.02)  # JSON: boxes rounded to 0.01, scores to 1e-5
        boxes = got["detection_boxes"][0][: len(dets)]
        assert boxes[:, 2].max() > EXPECTED[(h, w)][1][1] or boxes[:, 3].max() > EXPECTED[(h, w)][1][0]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        assert (out / f"{os.path.basename(entry['file'])[:-4]}.png").is_file()
    assert matched > 10
    # Options that do not fit: --size (an HxW resize) for an any-size detector, a bad scale.
    for extra, phrase in ((["--size", "96x96"], "--min-size / --max-size"), (["--min-size", "0"], "positive")):
        assert main(["predict", path, files[0], "--out", str(tmp_path / "x"), *extra]) == 2
        assert phrase in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_predict_at_the_layouts_own_scale(frcnn, tmp_path):
    """No --min-size / --max-size: py-faster-rcnn's 600 / 1000 (a 60x80 picture runs at 600x800)."""
    from kseg.inference import detect_images, load_inference_model

    model, path = frcnn
    with open(tmp_path / "small.png", "wb") as f:
        f.write(encode_png(_picture(np.random.default_rng(5), 60, 80)))
    (entry,) = detect_images(load_inference_model(path), [str(tmp_path / "small.png")], str(tmp_path / "out"),
                             score_threshold=0, progress=False)
    image = read_image(str(tmp_path / "small.png"))
    x = tf.image.resize(image[None].astype(np.float32), (600, 800), method="bilinear")
    want = {k: np.asarray(v) for k, v in kseg.inference_model(model)(identify(model).preprocessing.apply(x)).items()}
    want["detection_boxes"] = want["detection_boxes"] / 10.0
    dets = entry["detections"]
    got = detections_from_json(dets, want["detection_scores"].shape[1])
    assert len(dets) > 0 and _sets_agree(want, got, box_atol=0.02) == len(dets)


@pytest.fixture(scope="module")
def voc(frcnn, tmp_path_factory):
    """VOC2007 layout, split "test", three sizes: per image the oracle's two best detections (VOC's 1-based
    integer corners, in the original pixels), a sheep no detection finds and a difficult cow."""
    model, _ = frcnn
    voc = str(tmp_path_factory.mktemp("voc") / "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub))
    rng = np.random.default_rng(1)
    names = [f"{i + 1:06d}" for i in range(len(SIZES))]
    for name, (h, w) in zip(names, SIZES):
        fx.save_jpeg(os.path.join(voc, "JPEGImages", name + ".jpg"), _picture(rng, h, w))
    with open(os.path.join(voc, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    for name, (h, w) in zip(names, SIZES):
        found = _direct(model, read_image(os.path.join(voc, "JPEGImages", name + ".jpg")))
        objs = []
        for (x1, y1, x2, y2), cls in zip(found["detection_boxes"][0][:2], found["detection_classes"][0][:2]):
            xmin, ymin = int(round(x1)) + 1, int(round(y1)) + 1
            objs.append((VOC_CLASSES[cls], xmin, ymin, max(int(round(x2)), xmin), max(int(round(y2)), ymin), 0, 0))
        objs += [("sheep", 1, 1, w // 3, h // 3, 0, 0), ("cow", w // 2, h // 2, w, h, 1, 0)]
        with open(os.path.join(voc, "Annotations", name + ".xml"), "w") as f:
            f.write(fx.voc_xml(name + ".jpg", (h, w), objs))
    return voc


def test_evaluate_scores_in_the_original_pixels(frcnn, voc, tmp_path, capsys):
    model, path = frcnn
    out = str(tmp_path / "scores.json")
    assert main(["evaluate", path, "--data", voc, "--split", "test", "--json", out, *SCALE]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "AP@[.5:.95]" in printed
    with open(out) as f:
        scores = json.load(f)
    assert scores["images"] == scores["count"] == len(SIZES)
    rows = {r["name"]: r for r in scores["per_class"]}
    assert rows["sheep"]["gt"] == 3 and rows["sheep"]["ap_voc"] == 0.0
    assert 0 < scores["map_voc"] < 1 and 0 < scores["coco"]["ap50"] < 1
    # The oracle's detections against the ground truth in the original pixels (the reader at the files'
    # own size), scored by kseg.detection.eval_voc: the same APs.
    dets, gts = [], []
    for x, y in kd.voc_detection(voc, "test", batch_size=1):
        dets.append({k: v[0] for k, v in _direct(model, x[0].numpy()).items()})
        gts.append({k: np.asarray(y[k][0]) for k in ("boxes", "classes", "difficult")})
    for metric, key in ((True, "ap_voc07"), (False, "ap_voc")):
        direct = voc_eval(dets, gts, 21, use_07_metric=metric, plus_one=False)
        assert scores[f"map_{key[3:]}"] == pytest.approx(direct["map"], abs=1e-6)
        assert [r["detections"] for r in scores["per_class"]] == direct["detections"][1:]
    # A fixed-input detector keeps its network size: a test scale means nothing to it.
    fixed = kseg.build_model("faster_rcnn_vgg16", width=0.125, post_nms_top_n=16, input_shape=(64, 64, 3))
    fixed_path = str(tmp_path / "fixed.keras")
    fixed.save(fixed_path)
    assert main(["evaluate", fixed_path, "--data", voc, "--split", "test", *SCALE]) == 2
    assert "detects on 64x64 images" in capsys.readouterr().err


def _od_api(found, image_hw):
    """The oracle's detections (original pixels) as the Object Detection API reports them."""
    h, w = image_hw
    x1, y1, x2, y2 = np.moveaxis(found["detection_boxes"], -1, 0)
    return {"detection_boxes": np.stack([y1 / h, x1 / w, y2 / h, x2 / w], -1),
            "detection_scores": found["detection_scores"], "num_detections": found["num_detections"],
            "detection_classes": np.maximum(found["detection_classes"], 0).astype(np.float32)}


# kseg export --serving's any-size module: the default suite compares it with kseg convert's
# (tests/test_convert_serving_anysize.py).
@pytest.mark.slow
def test_serving_export_runs_any_size(frcnn, tmp_path, capsys):
    model, path = frcnn
    base = tmp_path / "models" / "frcnn"
    assert main(["export", path, "--serving", str(base), *SCALE]) == 0  # verified before it is renamed into place
    assert "predict_images" in capsys.readouterr().out
    version = str(base / "1")
    with open(os.path.join(version, "assets", "kseg.json")) as f:
        assert json.load(f)["serving"]["eval_transform"] == [96, 160, "bilinear"]
    loaded = tf.saved_model.load(version)
    assert loaded.signatures["serving_default"].structured_input_signature[1]["images"].shape.as_list() == \
        [None, None, None, 3]
    rng = np.random.default_rng(2)
    pictures = [_picture(rng, *SIZES[0]), _picture(rng, *SIZES[0]), _picture(rng, *SIZES[1])]
    matched = 0
    # serving_default: a batch of one size, then another size.
    for batch in (np.stack(pictures[:2]), pictures[2][None]):
        got = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(batch, tf.float32))
               .items()}
        for i, picture in enumerate(batch):
            want = _od_api(_direct(model, picture), picture.shape[:2])
            matched += _sets_agree({k: v[:1] for k, v in want.items()}, {k: v[i:i + 1] for k, v in got.items()},
                                   box_atol=1e-4)
        assert got["detection_boxes"].min() >= 0 and got["detection_boxes"].max() <= 1
    # predict_images: two encoded images of different sizes in one request, each at its own scale.
    data = tf.constant([encode_png(pictures[0]), encode_png(pictures[2])])
    got = {k: v.numpy() for k, v in loaded.signatures["predict_images"](image_bytes=data).items()}
    assert got["image_size"].tolist() == [list(SIZES[0]), list(SIZES[1])]
    for i, picture in enumerate((pictures[0], pictures[2])):
        want = _od_api(_direct(model, picture), picture.shape[:2])
        matched += _sets_agree({k: v[:1] for k, v in want.items()}, {k: v[i:i + 1] for k, v in got.items()},
                               box_atol=1e-4)
    assert matched > 20
    # image_size has no meaning here; min_size / max_size none for a model that is not an any-size detector.
    with pytest.raises(ValueError, match="any size"):
        export(model, str(tmp_path / "other"), image_size=(64, 64))
    assert main(["export", path, "--serving", str(tmp_path / "other"), "--image-size", "64x64"]) == 2
    assert "--min-size / --max-size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a classification model"):
        export(kseg.build_model("lenet5"), str(tmp_path / "lenet"), min_size=96)
    assert not (tmp_path / "other").exists() and not (tmp_path / "lenet").exists()
