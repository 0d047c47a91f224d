"""torchvision's DenseNet-121 / 169 / 201 written as PyTorch modules (torchvision itself is not installable
beside the local CPU torch), with torchvision's module names and container types, so their state_dict keys are
torchvision's: features.conv0 / norm0, features.denseblock{b}.denselayer{i}.norm1 / conv1 / norm2 / conv2,
features.transition{b}.norm / conv, features.norm5, classifier."""

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

BLOCKS = {"densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32)}


class _DenseLayer(nn.Module):
    """BN, ReLU, 1x1 conv (bn_size * k), BN, ReLU, 3x3 conv (k); returns only the k new channels."""

    def __init__(self, in_channels, growth_rate=32, bn_size=4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features):
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n_layers, in_channels, growth_rate=32):
        super().__init__()
        for i in range(n_layers):
            self[f"denselayer{i + 1}"] = _DenseLayer(in_channels + i * growth_rate, growth_rate)

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """torchvision.models.densenet{121,169,201}: growth rate 32, 64 stem filters, bn_size 4."""

    def __init__(self, arch="densenet121", num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, 64, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(64)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]))
        channels = 64
        blocks = BLOCKS[arch]
        for b, n in enumerate(blocks, start=1):
            self.features.add_module(f"denseblock{b}", _DenseBlock(n, channels))
            channels += n * 32
            if b < len(blocks):
                self.features.add_module(f"transition{b}", _Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def trunk(self, x):
        """The last feature map after the final ReLU (kseg's include_top=False output)."""
        return F.relu(self.features(x))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), 1), 1))
