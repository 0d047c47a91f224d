"""Pretrained weights by name (kseg.pretrained): the registry of published files, and download,
verification, caching and the mirror against a real HTTP server on loopback serving files the
tests write. No internet: every URL here is 127.0.0.1."""

import contextlib
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import kseg
from kseg import pretrained
from kseg.identity import identify, read_metadata
from kseg.registry import TORCH, Preprocessing

# The classic MNIST normalisation: not lenet5's registry default ("unit"), so the tests see it travel.
MNIST = Preprocessing("mnist", mean=(0.1307,), std=(0.3081,), scale=1 / 255.0)
DIGITS = [f"digit {i}" for i in range(10)]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  (http.server's name)
        self.server.requests.append(self.path)
        body, mode = self.server.files.get(self.path, (None, None))
        if body is None or mode == "error":
            self.send_error(404 if body is None else 500)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # "truncated": the promised length, half the body, then the connection closes.
        self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(files):
    """An HTTP server on 127.0.0.1 (a free port) in a thread: files {"/path": (bytes, mode)}."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.requests = files, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """KSEG_HOME in tmp_path, no mirror, and the weights registry restored after the test."""
    monkeypatch.setenv("KSEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KSEG_WEIGHTS_MIRROR", raising=False)
    entries, aliases = dict(pretrained._ENTRIES), dict(pretrained._ALIASES)
    yield tmp_path / "home"
    pretrained._ENTRIES.clear()
    pretrained._ENTRIES.update(entries)
    pretrained._ALIASES.clear()
    pretrained._ALIASES.update(aliases)


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    """(bytes of a lenet5 .weights.h5, the model's weights)."""
    model = kseg.build_model("lenet5")
    model.set_weights([np.random.default_rng(1).normal(size=w.shape).astype("float32") for w in model.get_weights()])
    path = tmp_path_factory.mktemp("w") / "lenet5.weights.h5"
    model.save_weights(path)
    return path.read_bytes(), model.get_weights()


def _register(url, data, **extra):
    if extra.get("sha256") is None:
        extra["sha256"] = hashlib.sha256(data).hexdigest()
    return kseg.register_weights("lenet5", "digits", url=url, class_names=DIGITS, preprocessing=MNIST,
                                 eval_transform=(36, 32, "bilinear"), metric={"dataset": "test", "acc@1": 99.0},
                                 source="written by tests/test_pretrained.py", **extra)


def _cache_files(home):
    folder = home / "weights"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_first_build_downloads_and_caches_then_the_cache_works_offline(home, lenet_file):
    data, want = lenet_file
    with serving({"/w/lenet5-digits.weights.h5": (data, "ok")}) as (server, origin):
        entry = _register(f"{origin}/w/lenet5-digits.weights.h5", data)
        model = kseg.build_model("lenet5", weights="digits")
        assert server.requests == ["/w/lenet5-digits.weights.h5"]
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), want))
    path = home / "weights" / "lenet5" / "lenet5-digits.weights.h5"
    assert entry.cache_path() == str(path) and path.read_bytes() == data
    assert _cache_files(home) == ["lenet5", "lenet5/.lenet5-digits.weights.h5.verified",
                                  "lenet5/lenet5-digits.weights.h5"]
    # The server is gone: the cached file is used, without the network.
    again = kseg.build_model("lenet5", weights="digits")
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), want))
    ident = identify(again)
    assert (ident.weights, ident.preprocessing, ident.class_names, ident.eval_transform) == \
           ("digits", MNIST, tuple(DIGITS), (36, 32, "bilinear"))


@pytest.mark.parametrize("mode", ["wrong_hash", "truncated", "error", "missing", "offline"])
def test_bad_downloads_leave_the_cache_untouched_and_name_the_url(home, lenet_file, mode):
    data, _ = lenet_file
    files = {"/w/bad.weights.h5": (data, {"truncated": "truncated", "error": "error"}.get(mode, "ok"))}
    with serving(files) as (server, origin):
        url = f"{origin}/w/{'absent' if mode == 'missing' else 'bad'}.weights.h5"
        entry = _register(url, data, sha256="0" * 64 if mode == "wrong_hash" else None)
        if mode == "offline":
            server.shutdown()
            server.server_close()
        error = pretrained.WeightsHashError if mode == "wrong_hash" else pretrained.WeightsUnavailableError
        with pytest.raises(error) as caught:
            kseg.build_model("lenet5", weights="digits")
    text = str(caught.value)
    assert url in text and entry.cache_path() in text, text
    assert {"wrong_hash": "sha256", "truncated": "cut short", "error": "HTTP 500", "missing": "HTTP 404",
            "offline": "Error"}[mode] in text
    assert _cache_files(home) in ([], ["lenet5"])  # no file, no stamp, no partial download


def test_a_cached_file_that_fails_its_hash_is_downloaded_again(home, lenet_file):
    data, _ = lenet_file
    with serving({"/w/lenet5-digits.weights.h5": (data, "ok")}) as (server, origin):
        entry = _register(f"{origin}/w/lenet5-digits.weights.h5", data)
        os.makedirs(os.path.dirname(entry.cache_path()))
        with open(entry.cache_path(), "wb") as f:  # put there by hand, and wrong
            f.write(b"not the weights")
        with pytest.warns(UserWarning, match="downloading it again"):
            assert pretrained.ensure(entry) == entry.cache_path()
        assert len(server.requests) == 1
    with open(entry.cache_path(), "rb") as f:
        assert f.read() == data
    assert [problem for _, _, problem in pretrained.verify_cache("lenet5")] == [None]


def test_a_file_put_in_the_cache_by_hand_is_verified_and_used_offline(home, lenet_file):
    data, _ = lenet_file
    entry = _register("http://127.0.0.1:9/w/lenet5-digits.weights.h5", data)  # port 9: nothing listens
    os.makedirs(os.path.dirname(entry.cache_path()))
    with open(entry.cache_path(), "wb") as f:
        f.write(data)
    assert pretrained.ensure(entry) == entry.cache_path()
    with open(entry.cache_path(), "ab") as f:  # changed after verification: checked again, fails, refetch fails
        f.write(b"x")
    with pytest.warns(UserWarning), pytest.raises(pretrained.WeightsUnavailableError, match="127.0.0.1:9"):
        pretrained.ensure(entry)
    assert [problem is not None for _, _, problem in pretrained.verify_cache("lenet5")] == [True]


def test_the_mirror_variable_replaces_every_origin_and_keeps_the_file_name(home, lenet_file, monkeypatch):
    data, want = lenet_file
    with serving({"/mirror/lenet5-digits.weights.h5": (data, "ok")}) as (server, origin):
        entry = _register("https://weights.example.invalid/some/dir/lenet5-digits.weights.h5", data)
        monkeypatch.setenv("KSEG_WEIGHTS_MIRROR", f"{origin}/mirror/")
        assert entry.download_url() == f"{origin}/mirror/lenet5-digits.weights.h5"
        model = kseg.build_model("lenet5", weights="digits")
        assert server.requests == ["/mirror/lenet5-digits.weights.h5"]
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), want))
    assert pretrained.get_weights("vgg16", "imagenet").download_url() == \
        f"{origin}/mirror/vgg16_weights_tf_dim_ordering_tf_kernels.h5"


def test_a_model_built_with_named_weights_exports_its_preprocessing_and_class_names(home, lenet_file, tmp_path):
    data, _ = lenet_file
    with serving({"/lenet5-digits.weights.h5": (data, "ok")}) as (_, origin):
        _register(f"{origin}/lenet5-digits.weights.h5", data, aliases=("DIGITS_V1",))
        model = kseg.build_model("lenet5", weights="DIGITS_V1")
    want = (MNIST, tuple(DIGITS), (36, 32, "bilinear"), "digits")
    # Keras' own save: the identity travels in the model's config, the registry is not needed to read it.
    path = str(tmp_path / "m.keras")
    model.save(path)
    pretrained._ENTRIES.pop(("lenet5", "digits"))
    ident = identify(path)
    assert (ident.preprocessing, ident.class_names, ident.eval_transform, ident.weights) == want
    meta = read_metadata(path)
    assert meta["class_names"] == DIGITS and meta["weights"] == "digits"
    # Through conversion: a .keras loaded back and written as kseg metadata keeps all of it.
    from convert.api import load_keras
    from kseg.identity import build_metadata, of_metadata

    ident = of_metadata(json.loads(json.dumps(build_metadata(load_keras(path)))))
    assert (ident.preprocessing, ident.class_names, ident.eval_transform, ident.weights) == want
    pytest.importorskip("tf2onnx")
    from convert.onnx_format import export_onnx
    from convert.onnx_format import read_metadata as read_onnx

    onnx_path = export_onnx(model, str(tmp_path / "m.onnx"))
    ident = of_metadata(read_onnx(onnx_path))
    assert (ident.preprocessing, ident.class_names, ident.eval_transform, ident.weights) == want


def test_registered_names_resolve_and_unknown_names_are_refused(home):
    with pytest.raises(ValueError, match=r"imagenet_notop.*imagenet_torchvision"):
        kseg.build_model("resnet50", weights="imagenett")
    with pytest.raises(ValueError, match="no weights are registered for it"):
        kseg.build_model("lenet5", weights="imagenet")
    with pytest.raises(FileNotFoundError, match="not found"):  # a path stays a path
        kseg.build_model("lenet5", weights="no_such_file.h5")
    assert pretrained.get_weights("resnet50", "IMAGENET1K_V2").name == "imagenet_torchvision_v2"
    with pytest.raises(ValueError, match="already has weights"):
        kseg.register_weights("resnet50", "imagenet", url="https://x.invalid/a.h5", md5="0" * 32)
    with pytest.raises(ValueError, match="no layout"):
        kseg.register_weights("lenet5", "x", url="https://x.invalid/a.h5", md5="0" * 32, layout="torchvision")
    with pytest.raises(ValueError, match="sha256= .* or md5="):
        kseg.register_weights("lenet5", "x", url="https://x.invalid/a.h5")


def test_named_weights_imply_their_build_options_and_backbones_resolve(home, monkeypatch):
    # The file itself is not downloaded here: ensure returns a stand-in and loading is skipped.
    seen = []
    monkeypatch.setattr(pretrained, "ensure", lambda entry, **_: seen.append(entry) or None)
    ssd = pretrained.get_weights("ssd300", "coco")
    assert pretrained.build_options(ssd, kseg.get_spec("ssd300").layouts) == {"layout": "torchvision",
                                                                             "num_classes": 91}
    from kseg.api import pretrained_identity

    info = pretrained_identity(kseg.get_spec("ssd300"), {"layout": "torchvision", "num_classes": 91}, ssd)
    assert info["preprocessing"]["kind"] == "torch_ssd" and len(info["class_names"]) == 91
    assert info["class_names"][:2] == ["__background__", "person"] and "eval_transform" not in info
    seg = pretrained_identity(kseg.get_spec("fcn8s"), {}, None, pretrained.get_weights("vgg16", "imagenet_torchvision"))
    assert seg == {"backbone_weights": "imagenet_torchvision", "preprocessing": TORCH.to_dict()}
    # SegNet's input BatchNorm layout keeps its own normalisation whatever the backbone.
    bn = pretrained_identity(kseg.get_spec("segnet"), {"input_bn": True}, None,
                             pretrained.get_weights("vgg16", "imagenet_notop"))
    assert bn["preprocessing"]["kind"] == "batchnorm"
    top = pretrained_identity(kseg.get_spec("resnet50"), {"include_top": False},
                              pretrained.get_weights("resnet50", "imagenet_torchvision_v2"))
    assert "class_names" not in top and top["preprocessing"]["kind"] == "torch"
    with pytest.raises(ValueError, match="no ImageNet backbone"):
        kseg.build_model("lenet5", backbone_weights="imagenet")
    assert seen == []


# --- the built-in registry ------------------------------------------------------------


def test_every_builtin_entry_names_its_source_hash_licence_and_fits_its_model():
    entries = [e for e in pretrained.list_weights() if e.source != "written by tests/test_pretrained.py"]
    assert {(e.model, e.name) for e in entries} >= {
        ("vgg16", "imagenet"), ("vgg16", "imagenet_torchvision"), ("resnet50", "imagenet"),
        ("resnet50", "imagenet_torchvision"), ("resnet50", "imagenet_torchvision_v2"),
        ("alexnet", "imagenet_torchvision"),
        ("fcn_resnet50", "coco_voc"), ("fcn_resnet101", "coco_voc"), ("ssd300", "coco")}
    sizes = {"imagenet": 1000, "voc": 21, "coco91": 91}
    for e in entries:
        where = f"{e.model} {e.name}"
        assert e.url.startswith(("https://storage.googleapis.com/tensorflow/keras-applications/",
                                 "https://download.pytorch.org/models/")), where
        assert re.search(r"(keras-team/keras keras/src/applications/|pytorch/vision torchvision/models/)\S+\.py",
                         e.source), where
        assert "licence:" in e.source and e.license and e.description, where
        if e.url.startswith("https://download.pytorch.org/"):
            assert e.sha256 and f"-{e.sha256}." in e.filename and e.size_mb and e.metric, where  # torch.hub's prefix
        else:
            assert e.md5 and len(e.md5) == 32, where
        spec = kseg.get_spec(e.model)
        assert e.layout is None or e.layout in spec.layouts, where
        assert set(e.options) <= set(__import__("inspect").signature(spec.builder).parameters), where
        if e.classes is not None:
            assert len(e.class_names) == sizes[e.classes] == e.options.get("num_classes", spec.num_classes), where
        assert e.resolved_preprocessing() == spec.preprocessing_for(e.layout), where
    names = pretrained.load_class_names("imagenet")
    assert names[:3] == ("tench", "goldfish", "great white shark") and names[-1] == "toilet tissue"
    assert pretrained.load_class_names("voc")[0] == "__background__"
    assert pretrained.load_class_names("coco91").count("N/A") == 10  # 80 classes + background + 10 unused ids


def test_importing_the_registry_loads_nothing_and_the_cli_lists_it_without_keras(tmp_path):
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        import kseg.pretrained as p
        state = {"entries": len(p.list_weights()), "lists": p.load_class_names.cache_info().currsize}
        from kseg.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            codes = [main(["weights", "list", "resnet50"]), main(["weights", "path", "vgg16", "imagenet"]),
                     main(["weights", "verify"])]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        print(json.dumps({**state, "codes": codes, "heavy": heavy[:5], "out": out.getvalue()}))
    """)
    env = {**os.environ, "KSEG_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["entries"] >= 15 and got["lists"] == 0 and got["heavy"] == []
    assert got["codes"] == [0, 1, 0]  # path: not downloaded yet
    assert "imagenet_torchvision_v2" in got["out"] and "80.858" in got["out"]
    assert str(tmp_path / "weights" / "vgg16" / "vgg16_weights_tf_dim_ordering_tf_kernels.h5") in got["out"]


def test_cli_fetch_and_verify(home, lenet_file, capsys):
    from kseg.cli import main

    data, _ = lenet_file
    with serving({"/lenet5-digits.weights.h5": (data, "ok")}) as (_, origin):
        entry = _register(f"{origin}/lenet5-digits.weights.h5", data)
        assert main(["weights", "fetch", "lenet5", "digits"]) == 0
    assert capsys.readouterr().out.strip() == entry.cache_path()
    assert main(["weights", "path", "lenet5", "digits"]) == 0
    assert main(["weights", "verify", "lenet5"]) == 0
    with open(entry.cache_path(), "r+b") as f:
        f.write(b"\0" * 16)
    assert main(["weights", "verify", "lenet5"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["weights", "fetch", "lenet5", "nope"]) == 2


def test_kseg_export_of_a_registry_name_with_named_weights_serves_their_classes_and_transform(home, lenet_file,
                                                                                              tmp_path):
    from kseg.cli import main

    data, _ = lenet_file
    with serving({"/lenet5-digits.weights.h5": (data, "ok")}) as (_, origin):
        _register(f"{origin}/lenet5-digits.weights.h5", data)
        assert main(["export", "lenet5", "--weights", "digits", "--serving", str(tmp_path / "models" / "lenet")]) == 0
    with open(tmp_path / "models" / "lenet" / "1" / "assets" / "kseg.json") as f:
        meta = json.load(f)
    assert meta["class_names"] == DIGITS and meta["weights"] == "digits"
    assert meta["preprocessing"] == json.loads(json.dumps(MNIST.to_dict()))
    assert meta["serving"]["eval_transform"] == [36, 32, "bilinear"]


def test_training_with_a_named_backbone_feeds_the_weights_preprocessing(home, monkeypatch):
    from kseg.train import load_recipe
    from kseg.train.fit import _named_backbone
    from kseg.train.inputs import input_preprocessing

    monkeypatch.setattr(pretrained, "ensure", lambda entry, **_: f"/cache/{entry.filename}")
    recipe, path, name = _named_backbone(load_recipe("deeplab_largefov_voc"), "imagenet_torchvision")
    assert (path, name) == ("/cache/vgg16-397923af.pth", "imagenet_torchvision")
    assert input_preprocessing(recipe) == TORCH and recipe.data["preprocessing"] == "torch"
    pets = load_recipe("segnet_pets")  # its input BatchNorm normalises: the backbone's preprocessing stays out
    recipe, _, _ = _named_backbone(pets, "imagenet_notop")
    assert input_preprocessing(recipe) == input_preprocessing(pets) and "preprocessing" not in recipe.data
    assert _named_backbone(pets, "vgg16.h5") == (pets, "vgg16.h5", None)


# --- the classifier families' entries (MobileNetV2/V3, DenseNet) ------------------------------------

# torchvision's num_params (its Weights enums' meta; trainable parameters here, in either layout: Keras'
# count_params() adds the BatchNorm moving statistics) and the classes of each family's entries.
TV_PARAMS = {"mobilenet_v2": 3_504_872, "mobilenet_v3_large": 5_483_032, "mobilenet_v3_small": 2_542_856,
             "densenet121": 7_978_856, "densenet169": 14_149_480, "densenet201": 20_013_928}
FAMILY_WEIGHTS = {
    # keras.applications publishes no hash for MobileNetV2's files: torchvision's only.
    "mobilenet_v2": {"imagenet_torchvision", "imagenet_torchvision_v2"},
    "mobilenet_v3_large": {"imagenet", "imagenet_notop", "imagenet_torchvision", "imagenet_torchvision_v2"},
    "mobilenet_v3_small": {"imagenet", "imagenet_notop", "imagenet_torchvision"},
    **{f"densenet{n}": {"imagenet", "imagenet_notop", "imagenet_torchvision"} for n in (121, 169, 201)},
}
# torchvision's files (torchvision/models/mobilenetv2.py, mobilenetv3.py, densenet.py): URL file name,
# _file_size, acc@1, acc@5, ImageClassification's resize_size (crop 224, bilinear).
TV_FILES = {
    ("mobilenet_v2", "IMAGENET1K_V1"): ("mobilenet_v2-b0353104.pth", 13.555, 71.878, 90.286, 256),
    ("mobilenet_v2", "IMAGENET1K_V2"): ("mobilenet_v2-7ebf99e0.pth", 13.598, 72.154, 90.822, 232),
    ("mobilenet_v3_large", "IMAGENET1K_V1"): ("mobilenet_v3_large-8738ca79.pth", 21.114, 74.042, 91.340, 256),
    ("mobilenet_v3_large", "IMAGENET1K_V2"): ("mobilenet_v3_large-5c1a4163.pth", 21.107, 75.274, 92.566, 232),
    ("mobilenet_v3_small", "IMAGENET1K_V1"): ("mobilenet_v3_small-047dcff4.pth", 9.829, 67.668, 87.402, 256),
    ("densenet121", "IMAGENET1K_V1"): ("densenet121-a639ec97.pth", 30.845, 74.434, 91.972, 256),
    ("densenet169", "IMAGENET1K_V1"): ("densenet169-b2777c0a.pth", 54.708, 75.600, 92.806, 256),
    ("densenet201", "IMAGENET1K_V1"): ("densenet201-c1103571.pth", 77.373, 76.896, 93.370, 256),
}


def _family_entries():
    return [e for model in FAMILY_WEIGHTS for e in pretrained.list_weights(model)]


def test_the_classifier_families_entries_are_complete():
    assert {m: {e.name for e in pretrained.list_weights(m)} for m in FAMILY_WEIGHTS} == FAMILY_WEIGHTS
    for e in _family_entries():
        where = f"{e.model} {e.name}"
        spec = kseg.get_spec(e.model)
        top = e.options.get("include_top", True)
        assert e.license and "licence:" in e.source and e.description, where
        assert e.resolved_preprocessing() == spec.preprocessing_for(e.layout), where
        assert e.resolved_preprocessing().kind == ("tf" if e.model.startswith("mobilenet") and e.layout == "keras"
                                                   else "torch"), where
        if top:  # a classifier file: its 1000 classes and the publisher's top-1 accuracy
            assert e.classes == "imagenet" and len(e.class_names) == spec.num_classes == 1000, where
            assert e.metric["dataset"] == "ImageNet-1K" and e.metric["acc@1"] > 60, where
        else:
            assert e.classes is None and not e.metric and e.layout == "keras", where
        if e.layout == "torchvision":
            file_name, size, top1, top5, resize = TV_FILES[(e.model, e.aliases[0])]
            assert e.url == f"https://download.pytorch.org/models/{file_name}", where
            assert (e.size_mb, e.metric, e.eval_transform) == \
                (size, {"dataset": "ImageNet-1K", "acc@1": top1, "acc@5": top5}, (resize, 224, "bilinear")), where
        else:
            assert e.layout == "keras" and e.md5 and e.sha256 is None and e.eval_transform is None, where


def _keras_source(module):
    import importlib.util

    with open(importlib.util.find_spec(f"keras.src.applications.{module}").origin, encoding="utf-8") as f:
        return f.read()


def test_the_keras_entries_have_keras_own_urls_and_hashes():
    # Against the installed keras' own source, which downloads these files.
    from keras.src.applications import densenet, mobilenet_v3

    text = _keras_source("densenet")
    for arch in ("densenet121", "densenet169", "densenet201"):
        top, notop = pretrained.get_weights(arch, "imagenet"), pretrained.get_weights(arch, "imagenet_notop")
        assert top.url == getattr(densenet, f"{arch.upper()}_WEIGHT_PATH")
        assert notop.url == getattr(densenet, f"{arch.upper()}_WEIGHT_PATH_NO_TOP")
        for entry in (top, notop):
            assert re.search(rf'"{entry.filename}",\s*{arch.upper()}_WEIGHT_PATH\w*,\s*cache_subdir="models",\s*'
                             rf'file_hash="{entry.md5}"', text), entry
    for arch, size in (("mobilenet_v3_large", "large"), ("mobilenet_v3_small", "small")):
        top, notop = pretrained.get_weights(arch, "imagenet"), pretrained.get_weights(arch, "imagenet_notop")
        model_name = f"{size}_224_1.0_float"  # alpha 1.0, not minimalistic: build_model's defaults
        assert (top.md5, notop.md5) == mobilenet_v3.WEIGHTS_HASHES[model_name]
        assert top.url == f"{mobilenet_v3.BASE_WEIGHT_PATH}weights_mobilenet_v3_{model_name}.h5"
        assert notop.url == f"{mobilenet_v3.BASE_WEIGHT_PATH}weights_mobilenet_v3_{model_name}_no_top_v2.h5"
    assert 'f"weights_mobilenet_v3_{model_name}_no_top_v2.h5"' in _keras_source("mobilenet_v3")
    # Were keras to publish MobileNetV2's hashes, they belong in the registry.
    assert "file_hash" not in _keras_source("mobilenet_v2")


def _build_each(entries):
    """Each entry's build options built once (no weights): the output the file fits, and the trainable count."""
    import keras

    seen = set()
    for e in entries:
        options = pretrained.build_options(e, kseg.get_spec(e.model).layouts)
        key = (e.model, tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        model = kseg.build_model(e.model, **options)
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        if e.options.get("include_top", True):
            assert model.output_shape == (None, 1000) and trainable == TV_PARAMS[e.model], (e, trainable)
        else:
            assert len(model.output_shape) == 4 and not any(layer.name == "predictions" for layer in model.layers), e
        keras.backend.clear_session()
    return seen


def test_the_mobilenet_entries_build_options_build_the_model():
    entries = [e for e in _family_entries() if e.model.startswith("mobilenet")]
    assert len(_build_each(entries)) == 7  # v2: torchvision; v3 large, small: keras, keras without top, torchvision


@pytest.mark.slow
def test_the_densenet_entries_build_options_build_the_model():
    assert len(_build_each([e for e in _family_entries() if e.model.startswith("densenet")])) == 9


def test_a_torchvision_family_entry_loads_torchvision_keys_and_records_its_identity(home, tmp_path, monkeypatch):
    # A state_dict with torchvision's module names (the test suite's reference module) stands in for the download.
    torch = pytest.importorskip("torch")
    import torch_reference_mobilenet as ref

    torch.manual_seed(0)
    state = ref.MobileNetV3("small").state_dict()
    path = tmp_path / "mobilenet_v3_small-047dcff4.pth"
    torch.save(state, path)
    monkeypatch.setattr(pretrained, "ensure", lambda entry, **_: str(path))
    model = kseg.build_model("mobilenet_v3_small", weights="IMAGENET1K_V1")
    kernel, bias = model.get_layer("predictions").get_weights()
    np.testing.assert_array_equal(kernel, state["classifier.3.weight"].numpy().T)
    np.testing.assert_array_equal(bias, state["classifier.3.bias"].numpy())
    ident = identify(model)
    assert (ident.weights, ident.layout, ident.preprocessing, ident.eval_transform) == \
        ("imagenet_torchvision", "torchvision", TORCH, (256, 224, "bilinear"))
    assert ident.class_names == pretrained.load_class_names("imagenet")


@pytest.mark.parametrize("model,name,algo", [("densenet121", "imagenet", "md5"),
                                             ("mobilenet_v3_small", "imagenet_notop", "md5"),
                                             ("mobilenet_v2", "imagenet_torchvision_v2", "sha256")])
def test_a_family_file_with_another_hash_is_refused_and_nothing_is_cached(home, monkeypatch, model, name, algo):
    entry = pretrained.get_weights(model, name)
    with serving({f"/mirror/{entry.filename}": (b"not the published weights", "ok")}) as (server, origin):
        monkeypatch.setenv("KSEG_WEIGHTS_MIRROR", f"{origin}/mirror")
        with pytest.raises(pretrained.WeightsHashError, match=f"its {algo} is"):
            kseg.build_model(model, weights=name)
        assert server.requests == [f"/mirror/{entry.filename}"]
    assert _cache_files(home) in ([], [model])
