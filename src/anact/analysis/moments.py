"""Exact Gaussian moments of an activation: ρ, ρ', λ and the R score.

For x ~ N(0, σ²) and an activation δ (paper section 2, appendix eq. 31)::

    ρ  = Var[δ(x)] / σ²          (eq. 5 with the variance of eq. 31)
    ρ' = E[δ'(x)²]               (eq. 6)
    λ  = sqrt((ρ + ρ') / (2ρρ'))  (eq. 13)
    R  = ln(ρ / ρ')              (eq. 19-21)

Every expectation is a float64 quadrature split at the activation's kinks
(:func:`anact.gaussian.gaussian_expectation`), accurate to ~1e-12 or better.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anact import functional as AF
from anact.activations import Activation, get_activation, resolve_activation
from anact.gaussian import gaussian_expectation

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
        var: Var[δ(x)] (computed as E[(δ(x) − E[δ(x)])²], no cancellation).
        rho: Var[δ(x)] / σ² (eq. 5, 31).
        rho_prime: E[δ'(x)²] (eq. 6).
        lam: sqrt((ρ + ρ') / (2ρρ')) (eq. 13).
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


def lambda_factor(rho: ArrayLike, rho_prime: ArrayLike) -> float | np.ndarray:
    """λ = sqrt((ρ + ρ') / (2ρρ')) (eq. 13), elementwise, float64, unfloored."""
    r = torch.as_tensor(np.asarray(rho, dtype=np.float64), device="cpu")
    rp = torch.as_tensor(np.asarray(rho_prime, dtype=np.float64), device="cpu")
    out = AF.lambda_factor(r, rp, eps=None).numpy()
    return float(out) if out.ndim == 0 else out


def gaussian_moments(activation: ActivationSpec, sigma: ArrayLike) -> GaussianMoments:
    """Exact moments of δ(x), x ~ N(0, σ²), vectorised over σ.

    Args:
        activation: a registered name (``"relu"``), an
            :class:`~anact.activations.Activation`, or ``(name, params)`` such as
            ``("lrelu", {"negative_slope": 0.2})``.
        sigma: the input's standard deviation, > 0: a scalar, or an array / list /
            tensor of any shape.

    Returns:
        :class:`GaussianMoments`; fields are floats for a scalar σ, else float64
        numpy arrays of σ's shape.
    """
    act = as_activation(activation)
    sig, scalar = _as_sigma(sigma)
    shape = sig.shape
    s = torch.from_numpy(sig.reshape(-1).copy())
    fn, der = act.fn, act.derivative

    mean, second, dsq = gaussian_expectation(
        [fn, lambda x: fn(x) ** 2, lambda x: der(x) ** 2], s, act.kinks
    )
    # second pass, centred: avoids the cancellation in E[δ²] − E[δ]²
    (var,) = gaussian_expectation([lambda x: (fn(x) - mean[:, None]) ** 2], s, act.kinks)
    rho = var / (s * s)  # eq. 5, 31
    rho_prime = dsq  # eq. 6
    lam = AF.lambda_factor(rho, rho_prime, eps=None)  # eq. 13
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

    R ≤ 0 for every δ, with R = 0 only for linear δ (the paper's proposition).

    Args:
        activation: as in :func:`gaussian_moments`.
        sigma: > 0, scalar or array of any shape.

    Returns:
        a float for scalar σ, else a float64 array of σ's shape. ``-inf`` where
        Var[δ] = 0, ``nan`` where δ' vanishes almost surely.
    """
    return gaussian_moments(activation, sigma).r_score

