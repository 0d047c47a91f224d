"""Faster R-CNN's training step in the model benchmark (`scripts/bench_models.py --models
faster_rcnn_vgg16 faster_rcnn_resnet50_c4`).

One step of approximate joint training (Ren et al. 2015, section 3.2) with torchvision's training
settings on both sides: the backbone and the RPN (256 anchors per image, at most half positive), 2000
proposals before and after NMS (no gradient), 512 RoIs per image with the GT boxes appended (a
quarter foreground at IoU 0.5), the RoI op and the box head, the four losses summed, backward, SGD
with momentum 0.9 at 1e-3. One 600x800 image per batch (py-faster-rcnn's IMS_PER_BATCH; --quick
320x448) with four random GT boxes of random classes.

- TF graph: a tf.function of GradientTape over `RCNNTrainer.losses_of` (kseg.detection.rcnn_trainer,
  convention "torchvision") and kseg's FusedSGD.
- model.fit: `kseg.train.fit.compile_trainer` with a recipe whose [loss] is "rcnn", as `kseg train`
  compiles a two-stage detector, fed by tf.data.
- PyTorch: the bench's reference module (tests/torch_reference_frcnn*.py, the same weights) and
  torchvision's training computation in tests/torch_reference_frcnn_train.py.

Anchor labels, proposals and RoI sampling happen inside the step on both sides, as each
framework's users run them. Both sample at random (torch.randperm, keras.random), so the two
first-step losses are printed side by side but do not match exactly; the formulas themselves are
asserted equal to torchvision's in tests/test_rcnn_train.py. As in inference, PyTorch's RoIAlign
and NMS are torch-op transcriptions (its RoIAlign backward is autograd's scatter-add through the
gathers, not torchvision's kernel), so this row is not a comparison with torchvision itself.
"""

from __future__ import annotations

import os
import sys

import _bench_train

GT_PER_IMAGE = 4


def batch(size, train_batch, num_classes, seed=0):
    """(images (B, H, W, 3) normalised, boxes (B, M, 4) xyxy pixels, classes (B, M) in 1..C-1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w, _ = size
    images = rng.normal(size=(train_batch, h, w, 3)).astype("float32")
    wh = rng.uniform(40, min(300, h - 1, w - 1), (train_batch, GT_PER_IMAGE, 2))
    xy = rng.uniform(0, 1, (train_batch, GT_PER_IMAGE, 2)) * (np.array([w, h]) - wh)
    boxes = np.concatenate([xy, xy + wh], -1).astype("float32")
    return images, boxes, rng.integers(1, num_classes, (train_batch, GT_PER_IMAGE)).astype("int32")


def tf_step(trainer, images, boxes, classes):
    import tensorflow as tf

    from kseg.detection.rcnn_trainer import LOSS_NAMES
    from kseg.train import FusedSGD

    opt = FusedSGD(learning_rate=_bench_train.LEARNING_RATE, momentum=_bench_train.MOMENTUM)
    variables = trainer.trainable_variables
    opt.build(variables)

    @tf.function
    def step(data):
        x, y = data
        with tf.GradientTape() as tape:
            parts = trainer.losses_of(x, y, training=True)
            total = tf.add_n([parts[n] for n in LOSS_NAMES])
        opt.apply(tape.gradient(total, variables), variables)
        return total

    return step, (tf.constant(images), {"boxes": tf.constant(boxes), "classes": tf.constant(classes)})


def fit(model, name, images, boxes, classes, budget, step_s):
    """model.fit of the trainer `kseg train` compiles; step times between on_train_batch_end calls."""
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from kseg.train.fit import compile_trainer
    from kseg.train.recipes import Recipe

    recipe = Recipe(name="bench_models", source="scripts/bench_models.py", model=name, description="",
                    model_options={}, data={}, optimizer={"name": "sgd", "learning_rate": _bench_train.LEARNING_RATE,
                                                          "momentum": _bench_train.MOMENTUM},
                    schedule={"kind": "constant"}, training={}, loss={"name": "rcnn"})
    trainer = compile_trainer(model, recipe)
    data = tf.data.Dataset.from_tensors((images, {"boxes": boxes, "classes": classes})).repeat()
    ends = []

    class StepEnds(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    timed = min(20, max(2, round(budget / step_s))) if step_s else 3
    start = time.perf_counter()
    trainer.fit(data.prefetch(tf.data.AUTOTUNE), epochs=1, steps_per_epoch=1 + timed, verbose=0,
                callbacks=[StepEnds()])
    times = sorted(np.diff(ends))
    return {"median_s": float(times[len(times) // 2]), "min_s": float(times[0]), "runs": len(times),
            "first_call_s": round(ends[0] - start, 4), "convention": trainer.convention}


def torch_step(module, images, boxes, classes):
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import torch_reference_frcnn_train as ref_train

    module.rpn._pre_nms_top_n = module.rpn._post_nms_top_n = 2000  # torchvision's training values
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=_bench_train.LEARNING_RATE, momentum=_bench_train.MOMENTUM)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    targets = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c).long()} for b, c in zip(boxes, classes)]

    def losses():
        return ref_train.training_losses(module, x, targets)

    def step(_):
        opt.zero_grad(set_to_none=True)
        loss = sum(losses().values())
        loss.backward()
        opt.step()
        return loss.item()

    return step, losses


def train(bm, frcnn, name, weights_path, cfg, args, rec, log):
    """{"tf", "fit", "pytorch"} training-step measurements of a Faster R-CNN (images_per_s added): kseg's
    model and bench_frcnn's PyTorch reference (`frcnn`: scripts/bench_frcnn.py) both loaded from the
    state_dict at `weights_path`."""
    import keras
    import torch

    import kseg
    from kseg.detection.rcnn_trainer import LOSS_NAMES, RCNNTrainer

    tb, budget = cfg["train_batch"], args.budget
    images, boxes, classes = batch(cfg["size"], tb, 21)
    keras.utils.set_random_seed(0)
    torch.manual_seed(0)
    model = kseg.build_model(name, layout="torchvision", weights=weights_path)
    module = frcnn._reference(name, 21)
    module.load_state_dict(torch.load(weights_path))
    trainer = RCNNTrainer(model, convention="torchvision")
    counts = {"kseg": sum(int(v.numpy().size) for v in trainer.trainable_variables),
              "pytorch": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    step, data = tf_step(trainer, images, boxes, classes)
    torch_fn, torch_losses = torch_step(module, images, boxes, classes)
    rois = {}  # how many RoIs each side's box head gets in the first step
    head = trainer.head
    trainer.head = lambda inputs, training: (rois.setdefault("kseg", int(inputs[1].shape[0])),
                                             head(inputs, training=training))[1]
    k = {n: float(v) for n, v in trainer.losses_of(*data, training=True).items()}
    trainer.head = head
    def count(_module, inputs, _output):  # a forward hook returning None leaves the output alone
        rois.setdefault("pytorch", int(inputs[0].shape[0]))

    hook = module.roi_heads.box_head.register_forward_hook(count)
    with torch.no_grad():
        t = dict(zip(LOSS_NAMES, (float(v) for v in torch_losses().values())))
    hook.remove()
    rec["train_check"] = {"trainable_parameters": counts, "kseg_losses": k, "pytorch_losses": t, "rois": rois}
    log(f"trainable parameters {counts}; RoIs in the first step {rois}; first-step losses (random sampling on "
        "each side) kseg " + ", ".join(f"{v:.4f}" for v in k.values()) + " PyTorch "
        + ", ".join(f"{v:.4f}" for v in t.values()))
    results = {}
    guarded = _bench_train.guarded_runner(bm, rec, results, args.skip, log)

    # The step's work depends on the RPN's state (how many proposals survive NMS, so how many RoIs the
    # head gets): every runtime starts from the same weights, not from where the previous one left them.
    initial = model.get_weights()
    guarded("tf", lambda: bm.measure(lambda d: step(d).numpy(), data, min_runs=2, max_runs=10, budget_s=budget))
    model.set_weights(initial)
    guarded("fit", lambda: fit(model, name, images, boxes, classes, budget,
                               results.get("tf", {}).get("median_s")))
    guarded("pytorch", lambda: bm.measure(torch_fn, None, min_runs=2, max_runs=10, budget_s=budget))
    for m in results.values():
        if "median_s" in m:
            m["images_per_s"] = tb / m["median_s"]
            if rec.get("flops_per_image"):
                m["gflops_per_s"] = 3 * rec["flops_per_image"] * tb / m["median_s"] / 1e9
    return results
