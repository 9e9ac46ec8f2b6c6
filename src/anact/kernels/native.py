"""The ``"native"`` fast path: the normalized activation's passes in C, on CPU float32
and bfloat16.

A training step of ``out = s·(δ(x) − μ)`` (eq. 15) with batch statistics makes three
passes over memory, each one call into :mod:`anact._nactcpu`:

* forward, ``stats``: reads x once, writes y = δ(x) into the output buffer and sums
  the batch moments (shifted by each channel's first element, block sums in double);
  the running update and λ (eq. 13, 16–18) then run on the () or (C,) moments with
  :mod:`anact.functional`'s own code;
* forward, ``affine``: out = (y − μ)·s in place (ReLU's ties moved as the eager
  output-saving op moves them);
* backward, ``backward``: reads x (or the saved output) and g once, writes
  ∂L/∂x = g·δ'(x)·s and sums ∂L/∂s = Σ g·(δ(x) − μ) (appendix eq. 36–37, 41–42).

A plain activation reads x once and writes y forward, which is why δ is written in the
first pass rather than recomputed in the second: ReLU costs nothing to recompute, but
Swish's exp costs more than the in-place pass over a buffer still warm in cache.

It applies to the built-in ReLU, LeakyReLU and Swish (the activations whose C twins
exist, checked against the registry's functions) on float32 or bfloat16 CPU tensors (the
latter with the eager op's bfloat16 roundings, docs/core.md) laid out densely
in memory in any dimension order (contiguous, ``channels_last``, a transpose: the passes
walk memory in order and the channel's place in that order gives the layout; the output
and ∂L/∂x take x's layout, a gradient in another layout is copied into it),
per tensor or per channel (any ``channel_dim``: the C side walks memory in order, with
block sums per channel row for channels-first layouts and one accumulator per position
for channels-last ones, e.g. (N, T, C) with ``channel_dim=-1``), without a mask,
outside torch.compile, functorch transforms and tracing or export (ONNX,
``torch.jit.trace``, ``torch.export``).
Elsewhere :func:`plan_call` says None and the caller runs another path.

Threads: from :data:`PARALLEL_NUMEL` elements (torch's own grain size) a pass splits
the tensor over ``torch.get_num_threads()`` threads, as torch's element-wise ops do, at
least 65536 elements per thread: in torch's own OpenMP team where the C module finds the
runtime torch loaded (:func:`openmp_team`; ``ANACT_OPENMP_TEAM=0`` in the environment
turns it off), else on threads of its own. Outputs and ∂L/∂x do not depend on the
number of threads; the sums do, by float rounding (as torch's reductions do).
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Callable

import torch
from torch import Tensor

from anact import functional as AF
from anact.activations import Activation, _transforms_active, resolve_activation

try:
    from anact import _nactcpu
except ImportError:  # pragma: no cover - installed without a C compiler
    _nactcpu = None

__all__ = ["available", "openmp_team", "plan_call", "applies", "native_kind", "forward",
           "NativeNormalizedActivationFn"]

KIND_SIGN, KIND_SWISH = 0, 1  # KIND_* in _nactcpu.c
_STORAGE = (torch.float32, torch.bfloat16)  # dtypes of x the C passes read and write
PARALLEL_NUMEL = 32768  # torch's grain size: smaller element-wise ops run on one thread


def _threads(numel: int) -> int:
    """Threads for a pass over ``numel`` elements: torch's count, as its own ops use."""
    return torch.get_num_threads() if numel >= PARALLEL_NUMEL else 1


def openmp_team(enable: bool | None = None) -> bool:
    """Whether passes on several threads run in torch's OpenMP team (rather than on
    threads of their own, which compete with torch's spinning workers); ``enable``
    switches it (True takes effect only where an OpenMP runtime is loaded)."""
    if _nactcpu is None:
        return False
    return _nactcpu.team(enable)


if _nactcpu is not None and os.environ.get("ANACT_OPENMP_TEAM", "").strip() == "0":
    _nactcpu.team(False)


def available() -> bool:
    """Whether the C passes were built (a C compiler at install time)."""
    return _nactcpu is not None


def _code(f: Callable) -> object:
    return getattr(f, "__code__", f)


_REFERENCE: dict[str, tuple[object, object]] | None = None


def _reference() -> dict[str, tuple[object, object]]:
    # the registry's own δ and δ' (by code object: lrelu's lambdas share theirs)
    global _REFERENCE
    if _REFERENCE is None:
        _REFERENCE = {}
        for name in ("relu", "lrelu", "swish"):
            a = resolve_activation(name)
            _REFERENCE[name] = (_code(a.fn), _code(a.derivative))
    return _REFERENCE


def native_kind(act: Activation) -> tuple[int, float, float] | None:
    """``(kind, p0, p1)`` of the C twin of ``act``, or None when it has none.

    Only the registry's ReLU, LeakyReLU and Swish qualify (their δ and δ' are the
    registered functions); a user-built Activation with the same name does not.
    """
    ref = _reference().get(act.name)
    if ref is None or (_code(act.fn), _code(act.derivative)) != ref:
        return None
    if act.name == "relu":
        return KIND_SIGN, 1.0, 0.0
    if act.name == "lrelu":
        return KIND_SIGN, 1.0, float(act.params["negative_slope"])
    return KIND_SWISH, 0.0, 0.0


def _memory_order(x: Tensor) -> tuple[int, ...] | None:
    """x's dimensions from outermost to innermost in memory when x is dense and
    non-overlapping (a permutation of a contiguous tensor, e.g. ``channels_last``);
    ``()`` when x is contiguous; None otherwise (gaps or overlaps: a slice, an expand; a
    lazily negated view, whose memory holds −x: the passes read raw memory)."""
    if x.is_neg():
        return None
    if x.is_contiguous():
        return ()
    strides = x.stride()
    order = tuple(sorted(range(x.dim()), key=lambda d: -strides[d]))
    return order if x.permute(order).is_contiguous() else None


def _layout(
    x: Tensor, channel_dim: int | None, order: tuple[int, ...] = ()
) -> tuple[int, int, int]:
    """x's memory as (outer, C, inner) around the channel dimension, dimensions taken in
    ``order`` (memory order; ``()``: as they are); (1, 1, numel) per tensor."""
    if channel_dim is None:
        return 1, 1, x.numel()
    shape = x.shape
    if order:
        channel_dim, shape = order.index(channel_dim), [shape[d] for d in order]
    return (math.prod(shape[:channel_dim]), shape[channel_dim],
            math.prod(shape[channel_dim + 1:]))  # fmt: skip


# (native_kind, _layout, _memory_order)
Plan = tuple[tuple[int, float, float], tuple[int, int, int], tuple[int, ...]]


def plan_call(
    x: Tensor, act: Activation, channel_dim: int | None, mask: Tensor | None
) -> Plan | None:
    """``(kind, layout, order)`` for :func:`forward` when the native passes can run this
    call (see the module docstring), else None. ``channel_dim`` is normalized to 0..dim-1
    (or None)."""
    if _nactcpu is None or mask is not None or x.dtype not in _STORAGE or not x.is_cpu:
        return None
    # a trace or export would record the C calls as opaque constants (and, first, would
    # see the size checks below as tensor comparisons, with a TracerWarning each)
    if torch.compiler.is_compiling() or _transforms_active() or AF._is_recording():
        return None
    if x.numel() == 0:
        return None
    order = _memory_order(x)
    if order is None:
        return None
    layout = _layout(x, channel_dim, order)
    if layout[0] * layout[2] < 2:  # fewer than 2 elements per statistic
        return None
    kind = native_kind(act)
    return None if kind is None else (kind, layout, order)


def applies(x: Tensor, act: Activation, channel_dim: int | None, mask: Tensor | None) -> bool:
    """Whether the native passes can run this call (:func:`plan_call` is not None)."""
    return plan_call(x, act, channel_dim, mask) is not None


def _moments(sums: Tensor, count: int, per_channel: bool, dtype: torch.dtype) -> AF.BatchMoments:
    """BatchMoments from the (C, 7) float64 rows (Σ(x−kx), Σ(x−kx)², Σ(y−ky), Σ(y−ky)²,
    Σδ'², kx, ky) on their device: shape () per tensor, (C,) per channel (also the Triton
    path's, from its partial sums)."""
    n = float(count)
    if not per_channel and sums.is_cpu:  # on Python floats (no small tensor ops)
        values = AF._moments_of_sums(sums.tolist()[0], count)
        return AF.BatchMoments(*torch.tensor(values, dtype=dtype, device="cpu").unbind())
    sx, sxx, sy, syy, sg, kx, ky = sums.t().unbind()
    mx, my = sx / n, sy / n
    var_x = (sxx / n - mx * mx).clamp_min(0)
    var_y = (syy / n - my * my).clamp_min(0)
    dsq = torch.where(torch.isnan(sy), sy, sg / n)
    stacked = torch.stack([torch.full_like(mx, n), kx + mx, var_x, ky + my, var_y, dsq])
    stacked = stacked.to(dtype) if per_channel else stacked.to(dtype).reshape(6)
    return AF.BatchMoments(*stacked.unbind())


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to float32 (to nearest, as a cast) when ``dtype`` is float32.
    One float32 +, −, ·, / is then reproduced on doubles: the double result rounded to
    float32 is the float32 result (double has more than 2·24 + 2 bits)."""
    return array("f", (value,))[0] if dtype is torch.float32 else value


def _per_channel(t: Tensor, c: int, storage: torch.dtype = torch.float32) -> Tensor:
    """A () or (C,) statistic as C contiguous float32 values for the C passes, rounded to
    the ``storage`` dtype of the tensors they run on (the eager op casts scale and shift
    to x's dtype)."""
    if storage is not torch.float32:
        t = t.detach().to(storage)
    if t.dtype is torch.float32 and t.numel() == c and t.is_contiguous():
        return t  # as it is: the C passes only read its data
    t = t.detach()
    if t.dtype is not torch.float32:
        t = t.to(torch.float32)
    t = t.reshape(-1)
    return (t if t.numel() == c else t.expand(c)).contiguous()


_STAT_DTYPES = (torch.float32, torch.float64)


_CPU = torch.device("cpu")


def _finish_applies(buffers: tuple[Tensor | None, ...], alpha: Tensor, c: int,
                    device: torch.device = _CPU) -> bool:  # fmt: skip
    """Whether a one-call statistics step (:func:`_finish` here, on the CPU; the Triton
    finish kernel on ``device``) can read and write these running buffers and α's dtype:
    on ``device``, float32/float64 statistics (one dtype), int64 count, C values each,
    dense."""
    if alpha.dtype not in _STAT_DTYPES:
        return False
    rho, rho_prime, mean, tracked = buffers
    if rho is None:
        return True
    dtype = rho.dtype
    return (dtype in _STAT_DTYPES and rho_prime.dtype is dtype and mean.dtype is dtype
            and tracked.dtype is torch.int64 and tracked.numel() in (1, c)
            and tracked.is_contiguous() and tracked.device == device
            and all(t.device == device and t.numel() == c and t.is_contiguous()
                    for t in (rho, rho_prime, mean)))  # fmt: skip


def _finish(
    sums: Tensor | None, count: int, c: int, per_channel: bool, step: AF.StatisticsStep,
    stat_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` from the C sums (None: eval, the running values) by
    ``_nactcpu.finish``: the batch statistics, the running update and λ in double, in
    the order of the rules of :func:`anact.functional.moments_to_stats` and
    :func:`~anact.functional.update_running_stats`, each stored value rounded once to
    its buffer's dtype (the tensor rules round each float32 operation)."""
    rho, rho_prime, mean, tracked = step.running
    alpha, momentum, bounds, eps = step.alpha, step.momentum, step.bounds, step.eps
    has_running = rho is not None
    shift_dtype = mean.dtype if has_running else stat_dtype
    lam_c = shift = None
    if per_channel:  # written by the C call; per tensor it returns the two floats
        lam_c = torch.empty(c, dtype=alpha.dtype, device="cpu")
        shift = torch.empty(c, dtype=shift_dtype, device="cpu")
    low, high = bounds if bounds is not None else (0.0, 0.0)
    invalid, lam, mu = _nactcpu.finish(
        0 if sums is None else sums.data_ptr(), c, float(count), stat_dtype is torch.float64,
        *((rho.data_ptr(), rho_prime.data_ptr(), mean.data_ptr()) if has_running
          else (0, 0, 0)),
        has_running and rho.dtype is torch.float64, tracked.data_ptr() if has_running else 0,
        has_running and tracked.dim() > 0 and tracked.numel() == c,  # a count per channel
        step.training, math.nan if momentum is None else float(momentum), bounds is not None,
        float(low), float(high), math.nan if eps is None else float(eps), step.center,
        0 if lam_c is None else lam_c.data_ptr(), alpha.dtype is torch.float64,
        0 if shift is None else shift.data_ptr(), shift_dtype is torch.float64,
    )  # fmt: skip
    if sums is not None and has_running and step.training:
        torch.autograd.graph.increment_version(step.running)  # written in place by C
    if invalid:
        AF._warn_unusable_batch()
    scale = torch.tanh(alpha).mul(step.beta).add(lam if lam_c is None else lam_c)  # eq. 15
    if shift is None:
        shift = torch.full((), mu, dtype=shift_dtype, device="cpu")
    return scale, shift


def grad_in_layout(grad_out: Tensor, saved: Tensor, order: tuple[int, ...]) -> Tensor:
    """∂L/∂out in x's storage dtype and memory layout (``order``: x's memory order, ``()``
    when contiguous), as the passes read it: copied only when it is not already."""
    g = grad_out if grad_out.dtype is saved.dtype else grad_out.to(saved.dtype)
    if g.stride() != saved.stride() and not (g.permute(order) if order else g).is_contiguous():
        g = torch.empty_like(saved).copy_(g)  # into the layout of x
    return g


class NativeNormalizedActivationFn(torch.autograd.Function):
    """out = scale·(δ(x) − shift) by the C passes; saves x or the output, scale, shift.

    ``buffer`` is a 1-tuple holding the output tensor (not an input of the graph),
    already holding δ(x) when ``filled`` (the statistics pass wrote it), or still to be
    computed from x. A double backward
    (``create_graph=True``) uses the eager formulas, which are differentiable.
    """

    @staticmethod
    def forward(x, scale, shift, act, channel_dim, kind, layout, order, buffer, filled,  # type: ignore[override]
                save_output):
        (out,) = buffer
        outer, c, inner = layout
        s, b = _per_channel(scale, c, x.dtype), _per_channel(shift, c, x.dtype)
        src = out if filled else x.detach()
        _nactcpu.affine(
            src.data_ptr(),
            out.data_ptr(),
            outer,
            c,
            inner,
            kind[0],
            kind[2],
            not filled,
            s.data_ptr(),
            b.data_ptr(),
            bool(save_output),
            _threads(out.numel()),
            x.dtype is torch.bfloat16,
        )
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, act, channel_dim, kind, layout, order, _, _, save_output = inputs
        AF._save_input_or_output(ctx, x, output, scale, shift, save_output)
        ctx.act, ctx.channel_dim, ctx.kind, ctx.layout = act, channel_dim, kind, layout
        ctx.order = order

    @staticmethod
    def backward(ctx, grad_out):
        from anact.kernels import fused

        grads = fused.create_graph_grads(ctx, grad_out, 11)  # create_graph=True: eager's
        if grads is not None:
            return grads
        saved, scale, shift = ctx.saved_tensors
        need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        outer, c, inner = ctx.layout
        kind, p0, p1 = ctx.kind
        storage = saved.dtype  # x's: float32 or bfloat16
        g = grad_in_layout(grad_out, saved, ctx.order)
        s, b = _per_channel(scale, c, storage), _per_channel(shift, c, storage)
        # from the output, the C pass compares with t = (0 − b)·s formed as the forward did
        bt = ((-b) * s).to(storage).to(torch.float32) if ctx.saved_output else b
        # written even when only α needs a gradient (rare)
        grad_x = torch.empty_like(saved)  # x's layout (dense: its strides)
        # per channel Σ into gsum; per tensor the call returns the sum
        gsum = torch.empty(c, dtype=torch.float64, device="cpu") if need_scale and c > 1 else None
        total = _nactcpu.backward(saved.data_ptr(), g.data_ptr(), grad_x.data_ptr(),
                                  outer, c, inner, kind, p0, p1, ctx.saved_output, s.data_ptr(),
                                  bt.data_ptr(), 0 if gsum is None else gsum.data_ptr(),
                                  _threads(g.numel()), storage is torch.bfloat16)  # fmt: skip
        grad_scale = None
        if need_scale:
            if gsum is None:  # on floats, rounded as the tensor ops below round
                if ctx.saved_output:  # Σ g·out / s, with the s the forward multiplied with
                    total = _rounded(total, scale.dtype) / s.item()
                grad_scale = torch.full(scale.shape, total, dtype=scale.dtype, device="cpu")
            else:
                grad_scale = gsum.to(scale.dtype).reshape(scale.shape)
                if ctx.saved_output:  # Σ g·out / s, with the s the forward multiplied with
                    grad_scale = grad_scale / s.to(scale.dtype).reshape(scale.shape)
        grad_x = grad_x if need_x else None
        return grad_x, grad_scale, None, None, None, None, None, None, None, None, None


def forward(
    x: Tensor,
    act: Activation,
    step: AF.StatisticsStep,
    *,
    channel_dim: int | None,
    save_output: Callable[[Tensor], bool] | bool,
    plan: Plan | None = None,
) -> Tensor:
    """:func:`anact.functional.normalized_activation` by the C passes, with the ``plan``
    :func:`plan_call` gave (computed here when None; the call must be one it accepts);
    ``channel_dim`` normalized to 0..dim-1 or None."""
    plan = plan if plan is not None else plan_call(x, act, channel_dim, None)
    if plan is None:
        raise ValueError("the native passes cannot run this call (plan_call says None): "
                         "use anact.functional.normalized_activation, which chooses a path")
    kind, layout, order = plan
    outer, c, inner = layout
    batch = AF._uses_batch(step)
    out = torch.empty_like(x)  # x's layout (dense: its strides)
    sums = None
    if batch:
        sums = torch.empty((c, 7), dtype=torch.float64, device="cpu")
        _nactcpu.stats(x.data_ptr(), out.data_ptr(), outer, c, inner, kind[0], kind[1], kind[2],
                       sums.data_ptr(), _threads(x.numel()), x.dtype is torch.bfloat16)  # fmt: skip
    stat_dtype = AF._stat_dtype(x)
    per_channel = channel_dim is not None
    if (step.on_moments is None and step.reduce_moments is None
            and _finish_applies(step.running, step.alpha, c)):  # fmt: skip
        # statistics, running update and λ in one C call (eq. 13, 16–18, 31)
        scale, shift = _finish(sums, outer * inner, c, per_channel, step, stat_dtype)
    else:
        moments = _moments(sums, outer * inner, per_channel, stat_dtype) if batch else None
        scale, shift = AF._scale_and_shift_by_tensor_rules(moments, step, check_on_host=True)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        # nothing to differentiate (inference, no_grad): the pass without autograd's node
        return NativeNormalizedActivationFn.forward(
            x, scale, shift, act, channel_dim, kind, layout, order, (out,), batch, False
        )
    if callable(save_output):
        save_output = save_output(scale)
    return AF.apply_function(
        NativeNormalizedActivationFn, x, scale, shift, act, channel_dim, kind, layout, order,
        (out,), batch, save_output,
    )  # fmt: skip
