"""One generic test over every registered model: build, run, count, snapshot, round-trip."""

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import GENERIC_SLOW

import kseg
from kseg.cli import main
from kseg.identity import identify, resolve_preprocessing

SNAPSHOTS = Path(__file__).parent / "snapshots" / "models"
UPDATE = os.environ.get("KSEG_UPDATE_SNAPSHOTS") == "1"

# Per-model input for the smoke run. Default: classifiers at the registry's input size;
# dense-prediction models at a small odd, non-square size (output must come back at it).
SMOKE_INPUT = {"faster_rcnn_vgg16": (160, 192, 3),  # any size: a small one
               "faster_rcnn_resnet50_c4": (96, 128, 3), "faster_rcnn_resnet101_c4": (96, 128, 3)}


# Smoke-run build options: a few proposals per image for the two-stage detectors (fast_rcnn_vgg16's
# second input, region proposals after the image; the ResNet-C4 heads' RoIs).
SMOKE_BUILD = {"fast_rcnn_vgg16": {"num_proposals": 32}, "faster_rcnn_resnet50_c4": {"post_nms_top_n": 32},
               "faster_rcnn_resnet101_c4": {"post_nms_top_n": 32}, "rcnn_alexnet": {"num_proposals": 16}}
SMOKE_INPUT["fast_rcnn_vgg16"] = SMOKE_INPUT["rcnn_alexnet"] = (96, 128, 3)


def _proposals(rng, batch, h, w, rows):
    """Random xyxy boxes in pixels (some across the image's edges), the last quarter zero padding rows."""
    xy = rng.uniform(-0.1, 0.9, size=(batch, rows, 2)) * (w, h)
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.6, size=(batch, rows, 2)) * (w, h)], axis=-1)
    boxes[:, rows - rows // 4:] = 0.0
    return boxes.astype("float32")


def _input_for(spec, rng):
    if spec.name in SMOKE_INPUT:
        h, w, c = SMOKE_INPUT[spec.name]
    elif not spec.task_object.dense:
        h, w, c = spec.input_shape
    else:
        h, w, c = 97, 129, spec.input_shape[2]
    x = rng.uniform(0, 1, size=(2, h, w, c)).astype("float32")
    if "num_proposals" in SMOKE_BUILD.get(spec.name, {}):
        return [x, _proposals(rng, 2, h, w, SMOKE_BUILD[spec.name]["num_proposals"])]
    return x


@pytest.fixture(scope="module", params=kseg.list_models())
def built(request):
    spec = kseg.get_spec(request.param)
    model = kseg.build_model(spec.name, **SMOKE_BUILD.get(spec.name, {}))
    x = _input_for(spec, np.random.default_rng(0))
    y = model.predict(x, verbose=0)
    yield spec, model, x, y
    keras.backend.clear_session()


@pytest.mark.parametrize("name", sorted(GENERIC_SLOW))
def test_parameter_count_without_a_run(name):
    # The models whose generic tests are all in the slow set (conftest.GENERIC_SLOW): their counts, built only.
    model = kseg.build_model(name, **SMOKE_BUILD.get(name, {}))
    assert model.count_params() == kseg.get_spec(name).params
    keras.backend.clear_session()


def test_output_shape_and_finite(built):
    spec, model, x, y = built
    outputs = y if isinstance(y, list) else [y]
    for out in outputs:
        assert np.all(np.isfinite(out)), f"{spec.name}: non-finite outputs"
        assert out.shape[0] == len(x[0] if isinstance(x, list) else x)
    if not spec.task_object.dense:
        # The task's prediction output has a class axis last (classifiers: (N, classes); detectors'
        # class scores: (N, anchors, classes)).
        head = spec.task_object.head(list(model.output_names), identify(model).options)
        scores = outputs[head.output_index]
        assert scores.shape[-1] == spec.num_classes and (len(outputs) > 1 or scores.ndim == 2)
    else:
        for out in outputs:
            assert out.shape[1:3] == x.shape[1:3], "dense prediction must come back at input size"
    # Different inputs must give different outputs (a constant network would pass the shape checks),
    # relative to the outputs' scale: untrained MobileNets' logits are ~1e-10 in inference mode.
    first = outputs[0]
    assert np.abs(first[0] - first[1]).max() > 1e-3 * np.abs(first).max()


def test_parameter_count_matches_reference(built):
    spec, model, _, _ = built
    assert model.count_params() == spec.params


def test_weight_names_and_shapes_snapshot(built):
    spec, model, _, _ = built
    current = [[v.path, list(v.shape)] for v in model.weights]
    path = SNAPSHOTS / f"{spec.name}.json"
    if UPDATE or not path.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"{path} is missing; run with KSEG_UPDATE_SNAPSHOTS=1 and commit it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=0) + "\n")
    assert json.loads(path.read_text()) == current, (
        f"weight names/shapes of {spec.name} changed; if intended, regenerate with KSEG_UPDATE_SNAPSHOTS=1"
    )


def test_plain_keras_save_exports_with_no_flags(built, tmp_path):
    # build_model -> Keras' own model.save() -> `kseg export` with no --preprocessing/--image-size.
    # Models over 30M parameters are in the slow set (conftest.py).
    spec, model, _, _ = built
    path = tmp_path / f"{spec.name}.keras"
    model.save(path)
    if len(model.inputs) > 1:  # Fast R-CNN's image + proposals: the image-only signatures refuse it
        assert main(["export", str(path), "--serving", str(tmp_path / "models" / spec.name)]) == 2
        assert not (tmp_path / "models" / spec.name).exists()
        return
    assert main(["export", str(path), "--serving", str(tmp_path / "models" / spec.name)]) == 0
    meta = json.loads((tmp_path / "models" / spec.name / "1" / "assets" / "kseg.json").read_text())
    assert meta["architecture"] == spec.name
    assert resolve_preprocessing(meta["preprocessing"]) == identify(model).preprocessing


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_save_and_reload(built, suffix, tmp_path):
    # The .h5 round trips of models over 50M parameters are marked slow in conftest.py.
    spec, model, x, y = built
    path = tmp_path / f"{spec.name}{suffix}"
    model.save(path)
    # Keras' own save keeps the model's kseg identity (in its config); kseg reads it back.
    saved, built_id = identify(str(path)), identify(model)
    assert (saved.architecture, saved.build_kwargs, saved.layout, saved.preprocessing, saved.num_classes) == \
           (built_id.architecture, built_id.build_kwargs, built_id.layout, built_id.preprocessing, built_id.num_classes)
    # No custom_objects: kseg's layers are registered serializable.
    reloaded = keras.saving.load_model(path, compile=False)
    again = reloaded.predict(x, verbose=0)
    for a, b in zip(again if isinstance(again, list) else [again], y if isinstance(y, list) else [y]):
        np.testing.assert_array_equal(a, b)
    assert [v.path for v in reloaded.weights] == [v.path for v in model.weights]
