"""The Triton kernels (backend ``"triton"``) against the eager reference and float64.

They run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here
before the kernels are first imported), with or without a GPU. Without the interpreter
(in child processes): every kernel configuration is compiled for an H100 (sm_90, to a
cubin by Triton's bundled ptxas; no GPU needed), and the test marked ``gpu`` runs them
on a CUDA device. Skipped where the ``triton`` package is not installed.
"""

# ruff: noqa: E402
# (the environment is set before the imports below)
import math
import os
import subprocess
import sys
import warnings

CUDA_CHILD = os.environ.get("ANACT_TRITON_CUDA_CHILD") == "1"
AOT_CHILD = os.environ.get("ANACT_TRITON_AOT_CHILD") == "1"
if not (CUDA_CHILD or AOT_CHILD):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anact's kernels import triton.jit

import numpy as np
import pytest
import torch
from test_fused import WARNINGS, _assert_same, _run
from test_native import (
    check_against_float64,
    check_hooks_get_moments_like_eager,
    check_model_training_matches_eager,
    check_negated_views_are_read_as_their_values,
    step_by_backend,
)
from test_native_bf16 import check_bf16_against_float64

import anact
import anact.functional as AF
import anact.kernels as K
from anact.activations import Activation
from anact.kernels import triton_passes

pytestmark = [
    pytest.mark.skipif(not triton_passes.available(), reason="the triton package is not installed"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy's, inside the interpreter
]

ACTS = [("relu", None), ("lrelu", {"negative_slope": 0.2}), ("swish", None)]
# (shape, channel_dim): per tensor (several tiles: TILE = 2048), per channel with a channel
# per tile (dim 1, and dim 0 with inner = 1... rows), channels last (dim −1: tiles across
# channels, more channels than a tile holds)
SHAPES = [((6, 5), None), ((5, 3, 30, 30), None), ((4, 3, 5, 5), 1), ((3, 7, 33), 1),
          ((3, 70), 0), ((300, 3), -1), ((5, 7, 70), -1)]  # fmt: skip


def _module(name, params, shape, cd, **kw):
    c = None if cd is None else shape[cd]
    return lambda: anact.NormalizedActivation(name, c, channel_dim=cd, activation_params=params,
                                              **kw)  # fmt: skip


def _uses_triton(module, x):
    with K.backend("triton"):
        out = module(x)
    return type(out.grad_fn).__name__.startswith("TritonNormalizedActivationFn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,cd", SHAPES)
@pytest.mark.parametrize("name,params", ACTS)
def test_triton_matches_eager(name, params, shape, cd, dtype):
    """Outputs, ∂L/∂x, ∂L/∂α over three training steps and one eval step, the running
    statistics and counts, and the warnings, against the eager op."""
    torch.manual_seed(1)
    x = (torch.randn(shape) * 1.5 + 0.2).to(dtype)
    g = torch.randn(shape).to(dtype)
    make = _module(name, params, shape, cd)
    assert _uses_triton(make(), x.clone().requires_grad_())
    got, want = _run("triton", make, x, g=g), _run("eager", make, x, g=g)
    if dtype is torch.bfloat16:
        got, want = _without_alpha_grads(got), _without_alpha_grads(want)
    _assert_same(got, want, dtype)


def _without_alpha_grads(run):
    """:func:`_run`'s results without ∂L/∂α (items 2, 5, 8: three steps of out, ∂L/∂x,
    ∂L/∂α, then the eval output). In bfloat16 the eager op sums products rounded to
    bfloat16, the kernel unrounded ones: both are checked against float64 instead."""
    results, *rest = run
    return ([t for i, t in enumerate(results) if not (i % 3 == 2 and i < 9)], *rest)


@pytest.mark.parametrize("shape,cd", [((5, 3, 30, 30), None), ((4, 3, 5, 5), 1),
                                      ((300, 3), -1)])  # fmt: skip
@pytest.mark.parametrize("name,params", ACTS)
def test_triton_float16_matches_eager(name, params, shape, cd):
    """float16 storage (outputs, ∂L/∂x within a float16 rounding or two of eager's;
    ∂L/∂α, as in bfloat16, summed unrounded), NReLU's saved output included."""
    torch.manual_seed(10)
    x = (torch.randn(shape) * 1.5 + 0.2).half()
    g = torch.randn(shape).half()
    make = _module(name, params, shape, cd)
    assert _uses_triton(make(), x.clone().requires_grad_())
    (got, sg, wg), (want, sw, ww) = _run("triton", make, x, g=g), _run("eager", make, x, g=g)
    assert wg == ww
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if i % 3 == 2 and i < 9:  # ∂L/∂α
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        else:
            assert a.dtype == torch.float16
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    for k in sw:
        if sw[k] is not None:
            torch.testing.assert_close(sg[k], sw[k], rtol=2e-5, atol=2e-5, msg=k)


@pytest.mark.parametrize("name,params", ACTS)
@pytest.mark.parametrize("cd", [None, 1, -1])
def test_triton_bf16_against_float64(name, params, cd):
    check_bf16_against_float64("triton", name, params, cd)


@pytest.mark.parametrize("shape,order,cd", [
    ((4, 6, 5, 5), (0, 2, 3, 1), 1),  # channels_last, per channel
    ((4, 6, 5, 5), (0, 2, 3, 1), None),
    ((7, 3, 20), (1, 0, 2), 2),  # (T, N, C) stored as (N, T, C)
])  # fmt: skip
def test_triton_dense_layouts_match_eager(shape, order, cd):
    """Any dense layout, walked in memory order; output and ∂L/∂x keep x's strides."""
    torch.manual_seed(2)
    x = (torch.randn([shape[d] for d in order]) + 0.2).permute(tuple(np.argsort(order)))
    g = torch.randn(shape)
    make = _module("swish", None, shape, cd)
    xg = x.clone(memory_format=torch.preserve_format).requires_grad_()
    with K.backend("triton"):
        out = make()(xg)
    out.backward(g)
    assert out.stride() == x.stride() and xg.grad.stride() == x.stride()
    _assert_same(_run("triton", make, x, g=g), _run("eager", make, x.contiguous(), g=g),
                 torch.float32)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [{"center": False}, {"momentum": None}, {"bounds": None}, {"track_running_stats": False},
     {"beta": 0.0}, {"save": "input"}, {"save": "output"}, {"eps": 0.5}],
)  # fmt: skip
@pytest.mark.parametrize("cd", [None, 1])
def test_triton_options_match_eager(kwargs, cd):
    torch.manual_seed(3)
    shape = (4, 3, 6, 6)
    x = torch.randn(shape) - 0.3
    make = _module("relu", None, shape, cd, **kwargs)
    _assert_same(_run("triton", make, x, steps=4), _run("eager", make, x, steps=4),
                 torch.float32)  # fmt: skip


def test_triton_float64_statistics_buffers_match_eager():
    """A float32 input into a module whose buffers and α are float64."""
    torch.manual_seed(4)
    x = torch.randn(6, 4, 7)

    def make():
        return anact.NSwish(4, channel_dim=1).double()

    def run(backend):
        m = make()
        with K.backend(backend):
            for i in range(3):
                out = m(x * (1 + 0.3 * i))
        return out, m.state_dict()

    (oa, sa), (ob, sb) = run("triton"), run("eager")
    torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-6)
    for k in sa:  # the batch moments rounded to float32 first, as the tensor rules hold
        # them: the float64 buffers agree to the float32 rounding of the sums' order
        torch.testing.assert_close(sa[k], sb[k], rtol=3e-7, atol=1e-9, msg=k)
        if k in ("running_rho_prime", "running_mean"):  # blends of float32 values
            assert torch.equal(sa[k].float().double(), sa[k]) == torch.equal(
                sb[k].float().double(), sb[k]), k


@pytest.mark.parametrize("center", [False, True])
def test_triton_eval_with_non_finite_running_mean_is_eager(center):
    """Eval with a running mean that overflowed (a diverged run, a loaded checkpoint):
    without centring the shift is 0 whatever μ holds; with it, both paths give inf."""
    x = torch.randn(4, 3, 5)
    outs = {}
    for backend in ("triton", "eager"):
        m = anact.NReLU(3, channel_dim=1, center=center)
        m(x)
        m.running_mean.fill_(math.inf)
        m.eval()
        with K.backend(backend), torch.no_grad():
            outs[backend] = m(x)
    assert torch.isnan(outs["eager"]).sum() == torch.isnan(outs["triton"]).sum()
    torch.testing.assert_close(outs["triton"], outs["eager"], equal_nan=True)
    assert center or torch.isfinite(outs["triton"]).all()


@pytest.mark.parametrize(
    "make_x",
    [
        lambda: torch.full((16,), 0.37),
        lambda: torch.full((4, 3, 2), -1234.5),
        lambda: torch.tensor([1.0, math.nan, 2.0, 3.0]),
        lambda: torch.tensor([math.nan, 1.0, 2.0, 3.0]),
        lambda: torch.tensor([1.0, math.inf, 2.0, 3.0]),
        lambda: torch.tensor([-math.inf, 1.0, 2.0, 3.0]),
        lambda: -torch.rand(64) - 0.1,
    ],
    ids=["constant", "constant-3d", "nan", "nan-first", "inf", "inf-first", "dead"],
)
@pytest.mark.parametrize("track", [True, False])
def test_triton_guards_behave_like_eager(make_x, track):
    """Unusable batches: the same warning, output and (untouched) running statistics."""
    x = make_x()

    def run(backend):
        torch.manual_seed(0)
        module = anact.NReLU(track_running_stats=track)
        module(torch.randn(128))  # a valid first batch
        with K.backend(backend), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = module(x)
        return out, dict(module.state_dict()), [(w.category, w.filename) for w in caught
                                                if issubclass(w.category, WARNINGS)]

    (oe, se, we), (ot, st, wt) = run("eager"), run("triton")
    assert we == wt  # the same warnings, each naming this file (the caller's line)
    assert all(filename == __file__ for _, filename in wt)
    we = [category for category, _ in we]
    if track:
        assert AF.StatisticsWarning in we
    torch.testing.assert_close(ot, oe, equal_nan=True)
    for k in se:
        torch.testing.assert_close(st[k], se[k], rtol=1e-6, atol=1e-7, msg=k)


def test_triton_dead_channel_keeps_its_own_count():
    """Per channel, a channel whose batch is unusable keeps its statistics and count."""
    x = torch.randn(8, 3, 10)
    x[:, 1] = -torch.rand(8, 10) - 0.1  # ReLU is dead on channel 1
    states = {}
    for backend in ("triton", "eager"):
        m = anact.NReLU(3, channel_dim=1)
        with K.backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore", AF.StatisticsWarning)
            m(x)
            m(x * 1.2)
        states[backend] = m.state_dict()
    assert states["triton"]["channel_batches_tracked"].tolist() == [2, 0, 2]
    for k, v in states["eager"].items():
        torch.testing.assert_close(states["triton"][k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("name,params", ACTS)
def test_triton_against_float64(name, params):
    check_against_float64("triton", name, params, (8, 4, 9, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cd", [None, 1])
def test_triton_output_saving_and_ties_match_eager(cd, dtype):
    """ReLU saving its output, with elements whose δ(x) > 0 rounds onto s·(0 − μ): the
    output keeps them off that value, and the same elements get a gradient."""
    torch.manual_seed(6)
    shape = (4, 3, 4, 4)
    x = torch.randn(shape) * 0.5 + 0.1
    x.view(-1)[:3] = 0.0
    x.view(-1)[3:6] = 1e-9 if dtype is torch.float32 else 1e-4  # ties in each dtype
    x, g = x.to(dtype), torch.randn(shape).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    results = step_by_backend(
        lambda: anact.NReLU(None if cd is None else shape[cd], channel_dim=cd,
                            track_running_stats=False),
        x, g, ("triton", "eager"), alpha=0.3,
    )  # fmt: skip
    (o_t, gx_t, ga_t, fn_t), (o_e, gx_e, ga_e, fn_e) = results["triton"], results["eager"]
    assert fn_t.startswith("Triton") and not fn_e.startswith("Triton")
    torch.testing.assert_close(o_t, o_e, rtol=tol, atol=tol / 10)
    torch.testing.assert_close(gx_t, gx_e, rtol=tol, atol=tol / 10)
    torch.testing.assert_close(ga_t, ga_e, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    assert torch.equal(gx_t == 0, gx_e == 0)  # the same elements counted as δ(x) > 0
    assert torch.equal(gx_t == 0, x <= 0)


def test_triton_saves_what_the_plain_op_saves():
    """NReLU keeps its output for backward, NSwish its input: one tensor each."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    for module, expect in ((anact.NReLU(), "output"), (anact.NSwish(), "input")):
        saved = []
        with K.backend("triton"), torch.autograd.graph.saved_tensors_hooks(
            lambda t, saved=saved: saved.append(t) or t, lambda t: t
        ):
            out = module(x)
        big = [t for t in saved if t.numel() == x.numel()]
        assert len(big) == 1
        assert torch.equal(big[0], out if expect == "output" else x)


def test_triton_double_backward_matches_eager():
    torch.manual_seed(7)
    x0 = torch.randn(12, 40) + 0.3
    grads = {}
    for backend in ("triton", "eager"):
        m = anact.NSwish(40, channel_dim=1)
        with torch.no_grad():
            m.alpha.fill_(0.3)
        x = x0.clone().requires_grad_()
        with K.backend(backend):
            out = m(x)
        gx, ga = torch.autograd.grad((out**2).sum(), (x, m.alpha), create_graph=True)
        ggx, gga = torch.autograd.grad(gx.sum() + ga.sum(), (x, m.alpha))
        grads[backend] = (gx.detach(), ga.detach(), ggx, gga)
    for a, b in zip(grads["triton"], grads["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", [None, 3])
def test_triton_hooks_get_moments_like_eager(channels):
    """on_moments and reduce_moments take the tensor rules after the stats kernel."""
    check_hooks_get_moments_like_eager("triton", channels)


def test_triton_model_training_matches_eager_over_steps():
    check_model_training_matches_eager("triton")


def test_triton_steps_aside_where_it_does_not_apply(monkeypatch):
    """A mask, float64, an activation without a kernel twin, a transform: another path."""
    x = torch.randn(6, 5, requires_grad=True)
    custom = Activation("relu", torch.relu, lambda t: (t > 0).to(t.dtype))
    with K.backend("triton"):
        assert type(anact.NReLU()(x).grad_fn).__name__.startswith("Triton")
        for out in (anact.NReLU()(x, mask=torch.ones(6, 1, dtype=torch.bool)),
                    anact.NReLU().double()(x.double()),
                    anact.NormalizedActivation(custom)(x)):  # fmt: skip
            assert not type(out.grad_fn).__name__.startswith("Triton")
        out = torch.func.vmap(lambda t: anact.NReLU(track_running_stats=False)(t))(x[None])
        assert out.shape == (1, 6, 5)
    # more channel tiles than a CUDA grid's second dimension holds (65535)
    relu = anact.NReLU().activation
    assert triton_passes.plan_call(torch.empty(2, 70000, 2), relu, 1, None) is None
    assert triton_passes.plan_call(torch.empty(2, 60000, 2), relu, 1, None) is not None
    # on CPU without the interpreter: the native passes (the default's CPU path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with K.backend("triton"):
        assert type(anact.NReLU()(x).grad_fn).__name__.startswith("Native")


def _child(case: str, flag: str) -> subprocess.CompletedProcess:
    """This file's tests matching ``case``, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[flag] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         case], env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip


def test_triton_kernels_compile_for_a_gpu():
    """What the interpreter does not check: that Triton's GPU compiler takes every
    kernel configuration (types, constexpr branches, bit casts) down to a cubin."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    done = _child("aot_case", "ANACT_TRITON_AOT_CHILD")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


if AOT_CHILD:  # collected only in the child process of the test above

    def test_aot_case():
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile

        from anact.kernels import _triton_kernels as TK

        def build(fn, types, consts):
            names = fn.arg_names
            sig = {n: types.get(n, "constexpr") for n in names}
            src = ASTSource(fn=fn, signature=sig,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            kernel = compile(src, target=GPUTarget("cuda", 90, 32),
                             options=triton_passes.EXACT)  # fmt: skip
            assert kernel.asm["cubin"]

        scalars = {"R": "i32", "C": "i32", "inner": "i32", "p0": "fp32", "p1": "fp32"}
        for store, ptr in ((0, "*fp32"), (1, "*bf16"), (2, "*fp16")):
            for layout, kind in ((0, 0), (1, 1), (2, store % 2)):
                bc = 4 if layout == 1 else 1
                tiles = {"LAYOUT": layout, "BLOCK_R": triton_passes.TILE // bc, "BLOCK_C": bc}
                build(TK.stats_kernel, {"x_ptr": ptr, "part_ptr": "*fp32", "pilot_ptr": "*fp32",
                                        **scalars}, {"KIND": kind, **tiles})  # fmt: skip
                build(TK.affine_kernel, {"x_ptr": ptr, "out_ptr": ptr, "s_ptr": "*fp32",
                                         "b_ptr": "*fp32", **scalars},
                      {"KIND": kind, "NUDGE": kind == 0, "STORE": store, **tiles})
                build(TK.backward_kernel, {"src_ptr": ptr, "g_ptr": ptr, "gx_ptr": ptr,
                                           "part_ptr": "*fp32", "s_ptr": "*fp32",
                                           "b_ptr": "*fp32", **scalars},
                      {"KIND": kind, "FROM_OUTPUT": kind == 0, "NEED_X": True,
                       "NEED_SCALE": layout != 2, "STORE": store, **tiles})  # fmt: skip
        flags = [(True, True, True, False, True, False), (True, True, True, True, False, True),
                 (True, False, True, False, True, False), (False, True, False, False, True, False)]
        for buf, c in (("*fp32", 1), ("*fp64", 100)):
            for i, (batch, running, training, cumulative, bounds, per_channel) in enumerate(
                flags
            ):
                build(TK.finish_kernel,
                      {"part_ptr": "*fp32", "pilot_ptr": "*fp32", "P": "i32", "C": "i32",
                       "count": "i64", "const_ptr": "*fp64", "rr_ptr": buf, "rrp_ptr": buf,
                       "rm_ptr": buf, "nbt_ptr": "*i64", "lam_ptr": "*fp32", "shift_ptr": buf,
                       "bad_ptr": "*i32"},
                      {"HAS_BATCH": batch, "HAS_RUNNING": running, "TRAINING": training,
                       "CUMULATIVE": cumulative, "HAS_BOUNDS": bounds,
                       "COUNT_PER_CHANNEL": per_channel, "CENTER": buf == "*fp32",
                       "HAS_EPS": i != 2, **triton_passes._finish_blocks(c)})  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_cuda_matches_eager():
    """The kernels compiled for the GPU: :func:`compiled_cuda_case` in a child process
    (this one interprets them)."""
    done = _child("compiled_cuda_case", "ANACT_TRITON_CUDA_CHILD")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


if CUDA_CHILD:  # collected only in the child process of test_triton_cuda_matches_eager

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("shape,cd", [((64, 32, 16, 16), None), ((64, 32, 16, 16), 1),
                                          ((16, 128, 96), -1)])  # fmt: skip
    @pytest.mark.parametrize("name,params", ACTS)
    def test_compiled_cuda_case(name, params, shape, cd, dtype):
        torch.manual_seed(9)
        x = (torch.randn(shape) * 1.5 + 0.2).to("cuda", dtype)
        g = torch.randn(shape).to("cuda", dtype)
        c = None if cd is None else shape[cd]

        def make():
            return anact.NormalizedActivation(name, c, channel_dim=cd,
                                              activation_params=params).cuda()  # fmt: skip

        assert _uses_triton(make(), x.clone().requires_grad_())
        got, want = _run("triton", make, x, g=g), _run("eager", make, x, g=g)
        if dtype is torch.bfloat16:
            got, want = _without_alpha_grads(got), _without_alpha_grads(want)
        _assert_same(got, want, dtype)


@pytest.mark.skipif(not hasattr(torch, "_neg_view"), reason="this torch has no negated views")
def test_triton_reads_negated_views_as_their_values():
    check_negated_views_are_read_as_their_values("triton")
