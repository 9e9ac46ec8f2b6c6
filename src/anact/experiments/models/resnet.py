"""ResNet50 with a CIFAR stem, paper §3.3 and Appendix A.3 (Figure 6).

torchvision's ResNet layout (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``,
``avgpool``, ``fc``; Bottleneck expansion 4, stride on the 3×3 conv, layers
[3, 4, 6, 3]) with the CIFAR stem: a 3×3 convolution of stride 1 and no max-pool
(``maxpool`` is ``nn.Identity``). With 100 classes the plain model has 23,705,252
parameters, the paper's count.

Two blocks:

- :class:`Bottleneck` (Figure 6 right): ONE activation module ``self.relu`` applied
  three times, twice before the addition and once after it, as in torchvision (model
  conversion code relies on this structure).
- :class:`NormalizedBottleneck` (Figure 6 left): normalized activations ``act1``,
  ``act2`` after ``bn1``, ``bn2`` (both without affine, §3.2), and the unnormalized
  counterpart ``relu`` after the addition (§3.3: a normalized activation there
  makes the variance grow exponentially with depth).

:func:`resnet50_normalized` builds the paper's normalized model (stem BN without
affine, normalized stem activation): 23,690,053 parameters with 100 classes and a
per-tensor ``alpha`` per normalized activation.

:class:`CifarResNet` is the small CIFAR ResNet of He et al. (2016, §4.2: depth 6n+2,
three stages of 16/32/64 channels, :class:`BasicBlock`), the LayerAct paper's
backbone (ResNet-20/32/44).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn

import anact

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "NormalizedBottleneck",
    "ResNet",
    "resnet50",
    "resnet50_normalized",
]

ActFactory = Callable[[], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1×1 → 3×3 (stride) → 1×1 (×4 channels), one shared
    activation module ``relu`` used after bn1, after bn2 and after the addition.

    Shape: (N, inplanes, H, W) → (N, 4·planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        activation: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = activation()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class NormalizedBottleneck(nn.Module):
    """Figure 6 (left): conv1–bn1(no affine)–``act1`` (normalized), conv2–bn2(no
    affine)–``act2`` (normalized), conv3–bn3, addition, ``relu`` (unnormalized).

    Shape: (N, inplanes, H, W) → (N, 4·planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        activation: ActFactory = anact.NReLU,
        post_activation: ActFactory = nn.ReLU,
        bn_affine: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.act1 = activation()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.act2 = activation()
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = post_activation()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of Bottleneck-type blocks.

    Args:
        activation: factory of the activation module (stem and blocks).
        layers: blocks per stage ([3, 4, 6, 3] for ResNet50).
        num_classes: outputs.
        in_channels: image channels.
        block: ``"plain"`` (:class:`Bottleneck`) or ``"normalized"``
            (:class:`NormalizedBottleneck`, stem BN without affine).
        post_activation: the activation after the addition in normalized blocks;
            ``None``: the unnormalized counterpart of ``activation``
            (``activation().activation.module``).
        stem: ``"cifar"`` (3×3 stride-1 conv, no max-pool) or ``"imagenet"``
            (7×7 stride-2 conv and 3×3 stride-2 max-pool).
        base_width: channels of the stem and first stage (64; smaller for quick runs).

    Shape: (N, in_channels, H, W) → logits (N, num_classes).
    """

    def __init__(
        self,
        activation: ActFactory = nn.ReLU,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 100,
        in_channels: int = 3,
        *,
        block: Literal["plain", "normalized"] = "plain",
        post_activation: ActFactory | None = None,
        stem: Literal["cifar", "imagenet"] = "cifar",
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if block not in ("plain", "normalized"):
            raise ValueError(f"block must be 'plain' or 'normalized', got {block!r}")
        if not 1 <= len(layers) <= 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 1 to 4 positive block counts, got {list(layers)}")
        normalized = block == "normalized"
        if normalized and post_activation is None:
            probe = activation()
            plain = getattr(getattr(probe, "activation", None), "module", None)
            if not isinstance(probe, anact.NormalizedActivation) or plain is None:
                raise ValueError(
                    "block='normalized' needs post_activation (the unnormalized activation "
                    "after the addition) unless activation builds an anact.NormalizedActivation "
                    f"with a plain torch counterpart; got {type(probe).__name__}"
                )
            post_activation = plain
        self.inplanes = base_width
        if stem == "cifar":
            self.conv1 = _conv3x3(in_channels, base_width)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(base_width, affine=not normalized)
        self.relu = activation()

        def make_block(
            inplanes: int, planes: int, stride: int, down: nn.Module | None
        ) -> nn.Module:
            if normalized:
                return NormalizedBottleneck(
                    inplanes,
                    planes,
                    stride,
                    down,
                    activation,
                    post_activation,  # type: ignore[arg-type]
                )
            return Bottleneck(inplanes, planes, stride, down, activation)

        stages = []
        for i, n in enumerate(layers):
            planes, stride = base_width * 2**i, 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(n):
                down = None
                s = stride if j == 0 else 1
                if j == 0 and (s != 1 or self.inplanes != planes * 4):
                    down = nn.Sequential(
                        _conv1x1(self.inplanes, planes * 4, s), nn.BatchNorm2d(planes * 4)
                    )
                blocks.append(make_block(self.inplanes, planes, s, down))
                self.inplanes = planes * 4
            stages.append(nn.Sequential(*blocks))
        stages += [nn.Identity() for _ in range(4 - len(stages))]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(
    activation: ActFactory = nn.ReLU, num_classes: int = 100, in_channels: int = 3, **kwargs
) -> ResNet:
    """ResNet50 with plain Bottlenecks (23,705,252 parameters for 100 classes, CIFAR stem)."""
    return ResNet(activation, (3, 4, 6, 3), num_classes, in_channels, **kwargs)


def resnet50_normalized(
    activation: ActFactory = anact.NReLU,
    num_classes: int = 100,
    in_channels: int = 3,
    *,
    post_activation: ActFactory | None = None,
    **kwargs,
) -> ResNet:
    """The paper's normalized ResNet50 (Figure 6 left blocks; 23,690,053 parameters
    for 100 classes with per-tensor normalized activations)."""
    return ResNet(
        activation, (3, 4, 6, 3), num_classes, in_channels,
        block="normalized", post_activation=post_activation, **kwargs,
    )  # fmt: skip


class BasicBlock(nn.Module):
    """3×3 conv–BN–act–3×3 conv–BN, addition, act; separate activation modules
    ``act1`` (inside) and ``act2`` (after the addition); a 1×1 projection shortcut
    when the shape changes.

    Shape: (N, inplanes, H, W) → (N, planes, H/stride, W/stride).
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, activation: ActFactory = nn.ReLU
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = activation()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = activation()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                _conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + identity)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2): conv3×3(16)–BN–act, 3 stages of n
    :class:`BasicBlock` (16, 32, 64 channels; stride 2 at stages 2 and 3), global
    average pooling, linear. ``depth`` 20, 32, 44, 56, 110 (or 8 for quick runs).

    Shape: (N, in_channels, H, W) → logits (N, num_classes).
    """

    def __init__(
        self,
        activation: ActFactory = nn.ReLU,
        depth: int = 32,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 20, 32, …), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = activation()
        blocks: list[nn.Module] = []
        c = width
        for stage in range(3):
            planes = width * 2**stage
            for i in range(n):
                blocks.append(BasicBlock(c, planes, 2 if (stage > 0 and i == 0) else 1, activation))
                c = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))
