import math

import pytest
import torch

import anact

integrate = pytest.importorskip("scipy.integrate")


def gauss(f, lo=-14.0, hi=14.0, breaks=(0.0,)):
    """E[f(x)], x ~ N(0, 1), by scipy's adaptive quadrature split at `breaks`."""
    pts = [lo, *sorted(b for b in breaks if lo < b < hi), hi]

    def g(x):
        return f(x) * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    pieces = zip(pts, pts[1:], strict=False)
    return sum(integrate.quad(g, a, b, epsabs=1e-13, limit=200)[0] for a, b in pieces)


def test_relu_gpn_is_sqrt2_relu():
    a, b = anact.gpn_constants("relu")
    assert abs(a - math.sqrt(2)) < 1e-9 and b == 0.0
    x = torch.randn(100, dtype=torch.float64)
    torch.testing.assert_close(anact.GPN("relu")(x), math.sqrt(2) * torch.relu(x))


def test_lrelu_gpn_matches_appendix():
    a, b = anact.gpn_constants("lrelu")
    # appendix eq. 27: β ≈ 1.4141; closed form a = 1/sqrt((1 + 0.01²)/2)
    assert abs(a - 1 / math.sqrt((1 + 1e-4) / 2)) < 1e-9
    assert round(a, 4) == 1.4141
    assert abs(b) < 1e-6


@pytest.mark.parametrize("name", ["tanh", "elu", "selu", "swish", "gelu", "softplus", "hardswish"])
def test_gpn_normalizes_both_moments(name):
    a, b = anact.gpn_constants(name)
    act = anact.get_activation(name)

    def fn(x):
        return act.fn(torch.tensor(x, dtype=torch.float64)).item()

    def d(x):
        return act.derivative(torch.tensor(x, dtype=torch.float64)).item()

    breaks = act.kinks or (0.0,)
    second = gauss(lambda x: (a * (fn(x) + b)) ** 2, breaks=breaks)
    dsq = gauss(lambda x: (a * d(x)) ** 2, breaks=breaks)
    assert abs(second - 1) < 1e-6 and abs(dsq - 1) < 1e-6
    # the root of smaller |b|
    mean = gauss(fn, breaks=breaks)
    other = -2 * mean - b
    assert abs(b) <= abs(other) + 1e-9


def test_gpn_without_real_shift_raises():
    # the discriminant E[ψ]² − E[ψ²] + E[ψ'²] = E[ψ'²] − Var[ψ] < 0: tiny slope, large spread
    act = anact.Activation("steep_sin", fn=lambda x: 3 * torch.sin(x) + 5,
                           derivative=lambda x: 3 * torch.cos(x) * 0.01)
    with pytest.raises(ValueError, match="no real GPN shift"):
        anact.gpn_constants(act)


def layeract_reference(x, gate):
    x = x.double()
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    n = (x - mean) / torch.sqrt(var + 1e-5)
    return x * gate(n)


GATES = {
    anact.LASiLU: torch.sigmoid,
    anact.LAHardSiLU: lambda n: torch.clamp(n / 6 + 0.5, 0, 1),
}


@pytest.mark.parametrize("cls", list(GATES))
def test_layeract_forward_and_gradients(cls):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2
    module = cls()
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    torch.testing.assert_close(out, layeract_reference(x, GATES[cls]))
    g = torch.randn_like(out)
    out.backward(g)
    xr = x.clone().requires_grad_(True)
    layeract_reference(xr, GATES[cls]).backward(g)  # autograd through mean and variance
    torch.testing.assert_close(xg.grad, xr.grad)
    for mode in (True, False):
        module.train(mode)
        assert torch.autograd.gradcheck(module, (x[:, :2, :3, :3].clone().requires_grad_(True),))


def test_layeract_needs_batch_dimension():
    with pytest.raises(ValueError, match="at least 2"):
        anact.LASiLU()(torch.randn(5))


def test_layeract_saves_only_input():
    x = torch.randn(8, 16, 4, 4, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sizes.append(t.numel()) or t, lambda t: t
    ):
        anact.LASiLU()(x)
    assert sizes == [x.numel()]


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: anact.LASiLU()(torch.randn(3, 4, dtype=torch.complex64)), TypeError,
         "floating-point input"),
        (lambda: anact.LASiLU()(torch.ones(3, 4, dtype=torch.long)), TypeError,
         "floating-point input"),
        (lambda: anact.LASiLU(eps="a"), TypeError, "eps must be a real number"),
        (lambda: anact.LAHardSiLU(eps=0.0), ValueError, "eps must be finite and > 0"),
    ],
)
def test_layeract_rejects_bad_input_clearly(make, error, match):
    with pytest.raises(error, match=match):
        make()
