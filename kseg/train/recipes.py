"""Training recipes: the papers' setups as TOML files shipped in kseg/train/recipes/.

    recipe = load_recipe("deeplab_largefov_voc")                 # or a path to a .toml file
    recipe = load_recipe("synthetic_demo", {"training.epochs": 3})
    recipe.optimizer["learning_rate"], recipe.training["batch_size"], recipe.source

Every number in a shipped recipe carries a comment citing the paper section or the reference
solver it comes from. Unknown sections or keys, and values of the wrong type, raise an error
naming the file and the key: a typo never falls back to a default silently.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os

import tomllib

RECIPE_DIR = os.path.join(os.path.dirname(__file__), "recipes")

# section -> key -> accepted types (numbers: int accepted where float is)
_NUM = (int, float)
SCHEMA: dict[str, dict[str, tuple]] = {
    # backbone_init: what the paper initialises the backbone from ("imagenet"): kseg train then wants
    # --backbone-weights, and says loudly that it trains from scratch without them.
    # init_from: a staged training's previous stage (FCN-16s starts from a trained FCN-32s): kseg train
    # then wants that run's file as --backbone-weights.
    "": {"description": (str,), "model": (str,), "backbone_init": (str,), "init_from": (str,)},
    "model_options": {},  # builder options, checked against the builder's signature at build time
    "data": {
        "layout": (str,), "train_split": (str,), "val_split": (str,), "crop": (list,), "resize": (list,),
        "pad_to": (list,), "scale": (list,), "flip": (bool,), "color_jitter": (bool,), "preprocessing": (str,),
        # dense tasks' colour jitter ranges with color_jitter = true (kseg.data.SegmentationAugment): brightness
        # shift x 255, contrast / saturation factor in [max(0, 1 - x), 1 + x] as torchvision's, hue turn
        "brightness": _NUM, "contrast": _NUM, "saturation": _NUM, "hue": _NUM,
        # classifiers' evaluation transform: shorter side resized to eval_resize, centre eval_crop
        "eval_resize": (int,), "eval_crop": (int, list), "interpolation": (str,),
        # classifiers' batch mixing: Beta(alpha, alpha) MixUp / CutMix, CutMix's share of the mixed
        # batches when both are given, the share of batches mixed at all; Cutout's probability
        "mixup": _NUM, "cutmix": _NUM, "switch_prob": _NUM, "mix_prob": _NUM, "cutout": _NUM,
        # RandAugment [num_ops, magnitude] of randaugment_bins (31: torchvision's scale; 11: timm's m0-m10);
        # Random Erasing's probability, area fraction and aspect ranges and fill (kseg.data.ClassificationAugment)
        "randaugment": (list,), "randaugment_bins": (int,), "erasing": _NUM, "erasing_area": (list,),
        "erasing_aspect": (list,), "erasing_fill": (str,),
        # detection: boxes padded to max_boxes per image, VOC's difficult objects trained on or not;
        # SSD's augmentation (kseg.train.inputs.DetectionAugment): photometric distortion, zoom out
        # to at most zoom_out times the image (1: none), the min-IoU random crop (and flip, above)
        "max_boxes": (int,), "use_difficult": (bool,), "photometric_distort": (bool,), "zoom_out": _NUM,
        "iou_crop": (bool,),
        # two-stage detectors: each image resized keeping its aspect, shorter side min_size, longer at
        # most max_size (Fast / Faster R-CNN's single-scale training), batches padded to their largest
        "min_size": (int,), "max_size": (int,),
        # Fast R-CNN: the proposals file per split ("{split}" replaced), relative to the data directory
        "proposals": (str,),
    },
    # lr_multipliers: {variable path glob: factor}, the first match wins (Caffe's lr_mult); no_weight_decay:
    # [variable path globs] (Caffe's decay_mult 0). Paths are "layer/kernel" (kseg.train.optim.LayerRates).
    # epsilon / rho: Adam's / RMSprop's epsilon and RMSprop's squared-gradient decay (PyTorch's alpha);
    # clip_grad_norm: the global gradient norm clipped to (torch.nn.utils.clip_grad_norm_);
    # ema: the decay of an exponential moving average of the trainable weights (Polyak averaging), which
    # validation, the best checkpoint and the final model use (Keras' use_ema + SwapEMAWeights)
    "optimizer": {"name": (str,), "learning_rate": _NUM, "momentum": _NUM, "weight_decay": _NUM,
                  "lr_multipliers": (dict,), "no_weight_decay": (list,), "epsilon": _NUM, "rho": _NUM,
                  "clip_grad_norm": _NUM, "ema": _NUM},
    # cosine: from learning_rate to min_lr over the steps after a linear warmup of `warmup` steps (in
    # step_unit) from warmup_start, updated every iteration (keras.optimizers.schedules.CosineDecay)
    "schedule": {
        "kind": (str,), "step_size": (int,), "gamma": _NUM, "power": _NUM, "boundaries": (list,),
        "values": (list,), "step_unit": (str,), "warmup": (int,), "warmup_start": _NUM, "min_lr": _NUM,
    },
    "training": {"batch_size": (int,), "epochs": (int,), "iterations": (int,), "steps_per_epoch": (int,),
                 "seed": (int,)},
    "loss": {"name": (str,), "stride8": (bool,), "class_weights": (list,), "gamma": _NUM,
             "label_smoothing": _NUM,
             # multibox: hard negatives kept per positive (kseg.detection.losses.MultiBoxLoss)
             "neg_pos_ratio": _NUM,
             # rcnn: a two-stage detector's training settings (kseg.detection.rcnn_trainer.SETTINGS);
             # convention "pyfaster" or "torchvision" picks the defaults, each key overrides one;
             # allowed_border "none": cross-boundary anchors take part
             "convention": (str,), "rpn_batch": (int,), "rpn_fg_fraction": _NUM, "rpn_fg_iou": _NUM,
             "rpn_bg_iou": _NUM, "allowed_border": (int, float, str), "pre_nms_top_n": (int,),
             "post_nms_top_n": (int,), "roi_batch": (int,), "roi_fg_fraction": _NUM, "fg_iou": _NUM,
             "bg_iou": (list,), "rpn_beta": _NUM, "head_beta": _NUM,
             # rcnn on rcnn_alexnet: R-CNN's three stages (kseg.detection.rcnn_stages.SETTINGS)
             "rois_per_image": (int,), "fg_fraction": _NUM, "feature_norm": _NUM, "svm_c": _NUM,
             "svm_pos_weight": _NUM, "svm_neg_iou": _NUM, "hard_threshold": _NUM, "evict_threshold": _NUM,
             "retrain_limit": (int,), "svm_epochs": (int,), "svm_batch": (int,), "svm_lr": _NUM, "bbox_iou": _NUM,
             "bbox_lambda": _NUM,
             # scale_balanced_cross_entropy (FSDS, kseg.tasks.skeleton): the class weights, "paper" (per-class
             # inverse frequencies) or "caffe" (the released layer's two); normalize: divide each image's sum
             # over the pixels by their count (default false: the sum, as the reference)
             "balance": (str,), "normalize": (bool,)},
}
CHOICES = {
    ("", "backbone_init"): ("imagenet",),
    ("data", "layout"): ("voc", "sbd", "synthetic", "pets", "edges", "folder", "classification_folder",
                         "classification_list", "voc_detection", "coco_detection", "skeleton"),
    ("data", "interpolation"): ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5"),
    ("data", "erasing_fill"): ("random", "mean", "normal"),
    ("optimizer", "name"): ("sgd", "adam", "adamw", "rmsprop"),
    ("schedule", "kind"): ("constant", "step", "poly", "piecewise", "cosine"),
    ("schedule", "step_unit"): ("iterations", "epochs"),
    ("loss", "name"): ("sparse_cross_entropy", "sparse_focal_loss", "balanced_sigmoid_cross_entropy", "multibox",
                       "rcnn", "scale_balanced_cross_entropy"),
    ("loss", "balance"): ("paper", "caffe"),
    ("loss", "convention"): ("pyfaster", "torchvision"),
}
# Numbers that may be negative: R-CNN's SVM score thresholds.
SIGNED = {("loss", "hard_threshold"), ("loss", "evict_threshold")}
REQUIRED = (("", "model"), ("optimizer", "name"), ("optimizer", "learning_rate"), ("training", "batch_size"),
            ("loss", "name"))


class RecipeError(ValueError):
    """A recipe file or override that does not fit the schema."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    source: str  # the file it was read from
    model: str
    description: str
    model_options: dict
    data: dict
    optimizer: dict
    schedule: dict
    training: dict
    loss: dict
    backbone_init: str | None = None
    init_from: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def list_recipes() -> list[str]:
    """Names of the recipes shipped with kseg."""
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".toml"))


def _path(name_or_path) -> str:
    name_or_path = os.fspath(name_or_path)
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise RecipeError(f"recipe file {name_or_path} does not exist")
        return name_or_path
    path = os.path.join(RECIPE_DIR, name_or_path + ".toml")
    if not os.path.isfile(path):
        close = difflib.get_close_matches(name_or_path, list_recipes(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RecipeError(f"unknown recipe {name_or_path!r}.{hint} Shipped recipes: {', '.join(list_recipes())}")
    return path


def _check(source, section, key, value):
    where = f"{source}: [{section}] {key}" if section else f"{source}: {key}"
    if section not in SCHEMA:
        raise RecipeError(f"{source}: unknown section [{section}]; known: {sorted(s for s in SCHEMA if s)}")
    if section == "model_options":
        return
    known = SCHEMA[section]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: unknown key{hint}; [{section or 'top level'}] accepts {sorted(known)}")
    types = known[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise RecipeError(f"{where}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise RecipeError(f"{where}: {value!r} is not one of {choices}")
    if isinstance(value, _NUM) and not isinstance(value, bool) and value < 0 and (section, key) not in SIGNED:
        raise RecipeError(f"{where}: must be >= 0, got {value!r}")


def _parse_override(text: str, source: str):
    """'training.epochs=3' -> ("training", "epochs", 3); the value is read as TOML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise RecipeError(f"{source}: override {text!r} must look like section.key=value, e.g. training.epochs=3")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: a string
    return section, key, value


def apply_overrides(recipe: Recipe, overrides) -> Recipe:
    """A copy of `recipe` with "section.key" values replaced (a dict, or a list of "a.b=v" strings)."""
    if not overrides:
        return recipe
    items = overrides.items() if isinstance(overrides, dict) else [
        ((s + "." + k), v) for s, k, v in (_parse_override(o, recipe.source) for o in overrides)]
    sections = {s: copy.deepcopy(getattr(recipe, s)) for s in SCHEMA if s}
    for dotted, value in items:
        section, _, key = dotted.partition(".")
        if section not in sections:
            raise RecipeError(f"{recipe.source}: override {dotted!r}: unknown section [{section}]; "
                              f"known: {sorted(sections)}")
        _check(f"{recipe.source} (override)", section, key, value)
        sections[section][key] = value
        if section == "optimizer" and key == "learning_rate" and sections["schedule"].get("values") \
                and recipe.optimizer.get("learning_rate"):
            # A piecewise schedule's rates are absolute: a new base rate scales the whole sequence.
            factor = float(value) / float(recipe.optimizer["learning_rate"])
            sections["schedule"]["values"] = [float(v) * factor for v in sections["schedule"]["values"]]
        if section == "training" and key in ("epochs", "iterations"):
            # A length given on the command line replaces the recipe's, whichever unit it used.
            sections[section].pop("iterations" if key == "epochs" else "epochs", None)
    return dataclasses.replace(recipe, **sections)


def load_recipe(name_or_path, overrides=None) -> Recipe:
    """Read and validate a recipe; `overrides` maps "section.key" to values (or is a list of "a.b=v")."""
    path = _path(name_or_path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    sections = {s: {} for s in SCHEMA if s}
    for key, value in raw.items():
        if isinstance(value, dict):
            if key not in sections:
                raise RecipeError(f"{path}: unknown section [{key}]; known: {sorted(sections)}")
            for k, v in value.items():
                _check(path, key, k, v)
            sections[key] = copy.deepcopy(value)
        else:
            _check(path, "", key, value)
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    name = os.path.splitext(os.path.basename(path))[0]
    recipe = apply_overrides(Recipe(name=name, source=path, model=top.get("model", ""),
                                    description=top.get("description", ""), backbone_init=top.get("backbone_init"),
                                    init_from=top.get("init_from"),
                                    **sections), overrides)
    sections = {s: getattr(recipe, s) for s in SCHEMA if s}
    for section, key in REQUIRED:
        present = key in (top if not section else sections[section])
        if not present:
            raise RecipeError(f"{path}: missing required key {f'[{section}] ' if section else ''}{key}")
    training = sections["training"]
    if "epochs" in training and "iterations" in training:
        raise RecipeError(f"{path}: [training] gives both epochs and iterations; give one")
    if "epochs" not in training and "iterations" not in training:
        raise RecipeError(f"{path}: [training] needs epochs or iterations")
    schedule = sections["schedule"]
    kind = schedule.get("kind", "constant")
    need = {"step": ("step_size",), "piecewise": ("boundaries", "values"), "poly": (), "constant": (),
            "cosine": ()}[kind]
    for key in need:
        if key not in schedule:
            raise RecipeError(f"{path}: [schedule] kind {kind!r} needs {key}")
    if kind == "piecewise" and len(schedule["values"]) != len(schedule["boundaries"]) + 1:
        raise RecipeError(f"{path}: [schedule] piecewise needs one more value than boundaries")
    if kind != "cosine" and any(k in schedule for k in ("warmup", "warmup_start", "min_lr")):
        raise RecipeError(f"{path}: [schedule] warmup, warmup_start and min_lr belong to kind \"cosine\", "
                          f"not {kind!r}")
    optimizer = sections["optimizer"]
    if "ema" in optimizer and not 0 < optimizer["ema"] < 1:
        raise RecipeError(f"{path}: [optimizer] ema is a decay in (0, 1), e.g. 0.9998, got {optimizer['ema']!r}")
    if "rho" in optimizer and optimizer["name"] != "rmsprop":
        raise RecipeError(f"{path}: [optimizer] rho is RMSprop's: name = \"rmsprop\" takes it, "
                          f"not {optimizer['name']!r}")
    for pattern, factor in optimizer.get("lr_multipliers", {}).items():
        if isinstance(factor, bool) or not isinstance(factor, _NUM) or factor < 0:
            raise RecipeError(f"{path}: [optimizer] lr_multipliers[{pattern!r}] must be a number >= 0, got {factor!r}")
    if not all(isinstance(p, str) for p in optimizer.get("no_weight_decay", [])):
        raise RecipeError(f"{path}: [optimizer] no_weight_decay must be a list of variable path patterns (strings)")
    data = sections["data"]
    for section, key in (("data", "switch_prob"), ("data", "mix_prob"), ("data", "cutout"), ("data", "erasing"),
                         ("loss", "label_smoothing")):
        value = sections[section].get(key)
        if value is not None and value > 1:
            raise RecipeError(f"{path}: [{section}] {key} is a probability in [0, 1], got {value!r}")
    if ("eval_resize" in data) != ("eval_crop" in data):
        raise RecipeError(f"{path}: [data] eval_resize and eval_crop go together (resize the shorter side, "
                          "then crop the centre)")
    if "eval_crop" in data:
        crop = data["eval_crop"]
        sides = [crop] if isinstance(crop, int) else crop
        if not (1 <= len(sides) <= 2 and all(isinstance(v, int) and 0 < v <= data["eval_resize"] for v in sides)):
            raise RecipeError(f"{path}: [data] eval_crop must be an int or [h, w] no larger than eval_resize "
                              f"({data['eval_resize']}), got {crop!r}")
    return recipe


def soft_labels(recipe: Recipe) -> bool:
    """Whether the recipe trains on soft (one-hot, mixed or smoothed) labels rather than class ids."""
    return bool(recipe.data.get("mixup") or recipe.data.get("cutmix") or recipe.loss.get("label_smoothing"))
