"""SSD300 in the model benchmark (`scripts/bench_models.py --models ssd300`): a detector, timed
with its postprocessing (decoding + NMS) and without it.

The network is kseg's SSD300 in torchvision's layout (ssd300_vgg16, 91 COCO classes, 300x300),
seeded with build_model's torchvision-like initialisation. Every runtime gets the same
normalised input (kseg's torchvision preprocessing of random 0..255 images) and runs twice:

- **network only**: the raw outputs, mbox_loc (N, 8732, 4) and mbox_conf (N, 8732, 91) logits;
- **with postprocessing**: the raw outputs and the padded detections (N, 200) of torchvision's
  `SSD.postprocess_detections`: softmax, decode with weights (10, 10, 5, 5) (dw, dh clamped at
  log(1000/16)), clip to the image, per class the scores > 0.01 and their top 400, NMS at IoU
  0.45, the best 200 per image.

kseg TF / XLA: `kseg.inference.Predictor` over the model and over `kseg.api.deployment_model`
(TF's CombinedNonMaxSuppression). ONNX Runtime and TFLite: kseg's exports (`export_onnx`: ONNX
NonMaxSuppression; `export_tflite`: TFLite's NON_MAX_SUPPRESSION_V5 per class), and for the
network-only rows the same exporters on a copy of the network without kseg's identity, which
they export as it is (raw outputs only). PyTorch: `tests/torch_reference.SSD300` (torchvision's
module tree and state_dict keys) with kseg's weights; torchvision cannot be installed beside the
local CPU torch, so its C++ `nms` kernel is not available and the postprocessing below is
written in torch tensors: decode and clip batched over images, then per image the per-class
score threshold and top-k (one `topk` over all classes), and `batched_nms` with torchvision's
dispatch: the coordinate-offset trick (boxes shifted by class x (max coordinate + 1), one NMS)
up to 1000 candidates, per class above that, the classes batched as one padded tensor. The NMS
itself is what torchvision's CPU kernel computes: boxes sorted by score, their IoU matrix, and
a greedy pass that keeps a box unless a kept, better box overlaps it with IoU > threshold.

Before timing: raw outputs within bench_models.REL_TOL of TF eager's, and the detections equal
to TF eager's as sets (`kseg.detection.compare.compare_detection_sets`) at batch 1 and batch 8.
Timing: all runtimes in the same rounds (see worker and rounds), network-only and full calls
alternating, so all see the same machine load; the postprocessing time is the median of the
rounds' full - network differences.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time

# torchvision ops/boxes.py batched_nms: above this many box coordinates (CPU) it runs per class.
COORDINATE_TRICK_MAX_NUMEL = 4000
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
OUTPUTS = ("mbox_loc", "mbox_conf", "detection_boxes", "detection_scores", "detection_classes", "num_detections")
DETECTIONS = OUTPUTS[2:]


# === PyTorch postprocessing ===================================================================


def decode_boxes(rel_codes, anchors, weights=BOX_WEIGHTS, clip=BBOX_XFORM_CLIP):
    """torchvision `BoxCoder.decode_single`, batched: deltas (N, A, 4) over anchors (A, 4) xyxy."""
    import torch

    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = rel_codes[..., 0] / wx, rel_codes[..., 1] / wy
    dw = torch.clamp(rel_codes[..., 2] / ww, max=clip)
    dh = torch.clamp(rel_codes[..., 3] / wh, max=clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1)


def iou_above(boxes, iou_threshold):
    """(G, K, K) bool: IoU > iou_threshold between each group's boxes (G, K, 4) xyxy, IoU as torchvision
    `box_iou` computes it (inter / (area1 + area2 - inter); two empty boxes give NaN: not above).

    In slices of about 1M pairs into reused buffers: the intermediates stay in cache and no fresh
    pages are touched per op (about 3x faster than one broadcast over all groups)."""
    import torch

    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    groups, k = x1.shape
    step = max(1, (1 << 20) // max(1, k * k))
    out = torch.empty((groups, k, k), dtype=torch.bool)
    w, h, t = (torch.empty((min(step, groups), k, k)) for _ in range(3))
    for g in range(0, groups, step):
        s = slice(g, g + step)
        n = len(x1[s])
        inter, hh, tt = w[:n], h[:n], t[:n]
        torch.minimum(x2[s, :, None], x2[s, None, :], out=inter).sub_(
            torch.maximum(x1[s, :, None], x1[s, None, :], out=tt)).clamp_(min=0)
        torch.minimum(y2[s, :, None], y2[s, None, :], out=hh).sub_(
            torch.maximum(y1[s, :, None], y1[s, None, :], out=tt)).clamp_(min=0)
        inter.mul_(hh)
        union = torch.add(area[s, :, None], area[s, None, :], out=tt).sub_(inter)
        torch.gt(inter.div_(union), iou_threshold, out=out[s])
    return out


def greedy_keep(boxes, valid, iou_threshold):
    """Greedy NMS of G independent groups at once: boxes (G, K, 4) sorted by score (descending)
    within each group, valid (G, K) bool (padding False). Returns the kept mask (G, K).

    torchvision's CPU nms kernel, the IoUs computed up front: walking the boxes best first, a box
    that no kept box suppressed is kept and suppresses every later box with IoU > iou_threshold."""
    over = iou_above(boxes, iou_threshold).triu_(1)  # [g, i, j]: box i (better) suppresses box j
    removed = ~valid  # padding neither survives nor suppresses
    for i in range(boxes.shape[1]):
        removed |= over[:, i] & ~removed[:, i : i + 1]
    return ~removed


def nms(boxes, scores, iou_threshold):
    """torchvision.ops.nms: indices of the kept boxes (n, 4), by score descending."""
    order = scores.argsort(descending=True)
    keep = greedy_keep(boxes[order][None], scores.new_ones(order.shape, dtype=bool)[None], iou_threshold)[0]
    return order[keep]


def batched_nms(boxes, scores, labels, iou_threshold):
    """torchvision.ops.batched_nms on (n, 4) boxes of class `labels`: the kept indices by score
    descending. Up to COORDINATE_TRICK_MAX_NUMEL coordinates, the coordinate-offset trick (one NMS
    over boxes shifted by label x (max coordinate + 1), so classes never overlap); above, per
    class, as torchvision's CPU path, with the classes padded into one (classes, K) batch."""
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if boxes.numel() <= COORDINATE_TRICK_MAX_NUMEL:
        offsets = labels.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    classes, labels = torch.unique(labels, return_inverse=True)
    # Each class's boxes by score, padded to the largest class: rows (G, K) of candidate indices.
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = torch.bincount(labels, minlength=len(classes))
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(len(order)) - starts.repeat_interleave(counts)
    rows = torch.full((len(classes), width), -1, dtype=torch.int64)
    rows[labels[order], column] = order
    valid = rows >= 0
    kept = greedy_keep(boxes[rows.clamp(min=0)], valid, iou_threshold)
    keep = rows[kept]
    return keep[scores[keep].argsort(descending=True)]


def torch_postprocess(bbox_regression, cls_logits, anchors, image_hw, *, score_thresh=0.01, topk_candidates=400,
                      nms_thresh=0.45, detections_per_img=200):
    """torchvision `SSD.postprocess_detections` on raw outputs (N, A, 4), (N, A, C), padded as kseg's
    decoder pads: a dict of detection_boxes (N, K, 4), detection_scores (N, K), detection_classes
    (N, K) int (-1 padding) and num_detections (N,), K = detections_per_img. The class loop of
    torchvision (score > thresh, then that class's top k) is one topk over all classes here."""
    import torch
    import torch.nn.functional as F

    height, width = image_hw
    scores = F.softmax(cls_logits, dim=-1)
    boxes = decode_boxes(bbox_regression, anchors)
    boxes = torch.stack((boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                         boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)), dim=-1)
    n, k_out = len(scores), detections_per_img
    out_boxes = boxes.new_zeros((n, k_out, 4))
    out_scores = scores.new_zeros((n, k_out))
    out_classes = torch.full((n, k_out), -1, dtype=torch.int64)
    out_num = torch.zeros(n, dtype=torch.int64)
    candidates = 0
    for i in range(n):
        by_class = scores[i, :, 1:].T  # (C - 1, A), classes 1..
        top, at = by_class.topk(min(topk_candidates, by_class.shape[1]), dim=1)
        ok = top > score_thresh
        label = torch.arange(1, scores.shape[-1])[:, None].expand_as(at)[ok]
        box, score = boxes[i][at[ok]], top[ok]
        candidates += len(score)
        keep = batched_nms(box, score, label, nms_thresh)[:k_out]
        m = len(keep)
        out_boxes[i, :m], out_scores[i, :m], out_classes[i, :m] = box[keep], score[keep], label[keep]
        out_num[i] = m
    return {"detection_boxes": out_boxes, "detection_scores": out_scores, "detection_classes": out_classes,
            "num_detections": out_num, "candidates": candidates}


# === worker ===================================================================================

# Detections equal as sets: scores within SCORE_ATOL, box corners within BOX_REL_TOL x the input side
# (REL_TOL of bench_models: 0.3 px at 300).
SCORE_ATOL = 1e-4
BOX_REL_TOL = 1e-3
# Timed rounds (every runtime's network-only and full call once per round): at least, at most.
ROUNDS = {1: (5, 50), 8: (5, 5)}


def worker(name, cfg, args, bm):
    """bench_models.worker for a detector: `bm` is the bench_models module (its helpers).

    Every runtime is set up first (built or exported, loaded, checked: its first calls), and only
    then timed, all runtimes in the same rounds: a round calls each runtime's network-only and full
    function once, the runtimes in rotating order, so that a shared machine's changing load falls
    on every runtime alike (the other models' sequential timing would give one runtime the busy
    minutes and another the quiet ones)."""
    bm.set_thread_env(args.threads, args.spin)
    import gc

    import numpy as np
    import tensorflow as tf

    bm.configure_frameworks(args.threads)
    import keras

    import kseg
    from kseg.api import deployment_model
    from kseg.detection.compare import compare_detection_sets
    from kseg.identity import identify
    from kseg.inference import Predictor

    def log(msg):
        print(f"PHASE {name}: {msg}", flush=True)

    h, w, c = cfg["size"]
    spec = kseg.get_spec(name)
    rec = {"model": name, "input": [h, w, c], "train_batch": cfg.get("train_batch"),
           "build_kwargs": cfg.get("kwargs", {}), "loadavg_start": os.getloadavg(), "detector": True, "train": {},
           "target_note": " (decoding + NMS included)"}
    with bm.Phase(rec, "build_kseg", log):
        keras.utils.set_random_seed(0)
        model = kseg.build_model(name, **cfg.get("kwargs", {}))
        deployed = deployment_model(model)  # raw outputs + detections, TF's CombinedNonMaxSuppression
        report = kseg.flops(model, (h, w, c))
    decoder = next(layer for layer in deployed.layers if hasattr(layer, "anchors"))
    # The same layers without kseg's identity: the exporters write it as it is, raw outputs only.
    network = keras.Model(model.inputs, model.outputs, name=f"{name}_network")
    rec["params"] = int(model.count_params())
    rec["flops_per_image"], rec["macs_per_image"] = report.total_flops, report.total_macs
    num_classes = int(model.outputs[-1].shape[-1])
    post = dict(score_thresh=decoder.score_threshold, topk_candidates=decoder.top_k,
                nms_thresh=decoder.iou_threshold, detections_per_img=decoder.max_detections)
    rec["postprocess"] = dict(post, classes=num_classes - 1, anchors=int(len(decoder.anchors)))

    rng = np.random.default_rng(0)
    preprocessing = identify(model).preprocessing  # torchvision's: RGB 0..255 minus the mean
    inputs = {b: preprocessing.apply(rng.uniform(0, 255, (b, h, w, c)).astype("float32")).astype("float32")
              for b in (1, 8)}
    ref = {b: dict(zip(deployed.output_names, (np.asarray(o) for o in deployed(x, training=False))))
           for b, x in inputs.items()}
    rec["postprocess"]["candidates_per_image"] = candidates_per_image(ref[8]["mbox_conf"], **post)
    rec["postprocess"]["detections_per_image"] = float(np.mean(ref[8]["num_detections"]))
    checks = {"tf_eager": {"equal": True, "max_rel_diff": 0.0, "reference": True}}
    tmp = tempfile.mkdtemp(prefix="kseg_bench_ssd_")

    def check(runtime, net, full, feed):
        """The runtime's first calls (the warm-up, timed apart): raw outputs of both functions within
        REL_TOL of TF eager's, detections equal as sets, at batch 1 and 8."""
        entry, first = {}, {}
        for b in (1, 8):
            for kind, fn in (("network", net), ("full", full)):
                t0 = time.perf_counter()
                got = dict(zip(OUTPUTS, fn(feed[b])))
                first[f"{kind}_b{b}"] = round(time.perf_counter() - t0, 4)
                entry[f"{kind}_b{b}"] = bm.compare([ref[b][k] for k in OUTPUTS[:2]], [got[k] for k in OUTPUTS[:2]])
            # got: the full function's outputs
            found = compare_detection_sets(ref[b], got, score_atol=SCORE_ATOL, box_atol=BOX_REL_TOL * max(h, w),
                                           score_threshold=post["score_thresh"], iou_threshold=post["nms_thresh"])
            entry[f"b{b}"] = {"detections": {"passed": found.passed, "matched": found.matched,
                                             "excused": found.excused, "unmatched": found.unmatched[:5],
                                             "num_unmatched": len(found.unmatched),
                                             "max_score_diff": found.max_score_diff,
                                             "max_box_diff": found.max_box_diff}}
        raws = [v for k, v in entry.items() if k.startswith(("network", "full"))]
        entry["max_rel_diff"] = max(r.get("max_rel_diff", float("inf")) for r in raws)
        entry["detections_equal"] = all(entry[f"b{b}"]["detections"]["passed"] for b in (1, 8))
        entry["equal"] = all(r.get("equal") for r in raws) and entry["detections_equal"]
        checks[runtime] = entry
        if not entry["equal"]:
            log(f"{runtime} differs from TF: {entry}")
        return first

    tf_feed = {b: tf.constant(x) for b, x in inputs.items()}

    def tf_setup():
        net_pred, full_pred = Predictor(model), Predictor(deployed)
        return (lambda x: [o.numpy() for o in net_pred(x)]), (lambda x: [o.numpy() for o in full_pred(x)]), tf_feed

    def xla_setup():
        # XLA has no CombinedNonMaxSuppression kernel: the network XLA-compiled, the decoder in graph mode.
        net_pred = Predictor(model, jit_compile=True)
        signature = [tf.TensorSpec([None, *t.shape[1:]], tf.float32) for t in model.outputs]
        decode = tf.function(lambda loc, conf: decoder([loc, conf]), input_signature=signature)

        def full(x):
            raw = net_pred(x)
            found = decode(*raw)
            return [o.numpy() for o in (*raw, *(found[k] for k in DETECTIONS))]

        rec["xla_note"] = ("network XLA-compiled, decoder + NMS in TF graph mode (XLA has no kernel for "
                           "CombinedNonMaxSuppression)")
        return (lambda x: [o.numpy() for o in net_pred(x)]), full, tf_feed

    def exported(fmt, export, runner):
        paths = {}
        for label, m in (("_network", network), ("", model)):
            paths[label] = os.path.join(tmp, f"{name}{label}.{fmt}")
            with bm.Phase(rec, f"export_{fmt}{label}", log):
                export(m, paths[label], input_size=(h, w))
        return runner(paths["_network"], args, tf), runner(paths[""], args, tf), inputs

    def onnx_setup():
        from convert.onnx_format import export_onnx

        return exported("onnx", export_onnx, ort_runner)

    def tflite_setup():
        from convert.tflite_format import export_tflite

        return exported("tflite", export_tflite, tflite_runner)

    def torch_setup():
        import torch

        sys.path.insert(0, os.path.join(bm.ROOT, "tests"))
        import torch_reference

        torch.manual_seed(0)
        module = torch_reference.SSD300(num_classes)
        bm.load_torch_weights(model, module, spec)
        module.eval()
        rec["pytorch_module"] = "tests/torch_reference.SSD300 (torchvision ssd300_vgg16's module tree)"
        anchors = torch.from_numpy(np.asarray(decoder.anchors))
        feed = {b: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) for b, x in inputs.items()}

        def net(x):
            with torch.inference_mode():
                return [o.numpy() for o in module(x)]

        def full(x):
            with torch.inference_mode():
                loc, conf = module(x)
                found = torch_postprocess(loc, conf, anchors, decoder.input_hw, **post)
                return [o.numpy() for o in (loc, conf, *(found[k] for k in DETECTIONS))]

        return net, full, feed

    runtimes, results, network_results = {}, {}, {}
    for runtime, setup in (("tf", tf_setup), ("xla", xla_setup), ("onnxruntime", onnx_setup),
                           ("tflite", tflite_setup), ("pytorch", torch_setup)):
        if runtime in args.skip:
            continue
        try:
            with bm.Phase(rec, f"infer_{runtime}", log):  # setup and first calls; earlier runtimes still held
                net, full, feed = setup()
                first = check(runtime, net, full, feed)
            runtimes[runtime] = (net, full, feed, first)
        except Exception as e:  # one runtime's failure is recorded; the others go on
            msg = f"{type(e).__name__}: {e}".strip()
            results[runtime] = {"error": msg[:2000]}
            log(f"{runtime} failed: {msg.splitlines()[0][:200]}")
        finally:
            gc.collect()

    for batch, (min_rounds, max_rounds) in ROUNDS.items():
        with bm.Phase(rec, f"timing_b{batch}", log):
            # Each function about --budget seconds, as the other models' measurements.
            times = rounds(runtimes, batch, min_rounds, max_rounds, args.budget * 2 * len(runtimes))
        for runtime, (net_times, full_times) in times.items():
            first = runtimes[runtime][3]
            for store, kind, t in ((network_results, "network", net_times), (results, "full", full_times)):
                t = sorted(t)
                m = {"median_s": t[len(t) // 2], "min_s": t[0], "runs": len(t),
                     "first_call_s": first[f"{kind}_b{batch}"]}
                m["images_per_s"] = batch / m["median_s"]
                m["gflops_per_s"] = rec["flops_per_image"] * batch / m["median_s"] / 1e9
                store.setdefault(runtime, {})[f"b{batch}"] = m
            diffs = sorted(f - n for n, f in zip(net_times, full_times))
            results[runtime][f"b{batch}"]["postprocess_s"] = diffs[len(diffs) // 2]
    shutil.rmtree(tmp, ignore_errors=True)
    rec["inference"], rec["inference_network"], rec["checks"] = results, network_results, checks
    rec["ratios"], rec["ratios_best"] = ratios(results, network_results), ratios(results, network_results, "min_s")
    if "train" not in args.skip and cfg.get("train_batch"):
        # Last: training changes the Keras weights (the PyTorch module takes its copy first).
        import _bench_ssd_train

        rec["train"] = _bench_ssd_train.train(bm, model, spec, np.asarray(decoder.anchors), num_classes, cfg, args,
                                              rec, log)
    rec["loadavg_end"] = os.getloadavg()
    return rec


def rounds(runtimes, batch, min_rounds, max_rounds, budget_s):
    """Timed rounds over {runtime: (net, full, feed, _)}: each round calls every runtime's net and
    full function once, the runtimes in rotating order and net/full in alternating order, until
    min_rounds and budget_s (or max_rounds). Returns {runtime: (net times, full times)}."""
    names = list(runtimes)
    times = {rt: ([], []) for rt in names}
    start, r = time.perf_counter(), 0
    while names and r < max_rounds and (r < min_rounds or time.perf_counter() - start < budget_s):
        for rt in names[r % len(names):] + names[: r % len(names)]:
            net, full, feed, _ = runtimes[rt]
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                (net, full)[i](feed[batch])
                times[rt][i].append(time.perf_counter() - t0)
        r += 1
    return times


def candidates_per_image(conf, *, score_thresh, topk_candidates, **_):
    """Mean (class, box) pairs per image that reach the NMS: per class min(top k, # scores > thresh)."""
    import numpy as np

    e = np.exp(conf - conf.max(-1, keepdims=True))
    scores = (e / e.sum(-1, keepdims=True))[..., 1:]
    return float(np.minimum((scores > score_thresh).sum(1), topk_candidates).sum(-1).mean())


def ort_runner(path, args, _tf=None):
    """An ONNX Runtime session with the benchmark's settings; fn(x) -> outputs in OUTPUTS order."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not args.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = [n for n in OUTPUTS if n in {o.name for o in session.get_outputs()}]
    return lambda x: session.run(names, {input_name: x})


def tflite_runner(path, args, tf):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's move-to-LiteRT notice
        interpreter = tf.lite.Interpreter(model_path=path, num_threads=args.threads)
    runner = interpreter.get_signature_runner("serving_default")
    (input_name,) = runner.get_input_details()
    names = [n for n in OUTPUTS if n in runner.get_output_details()]

    def fn(x):
        out = runner(**{input_name: x})
        return [out[n] for n in names]

    return fn


def ratios(full, network, stat="median_s"):
    """Each runtime's speed over PyTorch's, network only and with postprocessing, batch 1 and 8, from
    the rounds' median times (or stat="min_s": the best rounds, what an otherwise idle machine gives)."""
    out = {}
    for kind, results in (("network", network), ("full", full)):
        base = results.get("pytorch", {})
        for rt, r in results.items():
            for b in (1, 8):
                a, p = r.get(f"b{b}", {}).get(stat), base.get(f"b{b}", {}).get(stat)
                if a and p:
                    out[f"{rt}_vs_pytorch_{kind}_b{b}"] = p / a
    return out


# === report ===================================================================================


def markdown(recs, labels, runtimes):
    """The detectors' table: network only and with postprocessing per runtime, ratios to PyTorch."""
    lines = []
    for r in recs:
        if not r.get("detector") or "error" in r:
            continue
        post, net, full, chk = r["postprocess"], r["inference_network"], r["inference"], r["checks"]
        lines += ["", f"{r['model']} ({r['build_kwargs']}, {'x'.join(map(str, r['input'][:2]))}): network only "
                  f"(raw mbox_loc, mbox_conf) and with postprocessing (softmax, decode, clip, per class score > "
                  f"{post['score_thresh']} and top {post['topk_candidates']}, NMS IoU {post['nms_thresh']}, best "
                  f"{post['detections_per_img']}). {post['candidates_per_image']:.0f} (class, box) candidates per "
                  f"image reach the NMS ({post['classes']} classes x top {post['topk_candidates']} at most), "
                  f"{post['detections_per_image']:.0f} detections kept. Batch 1: ms; batch 8: images/s; "
                  "x PyTorch = speed over PyTorch's in the same column.", "",
                  "| runtime | b1 network ms | b1 + postprocessing ms | b8 network img/s | b8 + postprocessing "
                  "img/s | postprocessing ms/img (b1 · b8) | x PyTorch: b1 net · b1 full · b8 net · b8 full | "
                  "checks: raw max rel diff · detections as sets (b1 · b8) |",
                  "|---|---:|---:|---:|---:|---|---|---|"]
        for rt in runtimes:
            if rt not in full and rt not in net:
                continue
            if "error" in full.get(rt, {}):
                lines.append(f"| {labels[rt]} | failed: {full[rt]['error'].splitlines()[0][:120]} |||||||")
                continue
            n1, f1 = net[rt]["b1"]["median_s"] * 1000, full[rt]["b1"]["median_s"] * 1000
            n8, f8 = net[rt]["b8"]["images_per_s"], full[rt]["b8"]["images_per_s"]
            ratio = [r["ratios"].get(f"{rt}_vs_pytorch_{k}_b{b}") for b, k in
                     ((1, "network"), (1, "full"), (8, "network"), (8, "full"))]
            c = chk.get(rt, {})
            dets = [c.get(f"b{b}", {}).get("detections", {}) for b in (1, 8)]
            sets = " · ".join(f"{'equal' if d.get('passed') else '**differ**'} ({d.get('matched')} matched, "
                              f"{d.get('excused')} excused)" for d in dets)
            post_ms = " · ".join(f"{1000 * full[rt][f'b{b}']['postprocess_s'] / b:.0f}" for b in (1, 8))
            lines.append(f"| {labels[rt]} | {n1:.0f} | {f1:.0f} | {n8:.2f} | {f8:.2f} | {post_ms} | "
                         + " · ".join("–" if v is None else f"{v:.2f}x" for v in ratio)
                         + f" | {c.get('max_rel_diff', 0):.1e} · {sets} |")
        best = r.get("ratios_best", {})
        lines += ["", "The same ratios from each runtime's fastest round instead of the median (b1 net · b1 full · "
                  "b8 net · b8 full): " + "; ".join(
                      f"{labels[rt]} " + " · ".join(
                          f"{best[key]:.2f}x" if key in best else "–" for key in
                          (f"{rt}_vs_pytorch_{k}_b{b}" for b, k in ((1, "network"), (1, "full"), (8, "network"),
                                                                     (8, "full"))))
                      for rt in runtimes if rt in net and rt != "pytorch") + "."]
        if r.get("xla_note"):
            lines += ["", f"TF XLA: {r['xla_note']}."]
    return lines
