"""kseg.identity: one answer to "what is this model" for a name, a built model, a file, a run."""

from __future__ import annotations

import json

import pytest

import kseg
from kseg import identity as md
from kseg.identity import identify, resolve_preprocessing
from kseg.registry import BATCHNORM, CAFFE, TORCH
from kseg.train import load_recipe
from kseg.train.fit import input_preprocessing


def test_the_weight_layout_decides_the_preprocessing_not_the_name():
    assert identify("resnet50").preprocessing is CAFFE
    assert identify("resnet50", {"layout": "torchvision"}).preprocessing is TORCH
    assert identify("resnet50", {"layout": "torchvision"}).layout == "torchvision"
    assert identify("segnet", {"input_bn": True}).preprocessing is BATCHNORM
    assert identify("segnet").preprocessing is CAFFE


def test_a_name_a_model_and_its_files_agree(tmp_path):
    kwargs = {"num_classes": 3, "width": 0.125}
    model = kseg.build_model("deeplab_largefov", **kwargs)
    by_name, by_model = identify("deeplab_largefov", kwargs), identify(model)
    assert (by_name.architecture, by_name.layout, by_name.preprocessing, by_name.num_classes, by_name.task) == \
           (by_model.architecture, by_model.layout, by_model.preprocessing, by_model.num_classes, by_model.task) == \
           ("deeplab_largefov", None, CAFFE, 3, "segmentation")
    path = str(tmp_path / "m.keras")
    model.save(path)
    assert identify(path) is None  # Keras' own save records nothing kseg can read
    md.write_keras(path, md.build_metadata(model, class_names=["a", "b", "c"]))
    by_file = identify(path)
    assert (by_file.architecture, by_file.build_kwargs, by_file.preprocessing, by_file.class_names) == \
           ("deeplab_largefov", kwargs, CAFFE, ("a", "b", "c"))


def test_a_training_run_file_beside_a_checkpoint_names_the_model_and_layout(tmp_path):
    model = kseg.build_model("resnet50", num_classes=4, layout="torchvision", input_shape=(32, 32, 3))
    path = tmp_path / "best.keras"
    model.save(str(path))
    (tmp_path / md.RUN_FILE).write_text(json.dumps({"model": "resnet50", "model_kwargs": {"layout": "torchvision"}}))
    ident = identify(str(path))
    assert (ident.architecture, ident.layout, ident.preprocessing) == ("resnet50", "torchvision", TORCH)
    assert ident.source.endswith(md.RUN_FILE)


def test_recipes_train_on_their_models_preprocessing():
    # SegNet's Pet recipe builds the input-BatchNorm net: it must be fed raw pixels, as served.
    assert input_preprocessing(load_recipe("segnet_pets")) is BATCHNORM
    assert input_preprocessing(load_recipe("deeplab_largefov_voc")) is CAFFE


def test_preprocessing_resolves_kinds_names_and_metadata_and_refuses_the_rest():
    assert resolve_preprocessing("torch") is TORCH
    assert resolve_preprocessing("vgg16") is CAFFE
    assert resolve_preprocessing(CAFFE.to_dict()) == CAFFE
    with pytest.raises(ValueError, match="neither a kind"):
        resolve_preprocessing("no_such_thing")
    with pytest.raises(TypeError):
        resolve_preprocessing(3)
