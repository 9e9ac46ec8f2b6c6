"""CIFAR-C style corruptions of a clean test set, in pure torch (LayerAct robustness).

After Hendrycks & Dietterich (2019), "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations": each corruption has five severities whose
parameters are those of their CIFAR-10-C generation code (saturate: their ImageNet-C
values). Images are float (N, C, H, W) in [0, 1] (apply the corruption *before*
standardising); outputs are clipped to [0, 1]. Random corruptions draw from a
``torch.Generator`` seeded by ``(seed, name, severity)``, so a test set is the same
for every run and every activation.

Implemented: gaussian_noise, shot_noise, impulse_noise, speckle_noise,
gaussian_blur, defocus_blur, contrast, brightness, saturate, pixelate.
brightness and saturate change V and S of HSV exactly, without an HSV round trip:
with H and S fixed each RGB value is linear in V, and with H and V fixed, V − RGB is
linear in S. Left out (need PIL/OpenCV or external textures): glass/motion/zoom
blur, snow, frost, fog, elastic, JPEG.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "corrupted_sets"]

# Hendrycks & Dietterich, make_cifar_c.py: one parameter per severity 1..5
SEVERITIES: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}


def _gaussian_noise(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    return x + c * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _shot_noise(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    return torch.poisson(x.clamp_min(0) * c, generator=g) / c


def _impulse_noise(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    # salt & pepper on a fraction c of the values, half each (skimage random_noise 's&p')
    u = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
    x = torch.where(u < c / 2, torch.ones_like(x), x)
    return torch.where((u >= c / 2) & (u < c), torch.zeros_like(x), x)


def _speckle_noise(x: Tensor, c: float, g: torch.Generator) -> Tensor:
    return x + x * c * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _depthwise(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Convolve every channel with one 2-D kernel (kh, kw), same-size output."""
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    y = F.pad(x.reshape(n * c, 1, h, w), pad, mode=mode)
    return F.conv2d(y, kernel.to(x)[None, None]).reshape(n, c, h, w)


def _gauss_1d(sigma: float, radius: int) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian_blur(x: Tensor, sigma: float, g: torch.Generator | None = None) -> Tensor:
    # skimage.filters.gaussian defaults: truncate 4.0, mode 'nearest' (= replicate)
    k = _gauss_1d(sigma, int(4.0 * sigma + 0.5))
    return _depthwise(x, torch.outer(k, k), "replicate")


def _disk_kernel(radius: float, alias_blur: float) -> Tensor:
    # aliased disk on a 17×17 grid blurred by a 3×3 Gaussian (cv2 ksize (3,3)), normalised
    t = torch.arange(-8, 9, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).double()
    disk = disk / disk.sum()
    k = _gauss_1d(alias_blur, 1)
    disk = F.conv2d(
        F.pad(disk[None, None], (1, 1, 1, 1), mode="reflect"), torch.outer(k, k)[None, None]
    )[0, 0]
    keep = disk.abs().sum(0) > 1e-12
    r = int(keep.nonzero().max() - 8)  # symmetric support
    return disk[8 - r : 9 + r, 8 - r : 9 + r] / disk.sum()


def _defocus_blur(x: Tensor, c: tuple[float, float], g: torch.Generator | None = None) -> Tensor:
    return _depthwise(x, _disk_kernel(*c), "reflect")


def _contrast(x: Tensor, c: float, g: torch.Generator | None = None) -> Tensor:
    m = x.mean(dim=(-2, -1), keepdim=True)  # per image and channel, as np.mean(x, axis=(0, 1))
    return (x - m) * c + m


def _value(x: Tensor) -> Tensor:
    if x.shape[1] != 3:
        raise ValueError(f"brightness/saturate need RGB images (N, 3, H, W), got {tuple(x.shape)}")
    return x.amax(dim=1, keepdim=True)


def _brightness(x: Tensor, c: float, g: torch.Generator | None = None) -> Tensor:
    # HSV: V ← clip(V + c, 0, 1) with H, S kept; RGB = V·(1 − S·f(H)) scales with V
    v = _value(x)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x))


def _saturate(x: Tensor, c: tuple[float, float], g: torch.Generator | None = None) -> Tensor:
    # HSV: S ← clip(S·c0 + c1, 0, 1) with H, V kept; V − RGB = V·S·f(H) scales with S
    v = _value(x)
    s = torch.where(
        v > 0, (v - x.amin(dim=1, keepdim=True)) / v.clamp_min(1e-12), torch.zeros_like(v)
    )
    s_new = (s * c[0] + c[1]).clamp(0, 1)
    ratio = torch.where(s > 0, s_new / s.clamp_min(1e-12), torch.zeros_like(s))
    # a grey pixel (S = 0) has hue 0 (red) in colorsys/skimage: it gains red saturation
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
    return torch.where(s > 0, v - (v - x) * ratio, grey)


def _pixelate(x: Tensor, c: float, g: torch.Generator | None = None) -> Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(int(h * c), int(w * c)), mode="area")  # PIL BOX
    return F.interpolate(small, size=(h, w), mode="nearest")


CORRUPTIONS: dict[str, Callable[..., Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "saturate": _saturate,
    "pixelate": _pixelate,
}


def _generator(x: Tensor, name: str, severity: int, seed: int) -> torch.Generator:
    g = torch.Generator(device=x.device)
    g.manual_seed(zlib.crc32(f"{seed}:{name}:{severity}".encode()))
    return g


def corrupt(images: Tensor, name: str, severity: int, *, seed: int = 0) -> Tensor:
    """One corruption of ``images`` (N, C, H, W) float in [0, 1] at ``severity`` 1–5.

    Returns a new tensor of the same shape and dtype, clipped to [0, 1];
    deterministic for a given (``seed``, ``name``, ``severity``).
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not (isinstance(severity, int) and 1 <= severity <= 5):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            "expected float images (N, C, H, W) in [0, 1], "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6 or math.isnan(lo):
        raise ValueError(
            "images must lie in [0, 1] (corrupt before standardising), "
            f"got range [{lo:.3g}, {hi:.3g}]"
        )
    param = SEVERITIES[name][severity - 1]
    out = CORRUPTIONS[name](images, param, _generator(images, name, severity, seed))
    return out.clamp_(0, 1)


def corrupted_sets(
    images: Tensor,
    names: Iterable[str] | None = None,
    severities: Iterable[int] = (1, 2, 3, 4, 5),
    *,
    seed: int = 0,
) -> Iterator[tuple[str, int, Tensor]]:
    """``(name, severity, corrupted images)`` for every combination (lazily, one at a time)."""
    severities = list(severities)
    for name in names or CORRUPTIONS:
        for s in severities:
            yield name, s, corrupt(images, name, s, seed=seed)
