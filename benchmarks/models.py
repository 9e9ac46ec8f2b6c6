"""Models for the benchmarks: LeNet5 (MNIST) and ResNet50 for 32×32 CIFAR images.

Each takes ``activation``, a factory called once per activation site, so that a
normalized activation gets its own statistics at every site (a module reused at
several sites, as torchvision's Bottleneck reuses ``self.relu``, would mix them).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

try:  # the experiments package's model, when it is there
    from anact.experiments.models.lenet import LeNet5
except ImportError:  # pragma: no cover - fallback with the same layout

    class LeNet5(nn.Module):  # type: ignore[no-redef]
        """conv5×5(6, pad 2)–act–pool–conv5×5(16)–act–pool–fc120–act–fc84–act–fc10."""

        def __init__(self, activation: Callable[[], nn.Module], num_classes: int = 10) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, 5, padding=2), activation(), nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5), activation(), nn.MaxPool2d(2),
            )  # fmt: skip
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(400, 120), activation(),
                nn.Linear(120, 84), activation(), nn.Linear(84, num_classes),
            )  # fmt: skip

        def forward(self, x: Tensor) -> Tensor:
            return self.classifier(self.features(x))


__all__ = ["LeNet5", "ResNet50", "random_image_data"]


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), act(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), act(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.short(x))


class ResNet50(nn.Module):
    """ResNet50 (bottlenecks 3-4-6-3) for 32×32 inputs: 3×3 stem, no max-pool.

    Shape: (N, 3, 32, 32) → (N, num_classes).
    """

    def __init__(self, activation: Callable[[], nn.Module], num_classes: int = 100) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), activation(),
        ]  # fmt: skip
        cin = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(_Bottleneck(cin, width, stride, activation))
                cin = width * _Bottleneck.expansion
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def random_image_data(n_train: int, n_val: int = 16):
    """Random 28×28 images and labels as the table1 study's data (speed does not depend
    on the pixels): ``anact.experiments.data.idx.ImageData``."""
    import torch

    from anact.experiments.data.idx import ImageData

    g = torch.Generator().manual_seed(0)
    return ImageData(
        "random", torch.randn(n_train, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n_train,), generator=g), torch.randn(n_val, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n_val,), generator=g), 10,
    )  # fmt: skip
