"""Exact Gaussian moments of an activation: ρ, ρ', λ and the R score.

For x ~ N(0, σ²) and an activation δ (paper section 2, appendix eq. 31)::

    ρ  = Var[δ(x)] / σ²          (eq. 5 with the variance of eq. 31)
    ρ' = E[δ'(x)²]               (eq. 6)
    λ  = sqrt((ρ + ρ') / (2ρρ'))  (eq. 13)
    R  = ln(ρ / ρ')              (eq. 19-21)

Every expectation is a float64 quadrature split at the activation's kinks and at its
own scale (:func:`anact.gaussian.gaussian_expectation`), accurate to a few ulps
(~1e-15 relative) for σ in [1e-150, 1e150]; outside, or where float64 cannot hold
or resolve a moment, :func:`gaussian_moments` raises ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anact.activations import Activation, get_activation, resolve_activation
from anact.gaussian import _Z_MAX, _legendre, nodes_per_sigma, quadrature

__all__ = [
    "ActivationSpec",
    "GaussianMoments",
    "as_activation",
    "gaussian_moments",
    "r_score",
    "lambda_factor",
]

#: A registered name, an :class:`~anact.activations.Activation`, or ``(name, params)``.
ActivationSpec = str | Activation | tuple[str, Mapping[str, Any]]

ArrayLike = float | Sequence[float] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class GaussianMoments:
    """Moments of δ(x) for x ~ N(0, σ²).

    Each field is a ``float`` when σ was a scalar, else a float64 ``numpy.ndarray``
    of σ's shape.

    Attributes:
        mean: E[δ(x)].
        second_moment: E[δ(x)²].
        var: Var[δ(x)] (= ρ·σ²).
        rho: Var[δ(x)] / σ² (eq. 5, 31), computed as E[((δ(x) − E[δ(x)])/σ)²]: no
            cancellation, and no σ² formed.
        rho_prime: E[δ'(x)²] (eq. 6).
        lam: sqrt((ρ + ρ') / (2ρρ')) (eq. 13), computed as sqrt(1/(2ρ) + 1/(2ρ')).
        sigma: the σ the moments were computed at.
    """

    mean: float | np.ndarray
    second_moment: float | np.ndarray
    var: float | np.ndarray
    rho: float | np.ndarray
    rho_prime: float | np.ndarray
    lam: float | np.ndarray
    sigma: float | np.ndarray

    @property
    def r_score(self) -> float | np.ndarray:
        """ln(ρ / ρ') (eq. 19)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.log(np.asarray(self.rho) / np.asarray(self.rho_prime))
        return float(out) if np.ndim(out) == 0 else out


def as_activation(activation: ActivationSpec) -> Activation:
    """An :class:`Activation` from a name, an instance, or ``(name, params)``.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
        TypeError: anything else.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        return get_activation(activation)
    if (
        isinstance(activation, tuple)
        and len(activation) == 2
        and isinstance(activation[0], str)
        and isinstance(activation[1], Mapping)
    ):
        return resolve_activation(activation[0], **dict(activation[1]))
    raise TypeError(
        "activation must be a registered name (str), an anact.Activation, or a "
        f"(name, params_dict) tuple; got {activation!r}"
    )


def _as_sigma(sigma: ArrayLike) -> tuple[np.ndarray, bool]:
    """σ as a float64 array and whether it was a scalar; validates σ > 0."""
    if isinstance(sigma, torch.Tensor):
        arr = sigma.detach().cpu().to(torch.float64).numpy()
    else:
        try:
            arr = np.asarray(sigma, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"sigma must be a number or an array of numbers, got {sigma!r}"
            ) from None
    if arr.size == 0:
        raise ValueError("sigma is empty; pass at least one positive value")
    bad = ~(np.isfinite(arr) & (arr > 0))
    if bad.any():
        raise ValueError(
            f"sigma must be positive and finite (it is the std of the input); "
            f"got {arr[bad].ravel()[:5].tolist()}"
        )
    return arr, arr.ndim == 0


def _finish(x: torch.Tensor, shape: tuple[int, ...], scalar: bool) -> float | np.ndarray:
    out = x.numpy().reshape(shape)
    return float(out) if scalar else out


#: unit roundoff of float64
_U = 2.0**-53
#: above this estimated relative rounding error of the direct ρ, ρ is recomputed from δ'
_DIRECT_RTOL = 1e-14
#: the largest relative rounding error of ρ that :func:`gaussian_moments` returns
_RHO_RTOL = 1e-8
#: ρ from δ' is used where all nodes lie in |x| ≤ 12σ ≤ this (δ' smooth on [0, x])
_FROM_DERIVATIVE_X = 0.5


def _not_finite(act: Activation, s: torch.Tensor, *values: torch.Tensor) -> None:
    finite = torch.isfinite(torch.stack(values)).all(dim=0)
    if not bool(finite.all()):
        raise ValueError(
            f"the Gaussian moments of {act!r} at sigma = {s[~finite][:5].tolist()} are not "
            "finite in float64: δ(x) or δ(x)² overflows for |x| up to 12σ, or δ returns NaN; "
            "use a smaller sigma"
        )


def _rho(
    act: Activation, s: torch.Tensor, x: torch.Tensor, fx: torch.Tensor, w: torch.Tensor,
    mean: torch.Tensor, second: torch.Tensor, rho_prime: torch.Tensor,
) -> torch.Tensor:
    """ρ = Var[δ(x)]/σ² (eq. 5, 31) from δ at the nodes, or a ValueError where float64
    cannot resolve it.

    Directly, ρ = E[((δ(x) − E[δ])/σ)²]: centred (no cancellation of E[δ²] − E[δ]²) and
    scaled before squaring (σ² under/overflows long before ρ does). Each δ(x) is rounded
    to ~2 ulps of |δ(x)|, which moves ρ by up to ~8u·sqrt(E[δ²]/Var[δ]) relative (u = 2⁻⁵³):
    nothing for most δ, but ~2e-15/σ for sigmoid(x) ≈ 1/2 + x/4, whose variation rounds
    away at tiny σ. For small σ the variation is then taken from δ' instead,
    D(x) = δ(x) − δ(0) = x·∫₀¹ δ'(tx) dt (Gauss–Legendre in t), and used where it agrees
    with δ(x) − δ(0) to δ's rounding.
    """
    rho = ((((fx - mean[:, None]) / s[:, None]) ** 2) * w).sum(dim=1)
    noise = 8 * _U * torch.sqrt(second) / (torch.sqrt(rho) * s)
    # a constant δ (ρ' = 0) has nothing to resolve; NaN noise (0/0) counts as unresolved
    unresolved = (rho_prime != 0) & ~(noise <= _DIRECT_RTOL)
    near = min((abs(c) for c in act.kinks if c != 0), default=math.inf)  # no kink in [0, x]
    small = (_Z_MAX * s <= _FROM_DERIVATIVE_X) & (_Z_MAX * s < near)
    redo = unresolved & small
    mismatch = torch.zeros_like(redo)
    if bool(redo.any()):
        rho_d, agrees = _rho_from_derivative(act, s[redo], x[redo], fx[redo], w[redo])
        rows = redo.nonzero().squeeze(1)
        rho[rows[agrees]] = rho_d[agrees]
        noise[rows[agrees]] = 0.0
        mismatch[rows[~agrees]] = True
    lost = (rho_prime != 0) & ~(noise <= _RHO_RTOL)
    if bool(lost.any()):
        why = (
            f"δ(x) varies by less than {1 / _RHO_RTOL:.0e} times its float64 rounding error "
            "(as sigmoid(x) ≈ 1/2 + x/4 for tiny x)"
        )
        if bool(mismatch[lost].any()):
            why += ", and δ' does not integrate to δ there (is the derivative exact?)"
        raise ValueError(
            f"Var[δ(x)] of {act!r} is not resolved in float64 at sigma = "
            f"{s[lost][:5].tolist()}: {why}, so ρ = Var[δ]/σ² would be off by more than "
            f"{_RHO_RTOL:g} relative; use a larger sigma"
        )
    return rho


def _rho_from_derivative(
    act: Activation, s: torch.Tensor, x: torch.Tensor, fx: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ρ from D(x)/σ = (x/σ)·∫₀¹ δ'(tx) dt (for 12σ ≤ 0.5), and whether D agrees with
    δ(x) − δ(0) at every node (``x``, ``fx`` = δ(x), weights ``w``: the caller's
    quadrature) to the rounding of δ."""
    fn, der = act.fn, act.derivative
    t, wt = _legendre()
    t, wt = (t + 1) / 2, wt / 2  # on [0, 1]
    sc = s[:, None]
    d = torch.zeros_like(x)
    for tk, wk in zip(t.tolist(), wt.tolist(), strict=True):  # one node at a time: no (S, N, 20)
        d += wk * der(tk * x)
    d *= x / sc
    md = (d * w).sum(dim=1)
    rho = (((d - md[:, None]) ** 2) * w).sum(dim=1)
    f0 = fn(torch.zeros(1, dtype=torch.float64, device="cpu"))
    # δ(x) − δ(0) is known to ~2 ulps of |δ(x)| + |δ(0)|; D to ~1e-15 of |D|
    tol = 8 * _U * (fx.abs() + f0.abs()) / sc + 1e-12 * d.abs()
    agrees = ~(((fx - f0) / sc - d).abs() > tol)
    return rho, (agrees | (w == 0)).all(dim=1)


#: the most quadrature nodes (σ values × nodes per σ) evaluated at once
_CHUNK_NODES = 1 << 22


def _chunks(s: torch.Tensor, kinks: tuple[float, ...]) -> list[torch.Tensor]:
    """Indices of σ in ascending order, in groups that each fit ``_CHUNK_NODES`` nodes.

    The nodes per σ grow with log2 of the group's largest σ (~900 up to σ = 10, ~20 000
    at 1e150); sorting gives small σ groups of their own, with few nodes.
    """
    order = torch.argsort(s)
    per_row = nodes_per_sigma(float(s.max()), kinks)
    return list(order.split(max(1, _CHUNK_NODES // per_row)))


def _moments(act: Activation, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mean, E[δ²], Var, ρ, ρ') for the 1-D σ ``s``."""
    fn, der = act.fn, act.derivative
    _, x, w = quadrature(s, act.kinks)
    fx = fn(x)
    # E[δ] = δ(0) + E[δ − δ(0)]: exact for a constant δ (then Var = 0 exactly) and free of
    # δ(0)'s rounding in the sum (sigmoid: 1/2 + E[δ − 1/2])
    c0 = float(fn(torch.zeros(1, dtype=torch.float64, device="cpu"))[0])
    c0 = c0 if math.isfinite(c0) else 0.0
    mean = ((fx - c0) * w).sum(dim=1) + c0
    second = (fx * fx * w).sum(dim=1)
    rho_prime = (der(x) ** 2 * w).sum(dim=1)  # eq. 6
    _not_finite(act, s, mean, second, rho_prime)
    rho = _rho(act, s, x, fx, w, mean, second, rho_prime)
    var = rho * (s * s)
    _not_finite(act, s, rho, var)
    return mean, second, var, rho, rho_prime


def _lambda(rho: torch.Tensor, rho_prime: torch.Tensor) -> torch.Tensor:
    """λ² = (ρ + ρ')/(2ρρ') = 1/(2ρ) + 1/(2ρ') (eq. 13), unfloored: the product ρρ' would
    underflow for large σ (ρ ~ 1/σ², ρ' ~ 1/σ for tanh); +inf where ρ or ρ' is 0 (a dead
    δ), NaN where either is NaN or negative."""
    lam = torch.sqrt(0.5 / rho + 0.5 / rho_prime)
    return torch.where((rho < 0) | (rho_prime < 0), torch.full_like(lam, math.nan), lam)


def lambda_factor(rho: ArrayLike, rho_prime: ArrayLike) -> float | np.ndarray:
    """λ = sqrt((ρ + ρ') / (2ρρ')) (eq. 13), elementwise, float64, unfloored: +inf where
    ρ or ρ' is 0 (a dead δ), NaN where either is NaN or negative (the analysis tools'
    convention: :func:`gaussian_moments`, the convergence monitor)."""
    r = torch.as_tensor(np.asarray(rho, dtype=np.float64), device="cpu")
    rp = torch.as_tensor(np.asarray(rho_prime, dtype=np.float64), device="cpu")
    out = _lambda(r, rp).numpy()
    return float(out) if out.ndim == 0 else out


def gaussian_moments(activation: ActivationSpec, sigma: ArrayLike) -> GaussianMoments:
    """Exact moments of δ(x), x ~ N(0, σ²), vectorised over σ.

    Args:
        activation: a registered name (``"relu"``), an
            :class:`~anact.activations.Activation`, or ``(name, params)`` such as
            ``("lrelu", {"negative_slope": 0.2})``.
        sigma: the input's standard deviation, in [1e-150, 1e150]
            (:data:`anact.gaussian.SIGMA_MIN`, ``SIGMA_MAX``): a scalar, or an array /
            list / tensor of any shape.

    Returns:
        :class:`GaussianMoments`; fields are floats for a scalar σ, else float64
        numpy arrays of σ's shape. Accurate to a few ulps for the registered
        activations over the whole σ range, including large σ, where δ' of a bounded
        δ is a peak of width ~1 at the origin, and tiny σ, where ρ of a δ with
        δ(0) ≠ 0 (sigmoid) is taken from δ' (see ``_rho``).

    Raises:
        ValueError: σ not positive and finite, or outside [1e-150, 1e150] (σ² leaves
            float64's range); a moment that overflows float64 (δ growing fast at large
            σ); or Var[δ] that float64 cannot resolve to 1e-8 relative (δ varying by
            less than its rounding error, and δ' not usable to recover it).
    """
    act = as_activation(activation)
    sig, scalar = _as_sigma(sigma)
    shape = sig.shape
    s = torch.from_numpy(sig.reshape(-1).copy())
    fields = torch.empty(5, s.numel(), dtype=torch.float64, device="cpu")
    for rows in _chunks(s, act.kinks):
        fields[:, rows] = torch.stack(_moments(act, s[rows]))
    mean, second, var, rho, rho_prime = fields
    lam = _lambda(rho, rho_prime)  # eq. 13
    return GaussianMoments(
        sigma=float(sig) if scalar else sig.copy(),
        mean=_finish(mean, shape, scalar),
        second_moment=_finish(second, shape, scalar),
        var=_finish(var, shape, scalar),
        rho=_finish(rho, shape, scalar),
        rho_prime=_finish(rho_prime, shape, scalar),
        lam=_finish(lam, shape, scalar),
    )


def r_score(activation: ActivationSpec, sigma: ArrayLike) -> float | np.ndarray:
    """R(δ, σ) = ln(Var[δ(x)] / (σ²·E[δ'(x)²])), x ~ N(0, σ²) (eq. 19-21).

    R ≤ 0 for every δ, with R = 0 only for linear δ (the paper's proposition). The
    computed R is within a few ulps of the exact one, so it may read +2e-16 where the
    exact R is below float64's resolution (R ≈ −σ⁴·4/3 for tanh at tiny σ).

    Args:
        activation: as in :func:`gaussian_moments`.
        sigma: > 0, scalar or array of any shape.

    Returns:
        a float for scalar σ, else a float64 array of σ's shape. ``-inf`` where
        Var[δ] = 0, ``nan`` where δ' vanishes almost surely.

    Raises:
        ValueError: as :func:`gaussian_moments`.
    """
    return gaussian_moments(activation, sigma).r_score

