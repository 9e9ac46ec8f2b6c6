"""Forward-mode AD (jvp, jacfwd, hessian) of the normalized activations and LayerAct.

The tangents are checked against gradcheck's numerical Jacobian (float64) and against
a float64 restatement of eq. 15 with the statistics held fixed, as the backward holds them.
"""

import gc
import math
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import anact
import anact.functional as AF
from anact import kernels

FNS = {
    "relu": lambda x: x.clamp(min=0),
    "swish": lambda x: x * torch.sigmoid(x),
    "lrelu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "tanh": torch.tanh,
}


def _away_from_kinks(x):
    return x + 0.05 * torch.sign(x)


@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("channel_dim", [None, 1])
def test_apply_normalization_forward_ad_gradcheck(name, channel_dim):
    torch.manual_seed(0)
    x = _away_from_kinks(torch.randn(4, 3, 2, dtype=torch.float64)).requires_grad_(True)
    shape = () if channel_dim is None else (3,)
    scale = (1 + torch.rand(shape, dtype=torch.float64)).requires_grad_(True)
    shift = torch.randn(shape, dtype=torch.float64)

    def f(x, scale):
        return AF.apply_normalization(x, name, scale, shift, channel_dim)

    assert torch.autograd.gradcheck(f, (x, scale), check_forward_ad=True)


@pytest.mark.parametrize("save", ["input", "output"])
def test_jvp_matches_formula_for_both_saved_tensors(save):
    # NReLU keeps its output for backward; the jvp needs x and must not read that output
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64)
    x_dot, scale_dot = torch.randn_like(x), torch.tensor(0.7, dtype=torch.float64)
    scale, shift = torch.tensor(1.3, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    _, tangent = torch.func.jvp(
        lambda x, s: AF.apply_normalization(x, "relu", s, shift, save=save),
        (x, scale), (x_dot, scale_dot),
    )  # fmt: skip
    expected = 1.3 * (x > 0).double() * x_dot + 0.7 * (x.clamp(min=0) - 0.4)
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def _scale_from_buffers(module):
    rho = module.running_rho.double()
    rho_p = module.running_rho_prime.double()
    lam = torch.sqrt((rho + rho_p) / (2 * rho * rho_p))  # eq. 13
    return lam + module.beta * torch.tanh(module.alpha.detach().double())


@pytest.mark.parametrize("backend", ["native", "eager", "fused"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_module_training_under_dual_level(backend, per_channel):
    """Training through forward AD: the buffers update as without tangents and carry none;
    the tangent is s·δ'(x)·ẋ with s from the updated running values."""
    torch.manual_seed(2)
    kwargs = {"num_features": 8, "channel_dim": 1} if per_channel else {}
    plain, dual = anact.NSwish(**kwargs), anact.NSwish(**kwargs)
    with torch.no_grad():
        plain.alpha.fill_(0.2)
        dual.alpha.fill_(0.2)
    x = torch.randn(32, 8)
    x_dot = torch.randn_like(x)
    with kernels.backend(backend):
        expected_out = plain(x)
        with fwAD.dual_level():
            out = dual(fwAD.make_dual(x, x_dot))
            primal, tangent = fwAD.unpack_dual(out)
            assert all(fwAD.unpack_dual(b).tangent is None for b in dual.buffers())
    torch.testing.assert_close(primal, expected_out, rtol=1e-6, atol=1e-6)
    expected_state, state = plain.state_dict(), dual.state_dict()
    assert list(state) == list(expected_state)
    for name, value in state.items():
        torch.testing.assert_close(value, expected_state[name], rtol=1e-6, atol=1e-6, msg=name)
    xd = x.double()
    derivative = torch.sigmoid(xd) * (1 + xd * (1 - torch.sigmoid(xd)))
    expected = _scale_from_buffers(dual) * derivative * x_dot.double()
    torch.testing.assert_close(tangent.double(), expected, rtol=1e-5, atol=1e-6)


def test_jacfwd_and_hessian_match_reverse_mode_in_eval():
    torch.manual_seed(3)
    module = anact.NGELU(4, channel_dim=1).double()
    module(torch.randn(64, 4, dtype=torch.float64))
    module.eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.jacfwd(module)(x), torch.func.jacrev(module)(x))

    def loss(x):
        return module(x).pow(2).sum()

    torch.testing.assert_close(
        torch.func.hessian(loss)(x), torch.func.jacrev(torch.func.jacrev(loss))(x)
    )


def test_jvp_with_respect_to_alpha():
    """Tangents through λ + β·tanh α (eq. 15): d out = β(1 − tanh²α)·α̇·(δ(x) − μ)."""
    torch.manual_seed(4)
    module = anact.NSwish().double()
    module(torch.randn(64, 3, dtype=torch.float64))
    module.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = {"alpha": torch.tensor(0.3, dtype=torch.float64)}
    _, tangent = torch.func.jvp(
        lambda p: torch.func.functional_call(module, p, (x,)),
        (params,), ({"alpha": torch.tensor(1.0, dtype=torch.float64)},),
    )  # fmt: skip
    y = x * torch.sigmoid(x) - module.running_mean
    torch.testing.assert_close(tangent, 0.3 * (1 - math.tanh(0.3) ** 2) * y)


@pytest.mark.parametrize("cls", [anact.LASiLU, anact.LAHardSiLU])
def test_layeract_forward_ad_gradcheck(cls):
    torch.manual_seed(5)
    x = torch.randn(3, 7, dtype=torch.float64)
    if cls is anact.LAHardSiLU:  # keep the normalized values off the gate's kinks at ±3
        x[:, 0] = 2.0
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(cls(), (x,), check_forward_ad=True)


def test_no_extra_tensor_kept_without_forward_ad():
    """With the jvp rule in place, NReLU's graph still keeps its output, not its input, as
    ``F.relu`` does (``save="input"`` keeps h alive here)."""
    module = anact.NReLU()
    w = torch.randn(10, requires_grad=True)
    h = w + torch.randn(64, 10)  # AddBackward keeps neither operand
    ref = weakref.ref(h)
    out = module(h)
    del h
    gc.collect()
    assert ref() is None, "the normalized activation kept its input alive"
    out.sum().backward()
    assert w.grad is not None
