"""The fused fast path of :func:`anact.functional.normalized_activation`.

The eager reference reads x about a dozen times per training step (δ(x), δ'(x),
two ``var_mean``, the output, and δ, δ' again in backward). The fast path reads
it the minimum number of times:

* forward, pass 1 (:func:`_prepare`): one sweep over x computes Σ(x−k), Σ(x−k)²,
  Σ(y−k_y), Σ(y−k_y)², Σδ'(x)² (y = δ(x)); then, on tiny tensors, ρ_M, ρ'_M, μ_M
  (eq. 31), the running update (eq. 16–18) and λ (eq. 13);
* forward, pass 2 (:func:`_output`): out = s·(δ(x) − μ) (eq. 15);
* backward, one pass (:func:`_backward`): ∂L/∂x = s·δ'(x)·g and the partial sum
  ∂L/∂s = Σ g·(δ(x) − μ) (appendix eq. 36–37, 41–42) read x and g once.

Cancellation: sums of squares in float32 lose everything when |mean| ≫ std.
The sums are taken about a pilot k = the first element (per channel), which is
within a few standard deviations of the mean, so E[(x−k)²] − E[x−k]² loses at
most a few bits. A constant batch gives exactly x − k = 0, so the constant-batch
guard of :func:`anact.functional.moments_to_stats` sees var = 0 as the reference
does. Inductor accumulates float sums by cascade summation.

With a mask, the pilot could be padding (anything, NaN included), so the masked
moments are the reference formulas (mean, then centred squares: two sweeps).

Each function here is plain torch code; :mod:`anact.kernels` runs it as is
(backend ``"fused"``, for testing) or through ``torch.compile`` (``"compiled"``),
which fuses each into one loop over x (C++/OpenMP on CPU, Triton on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from anact import functional as AF
from anact.activations import Activation

__all__ = [
    "PrepareConfig",
    "prepare",
    "output",
    "backward_pass",
    "output_nudged",
    "backward_from_output",
    "FusedNormalizedActivationFn",
    "create_graph_grads",
]


@dataclass(frozen=True)
class PrepareConfig:
    """The constant (non-tensor) arguments of one forward pass; part of the compile key."""

    channel_dim: int | None  # normalized to 0..dim-1, or None
    training: bool
    has_running: bool
    has_mask: bool
    momentum: float | None
    bounds: tuple[float, float] | None
    center: bool
    eps: float
    reduce_moments: bool  # when True, _prepare stops after the moments
    observe: bool = False  # when True, _prepare also returns the moments (for a monitor)

    @classmethod
    def of(cls, step: AF.StatisticsStep, channel_dim: int | None,
           has_mask: bool) -> PrepareConfig:  # fmt: skip
        """The configuration of a call's :class:`anact.functional.StatisticsStep`."""
        has_running = step.running[0] is not None
        bounds = step.bounds
        return cls(
            channel_dim=channel_dim, training=step.training, has_running=has_running,
            has_mask=has_mask, momentum=step.momentum,
            bounds=None if bounds is None else (float(bounds[0]), float(bounds[1])),
            center=step.center, eps=float(step.eps),
            reduce_moments=step.reduce_moments is not None,
            observe=step.on_moments is not None and step.reduce_moments is None
            and (step.training or not has_running),
        )  # fmt: skip


def _gelu_joint(x: Tensor) -> tuple[Tensor, Tensor]:
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
    return x * cdf, cdf + x * torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))


def _swish_joint(x: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    return x * s, s * (1 + x * (1 - s))


# δ and δ' sharing their transcendental (one exp/erf instead of two): the compiler
# cannot merge F.silu's exp with sigmoid's inside δ'; same values up to rounding
_JOINT = {(F.silu, "swish"): _swish_joint, (F.gelu, "gelu"): _gelu_joint}


def fn_and_derivative(act: Activation, x: Tensor) -> tuple[Tensor, Tensor]:
    """(δ(x), δ'(x)), sharing work for the built-in swish and GELU."""
    joint = _JOINT.get((act.fn, act.name))
    if joint is not None:
        return joint(x)
    return act.fn(x), act.derivative(x)


def _pilot(t: Tensor, channel_dim: int | None) -> Tensor:
    """The first element of t (per channel), shaped to broadcast against t."""
    if channel_dim is None:
        return t.reshape(-1)[:1].reshape([1] * t.dim())
    index: list[Any] = [slice(0, 1)] * t.dim()
    index[channel_dim] = slice(None)
    return t[tuple(index)]


def fused_moments(x: Tensor, act: Activation, channel_dim: int | None) -> AF.BatchMoments:
    """:func:`anact.functional.batch_moments` without a mask, as one sweep over x."""
    dims = AF._reduce_dims(x, channel_dim)
    xf = x.to(AF._stat_dtype(x))
    y, d = fn_and_derivative(act, xf)
    dsq = d.square()
    kx = _pilot(xf, channel_dim)
    ky = act.fn(kx)
    xs, ys = xf - kx, y - ky
    n = x.numel() // (1 if channel_dim is None else x.shape[channel_dim])
    inv_n = 1.0 / n
    s1x, s2x = xs.sum(dim=dims), xs.square().sum(dim=dims)
    s1y, s2y = ys.sum(dim=dims), ys.square().sum(dim=dims)
    mean_xs, mean_ys = s1x * inv_n, s1y * inv_n
    # E[(x−k)²] − E[x−k]²; clamped since rounding may leave −ulp on a constant batch
    var_x = (s2x * inv_n - mean_xs.square()).clamp_min(0)
    var_y = (s2y * inv_n - mean_ys.square()).clamp_min(0)
    mean_x = kx.reshape(mean_xs.shape) + mean_xs
    mean_y = ky.reshape(mean_ys.shape) + mean_ys
    mean_dsq = dsq.sum(dim=dims) * inv_n
    count = torch.full_like(mean_x, float(n))
    return AF.BatchMoments(count, mean_x, var_x, mean_y, var_y, mean_dsq)


def prepare(
    x: Tensor,
    mask: Tensor | None,
    running: tuple[Tensor | None, ...],
    *,
    act: Activation,
    cfg: PrepareConfig,
) -> tuple[Tensor, ...]:
    """Forward pass 1: the batch moments, the running update and λ, μ (no gradient);
    ``running``: the buffers ρ, ρ', μ, count (all None: none).

    Returns ``(lam, shift, valid)``, or the six moments when
    ``cfg.reduce_moments`` (the caller reduces them and calls :func:`finish`), or
    ``(lam, shift, valid, *moments)`` when ``cfg.observe``.
    """
    if cfg.training or not cfg.has_running:
        if cfg.has_mask:
            moments = AF.batch_moments(x, act, channel_dim=cfg.channel_dim, mask=mask)
        else:
            moments = fused_moments(x, act, cfg.channel_dim)
        if cfg.reduce_moments:
            return tuple(moments)
        out = finish(moments, running, cfg=cfg)
        return (*out, *moments) if cfg.observe else out
    return finish(None, running, cfg=cfg)


def finish(
    moments: AF.BatchMoments | None, running: tuple[Tensor | None, ...], *, cfg: PrepareConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics → running update → ``(lam, shift, valid)``, as the reference does."""
    if moments is not None:
        rho, rho_prime, mu, valid = AF._normalization_stats(
            moments, *running, training=cfg.training, momentum=cfg.momentum, bounds=cfg.bounds
        )
    else:
        rho, rho_prime, mu = running[:3]
        valid = torch.ones((), dtype=torch.bool, device=rho.device)
    lam = AF.lambda_factor(rho, rho_prime, cfg.eps)
    shift = mu.clone() if cfg.center else torch.zeros_like(mu)
    return lam, shift, valid


def output(x: Tensor, scale: Tensor, shift: Tensor, *, act: Activation, channel_dim: int | None):
    """Forward pass 2: scale·(δ(x) − shift) in x's dtype (eq. 15)."""
    s = AF._broadcast_shape(x, channel_dim, scale).to(x.dtype)
    b = AF._broadcast_shape(x, channel_dim, shift).to(x.dtype)
    return (act.fn(x) - b) * s


def output_nudged(x: Tensor, s: Tensor, b: Tensor, lo: Tensor, hi: Tensor, *, act: Activation):
    """:func:`output` for the output-saving backward, ties moved off t = s·(0 − b).

    ``s``, ``b`` come already broadcast and cast to x's dtype, and ``lo``, ``hi``
    from :func:`anact.functional._tie_bounds`, all computed outside the kernel:
    inductor keeps bf16/fp16 values in float32 inside a kernel and may skip a
    float32 → bf16 → float32 round trip, which would make the output at δ(x) = 0
    differ from the t the backward compares with. The outputs with δ(x) > 0 are
    clamped to [lo, hi], which moves only those that round onto t; a clamp to a
    representable bound rather than a comparison with t, because the comparison
    would see the float32 value before its rounding to x's dtype.
    """
    y = act.fn(x)
    out = (y - b) * s
    return torch.where(y > 0, out.clamp(lo, hi), out)


def backward_pass(
    x: Tensor,
    grad_out: Tensor,
    scale: Tensor,
    shift: Tensor,
    *,
    act: Activation,
    channel_dim: int | None,
    need_x: bool,
    need_scale: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """∂L/∂x = s·δ'(x)·g and ∂L/∂s = Σ g·(δ(x) − μ) in one sweep (eq. 36–37, 41–42)."""
    s = AF._broadcast_shape(x, channel_dim, scale).to(x.dtype)
    y, d = fn_and_derivative(act, x)
    grad_x = grad_scale = None
    if need_x:
        grad_x = grad_out * d * s
    if need_scale:
        b = AF._broadcast_shape(x, channel_dim, shift).to(x.dtype)
        dims = AF._reduce_dims(x, channel_dim if scale.dim() else None)
        grad_scale = (grad_out * (y - b)).sum(dim=dims, dtype=scale.dtype)
    return grad_x, grad_scale


def backward_from_output(
    out: Tensor,
    grad_out: Tensor,
    scale: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    act: Activation,
    channel_dim: int | None,
    need_x: bool,
    need_scale: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`backward_pass` from the saved output (activations with ``sign_derivative``).

    ``s`` (scale broadcast and cast to out's dtype) and ``t`` = s·(0 − shift) in
    out's dtype are computed outside the kernel (see :func:`output_nudged`), so
    that t is the value the forward stored where δ(x) = 0; δ(x) > 0 ⇔
    sign(out − t)·sign(s) > 0. ∂L/∂s = Σ g·out / s. Same math as
    :func:`anact.functional._grads_from_output`.
    """
    grad_x = grad_scale = None
    if need_x:
        p, q = act.sign_derivative
        d = (torch.sign(out - t) * torch.sign(s)).clamp(min=0)
        if (p, q) != (1.0, 0.0):
            d = d * (p - q) + q
        grad_x = grad_out * d * s
    if need_scale:
        dims = AF._reduce_dims(out, channel_dim if scale.dim() else None)
        s_used = s.reshape(scale.shape).to(scale.dtype)  # the s the forward multiplied with
        grad_scale = (grad_out * out).sum(dim=dims, dtype=scale.dtype) / s_used
    return grad_x, grad_scale


def create_graph_grads(ctx, grad_out: Tensor, n_inputs: int) -> tuple | None:
    """A fast path Function's backward under ``create_graph=True`` (grad mode on in
    backward): ∂L/∂x, ∂L/∂scale by the eager formulas, which autograd can differentiate
    again, then None for the Function's other inputs (``n_inputs`` in all); None when
    grad mode is off (the kernels' backward runs). ``ctx`` holds act, channel_dim and
    saved_output, and saved x (or the output where saved_output), scale and shift."""
    if not torch.is_grad_enabled():
        return None
    saved, scale, shift = ctx.saved_tensors
    need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    act, cd = ctx.act, ctx.channel_dim
    if ctx.saved_output:
        grads = AF._grads_from_output(saved, grad_out, scale, shift, act, cd, need_x,
                                      need_scale, inplace=False)  # fmt: skip
    else:
        grads = backward_pass(saved, grad_out, scale, shift, act=act, channel_dim=cd,
                              need_x=need_x, need_scale=need_scale)  # fmt: skip
    return (*grads, *(None,) * (n_inputs - 2))


class FusedNormalizedActivationFn(torch.autograd.Function):
    """out = scale·(δ(x) − shift) through the fused kernels; saves x or out, scale, shift.

    ``runner`` maps a kernel name and its arguments to the (compiled) function,
    see :mod:`anact.kernels`. With ``save_output`` the output is saved instead
    of x, as in :class:`anact.functional._NormalizedActivationFn`. A double
    backward (``create_graph=True``) uses the eager formulas, which are
    differentiable.
    """

    @staticmethod
    def forward(x, scale, shift, act, channel_dim, runner, save_output=False):  # type: ignore[override]
        if not save_output:
            return runner.output(x, scale, shift, act, channel_dim)
        s = AF._broadcast_shape(x, channel_dim, scale).to(x.dtype)
        b = AF._broadcast_shape(x, channel_dim, shift).to(x.dtype)
        _, lo, hi = AF._tie_bounds(s, b)
        return runner.output_nudged(x, s, b, lo, hi, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, act, channel_dim, runner, *rest = inputs
        AF._save_input_or_output(ctx, x, output, scale, shift, bool(rest and rest[0]))
        ctx.act, ctx.channel_dim, ctx.runner = act, channel_dim, runner

    @staticmethod
    def backward(ctx, grad_out):
        grads = create_graph_grads(ctx, grad_out, 7)
        if grads is not None:
            return grads
        saved, scale, shift = ctx.saved_tensors
        need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = ctx.channel_dim
        if ctx.saved_output:
            s = AF._broadcast_shape(saved, cd, scale).to(saved.dtype)
            t = (-AF._broadcast_shape(saved, cd, shift).to(saved.dtype)) * s
            grad_x, grad_scale = ctx.runner.backward_from_output(
                saved, grad_out, scale, s, t, ctx.act, cd, need_x, need_scale
            )
        else:
            grad_x, grad_scale = ctx.runner.backward(
                saved, grad_out, scale, shift, ctx.act, cd, need_x, need_scale
            )
        return grad_x, grad_scale, None, None, None, None, None
