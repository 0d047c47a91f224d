"""Pretrained weights by name: `kseg.build_model("resnet50", weights="imagenet")`.

A registry of published weight files beside the model registry. Each entry holds the file's
official URL, the hash its publisher checks it with (keras.applications: the file's MD5;
torchvision: the SHA-256 prefix in the file name, as torch.hub checks it), the size the publisher
states, the weight layout the file implies, its preprocessing, evaluation transform and class
names, the publisher's reported metric, its licence, and where each of these facts comes from.

Files are cached in `$KSEG_HOME/weights/<model>/<file name>` (KSEG_HOME defaults to ~/.kseg).
Offline first: a cached file is used without the network (verified once, then trusted while its
size and modification time stay the same; `kseg weights verify` re-hashes). Otherwise the file is
downloaded to a temporary file in the cache folder, its hash checked, and only then moved into
place (os.replace), so a failed, truncated or mismatching download never leaves a file behind.
`KSEG_WEIGHTS_MIRROR=URL` replaces the origin of every registered URL (the file name is kept), for
air-gapped mirrors. `kseg.register_weights(...)` adds entries (a user's own files or mirrors).

This module imports only the standard library: listing the registry loads no Keras.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings

HOME_ENV = "KSEG_HOME"
MIRROR_ENV = "KSEG_WEIGHTS_MIRROR"
TIMEOUT_ENV = "KSEG_DOWNLOAD_TIMEOUT"  # seconds without data before a download gives up (default 60)
CLASSNAMES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classnames")
# A weights name: letters, digits, "_" and "-" (a string with a dot or a slash is a file path).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
_CHUNK = 1 << 20


class WeightsUnavailableError(FileNotFoundError):
    """Named weights are not in the cache and could not be downloaded (no network, an HTTP error,
    a truncated download). The message names the URL and the path to put the file at."""


class WeightsHashError(ValueError):
    """A downloaded or cached weights file does not have its registered hash."""


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """One published weights file of a kseg model (see register_weights for the fields)."""

    model: str
    name: str
    url: str
    sha256: str | None = None  # the full hex digest, or the prefix the publisher checks (torchvision: 8 digits)
    md5: str | None = None  # keras.applications' file_hash
    size_mb: float | None = None  # as the publisher states it
    layout: str | None = None  # a key of the model spec's layouts (its build options), None: the default
    options: dict = dataclasses.field(default_factory=dict)  # further build options, e.g. num_classes=91
    preprocessing: object = None  # a kind ("caffe", "torch", ...) or a kseg.Preprocessing; None: the layout's
    eval_transform: tuple | None = None  # (resize shorter side, centre crop or None, interpolation)
    classes: object = None  # a shipped list ("imagenet", "voc", "coco91"), a sequence of names, or None
    metric: dict = dataclasses.field(default_factory=dict)  # {"dataset": ..., "<metric>": value, ...}
    license: str = ""
    source: str = ""  # where the URL, hash, size, metric and transforms come from
    aliases: tuple = ()  # other names, e.g. torchvision's enum member "IMAGENET1K_V2"
    description: str = ""

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlsplit(self.url).path)

    @property
    def hash_text(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else f"md5:{self.md5}"

    @property
    def class_names(self) -> tuple | None:
        if self.classes is None:
            return None
        return load_class_names(self.classes) if isinstance(self.classes, str) else tuple(self.classes)

    def resolved_preprocessing(self):
        """The kseg.Preprocessing these weights expect (imports the model registry)."""
        from kseg.registry import PREPROCESSING, Preprocessing, get_spec

        if isinstance(self.preprocessing, Preprocessing):
            return self.preprocessing
        if self.preprocessing is not None:
            return PREPROCESSING[self.preprocessing]
        return get_spec(self.model).preprocessing_for(self.layout)

    def metric_text(self) -> str:
        values = [f"{k} {v:g}" for k, v in self.metric.items() if k != "dataset"]
        return (", ".join(values) + (f" ({self.metric['dataset']})" if "dataset" in self.metric else "")) or "-"

    def download_url(self) -> str:
        """The URL, its origin replaced by $KSEG_WEIGHTS_MIRROR when that is set."""
        mirror = os.environ.get(MIRROR_ENV, "").strip()
        return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url

    def cache_path(self) -> str:
        return os.path.join(cache_dir(), self.model, self.filename)

    def cached(self) -> bool:
        return os.path.isfile(self.cache_path())


@functools.lru_cache(maxsize=None)
def load_class_names(list_name: str) -> tuple:
    """A class-name list shipped in kseg/classnames/<list_name>.txt (one name a line, '#' comments)."""
    path = os.path.join(CLASSNAMES_DIR, f"{list_name}.txt")
    if not os.path.isfile(path):
        known = sorted(f[:-4] for f in os.listdir(CLASSNAMES_DIR) if f.endswith(".txt"))
        raise ValueError(f"no class-name list {list_name!r}; shipped: {', '.join(known)}")
    with open(path, encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip() and not line.startswith("#"))


def cache_dir() -> str:
    """$KSEG_HOME/weights (KSEG_HOME defaults to ~/.kseg)."""
    home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".kseg")
    return os.path.join(home, "weights")


# --- the registry ---------------------------------------------------------------------

_ENTRIES: dict[tuple[str, str], WeightsEntry] = {}
_ALIASES: dict[tuple[str, str], str] = {}


def _add(entry: WeightsEntry, replace=False) -> WeightsEntry:
    for name in (entry.name, *entry.aliases):
        if not NAME.fullmatch(name):
            raise ValueError(f"weights name {name!r}: use letters, digits, '_' and '-' (a dot or slash means a path)")
        taken = _ALIASES.get((entry.model, name))
        if taken is not None and not (replace and taken == entry.name):
            raise ValueError(f"{entry.model} already has weights named {name!r} (pass replace=True to replace them)")
    if entry.sha256 is None and entry.md5 is None:
        raise ValueError(f"{entry.model} {entry.name}: give sha256= (a hex digest or its prefix) or md5=")
    if entry.sha256 is not None and not re.fullmatch(r"[0-9a-f]{8,64}", entry.sha256):
        raise ValueError(f"{entry.model} {entry.name}: sha256 must be 8 to 64 lowercase hex digits, "
                         f"got {entry.sha256!r}")
    if entry.md5 is not None and not re.fullmatch(r"[0-9a-f]{32}", entry.md5):
        raise ValueError(f"{entry.model} {entry.name}: md5 must be 32 lowercase hex digits, got {entry.md5!r}")
    if urllib.parse.urlsplit(entry.url).scheme not in ("http", "https", "file") or not entry.filename:
        raise ValueError(f"{entry.model} {entry.name}: url must be an http(s) or file URL ending in a file name, "
                         f"got {entry.url!r}")
    old = _ENTRIES.pop((entry.model, entry.name), None)
    for alias in old.aliases if old else ():
        _ALIASES.pop((entry.model, alias), None)
    _ENTRIES[(entry.model, entry.name)] = entry
    for name in (entry.name, *entry.aliases):
        _ALIASES[(entry.model, name)] = entry.name
    return entry


def register_weights(model, name, *, url, sha256=None, md5=None, size_mb=None, layout=None, options=None,
                     preprocessing=None, eval_transform=None, class_names=None, metric=None, license="",
                     source="", aliases=(), description="", replace=False) -> WeightsEntry:
    """Register a weights file for `model` under `name`, so build_model(model, weights=name) finds it.

    url: where to download it (http, https or file); the cache keeps its file name. sha256: its
    hex digest or a prefix of it; md5: its MD5 (at least one). layout: the model's layout the
    file needs (a key of get_spec(model).layouts); options: further build options it implies (e.g.
    {"num_classes": 91}). preprocessing: a kind or kseg.Preprocessing (default: the layout's).
    eval_transform: (resize shorter side, crop or None, interpolation). class_names: a sequence
    of names or a shipped list ("imagenet", "voc", "coco91"). metric: {"dataset": ..., name: value}.
    A name already registered for the model raises unless replace=True.
    """
    from kseg.registry import get_spec

    spec = get_spec(model)
    if layout is not None and layout not in spec.layouts:
        raise ValueError(f"{model} has no layout {layout!r}; its layouts: {sorted(spec.layouts) or 'none'}")
    names = tuple(class_names) if class_names is not None and not isinstance(class_names, str) else class_names
    transform = tuple(eval_transform) if eval_transform is not None else None
    return _add(WeightsEntry(model, name, url, sha256=sha256.lower() if sha256 else None,
                             md5=md5.lower() if md5 else None, size_mb=size_mb, layout=layout,
                             options=dict(options or {}), preprocessing=preprocessing, eval_transform=transform,
                             classes=names, metric=dict(metric or {}), license=license, source=source,
                             aliases=tuple(aliases), description=description), replace=replace)


def list_weights(model: str | None = None) -> list[WeightsEntry]:
    """The registered entries (of one model), sorted by model and name."""
    return [e for k, e in sorted(_ENTRIES.items()) if model is None or e.model == model]


def get_weights(model: str, name: str) -> WeightsEntry:
    """The entry `name` (or an alias) names for `model`; ValueError listing the model's names otherwise."""
    key = _ALIASES.get((model, name))
    if key is None:
        have = [e.name for e in list_weights(model)]
        listed = f"its weights: {', '.join(have)}" if have else "no weights are registered for it"
        raise ValueError(f"{name!r} is neither a file nor registered weights of {model} ({listed}; "
                         "`kseg weights list` shows them all)")
    return _ENTRIES[(model, key)]


def lookup(model: str, weights) -> WeightsEntry | None:
    """The entry a build_model `weights=` value names: None for None or a file path (an existing
    file, or text with a dot or slash); ValueError for an unknown name."""
    if not isinstance(weights, str) or not NAME.fullmatch(weights) or os.path.exists(weights):
        return None
    return get_weights(model, weights)


def build_options(entry: WeightsEntry, layouts: dict) -> dict:
    """The build options a full-model entry implies: its layout's (from the spec's `layouts`) and its own."""
    return {**layouts.get(entry.layout, {}), **entry.options}


# --- cache, download, verification ---------------------------------------------------


def ensure(entry: WeightsEntry, *, show: bool | None = None) -> str:
    """The path of the entry's verified file in the cache, downloading it first if needed.

    show: draw a progress bar on standard error (default: when it is a terminal)."""
    path = entry.cache_path()
    if os.path.isfile(path):
        if _stamped(path, entry):
            return path
        problem = _mismatch(entry, _hash_file(path, entry))
        if problem is None:
            _stamp(path, entry)
            return path
        warnings.warn(f"{path}: {problem}; downloading it again", stacklevel=2)
    _download(entry, path, sys.stderr.isatty() if show is None else show)
    return path


def _hashers(entry):
    return {algo: hashlib.new(algo) for algo in ("sha256", "md5") if getattr(entry, algo)}


def _hash_file(path, entry):
    hashers = _hashers(entry)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
    return hashers


def _mismatch(entry, hashers) -> str | None:
    """None when every registered hash matches, else what differs."""
    for algo, h in hashers.items():
        want, got = getattr(entry, algo), h.hexdigest()
        if not got.startswith(want):
            return f"its {algo} is {got}, the registered {entry.model} {entry.name!r} weights have {want}"
    return None


def _stamp_path(path):
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.verified")


def _stamp(path, entry):
    st = os.stat(path)
    with open(_stamp_path(path), "w") as f:
        json.dump({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": entry.hash_text}, f)


def _stamped(path, entry) -> bool:
    """The file was verified against this entry's hash and has not changed since."""
    try:
        with open(_stamp_path(path)) as f:
            stamp = json.load(f)
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": entry.hash_text}


def _unavailable(entry, url, path, reason):
    mirror = "" if os.environ.get(MIRROR_ENV) else f", or set {MIRROR_ENV} to a server holding {entry.filename}"
    return WeightsUnavailableError(
        f"cannot download {entry.model} weights {entry.name!r} from {url}: {reason}. Nothing was written to "
        f"the cache. Without network access, fetch {entry.filename} elsewhere and put it at {path} "
        f"(kseg checks its {entry.hash_text} on first use){mirror}")


def _download(entry, path, show):
    from kseg.progress import transfer

    url = entry.download_url()
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{entry.filename}.", suffix=".part")
    try:
        hashers, got, total = _hashers(entry), 0, None
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=float(os.environ.get(TIMEOUT_ENV, 60))) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    with transfer(show, f"{entry.model} {entry.name}", total) as advance:
                        for chunk in iter(lambda: response.read(_CHUNK), b""):
                            out.write(chunk)
                            for h in hashers.values():
                                h.update(chunk)
                            got += len(chunk)
                            advance(len(chunk))
            except urllib.error.HTTPError as e:
                raise _unavailable(entry, url, path, f"HTTP {e.code} {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                raise _unavailable(entry, url, path, f"{type(e).__name__}: {reason}") from None
        if total is not None and got != total:
            raise _unavailable(entry, url, path, f"the download was cut short ({got:,} of {total:,} bytes)")
        problem = _mismatch(entry, hashers)
        if problem is not None:
            raise WeightsHashError(f"{url}: the downloaded file is not the registered one: {problem} "
                                   f"({got:,} bytes); nothing was written to {path}")
        os.replace(tmp, path)
        _stamp(path, entry)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify_cache(model: str | None = None) -> list[tuple[WeightsEntry, str, str | None]]:
    """Re-hash every cached file of the registered entries (of one model): [(entry, path, problem
    or None)]; a file that passes is re-stamped, one that fails loses its stamp."""
    results = []
    for entry in list_weights(model):
        path = entry.cache_path()
        if not os.path.isfile(path):
            continue
        problem = _mismatch(entry, _hash_file(path, entry))
        if problem is None:
            _stamp(path, entry)
        elif os.path.exists(_stamp_path(path)):
            os.remove(_stamp_path(path))
        results.append((entry, path, problem))
    return results


# --- the published weights ----------------------------------------------------------

# Licences. keras.applications: the notice of fchollet/deep-learning-models README.md ("License"),
# where keras.applications' weights were first published; DenseNet and MobileNetV3 are not in that notice:
# the licences of the releases they were converted from. torchvision: pytorch/vision README.md
# ("Pre-trained Model License").
_VGG_LICENSE = "CC BY 4.0 (VGG's Oxford release, ported by Keras)"
_RESNET_LICENSE = "MIT (Kaiming He's deep-residual-networks release, ported by Keras)"
_DENSENET_LICENSE = "BSD-3-Clause (Zhuang Liu's Torch DenseNet release, ported by Keras)"
_DENSENET_LICENSE_SOURCE = ("licence: liuzhuang13/DenseNet LICENSE (the Torch release keras-team/keras-applications "
                            "README.md cites for DenseNet121/169/201)")
_MOBILENET_V3_LICENSE = "Apache-2.0 (TensorFlow Models' MobileNetV3 checkpoints, converted by Keras)"
_MOBILENET_V3_LICENSE_SOURCE = ("licence: tensorflow/models LICENSE (research/slim's MobileNetV3 checkpoints, which "
                                "keras/src/applications/mobilenet_v3.py's table names)")
_TV_LICENSE = ("torchvision: BSD-3-Clause code; its weights 'may have their own licenses or terms and conditions "
               "derived from the dataset used for training' ({data})")
_KERAS_LICENSE_SOURCE = "licence: fchollet/deep-learning-models README.md (License)"
_TV_LICENSE_SOURCE = "licence: pytorch/vision README.md (Pre-trained Model License)"
_KERAS_TABLE = "size and accuracy: https://keras.io/api/applications/ (Available models)"


def _keras(model, cls, module, url, md5, notop_md5, size_mb, top1, top5, constants, license, *,
           preprocessing="caffe", notop_url=None, metric_source=_KERAS_TABLE, license_source=_KERAS_LICENSE_SOURCE,
           note="", notop_note=None):
    """keras.applications' `imagenet` file and its `imagenet_notop` (notop_url: default the `_notop.h5` name).
    preprocessing: the file's input (keras.applications' preprocess_input mode); top5 None: one published figure;
    note, notop_note: appended to the descriptions (notop_note: default note)."""
    base = dict(model=model, layout="keras", preprocessing=preprocessing, license=license)
    where = f"keras-team/keras keras/src/applications/{module} ({constants})"
    metric = {"dataset": "ImageNet-1K", "acc@1": top1, **({"acc@5": top5} if top5 is not None else {})}
    _add(WeightsEntry(
        name="imagenet", url=url, md5=md5, size_mb=size_mb, classes="imagenet", metric=metric,
        source=f"URL, md5: {where}; {metric_source}; class names: kseg/classnames/imagenet.txt (torchvision's; keras' "
               f"imagenet_class_index.json has the same order); {license_source}",
        description=f"keras.applications.{cls}(weights='imagenet'){note}", **base))
    _add(WeightsEntry(
        name="imagenet_notop", url=notop_url or url.replace(".h5", "_notop.h5"), md5=notop_md5,
        options={"include_top": False}, source=f"URL, md5: {where}; {license_source}",
        description=f"keras.applications.{cls}(weights='imagenet', include_top=False)"
                    f"{note if notop_note is None else notop_note}", **base))


def _tv(model, name, enum, module, url, size_mb, metric, *, preprocessing="torch", layout=None,
        eval_transform=None, classes="imagenet", options=None, data="ImageNet"):
    file_prefix = re.search(r"-([a-f0-9]+)\.", url).group(1)  # torch.hub's check: sha256 starts with it
    _add(WeightsEntry(
        model=model, name=name, url=url, sha256=file_prefix, size_mb=size_mb, layout=layout,
        options=dict(options or {}), preprocessing=preprocessing, eval_transform=eval_transform, classes=classes,
        metric=metric, license=_TV_LICENSE.format(data=data), aliases=(enum.split(".")[-1],),
        source=f"URL, sha256 prefix (the file name's, checked by torch.hub), _file_size, _metrics, transforms: "
               f"pytorch/vision torchvision/models/{module} ({enum}); class names: torchvision/models/_meta.py; "
               f"{_TV_LICENSE_SOURCE}",
        description=f"torchvision {enum}"))


_TV_CROP = (256, 224, "bilinear")  # ImageClassification(crop_size=224): resize_size=256, bilinear
_TV_CROP_V2 = (232, 224, "bilinear")  # ImageClassification(crop_size=224, resize_size=232)
_KEY = "https://storage.googleapis.com/tensorflow/keras-applications"
_PT = "https://download.pytorch.org/models"


def _imagenet(top1, top5):
    return {"dataset": "ImageNet-1K", "acc@1": top1, "acc@5": top5}


_keras("vgg16", "VGG16", "vgg16.py", f"{_KEY}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
       "64373286793e3c8b2b4e3219cbf3544b", "6d6bbae143d832006294945121d1f1fc", 528, 71.3, 90.1,
       "WEIGHTS_PATH, WEIGHTS_PATH_NO_TOP, file_hash", _VGG_LICENSE)
for _arch, _cls, _md5, _notop, _size, _t1, _t5 in (
        ("resnet50", "ResNet50", "2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626", 98,
         74.9, 92.1),
        ("resnet101", "ResNet101", "f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21", 171,
         76.4, 92.8)):
    _keras(_arch, _cls, "resnet.py", f"{_KEY}/resnet/{_arch}_weights_tf_dim_ordering_tf_kernels.h5", _md5, _notop,
           _size, _t1, _t5, "BASE_WEIGHTS_PATH, WEIGHTS_HASHES", _RESNET_LICENSE)
# DenseNet: keras.applications.densenet.preprocess_input is "torch" mode. The files' layer names are those of
# keras-team/keras-applications' densenet.py, which has the same file_hash values: `conv1/conv`, `conv1/bn` and
# `fc1000` where Keras 3 (and kseg) have `conv1_conv`, `conv1_bn` and `predictions`; every other name is the same.
_DENSENET_NOTE = " (file layer names conv1/conv, conv1/bn, fc1000: Keras 3's conv1_conv, conv1_bn, predictions)"
_DENSENET_NOTOP_NOTE = " (file layer names conv1/conv, conv1/bn: Keras 3's conv1_conv, conv1_bn)"
for _arch, _cls, _md5, _notop, _size, _t1, _t5 in (
        ("densenet121", "DenseNet121", "9d60b8095a5708f2dcce2bca79d332c7", "30ee3e1110167f948a6b9946edeeb738", 33,
         75.0, 92.3),
        ("densenet169", "DenseNet169", "d699b8f76981ab1b30698df4c175e90b", "b8c4d4c20dd625c148057b9ff1c1176b", 57,
         76.2, 93.2),
        ("densenet201", "DenseNet201", "1ceb130c1ea1b78c3bf6114dbdfd8807", "c13680b51ded0fb44dff2d8f86ac8bb1", 80,
         77.3, 93.6)):
    _keras(_arch, _cls, "densenet.py", f"{_KEY}/densenet/{_arch}_weights_tf_dim_ordering_tf_kernels.h5", _md5,
           _notop, _size, _t1, _t5, f"{_arch.upper()}_WEIGHT_PATH, {_arch.upper()}_WEIGHT_PATH_NO_TOP, file_hash",
           _DENSENET_LICENSE, preprocessing="torch", license_source=_DENSENET_LICENSE_SOURCE, note=_DENSENET_NOTE,
           notop_note=_DENSENET_NOTOP_NOTE)
# MobileNetV3 (alpha 1.0, 224, not minimalistic: WEIGHTS_HASHES["large_224_1.0_float"] etc.). keras.applications'
# model rescales its input itself (include_preprocessing=True: a Rescaling layer, x / 127.5 - 1, without weights,
# so the files hold none for it); kseg's model has no such layer and takes the rescaled input ("tf"). The files'
# layer names are those of tf.keras 2's mobilenet_v3.py, which has the same WEIGHTS_HASHES (`Conv`, `Conv/BatchNorm`,
# `expanded_conv/depthwise`, `.../squeeze_excite/Conv`, `Conv_2`, `Logits`, ...) where Keras 3 (and kseg) have
# `conv`, `conv_bn`, `expanded_conv_depthwise`, `..._squeeze_excite_conv`, `conv_2`, `logits`: `/BatchNorm` -> `_bn`,
# `/` -> `_`, lower case. No documented size; the accuracy is keras' docstring table's (top-1 only): keras.io's
# Available models table has no MobileNetV3.
_V3_NOTE = (" (input x / 127.5 - 1: the file's Rescaling layer has no weights, kseg's model has none; file layer "
            "names tf.keras 2's: Conv/BatchNorm, expanded_conv/depthwise, ... for Keras 3's conv_bn, "
            "expanded_conv_depthwise, ...)")
for _arch, _cls, _size, _md5, _notop, _t1 in (
        ("mobilenet_v3_large", "MobileNetV3Large", "large", "59e551e166be033d707958cf9e29a6a7",
         "07fb09a5933dd0c8eaafa16978110389", 75.6),
        ("mobilenet_v3_small", "MobileNetV3Small", "small", "8768d4c2e7dee89b9d02b2d03d65d862",
         "d3e8ec802a04aa4fc771ee12a9a9b836", 68.1)):
    _keras(_arch, _cls, "mobilenet_v3.py", f"{_KEY}/mobilenet_v3/weights_mobilenet_v3_{_size}_224_1.0_float.h5",
           _md5, _notop, None, _t1, None, "BASE_WEIGHT_PATH, WEIGHTS_HASHES, file_name", _MOBILENET_V3_LICENSE,
           preprocessing="tf", notop_url=f"{_KEY}/mobilenet_v3/weights_mobilenet_v3_{_size}_224_1.0_float_no_top_v2.h5",
           metric_source=f"accuracy: keras/src/applications/mobilenet_v3.py (BASE_DOCSTRING's table, "
                         f"mobilenet_v3_{_size}_1.0_224 Top1 Accuracy)",
           license_source=_MOBILENET_V3_LICENSE_SOURCE, note=_V3_NOTE)
# MobileNetV2: keras.applications publishes no hash for its files (mobilenet_v2.py fetches them without a
# file_hash), and an entry needs one: not registered.

_tv("alexnet", "imagenet_torchvision", "AlexNet_Weights.IMAGENET1K_V1", "alexnet.py",
    f"{_PT}/alexnet-owt-7be5be79.pth", 233.087, _imagenet(56.522, 79.066), eval_transform=_TV_CROP)
_tv("vgg16", "imagenet_torchvision", "VGG16_Weights.IMAGENET1K_V1", "vgg.py", f"{_PT}/vgg16-397923af.pth",
    527.796, _imagenet(71.592, 90.382), layout="torchvision", eval_transform=_TV_CROP)
_tv("resnet50", "imagenet_torchvision", "ResNet50_Weights.IMAGENET1K_V1", "resnet.py",
    f"{_PT}/resnet50-0676ba61.pth", 97.781, _imagenet(76.130, 92.862), layout="torchvision",
    eval_transform=_TV_CROP)
_tv("resnet50", "imagenet_torchvision_v2", "ResNet50_Weights.IMAGENET1K_V2", "resnet.py",
    f"{_PT}/resnet50-11ad3fa6.pth", 97.79, _imagenet(80.858, 95.434), layout="torchvision",
    eval_transform=_TV_CROP_V2)
_tv("resnet101", "imagenet_torchvision", "ResNet101_Weights.IMAGENET1K_V1", "resnet.py",
    f"{_PT}/resnet101-63fe2227.pth", 170.511, _imagenet(77.374, 93.546), layout="torchvision",
    eval_transform=_TV_CROP)
_tv("resnet101", "imagenet_torchvision_v2", "ResNet101_Weights.IMAGENET1K_V2", "resnet.py",
    f"{_PT}/resnet101-cd907fc2.pth", 170.53, _imagenet(81.886, 95.780), layout="torchvision",
    eval_transform=_TV_CROP_V2)
# SemanticSegmentation(resize_size=520): the shorter side resized to 520, no crop; VOC's 21 classes.
for _arch, _enum, _url, _size, _miou, _acc in (
        ("fcn_resnet50", "FCN_ResNet50_Weights", "fcn_resnet50_coco-1167a1af.pth", 135.009, 60.5, 91.4),
        ("fcn_resnet101", "FCN_ResNet101_Weights", "fcn_resnet101_coco-7ecb50ca.pth", 207.711, 63.7, 91.9)):
    _tv(_arch, "coco_voc", f"{_enum}.COCO_WITH_VOC_LABELS_V1", "segmentation/fcn.py",
        f"{_PT}/{_url}", _size, {"dataset": "COCO-val2017-VOC-labels", "miou": _miou, "pixel_acc": _acc},
        layout="torchvision", eval_transform=(520, None, "bilinear"), classes="voc", data="COCO")
# ObjectDetection: [0, 1] floats; the model's GeneralizedRCNNTransform resizes to 300x300 and normalises.
_tv("ssd300", "coco", "SSD300_VGG16_Weights.COCO_V1", "detection/ssd.py", f"{_PT}/ssd300_vgg16_coco-b556d3b4.pth",
    135.988, {"dataset": "COCO-val2017", "box_map": 25.1}, preprocessing="torch_ssd", layout="torchvision",
    options={"num_classes": 91}, classes="coco91", data="COCO")
# Classifier families: ImageClassification(crop_size=224) (V1: resize 256) or resize_size=232 (V2), bilinear.
for _name, _enum, _url, _size, _metric, _transform in (
        ("imagenet_torchvision", "IMAGENET1K_V1", "mobilenet_v2-b0353104.pth", 13.555, _imagenet(71.878, 90.286),
         _TV_CROP),
        ("imagenet_torchvision_v2", "IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth", 13.598, _imagenet(72.154, 90.822),
         _TV_CROP_V2)):
    _tv("mobilenet_v2", _name, f"MobileNet_V2_Weights.{_enum}", "mobilenetv2.py", f"{_PT}/{_url}", _size, _metric,
        layout="torchvision", eval_transform=_transform)
for _name, _enum, _url, _size, _metric, _transform in (
        ("imagenet_torchvision", "IMAGENET1K_V1", "mobilenet_v3_large-8738ca79.pth", 21.114,
         _imagenet(74.042, 91.340), _TV_CROP),
        ("imagenet_torchvision_v2", "IMAGENET1K_V2", "mobilenet_v3_large-5c1a4163.pth", 21.107,
         _imagenet(75.274, 92.566), _TV_CROP_V2)):
    _tv("mobilenet_v3_large", _name, f"MobileNet_V3_Large_Weights.{_enum}", "mobilenetv3.py", f"{_PT}/{_url}", _size,
        _metric, layout="torchvision", eval_transform=_transform)
_tv("mobilenet_v3_small", "imagenet_torchvision", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "mobilenetv3.py",
    f"{_PT}/mobilenet_v3_small-047dcff4.pth", 9.829, _imagenet(67.668, 87.402), layout="torchvision",
    eval_transform=_TV_CROP)
# DenseNet: ported from LuaTorch; the files keep the pre-0.3 dense-layer keys (`norm.1`, `conv.1`, ...), which the
# model spec's torch_keys renames before the import.
for _arch, _cls, _url, _size, _metric in (
        ("densenet121", "DenseNet121", "densenet121-a639ec97.pth", 30.845, _imagenet(74.434, 91.972)),
        ("densenet169", "DenseNet169", "densenet169-b2777c0a.pth", 54.708, _imagenet(75.600, 92.806)),
        ("densenet201", "DenseNet201", "densenet201-c1103571.pth", 77.373, _imagenet(76.896, 93.370))):
    _tv(_arch, "imagenet_torchvision", f"{_cls}_Weights.IMAGENET1K_V1", "densenet.py", f"{_PT}/{_url}", _size, _metric,
        layout="torchvision", eval_transform=_TV_CROP)
# RepVGG (timm's layout): timm publishes its files on the Hugging Face hub by repository id only
# (hf_hub_id="timm/", e.g. timm/repvgg_a0.rvgg_in1k), with no file hash in its source: not registered.
