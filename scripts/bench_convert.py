"""Conversion benchmark: time and peak memory of Keras -> ONNX / TFLite, and inference speed of the results.

Each conversion runs in its own subprocess (peak RSS = that process's VmHWM: building the model
plus converting it); inference runs TF (a tf.function, graph mode), ONNX Runtime and the TFLite
interpreter on the produced files in one process, so the ratios compare like with like.

    python scripts/bench_convert.py                       # fcn8s and deeplab_largefov, 256x256
    python scripts/bench_convert.py --size 500 --models fcn8s --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CONVERT = """
import json, sys, time
import kseg
from convert.onnx_format import export_onnx
from convert.tflite_format import export_tflite
name, fmt, path = sys.argv[1:4]
model = kseg.build_model(name)
start = time.perf_counter()
if fmt == "onnx":
    export_onnx(model, path)
else:
    export_tflite(model, path, quantize="dynamic" if fmt == "tflite_int8" else None)
seconds = time.perf_counter() - start
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"seconds": seconds, "peak_rss": peak}))
"""

FORMATS = ("onnx", "tflite", "tflite_int8")
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "tflite_int8": ".int8.tflite"}


def convert(name, fmt, path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", _CONVERT, name, fmt, path], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name} -> {fmt} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(fn, x, repeats):
    fn(x)  # warm-up: graph tracing, session/interpreter allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fcn8s", "deeplab_largefov"])
    parser.add_argument("--size", type=int, default=256, help="inference input H = W (default 256)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    import kseg
    from convert.onnx_format import load_onnx
    from convert.tflite_format import load_tflite

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            paths = {}
            for fmt in FORMATS:
                paths[fmt] = os.path.join(tmp, name + SUFFIX[fmt])
                stats = convert(name, fmt, paths[fmt])
                rows.append({"model": name, "what": f"convert -> {fmt}", "seconds": stats["seconds"],
                             "peak_rss_gib": stats["peak_rss"] / 2**30,
                             "file_mb": os.path.getsize(paths[fmt]) / 1e6})
                print(json.dumps(rows[-1]), file=sys.stderr)
            model = kseg.build_model(name)
            # The converted files hold the weights of their own (random) build; inference speed does
            # not depend on the values, so TF runs a fresh build of the same architecture.
            graph = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
            runners = {"tf": lambda x: graph(tf.constant(x)), "onnxruntime": load_onnx(paths["onnx"]),
                       "tflite": load_tflite(paths["tflite"]), "tflite_int8": load_tflite(paths["tflite_int8"])}
            for batch in args.batches:
                x = np.random.default_rng(0).uniform(-100, 100, (batch, args.size, args.size, 3)).astype(np.float32)
                base = None
                for runtime, fn in runners.items():
                    seconds = timed(fn, x, args.repeats)
                    base = base or seconds
                    rows.append({"model": name, "what": f"infer {runtime} b{batch} {args.size}x{args.size}",
                                 "seconds": seconds, "vs_tf": seconds / base})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"| model | what | seconds | peak RSS GiB | file MB | time vs TF |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else ""
        size = f"{r['file_mb']:.0f}" if "file_mb" in r else ""
        ratio = f"{r['vs_tf']:.2f}x" if "vs_tf" in r else ""
        print(f"| {r['model']} | {r['what']} | {r['seconds']:.3f} | {peak} | {size} | {ratio} |")


if __name__ == "__main__":
    main()
