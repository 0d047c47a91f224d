"""RandAugment's ops against PIL's own (what torchvision's RandAugment runs on PIL images), its
draws and seeding; Random Erasing's draws, rectangles, fills and seeding."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from kseg.data import randaugment as ra
from kseg.data.erasing import random_erasing

GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
# PIL truncates the blended / stretched value to uint8; ours keeps it: floor(ours) == PIL.
TRUNCATED = {"Brightness", "Color", "Contrast", "Sharpness", "AutoContrast"}


def _images():
    rng = np.random.default_rng(0)
    h, w = 45, 61
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([40 + 150 * xx / w, 30 + 120 * yy / h, 90 + 60 * np.sin(xx / 5.0)], -1)
    structured = np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    return [structured, noise]


IMAGES = _images()


# --- a reference: torchvision's PIL path, written out with PIL's own calls ---

def _tv_inverse_affine(center, angle, translate, shear):
    """torchvision.transforms.functional's inverse affine matrix (rotation, shear in degrees)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _pil_op(img, op, magnitude, negative, fill):
    w, h = img.size
    v = ra.magnitude_value(op, magnitude, 31, size=(h, w))
    v = -v if negative and op in ra.SIGNED else v
    fill = tuple(int(f) for f in fill)

    def affine(matrix):
        return img.transform(img.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=fill)

    shear = math.degrees(math.atan(v)) if op.startswith("Shear") else 0.0
    return {
        "Identity": lambda: img,
        "ShearX": lambda: affine(_tv_inverse_affine((0, 0), 0.0, (0, 0), (shear, 0.0))),
        "ShearY": lambda: affine(_tv_inverse_affine((0, 0), 0.0, (0, 0), (0.0, shear))),
        "TranslateX": lambda: affine(_tv_inverse_affine((w * 0.5, h * 0.5), 0.0, (int(v), 0), (0.0, 0.0))),
        "TranslateY": lambda: affine(_tv_inverse_affine((w * 0.5, h * 0.5), 0.0, (0, int(v)), (0.0, 0.0))),
        "Rotate": lambda: img.rotate(v, Image.NEAREST, fillcolor=fill),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(1.0 + v),
        "Color": lambda: ImageEnhance.Color(img).enhance(1.0 + v),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(1.0 + v),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(1.0 + v),
        "Posterize": lambda: ImageOps.posterize(img, int(v)),
        "Solarize": lambda: ImageOps.solarize(img, v),
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
    }[op]()


def _compare(op, image, magnitude, negative, fill=(0, 0, 0), mode="RGB"):
    pil = Image.fromarray(image if mode == "RGB" else image[..., 0], mode)
    ref = np.asarray(_pil_op(pil, op, magnitude, negative, fill), np.float64).reshape(image.shape)
    out = ra.rand_augment_op(image.astype(np.float32), op, magnitude, 31, negative, fill[:image.shape[-1]])
    out = out.numpy().astype(np.float64)
    assert out.shape == image.shape
    if op in TRUNCATED:  # PIL's uint8 truncation of the same value
        np.testing.assert_array_equal(np.floor(out), ref, err_msg=f"{op} {magnitude} {negative}")
        assert (out - ref).min() >= 0 and (out - ref).max() < 1
    else:
        np.testing.assert_array_equal(out, ref, err_msg=f"{op} {magnitude} {negative} {fill}")


def test_magnitude_tables_are_torchvisions():
    assert ra.magnitude_value("Rotate") == 9.0 and ra.magnitude_value("Solarize") == 178.5
    assert ra.magnitude_value("ShearX") == pytest.approx(0.09) and ra.magnitude_value("Color") == pytest.approx(0.27)
    assert ra.magnitude_value("Rotate", 30) == 30.0 and ra.magnitude_value("Solarize", 0) == 255.0
    # 8 - round(i / ((bins - 1) / 4)), torch.round's halves to even (bins=9: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4)
    assert [ra.magnitude_value("Posterize", i) for i in range(31)] == [8] * 4 + [7] * 8 + [6] * 7 + [5] * 8 + [4] * 4
    assert [ra.magnitude_value("Posterize", i, 9) for i in range(9)] == [8, 8, 7, 6, 6, 6, 5, 4, 4]
    # Translations: 150/331 of the width (X) / height (Y); int() of torch's float32 linspace value.
    assert ra.magnitude_value("TranslateX", size=(100, 224)) == pytest.approx(150 / 331 * 224 * 9 / 30, rel=1e-6)
    assert ra.magnitude_value("TranslateY", size=(331, 10)) == 45.0  # 150 / 331 * 331 / 30 * 9, exactly
    for length in (7, 32, 224, 331, 500):
        got = [ra._translate_pixels(tf.constant(length), m, 31).numpy() for m in range(31)]
        want = [int(ra.magnitude_value("TranslateX", m, size=(1, length))) for m in range(31)]
        assert got == want, length
    with pytest.raises(ValueError, match="magnitude"):
        ra.rand_augment(tf.zeros([4, 4, 3]), tf.constant([1, 2]), magnitude=31)


@pytest.mark.parametrize("op", ra.OPS)
def test_op_matches_pil(op):
    for image in IMAGES:
        for magnitude in (1, 9, 30):
            for negative in ((False, True) if op in ra.SIGNED else (False,)):
                for fill in (((0, 0, 0), (10, 128, 250)) if op in GEOMETRIC else ((0, 0, 0),)):
                    _compare(op, image, magnitude, negative, fill)


def test_geometric_ops_match_pil_at_224():
    # The fixed-point sampling stays exact in float32 at this size (see randaugment._pil_affine).
    image = np.random.default_rng(4).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for op in ("Rotate", "ShearX", "ShearY"):
        for magnitude in (13, 30):
            for negative in (False, True):
                _compare(op, image, magnitude, negative)


def test_ops_keep_non_integer_input_in_range():
    image = np.random.default_rng(5).uniform(0, 255, (20, 30, 3)).astype(np.float32)
    for op in ra.OPS:
        out = ra.rand_augment_op(image, op, 20, 31, True, (1.5, 2.5, 3.5)).numpy()
        assert out.dtype == np.float32 and np.isfinite(out).all() and 0 <= out.min() and out.max() <= 255, op
        if op in GEOMETRIC:  # nearest neighbour: input values (to float rounding of the fill shift) or the fill
            near = np.abs(out.reshape(-1, 1, 3) - image.reshape(1, -1, 3)).max(-1).min(1) < 1e-4
            assert (near | (out == (1.5, 2.5, 3.5)).all(-1).ravel()).all(), op


def test_ops_on_flat_and_narrow_images_match_pil():
    flat = np.zeros([12, 9, 3], np.uint8)
    flat[..., 1] = 77
    flat[3:5, 2:6, 2] = 170  # two values: equalize's step is 0, the channel left as is (170 * 1.5: no PIL rounding)
    for op in ("AutoContrast", "Equalize", "Contrast", "Sharpness", "Solarize"):
        _compare(op, flat, 9, False)
    thin = IMAGES[1][:2, :7]  # too small for the 3x3 blur: PIL and ours leave it
    _compare("Sharpness", thin, 30, True)
    for op in ("Rotate", "ShearY", "TranslateX"):
        _compare(op, IMAGES[1][:5, :3], 30, True, (1, 2, 3))


def test_autocontrast_where_pil_rounds_an_exact_255_down():
    # PIL's lookup is int(ix * 255.0 / (hi - lo) - lo * scale) in float64: for values 0..25 that is
    # 25 * 10.2 = 254.99999999999997 -> 254. Ours maps the maximum to 255 exactly; the rest agrees.
    image = np.random.default_rng(1).integers(0, 26, (20, 20, 3), dtype=np.uint8)
    image[0, 0] = 25
    image[0, 1] = 0
    ref = np.asarray(ImageOps.autocontrast(Image.fromarray(image)), np.float64)
    out = ra.rand_augment_op(image.astype(np.float32), "AutoContrast").numpy()
    assert (ref[image == 25] == 254).all() and (out[image == 25] == 255).all()
    np.testing.assert_array_equal(np.floor(out)[image != 25], ref[image != 25])


def test_grey_images_match_pil_mode_l():
    grey = IMAGES[0][..., :1]
    for op in ("Rotate", "ShearX", "Color", "Contrast", "Sharpness", "Equalize", "AutoContrast", "Posterize"):
        _compare(op, grey, 17, True, (40,), mode="L")


def _seeds(n, start=0):
    return [tf.constant([start + i, 7 * i + 1], tf.int64) for i in range(n)]


# Traced once for the module (the 14 branches take about a second to trace).
RAND_AUGMENT = tf.function(lambda x, s: ra.rand_augment(x, s, num_ops=2, magnitude=12, fill=(5, 6, 7)),
                           input_signature=[tf.TensorSpec([None, None, 3]), tf.TensorSpec([2], tf.int64)])


def test_rand_augment_is_the_drawn_ops_in_turn_and_seeded():
    outs = []
    for i, seed in enumerate(_seeds(8)):
        image = IMAGES[i % 2].astype(np.float32)  # two sizes through the one [None, None, 3] trace
        out = RAND_AUGMENT(image, seed).numpy()
        assert out.shape == image.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
        np.testing.assert_array_equal(out, RAND_AUGMENT(image, seed).numpy())  # same seed, same image
        want = image
        for op, negative in ra.rand_augment_draws(seed, 2).numpy():
            want = ra.rand_augment_op(want, ra.OPS[op], 12, 31, bool(negative), (5, 6, 7))
        np.testing.assert_array_equal(out, want.numpy())
        np.testing.assert_array_equal(out, ra.rand_augment(image, seed, 2, 12, fill=(5, 6, 7)).numpy())  # eager
        outs.append(out.tobytes())
    assert len(set(outs)) >= 6  # seeds differ (two may both draw e.g. Identity twice)
    image = IMAGES[0].astype(np.float32)
    assert len({RAND_AUGMENT(image, seed).numpy().tobytes() for seed in _seeds(6, 50)}) >= 5
    # Only the drawn op runs: one Case op over the 14 branches, in a loop over the steps.
    graph = RAND_AUGMENT.get_concrete_function().graph
    functions = [graph, *(f.graph for f in graph._functions.values() if hasattr(f, "graph"))]
    cases = [op for g in functions for op in g.get_operations() if op.type in ("Case", "StatelessCase")]
    assert len(cases) == 1 and len(cases[0].get_attr("branches")) == len(ra.OPS)


def test_rand_augment_in_a_parallel_map_matches_sequential():
    images = [IMAGES[0][:36, :36], IMAGES[1][:36, :36]] * 6

    def build(parallel):
        ds = tf.data.Dataset.from_tensor_slices(np.stack(images).astype(np.float32))
        seeds = tf.data.Dataset.random(seed=3).batch(2)
        par = dict(num_parallel_calls=parallel, deterministic=True) if parallel else {}
        return [x.numpy() for x in tf.data.Dataset.zip((ds, seeds)).map(RAND_AUGMENT, **par)]

    sequential, parallel = build(None), build(4)
    assert len(sequential) == 12 and len({x.tobytes() for x in sequential}) > 6
    for a, b in zip(sequential, parallel):
        np.testing.assert_array_equal(a, b)


def test_op_choice_uniform_and_sign_fair():
    seeds = tf.stack(_seeds(3000, 100))
    draws = tf.function(lambda seeds: tf.map_fn(lambda s: ra.rand_augment_draws(s, 2), seeds,
                                                fn_output_signature=tf.int32))(seeds).numpy()
    counts = np.bincount(draws[..., 0].ravel(), minlength=len(ra.OPS))
    expected = draws[..., 0].size / len(ra.OPS)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 34.5, counts  # chi-square, 13 degrees of freedom, p = 0.001
    negative = draws[..., 1].mean()
    assert abs(negative - 0.5) < 4 * math.sqrt(0.25 / draws[..., 1].size)
    assert not (draws[:, 0, 0] == draws[:, 1, 0]).all()  # the two steps draw independently


# --- Random Erasing ---

def _rectangles(changed):
    """Per image of a [B, H, W] changed-mask: None, or (top, left, height, width), checked solid."""
    rects = []
    for m in changed:
        if not m.any():
            rects.append(None)
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        top, left, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert m.sum() == h * w and m[top:top + h, left:left + w].all(), "not one solid rectangle"
        rects.append((top, left, h, w))
    return rects


def test_erasing_rate_rectangles_and_placement():
    b, h, w = 400, 48, 64
    images = tf.zeros([b, h, w, 3])
    out = random_erasing(images, tf.constant([5, 9], tf.int64), 0.3, fill="mean", mean=(255, 200, 100)).numpy()
    changed = (out != 0).any(-1)
    assert ((out == (255, 200, 100)).all(-1) == changed).all()  # "mean": exactly the colour
    rects = [r for r in _rectangles(changed) if r is not None]
    assert abs(len(rects) - 0.3 * b) < 4 * math.sqrt(b * 0.3 * 0.7), len(rects)
    area_lo, area_hi, r_lo, r_hi = 0.02, 1 / 3, 0.3, 1 / 0.3
    for top, left, eh, ew in rects:  # sides are rounded: allow half a pixel either way
        assert eh < h and ew < w
        assert (eh - 0.5) * (ew - 0.5) <= area_hi * h * w and (eh + 0.5) * (ew + 0.5) >= area_lo * h * w
        assert (eh - 0.5) / (ew + 0.5) <= r_hi and (eh + 0.5) / (ew - 0.5) >= r_lo
    tops, lefts = np.array([r[0] for r in rects]), np.array([r[1] for r in rects])
    bottoms = np.array([r[0] + r[2] for r in rects])
    rights = np.array([r[1] + r[3] for r in rects])
    assert (tops == 0).any() and (bottoms == h).any() and (lefts == 0).any() and (rights == w).any()
    ratios = np.array([r[2] / r[3] for r in rects])
    assert (ratios < 0.6).any() and (ratios > 1.7).any()  # both orientations occur
    seed = tf.constant([1, 1], tf.int64)
    assert (random_erasing(images, seed, 0.0, fill="mean", mean=9).numpy() == 0).all()
    assert (random_erasing(images, seed, 1.0, fill="mean", mean=9).numpy() == 9).any((1, 2, 3)).all()


def test_erasing_leaves_the_rest_and_random_fill_is_uniform():
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (64, 40, 40, 3)).astype(np.float32)
    out = random_erasing(images, tf.constant([3, 4], tf.int64), 0.8).numpy()
    changed = (out != images).any(-1)
    rects = _rectangles(changed)
    assert sum(r is not None for r in rects) > 40
    np.testing.assert_array_equal(out[~changed], images[~changed])  # untouched, bit for bit
    erased = out[changed]
    assert erased.size > 20000 and erased.min() >= 0 and erased.max() <= 255
    assert abs(erased.mean() - 127.5) < 2 and abs(erased.std() - 255 / math.sqrt(12)) < 2


def test_erasing_normal_fill_statistics():
    mean, std = (100.0, 120.0, 140.0), (10.0, 20.0, 30.0)
    images = tf.fill([64, 40, 40, 3], -1.0)  # a value no draw lands on exactly
    out = random_erasing(images, tf.constant([8, 8], tf.int64), 1.0, fill="normal", mean=mean, std=std).numpy()
    erased = out[(out != -1).all(-1)]
    assert len(erased) > 5000
    np.testing.assert_allclose(erased.mean(0), mean, atol=1.0)
    np.testing.assert_allclose(erased.std(0), std, rtol=0.05)


def test_erasing_dynamic_batch_and_seeds():
    fn = tf.function(lambda x, s: random_erasing(x, s, 0.5),
                     input_signature=[tf.TensorSpec([None, None, None, 3]), tf.TensorSpec([2], tf.int64)])
    images = np.random.default_rng(3).uniform(0, 255, (6, 30, 26, 3)).astype(np.float32)
    seed = tf.constant([11, 12], tf.int64)
    five = fn(images[:5], seed).numpy()
    three = fn(images[:3], seed).numpy()
    assert five.shape == (5, 30, 26, 3) and three.shape == (3, 30, 26, 3)
    np.testing.assert_array_equal(three, five[:3])  # image b's draws are row b's, whatever the batch size
    np.testing.assert_array_equal(five, fn(images[:5], seed).numpy())
    assert not np.array_equal(five, fn(images[:5], tf.constant([11, 13], tf.int64)).numpy())
    assert fn(images[:, :17, :9], seed).shape == (6, 17, 9, 3)
    ds = tf.data.Dataset.from_tensor_slices(images).batch(4)  # batches of 4 and 2
    batches = [x.numpy() for x in ds.map(lambda x: random_erasing(x, seed, 0.5))]
    assert [len(x) for x in batches] == [4, 2]
    np.testing.assert_array_equal(batches[0], fn(images[:4], seed).numpy())


def test_erasing_without_a_fitting_rectangle_and_bad_arguments():
    images = tf.ones([8, 16, 16, 3])
    # Half the image or more at height / width 20..30 is taller than the image: nothing is erased.
    out = random_erasing(images, tf.constant([1, 2], tf.int64), 1.0, area=(0.5, 0.9), aspect=(20, 30),
                         fill="mean", mean=0)
    assert (out.numpy() == 1).all()
    with pytest.raises(ValueError, match="fill"):
        random_erasing(images, tf.constant([1, 2]), 0.5, fill="zeros")
    with pytest.raises(ValueError, match="needs mean"):
        random_erasing(images, tf.constant([1, 2]), 0.5, fill="normal")
    with pytest.raises(ValueError, match="area"):
        random_erasing(images, tf.constant([1, 2]), 0.5, area=(0.5, 0.1))


# --- through the classification pipeline and a recipe ----------------------------------------------


def test_pipeline_applies_randaugment_per_crop_and_erases_before_preprocessing(tmp_path):
    import data_fixtures as fx

    import kseg.data as kd
    from kseg.train.inputs import classification_augment
    from kseg.train.recipes import load_recipe

    fx.write_classes(tmp_path)  # 5 images, 2 classes

    def batch(**options):
        augment = kd.ClassificationAugment(area=None, flip=False, brightness=0, contrast=0, saturation=0, **options)
        ds = kd.classification_folder(tmp_path, image_size=32, augment=augment, batch_size=5, seed=3,
                                      preprocessing="torch")
        return next(iter(ds))[0].numpy()

    plain, augmented = batch(), batch(randaugment=(2, 20))
    assert not np.allclose(plain, augmented) and np.array_equal(augmented, batch(randaugment=(2, 20)))
    # Erasing every image with the mean colour: after torch preprocessing the rectangle reads exactly 0.
    erased = batch(erasing=1.0, erasing_fill="mean")
    changed = np.any(erased != plain, axis=-1)
    assert changed.reshape(5, -1).any(axis=1).all()
    np.testing.assert_allclose(erased[changed], 0.0, atol=1e-5)
    # "normal": N(0, 1) in the model's input space (the raw std is the preprocessing's std over its scale).
    normal = batch(erasing=1.0, erasing_fill="normal")
    noisy = normal[np.any(normal != plain, -1)]
    assert abs(noisy.mean()) < 0.2 and 0.8 < noisy.std() < 1.2

    path = tmp_path / "r.toml"
    path.write_text('model = "resnet18"\n[data]\nlayout = "classification_folder"\ncrop = [224, 224]\n'
                    'randaugment = [2, 9]\nrandaugment_bins = 11\nerasing = 0.25\nerasing_fill = "normal"\n'
                    '[optimizer]\nname = "adamw"\nlearning_rate = 5e-4\n[training]\nbatch_size = 8\nepochs = 1\n'
                    '[loss]\nname = "sparse_cross_entropy"\n')
    aug = classification_augment(load_recipe(str(path)).data)
    assert (aug.randaugment, aug.randaugment_bins, aug.erasing, aug.erasing_fill) == ((2, 9), 11, 0.25, "normal")
    with pytest.raises(ValueError, match="randaugment is"):
        kd.ClassificationAugment(randaugment=(2, 31))
    with pytest.raises(ValueError, match="erasing_fill must be one of"):
        kd.ClassificationAugment(erasing=0.5, erasing_fill="zeros")


def test_bicubic_random_resized_crop_resizes_the_whole_pixel_window_antialiased(tmp_path):
    # DeiT's recipe crops with bicubic interpolation: the window cut at whole pixels, then tf.image.resize
    # (bicubic, antialiased), as torchvision's RandomResizedCrop on a PIL image; bilinear keeps crop_and_resize.
    import kseg.data.augment as aug_ops

    image = tf.constant(np.random.default_rng(0).integers(0, 256, (60, 80, 3)), tf.uint8)
    seed = tf.constant([3, 4], tf.int64)
    augment = aug_ops.ClassificationAugment(flip=False, brightness=0, contrast=0, saturation=0)
    bicubic = aug_ops.augment_image(image, seed, augment, (24, 24), interpolation="bicubic").numpy()
    box_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4]), box_seed, area_range=augment.area, aspect_ratio_range=augment.aspect,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.cast(tf.slice(image, begin, extent), tf.float32)
    np.testing.assert_allclose(bicubic, tf.image.resize(window, (24, 24), "bicubic", antialias=True).numpy(),
                               atol=1e-4)
    bilinear = aug_ops.augment_image(image, seed, augment, (24, 24)).numpy()
    assert bilinear.shape == bicubic.shape and not np.allclose(bilinear, bicubic, atol=1.0)


@pytest.mark.parametrize("recipe", ["deit_small_imagenet", "vit_b_16_imagenet"])
def test_the_transformer_recipes_augmentation_reads_a_class_folder(tmp_path, recipe):
    # Their whole training transform in the reader (bicubic random resized crop, RandAugment, erasing,
    # Mixup / CutMix): the bicubic crop's window has a dynamic extent, and RandAugment needs the channels.
    import data_fixtures as fx

    from kseg.train.inputs import datasets
    from kseg.train.recipes import load_recipe

    fx.write_class_splits(str(tmp_path), splits=("train", "val"))
    train, _ = datasets(load_recipe(recipe, ["training.batch_size=4"]), str(tmp_path))
    images, labels = next(iter(train))
    assert images.shape == (4, 224, 224, 3) and labels.shape == (4, 1000)
