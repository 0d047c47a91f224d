"""Faster R-CNN in the model benchmark (`scripts/bench_models.py --models faster_rcnn_vgg16
faster_rcnn_resnet50_c4`): scripts/bench_frcnn.py's comparison run as one of bench_models' workers.

Each detector runs `bench_frcnn.bench` as it is (imported, not copied): torchvision's generic
`FasterRCNN` composed with a VGG16 / ResNet-50-C4 backbone in PyTorch (tests/torch_reference_frcnn.py,
tests/torch_reference_frcnn_c4.py: torchvision's module names and state_dict keys), kseg's registry
model in its torchvision layout loaded from that state_dict, one normalised image at 600x800 (Ren et
al.'s test scale; --quick: 320x448), batch 1, 6000 / 300 proposals, outputs checked before timing
(RPN outputs and the head's logits within 1e-3 relative, detections equal as sets), the two runtimes
alternating in each round, medians. What bench_models' tables get:

- the inference table: the whole pipeline (image -> detections) as the batch-1 "TF graph" and
  "PyTorch" cells (no batch 8, no XLA / ONNX Runtime / TFLite, no training step), so its ratio
  columns and targets hold kseg's speed over PyTorch's for the pipeline;
- a table of its own (`markdown`): each stage (backbone + RPN head, box head on 300 RoIs, whole
  pipeline) with both times and the ratio, and the checks.

The whole-pipeline ratio is not one against torchvision: torchvision cannot be installed beside the
local CPU torch, so the reference's RoIAlign and NMS are torch-op transcriptions (bench_frcnn's
docstring); the backbone + RPN row is like for like.

Rounds: bench_models' --budget (seconds of timed runs per measurement) picks them, as a whole
pipeline call takes seconds on a CPU: 7 rounds (bench_frcnn's default) from 2 s, 3 from 0.5 s, and
1 below (a smoke run: `--quick --budget 0`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

QUICK_SIZE = (320, 448, 3)  # bench_frcnn's own example of a smaller run
STAGES = ("backbone + RPN head", "box head on 300 RoIs", "whole pipeline")


def _bench_frcnn():
    """scripts/bench_frcnn.py, imported from this folder."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_frcnn

    return bench_frcnn


def rounds(budget_s):
    """Timed rounds for bench_models' --budget (see the module docstring)."""
    return 7 if budget_s >= 2 else 3 if budget_s >= 0.5 else 1


def configure(cfg, args):
    """A detector's bench_models config for these arguments: --quick runs the smaller size."""
    return dict(cfg, size=QUICK_SIZE) if args.quick else cfg


def worker(name, cfg, args, bm):
    """bench_models.worker for a Faster R-CNN: `bm` is the bench_models module (its helpers). Returns
    bench_models' record: the whole pipeline as the batch-1 tf / pytorch inference, the stages apart."""
    bm.set_thread_env(args.threads, args.spin)
    bm.configure_frameworks(args.threads)
    frcnn = _bench_frcnn()

    def log(msg):
        print(f"PHASE {name}: {msg}", flush=True)

    h, w, c = cfg["size"]
    count = rounds(args.budget)
    transcribed = " (PyTorch's RoIAlign / NMS are torch-op transcriptions)"
    rec = {"model": name, "input": [h, w, c], "train_batch": None, "build_kwargs": cfg.get("kwargs", {}),
           "loadavg_start": os.getloadavg(), "frcnn": True, "train": {},
           "target_note": " (Faster R-CNN whole pipeline:" + transcribed[1:],
           "train_target_note": transcribed}
    if "pytorch" in args.skip:
        log("--skip pytorch ignored: the Faster R-CNN rows are the comparison with PyTorch")
    tmp = tempfile.mkdtemp(prefix="kseg_bench_frcnn_")  # the reference's state_dict, which kseg loads
    try:
        with bm.Phase(rec, "bench_frcnn", log):
            out = frcnn.bench(name, argparse.Namespace(size=(h, w), rounds=count, out=tmp))
        rec.update(params=out["params"], flops_per_image=out["flops_per_image"],
                   macs_per_image=out["macs_per_image"], stages=out["rows"], frcnn_checks=out["checks"], rounds=count,
                   pytorch_module=("tests/torch_reference_frcnn.py" if name == "faster_rcnn_vgg16" else
                                   "tests/torch_reference_frcnn_c4.py") + " (torchvision's FasterRCNN module tree)")
        if "train" not in args.skip:  # scripts/_bench_frcnn_train.py: the approximate joint training step
            import _bench_frcnn_train

            rec["train_batch"] = cfg["train_batch"]
            rec["train"] = _bench_frcnn_train.train(bm, frcnn, name, os.path.join(tmp, f"{name}.pth"), cfg, args,
                                                    rec, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    whole = next(row for row in out["rows"] if row["stage"] == STAGES[-1])
    rec["inference"] = {rt: {"b1": _timing(whole[f"{key}_ms"], count, rec["flops_per_image"])}
                        for rt, key in (("tf", "kseg"), ("pytorch", "pytorch"))}
    rec["checks"] = {"tf_eager": {"equal": True, "reference": True},
                     **{rt: {"equal": out["equal"], "detections": out["checks"]["detections"]}
                        for rt in ("tf", "pytorch")}}
    rec["loadavg_end"] = os.getloadavg()
    return rec


def _timing(ms, runs, flops):
    seconds = ms / 1e3
    return {"median_s": seconds, "runs": runs, "first_call_s": None, "images_per_s": 1 / seconds,
            "gflops_per_s": flops / seconds / 1e9 if flops else None}


def markdown(recs):
    """The Faster R-CNN table: each stage's times and kseg's speed over PyTorch's, and the checks."""
    rows = [r for r in recs if r.get("frcnn") and "error" not in r]
    if not rows:
        return []
    lines = ["", "Faster R-CNN (scripts/bench_frcnn.py's comparison, torchvision layout, 21 classes, batch 1, "
             "6000 / 300 proposals; PyTorch: the reference modules with torchvision's module names, the same "
             "weights). Its TF graph and PyTorch cells above are the whole pipeline; like for like is the "
             "backbone row (PyTorch's RoIAlign and NMS are torch-op transcriptions, not torchvision's kernels):",
             "", "| model | input | stage | kseg TF ms | PyTorch ms | kseg speed vs PyTorch | rounds |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for i, stage in enumerate(r["stages"]):
            lead = f"{r['model']} | {'x'.join(map(str, r['input'][:2]))}" if i == 0 else " | "
            lines.append(f"| {lead} | {stage['stage']} | {stage['kseg_ms']:.0f} | {stage['pytorch_ms']:.0f} | "
                         f"{stage['ratio']:.2f}x | {r['rounds']} |")
    lines.append("")
    for r in rows:
        c = r["frcnn_checks"]
        state = "equal" if r["checks"]["tf"]["equal"] else "**DIFFERENT**"
        peak = r.get("phases", {}).get("bench_frcnn", {}).get("peak_rss_mib")
        lines.append(f"- {r['model']} checks ({state}): RPN objectness {c['rpn_objectness']:.1e} and deltas "
                     f"{c['rpn_deltas']:.1e}, head logits on the same RoIs {c['head_logits_same_rois']:.1e} "
                     f"(max relative); detections as sets: {c['detections']}"
                     + (f"; peak RSS {peak:.0f} MiB (both runtimes in one process)." if peak else "."))
    return lines
