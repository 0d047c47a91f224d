"""The papers' training procedures: FCN's staged training (32s -> 16s -> 8s, new score layers at
zero) and per-layer learning-rate multipliers (DeepLab's 10x classifier, Caffe's lr_mult)."""

import keras
import numpy as np
import pytest

import kseg
from kseg.train.fit import from_scratch_notice, make_optimizer
from kseg.train.optim import Adam, AdamW, FusedSGD
from kseg.train.recipes import RecipeError, load_recipe
from kseg.weights import WeightsMismatchError

SMALL = {"num_classes": 5, "width": 0.125}


def _outputs(model, name, x):
    return keras.Model(model.inputs, model.get_layer(name).output)(x).numpy()


def test_fcn_stages_copy_the_coarser_net_and_zero_the_new_scores(tmp_path):
    keras.utils.set_random_seed(0)
    fcn32 = kseg.build_model("fcn32s", **SMALL)
    fcn32.save(tmp_path / "fcn32s.keras")
    fcn16 = kseg.build_model("fcn16s", **SMALL, backbone_weights=str(tmp_path / "fcn32s.keras"))
    for layer in fcn16.layers:
        if layer.weights and layer.name in {lay.name for lay in fcn32.layers}:
            for a, b in zip(layer.get_weights(), fcn32.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    assert all(not w.any() for w in fcn16.get_layer("score_pool4").get_weights())
    # "so that the net starts with unmodified predictions": the pool4 skip adds nothing yet.
    x = np.random.default_rng(0).uniform(0, 255, (1, 45, 61, 3)).astype("float32")
    np.testing.assert_array_equal(_outputs(fcn16, "score_fr", x), _outputs(fcn32, "score_fr", x))
    np.testing.assert_array_equal(_outputs(fcn16, "fuse_pool4", x), _outputs(fcn16, "upscore2", x))

    # 16s -> 8s: the trained pool4 skip is kept, the pool3 one starts at zero.
    fcn16.get_layer("score_pool4").set_weights([w + 0.01 for w in fcn16.get_layer("score_pool4").get_weights()])
    fcn16.save(tmp_path / "fcn16s.keras")
    fcn8 = kseg.build_model("fcn8s", **SMALL, backbone_weights=str(tmp_path / "fcn16s.keras"))
    np.testing.assert_array_equal(fcn8.get_layer("score_pool4").get_weights()[0],
                                  fcn16.get_layer("score_pool4").get_weights()[0])
    assert all(not w.any() for w in fcn8.get_layer("score_pool3").get_weights())
    np.testing.assert_array_equal(_outputs(fcn8, "fuse_pool3", x), _outputs(fcn8, "upscore_pool4", x))


def test_a_previous_stage_of_another_shape_or_kind_is_refused(tmp_path):
    keras.utils.set_random_seed(0)
    kseg.build_model("fcn32s", num_classes=3, width=0.125).save(tmp_path / "three.keras")
    with pytest.raises(WeightsMismatchError, match="shape"):
        kseg.build_model("fcn16s", **SMALL, backbone_weights=str(tmp_path / "three.keras"))


def test_staged_recipes_cite_their_stage_and_say_what_to_pass():
    r16, r8 = load_recipe("fcn16s_voc"), load_recipe("fcn8s_voc")
    assert (r16.init_from, r8.init_from) == ("fcn32s", "fcn16s")
    # Each stage 100x below the previous (paper 4.2; the reference solvers 1e-10 -> 1e-12 -> 1e-14).
    assert load_recipe("fcn32s_voc").optimizer["learning_rate"] / r16.optimizer["learning_rate"] == pytest.approx(100)
    assert r16.optimizer["learning_rate"] / r8.optimizer["learning_rate"] == pytest.approx(100)
    notice = from_scratch_notice(r16)
    assert "fcn32s" in notice and "--backbone-weights" in notice and from_scratch_notice(r16, "x.keras") is None


def _one_step(optimizer, grads):
    """Variables {path: value} after one update of `optimizer` from ones with the given gradients."""
    variables = [keras.Variable(np.ones(g.shape, "float32"), name=n.split("/")[1], trainable=True)
                 for n, g in grads.items()]
    # Keras names a free variable's path by its name; give them layer-like paths as a model would.
    for v, n in zip(variables, grads):
        v._path = n
    optimizer.build(variables)
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads.values()], variables)
    return {n: v.numpy() for n, v in zip(grads, variables)}


@pytest.mark.parametrize("make", [lambda **k: FusedSGD(0.1, momentum=0.9, **k), lambda **k: FusedSGD(0.1, **k),
                                  lambda **k: Adam(0.1, **k), lambda **k: AdamW(0.1, weight_decay=0.0, **k)],
                         ids=["sgd_momentum", "sgd", "adam", "adamw"])
def test_lr_multipliers_scale_each_layers_update(make):
    grads = {"conv/kernel": np.full((2, 2), 0.5, "float32"), "conv/bias": np.full((2,), 0.5, "float32"),
             "fc8/kernel": np.full((2, 2), 0.5, "float32"), "fc8/bias": np.full((2,), 0.5, "float32")}
    plain = _one_step(make(), grads)
    scaled = _one_step(make(lr_multipliers={"fc8/kernel": 10, "fc8/bias": 20, "*/bias": 2}), grads)
    for name, factor in {"conv/kernel": 1, "conv/bias": 2, "fc8/kernel": 10, "fc8/bias": 20}.items():
        np.testing.assert_allclose(1 - scaled[name], factor * (1 - plain[name]), rtol=1e-5)


def test_no_weight_decay_spares_the_matching_variables_and_a_stray_pattern_is_an_error():
    grads = {"conv/kernel": np.zeros((2, 2), "float32"), "conv/bias": np.zeros((2,), "float32")}
    after = _one_step(FusedSGD(0.1, weight_decay=0.5, no_weight_decay=["*/bias"]), grads)
    assert np.all(after["conv/kernel"] < 1) and np.all(after["conv/bias"] == 1)
    with pytest.raises(ValueError, match=r"\['fc9\*'\] match no trainable variable"):
        _one_step(FusedSGD(0.1, lr_multipliers={"fc9*": 10}), grads)


def test_deeplab_recipe_trains_its_classifier_at_10x_and_survives_a_checkpoint(tmp_path):
    recipe = load_recipe("deeplab_largefov_voc")
    assert recipe.optimizer["lr_multipliers"] == {"fc8/kernel": 10, "fc8/bias": 20, "*/bias": 2}
    model = kseg.build_model("deeplab_largefov", num_classes=21, width=0.125)
    optimizer = make_optimizer(recipe, steps_per_epoch=10)
    optimizer.build(model.trainable_variables)  # every pattern matches one of the model's variables
    factors = dict(zip((v.path for v in model.trainable_variables), optimizer._rate_factors))
    assert factors["fc8/kernel"] == 10 and factors["fc8/bias"] == 20 and factors["fc6/bias"] == 2
    assert factors["fc6/kernel"] == 1
    # The multipliers are part of the optimizer's config: a resumed run keeps them.
    model.compile(optimizer=make_optimizer(recipe, steps_per_epoch=10), loss="mse")
    model.save(tmp_path / "run.keras")
    again = keras.saving.load_model(tmp_path / "run.keras", compile=True)
    assert again.optimizer.lr_multipliers == optimizer.lr_multipliers
    assert again.optimizer.no_weight_decay == ["*/bias"]


@pytest.mark.parametrize("value, message", [("{ \"fc8/kernel\" = -1 }", "must be a number >= 0"),
                                            ("{ \"fc8/kernel\" = \"x\" }", "must be a number >= 0")])
def test_bad_multipliers_name_the_recipe_and_key(tmp_path, value, message):
    path = tmp_path / "r.toml"
    path.write_text(f'model = "fcn32s"\n[optimizer]\nname = "sgd"\nlearning_rate = 0.1\nlr_multipliers = {value}\n'
                    '[training]\nbatch_size = 1\nepochs = 1\n[loss]\nname = "sparse_cross_entropy"\n')
    with pytest.raises(RecipeError, match=rf"{path}: \[optimizer\] lr_multipliers\['fc8/kernel'\] {message}"):
        load_recipe(str(path))
