"""NormalizedActivation against an independent float64 re-statement of the paper."""

import copy
import math
import warnings

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


def test_mask_errors():
    module = anact.NReLU()
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
