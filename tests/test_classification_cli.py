"""Classification end to end from the command line: the folder and annotation-list layouts, the
evaluation transform (resize the shorter side, centre crop), `kseg train` on the classification
recipes, `kseg evaluate` (top-1/top-5, per-class accuracy, confusion matrix) and `kseg predict`
(predictions.json). Fixtures: 3 classes x 4 JPEGs of 40x48 in the real on-disk layouts; LeNet-5."""

import json
import os

import data_fixtures as fx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import kseg
import kseg.data as kd
from kseg.cli import main
from kseg.data.augment import check_eval_transform, eval_image
from kseg.tasks import get_task
from kseg.tasks.base import Head
from kseg.train import RecipeError, load_recipe
from kseg.train.fit import classification_augment, datasets, make_loss

TINY = ["--epochs", "1", "--set", "training.batch_size=4"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fx.write_class_splits(str(tmp_path_factory.mktemp("classes")))


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    return fx.write_class_list(str(tmp_path_factory.mktemp("listed")))


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """`kseg train --recipe lenet5_digits` on the class-folder fixture (10 outputs, 3 classes of data)."""
    out = str(tmp_path_factory.mktemp("run"))
    code = main(["train", "--recipe", "lenet5_digits", "--data", folder["root"], "--out", out, *TINY])
    return code, out


# === the evaluation transform ===


def _reference(image, shorter, crop):
    """torchvision's Resize(shorter) + CenterCrop(crop) on a PIL image (bilinear, antialiased)."""
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(shorter * long / short)
    nh, nw = (shorter, new_long) if h <= w else (new_long, shorter)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), np.float32)
    ch, cw = crop
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    return resized[top: top + ch, left: left + cw]


@pytest.mark.parametrize("size, transform", [((50, 77), (40, 32)), ((90, 61), (40, (36, 30))), ((37, 41), (64, 56))])
def test_eval_transform_matches_a_pil_reference_on_non_square_images(size, transform):
    rng = np.random.default_rng(0)
    image = fx.image_array(rng, *size)
    shorter, crop = check_eval_transform(transform)
    out = eval_image(tf.constant(image), None, (shorter, crop)).numpy()
    ref = _reference(image, shorter, crop)
    assert out.shape == (*crop, 3)
    diff = np.abs(out - ref)
    assert diff.max() < 1.01 and diff.mean() < 0.5  # PIL rounds to uint8; the op stays float


def test_eval_transform_in_the_pipeline_and_its_checks(folder):
    ds = kd.classification_folder(os.path.join(folder["root"], "test"), eval_transform=(36, 32), batch_size=12)
    images, labels = next(iter(ds))
    assert images.shape == (12, 32, 32, 3) and sorted(set(labels.numpy().tolist())) == [0, 1, 2]
    with open(os.path.join(folder["root"], "test", "cat", "0.jpg"), "rb") as f:
        raw = tf.io.decode_jpeg(f.read()).numpy()  # TF's JPEG decoder, as the pipeline's (PIL's differs slightly)
    assert np.abs(images[0].numpy() - _reference(raw, 36, (32, 32))).max() < 1.01
    with pytest.raises(ValueError, match="crop must fit"):
        check_eval_transform((32, 40))
    with pytest.raises(ValueError, match="interpolation"):
        check_eval_transform((36, 32), "cubic")
    with pytest.raises(ValueError, match="differs from the eval_transform crop"):
        kd.classification_folder(os.path.join(folder["root"], "test"), image_size=28, eval_transform=(36, 32))


# === the annotation-list layout ===


def test_annotation_list_reads_paths_labels_and_classes_txt(listed):
    ds = kd.classification_list(listed["root"], "train", image_size=16)
    assert ds.class_names == ["cat", "dog", "fox"]
    assert [int(y) for _, y in ds] == [0] * 4 + [1] * 4 + [2] * 4
    same = kd.classification_list(listed["lists"]["test"], image_size=16)  # the list file itself
    assert len(list(same)) == 12 and same.class_names == ["cat", "dog", "fox"]


def test_annotation_list_mmpretrain_meta_layout(tmp_path):
    fx.write_class_list(str(tmp_path / "src"), classes_txt=False, splits=("val",))
    os.makedirs(tmp_path / "meta")
    os.rename(tmp_path / "src" / "images" / "val", tmp_path / "val")
    lines = (tmp_path / "src" / "val.txt").read_text().replace("images/val/", "")
    (tmp_path / "meta" / "val.txt").write_text(lines)
    ds = kd.classification_list(str(tmp_path), "val", image_size=16)
    assert ds.class_names == ["0", "1", "2"] and len(list(ds)) == 12  # no classes.txt: largest label + 1


@pytest.mark.parametrize("line, message", [
    ("images/train/0_0.jpg\n", r"train\.txt:3: expected 'relative/path\.jpg LABEL'"),
    ("images/train/0_0.jpg cat\n", r"train\.txt:3: label 'cat' is not an integer"),
    ("images/train/0_0.jpg 3\n", r"train\.txt:3: label 3 is out of range for 3 classes \(0\.\.2\)"),
    ("images/train/0_0.jpg -1\n", r"train\.txt:3: label -1 is out of range"),
])
def test_annotation_list_errors_name_the_file_and_line(tmp_path, line, message):
    fx.write_class_list(str(tmp_path), per_class=1, splits=("train",))
    path = tmp_path / "train.txt"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + line + "".join(lines[3:]))
    with pytest.raises(ValueError, match=message):
        kd.classification_list(str(tmp_path), "train")


def test_annotation_list_missing_images_and_splits_are_named(tmp_path):
    fx.write_class_list(str(tmp_path), per_class=1, splits=("train",))
    os.remove(tmp_path / "images" / "train" / "1_0.jpg")
    with pytest.raises(FileNotFoundError, match="1_0.jpg: listed but missing"):
        kd.classification_list(str(tmp_path), "train")
    assert len(list(kd.classification_list(str(tmp_path), "train", skip_bad=True))) == 2
    with pytest.raises(FileNotFoundError, match="meta/val.txt"):
        kd.classification_list(str(tmp_path), "val")


# === recipes and datasets ===


def test_recipes_carry_the_eval_transform_and_the_schema_checks_it(tmp_path):
    for name in ("alexnet_imagenet", "vgg16_imagenet"):
        d = load_recipe(name).data
        assert (d["eval_resize"], d["eval_crop"], d["interpolation"]) == (256, 224, "bilinear")
    with pytest.raises(RecipeError, match="eval_resize and eval_crop go together"):
        load_recipe("lenet5_digits", ["data.eval_resize=36"])
    with pytest.raises(RecipeError, match="no larger than eval_resize"):
        load_recipe("lenet5_digits", ["data.eval_resize=36", "data.eval_crop=40"])
    with pytest.raises(RecipeError, match="interpolation: 'cubic' is not one of"):
        load_recipe("lenet5_digits", ["data.interpolation=cubic"])
    vgg = classification_augment(load_recipe("vgg16_imagenet").data)
    assert vgg.scale == (256, 512) and vgg.area is None and vgg.flip
    assert classification_augment(load_recipe("lenet5_digits").data) is None


def test_classification_datasets_follow_the_recipe(folder):
    recipe = load_recipe("lenet5_digits", ["data.eval_resize=36", "data.eval_crop=32", "data.flip=true"])
    train, val = datasets(recipe, folder["root"], batch_size=4)
    x, y = next(iter(train))
    assert x.shape == (4, 32, 32, 1) and y.dtype == tf.int32 and float(tf.reduce_max(x)) <= 1.0
    vx, _ = next(iter(val))
    assert vx.shape[1:] == (32, 32, 1) and val.class_names == ["cat", "dog", "fox"]
    augmented = kd.ClassificationAugment(area=None, scale=(40, 48), flip=True)
    images, _ = next(iter(kd.classification_folder(os.path.join(folder["root"], "train"), image_size=32,
                                                   augment=augmented, batch_size=4, seed=0)))
    assert images.shape == (4, 32, 32, 3)


# === kseg train ===


def test_recipe_mixing_and_label_smoothing_give_soft_targets_and_their_loss(folder):
    keys = ["data.mixup=0.8", "data.cutmix=1.0", "data.switch_prob=0.5", "loss.label_smoothing=0.1",
            "data.resize=[32, 32]"]
    recipe = load_recipe("lenet5_digits", keys)
    augment = classification_augment(recipe.data)
    assert (augment.mixup, augment.cutmix, augment.switch_prob, augment.mix_prob) == (0.8, 1.0, 0.5, 1.0)
    train, val = datasets(recipe, folder["root"], batch_size=4)
    (x, y), (vx, vy) = next(iter(train)), next(iter(val))
    assert x.shape == vx.shape == (4, 32, 32, 1)
    assert y.shape == (4, 10) and np.allclose(y.numpy().sum(-1), 1.0, atol=1e-5)  # soft, as wide as the model
    assert set(np.unique(vy.numpy())) == {0.0, 1.0}  # validation: one-hot, unmixed
    loss = make_loss(recipe)
    assert loss.__class__.__name__ == "CategoricalCrossentropy"
    assert loss.get_config()["label_smoothing"] == 0.1 and loss.get_config()["from_logits"]
    # Label smoothing alone: one-hot class rows, smoothed in the loss.
    smoothed, _ = datasets(load_recipe("lenet5_digits", ["loss.label_smoothing=0.1"]), folder["root"], batch_size=4)
    assert set(np.unique(next(iter(smoothed))[1].numpy())) == {0.0, 1.0}
    with pytest.raises(RecipeError, match="switch_prob is a probability"):
        load_recipe("lenet5_digits", ["data.switch_prob=2"])
    with pytest.raises(ValueError, match="does not train on mixed or smoothed labels"):
        make_loss(load_recipe("deeplab_largefov_voc", ["data.mixup=0.2"]))


def test_train_with_mixup_cutmix_and_label_smoothing(folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    code = main(["train", "--recipe", "lenet5_digits", "--data", folder["root"], "--out", out, *TINY,
                 "--set", "data.mixup=0.8", "--set", "data.cutmix=1.0", "--set", "loss.label_smoothing=0.1"])
    assert code == 0, capsys.readouterr().err
    header = open(os.path.join(out, "log.csv")).readline()
    assert "val_top1" in header and "top5" in header
    assert os.path.exists(os.path.join(out, "best.keras"))




def test_train_lenet5_recipe_on_class_folders(run):
    code, out = run
    assert code == 0
    for name in ("final.keras", "best.keras", "kseg_run.json", "log.csv", "samples.png"):
        assert os.path.exists(os.path.join(out, name)), name
    record = json.loads(open(os.path.join(out, "kseg_run.json")).read())
    assert record["class_names"] == ["cat", "dog", "fox"] and record["recipe"] == "lenet5_digits"
    assert "val_top1" in open(os.path.join(out, "log.csv")).readline()


def test_train_lenet5_recipe_on_an_annotation_list(listed, tmp_path, capsys):
    out = str(tmp_path / "run")
    code = main(["train", "--recipe", "lenet5_digits", "--data", listed["root"], "--out", out, *TINY,
                 "--set", "data.layout=classification_list", "--set", "model_options.num_classes=3"])
    assert code == 0, capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "final.keras")) and os.path.exists(os.path.join(out, "kseg_run.json"))
    assert "val_top1" in capsys.readouterr().out


def test_train_names_a_missing_split_folder(folder, tmp_path, capsys):
    code = main(["train", "--recipe", "lenet5_digits", "--data", folder["root"], "--out", str(tmp_path / "r"),
                 *TINY, "--set", "data.val_split=val"])
    assert code == 2 and "val" in capsys.readouterr().err


# === kseg evaluate ===


def test_evaluate_prints_top1_top5_per_class_and_draws_the_confusion_matrix(run, folder, capsys):
    _, out = run
    model = os.path.join(out, "final.keras")
    code = main(["evaluate", model, "--data", folder["root"], "--layout", "classification_folder", "--split", "test"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1 accuracy" in printed and "top-5 accuracy" in printed and "per-class accuracy" in printed
    assert "fox" in printed
    scores = json.loads(open(os.path.join(out, "final_test_scores.json")).read())
    assert scores["count"] == 12 and set(scores) >= {"top1", "top5", "per_class", "confusion"}
    assert [r["images"] for r in scores["per_class"][:3]] == [4, 4, 4]
    assert os.path.exists(os.path.join(out, "final_test_confusion.png"))
    # --json alone: the scores as JSON on stdout, nothing else
    assert main(["evaluate", model, "--data", os.path.join(folder["root"], "test"), "--layout",
                 "classification_folder", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["top1"] == scores["top1"] and printed["count"] == 12 and len(printed["per_class"]) == 10


def test_evaluate_an_annotation_list_and_the_wrong_layout(run, listed, capsys):
    _, out = run
    model = os.path.join(out, "final.keras")
    assert main(["evaluate", model, "--data", listed["lists"]["test"], "--layout", "classification_list",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12
    assert main(["evaluate", model, "--data", listed["root"], "--layout", "voc"]) == 2
    assert "classification task: pass --layout classification_folder or classification_list" in \
        capsys.readouterr().err


def test_top_k_evaluator_scores_per_class_and_omits_top5_for_few_classes():
    scores = get_task("classification").evaluator(3, Head(0, "softmax"), ["a", "b", "c"])
    logits = np.array([[3, 1, 0], [0, 2, 1], [0, 2, 1], [1, 0, 2]], np.float32)
    scores.update(np.array([0, 1, 2, 2]), logits)
    result = scores.result()
    assert result["top1"] == 0.75 and "top5" not in result and result["count"] == 4
    assert [r["accuracy"] for r in result["per_class"]] == [1.0, 1.0, 0.5]
    assert result["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        scores.update(np.array([3]), logits[:1])


# === kseg predict ===


def test_predict_writes_predictions_json_with_names_from_the_run(run, folder, tmp_path, capsys):
    _, out = run
    images = os.path.join(folder["root"], "test", "dog")
    code = main(["predict", os.path.join(out, "final.keras"), images, "--out", str(tmp_path / "p")])
    assert code == 0
    assert "top classes of 4 images" in capsys.readouterr().out
    entries = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [os.path.basename(e["file"]) for e in entries] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    names = ["cat", "dog", "fox", *map(str, range(3, 10))]
    for e in entries:
        probs = [t["probability"] for t in e["top_k"]]
        assert len(e["top_k"]) == 5 and probs == sorted(probs, reverse=True)
        assert all(t["name"] == names[t["class"]] for t in e["top_k"])
    # kseg evaluate's path (tf.data, the same transform) gives the same top-1 for these images
    capsys.readouterr()
    assert main(["evaluate", os.path.join(out, "final.keras"), "--data", os.path.join(folder["root"], "test"),
                 "--layout", "classification_folder", "--json", str(tmp_path / "s.json")]) == 0
    confusion = json.loads((tmp_path / "s.json").read_text())["confusion"]
    top1 = np.bincount([e["top_k"][0]["class"] for e in entries], minlength=10)
    assert confusion[1] == top1.tolist()
    assert main(["predict", os.path.join(out, "final.keras"), images, "--out", str(tmp_path / "p")]) == 2
    assert main(["predict", os.path.join(out, "final.keras"), images, "--out", str(tmp_path / "p"), "--crf"]) == 2


def test_predict_with_a_classifier_registry_name_and_weights(folder, tmp_path):
    weights = str(tmp_path / "lenet.weights.h5")
    kseg.build_model("lenet5", num_classes=4).save_weights(weights)
    code = main(["predict", "lenet5", "--weights", weights, "--num-classes", "4",
                 os.path.join(folder["root"], "test", "cat", "0.jpg"), "--out", str(tmp_path / "p")])
    assert code == 0
    [entry] = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [t["name"] for t in entry["top_k"]] == [str(t["class"]) for t in entry["top_k"]]  # no names known
    assert len(entry["top_k"]) == 4 and sum(t["probability"] for t in entry["top_k"]) == pytest.approx(1, abs=1e-5)
