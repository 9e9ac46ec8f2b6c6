"""NormalizedActivation against an independent float64 re-statement of the paper."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

import anact
import anact.functional as AF

NAMED = {
    anact.NReLU: lambda x: x.clamp(min=0),
    anact.NSwish: lambda x: x * torch.sigmoid(x),
    anact.NLReLU: lambda x: torch.where(x > 0, x, 0.01 * x),
    anact.NTanh: torch.tanh,
    anact.NELU: lambda x: torch.where(x > 0, x, torch.expm1(x)),
    anact.NGELU: lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    anact.NMish: lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    anact.NSoftplus: lambda x: torch.log1p(torch.exp(x)),
}


def autograd_derivative(fn, x):
    x = x.detach().clone().requires_grad_(True)
    (d,) = torch.autograd.grad(fn(x).sum(), x)
    return d


class Reference:
    """Eq. 13 and 15-18 written out in float64, one statistic per tensor."""

    def __init__(self, fn, momentum=0.1, bounds=(0.2, 5.0), beta=0.3, center=True):
        self.fn, self.m, self.bounds, self.beta, self.center = fn, momentum, bounds, beta, center
        self.rho, self.rho_p, self.mu, self.t = 1.0, 1.0, 0.0, 0

    def batch(self, x):
        y = self.fn(x)
        d = autograd_derivative(self.fn, x)
        rho = (((y - y.mean()) ** 2).mean() / ((x - x.mean()) ** 2).mean()).item()
        return rho, (d**2).mean().item(), y.mean().item()

    def update(self, x):
        rho_m, rho_p_m, mu_m = self.batch(x)
        m, (lo, hi) = self.m, self.bounds
        if self.t == 0:
            self.rho, self.rho_p, self.mu = rho_m, rho_p_m, mu_m
        else:
            self.mu = m * mu_m + (1 - m) * self.mu
            if lo * self.rho < rho_m < hi * self.rho:
                self.rho = m * rho_m + (1 - m) * self.rho
            if lo * self.rho_p < rho_p_m < hi * self.rho_p:
                self.rho_p = m * rho_p_m + (1 - m) * self.rho_p
        self.t += 1

    def scale(self, alpha=0.0):
        lam = math.sqrt((self.rho + self.rho_p) / (2 * self.rho * self.rho_p))
        return lam + self.beta * math.tanh(alpha)

    def output(self, x, alpha=0.0):
        mu = self.mu if self.center else 0.0
        return self.scale(alpha) * (self.fn(x) - mu)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("cls", list(NAMED))
def test_training_sequence_matches_reference(cls):
    torch.manual_seed(0)
    module = cls()
    ref = Reference(NAMED[cls])
    # batch 0: first batch; 1-2: ordinary; 3: a scaled batch whose ρ may leave the bounds
    batches = [torch.randn(32, 10), torch.randn(32, 10) * 1.5 + 0.2, torch.randn(32, 10),
               torch.randn(32, 10) * 30 - 5]
    for x in batches:
        out = module(x)
        ref.update(x.double())
        close(module.running_rho, ref.rho)
        close(module.running_rho_prime, ref.rho_p)
        close(module.running_mean, ref.mu)
        close(out, ref.output(x.double()), tol=1e-4)
    assert module.num_batches_tracked.item() == len(batches)
    # eval: stored statistics, nothing changes
    module.eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(7, 3)
    close(module(x), ref.output(x.double()), tol=1e-4)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bounds_keep_rho_but_mean_moves():
    module = anact.NReLU(bounds=(0.5, 2.0))
    x0 = torch.randn(4096)
    module(x0)
    rho0, mu0 = module.running_rho.clone(), module.running_mean.clone()
    # a batch with ρ_M far below L·ρ: ReLU of inputs shifted far left gives Var[y] ≈ 0
    x1 = torch.randn(4096) - 3.0
    rho_m, rho_p_m, mu_m, valid = AF.moments_to_stats(AF.batch_moments(x1, "relu"))
    assert valid and rho_m < 0.5 * rho0 and rho_p_m < 0.5 * module.running_rho_prime
    module(x1)
    assert torch.equal(module.running_rho, rho0)
    close(module.running_mean, 0.1 * mu_m.double() + 0.9 * mu0.double())


def test_bounds_none_always_blends():
    module = anact.NReLU(bounds=None)
    module(torch.randn(512))
    rho0 = module.running_rho.double()
    x1 = torch.randn(512) - 3.0
    rho_m = AF.moments_to_stats(AF.batch_moments(x1.double(), "relu"))[0]
    module(x1)
    close(module.running_rho, 0.1 * rho_m + 0.9 * rho0)


def test_momentum_none_is_cumulative_average():
    module = anact.NTanh(momentum=None, bounds=None)
    xs = [torch.randn(256) * s for s in (0.5, 1.0, 2.0)]
    for x in xs:
        module(x)
    ref = Reference(torch.tanh)
    rhos = [ref.batch(x.double())[0] for x in xs]
    close(module.running_rho, sum(rhos) / 3)


def test_center_false_and_beta():
    module = anact.NSwish(center=False, beta=0.5)
    with torch.no_grad():
        module.alpha.fill_(0.7)
    x = torch.randn(64, 5)
    out = module(x)
    ref = Reference(NAMED[anact.NSwish], beta=0.5, center=False)
    ref.update(x.double())
    close(out, ref.output(x.double(), alpha=0.7), tol=1e-4)


@pytest.mark.parametrize("cls", list(NAMED))
def test_training_gradients(cls):
    torch.manual_seed(1)
    module = cls()
    with torch.no_grad():
        module.alpha.fill_(0.4)
    x = torch.randn(16, 8, dtype=torch.float64)
    module.double()
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    g = torch.randn_like(out)
    out.backward(g)
    fn = NAMED[cls]
    ref = Reference(fn)
    ref.update(x)
    c = ref.scale(0.4)
    # eq. 37/42: ∂L/∂x = c·δ'(x)·g;  eq. 36/41: ∂L/∂α = Σ g·β(1 − tanh²α)(y − μ)
    close(xg.grad, c * autograd_derivative(fn, x) * g, tol=1e-6)
    expected_alpha = (g * 0.3 * (1 - math.tanh(0.4) ** 2) * (fn(x) - ref.mu)).sum()
    close(module.alpha.grad, expected_alpha, tol=1e-6)


@pytest.mark.parametrize("cls", list(NAMED))
def test_gradcheck_eval(cls):
    torch.manual_seed(2)
    module = cls().double()
    module(torch.randn(64, 4, dtype=torch.float64))  # some running statistics
    module.eval()
    with torch.no_grad():
        module.alpha.fill_(-0.3)
    x = torch.randn(5, 4, dtype=torch.float64)
    x = x + 0.05 * torch.sign(x)  # away from the kinks at 0
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, a: _with_alpha(module, x, a), (x, module.alpha))


def _with_alpha(module, x, alpha):
    return AF.normalized_activation(
        x, module.activation, module.running_rho, module.running_rho_prime, module.running_mean,
        module.num_batches_tracked, alpha, training=False, beta=module.beta,
        center=module.center,
    )


def test_gradcheck_eval_per_channel_with_mask():
    torch.manual_seed(3)
    module = anact.NSwish(3, channel_dim=1).double()
    module(torch.randn(8, 3, 5, dtype=torch.float64))
    module.eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    f = lambda x, a: AF.normalized_activation(  # noqa: E731
        x, "swish", module.running_rho, module.running_rho_prime, module.running_mean,
        module.num_batches_tracked, a, training=False, channel_dim=1)
    assert torch.autograd.gradcheck(f, (x, alpha))


def test_mask_excludes_padding_from_statistics():
    torch.manual_seed(4)
    x = torch.randn(4, 10, 6)
    lengths = torch.tensor([10, 7, 3, 1])
    mask = (torch.arange(10)[None, :] < lengths[:, None])[..., None]  # (4, 10, 1)
    x_pad = x.masked_fill(~mask, float("nan"))  # padding may hold anything
    module = anact.NReLU()
    out = module(x_pad, mask=mask)
    ref = Reference(NAMED[anact.NReLU])
    ref.update(x[mask.expand_as(x)].double())
    close(module.running_rho, ref.rho)
    close(module.running_rho_prime, ref.rho_p)
    close(module.running_mean, ref.mu)
    # real positions normalized with those statistics; padding outputs still computed
    close(out[mask.expand_as(x)], ref.output(x[mask.expand_as(x)].double()), tol=1e-4)
    assert out.shape == x.shape
    x_zero_pad = x.masked_fill(~mask, 0.0)
    out0 = anact.NReLU()(x_zero_pad, mask=mask)
    assert torch.isfinite(out0).all()


@pytest.mark.parametrize("training", [True, False])
def test_mask_errors(training):
    """A bad mask is an error in eval too, where the running values make it unused."""
    module = anact.NReLU().train(training)
    with pytest.raises(TypeError, match="bool"):
        module(torch.randn(3, 4), mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="broadcast"):
        module(torch.randn(3, 4), mask=torch.ones(5, 1, dtype=torch.bool))


def test_per_channel_statistics():
    torch.manual_seed(5)
    x = torch.randn(6, 3, 4, 4) * torch.tensor([0.5, 1.0, 3.0])[None, :, None, None]
    module = anact.NSwish(3, channel_dim=1)
    out = module(x)
    for c in range(3):
        ref = Reference(NAMED[anact.NSwish])
        ref.update(x[:, c].double().reshape(-1))
        close(module.running_rho[c], ref.rho)
        close(module.running_rho_prime[c], ref.rho_p)
        close(module.running_mean[c], ref.mu)
        close(out[:, c], ref.output(x[:, c].double()), tol=1e-4)
    assert module.alpha.shape == (3,)
    with pytest.raises(ValueError, match="3 channels"):
        module(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="num_features"):
        anact.NReLU(channel_dim=1)


def test_channel_last_dim():
    x = torch.randn(5, 7, 3)
    module = anact.NReLU(3, channel_dim=-1)
    module(x)
    ref = Reference(NAMED[anact.NReLU])
    ref.update(x[..., 2].double().reshape(-1))
    close(module.running_rho[2], ref.rho)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.full((16,), 0.37), None),  # constant batch
        lambda: (torch.randn(1), None),  # a single element
        lambda: (torch.randn(4, 5), torch.zeros(4, 1, dtype=torch.bool)),  # all masked
        lambda: (torch.tensor([1.0, float("nan"), 2.0, 3.0]), None),  # NaN
        lambda: (torch.tensor([1.0, float("inf"), 2.0, 3.0]), None),  # Inf
        lambda: (-torch.rand(64) - 0.1, None),  # dead ReLU: ρ_M = 0
    ],
    ids=["constant", "one-element", "all-masked", "nan", "inf", "dead"],
)
def test_guards_skip_update_and_warn(make):
    module = anact.NReLU()
    module(torch.randn(128))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x, mask = make()
    with pytest.warns(AF.StatisticsWarning):
        out = module(x, mask=mask)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert module.num_batches_skipped.item() == 1
    assert out.shape == x.shape
    finite_in = torch.isfinite(x)
    assert torch.isfinite(out[finite_in]).all()


@pytest.mark.parametrize("backend", ["eager", "native", "fused"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_unusable_batch_warning_points_at_the_callers_line(backend, per_channel):
    """Whichever path finds the unusable batch, the warning names the user's line."""
    import inspect

    import anact.kernels as K

    module = anact.NReLU(**(dict(num_features=4, channel_dim=1) if per_channel else {}))
    x = torch.full((8, 4), 2.0)  # a constant batch
    with K.backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        module(x)
        module.eval()
        AF.normalized_activation(x, "relu", None, None, None, None, torch.zeros(()),
                                 training=False)  # fmt: skip
    where = [(w.filename, w.lineno) for w in caught if w.category is AF.StatisticsWarning]
    assert where == [(__file__, line), (__file__, line + 2)]


def _state(c=None, dtype=torch.float32):
    shape = () if c is None else (c,)
    return [torch.ones(shape, dtype=dtype), torch.ones(shape, dtype=dtype),
            torch.zeros(shape, dtype=dtype), torch.zeros((), dtype=torch.long)]  # fmt: skip


@pytest.mark.parametrize(
    "change,channel_dim,error,match",
    [
        (lambda s, a: (s[:1] + [None] + s[2:], a), None, ValueError,
         "got None for running_rho_prime"),
        (lambda s, a: (s[:3] + [None], a), None, ValueError, "got None for num_batches_tracked"),
        (lambda s, a: (s, torch.zeros(5)), None, ValueError,
         r"alpha must have shape \(\) per tensor"),
        (lambda s, a: (s, torch.zeros(())), 1, ValueError, r"alpha must have shape \(4,\)"),
        (lambda s, a: (_state(3), a), 1, ValueError,
         r"running_rho must have shape \(4,\) per channel: 4 channels in dimension 1"),
        (lambda s, a: ([t.long() for t in s[:3]] + s[3:], a), None, TypeError,
         "running_rho must be a floating-point tensor"),
        (lambda s, a: (s[:3] + [s[3].float()], a), None, TypeError,
         "num_batches_tracked must be an integer tensor"),
        (lambda s, a: (s, 0.0), None, TypeError, "alpha must be a tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["eager", "native"])
def test_functional_checks_its_state_before_writing_any(change, channel_dim, error, match,
                                                        backend):  # fmt: skip
    """Bad state tensors: a clear error, and no buffer updated before it (both paths)."""
    import anact.kernels as K

    x = torch.randn(6, 4)
    c = None if channel_dim is None else 4
    state, alpha = change(_state(c), torch.zeros(() if c is None else (c,)))
    before = [None if t is None else t.clone() for t in state]
    with K.backend(backend), pytest.raises(error, match=match):
        AF.normalized_activation(x, "relu", *state, alpha, training=True,
                                 channel_dim=channel_dim)  # fmt: skip
    for t, b in zip(state, before, strict=True):
        assert (t is None and b is None) or torch.equal(t, b)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(momentum=5.0), ValueError, r"momentum must be in \(0, 1\]"),
        (dict(bounds=(3.0, 1.0)), ValueError, "bounds must satisfy"),
        (dict(eps=-1.0), ValueError, "eps must be finite and > 0"),
        (dict(beta="0.3"), TypeError, "beta must be a real number"),
        (dict(training="no"), TypeError, "training must be a bool"),
    ],
)
def test_functional_checks_its_options(kw, error, match):
    state = _state()
    kw = {"training": True, **kw}
    with pytest.raises(error, match=match):
        AF.normalized_activation(torch.randn(6, 4), "relu", *state, torch.zeros(()), **kw)
    assert int(state[3]) == 0
    with pytest.raises(TypeError, match="needs a tensor input"):
        AF.normalized_activation([1.0, 2.0], "relu", *state, torch.zeros(()), training=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(center="no"), "center must be a bool"),
        (dict(track_running_stats="no"), "track_running_stats must be a bool"),
        (dict(dtype=torch.int64), "dtype must be a floating-point torch.dtype"),
        (dict(dtype=torch.complex64), "dtype must be a floating-point torch.dtype"),
    ],
)
def test_module_rejects_non_bool_flags_and_non_float_dtypes(kw, match):
    with pytest.raises(TypeError, match=match):
        anact.NReLU(**kw)


def test_invalid_first_batch_keeps_next_batch_first():
    module = anact.NReLU()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AF.StatisticsWarning)
        out = module(torch.full((8,), 2.0))
    assert module.num_batches_tracked.item() == 0
    close(out, torch.full((8,), 2.0))  # initial values ρ = ρ' = 1 (λ = 1), μ = 0
    x = torch.randn(256)
    module(x)
    ref = Reference(NAMED[anact.NReLU])
    ref.update(x.double())
    close(module.running_rho, ref.rho)


def test_no_running_stats_uses_batch_statistics_in_eval():
    module = anact.NSwish(track_running_stats=False).eval()
    assert module.running_rho is None
    x = torch.randn(64)
    ref = Reference(NAMED[anact.NSwish])
    ref.update(x.double())
    close(module(x), ref.output(x.double()), tol=1e-4)
    assert "running_rho" not in module.state_dict()


def test_state_dict_round_trip_and_reset():
    a = anact.NLReLU(negative_slope=0.2)
    for _ in range(3):
        a(torch.randn(50))
    with torch.no_grad():
        a.alpha.fill_(0.25)
    b = anact.NLReLU(negative_slope=0.2)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(9)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {
        "alpha", "running_rho", "running_rho_prime", "running_mean", "num_batches_tracked"}
    b.reset_running_stats()
    assert b.running_rho.item() == 1 and b.running_mean.item() == 0
    assert b.num_batches_tracked.item() == 0
    b.reset_parameters()
    assert b.alpha.item() == 0


def test_to_float64_and_dtype_preserved():
    module = anact.NSwish().to(torch.float64)
    assert module.running_rho.dtype == torch.float64 and module.alpha.dtype == torch.float64
    assert module.num_batches_tracked.dtype == torch.long
    x = torch.randn(10, dtype=torch.float64)
    assert module(x).dtype == torch.float64


def test_bf16_input_float32_statistics():
    module = anact.NSwish()
    x = torch.randn(64, 16)
    out = module(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert module.running_rho.dtype == torch.float32
    ref = Reference(NAMED[anact.NSwish])
    ref.update(x.to(torch.bfloat16).double())
    close(module.running_rho, ref.rho, tol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.Linear(16, 16)(x)
        out = module(y)
    assert out.dtype == torch.bfloat16 and module.running_rho.dtype == torch.float32


def test_repr_and_named_defaults():
    for cls in NAMED:
        m = cls()
        assert "momentum=0.1" in repr(m) and "bounds=(0.2, 5.0)" in repr(m)
    assert "negative_slope=0.01" in repr(anact.NLReLU())
    assert anact.NLReLU(negative_slope=0.3).activation.params["negative_slope"] == 0.3


def test_constructor_errors():
    with pytest.raises(ValueError, match="momentum"):
        anact.NReLU(momentum=0)
    with pytest.raises(ValueError, match="bounds"):
        anact.NReLU(bounds=(2.0, 0.5))
    with pytest.raises(ValueError, match="eps"):
        anact.NReLU(eps=0)
    with pytest.raises(TypeError, match="floating"):
        anact.NReLU()(torch.arange(4))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bounds": (0.2,)}, ValueError, "pair"),
    ({"bounds": 0.2}, ValueError, "pair"),
    ({"bounds": (0.2, "5")}, TypeError, "bounds must be a real number"),
    ({"momentum": "0.1"}, TypeError, "momentum must be a real number"),
    ({"beta": None}, TypeError, "beta must be a real number"),
    ({"beta": math.inf}, ValueError, "beta must be finite"),
    ({"beta": -0.1}, ValueError, "beta must be finite and >= 0"),
    ({"eps": math.inf}, ValueError, "eps must be finite"),
    ({"eps": math.nan}, ValueError, "eps must be finite"),
    ({"num_features": 2.5, "channel_dim": 1}, TypeError, "num_features must be an int"),
    ({"num_features": True, "channel_dim": 1}, TypeError, "num_features must be an int"),
    ({"num_features": 3, "channel_dim": 1.0}, TypeError, "channel_dim must be an int"),
    ({"num_features": 3, "channel_dim": "x"}, TypeError, "channel_dim must be an int"),
])  # fmt: skip
def test_constructor_rejects_wrong_types_with_the_argument_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        anact.NReLU(**kwargs)


def test_constructor_accepts_numpy_and_int_numbers():
    m = anact.NReLU(momentum=np.float32(0.5), beta=1, eps=np.float64(1e-4), bounds=[0, 10])
    assert (m.momentum, m.beta, m.eps, m.bounds) == (0.5, 1.0, 1e-4, (0.0, 10.0))


def _saved_bytes(fn, x):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(total)


@pytest.mark.parametrize(
    "normalized,plain",
    [(anact.NSwish, torch.nn.functional.silu), (anact.NReLU, torch.relu),
     (anact.NGELU, torch.nn.functional.gelu)],
)
def test_saved_memory_equals_plain_activation(normalized, plain):
    x = torch.randn(32, 64, 8, 8, requires_grad=True)
    module = normalized()
    saved = _saved_bytes(module, x)
    reference = _saved_bytes(plain, x)
    # x itself plus scalars (scale, shift, tanh α): at most a few dozen bytes
    assert reference >= x.numel() * 4
    assert saved <= reference + 64


def test_merge_moments_equals_union():
    torch.manual_seed(6)
    x = torch.randn(12, 3, 5, dtype=torch.float64)
    mask = torch.rand(12, 1, 5) > 0.3
    whole = AF.batch_moments(x, "swish", channel_dim=1, mask=mask)
    parts = [AF.batch_moments(x[i:i + 4], "swish", channel_dim=1, mask=mask[i:i + 4])
             for i in (0, 4, 8)]
    parts.append(AF.batch_moments(x[:2], "swish", channel_dim=1,
                                  mask=torch.zeros(2, 1, 5, dtype=torch.bool)))  # empty shard
    stacked = AF.BatchMoments(*(torch.stack(t) for t in zip(*parts, strict=False)))
    for got, want in zip(AF.merge_moments(stacked), whole, strict=False):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("channel_dim", [None, 1])
def test_merge_moments_rejects_a_non_finite_shard_as_the_union_does(bad, channel_dim):
    """A NaN/Inf in one rank's batch makes the merged batch unusable on every rank, as it
    makes one process's batch holding the same values unusable; an empty shard's NaN
    moments still count for nothing."""
    torch.manual_seed(2)
    x = torch.randn(12, 3, 5)
    x[5, :, 2] = bad  # in the second shard, in every channel
    parts = [AF.batch_moments(x[i:i + 4], "relu", channel_dim=channel_dim) for i in (0, 4, 8)]
    parts.append(AF.batch_moments(x[:2], "relu", channel_dim=channel_dim,
                                  mask=torch.zeros(2, 1, 1, dtype=torch.bool)))  # empty shard
    stacked = AF.BatchMoments(*(torch.stack(t) for t in zip(*parts, strict=True)))
    merged_valid = AF.moments_to_stats(AF.merge_moments(stacked))[3]
    union_valid = AF.moments_to_stats(AF.batch_moments(x, "relu", channel_dim=channel_dim))[3]
    assert not union_valid.any()
    assert torch.equal(merged_valid, union_valid)
    # without the bad value, the same shards (the empty one included) merge to a usable batch
    x[5, :, 2] = 0.5
    parts[1] = AF.batch_moments(x[4:8], "relu", channel_dim=channel_dim)
    stacked = AF.BatchMoments(*(torch.stack(t) for t in zip(*parts, strict=True)))
    assert AF.moments_to_stats(AF.merge_moments(stacked))[3].all()


def test_module_used_twice_in_one_graph():
    module = anact.NSwish()
    x = torch.randn(16, 8, requires_grad=True)
    out = module(module(x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_torch_save_whole_model():
    import io

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), anact.NLReLU(negative_slope=0.2),
                                anact.GPN("elu", alpha=2.0), anact.NSwish(4, channel_dim=1))
    model(torch.randn(6, 3))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded[1].activation.params == {"negative_slope": 0.2}
    assert loaded[2].activation.params == {"alpha": 2.0}
    model.eval()
    loaded.eval()
    x = torch.randn(5, 3)
    assert torch.equal(model(x), loaded(x))


def test_moments_hook_sees_each_training_batch_and_detaches():
    torch.manual_seed(0)
    m = anact.NSwish(4, channel_dim=1)
    seen = []
    handle = m.register_moments_hook(lambda module, moments: seen.append((module, moments)))
    x = torch.randn(8, 4, 5) * 2 + 0.5
    m(x)
    assert len(seen) == 1 and seen[0][0] is m
    ref = AF.batch_moments(x, "swish", channel_dim=1)
    for got, want in zip(seen[0][1], ref, strict=True):
        torch.testing.assert_close(got, want)
    m.eval()
    m(x)  # eval uses the running statistics: no batch moments
    assert len(seen) == 1
    m.train()
    handle.remove()
    m(x)
    assert len(seen) == 1
    # a deep copy keeps its own hooks; pickling a module without hooks still works
    h2 = m.register_moments_hook(lambda module, moments: seen.append(moments))
    h2.remove()
    copy.deepcopy(m)(x)
    assert len(seen) == 1


# --- save="output": ReLU-family layers keep their output for backward, as F.relu does -------


def _ulp_apart(a, b):
    """Elementwise: a == b, or a and b are neighbouring floats."""
    up = torch.nextafter(b, torch.full_like(b, float("inf")))
    down = torch.nextafter(b, torch.full_like(b, -float("inf")))
    return (a == b) | (a == up) | (a == down)


def _train_pair(make, x, mask=None, g=None, steps=2, autocast=False):
    """Train steps of make(save="input") and make(save="output"): outputs and grads."""
    results = []
    for save in ("input", "output"):
        torch.manual_seed(0)
        module = make(save)
        with torch.no_grad():
            module.alpha.fill_(0.3)
        got = []
        for i in range(steps):
            xi = (x * (1 + 0.3 * i)).detach().requires_grad_(True)
            module.alpha.grad = None
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = module(xi.to(torch.bfloat16), mask=mask)
            else:
                out = module(xi, mask=mask)
            out.backward(g if g is not None else torch.ones_like(out))
            got.append((out.detach(), xi.grad, module.alpha.grad.clone()))
        results.append(got)
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,cd", [((7, 5), None), ((4, 3, 5, 5), None), ((4, 3, 5, 5), 1), ((3, 7, 6), -1)]
)
@pytest.mark.parametrize("name", ["relu", "lrelu"])
@pytest.mark.parametrize("center", [True, False])
def test_output_saving_matches_input_saving(name, shape, cd, dtype, center):
    torch.manual_seed(11)
    x = (torch.randn(shape, dtype=torch.float64) * 1.3 + 0.2).to(dtype)
    x.view(-1)[:4] = 0.0  # exactly at the kink
    x.view(-1)[4:8] = 1e-9  # tiny positive: rounds onto s·(0 − μ) in the output
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    c = None if cd is None else shape[cd]

    def make(save):
        return anact.NormalizedActivation(
            name, c, channel_dim=cd, center=center, save=save,
            activation_params={"negative_slope": 0.1} if name == "lrelu" else None,
        ).to(torch.float64 if dtype == torch.float64 else torch.float32)

    ref, got = _train_pair(make, x, g=g)
    for (o_in, gx_in, ga_in), (o_out, gx_out, ga_out) in zip(ref, got, strict=True):
        # forward: equal, except ties moved by one ulp away from s·(0 − μ)
        assert _ulp_apart(o_out, o_in).all()
        # ∂L/∂x: the same function of the same values, so bit-identical
        assert torch.equal(gx_out, gx_in)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(ga_out, ga_in, rtol=tol, atol=tol * (1 + ga_in.abs().max()))


@pytest.mark.parametrize("cd", [None, 1, -1])
def test_output_saving_with_mask_and_autocast(cd):
    torch.manual_seed(12)
    x = torch.randn(4, 6, 5)
    mask = torch.rand(4, 6, 1) > 0.3
    x = torch.where(mask, x, torch.full_like(x, float("nan")))  # padding may hold anything
    g = torch.randn(4, 6, 5)
    c = None if cd is None else x.shape[cd]

    def make(save):
        return anact.NReLU(c, channel_dim=cd, save=save)

    ref, got = _train_pair(make, x, mask=mask, g=g)
    for (o_in, gx_in, ga_in), (o_out, gx_out, ga_out) in zip(ref, got, strict=True):
        real = mask.expand_as(x)
        assert _ulp_apart(o_out[real], o_in[real]).all()
        torch.testing.assert_close(gx_out, gx_in, equal_nan=True, rtol=0, atol=0)
        # NaN padding propagates into ∂L/∂α either way
        torch.testing.assert_close(ga_out, ga_in, equal_nan=True)
    # bf16 autocast: the output-saving path equals the input-saving one up to bf16 rounding
    ref, got = _train_pair(make, torch.randn(4, 6, 5), g=None, autocast=True)
    for (o_in, gx_in, ga_in), (o_out, gx_out, ga_out) in zip(ref, got, strict=True):
        assert o_out.dtype == torch.bfloat16 and _ulp_apart(o_out, o_in).all()
        assert torch.equal(gx_out, gx_in)
        torch.testing.assert_close(ga_out, ga_in, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ["relu", "lrelu"])
@pytest.mark.parametrize("cd", [None, 1, -1])
@pytest.mark.parametrize("negative_scale", [False, True])
def test_output_saving_gradcheck_and_gradgradcheck(name, cd, negative_scale):
    torch.manual_seed(13)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x = x + 0.05 * torch.sign(x)  # away from the kink at 0
    x.requires_grad_(True)
    c = None if cd is None else x.shape[cd]
    shape = () if c is None else (c,)
    scale = (torch.rand(shape, dtype=torch.float64) + 0.5) * (-1 if negative_scale else 1)
    scale.requires_grad_(True)
    shift = torch.rand(shape, dtype=torch.float64)
    act = anact.get_activation(name, **({"negative_slope": 0.2} if name == "lrelu" else {}))

    def f(x, s):
        return AF.apply_normalization(x, act, s, shift, cd, save="output")

    assert torch.autograd.gradcheck(f, (x, scale))
    assert torch.autograd.gradgradcheck(f, (x, scale))
    # and the same second derivatives as the input-saving op
    def grads(save):
        xx = x.detach().clone().requires_grad_(True)
        ss = scale.detach().clone().requires_grad_(True)
        out = AF.apply_normalization(xx, act, ss, shift, cd, save=save)
        gx, gs = torch.autograd.grad(out.square().sum(), (xx, ss), create_graph=True)
        return (gx, gs, *torch.autograd.grad((gx.sum() + gs.sum()), (xx, ss)))

    for a, b in zip(grads("input"), grads("output"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_output_saving_tie_rules():
    # x = 0 is δ(x) ≤ 0: ReLU subgradient 0, LeakyReLU slope a (as the input-saving op)
    x = torch.tensor([0.0, -0.0, 1e-30, 1e-9, -1e-9, 2.0, -2.0], requires_grad=True)
    b = torch.tensor(0.4)
    for name, params, want in [
        ("relu", {}, [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]),
        ("lrelu", {"negative_slope": 0.25}, [0.25, 0.25, 1.0, 1.0, 0.25, 1.0, 0.25]),
    ]:
        act = anact.get_activation(name, **params)
        for s in (1.3, -0.7):
            scale = torch.tensor(s, requires_grad=True)
            out = AF.apply_normalization(x, act, scale, b, save="output")
            (gx,) = torch.autograd.grad(out.sum(), x)
            torch.testing.assert_close(gx, s * torch.tensor(want), rtol=0, atol=0)
            t = (-b) * s
            # 1e-30 and 1e-9 round onto t; the forward moved them one ulp away from t,
            # in the direction of sign(s): at most one ulp of forward change
            away = torch.nextafter(t, torch.tensor(float("inf") if s > 0 else -float("inf")))
            assert out[2] == away and out[3] == away
            assert out[0] == t and out[1] == t
            ref = AF.apply_normalization(x.detach(), act, scale.detach(), b, save="input")
            assert _ulp_apart(out.detach(), ref).all()


def test_output_saving_zero_scale_falls_back_to_input_on_cpu():
    # s = 0: the output is 0 and holds no trace of δ(x) − μ; on CPU the op sees it and
    # saves x, so ∂L/∂s stays exact (∂L/∂x is 0 either way)
    x = torch.randn(6, 3, requires_grad=True)
    shift = torch.tensor([0.1, 0.2, 0.3])
    for cd, scale0 in [(None, torch.tensor(0.0)), (1, torch.tensor([1.2, 0.0, -0.8]))]:
        sh = shift if cd is not None else shift[0]
        grads = []
        for save in ("input", "output"):
            s = scale0.clone().requires_grad_(True)
            out = AF.apply_normalization(x, "relu", s, sh, cd, save=save)
            grads.append(torch.autograd.grad(out.sum(), (x, s)))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # where the check is not made (accelerators, torch.compile, vmap), the documented
    # result: ∂L/∂x = 0 and ∂L/∂s = NaN where s = 0
    out = torch.zeros(6, 3)
    gx, gs = AF._grads_from_output(out, torch.ones(6, 3), torch.tensor([1.0, 0.0, 1.0]),
                                   shift, anact.get_activation("relu"), 1, True, True, False)
    assert torch.equal(gx[:, 1], torch.zeros(6)) and gs[1].isnan() and not gs[0].isnan()


def test_save_option_choices_and_errors():
    assert anact.NReLU().save == "auto" and "save" not in repr(anact.NReLU())
    assert "save='input'" in repr(anact.NReLU(save="input"))
    with pytest.raises(ValueError, match="sign_derivative"):
        anact.NSwish(save="output")
    with pytest.raises(ValueError, match="save must be"):
        anact.NReLU(save="x")
    with pytest.raises(ValueError, match="sign_derivative"):
        anact.NLReLU(negative_slope=-0.5, save="output")  # δ(x) > 0 for x < 0 too
    assert anact.get_activation("relu").sign_derivative == (1.0, 0.0)
    assert anact.get_activation("lrelu", negative_slope=0.2).sign_derivative == (1.0, 0.2)
    assert anact.get_activation("swish").sign_derivative is None


def _saved(fn):
    """{storage address: bytes} of the distinct storages autograd saves in fn(), and fn()."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


@pytest.mark.parametrize(
    "block,shape",
    [("linear", (128, 32)), ("conv-maxpool", (16, 3, 16, 16)), ("linear-lrelu", (128, 32))],
)
@pytest.mark.parametrize("per_channel", [False, True])
def test_block_saves_no_more_than_plain_relu(block, shape, per_channel):
    torch.manual_seed(14)
    x = torch.randn(shape, requires_grad=True)
    width = 8 if block == "conv-maxpool" else 64
    c, cd = (width, 1) if per_channel else (None, None)

    def make(act):
        if block == "conv-maxpool":
            return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), act,
                                       torch.nn.MaxPool2d(2))
        return torch.nn.Sequential(torch.nn.Linear(32, 64), act, torch.nn.Linear(64, 16))

    lrelu = block == "linear-lrelu"
    plain = make(torch.nn.LeakyReLU(0.1) if lrelu else torch.nn.ReLU())
    # auto keeps what the plain module keeps: NReLU its output, NLReLU its input; NLReLU
    # with save="output" keeps less than nn.LeakyReLU
    norm = make(anact.NLReLU(c, negative_slope=0.1, channel_dim=cd, save="output") if lrelu
                else anact.NReLU(c, channel_dim=cd))
    norm.load_state_dict(plain.state_dict(), strict=False)
    plain_saved, _ = _saved(lambda: plain(x).sum())
    norm_saved, loss = _saved(lambda: norm(x).sum())
    # the same full-size storages, shared with the next layer; on top only a few scalar or
    # (C,) tensors (scale, shift, tanh α)
    small = 4 * (c or 1) + 64
    big = sorted(v for v in norm_saved.values() if v > small)
    plain_big = sorted(v for v in plain_saved.values() if v > small)
    if lrelu:  # nn.LeakyReLU saves its input, unlike nn.ReLU: the normalized one saves less
        assert len(big) < len(plain_big) and sum(big) < sum(plain_big)
    else:
        assert big == plain_big
    extra = [v for v in norm_saved.values() if v <= small]
    assert len(extra) <= 4 and sum(norm_saved.values()) <= sum(plain_saved.values()) + 4 * small
    loss.backward()
    # the input-saving op keeps the pre-activation as well: one more activation-sized storage
    norm[1].save = "input"
    in_saved, _ = _saved(lambda: norm(x).sum())
    pre = norm[0](x)
    assert sum(in_saved.values()) >= sum(norm_saved.values()) + pre.numel() * 4


def test_output_saving_inplace_change_of_output_raises():
    x = torch.randn(8, 5, requires_grad=True)
    for module in (anact.NReLU(), torch.nn.ReLU()):
        out = module(x)
        out.add_(1)  # as after a plain ReLU, autograd detects it
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    out = anact.NSwish()(x)  # saves x: changing the output is fine
    out.add_(1)
    out.sum().backward()


def test_user_activation_without_sign_derivative_saves_x():
    base = anact.get_activation("relu")
    mine = anact.Activation("my_relu", fn=base.fn, derivative=base.derivative, kinks=(0.0,))
    x = torch.randn(16, 8, requires_grad=True)
    seen = []

    def pack(t):
        seen.append(t)
        return t

    module = anact.NormalizedActivation(mine)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in seen)
    # declaring sign_derivative allows save="output"; "auto" keeps x for functions other
    # than the built-in ReLU (no plain torch op to follow)
    module = anact.NormalizedActivation(mine.__class__(**{**mine.__dict__,
                                                          "sign_derivative": (1.0, 0.0)}),
                                        save="output")
    seen.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    assert any(t.data_ptr() == out.data_ptr() for t in seen)
    assert not any(t.data_ptr() == x.data_ptr() for t in seen)


def test_output_saving_under_vmap_and_grad():
    torch.manual_seed(15)
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    scale = torch.tensor([1.3, 0.9, -0.6], dtype=torch.float64)
    shift = torch.tensor(0.2, dtype=torch.float64)

    def loss(x, s, save):
        return AF.apply_normalization(x, "relu", s, shift, save=save).square().sum()

    for save in ("input", "output"):
        grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, 0, None))
        got = grads(x, scale, save)
        if save == "input":
            want = got
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pickled_module_without_save_attribute_still_works():
    m = anact.NReLU()
    del m.__dict__["save"]
    m(torch.randn(4, 3))
    assert "save" not in repr(m)


@pytest.mark.parametrize("name", ["swish", "relu"])
def test_stock_module_trains_under_vmap_like_separate_modules(name):
    # an ensemble of K members: stacked parameters and buffers, one vmapped forward
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    mods = [anact.NormalizedActivation(name) for _ in range(3)]
    params, buffers = stack_module_state(mods)
    x = torch.randn(3, 16, 5) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    x[2] = 0.7  # a constant batch: unusable, skipped by that member only
    base = anact.NormalizedActivation(name)

    def loss(p, b, xi):
        return functional_call(base, (p, b), (xi,)).square().sum()

    grads = vmap(torch.func.grad(loss))(params, buffers, x)
    refs = [anact.NormalizedActivation(name) for _ in range(3)]
    for k, m in enumerate(refs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AF.StatisticsWarning)
            m(x[k]).square().sum().backward()
        torch.testing.assert_close(grads["alpha"][k], m.alpha.grad)
        for key in ("running_rho", "running_rho_prime", "running_mean", "num_batches_tracked",
                    "num_batches_skipped"):
            torch.testing.assert_close(buffers[key][k], getattr(m, key), msg=key)
    assert buffers["num_batches_skipped"].tolist() == [0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tie_search_finds_a_single_tie_anywhere_and_skips_clean_batches(dtype):
    # the cheap pre-check must never miss a tie: one tiny positive x in the last chunk
    n = 3 * AF._TIE_CHUNK + 17
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[x.abs() < 0.05] = 0.5  # clean: no pre-activation near the kink
    s, b = torch.tensor(1.3, dtype=dtype), torch.tensor(0.4, dtype=dtype)
    assert not AF._ties_possible(torch.relu(x), s, b)
    x[-3] = torch.finfo(dtype).tiny  # 0 < δ ≪ ulp(b): δ − b rounds to −b
    assert AF._ties_possible(torch.relu(x), s, b)
    assert AF._ties_possible(torch.relu(x), torch.tensor(0.0, dtype=dtype), b)  # s = 0
    xr = x.clone().requires_grad_(True)
    out = AF.apply_normalization(xr, "relu", s, b, save="output")
    (gx,) = torch.autograd.grad(out.sum(), xr)
    assert gx[-3] == s and out[-3] != (-b) * s  # the tie was moved, its gradient is exact
    torch.testing.assert_close(gx, torch.where(x > 0, s, torch.zeros_like(s)), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_moments_hook_sees_local_moments_before_a_reduction(backend):
    # with synchronised statistics the hook gets this process's moments, then the
    # reduction runs and the layer normalizes with the reduced ones
    other = torch.randn(64) * 3 + 1  # "another rank's" batch

    class Reduced(anact.NormalizedActivation):
        def _reduce_moments(self):
            def reduce(local):
                both = AF.batch_moments(torch.cat([self.last_x, other]), self.activation)
                return both

            return reduce

    m = Reduced("swish")
    seen = []
    m.register_moments_hook(lambda module, moments: seen.append(moments))
    x = torch.randn(64)
    m.last_x = x
    with anact.kernels.backend(backend):
        m(x)
    torch.testing.assert_close(seen[0].var_x, AF.batch_moments(x, "swish").var_x)
    rho, rho_prime, mu, _ = AF.moments_to_stats(
        AF.batch_moments(torch.cat([x, other]), "swish"))
    torch.testing.assert_close(m.running_rho, rho)  # first batch: running = reduced batch


def test_lambda_factor_on_floats_matches_the_tensor_version():
    # the monitor's per-step host code calls it with floats: same values, inf and NaN
    vals = [0.0, -0.0, 1e-300, 1e-7, 0.3, 1.0, 2.5, 1e300, math.inf, -math.inf, -1.0, math.nan]
    for r in vals:
        for rp in vals:
            for eps in (None, 1e-5):
                want = AF.lambda_factor(torch.tensor(r, dtype=torch.float64),
                                        torch.tensor(rp, dtype=torch.float64), eps).item()
                got = AF.lambda_factor(r, rp, eps)
                assert isinstance(got, float)
                assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(
                    want, rel=1e-15), (r, rp, eps)


def test_auto_saves_what_the_plain_module_saves():
    # code written for nn.ReLU never changes its output in place (nn.ReLU saves it); code
    # written for nn.LeakyReLU may, so NLReLU keeps its input by default
    x = torch.randn(8, 5, requires_grad=True)
    for module, plain, saves_output in [(anact.NReLU(), torch.nn.ReLU(), True),
                                        (anact.NLReLU(), torch.nn.LeakyReLU(), False)]:
        for m in (module, plain):
            out = m(x)
            out.add_(1.0)  # in place after the activation
            if saves_output:
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    out.sum().backward()
            else:
                out.sum().backward()  # works for nn.LeakyReLU, so for NLReLU too




@pytest.mark.parametrize("backend", ["eager", "native", "fused"])
@pytest.mark.parametrize("cls,unusable", [
    (anact.NTanh, lambda x: x.fill_(0.5)),  # constant
    (anact.NReLU, lambda x: x.abs_().neg_().sub_(0.1)),  # dead: all negative
])  # fmt: skip
def test_per_channel_first_usable_batch_initialises_each_channel(backend, cls, unusable):
    """A channel that cannot use the first batch is initialised by its own first usable
    batch (eq. 16–18 per channel): it then follows the float64 reference fed only its
    usable batches, even when its ρ lies outside the bounds around the initial ρ = 1."""
    import anact.kernels as K

    torch.manual_seed(3)
    batches = [torch.randn(64, 2) * 4 for _ in range(6)]
    unusable(batches[0][:, 1])
    module = cls(2, channel_dim=1)
    refs = [Reference(NAMED[cls]), Reference(NAMED[cls])]
    with K.backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", AF.StatisticsWarning)
        for i, x in enumerate(batches):
            module(x)
            refs[0].update(x[:, 0].double())
            if i > 0:
                refs[1].update(x[:, 1].double())
    for c, ref in enumerate(refs):
        close(module.running_rho[c], ref.rho)
        close(module.running_rho_prime[c], ref.rho_p)
        close(module.running_mean[c], ref.mu)
    assert module.channel_batches_tracked.tolist() == [6, 5]
    assert int(module.num_batches_tracked) == 6 and int(module.num_batches_skipped) == 0


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_per_channel_cumulative_average_counts_each_channel_s_batches(backend):
    """momentum=None: each channel's running μ is the plain mean of its usable batches'
    μ; a batch no channel can use is skipped and not counted."""
    import anact.kernels as K

    torch.manual_seed(4)
    batches = [torch.randn(32, 3) for _ in range(5)]
    batches[1][:, 2] = -1.0  # channel 2 dead in batch 1
    batches[3][:] = -1.0  # no channel usable in batch 3
    module = anact.NReLU(3, channel_dim=1, momentum=None)
    with K.backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", AF.StatisticsWarning)
        for x in batches:
            module(x)
    for c in range(3):
        used = [x[:, c].double() for i, x in enumerate(batches)
                if i != 3 and not (i == 1 and c == 2)]  # fmt: skip
        close(module.running_mean[c], np.mean([u.clamp(min=0).mean().item() for u in used]))
    assert module.channel_batches_tracked.tolist() == [4, 4, 3]
    assert int(module.num_batches_tracked) == 4 and int(module.num_batches_skipped) == 1


def test_per_channel_state_saved_before_the_channel_counts_loads():
    """A per-channel state dict without ``channel_batches_tracked`` (saved by an older
    anact) loads strictly: each channel is taken to have counted every tracked batch."""
    source = anact.NSwish(4, channel_dim=1)
    for _ in range(3):
        source(torch.randn(16, 4))
    state = source.state_dict()
    assert state["channel_batches_tracked"].tolist() == [3] * 4
    del state["channel_batches_tracked"]
    target = anact.NSwish(4, channel_dim=1)
    target.load_state_dict(state)
    assert target.channel_batches_tracked.tolist() == [3] * 4
    assert "channel_batches_tracked" not in anact.NSwish().state_dict()  # per tensor: one count


def test_sparse_input_and_backend_names():
    with pytest.raises(TypeError, match="dense \\(strided\\) tensor, got layout torch.sparse_coo"):
        anact.NReLU()(torch.randn(4, 4).to_sparse())
    import anact.kernels as K

    with K.backend(" Eager "):  # case-insensitive, as ANACT_BACKEND is
        assert K.get_backend() == "eager"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        K.set_backend("fast")
