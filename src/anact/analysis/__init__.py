"""Analysis tools: exact Gaussian moments (ρ, ρ', λ, R score), training monitors, figures."""

from anact.analysis.moments import (
    ActivationSpec,
    GaussianMoments,
    as_activation,
    gaussian_moments,
    lambda_factor,
    r_score,
)
from anact.analysis.monitors import (
    LAYER_STATS,
    ConvergenceMonitor,
    activation_of,
    weight_mean_abs_sum,
)

__all__ = [
    "LAYER_STATS",
    "ActivationSpec",
    "ConvergenceMonitor",
    "GaussianMoments",
    "activation_of",
    "as_activation",
    "gaussian_moments",
    "lambda_factor",
    "r_score",
    "weight_mean_abs_sum",
]
