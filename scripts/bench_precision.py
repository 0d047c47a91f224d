"""Mixed precision on the CPU: what bfloat16 does to a training step's speed and to what a run learns.

    python scripts/bench_precision.py                                  # both parts, the defaults below
    python scripts/bench_precision.py --skip accuracy --models resnet50 deit_small
    python scripts/bench_precision.py --skip speed --epochs 2

"mixed_bfloat16" is Keras' policy that `kseg train --precision mixed_bfloat16` sets: layers compute
in bfloat16, weights and optimizer state stay float32, outputs are cast to float32 for the loss
(kseg.train.distribute.float32_outputs). TensorFlow runs bfloat16 matrix products and convolutions
through oneDNN, which uses the CPU's AVX512_BF16 instructions (and AMX tiles where there are
any); without them bfloat16 is emulated and slower.

1. Speed (`--models`): bench_models' hand-written training step (scripts/_bench_train.py: forward,
   cross-entropy, backward, kseg's FusedSGD) at bench_models' input size and batch, the model built
   under each policy in its own subprocess (the policy is process-wide), bench_models' thread
   settings; median step time, the outputs' first-step loss in both.
2. Accuracy (`--epochs`, `--seeds`): the README demo's recipe (`synthetic_demo`: DeepLab-LargeFOV at
   width 0.125 on kseg's synthetic shapes, 500 steps per epoch) trained from the same seed and the
   same He initialisation in each precision, for each seed (the spread between seeds is the scale a
   precision's difference is read against), through `kseg.train.train` (what `kseg train --precision`
   runs), then scored on the validation split by `kseg.inference.evaluate` with the model as
   trained (bfloat16 inference for the bfloat16 run): mean IoU and pixel accuracy per epoch and
   at the end, and the training time.

Results: printed as Markdown tables and written to --out/bench_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PRECISIONS = ("float32", "mixed_bfloat16")
SPEED_MODELS = ("resnet50", "vgg16", "deeplab_largefov", "mobilenet_v2", "deit_small")


def speed_worker(name, precision, args):
    sys.path.insert(0, HERE)
    import bench_models as bm

    bm.set_thread_env(args.threads)
    import keras
    import numpy as np

    import kseg
    from kseg.train.distribute import float32_outputs, set_precision

    bm.configure_frameworks(args.threads)
    import _bench_train

    cfg = bm.MODELS[name]
    h, w, c = cfg["size"]
    batch = cfg["train_batch"]
    set_precision(precision)
    keras.utils.set_random_seed(0)
    model = float32_outputs(kseg.build_model(name, **cfg.get("kwargs", {})))
    spec = kseg.get_spec(name)
    num_classes = int(bm.listify(model.output)[-1].shape[-1])
    rng = np.random.default_rng(0)
    xt = rng.uniform(-1, 1, (batch, h, w, c)).astype("float32")
    yt = spec.task_object.random_targets(rng, batch, h, w, num_classes)
    step, data = _bench_train.tf_step(model, spec.task_object, xt, yt)
    start = time.perf_counter()
    first_loss = float(step(data).numpy())
    first = time.perf_counter() - start
    m = bm.measure(lambda d: step(d).numpy(), data, min_runs=3, max_runs=20, budget_s=args.budget)
    return {"model": name, "precision": precision, "batch": batch, "input": [h, w, c], "first_step_s": first,
            "first_loss": first_loss, "median_s": m["median_s"], "runs": m["runs"],
            "compute_dtype": next(la.compute_dtype for la in model.layers if la.weights)}


def accuracy_worker(precision, args):
    import kseg.data as kd
    from kseg.cliutil import DEMO_SEED, DEMO_SIZE, DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES
    from kseg.demo import he_init
    from kseg.inference import evaluate
    from kseg.train import load_recipe, train

    data_dir = os.path.join(args.out, "synthetic")
    if not os.path.isdir(os.path.join(data_dir, "JPEGImages")):
        kd.make_synthetic(data_dir, seed=DEMO_SEED, train=DEMO_TRAIN_IMAGES, val=DEMO_VAL_IMAGES, size=DEMO_SIZE)
    seed = int(args.seed)
    recipe = load_recipe("synthetic_demo", {"data.crop": [DEMO_SIZE, DEMO_SIZE], "training.seed": seed,
                                            "training.epochs": args.epochs})
    run_dir = tempfile.mkdtemp(prefix=f"kseg_precision_{precision}_")
    result = train(recipe, data_dir, run_dir, precision=precision, init=lambda m: he_init(m, seed=seed),
                   verbose=0, tensorboard=False)
    model = result["model"]
    val = kd.synthetic(data_dir, "val", batch_size=1, preprocessing=recipe.model)
    scores = evaluate(model, val, class_names=list(kd.SYNTH_CLASSES), progress=False)
    history = result["history"]
    return {"precision": precision, "seed": seed, "epochs": args.epochs, "train_seconds": result["train_seconds"],
            "val_mean_iou": scores["mean_iou"], "val_pixel_accuracy": scores["pixel_accuracy"],
            "val_mean_iou_per_epoch": [float(v) for v in history.get("val_mean_iou", [])],
            "loss_per_epoch": [float(v) for v in history.get("loss", [])],
            "compute_dtype": next(la.compute_dtype for la in model.layers if la.weights),
            "per_class_iou": {row["class"]: row.get("iou") for row in scores["per_class"]}}


def run_worker(kind, name, precision, args):
    """One measurement in a fresh process (Keras' dtype policy is global)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, name, precision, "--result", path,
           "--threads", str(args.threads), "--budget", str(args.budget), "--epochs", str(args.epochs),
           "--out", args.out, "--seed", str(args.seed)]
    print(f"[{time.strftime('%H:%M:%S')}] {kind} {name} {precision}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if proc.returncode:
            return {"model": name, "precision": precision, "error": proc.stdout[-3000:]}
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def markdown(result):
    lines = []
    speed = result.get("speed", [])
    if speed:
        lines += ["Training step (hand-written, bench_models' size and batch), median seconds per step:", "",
                  "| model | batch | float32 s | mixed_bfloat16 s | bf16 speed-up | first-step loss fp32 / bf16 |",
                  "|---|---:|---:|---:|---:|---|"]
        for name in dict.fromkeys(r["model"] for r in speed):
            rows = {r["precision"]: r for r in speed if r["model"] == name}
            fp, bf = rows.get("float32", {}), rows.get("mixed_bfloat16", {})
            if "median_s" not in fp or "median_s" not in bf:
                lines.append(f"| {name} | – | failed | failed | – | – |")
                continue
            lines.append(f"| {name} | {fp['batch']} | {fp['median_s']:.3f} | {bf['median_s']:.3f} | "
                         f"{fp['median_s'] / bf['median_s']:.2f}x | {fp['first_loss']:.4f} / {bf['first_loss']:.4f} |")
    acc = result.get("accuracy", [])
    if acc:
        lines += ["", "synthetic_demo recipe, the same seed and initialisation in both precisions, validation split:",
                  "", "| precision | seed | epochs | train s | val mean IoU | val pixel accuracy | "
                  "val mean IoU per epoch |", "|---|---:|---:|---:|---:|---:|---|"]
        for r in acc:
            if "error" in r:
                lines.append(f"| {r['precision']} | failed | | | | | |")
                continue
            per = ", ".join(f"{v:.3f}" for v in r["val_mean_iou_per_epoch"])
            lines.append(f"| {r['precision']} | {r['seed']} | {r['epochs']} | {r['train_seconds']:.0f} | "
                         f"{r['val_mean_iou']:.4f} | {r['val_pixel_accuracy']:.4f} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SPEED_MODELS), help="models for the speed part")
    parser.add_argument("--epochs", type=int, default=7, help="epochs of the accuracy part's demo recipe (its own 7)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="training seeds (initialisation, data order) of the accuracy part, each run in both "
                             "precisions")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="+", default=[], choices=("speed", "accuracy"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed steps per measurement")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "MODEL", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        kind, name, precision = args.worker
        out = speed_worker(name, precision, args) if kind == "speed" else accuracy_worker(precision, args)
        with open(args.result, "w") as f:
            json.dump(out, f)
        return 0
    start = time.perf_counter()
    result = {"machine": _machine(), "threads": args.threads, "loadavg_start": os.getloadavg()}
    if "speed" not in args.skip:
        result["speed"] = [run_worker("speed", name, p, args) for name in args.models for p in PRECISIONS]
    if "accuracy" not in args.skip:
        result["accuracy"] = []
        for seed in args.seeds:
            args.seed = seed
            result["accuracy"] += [run_worker("accuracy", "synthetic_demo", p, args) for p in PRECISIONS]
    result.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - start)
    path = os.path.join(args.out, "bench_precision.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
    for r in result.get("speed", []) + result.get("accuracy", []):
        if "error" in r:
            print(f"{r['model']} {r['precision']} failed:\n{r['error'][-1500:]}")
    print(f"wrote {path}")
    return 0


def _machine():
    sys.path.insert(0, HERE)
    import bench_models as bm

    return bm.machine_info()


if __name__ == "__main__":
    sys.exit(main())
