"""``anact rscore`` (Figure 2) and ``anact gpn`` (GPN constants table) sub-commands."""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anact.analysis.moments import ActivationSpec, as_activation, gaussian_moments
from anact.analysis.plots import (
    FIGURE2_ACTIVATIONS,
    activation_label,
    plot_rscore,
    rscore_table,
    write_table_csv,
    write_table_markdown,
)

__all__ = ["register", "parse_activation", "run_rscore", "run_gpn", "gpn_table"]


def parse_activation(spec: str) -> ActivationSpec:
    """``"lrelu"`` or ``"lrelu:negative_slope=0.2"`` or ``"softplus:beta=2,threshold=10"``."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(
                f"bad activation spec {spec!r}: parameters are name:key=value,key=value"
            )
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(
                f"bad value {value!r} in {spec!r}: expected a number or a Python literal"
            ) from None
    out: ActivationSpec = (name.strip(), params) if params else name.strip()
    try:
        as_activation(out)
    except (KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e).strip("'\"")) from None
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The quadratures are many small tensor ops: torch's intra-op threads only add
    synchronisation (7x slower on a busy 2-core machine), so run them on one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_rscore(args: argparse.Namespace) -> int:
    """Figure 2: R score vs σ as PNG, CSV and markdown in ``args.out_dir``."""
    with _one_thread():
        return _run_rscore(args)


def _run_rscore(args: argparse.Namespace) -> int:
    if not 0 < args.sigma_min < args.sigma_max or not math.isfinite(args.sigma_max):
        print(f"error: need 0 < --sigma-min < --sigma-max, got {args.sigma_min}, "
              f"{args.sigma_max}", file=sys.stderr)
        return 2
    if args.num < 2:
        print(f"error: --num must be >= 2, got {args.num}", file=sys.stderr)
        return 2
    t0, c0 = time.perf_counter(), time.process_time()
    space = np.geomspace if args.log_sigma else np.linspace
    sigma = space(args.sigma_min, args.sigma_max, args.num)
    try:
        table = rscore_table(args.activations, sigma)
    except ValueError as e:  # σ outside the range float64 resolves; an activation's moments
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.name
    files = [
        write_table_csv(stem.with_suffix(".csv"), "sigma", sigma, table),
        write_table_markdown(
            stem.with_suffix(".md"), "σ", sigma, table,
            title="R score ln(Var[δ(x)] / (σ²·E[δ'(x)²])), x ~ N(0, σ²) (ANAct eq. 19-21)",
        ),
        plot_rscore(stem.with_suffix(".png"), sigma, table, log_sigma=args.log_sigma),
    ]
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    picks = sorted({0, len(sigma) // 2, len(sigma) - 1})
    print("activation      " + "".join(f"  R(σ={sigma[i]:.3g})" for i in picks))
    for label, r in table.items():
        print(f"{label:<16}" + "".join(f"{r[i]:>12.4f}" for i in picks))
    for f in files:
        print(f"wrote {f}")
    print(f"{len(table)} activations x {len(sigma)} σ in {took:.2f} s ({cpu:.2f} s CPU), "
          "figure included")
    return 0


def gpn_table(activations: list[ActivationSpec]) -> list[dict[str, Any]]:
    """One row per activation: a, b of GPN (Lu et al. 2020) and the checks E[φ²], E[φ'²].

    φ = a·(ψ + b) with x ~ N(0, 1); both checks are 1 by construction. Rows of
    activations that cannot be GPN-normalized carry ``error`` instead.
    """
    from anact import gpn_constants  # the core computes the constants

    rows = []
    for spec in activations:
        act = as_activation(spec)
        row: dict[str, Any] = {"activation": activation_label(act)}
        try:
            a, b = gpn_constants(act)
        except ValueError as e:
            row["error"] = str(e)
        else:
            m = gaussian_moments(act, 1.0)
            row.update(
                a=a,
                b=b,
                # E[φ²] = a²(E[ψ²] + 2b·E[ψ] + b²), E[φ'²] = a²·E[ψ'²]
                phi_sq=a * a * (m.second_moment + 2 * b * m.mean + b * b),
                dphi_sq=a * a * m.rho_prime,
            )
        rows.append(row)
    return rows


def _gpn_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# GPN constants: φ(x) = a·(ψ(x) + b), x ~ N(0, 1) (Lu et al. 2020)",
        "",
        "a = 1/√E[ψ'²]; b = the root of smaller |b| of b² + 2b·E[ψ] + E[ψ²] − E[ψ'²] = 0.",
        "",
        "| activation | a | b | E[φ²] | E[φ'²] |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['activation']} | — | — | — | — ({r['error']}) |")
        else:
            lines.append(
                f"| {r['activation']} | {r['a']:.6f} | {r['b']:.6f} | "
                f"{r['phi_sq']:.6f} | {r['dphi_sq']:.6f} |"
            )
    return "\n".join(lines) + "\n"


def run_gpn(args: argparse.Namespace) -> int:
    """Print (and with ``--out`` write) the markdown table of GPN constants."""
    try:
        import anact

        anact.gpn_constants  # noqa: B018
    except (ImportError, AttributeError):
        print("error: anact.gpn_constants is not available in this installation",
              file=sys.stderr)
        return 1
    from anact.activations import list_activations

    acts = args.activations or list_activations()
    with _one_thread():
        text = _gpn_markdown(gpn_table(acts))
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rscore`` and ``gpn`` sub-commands to the ``anact`` parser."""
    p = subparsers.add_parser(
        "rscore",
        help="R score vs σ of activations (paper Figure 2): PNG, CSV, markdown",
        description="R(δ, σ) = ln(Var[δ(x)] / (σ²·E[δ'(x)²])), x ~ N(0, σ²) (eq. 19-21), "
        "computed exactly. Default range 0.01-10 on a log axis: ReLU is flat at "
        "ln(1 - 1/π) = -0.383; functions with a continuous slope at 0 (Tanh, ELU, Swish, "
        "GELU, Mish) tend to 0 as σ → 0 and fall as σ grows; SELU, whose slope jumps at 0, "
        "stays below -0.03.",
    )
    p.add_argument(
        "--activations", nargs="+", type=parse_activation, default=list(FIGURE2_ACTIVATIONS),
        metavar="ACT",
        help="registered names, optionally with parameters, e.g. lrelu:negative_slope=0.2 "
        f"(default: {' '.join(FIGURE2_ACTIVATIONS)})",
    )
    p.add_argument("--sigma-min", type=float, default=0.01, help="smallest σ (default 0.01)")
    p.add_argument("--sigma-max", type=float, default=10.0, help="largest σ (default 10)")
    p.add_argument("--num", type=int, default=200, help="number of σ values (default 200)")
    p.add_argument(
        "--log-sigma", action=argparse.BooleanOptionalAction, default=True,
        help="log-spaced σ and a log σ axis (default; --no-log-sigma for linear)",
    )
    p.add_argument("--out-dir", default=".", help="output folder (default: current dir)")
    p.add_argument("--name", default="rscore", help="file stem of the outputs (default rscore)")
    p.set_defaults(func=run_rscore)

    g = subparsers.add_parser(
        "gpn",
        help="table of GPN constants (a, b) for every registered activation",
        description="a = 1/sqrt(E[ψ'²]), b = root of smaller |b| of "
        "b² + 2b·E[ψ] + E[ψ²] − E[ψ'²] = 0, x ~ N(0, 1); printed as markdown.",
    )
    g.add_argument(
        "--activations", nargs="+", type=parse_activation, default=None, metavar="ACT",
        help="activations (default: every registered one)",
    )
    g.add_argument("--out", default=None, help="also write the table to this markdown file")
    g.set_defaults(func=run_gpn)
