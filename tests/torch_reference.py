"""PyTorch modules written to torchvision's layouts (torchvision itself is not installable
beside the local CPU torch). Same module names as torchvision, so their state_dicts have
torchvision's keys; used to prove kseg's weight import gives the same outputs."""

import torch
from torch import nn


class AlexNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _vgg16_features():
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


class VGG16(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = _vgg16_features()
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: stride on the 3x3."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), num_classes=1000, replace_stride_with_dilation=(False, False, False)):
        super().__init__()
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(256, blocks[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(512, blocks[3], 2, replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def _make_layer(self, planes, n, stride=1, dilate=False):
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, previous)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def randomize_bn(module, seed=0):
    """Give BatchNorm non-trivial statistics so a wrong mapping of them shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return module


class _SSDFeatureExtractorVGG(nn.Module):
    """torchvision's SSDFeatureExtractorVGG (highres=False) on vgg16.features."""

    def __init__(self):
        super().__init__()
        vgg = _vgg16_features()
        vgg[16].ceil_mode = True  # torchvision patches maxpool3 (75 -> 38)
        self.features = nn.Sequential(*vgg[:23])  # up to conv4_3's ReLU
        self.scale_weight = nn.Parameter(torch.ones(512) * 20)
        extra = nn.ModuleList([
            nn.Sequential(nn.Conv2d(1024, 256, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(256, 512, 3, padding=1, stride=2), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Conv2d(512, 128, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(128, 256, 3, padding=1, stride=2), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Conv2d(256, 128, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(128, 256, 3), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Conv2d(256, 128, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(128, 256, 3), nn.ReLU(inplace=True)),
        ])
        fc = nn.Sequential(
            nn.MaxPool2d(3, 1, 1, ceil_mode=False),  # pool5
            nn.Conv2d(512, 1024, 3, padding=6, dilation=6),  # fc6
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, 1),  # fc7
            nn.ReLU(inplace=True),
        )
        extra.insert(0, nn.Sequential(*vgg[23:-1], fc))  # maxpool4, conv5_1..3 (no maxpool5), fc
        self.extra = extra

    def forward(self, x):
        x = self.features(x)
        output = [self.scale_weight.view(1, -1, 1, 1) * nn.functional.normalize(x)]
        for block in self.extra:
            x = block(x)
            output.append(x)
        return output


class _SSDScoringHead(nn.Module):
    def __init__(self, module_list, num_columns):
        super().__init__()
        self.module_list = module_list
        self.num_columns = num_columns

    def forward(self, features):
        out = []
        for module, x in zip(self.module_list, features):
            y = module(x)
            n, _, h, w = y.shape
            y = y.view(n, -1, self.num_columns, h, w).permute(0, 3, 4, 1, 2)
            out.append(y.reshape(n, -1, self.num_columns))  # (N, HWA, K)
        return torch.cat(out, dim=1)


class _SSDHead(nn.Module):
    def __init__(self, in_channels, num_anchors, num_classes):
        super().__init__()
        self.classification_head = _SSDScoringHead(nn.ModuleList(
            nn.Conv2d(c, num_classes * a, 3, padding=1) for c, a in zip(in_channels, num_anchors)), num_classes)
        self.regression_head = _SSDScoringHead(nn.ModuleList(
            nn.Conv2d(c, 4 * a, 3, padding=1) for c, a in zip(in_channels, num_anchors)), 4)

    def forward(self, features):
        return self.regression_head(features), self.classification_head(features)


class SSD300(nn.Module):
    """torchvision's ssd300_vgg16 up to its raw outputs (no anchors, transform or postprocessing):
    forward(normalised NCHW) -> (bbox_regression (N, 8732, 4), cls_logits (N, 8732, C))."""

    def __init__(self, num_classes=91):
        super().__init__()
        self.backbone = _SSDFeatureExtractorVGG()
        self.head = _SSDHead([512, 1024, 512, 256, 256, 256], [4, 6, 6, 6, 4, 4], num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


# --- VGG11/13/19 and the _bn variants; ResNet18/34 (basic blocks) -----------------------------

# torchvision's vgg.py cfgs by model: filters per conv, "M" a 2x2 max-pool.
VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg_features(arch, batch_norm=False):
    """torchvision's make_layers: conv (with bias), [BatchNorm2d,] ReLU per conv; a max-pool per "M"."""
    layers, c = [], 3
    for v in VGG_CFGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if batch_norm else [])
            layers.append(nn.ReLU(inplace=True))
            c = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG for any of VGG_CFGS, with BatchNorm (vgg*_bn) or without."""

    def __init__(self, arch, batch_norm=False, num_classes=1000):
        super().__init__()
        self.features = vgg_features(arch, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGGFeatures(nn.Module):
    """Only `features` of torchvision's VGG (state_dict keys features.{i}.*), for trunk-only checks
    without the 102M-weight classifier."""

    def __init__(self, arch, batch_norm=False):
        super().__init__()
        self.features = vgg_features(arch, batch_norm)

    def forward(self, x):
        return self.features(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs, the first strided, no expansion."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class BasicResNet(nn.Module):
    """torchvision's resnet18 (blocks (2, 2, 2, 2)) / resnet34 ((3, 4, 6, 3))."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], 2)
        self.layer3 = self._make_layer(256, blocks[2], 2)
        self.layer4 = self._make_layer(512, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, n, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))
