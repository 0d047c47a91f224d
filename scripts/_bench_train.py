"""The training step in the model benchmark (`scripts/bench_models.py`): three ways of running it.

- `train_tf`: a hand-written step, one `tf.function` of GradientTape + kseg's FusedSGD (optionally
  XLA-compiled): what the framework can do.
- `train_fit`: the path users run: `kseg.train.fit.compile_segmentation` (what `kseg train` compiles
  a recipe with: kseg's optimizer, the task's loss and metrics) and `model.fit` over a `tf.data`
  pipeline. Its step time is the interval between two `on_train_batch_end` calls, so the input
  pipeline, the metrics and Keras' loop are in it, as a user sees them.
- `train_torch`: the PyTorch module: `zero_grad`, forward, loss, `backward`, `torch.optim.SGD`.

All three: forward, loss (cross-entropy; edges: sigmoid cross-entropy over every output, HED's
class-balanced one in the fit path, as `kseg train` runs it), backward, SGD with momentum 0.9 at a
learning rate of 1e-3, dropout and BatchNorm in training mode; the same batch every step.
"""

from __future__ import annotations

import time

LEARNING_RATE, MOMENTUM = 1e-3, 0.9


def guarded_runner(bm, rec, results, skip, log):
    """guarded(runtime, fn): results[runtime] = fn() in bench_models' phase "train_<runtime>" (its time and
    peak memory into `rec`), unless the runtime is in `skip`; a failure is recorded and the others go on."""

    def guarded(runtime, fn):
        if runtime in skip:
            return
        try:
            with bm.Phase(rec, f"train_{runtime}", log):
                results[runtime] = fn()
        except Exception as e:
            results[runtime] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"train {runtime} failed: {results[runtime]['error'][:200]}")

    return guarded


def train_tf(bm, model, task, xt, yt, jit, budget, loss_fn=None):
    step, batch = tf_step(model, task, xt, yt, jit, loss_fn)
    return bm.measure(lambda b: step(b).numpy(), batch, min_runs=2, max_runs=20, budget_s=budget)


def tf_step(model, task, xt, yt, jit=False, loss_fn=None):
    """The hand-written training step (a tf.function of one batch) and its batch. loss_fn(y, outputs):
    a detector's loss (the task's cross-entropy otherwise)."""
    import keras
    import tensorflow as tf

    if loss_fn is None and task.target_kind == "edge_map":
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        loss_fn = lambda y, out: tf.add_n([bce(y, o) for o in out])  # noqa: E731
    elif loss_fn is None:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    from kseg.train import FusedSGD

    # kseg's SGD: keras.optimizers.SGD's arithmetic in one fused kernel per variable (kseg.train.optim).
    opt = FusedSGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM)
    # Built outside the tf.function: creating the momentum slots inside it costs a second trace.
    opt.build(model.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return loss

    return step, (tf.constant(xt), tf.nest.map_structure(tf.constant, yt))


def train_fit(model, name, task, xt, yt, budget, step_s=None, loss=None):
    """model.fit as `kseg train` compiles it; `step_s` (the hand-written step's time) sizes the run to
    about `budget` seconds of timed steps (at least 3, at most 20). loss: the recipe's loss name (by
    default the task's cross-entropy); yt: the Keras targets when given."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kseg.train.fit import compile_segmentation
    from kseg.train.recipes import Recipe

    if loss is None:
        loss = "balanced_sigmoid_cross_entropy" if task.target_kind == "edge_map" else "sparse_cross_entropy"
    recipe = Recipe(name="bench_models", source="scripts/bench_models.py", model=name, description="",
                    model_options={}, data={}, optimizer={"name": "sgd", "learning_rate": LEARNING_RATE,
                                                          "momentum": MOMENTUM},
                    schedule={"kind": "constant"}, training={}, loss={"name": loss})
    fit_model = compile_segmentation(model, recipe)
    targets = task.fit_targets(yt, len(fit_model.outputs)) if task is not None else yt
    data = tf.data.Dataset.from_tensors((xt, targets)).repeat().prefetch(tf.data.AUTOTUNE)
    ends = []

    class StepEnds(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    timed = min(20, max(3, round(budget / step_s))) if step_s else 5
    start = time.perf_counter()
    fit_model.fit(data, epochs=1, steps_per_epoch=1 + timed, verbose=0, callbacks=[StepEnds()])
    times = sorted(np.diff(ends))
    return {"median_s": float(times[len(times) // 2]), "min_s": float(times[0]), "runs": len(times),
            "first_call_s": round(ends[0] - start, 4)}


def train_torch(bm, module, task, xt, yt, budget):
    return bm.measure(torch_step(module, task, xt, yt), None, min_runs=2, max_runs=20, budget_s=budget)


def torch_step(module, task, xt, yt):
    """PyTorch's training step on the same batch (NCHW), a function of one ignored argument."""
    import torch
    import torch.nn.functional as F

    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LEARNING_RATE, momentum=MOMENTUM)
    x = torch.from_numpy(xt.transpose(0, 3, 1, 2).copy())
    if task.target_kind == "edge_map":
        y = torch.from_numpy(yt.transpose(0, 3, 1, 2).copy())
        loss_fn = lambda out: sum(F.binary_cross_entropy_with_logits(o, y) for o in out)  # noqa: E731
    else:
        y = torch.from_numpy(yt.astype("int64"))
        loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731

    def step(_):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(x))
        loss.backward()
        opt.step()
        return loss.item()

    return step
