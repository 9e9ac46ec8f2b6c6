"""The paper's analysis figures: R score vs σ (Figure 2), Score and Σ|E[W]| per epoch (Figures 3-4).

Each figure comes with its numbers as CSV and a markdown table. matplotlib is
imported only when a PNG is drawn (``pip install anact[experiments]``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anact.analysis.moments import ActivationSpec, as_activation, r_score

__all__ = [
    "FIGURE2_ACTIVATIONS",
    "activation_label",
    "rscore_table",
    "write_table_csv",
    "write_table_markdown",
    "plot_rscore",
    "plot_training_curves",
]

#: The activations of the paper's Figure 2 (plus GELU and Mish).
FIGURE2_ACTIVATIONS = ("tanh", "relu", "lrelu", "elu", "selu", "swish", "gelu", "mish")

_LABELS = {
    "identity": "Identity", "relu": "ReLU", "lrelu": "LeakyReLU", "tanh": "Tanh",
    "sigmoid": "Sigmoid", "swish": "Swish", "elu": "ELU", "selu": "SELU", "gelu": "GELU",
    "mish": "Mish", "softplus": "Softplus", "hardswish": "HardSwish",
}


def activation_label(activation: ActivationSpec) -> str:
    """A display name: ``"LeakyReLU"``; non-default parameters in parentheses."""
    act = as_activation(activation)
    base = _LABELS.get(act.name, act.name)
    try:
        defaults = as_activation(act.name).params
    except (KeyError, TypeError):
        defaults = {}
    extra = {k: v for k, v in act.params.items() if defaults.get(k) != v}
    if not extra:
        return base
    return f"{base}({', '.join(f'{k}={v:g}' for k, v in extra.items())})"


def rscore_table(
    activations: Sequence[ActivationSpec], sigma: Sequence[float] | np.ndarray
) -> dict[str, np.ndarray]:
    """``{label: R(δ, σ) of shape (S,)}`` for 1-D σ of shape (S,) (eq. 19-21)."""
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.ndim != 1:
        raise ValueError(f"sigma must be 1-D, got shape {sig.shape}")
    table: dict[str, np.ndarray] = {}
    for a in activations:
        label = activation_label(a)
        if label in table:
            raise ValueError(f"activation {label} given twice")
        table[label] = np.asarray(r_score(a, sig)).reshape(sig.shape)
    return table


def write_table_csv(
    path: str | Path, x_name: str, x: Sequence[float], columns: Mapping[str, Sequence[float]]
) -> Path:
    """A CSV with the column ``x_name`` then one column per entry (full float precision)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([x_name, *columns])
        for i, xi in enumerate(x):
            w.writerow([repr(float(xi)), *(repr(float(c[i])) for c in columns.values())])
    return path


def write_table_markdown(
    path: str | Path,
    x_name: str,
    x: Sequence[float],
    columns: Mapping[str, Sequence[float]],
    *,
    title: str | None = None,
    fmt: str = ".6f",
) -> Path:
    """The same numbers as a markdown table (``fmt`` digits), with an optional heading."""
    path = Path(path)
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join([x_name, *columns]) + " |")
    lines.append("|" + "---:|" * (len(columns) + 1))
    for i, xi in enumerate(x):
        cells = [f"{float(xi):.6g}", *(format(float(c[i]), fmt) for c in columns.values())]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "drawing figures needs matplotlib: pip install 'anact[experiments]'"
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_rscore(
    path: str | Path,
    sigma: Sequence[float] | np.ndarray,
    table: Mapping[str, Sequence[float]],
    *,
    log_sigma: bool = True,
) -> Path:
    """Figure 2: R(δ, σ) against σ, one curve per activation, saved as a PNG.

    Args:
        path: output file (``.png``).
        sigma: shape (S,).
        table: ``{label: R values of shape (S,)}`` (from :func:`rscore_table`).
        log_sigma: logarithmic σ axis.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    # distinct dashes as well as colours: ReLU/LeakyReLU and Swish/Mish nearly coincide
    styles = ["-", "--", "-.", (0, (1, 1.5))]
    for i, (label, r) in enumerate(table.items()):
        ax.plot(sigma, r, linestyle=styles[i % 4], lw=2.0, label=label)
    ax.axhline(0.0, color="black", lw=0.8)
    relu = math.log(1 - 1 / math.pi)
    ax.axhline(relu, color="gray", lw=0.8, ls=":")
    ax.annotate(f"ln(1 − 1/π) = {relu:.3f} (ReLU, any σ)", xy=(sigma[0], relu),
                xytext=(4, -12), textcoords="offset points", fontsize=8, color="gray")
    if log_sigma:
        ax.set_xscale("log")
    ax.set_xlim(float(np.min(sigma)), float(np.max(sigma)))
    ax.set_xlabel("σ (standard deviation of the pre-activation x ~ N(0, σ²))")
    ax.set_ylabel("R = ln( Var[δ(x)] / (σ² · E[δ'(x)²]) )")
    ax.set_title("R score of activation functions (ANAct eq. 19-21, Figure 2)")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="lower left", fontsize=9, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training_curves(
    path: str | Path,
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    keys: Sequence[str] = ("score", "weight_mean_abs_sum"),
) -> Path:
    """Figures 3-4: per-epoch curves of monitor summaries, one panel per key.

    Args:
        path: output PNG.
        runs: ``{method label: [epoch_summary() of epoch 1, epoch 2, …]}``, e.g. the
            median run of each method.
        keys: summary keys to draw (default: the Score of eq. 22 and Σ|E[W]|).
    """
    plt = _pyplot()
    titles = {"score": "Score (eq. 22)", "weight_mean_abs_sum": "Σ_i |E[W_i]| (Figure 4)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), dpi=120,
                             squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, summaries in runs.items():
            y = [s[key] for s in summaries]
            ax.plot(range(1, len(y) + 1), y, marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(titles.get(key, key))
        ax.set_title(titles.get(key, key))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
