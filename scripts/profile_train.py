"""Where a training step spends its time, per op type, in kseg (TensorFlow) and in PyTorch.

    python scripts/profile_train.py --model segnet              # bench_models' size and train batch
    python scripts/profile_train.py --model resnet50 --steps 5 --top 15
    python scripts/profile_train.py --model hed --out hed_profile.json

The step is the one `scripts/bench_models.py` times (scripts/_bench_train.py: forward, loss,
backward, SGD momentum 0.9 on one batch), on the same model with the same weights in both
frameworks, with bench_models' thread settings.

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
import bench_models as bm  # noqa: E402  (the models' sizes, PyTorch modules, thread settings)


def tf_profile(step, batch, steps):
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
                    by_type[name.rsplit(":", 1)[1]] += event.duration_ps / 1e9 / steps  # ms per step
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
    parser.add_argument("--model", required=True, choices=[n for n, c in bm.MODELS.items() if c["train_batch"]])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, help="training batch (default: bench_models')")
    parser.add_argument("--size", type=int, help="square input side (default: bench_models')")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--top", type=int, default=20, help="op types listed per framework")
    parser.add_argument("--out", help="also write the per-op-type times as JSON here")
    args = parser.parse_args(argv)
    bm.set_thread_env(args.threads)
    import keras
    import numpy as np
    import torch

    import kseg

    bm.configure_frameworks(args.threads)
    import _bench_train as bt

    cfg = bm.MODELS[args.model]
    h, w, c = cfg["size"] if args.size is None else (args.size, args.size, cfg["size"][2])
    batch = args.batch or cfg["train_batch"]
    spec = kseg.get_spec(args.model)
    keras.utils.set_random_seed(0)
    model = kseg.build_model(args.model, **cfg.get("kwargs", {}))
    num_classes = int(bm.listify(model.output)[-1].shape[-1])
    torch.manual_seed(0)
    module, _ = bm.torch_module(args.model, cfg.get("kwargs", {}), num_classes)
    bm.load_torch_weights(model, module, spec)
    rng = np.random.default_rng(0)
    xt = rng.uniform(-1, 1, (batch, h, w, c)).astype("float32")
    yt = spec.task_object.random_targets(rng, batch, h, w, num_classes)

    tf_ops, tf_wall = tf_profile(*bt.tf_step(model, spec.task_object, xt, yt), args.steps)
    torch_ops, torch_wall = torch_profile(bt.torch_step(module, spec.task_object, xt, yt), args.steps)
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


if __name__ == "__main__":
    main()
