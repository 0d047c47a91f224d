"""kseg.identity: one answer to "what is this model" for a name, a built model, a file, a run."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
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


def test_keras_own_save_keeps_the_identity_and_plain_keras_still_loads_it(tmp_path):
    model = kseg.build_model("resnet50", num_classes=7, layout="torchvision", input_shape=(32, 32, 3))
    for suffix in (".keras", ".h5"):
        path = str(tmp_path / f"r{suffix}")
        model.save(path)
        ident = identify(path)
        assert (ident.architecture, ident.layout, ident.preprocessing, ident.num_classes) == \
               ("resnet50", "torchvision", TORCH, 7)
    # The identity is an extra key of the model's config: Keras without kseg ignores it.
    code = ("import os, sys; os.environ['KERAS_BACKEND'] = 'tensorflow'; import keras; "
            "print([keras.saving.load_model(p).count_params() for p in sys.argv[1:]], 'kseg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.keras"), str(tmp_path / "r.h5")],
                         capture_output=True, text=True, timeout=300, check=True).stdout.split("\n")[-2]
    assert out == f"[{model.count_params()}, {model.count_params()}] False"


def test_a_model_checkpoint_written_during_fit_keeps_the_identity(tmp_path):
    model = kseg.build_model("deeplab_largefov", num_classes=3, width=0.125, input_shape=(24, 24, 3))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.zeros((2, 24, 24, 3), "float32")
    y = np.zeros((2, 24, 24, 1), "int32")
    path = str(tmp_path / "ckpt.keras")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(path)])
    ident = identify(path)
    assert (ident.architecture, ident.build_kwargs["width"], ident.preprocessing) == ("deeplab_largefov", 0.125, CAFFE)
    from convert.api import load_keras

    assert md.model_info(load_keras(path)) == {"name": "deeplab_largefov", "kwargs": ident.build_kwargs}


def test_training_and_serving_apply_the_same_preprocessing(tmp_path):
    from convert.tf_serving import export

    recipe = load_recipe("segnet_pets")
    model = kseg.build_model(recipe.model, **{**recipe.model_options, "input_shape": (32, 32, 3)})
    path = export(model, str(tmp_path / "models" / "pets"), image_size=(32, 32))
    served = resolve_preprocessing(json.loads(open(f"{path}/assets/kseg.json").read())["preprocessing"])
    assert served == input_preprocessing(recipe) == BATCHNORM
    resnet = kseg.build_model("resnet50", num_classes=4, layout="torchvision", input_shape=(32, 32, 3))
    path = export(resnet, str(tmp_path / "models" / "resnet"))
    assert resolve_preprocessing(json.loads(open(f"{path}/assets/kseg.json").read())["preprocessing"]) == TORCH
