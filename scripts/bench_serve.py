#!/usr/bin/env python
"""Throughput and latency of `kseg serve` at 1, 8 and 32 concurrent clients vs in-process batched predict.

    python scripts/bench_serve.py                      # DeepLab-LargeFOV (width 0.25), 128x128 JPEGs
    python scripts/bench_serve.py --seconds 20 --cases grpc:serving_default --json bench.json

One run measures everything on the same model and inputs, so the ratios hold on a busy
machine even where the absolute figures do not:

1. export the model (seeded weights) to a temporary BASE/NAME/1;
2. in-process: load the SavedModel and call each benchmarked signature on batches of 1, 8, 32
   (and --max-batch-size) images; the fastest batch size is the in-process reference;
3. start a real `kseg serve` subprocess; for each case and concurrency C: measure the in-process
   reference again (best batch size; the machine's load drifts), then let C client threads
   (kseg.serving.Client, one image per request) send requests for --seconds after a warm-up;
   report images/s, p50/p99 latency and the ratio to the in-process figure just measured.

Clients run in this process, on the same machine as the server: on a small machine they
compete with it for the CPU, which the ratio includes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _size(text):
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deeplab_largefov")
    p.add_argument("--option", action="append", default=["width=0.25"], metavar="KEY=VALUE",
                   help="build option (JSON value); default width=0.25")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--image-size", type=_size, default=(128, 128), help="HxW of the test images and network")
    p.add_argument("--cases", nargs="+", default=["rest:predict_images", "rest:label_images", "grpc:predict_images"],
                   metavar="PROTOCOL:SIGNATURE",
                   help="protocol (rest|grpc) and signature (predict_images|label_images|serving_default) pairs")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per level (and per reference)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured time before each level")
    p.add_argument("--max-batch-size", type=int, default=8, help="kseg serve --max-batch-size")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def jpeg(array):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_inputs(args, count=64):
    rng = np.random.default_rng(0)
    h, w = args.image_size
    # Smooth random images: JPEG-compressible like photographs, unlike white noise.
    small = rng.integers(0, 256, size=(count, h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    images = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)[:, :h, :w]
    images = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    return {"image_bytes": [jpeg(a) for a in images], "images": [a.astype(np.float32) for a in images]}


def input_key(signature):
    return "images" if signature == "serving_default" else "image_bytes"


class InProcess:
    """The exported signatures called directly (no server): the figures the server is compared with."""

    def __init__(self, path, inputs):
        import tensorflow as tf

        self.tf = tf
        self.loaded = tf.saved_model.load(path)
        self.inputs = inputs

    def _batch(self, signature, i, size):
        key = input_key(signature)
        items = [self.inputs[key][(i + k) % len(self.inputs[key])] for k in range(size)]
        return self.tf.constant(items) if key == "image_bytes" else self.tf.constant(np.stack(items))

    def throughput(self, signature, size, seconds):
        """(images/s, median seconds per call) calling `signature` on batches of `size` for `seconds`."""
        fn, key = self.loaded.signatures[signature], input_key(signature)
        prepared = [self._batch(signature, i * size, size) for i in range(4)]
        {k: v.numpy() for k, v in fn(**{key: prepared[0]}).items()}
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 3:
            t = time.perf_counter()
            {k: v.numpy() for k, v in fn(**{key: prepared[len(times) % len(prepared)]}).items()}
            times.append(time.perf_counter() - t)
        return size * len(times) / (time.perf_counter() - start), float(np.median(times))

    def best(self, signature, sizes, seconds):
        """{images_per_s, batch, batch1_latency_ms}: the fastest of the batch sizes."""
        best = {"images_per_s": 0.0}
        for n in sizes:
            tput, latency = self.throughput(signature, n, seconds)
            if n == 1:
                best["batch1_latency_ms"] = latency * 1000
            if tput > best["images_per_s"]:
                best.update(images_per_s=tput, batch=n)
        return best


def start_server(base, args, grpc):
    """A `kseg serve` subprocess on free ports; (process, {rest_url, grpc_target})."""
    ready = os.path.join(base, ".ready.json")
    cmd = [sys.executable, "-m", "kseg.cli", "serve", base, "--rest-api-port", "0",
           "--port", "0" if grpc else "off", "--max-batch-size", str(args.max_batch_size),
           "--batch-timeout-ms", str(args.batch_timeout_ms), "--ready-file", ready]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    log = open(os.path.join(base, "server.log"), "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kseg serve did not start; see {log.name}")
        time.sleep(0.2)
    time.sleep(0.1)
    with open(ready) as f:
        return proc, json.load(f)


def run_level(url, model, args, inputs, signature, concurrency):
    """(images/s, p50 s, p99 s, errors) for `concurrency` client threads sending one image each."""
    from kseg.serving import Client

    client = Client(url, model)
    key = input_key(signature)
    inputs = inputs[key]
    lock = threading.Lock()
    latencies, errors = [], []
    phase = {"measure": False, "stop": False}

    def worker(k):
        i = k
        while not phase["stop"]:
            item = inputs[i % len(inputs)]
            x = np.array([item], dtype=object) if key == "image_bytes" else item[None]
            t = time.perf_counter()
            try:
                client.predict({key: x}, signature_name=signature)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
                continue
            finally:
                i += 1
            if phase["measure"]:
                with lock:
                    latencies.append((time.perf_counter(), time.perf_counter() - t))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    phase["measure"] = True
    start = time.perf_counter()
    time.sleep(args.seconds)
    end = time.perf_counter()
    phase["measure"] = False
    phase["stop"] = True
    for t in threads:
        t.join()
    client.close()
    done = [lat for stamp, lat in latencies if stamp <= end]
    if not done:
        return 0.0, float("nan"), float("nan"), len(errors)
    return len(done) / (end - start), float(np.percentile(done, 50)), float(np.percentile(done, 99)), len(errors)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import kseg
    from kseg.serving import export
    from kseg.serving.cli import _option

    options = dict(_option(o) for o in args.option)
    keras.utils.set_random_seed(0)
    model = kseg.build_model(args.model, num_classes=args.num_classes, **options)
    inputs = make_inputs(args)
    cases = [tuple(c.split(":", 1)) for c in args.cases]
    results = {"model": args.model, "options": options, "image_size": list(args.image_size),
               "num_classes": args.num_classes, "max_batch_size": args.max_batch_size,
               "batch_timeout_ms": args.batch_timeout_ms, "cpus": os.cpu_count(),
               "load_average": os.getloadavg(), "levels": []}
    with tempfile.TemporaryDirectory(prefix="kseg-bench-") as base:
        path = export(model, os.path.join(base, "bench"), image_size=args.image_size)
        del model
        print(f"exported {path}; measuring in-process batched predict ...", flush=True)
        signatures = list(dict.fromkeys(s for _, s in cases))
        direct = InProcess(path, inputs)
        sizes = sorted({1, 8, 32, args.max_batch_size})
        results["in_process"] = {s: direct.best(s, sizes, args.seconds / 3) for s in signatures}
        for s, r in results["in_process"].items():
            print(f"in-process {s}: {r['images_per_s']:.1f} images/s (best at batch {r['batch']} of {sizes}); "
                  f"batch-1 latency {r['batch1_latency_ms']:.1f} ms", flush=True)
        proc, where = start_server(base, args, grpc=any(p == "grpc" for p, _ in cases))
        try:
            for protocol, signature in cases:
                url = where["rest_url"] if protocol == "rest" else "grpc://" + where["grpc_target"]
                for c in args.concurrency:
                    # The machine's load drifts: the in-process figure (the best batch size) is measured
                    # again right before each level.
                    again = direct.best(signature, sizes, args.seconds / len(sizes))
                    ref, batch = again["images_per_s"], again["batch"]
                    tput, p50, p99, errors = run_level(url, "bench", args, inputs, signature, c)
                    row = {"protocol": protocol, "signature": signature, "clients": c, "images_per_s": tput,
                           "p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "errors": errors,
                           "in_process_images_per_s": ref, "in_process_batch": batch, "ratio": tput / ref}
                    results["levels"].append(row)
                    print(f"{protocol} {signature} x{c}: {tput:.1f} images/s ({row['ratio']:.0%} of in-process "
                          f"{ref:.1f} at batch {batch}), p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                          f"errors {errors}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    results["load_average_after"] = os.getloadavg()
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def print_table(results):
    from rich.console import Console
    from rich.table import Table

    h, w = results["image_size"]
    table = Table(title=f"kseg serve: {results['model']} {results['options']}, {results['num_classes']} classes, "
                        f"{h}x{w} JPEGs, max batch {results['max_batch_size']}, "
                        f"timeout {results['batch_timeout_ms']} ms")
    for column in ("protocol", "signature", "clients", "images/s", "in-process images/s (batch)", "ratio",
                   "p50 ms", "p99 ms", "errors"):
        table.add_column(column, justify="left" if column in ("protocol", "signature") else "right")
    for r in results["levels"]:
        table.add_row(r["protocol"], r["signature"], str(r["clients"]), f"{r['images_per_s']:.1f}",
                      f"{r['in_process_images_per_s']:.1f} ({r['in_process_batch']})", f"{r['ratio']:.0%}",
                      f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["errors"]))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"{results['cpus']} CPUs; load average before {results['load_average'][0]:.1f}, after "
          f"{results['load_average_after'][0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
