"""The ``"triton"`` fast path: the normalized activation's passes as Triton kernels, for
CUDA tensors.

A training step of ``out = s·(δ(x) − μ)`` (eq. 15) makes three passes over memory and
one tiny step between them, each one kernel (:mod:`anact.kernels._triton_kernels`):

* ``stats``: reads x once; per tile and channel, the sums Σ(x−kx), Σ(x−kx)², Σ(y−ky),
  Σ(y−ky)², Σδ'² (y = δ(x), k = the channel's first element, so that variances do not
  cancel when the mean is large against the spread), written as float32 partials;
* ``finish`` (one program): the partials summed in float64, the batch statistics and
  their guards (eq. 31), the running update in place (eq. 16–18, with momentum, the
  outlier bounds, ``momentum=None`` as a cumulative average, a count per tensor or per
  channel) and λ (eq. 13): no host synchronisation and no small tensor ops;
* ``affine``: out = (δ(x) − μ)·s from x (a GPU recomputes δ for free; what costs is
  memory), ties moved for the output-saving ReLU as the eager op moves them;
* ``backward``: reads x (or the saved output) and g once, writes ∂L/∂x = g·δ'(x)·s and
  per-tile partials of ∂L/∂s = Σ g·(δ(x) − μ) (appendix eq. 36–37, 41–42).

It applies to the built-in ReLU, LeakyReLU and Swish (:func:`anact.kernels.native.native_kind`)
on float32, bfloat16 or float16 tensors laid out densely in memory in any dimension
order, per tensor or per channel, without a mask, outside torch.compile, functorch
transforms and export (:func:`plan_call`). Arithmetic is float32 with one rounding at
each store (as torch.compile's kernels round), statistics float64.

With a ``reduce_moments`` (:class:`anact.SyncNormalizedActivation`) or an ``on_moments``
observer the moments are formed from the partials with tensor ops and the statistics'
step runs as :mod:`anact.functional` does.

Tests run these kernels on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``
in the environment before the first call), which this module then accepts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor

from anact import functional as AF
from anact.activations import Activation, _transforms_active
from anact.kernels import native

__all__ = ["available", "interpreting", "plan_call", "forward", "TritonNormalizedActivationFn",
           "TILE"]

_STORE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' STORE
TILE = 2048  # elements per program of the element-wise kernels
FINISH_TILE = 4096  # partial sums per step of the finish kernel's loop
LAYOUT_FLAT, LAYOUT_LAST, LAYOUT_GENERAL = 0, 1, 2  # the kernels' LAYOUT (see _tile there)
# every operation rounded on its own, as the eager op's: no multiply-add contraction
# (which would, e.g., round Swish's x·σ(x) − μ once instead of twice)
EXACT = {"enable_fp_fusion": False}


@functools.cache
def available() -> bool:
    """Whether the ``triton`` package is installed (it comes with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on
    CPU tensors, which is how the tests check them without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def _kernels():
    from anact.kernels import _triton_kernels

    return _triton_kernels


def plan_call(
    x: Tensor, act: Activation, channel_dim: int | None, mask: Tensor | None
) -> native.Plan | None:
    """``(kind, layout, order)`` for :func:`forward` when the Triton kernels can run this
    call, else None (``channel_dim`` normalized to 0..dim-1 or None)."""
    if mask is not None or x.dtype not in _STORE or not available():
        return None
    if not (x.is_cuda or (x.is_cpu and interpreting())):
        return None
    if torch.compiler.is_compiling() or _transforms_active() or AF._is_recording():
        return None
    if x.numel() == 0:
        return None
    order = native._memory_order(x)
    if order is None:
        return None
    layout = native._layout(x, channel_dim, order)
    outer, c, inner = layout
    if outer * inner < 2 or outer * inner >= 2**31:
        return None
    if _grid(outer * inner, c, *_tiling(c, inner)[1:])[1] > 65535:
        return None  # CUDA caps a grid's second dimension (the channel tiles) at 65535
    kind = native.native_kind(act)
    return None if kind is None else (kind, layout, order)


def _tiling(c: int, inner: int) -> tuple[int, int, int]:
    """(LAYOUT, BLOCK_R, BLOCK_C) of the element-wise kernels for an (outer, c, inner)
    layout: per tensor flat tiles; channels last (inner = 1) tiles across channels,
    so that a tile's rows are contiguous; else one channel per tile."""
    if c == 1:
        return LAYOUT_FLAT, TILE, 1
    if inner == 1:
        block_c = min(1 << (c - 1).bit_length(), 64)
        return LAYOUT_LAST, TILE // block_c, block_c
    return LAYOUT_GENERAL, TILE, 1


def _finish_blocks(c: int) -> dict[str, int]:
    """The finish kernel's tile: up to 64 channels, as many partial rows as fill
    FINISH_TILE (per tensor one channel: 4096 rows per step)."""
    block_c = min(1 << (c - 1).bit_length(), 64)
    return {"BLOCK_P": FINISH_TILE // block_c, "BLOCK_C": block_c}


def _grid(rows: int, c: int, block_r: int, block_c: int) -> tuple[int, int]:
    return (-(-rows // block_r), -(-c // block_c))


def _device_of(t: Tensor):
    """Kernels launch on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _constants(device: torch.device, momentum: float, low: float, high: float,
               eps: float) -> Tensor:  # fmt: skip
    """The finish kernel's float64 constants (Triton passes Python floats as float32),
    one small tensor per device and configuration: made once (a copy to the device, which
    a CUDA graph cannot capture: warm up before capturing, as usual)."""
    f32 = torch.finfo(torch.float32)
    return torch.tensor([momentum, low, high, eps, f32.eps, f32.tiny, f32.max],
                        dtype=torch.float64, device=device)  # fmt: skip


def forward(
    x: Tensor,
    act: Activation,
    step: AF.StatisticsStep,
    *,
    channel_dim: int | None,
    save_output: Callable[[Tensor], bool] | bool,
    plan: native.Plan,
) -> Tensor:
    """:func:`anact.functional.normalized_activation` by the Triton kernels, for a call
    :func:`plan_call` accepted (its ``plan``)."""
    K = _kernels()
    (kind, p0, p1), (outer, c, inner), order = plan
    rows = outer * inner
    layout, block_r, block_c = _tiling(c, inner)
    per_channel = channel_dim is not None
    xd = x.detach()
    with _device_of(x):
        part = pilot = None
        if AF._uses_batch(step):
            grid = _grid(rows, c, block_r, block_c)
            part = torch.empty((grid[0], c, 5), dtype=torch.float32, device=x.device)
            pilot = torch.empty((c, 2), dtype=torch.float32, device=x.device)
            K.stats_kernel[grid](xd, part, pilot, rows, c, inner, p0, p1, KIND=kind,
                                 LAYOUT=layout, BLOCK_R=block_r, BLOCK_C=block_c,
                                 **EXACT)  # fmt: skip
        if (step.on_moments is None and step.reduce_moments is None
                and native._finish_applies(step.running, step.alpha, c, x.device)):  # fmt: skip
            scale, shift = _finish(part, pilot, rows, c, per_channel, step, x.device)
        else:
            moments = None
            if part is not None:  # the C rows' layout: the five sums, then the pilots kx, ky
                sums = torch.cat([part.sum(0, dtype=torch.float64), pilot.double()], dim=1)
                moments = native._moments(sums, rows, per_channel, AF._stat_dtype(x))
            scale, shift = AF._scale_and_shift_by_tensor_rules(moments, step,
                                                               check_on_host=x.is_cpu)  # fmt: skip
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        return TritonNormalizedActivationFn.forward(x, scale, shift, act, channel_dim, plan,
                                                    False)  # fmt: skip
    if callable(save_output):
        save_output = save_output(scale)
    return AF.apply_function(TritonNormalizedActivationFn, x, scale, shift, act, channel_dim,
                             plan, save_output)  # fmt: skip


def _finish(
    part: Tensor | None, pilot: Tensor | None, count: int, c: int, per_channel: bool,
    step: AF.StatisticsStep, device: torch.device,
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` by the finish kernel (None partials: eval, the running values)."""
    K = _kernels()
    rho, rho_prime, mean, tracked = step.running
    momentum, bounds, eps = step.momentum, step.bounds, step.eps
    has_running = rho is not None
    shift_dtype = mean.dtype if has_running else torch.float32
    lam = torch.empty(c, dtype=step.alpha.dtype, device=device)
    shift = torch.empty(c, dtype=shift_dtype, device=device)
    bad = torch.empty(1, dtype=torch.int32, device=device)  # always written
    low, high = bounds if bounds is not None else (0.0, 0.0)
    consts = _constants(device, 0.0 if momentum is None else float(momentum), float(low),
                        float(high), 0.0 if eps is None else float(eps))  # fmt: skip
    dummy = lam  # a pointer for the arguments a configuration does not read
    K.finish_kernel[(1,)](
        dummy if part is None else part, dummy if pilot is None else pilot,
        0 if part is None else part.shape[0], c, count, consts,
        *((rho, rho_prime, mean, tracked) if has_running else (dummy, dummy, dummy, bad)),
        lam, shift, bad,
        HAS_BATCH=part is not None, HAS_RUNNING=has_running, TRAINING=step.training,
        CUMULATIVE=momentum is None, HAS_BOUNDS=bounds is not None,
        COUNT_PER_CHANNEL=has_running and tracked.dim() > 0 and tracked.numel() == c,
        CENTER=step.center, HAS_EPS=eps is not None, **_finish_blocks(c), **EXACT,
    )  # fmt: skip
    if part is not None and has_running and step.training:
        torch.autograd.graph.increment_version(step.running)  # written in place by the kernel
    if part is not None and device.type == "cpu" and int(bad.item()):  # no sync on a GPU
        AF._warn_unusable_batch()
    if not per_channel:
        lam, shift = lam.reshape(()), shift.reshape(())
    scale = torch.tanh(step.alpha).mul(step.beta).add(lam)  # eq. 15
    return scale, shift


class TritonNormalizedActivationFn(torch.autograd.Function):
    """out = scale·(δ(x) − shift) by the Triton kernels; saves x or the output, scale,
    shift. A double backward (``create_graph=True``) uses the eager formulas."""

    @staticmethod
    def forward(x, scale, shift, act, channel_dim, plan, save_output):  # type: ignore[override]
        K = _kernels()
        (kind, p0, p1), (outer, c, inner), _ = plan
        layout, block_r, block_c = _tiling(c, inner)
        # float32 (C,) values; the kernel casts them to x's dtype as the eager op does
        s, b = native._per_channel(scale, c), native._per_channel(shift, c)
        out = torch.empty_like(x)
        with _device_of(x):
            K.affine_kernel[_grid(outer * inner, c, block_r, block_c)](
                x.detach(), out, s, b, outer * inner, c, inner, p0, p1, KIND=kind,
                NUDGE=bool(save_output), STORE=_STORE[x.dtype], LAYOUT=layout,
                BLOCK_R=block_r, BLOCK_C=block_c, **EXACT,
            )  # fmt: skip
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, act, channel_dim, plan, save_output = inputs
        AF._save_input_or_output(ctx, x, output, scale, shift, save_output)
        ctx.act, ctx.channel_dim, ctx.plan = act, channel_dim, plan

    @staticmethod
    def backward(ctx, grad_out):
        from anact.kernels import fused

        grads = fused.create_graph_grads(ctx, grad_out, 7)  # create_graph=True: eager's
        if grads is not None:
            return grads
        saved, scale, shift = ctx.saved_tensors
        need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        K = _kernels()
        (kind, p0, p1), (outer, c, inner), order = ctx.plan
        layout, block_r, block_c = _tiling(c, inner)
        rows = outer * inner
        storage = saved.dtype
        g = native.grad_in_layout(grad_out, saved, order)
        s, b = native._per_channel(scale, c), native._per_channel(shift, c)
        grad_x = torch.empty_like(saved) if need_x else saved
        grid = _grid(rows, c, block_r, block_c)
        part = torch.empty((grid[0], c) if need_scale else (1,), dtype=torch.float32,
                           device=saved.device)  # fmt: skip
        with _device_of(saved):
            K.backward_kernel[grid](
                saved, g, grad_x, part, s, b, rows, c, inner, p0, p1, KIND=kind,
                FROM_OUTPUT=ctx.saved_output, NEED_X=need_x, NEED_SCALE=need_scale,
                STORE=_STORE[storage], LAYOUT=layout, BLOCK_R=block_r, BLOCK_C=block_c,
                **EXACT,
            )  # fmt: skip
        grad_scale = None
        if need_scale:
            total = part.sum(0, dtype=torch.float64).to(scale.dtype).reshape(scale.shape)
            if ctx.saved_output:  # Σ g·out / s, with the s the forward multiplied with
                total = total / scale.detach().to(storage).to(scale.dtype)
            grad_scale = total
        return (grad_x if need_x else None), grad_scale, None, None, None, None, None

