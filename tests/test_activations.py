import math

import pytest
import torch

import anact
from anact.activations import Activation
from anact.gaussian import gaussian_expectation

ALL = anact.list_activations()


def _points(act: Activation) -> torch.Tensor:
    x = torch.linspace(-6, 6, 601, dtype=torch.float64)
    # keep away from kinks, where the derivative is one-sided
    far = torch.ones_like(x, dtype=torch.bool)
    for k in act.kinks:
        far &= (x - k).abs() > 1e-3
    return x[far]


@pytest.mark.parametrize("name", ALL)
def test_derivative_matches_autograd(name):
    act = anact.get_activation(name)
    x = _points(act).requires_grad_(True)
    (expected,) = torch.autograd.grad(act.fn(x).sum(), x)
    torch.testing.assert_close(act.derivative(x.detach()), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_function_matches_torch_module(name):
    act = anact.get_activation(name)
    if act.module is None:
        pytest.skip("no plain module")
    x = torch.randn(1000, dtype=torch.float64) * 3
    torch.testing.assert_close(act.fn(x), act.module().double()(x))


def test_parametrised_activations():
    x = torch.tensor([-2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        anact.get_activation("lrelu", negative_slope=0.2).fn(x), torch.tensor([-0.4, 3.0]).double()
    )
    torch.testing.assert_close(
        anact.get_activation("elu", alpha=2.0).fn(x),
        torch.tensor([2 * (math.exp(-2) - 1), 3.0], dtype=torch.float64),
    )
    selu = anact.get_activation("selu")
    torch.testing.assert_close(selu.derivative(x)[1], torch.tensor(1.0507009873554805).double())


def test_aliases_and_case():
    assert anact.get_activation("SiLU").name == "swish"
    assert anact.get_activation("leaky_relu").name == "lrelu"


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match="relu"):
        anact.get_activation("no_such_activation")


def test_bad_parameters():
    with pytest.raises(TypeError, match="bad parameters"):
        anact.get_activation("relu", slope=3)


def test_register_custom_and_duplicate():
    cube = Activation("cube_test", fn=lambda x: x**3, derivative=lambda x: 3 * x**2)
    anact.register_activation("cube_test", cube)
    try:
        assert anact.get_activation("cube_test") is cube
        with pytest.raises(ValueError, match="already registered"):
            anact.register_activation("cube_test", cube)
        m = anact.NormalizedActivation("cube_test")
        x = torch.randn(64, dtype=torch.float64)
        m.double()(x)
        y = x**3
        torch.testing.assert_close(
            m.running_rho, (y.var(unbiased=False) / x.var(unbiased=False)).to(m.running_rho.dtype)
        )
    finally:
        anact.activations._REGISTRY.pop("cube_test")


# -- exact Gaussian expectations ------------------------------------------------


@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.0, 4.0, 25.0])
def test_gaussian_relu_closed_form(sigma):
    relu = anact.get_activation("relu")
    m, m2, d2 = gaussian_expectation(
        [relu.fn, lambda x: relu.fn(x) ** 2, lambda x: relu.derivative(x) ** 2], sigma, relu.kinks
    )
    assert abs(float(m) - sigma / math.sqrt(2 * math.pi)) < 1e-12 * max(1, sigma)
    assert abs(float(m2) - sigma**2 / 2) < 1e-12 * max(1, sigma**2)
    assert abs(float(d2) - 0.5) < 1e-12


def test_gaussian_hardswish_against_scipy():
    integrate = pytest.importorskip("scipy.integrate")
    hs = anact.get_activation("hardswish")
    sigmas = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    (got,) = gaussian_expectation([lambda x: hs.derivative(x) ** 2], sigmas, hs.kinks)
    for s, g in zip(sigmas.tolist(), got.tolist(), strict=False):
        def f(x, s=s):
            d = hs.derivative(torch.tensor(x, dtype=torch.float64)).item()
            return d * d * math.exp(-x * x / (2 * s * s)) / (s * math.sqrt(2 * math.pi))

        ref = sum(integrate.quad(f, a, b, epsabs=1e-13)[0]
                  for a, b in [(-40 * s, -3), (-3, 3), (3, 40 * s)])
        assert abs(g - ref) < 1e-9


def test_gaussian_rejects_bad_sigma():
    with pytest.raises(ValueError, match="positive"):
        gaussian_expectation([torch.relu], [1.0, -1.0])


@pytest.mark.parametrize("name", ALL)
def test_derivative_same_with_and_without_graph(name):
    # the lean path overwrites its intermediates; with a graph being built it must not
    act = anact.get_activation(name)
    x = _points(act)
    lean = act.derivative(x)
    xg = x.clone().requires_grad_(True)
    with_graph = act.derivative(xg)
    torch.testing.assert_close(lean, with_graph.detach(), rtol=0, atol=1e-15)
    if with_graph.requires_grad:  # piecewise-constant derivatives carry no graph
        (second,) = torch.autograd.grad(with_graph.sum(), xg)
        assert torch.isfinite(second).all()


@pytest.mark.parametrize(
    "name,params,error,match",
    [
        ("softplus", {"beta": 0}, ValueError, "softplus needs beta > 0"),
        ("softplus", {"threshold": math.inf}, ValueError, "threshold must be finite"),
        ("lrelu", {"negative_slope": math.nan}, ValueError, "negative_slope must be finite"),
        ("lrelu", {"negative_slope": "a"}, TypeError, "negative_slope must be a real number"),
        ("elu", {"alpha": math.inf}, ValueError, "alpha must be finite"),
    ],
)
def test_activation_parameters_are_checked(name, params, error, match):
    with pytest.raises(error, match=match):
        anact.get_activation(name, **params)
