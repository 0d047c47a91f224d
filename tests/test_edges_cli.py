"""Edge detection (HED) end to end from the command line, and the BSDS benchmark behind `kseg evaluate`.

Fixtures: 3 JPEGs of 40x48 with binary edge PNGs and the HED release's list file of
'image edge_map' lines (tests/data_fixtures.py write_edge_list); HED at any input size.
The benchmark (kseg.tasks.bsds) is checked piece by piece (NMS, thinning tables, an exact
matching against brute force) and as a whole against pyEdgeEval, an independent build of
the BSDS benchmark's C++ (correspondPixels, edgesNmsMex).
"""

import importlib.util
import json
import os
import re

import data_fixtures as fx
import keras
import numpy as np
import pytest
from PIL import Image

import kseg
from kseg.cli import main
from kseg.images import read_image
from kseg.tasks import bsds, get_task
from kseg.train import load_recipe
from kseg.train.fit import callbacks, checkpoint_monitor, datasets, edge_lists

TINY = ["--epochs", "1", "--set", "training.batch_size=1"]


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    return fx.write_edge_list(str(tmp_path_factory.mktemp("bsds")))


@pytest.fixture(scope="module")
def run(listed, tmp_path_factory):
    """`kseg train --recipe hed_bsds --data LIST` for one epoch of batch 1."""
    out = str(tmp_path_factory.mktemp("hed_run"))
    code = main(["train", "--recipe", "hed_bsds", "--data", listed["list"], "--out", out, *TINY])
    return code, out


# === kseg train ===


def test_train_runs_the_hed_recipe_and_keeps_the_lowest_val_loss(run):
    code, out = run
    assert code == 0
    assert {"best.keras", "final.keras", "log.csv", "kseg_run.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "log.csv")) as f:
        header = f.readline().strip().split(",")
    # One BalancedSigmoidCrossEntropy per output (dsn1..dsn5, fuse), summed into the loss.
    assert {"loss", "val_loss", "fuse_loss", "dsn1_loss", "val_fuse_loss"} <= set(header)
    recipe = load_recipe("hed_bsds")
    assert checkpoint_monitor(recipe) == "val_loss"
    best = next(c for c in callbacks(recipe, os.path.join(out, "cb"), tensorboard=False)
                if isinstance(c, keras.callbacks.ModelCheckpoint))
    assert (best.monitor, best.mode) == ("val_loss", "min")  # a loss is minimised
    seg = next(c for c in callbacks(load_recipe("synthetic_demo"), os.path.join(out, "cb2"), tensorboard=False)
               if isinstance(c, keras.callbacks.ModelCheckpoint))
    assert (seg.monitor, seg.mode) == ("val_mean_iou", "max")


def test_edge_datasets_and_where_the_lists_are(listed, tmp_path):
    recipe = load_recipe("hed_bsds", {"training.batch_size": 1})
    train, val = datasets(recipe, listed["list"])
    x, y = next(iter(train))
    assert x.shape == (1, 40, 48, 3) and y.shape == (1, 40, 48, 1) and set(np.unique(y)) == {0.0, 1.0}
    edges = get_task("edges")
    assert len(edges.fit_targets(y, 6)) == 6 and get_task("segmentation").fit_targets(y, 2) is y
    # A folder: the recipe's train_split inside it; the val list when present, else the training list.
    assert edge_lists(recipe.data, listed["root"]) == (listed["list"], listed["list"])
    with open(os.path.join(listed["root"], "test.lst"), "w") as f:
        f.write("images/0.jpg gt/0.png\n")
    try:
        assert edge_lists(recipe.data, listed["list"])[1] == os.path.join(listed["root"], "test.lst")
    finally:
        os.remove(os.path.join(listed["root"], "test.lst"))
    code = main(["train", "--recipe", "hed_bsds", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *TINY])
    assert code != 0


# === kseg evaluate ===


def test_evaluate_prints_ods_and_ois_and_json(run, listed, capsys):
    _, out = run
    model = os.path.join(out, "best.keras")
    assert main(["evaluate", model, "--data", listed["list"], "--layout", "edges"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"ODS\s.*\d\.\d{4}\s.*\d\.\d{3}", text) and re.search(r"OIS\s.*\d\.\d{4}", text)
    assert main(["evaluate", model, "--data", listed["root"], "--split", "train_pair", "--layout", "edges",
                 "--json", "--output", "fuse"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["images"] == 3 and scores["output"] == "fuse" and len(scores["ois_thresholds"]) == 3
    assert 0 <= scores["ods"] <= 1 and 0 < scores["ods_threshold"] < 1 and 0 <= scores["ois"] <= 1
    assert scores["ois"] >= scores["ods"] - 1e-9  # each image's best threshold is at least as good
    assert main(["evaluate", model, "--data", listed["list"], "--layout", "voc"]) != 0  # names --layout edges


# === kseg predict ===


@pytest.mark.parametrize("output", [None, "fuse"])
def test_predict_writes_the_sigmoid_of_the_outputs_as_grey_pngs(run, listed, tmp_path, output):
    _, out = run
    model_path = os.path.join(out, "best.keras")
    args = ["predict", model_path, *listed["images"][:2], "--out", str(tmp_path)]
    assert main(args + (["--output", output] if output else [])) == 0
    model = keras.saving.load_model(model_path, compile=False)
    prep = kseg.get_spec("hed").preprocessing
    for path in listed["images"][:2]:
        image = read_image(path).astype("float32")
        outs = [np.asarray(o)[0, ..., 0] for o in model(prep.apply(image[None]))]
        probs = [1 / (1 + np.exp(-o)) for o in outs]
        expected = probs[-1] if output == "fuse" else np.mean(probs, axis=0)  # HED section 4: fuse and sides
        png = np.asarray(Image.open(tmp_path / (os.path.basename(path)[:-4] + ".png")))
        assert png.shape == (40, 48) and png.dtype == np.uint8
        assert np.abs(png.astype(float) - 255 * expected).max() <= 1.0
    assert main(args) != 0  # existing outputs need --force


# === the BSDS benchmark ===


def test_nms_thins_a_blurred_line_to_its_ridge():
    h, w = 40, 60
    yy, xx = np.mgrid[0:h, 0:w]
    distance = (yy - 15 - 0.2 * xx) / np.hypot(1, 0.2)  # to a slightly tilted line
    edges = 0.9 * np.exp(-distance ** 2 / 8.0)  # 5-7 pixels wide
    thin = bsds.edge_nms(edges)
    inner, d = thin[5:-5, 5:-5], distance[5:-5, 5:-5]
    assert ((inner > 1e-3).sum(axis=0) == 1).all()  # one pixel per column survives: the one on the ridge
    assert np.abs(d[inner > 1e-3]).max() < 0.5
    assert thin[:, 0].max() == 0 and thin[:, 2].max() <= 0.9 * 2 / 5 + 1e-9  # the 5-pixel border ramp


def test_matching_is_one_to_one():
    gt = np.zeros((30, 30), bool)
    gt[15, 15] = True
    pred = np.zeros_like(gt)
    pred[15, 14:17] = True  # three predictions near one true pixel: one is correct
    matched_pred, matched_gt = bsds.match_edges(pred, gt, 2.0)
    assert matched_pred.sum() == 1 and matched_gt.sum() == 1
    scores = bsds.edge_ods_ois([pred * 0.9], [gt], tolerance_px=2, nms=False, thinning=False)
    assert scores["ods"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


def _brute_force_matching(pred, gt, radius):
    """The largest one-to-one matching by trying every assignment (memoised over the used set)."""
    import functools

    p, g = list(zip(*np.nonzero(pred))), list(zip(*np.nonzero(gt)))
    near = [[j for j, b in enumerate(g) if (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 <= radius ** 2] for a in p]

    @functools.lru_cache(maxsize=None)
    def best(i, used):
        if i == len(p):
            return 0
        options = [best(i + 1, used)]
        options += [1 + best(i + 1, used | (1 << j)) for j in near[i] if not used >> j & 1]
        return max(options)

    return best(0, 0)


def test_matching_is_a_maximum_matching_like_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(150):
        pred, gt = rng.uniform(size=(2, 5, 6)) > 0.65
        radius = float(rng.choice([1.0, 1.5, 2.3]))
        matched_pred, matched_gt = bsds.match_edges(pred, gt, radius)
        best = _brute_force_matching(pred, gt, radius)
        assert matched_pred.sum() == matched_gt.sum() == best
        assert not (matched_pred & ~pred).any() and not (matched_gt & ~gt).any()


def _pyedgeeval():
    pytest.importorskip("pyEdgeEval")
    import pyEdgeEval

    return os.path.dirname(pyEdgeEval.__file__)


def test_thinning_uses_bwmorphs_tables():
    # pyEdgeEval's copy of MATLAB bwmorph('thin')'s lookup tables (its module needs SciPy; read the text).
    with open(os.path.join(_pyedgeeval(), "preprocess", "thin", "bwmorph_thin.py")) as f:
        source = f.read()
    for name, ours in zip(("G123_LUT", "G123P_LUT"), bsds._LUTS):
        body = source.split(name + " = np.array([")[1].split("]")[0]
        assert np.array_equal(ours, np.array([int(v) for v in re.findall(r"\d", body)], bool)), name
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True
    assert bsds.thin(square).sum() == 1  # a filled square thins to its centre


def _edge_fixture(h, w, shift, noise, seed):
    """Ground truth: a horizontal and a vertical line and a ring; prediction: the ground truth moved by
    `shift` pixels, blurred (Gaussian profile), with multiplicative jitter and `noise` clutter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.abs(np.hypot(yy - 2 * h // 3, xx - w // 4) - min(h, w) / 6) < 0.5
    gt[h // 3, 8:w - 8] = True
    gt[8:h - 8, w // 2] = True
    moved = np.roll(gt, shift, axis=(0, 1))
    dist = np.full((h, w), 99.0)
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            dist = np.where(np.roll(moved, (dy, dx), axis=(0, 1)), np.minimum(dist, np.hypot(dy, dx)), dist)
    pred = np.exp(-dist ** 2 / 2.0) * rng.uniform(0.6, 1.0, (h, w))
    return np.clip(pred + noise * rng.uniform(size=(h, w)) ** 3, 0, 1), gt


# Measured on these fixtures (and on 4 images of 160x240): ODS and OIS agree within 0.003, and
# the matched counts per threshold within 4 pixels of ~500. kseg's exact maximum matching
# finds a few more pairs than correspondPixels, whose min-cost assignment runs on a sparse,
# randomly drawn outlier graph (its counts vary slightly from run to run); the thinning of
# pyEdgeEval's reference (py-bsds500's lookup table) differs from bwmorph's by a pixel or so.
TOLERANCE_F = 0.005
TOLERANCE_MATCHED = 0.02  # of the ground-truth pixels


def test_the_benchmark_agrees_with_pyedgeeval():
    root = _pyedgeeval()
    from pyEdgeEval._lib import correspond_pixels, nms
    from pyEdgeEval.common.metrics import compute_rec_prec_f1, interpolated_max_scores

    spec = importlib.util.spec_from_file_location("py_bsds500_thin", os.path.join(root, "preprocess", "thin",
                                                                                   "thin.py"))
    thin_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(thin_module)  # numpy only (the package's own __init__ wants SciPy and OpenCV)

    max_dist = 0.02  # 3.2 pixels on 96x128: the 1-3 pixel offsets below are within reach
    fixtures = [_edge_fixture(96, 128, s, n, i) for i, (s, n) in enumerate([((0, 0), 0.0), ((1, -1), 0.3),
                                                                             ((3, 2), 0.6)])]
    ts = bsds.thresholds_of(99)
    ours = bsds.edge_ods_ois([p for p, _ in fixtures], [g for _, g in fixtures], max_dist=max_dist)

    counts = []  # pyEdgeEval's evaluate_boundaries_threshold, step by step: NMS, >= t, thin, correspondPixels
    for pred, gt in fixtures:
        suppressed = nms(pred, bsds.edge_orientation(pred), r=1, s=5, m=1.01)
        c = np.zeros((4, len(ts)))
        for k, t in enumerate(ts):
            e = thin_module.binary_thin(suppressed >= t)
            m_pred, m_gt, _, _ = correspond_pixels(e, gt, max_dist=max_dist)
            c[:, k] = (m_gt > 0).sum(), gt.sum(), (m_pred > 0).sum(), e.sum()
        counts.append(c)
        mine = bsds.image_counts(pred, gt, ts, max_dist)
        assert np.abs(mine[:, 2] - c[0]).max() <= TOLERANCE_MATCHED * gt.sum()
        assert np.abs(mine[:, 0] - c[2]).max() <= TOLERANCE_MATCHED * gt.sum()
    total = np.sum(counts, axis=0)
    rec, prec, _ = compute_rec_prec_f1(*total)
    _, _, _, ods = interpolated_max_scores(ts, rec, prec)
    best = [int(np.argmax(compute_rec_prec_f1(*c)[2])) for c in counts]
    _, _, ois = compute_rec_prec_f1(*np.sum([c[:, k] for c, k in zip(counts, best)], axis=0))
    assert ours["ods"] == pytest.approx(ods, abs=TOLERANCE_F)
    assert ours["ois"] == pytest.approx(ois, abs=TOLERANCE_F)
    assert ours["ods"] > 0.9  # blurred, moved by up to 3 pixels: still matched within 3.2


def test_edge_ods_ois_protocol_on_simple_maps():
    gt = np.zeros((60, 80))
    gt[30, 10:70] = 1
    perfect = gt * 0.9
    assert bsds.edge_ods_ois([perfect], [gt])["ods"] == pytest.approx(1.0)
    blurred = np.exp(-((np.arange(60)[:, None] - 31) ** 2) / 4.0) * gt.any(axis=0)  # one pixel off, 5 thick
    r = bsds.edge_ods_ois([blurred], [gt], tolerance_px=1.5)
    assert r["ods"] == pytest.approx(1.0, abs=0.02)  # NMS keeps the ridge, within 1.5 pixels
    assert bsds.edge_ods_ois([blurred], [gt], tolerance_px=0.5)["ods"] < 0.05  # only the line ends meet


def test_edge_images_signature_of_a_fixed_size_model_resizes_the_logits_back():
    import tensorflow as tf

    from convert.tf_serving import build_module, encode_png

    keras.utils.set_random_seed(3)
    model = kseg.build_model("hed", input_shape=(32, 32, 3))
    module, meta = build_module(model)
    assert "edge_images" in meta["serving"]["signatures"]
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype(np.uint8)
    out = module.kseg_signatures["edge_images"](tf.constant([encode_png(image)]))
    x = tf.image.resize(image[None].astype("float32"), (32, 32), method="bilinear")
    logits = [tf.image.resize(o, (40, 48), method="bilinear")[0, ..., 0]
              for o in model(kseg.get_spec("hed").preprocessing.apply(x))]
    probs = [1 / (1 + np.exp(-np.asarray(o))) for o in logits]
    got = tf.io.decode_png(out["edge_png_bytes"][0]).numpy()[..., 0].astype(float)
    assert got.shape == (40, 48) and out["image_size"].numpy().tolist() == [[40, 48]]
    assert np.abs(got - 255 * np.mean(probs, axis=0)).max() <= 1.0


def test_train_starts_from_backbone_weights_or_says_it_trains_from_scratch(listed, tmp_path, capsys):
    from helpers import save_legacy_h5

    from kseg.models.vgg import VGG16_CONV_NAMES

    keras.utils.set_random_seed(7)
    source = keras.applications.VGG16(weights=None, include_top=False)  # keras.applications' notop layout
    path = str(tmp_path / "vgg16_notop.h5")
    save_legacy_h5(source, path)
    out = str(tmp_path / "run")
    args = ["train", "--recipe", "hed_bsds", "--data", listed["list"], "--out", out, *TINY, "--set",
            "optimizer.learning_rate=0.0"]
    assert main(args + ["--backbone-weights", path]) == 0
    assert "from scratch" not in capsys.readouterr().err
    trained = keras.saving.load_model(os.path.join(out, "final.keras"), compile=False)
    for name in VGG16_CONV_NAMES:  # learning rate 0: the trunk is still the backbone's
        for got, want in zip(trained.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    record = json.loads(open(os.path.join(out, "kseg_run.json")).read())
    assert record["backbone_weights"] == os.path.abspath(path)
    # Without them: told loudly, before anything else, that the paper's start is missing (the run then fails
    # here on its missing data; a run without weights trains as usual: test_train_runs_the_hed_recipe...).
    assert main(["train", "--recipe", "hed_bsds", "--data", str(tmp_path / "no-data.lst"), "--out",
                 str(tmp_path / "r2"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "warning: hed_bsds starts from an ImageNet-trained vgg16" in err and "--backbone-weights" in err
    # A missing file is named before anything is trained.
    assert main(args[:6] + [str(tmp_path / "r3"), *TINY, "--backbone-weights", str(tmp_path / "nope.h5")]) == 2
    assert "nope.h5: no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r3" / "final.keras")
