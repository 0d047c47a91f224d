"""Conversion benchmark: time and peak memory of every path kseg writes, and inference speed of the results.

Each conversion runs in its own subprocess: it builds the model at full size, writes one format
(timed), opens the artifact in its runtime (timed) and reports the process's peak RSS (VmHWM:
building plus converting). Inference then runs TF (a tf.function, graph mode) and each
artifact's runtime (SavedModel, frozen graph, ONNX Runtime, TFLite float and int8) in one
process on the same input, so the ratios compare like with like.

    python scripts/bench_convert.py                       # fcn8s and deeplab_largefov, 256x256
    python scripts/bench_convert.py --size 500 --models fcn8s --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CONVERT = """
import json, sys, time
import kseg
from convert import api, formats
from kseg.identity import build_metadata
name, fmt, path, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = kseg.build_model(name)
options = {"quantize": "dynamic"} if fmt == "tflite_int8" else {}
if fmt == "tf_serving":
    options["input_size"] = (size, size)  # predict_images' network size (verified in the writer)
start = time.perf_counter()
formats.call(fmt.replace("_int8", ""), "save", model, path, metadata=build_metadata(model), **options)
seconds = time.perf_counter() - start
start = time.perf_counter()
api.load_runner(path, fmt=fmt.replace("_int8", ""), model=name)
load_seconds = time.perf_counter() - start
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"seconds": seconds, "load_seconds": load_seconds, "peak_rss": peak}))
"""

FORMATS = ("keras", "h5", "weights_h5", "checkpoint", "saved_model", "tf_serving", "frozen_graph", "onnx", "tflite",
           "tflite_int8")
SUFFIX = {"keras": ".keras", "h5": ".h5", "weights_h5": ".weights.h5", "frozen_graph": ".pb", "onnx": ".onnx",
          "tflite": ".tflite", "tflite_int8": ".int8.tflite"}


def convert(name, fmt, path, size):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", _CONVERT, name, fmt, path, str(size)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name} -> {fmt} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_bytes(path):
    """Size of a file, a directory (SavedModel) or a checkpoint prefix's files."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    parent, base = os.path.split(path)
    return sum(os.path.getsize(os.path.join(parent, f)) for f in os.listdir(parent)
               if f == base or (f.startswith(base + ".") and not f.endswith(".kseg.json")))


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
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--size", type=int, default=256, help="inference input H = W (default 256)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    import kseg
    from convert import frozen_graph
    from convert.onnx_format import load_onnx
    from convert.saved_model import load as load_saved_model
    from convert.tflite_format import load_tflite

    loaders = {"saved_model": load_saved_model, "frozen_graph": lambda p: frozen_graph.load(p, fold_constants=True),
               "onnx": load_onnx, "tflite": load_tflite, "tflite_int8": load_tflite}
    rows = []
    for name in args.models:
        tmp = tempfile.mkdtemp(prefix=f"bench_convert_{name}_")
        try:
            paths = {}
            for fmt in args.formats:
                paths[fmt] = os.path.join(tmp, name + SUFFIX.get(fmt, "_" + fmt))
                stats = convert(name, fmt, paths[fmt], args.size)
                rows.append({"model": name, "what": f"-> {fmt}", "seconds": stats["seconds"],
                             "load_seconds": stats["load_seconds"], "peak_rss_gib": stats["peak_rss"] / 2**30,
                             "file_mb": disk_bytes(paths[fmt]) / 1e6})
                print(json.dumps(rows[-1]), file=sys.stderr)
            model = kseg.build_model(name)
            # The converted files hold the weights of their own (random) build; inference speed does
            # not depend on the values, so TF runs a fresh build of the same architecture.
            graph = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
            runners = {"tf": lambda x: graph(tf.constant(x))}
            runners.update({fmt: loaders[fmt](paths[fmt]) for fmt in loaders if fmt in paths})
            for batch in args.batches:
                x = np.random.default_rng(0).uniform(-100, 100, (batch, args.size, args.size, 3)).astype(np.float32)
                base = None
                for runtime, fn in runners.items():
                    seconds = timed(fn, x, args.repeats)
                    base = base or seconds
                    rows.append({"model": name, "what": f"infer {runtime} b{batch} {args.size}x{args.size}",
                                 "seconds": seconds, "vs_tf": seconds / base})
                    print(json.dumps(rows[-1]), file=sys.stderr)
            del runners
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| model | what | seconds | load s | peak RSS GiB | size MB | time vs TF |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        load = f"{r['load_seconds']:.1f}" if "load_seconds" in r else ""
        peak = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else ""
        size = f"{r['file_mb']:.0f}" if "file_mb" in r else ""
        ratio = f"{r['vs_tf']:.2f}x" if "vs_tf" in r else ""
        print(f"| {r['model']} | {r['what']} | {r['seconds']:.3f} | {load} | {peak} | {size} | {ratio} |")


if __name__ == "__main__":
    main()
