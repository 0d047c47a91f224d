"""Model benchmark: kseg (TF graph, XLA, its ONNX and TFLite exports) beside PyTorch and the GEMM peak.

One run, one machine, every ratio side by side. For each model a fresh subprocess (so peak
memory is per model) builds the kseg model with seeded weights, exports it to ONNX and TFLite,
builds the same architecture in PyTorch (torchvision's module where torchvision is installed
and has it, else a module written here from the paper's / reference net's definition, in
torchvision's layout where one exists), loads kseg's weights into it (kseg's state_dict export,
`kseg.weights.keras_to_torch`, or by layer name), checks that every runtime's outputs equal
TF's, and only then times:

- inference: batch-1 latency and batch-8 throughput for TF graph mode (kseg.inference's traced
  function), XLA (the same with jit_compile), ONNX Runtime, the TFLite interpreter, PyTorch eager
  (torch.inference_mode);
- a training step (forward, backward, SGD with momentum) in images/s, TF graph mode vs PyTorch
  (XLA too with --train-xla; its compile alone takes a minute per model on 2 cores);
- achieved GFLOP/s (kseg.flops: FLOPs = 2 x MACs) against the machine's fp32 GEMM peak, measured
  in the same run (TF, PyTorch and NumPy matmuls of 2048^2 and 4096^2 matrices, before and after);
- peak RSS per phase (VmHWM, reset through /proc/self/clear_refs before each phase).

Every runtime gets the same threads: TF intra-op = --threads and inter-op 1, torch
set_num_threads(--threads) and set_num_interop_threads(1), ONNX Runtime intra-op --threads,
inter-op 1, sequential; the TFLite interpreter num_threads=--threads; OMP/MKL/OpenBLAS
variables = --threads. Default --threads: the machine's core count. Idle OpenMP and ONNX Runtime
workers sleep rather than spin (OMP_WAIT_POLICY=PASSIVE, allow_spinning=0) unless --spin: on a
shared machine spinning workers lose their cores to other jobs (PyTorch ResNet50 batch 1: 2.5 s
spinning, 0.15 s passive, same machine, same minute).

    python scripts/bench_models.py                          # the 9 classic models (18 min on the busy 2-core machine)
    python scripts/bench_models.py --models ssd300          # SSD300, with and without decoding + NMS
    python scripts/bench_models.py --models faster_rcnn_vgg16 faster_rcnn_resnet50_c4   # at 600x800
    python scripts/bench_models.py --quick                  # smaller inputs, shorter timing
    python scripts/bench_models.py --models resnet50 hed --size 96 --skip tflite
    python scripts/bench_models.py --update-docs            # also refresh docs/performance.*

SSD300 (opt-in, not in the default list: 6-10 minutes of its own on 2 cores) is timed twice per
runtime, network only and with its postprocessing, and checked by its detections as sets; its training
step (MultiBox loss on anchors matched once, before timing) beside PyTorch's. scripts/_bench_ssd.py
holds its worker and the PyTorch postprocessing, scripts/_bench_ssd_train.py its training step.

faster_rcnn_vgg16 and faster_rcnn_resnet50_c4 (opt-in too) run scripts/bench_frcnn.py's comparison
(scripts/_bench_detectors.py): batch 1 at 600x800 (--quick: 320x448), TF graph mode beside a PyTorch
reference with torchvision's module names and the same weights, outputs checked first; the whole
pipeline fills their TF graph and PyTorch cells, a table of their own has each stage. Their training
step (scripts/_bench_frcnn_train.py): approximate joint training with torchvision's settings, hand-written,
through model.fit as `kseg train` compiles it, and torchvision's training computation in PyTorch.

Outputs (--out, default bench_results/): bench_models.json, bench_models.md, bench_models.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per model: benchmark input (H, W, C), training batch, build kwargs. Classification nets run at
# their native size (VGG16's Flatten fixes 224); dense-prediction nets at reduced sizes so the
# whole run fits 15 minutes on 2 cores (FCN-8s' pad-100 makes even 64x64 cost 45 GFLOPs).
MODELS = {
    "lenet5": dict(size=(32, 32, 1), train_batch=32),
    "alexnet": dict(size=(224, 224, 3), train_batch=8),
    "vgg16": dict(size=(224, 224, 3), train_batch=2),
    # torchvision's layout (v1.5, stride on the 3x3), the one PyTorch users run.
    "resnet50": dict(size=(224, 224, 3), train_batch=4, kwargs={"layout": "torchvision"}),
    "fcn8s": dict(size=(64, 64, 3), train_batch=2, dense=True),
    "segnet": dict(size=(128, 128, 3), train_batch=2, dense=True),
    # 8k+1 sizes are DeepLab's own (321, 513): every stride-8 logit lands on a pixel.
    "deeplab_largefov": dict(size=(129, 129, 3), train_batch=2, dense=True),
    "hed": dict(size=(128, 128, 3), train_batch=2, dense=True),
    "fcn_resnet50": dict(size=(128, 128, 3), train_batch=2, dense=True),
    # The modern families in the layout PyTorch users run (torchvision's; RepVGG: timm's train-time form).
    "mobilenet_v2": dict(size=(224, 224, 3), train_batch=8, kwargs={"layout": "torchvision"}),
    "mobilenet_v3_large": dict(size=(224, 224, 3), train_batch=8, kwargs={"layout": "torchvision"}),
    "densenet121": dict(size=(224, 224, 3), train_batch=4, kwargs={"layout": "torchvision"}),
    "repvgg_a0": dict(size=(224, 224, 3), train_batch=8),
    "deit_small": dict(size=(224, 224, 3), train_batch=8),
    "mobilevit_s": dict(size=(256, 256, 3), train_batch=8),
    # A detector, timed with and without decoding + NMS (scripts/_bench_ssd.py): torchvision's
    # ssd300_vgg16 layout and its 91 COCO classes, at its own 300x300. Opt-in (--models ssd300).
    "ssd300": dict(size=(300, 300, 3), train_batch=4, detector=True,
                   kwargs={"layout": "torchvision", "num_classes": 91}),
    # Faster R-CNN (scripts/_bench_detectors.py runs scripts/bench_frcnn.py's comparison, and
    # scripts/_bench_frcnn_train.py the training step): torchvision's layout, 21 classes, one 600x800 image.
    # Opt-in (--models faster_rcnn_vgg16 faster_rcnn_resnet50_c4).
    "faster_rcnn_vgg16": dict(size=(600, 800, 3), train_batch=1, frcnn=True, kwargs={"layout": "torchvision"}),
    "faster_rcnn_resnet50_c4": dict(size=(600, 800, 3), train_batch=1, frcnn=True, kwargs={"layout": "torchvision"}),
}
DEFAULT_MODELS = [name for name, cfg in MODELS.items() if not cfg.get("detector") and not cfg.get("frcnn")]
QUICK_SIZES = {"fcn8s": 32, "segnet": 64, "deeplab_largefov": 65, "hed": 64, "fcn_resnet50": 64}
# A runtime's outputs "equal" TF's when max|a - b| <= REL_TOL * max|TF output| (fp32, other kernels).
REL_TOL = 1e-3

# The report and the PyTorch modules live beside this script (bm.torch_module / bm.load_torch_weights:
# scripts/profile_train.py and scripts/_bench_ssd.py use them through this module).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_report import summarise_all, write_outputs  # noqa: E402
from _bench_torch import load_torch_weights, torch_module  # noqa: E402

# === shared helpers ==========================================================================


def _bench_ssd():
    """scripts/_bench_ssd.py: the detector's worker and table (imported from this script's folder)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _bench_ssd

    return _bench_ssd


def _bench_train():
    """scripts/_bench_train.py: the training step, hand-written, through model.fit, and in PyTorch."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _bench_train

    return _bench_train


def _bench_detectors():
    """scripts/_bench_detectors.py: Faster R-CNN's worker (bench_frcnn's comparison) and table."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _bench_detectors

    return _bench_detectors


def set_thread_env(threads, spin=False):
    """Thread variables every runtime reads at import; must run before numpy/TF/torch load."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    if not spin:
        # Idle OpenMP workers (PyTorch, MKL) sleep instead of spinning. On a machine that other jobs
        # share, spinning workers fight those jobs for the cores: ResNet50 at batch 1 took 2.5 s in
        # PyTorch with libgomp's default spin and 0.15 s with PASSIVE, on the same loaded machine.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure_frameworks(threads):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
    except ImportError:
        pass


def rss_mib(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


class Phase:
    """Wall time and peak RSS of a block: VmHWM is reset on entry (Linux >= 4.0 clear_refs "5")."""

    def __init__(self, record, name, log):
        self.record, self.name, self.log = record, name, log

    def __enter__(self):
        self.log(self.name)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.rss0 = rss_mib()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.record.setdefault("phases", {})[self.name] = {
            "seconds": round(time.perf_counter() - self.t0, 3),
            "rss_start_mib": round(self.rss0, 1),
            "peak_rss_mib": round(rss_mib("VmHWM"), 1),
            "peak_is_phase_peak": self.reset,
        }
        return False


def measure(fn, arg, *, min_runs, max_runs, budget_s, warmup=1):
    """Warm-up call(s), then timed calls until min_runs and budget_s (or max_runs) are reached."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn(arg)
        first = first or time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "runs": len(times),
            "first_call_s": round(first, 4) if first is not None else None}


def listify(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def compare(ref, got):
    """Worst relative max-abs difference over outputs, and argmax agreement over the class axis."""
    worst, agree = 0.0, None
    for r, g in zip(ref, got):
        r, g = r.astype("float64"), g.astype("float64")
        if r.shape != g.shape:
            return {"equal": False, "error": f"shape {g.shape} != {r.shape}"}
        scale = max(float(abs(r).max()), 1e-12)
        worst = max(worst, float(abs(r - g).max()) / scale)
        if r.shape[-1] > 1:
            a = float((r.argmax(-1) == g.argmax(-1)).mean())
            agree = a if agree is None else min(agree, a)
    return {"equal": worst <= REL_TOL, "max_rel_diff": worst, "argmax_agreement": agree}


# === worker: one model =========================================================================


def worker(name, cfg, args):
    set_thread_env(args.threads, args.spin)
    import gc

    import numpy as np
    import tensorflow as tf

    configure_frameworks(args.threads)
    import keras

    import kseg
    from kseg.inference import Predictor

    def log(msg):
        print(f"PHASE {name}: {msg}", flush=True)

    h, w, c = cfg["size"]
    spec = kseg.get_spec(name)
    rec = {"model": name, "input": [h, w, c], "train_batch": cfg["train_batch"], "build_kwargs": cfg.get("kwargs", {}),
           "loadavg_start": os.getloadavg()}
    rng = np.random.default_rng(0)
    # Random images in the preprocessed range; the values do not change the speed.
    x1 = rng.uniform(-1, 1, (1, h, w, c)).astype("float32")
    x8 = rng.uniform(-1, 1, (8, h, w, c)).astype("float32")
    budget = args.budget

    with Phase(rec, "build_kseg", log):
        keras.utils.set_random_seed(0)
        model = kseg.build_model(name, **cfg.get("kwargs", {}))
        report = kseg.flops(model, (h, w, c))
    rec["params"] = int(model.count_params())
    rec["flops_per_image"] = report.total_flops
    rec["macs_per_image"] = report.total_macs
    num_classes = int(listify(model.output)[-1].shape[-1])

    results, checks, train = {}, {}, {}
    state = {"ref": None, "torch": None}
    tmp = tempfile.mkdtemp(prefix="kseg_bench_")

    def guarded(runtime, body, store=results):
        """Run one runtime's block; a failure is recorded (with its message) and the others go on."""
        if runtime in args.skip:
            return
        try:
            body()
        except Exception as e:  # any runtime may refuse a model (an op XLA lacks, a converter error)
            msg = f"{type(e).__name__}: {e}".strip()
            store[runtime] = {"error": msg[:2000]}
            log(f"{runtime} failed: {msg.splitlines()[0][:200]}")
        finally:
            gc.collect()

    def check(runtime, got):
        checks[runtime] = compare(state["ref"], got)
        if not checks[runtime]["equal"]:
            log(f"{runtime} outputs differ from TF's: {checks[runtime]}")

    def run_inference(runtime, fn, inputs):
        out = {}
        with Phase(rec, f"infer_{runtime}", log):
            for batch, x, min_runs, max_runs in ((1, inputs[0], 3, 50), (8, inputs[1], 1, 5)):
                m = measure(fn, x, min_runs=min_runs, max_runs=max_runs, budget_s=budget)
                m["images_per_s"] = batch / m["median_s"]
                m["gflops_per_s"] = rec["flops_per_image"] * batch / m["median_s"] / 1e9
                out[f"b{batch}"] = m
        results[runtime] = out
        return out

    # TF's eager output is the reference every runtime is checked against.
    state["ref"] = [np.asarray(o) for o in listify(model(x1, training=False))]
    checks["tf_eager"] = {"equal": True, "max_rel_diff": 0.0, "reference": True}

    # --- TF graph mode and XLA: kseg.inference's traced function (one trace for every batch size)
    def tf_mode(runtime, jit):
        def body():
            pred = Predictor(model, jit_compile=jit)

            def fn(x):
                return [o.numpy() for o in listify(pred(x))]  # .numpy() waits for the result

            tx1, tx8 = tf.constant(x1), tf.constant(x8)
            check(runtime, fn(tx1))
            run_inference(runtime, fn, (tx1, tx8))["traces"] = pred.tracing_count

        return body

    guarded("tf", tf_mode("tf", False))
    guarded("xla", tf_mode("xla", True))

    # --- ONNX Runtime on kseg's ONNX export (fixed H/W: dilated convs stay single Convs; dynamic batch)
    def onnx_body():
        import onnxruntime as ort

        from convert.onnx_format import export_onnx

        path = os.path.join(tmp, f"{name}.onnx")
        with Phase(rec, "export_onnx", log):
            export_onnx(model, path, input_size=(h, w))
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if not args.spin:  # as OMP_WAIT_POLICY=PASSIVE for OpenMP: idle pool threads do not spin
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        order = [o.name for o in session.get_outputs()]
        want = list(model.output_names)
        idx = [order.index(n) for n in want] if set(want) <= set(order) else list(range(len(order)))

        def fn(x):
            out = session.run(None, {input_name: x})
            return [out[i] for i in idx]

        check("onnxruntime", fn(x1))
        run_inference("onnxruntime", fn, (x1, x8))

    guarded("onnxruntime", onnx_body)

    # --- TFLite interpreter on kseg's TFLite export
    def tflite_body():
        import warnings

        from convert.tflite_format import export_tflite

        path = os.path.join(tmp, f"{name}.tflite")
        with Phase(rec, "export_tflite", log):
            export_tflite(model, path, input_size=(h, w))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's move-to-LiteRT notice
            interpreter = tf.lite.Interpreter(model_path=path, num_threads=args.threads)
        runner = interpreter.get_signature_runner("serving_default")
        (tfl_in,) = runner.get_input_details()
        names = list(model.output_names)

        def fn(x):
            out = runner(**{tfl_in: x})
            return [out[n] for n in names]

        check("tflite", fn(x1))
        run_inference("tflite", fn, (x1, x8))

    guarded("tflite", tflite_body)
    shutil.rmtree(tmp, ignore_errors=True)

    # --- PyTorch eager, same weights
    def torch_body():
        import torch

        with Phase(rec, "build_pytorch", log):
            torch.manual_seed(0)
            module, origin = torch_module(name, cfg.get("kwargs", {}), num_classes)
            rec["pytorch_module"] = origin
            load_torch_weights(model, module, spec)
            module.eval()
        state["torch"] = module
        t1, t8 = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (x1, x8))

        def fn(x):
            with torch.inference_mode():
                out = listify(module(x))
            return [o.numpy().transpose(0, 2, 3, 1) if o.ndim == 4 else o.numpy() for o in out]

        check("pytorch", fn(t1))
        run_inference("pytorch", fn, (t1, t8))

    guarded("pytorch", torch_body)
    rec["inference"], rec["checks"] = results, checks

    # --- training step: forward, backward, SGD(momentum 0.9); TF first (it changes the kseg weights,
    # PyTorch has its copy already)
    if "train" not in args.skip:
        tb = cfg["train_batch"]
        xt = rng.uniform(-1, 1, (tb, h, w, c)).astype("float32")
        # Labels per image, label maps, or a binary edge map for every side output (HED).
        yt = spec.task_object.random_targets(rng, tb, h, w, num_classes)

        bt = _bench_train()

        def tf_train(runtime, jit):
            def body():
                with Phase(rec, f"train_{runtime}", log):
                    train[runtime] = bt.train_tf(sys.modules[__name__], model, spec.task_object, xt, yt, jit, budget)

            return body

        guarded("tf", tf_train("tf", False), train)
        if args.train_xla:
            guarded("xla", tf_train("xla", True), train)

        def fit_train():
            with Phase(rec, "train_fit", log):
                train["fit"] = bt.train_fit(model, name, spec.task_object, xt, yt, budget,
                                            step_s=train.get("tf", {}).get("median_s"))

        guarded("fit", fit_train, train)
        if state["torch"] is not None:
            def torch_train():
                with Phase(rec, "train_pytorch", log):
                    train["pytorch"] = bt.train_torch(sys.modules[__name__], state["torch"], spec.task_object, xt, yt,
                                                      budget)

            guarded("pytorch", torch_train, train)
        for m in train.values():
            if "median_s" in m:
                m["images_per_s"] = tb / m["median_s"]
                # Training FLOPs ~ 3x the forward pass (backward: gradients w.r.t. inputs and weights).
                m["gflops_per_s"] = 3 * rec["flops_per_image"] * tb / m["median_s"] / 1e9
    rec["train"] = train
    rec["loadavg_end"] = os.getloadavg()
    return rec


# === GEMM peak =================================================================================


def gemm_worker(args):
    set_thread_env(args.threads, args.spin)
    import numpy as np
    import tensorflow as tf

    configure_frameworks(args.threads)
    out = {}
    sizes = (2048,) if args.quick else (2048, 4096)
    for n in sizes:
        reps = 8 if n <= 2048 else 3
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        ta = tf.constant(a)
        mm = tf.function(lambda x: tf.linalg.matmul(x, x))
        m = measure(lambda x: mm(x).numpy(), ta, min_runs=reps, max_runs=reps, budget_s=0)
        out[f"tensorflow_{n}"] = 2 * n**3 / m["min_s"] / 1e9
        m = measure(lambda x: x @ x, a, min_runs=reps, max_runs=reps, budget_s=0)
        out[f"numpy_{n}"] = 2 * n**3 / m["min_s"] / 1e9
        try:
            import torch

            t = torch.from_numpy(a)
            m = measure(lambda x: x @ x, t, min_runs=reps, max_runs=reps, budget_s=0)
            out[f"pytorch_{n}"] = 2 * n**3 / m["min_s"] / 1e9
        except ImportError:
            pass
    return {k: round(v, 1) for k, v in out.items()}


# === driver ====================================================================================


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "CPU max MHz", "BogoMIPS",
                    "L2 cache", "L3 cache", "Hypervisor vendor"):
            if key in fields:
                info[key] = fields[key]
        flags = fields.get("Flags", "").split()
        info["simd"] = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
        # Nominal fp32 peak: cores x clock x FLOPs/cycle, assuming two FMA units (8 lanes of AVX2 or 16 of
        # AVX-512, x2 for multiply+add, x2 units). A reference only: the targets use the measured peak.
        mhz = float(fields.get("CPU max MHz") or 0) or float(fields.get("BogoMIPS", 0)) / 2
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags and "fma" in flags else 4
        if mhz:
            info["nominal_peak_gflops"] = round(os.cpu_count() * mhz / 1000 * lanes * 2 * 2, 1)
    except OSError:
        pass
    versions = {}
    for mod in ("tensorflow", "keras", "torch", "torchvision", "onnxruntime", "tf2onnx", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    return info


def run_sub(argv, on_line):
    """Run this script as a worker; stream its PHASE lines, return the JSON it writes."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--result", out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    import threading

    err = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    for line in proc.stdout:
        if line.startswith("PHASE "):
            on_line(line[6:].strip())
    proc.wait()
    reader.join()
    try:
        if proc.returncode:
            tail = "".join(err)[-3000:]
            return {"error": f"worker exited {proc.returncode}:\n{tail}"}
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS), metavar="NAME",
                        help=f"models to run, of {', '.join(MODELS)} (default: all but the detectors)")
    parser.add_argument("--size", type=int, help="input H = W for the dense-prediction models (classifiers keep "
                                                 "their native size)")
    parser.add_argument("--quick", action="store_true", help="smaller dense inputs, shorter timing, GEMM at 2048 only")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for every runtime (default: all cores)")
    parser.add_argument("--budget", type=float, help="seconds of timed runs per measurement (default 2, quick 0.5)")
    parser.add_argument("--skip", nargs="+", default=[],
                        choices=["xla", "onnxruntime", "tflite", "pytorch", "train", "fit"],
                        help="runtimes/phases to leave out")
    parser.add_argument("--train-xla", action="store_true", help="also time an XLA-compiled training step")
    parser.add_argument("--spin", action="store_true",
                        help="let OpenMP (PyTorch, MKL) and ONNX Runtime worker threads spin while idle, their "
                             "defaults; without it they sleep (OMP_WAIT_POLICY=PASSIVE, ORT allow_spinning=0), which "
                             "keeps a shared machine's other jobs from starving them")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_results"), help="output directory")
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md and "
                                                                  "the JSON/PNG to docs/performance.{json,png}")
    parser.add_argument("--from-json", metavar="PATH", help="re-render the Markdown/PNG (and --update-docs) from a "
                                                            "bench_models.json instead of measuring")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.size is not None and args.size < 1:
        parser.error("--size must be >= 1")
    args.budget = args.budget if args.budget is not None else (0.5 if args.quick else 2.0)

    cfgs = {}
    for name in [args.worker] if args.worker else args.models:  # a worker: its model, listed or not
        cfg = dict(MODELS[name])
        if cfg.get("dense"):
            side = args.size or (QUICK_SIZES[name] if args.quick else None)
            if side:
                cfg["size"] = (side, side, cfg["size"][2])
        elif cfg.get("frcnn"):
            cfg = _bench_detectors().configure(cfg, args)
        cfgs[name] = cfg

    if args.gemm or args.worker:
        sys.path.insert(0, ROOT)
        if args.gemm:
            rec = gemm_worker(args)
        elif cfgs[args.worker].get("detector"):
            rec = _bench_ssd().worker(args.worker, cfgs[args.worker], args, sys.modules[__name__])
        elif cfgs[args.worker].get("frcnn"):
            rec = _bench_detectors().worker(args.worker, cfgs[args.worker], args, sys.modules[__name__])
        else:
            rec = worker(args.worker, cfgs[args.worker], args)
        with open(args.result, "w") as f:
            json.dump(rec, f)
        return

    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        result.setdefault("loadavg_end", result["loadavg_start"])
        result.setdefault("wall_seconds", float("nan"))
        return write_outputs(summarise_all(result), args)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    forwarded = ["--threads", str(args.threads), "--budget", str(args.budget)] + (["--quick"] if args.quick else [])
    if args.size:
        forwarded += ["--size", str(args.size)]
    if args.skip:
        forwarded += ["--skip", *args.skip]
    if args.train_xla:
        forwarded.append("--train-xla")
    if args.spin:
        forwarded.append("--spin")
    start = time.perf_counter()
    result = {"command": "python scripts/bench_models.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "threads": args.threads, "loadavg_start": os.getloadavg(),
              "settings": {"budget_s": args.budget, "skip": args.skip, "train_xla": args.train_xla, "spin": args.spin,
                           "quick": args.quick, "rel_tol": REL_TOL,
                           "sizes": {n: list(c["size"]) for n, c in cfgs.items()}},
              "gemm": {}, "models": []}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("GEMM peak", total=len(cfgs) + 2)

        def phase(text):
            progress.update(task, description=text[:70])
            if not console.is_terminal:  # a log file gets one line per phase instead of a live bar
                console.print(f"[{time.perf_counter() - start:6.0f} s] {text}", markup=False, highlight=False)

        result["gemm"]["start"] = run_sub(["--gemm", *forwarded], lambda s: None)
        progress.advance(task)
        for name in cfgs:
            progress.update(task, description=f"{name}")
            rec = run_sub(["--worker", name, *forwarded], phase)
            rec.setdefault("model", name)
            result["models"].append(rec)
            if "error" in rec:
                console.print(f"[red]{name} failed[/red]: {rec['error'].strip().splitlines()[-1][:300]}")
            progress.advance(task)
        progress.update(task, description="GEMM peak (end)")
        result["gemm"]["end"] = run_sub(["--gemm", *forwarded], lambda s: None)
        progress.advance(task)
    for when in ("start", "end"):
        if "error" in result["gemm"].get(when, {}):
            raise SystemExit(f"GEMM measurement failed: {result['gemm'][when]['error']}")
    # The measurements first, as they are: a later failure loses no run (--from-json renders them again).
    result["loadavg_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_models.raw.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_outputs(summarise_all(result), args)


if __name__ == "__main__":
    main()
