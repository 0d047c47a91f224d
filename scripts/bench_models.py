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
runtime, network only and with its postprocessing, and checked by its detections as sets; no training
step. scripts/_bench_ssd.py holds its worker and the PyTorch postprocessing.

faster_rcnn_vgg16 and faster_rcnn_resnet50_c4 (opt-in too) run scripts/bench_frcnn.py's comparison
(scripts/_bench_detectors.py): batch 1 at 600x800 (--quick: 320x448), TF graph mode beside a PyTorch
reference with torchvision's module names and the same weights, outputs checked first; the whole
pipeline fills their TF graph and PyTorch cells, a table of their own has each stage.

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
    "ssd300": dict(size=(300, 300, 3), train_batch=None, detector=True,
                   kwargs={"layout": "torchvision", "num_classes": 91}),
    # Faster R-CNN (scripts/_bench_detectors.py runs scripts/bench_frcnn.py's comparison): torchvision's
    # layout, 21 classes, one 600x800 image. Opt-in (--models faster_rcnn_vgg16 faster_rcnn_resnet50_c4).
    "faster_rcnn_vgg16": dict(size=(600, 800, 3), train_batch=None, frcnn=True, kwargs={"layout": "torchvision"}),
    "faster_rcnn_resnet50_c4": dict(size=(600, 800, 3), train_batch=None, frcnn=True,
                                    kwargs={"layout": "torchvision"}),
}
DEFAULT_MODELS = [name for name, cfg in MODELS.items() if not cfg.get("detector") and not cfg.get("frcnn")]
QUICK_SIZES = {"fcn8s": 32, "segnet": 64, "deeplab_largefov": 65, "hed": 64, "fcn_resnet50": 64}
VGG_FAMILY = ("vgg16", "fcn8s", "segnet", "deeplab_largefov", "hed")
RUNTIMES = ("tf", "xla", "onnxruntime", "tflite", "pytorch")
LABELS = {"fit": "model.fit",
          "tf": "TF graph", "xla": "TF XLA", "onnxruntime": "ONNX Runtime", "tflite": "TFLite", "pytorch": "PyTorch"}
# A runtime's outputs "equal" TF's when max|a - b| <= REL_TOL * max|TF output| (fp32, other kernels).
REL_TOL = 1e-3


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


# === PyTorch modules ==========================================================================
# Written from the papers' / reference nets' definitions. Where torchvision has the network
# (alexnet, vgg16, resnet50, fcn_resnet50) the modules carry torchvision's names, so kseg's
# state_dict export loads with strict=True; torchvision itself is used when importable.


def torch_module(name, spec_kwargs, num_classes):
    import torch
    import torch.nn.functional as F
    from torch import nn

    try:  # torchvision's own module where it has the architecture
        import torchvision  # noqa: F401
        from torchvision import models as tvm

        tv = {
            "alexnet": lambda: tvm.alexnet(weights=None, num_classes=num_classes),
            "vgg16": lambda: tvm.vgg16(weights=None, num_classes=num_classes),
            "resnet50": lambda: tvm.resnet50(weights=None, num_classes=num_classes),
            "fcn_resnet50": lambda: _DictOut(tvm.segmentation.fcn_resnet50(
                weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)),
        }
        if name in tv:
            return tv[name](), "torchvision"
    except Exception:  # not installed, or its C++ ops do not match this torch build
        pass

    vgg_cfg = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]

    def vgg_convs(module, *, first_pad=1, dilate5=False, bn=False):
        c_in = 3
        for b, convs in enumerate(vgg_cfg, start=1):
            for c, filters in enumerate(convs, start=1):
                d = 2 if dilate5 and b == 5 else 1
                conv = nn.Conv2d(c_in, filters, 3, padding=first_pad if (b, c) == (1, 1) else d, dilation=d)
                setattr(module, f"block{b}_conv{c}", conv)
                if bn:  # Keras' BatchNormalization default epsilon is 1e-3
                    setattr(module, f"block{b}_conv{c}_bn", nn.BatchNorm2d(filters, eps=1e-3))
                c_in = filters

    def run_block(module, x, b, bn=False):
        for c in range(1, len(vgg_cfg[b - 1]) + 1):
            x = getattr(module, f"block{b}_conv{c}")(x)
            if bn:
                x = getattr(module, f"block{b}_conv{c}_bn")(x)
            x = F.relu(x)
        return x

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.C1, self.C3, self.C5 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5), nn.Conv2d(16, 120, 5)
            self.F6, self.output = nn.Linear(120, 84), nn.Linear(84, num_classes)

        def forward(self, x):
            x = F.avg_pool2d(torch.tanh(self.C1(x)), 2)
            x = F.avg_pool2d(torch.tanh(self.C3(x)), 2)
            return self.output(torch.tanh(self.F6(torch.tanh(self.C5(x)).flatten(1))))

    class AlexNet(nn.Module):  # torchvision.models.alexnet
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True),
                nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    class VGG16(nn.Module):  # torchvision.models.vgg16
        def __init__(self):
            super().__init__()
            layers, c = [], 3
            for convs in vgg_cfg:
                for v in convs:
                    layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                    c = v
                layers.append(nn.MaxPool2d(2, 2))
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    class Bottleneck(nn.Module):  # torchvision v1.5: stride on the 3x3
        def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
            self.relu, self.downsample = nn.ReLU(inplace=True), downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    class ResNet50(nn.Module):  # torchvision.models.resnet50 (+ replace_stride_with_dilation)
        def __init__(self, dilate=(False, False, False), top=True):
            super().__init__()
            self.inplanes, self.dilation = 64, 1
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
            self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._layer(64, 3)
            self.layer2 = self._layer(128, 4, 2, dilate[0])
            self.layer3 = self._layer(256, 6, 2, dilate[1])
            self.layer4 = self._layer(512, 3, 2, dilate[2])
            self.top = top
            if top:
                self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2048, num_classes)

        def _layer(self, planes, n, stride=1, dilate=False):
            previous = self.dilation
            if dilate:
                self.dilation, stride = self.dilation * stride, 1
            down = None
            if stride != 1 or self.inplanes != planes * 4:
                down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * 4))
            blocks = [Bottleneck(self.inplanes, planes, stride, down, previous)]
            self.inplanes = planes * 4
            blocks += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, n)]
            return nn.Sequential(*blocks)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1)) if self.top else x

    class FCNResNet50(nn.Module):  # torchvision.models.segmentation.fcn_resnet50 (no aux)
        def __init__(self):
            super().__init__()
            self.backbone = ResNet50(dilate=(False, True, True), top=False)
            self.classifier = nn.Sequential(
                nn.Conv2d(2048, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512), nn.ReLU(),
                nn.Dropout(0.1), nn.Conv2d(512, num_classes, 1))

        def forward(self, x):
            y = self.classifier(self.backbone(x))
            return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    class FCN8s(nn.Module):  # the reference Caffe net: pad 100, ceil-mode pools, crops 5 / 9 / 31
        def __init__(self):
            super().__init__()
            n = num_classes
            vgg_convs(self, first_pad=100)
            self.fc6, self.fc7 = nn.Conv2d(512, 4096, 7), nn.Conv2d(4096, 4096, 1)
            self.score_fr, self.score_pool4, self.score_pool3 = (nn.Conv2d(c, n, 1) for c in (4096, 512, 256))
            self.upscore2 = nn.ConvTranspose2d(n, n, 4, 2, bias=False)
            self.upscore_pool4 = nn.ConvTranspose2d(n, n, 4, 2, bias=False)
            self.upscore8 = nn.ConvTranspose2d(n, n, 16, 8, bias=False)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            h, w = x.shape[-2:]
            pools = {}
            for b in range(1, 6):
                x = F.max_pool2d(run_block(self, x, b), 2, 2, ceil_mode=True)
                pools[b] = x
            x = self.score_fr(self.drop(F.relu(self.fc7(self.drop(F.relu(self.fc6(x)))))))
            for up, score, feat, off in ((self.upscore2, self.score_pool4, 4, 5),
                                         (self.upscore_pool4, self.score_pool3, 3, 9)):
                u = up(x)
                x = u + score(pools[feat])[:, :, off:off + u.shape[2], off:off + u.shape[3]]
            return self.upscore8(x)[:, :, 31:31 + h, 31:31 + w]

    class SegNet(nn.Module):  # VGG16 encoder + BN, argmax unpooling decoder
        def __init__(self):
            super().__init__()
            vgg_convs(self, bn=True)
            self.decoder = [[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64]]
            c_in = 512
            for i, convs in zip(range(5, 0, -1), self.decoder):
                for j, filters in enumerate(convs, start=1):
                    setattr(self, f"decoder{i}_conv{j}", nn.Conv2d(c_in, filters, 3, padding=1))
                    setattr(self, f"decoder{i}_conv{j}_bn", nn.BatchNorm2d(filters, eps=1e-3))
                    c_in = filters
            self.classifier = nn.Conv2d(64, num_classes, 3, padding=1)

        def forward(self, x):
            stages = []
            for b in range(1, 6):
                x = run_block(self, x, b, bn=True)
                size = x.shape[-2:]
                x, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
                stages.append((idx, size))
            for i, convs in zip(range(5, 0, -1), self.decoder):
                idx, size = stages[i - 1]
                x = F.max_unpool2d(x, idx, 2, 2, output_size=size)
                for j in range(1, len(convs) + 1):
                    x = F.relu(getattr(self, f"decoder{i}_conv{j}_bn")(getattr(self, f"decoder{i}_conv{j}")(x)))
            return self.classifier(x)

    class DeepLabLargeFOV(nn.Module):  # the released prototxt: Caffe pools, dilated conv5/fc6, align-corners interp
        def __init__(self):
            super().__init__()
            vgg_convs(self, dilate5=True)
            self.fc6 = nn.Conv2d(512, 1024, 3, padding=12, dilation=12)
            self.fc7, self.fc8 = nn.Conv2d(1024, 1024, 1), nn.Conv2d(1024, num_classes, 1)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            h, w = x.shape[-2:]
            for b in range(1, 6):
                x = F.max_pool2d(run_block(self, x, b), 3, 2 if b <= 3 else 1, padding=1, ceil_mode=True)
            x = F.avg_pool2d(x, 3, 1, padding=1, count_include_pad=True)
            x = self.fc8(self.drop(F.relu(self.fc7(self.drop(F.relu(self.fc6(x)))))))
            return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)

    class HED(nn.Module):  # five side outputs on VGG16 (no pool5) + fusion
        def __init__(self):
            super().__init__()
            vgg_convs(self)
            for i, c in enumerate((64, 128, 256, 512, 512), start=1):
                setattr(self, f"score_dsn{i}", nn.Conv2d(c, 1, 1))
            for s in (2, 4, 8, 16):  # TF's "same" transposed conv of kernel 2s crops s/2 on each side
                setattr(self, f"upsample_{s}", nn.ConvTranspose2d(1, 1, 2 * s, s, padding=s // 2, bias=False))
            self.fuse = nn.Conv2d(5, 1, 1)

        def forward(self, x):
            h, w = x.shape[-2:]
            sides = []
            for b, stride in zip(range(1, 6), (1, 2, 4, 8, 16)):
                x = run_block(self, x, b)
                side = getattr(self, f"score_dsn{b}")(x)
                if stride > 1:
                    side = getattr(self, f"upsample_{stride}")(side)[:, :, :h, :w]
                sides.append(side)
                if b < 5:
                    x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            return [*sides, self.fuse(torch.cat(sides, 1))]

    reference = _test_reference(name, num_classes)  # the classifier families' modules of the test suite
    if reference is not None:
        return reference, "tests/torch_reference_*.py (torchvision's / timm's module names)"
    builders = {"lenet5": LeNet5, "alexnet": AlexNet, "vgg16": VGG16, "resnet50": ResNet50,
                "fcn_resnet50": FCNResNet50, "fcn8s": FCN8s, "segnet": SegNet,
                "deeplab_largefov": DeepLabLargeFOV, "hed": HED}
    if name not in builders:
        raise ValueError(f"no PyTorch module for {name}; benchmarked models: {sorted(builders)}")
    return builders[name](), "written here (torchvision layout)" if name in (
        "alexnet", "vgg16", "resnet50", "fcn_resnet50") else "written here (paper / reference net)"


def _test_reference(name, num_classes):
    """The test suite's reference module for `name` (written with the reference's module names, so
    kseg's torch map fills it), or None."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        if name in ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"):
            import torch_reference_mobilenet as ref

            if name == "mobilenet_v2":
                return ref.MobileNetV2(num_classes=num_classes)
            return ref.MobileNetV3(name.rsplit("_", 1)[1], num_classes=num_classes)
        if name.startswith("densenet"):
            import torch_reference_densenet as ref

            return ref.DenseNet(name, num_classes=num_classes)
        if name.startswith("repvgg"):
            import torch_reference_repvgg as ref

            return ref.RepVGG(name, num_classes=num_classes)
        if name.startswith("deit"):
            import torch_reference_vit as ref

            return ref.TimmViT(name, num_classes=num_classes)
        if name.startswith("mobilevit"):
            import torch_reference_mobilevit as ref

            return ref.MobileViT(name, num_classes=num_classes)
        return None
    finally:
        sys.path.remove(os.path.join(ROOT, "tests"))


def _DictOut(module):
    """torchvision's segmentation models return {"out": ...}; the benchmark wants the tensor."""
    from torch import nn

    class Out(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner  # weights load into .inner, with torchvision's keys

        def forward(self, x):
            return self.inner(x)["out"]

    return Out(module)


def load_torch_weights(keras_model, module, spec):
    """Copy the kseg model's weights into the PyTorch module (strict: every parameter set)."""
    import numpy as np
    import torch

    from kseg.weights import keras_to_torch

    if spec.torch_map is not None:  # torchvision layout: kseg's own state_dict export
        arrays = keras_to_torch(keras_model, spec.torch_map())
    else:  # same names as the Keras layers
        arrays = {}
        for layer in keras_model.layers:
            w = [np.asarray(v) for v in layer.weights]
            if not w:
                continue
            kind = type(layer).__name__
            if kind in ("Conv2D", "DilatedConv2D"):  # DilatedConv2D: Conv2D's kernel, computed as im2col
                # HWIO -> OIHW
                arrays[f"{layer.name}.weight"] = w[0].transpose(3, 2, 0, 1)
            elif kind == "Conv2DTranspose":
                # Keras (kh, kw, out, in) -> torch (in, out, kh, kw); both are the adjoint of a
                # cross-correlation, so no spatial flip.
                arrays[f"{layer.name}.weight"] = w[0].transpose(3, 2, 0, 1)
            elif kind == "Dense":
                arrays[f"{layer.name}.weight"] = w[0].T
            elif kind == "BatchNormalization":
                for key, a in zip(("weight", "bias", "running_mean", "running_var"), w):
                    arrays[f"{layer.name}.{key}"] = a
                continue
            else:
                raise ValueError(f"no torch mapping for layer {layer.name} ({kind})")
            if len(w) > 1:
                arrays[f"{layer.name}.bias"] = w[1]
    target = module.inner if hasattr(module, "inner") else module
    state = target.state_dict()
    unknown = sorted(set(arrays) - set(state))
    missing = sorted(k for k in state if k not in arrays and not k.endswith("num_batches_tracked"))
    bad = [k for k in arrays if k in state and tuple(state[k].shape) != arrays[k].shape]
    if unknown or missing or bad:
        raise ValueError(f"kseg -> torch weights: unknown {unknown[:5]}, missing {missing[:5]}, shape {bad[:5]}")
    for k, a in arrays.items():
        state[k] = torch.from_numpy(np.ascontiguousarray(a))
    target.load_state_dict(state, strict=True)
    # Layers kseg freezes (bilinear deconvolutions) are frozen in PyTorch too: same training work.
    frozen = {layer.name for layer in keras_model.layers if layer.weights and not layer.trainable}
    for name, p in target.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)
    return len(arrays)


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
                rows.append({"model": name, "target": what + rec.get("target_note", ""), "value": s[key],
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
        lines += _bench_ssd().markdown(recs, LABELS, RUNTIMES)
    lines += _bench_detectors().markdown(recs)
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
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_models.raw.json"), "w") as f:
        json.dump(result, f, indent=1)
    result["loadavg_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_outputs(summarise_all(result), args)


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


if __name__ == "__main__":
    main()
