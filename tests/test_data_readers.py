"""Readers: each published layout -> (image, label) batches ready for model.fit, bad files loud."""

import ast
import os
import pathlib
import warnings

import data_fixtures as fx
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import kseg
import kseg.data as kd


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return fx.write_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def bad_voc(tmp_path_factory):
    data = fx.write_voc(tmp_path_factory.mktemp("badvoc"))
    data["expected"] = fx.plant_voc_problems(data["root"])
    return data


def _decoded(path):
    return tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_FAST").numpy()


def test_voc_reader_gives_file_exact_images_and_index_labels(voc):
    ds = kd.voc(voc["root"], "trainval")
    items = list(ds)
    assert len(items) == 4 and ds.num_classes == 21 and ds.class_names[15] == "person"
    for name, (image, label) in zip(voc["names"], items):
        assert image.dtype == tf.float32 and image.shape[-1] == 3
        assert label.dtype == tf.int32 and label.shape[-1] == 1
        expected = kd.read_label(os.path.join(voc["root"], "SegmentationClass", name + ".png"))
        assert np.array_equal(label.numpy()[..., 0], expected)
        assert np.array_equal(image.numpy(), _decoded(os.path.join(voc["root"], "JPEGImages", name + ".jpg")))


def test_grayscale_and_cmyk_jpegs_come_out_rgb(voc):
    images = [x.numpy() for x, _ in kd.voc(voc["root"], "trainval")]
    gray, cmyk = images[1], images[2]
    assert gray.shape[-1] == 3 and np.array_equal(gray[..., 0], gray[..., 2])
    reference = np.asarray(Image.open(os.path.join(voc["root"], "JPEGImages", voc["names"][2] + ".jpg")).convert("RGB"))
    assert np.abs(cmyk - reference.astype(np.float32)).mean() < 3


def test_sbd_reads_segmentation_class_aug_with_deeplab_style_lists(tmp_path):
    data = fx.write_voc(tmp_path, labels="SegmentationClassAug")
    lines = "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in data["names"])
    (tmp_path / "train_aug.txt").write_text(lines)
    ds = kd.sbd(data["root"], str(tmp_path / "train_aug.txt"))
    labels = [y.numpy() for _, y in ds]
    assert len(labels) == 4 and set(np.unique(labels[0])) == {0, 3, 7, 15, 255}


@pytest.mark.parametrize("border,classes,border_value", [("own", 3, 2), ("ignore", 2, 255), ("foreground", 2, 1)])
def test_pets_trimaps_map_to_classes_with_the_chosen_border(tmp_path, border, classes, border_value):
    data = fx.write_pets(tmp_path)
    ds = kd.pets(tmp_path, "trainval", border=border)
    assert ds.num_classes == classes
    items = list(ds)
    assert len(items) == 3  # trainval lists 3 of the 4
    trimap = np.asarray(Image.open(tmp_path / "annotations" / "trimaps" / (data["names"][0] + ".png")))
    label = items[0][1].numpy()[..., 0]
    assert np.all(label[trimap == 1] == 1) and np.all(label[trimap == 2] == 0)
    assert np.all(label[trimap == 3] == border_value)
    assert items[1][0].shape[-1] == 3  # the RGBA PNG named .jpg decodes to RGB


def test_edges_reader_gives_float_edge_strength(tmp_path):
    data = fx.write_edges(tmp_path)
    image, label = next(iter(kd.edges(data["list"])))
    assert label.dtype == tf.float32 and label.shape == (40, 48, 1)
    assert label.numpy()[10, 0, 0] == 1.0 and abs(label.numpy()[0, 20, 0] - 128 / 255) < 1e-6
    _, binary = next(iter(kd.edges(data["list"], threshold=0.6)))
    assert set(np.unique(binary.numpy())) == {0.0, 1.0} and binary.numpy()[0, 20, 0] == 0.0


def test_folder_matches_stems_and_refuses_orphans_unless_skipping(tmp_path):
    fx.write_folder(tmp_path)
    ds = kd.folder(tmp_path, num_classes=3)
    assert [y.shape for _, y in ds] == [(32, 32, 1)] * 3
    fx.save_jpeg(tmp_path / "images" / "orphan.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="orphan.jpg.*no mask"):
        kd.folder(tmp_path, num_classes=3)
    with pytest.warns(UserWarning, match="orphan.jpg"):
        ds = kd.folder(tmp_path, num_classes=3, skip_bad=True)
    assert len(list(ds)) == 3 and "orphan.jpg" in str(list(ds.skipped))


def test_folder_reads_colour_masks_only_with_an_explicit_palette(tmp_path):
    fx.write_folder(tmp_path)
    label = fx.label_array(np.random.default_rng(0), 32, 32, (0, 1, 2, 1))
    Image.fromarray(kd.colorize(label)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="a.png: colour"):
        list(kd.folder(tmp_path, num_classes=3))
    ds = kd.folder(tmp_path, num_classes=3, palette="voc")
    assert np.array_equal(next(iter(ds))[1].numpy()[..., 0], label)
    # a colour outside the palette's first 3 classes is an error, not a default class
    Image.fromarray(kd.colorize(np.full((32, 32), 9, np.uint8))).save(tmp_path / "masks" / "a.png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="a.png: colours not in the palette"):
        list(kd.folder(tmp_path, num_classes=3, palette="voc"))


def test_binary_masks_are_refused_unless_label_map_says_what_255_is(tmp_path):
    fx.write_folder(tmp_path)
    binary = np.where(fx.label_array(np.random.default_rng(0), 32, 32, (0, 1, 1, 1)) > 0, 255, 0).astype(np.uint8)
    Image.fromarray(binary, "L").save(tmp_path / "masks" / "a.png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="a.png: 0/255 binary mask"):
        list(kd.folder(tmp_path, num_classes=3))
    ds = kd.folder(tmp_path, num_classes=3, label_map={255: 1})
    assert set(np.unique(next(iter(ds))[1].numpy())) == {0, 1}


def test_bad_files_fail_the_reader_with_their_file_name(bad_voc, tmp_path):
    # One per stage: listing (missing), bytes (truncated), label decode (colour), pair (size),
    # values (out of range). test_skip_bad... and the checker cover every planted problem.
    stages = ("missing_label", "truncated_jpeg", "colour_mask", "size_mismatch", "out_of_range")
    for path, phrase in bad_voc["expected"].items():
        name = os.path.splitext(os.path.basename(path))[0]
        if name[len("bad_"):] not in stages:
            continue
        (tmp_path / "one.txt").write_text(name + "\n")
        with pytest.raises((tf.errors.InvalidArgumentError, FileNotFoundError)) as info:
            list(kd.voc(bad_voc["root"], str(tmp_path / "one.txt")))
        assert path in str(info.value) and phrase in str(info.value), (path, str(info.value)[:300])


def test_a_file_the_decoder_rejects_stops_the_reader_and_skip_bad_skips_it(bad_voc, tmp_path):
    # Complete files with a corrupt header pass the byte checks and fail inside libjpeg, whose
    # error names no file: the default pipeline stops with it (kseg.train names the file, see
    # test_train_fit); skip_bad pipelines guard the decoder and skip the file by name.
    (tmp_path / "one.txt").write_text("bad_corrupt_jpeg\n2007_000000\n")
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(kd.voc(bad_voc["root"], str(tmp_path / "one.txt")))
    log = kd.SkipLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = list(kd.voc(bad_voc["root"], str(tmp_path / "one.txt"), skip_bad=log))
    assert len(kept) == 1
    [(path, reason)] = list(log)
    assert path.endswith("bad_corrupt_jpeg.jpg") and "cannot be decoded" in reason


def test_skip_bad_skips_counts_and_warns_for_every_bad_file(bad_voc):
    log = kd.SkipLog()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = kd.voc(bad_voc["root"], "trainval", skip_bad=log)
        kept = list(ds)
    assert len(kept) == 4 and ds.skipped is log
    assert {p for p, _ in log} == set(bad_voc["expected"])
    for path, reason in log:
        assert bad_voc["expected"][path] in reason, (path, reason)
    assert sum("skipped bad file" in str(w.message) for w in caught) == len(bad_voc["expected"])


def test_preprocessing_comes_from_kind_model_name_or_spec(voc):
    raw = next(iter(kd.voc(voc["root"], "train")))[0].numpy()
    caffe = next(iter(kd.voc(voc["root"], "train", preprocessing="caffe")))[0].numpy()
    assert np.allclose(caffe, raw[..., ::-1] - np.array([103.939, 116.779, 123.68]), atol=1e-4)
    vgg = next(iter(kd.voc(voc["root"], "train", preprocessing="vgg16")))[0].numpy()
    assert np.array_equal(vgg, caffe)
    torch_spec = kseg.get_spec("vgg16").preprocessing_for("torchvision")
    torch = next(iter(kd.voc(voc["root"], "train", preprocessing=torch_spec)))[0].numpy()
    assert np.allclose(torch, (raw / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], atol=1e-5)
    with pytest.raises(ValueError, match="neither a kind"):
        kd.voc(voc["root"], "train", preprocessing="no_such_model")


def test_full_images_batch_only_when_padded_and_padding_is_ignored(voc):
    with pytest.raises(ValueError, match="pad_to"):
        kd.voc(voc["root"], "trainval", batch_size=2)
    images, labels = next(iter(kd.voc(voc["root"], "trainval", batch_size=4, pad_to=64, preprocessing="caffe")))
    assert images.shape == (4, 64, 64, 3) and labels.shape == (4, 64, 64, 1)
    # first image is 40x56: the pad is label 255 and the mean colour, i.e. 0 after Caffe preprocessing
    assert np.all(labels[0, 40:].numpy() == 255) and np.all(labels[0, :, 56:].numpy() == 255)
    assert np.abs(images[0, 40:].numpy()).max() < 1e-3
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than pad_to=32x32"):
        list(kd.voc(voc["root"], "trainval", pad_to=32))


def test_batches_train_a_keras_model_with_ignore_class_255(voc):
    ds = kd.voc(voc["root"], "trainval", augment=kd.SegmentationAugment(crop=32), batch_size=2,
                preprocessing="caffe", seed=0)
    images, labels = next(iter(ds))
    assert images.shape == (2, 32, 32, 3) and labels.shape == (2, 32, 32, 1)
    model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(21, 1)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255))
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)  # the dataset shuffles
    assert np.isfinite(history.history["loss"][0])


def test_cache_and_tfrecord_give_the_same_elements(voc, tmp_path):
    plain = [(x.numpy(), y.numpy()) for x, y in kd.voc(voc["root"], "trainval")]
    cached = kd.voc(voc["root"], "trainval", cache=True)
    for _ in range(2):  # second pass reads the cache
        assert all(np.array_equal(a[1], y.numpy()) for a, (_, y) in zip(plain, cached))
    shards = kd.write_tfrecord(str(tmp_path / "voc.tfrecord"), "voc", voc["root"], split="trainval", shards=2)
    assert len(shards) == 2
    from_records = sorted(((x.numpy(), y.numpy()) for x, y in kd.tfrecord(str(tmp_path / "voc.tfrecord"))),
                          key=lambda e: e[0].sum())
    for (x1, y1), (x2, y2) in zip(sorted(plain, key=lambda e: e[0].sum()), from_records):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_tfrecord_stores_bytes_keeps_validation_and_the_original_file_name(bad_voc, tmp_path):
    seg = os.path.join(bad_voc["root"], "SegmentationClass")
    (tmp_path / "list.txt").write_text("2007_000000\nbad_colour_mask\n")
    kd.write_tfrecord(str(tmp_path / "r.tfrecord"), "voc", bad_voc["root"], split=str(tmp_path / "list.txt"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="bad_colour_mask.png: colour"):
        list(kd.tfrecord(str(tmp_path / "r.tfrecord")))
    with pytest.warns(UserWarning, match="skipped bad file #1: .*bad_colour_mask.png"):
        assert len(list(kd.tfrecord(str(tmp_path / "r.tfrecord"), skip_bad=True))) == 1
    # the records hold the file bytes: damaging the source afterwards changes nothing
    good = os.path.join(seg, "2007_000000.png")
    with open(good, "rb") as f:
        original = f.read()
    try:
        fx.truncate(good)
        with pytest.warns(UserWarning, match="bad_colour_mask.png"):
            assert len(list(kd.tfrecord(str(tmp_path / "r.tfrecord"), skip_bad=True))) == 1
    finally:
        with open(good, "wb") as f:
            f.write(original)
    with pytest.raises(FileNotFoundError, match="bad_missing_label.png"):
        kd.write_tfrecord(str(tmp_path / "x.tfrecord"), "voc", bad_voc["root"], split="bad")


def test_a_failed_tfrecord_write_leaves_nothing(voc, tmp_path):
    from kseg.data.layouts import list_source
    from kseg.data.pipeline import write_tfrecord

    source = list_source("voc", voc["root"], split="trainval")
    # A label file that vanishes after listing: the write stops part-way.
    source.labels[-1] = str(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        write_tfrecord(source, str(tmp_path / "v.tfrecord"), shards=2, progress=False)
    assert os.listdir(tmp_path) == []


def test_classification_folder_labels_sorted_classes_and_converts_modes(tmp_path):
    fx.write_classes(tmp_path)
    ds = kd.classification_folder(tmp_path, image_size=(24, 24))
    items = [(x.numpy(), int(y)) for x, y in ds]
    assert ds.class_names == ["cat", "dog"] and [y for _, y in items] == [0, 0, 0, 1, 1]
    assert all(x.shape == (24, 24, 3) for x, _ in items)
    gray = items[1][0]
    assert np.allclose(gray[..., 0], gray[..., 1], atol=1e-3)  # grayscale JPEG -> RGB
    lenet = kd.classification_folder(tmp_path, preprocessing="lenet5", batch_size=5)
    images, labels = next(iter(lenet))
    assert images.shape == (5, 32, 32, 1) and float(images.numpy().max()) <= 1.0


def test_mixup_and_cutmix_give_soft_one_hot_labels(tmp_path):
    fx.write_classes(tmp_path)
    for augment in (kd.ClassificationAugment(mixup=0.4), kd.ClassificationAugment(cutmix=1.0, cutout=1.0)):
        ds = kd.classification_folder(tmp_path, image_size=16, augment=augment, batch_size=5, seed=0)
        images, labels = next(iter(ds))
        assert images.shape == (5, 16, 16, 3) and labels.shape == (5, 2)
        assert np.allclose(labels.numpy().sum(-1), 1.0, atol=1e-5)
    images, labels = next(iter(kd.classification_folder(tmp_path, image_size=16, batch_size=5, seed=0,
                                                        augment=kd.ClassificationAugment(cutout=1.0))))
    assert labels.dtype == tf.int32 and sorted(labels.numpy().tolist()) == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="batch_size"):
        kd.classification_folder(tmp_path, augment=kd.ClassificationAugment(mixup=0.2))


def test_mixup_cutmix_switch_and_mix_probabilities(tmp_path):
    fx.write_classes(tmp_path)  # 5 images, 2 classes
    plain = kd.ClassificationAugment(flip=False)

    def batch(**mix):
        augment = kd.ClassificationAugment(flip=False, **mix)
        ds = kd.classification_folder(tmp_path, image_size=16, augment=augment, batch_size=5, seed=3)
        images, labels = next(iter(ds))
        return images.numpy(), labels.numpy()

    originals, ids = next(iter(kd.classification_folder(tmp_path, image_size=16, augment=plain, batch_size=5,
                                                        seed=3)))
    originals, ids = originals.numpy(), ids.numpy()
    # mix_prob=0: never mixed, labels one-hot of the true classes.
    images, labels = batch(mixup=0.8, cutmix=1.0, mix_prob=0.0)
    assert np.array_equal(images, originals) and np.array_equal(labels.argmax(-1), ids)
    assert set(np.unique(labels)) == {0.0, 1.0}
    # switch_prob=1: always CutMix: every pixel is some image's pixel, not a blend.
    images, labels = batch(mixup=0.8, cutmix=1.0, switch_prob=1.0)
    pixels = originals.reshape(5, -1, 3)
    for img in images.reshape(5, -1, 3):
        nearest = np.abs(pixels - img[None]).max(-1).min(0)
        assert nearest.max() < 1e-3
    # switch_prob=0: always MixUp: blends, so some pixels are no image's pixel.
    images, labels = batch(mixup=0.8, cutmix=1.0, switch_prob=0.0)
    assert np.abs(pixels[:, None] - images.reshape(5, -1, 3)[None]).max(-1).min(0).max() > 1.0
    assert np.allclose(labels.sum(-1), 1.0, atol=1e-5) and (labels.max(-1) < 1).any()
    # Both: seeded, so reproducible run to run.
    augment = kd.ClassificationAugment(flip=False, mixup=0.8, cutmix=1.0)
    runs = [[b.numpy() for b, _ in kd.classification_folder(tmp_path, image_size=16, augment=augment, batch_size=2,
                                                             seed=5)] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    with pytest.raises(ValueError, match="switch_prob is a probability"):
        kd.ClassificationAugment(mixup=0.2, cutmix=1.0, switch_prob=1.5)


def test_listing_errors_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        kd.voc(tmp_path)
    with pytest.raises(FileNotFoundError, match="images/"):
        kd.pets(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        fx.write_folder(tmp_path / "f")
        kd.folder(tmp_path / "f")


def test_kseg_data_imports_no_network_training_or_cli_code():
    # A dataset knows no network: kseg.data may use kseg.registry, never models/train/cli.
    package = pathlib.Path(kd.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("kseg.models", "kseg.train", "kseg.cli")), (path.name, name)
