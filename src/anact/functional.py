"""Stateless math of the normalized activation function (ANAct, section 2.2).

The module :class:`anact.NormalizedActivation` holds the state (running
statistics, α) and calls :func:`normalized_activation`, as ``nn.BatchNorm2d``
calls ``F.batch_norm``. The pieces are public so that analysis tools and
distributed training can reuse them:

* :func:`batch_moments` — the statistics of one mini-batch, mask-aware;
* :func:`merge_moments` — combines moments of several shards (ranks) exactly;
* :func:`moments_to_stats` — ρ_M, ρ'_M, μ_M and whether the batch is usable;
* :func:`update_running_stats` — eq. 16–18 with the outlier bounds, in place;
* :func:`lambda_factor` — eq. 13;
* :func:`normalized_activation` — the whole forward pass, eq. 15.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from anact import _native
from anact import kernels as _kernels
from anact.activations import Activation, _forward_ad_active, resolve_activation

__all__ = [
    "BatchMoments",
    "StatisticsWarning",
    "batch_moments",
    "merge_moments",
    "moments_to_stats",
    "update_running_stats",
    "lambda_factor",
    "apply_normalization",
    "normalized_activation",
    "SAVE_MODES",
]


class StatisticsWarning(UserWarning):
    """A mini-batch could not be used to update the running statistics."""


class BatchMoments(NamedTuple):
    """Moments of one mini-batch, each of shape () (per tensor) or (C,) (per channel).

    ``count`` is the number of real (unmasked) elements; variances are biased.
    """

    count: Tensor
    mean_x: Tensor
    var_x: Tensor
    mean_y: Tensor
    var_y: Tensor
    mean_dsq: Tensor


def _stat_dtype(x: Tensor) -> torch.dtype:
    # statistics are computed and stored in float32 at least (mixed precision)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor, channel_dim: int | None) -> list[int]:
    if channel_dim is None:
        return list(range(x.dim()))
    cd = channel_dim % x.dim()
    return [d for d in range(x.dim()) if d != cd]


def _broadcast_shape(x: Tensor, channel_dim: int | None, stat: Tensor) -> Tensor:
    """View a () or (C,) statistic so that it broadcasts against x."""
    if channel_dim is None or stat.dim() == 0:
        return stat
    shape = [1] * x.dim()
    shape[channel_dim % x.dim()] = -1
    return stat.reshape(shape)


def _numel(x: Tensor, dims: list[int]) -> int:
    """Number of elements reduced into one statistic."""
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


def _is_scratch(t: Tensor, *others: Tensor) -> bool:
    """Whether t is a fresh, dense buffer of others[0]'s shape that may be overwritten."""
    if _is_compiling() or _kernels._transforms_active() or _is_recording():
        # the compiler plans buffers itself; vmap cannot batch out= writes; a trace would
        # see the shape test as a tensor comparison
        return False
    ref = others[0]
    try:
        return (
            t.shape == ref.shape
            and t.dtype == ref.dtype
            and t.is_contiguous()
            and all(t.data_ptr() != o.data_ptr() for o in others)
        )
    except RuntimeError:  # tensors without storage (vmap, fake tensors): play safe
        return False


def _check_channel_dim(x: Tensor, channel_dim: int | None) -> None:
    if channel_dim is not None and not -x.dim() <= channel_dim < x.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for an input of shape {tuple(x.shape)}"
        )


def _real(name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError that names the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_options(
    momentum: float | None, bounds: tuple[float, float] | None, beta: float, eps: float
) -> tuple[float | None, tuple[float, float] | None, float, float]:
    """The statistics' options as floats, or a clear error: momentum in (0, 1] or None
    (cumulative average), bounds 0 <= L < 1 < U or None, beta finite >= 0, eps finite > 0."""
    momentum = None if momentum is None else _real("momentum", momentum)
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1] or None, got {momentum}")
    if bounds is not None:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"bounds must be a pair (L, U) or None, got {bounds!r}")
        low, high = (_real("bounds", b) for b in bounds)
        if not 0.0 <= low < 1.0 < high:
            raise ValueError(f"bounds must satisfy 0 <= L < 1 < U, got {bounds}")
        bounds = (low, high)
    beta, eps = _real("beta", beta), _real("eps", eps)
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return momentum, bounds, beta, eps


_RUNNING_NAMES = ("running_rho", "running_rho_prime", "running_mean", "num_batches_tracked")


def _check_state(x: Tensor, channel_dim: int | None, running: tuple[Tensor | None, ...],
                 alpha: Tensor) -> None:  # fmt: skip
    """The state :func:`normalized_activation` reads and writes, checked before anything is
    written: the four running tensors all given or all None; floating-point statistics and
    α, an integer count; shape () per tensor, (C,) per channel (the count () or (C,))."""
    given = [t is not None for t in running]
    if any(given) and not all(given):
        missing = [n for n, g in zip(_RUNNING_NAMES, given, strict=True) if not g]
        raise ValueError(
            f"{', '.join(_RUNNING_NAMES)} must be all tensors (running statistics) or all "
            f"None (batch statistics only); got None for {', '.join(missing)}"
        )
    c = None if channel_dim is None else x.shape[channel_dim]
    want = () if c is None else (c,)
    named = [("alpha", alpha), *zip(_RUNNING_NAMES, running if all(given) else (), strict=False)]
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        counter = name == "num_batches_tracked"
        if counter and (t.is_floating_point() or t.is_complex() or t.dtype is torch.bool):
            raise TypeError(f"num_batches_tracked must be an integer tensor, got {t.dtype}")
        if not counter and not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float32 or float64), got {t.dtype}"
            )
        shape = tuple(t.shape)
        if shape != want and not (counter and shape == ()):
            where = ("per tensor (channel_dim=None)" if c is None
                     else f"per channel: {c} channels in dimension {channel_dim} of x")
            raise ValueError(
                f"{name} must have shape {want} {where}, got {shape}"
            )  # fmt: skip


def _check_mask(x: Tensor, mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            "mask must be a bool tensor (True = real element, False = padding), "
            f"got {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    try:
        return mask.to(x.device).expand_as(x)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the input's shape "
            f"{tuple(x.shape)}; e.g. for (batch, seq, features) pass a (batch, seq, 1) mask"
        ) from None


def batch_moments(
    x: Tensor,
    activation: str | Activation,
    *,
    channel_dim: int | None = None,
    mask: Tensor | None = None,
) -> BatchMoments:
    """Moments of x, y = δ(x) and δ'(x)² over one mini-batch (no gradient).

    Args:
        x: pre-activations, any shape.
        activation: δ, a registered name or an :class:`Activation`.
        channel_dim: None for one statistic over all elements (the paper), or
            the dimension that holds channels for one statistic per channel.
        mask: optional bool tensor broadcastable to x; False elements (padding)
            enter no statistic.
    """
    act = resolve_activation(activation)
    _check_channel_dim(x, channel_dim)
    dims = _reduce_dims(x, channel_dim)
    with torch.no_grad():
        xf = x.detach().to(_stat_dtype(x))
        y = act.fn(xf)
        d = act.derivative(xf)
        fast = None
        if (
            mask is None and channel_dim is None and not _kernels._transforms_active()
            and not _is_compiling()  # traced: torch ops only
        ):  # fmt: skip
            fast = _c_batch_moments(xf, act)
        if fast is not None:
            return fast
        if mask is None and _kernels._transforms_active():
            # under vmap/grad: the same two-pass sums without out= buffers
            n = _numel(xf, dims)
            mean_x, mean_y = xf.mean(dim=dims), y.mean(dim=dims)
            mean_dsq = (d * d).sum(dim=dims) / n
            cx = xf - _broadcast_shape(xf, channel_dim, mean_x)
            cy = y - _broadcast_shape(xf, channel_dim, mean_y)
            var_x, var_y = (cx * cx).sum(dim=dims) / n, (cy * cy).sum(dim=dims) / n
            count = torch.full_like(mean_x, float(n))
        elif mask is None:
            n = _numel(xf, dims)
            mean_x, mean_y = xf.mean(dim=dims), y.mean(dim=dims)
            # two-pass (centred) sums of squares, all in one scratch buffer: few passes,
            # no fresh allocations, and cascade summation keeps float32 accurate
            scratch = d if _is_scratch(d, xf, y) else torch.empty_like(xf)
            mean_dsq = torch.square(d, out=scratch).sum(dim=dims) / n
            torch.sub(xf, _broadcast_shape(xf, channel_dim, mean_x), out=scratch)
            var_x = scratch.square_().sum(dim=dims) / n
            torch.sub(y, _broadcast_shape(xf, channel_dim, mean_y), out=scratch)
            var_y = scratch.square_().sum(dim=dims) / n
            count = torch.full_like(mean_x, float(n))
        else:
            m = _check_mask(x, mask)
            zero = xf.new_zeros(())
            count = m.sum(dim=dims).to(xf.dtype)

            def mean(t: Tensor) -> Tensor:
                # masked-out elements may hold anything (NaN padding included)
                return torch.where(m, t, zero).sum(dim=dims) / count

            def var(t: Tensor, mu: Tensor) -> Tensor:
                return mean((t - _broadcast_shape(xf, channel_dim, mu)).square())

            mean_x, mean_y, mean_dsq = mean(xf), mean(y), mean(d.square())
            var_x, var_y = var(xf, mean_x), var(y, mean_y)
    return BatchMoments(count, mean_x, var_x, mean_y, var_y, mean_dsq)


def _c_batch_moments(xf: Tensor, act: Activation) -> BatchMoments | None:
    """Per-tensor moments of a contiguous float32 CPU x for an activation whose δ' is a
    function of δ's sign (ReLU, LeakyReLU), by the C power sums: one pass over x and
    y = δ(x) instead of about ten, and no δ' tensor (Σδ'² from a count of y > 0). None
    where this does not apply (the torch path then runs).

    y is torch's δ(x), as in the torch path; the sums are shifted by the first element
    (x₀, y₀) so that the variances do not cancel when the mean is large against the
    spread, block-summed in float32 and added in double.
    """
    c_sums, sign = _native.power_sums, act.sign_derivative
    if c_sums is None or sign is None or not _native.readable(xf) or xf.numel() == 0:
        return None
    y = act.fn(xf)
    if not _native.readable(y) or y.numel() != xf.numel():
        return None
    n = xf.numel()
    # δ' = p where δ(x) > 0, q elsewhere: Σδ'² = p²·#{δ > 0} + q²·(the rest)
    sums = c_sums(xf.data_ptr(), y.data_ptr(), n, _native.DSQ_SIGN_Y, *sign, True)
    values = _moments_of_sums(sums, n)
    return BatchMoments(*torch.tensor(values, dtype=xf.dtype, device=xf.device).unbind())


def _moments_of_sums(sums: Sequence[float], count: int) -> list[float]:
    """(count, mean_x, var_x, mean_y, var_y, mean_dsq) from the C passes' shifted sums
    (Σ(x−kx), Σ(x−kx)², Σ(y−ky), Σ(y−ky)², Σδ'², kx, ky), in double."""
    sx, sxx, sy, syy, sg, kx, ky = sums
    n = float(count)
    mx, my = sx / n, sy / n
    dsq = sg / n if sy == sy else math.nan  # a NaN in x is a NaN in every moment
    return [n, kx + mx, max(sxx / n - mx * mx, 0.0), ky + my, max(syy / n - my * my, 0.0), dsq]


def merge_moments(stacked: BatchMoments) -> BatchMoments:
    """Combine moments of K shards stacked along a leading dimension (K, ...).

    Exact (Chan et al.'s parallel variance): the result equals the moments of
    the union of the shards. Shards with count 0 contribute nothing (their NaN
    moments are dropped); a NaN or Inf in a real shard reaches the result, so the
    union is rejected as one process's batch with that value would be.
    """
    n = stacked.count
    total = n.sum(dim=0)
    w = torch.where(total > 0, n / total, torch.zeros_like(n))
    real = n > 0

    def of_real(t: Tensor) -> Tensor:
        return torch.where(real, t, torch.zeros_like(t))

    def mean(t: Tensor) -> Tensor:
        return (w * of_real(t)).sum(dim=0)

    mean_x, mean_y = mean(stacked.mean_x), mean(stacked.mean_y)

    def var(v: Tensor, mu_k: Tensor, mu: Tensor) -> Tensor:
        return (w * (of_real(v) + (of_real(mu_k) - mu).square())).sum(dim=0)

    empty = total == 0
    nan = torch.full_like(mean_x, float("nan"))
    out = BatchMoments(
        total,
        mean_x,
        var(stacked.var_x, stacked.mean_x, mean_x),
        mean_y,
        var(stacked.var_y, stacked.mean_y, mean_y),
        mean(stacked.mean_dsq),
    )
    # an empty union has no moments; keep NaN so that the batch is rejected
    return BatchMoments(out.count, *(torch.where(empty, nan, t) for t in out[1:]))


def moments_to_stats(moments: BatchMoments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch statistics ρ_M = Var[y]/Var[x] (eq. 31), ρ'_M = E[δ'²], μ_M = E[y].

    Returns ``(rho, rho_prime, mu, valid)``; ``valid`` is False where the batch
    cannot define them: fewer than 2 real elements, a constant batch
    (Var[x] at rounding level), ρ_M or ρ'_M = 0 (e.g. ReLU on an all-negative
    batch), or NaN/Inf anywhere.
    """
    count, mean_x, var_x, mean_y, var_y, mean_dsq = moments
    rho = var_y / var_x
    tiny = torch.finfo(var_x.dtype).eps
    # a batch whose spread is below a few ulps of its mean is constant up to rounding
    constant = var_x <= (4 * tiny * mean_x.abs()).square() + torch.finfo(var_x.dtype).tiny
    valid = (
        (count >= 2)
        & ~constant
        & torch.isfinite(rho)
        & torch.isfinite(mean_dsq)
        & torch.isfinite(mean_y)
        & (rho > 0)
        & (mean_dsq > 0)
    )
    return rho, mean_dsq, mean_y, valid


def update_running_stats(
    running_rho: Tensor,
    running_rho_prime: Tensor,
    running_mean: Tensor,
    num_batches_tracked: Tensor,
    rho: Tensor,
    rho_prime: Tensor,
    mu: Tensor,
    valid: Tensor,
    *,
    momentum: float | None,
    bounds: tuple[float, float] | None,
) -> None:
    """Update the running statistics in place (eq. 16–18).

    On the first batch (``num_batches_tracked == 0``) each running value is set
    to the batch value. Afterwards μ ← m·μ_M + (1−m)·μ, and ρ (ρ' alike) is
    blended only when L·ρ < ρ_M < U·ρ, else kept. Entries where ``valid`` is
    False keep their values. ``momentum=None`` gives the cumulative average,
    as in ``nn.BatchNorm``. Uses tensor ops only (no host synchronisation).

    ``num_batches_tracked`` is one count (shape ()), raised when any entry was
    valid, or one count per statistic (the statistics' shape, e.g. (C,)), each
    raised when its entry was valid: then "first" and the cumulative average are
    per channel, so a channel that could not use the first batch (dead, constant,
    NaN) is initialised by its own first usable batch.
    """
    with torch.no_grad():
        first = num_batches_tracked == 0
        if momentum is None:
            m = 1.0 / (num_batches_tracked + 1).to(running_rho.dtype)
        else:
            m = momentum

        def blend(run: Tensor, new: Tensor, filtered: bool) -> Tensor:
            new = new.to(run.dtype)
            out = run + m * (new - run)  # eq. 16: m·new + (1 − m)·run
            if filtered and bounds is not None:
                low, high = bounds
                inside = (low * run < new) & (new < high * run)  # eq. 17–18 filter
                out = torch.where(inside, out, run)
            out = torch.where(first, new, out)
            return torch.where(valid, out, run)

        running_rho.copy_(blend(running_rho, rho, True))
        running_rho_prime.copy_(blend(running_rho_prime, rho_prime, True))
        running_mean.copy_(blend(running_mean, mu, False))
        per_statistic = num_batches_tracked.shape == valid.shape  # () per tensor: the same
        num_batches_tracked.add_((valid if per_statistic else valid.any())
                                 .to(num_batches_tracked.dtype))  # fmt: skip


def _normalization_stats(
    moments: BatchMoments,
    running_rho: Tensor | None,
    running_rho_prime: Tensor | None,
    running_mean: Tensor | None,
    num_batches_tracked: Tensor | None,
    *,
    training: bool,
    momentum: float | None,
    bounds: tuple[float, float] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(rho, rho_prime, mu, valid)`` the op normalizes with after a batch: in training
    with running statistics, the running values just updated (eq. 16–18); otherwise the
    batch's, with λ = 1, μ = 0 (ρ = ρ' = 1) where the batch is unusable."""
    rho, rho_prime, mu, valid = moments_to_stats(moments)
    if running_rho is not None and training:
        update_running_stats(
            running_rho, running_rho_prime, running_mean, num_batches_tracked,
            rho, rho_prime, mu, valid, momentum=momentum, bounds=bounds,
        )  # fmt: skip
        return running_rho, running_rho_prime, running_mean, valid
    # no running values to fall back on: an unusable batch gets λ = 1, μ = 0
    return (torch.where(valid, rho, torch.ones_like(rho)),
            torch.where(valid, rho_prime, torch.ones_like(rho_prime)),
            torch.where(valid, mu, torch.zeros_like(mu)), valid)  # fmt: skip


def lambda_factor(rho: Tensor, rho_prime: Tensor, eps: float | None = 1e-5) -> Tensor:
    """λ = sqrt((ρ + ρ') / (2ρρ')) (eq. 13).

    ρ, ρ' are floored at ``eps`` to keep λ finite; ``eps=None`` gives the exact
    value (inf where ρ or ρ' is 0), as the analysis tools need. Python floats in,
    a float out (IEEE semantics: inf, NaN as for tensors), for per-step host code.
    """
    if not isinstance(rho, Tensor) and not isinstance(rho_prime, Tensor):
        return _lambda_float(float(rho), float(rho_prime), eps)
    if eps is not None:
        rho, rho_prime = rho.clamp_min(eps), rho_prime.clamp_min(eps)
    return torch.sqrt((rho + rho_prime) / (2 * rho * rho_prime))


SAVE_MODES = ("auto", "input", "output")


# "auto" saves what the plain torch op saves: F.relu keeps its output (code written for
# nn.ReLU never changes it in place), F.leaky_relu its input (code may change its output)
_PLAIN_SAVES_OUTPUT = frozenset({"relu"})


def _saves_output(act: Activation, save: str) -> bool:
    """Whether the op saves its output (True) or its input x (False) for backward."""
    if save == "input":
        return False
    if save == "auto":
        return act.sign_derivative is not None and act.name in _PLAIN_SAVES_OUTPUT
    if save == "output":
        if act.sign_derivative is None:
            raise ValueError(
                f"save='output' needs an activation whose derivative is a function of its "
                f"sign (Activation.sign_derivative), which {act!r} does not declare; "
                "use save='input' or 'auto'"
            )
        return True
    raise ValueError(f"save must be one of {', '.join(SAVE_MODES)}, got {save!r}")


def _output_saving(act: Activation, save: str, x: Tensor, scale: Tensor) -> bool:
    """:func:`_saves_output`, and a gradient will be recorded and this is no export trace.

    Without a recorded gradient nothing is saved: the output is then exactly the
    input-saving op's (no tie is moved), and inference graphs (ONNX, ``torch.export``,
    tracing) keep the plain formula.
    """
    if not _saves_output(act, save):
        return False
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        return False
    return not _is_recording()


def _is_recording() -> bool:
    """A trace or export (``torch.jit.trace``, ONNX, ``torch.export``) records the graph."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    # torch.onnx is imported lazily; reading the attribute costs ~13 µs per call, and
    # without the module loaded no ONNX export can be running
    onnx = sys.modules.get("torch.onnx")
    return (torch.jit.is_tracing() or exporting()
            or (onnx is not None and onnx.is_in_onnx_export()))  # fmt: skip


def _tie_bounds(s: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, lo, hi)`` for the output-saving op, from s, b already cast to x's dtype.

    t = (0 − b)·s is the output wherever δ(x) = 0, computed as the forward does
    (0 − b is exact, then one rounded product). Where δ(x) > 0 the output lies on
    the far side of t (above for s > 0, below for s < 0) or rounds onto t; those
    ties are moved to the neighbouring float: clamping such elements to
    [lo, hi] (lo = next float above t when s > 0, hi = next float below t when
    s < 0, otherwise unbounded) changes nothing else. With s = 0 nothing moves.
    """
    t = (-b) * s
    inf = torch.full_like(t, float("inf"))
    lo = torch.where(s > 0, torch.nextafter(t, inf), -inf)
    hi = torch.where(s < 0, torch.nextafter(t, -inf), inf)
    return t, lo, hi


_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                  torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _ties_possible(y: Tensor, s: Tensor, b: Tensor) -> bool:
    """False when no output with δ(x) > 0 can round onto t = s·(0 − b): then the tie
    search (bool passes, slow on CPU) is skipped. ``y`` = δ(x) before the shift.

    A tie needs 0 < δ(x) ≤ τ with τ = 8·(ulp(|b|) + ulp(0))·(1 + 1/|s|): for larger
    δ, fl(δ − b) is at least 3 ulp(b) beyond −b and the product with s cannot round
    back onto t (ulp(b·s) ≤ 2|s|·ulp(b)); with b = 0 only an underflow of δ·s to 0 can
    tie. Checked exactly on the bit patterns (non-negative floats order like their
    bits): is any 0 < |δ| ≤ τ? One integer pass and a min, on CPU outside compile and
    vmap; elsewhere assume ties (the branch-free path runs)."""
    int_dtype = _SAME_SIZE_INT.get(y.dtype)
    if (int_dtype is None or y.device.type != "cpu" or _is_compiling()
            or _kernels._transforms_active() or y.numel() == 0):  # fmt: skip
        return True
    with torch.no_grad():
        inf = torch.tensor(float("inf"), dtype=y.dtype, device=y.device)
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        abs_b = b.detach().abs().to(y.dtype)
        ulp = (torch.nextafter(abs_b, inf) - abs_b).double() + torch.nextafter(zero, inf).double()
        tau = float((8 * ulp * (1 + 1 / s.detach().double().abs())).max())
        if not tau < torch.finfo(y.dtype).max:  # s = 0, huge b: search
            return True
        tau_bits = torch.tensor(tau, dtype=y.dtype, device=y.device).view(int_dtype).item()
        magnitude = torch.iinfo(int_dtype).max  # all bits but the sign
        bits = y.reshape(-1).view(int_dtype)
        buf = _int_scratch(int_dtype, min(bits.numel(), _TIE_CHUNK))
        for chunk in bits.split(_TIE_CHUNK):
            # |δ|'s bits − 1, with ±0 (→ −1) folded to the largest value: min < bits(τ) ⇔ tie
            key = torch.bitwise_and(chunk, magnitude, out=buf[: chunk.numel()])
            if key.sub_(1).bitwise_and_(magnitude).amin() < tau_bits:
                return True
        return False


_TIE_CHUNK = 1 << 18  # elements per pass of the tie search (a reused 1-2 MiB buffer)
_scratch = threading.local()  # per thread (nn.DataParallel runs replicas in threads)


def _int_scratch(dtype: torch.dtype, numel: int) -> Tensor:
    """A reused CPU integer buffer of at least ``numel`` elements: fresh pages per call
    cost more than the search itself."""
    bufs = _scratch.__dict__.setdefault("int", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype, device="cpu")
    return buf


def _nudge_ties(out: Tensor, positive: Tensor, s: Tensor, b: Tensor, inplace: bool) -> Tensor:
    """Where δ(x) > 0 but the output rounded onto t, move it one ulp away from t."""
    t, lo, hi = _tie_bounds(s, b)
    if _is_compiling():
        # inductor may keep bf16 intermediates in float32: an equality test with t could
        # miss a value that rounds onto t only when stored; a clamp to the bound is exact
        return torch.where(positive, out.clamp(lo, hi), out)
    tie = torch.eq(out, t).logical_and_(positive)
    if out.device.type == "cpu" and not _kernels._transforms_active() and not bool(tie.any()):
        return out  # the common case in float32/float64: no tie, no full-size pass more
    away = torch.where(s > 0, lo, torch.where(s < 0, hi, t))
    return torch.where(tie, away, out, out=out) if inplace else torch.where(tie, away, out)


def _scale_has_zero(scale: Tensor) -> bool:
    """s == 0 somewhere, checked only where it costs no device synchronisation."""
    if _is_compiling() or _kernels._transforms_active() or scale.device.type != "cpu":
        return False
    return bool((scale == 0).any())


def _save_input_or_output(ctx: Any, x: Tensor, output: Tensor, scale: Tensor, shift: Tensor,
                          save_output: bool) -> None:  # fmt: skip
    """What every path's backward keeps: the output when ``save_output`` (the ReLU family's
    memory saving), else x; with the scale and shift. Sets ``ctx.saved_output``."""
    # s = 0 leaves no trace of δ(x) − shift in the output: keep x where that is seen
    ctx.saved_output = bool(save_output) and not _scale_has_zero(scale)
    ctx.save_for_backward(output if ctx.saved_output else x, scale, shift)


def _grads_from_output(
    out: Tensor,
    grad_out: Tensor,
    scale: Tensor,
    shift: Tensor,
    act: Activation,
    channel_dim: int | None,
    need_x: bool,
    need_scale: bool,
    inplace: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The backward from the saved output ``out`` = s·(δ(x) − b) (ties nudged).

    δ'(x) = p where δ(x) > 0, else q (``act.sign_derivative``); δ(x) > 0 exactly
    where out lies beyond t = s·(0 − b) in the direction of sign(s). The α-gradient
    partial sum Σ g·(δ(x) − b) is Σ g·out / s. Differentiable (double backward)
    through out, g and s; the comparison carries no gradient (δ'' = 0).
    """
    s = _broadcast_shape(out, channel_dim, scale).to(out.dtype)
    grad_x = grad_scale = None
    if need_x:
        p, q = act.sign_derivative
        with torch.no_grad():
            sd = s.detach()
            t = (-_broadcast_shape(out, channel_dim, shift).to(out.dtype)) * sd
            # sign(out − t)·sign(s) > 0 ⇔ δ(x) > 0; NaN stays NaN, s = 0 gives 0
            d = torch.sub(out.detach(), t).sign_().mul_(torch.sign(sd)).relu_()
            if (p, q) != (1.0, 0.0):
                d.mul_(p - q).add_(q)
        if inplace and _is_scratch(d, out, grad_out):
            grad_x = d.mul_(grad_out).mul_(s)
        else:
            grad_x = grad_out * d * s
    if need_scale:
        dims = _reduce_dims(out, channel_dim if scale.dim() else None)
        weighted = torch.mul(grad_out, out)
        # divide by the s the forward multiplied with (rounded to out's dtype)
        grad_scale = weighted.sum(dim=dims, dtype=scale.dtype) / scale.to(out.dtype).to(scale.dtype)
    return grad_x, grad_scale


def _lambda_float(rho: float, rho_prime: float, eps: float | None) -> float:
    """:func:`lambda_factor` on Python floats, with the tensor version's inf/NaN results."""
    if eps is not None:  # clamp_min: NaN stays NaN
        rho = rho if math.isnan(rho) or rho >= eps else eps
        rho_prime = rho_prime if math.isnan(rho_prime) or rho_prime >= eps else eps
    num, den = rho + rho_prime, 2 * rho * rho_prime
    if den == 0:  # x/±0 = ±inf by the signs of x and of the zero; 0/0 = NaN
        q = math.copysign(math.inf, num) * math.copysign(1.0, den) if num != 0 else math.nan
    else:
        q = num / den
    return math.sqrt(q) if q >= 0 else math.nan  # NaN and negative quotients give NaN


class _NormalizedActivationFn(torch.autograd.Function):
    """out = scale·(δ(x) − shift); saves x or the output (and the per-channel scale/shift).

    Backward (appendix eq. 36–37, 41–42): ∂L/∂x = scale·δ'(x)·g and
    ∂L/∂scale = Σ g·(δ(x) − shift); shift carries no gradient. With
    ``save_output`` (activations with ``sign_derivative``) the output is saved
    instead of x, as a plain ``F.relu`` does, and δ'(x), δ(x) − shift are
    recovered from it (:func:`_grads_from_output`); the forward then moves the
    rare outputs with δ(x) > 0 that rounded onto s·(0 − shift) by one ulp.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, shift, activation, channel_dim, save_output=False):  # type: ignore[override]
        s = _broadcast_shape(x, channel_dim, scale).to(x.dtype)
        b = _broadcast_shape(x, channel_dim, shift).to(x.dtype)
        y = activation.fn(x)
        search = save_output and _ties_possible(y, s, b)
        positive = y > 0 if search else None
        scratch = _is_scratch(y, x)
        # a fresh buffer: finish in place, no extra allocation
        out = y.sub_(b).mul_(s) if scratch else (y - b) * s
        if search:
            out = _nudge_ties(out, positive, s, b, inplace=scratch)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, activation, channel_dim, *rest = inputs
        _save_input_or_output(ctx, x, output, scale, shift, bool(rest and rest[0]))
        ctx.activation = activation
        ctx.channel_dim = channel_dim

    @staticmethod
    def backward(ctx, grad_out):
        saved, scale, shift = ctx.saved_tensors
        act, cd = ctx.activation, ctx.channel_dim
        # in place on fresh buffers unless a graph of the backward is being built
        inplace = not torch.is_grad_enabled()
        if ctx.saved_output:
            grad_x, grad_scale = _grads_from_output(
                saved, grad_out, scale, shift, act, cd, ctx.needs_input_grad[0],
                ctx.needs_input_grad[1], inplace,
            )  # fmt: skip
            return grad_x, grad_scale, None, None, None, None
        x = saved
        s = _broadcast_shape(x, cd, scale).to(x.dtype)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            d = act.derivative(x)
            if inplace and _is_scratch(d, x, grad_out):
                grad_x = d.mul_(grad_out).mul_(s)
            else:
                grad_x = grad_out * d * s
        if ctx.needs_input_grad[1]:
            b = _broadcast_shape(x, cd, shift).to(x.dtype)
            y = act.fn(x)
            if inplace and _is_scratch(y, x, grad_out):
                weighted = y.sub_(b).mul_(grad_out)
            else:
                weighted = (y - b) * grad_out
            dims = _reduce_dims(x, cd if scale.dim() else None)
            grad_scale = weighted.sum(dim=dims, dtype=scale.dtype)
        return grad_x, grad_scale, None, None, None, None


class _NormalizedActivationJvpFn(_NormalizedActivationFn):
    """The op with its forward-mode rule, used only while forward AD is on
    (:func:`apply_function` picks it): torch.compile cannot trace a Function that
    defines ``jvp``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormalizedActivationFn.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])  # x, scale, shift

    @staticmethod
    def jvp(ctx, x_dot, scale_dot, shift_dot, *_):
        """d out = s·δ'(x)·ẋ + ṡ·(δ(x) − shift), the statistics held fixed as in backward
        (shift carries no tangent, as it carries no gradient)."""
        x, scale, shift = ctx.saved_tensors
        act, cd = ctx.activation, ctx.channel_dim
        out_dot = torch.zeros_like(x)
        if x_dot is not None:
            s = _broadcast_shape(x, cd, scale).to(x.dtype)
            out_dot = out_dot + act.derivative(x) * x_dot * s
        if scale_dot is not None:
            y = act.fn(x) - _broadcast_shape(x, cd, shift).to(x.dtype)
            out_dot = out_dot + _broadcast_shape(x, cd, scale_dot).to(x.dtype) * y
        return out_dot


_NormalizedActivationFn.jvp_variant = _NormalizedActivationJvpFn


def apply_normalization(
    x: Tensor,
    activation: str | Activation,
    scale: Tensor,
    shift: Tensor,
    channel_dim: int | None = None,
    *,
    save: str = "auto",
) -> Tensor:
    """scale·(δ(x) − shift) with the memory-lean backward.

    ``scale`` and ``shift`` have shape () or (C,) (C along ``channel_dim``);
    the gradient flows to x and to scale, never to shift. ``save`` picks the one
    full-size tensor kept for backward: ``"input"`` (x), ``"output"`` (the result,
    as ``F.relu`` does; only for activations with ``sign_derivative``: ReLU,
    LeakyReLU with slope ≥ 0), or ``"auto"`` (default: what the plain torch op
    keeps — the output for ReLU, x otherwise, so code written for the plain module
    keeps working). Saving the output lets the next layer share the tensor (a plain
    ReLU model's memory); the gradients are the same (docs/core.md, "Gradients and
    memory").
    """
    act = resolve_activation(activation)
    save_output = _output_saving(act, save, x, scale)
    return apply_function(
        _NormalizedActivationFn, x, scale, shift, act, channel_dim, save_output
    )


class StatisticsStep(NamedTuple):
    """One call's statistics step (eq. 13, 15–18), as every path of
    :func:`normalized_activation` (the reference, the native, Triton and fused kernels)
    takes it: the running buffers (ρ, ρ', μ, count; all None: none), α, the options as
    checked by :func:`normalized_activation`, and the moments' callbacks."""

    running: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]
    alpha: Tensor
    training: bool
    momentum: float | None
    bounds: tuple[float, float] | None
    beta: float
    center: bool
    eps: float
    reduce_moments: Callable[[BatchMoments], BatchMoments] | None
    on_moments: Callable[[BatchMoments], None] | None


def _uses_batch(step: StatisticsStep) -> bool:
    """Whether the step computes batch statistics (training, or no running values)."""
    return step.training or step.running[0] is None


def _scale_and_shift(
    rho: Tensor, rho_prime: Tensor, mu: Tensor, alpha: Tensor, *, beta: float, center: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The op's ``scale`` = λ + β·tanh α (eq. 13, 15; differentiable in α) and ``shift``
    = μ (or 0 without centring) from the statistics it normalizes with."""
    lam = lambda_factor(rho.detach(), rho_prime.detach(), eps)
    scale = lam.to(alpha.dtype) + beta * torch.tanh(alpha)
    # a copy: the buffer may be updated again before this step's backward runs
    shift = mu.detach().clone() if center else torch.zeros_like(mu)
    return scale, shift


def _scale_and_shift_by_tensor_rules(
    moments: BatchMoments | None, step: StatisticsStep, *, check_on_host: bool
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` from a batch's moments (None: eval, the running values) by tensor
    ops: the moments' observer and cross-process reduction, the statistics with the
    running update (eq. 16–18), then λ (eq. 13) and the scale (eq. 15). The reference's
    step, and the fast paths' where their one-call step does not apply.
    ``check_on_host``: read the batch's validity back and warn when it is unusable (not
    on a GPU, under vmap or compile: no host synchronisation)."""
    if moments is not None:
        if step.on_moments is not None:
            step.on_moments(moments)  # this process's, before the reduction
        if step.reduce_moments is not None:
            moments = step.reduce_moments(moments)
        rho, rho_prime, mu, valid = _normalization_stats(
            moments, *step.running, training=step.training, momentum=step.momentum,
            bounds=step.bounds,
        )  # fmt: skip
        if check_on_host and not bool(valid.all()):
            _warn_unusable_batch()
    else:
        rho, rho_prime, mu = step.running[:3]
    return _scale_and_shift(rho, rho_prime, mu, step.alpha, beta=step.beta, center=step.center,
                            eps=step.eps)  # fmt: skip


_INTERNAL_PREFIXES = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the first frame outside
    anact and torch: the user's line that called the layer or the function, whichever
    path (eager, native, Triton, fused) found the problem."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_PREFIXES):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def _warn_unusable_batch() -> None:
    """Warn that a batch could not define the statistics (called by every path's check)."""
    warnings.warn(
        "a mini-batch could not define the activation statistics (fewer than 2 real "
        "elements, a constant batch, an all-masked batch, a dead activation or "
        "NaN/Inf); it was left out of the running statistics",
        StatisticsWarning,
        stacklevel=_outside_stacklevel(),
    )


def _is_compiling() -> bool:
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


try:  # what Function.apply does to its arguments outside functorch transforms
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - a torch without it: nothing to unwrap

    def _unwrap_dead_wrappers(args: tuple) -> tuple:
        return args


def apply_function(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` without the per-call ``inspect.signature`` binding that
    ``Function.apply`` does for Functions with ``setup_context`` (~20 µs a call on CPU,
    a sizeable share of a small layer's forward). Every argument of ``fn.forward`` must
    be passed, positionally, so that binding would change nothing. Under functorch
    transforms (vmap, grad) and torch.compile tracing, the full ``fn.apply``. Under
    forward AD, ``fn.jvp_variant`` where the Function has one (its forward-mode rule)."""
    if _forward_ad_active():
        fn = getattr(fn, "jvp_variant", fn)
    if _is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    # what Function.apply does outside transforms, after binding
    return super(torch.autograd.Function, fn).apply(*_unwrap_dead_wrappers(args))


def normalized_activation(
    x: Tensor,
    activation: str | Activation,
    running_rho: Tensor | None,
    running_rho_prime: Tensor | None,
    running_mean: Tensor | None,
    num_batches_tracked: Tensor | None,
    alpha: Tensor,
    *,
    training: bool,
    momentum: float | None = 0.1,
    bounds: tuple[float, float] | None = (0.2, 5.0),
    beta: float = 0.3,
    center: bool = True,
    channel_dim: int | None = None,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    reduce_moments: Callable[[BatchMoments], BatchMoments] | None = None,
    save: str = "auto",
    on_moments: Callable[[BatchMoments], None] | None = None,
) -> Tensor:
    """The normalized activation function δ̂(x) = (λ + β·tanh α)(δ(x) − μ) (eq. 15).

    Like ``F.batch_norm``: in training (or when no running statistics are
    given) it computes the batch statistics; in training with running
    statistics it updates them in place (eq. 16–18) and normalizes with the
    values just updated; in eval it uses the stored values and changes nothing.

    Args:
        x: pre-activations of any shape; the output has x's shape and dtype.
        running_*: buffers of shape () or (C,) (float32 or float64), or all None.
        alpha: the learnable α, shape () or (C,).
        mask: bool, broadcastable to x; padding (False) enters no statistic,
            but its outputs are still computed.
        reduce_moments: combines the batch moments across processes before
            they are used (distributed training); identity when None.
        save: what backward keeps, ``"auto"`` | ``"input"`` | ``"output"``
            (see :func:`apply_normalization`).
        on_moments: called with this process's batch moments (before
            ``reduce_moments``) whenever they are computed; e.g. a training monitor.
    """
    _check_input(x)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    _check_channel_dim(x, channel_dim)
    running = (running_rho, running_rho_prime, running_mean, num_batches_tracked)
    if torch.jit.is_tracing():  # a trace's sizes are tensors: the checks, without warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            _check_state(x, channel_dim, running, alpha)
    else:
        _check_state(x, channel_dim, running, alpha)
    momentum, bounds, beta, eps = _check_options(momentum, bounds, beta, eps)
    step = StatisticsStep(running, alpha, training, momentum, bounds, beta, center, eps,
                          reduce_moments, on_moments)  # fmt: skip
    return _normalized_activation(x, resolve_activation(activation), step,
                                  channel_dim=channel_dim, mask=mask, save=save)  # fmt: skip


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"normalized activation needs a tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"normalized activation needs a floating-point input, got {x.dtype}")
    if x.layout is not torch.strided or x.is_nested:
        raise TypeError(
            f"normalized activation needs a dense (strided) tensor, got layout {x.layout}"
            f"{' (nested)' if x.is_nested else ''}; convert it first (e.g. x.to_dense())"
        )


def _normalized_activation(
    x: Tensor, act: Activation, step: StatisticsStep, *, channel_dim: int | None,
    mask: Tensor | None, save: str,
) -> Tensor:
    """:func:`normalized_activation` after the checks of x, its state and its options,
    which a :class:`anact.NormalizedActivation` makes when it is built and loaded and, for
    x, at each call (its forward calls this directly: a few µs less per call)."""
    _saves_output(act, save)  # raises on a bad value before any statistic is updated
    if mask is not None and not step.training and step.running[0] is not None:
        _check_mask(x, mask)  # unused in eval, but a bad one is an error there too
    # a fast path (anact.kernels.set_backend) when one applies; the code below is the reference
    fast = _kernels.dispatch(
        x, act, step, channel_dim=channel_dim, mask=mask,
        save_output=lambda scale: _output_saving(act, save, x, scale),
    )  # fmt: skip
    if fast is not None:
        return fast
    moments = None
    if _uses_batch(step):
        moments = batch_moments(x, act, channel_dim=channel_dim, mask=mask)
    scale, shift = _scale_and_shift_by_tensor_rules(
        moments, step, check_on_host=x.device.type == "cpu" and not _is_compiling()
        and not _kernels._transforms_active(),
    )  # fmt: skip
    save_output = _output_saving(act, save, x, scale)
    return apply_function(
        _NormalizedActivationFn, x, scale, shift, act, channel_dim, save_output
    )
