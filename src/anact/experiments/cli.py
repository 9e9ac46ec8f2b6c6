"""Sub-commands ``anact reproduce <study>`` and ``anact report DIR``.

``anact reproduce table1`` runs the study's default (about 6 minutes of one CPU
core), stores every epoch in ``results/results.sqlite``, resumes anything
interrupted, and writes ``results/report.md`` with figures. ``--paper`` runs the
paper's protocol instead (Table 1: 25 runs × 50 epochs on the full training set).

Everything that can be checked before training is (settings, including ``--set``
values, the device, the output directory, then the data): such errors print
``anact reproduce: error: …`` and exit with 2, and leave no run in the store.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["register", "main", "check_settings", "cmd_reproduce", "cmd_report", "prepare_out"]


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
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {v}")
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


#: the checks of the flags, applied to the same settings given with --set
_FLAG_CHECKS = {
    "runs": _positive_int, "epochs": _positive_int, "batch_size": _positive_int,
    "lr": _positive_float, "seed": _nonneg_int, "train_subset": _nonneg_int,
}  # fmt: skip


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "null")


def check_settings(study: Any, config: dict[str, Any]) -> None:
    """Check the merged settings as the flags check theirs (``--set epochs=0`` fails as
    ``--epochs 0`` does), other keys against the kind of their default value, and the
    data set against the study's; ``train_subset`` 0 becomes None (the full set).
    Raises ValueError naming the setting."""
    for key, check in _FLAG_CHECKS.items():
        if key not in config or (key == "train_subset" and config[key] is None):
            continue
        try:
            value = check(str(config[key]))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"setting {key}: {e}") from None
        config[key] = None if key == "train_subset" and value == 0 else value
    for key, value in config.items():
        if key in _FLAG_CHECKS:
            continue
        refs = [study.defaults.get(key), study.paper_preset.get(key, study.defaults.get(key))]
        if value is None and None in refs:
            continue
        kinds = {_kind(r) for r in refs if r is not None}
        if kinds and _kind(value) not in kinds:
            raise ValueError(
                f"setting {key}: expected {' or '.join(sorted(kinds))} (a JSON value, e.g. "
                f"--set {key}={json.dumps(refs[0])}), got {value!r}"
            )
        if _kind(value) == "a number" and not math.isfinite(value):
            raise ValueError(f"setting {key}: expected a finite number, got {value!r}")
    if study.datasets and config.get("dataset") not in study.datasets:
        raise ValueError(
            f"study {study.name!r} has no dataset {config.get('dataset')!r}; "
            f"choose one of {', '.join(study.datasets)}"
        )


def prepare_out(out: str) -> Path:
    """Create the output directory (and checkpoints/) and check that it is writable;
    ValueError saying what is wrong."""
    path = Path(out)
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ValueError(
            f"--out {out}: {path if path.is_file() else 'a part of the path'} is a file, "
            "not a directory; pass a directory (it is created if missing)"
        ) from None
    except PermissionError:
        raise ValueError(
            f"--out {out}: no permission to write there; pass a directory you can write"
        ) from None
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return path


def _study_lines() -> tuple[str, str, str]:
    """(epilog, --dataset help, --train-subset help), per study, from the registry."""
    from anact.experiments.studies import STUDIES

    rows, by_datasets = [], {}
    for name, st in sorted(STUDIES.items()):
        d, full = st.defaults, st.config(paper=True)
        subset = f" (first {d['train_subset']} training examples)" if d.get("train_subset") else ""
        rows += [
            f"  {name:<12} {d['runs']} run(s) × {d['epochs']} epochs on {d['dataset']}{subset}",
            f"  {'':<12} --paper: {full['runs']} run(s) × {full['epochs']} epochs on "
            f"{full['dataset']}",
        ]
        by_datasets.setdefault(st.datasets, []).append(name)
    epilog = (
        "quick defaults per study (--paper: the paper's protocol, mostly for a GPU):\n"
        + "\n".join(rows)
        + "\n\ntable1's default takes about 6 minutes of one CPU core; the other studies' "
        "measured times\nare in docs/results.md."
    )
    dataset_help = "data set (the first is the study's default): " + "; ".join(
        f"{', '.join(names)}: {', '.join(ds)}" for ds, names in by_datasets.items()
    )
    subset_help = (
        "train on the first N training examples (0: the full training set; default per study, "
        "see below; tiny-imagenet: N/200 images per class)"
    )
    return epilog, dataset_help, subset_help


def register(subparsers: Any) -> None:
    """Add ``reproduce`` and ``report`` to the ``anact`` command line."""
    from anact.experiments.studies import STUDIES

    epilog, dataset_help, subset_help = _study_lines()
    p = subparsers.add_parser(
        "reproduce",
        help="run a study of the paper (stored, resumable) and write its report",
        description=textwrap.fill(
            "Run a study: each activation × N runs × E epochs, every epoch stored in "
            "OUT/results.sqlite; interrupted runs resume, finished runs are skipped; "
            "then write OUT/report.md and figures. Each study's defaults are a quick "
            "CPU-sized version of it (listed below); --paper runs the paper's protocol.",
            width=88,
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--train-subset", type=_nonneg_int, help=subset_help)
    p.add_argument("--dataset", help=dataset_help)
    p.add_argument(
        "--data-dir",
        help="the data set's folder (or file) in the layout --dataset names (never downloaded)",
    )
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
        help="train each activation's runs together as one batched model (torch.func.vmap): "
        "the same math, but batched kernels round differently, so each step differs at float "
        "rounding level and these differences grow over training (after a full epoch the "
        "accuracies can differ by a point; measured agreement in docs/ensemble.md); same "
        "runs and checkpoints, each epoch stored with its mode, shown in the report",
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
    """``anact reproduce``: check everything, run the study, then write the report."""
    import torch

    from anact.experiments.data import DataError
    from anact.experiments.data.layouts import data_dir_hint
    from anact.experiments.models import parse_activations
    from anact.experiments.report import write_report
    from anact.experiments.runner import check_device, check_ensemble_support, reproduce
    from anact.experiments.studies import get_study

    def error(message: str) -> int:
        print(f"anact reproduce: error: {message}", file=sys.stderr)
        return 2

    study = get_study(args.study)
    overrides: dict[str, Any] = dict(args.settings)
    for key in ("runs", "epochs", "batch_size", "lr", "seed", "dataset", "data_dir"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.train_subset is not None:
        overrides["train_subset"] = args.train_subset
    try:
        config = study.config(paper=args.paper)
        for key, value in overrides.items():
            if key not in config:
                raise ValueError(
                    f"study {study.name!r} has no setting {key!r}; "
                    f"its settings are: {', '.join(sorted(config))}"
                )
            config[key] = value
        check_settings(study, config)
        activations = parse_activations(args.activations or study.activations, study.activations)
        if args.ensemble:
            check_ensemble_support(study)
        device = check_device(args.device)
        prepare_out(args.out)
        if args.threads:
            torch.set_num_threads(args.threads)
    except (ValueError, RuntimeError) as e:
        return error(str(e))
    if not args.quiet:
        shown = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"{study.name}: {', '.join(activations)}; {shown}; out={args.out}", file=sys.stderr)
    try:
        reproduce(
            study, config, activations, out_dir=args.out, device=device, quiet=args.quiet,
            ensemble=args.ensemble,
        )  # fmt: skip
    except DataError as e:
        hint = data_dir_hint(config["data_dir"], config["dataset"], study.datasets) if (
            config.get("data_dir")
        ) else ""  # fmt: skip
        return error(f"{e}" + (f"\n  hint: {hint}" if hint else ""))
    except sqlite3.DatabaseError as e:
        return error(f"{Path(args.out) / 'results.sqlite'}: {e}; pass another --out")
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
