"""The native fast path (the C passes of anact._nactcpu) against the eager reference,
against float64, and where it must step aside.

Most inputs here have fewer than ``native.PARALLEL_NUMEL`` elements, where the native
path runs whatever torch's thread count; the thread rule has its own test.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fused import _assert_same, _run

import anact
import anact.functional as AF
import anact.kernels as K
from anact.activations import Activation, get_activation, resolve_activation
from anact.kernels import native

pytestmark = pytest.mark.skipif(
    not native.available() and os.environ.get("ANACT_ALLOW_NO_C") == "1",
    reason="anact._nactcpu not built and ANACT_ALLOW_NO_C=1",
)

ACTS = [("relu", None), ("lrelu", {"negative_slope": 0.01}), ("lrelu", {"negative_slope": 0.2}),
        ("swish", None)]  # fmt: skip
# (shape, channel_dim): per tensor; per channel by the channel loops (at least ROW_INNER
# = 128 contiguous elements per channel row in _nactcpu.c) and by the row loops (fewer:
# channels last, or short rows)
SHAPES = [((6, 5), None), ((4, 3, 5, 5), None), ((2, 3, 12, 12), 1), ((3, 130), 0),
          ((2, 5, 200), 1),
          ((4, 3, 5, 5), 1), ((4, 3, 4, 4), 1), ((3, 20), 0), ((2, 5, 40), 1),
          ((8, 5), 1), ((3, 7, 33), -1), ((4, 6, 3, 3), 1), ((300, 3), -1)]  # fmt: skip


def test_the_c_extension_is_built():
    assert native.available(), (
        "anact._nactcpu was not built at install: install a C compiler (apt-get install gcc) "
        "and reinstall the package, or set ANACT_ALLOW_NO_C=1 to test without it"
    )


def _module(name, params, shape, cd, **kw):
    c = None if cd is None else shape[cd]
    return lambda: anact.NormalizedActivation(name, c, channel_dim=cd, activation_params=params,
                                              **kw)  # fmt: skip


def _uses_native(module, x, **kw):
    with K.backend("native"):
        out = module(x, **kw)
    return type(out.grad_fn).__name__.startswith("NativeNormalizedActivationFn")


@pytest.mark.parametrize("shape,cd", SHAPES)
@pytest.mark.parametrize("name,params", ACTS)
def test_native_matches_eager(name, params, shape, cd):
    torch.manual_seed(1)
    x = torch.randn(shape) * 1.5 + 0.2
    make = _module(name, params, shape, cd)
    assert _uses_native(make(), x.clone().requires_grad_())
    g = torch.randn(shape)
    _assert_same(_run("native", make, x, g=g), _run("eager", make, x, g=g), torch.float32)


def _in_memory_order(shape, order, seed=0):
    """A random tensor of ``shape`` whose dimensions lie in memory in ``order``."""
    torch.manual_seed(seed)
    phys = torch.randn([shape[d] for d in order]) * 1.5 + 0.2
    return phys.permute(tuple(np.argsort(order)))


# (shape, memory order, channel_dim): channels_last (2d, 3d), a transposed (T, N, C),
# the channel between other dimensions in memory (channel loops and row loops), size-1
# dimensions
LAYOUTS = [((4, 6, 5, 5), (0, 2, 3, 1), None), ((4, 6, 5, 5), (0, 2, 3, 1), 1),
           ((2, 6, 3, 4, 4), (0, 2, 3, 4, 1), 1), ((5, 7, 6), (1, 0, 2), 2),
           ((5, 7, 6), (1, 0, 2), None), ((3, 4, 130), (1, 0, 2), 0),
           ((3, 4, 20), (2, 0, 1), 1), ((1, 6, 5, 5), (0, 2, 3, 1), 1),
           ((4, 1, 5, 5), (0, 2, 3, 1), 1), ((4, 6, 5, 5), (3, 2, 1, 0), -1)]  # fmt: skip


@pytest.mark.parametrize("shape,order,cd", LAYOUTS)
@pytest.mark.parametrize("name,params", [("relu", None), ("lrelu", {"negative_slope": 0.2}),
                                         ("swish", None)])  # fmt: skip
def test_native_dense_layouts_match_eager(name, params, shape, order, cd):
    """Any dense layout runs natively, in its memory order; output and ∂L/∂x keep x's
    layout; the numbers are the eager path's on the contiguous copy."""
    x = _in_memory_order(shape, order)
    g = _in_memory_order(shape, order, seed=1)
    assert native._memory_order(x) in (order, ())  # () only where x is also contiguous
    make = _module(name, params, shape, cd)
    xg = x.clone(memory_format=torch.preserve_format).requires_grad_()
    assert _uses_native(make(), xg)
    with K.backend("native"):
        out = make()(xg)
    out.backward(g)
    for t in (out, xg.grad):  # the same strides (those of size-1 dimensions aside)
        assert [st for st, n in zip(t.stride(), shape, strict=True) if n > 1] == [
            st for st, n in zip(x.stride(), shape, strict=True) if n > 1]
    _assert_same(_run("native", make, x, g=g), _run("eager", make, x.contiguous(),
                                                    g=g.contiguous()), torch.float32)  # fmt: skip


@pytest.mark.parametrize("save", ["input", "output"])
@pytest.mark.parametrize("cd", [None, 1])
def test_native_gradient_in_another_layout(save, cd):
    """A channels_last input whose gradient arrives contiguous (or the other way round):
    the gradient is copied into x's layout; the numbers do not change."""
    shape = (4, 6, 5, 5)
    x = _in_memory_order(shape, (0, 2, 3, 1))
    g = torch.randn(shape)
    make = _module("lrelu", {"negative_slope": 0.1}, shape, cd, save=save)
    for xs, gs in ((x, g), (x.contiguous(), g.to(memory_format=torch.channels_last))):
        _assert_same(_run("native", make, xs, g=gs), _run("eager", make, x.contiguous(), g=g),
                     torch.float32)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [{"center": False}, {"momentum": None}, {"bounds": None}, {"track_running_stats": False},
     {"beta": 0.0}, {"save": "input"}, {"save": "output"}],
)  # fmt: skip
@pytest.mark.parametrize("cd", [None, 1, -1])
def test_native_options_match_eager(kwargs, cd):
    torch.manual_seed(2)
    shape = (4, 3, 6, 6)
    x = torch.randn(shape) - 0.3
    make = _module("relu", None, shape, cd, **kwargs)
    _assert_same(_run("native", make, x, steps=4), _run("eager", make, x, steps=4), torch.float32)


@pytest.mark.parametrize("name,params", ACTS)
def test_native_against_float64(name, params):
    check_against_float64("native", name, params, (8, 4, 5, 5))


def step_by_backend(make_module, x, g, backends, alpha=None):
    """One forward and backward of a fresh ``make_module()`` per backend (α filled with
    ``alpha`` when given): ``{backend: (out, ∂L/∂x, ∂L/∂α, grad_fn's name)}``."""
    results = {}
    for backend in backends:
        module = make_module()
        if alpha is not None:
            with torch.no_grad():
                module.alpha.fill_(alpha)
        xi = x.detach().clone().requires_grad_()
        with K.backend(backend):
            out = module(xi)
        out.backward(g)
        results[backend] = (out.detach(), xi.grad, module.alpha.grad, type(out.grad_fn).__name__)
    return results


def check_against_float64(backend, name, params, shape):
    """Output, ∂L/∂x, ∂L/∂α and the running statistics of ``backend`` in float32 against
    the eager op run on the input in float64 (also run by tests/kernels/test_triton.py)."""
    torch.manual_seed(3)
    x64 = torch.randn(shape, dtype=torch.float64) * 2
    g64 = torch.randn(shape, dtype=torch.float64)
    got, ref = [], []
    for dtype, name_, sink in ((torch.float32, backend, got), (torch.float64, "eager", ref)):
        module = anact.NormalizedActivation(name, activation_params=params).to(dtype)
        with torch.no_grad():
            module.alpha.fill_(0.4)
        x = x64.to(dtype).requires_grad_()
        with K.backend(name_):
            out = module(x)
        assert type(out.grad_fn).__name__.lower().startswith(name_.replace("eager", "_"))
        out.backward(g64.to(dtype))
        sink += [out.detach(), x.grad, module.alpha.grad, module.running_rho.detach(),
                 module.running_rho_prime.detach(), module.running_mean.detach()]  # fmt: skip
    for a, b in zip(got, ref, strict=True):
        scale = 1 + float(b.abs().max())
        np.testing.assert_allclose(a.double().numpy(), b.numpy(), rtol=2e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("name,params", [("relu", None), ("lrelu", {"negative_slope": 0.2})])
@pytest.mark.parametrize("cd", [None, 1, -1])
def test_native_output_saving_and_ties_match_eager(name, params, cd):
    """ReLU/LeakyReLU with output saving and ties (δ(x) > 0 rounding onto s·(0 − μ)):
    outputs and gradients agree with eager up to the statistics' rounding, and the same
    elements count as δ(x) > 0 (bit-for-bit equality given s and μ is tested below)."""
    torch.manual_seed(4)
    shape = (4, 3, 4, 4)
    x = torch.randn(shape) * 0.5 + 0.1
    x.view(-1)[:3] = 0.0
    x.view(-1)[3:6] = 1e-9
    g = torch.randn(shape)
    c = None if cd is None else shape[cd]
    results = step_by_backend(
        lambda: anact.NormalizedActivation(name, c, channel_dim=cd, save="output",
                                           activation_params=params, track_running_stats=False),
        x, g, ("native", "eager"), alpha=0.3,
    )  # fmt: skip
    (o_n, gx_n, ga_n, fn_n), (o_e, gx_e, ga_e, fn_e) = results["native"], results["eager"]
    assert fn_n.startswith("NativeNormalized") and not fn_e.startswith("NativeNormalized")
    # the scale comes from sums in a different order: compare the element formulas given it
    s = (o_e / torch.where(o_n == 0, torch.ones_like(o_n), o_n)).nanmedian()
    assert abs(float(s) - 1) < 1e-5
    torch.testing.assert_close(o_n, o_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_n, gx_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga_n, ga_e, rtol=1e-5, atol=1e-5)
    assert torch.equal(gx_n == 0, gx_e == 0)  # the same elements counted as δ(x) > 0


@pytest.mark.parametrize("inner", [40, 130])  # row loops, channel loops
def test_native_elementwise_formulas_are_the_eager_ones_bit_for_bit(inner):
    """Given s and μ, the affine pass and the backward are eager's float32 arithmetic."""
    torch.manual_seed(5)
    x = torch.randn(3, 2, inner)
    g = torch.randn(3, 2, inner)
    scale = torch.tensor([1.7, -0.4])
    shift = torch.tensor([0.25, -0.5])
    act = get_activation("lrelu", negative_slope=0.2)
    kind = native.native_kind(act)
    for save in (False, True):
        xi = x.clone().requires_grad_()
        sc = scale.clone().requires_grad_()
        out = torch.empty_like(x)
        got = AF.apply_function(native.NativeNormalizedActivationFn, xi, sc, shift, act, 1, kind,
                                (1 * 3, 2, inner), (), (out,), False, save)  # fmt: skip
        got.backward(g)
        xe = x.clone().requires_grad_()
        se = scale.clone().requires_grad_()
        ref = AF.apply_function(AF._NormalizedActivationFn, xe, se, shift, act, 1, save)
        ref.backward(g)
        assert torch.equal(got, ref)
        assert torch.equal(xi.grad, xe.grad)
        torch.testing.assert_close(sc.grad, se.grad, rtol=1e-6, atol=1e-5)


def test_swish_of_the_c_exp_against_float64():
    """δ, δ' of Swish as the C passes compute them (polynomial exp), against float64,
    over the whole float range: overflow, underflow, ±inf, NaN, tiny and huge inputs."""
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 87.3, -87.3, 88.7, -88.7, 89.0, -89.0,
               100.0, -100.0, 1e30, -1e30, math.inf, -math.inf, math.nan]  # fmt: skip
    x = torch.cat([torch.tensor(special), torch.linspace(-120, 120, 20001),
                   torch.randn(20000) * 4]).float()  # fmt: skip
    out, sums = torch.empty_like(x), torch.empty(1, 7, dtype=torch.float64)
    native._nactcpu.stats(x.data_ptr(), out.data_ptr(), 1, 1, x.numel(), native.KIND_SWISH, 0, 0,
                          sums.data_ptr())  # fmt: skip
    x64 = x.double().numpy()
    with np.errstate(all="ignore"):
        sig = 1 / (1 + np.exp(-x64))
        ref = x64 * sig
    np.testing.assert_array_equal(np.isnan(out.numpy()), np.isnan(ref))
    finite = np.isfinite(ref)
    err = np.abs(out.double().numpy()[finite] - ref[finite])
    # within 4 ulp; below x = −87.3 e^x is subnormal in float32 (|δ| < 1e-36 there)
    assert np.all(err <= 4 * np.spacing(np.abs(ref[finite]).astype(np.float32)) + 1e-36)
    # below x = −104 e^x is 0 in float32 and δ(x) = −0, as torch's F.silu gives
    far = (x < -104) & torch.isfinite(x)
    assert torch.equal(out[far], torch.zeros_like(out[far]))
    assert torch.signbit(out[far]).all() and torch.equal(out[far], F.silu(x[far]))
    assert np.array_equal(out.numpy()[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)])
    # δ' in the backward pass: g = 1, s = 1, b = 0 gives ∂L/∂x = δ'(x)
    ones, gx = torch.ones_like(x), torch.empty_like(x)
    one, zero = torch.ones(1), torch.zeros(1)
    gsum = torch.empty(1, dtype=torch.float64)
    native._nactcpu.backward(x.data_ptr(), ones.data_ptr(), gx.data_ptr(), 1, 1, x.numel(),
                             native.KIND_SWISH, 0, 0, False, one.data_ptr(), zero.data_ptr(),
                             gsum.data_ptr())  # fmt: skip
    with np.errstate(all="ignore"):
        dref = sig * (1 + x64 * (1 - sig))
    ok = np.isfinite(dref)
    np.testing.assert_allclose(gx.double().numpy()[ok], dref[ok], rtol=1e-6, atol=1e-7)
    assert np.all(np.isnan(gx.numpy()[np.isnan(x64)]))


@pytest.mark.parametrize("kind,p1", [(native.KIND_SIGN, 0.0), (native.KIND_SIGN, 0.2),
                                     (native.KIND_SWISH, 0.0)])  # fmt: skip
@pytest.mark.parametrize(
    "layout",
    [(1, 1, 5000), (3, 4, 700), (2, 3, 129),  # channel loops
     (2, 3, 17), (9, 5, 3), (2000, 6, 1), (70, 300, 1), (40, 21, 15),  # row loops (flushed,
     (40, 5000, 1), (3, 700, 7)],  # wide rows, rows wider than a tile: ROW_TILE = 2048)
)  # fmt: skip
def test_c_sums_against_float64(kind, p1, layout):
    """Per-channel sums of the stats pass (shifted by each channel's first element) and
    the backward's Σ g·(δ(x) − b) and ∂L/∂x, against float64, with a mean far from zero
    and a different shift per channel."""
    outer, c, inner = layout
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(3.0, 1.5, (outer, c, inner)).astype(np.float32))
    g = torch.from_numpy(rng.normal(0, 1, (outer, c, inner)).astype(np.float32))
    y, sums = torch.empty_like(x), torch.empty(c, 7, dtype=torch.float64)
    native._nactcpu.stats(x.data_ptr(), y.data_ptr(), outer, c, inner, kind, 1.0, p1,
                          sums.data_ptr())  # fmt: skip
    x64 = x.double().numpy()
    if kind == native.KIND_SWISH:
        sig = 1 / (1 + np.exp(-x64))
        y64, d64 = x64 * sig, sig * (1 + x64 * (1 - sig))
    else:
        y64, d64 = np.where(x64 > 0, x64, p1 * x64), np.where(x64 > 0, 1.0, p1)
    for ch in range(c):
        xc, yc, dc = x64[:, ch], y64[:, ch], d64[:, ch]
        kx, ky = xc.reshape(-1)[0], yc.reshape(-1)[0]
        expect = [(xc - kx).sum(), ((xc - kx) ** 2).sum(), (yc - ky).sum(), ((yc - ky) ** 2).sum(),
                  (dc**2).sum()]  # fmt: skip
        np.testing.assert_allclose(sums[ch, :5].numpy(), expect, rtol=2e-5, atol=1e-3)
        assert sums[ch, 5] == np.float32(kx)
    b = torch.tensor(np.linspace(-0.5, 0.5, c), dtype=torch.float32)
    s = torch.tensor(np.linspace(1.3, 0.7, c), dtype=torch.float32)
    gx, gsum = torch.empty_like(x), torch.empty(c, dtype=torch.float64)
    native._nactcpu.backward(
        x.data_ptr(),
        g.data_ptr(),
        gx.data_ptr(),
        outer,
        c,
        inner,
        kind,
        1.0,
        p1,
        False,
        s.data_ptr(),
        b.data_ptr(),
        gsum.data_ptr(),
    )
    g64 = g.double().numpy()
    expect = ((y64 - b.double().numpy()[None, :, None]) * g64).sum(axis=(0, 2))
    np.testing.assert_allclose(gsum.numpy(), expect, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(gx.double().numpy(), g64 * d64 * s.double().numpy()[None, :, None],
                               rtol=1e-5, atol=1e-6)


def test_c_arguments_are_checked():
    x = torch.zeros(4)
    s = torch.ones(1)
    sums = torch.empty(1, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be >= 1"):
        native._nactcpu.stats(x.data_ptr(), x.data_ptr(), 1, 0, 4, 0, 1.0, 0.0, sums.data_ptr())
    with pytest.raises(ValueError, match="unknown kind"):
        native._nactcpu.stats(x.data_ptr(), x.data_ptr(), 1, 1, 4, 7, 1.0, 0.0, sums.data_ptr())
    with pytest.raises(ValueError, match="threads must be >= 1"):
        native._nactcpu.stats(x.data_ptr(), x.data_ptr(), 1, 1, 4, 0, 1.0, 0.0, sums.data_ptr(), 0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        native._nactcpu.plan(1, 1, 4, -2)
    with pytest.raises(ValueError, match="required"):
        native._nactcpu.stats(x.data_ptr(), 0, 1, 1, 4, 0, 1.0, 0.0, sums.data_ptr())
    with pytest.raises(ValueError, match="sign kind"):
        native._nactcpu.backward(
            x.data_ptr(),
            x.data_ptr(),
            x.data_ptr(),
            1,
            1,
            4,
            native.KIND_SWISH,
            1.0,
            0.0,
            True,
            s.data_ptr(),
            s.data_ptr(),
            0,
        )
    with pytest.raises(ValueError, match="required"):
        native._nactcpu.affine(x.data_ptr(), 0, 1, 1, 4, 0, 0.0, True, s.data_ptr(),
                               s.data_ptr(), False)  # fmt: skip


def test_native_steps_aside_where_it_does_not_apply():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    nrelu = anact.NReLU()
    assert _uses_native(nrelu, x)
    assert not _uses_native(anact.NReLU().double(), x.detach().double().requires_grad_())
    assert _uses_native(anact.NReLU(), x.detach().bfloat16().requires_grad_())  # float32, bf16
    assert not _uses_native(anact.NReLU(), x.detach().half().requires_grad_())
    assert not _uses_native(anact.NReLU(), x[:, :, ::2])  # gaps in memory
    assert not _uses_native(anact.NReLU(), x.detach()[:1].expand(4, 3, 5, 5))  # overlaps
    assert not _uses_native(anact.NReLU(), x, mask=torch.ones(4, 1, 1, 1, dtype=torch.bool))
    # per channel with a single element per channel: eager warns and uses no statistics
    with pytest.warns(AF.StatisticsWarning):
        assert not _uses_native(anact.NReLU(5, channel_dim=-1), torch.randn(1, 5,
                                                                            requires_grad=True))
    assert not _uses_native(anact.NormalizedActivation("tanh"), x)  # no C twin
    # a user-built activation named like a built-in is not the built-in
    fake = Activation("relu", fn=lambda t: torch.relu(t) * 2, derivative=lambda t: 2.0 * (t > 0))
    assert native.native_kind(fake) is None
    assert not _uses_native(anact.NormalizedActivation(fake), x)
    with K.backend("native"):
        out = torch.vmap(anact.NReLU(track_running_stats=False))(x.detach())
    assert out.shape == x.shape


def test_plan_call_gives_kind_and_layout_and_forward_refuses_other_calls():
    swish, lrelu = resolve_activation("swish"), resolve_activation("lrelu", negative_slope=0.2)
    x = torch.randn(4, 3, 5, 6)
    assert native.plan_call(x, swish, None, None) == ((native.KIND_SWISH, 0.0, 0.0),
                                                      (1, 1, 360), ())  # fmt: skip
    assert native.plan_call(x, lrelu, 2, None) == ((native.KIND_SIGN, 1.0, 0.2), (12, 5, 6), ())
    # channels_last: memory order N, H, W, C; the channel is then the innermost dimension
    xc = x.to(memory_format=torch.channels_last)
    assert native.plan_call(xc, lrelu, 1, None) == ((native.KIND_SIGN, 1.0, 0.2), (120, 3, 1),
                                                    (0, 2, 3, 1))  # fmt: skip
    assert native.plan_call(xc, lrelu, 2, None)[1:] == ((4, 5, 18), (0, 2, 3, 1))
    assert native.plan_call(x.double(), swish, None, None) is None
    assert not native.applies(x.double(), swish, None, None)
    step = AF.StatisticsStep((None,) * 4, torch.zeros(()), training=True, momentum=0.1,
                             bounds=None, beta=0.3, center=True, eps=1e-5, reduce_moments=None,
                             on_moments=None)  # fmt: skip
    kw = dict(channel_dim=None, save_output=False)
    with pytest.raises(ValueError, match="cannot run this call"):
        native.forward(x.double(), swish, step, **kw)
    # without a plan, forward makes one: the same output as with it
    plan = native.plan_call(x, swish, None, None)
    a = native.forward(x, swish, step, **kw)
    b = native.forward(x, swish, step, **kw, plan=plan)
    assert torch.equal(a, b)


def _passes(lib, x, g, s, b, layout, kind, p1, threads):
    """stats, affine (from the filled buffer) and backward: (y, out, ∂L/∂x, sums, ∂L/∂s sums)"""
    outer, c, inner = layout
    y, out, gx = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    sums, gsum = torch.empty(c, 7, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    lib.stats(x.data_ptr(), y.data_ptr(), outer, c, inner, kind, 1.0, p1, sums.data_ptr(),
              threads)  # fmt: skip
    lib.affine(y.data_ptr(), out.data_ptr(), outer, c, inner, kind, p1, False, s.data_ptr(),
               b.data_ptr(), True, threads)  # fmt: skip
    lib.backward(x.data_ptr(), g.data_ptr(), gx.data_ptr(), outer, c, inner, kind, 1.0, p1,
                 False, s.data_ptr(), b.data_ptr(), gsum.data_ptr(), threads)  # fmt: skip
    return y, out, gx, sums, gsum


@pytest.mark.parametrize(
    "layout,split",
    [((1, 1, 400_000), "i"), ((3, 2, 150_000), "o"), ((40, 64, 160), "c"),
     ((3000, 100, 1), "o"), ((2, 3, 200_000), "i"), ((100, 700, 7), "o")],
)  # fmt: skip
@pytest.mark.parametrize("kind,p1", [(native.KIND_SIGN, 0.2), (native.KIND_SWISH, 0.0)])
def test_c_passes_on_several_threads(layout, split, kind, p1):
    """The passes split over threads (by channels, rows or the inner dimension), in torch's
    OpenMP team or on threads of their own: outputs and ∂L/∂x equal the one-thread ones bit
    for bit, the sums agree with float64 (and between the two kinds of threads, exactly)."""
    outer, c, inner = layout
    tasks, how, _ = native._nactcpu.plan(outer, c, inner, 3)
    assert tasks == 3 and how == split
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.normal(2.0, 1.5, layout).astype(np.float32))
    g = torch.from_numpy(rng.normal(0, 1, layout).astype(np.float32))
    s = torch.tensor(np.linspace(1.3, 0.7, c), dtype=torch.float32)
    b = torch.tensor(np.linspace(-0.5, 0.5, c), dtype=torch.float32)
    results = {}
    lib = native._nactcpu
    try:
        for threads, in_team in ((1, False), (3, False), (3, True)):
            if in_team and not lib.team(True):
                continue  # no OpenMP runtime loaded: threads of the passes' own only
            lib.team(in_team)
            results[threads, in_team] = _passes(lib, x, g, s, b, layout, kind, p1, threads)
    finally:
        lib.team(True)  # the default
    for key in results:
        for a, r in zip(results[key][:3], results[1, False][:3], strict=True):
            assert torch.equal(a, r)
    if (3, True) in results:  # the same tasks, summed in the same order: the same sums
        for a, r in zip(results[3, True][3:], results[3, False][3:], strict=True):
            assert torch.equal(a, r)
    x64, g64 = x.double().numpy(), g.double().numpy()
    if kind == native.KIND_SWISH:
        sig = 1 / (1 + np.exp(-x64))
        y64, d64 = x64 * sig, sig * (1 + x64 * (1 - sig))
    else:
        y64, d64 = np.where(x64 > 0, x64, p1 * x64), np.where(x64 > 0, 1.0, p1)
    kx, ky = x64[0, :, 0], y64[0, :, 0]
    xc, yc = x64 - kx[None, :, None], y64 - ky[None, :, None]
    expect = np.stack([xc.sum((0, 2)), (xc**2).sum((0, 2)), yc.sum((0, 2)), (yc**2).sum((0, 2)),
                       (d64**2).sum((0, 2))], axis=1)  # fmt: skip
    expect_g = ((y64 - b.double().numpy()[None, :, None]) * g64).sum((0, 2))
    for key in results:
        sums, gsum = results[key][3], results[key][4]
        scale = np.abs(expect).max(axis=0) * 1e-6 + 1e-3
        np.testing.assert_allclose(sums[:, :5].numpy(), expect, rtol=2e-5, atol=scale.max())
        np.testing.assert_allclose(gsum.numpy(), expect_g, rtol=2e-5,
                                   atol=1e-6 * np.abs(expect_g).max() + 1e-3)  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux" or not torch.backends.openmp.is_available(),
                    reason="torch's OpenMP runtime is looked up on Linux")  # fmt: skip
def test_passes_find_torch_openmp_team():
    """With torch built with OpenMP, the passes run in its team (no threads of their own
    competing with its spinning workers); team(False) turns that off, team(True) back on."""
    lib = native._nactcpu
    assert lib.team() is True and native.openmp_team() is True
    try:
        assert native.openmp_team(False) is False
        assert lib.team() is False
    finally:
        assert native.openmp_team(True) is True
    # the environment can turn it off for a process
    code = "import anact.kernels.native as n; print(n.openmp_team())"
    for value, expect in (("0", "False"), ("1", "True")):
        env = dict(os.environ, ANACT_OPENMP_TEAM=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        assert out.strip() == expect


def test_native_uses_torch_thread_count(monkeypatch):
    """From PARALLEL_NUMEL elements a pass takes torch.get_num_threads() threads (as torch's
    own element-wise ops do); below, one. The module's results match eager either way."""
    calls = []
    real = native._nactcpu

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)

            def call(*args):
                if name != "finish":  # the statistics' step runs no pass
                    calls.append((name, args[-2]))  # (…, threads, bf16)
                return fn(*args)

            return call

    monkeypatch.setattr(native, "_nactcpu", Spy())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    torch.manual_seed(8)
    for shape, threads in (((4, 8, 32, 32), 3), ((4, 8, 8, 8), 1)):
        x, g = torch.randn(shape), torch.randn(shape)
        make = _module("swish", None, shape, 1)
        calls.clear()
        got = _run("native", make, x, steps=2, g=g)
        assert {n for n, _ in calls} == {"stats", "affine", "backward"}
        assert {t for _, t in calls} == {threads}
        _assert_same(got, _run("eager", make, x, steps=2, g=g), torch.float32)


def test_auto_prefers_native_and_native_falls_back_to_eager():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with K.backend("auto"):
        assert type(anact.NSwish()(x).grad_fn).__name__.startswith("NativeNormalized")
    with K.backend("native"):  # float64: the eager reference, no compilation
        out = anact.NSwish().double()(x.detach().double().requires_grad_())
    assert type(out.grad_fn).__name__ == "_NormalizedActivationFnBackward"


def test_native_nan_batch_warns_and_is_left_out_like_eager():
    x = torch.randn(6, 40)
    x[2, 3] = math.nan
    for backend in ("native", "eager"):
        m = anact.NReLU()
        with K.backend(backend), pytest.warns(AF.StatisticsWarning):
            out = m(x)
        assert int(m.num_batches_tracked) == 0
        assert torch.isnan(out[2, 3])


@pytest.mark.parametrize("per_channel", [False, True])
def test_native_double_backward_matches_eager(per_channel):
    """Second derivatives through x and α (∂L/∂x depends on α through the scale)."""
    torch.manual_seed(7)
    x0 = torch.randn(12, 40) + 0.3  # no channel without a positive ReLU input
    grads = {}
    for backend in ("native", "eager"):
        for name in ("swish", "relu"):
            m = anact.NormalizedActivation(name, 40 if per_channel else None,
                                           channel_dim=1 if per_channel else None)
            with torch.no_grad():
                m.alpha.fill_(0.3)
            x = x0.clone().requires_grad_()
            with K.backend(backend):
                out = m(x)
            assert (backend == "native") == type(out.grad_fn).__name__.startswith("Native")
            gx, ga = torch.autograd.grad((out**2).sum(), (x, m.alpha), create_graph=True)
            ggx, gga = torch.autograd.grad(gx.sum() + ga.sum(), (x, m.alpha))
            grads[backend, name] = (gx.detach(), ga.detach(), ggx, gga)
    for name in ("swish", "relu"):
        for a, b in zip(grads["native", name], grads["eager", name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", [None, 3])
def test_native_hooks_get_moments_like_eager(channels):
    check_hooks_get_moments_like_eager("native", channels)


def check_hooks_get_moments_like_eager(backend, channels):
    """on_moments (the monitor) and reduce_moments (distributed) see the same moments
    on ``backend`` as on eager, and the running statistics agree (also run by
    tests/kernels/test_triton.py)."""
    torch.manual_seed(8)
    x = torch.randn(4, 3, 5, 5)
    shape = () if channels is None else (channels,)
    seen = {}
    for name in (backend, "eager"):
        got = []

        def reduce(m, got=got):
            got.append(m)
            return AF.BatchMoments(*(t * 1 for t in m))

        rr, rrp, rm = torch.ones(shape), torch.ones(shape), torch.zeros(shape)
        nbt = torch.zeros((), dtype=torch.long)
        with K.backend(name):
            out = AF.normalized_activation(
                x.requires_grad_(), "swish", rr, rrp, rm, nbt, torch.zeros(shape),
                training=True, channel_dim=None if channels is None else 1,
                reduce_moments=reduce, on_moments=got.append,
            )  # fmt: skip
        assert type(out.grad_fn).__name__.lower().startswith(name.replace("eager", "_"))
        seen[name] = (got, rr.clone(), rrp.clone(), rm.clone())
    (gn, *rn), (ge, *re) = seen[backend], seen["eager"]
    assert len(gn) == len(ge) == 2
    for mn, me in zip(gn, ge, strict=True):
        for a, b in zip(mn, me, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(rn, re, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_native_model_training_matches_eager_over_steps():
    check_model_training_matches_eager("native")


def check_model_training_matches_eager(backend):
    """A small conv net with NSwish and NReLU trained five SGD steps on ``backend`` and
    on eager (also run by tests/kernels/test_triton.py)."""
    torch.manual_seed(11)
    data = [(torch.randn(8, 1, 12, 12), torch.randint(0, 3, (8,))) for _ in range(5)]

    def train(name):
        torch.manual_seed(12)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), anact.NSwish(4, channel_dim=1), torch.nn.Flatten(),
            torch.nn.Linear(4 * 10 * 10, 16), anact.NReLU(), torch.nn.Linear(16, 3),
        )  # fmt: skip
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        with K.backend(name):
            for xb, yb in data:
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
        return net.state_dict()

    a, b = train(backend), train("eager")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_default_backend_is_native_and_the_environment_can_choose(monkeypatch):
    monkeypatch.delenv("ANACT_BACKEND", raising=False)
    assert K._from_environment() == K.DEFAULT_BACKEND == "native"
    monkeypatch.setenv("ANACT_BACKEND", "eager")
    assert K._from_environment() == "eager"
    monkeypatch.setenv("ANACT_BACKEND", "fastest")
    with pytest.warns(K.KernelWarning, match="not one of"):
        assert K._from_environment() == "native"



def check_negated_views_are_read_as_their_values(backend):
    """A lazily negated view's memory holds −x: a path that reads raw memory must not take
    it (or must take its values); outputs and running statistics equal the resolved
    tensor's."""
    torch.manual_seed(3)
    base = torch.randn(8, 6) + 0.2
    view = torch._neg_view(base)
    assert view.is_neg() and torch.equal(view, -base)
    for channel_dim in (None, 1):
        outs = []
        for x in (view, view.resolve_neg()):
            module = anact.NReLU(None if channel_dim is None else 6, channel_dim=channel_dim)
            with K.backend(backend):
                outs.append((module(x), module.running_rho.clone(), module.running_mean.clone()))
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(not hasattr(torch, "_neg_view"), reason="this torch has no negated views")
def test_lazily_negated_views_are_read_as_their_values():
    """The C passes, the eager statistics' C sums and the monitor's read raw memory."""
    check_negated_views_are_read_as_their_values("native")
    view = torch._neg_view(torch.randn(8, 6))
    for a, b in zip(AF.batch_moments(view, "relu"), AF.batch_moments(view.resolve_neg(), "relu"),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    from anact.analysis import monitors

    assert not monitors._c_readable(view)
