"""VGG for 32×32 images (CIFAR layout), paper §3.2.

The CIFAR VGG of the paper's setting (as in the common ``pytorch-cifar100`` code):
3×3 convolutions with padding 1 (+ BatchNorm) + activation, 2×2 max-pooling after
each stage (32 → 1), then the classifier Linear(512, 4096)–act–Dropout–
Linear(4096, 4096)–act–Dropout–Linear(4096, num_classes). VGG19 has 16 conv and 3
linear layers, so 18 activations.

The paper's two rules for normalized activations with BN (§3.2, §4) are options:
``bn_affine`` (BN right before a normalized activation without affine; by default
decided per layer: no affine exactly when that layer's activation is an
:class:`anact.NormalizedActivation`), and ``buffer_bn`` (a BatchNorm1d between the
last hidden layer and the output layer). ``top_activation`` with ``num_top`` gives the
top activations another factory, e.g. the unnormalized counterpart for the "top
three" of the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

import anact

__all__ = ["VGG", "VGG_CONFIGS", "vgg19"]

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}  # fmt: skip


class VGG(nn.Module):
    """VGG with an injected activation.

    Args:
        activation: factory of a fresh activation module (one call per activation
            layer), e.g. ``nn.ReLU`` or ``anact.NSwish``.
        config: a key of :data:`VGG_CONFIGS` or a list of widths and ``"M"`` (max-pool).
        num_classes: outputs (100 for CIFAR-100).
        in_channels: image channels.
        batch_norm: BatchNorm2d after every convolution (before the activation).
        bn_affine: affine BN; ``None`` (default): affine unless the following
            activation is an :class:`anact.NormalizedActivation` (paper §3.2).
        top_activation: factory for the top ``num_top`` activations (counted from the
            output: the two classifier ones, then the last convolutions'); ``None``:
            ``activation`` everywhere.
        num_top: how many top activations ``top_activation`` replaces (paper: 3).
        buffer_bn: a BatchNorm1d on the last hidden features, before the output layer.
        hidden: width of the two hidden linear layers (4096).
        dropout: dropout probability in the classifier.
        width_div: divide every conv width by this (quick runs; 1 = the paper's model).

    Shape: input (N, in_channels, 32, 32) → logits (N, num_classes). Other sizes work
    when divisible by 2 per pooling stage; the features are average-pooled to 1×1.
    """

    def __init__(
        self,
        activation: Callable[[], nn.Module],
        config: str | Sequence[int | str] = "vgg19",
        num_classes: int = 100,
        in_channels: int = 3,
        *,
        batch_norm: bool = True,
        bn_affine: bool | None = None,
        top_activation: Callable[[], nn.Module] | None = None,
        num_top: int = 3,
        buffer_bn: bool = False,
        hidden: int = 4096,
        dropout: float = 0.5,
        width_div: int = 1,
    ) -> None:
        super().__init__()
        cfg = VGG_CONFIGS[config] if isinstance(config, str) else list(config)
        widths = [v // width_div for v in cfg if v != "M"]
        if any(w < 1 for w in widths):
            raise ValueError(f"width_div={width_div} leaves a layer without channels")
        n_acts = len(widths) + 2
        if not 0 <= num_top <= n_acts:
            raise ValueError(f"num_top must be in 0..{n_acts}, got {num_top}")
        top_from = n_acts - num_top if top_activation is not None else n_acts
        counter = iter(range(n_acts))

        def make_act() -> nn.Module:
            i = next(counter)
            return (top_activation if i >= top_from and top_activation else activation)()

        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            w = int(v) // width_div
            act = make_act()
            layers.append(nn.Conv2d(c, w, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                affine = (
                    not isinstance(act, anact.NormalizedActivation)
                    if bn_affine is None
                    else bn_affine
                )
                layers.append(nn.BatchNorm2d(w, affine=affine))
            layers.append(act)
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [
            nn.Flatten(),
            nn.Linear(c, hidden), make_act(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), make_act(), nn.Dropout(dropout),
        ]  # fmt: skip
        if buffer_bn:
            head.append(nn.BatchNorm1d(hidden))
        head.append(nn.Linear(hidden, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def vgg19(
    activation: Callable[[], nn.Module], num_classes: int = 100, in_channels: int = 3, **kwargs
) -> VGG:
    """VGG19 (16 conv + 3 linear) for 32×32 inputs; see :class:`VGG` for ``kwargs``."""
    return VGG(activation, "vgg19", num_classes, in_channels, **kwargs)
