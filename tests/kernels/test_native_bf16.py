"""The native C passes on bfloat16 tensors: outputs and ∂L/∂x are the eager op's bfloat16
arithmetic (each step rounded as torch rounds it), the statistics and the α-gradient are
checked against float64 computations."""

import os

import pytest
import torch
from test_native import SHAPES, step_by_backend

import anact
import anact.kernels as K
from anact.kernels import native

pytestmark = pytest.mark.skipif(
    not native.available() and os.environ.get("ANACT_ALLOW_NO_C") == "1",
    reason="anact._nactcpu not built and ANACT_ALLOW_NO_C=1",
)

BF16 = torch.bfloat16
ACTS = [("relu", None), ("lrelu", {"negative_slope": 0.2}), ("swish", None)]
DELTA = {
    "relu": lambda x, p: x.clamp(min=0),
    "lrelu": lambda x, p: torch.where(x > 0, x, p["negative_slope"] * x),
    "swish": lambda x, p: x * torch.sigmoid(x),
}


def _steps(backend, name, params, shape, cd, x, g, save):
    """Two training steps and one eval step; outputs, ∂L/∂x, ∂L/∂α and the module."""
    torch.manual_seed(0)
    c = None if cd is None else shape[cd]
    module = anact.NormalizedActivation(name, c, channel_dim=cd, activation_params=params,
                                        save=save)  # fmt: skip
    with torch.no_grad():
        module.alpha.fill_(0.3)
    results = []
    with K.backend(backend):
        for step in range(2):
            xi = (x * (1 + 0.25 * step)).detach().requires_grad_()
            out = module(xi)
            module.alpha.grad = None
            out.backward(g)
            results.append((out.detach(), xi.grad, module.alpha.grad.clone()))
        module.eval()
        results.append((module(x), None, None))
    return results, module


def _native_ran(name, params, shape, cd, x):
    c = None if cd is None else shape[cd]
    module = anact.NormalizedActivation(name, c, channel_dim=cd, activation_params=params)
    with K.backend("native"):
        out = module(x.detach().requires_grad_())
    return type(out.grad_fn).__name__.startswith("NativeNormalizedActivationFn")


@pytest.mark.parametrize("save", ["auto", "input"])
@pytest.mark.parametrize("shape,cd", SHAPES)
@pytest.mark.parametrize("name,params", ACTS)
def test_bf16_native_is_the_eager_bf16_arithmetic(name, params, shape, cd, save):
    torch.manual_seed(1)
    x = (torch.randn(shape) * 1.5 + 0.2).to(BF16)
    g = torch.randn(shape).to(BF16)
    assert _native_ran(name, params, shape, cd, x)
    got, m_native = _steps("native", name, params, shape, cd, x, g, save)
    want, m_eager = _steps("eager", name, params, shape, cd, x, g, save)
    # (∂L/∂α: the eager op sums products rounded to bfloat16, these are summed unrounded;
    # both are checked against float64 below)
    for (out_n, gx_n, _), (out_e, gx_e, _) in zip(got, want, strict=True):
        assert out_n.dtype == BF16
        if name == "swish":  # δ's exp: a polynomial here, SLEEF in torch (float32 ulps)
            torch.testing.assert_close(out_n, out_e, rtol=2**-8, atol=1e-6)
            if gx_n is not None:
                torch.testing.assert_close(gx_n, gx_e, rtol=2**-8, atol=1e-6)
        else:  # bit for bit: the same bfloat16 roundings, given the same s and μ
            assert torch.equal(out_n, out_e)
            if gx_n is not None:
                assert gx_n.dtype == BF16 and torch.equal(gx_n, gx_e)
    for key, value in m_native.state_dict().items():
        torch.testing.assert_close(value, m_eager.state_dict()[key], rtol=2e-6, atol=2e-6,
                                   msg=key)  # fmt: skip


@pytest.mark.parametrize("name,params", ACTS)
@pytest.mark.parametrize("cd", [None, 1, -1])
def test_bf16_native_against_float64(name, params, cd):
    check_bf16_against_float64("native", name, params, cd)


def check_bf16_against_float64(backend, name, params, cd):
    """Statistics from the bfloat16 values (exact in float64), the output within one
    bfloat16 rounding of s·(δ(x) − μ) per step, ∂L/∂α = β(1 − tanh²α)·Σ g·(δ(x) − μ)
    (also run by tests/kernels/test_triton.py)."""
    torch.manual_seed(2)
    shape = (8, 6, 40)
    x = (torch.randn(shape) * 1.3 + 0.3).to(BF16)
    g = torch.randn(shape).to(BF16)
    c = None if cd is None else shape[cd]
    module = anact.NormalizedActivation(name, c, channel_dim=cd, activation_params=params,
                                        momentum=None)  # fmt: skip
    with torch.no_grad():
        module.alpha.fill_(0.4)
    xi = x.detach().requires_grad_()
    with K.backend(backend):
        out = module(xi)
    assert type(out.grad_fn).__name__.lower().startswith(backend)
    out.backward(g)

    x64, g64 = x.double(), g.double()
    dims = [d for d in range(3) if cd is None or d != cd % 3]
    view = [1, 1, 1]
    if cd is not None:
        view[cd % 3] = c
    y64 = DELTA[name](x64, params)
    dy64 = torch.func.vmap(torch.func.grad(lambda v: DELTA[name](v, params)))(
        x64.reshape(-1)).reshape(shape)  # fmt: skip
    mu = y64.mean(dims)
    rho = y64.var(dims, unbiased=False) / x64.var(dims, unbiased=False)
    rho_p = dy64.square().mean(dims)
    torch.testing.assert_close(module.running_mean.double(), mu.reshape(module.running_mean.shape),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(module.running_rho.double(), rho.reshape(module.running_rho.shape),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(module.running_rho_prime.double(),
                               rho_p.reshape(module.running_rho.shape), rtol=1e-5, atol=1e-6)
    # the op works with s and μ rounded to bfloat16, as the eager op casts them; from the
    # stored float32 statistics (from the float64 ones a rounding could fall the other way)
    r, rp = module.running_rho.double(), module.running_rho_prime.double()
    lam = torch.sqrt((r + rp) / (2 * r * rp))  # eq. 13
    s = (lam + 0.3 * torch.tanh(torch.tensor(0.4, dtype=torch.float64))).reshape(view)
    s_h, mu_h = s.to(BF16).double(), module.running_mean.reshape(view).to(BF16).double()
    want = s_h * (y64 - mu_h)
    # three roundings (δ, the difference, the product) of ≤ 2⁻⁹ relative each
    bound = 2**-8 * (s_h.abs() * (y64.abs() + mu_h.abs())) + 2**-8 * want.abs() + 1e-30
    # NReLU/NLReLU save their output: a δ(x) > 0 rounded onto t moves one step more
    bound = bound + (2**-7 * want.abs()) * (y64 > 0) * (name != "swish")
    assert ((out.double() - want).abs() <= bound).all()
    # ∂L/∂x = g·δ'(x)·s; Swish's δ' = σ(1 + x(1 − σ)) is formed as the eager bfloat16
    # code forms it, each step rounded: errors of ~2⁻⁹ of σ·(1 + |x|), not of δ'
    size = g64.abs() * s_h.abs() * (dy64.abs() + torch.sigmoid(x64) * (1 + x64.abs()))
    assert ((xi.grad.double() - g64 * dy64 * s_h).abs() <= 2**-6 * size).all()
    terms = g64 * (y64 - mu_h)
    want_alpha = 0.3 * (1 - torch.tanh(torch.tensor(0.4, dtype=torch.float64)) ** 2)
    want_alpha = want_alpha * terms.sum(dims).reshape(module.alpha.shape)
    scale_of_terms = 0.3 * terms.abs().sum(dims).reshape(module.alpha.shape)
    assert ((module.alpha.grad.double() - want_alpha).abs() <= 2**-7 * scale_of_terms).all()


@pytest.mark.parametrize("cd", [None, 1])
def test_bf16_ties_are_moved_and_gradients_follow_the_sign(cd):
    """NReLU saving its bfloat16 output: δ(x) > 0 that rounds onto t = s·(0 − μ) is moved
    one bfloat16 step away (as the eager op moves it), so that ∂L/∂x is s exactly where
    x > 0, and 0 elsewhere."""
    torch.manual_seed(3)
    shape = (16, 4, 10)
    x = (torch.randn(shape) * 0.8 + 0.5).to(BF16)
    x.view(-1)[:40] = 1e-3  # below ulp(μ)/2 in bfloat16: (δ − μ) rounds onto −μ
    x.view(-1)[40:50] = 0.0
    c = None if cd is None else shape[cd]
    outs = step_by_backend(lambda: anact.NReLU(c, channel_dim=cd, track_running_stats=False),
                           x, torch.ones_like(x), ("native", "eager"))  # fmt: skip
    (out_n, gx_n, _, fn_n), (out_e, gx_e, _, _) = outs["native"], outs["eager"]
    assert fn_n.startswith("NativeNormalized")
    assert torch.equal(out_n, out_e)
    assert torch.equal(gx_n, gx_e)
    assert torch.equal(gx_n != 0, x > 0)  # the tiny positives kept their gradient


def test_bf16_special_values_round_as_torch():
    """NaN, ±inf and ties to even in the stored bfloat16 values: a batch with NaN is left
    out of the statistics (eval values used), and the outputs are torch's."""
    x = torch.tensor([[1.0, -2.0, float("inf"), 3.0], [0.5, float("nan"), -0.25, 2.0]],
                     dtype=BF16)  # fmt: skip
    outs = []
    for backend in ("native", "eager"):
        module = anact.NLReLU()
        with K.backend(backend), pytest.warns(anact.functional.StatisticsWarning):
            outs.append(module(x))
    torch.testing.assert_close(outs[0], outs[1], equal_nan=True, rtol=0, atol=0)
