"""alexnet's include_top / pooling options (as vgg16's and resnet's) and its torchvision parts: the
features and classifier views share the model's weights, compose to the model, and equal torchvision's
`model.features` / `model.classifier` from the same state_dict."""

import keras
import numpy as np
import pytest

import kseg
from kseg.models.alexnet import alexnet_classifier, alexnet_features
from kseg.weights import load_weights

TOL = 1e-4


@pytest.fixture(scope="module")
def alexnet():
    model = kseg.build_model("alexnet")
    yield model
    keras.backend.clear_session()


def test_default_model_unchanged(alexnet):
    assert alexnet.count_params() == 61_100_840 == kseg.get_spec("alexnet").params
    assert alexnet.input.shape == (None, 224, 224, 3) and alexnet.output.shape == (None, 1000)
    assert [layer.name for layer in alexnet.layers if layer.weights] == [
        "conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]


@pytest.mark.parametrize("pooling, shape, last", [(None, (None, None, None, 256), "pool5"),
                                                  ("avg", (None, 256), "avg_pool"),
                                                  ("max", (None, 256), "max_pool")])
def test_include_top_false_ends_at_pool5(pooling, shape, last):
    model = kseg.build_model("alexnet", include_top=False, pooling=pooling)
    assert model.output.shape == shape and model.layers[-1].name == last
    assert model.count_params() == 2_469_696
    assert not {"avgpool", "fc6", "fc7", "fc8"} & {layer.name for layer in model.layers}
    # Any input size down to 63 (pool5 1 x 1); 224 gives torchvision's 6 x 6 x 256.
    assert model(keras.Input((63, 63, 3))).shape[1:] == ((1, 1, 256) if pooling is None else (256,))
    assert model(keras.Input((224, 224, 3))).shape[1:] == ((6, 6, 256) if pooling is None else (256,))


def test_pooling_must_be_known():
    with pytest.raises(ValueError, match="pooling must be None, 'avg' or 'max'"):
        kseg.build_model("alexnet", include_top=False, pooling="sum")


def test_views_share_the_weights_and_compose_to_the_model(alexnet):
    config = alexnet.get_config()
    features, classifier = alexnet_features(alexnet), alexnet_classifier(alexnet)
    assert features.output.shape == (None, 6, 6, 256) and classifier.input.shape == (None, 6, 6, 256)
    assert classifier.output.shape == (None, 1000)
    ids = lambda model: [id(v) for v in model.weights]  # noqa: E731
    assert ids(features) + ids(classifier) == ids(alexnet)  # the same variables, each in one part
    assert features.count_params() == 2_469_696
    x = np.random.default_rng(0).uniform(-2, 2, (2, 224, 224, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(classifier(features(x))), np.asarray(alexnet(x)))
    # A change to the model shows through the views.
    kernel = alexnet.get_layer("fc8").kernel
    kernel.assign(kernel * 2.0)
    np.testing.assert_array_equal(np.asarray(classifier.get_layer("fc8").kernel), np.asarray(kernel))
    np.testing.assert_array_equal(np.asarray(classifier(features(x))), np.asarray(alexnet(x)))
    # The views add nothing to the model itself (its saved config).
    assert alexnet.get_config() == config


def test_views_name_what_is_missing():
    notop = kseg.build_model("alexnet", include_top=False)
    assert alexnet_features(notop).output.shape == (None, None, None, 256)
    with pytest.raises(ValueError, match="no AlexNet classifier.*include_top=False"):
        alexnet_classifier(notop)
    with pytest.raises(ValueError, match="lenet5 has no AlexNet features.*not kseg's alexnet"):
        alexnet_features(kseg.build_model("lenet5"))


def test_parts_equal_torchvisions_from_one_state_dict(alexnet, tmp_path):
    # kseg.build_model("alexnet", include_top=False, weights=...) takes the full torchvision file (its
    # classifier keys are skipped) and equals torchvision's model.features at any size; the full model's
    # views equal model.features and avgpool + flatten + model.classifier.
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    torch.manual_seed(0)
    module = ref.AlexNet().eval()
    path = tmp_path / "alexnet.pth"
    torch.save(module.state_dict(), path)
    notop = kseg.build_model("alexnet", include_top=False, weights=path)
    rng = np.random.default_rng(1)
    for size in [(97, 129), (224, 224)]:
        x = rng.uniform(-2, 2, (1, *size, 3)).astype("float32")
        with torch.no_grad():
            want = module.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
        got = np.asarray(notop(x))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())
    # The same weights in the full model: its features view gives pool5, its classifier view the logits.
    load_weights(alexnet, path, spec=kseg.get_spec("alexnet"))
    with torch.no_grad():
        pool5 = module.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        logits = module.classifier(torch.flatten(module.avgpool(pool5), 1)).numpy()
    pool5 = pool5.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(alexnet_features(alexnet)(x))
    np.testing.assert_allclose(got, pool5, rtol=TOL, atol=TOL * np.abs(pool5).max())
    got = np.asarray(alexnet_classifier(alexnet)(pool5))
    np.testing.assert_allclose(got, logits, rtol=TOL, atol=TOL * np.abs(logits).max())
