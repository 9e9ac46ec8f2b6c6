"""``anact report DIR``: the stored runs as paper-style markdown tables and figures.

For every group of runs in ``DIR/results.sqlite`` that share a study, data set and
settings, the report has one table laid out like the paper's Table 1 (mean and
median over runs of the best validation accuracy, the number of runs under a
threshold until epoch i) with the paper's published numbers beside ours, and three
figures, each curve the median over runs per epoch: validation accuracy (per epoch
and best so far), the Score of eq. 22 (Figure 3) and Σ|E W| (Figure 4). Only
finished runs enter the numbers; epochs of a diverged run (NaN Score) are left out
of the Score and Σ|E W| medians, and its accuracy (10 %) counts as it is.

A study's ``metric`` names what ``val_acc`` holds (BLEU for ``translation``); the
tables and figures are labelled with it. Groups whose epochs carry corrupted-set
accuracies in their ``extra`` metrics (``corrupt_acc``, ``corrupt_acc/<name>``: the
``layeract`` study) get a robustness table, clean vs corrupted accuracy. The Score
is "n/a" for activations the convergence monitor cannot hook (layer-level LA-SiLU,
LA-HardSiLU): no Score was measured for them.

Runs that are not finished are left out of the numbers: failed runs are listed with
their error, pending or running ones counted. Where runs were trained as an ensemble
(``--ensemble``; the store's per-epoch ``mode``), the table gets a "mode" column and a
note: the same math as sequential runs, but rounding differences that grow over
training, so the two are not bit-identical.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anact.experiments.store import Store

__all__ = [
    "ActivationResult",
    "Group",
    "convergence_table",
    "load_groups",
    "markdown_table",
    "robustness_table",
    "spearman",
    "write_report",
]

PAPER_EPOCHS = (5, 10, 15, 30, 50)


@dataclass
class ActivationResult:
    """The finished runs of one activation in a group; curves are per run, per epoch."""

    activation: str
    seeds: list[int] = field(default_factory=list)
    val_acc: list[list[float]] = field(default_factory=list)
    val_acc_top5: list[list[float | None]] = field(default_factory=list)
    train_loss: list[list[float | None]] = field(default_factory=list)
    score: list[list[float | None]] = field(default_factory=list)
    weight_mean_abs_sum: list[list[float | None]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    extra: list[list[dict[str, float | None]]] = field(default_factory=list)
    #: per run: "sequential", "ensemble", "mixed" (resumed in the other mode) or None
    #: (not recorded: databases from before the store's ``mode`` column)
    modes: list[str | None] = field(default_factory=list)

    def best(self, until: int | None = None) -> list[float]:
        """Best validation accuracy of each run over epochs 1..until (all if None)."""
        return [max(c[:until]) if c[:until] else math.nan for c in self.val_acc]

    def under(self, threshold: float, epoch: int) -> int | None:
        """Runs whose best accuracy until ``epoch`` is below ``threshold`` (None if no
        run has that many epochs)."""
        runs = [c for c in self.val_acc if len(c) >= epoch]
        if not runs:
            return None
        return sum(max(c[:epoch]) < threshold for c in runs)


@dataclass
class Group:
    """Runs of one study on one data set under the same settings."""

    study: str
    model: str
    dataset: str
    config_key: str
    config: dict[str, Any]
    results: dict[str, ActivationResult]
    unfinished: int = 0
    #: failed runs: dicts with activation, seed, epochs_done and error (its last line)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return int(self.config.get("epochs", 0))


def load_groups(store: Store) -> list[Group]:
    """All groups in the store, in order of their first run."""
    groups: dict[tuple[str, str, str, str], Group] = {}
    for run in store.runs():
        key = (run["study"], run["model"], run["dataset"], run["config_key"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(
                run["study"], run["model"], run["dataset"], run["config_key"], run["config"], {}
            )
        if run["status"] == "failed":
            lines = [ln for ln in (run["error"] or "").splitlines() if ln.strip()]
            g.failed.append({
                "activation": run["activation"], "seed": run["seed"],
                "epochs_done": run["epochs_done"],
                "error": lines[-1].strip() if lines else "no error recorded",
            })  # fmt: skip
            continue
        if run["status"] != "done":
            g.unfinished += 1
            continue
        eps = store.epochs(run["id"])
        r = g.results.setdefault(run["activation"], ActivationResult(run["activation"]))
        r.seeds.append(run["seed"])
        r.val_acc.append([e["val_acc"] for e in eps])
        for name in ("val_acc_top5", "train_loss", "score", "weight_mean_abs_sum"):
            getattr(r, name).append([e[name] for e in eps])
        r.seconds.append(sum(e["seconds"] or 0.0 for e in eps))
        r.extra.append([e.get("extra") or {} for e in eps])
        modes = {e.get("mode") for e in eps} - {None}
        r.modes.append(None if not modes else modes.pop() if len(modes) == 1 else "mixed")
    return list(groups.values())


def _mode_cell(modes: Sequence[str | None]) -> str:
    """How an activation's runs were trained, e.g. "ensemble" or "2 sequential, 1 ensemble"."""
    counts = Counter(m or "not recorded" for m in modes)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))


def _has_ensemble(group: Group) -> bool:
    return any(m in ("ensemble", "mixed") for r in group.results.values() for m in r.modes)


def scaled_epochs(epochs: int, paper_epochs: Sequence[int] = PAPER_EPOCHS) -> tuple[int, ...]:
    """The paper's epochs 5, 10, 15, 30, 50 of 50 scaled to ``epochs`` (rounded up)."""
    top = max(paper_epochs)
    return tuple(sorted({max(1, min(epochs, math.ceil(e * epochs / top))) for e in paper_epochs}))


def _median_curve(curves: Sequence[Sequence[float | None]]) -> list[float]:
    """Per-epoch median over runs (NaN/None values ignored)."""
    length = max((len(c) for c in curves), default=0)
    out = []
    for i in range(length):
        vals = [c[i] for c in curves if i < len(c) and c[i] is not None and not math.isnan(c[i])]
        out.append(statistics.median(vals) if vals else math.nan)
    return out


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _paper_cell(v: Any) -> str:
    if isinstance(v, Mapping):
        return "/".join(str(v[k]) for k in sorted(v))
    if isinstance(v, (tuple, list)):
        return " / ".join(f"{x:.2f}" for x in v)
    return _fmt(v) if isinstance(v, float) else str(v)


def _paper_keys(paper: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """The paper's column names for these methods, each once, in first-seen order."""
    return list(dict.fromkeys(k for a in names for k in paper.get(a, {})))


def _metric(metric: str) -> tuple[str, str]:
    """(label, unit) of a study's metric, e.g. ("accuracy", "%"), ("BLEU", "")."""
    from anact.experiments.studies import METRICS

    return METRICS.get(metric, (metric, ""))


#: labels of activations outside :data:`anact.experiments.models.ACTIVATIONS`
#: (the ``layeract`` study's own)
_LABELS = {"hardswish": "HardSwish", "la-silu": "LA-SiLU", "la-hardsilu": "LA-HardSiLU"}


def _label(name: str) -> str:
    from anact.experiments.models import ACTIVATIONS

    spec = ACTIVATIONS.get(name)
    return spec.label if spec else _LABELS.get(name, name)


def markdown_table(
    group: Group,
    *,
    threshold: float | None,
    threshold_epochs: Sequence[int],
    paper: Mapping[str, Mapping[str, Any]] | None = None,
    order: Sequence[str] | None = None,
    metric: str = "accuracy",
) -> str:
    """The group's table in the layout of the paper's Table 1, with paper columns.

    The best mean and median of ours are in bold. ``metric``: a key of
    :data:`anact.experiments.studies.METRICS`; other than accuracy it is named in
    the mean/median headers (e.g. "mean BLEU").
    """
    label, unit = _metric(metric)
    names = [a for a in (order or []) if a in group.results]
    names += [a for a in group.results if a not in names]
    paper = paper or {}
    paper_keys = _paper_keys(paper, names)
    has_top5 = any(
        v is not None for r in group.results.values() for c in r.val_acc_top5 for v in c
    )
    suffix = "" if metric == "accuracy" else f" {label}"
    head = ["method", "runs", f"mean{suffix}", f"median{suffix}"]
    if has_top5:
        head.append("median top-5")
    if threshold is not None:
        head += [f"<{threshold:g}{unit or ' ' + label} @{e}" for e in threshold_epochs]
    head += ["s/epoch"]
    show_mode = _has_ensemble(group)
    if show_mode:
        head.append("mode")
    head += [f"paper {'under 98% @5/10/15/30/50' if k == 'under' else k}" for k in paper_keys]

    stats = {}
    for a in names:
        best = group.results[a].best()
        stats[a] = (statistics.fmean(best), statistics.median(best))
    best_mean = max((s[0] for s in stats.values()), default=math.nan)
    best_median = max((s[1] for s in stats.values()), default=math.nan)
    if len(stats) > 1:  # a best only where some row is not: all tied (e.g. at chance) is none
        if all(s[0] == best_mean for s in stats.values()):
            best_mean = math.nan
        if all(s[1] == best_median for s in stats.values()):
            best_median = math.nan

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in names:
        r = group.results[a]
        mean, median = stats[a]
        row = [
            _label(a),
            str(len(r.seeds)),
            f"**{_fmt(mean)}**" if mean == best_mean else _fmt(mean),
            f"**{_fmt(median)}**" if median == best_median else _fmt(median),
        ]
        if has_top5:
            top5 = [max((v for v in c if v is not None), default=math.nan) for c in r.val_acc_top5]
            row.append(_fmt(statistics.median(top5)))
        if threshold is not None:
            row += [
                "–" if (u := r.under(threshold, e)) is None else str(u) for e in threshold_epochs
            ]
        per_epoch = [s / max(1, len(c)) for s, c in zip(r.seconds, r.val_acc, strict=True)]
        row.append(_fmt(statistics.median(per_epoch), 1))
        if show_mode:
            row.append(_mode_cell(r.modes))
        row += [_paper_cell(paper.get(a, {}).get(k, "–")) for k in paper_keys]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (NaN if undefined)."""
    if len(x) != len(y) or len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


def convergence_table(
    group: Group,
    threshold: float | None,
    order: Sequence[str] | None = None,
    metric: str = "accuracy",
) -> str:
    """Score (eq. 22) against convergence speed, per activation (medians over runs).

    Columns: median over runs of the mean Score over epochs; median accuracy after
    epoch 1; median epoch of first reaching ``threshold`` (">E" if a run never did;
    the median then counts such runs as E + 1). Then Spearman's rank correlation
    across activations between Score and epoch-1 accuracy: the paper (§3.1) finds
    the Score "roughly inversely related to the speed of convergence", i.e. negative.
    An activation without any measured Score (the monitor hooked no layer: see
    :func:`_unmeasured`) shows "n/a" and is left out of the correlation; one whose
    runs diverged from the start (no Score, no weights) shows "–".
    """
    label, unit = _metric(metric)
    names = [a for a in (order or []) if a in group.results]
    names += [a for a in group.results if a not in names]
    head = ["method", "Score (mean over epochs)", f"{label} after epoch 1"]
    if threshold is not None:
        head.append(f"epochs to {threshold:g}{unit or ' ' + label}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    scores, first = [], []
    for a in names:
        r = group.results[a]
        per_run = [
            statistics.fmean(v) if (v := [x for x in c if x is not None and math.isfinite(x)])
            else math.nan
            for c in r.score
        ]  # fmt: skip
        sc = statistics.median(per_run)
        unmeasured = _unmeasured(r)
        if unmeasured:
            sc = math.nan
        acc1 = statistics.median(c[0] for c in r.val_acc if c)
        row = [_label(a), "n/a" if unmeasured else _fmt(sc, 3), _fmt(acc1)]
        if threshold is not None:
            reach = [
                next((i + 1 for i, v in enumerate(c) if v >= threshold), len(c) + 1)
                for c in r.val_acc
            ]
            med = statistics.median(reach)
            row.append(f">{group.epochs}" if med > group.epochs else f"{med:g}")
        lines.append("| " + " | ".join(row) + " |")
        if math.isfinite(sc):
            scores.append(sc)
            first.append(acc1)
    rho = spearman(scores, first)
    lines += [
        "",
        f"Spearman rank correlation across activations, Score vs {label} after epoch 1: "
        f"{_fmt(rho)} (the paper's claim predicts a negative value: lower Score, faster "
        "convergence).",
    ]
    return "\n".join(lines)


def _unmeasured(r: ActivationResult) -> bool:
    """True if the monitor measured no Score for this activation (it hooked no layer,
    e.g. layer-level LA-SiLU): no finite Score in any epoch of any run, while the
    weights were measured (a diverged run has neither, and shows "–"); or, in
    databases written before such Scores were stored as NULL, exactly 0.0 in every
    epoch (the monitor's empty sum; a real Score, a sum of |ln ρ| terms over steps
    and layers, is never exactly 0)."""
    vals = [v for c in r.score for v in c if v is not None and math.isfinite(v)]
    if vals:
        return all(v == 0.0 for v in vals)
    return any(v is not None and math.isfinite(v) for c in r.weight_mean_abs_sum for v in c)


def robustness_table(
    group: Group,
    order: Sequence[str] | None = None,
    paper: Mapping[str, Mapping[str, Any]] | None = None,
) -> str | None:
    """Clean vs corrupted accuracy per activation, or None if no run stored any.

    Per activation, the median over runs at each run's last epoch of: the clean
    top-1 on the full test set (``val_acc``), the clean top-1 on the images that were
    corrupted (``corrupt_clean_acc``; the study corrupts the first ``corrupt_subset``
    test images), the mean corrupted top-1 (``corrupt_acc``: all corruptions ×
    severities), the drop (clean minus corrupted, both on the corrupted images), the
    accuracy per corruption (``corrupt_acc/<name>``, mean over severities) and, if
    stored, per severity (``corrupt_acc/sev<k>``); then the paper's clean top-1 where
    it has one. Runs stored without ``corrupt_clean_acc`` (before it existed) have it
    only if their corrupted images were the whole test set; otherwise "–", and no drop.
    """
    names = [a for a in (order or []) if a in group.results]
    names += [a for a in group.results if a not in names]
    last = {a: [c[-1] for c in group.results[a].extra if c] for a in names}
    if not any("corrupt_acc" in e for es in last.values() for e in es):
        return None
    subkeys: list[str] = []
    for es in last.values():
        for e in es:
            for k in e:
                if k.startswith("corrupt_acc/") and k not in subkeys:
                    subkeys.append(k)
    sev = [k for k in subkeys if k.startswith("corrupt_acc/sev")]
    per = [k for k in subkeys if k not in sev]
    paper = paper or {}
    paper_keys = _paper_keys(paper, names)

    def med(vals: Sequence[float | None]) -> float:
        vs = [v for v in vals if v is not None and not math.isnan(v)]
        return statistics.median(vs) if vs else math.nan

    whole_set = group.config.get("corrupt_subset") is None  # corrupted: the full test set
    head = ["method", "runs", "clean top-1 (full test)", "clean top-1 (corrupted images)",
            "corrupted top-1 (mean)", "drop"]  # fmt: skip
    head += [k.removeprefix("corrupt_acc/").replace("_", " ") for k in per + sev]
    head += [f"paper clean {k}" for k in paper_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in names:
        r = group.results[a]
        clean = med([c[-1] for c in r.val_acc if c])
        same_images = med([
            e.get("corrupt_clean_acc", c[-1] if whole_set else None)
            for e, c in zip(last[a], (c for c in r.val_acc if c), strict=True)
        ])  # fmt: skip
        corrupt = med([e.get("corrupt_acc") for e in last[a]])
        row = [_label(a), str(len(r.seeds)), _fmt(clean), _fmt(same_images), _fmt(corrupt),
               _fmt(same_images - corrupt)]  # fmt: skip
        row += [_fmt(med([e.get(k) for e in last[a]])) for k in per + sev]
        row += [_paper_cell(paper.get(a, {}).get(k, "–")) for k in paper_keys]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _corrupted_images(group: Group) -> str:
    n = group.config.get("corrupt_subset")
    return "the whole test set" if n is None else f"the first {n} test images"


def _plot(
    group: Group, names: Sequence[str], out: Path, stem: str, metric: str = "accuracy"
) -> dict[str, Path]:
    """Three PNGs (accuracy, Score, Σ|E W|), median over runs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from anact.experiments.models import ACTIVATIONS

    label, unit = _metric(metric)
    ylab = f"{label} ({unit})" if unit else label
    colors = plt.get_cmap("tab10").colors
    style = {}
    for i, a in enumerate(names):
        fam = ACTIVATIONS[a].family if a in ACTIVATIONS else "unnormalized"
        ls, lw = {"normalized": ("-", 2.4), "gpn": ("-.", 1.6)}.get(fam, ("--", 1.4))
        style[a] = {"color": colors[i % len(colors)], "ls": ls, "lw": lw, "label": _label(a)}
    n_runs = max(len(r.seeds) for r in group.results.values())
    what = f"{group.model}, {group.dataset}; median of {n_runs} run(s)"
    paths = {}

    def curve(a: str, attr: str) -> tuple[list[int], list[float]]:
        ys = _median_curve(getattr(group.results[a], attr))
        return list(range(1, len(ys) + 1)), ys

    # accuracy per epoch, and best-so-far (the quantity of the table), zoomed on the top
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    tops = []
    for a in names:
        xs, ys = curve(a, "val_acc")
        axes[0].plot(xs, ys, marker="o", ms=3, **style[a])
        best = [
            [max(c[: i + 1]) for i in range(len(c))] for c in group.results[a].val_acc
        ]  # fmt: skip
        ys = _median_curve(best)
        axes[1].plot(range(1, len(ys) + 1), ys, marker="o", ms=3, **style[a])
        tops += [y for y in ys[len(ys) // 2 :] if not math.isnan(y)]
    axes[0].set_title(f"validation {label}")
    axes[1].set_title(f"best validation {label} so far")
    if tops:
        tops.sort()
        axes[1].set_ylim(max(0.0, tops[len(tops) // 10] - 2.0), tops[-1] + 0.5)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, ncol=2, loc="lower right")
    fig.suptitle(f"Validation {label} ({what})")
    fig.tight_layout()
    paths["accuracy"] = out / f"{stem}_accuracy.png"
    fig.savefig(paths["accuracy"], dpi=110)
    plt.close(fig)

    for attr, title, ylabel, key in (
        ("score", "Score = Σ (|ln ρ| + |ln ρ'|)/2 per epoch (eq. 22, Figure 3)", "Score", "score"),
        ("weight_mean_abs_sum", "Σ|E W| over weight matrices (Figure 4)", "Σ|E W|", "weights"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for a in names:
            xs, ys = curve(a, attr)
            ax.plot(xs, ys, marker="o", ms=3, **style[a])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{what}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        paths[key] = out / f"{stem}_{key}.png"
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)
    return paths


def _threshold_for(study: Any, group: Group) -> float | None:
    t = getattr(study, "threshold", None)
    if isinstance(t, Mapping):
        return t.get(group.dataset)
    if callable(t):
        return t({"dataset": group.dataset, **group.config})
    return t


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    threshold_epochs: Sequence[int] | None = None,
    figures: bool = True,
) -> Path:
    """Write ``DIR/report.md`` (and PNG figures) from ``DIR/results.sqlite``.

    Args:
        threshold: accuracy (%) of the "runs under" columns; default per study
            and data set (``Study.threshold``).
        threshold_epochs: the epochs of those columns; default the study's, else
            the paper's 5/10/15/30/50 scaled to the number of epochs.
        figures: also draw the PNGs.

    Returns the path of ``report.md``.
    """
    from anact.experiments.runner import RESULTS_FILE
    from anact.experiments.studies import STUDIES

    out = Path(out_dir)
    db = out / RESULTS_FILE
    if not db.exists():
        raise FileNotFoundError(
            f"no {RESULTS_FILE} in {out}; run `anact reproduce <study> --out {out}` first"
        )
    with Store(db) as store:
        groups = load_groups(store)
    stems: dict[str, int] = {}
    for g in groups:
        stems[f"{g.study}_{g.dataset}"] = stems.get(f"{g.study}_{g.dataset}", 0) + 1

    lines = [f"# Results in `{out}`", ""]
    if not groups:
        lines.append("No runs stored yet.")
    for g in groups:
        study = STUDIES.get(g.study)
        settings = ", ".join(f"{k}={v}" for k, v in sorted(g.config.items()))
        title = study.title if study else g.study
        lines += [f"## {g.study}: {title}", "", f"{g.model} on {g.dataset}; {settings}.", ""]
        if g.failed:
            lines += [
                f"{len(g.failed)} failed run(s) left out (the same command retries them, from "
                "their last finished epoch):",
                "",
                *(f"- {_label(f['activation'])} seed {f['seed']}, after {f['epochs_done']} "
                  f"epoch(s): `{f['error']}`" for f in g.failed),
                "",
            ]  # fmt: skip
        if g.unfinished:
            lines += [
                f"{g.unfinished} unfinished run(s) left out (pending, or running in another "
                "process; rerun to resume them).",
                "",
            ]
        if not g.results:
            continue
        thr = threshold if threshold is not None else _threshold_for(study, g)
        t_epochs = tuple(
            threshold_epochs
            or (study.threshold_epochs if study and study.threshold_epochs else None)
            or scaled_epochs(g.epochs)
        )
        order = list(study.activations) if study else []
        metric = study.metric if study else "accuracy"
        label, unit = _metric(metric)
        unit_txt = f" ({unit})" if unit else ""
        lines.append(
            markdown_table(
                g, threshold=thr, threshold_epochs=t_epochs,
                paper=study.paper if study else None, order=order, metric=metric,
            )  # fmt: skip
        )
        lines.append("")
        notes = [
            f"mean/median: of each run's best validation {label}{unit_txt} over its epochs; "
            f"validation = {study.validation if study else 'the official test split'}."
        ]
        if thr is not None:
            notes.append(
                f"<{thr:g}{unit or ' ' + label} @i: runs whose best validation {label} "
                f"until epoch i is below {thr:g}{unit or ' ' + label}."
            )
        if _has_ensemble(g):
            notes.append(
                "mode: how each run was trained; ensemble runs (`--ensemble`) do the same math "
                "as sequential ones, batched, so they differ by float rounding per step and "
                "these differences grow over training (docs/ensemble.md); mixed: resumed in "
                "the other mode."
            )
        if study and study.paper_caption:
            notes.append(study.paper_caption)
        lines += [" ".join(notes), ""]
        robust = robustness_table(g, order, paper=study.paper if study else None)
        if robust is not None:
            lines += [
                "Robustness: clean vs corrupted accuracy (%), median over runs at the last "
                "epoch:",
                "",
                robust,
                "",
                "clean top-1 (full test): the validation accuracy above; clean top-1 "
                "(corrupted images): on the uncorrupted originals of the corrupted copies "
                f"({_corrupted_images(g)}); corrupted: mean top-1 over every corruption × "
                "severity of those copies; per corruption: mean over severities; drop: clean "
                "(corrupted images) − corrupted, on the same images. The paper column is the "
                "clean top-1 only (no corrupted-set numbers published).",
                "",
            ]
        lines += [
            "Score and convergence speed:", "", convergence_table(g, thr, order, metric), "",
        ]  # fmt: skip
        if figures:
            names = [a for a in order if a in g.results]
            names += [a for a in g.results if a not in names]
            stem = f"{g.study}_{g.dataset}"
            if stems[stem] > 1:
                stem += f"_{g.config_key[:8]}"
            paths = _plot(g, names, out, stem, metric)
            lines += [f"![{k}]({p.name})" for k, p in paths.items()]
            lines.append("")
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
