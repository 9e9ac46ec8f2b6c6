"""Analysis tools of ANAct: exact Gaussian moments (ρ, ρ', λ, R score), training
monitors (Score of eq. 22, Σ|E[W]|) and the paper's figures.

    >>> from anact.analysis import r_score
    >>> round(r_score("relu", 1.0), 3)   # ln(1 − 1/π) for every σ
    -0.383
"""

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
from anact.analysis.plots import (
    FIGURE2_ACTIVATIONS,
    activation_label,
    plot_rscore,
    plot_training_curves,
    rscore_table,
    write_table_csv,
    write_table_markdown,
)

__all__ = [
    "FIGURE2_ACTIVATIONS",
    "LAYER_STATS",
    "ActivationSpec",
    "ConvergenceMonitor",
    "GaussianMoments",
    "activation_label",
    "activation_of",
    "as_activation",
    "gaussian_moments",
    "lambda_factor",
    "plot_rscore",
    "plot_training_curves",
    "r_score",
    "rscore_table",
    "weight_mean_abs_sum",
    "write_table_csv",
    "write_table_markdown",
]
