"""SSD300's training step in the model benchmark (`scripts/bench_models.py --models ssd300`).

One step: forward, the MultiBox loss (Liu et al. 2016, eq. 1-3, with torchvision's
`SSD.compute_loss` semantics: SmoothL1 over the positive anchors, softmax cross-entropy over the
positives and the hard negatives at 3:1, both divided by the positives' count), backward, SGD with
momentum 0.9 at 1e-3. The anchors are matched to the ground truth once, before any timing
(kseg.detection.targets: torchvision's SSDMatcher(0.5) and BoxCoder(10, 10, 5, 5)), and every
runtime trains on the same encoded targets: torchvision matches inside its training step, kseg in
its tf.data reader, so the step timed here is the network and the loss alone on both sides.

- TF graph: a tf.function of GradientTape, kseg's MultiBoxLoss on both outputs and kseg's FusedSGD.
- model.fit: `compile_segmentation` with the recipe loss "multibox", as `kseg train` compiles an SSD.
- PyTorch: tests/torch_reference.SSD300 (torchvision ssd300_vgg16's module tree) holding kseg's
  weights, the loss written after `SSD.compute_loss` on the same targets.

The first step's losses are compared before timing (they must agree within float32 rounding).
"""

from __future__ import annotations

import os
import sys

import _bench_train

GT_PER_IMAGE = 4


def batch(model, anchors, train_batch, size, num_classes, seed=0):
    """(images, {"mbox_loc", "mbox_conf"} Keras targets, (loc targets, labels) as NumPy) of one batch:
    preprocessed random images and GT_PER_IMAGE random boxes (30-200 px) of random classes each."""
    import numpy as np

    from kseg.detection.losses import multibox_y_true
    from kseg.detection.targets import batch_ssd_targets
    from kseg.identity import identify

    rng = np.random.default_rng(seed)
    h, w, c = size
    images = identify(model).preprocessing.apply(rng.uniform(0, 255, (train_batch, h, w, c)).astype("float32"))
    wh = rng.uniform(30, 200, (train_batch, GT_PER_IMAGE, 2))
    xy = rng.uniform(0, 1, (train_batch, GT_PER_IMAGE, 2)) * (np.array([w, h]) - wh)
    boxes = np.concatenate([xy, xy + wh], -1).astype("float32")
    classes = rng.integers(1, num_classes, (train_batch, GT_PER_IMAGE))
    loc, labels = batch_ssd_targets(boxes, classes, anchors)
    y = {k: np.asarray(v) for k, v in multibox_y_true(loc, labels).items()}
    return np.asarray(images, "float32"), y, (np.asarray(loc), np.asarray(labels))


def keras_loss(y, out):
    from kseg.detection.losses import MultiBoxLoss

    loss = MultiBoxLoss()
    return loss(y["mbox_loc"], out[0]) + loss(y["mbox_conf"], out[1])


def torch_loss(loc_pred, conf_pred, loc_t, labels, neg_pos_ratio=3.0):
    """torchvision SSD.compute_loss on matched, encoded targets: (bbox_regression + classification)."""
    import torch.nn.functional as F

    foreground = labels > 0
    n = max(1, int(foreground.sum()))
    bbox = F.smooth_l1_loss(loc_pred[foreground], loc_t[foreground], reduction="sum")
    cls = F.cross_entropy(conf_pred.reshape(-1, conf_pred.size(-1)), labels.reshape(-1), reduction="none")
    cls = cls.view(labels.shape)
    negative = cls.clone()
    negative[foreground] = -float("inf")
    _, idx = negative.sort(1, descending=True)
    background = idx.sort(1)[1] < neg_pos_ratio * foreground.sum(1, keepdim=True)
    return (bbox + cls[foreground].sum() + cls[background].sum()) / n


def torch_module(bm, model, spec, num_classes):
    """tests/torch_reference.SSD300 with the Keras model's weights (before TF training changes them)."""
    import torch

    sys.path.insert(0, os.path.join(bm.ROOT, "tests"))
    import torch_reference

    torch.manual_seed(0)
    module = torch_reference.SSD300(num_classes)
    bm.load_torch_weights(model, module, spec)
    return module


def torch_step(module, xt, targets):
    import torch

    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=_bench_train.LEARNING_RATE, momentum=_bench_train.MOMENTUM)
    x = torch.from_numpy(xt.transpose(0, 3, 1, 2).copy())
    loc_t, labels = (torch.from_numpy(t) for t in targets)
    labels = labels.long()

    def step(_):
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(*module(x), loc_t, labels)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def train(bm, model, spec, anchors, num_classes, cfg, args, rec, log):
    """{"tf", "fit", "pytorch"} step measurements (images_per_s added) on one batch of cfg["train_batch"]."""
    import torch

    tb, budget = cfg["train_batch"], args.budget
    xt, y, targets = batch(model, anchors, tb, cfg["size"], num_classes)
    module = torch_module(bm, model, spec, num_classes)
    # The losses agree before anything trains (same weights, same targets).
    k = float(keras_loss(y, model(xt, training=True)))
    with torch.no_grad():
        module.train()
        t = float(torch_loss(*module(torch.from_numpy(xt.transpose(0, 3, 1, 2).copy())),
                             *(torch.from_numpy(a) for a in (targets[0], targets[1].astype("int64")))))
    rec["train_check"] = {"keras_loss": k, "pytorch_loss": t, "rel_diff": abs(k - t) / max(abs(t), 1e-12),
                          "positives": int((targets[1] > 0).sum())}
    log(f"first-step loss kseg {k:.6f} PyTorch {t:.6f}")
    results = {}
    guarded = _bench_train.guarded_runner(bm, rec, results, args.skip, log)

    guarded("tf", lambda: _bench_train.train_tf(bm, model, None, xt, y, False, budget, loss_fn=keras_loss))
    guarded("fit", lambda: _bench_train.train_fit(model, "ssd300", None, xt, y, budget,
                                                  step_s=results.get("tf", {}).get("median_s"), loss="multibox"))
    guarded("pytorch", lambda: bm.measure(torch_step(module, xt, targets), None, min_runs=2, max_runs=20,
                                          budget_s=budget))
    for m in results.values():
        if "median_s" in m:
            m["images_per_s"] = tb / m["median_s"]
            m["gflops_per_s"] = 3 * rec["flops_per_image"] * tb / m["median_s"] / 1e9
    return results
