import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kseg  # noqa: E402, F401  (pins the TensorFlow backend before keras is imported)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The legacy .h5 writer shares Keras' layer-config serialization with .keras, so for the models
# over 50M parameters (0.2-0.5 GB files each) test_models.py's .h5 round trip is in the slow set;
# the .keras one runs for every model.
BIG_MODEL_PARAMS = 50_000_000


# Their round trips (.keras: 13-19 s each on 2 cores) repeat a sibling's layers at a larger size:
# fcn8s covers the FCN variants' VGG trunk, crops and deconvolutions, the ResNet50 models the
# 101-layer ones, alexnet rcnn_alexnet's trunk (tests/test_rcnn.py saves and reloads a small R-CNN
# with its warp) and fcn_alexnet's (with fcn8s' crops and deconvolutions), segnet segnet_tutorial's
# argmax pooling and BatchNorms, vgg16 the plain VGGs', vgg11_bn the other _bn ones', resnet50
# resnet152's bottlenecks and resnet18 resnet34's basic blocks; faster_rcnn_vgg16 fast_rcnn_vgg16's
# trunk and head, fcn_resnet50 + deeplab_largefov deeplab_largefov_resnet50's, segnet_basic segnet's
# argmax pooling. Their .keras and .h5 round trips run in the slow set.
# The new classifier families use Keras' own layers only (the round trip tests kseg's serialization):
# mobilenet_v3_small's round trips cover MobileNetV2's and DenseNet's, repvgg_a0's its siblings'.
SIBLING_COVERED = {"fcn16s", "fcn32s", "fcn8s_atonce", "deeplab_largefov_resnet101", "fcn_resnet101", "resnet101",
                   "faster_rcnn_resnet101_c4", "rcnn_alexnet", "fcn_alexnet", "segnet_tutorial", "resnet152",
                   "resnet34", "vgg11", "vgg13", "vgg19", "vgg13_bn", "vgg19_bn", "fast_rcnn_vgg16",
                   "deeplab_largefov_resnet50", "segnet", "mobilenet_v2", "densenet121", "deit_tiny_distilled"}


# Exporting a plainly saved model to TF Serving (test_models.py) traces and verifies four
# signatures; the default suite does it for the models up to this size (their layers: every kind the
# bigger ones hold, segnet_basic's unpooling, deeplab's dilations, hed's crops), the slow set for all.
EXPORT_DEFAULT_PARAMS = 22_000_000
# ... and not these, whose serving signatures a sibling's export exercises in the default suite (segnet_basic:
# argmax unpooling; hed: crops, deconvolutions and the edge signatures fsds' skeleton_images follows, tested on
# its own in tests/test_fsds.py; the classification export of lenet5 and the recipes' end-to-end tests: a
# classifier's signatures, which resnet18 / resnet34 add nothing to).
# The new families' signatures are every classifier's (lenet5's and deit_tiny's exports run by default);
# mobilenet_v3_small's and mobilevit_xxs' layers are traced by their default ONNX conversions.
EXPORT_SIBLING_COVERED = {"fsds", "segnet_tutorial", "resnet18", "resnet34", "mobilenet_v2", "densenet121",
                          "repvgg_a0", "deit_tiny_distilled", "mobilenet_v3_small", "mobilevit_xxs"}


# Every generic test of these (build, forward, snapshot, save) is in the slow set: variants of a family whose
# default-suite member runs the same builder code (vgg16, vgg11_bn, resnet50), their parameter counts asserted
# by tests/test_classification_variants.py without a forward pass.
# The 101-layer ResNets beside the 50-layer ones and FCN-32s/16s/at-once beside FCN-8s likewise (their counts:
# test_models.py's build-only test_parameter_count_without_a_run).
GENERIC_SLOW = {"resnet152", "vgg11", "vgg13", "vgg19", "vgg13_bn", "vgg19_bn", "resnet101", "fcn_resnet101",
                "deeplab_largefov_resnet101", "faster_rcnn_resnet101_c4", "fcn16s", "fcn32s", "fcn8s_atonce",
                "mobilenet_v3_large", "densenet169", "densenet201", "repvgg_a1", "repvgg_a2", "repvgg_b0",
                "repvgg_b1", "vit_b_16", "deit_small", "deit_base", "deit_small_distilled", "deit_base_distilled",
                "mobilevit_xs", "mobilevit_s"}

# Classifiers whose fixed 224 top the conversion tests leave out (lenet5's, alexnet's and vgg16's are
# converted whole): their trunks (include_top=False) at 64x64.
TRUNK_ONLY = tuple(name for name in kseg.list_models(task="classification")
                   if name not in ("lenet5", "alexnet", "vgg16"))


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec and item.module.__name__ == "test_models" and callspec.params.get("built") in GENERIC_SLOW:
            item.add_marker(pytest.mark.slow)
            continue
        if item.originalname == "test_plain_keras_save_exports_with_no_flags" and callspec:
            name = callspec.params["built"]
            if kseg.get_spec(name).params > EXPORT_DEFAULT_PARAMS or name in EXPORT_SIBLING_COVERED:
                item.add_marker(pytest.mark.slow)
            continue
        if item.originalname != "test_save_and_reload" or not callspec:
            continue
        name, suffix = callspec.params["built"], callspec.params.get("suffix")
        big = kseg.get_spec(name).params > BIG_MODEL_PARAMS
        if big and suffix == ".h5" or name in SIBLING_COVERED:  # both formats of a sibling-covered model
            item.add_marker(pytest.mark.slow)
