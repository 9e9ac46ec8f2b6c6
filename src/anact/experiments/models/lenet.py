"""LeNet5 for 28×28 single-channel images (MNIST, Fashion-MNIST), paper §3.1."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet5: conv5×5(6, pad 2)–act–maxpool–conv5×5(16)–act–maxpool–fc120–act–fc84–act–fc10.

    Args:
        activation: a factory returning a fresh activation module, called once per
            activation layer (four in all), e.g. ``nn.ReLU`` or
            ``lambda: anact.NReLU(center=False)``.
        num_classes: the number of outputs (10).
        in_channels: input channels (1).

    Shape: input (N, in_channels, 28, 28) → logits (N, num_classes).
    """

    def __init__(
        self, activation: Callable[[], nn.Module], num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), activation(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), activation(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), activation(),
            nn.Linear(120, 84), activation(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
