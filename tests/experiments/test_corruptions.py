"""CIFAR-C style corruptions against independent float64 computations."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from anact.experiments.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupted_sets


def _images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    x[0, :, 0, 0] = 0.0  # a black pixel
    x[0, :, 0, 1] = 0.4  # a grey pixel
    return x


def test_all_corruptions_shape_range_determinism() -> None:
    x = _images().float()
    for name in CORRUPTIONS:
        for s in (1, 5):
            y = corrupt(x, name, s, seed=3)
            assert y.shape == x.shape and y.dtype == x.dtype
            assert float(y.min()) >= 0 and float(y.max()) <= 1
            assert torch.equal(y, corrupt(x, name, s, seed=3)), name
            assert not torch.equal(y, x), (name, s)
    a = corrupt(x, "gaussian_noise", 3, seed=0)
    assert not torch.equal(a, corrupt(x, "gaussian_noise", 3, seed=1))
    assert not torch.equal(a, corrupt(x, "gaussian_noise", 4, seed=0))
    torch.manual_seed(0)
    b = corrupt(x, "gaussian_noise", 3, seed=0)
    torch.manual_seed(99)  # the global RNG does not matter
    assert torch.equal(b, corrupt(x, "gaussian_noise", 3, seed=0))
    assert len(list(corrupted_sets(x, ["contrast", "brightness"], (1, 2)))) == 4


def test_input_validation() -> None:
    x = _images().float()
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="standardising"):
        corrupt(x * 3 - 1, "contrast", 1)
    with pytest.raises(ValueError, match="N, C, H, W"):
        corrupt(x[0], "contrast", 1)


def test_noise_statistics() -> None:
    x = torch.full((8, 3, 32, 32), 0.5)
    for s in range(1, 6):
        c = SEVERITIES["gaussian_noise"][s - 1]
        d = corrupt(x, "gaussian_noise", s) - x
        assert abs(float(d.std()) - c) < 0.05 * c and abs(float(d.mean())) < 0.01
        c = SEVERITIES["speckle_noise"][s - 1]
        d = corrupt(x, "speckle_noise", s) - x
        assert abs(float(d.std()) - 0.5 * c) < 0.05 * 0.5 * c
    c = SEVERITIES["shot_noise"][4]  # 50: Poisson(25) / 50
    y = corrupt(x, "shot_noise", 5).double()
    k = y * c
    assert_close(k, k.round(), rtol=0, atol=1e-4)  # multiples of 1/c
    assert abs(float(y.mean()) - 0.5) < 0.01 and abs(float(y.var()) - 0.5 / c) < 0.1 * 0.5 / c
    c = SEVERITIES["impulse_noise"][4]
    y = corrupt(x, "impulse_noise", 5)
    changed = y != x
    assert abs(float(changed.float().mean()) - c) < 0.2 * c
    assert set(y[changed].unique().tolist()) == {0.0, 1.0}


def test_gaussian_blur_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _images()
    for s in (1, 5):
        sigma = SEVERITIES["gaussian_blur"][s - 1]
        expect = ndimage.gaussian_filter(
            x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0
        )
        assert_close(corrupt(x, "gaussian_blur", s), torch.from_numpy(expect).clip(0, 1))


def test_defocus_blur_matches_an_independent_disk_filter() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _images(n=2, size=20)
    for s in (2, 5):
        radius, alias = SEVERITIES["defocus_blur"][s - 1]
        t = np.arange(-8, 9)
        xx, yy = np.meshgrid(t, t)
        disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
        disk /= disk.sum()
        g = np.exp(-0.5 * (np.arange(-1, 2) / alias) ** 2)
        g /= g.sum()
        disk = ndimage.convolve(disk, np.outer(g, g), mode="mirror")  # cv2 BORDER_REFLECT_101
        disk /= disk.sum()
        expect = np.stack(
            [[ndimage.convolve(ch, disk, mode="mirror") for ch in img] for img in x.numpy()]
        )
        assert_close(corrupt(x, "defocus_blur", s), torch.from_numpy(expect).clip(0, 1))


def test_contrast_scales_deviations_from_channel_mean() -> None:
    x = _images()
    for s in range(1, 6):
        c = SEVERITIES["contrast"][s - 1]
        y = corrupt(x, "contrast", s)
        m = x.mean(dim=(2, 3), keepdim=True)
        assert_close(y, (x - m) * c + m)


def _hsv_reference(x: torch.Tensor, fn) -> torch.Tensor:
    """Per-pixel colorsys round trip in float64, ``fn(h, s, v) -> (h, s, v)``."""
    arr = x.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    out = np.array([colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*p))) for p in arr])
    n, c, h, w = x.shape
    return torch.from_numpy(out).reshape(n, h, w, c).permute(0, 3, 1, 2)


def test_brightness_and_saturate_match_colorsys() -> None:
    x = _images(n=2, size=6)
    for s in range(1, 6):
        b = SEVERITIES["brightness"][s - 1]
        ref = _hsv_reference(x, lambda h, sat, v: (h, sat, min(max(v + b, 0), 1)))  # noqa: B023
        assert_close(corrupt(x, "brightness", s), ref)
        c0, c1 = SEVERITIES["saturate"][s - 1]
        ref = _hsv_reference(x, lambda h, sat, v: (h, min(max(sat * c0 + c1, 0), 1), v))  # noqa: B023
        assert_close(corrupt(x, "saturate", s), ref)


def test_pixelate_makes_blocks_and_keeps_the_mean() -> None:
    x = _images(n=2, size=32).float()
    for s in range(1, 6):
        side = int(32 * SEVERITIES["pixelate"][s - 1])
        y = corrupt(x, "pixelate", s)
        assert y[0, 0].unique().numel() <= side * side
        assert abs(float(y.mean() - x.mean())) < 0.02


def test_severity_increases_the_damage() -> None:
    x = _images(n=4, size=32).float() * 0.8 + 0.1
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
                 "gaussian_blur", "defocus_blur", "contrast", "brightness"):  # fmt: skip
        err = [float((corrupt(x, name, s) - x).abs().mean()) for s in range(1, 6)]
        assert all(a <= b + 1e-7 for a, b in zip(err, err[1:], strict=False)), (name, err)
        assert err[-1] > err[0], name
