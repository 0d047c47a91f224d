"""PyTorch modules for the model benchmark (`scripts/bench_models.py`, `scripts/profile_train.py`):
torchvision's where importable, else modules written from the papers' / reference nets' definitions
(tests/torch_reference*.py, torchvision's and timm's names), and kseg's weights loaded into them."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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

    def AlexNet():  # torchvision.models.alexnet (the test suite's module)
        return _tests_module("torch_reference").AlexNet(num_classes)

    def VGG16():  # torchvision.models.vgg16 (the test suite's module)
        return _tests_module("torch_reference").VGG16(num_classes)

    def ResNet50(dilate=(False, False, False), top=True):  # torchvision.models.resnet50 (tests' module)
        net = _tests_module("torch_reference").ResNet((3, 4, 6, 3), num_classes, replace_stride_with_dilation=dilate)
        if not top:  # the trunk alone, as torchvision's segmentation backbones hold it
            net.avgpool = net.fc = None
            net.forward = net.features
        return net

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


def _tests_module(name):
    """A module of the test suite (tests/), imported by name."""
    import importlib

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "tests"))


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
            if kind in ("Conv2D", "DilatedConv2D"):  # DilatedConv2D: Conv2D's kernel
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
