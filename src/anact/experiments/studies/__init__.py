"""The study registry: one file per study, one :class:`Study` object each.

A study is the paper's experiment recipe: a model, a data set, the activations it
compares, default settings and the paper's preset, and how to build one run. The
runner (:mod:`anact.experiments.runner`) does everything else the same way for
every study: seeds, the per-epoch loop, the convergence monitor, checkpoints and
resume, the SQLite store, progress bars; the report reads the store.

Adding a study (e.g. ``studies/vgg.py``)::

    from anact.experiments.studies import Study, Trial, register

    def load_data(config, device):           # once per process, shared by all runs
        return load_cifar100(config["data_dir"], device=device)

    def build(config, activation, seed, data, device) -> Trial:
        # the runner has already called torch.manual_seed(seed)
        model = ...; opt = ...; sched = ...
        def train_epoch(gen: torch.Generator, after_step) -> float:
            ...  # shuffle with gen, one optimizer step per batch, call after_step()
            return mean_train_loss          # after each optimizer.step()
        def evaluate() -> dict:
            return {"val_acc": top1_percent, "val_acc_top5": top5_percent_or_None}
        return Trial(model, opt, train_epoch, evaluate, scheduler=sched)

    register(Study(name="vgg", title="VGG19 on CIFAR-100 (Table 2)", model="vgg19",
                   defaults={...}, paper_preset={...}, activations=(...),
                   load_data=load_data, build=build, paper=paper.TABLE2))

Every module in this package is imported when the package is, so the new file is
all it takes (no edit here). Settings are one flat JSON-able
dict (``defaults``); the command line overrides its keys (``--epochs`` → "epochs",
``--set key=value`` for any other key). Keys in :data:`NOT_IDENTITY` (and a study's
``not_identity``) do not change a run's numbers; all other keys, plus activation and
seed, make the run's identity in the store, so changing them starts new runs and
repeating them resumes or skips the stored ones.

Required keys of ``defaults``: ``dataset``, ``epochs``, ``runs``, ``seed``. The
run with index i (0-based) uses seed ``seed + i``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "METRICS",
    "NOT_IDENTITY",
    "EnsembleSpec",
    "STUDIES",
    "Study",
    "Trial",
    "get_study",
    "identity_config",
    "register",
]

#: settings that do not change a run's numbers (or are the run identity themselves)
NOT_IDENTITY = frozenset(
    {"runs", "seed", "device", "data_dir", "activations", "threshold", "threshold_epochs"}
)

#: the validation metric a study stores in ``val_acc``: name → (label, unit)
METRICS: dict[str, tuple[str, str]] = {"accuracy": ("accuracy", "%"), "bleu": ("BLEU", "")}


@dataclass
class Trial:
    """One run's training objects, made by :attr:`Study.build`.

    ``train_epoch(generator, after_step) -> mean train loss`` runs one epoch: it
    must draw all randomness of the data order from ``generator`` and call
    ``after_step()`` after every ``optimizer.step()``; it steps ``scheduler`` itself.
    ``evaluate() -> {"val_acc": float, "val_acc_top5": float | None}`` (percent)
    runs on the validation set. The runner saves and restores ``model``,
    ``optimizer``, ``scheduler`` and each object in ``extra_state`` (anything with
    ``state_dict``/``load_state_dict``, e.g. a GradScaler) in the checkpoints.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_epoch: Callable[[torch.Generator, Callable[[], None]], float]
    evaluate: Callable[[], Mapping[str, float | None]]
    scheduler: Any = None
    extra_state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnsembleSpec:
    """A study's opt-in to ensemble training (``anact reproduce --ensemble``): the runs
    of one activation train together as one batched model (:mod:`anact.experiments.
    ensemble`), each numerically the same as the run alone.

    The members are made by :attr:`Study.build` exactly as for sequential runs; their
    ``train_epoch`` and ``evaluate`` are replaced by what this spec says they do. It
    fits a classifier trained with ``torch.optim.SGD`` (one group over
    ``model.parameters()``), one step per batch, no scheduler and no global randomness
    while training (vmap refuses random ops), validated by top-1 accuracy.

    Attributes:
        train_set: ``data -> (inputs, targets)`` of the training set.
        val_set: ``data -> (inputs, targets)`` of the validation set.
        batches: ``(config, data, generator) -> index tensors`` of one epoch's
            batches, drawn from the generator exactly as the study's ``train_epoch``
            draws them (let both call one function).
        loss: ``(logits, targets) -> mean loss of the batch``, as ``train_epoch``.
        eval_batch: validation batch size.
    """

    train_set: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    val_set: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    batches: Callable[[Mapping[str, Any], Any, torch.Generator], Sequence[torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    eval_batch: int = 1000


@dataclass(frozen=True)
class Study:
    """A registered experiment; see the module docstring for how to add one.

    Attributes:
        name: the command-line name (``anact reproduce <name>``).
        title: one line for reports, e.g. "LeNet5 on Fashion-MNIST (paper Table 1)".
        model: the model's name as stored with each run.
        defaults: the default settings (flat, JSON-able).
        paper_preset: the settings of ``--paper`` (the paper's protocol), merged
            over ``defaults``.
        activations: the activation names compared by default, in table order.
        load_data: ``(config, device) -> data``, called once per process.
        build: ``(config, activation, seed, data, device) -> Trial``.
        paper: the paper's published numbers per activation name, e.g.
            ``{"relu": {"mean": 94.42, ...}}`` (see :mod:`anact.experiments.paper`).
        paper_caption: where the paper's numbers come from and under which protocol.
        threshold: accuracy (percent) for "runs under threshold until epoch i",
            a mapping data set → threshold, a function of the run's stored
            (identity) settings, or None to leave these columns out.
        threshold_epochs: the epochs i of those columns; None picks the paper's
            (5, 10, 15, 30, 50) scaled to the number of epochs run.
        not_identity: extra settings that do not change the numbers.
        metric: what ``val_acc`` holds, a key of :data:`METRICS`: ``"accuracy"``
            (top-1, percent; the default) or ``"bleu"`` (corpus BLEU, 0-100); the
            report labels its columns and figures with it.
        validation: what the validation numbers are measured on, for the report.
        ensemble: an :class:`EnsembleSpec` if the study's runs can train as one
            batched ensemble (``--ensemble``), else None.
        datasets: the values of the ``dataset`` setting that ``load_data`` reads
            (the command line checks ``--dataset`` against them); empty: unchecked.
    """

    name: str
    title: str
    model: str
    defaults: Mapping[str, Any]
    paper_preset: Mapping[str, Any]
    activations: tuple[str, ...]
    load_data: Callable[[dict[str, Any], torch.device], Any]
    build: Callable[[dict[str, Any], str, int, Any, torch.device], Trial]
    paper: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    paper_caption: str = ""
    threshold: float | Mapping[str, float] | Callable[[Mapping[str, Any]], float] | None = None
    threshold_epochs: tuple[int, ...] | None = None
    not_identity: frozenset[str] = frozenset()
    metric: str = "accuracy"
    #: what the validation numbers are measured on, for the report's notes
    validation: str = "the official test split"
    ensemble: EnsembleSpec | None = None
    datasets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(
                f"study {self.name!r}: metric {self.metric!r} is not one of {sorted(METRICS)}"
            )

    @property
    def metric_label(self) -> str:
        """The metric's name for tables and figures, e.g. "accuracy" or "BLEU"."""
        return METRICS[self.metric][0]

    @property
    def metric_unit(self) -> str:
        """The metric's unit, "%" for accuracy, "" for BLEU."""
        return METRICS[self.metric][1]

    def config(self, overrides: Mapping[str, Any] | None = None, paper: bool = False) -> dict:
        """``defaults`` ← ``paper_preset`` (if ``paper``) ← ``overrides`` (non-None values).

        Raises ``ValueError`` for a key the study does not have.
        """
        cfg = dict(self.defaults)
        if paper:
            cfg.update(self.paper_preset)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key not in cfg:
                raise ValueError(
                    f"study {self.name!r} has no setting {key!r}; "
                    f"its settings are: {', '.join(sorted(cfg))}"
                )
            cfg[key] = value
        return cfg


def identity_config(study: Study, config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that make a run's identity (all but :data:`NOT_IDENTITY`)."""
    skip = NOT_IDENTITY | study.not_identity
    return {k: v for k, v in config.items() if k not in skip}


STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add a study to :data:`STUDIES` (a name may be registered once)."""
    for key in ("dataset", "epochs", "runs", "seed"):
        if key not in study.defaults:
            raise ValueError(f"study {study.name!r}: defaults need the key {key!r}")
    if study.name in STUDIES and STUDIES[study.name] is not study:
        raise ValueError(f"a study named {study.name!r} is already registered")
    STUDIES[study.name] = study
    return study


def get_study(name: str) -> Study:
    """The registered study ``name``; ``ValueError`` lists the valid names."""
    try:
        return STUDIES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown study {name!r}; available: {', '.join(sorted(STUDIES))}"
        ) from None


def _discover() -> None:
    """Import every module of this package: each registers its study."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
