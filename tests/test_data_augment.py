"""Paired augmentation: label values survive, image and label move together, seeds reproduce."""

import data_fixtures as fx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import kseg.data as kd
from kseg.data.augment import apply_affine, color_jitter
from kseg.data.pipeline import preprocessing_affine
from kseg.registry import PREPROCESSING, Preprocessing

NO_JITTER = dict(brightness=0, contrast=0, saturation=0, hue=0)
VALUES = {0, 3, 7, 15, 255}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return fx.write_voc(tmp_path_factory.mktemp("voc"))


@pytest.mark.parametrize("augment", [
    kd.SegmentationAugment(crop=64),  # larger than every image: padding
    kd.SegmentationAugment(scale=(0.5, 2.0), crop=24),
    kd.SegmentationAugment(scale=(0.3, 3.0), crop=None, flip=True),
], ids=["pad", "scale-crop", "scale-only"])
def test_labels_keep_only_their_own_values_and_255(voc, augment):
    ds = kd.voc(voc["root"], "trainval", augment=augment, seed=1)
    seen = set()
    for _ in range(2):
        for image, label in ds:
            values = set(np.unique(label.numpy()).tolist())
            assert values <= VALUES, values
            seen |= values
            assert image.dtype == tf.float32 and 0 <= image.numpy().min() and image.numpy().max() <= 255
            if augment.crop:
                assert image.shape == (*augment.crop, 3) and label.shape == (*augment.crop, 1)
    assert len(seen) >= 4  # the classes do come through


def test_padding_uses_ignore_for_labels_and_the_mean_for_images(voc):
    augment = kd.SegmentationAugment(scale=None, crop=64, flip=False, **NO_JITTER)
    image, label = next(iter(kd.voc(voc["root"], "train", augment=augment, shuffle=False, seed=0)))
    # 40x56 image, no scale: rows >= 40 and columns >= 56 are padding
    assert np.all(label.numpy()[40:] == 255) and np.all(label.numpy()[:, 56:] == 255)
    assert np.allclose(image.numpy()[40:], kd.augment.IMAGENET_MEAN_RGB, atol=1e-3)
    _, label = next(iter(kd.edges(fx.write_edges(voc["root"] + "_edges")["list"], augment=augment)))
    assert np.all(label.numpy()[40:] == 0)  # edge maps pad with "no edge", not 255


def test_flip_flips_image_and_label_together_pixel_exactly(voc):
    originals = [(x.numpy(), y.numpy()) for x, y in kd.voc(voc["root"], "trainval")]
    augment = kd.SegmentationAugment(scale=None, crop=None, flip=True, **NO_JITTER)
    ds = kd.voc(voc["root"], "trainval", augment=augment, shuffle=False, seed=3)
    outcomes = []
    for _ in range(3):
        for (x0, y0), (x, y) in zip(originals, ds):
            x, y = x.numpy(), y.numpy()
            if np.array_equal(y, y0):
                assert np.array_equal(x, x0)
                outcomes.append("same")
            else:
                assert np.array_equal(y, y0[:, ::-1]) and np.array_equal(x, x0[:, ::-1])
                outcomes.append("flipped")
    assert set(outcomes) == {"same", "flipped"}


def test_scale_crop_flip_keep_image_and_label_aligned(tmp_path):
    # Lossless images whose colour encodes the class: after augmentation the colour inside a
    # region must still be its class colour.
    colours = np.array([[20, 200, 60], [200, 40, 40], [40, 60, 220], [230, 230, 30]], np.float32)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        label = fx.label_array(rng, 48 + 8 * i, 64, (0, 1, 2, 3))
        label[label == 255] = 0
        Image.fromarray(colours[label].astype(np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(label, "L").save(tmp_path / "masks" / f"{i}.png")
    augment = kd.SegmentationAugment(scale=(0.5, 2.0), crop=40, flip=True, **NO_JITTER)
    ds = kd.folder(tmp_path, num_classes=4, augment=augment, seed=0)
    checked = matched = 0
    for _ in range(4):
        for image, label in ds:
            y = label.numpy()[..., 0].astype(np.int64)
            x = image.numpy()
            padded = np.pad(y, 1, mode="edge")
            interior = np.ones_like(y, bool)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    interior &= padded[1 + dy: 1 + dy + y.shape[0], 1 + dx: 1 + dx + y.shape[1]] == y
            interior &= y != 255
            checked += interior.sum()
            matched += (np.abs(x - colours[np.minimum(y, 3)]).max(-1) <= 1.0)[interior].sum()
    assert checked > 1000 and matched / checked > 0.98


def test_a_seed_reproduces_order_and_augmentation_and_each_epoch_differs(voc):
    def run(seed):
        ds = kd.voc(voc["root"], "trainval", augment=kd.SegmentationAugment(crop=32), seed=seed)
        return [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(2)]

    a, b, c = run(5), run(5), run(6)
    for epoch_a, epoch_b in zip(a, b):
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not all(np.array_equal(x0, x1) for (x0, _), (x1, _) in zip(a[0], a[1]))
    assert not all(np.array_equal(x0, x1) for (x0, _), (x1, _) in zip(a[0], c[0]))


def test_color_jitter_keeps_gray_gray_and_stays_in_range():
    gray = tf.constant(np.tile(np.linspace(0, 255, 50, dtype=np.float32)[:, None, None], (1, 7, 3)))
    strong = kd.SegmentationAugment(brightness=0.3, contrast=0.5, saturation=0.9, hue=0.5)
    for i in range(5):
        out = color_jitter(gray, tf.constant([i, 7], tf.int64), strong).numpy()
        assert np.allclose(out[..., 0], out[..., 1], atol=1e-3) and np.allclose(out[..., 1], out[..., 2], atol=1e-3)
        assert out.min() >= 0 and out.max() <= 255
    colour = tf.constant(np.random.default_rng(0).uniform(0, 255, (9, 9, 3)).astype(np.float32))
    off = kd.SegmentationAugment(**NO_JITTER)
    assert np.array_equal(color_jitter(colour, tf.constant([1, 2], tf.int64), off).numpy(), colour.numpy())
    hue_only = kd.SegmentationAugment(**{**NO_JITTER, "hue": 0.25})
    shifted = color_jitter(colour, tf.constant([1, 2], tf.int64), hue_only).numpy()
    assert np.abs(shifted - colour.numpy()).mean() > 5  # hue moved the colours ...
    luma = np.array([0.299, 0.587, 0.114])
    assert np.allclose(np.clip(shifted, 0, 255) @ luma, colour.numpy() @ luma, atol=25)  # ... about the gray axis


def test_augment_settings_are_validated(voc):
    with pytest.raises(ValueError, match="scale"):
        kd.SegmentationAugment(scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop"):
        kd.SegmentationAugment(crop=(0, 10))
    with pytest.raises(ValueError, match="hue"):
        kd.SegmentationAugment(hue=0.7)
    with pytest.raises(ValueError, match="mix_prob is a probability"):
        kd.ClassificationAugment(mixup=0.2, cutmix=1.0, mix_prob=-0.1)
    with pytest.raises(ValueError, match="cutmix is a Beta"):
        kd.ClassificationAugment(cutmix=-1.0)
    with pytest.raises(TypeError, match="SegmentationAugment"):
        kd.voc(voc["root"], "train", augment=kd.ClassificationAugment())


@pytest.mark.parametrize("kind", sorted(PREPROCESSING))
def test_preprocessing_as_a_matrix_equals_the_registry_apply(kind):
    prep = PREPROCESSING[kind]
    images = np.random.default_rng(1).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    affine = preprocessing_affine(prep)
    out = apply_affine(tf.constant(images), affine).numpy()
    assert np.allclose(out, np.asarray(prep.apply(images)), atol=1e-4)
    # folded into the jitter: the same as jitter, clip, then apply()
    jitter = kd.SegmentationAugment(brightness=0.4, contrast=0.5, saturation=0.5, hue=0.2)
    seed = tf.constant([3, 4], tf.int64)
    folded = color_jitter(tf.constant(images[0]), seed, jitter, affine).numpy()
    reference = prep.apply(color_jitter(tf.constant(images[0]), seed, jitter).numpy())
    assert np.allclose(folded, reference, atol=1e-3)


def test_preprocessing_matrix_handles_gray_and_refuses_colour_means_on_gray():
    unit = preprocessing_affine(PREPROCESSING["unit"], channels=1)
    assert np.allclose(apply_affine(tf.constant([[[255.0]]]), unit).numpy(), 1.0)
    with pytest.raises(ValueError, match="RGB"):
        preprocessing_affine(PREPROCESSING["caffe"], channels=1)
    assert preprocessing_affine(Preprocessing("batchnorm")) is None
