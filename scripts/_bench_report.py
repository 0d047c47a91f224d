"""The model benchmark's report (`scripts/bench_models.py`): ratios, targets, the markdown
tables, the chart, and docs/performance.md's generated section."""

from __future__ import annotations

import json
import os
import shutil
import sys

import _bench_detectors  # the scripts folder is on sys.path: bench_models put it there
import _bench_ssd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VGG_FAMILY = ("vgg16", "fcn8s", "segnet", "deeplab_largefov", "hed")
RUNTIMES = ("tf", "xla", "onnxruntime", "tflite", "pytorch")
LABELS = {"fit": "model.fit",
          "tf": "TF graph", "xla": "TF XLA", "onnxruntime": "ONNX Runtime", "tflite": "TFLite", "pytorch": "PyTorch"}


def ratio(a, b):
    return a / b if a and b else None


def summarise(rec, peak):
    """Ratios and target checks of one model's record."""
    inf, tr = rec.get("inference", {}), rec.get("train", {})

    def speed(rt, b):  # images/s
        return inf.get(rt, {}).get(f"b{b}", {}).get("images_per_s")

    s = {}
    for b in (1, 8):
        tf_modes = {rt: speed(rt, b) for rt in ("tf", "xla") if speed(rt, b)}
        best = max(tf_modes, key=tf_modes.get) if tf_modes else None
        s[f"best_tf_b{b}"] = best
        s[f"best_tf_vs_pytorch_b{b}"] = ratio(tf_modes.get(best), speed("pytorch", b))
        s[f"onnx_vs_tf_b{b}"] = ratio(speed("onnxruntime", b), speed("tf", b))
        s[f"tflite_vs_tf_b{b}"] = ratio(speed("tflite", b), speed("tf", b))
    # A runtime that failed (XLA without a kernel for SegNet's argmax pooling) has an error, no speed.
    tf_train = {rt: tr[rt]["images_per_s"] for rt in ("tf", "xla") if "images_per_s" in tr.get(rt, {})}
    best = max(tf_train, key=tf_train.get) if tf_train else None
    s["best_tf_train"] = best
    s["best_tf_vs_pytorch_train"] = ratio(tf_train.get(best), tr.get("pytorch", {}).get("images_per_s"))
    s["fit_vs_pytorch_train"] = ratio(tr.get("fit", {}).get("images_per_s"), tr.get("pytorch", {}).get("images_per_s"))
    gf = {rt: inf[rt]["b8"]["gflops_per_s"] for rt in inf if "b8" in inf[rt]}
    if gf:
        best_rt = max(gf, key=gf.get)
        s["best_b8_runtime"] = best_rt
        s["best_b8_gflops"] = gf[best_rt]
        s["best_b8_peak_fraction"] = gf[best_rt] / peak if peak else None
        tf_best = max((gf[rt] for rt in ("tf", "xla") if rt in gf), default=None)
        s["tf_b8_peak_fraction"] = tf_best / peak if tf_best and peak else None
    return s


def targets(records, peak):
    rows = []
    for rec in records:
        if "error" in rec:
            continue
        s = rec["summary"]
        name = rec["model"]
        for key, what in (("best_tf_vs_pytorch_b1", "kseg best TF >= 1.0x PyTorch, batch-1 latency"),
                          ("best_tf_vs_pytorch_b8", "kseg best TF >= 1.0x PyTorch, batch-8 throughput"),
                          ("best_tf_vs_pytorch_train", "kseg best TF >= 1.0x PyTorch, training step"),
                          ("fit_vs_pytorch_train", "kseg model.fit >= 1.0x PyTorch, training step"),
                          ("onnx_vs_tf_b1", "ONNX Runtime >= 1.0x kseg TF graph, batch 1"),
                          ("onnx_vs_tf_b8", "ONNX Runtime >= 1.0x kseg TF graph, batch 8")):
            if s.get(key) is not None:
                note = rec.get("train_target_note" if key.endswith("_train") else "target_note", "")
                rows.append({"model": name, "target": what + note, "value": s[key],
                             "threshold": 1.0, "met": s[key] >= 1.0})
        if name in VGG_FAMILY and s.get("tf_b8_peak_fraction") is not None:
            rows.append({"model": name, "target": "VGG family: kseg TF batch-8 >= 70% of fp32 GEMM peak",
                         "value": s["tf_b8_peak_fraction"], "threshold": 0.7, "met": s["tf_b8_peak_fraction"] >= 0.7})
    return rows


def fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def markdown(result):
    recs = [r for r in result["models"] if "error" not in r]
    peak = result["gemm_peak_gflops"]
    lines = []
    m = result["machine"]
    lines.append(f"Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs ({', '.join(m.get('simd', []))}), "
                 f"{m.get('Hypervisor vendor', 'bare metal')} VM; threads per runtime: {result['threads']}; "
                 f"load average before/after: {fmt(result['loadavg_start'][0])} / {fmt(result['loadavg_end'][0])}; "
                 f"wall time {result['wall_seconds'] / 60:.1f} min.")
    def gemm(when):
        return ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in sorted(result["gemm"].get(when, {}).items()))

    nominal = m.get("nominal_peak_gflops")
    lines.append(f"fp32 GEMM peak (best of start/end): **{peak:.0f} GFLOP/s** (GFLOP/s at start: {gemm('start')}; "
                 f"at end: {gemm('end')})"
                 + (f"; nominal peak {nominal:.0f} GFLOP/s." if nominal else "."))
    lines.append("")
    lines.append("Inference, batch 1: latency in ms (lower is better); batch 8: images/s (higher is better). "
                 "Every runtime's outputs were checked against TF's before timing (max |diff| <= 1e-3 x "
                 "max |output|); a value marked ✗ failed that check.")
    lines.append("")
    head = "| model | input | GFLOPs/img | " + " | ".join(f"b1 {LABELS[r]}" for r in RUNTIMES) + " | " + \
        " | ".join(f"b8 {LABELS[r]}" for r in RUNTIMES) + " |"
    lines += [head, "|" + "---|" * 3 + "---:|" * (2 * len(RUNTIMES))]
    for r in recs:
        inf, chk = r["inference"], r["checks"]
        cells = []
        for b in (1, 8):
            for rt in RUNTIMES:
                if rt not in inf or "error" in inf[rt]:
                    cells.append("failed" if rt in inf else "–")
                    continue
                v = inf[rt].get(f"b{b}")
                if v is None:  # Faster R-CNN: batch 1 only
                    cells.append("–")
                    continue
                mark = "" if chk.get(rt, {}).get("equal") else " ✗"
                ms = 1000 * v["median_s"]
                ips = v["images_per_s"]
                if b == 1:
                    text = f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"
                else:
                    text = f"{ips:.2f}" if ips < 100 else f"{ips:.0f}"
                cells.append(text + mark)
        size = "x".join(map(str, r["input"][:2]))
        gflops = fmt(r["flops_per_image"] / 1e9 if r.get("flops_per_image") else None, ".3g")
        lines.append(f"| {r['model']} | {size} | {gflops} | " + " | ".join(cells) + " |")
    if any(r.get("detector") for r in recs):
        lines.append("")
        lines.append("Detectors' rows (ssd300): with decoding + NMS, detections checked as sets; GFLOPs are the "
                     "network's. Network only beside it:")
        lines += _bench_ssd.markdown(recs, LABELS, RUNTIMES)
    lines += _bench_detectors.markdown(recs)
    lines.append("")
    lines.append("Training step (forward, backward, SGD momentum 0.9), images/s: hand-written (TF graph, TF XLA), "
                 "through model.fit as kseg train compiles it (task loss and metrics, tf.data), PyTorch; ratios "
                 "and achieved GFLOP/s:")
    lines.append("")
    lines.append("| model | train batch | TF graph | TF XLA | model.fit | PyTorch | best TF / PyTorch: b1 · b8 · "
                 "train | model.fit / PyTorch | ONNX RT / TF: b1 · b8 | best b8 GFLOP/s (runtime) | "
                 "TF b8 % of GEMM peak |")
    lines.append("|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|")
    for r in recs:
        tr, s = r["train"], r["summary"]
        cells = [fmt(tr.get(rt, {}).get("images_per_s")) for rt in ("tf", "xla", "fit", "pytorch")]
        lines.append(
            f"| {r['model']} | {r['train_batch'] or '–'} | " + " | ".join(cells) + " | "
            f"{fmt(s.get('best_tf_vs_pytorch_b1'))}x · {fmt(s.get('best_tf_vs_pytorch_b8'))}x · "
            f"{fmt(s.get('best_tf_vs_pytorch_train'))}x | {fmt(s.get('fit_vs_pytorch_train'))}x | "
            f"{fmt(s.get('onnx_vs_tf_b1'))}x · {fmt(s.get('onnx_vs_tf_b8'))}x | "
            f"{fmt(s.get('best_b8_gflops'), '.1f')} ({LABELS.get(s.get('best_b8_runtime'), '–')}) | "
            f"{fmt(100 * s['tf_b8_peak_fraction'] if s.get('tf_b8_peak_fraction') else None, '.0f')}% |")
    lines.append("")
    lines.append("Peak RSS (MiB, whole process, during each phase; the process also holds the other runtimes' "
                 "models that are loaded at that point):")
    lines.append("")
    phases = ("infer_tf", "infer_xla", "infer_onnxruntime", "infer_tflite", "infer_pytorch", "train_tf",
              "train_fit", "train_pytorch", "export_onnx", "export_tflite")
    lines.append("| model | " + " | ".join(p.replace("_", " ") for p in phases) + " |")
    lines.append("|---|" + "---:|" * len(phases))
    for r in recs:
        ph = r.get("phases", {})
        lines.append(f"| {r['model']} | " + " | ".join(fmt(ph.get(p, {}).get("peak_rss_mib"), ".0f") for p in phases)
                     + " |")
    lines.append("")
    lines.append("One-off costs (s): trace + first call of each mode, exports:")
    lines.append("")
    lines.append("| model | TF first b1 | XLA compile b1 | XLA compile b8 | TF train first step | "
                 "model.fit first step | PyTorch train first | ONNX export | TFLite export |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in recs:
        inf, tr, ph = r["inference"], r["train"], r.get("phases", {})
        lines.append(
            f"| {r['model']} | {fmt(inf.get('tf', {}).get('b1', {}).get('first_call_s'), '.1f')} | "
            f"{fmt(inf.get('xla', {}).get('b1', {}).get('first_call_s'), '.1f')} | "
            f"{fmt(inf.get('xla', {}).get('b8', {}).get('first_call_s'), '.1f')} | "
            f"{fmt(tr.get('tf', {}).get('first_call_s'), '.1f')} | "
            f"{fmt(tr.get('fit', {}).get('first_call_s'), '.1f')} | "
            f"{fmt(tr.get('pytorch', {}).get('first_call_s'), '.1f')} | "
            f"{fmt(ph.get('export_onnx', {}).get('seconds'), '.1f')} | "
            f"{fmt(ph.get('export_tflite', {}).get('seconds'), '.1f')} |")
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    lines.append("| target | model | measured | met |")
    lines.append("|---|---|---:|---|")
    for t in result["targets"]:
        value = f"{100 * t['value']:.0f}%" if t["threshold"] < 1 else f"{t['value']:.2f}x"
        lines.append(f"| {t['target']} | {t['model']} | {value} | {'yes' if t['met'] else '**no**'} |")
    errors = [r for r in result["models"] if "error" in r]
    if errors:
        lines.append("")
        for r in errors:
            lines.append(f"- {r['model']}: failed: `{r['error'].strip().splitlines()[-1][:200]}`")
    return "\n".join(lines) + "\n"


def chart(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    recs = [r for r in result["models"] if "error" not in r]
    names = [r["model"] for r in recs]
    panels = [("batch-1 latency", "b1", RUNTIMES), ("batch-8 throughput", "b8", RUNTIMES),
              ("training step", "train", ("tf", "xla", "fit", "pytorch"))]
    colors = {"fit": "#8c564b",
              "tf": "#ff7f0e", "xla": "#d62728", "onnxruntime": "#2ca02c", "tflite": "#9467bd", "pytorch": "#1f77b4"}
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 1.3 * len(names)), 11), sharex=True)
    x = np.arange(len(names))
    for ax, (title, key, runtimes) in zip(axes, panels):
        width = 0.8 / len(runtimes)
        for i, rt in enumerate(runtimes):
            vals = []
            for r in recs:
                if key == "train":
                    a = r["train"].get(rt, {}).get("images_per_s")
                    base = r["train"].get("pytorch", {}).get("images_per_s")
                else:
                    a = r["inference"].get(rt, {}).get(key, {}).get("images_per_s")
                    base = r["inference"].get("pytorch", {}).get(key, {}).get("images_per_s")
                vals.append(a / base if a and base else np.nan)
            if all(np.isnan(vals)):  # e.g. XLA training without --train-xla
                continue
            ax.bar(x + (i - (len(runtimes) - 1) / 2) * width, vals, width, label=LABELS[rt], color=colors[rt])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_ylabel("speed vs PyTorch (x)")
        ax.set_title(f"{title} (higher is better; PyTorch = 1)")
        if ax.get_legend_handles_labels()[0]:  # a detector-only run has no training bars
            ax.legend(fontsize=8, ncol=len(runtimes))
    axes[-1].set_xticks(x, [f"{n}\n{'x'.join(map(str, r['input'][:2]))}" for n, r in zip(names, recs)], fontsize=8)
    m = result["machine"]
    fig.suptitle(f"kseg vs PyTorch, ONNX Runtime, TFLite on {m.get('Model name', '?')} ({result['threads']} threads); "
                 f"GEMM peak {result['gemm_peak_gflops']:.0f} GFLOP/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(result, md):
    """Splice the tables into docs/performance.md between the bench markers; copy JSON and PNG."""
    doc = os.path.join(ROOT, "docs", "performance.md")
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    with open(doc) as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{doc}: no {start} ... {end} markers to put the tables between")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = doc + ".tmp"
    with open(tmp, "w") as f:
        f.write(head + start + "\n" + md + end + tail)
    os.replace(tmp, doc)


def summarise_all(result):
    """Ratios and targets of a run's measurements (bench_models.raw.json holds them without)."""
    peak = max(v for g in result["gemm"].values() for v in g.values())
    result["gemm_peak_gflops"] = peak
    for rec in result["models"]:
        if "error" not in rec:
            rec["summary"] = summarise(rec, peak)
    result["targets"] = targets(result["models"], peak)
    return result


def write_outputs(result, args):
    os.makedirs(args.out, exist_ok=True)
    md = markdown(result)
    paths = {ext: os.path.join(args.out, f"bench_models.{ext}") for ext in ("json", "md", "png")}
    if os.path.abspath(paths["json"]) != os.path.abspath(args.from_json or ""):
        with open(paths["json"], "w") as f:
            json.dump(result, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(md)
    chart(result, paths["png"])
    if args.update_docs:
        update_docs(result, md)
        for ext in ("json", "png"):
            target = os.path.join(ROOT, "docs", f"performance.{ext}")
            if os.path.abspath(paths[ext]) != os.path.abspath(target):
                shutil.copy(paths[ext], target)
    print(md)
    print(f"wrote {', '.join(paths.values())}", file=sys.stderr)
