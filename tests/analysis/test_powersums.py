"""The C power sums (anact._powersums) against float64, and their twins in torch.

Each δ' source of the C code is the twin of a PyTorch shortcut of the monitor; both
are checked here against an independent float64 formula, on random values and on the
points where a derivative has a kink or a 0/0.
"""

import math
import os

import numpy as np
import pytest
import torch

import anact.analysis.monitors as M
from anact.activations import get_activation

pytestmark = pytest.mark.skipif(
    M._c_power_sums is None and os.environ.get("ANACT_ALLOW_NO_C") == "1",
    reason="anact._powersums not built and ANACT_ALLOW_NO_C=1",
)

_SELU_ALPHA, _SELU_SCALE = M._SELU


def test_the_c_extension_is_built():
    assert M._c_power_sums is not None, (
        "anact._powersums was not built at install: install a C compiler (apt-get install "
        "gcc) and reinstall the package, or set ANACT_ALLOW_NO_C=1 to test without it"
    )


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# name -> (params, δ (float64), δ' (float64))
_CASES = {
    "relu": ({}, lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "lrelu": (
        {"negative_slope": 0.1},
        lambda x: np.where(x > 0, x, 0.1 * x),
        lambda x: np.where(x > 0, 1.0, 0.1),
    ),
    "tanh": ({}, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "sigmoid": ({}, _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x))),
    "elu": (
        {"alpha": 0.7},
        lambda x: np.where(x > 0, x, 0.7 * np.expm1(np.minimum(x, 0))),
        lambda x: np.where(x > 0, 1.0, 0.7 * np.exp(np.minimum(x, 0))),
    ),
    "selu": (
        {},
        lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0))),
        lambda x: _SELU_SCALE * np.where(x > 0, 1.0, _SELU_ALPHA * np.exp(np.minimum(x, 0))),
    ),
    "swish": ({}, lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))),
}


def _inputs(n: int) -> torch.Tensor:
    """Random values plus the kinks and 0/0 points (0, ±tiny, -0.0, ±3, large)."""
    g = torch.Generator().manual_seed(n)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, 3.0, -3.0, 30.0, -30.0, 88.0])
    return torch.cat([torch.randn(n, generator=g) * 2.5 + 0.2, special])


def _float64_sums(x32: torch.Tensor, y32: torch.Tensor, dprime) -> np.ndarray:
    x, y = x32.double().numpy(), y32.double().numpy()
    return np.array([x.sum(), (x * x).sum(), y.sum(), (y * y).sum(), (dprime(x) ** 2).sum()])


@pytest.mark.parametrize("name", sorted(_CASES))
@pytest.mark.parametrize("n", [1, 7, 513, 70_000])  # under a block, blocks + tail, GIL release
def test_c_sums_from_the_output_match_float64(name, n):
    params, fn, dprime = _CASES[name]
    act = get_activation(name, **params)
    prime = M._out_shortcut_for(act, have_x=True)
    assert prime is not None, f"{name}: the torch shortcut failed its registry check"
    kind = M._C_OUT_KINDS[prime]
    x = _inputs(n)
    y = act.fn(x)
    got = np.array(M._c_sums(x, y, kind, M._c_params(act)))
    expected = _float64_sums(x, y, dprime)
    # δ' is evaluated from float32 y (1 − y², y/x, …): float32 rounding per element
    np.testing.assert_allclose(got[:4], expected[:4], rtol=1e-6, atol=1e-9 * n)
    np.testing.assert_allclose(got[4], expected[4], rtol=2e-6, atol=1e-6)
    # the torch twin gives the same Σδ'² (to its float32 dot's accuracy)
    torch_g = float(M._out_dsq_sum(x, y, act, prime, None))
    np.testing.assert_allclose(got[4], torch_g, rtol=3e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "lrelu"])
def test_c_sums_of_the_derivative_from_the_input_are_exact_counts(name):
    params, fn, dprime = _CASES[name]
    act = get_activation(name, **params)
    kind = M._C_IN_KINDS[M._shortcut_for(act)]
    x = _inputs(10_001)
    got = M._c_sums(x, None, kind, M._c_params(act))
    positive = int((x > 0).sum())
    slope2 = params.get("negative_slope", 0.0) ** 2
    assert got[4] == pytest.approx(positive + (x.numel() - positive) * slope2, rel=1e-12)
    if name == "relu":
        assert got[4] == positive  # an exact count
    assert got[2] == got[3] == 0.0  # no y given
    np.testing.assert_allclose(got[:2], _float64_sums(x, x, dprime)[:2], rtol=1e-6)


def test_c_sums_accuracy_over_millions_of_elements():
    # float32 block sums, double across blocks: far better than one float32 dot
    x = torch.randn(3_000_001, generator=torch.Generator().manual_seed(0)) * 3 + 1
    sx, sxx, *_ = M._c_sums(x, None, M.DSQ_NONE, (0.0, 0.0))
    xd = x.double()
    assert sx == pytest.approx(float(xd.sum()), rel=1e-7, abs=1e-3)
    assert sxx == pytest.approx(float((xd * xd).sum()), rel=1e-7)


def test_c_sums_reject_bad_arguments():
    f = M._c_power_sums
    x = torch.ones(4)
    with pytest.raises(ValueError, match="n must be >= 0"):
        f(x.data_ptr(), 0, -1, M.DSQ_NONE, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown kind"):
        f(x.data_ptr(), 0, 4, 99, 0.0, 0.0)
    with pytest.raises(ValueError, match="needs y"):
        f(x.data_ptr(), 0, 4, M.DSQ_TANH_Y, 0.0, 0.0)
    with pytest.raises(ValueError, match="needs x"):
        f(0, x.data_ptr(), 4, M.DSQ_SWISH_XY, 0.0, 0.0)
    assert f(0, 0, 0, M.DSQ_NONE, 0.0, 0.0) == (0.0,) * 7


def test_only_contiguous_float32_cpu_tensors_are_handed_to_the_c_sums():
    x = torch.randn(6, 5)
    assert M._c_readable(x)
    assert not M._c_readable(x.t())  # a strided view: torch path
    assert not M._c_readable(x.double())
    assert not M._c_readable(x.to(torch.bfloat16))


def test_a_nan_in_the_layer_makes_its_derivative_statistic_nan():
    # ReLU's count would ignore a NaN; the step reports ρ' NaN like ρ instead
    from torch import nn

    from anact.analysis import ConvergenceMonitor

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with ConvergenceMonitor(model) as mon:
        x = torch.randn(8, 3)
        x[0, 0] = math.nan
        model(x)
        rec = mon.step()["layers"]["1"]
    assert math.isnan(rec["rho"]) and math.isnan(rec["rho_prime"])
