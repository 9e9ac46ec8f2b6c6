"""The fused fast path against the eager reference (and float64 where it matters).

Most tests run the fused kernels without compilation (backend ``"fused"``):
``"compiled"`` runs the very same Python functions through ``torch.compile``,
which is checked on a few cases marked ``compile``.
"""

import warnings

import pytest
import torch

import anact
import anact.functional as AF
import anact.kernels as K
from anact.kernels import fused

WARNINGS = (AF.StatisticsWarning, K.KernelWarning)
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (2e-2, 2e-2)}


def _run(backend, make, x, mask=None, steps=3, grad=True, g=None, seed=0):
    """Train-mode steps then one eval step; returns outputs, grads and state."""
    torch.manual_seed(seed)
    module = make()
    with torch.no_grad():
        module.alpha.fill_(0.3)
    results = []
    with K.backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            xi = (x * (1 + 0.2 * i)).detach().requires_grad_(grad)
            out = module(xi, mask=mask)
            results.append(out.detach())
            if grad:
                module.alpha.grad = None
                out.backward(g if g is not None else torch.ones_like(out))
                results += [xi.grad, module.alpha.grad]
        module.eval()
        results.append(module(x.detach(), mask=mask).detach())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["skipped"] = module.num_batches_skipped.clone() if module.track_running_stats else None
    kinds = [type(w.message) for w in caught if issubclass(type(w.message), WARNINGS)]
    return results, state, kinds


def _assert_same(a, b, dtype):
    (ra, sa, wa), (rb, sb, wb) = a, b
    assert wa == wb
    for x, y in zip(ra, rb, strict=True):
        # α and its gradient are float32 whatever the input's dtype
        rtol, atol = TOL[dtype if dtype == torch.bfloat16 else x.dtype]
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k] is None:
            assert sb[k] is None
            continue
        tol = (1e-10, 1e-10) if sa[k].dtype == torch.float64 else (2e-5, 2e-5)
        torch.testing.assert_close(sa[k], sb[k], rtol=tol[0], atol=tol[1], equal_nan=True)


SHAPES = [
    ((6, 5), None),
    ((4, 3, 5, 5), None),
    ((4, 3, 5, 5), 1),
    ((3, 7, 6), -1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,cd", SHAPES)
@pytest.mark.parametrize("name", ["swish", "relu", "gelu", "lrelu"])
def test_fused_matches_eager(name, shape, cd, dtype):
    torch.manual_seed(1)
    x = (torch.randn(shape, dtype=torch.float64) * 1.3 + 0.4).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    c = None if cd is None else shape[cd]

    def make():
        return anact.NormalizedActivation(name, c, channel_dim=cd, dtype=None)

    _assert_same(_run("eager", make, x, g=g), _run("fused", make, x, g=g), dtype)


@pytest.mark.parametrize("shape,cd", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_with_mask_matches_eager(shape, cd, dtype):
    torch.manual_seed(2)
    x = torch.randn(shape).to(dtype)
    mask = torch.rand(shape[:-1] + (1,)) > 0.4
    x = torch.where(mask, x, torch.full_like(x, float("nan")))  # padding may hold anything
    c = None if cd is None else shape[cd]

    def make():
        return anact.NSwish(c, channel_dim=cd)

    g = torch.randn(shape).to(dtype)
    _assert_same(_run("eager", make, x, mask, g=g), _run("fused", make, x, mask, g=g), dtype)


@pytest.mark.parametrize(
    "kwargs",
    [dict(center=False), dict(momentum=None), dict(bounds=None), dict(beta=0.0),
     dict(track_running_stats=False), dict(eps=0.5)],
    ids=["no-center", "cumulative", "no-bounds", "beta0", "no-running", "eps"],
)
def test_fused_options_match_eager(kwargs):
    torch.manual_seed(3)
    x = torch.randn(8, 4, 3) * 2 - 0.5

    def make():
        return anact.NSwish(**kwargs)

    _assert_same(_run("eager", make, x, steps=4), _run("fused", make, x, steps=4), torch.float32)


@pytest.mark.parametrize(
    "make_x",
    [
        lambda: (torch.full((16,), 0.37), None),
        lambda: (torch.full((4, 3, 2), -1234.5), None),
        lambda: (torch.randn(4, 5), torch.zeros(4, 1, dtype=torch.bool)),
        lambda: (torch.tensor([1.0, float("nan"), 2.0, 3.0]), None),
        lambda: (torch.tensor([float("nan"), 1.0, 2.0, 3.0]), None),
        lambda: (torch.tensor([1.0, float("inf"), 2.0, 3.0]), None),
        lambda: (torch.tensor([float("-inf"), 1.0, 2.0, 3.0]), None),
        lambda: (-torch.rand(64) - 0.1, None),
        lambda: (torch.randn(1), None),
    ],
    ids=["constant", "constant-3d", "all-masked", "nan", "nan-first", "inf", "inf-first",
         "dead", "one-element"],
)
@pytest.mark.parametrize("track", [True, False])
def test_guards_behave_identically(make_x, track):
    x, mask = make_x()

    def make():
        return anact.NReLU(track_running_stats=track)

    def run(backend):
        torch.manual_seed(0)
        module = make()
        module(torch.randn(128))  # a valid first batch
        with K.backend(backend), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = module(x, mask=mask)
        return out, dict(module.state_dict()), [type(w.message) for w in caught
                                                if issubclass(type(w.message), WARNINGS)]

    (oe, se, we), (of, sf, wf) = run("eager"), run("fused")
    assert we == wf
    if track:
        assert AF.StatisticsWarning in we
    torch.testing.assert_close(oe, of, equal_nan=True)
    for k in se:
        assert torch.equal(se[k], sf[k]), k


def test_fused_moments_survive_large_offset():
    # |mean| ≫ std: naive float32 E[x²] − E[x]² would lose every digit
    torch.manual_seed(4)
    x = 1000.0 + 0.01 * torch.randn(64, 8, 33)
    for cd in (None, 1):
        want = AF.batch_moments(x.double(), "swish", channel_dim=cd)
        got = fused.fused_moments(x, anact.get_activation("swish"), cd)
        for name, a, b in zip(AF.BatchMoments._fields, got, want, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-9, msg=name)


def test_reduce_moments_hook_is_applied():
    torch.manual_seed(5)
    x = torch.randn(16, 6)
    other = AF.batch_moments(torch.randn(16, 6) * 3, "swish")

    class Synced(anact.NormalizedActivation):
        def _reduce_moments(self):
            def reduce(m):
                pairs = zip(m, other, strict=True)
                stacked = AF.BatchMoments(*(torch.stack([a, b]) for a, b in pairs))
                return AF.merge_moments(stacked)

            return reduce

    def make():
        return Synced("swish")

    _assert_same(_run("eager", make, x), _run("fused", make, x), torch.float32)


def test_double_backward_matches_eager():
    torch.manual_seed(6)
    x0 = torch.randn(5, 7, dtype=torch.float64)

    def grads(backend):
        module = anact.NSwish(dtype=torch.float64)
        x = x0.clone().requires_grad_(True)
        with K.backend(backend):
            out = module(x)
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), x)
        return gx.detach(), ggx

    for a, b in zip(grads("eager"), grads("fused"), strict=True):
        torch.testing.assert_close(a, b)


def _saved_storages(fn):
    """{storage address: bytes} of what autograd saves while running fn(), and its result."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with K.backend("fused"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def test_saved_for_backward_is_x_only():
    x = torch.randn(32, 16, requires_grad=True)
    seen, _ = _saved_storages(lambda: anact.NSwish()(x))
    assert x.untyped_storage().data_ptr() in seen
    assert sum(seen.values()) <= x.numel() * 4 + 64


def test_vmap_falls_back_to_eager():
    x = torch.randn(3, 10, 4)
    module = anact.NSwish()
    module(torch.randn(10, 4))
    module.eval()  # the reference checks batch statistics on the host, which vmap cannot
    with K.backend("eager"):
        want = torch.stack([module(xi) for xi in x])
    with K.backend("fused"):
        got = torch.func.vmap(module)(x)
    torch.testing.assert_close(got, want)


def test_backend_selection():
    assert K.get_backend() in K.BACKENDS
    with pytest.raises(ValueError, match="unknown backend"):
        K.set_backend("triton-please")
    with K.backend("fused"):
        assert K.get_backend() == "fused"
    K.set_backend("auto")
    assert K.get_backend() == "auto"
    # auto leaves small inputs to eager: no compilation happens here
    K.clear_cache()
    anact.NSwish()(torch.randn(4, 4))
    assert not K._cache


# --- torch.compile: a few small cases (each new kernel compiles in seconds) -----------------


@pytest.mark.compile
@pytest.mark.parametrize(
    "name,shape,cd,dtype,masked",
    [("swish", (8, 4, 6, 6), None, torch.float32, False),
     ("relu", (8, 4, 6, 6), 1, torch.float64, True),
     ("swish", (4, 5, 8), -1, torch.bfloat16, False)],
    ids=["swish-tensor-f32", "relu-channel-f64-mask", "swish-lastdim-bf16"],
)
def test_compiled_matches_eager(name, shape, cd, dtype, masked):
    torch.manual_seed(7)
    x = torch.randn(shape, dtype=dtype)
    g = torch.randn(shape, dtype=dtype)
    mask = (torch.rand(shape[:-1] + (1,)) > 0.3) if masked else None
    c = None if cd is None else shape[cd]

    def make():
        return anact.NormalizedActivation(name, c, channel_dim=cd)

    with warnings.catch_warnings():
        warnings.simplefilter("error", K.KernelWarning)  # compilation must not fail
        got = _run("compiled", make, x, mask, steps=2, g=g)
    _assert_same(_run("eager", make, x, mask, steps=2, g=g), got, dtype)
    assert K._cache  # it did compile


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_cuda_matches_eager():
    torch.manual_seed(8)
    x = torch.randn(16, 8, 12, 12, device="cuda")
    g = torch.randn_like(x)

    def make():
        return anact.NSwish(8, channel_dim=1, device="cuda")

    _assert_same(_run("eager", make, x, g=g), _run("compiled", make, x, g=g), torch.float32)


# --- save="output" (ReLU family): the fused/compiled backward takes the output -------------


def _grads_by_save(backend, name, x, g, cd, save, params=None):
    torch.manual_seed(0)
    c = None if cd is None else x.shape[cd]
    module = anact.NormalizedActivation(name, c, channel_dim=cd, save=save,
                                        activation_params=params)
    with torch.no_grad():
        module.alpha.fill_(0.3)
    xi = x.clone().requires_grad_(True)
    with K.backend(backend):
        out = module(xi)
        out.backward(g)
    return out.detach(), xi.grad, module.alpha.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,cd", SHAPES)
@pytest.mark.parametrize("name,params", [("relu", None), ("lrelu", {"negative_slope": 0.2})])
def test_fused_output_saving_matches_input_saving(name, params, shape, cd, dtype):
    torch.manual_seed(9)
    x = (torch.randn(shape, dtype=torch.float64) * 0.5 + 0.1).to(dtype)
    x.view(-1)[:3] = 0.0
    x.view(-1)[3:6] = 1e-9  # ties: s·(x − μ) rounds onto s·(0 − μ)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    o_in, gx_in, ga_in = _grads_by_save("fused", name, x, g, cd, "input", params)
    o_out, gx_out, ga_out = _grads_by_save("fused", name, x, g, cd, "output", params)
    o_eager, gx_eager, ga_eager = _grads_by_save("eager", name, x, g, cd, "output", params)
    assert torch.equal(gx_out, gx_in)
    moved = o_out != o_in  # only ties, by one ulp
    assert moved.sum() <= 6
    # α and its gradient are float32 whatever x's dtype
    rtol, atol = TOL[dtype if dtype == torch.bfloat16 else ga_in.dtype]
    torch.testing.assert_close(ga_out, ga_in, rtol=rtol, atol=atol * (1 + float(ga_in.abs().max())))
    # the eager reference (its statistics differ from the fused sums by rounding)
    for a, b in ((o_out, o_eager), (gx_out, gx_eager), (ga_out, ga_eager)):
        rtol, atol = TOL[dtype if dtype == torch.bfloat16 else a.dtype]
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * (1 + float(b.abs().max())))


def test_fused_output_saving_double_backward_matches_eager():
    torch.manual_seed(10)
    x0 = torch.randn(5, 7, dtype=torch.float64)

    def grads(backend, save):
        module = anact.NReLU(dtype=torch.float64, save=save)
        x = x0.clone().requires_grad_(True)
        with K.backend(backend):
            out = module(x)
        gx, ga = torch.autograd.grad(out.square().sum(), (x, module.alpha), create_graph=True)
        return gx.detach(), ga.detach(), *torch.autograd.grad(gx.sum() + ga, (x, module.alpha))

    want = grads("eager", "input")
    for backend in ("eager", "fused"):
        for a, b in zip(want, grads(backend, "output"), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_saved_for_backward_is_the_output():
    x = torch.randn(32, 16, requires_grad=True)
    seen, out = _saved_storages(lambda: anact.NReLU()(x))
    assert out.untyped_storage().data_ptr() in seen
    assert x.untyped_storage().data_ptr() not in seen
    assert sum(seen.values()) <= x.numel() * 4 + 64


@pytest.mark.compile
@pytest.mark.parametrize(
    "name,shape,cd,dtype",
    [("relu", (8, 4, 6, 6), None, torch.float32), ("lrelu", (4, 5, 8), -1, torch.bfloat16)],
    ids=["relu-tensor-f32", "lrelu-lastdim-bf16"],
)
def test_compiled_output_saving_matches_input_saving(name, shape, cd, dtype):
    torch.manual_seed(11)
    x = (torch.randn(shape) * 0.05).to(dtype)  # many ties in bf16
    x.view(-1)[:3] = 0.0
    g = torch.randn(shape).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", K.KernelWarning)  # compilation must not fail
        o_in, gx_in, ga_in = _grads_by_save("compiled", name, x, g, cd, "input")
        o_out, gx_out, ga_out = _grads_by_save("compiled", name, x, g, cd, "output")
    # inductor keeps bf16 intermediates in float32 (and may multiply by the unrounded
    # float32 scale on the input-saving path): equal up to one bf16 rounding, and every
    # element on the right side of the kink (a wrong side is a factor 0.01 or 0)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(gx_out, gx_in, rtol=rtol, atol=0)
    if dtype == torch.float32:
        assert torch.equal(gx_out, gx_in)
    torch.testing.assert_close(ga_out, ga_in, rtol=rtol, atol=atol * (1 + float(ga_in.abs().max())))
    assert (o_out != o_in).sum() <= (x > 0).sum()
    assert any(k[0] == "backward_from_output" for k in K._cache)


@pytest.mark.compile
def test_torch_compile_fullgraph_model_with_nrelu():
    torch.manual_seed(12)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                   anact.NReLU(4, channel_dim=1), torch.nn.MaxPool2d(2),
                                   torch.nn.Flatten(), torch.nn.Linear(64, 8), anact.NLReLU(),
                                   torch.nn.Linear(8, 2))

    x = torch.randn(6, 3, 8, 8)
    eager, compiled = make(), make()
    compiled_fn = torch.compile(compiled, fullgraph=True)
    for _ in range(2):
        want = eager(x)
        got = compiled_fn(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want.square().sum().backward()
        got.square().sum().backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)
