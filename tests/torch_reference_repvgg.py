"""A PyTorch RepVGG written to timm's layout (timm/models/byobnet.py: a ByobNet of RepVggBlocks; timm itself
is not installed here). Same module names as timm, so its state_dicts have timm's `repvgg_*` keys:
`stem` and `stages.{i}.{j}` blocks of `conv_kxk.conv` / `conv_kxk.bn`, `conv_1x1.conv` / `conv_1x1.bn` and
an `identity` BatchNorm, `head.fc`; after `reparameterize()`, each block's `reparam_conv`. Used to prove
kseg's weight import and its re-parameterization give the same outputs."""

import torch
from torch import nn

# Blocks per stage after the stem, and the width multipliers (a, b) (the paper's Table 2).
ARCHS = {
    "repvgg_a0": ((2, 4, 14, 1), (0.75, 2.5)),
    "repvgg_a1": ((2, 4, 14, 1), (1.0, 2.5)),
    "repvgg_a2": ((2, 4, 14, 1), (1.5, 2.75)),
    "repvgg_b0": ((4, 6, 16, 1), (1.0, 2.5)),
    "repvgg_b1": ((4, 6, 16, 1), (2.0, 4.0)),
}


class ConvBn(nn.Module):
    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def _fold(kernel, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepVggBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = ConvBn(cin, cout, 3, stride)
        self.conv_1x1 = ConvBn(cin, cout, 1, stride)
        self.reparam_conv = None
        self.act = nn.ReLU()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        out = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    @torch.no_grad()
    def reparameterize(self):
        """One 3x3 conv with a bias in place of the branches (the paper's Sec. 3.3), in float64."""
        conv = self.conv_kxk.conv
        kernel, bias = _fold(conv.weight.double(), _double(self.conv_kxk.bn))
        k1, b1 = _fold(nn.functional.pad(self.conv_1x1.conv.weight.double(), [1, 1, 1, 1]),
                       _double(self.conv_1x1.bn))
        kernel, bias = kernel + k1, bias + b1
        if self.identity is not None:
            eye = torch.zeros_like(kernel)
            eye[:, :, 1, 1] = torch.eye(conv.out_channels, dtype=kernel.dtype)
            ki, bi = _fold(eye, _double(self.identity))
            kernel, bias = kernel + ki, bias + bi
        self.reparam_conv = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True)
        self.reparam_conv.weight.copy_(kernel.float())
        self.reparam_conv.bias.copy_(bias.float())
        del self.conv_kxk, self.conv_1x1, self.identity


def _double(bn):
    copy = nn.BatchNorm2d(bn.num_features, eps=bn.eps).double()
    copy.load_state_dict(bn.state_dict())
    return copy


class Head(nn.Module):
    def __init__(self, cin, num_classes):
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class RepVGG(nn.Module):
    def __init__(self, arch="repvgg_a0", num_classes=1000):
        super().__init__()
        depths, (a, b) = ARCHS[arch]
        widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        cin = min(64, int(64 * a))
        self.stem = RepVggBlock(3, cin, 2)
        stages = []
        for n, cout in zip(depths, widths):
            stages.append(nn.Sequential(*[RepVggBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1)
                                          for i in range(n)]))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = Head(cin, num_classes)

    def features(self, x):
        return self.stages(self.stem(x))

    def forward(self, x):
        return self.head(self.features(x))

    def reparameterize(self):
        for m in self.modules():
            if isinstance(m, RepVggBlock):
                m.reparameterize()
        return self


def randomize_bn(module, seed=0):
    """Non-trivial BatchNorm statistics, so a wrong mapping or folding of them shows in the outputs. Scales
    of 0.6-1.2 keep the outputs input-dependent through 22-28 blocks of three summed branches (smaller ones
    shrink the signal under the accumulated biases, larger ones grow it by orders of magnitude)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.6, 1.2, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return module
