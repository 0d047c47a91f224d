"""PyTorch MobileViT-XXS / -XS / -S (Mehta & Rastegari, ICLR 2022) written to timm's module layout (timm is not
installed here): timm's `mobilevit_*` are ByobNets (timm/models/byobnet.py, timm/models/mobilevit.py) with
`stem` (a ConvNormAct: `.conv`, `.bn`), `stages.{i}.{j}` (inverted residuals as BottleneckBlocks: `conv1_1x1`,
`conv2_kxk` (depthwise), `conv3_1x1`; MobileViT blocks: `conv_kxk`, `conv_1x1`, `transformer.{k}` (pre-norm
blocks: `norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`), `norm`, `conv_proj`, `conv_fusion`),
`final_conv` and `head.fc`, so the state_dicts have timm's keys. Written from the paper's Table 4 and timm's
configurations, with timm's settings: BatchNorm eps 1e-5, LayerNorm eps 1e-5, symmetric k // 2 padding, SiLU,
4 heads with the 1 / sqrt(head_dim) scale on the queries, MLP ratio 2, 2x2 patches (feature maps of odd size
resized bilinearly, half-pixel centres, to the next even size and back), to prove kseg's import of timm's
weights gives the same outputs."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import randomize_bn

# name: stem width, the five stages' widths, inverted-residual expansion, transformer widths of stages 3-5,
# final 1x1 conv width.
ARCHS = {
    "mobilevit_xxs": (16, (16, 24, 48, 64, 80), 2, (64, 80, 96), 320),
    "mobilevit_xs": (16, (32, 48, 64, 80, 96), 4, (96, 120, 144), 384),
    "mobilevit_s": (16, (32, 64, 96, 128, 160), 4, (144, 192, 240), 640),
}
DEPTHS = (2, 4, 3)  # transformer layers of the MobileViT blocks in stages 3, 4, 5
PATCH = 2
HEADS = 4


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: `conv` (no bias, padding k // 2), `bn` (BatchNorm, then SiLU unless act=False)."""

    def __init__(self, cin, cout, kernel=1, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.silu(x) if self.act else x


class InvertedResidual(nn.Module):
    """timm's BottleneckBlock with bottle_in=True, linear_out=True, depthwise kxk, downsample='': a residual only
    where the block keeps width and size."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        mid = cin * expansion
        self.conv1_1x1 = ConvNormAct(cin, mid, 1)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride, groups=mid)
        self.conv3_1x1 = ConvNormAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return x + y if self.residual else y


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q * self.head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, heads=HEADS, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileVitBlock(nn.Module):
    def __init__(self, channels, dim, depth, patch=PATCH):
        super().__init__()
        self.conv_kxk = ConvNormAct(channels, channels, 3)
        self.conv_1x1 = nn.Conv2d(channels, dim, 1, bias=False)
        self.transformer = nn.Sequential(*[TransformerBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = ConvNormAct(dim, channels, 1)
        self.conv_fusion = ConvNormAct(2 * channels, channels, 3)
        self.patch = patch

    def forward(self, x):
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        b, d, h, w = x.shape
        p = self.patch
        nh, nw = math.ceil(h / p), math.ceil(w / p)
        resized = (nh * p, nw * p) != (h, w)
        if resized:
            x = F.interpolate(x, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # (B, D, nh*p, nw*p) -> (B * p*p, nh*nw, D): sequence i holds pixel i (row-major) of every patch, the
        # patches in row-major order.
        x = x.reshape(b, d, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, d)
        x = self.norm(self.transformer(x))
        x = x.reshape(b, p, p, nh, nw, d).permute(0, 5, 3, 1, 4, 2).reshape(b, d, nh * p, nw * p)
        if resized:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return self.conv_fusion(torch.cat((shortcut, self.conv_proj(x)), dim=1))


class Head(nn.Module):
    def __init__(self, cin, num_classes):
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


class MobileViT(nn.Module):
    """timm's mobilevit_xxs (1,272,024 parameters), mobilevit_xs (2,317,848), mobilevit_s (5,578,632)."""

    def __init__(self, name="mobilevit_xxs", num_classes=1000):
        super().__init__()
        stem, widths, expansion, dims, features = ARCHS[name]
        self.stem = ConvNormAct(3, stem, 3, 2)
        stages, cin = [], stem
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(3 if i == 1 else 1):
                blocks.append(InvertedResidual(cin, cout, 2 if i and j == 0 else 1, expansion))
                cin = cout
            if i >= 2:
                blocks.append(MobileVitBlock(cout, dims[i - 2], DEPTHS[i - 2]))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(cin, features, 1)
        self.head = Head(features, num_classes)

    def forward_features(self, x):
        return self.final_conv(self.stages(self.stem(x)))

    def forward(self, x):
        return self.head(self.forward_features(x))


def randomize(module, seed=0):
    """Random BatchNorm parameters and statistics (torch_reference.randomize_bn) and LayerNorm scales and shifts,
    so that a wrong mapping of any of them shows in the outputs."""
    randomize_bn(module, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return module.eval()
