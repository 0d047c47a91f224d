"""The recipe features of the modern classifiers' published recipes: the cosine schedule with linear
warmup, RMSprop, global gradient-norm clipping and weight EMA, each checked against PyTorch's own
implementation (torch.optim) or the closed form."""

import csv
import math

import keras
import numpy as np
import pytest

from kseg.train.fit import callbacks, learning_rate, make_optimizer
from kseg.train.optim import RMSprop
from kseg.train.recipes import RecipeError, apply_overrides, load_recipe

torch = pytest.importorskip("torch")

BASE = """
model = "lenet5"
[optimizer]
name = "{name}"
learning_rate = {lr}
{optimizer}
[schedule]
{schedule}
[training]
batch_size = 8
epochs = 3
[loss]
name = "sparse_cross_entropy"
"""


def _recipe(tmp_path, *, name="sgd", lr=0.1, optimizer="", schedule=""):
    path = tmp_path / "r.toml"
    path.write_text(BASE.format(name=name, lr=lr, optimizer=optimizer, schedule=schedule))
    return load_recipe(str(path))


def _torch_rates(optimizer, scheduler, steps):
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


def test_cosine_with_warmup_equals_torchvisions_linear_then_cosine_per_iteration(tmp_path):
    # torchvision's references/classification: LinearLR(start_factor=warmup_decay) for the warmup,
    # then CosineAnnealingLR(T_max=rest, eta_min), chained by SequentialLR, stepped per iteration.
    recipe = _recipe(tmp_path, lr=0.5, schedule='kind = "cosine"\nwarmup = 2\nstep_unit = "epochs"\n'
                                                'warmup_start = 0.0165\nmin_lr = 0.01')
    steps_per_epoch, total = 5, 40
    schedule = learning_rate(recipe, steps_per_epoch, total)
    ours = np.array([float(schedule(step)) for step in range(total)])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    warm = 2 * steps_per_epoch
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.0165 / 0.5, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warm, eta_min=0.01)], milestones=[warm])
    np.testing.assert_allclose(ours, _torch_rates(opt, sched, total), rtol=1e-5, atol=1e-8)
    assert ours[0] == pytest.approx(0.0165) and ours[warm] == pytest.approx(0.5) and ours.min() >= 0.01


def test_cosine_without_warmup_and_its_errors(tmp_path):
    recipe = _recipe(tmp_path, lr=0.2, schedule='kind = "cosine"')
    schedule = learning_rate(recipe, 10, 100)
    assert [float(schedule(s)) for s in (0, 50, 100)] == pytest.approx([0.2, 0.1, 0.0], abs=1e-7)
    with pytest.raises(ValueError, match="needs the total number of steps"):
        learning_rate(recipe, 10, None)
    with pytest.raises(ValueError, match="warmup .* must be shorter than the training"):
        learning_rate(apply_overrides(recipe, {"schedule.warmup": 100}), 10, 100)
    with pytest.raises(RecipeError, match='belong to kind "cosine", not \'step\''):
        _recipe(tmp_path, schedule='kind = "step"\nstep_size = 3\nwarmup = 1')
    with pytest.raises(RecipeError, match="ema is a decay in"):
        _recipe(tmp_path, optimizer="ema = 1.5")
    with pytest.raises(RecipeError, match="rho is RMSprop's"):
        _recipe(tmp_path, optimizer="rho = 0.9")


def _train_both(keras_opt, torch_opt_fn, steps=5, clip=None):
    """A few steps of a linear least-squares model in Keras and in torch from the same start."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
    w0 = rng.normal(size=(6, 3)).astype("float32") * 3
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, use_bias=False)])
    model.layers[0].set_weights([w0])
    model.compile(optimizer=keras_opt, loss="mse")
    model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    w = torch.nn.Parameter(torch.from_numpy(w0.T.copy()))
    opt = torch_opt_fn([w])
    for _ in range(steps):
        opt.zero_grad()
        loss = ((torch.from_numpy(x) @ w.T - torch.from_numpy(y)) ** 2).mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([w], clip)
        opt.step()
    return model.layers[0].get_weights()[0], w.detach().numpy().T


def test_rmsprop_equals_torch_with_eps_inside_the_root(tmp_path):
    recipe = _recipe(tmp_path, name="rmsprop", lr=0.01, optimizer="momentum = 0.9\nrho = 0.9\nepsilon = 1e-3")
    opt = make_optimizer(recipe)
    assert isinstance(opt, RMSprop) and (opt.rho, opt.momentum, opt.epsilon) == (0.9, 0.9, 1e-3)
    # Decay, momentum and step equal torch.optim.RMSprop's (its eps, outside the root, at 0 and ours ~0).
    ours, theirs = _train_both(make_optimizer(apply_overrides(recipe, {"optimizer.epsilon": 1e-14})),
                               lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=0.0, momentum=0.9))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # eps inside the root (TensorFlow's RMSProp): the first step is lr * g / sqrt((1 - rho) g^2 + eps).
    var = keras.Variable(np.zeros(3, "float32"))
    opt.build([var])
    g = np.array([1e-3, 0.1, 3.0], "float32")
    opt.apply_gradients([(g, var)])
    np.testing.assert_allclose(var.numpy(), -0.01 * g / np.sqrt(0.1 * g ** 2 + 1e-3), rtol=1e-5)


def test_global_gradient_norm_clipping_equals_torchs_clip_grad_norm(tmp_path):
    recipe = _recipe(tmp_path, lr=0.05, optimizer="momentum = 0.9\nclip_grad_norm = 0.5")
    assert make_optimizer(recipe).global_clipnorm == 0.5
    ours, theirs = _train_both(make_optimizer(recipe), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), clip=0.5)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    unclipped, _ = _train_both(make_optimizer(apply_overrides(recipe, {"optimizer.clip_grad_norm": 1e6})),
                               lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    assert not np.allclose(ours, unclipped, atol=1e-3)  # the clip bites on these gradients


def test_ema_weights_are_validated_checkpointed_and_kept(tmp_path):
    recipe = _recipe(tmp_path, lr=0.05, optimizer="momentum = 0.9\nema = 0.5")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])

    raw_per_step = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raw_per_step.append([v.numpy() for v in self.model.trainable_weights])

    model.compile(optimizer=make_optimizer(recipe), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cbs = callbacks(recipe, tmp_path / "run", monitor="val_loss", tensorboard=False)
    assert [type(c).__name__ for c in cbs] == ["BackupAndRestore", "SwapEMAWeights", "ModelCheckpoint", "CSVLogger"]
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, validation_data=(x, y),
              callbacks=[*cbs, Record()])
    # Keras' EMA: average <- decay * average + (1 - decay) * weight after each step, starting at the first
    # step's weights (as timm's ModelEmaV2 starts at a copy of the model).
    average = raw_per_step[0]
    for raw in raw_per_step[1:]:
        average = [0.5 * a + 0.5 * r for a, r in zip(average, raw)]
    for got, want in zip(model.get_weights(), average):  # the model ends on the averaged weights
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(average[0], raw_per_step[-1][0])
    best = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    with open(tmp_path / "run" / "log.csv") as f:
        val_losses = [float(row["val_loss"]) for row in csv.DictReader(f)]
    # The validation loss of the best epoch is the EMA weights' loss: best.keras reproduces it.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, best.predict(x, verbose=0))
    assert float(loss) == pytest.approx(min(val_losses), rel=1e-4)
    assert math.isfinite(float(loss))
