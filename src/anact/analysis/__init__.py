"""Analysis tools: exact Gaussian moments (ρ, ρ', λ, R score), training monitors, figures."""

from anact.analysis.moments import (
    ActivationSpec,
    GaussianMoments,
    as_activation,
    gaussian_moments,
    lambda_factor,
    r_score,
)

__all__ = [
    "ActivationSpec",
    "GaussianMoments",
    "as_activation",
    "gaussian_moments",
    "lambda_factor",
    "r_score",
]
