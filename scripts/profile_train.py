"""Where a training step spends its time, per op type, in kseg (TensorFlow) and in PyTorch.

    python scripts/profile_train.py --model segnet              # bench_models' size and train batch
    python scripts/profile_train.py --model resnet50 --steps 5 --top 15
    python scripts/profile_train.py --model hed --out hed_profile.json
    python scripts/profile_train.py --model faster_rcnn_vgg16 --by-scope 2   # TF's time per part of the step

The step is the one `scripts/bench_models.py` times (scripts/_bench_train.py: forward, loss,
backward, SGD momentum 0.9 on one batch; Faster R-CNN: scripts/_bench_frcnn_train.py's approximate
joint training step), on the same model with the same weights in both frameworks, with
bench_models' thread settings.

- TensorFlow: `tf.profiler` traces `--steps` steps after a warm-up; the trace (XPlane) is read
  back with TensorFlow's own protobuf and every executed op ("name:Type" events on the executor
  threads) is summed by op type.
- PyTorch: `torch.profiler` over the same number of steps; self CPU time per aten op.

Each table lists ms per step and the share of the profiled step; the op types differ between the
frameworks (oneDNN's fused `_MklNativeFusedConv2D` vs `aten::mkldnn_convolution`), so compare
families of ops (convolutions, their gradients, BatchNorm, pooling, the optimizer update).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_train as bt  # noqa: E402  (the training steps bench_models times)
import bench_models as bm  # noqa: E402  (the models' sizes, PyTorch modules, thread settings)


def _scope(name, depth):
    """The op's name scope to `depth` levels, its backward ops ("gradient_tape/...") apart."""
    backward = name.startswith("gradient_tape/")
    parts = name.split(":", 1)[0].split("/")[1 if backward else 0:]
    return ("backward " if backward else "forward ") + "/".join(parts[:depth])


def tf_profile(step, batch, steps, by_scope=0):
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    step(batch).numpy()  # trace and warm up outside the profile
    logdir = tempfile.mkdtemp(prefix="kseg_profile_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch).numpy()
    wall = (time.perf_counter() - start) / steps
    tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    by_type = collections.Counter()
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's threads run the ops
                continue
            for event in line.events:
                name = names[event.metadata_id].name
                if ":" in name and "::" not in name:  # "scope/op_name:OpType", not "ExecutorState::Process"
                    key = _scope(name, by_scope) if by_scope else name.rsplit(":", 1)[1]
                    by_type[key] += event.duration_ps / 1e9 / steps  # ms per step
    return by_type, wall


def torch_profile(step, steps):
    from torch.profiler import ProfilerActivity, profile

    step(None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(None)
        wall = (time.perf_counter() - start) / steps
    by_type = collections.Counter()
    for event in prof.key_averages():
        by_type[event.key] += event.self_cpu_time_total / 1e3 / steps  # us -> ms per step
    return by_type, wall


def table(title, by_type, wall, top):
    total = sum(by_type.values())
    lines = [f"{title}: {1000 * wall:.1f} ms per step (profiled ops {total:.1f} ms)",
             f"  {'op type':<48} {'ms/step':>9} {'share':>7}"]
    for name, ms in by_type.most_common(top):
        lines.append(f"  {name[:48]:<48} {ms:9.2f} {100 * ms / total:6.1f}%")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    trainable = [n for n, c in bm.MODELS.items() if c["train_batch"] and not c.get("detector")]
    parser.add_argument("--model", required=True, choices=trainable)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, help="training batch (default: bench_models')")
    parser.add_argument("--size", type=int, help="square input side (default: bench_models')")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--top", type=int, default=20, help="op types listed per framework")
    parser.add_argument("--out", help="also write the per-op-type times as JSON here")
    parser.add_argument("--by-scope", type=int, default=0, metavar="DEPTH",
                        help="group TensorFlow's ops by their name scope to this depth, not by op type")
    args = parser.parse_args(argv)
    bm.set_thread_env(args.threads)
    bm.configure_frameworks(args.threads)

    cfg = bm.MODELS[args.model]
    h, w, c = cfg["size"] if args.size is None else (args.size, args.size, cfg["size"][2])
    batch = args.batch or cfg["train_batch"]
    if cfg.get("frcnn"):
        (tf_step, data), torch_step = frcnn_steps(args.model, (h, w, c), batch)
    else:
        (tf_step, data), torch_step = steps(args.model, cfg, (h, w, c), batch)
    tf_ops, tf_wall = tf_profile(tf_step, data, args.steps, args.by_scope)
    torch_ops, torch_wall = torch_profile(torch_step, args.steps)
    print(f"{args.model}, {h}x{w}x{c}, batch {batch}, {args.threads} threads, {args.steps} steps; "
          f"TF / PyTorch step time: {tf_wall / torch_wall:.2f}")
    print(table("TensorFlow (kseg)", tf_ops, tf_wall, args.top))
    print(table("PyTorch", torch_ops, torch_wall, args.top))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "input": [h, w, c], "batch": batch, "threads": args.threads,
                       "tf": {"step_s": tf_wall, "ops_ms": dict(tf_ops)},
                       "pytorch": {"step_s": torch_wall, "ops_ms": dict(torch_ops)}}, f, indent=1)
        print(f"wrote {args.out}")


def steps(name, cfg, size, batch):
    """bench_models' training steps of a classifier / dense model: ((TF step, its batch), PyTorch step)."""
    import keras
    import numpy as np
    import torch

    import kseg

    h, w, c = size
    spec = kseg.get_spec(name)
    keras.utils.set_random_seed(0)
    model = kseg.build_model(name, **cfg.get("kwargs", {}))
    num_classes = int(bm.listify(model.output)[-1].shape[-1])
    torch.manual_seed(0)
    module, _ = bm.torch_module(name, cfg.get("kwargs", {}), num_classes)
    bm.load_torch_weights(model, module, spec)
    rng = np.random.default_rng(0)
    xt = rng.uniform(-1, 1, (batch, h, w, c)).astype("float32")
    yt = spec.task_object.random_targets(rng, batch, h, w, num_classes)
    return bt.tf_step(model, spec.task_object, xt, yt), bt.torch_step(module, spec.task_object, xt, yt)


def frcnn_steps(name, size, batch):
    """bench_models' Faster R-CNN training steps (scripts/_bench_frcnn_train.py), both sides loaded
    from one state_dict: ((TF step, its batch), PyTorch step)."""
    import _bench_frcnn_train as ft
    import bench_frcnn
    import keras
    import torch

    import kseg
    from kseg.detection.rcnn_trainer import RCNNTrainer

    module = bench_frcnn._reference(name, 21)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.pth")
        torch.save(module.state_dict(), path)
        keras.utils.set_random_seed(0)
        model = kseg.build_model(name, layout="torchvision", weights=path)
    images, boxes, classes = ft.batch(size, batch, 21)
    torch_step, _ = ft.torch_step(module, images, boxes, classes)
    return ft.tf_step(RCNNTrainer(model, convention="torchvision"), images, boxes, classes), torch_step


if __name__ == "__main__":
    main()
