"""FSDS and the skeleton task: side outputs and fusion, scale quantisation, the loss, SK-LARGE's layout,
the synthetic skeletons, the skeleton F-measure, training, `kseg predict` and the serving signature."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy.io import savemat

import kseg
from kseg.data.layouts import list_source
from kseg.data.skeleton import medial_axis, read_ground_truth, sk_large
from kseg.data.synth import make_synthetic
from kseg.models.fsds import OUTPUT_NAMES, SIDES, fusion_sources
from kseg.tasks import get_task
from kseg.tasks.skeleton import ScaleBalancedCrossEntropy, quantize_scales, skeleton_f_measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRIDES = [s for _, s, _ in SIDES]
CLASSES = [c for _, _, c in SIDES]
TASK = get_task("skeleton")


@pytest.fixture(scope="module")
def model():
    return kseg.build_model("fsds")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_skeletons"))
    info = make_synthetic(root, seed=3, train=3, val=2, size=(64, 80), task="skeleton")
    return root, info


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# === the model ===


def test_registry_facts_and_parameter_count(model):
    spec = kseg.get_spec("fsds")
    assert (spec.task, spec.num_classes, spec.preprocessing.kind, spec.backbone) == ("skeleton", 5, "caffe", "vgg16")
    assert spec.task_object is TASK
    # VGG16 conv trunk + 4 side convs (C_in + 1 per class) + 5 fusion convs (one weight per side + bias) are
    # trained; the bilinear deconvolutions (kernel 2s, classes x classes) are frozen.
    side = sum((c_in + 1) * c for c_in, c in zip((128, 256, 512, 512), CLASSES))
    fusion = sum(len(sources) + 1 for sources in fusion_sources().values())
    deconv = sum((2 * s) ** 2 * c * c for s, c in zip(STRIDES, CLASSES))
    assert (side, fusion, deconv) == (5_646, 19, 30_336)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == 14_714_688 + side + fusion == 14_720_353
    assert model.count_params() == trainable + deconv == 14_750_689 == spec.params


def test_outputs_at_input_size_with_the_classes_each_side_can_see(model, rng):
    assert model.output_names == list(OUTPUT_NAMES) == ["dsn2", "dsn3", "dsn4", "dsn5", "fuse"]
    ys = model.predict(rng.uniform(0, 255, (1, 37, 51, 3)).astype("float32"), verbose=0)
    assert [y.shape for y in ys] == [(1, 37, 51, c) for c in (2, 3, 4, 5, 5)]
    assert TASK.head(model.output_names).output_index == 4


def test_fusion_weighs_each_class_over_the_sides_that_predict_it(model, rng):
    assert fusion_sources() == {0: ["dsn2", "dsn3", "dsn4", "dsn5"], 1: ["dsn2", "dsn3", "dsn4", "dsn5"],
                                2: ["dsn3", "dsn4", "dsn5"], 3: ["dsn4", "dsn5"], 4: ["dsn5"]}
    view = model  # its fusion weights are put back at the end
    saved = {k: view.get_layer(f"cat{k}_score").get_weights() for k in range(5)}
    try:
        for k, sources in fusion_sources().items():
            kernel, bias = saved[k]
            assert kernel.shape == (1, 1, len(sources), 1) and bias.tolist() == [0.0]
            np.testing.assert_allclose(kernel, 1.0 / len(sources))  # starts as the mean of its sides
            view.get_layer(f"cat{k}_score").set_weights([rng.normal(size=kernel.shape).astype("float32"),
                                                         np.array([0.5 * k], "float32")])
        ys = dict(zip(OUTPUT_NAMES, view.predict(rng.uniform(0, 255, (1, 29, 35, 3)).astype("float32"),
                                                 verbose=0)))
        for k, sources in fusion_sources().items():
            w, b = view.get_layer(f"cat{k}_score").get_weights()
            want = sum(w[0, 0, i, 0] * ys[s][..., k] for i, s in enumerate(sources)) + b[0]
            np.testing.assert_allclose(ys["fuse"][..., k], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    finally:
        for k, weights in saved.items():
            view.get_layer(f"cat{k}_score").set_weights(weights)


def test_side_outputs_are_aligned_with_the_input():
    # Centre-tap identity kernels pass channel 0 of the image through the trunk unchanged (ReLU and
    # max-pool keep a non-negative block); every class of every side reads that channel. A 16x16 block
    # aligned with the stride-16 grid must come back centred where it is, in every output (HED's test).
    m = kseg.build_model("fsds")
    for layer in m.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.Conv2DTranspose):
            if layer.name.startswith("cat"):
                continue
            kernel, bias = (np.zeros_like(w) for w in layer.get_weights())
            kernel[kernel.shape[0] // 2, kernel.shape[1] // 2, 0, 0 if kernel.shape[0] == 3 else slice(None)] = 1.0
            layer.set_weights([kernel, bias])
    x = np.zeros((1, 101, 133, 3), "float32")
    top, left = 32, 64
    x[0, top: top + 16, left: left + 16, 0] = 1.0
    ys = m.predict(x, verbose=0)
    centre = np.array([top + 7.5, left + 7.5])
    grid = np.stack(np.meshgrid(np.arange(101), np.arange(133), indexing="ij"), -1)
    for name, y in zip(OUTPUT_NAMES, ys):
        for c in range(y.shape[-1]):
            w = y[0, :, :, c]
            assert w.min() >= 0 and w.max() > 0
            com = (grid * w[..., None]).sum((0, 1)) / w.sum()
            np.testing.assert_allclose(com, centre, atol=1e-3, err_msg=f"{name}[{c}] is not aligned with the input")


def test_upsampling_frozen_and_num_classes_fixed(model):
    assert {v.path.split("/")[0] for v in model.non_trainable_weights} == {f"upsample_{s}" for s in STRIDES}
    with pytest.raises(ValueError, match="num_classes must be 5"):
        kseg.build_model("fsds", num_classes=2)


# === scales, targets and the loss ===


def test_scale_quantisation_by_the_receptive_fields():
    # The paper's scale is the diameter, 2 x radius; class = the first side i with r_i > 1.2 x scale,
    # r = 14, 40, 92, 196; radii no field covers get the last class; 0 is background.
    radius = np.array([0, 1, 5.8, 5.9, 16.6, 16.7, 38.3, 38.4, 81.6, 81.7, 300])
    want = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    np.testing.assert_array_equal(quantize_scales(radius).numpy(), want)
    r = np.random.default_rng(0).uniform(0, 100, 500)
    brute = [next((i + 1 for i, f in enumerate((14, 40, 92, 196)) if f > 1.2 * 2 * v), 4) for v in r]
    np.testing.assert_array_equal(quantize_scales(r).numpy(), brute)
    # Every output trains on the same quantised map (the loss folds the classes it lacks into background).
    targets = TASK.fit_targets(tf.constant(radius.reshape(1, 1, -1, 1), tf.float32), 5)
    assert len(targets) == 5 and all(np.array_equal(t.numpy()[0, 0, :, 0], want) for t in targets)


def _numpy_loss(labels, logits, balance, normalize):
    c = logits.shape[-1]
    labels = np.where(labels < c, labels, 0)
    logp = np.log(_softmax(logits.astype(np.float64)))
    out = []
    for y, lp in zip(labels, logp):
        counts = np.bincount(y.ravel(), minlength=c).astype(float)
        if balance == "paper":
            inverse = np.array([1 / n if n else 0.0 for n in counts])
            beta = inverse / inverse.sum()
        elif balance == "caffe":
            beta = np.array([counts[1:].sum()] + [counts[0]] * (c - 1)) / counts.sum()
        else:
            beta = np.ones(c)
        total = sum(-beta[y[i, j]] * lp[i, j, y[i, j]] for i in range(y.shape[0]) for j in range(y.shape[1]))
        out.append(total / y.size if normalize else total)
    return np.mean(out)


@pytest.mark.parametrize("balance, normalize", [("paper", False), ("caffe", False), (None, True)])
@pytest.mark.parametrize("channels", [2, 5])
def test_loss_equals_numpy(balance, normalize, channels):
    rng = np.random.default_rng(channels)
    labels = rng.choice(5, size=(2, 6, 7), p=[0.6, 0.1, 0.1, 0.1, 0.1])
    logits = rng.normal(0, 2, size=(2, 6, 7, channels)).astype("float32")
    got = ScaleBalancedCrossEntropy(balance=balance, normalize=normalize)(labels[..., None], logits)
    assert float(got) == pytest.approx(_numpy_loss(labels, logits, balance, normalize), rel=1e-5)


def test_task_loss_is_one_per_output_and_serialisable():
    losses = TASK.loss()
    assert len(losses) == 5 and all(isinstance(loss, ScaleBalancedCrossEntropy) for loss in losses)
    again = keras.losses.deserialize(keras.losses.serialize(ScaleBalancedCrossEntropy(balance="caffe")))
    assert (type(again), again.balance) == (ScaleBalancedCrossEntropy, "caffe")
    with pytest.raises(ValueError, match="balance must be one of"):
        ScaleBalancedCrossEntropy(balance="median")


# === SK-LARGE's layout and the synthetic skeletons ===


def _write_sk_fixture(root):
    """Two images in SK-LARGE's layout: a 20x24 rectangle object (boundary and centre line) and an
    image without ground truth; plus a test split whose .mat lacks `edge`."""
    for sub in ("images/train", "groundTruth/train", "images/test", "groundTruth/test"):
        os.makedirs(os.path.join(root, sub))
    edge = np.zeros((20, 24))  # MATLAB doubles
    edge[4, 4:20] = edge[15, 4:20] = edge[4:16, 4] = edge[4:16, 19] = 1
    skeleton = np.zeros((20, 24), bool)  # MATLAB logical
    skeleton[9, 9:15] = skeleton[10, 9:15] = True
    skeleton[4, 4] = True  # on the boundary: scale 1 (the authors' rule)
    yy, xx = np.mgrid[0:20, 0:24]
    image = np.stack([10 * yy, 10 * xx, 200 - 5 * (xx + yy)], -1).astype(np.uint8)  # smooth: JPEG keeps it
    Image.fromarray(image).save(os.path.join(root, "images/train/2008_000001.jpg"), quality=95)
    savemat(os.path.join(root, "groundTruth/train/2008_000001.mat"), {"edge": edge, "symmetry": skeleton})
    Image.fromarray(image).save(os.path.join(root, "images/test/x.jpg"))
    savemat(os.path.join(root, "groundTruth/test/x.mat"), {"symmetry": skeleton})
    return image, edge > 0, skeleton


def test_reader_gives_each_skeleton_pixel_its_distance_to_the_boundary(tmp_path):
    root = str(tmp_path)
    image, edge, skeleton = _write_sk_fixture(root)
    (x, y), = list(sk_large(root, "train"))
    assert x.shape == (20, 24, 3) and y.shape == (20, 24, 1) and x.dtype == y.dtype == tf.float32
    ey, ex = np.nonzero(edge)
    want = np.zeros((20, 24))
    for i, j in zip(*np.nonzero(skeleton)):
        want[i, j] = max(1.0, np.hypot(ey - i, ex - j).min())  # bwdist(edge), at least 1 on the skeleton
    np.testing.assert_allclose(y.numpy()[..., 0], want, rtol=1e-6)
    assert y.numpy()[9, 9, 0] == 5.0 and y.numpy()[4, 4, 0] == 1.0
    assert np.abs(x.numpy() - image).mean() < 3  # the JPEG, RGB 0..255
    source = list_source("skeleton", root)
    assert [os.path.basename(p) for p in source.labels] == ["2008_000001.mat"]
    # Batched and preprocessed like the other readers.
    xb, _ = next(iter(sk_large(root, batch_size=1, preprocessing="caffe")))
    np.testing.assert_allclose(xb.numpy()[0], kseg.get_spec("fsds").preprocessing.apply(x.numpy()), atol=1e-4)
    with pytest.raises(ValueError, match="no `edge` array"):
        read_ground_truth(os.path.join(root, "groundTruth/test/x.mat"))
    os.remove(os.path.join(root, "groundTruth/train/2008_000001.mat"))
    with pytest.raises(FileNotFoundError, match="2008_000001.jpg: image has no groundTruth"):
        sk_large(root, "train")


def _distance_to_segments(points, segments):
    p = np.asarray(points, float)[:, None, :]
    a, b = (np.asarray([s[i] for s in segments], float)[None] for i in (0, 1))
    t = np.clip(((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * (b - a)), axis=-1).min(axis=1)


def test_medial_axis_of_a_rectangle_and_a_disk():
    mask = np.zeros((40, 80), bool)
    mask[10:30, 10:70] = True  # pixel centres 10..29 x 10..69: boundary half a pixel further out
    skeleton, distance = medial_axis(mask)
    lo, hi, mid = (9.5, 9.5), (29.5, 69.5), 19.5
    axis = [((mid, lo[1] + 10), (mid, hi[1] - 10)), ((mid, lo[1] + 10), lo), ((mid, lo[1] + 10), (hi[0], lo[1])),
            ((mid, hi[1] - 10), (lo[0], hi[1])), ((mid, hi[1] - 10), hi)]
    points = np.argwhere(skeleton)
    assert _distance_to_segments(points, axis).max() <= 1.0  # on the medial axis
    assert set(points[np.abs(points[:, 0] - mid) <= 0.5, 1]) >= set(range(20, 60))  # the centre line, whole
    assert distance[19, 40] == 10.0 and distance[10, 40] == 1.0
    yy, xx = np.mgrid[0:60, 0:60]
    disk = np.hypot(yy - 30.3, xx - 28.6) <= 17.5
    centre = np.argwhere(medial_axis(disk)[0])
    assert len(centre) and np.hypot(centre[:, 0] - 30.3, centre[:, 1] - 28.6).max() <= 1.5


def test_synthetic_skeletons_in_the_sk_large_layout(synthetic):
    from scipy.ndimage import distance_transform_edt

    root, info = synthetic
    assert info["splits"] == {"train": 3, "val": 2} and info["skeleton_pixels"] > 0
    assert sorted(os.listdir(os.path.join(root, "groundTruth", "val"))) == ["synth_00003.mat", "synth_00004.mat"]
    from kseg.data.synth import render

    for i, (x, y) in enumerate(sk_large(root, "train")):
        radius = y.numpy()[..., 0]
        skeleton, edge = read_ground_truth(os.path.join(root, "groundTruth", "train", f"synth_{i:05d}.mat"))
        np.testing.assert_array_equal(radius > 0, skeleton)
        assert edge.any() and not (skeleton & ~(render(3, i, (64, 80), 0)[1] > 0)).any()  # inside the shapes
        # Each skeleton point's scale is its distance to the shape's boundary (its contour), within the
        # contour's pixel of the distance to the outside.
        _, label = render(3, i, (64, 80), 0)
        for j, k in np.argwhere(skeleton):
            outside = distance_transform_edt(np.pad(label == label[j, k], 1))[j + 1, k + 1]
            assert outside - 1.5 <= radius[j, k] <= outside


# === the F-measure ===


def test_f_measure_hand_computed():
    from kseg.tasks.bsds import edge_ods_ois, thin

    gt = np.zeros((40, 40), bool)
    gt[2, 5:25] = True  # 20 pixels, two rows from the border
    pred = np.zeros((40, 40))
    pred[1:4, 5:25] = 0.3  # a 3-pixel-wide band, max-normalised to 1
    pred[[20, 22, 24, 26, 28], 30] = 0.2  # 5 isolated false positives at 2/3 of the maximum
    band = thin(pred >= 0.15)
    assert band[2, 6:24].all() and band[:10].sum() == 18  # bwmorph 'thin': the middle row less its two ends
    scores = skeleton_f_measure([pred], [gt], thresholds=[0.5], tolerance_px=1.5)
    # 18 of the 23 thinned pixels match (one to one), 18 of the 20 true ones are found.
    p, r = 18 / 23, 18 / 20
    assert (scores["ods_precision"], scores["ods_recall"]) == pytest.approx((p, r))
    assert scores["f"] == scores["ods"] == pytest.approx(2 * p * r / (p + r))
    # The BSDS protocol on the max-normalised map, without its edge NMS (which would keep the band's whole row).
    bsds = {nms: edge_ods_ois([pred / 0.3], [gt], [0.5], tolerance_px=1.5, nms=nms)["ods"] for nms in (False, True)}
    assert bsds[False] == scores["f"] and bsds[True] == pytest.approx(2 * 0.8 / 1.8)
    # The default protocol (100 thresholds, 0.0075 of the diagonal: exact positions here).
    assert skeleton_f_measure([0.4 * gt], [gt])["f"] == pytest.approx(1.0)
    assert skeleton_f_measure([pred], [gt])["f"] == pytest.approx(2 * 0.9 / 1.9)  # above 2/3: P = 1, R = 0.9


# === training, prediction and serving ===


def test_a_few_fit_steps_lower_the_loss(synthetic):
    keras.utils.set_random_seed(0)
    root, _ = synthetic
    x, y = next(iter(sk_large(root, "train", batch_size=2, preprocessing="fsds")))
    m = kseg.build_model("fsds", input_shape=(64, 80, 3))
    for layer in m.layers:  # the VGG trunk frozen, to keep it quick: the targets, losses and heads are tested
        layer.trainable = not layer.name.startswith("block")
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss=TASK.loss())
    data = tf.data.Dataset.from_tensors((x, TASK.fit_targets(y, 5))).repeat()
    history = m.fit(data, epochs=4, steps_per_epoch=1, verbose=0, shuffle=False).history
    assert set(f"{n}_loss" for n in OUTPUT_NAMES) <= set(history)
    assert all(b < a for a, b in zip(history["loss"], history["loss"][1:]))
    assert history["loss"][-1] < 0.85 * history["loss"][0]


def test_evaluate_scores_the_fused_skeleton_map(synthetic):
    from kseg.inference import evaluate

    root, _ = synthetic
    m = kseg.build_model("fsds", input_shape=(None, None, 3))
    scores = evaluate(m, sk_large(root, "val", batch_size=1), preprocessing="fsds", progress=False)
    assert scores["images"] == 2 and scores["output"] == "fuse" and 0 <= scores["f"] == scores["ods"] <= 1


def test_kseg_predict_writes_skeleton_maps(synthetic, model, tmp_path):
    root, _ = synthetic
    path = tmp_path / "fsds.keras"
    model.save(path)
    images = [os.path.join(root, "images", "val", n) for n in ("synth_00003.jpg", "synth_00004.jpg")]
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "kseg.cli", "predict", str(path), *images, "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    prep = kseg.get_spec("fsds").preprocessing
    for image_path in images:
        image = np.asarray(Image.open(image_path), np.float32)
        fuse = np.asarray(model(prep.apply(image[None]))[-1])[0]
        png = np.asarray(Image.open(tmp_path / "out" / (os.path.basename(image_path)[:-4] + ".png")))
        assert png.shape == (64, 80) and png.dtype == np.uint8
        assert np.abs(png.astype(float) - 255 * (1 - _softmax(fuse)[..., 0])).max() <= 1.0


def test_skeleton_images_signature_of_a_fixed_size_model():
    from convert.tf_serving import build_module, encode_png

    keras.utils.set_random_seed(3)
    m = kseg.build_model("fsds", input_shape=(32, 32, 3))
    module, meta = build_module(m)
    assert "skeleton_images" in meta["serving"]["signatures"]
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype(np.uint8)
    out = module.kseg_signatures["skeleton_images"](tf.constant([encode_png(image)]))
    x = tf.image.resize(image[None].astype("float32"), (32, 32), method="bilinear")
    fuse = tf.image.resize(m(kseg.get_spec("fsds").preprocessing.apply(x))[-1], (40, 48), method="bilinear")
    want = 255 * (1 - _softmax(np.asarray(fuse[0]))[..., 0])
    got = tf.io.decode_png(out["skeleton_png_bytes"][0]).numpy()[..., 0].astype(float)
    assert got.shape == (40, 48) and out["image_size"].numpy().tolist() == [[40, 48]]
    assert np.abs(got - want).max() <= 1.0
