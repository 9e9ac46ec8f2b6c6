"""Exact expectations under a zero-mean Gaussian, E[g(x)] for x ~ N(0, σ²).

Plain Gauss–Hermite quadrature loses digits on functions whose derivative
jumps (ReLU's δ' is a step), so the integral is split into panels, each smooth
piece integrated with Gauss–Legendre in float64. The panel edges are the union
of two grids:

* the σ scale: a uniform grid in z = x/σ on |z| ≤ 12 (the tail beyond weighs
  < 1e-32), where the Gaussian weight changes;
* the activation's own scale: x = 0, ±2^k (k ≥ −2) and the kinks, each kink c
  also graded by c ± 2^k, up to |x| = 12σ. Activations change fast at |x| of a
  few units (tanh's δ' is a peak of width ~1 about 0, ELU bends at 0); for large
  σ that region is a sliver of one σ panel, and without its own panels the
  quadrature would miss it. The geometric grading resolves any scale between
  the two.

The nodes and weights are formed in z (x = σ·z is the only product with σ), so
nothing overflows or underflows for σ in [``SIGMA_MIN``, ``SIGMA_MAX``]; the
quadrature is accurate to a few float64 ulps of ∫|g|·φ over that whole range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SIGMA_MAX", "SIGMA_MIN", "gaussian_expectation", "nodes_per_sigma", "quadrature"]

_Z_MAX = 12.0
_PANEL = 1.0  # width of the uniform panels in z
_LOCAL_MIN_EXP = -2  # the local grid's finest step about 0 and the kinks: 2**-2 in x

#: The σ range the expectations are computed for. Outside it σ² (and with it the
#: moments E[δ²], Var[δ] of an activation of slope ~1, and ρ = Var/σ² of a bounded one)
#: leaves float64's normal range (~1e±308), so no float64 result could be accurate.
SIGMA_MIN = 1e-150
SIGMA_MAX = 1e150


# The 20-point Gauss–Legendre rule on [-1, 1], correctly rounded (from 60-digit roots of
# P_20): (node, weight) for the positive nodes; the rule is symmetric. Computed in float64
# (Golub–Welsch) the weights are off by up to ~1e-14 and sum to 2 ± 4 ulps, which is the
# relative error every expectation would inherit.
_GL20 = (
    (0.07652652113349734, 0.15275338713072584),
    (0.22778585114164507, 0.14917298647260374),
    (0.37370608871541955, 0.14209610931838204),
    (0.5108670019508271, 0.13168863844917664),
    (0.636053680726515, 0.11819453196151841),
    (0.7463319064601508, 0.10193011981724044),
    (0.8391169718222188, 0.08327674157670475),
    (0.912234428251326, 0.06267204833410907),
    (0.9639719272779138, 0.04060142980038694),
    (0.9931285991850949, 0.017614007139152118),
)


@functools.lru_cache(maxsize=1)
def _legendre() -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [-1, 1], ascending nodes."""
    x = torch.tensor([t for t, _ in _GL20], dtype=torch.float64, device="cpu")
    w = torch.tensor([v for _, v in _GL20], dtype=torch.float64, device="cpu")
    return torch.cat([-x.flip(0), x]), torch.cat([w.flip(0), w])


@functools.lru_cache(maxsize=64)
def _local_points(kinks: tuple[float, ...], max_exp: int) -> Tensor:
    """Panel edges in x at the activation's scale: 0, ±2^k and each kink c, c ± 2^k,
    for k = −2 … with |x| < 2^max_exp (points farther out weigh nothing)."""
    x_max = 2.0**max_exp
    steps = [2.0**k for k in range(_LOCAL_MIN_EXP, max_exp)]
    pts = {0.0, *steps, *(-s for s in steps)}
    for c in kinks:
        if abs(c) < x_max:
            # graded towards c until the grid about 0 is as fine as these steps
            pts.update(q for s in steps if s < abs(c) for q in (c - s, c + s))
            pts.add(c)
    return torch.tensor(
        sorted(p for p in pts if abs(p) < x_max), dtype=torch.float64, device="cpu"
    )


def _local_for(sigma_max: float, kinks: Sequence[float]) -> Tensor:
    # the local grid reaches |x| = 12·max σ, rounded up to a power of 2 (the cache key)
    max_exp = math.frexp(_Z_MAX * sigma_max)[1]
    return _local_points(tuple(float(c) for c in kinks), max_exp)


def nodes_per_sigma(sigma_max: float, kinks: Sequence[float] = ()) -> int:
    """The number of nodes :func:`quadrature` uses for each σ of a batch whose largest
    σ is ``sigma_max``: 860 for 5.3 < σ ≤ 10, 40 more per doubling of σ, ~20 700 at 1e150."""
    n_grid = round(2 * _Z_MAX / _PANEL) + 1
    return (n_grid + _local_for(sigma_max, kinks).numel() - 1) * len(_GL20) * 2


def _check_sigma(sig: Tensor, sigma: object) -> None:
    if sig.numel() == 0 or not bool(torch.all(torch.isfinite(sig) & (sig > 0))):
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
    out = (sig < SIGMA_MIN) | (sig > SIGMA_MAX)
    if bool(out.any()):
        raise ValueError(
            f"sigma must lie in [{SIGMA_MIN:g}, {SIGMA_MAX:g}], got "
            f"{sig[out][:5].tolist()}: beyond that σ² (and the moments that scale with it) "
            "overflow or underflow float64 (~1e±308), so no float64 result would be accurate"
        )


def gaussian_expectation(
    functions: Sequence[Callable[[Tensor], Tensor]],
    sigma: float | Sequence[float] | Tensor,
    kinks: Sequence[float] = (),
) -> list[Tensor]:
    """E[f(x)] for each f in ``functions``, x ~ N(0, σ²), vectorised over σ.

    Accurate to a few float64 ulps of E[|f(x)|] for functions that are smooth
    between ``kinks`` on the scale of one unit of x (or on the σ scale), for every σ
    in [``SIGMA_MIN``, ``SIGMA_MAX``].

    Args:
        functions: callables evaluated on float64 tensors of shape (S, P).
        sigma: a scalar or a 1-D array of S values in [SIGMA_MIN, SIGMA_MAX].
        kinks: points in x where any of the functions is not smooth.

    Returns:
        one float64 tensor per function, shape (S,) (or () for scalar σ).

    Raises:
        ValueError: σ not positive and finite, or outside [SIGMA_MIN, SIGMA_MAX].
    """
    _, x, w = quadrature(sigma, kinks)
    out = [(f(x) * w).sum(dim=1) for f in functions]
    if torch.as_tensor(sigma, dtype=torch.float64, device="cpu").dim() == 0:
        return [o[0] for o in out]
    return out


def quadrature(
    sigma: float | Sequence[float] | Tensor, kinks: Sequence[float] = ()
) -> tuple[Tensor, Tensor, Tensor]:
    """The nodes and weights behind :func:`gaussian_expectation`, for reuse.

    Returns:
        ``(sigma, x, w)``: σ as a float64 tensor of shape (S,), and nodes x and weights
        w of shape (S, N): E[f(x)] ≈ (f(x) * w).sum(dim=1).

    Raises:
        ValueError: σ not positive and finite, or outside [SIGMA_MIN, SIGMA_MAX].
    """
    sig = torch.as_tensor(sigma, dtype=torch.float64, device="cpu").reshape(-1)
    _check_sigma(sig, sigma)
    s = sig[:, None]
    grid = torch.arange(-_Z_MAX, _Z_MAX + _PANEL / 2, _PANEL, dtype=torch.float64, device="cpu")
    local = _local_for(float(sig.max()), kinks)
    # local points in z, per σ; those beyond |z| = 12 become zero-width panels
    lz = (local[None, :] / s).clamp(-_Z_MAX, _Z_MAX)
    edges = torch.cat([grid.expand(sig.numel(), -1), lz], dim=1).sort(dim=1).values
    lo, hi = edges[:, :-1], edges[:, 1:]  # (S, panels)
    nodes, weights = _legendre()  # 20 nodes per panel
    half = (hi - lo)[..., None] / 2
    z = (lo + hi)[..., None] / 2 + half * nodes  # (S, panels, nodes)
    w = half * weights * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    x = (z * s[..., None]).reshape(sig.numel(), -1)
    return sig, x, w.reshape(sig.numel(), -1)
