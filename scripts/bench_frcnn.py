"""Faster R-CNN benchmark: kseg (TF graph) beside PyTorch at 600x800, batch 1, one run, one machine.

    python scripts/bench_frcnn.py                                   # faster_rcnn_vgg16 and faster_rcnn_resnet50_c4
    python scripts/bench_frcnn.py --models faster_rcnn_vgg16 --size 320 448 --rounds 3
    python scripts/bench_models.py --models faster_rcnn_vgg16 faster_rcnn_resnet50_c4   # the same, in its tables

scripts/bench_models.py runs `bench` below for these two detectors (scripts/_bench_detectors.py)
and puts its rows beside the other models' ratios.

Both sides run the same network with the same weights: PyTorch the reference modules of kseg's
tests (tests/torch_reference_frcnn.py, tests/torch_reference_frcnn_c4.py: torchvision's generic
FasterRCNN composed with a VGG16 / ResNet-50-C4 backbone, torchvision's module names and
state_dict keys), kseg the registry model in its torchvision layout loaded from that state_dict.
Test settings of the paper: 6000 proposals before NMS, 300 after; head score 0.05, NMS 0.5, 100
detections. The input is one normalised 600x800 image (torchvision pads to /32: 608x800 is what
its transform would feed; 600x800 here for both).

torchvision itself cannot be installed beside the local CPU torch, so the reference's RoIAlign and
NMS are written in torch tensor ops, not torchvision's C++ kernels (its NMS here is
scripts/_bench_ssd.py's vectorised greedy pass). The whole-pipeline row is therefore not a
comparison with torchvision; the conv rows are (the same convolutions through each framework's
oneDNN / MKL paths):

- backbone + RPN head: image -> RPN objectness and deltas;
- box head on 300 given RoIs: RoI op + fc6/fc7 (VGG16) or res5 (C4) + predictor;
- whole pipeline: image -> detections (kseg: the model with its decoder, kseg.inference_model).

Before timing, the outputs are checked: RPN outputs within 1e-3 relative, the head's logits on the
same RoIs within 1e-3 relative, and the detections equal as sets (kseg.detection.compare).
Timing: the runtimes alternate within each round (same machine load), median over rounds.
Threads: --threads for TF intra-op (inter-op 1) and torch, OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("faster_rcnn_vgg16", "faster_rcnn_resnet50_c4")


def _reference(name, num_classes):
    """The PyTorch reference with weights that keep maps input-dependent and some scores above 0.05."""
    import torch
    from torch import nn

    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]
    import _bench_ssd
    import torch_reference_frcnn as ref

    ref.nms = _bench_ssd.nms  # the vectorised greedy NMS, not the reference's per-box loop
    torch.manual_seed(0)
    if name == "faster_rcnn_vgg16":
        module = ref.FasterRCNNVGG16(num_classes=num_classes, rpn_pre_nms_top_n=6000, rpn_post_nms_top_n=300)
    else:
        import torch_reference_frcnn_c4 as ref_c4

        module = ref_c4.FasterRCNNResNetC4("resnet50", num_classes=num_classes, rpn_pre_nms_top_n=6000,
                                           rpn_post_nms_top_n=300)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.mul_(0.6 if name != "faster_rcnn_vgg16" else 1.0)
        for key, p in module.named_parameters():
            if key.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
        module.rpn.head.conv[0][0].weight.normal_(0, 0.05)
        module.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.5)
    return module.eval()


def bench(name, args):
    import numpy as np
    import tensorflow as tf
    import torch

    import kseg
    from kseg.detection.compare import compare_detection_sets

    h, w = args.size
    module = _reference(name, 21)
    path = os.path.join(args.out, f"{name}.pth")
    torch.save(module.state_dict(), path)
    model = kseg.build_model(name, layout="torchvision", weights=path, pre_nms_top_n=6000, post_nms_top_n=300)
    detector = kseg.inference_model(model)
    cost = flops(model, (h, w, 3))
    x = np.random.default_rng(0).normal(size=(1, h, w, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    roi_op = next(model.get_layer(n) for n in ("roi_align5", "roi_pool5") if n in [la.name for la in model.layers])
    features = roi_op.input[0]
    trunk = keras_model(model.inputs, [features, model.get_layer("rpn_objectness").output,
                                       model.get_layer("rpn_deltas").output])
    head = keras_model([features, model.get_layer("rois").output],
                       [model.get_layer("class_logits").input, model.get_layer("box_regression").input])
    spec = tf.TensorSpec([1, h, w, 3], tf.float32)
    tf_trunk = tf.function(lambda im: trunk(im, training=False), input_signature=[spec])
    tf_full = tf.function(lambda im: detector(im, training=False), input_signature=[spec])
    fshape = trunk.outputs[0].shape
    tf_head = tf.function(lambda f, r: head([f, r], training=False), input_signature=[
        tf.TensorSpec([1, None, None, fshape[-1]], tf.float32), tf.TensorSpec([None, 5], tf.float32)])

    with torch.inference_mode():
        want = module(xt)
        proposals = want["proposals"][0]
    rois = np.concatenate([np.zeros((len(proposals), 1), np.float32), proposals.numpy()], 1)
    feat, objectness, deltas = (np.asarray(t) for t in tf_trunk(x))
    logits, _ = (np.asarray(t) for t in tf_head(feat, rois))
    checks = {
        "rpn_objectness": rel(objectness, want["objectness"].numpy()),
        "rpn_deltas": rel(deltas, want["rpn_deltas"].numpy()),
        "head_logits_same_rois": rel(logits, want["class_logits"].numpy()),
    }
    found = {k: np.asarray(v) for k, v in tf_full(x).items()}
    det = want["detections"][0]
    n = len(det["scores"])
    theirs = {"detection_boxes": np.zeros((1, 100, 4), np.float32), "detection_scores": np.zeros((1, 100), np.float32),
              "detection_classes": np.full((1, 100), -1, np.int32), "num_detections": np.array([n])}
    theirs["detection_boxes"][0, :n] = det["boxes"].numpy()
    theirs["detection_scores"][0, :n] = det["scores"].numpy()
    theirs["detection_classes"][0, :n] = det["labels"].numpy()
    sets = compare_detection_sets(theirs, found, score_atol=1e-4, box_atol=1e-3 * max(h, w), score_threshold=0.05,
                                  iou_threshold=0.5)
    checks["detections"] = f"{sets.matched} matched, {sets.excused} excused, {len(sets.unmatched)} unmatched of {n}"
    ok = max(v for k, v in checks.items() if k != "detections") <= 1e-3 and not sets.unmatched
    print(f"{name}: checks {checks} -> {'equal' if ok else 'DIFFERENT'}", flush=True)

    f_torch = torch.from_numpy(feat.transpose(0, 3, 1, 2).copy())
    runs = {
        ("backbone + RPN head", "kseg"): lambda: tf_trunk(x),
        ("backbone + RPN head", "pytorch"): lambda: module.rpn.head(module.backbone(xt)),
        ("box head on 300 RoIs", "kseg"): lambda: tf_head(feat, rois),
        ("box head on 300 RoIs", "pytorch"): lambda: torch_head(module, f_torch, proposals, (h, w)),
        ("whole pipeline", "kseg"): lambda: tf_full(x),
        ("whole pipeline", "pytorch"): lambda: module(xt),
    }
    times = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up (tracing, oneDNN primitive caches)
        for _ in range(args.rounds):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    rows = []
    for stage in dict.fromkeys(s for s, _ in runs):
        k, p = (sorted(times[(stage, r)])[len(times[(stage, r)]) // 2] for r in ("kseg", "pytorch"))
        rows.append({"stage": stage, "kseg_ms": round(1e3 * k, 1), "pytorch_ms": round(1e3 * p, 1),
                     "ratio": round(p / k, 2)})
        print(f"  {stage:22s} kseg {1e3 * k:8.1f} ms   PyTorch {1e3 * p:8.1f} ms   kseg/PyTorch speed {p / k:.2f}x",
              flush=True)
    tf.keras.backend.clear_session()
    return {"model": name, "size": [h, w], "checks": checks, "equal": ok, "rows": rows, "rounds": args.rounds,
            "params": int(model.count_params()), **cost}


def flops(model, shape):
    """{"flops_per_image", "macs_per_image"} of kseg.flops' per-layer count at `shape` (None where it
    cannot count the model)."""
    import kseg

    try:
        report = kseg.flops(model, shape)
    except (ValueError, NotImplementedError, TypeError) as e:
        print(f"  kseg.flops: {e}", flush=True)
        return {"flops_per_image": None, "macs_per_image": None}
    return {"flops_per_image": report.total_flops, "macs_per_image": report.total_macs}


def torch_head(module, features, proposals, image_hw):
    from collections import OrderedDict

    heads = module.roi_heads
    pooled = heads.box_roi_pool(OrderedDict([("0", features)]), [proposals], [image_hw])
    return heads.box_predictor(heads.box_head(pooled))


def keras_model(inputs, outputs):
    import keras

    return keras.Model(inputs, outputs)


def rel(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64).reshape(b.shape), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", nargs=2, type=int, default=(600, 800), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(args.threads)
    results = [bench(name, args) for name in args.models]
    with open(os.path.join(args.out, "bench_frcnn.json"), "w") as f:
        json.dump({"threads": args.threads, "results": results}, f, indent=1)
    return 0 if all(r["equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
