"""Small models for the conversion tests (independent of anact.experiments)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: ONE self.relu called three times (twice before the add)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = act(inplace=True) if act is nn.ReLU else act()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision-style ResNet with the CIFAR stem (3x3 conv1, stride 1, no maxpool)."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 100, width: int = 64,
                 act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = act(inplace=True) if act is nn.ReLU else act()
        self.layer1 = self._make_layer(width, layers[0], 1, act)
        self.layer2 = self._make_layer(width * 2, layers[1], 2, act)
        self.layer3 = self._make_layer(width * 4, layers[2], 2, act)
        self.layer4 = self._make_layer(width * 8, layers[3], 2, act)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * 4, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int, act) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
        mods = [Bottleneck(self.inplanes, planes, stride, down, act)]
        self.inplanes = planes * 4
        mods += [Bottleneck(self.inplanes, planes, act=act) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_cifar100() -> ResNet:
    return ResNet((3, 4, 6, 3), 100)


class FunctionalNet(nn.Module):
    """Functional activation calls of several kinds, one plain module, a sigmoid gate."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.bn1 = nn.BatchNorm1d(d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, d)
        self.fc4 = nn.Linear(d, d)
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(x)))
        h = torch.tanh(self.fc2(h)) * torch.sigmoid(h)  # sigmoid: a gate, not converted
        h = F.silu(self.fc3(h))
        h = self.fc4(h).relu()
        return self.head(self.act(h))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(4, 4)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn(self.fc1(x)))
        if h.sum() > 0:
            h = h * 2
        return self.head(self.act2(self.fc2(h)))
