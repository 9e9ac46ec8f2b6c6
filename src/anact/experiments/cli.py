"""Sub-commands ``anact reproduce <study>`` and ``anact report DIR``.

``anact reproduce table1`` runs the study's default (about 10 minutes on a 2-core
CPU), stores every epoch in ``results/results.sqlite``, resumes anything
interrupted, and writes ``results/report.md`` with figures. ``--paper`` runs the
paper's protocol instead (Table 1: 25 runs × 50 epochs on the full training set).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register", "main", "cmd_reproduce", "cmd_report"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def _epoch_list(text: str) -> list[int]:
    try:
        return [_positive_int(t) for t in text.split(",") if t.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"expected epochs like 1,2,5: {e}") from None


def _setting(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def register(subparsers: Any) -> None:
    """Add ``reproduce`` and ``report`` to the ``anact`` command line."""
    from anact.experiments.studies import STUDIES

    p = subparsers.add_parser(
        "reproduce",
        help="run a study of the paper (stored, resumable) and write its report",
        description=(
            "Run a study: each activation × N runs × E epochs, every epoch stored in "
            "OUT/results.sqlite; interrupted runs resume, finished runs are skipped; "
            "then write OUT/report.md and figures. Defaults are sized for ~10 min on a "
            "2-core CPU; --paper runs the paper's protocol."
        ),
    )
    p.add_argument("study", choices=sorted(STUDIES), help="which study")
    p.add_argument(
        "--activations",
        help="comma-separated activation names, case-insensitive (default: all of the "
        "study's), e.g. relu,nrelu,swish,nswish",
    )
    p.add_argument("--paper", action="store_true", help="the paper's protocol (runs, epochs, data)")
    p.add_argument("--runs", type=_positive_int, help="runs (seeds) per activation")
    p.add_argument("--epochs", type=_positive_int, help="epochs per run")
    p.add_argument("--batch-size", type=_positive_int, help="training batch size")
    p.add_argument("--lr", type=_positive_float, help="learning rate")
    p.add_argument("--seed", type=_nonneg_int, help="seed of the first run (run i: seed + i)")
    p.add_argument(
        "--train-subset", type=_nonneg_int,
        help="train on the first N training examples (0: the full training set)",
    )  # fmt: skip
    p.add_argument("--dataset", help="data set, e.g. fashion-mnist (default) or mnist")
    p.add_argument("--data-dir", help="directory of the data set's files (never downloaded)")
    p.add_argument(
        "--set", dest="settings", action="append", type=_setting, default=[], metavar="KEY=VALUE",
        help="any other setting of the study (JSON value), e.g. --set momentum=0.9",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--threads", type=_nonneg_int, default=1,
        help="CPU threads for torch (default 1: small models gain little from more, and "
        "oversubscribed cores slow everyone down; 0 = torch's default)",
    )  # fmt: skip
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--threshold", type=float, help="accuracy %% of the 'runs under' columns")
    p.add_argument(
        "--ensemble", action="store_true",
        help="train each activation's runs together as one batched model (torch.func.vmap; "
        "same numbers to float rounding, same store and checkpoints; see docs/ensemble.md)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.set_defaults(func=cmd_reproduce)

    r = subparsers.add_parser(
        "report",
        help="write DIR/report.md and figures from DIR/results.sqlite",
        description="Tables laid out like the paper's, with its numbers beside ours, and "
        "figures (accuracy, Score of eq. 22, Σ|E W|; medians over runs), written into DIR.",
    )
    r.add_argument("dir", nargs="?", default="results", help="output directory of reproduce")
    r.add_argument("--threshold", type=float, help="accuracy %% of the 'runs under' columns")
    r.add_argument(
        "--threshold-epochs", type=_epoch_list, help="epochs of those columns, e.g. 1,2,5"
    )
    r.add_argument("--no-figures", action="store_true", help="only the markdown")
    r.set_defaults(func=cmd_report)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``anact reproduce``: run the study, then write the report."""
    import torch

    from anact.experiments.data import DataError
    from anact.experiments.models import parse_activations
    from anact.experiments.report import write_report
    from anact.experiments.runner import check_ensemble_support, reproduce
    from anact.experiments.studies import get_study

    study = get_study(args.study)
    overrides: dict[str, Any] = dict(args.settings)
    for key in ("runs", "epochs", "batch_size", "lr", "seed", "dataset", "data_dir"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.train_subset is not None:
        overrides["train_subset"] = args.train_subset or None
    try:
        config = study.config(paper=args.paper)
        for key, value in overrides.items():
            if key not in config:
                raise ValueError(
                    f"study {study.name!r} has no setting {key!r}; "
                    f"its settings are: {', '.join(sorted(config))}"
                )
            config[key] = value
        activations = parse_activations(args.activations or study.activations, study.activations)
        if args.ensemble:
            check_ensemble_support(study)
        device = torch.device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
    except (ValueError, RuntimeError) as e:
        print(f"anact reproduce: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        shown = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"{study.name}: {', '.join(activations)}; {shown}; out={args.out}", file=sys.stderr)
    try:
        reproduce(
            study, config, activations, out_dir=args.out, device=device, quiet=args.quiet,
            ensemble=args.ensemble,
        )  # fmt: skip
    except DataError as e:
        print(f"anact reproduce: error: {e}", file=sys.stderr)
        return 2
    if not args.no_report:
        path = write_report(args.out, threshold=args.threshold)
        print(f"report: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``anact report DIR``."""
    from anact.experiments.report import write_report

    try:
        path = write_report(
            args.dir, threshold=args.threshold, threshold_epochs=args.threshold_epochs,
            figures=not args.no_figures,
        )  # fmt: skip
    except FileNotFoundError as e:
        print(f"anact report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m anact.experiments.cli``: these sub-commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="anact")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
