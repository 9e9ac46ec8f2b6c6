"""The eager batch statistics' C path (ReLU, LeakyReLU on contiguous float32 CPU x)
against float64 and against the torch path."""

import math

import numpy as np
import pytest
import torch

from anact import _native
from anact import functional as AF
from anact.activations import get_activation

pytestmark = pytest.mark.skipif(_native.power_sums is None, reason="anact._powersums not built")

_ACTS = [("relu", {}), ("lrelu", {"negative_slope": 0.1}), ("lrelu", {"negative_slope": 0.0})]


def _float64(x, act):
    xd = x.double().numpy()
    y, d = act.fn(torch.from_numpy(xd)).numpy(), act.derivative(torch.from_numpy(xd)).numpy()
    return [xd.size, xd.mean(), xd.var(), y.mean(), y.var(), np.mean(d * d)], xd.std(), y.std()


def _torch_path(x, act, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(_native, "power_sums", None)
        return AF.batch_moments(x, act)


@pytest.mark.parametrize("name,params", _ACTS)
@pytest.mark.parametrize("loc,scale,n", [
    (0.0, 1.0, 300_000), (1000.0, 1.0, 70_000), (-1000.0, 3.0, 70_000),
    (-5.0, 1e-3, 1000), (0.3, 2.0, 7),
])  # fmt: skip
def test_c_moments_match_float64_and_the_torch_path(name, params, loc, scale, n, monkeypatch):
    act = get_activation(name, **params)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale + loc
    calls = []
    real = _native.power_sums
    monkeypatch.setattr(_native, "power_sums", lambda *a: calls.append(a) or real(*a))
    got = [float(t) for t in AF.batch_moments(x, act)]
    monkeypatch.setattr(_native, "power_sums", real)
    assert len(calls) == 1  # the C path ran, once
    expected, sx, sy = _float64(x, act)
    units = [1.0, sx, sx * sx, sy + 1e-30, sy * sy + 1e-30, 1.0]  # the data's own scales
    for g, e, u in zip(got, expected, units, strict=True):  # plus float32 storage rounding
        assert abs(g - e) <= 1e-5 * u + 1.2e-7 * abs(e) + 1e-12, (got, expected)
    torch_path = [float(t) for t in _torch_path(x, act, monkeypatch)]
    np.testing.assert_allclose(got, torch_path, rtol=1e-4, atol=1e-5 * sx * sx)


def test_other_activations_masks_channels_and_dtypes_take_the_torch_path(monkeypatch):
    calls = []
    monkeypatch.setattr(_native, "power_sums", lambda *a: calls.append(a))
    x = torch.randn(4, 3, 5)
    AF.batch_moments(x, "swish")  # no sign derivative
    AF.batch_moments(x, "relu", channel_dim=1)
    AF.batch_moments(x, "relu", mask=torch.ones(4, 3, 5, dtype=torch.bool))
    AF.batch_moments(x.double(), "relu")
    AF.batch_moments(x.transpose(0, 2), "relu")  # not contiguous
    assert calls == []


def test_c_moments_of_nan_and_empty_inputs():
    x = torch.randn(100)
    x[3] = math.nan
    m = AF.batch_moments(x, "relu")
    assert math.isnan(float(m.mean_x)) and math.isnan(float(m.mean_dsq))
    rho, rho_prime, mu, valid = AF.moments_to_stats(m)
    assert not bool(valid)
    empty = AF.batch_moments(torch.empty(0, 3), "relu")  # the torch path: count 0
    assert float(empty.count) == 0
