"""PyTorch MobileNetV2 and MobileNetV3 written to torchvision's module layout (torchvision is not installable
beside the local CPU torch): `features` (a Sequential of conv/BN/activation triples and InvertedResidual
blocks, whose layers sit in `.conv` (V2) or `.block` (V3); V3's SqueezeExcitation with `fc1` / `fc2`) and
`classifier`, so the state_dicts have torchvision's keys. Written from the papers' tables (Sandler et al.
2018, Table 2; Howard et al. 2019, Tables 1 and 2) with torchvision's BatchNorm settings and symmetric
padding, to prove kseg's import of torchvision weights gives the same outputs."""

import functools

import torch
from torch import nn
from torch_reference import randomize_bn


def make_divisible(value, divisor=8):
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: 0 conv (no bias, padding k // 2), 1 BatchNorm, 2 activation."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, norm=nn.BatchNorm2d, activation=nn.ReLU6):
        modules = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), norm(cout)]
        if activation is not None:
            modules.append(activation(inplace=True))
        super().__init__(*modules)


# --- MobileNetV2 ---------------------------------------------------------------------------------

V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


class InvertedResidualV2(nn.Module):
    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        modules = [ConvBNActivation(cin, hidden, 1)] if expansion != 1 else []
        modules += [ConvBNActivation(hidden, hidden, 3, stride, groups=hidden),
                    nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*modules)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 at width 1.0: 3,504,872 parameters."""

    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        features, cin = [ConvBNActivation(3, 32, 3, 2)], 32
        for expansion, cout, repeats, stride in V2_STAGES:
            for i in range(repeats):
                features.append(InvertedResidualV2(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        features.append(ConvBNActivation(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# --- MobileNetV3 ---------------------------------------------------------------------------------

# Per bottleneck: input channels, depthwise kernel, expanded channels, output channels, squeeze-and-excite,
# "RE" (ReLU) or "HS" (hard-swish), stride.
V3_BLOCKS = {
    "large": (
        (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
        (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
        (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
        (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
    ),
    "small": (
        (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
    ),
}
V3_LAST_CHANNEL = {"large": 1280, "small": 1024}
# torchvision's MobileNetV3 BatchNorm: eps 0.001, momentum 0.01.
V3_NORM = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, se, nonlinearity, stride):
        super().__init__()
        activation = nn.Hardswish if nonlinearity == "HS" else nn.ReLU
        modules = []
        if expanded != cin:
            modules.append(ConvBNActivation(cin, expanded, 1, norm=V3_NORM, activation=activation))
        modules.append(ConvBNActivation(expanded, expanded, kernel, stride, groups=expanded, norm=V3_NORM,
                                        activation=activation))
        if se:
            modules.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        modules.append(ConvBNActivation(expanded, cout, 1, norm=V3_NORM, activation=None))
        self.block = nn.Sequential(*modules)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV3(nn.Module):
    """torchvision's mobilenet_v3_large (5,483,032 parameters) / mobilenet_v3_small (2,542,856)."""

    def __init__(self, size="large", num_classes=1000, dropout=0.2):
        super().__init__()
        blocks = V3_BLOCKS[size]
        features = [ConvBNActivation(3, 16, 3, 2, norm=V3_NORM, activation=nn.Hardswish)]
        features += [InvertedResidualV3(*row) for row in blocks]
        last_conv = 6 * blocks[-1][3]
        features.append(ConvBNActivation(blocks[-1][3], last_conv, 1, norm=V3_NORM, activation=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, V3_LAST_CHANNEL[size]), nn.Hardswish(inplace=True), nn.Dropout(dropout, inplace=True),
            nn.Linear(V3_LAST_CHANNEL[size], num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def calibrate_bn(module, x, seed=0):
    """Random BatchNorm scales and shifts (torch_reference.randomize_bn) with the running statistics of the
    batch `x` (NCHW), so every layer's outputs stay of order one through the deep stack and the network's
    output depends on its input and on every layer. (Random running statistics let the signal of a randomly
    initialised MobileNet fade to a constant within a few blocks, which would hide a wrong padding.)"""
    randomize_bn(module, seed)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    module.train()
    with torch.no_grad():
        module(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return module.eval()
