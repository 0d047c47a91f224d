"""SegNet as the Oxford-IIIT Pet tutorial builds it (segnet_tutorial), its recipes, the colour jitter
they use, and the per-epoch prediction GIF (`kseg train --gif N`)."""

import textwrap

import keras
import numpy as np
import pytest
from PIL import Image, ImageSequence

import kseg
import kseg.data as kd
from kseg.cli import build_parser
from kseg.data.palette import colorize
from kseg.train import load_recipe, train
from kseg.train.fit import TrainingSetupError
from kseg.train.pictures import prediction_gif


def test_the_tutorials_15_27m_parameters_and_its_layout():
    model = kseg.build_model("segnet_tutorial")
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert (trainable, model.count_params()) == (15_274_892, 15_284_632)  # "15.27M" in the tutorial
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 2 + 2 + 3 + 3 + 3 + 3 + 2 + 2 and not any(c.use_bias for c in convs)
    assert [c.filters for c in convs[:10]] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512]
    assert [c.filters for c in convs[10:]] == [512, 512, 256, 256, 256, 128, 128, 64, 64, 3]
    assert model.layers[1].name == "input_bn" and model.layers[-1].name == "decoder1_conv2_relu"
    eps = {layer.name: layer.epsilon for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert eps.pop("input_bn") == pytest.approx(1e-5 * 255**2) and set(eps.values()) == {1e-5}
    assert kseg.get_spec("segnet_tutorial").preprocessing.kind == "batchnorm"  # raw 0..255 into input_bn


def _tutorial_module(torch):
    """The tutorial's module, with its names (bn_input, dc1..dc4 / uc4..uc1, each a `seq`)."""
    nn = torch.nn

    def seq(pairs):
        layers = []
        for cin, cout in pairs:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return nn.Sequential(*layers)

    class Down(nn.Module):
        def __init__(self, pairs):
            super().__init__()
            self.seq, self.mp = seq(pairs), nn.MaxPool2d(2, return_indices=True)

        def forward(self, x):
            y = self.seq(x)
            shape = y.shape
            y, indices = self.mp(y)
            return y, indices, shape

    class Up(nn.Module):
        def __init__(self, pairs):
            super().__init__()
            self.seq, self.mup = seq(pairs), nn.MaxUnpool2d(2)

        def forward(self, x, indices, shape):
            return self.seq(self.mup(x, indices, output_size=shape))

    class ImageSegmentation(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_input = nn.BatchNorm2d(3)
            self.dc1, self.dc2 = Down([(3, 64), (64, 64)]), Down([(64, 128), (128, 128)])
            self.dc3 = Down([(128, 256), (256, 256), (256, 256)])
            self.dc4 = Down([(256, 512), (512, 512), (512, 512)])
            self.uc4 = Up([(512, 512), (512, 512), (512, 256)])
            self.uc3 = Up([(256, 256), (256, 256), (256, 128)])
            self.uc2, self.uc1 = Up([(128, 128), (128, 64)]), Up([(64, 64), (64, 3)])

        def forward(self, x):
            x = self.bn_input(x)
            skips = []
            for down in (self.dc1, self.dc2, self.dc3, self.dc4):
                x, indices, shape = down(x)
                skips.append((indices, shape))
            for up, (indices, shape) in zip((self.uc4, self.uc3, self.uc2, self.uc1), reversed(skips)):
                x = up(x, indices, shape)
            return x

    return ImageSegmentation()


def test_loads_the_tutorials_state_dict_and_matches_it(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = _tutorial_module(torch)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so eval mode is not the identity
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    module.eval()
    path = tmp_path / "segnet_tutorial.pth"
    torch.save(module.state_dict(), path)
    model = kseg.build_model("segnet_tutorial", weights=str(path))
    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 48, 3)).astype("float32")
    with torch.no_grad():  # the tutorial's ToTensor: 0..1
        expected = module(torch.from_numpy(pixels.transpose(0, 3, 1, 2) / 255.0)).numpy().transpose(0, 2, 3, 1)
    got = model(pixels, training=False).numpy()  # kseg's: raw 0..255, the scaling inside input_bn
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # And back: kseg's model written as the tutorial's state_dict.
    from kseg.models.segnet import tutorial_torch_map
    from kseg.weights import keras_to_torch

    state = keras_to_torch(model, tutorial_torch_map())
    for key, value in module.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_allclose(state[key], value.numpy(), rtol=1e-6, err_msg=key)


def test_recipes_are_the_tutorials_settings():
    r = load_recipe("segnet_tutorial_pets")
    assert r.model == "segnet_tutorial" and r.training == {"batch_size": 64, "epochs": 20}
    assert r.schedule == {"kind": "step", "step_unit": "epochs", "step_size": 7, "gamma": 0.7}  # StepLR(7, 0.7)
    assert (r.optimizer["name"], r.optimizer["learning_rate"]) == ("adam", 1e-3)
    assert r.data["resize"] == [128, 128] and r.data["flip"] and r.data["contrast"] == 3.0
    focal = load_recipe("segnet_tutorial_pets_focal")
    assert focal.loss == {"name": "sparse_focal_loss", "gamma": 2.0} and focal.data == r.data


def test_contrast_beyond_one_reaches_gray_as_torchvisions_colorjitter():
    aug = kd.SegmentationAugment(scale=None, crop=None, flip=False, brightness=0, contrast=3.0, saturation=0, hue=0)
    image = np.random.default_rng(0).uniform(0, 255, (8, 8, 3)).astype("float32")
    from kseg.data.augment import _jitter

    gray = _jitter(image, np.array([0.0, -1.0, 0.0, 0.0], "float32"), aug).numpy()  # factor max(0, 1 - 3) = 0
    np.testing.assert_allclose(gray, np.broadcast_to(gray[0, 0], gray.shape), atol=1e-3)
    top = _jitter(image, np.array([0.0, 1.0, 0.0, 0.0], "float32"), aug).numpy()  # factor 1 + 3 = 4
    mean = float(np.dot(image.mean((0, 1)), [0.299, 0.587, 0.114]))
    np.testing.assert_allclose(top, np.clip(4 * image - 3 * mean, 0, 255), atol=0.05)


TINY = textwrap.dedent("""
    model = "deeplab_largefov"
    [model_options]
    num_classes = 5
    width = 0.125
    [data]
    layout = "synthetic"
    crop = [32, 32]
    [optimizer]
    name = "adam"
    learning_rate = 1e-3
    [training]
    batch_size = 4
    epochs = 1
    [loss]
    name = "sparse_cross_entropy"
""")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    kd.make_synthetic(root, seed=0, train=4, val=6, size=32)
    return str(root)


def _frames(path):
    with Image.open(path) as gif:
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]


def _close(picture, expected, tolerance=24):
    return np.mean(np.abs(picture.astype(float) - expected).max(axis=-1) <= tolerance) > 0.97


def test_gif_draws_image_truth_and_prediction_per_epoch_and_keeps_frames_on_resume(synth, tmp_path):
    keras.utils.set_random_seed(0)
    model = kseg.build_model("segnet_tutorial", num_classes=5, width=0.125)
    val = kd.synthetic(synth, "val", batch_size=1, preprocessing="batchnorm")
    path = str(tmp_path / "predictions.gif")
    gif = prediction_gif(model, val, path, count=5, preprocessing="batchnorm")
    for epoch in range(2):
        gif.on_epoch_begin(epoch)
        gif.on_epoch_end(epoch, {"loss": 0.9, "val_loss": 1.25, "val_mean_iou": 0.5})
    frames = _frames(path)
    # 3 panels (image, ground truth, prediction) of 5 pictures of 32x32 in one row, 2-px gaps, a title line each.
    assert len(frames) == 2 and frames[0].shape == (14 + 3 * (14 + 36), 5 * 34 + 2, 3)
    image, truth = frames[0][14 + 14 + 2:14 + 14 + 34, 2:34], frames[0][14 + 50 + 14 + 2:14 + 50 + 14 + 34, 2:34]
    x, y = next(iter(val.unbatch()))
    # GIF frames hold 256 colours: compared as pictures (nearly every pixel within the quantisation).
    assert _close(image, np.clip(np.asarray(x), 0, 255))  # the image itself
    assert _close(truth, colorize(np.asarray(y)[..., 0]))  # the label map in colour
    prediction = frames[0][14 + 100 + 14 + 2:14 + 100 + 14 + 34, 2:34]
    assert _close(prediction, colorize(np.argmax(model(np.asarray(x)[None], training=False)[0], axis=-1)))
    # A resumed run (after epoch 1 of 2 done) keeps the first frame and redraws from there.
    again = prediction_gif(model, val, path, count=5, preprocessing="batchnorm")
    again.on_epoch_begin(1)
    again.on_epoch_end(1, {})
    assert len(_frames(path)) == 2


def test_kseg_train_gif_flag_and_what_it_refuses(synth, tmp_path):
    # kseg train's GIF through a real run: tests/test_train_fit.py (test_train_writes_checkpoints_logs_and_scores).
    args = build_parser().parse_args(["train", "--recipe", "segnet_tutorial_pets", "--data", "d", "--out", "o",
                                      "--gif"])
    assert args.gif == 21  # the tutorial's 21 test images
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    with pytest.raises(TrainingSetupError, match="--gif N .* must be >= 1"):
        train(str(recipe), synth, str(tmp_path / "run2"), verbose=0, gif=0)
    with pytest.raises(ValueError, match="per-pixel predictions; lenet5 is a classification model"):
        prediction_gif(kseg.build_model("lenet5"), val_classes(), str(tmp_path / "x.gif"))


def val_classes():
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((np.zeros((2, 32, 32, 1), "float32"), np.zeros(2, "int32")))
