"""The study runner: N runs × E epochs per activation, stored, resumable, deterministic.

For each (activation, run index i) the runner

1. finds or creates the run in the store (identity: study, model, dataset,
   activation, seed = ``config["seed"] + i``, hash of the identity settings) and
   skips it if it is done or another live process is running it;
2. seeds torch with the run's seed, builds the model and optimizer
   (:attr:`Study.build`) and a per-run ``torch.Generator`` for the data order;
3. resumes from ``DIR/checkpoints/run-<id>.pt`` if present (model, optimizer,
   scheduler, torch and data-order RNG states, epoch; the monitor holds nothing
   across epochs: it is summarised and reset at each epoch's end); a checkpoint that
   cannot be read or does not fit the run is discarded with a warning and the run
   starts again from scratch (its stored epochs are dropped with it);
4. trains epoch by epoch under a :class:`anact.analysis.ConvergenceMonitor`
   (Score of eq. 22 and Σ|E W| of Figure 4, means over the epoch's steps),
   evaluates, writes the epoch to the store (every key ``evaluate()`` returns
   besides ``val_acc``/``val_acc_top5`` goes into the epoch's ``extra`` metrics;
   the Score is stored as NULL when the monitor hooked no layer), then the checkpoint (atomically,
   tmp + ``os.replace``), so a process killed at any moment resumes from its last
   finished epoch and ends with the same numbers as an uninterrupted run (CPU);
   while training, the claim is refreshed every :data:`HEARTBEAT_S` seconds (checked
   after each optimizer step), so a long epoch keeps its lease;
5. marks the run done and deletes its checkpoint.

Before any run is created or claimed, :func:`reproduce` checks the device
(:func:`check_device`) and, if any run has work left, loads the data: a missing data
set or device fails cleanly without leaving failed runs in the store.

``reproduce(..., ensemble=True)`` (``anact reproduce --ensemble``) trains the runs of
each activation together as one batched model instead
(:func:`anact.experiments.ensemble.train_ensemble`): the same steps 1-5 per run, the
same store rows and checkpoints, so either way resumes what the other left.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from anact.experiments.store import Store, config_key
from anact.experiments.studies import Study, Trial, identity_config

__all__ = [
    "HEARTBEAT_S",
    "RESULTS_FILE",
    "check_device",
    "check_ensemble_support",
    "load_checkpoint",
    "reproduce",
    "run_one",
    "save_checkpoint",
]

RESULTS_FILE = "results.sqlite"
#: seconds between refreshes of a run's claim while it trains (the lease is an hour)
HEARTBEAT_S = 60.0


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ValueError saying what to do if this torch
    build or machine cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {str(device)!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support" if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )  # fmt: skip
            raise ValueError(
                f"device {str(device)!r}: {why} (torch {torch.__version__}); use --device cpu "
                "or install a CUDA build of torch on a machine with a GPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 - any backend error means unusable
            raise ValueError(f"device {str(device)!r} is not usable here: {e}") from None
    return dev


class _Heartbeat:
    """Called after every optimizer step: refreshes the claims of ``run_ids`` at most
    every :data:`HEARTBEAT_S` seconds."""

    def __init__(self, store: Store, run_ids: Iterable[int]) -> None:
        self.store, self.run_ids = store, list(run_ids)
        self.last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_S:
            self.last = now
            for run_id in self.run_ids:
                self.store.heartbeat(run_id)


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_partial_writes(path: Path) -> None:
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none. Raises what ``torch.load``
    raises for an unreadable file (truncated, not a checkpoint)."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trial_state(trial: Trial) -> dict[str, Any]:
    state = {"model": trial.model.state_dict(), "optimizer": trial.optimizer.state_dict()}
    if trial.scheduler is not None:
        state["scheduler"] = trial.scheduler.state_dict()
    for name, obj in trial.extra_state.items():
        state[f"extra.{name}"] = obj.state_dict()
    return state


def _load_trial_state(trial: Trial, state: Mapping[str, Any]) -> None:
    trial.model.load_state_dict(state["model"])
    trial.optimizer.load_state_dict(state["optimizer"])
    if trial.scheduler is not None:
        trial.scheduler.load_state_dict(state["scheduler"])
    for name, obj in trial.extra_state.items():
        obj.load_state_dict(state[f"extra.{name}"])


def _finite(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _claim_run(
    study: Study,
    config: Mapping[str, Any],
    activation: str,
    seed: int,
    store: Store,
    checkpoint_dir: Path,
) -> tuple[str, int, Path]:
    """Find or create the run: ``(state, run id, checkpoint path)``, state ``"skipped"``
    (done), ``"busy"`` (another live process holds it) or ``"claimed"`` (ours now)."""
    run_id = store.ensure_run(
        study=study.name, model=study.model, dataset=config["dataset"],
        activation=activation, seed=seed, config=identity_config(study, config),
    )  # fmt: skip
    ckpt_path = checkpoint_dir / f"run-{run_id}.pt"
    if store.run(run_id)["status"] == "done":
        ckpt_path.unlink(missing_ok=True)  # left if killed between "done" and the delete
        return "skipped", run_id, ckpt_path
    if not store.claim(run_id):
        return "busy", run_id, ckpt_path
    _remove_partial_writes(ckpt_path)  # left by a process killed while saving
    return "claimed", run_id, ckpt_path


def _start_trial(
    study: Study,
    config: Mapping[str, Any],
    activation: str,
    seed: int,
    data: Any,
    device: torch.device,
    run_id: int,
    ckpt_path: Path,
) -> tuple[Trial, torch.Generator, int]:
    """Seed, build and (from its checkpoint) restore a run: ``(trial, data-order
    generator, epochs already done)``; the torch RNG is left as the run needs it.

    A checkpoint that cannot be read or restored is deleted with a warning and the
    run is built afresh (0 epochs done; the caller drops its stored epochs)."""
    torch.manual_seed(seed)
    trial = study.build(dict(config), activation, seed, data, device)
    order = torch.Generator().manual_seed(seed)  # data order, CPU (portable state)
    try:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt is None:
            return trial, order, 0
        if ckpt.get("run_id") != run_id:
            raise ValueError(f"it belongs to run {ckpt.get('run_id')}, not {run_id}")
        _load_trial_state(trial, ckpt["trial"])
        order.set_state(ckpt["order_rng"])
        _set_rng_state(ckpt["rng"])
        return trial, order, int(ckpt["epoch"])
    except Exception as e:  # noqa: BLE001 - torch.load and load_state_dict raise many types
        warnings.warn(
            f"{activation} seed {seed}: checkpoint {ckpt_path} is unusable "
            f"({type(e).__name__}: {str(e)[:200]}); deleted it, the run starts again from "
            "scratch",
            RuntimeWarning,
            stacklevel=2,
        )
        ckpt_path.unlink(missing_ok=True)
    return _start_trial(study, config, activation, seed, data, device, run_id, ckpt_path)


def _record_epoch(
    store: Store,
    run_id: int,
    epoch: int,
    *,
    loss: float,
    metrics: Mapping[str, Any],
    score: float | None,
    weight_mean_abs_sum: float,
    seconds: float,
    mode: str = "sequential",
) -> None:
    store.record_epoch(
        run_id,
        epoch,
        {
            "train_loss": _finite(loss),
            "val_acc": float(metrics["val_acc"]),
            "val_acc_top5": _finite(metrics.get("val_acc_top5")),
            "score": None if score is None else _finite(score),
            "weight_mean_abs_sum": _finite(weight_mean_abs_sum),
            "seconds": seconds,
        },
        extra={k: v for k, v in metrics.items() if k not in ("val_acc", "val_acc_top5")},
        mode=mode,
    )


def _save_run_checkpoint(
    ckpt_path: Path,
    run_id: int,
    epoch: int,
    trial: Trial,
    order: torch.Generator,
    rng: Mapping[str, Any],
) -> None:
    save_checkpoint(ckpt_path, {
        "run_id": run_id, "epoch": epoch, "trial": _trial_state(trial),
        "order_rng": order.get_state(), "rng": dict(rng),
    })  # fmt: skip


def run_one(
    study: Study,
    config: Mapping[str, Any],
    activation: str,
    seed: int,
    *,
    store: Store,
    checkpoint_dir: Path,
    device: torch.device,
    data: Any,
    progress: Any = None,
) -> str:
    """Train (or resume, or skip) one run; returns ``"done"``, ``"skipped"`` or ``"busy"``.

    ``data`` is the result of ``study.load_data`` (or a zero-argument callable
    returning it, called only if the run has work left). ``progress``: a tqdm bar
    advanced once per epoch, or None.
    """
    from anact.analysis.monitors import ConvergenceMonitor

    state, run_id, ckpt_path = _claim_run(study, config, activation, seed, store, checkpoint_dir)
    if state != "claimed":
        return state
    try:
        if callable(data):
            data = data()
        trial, order, start = _start_trial(
            study, config, activation, seed, data, device, run_id, ckpt_path
        )
        store.truncate_epochs(run_id, start)
        if progress is not None:
            progress.update(start)
        heartbeat = _Heartbeat(store, [run_id])
        with ConvergenceMonitor(trial.model) as monitor:

            def after_step() -> None:
                monitor.step()
                heartbeat()

            for epoch in range(start + 1, int(config["epochs"]) + 1):
                t0 = time.perf_counter()
                loss = trial.train_epoch(order, after_step)
                summary = monitor.epoch_summary(reset=True)
                metrics = trial.evaluate()
                # no hooked layer (e.g. only layer-level LA-SiLU): the monitor's Score is
                # an empty sum (0.0), not a measurement; store it as unknown
                _record_epoch(
                    store, run_id, epoch, loss=loss, metrics=metrics,
                    score=summary["score"] if summary["layers"] else None,
                    weight_mean_abs_sum=summary["weight_mean_abs_sum"],
                    seconds=time.perf_counter() - t0,
                )  # fmt: skip
                _save_run_checkpoint(ckpt_path, run_id, epoch, trial, order, _rng_state())
                if progress is not None:
                    progress.set_postfix_str(
                        f"{activation} seed {seed} epoch {epoch}: {metrics['val_acc']:.2f}%"
                    )
                    progress.update(1)
    except KeyboardInterrupt:
        store.set_status(run_id, "pending")
        raise
    except BaseException:
        store.set_status(run_id, "failed", traceback.format_exc(limit=20))
        raise
    store.set_status(run_id, "done")
    ckpt_path.unlink(missing_ok=True)
    return "done"


def check_ensemble_support(study: Study) -> None:
    """ValueError unless the study's runs can train as one ensemble (``--ensemble``)."""
    from anact.experiments.studies import STUDIES

    if study.ensemble is None:
        able = sorted(name for name, s in STUDIES.items() if s.ensemble is not None)
        raise ValueError(
            f"study {study.name!r} does not support --ensemble (it declares no "
            f"EnsembleSpec; studies that do: {', '.join(able) or 'none'}); run it "
            "without --ensemble"
        )


def reproduce(
    study: Study,
    config: Mapping[str, Any],
    activations: Sequence[str] | None = None,
    *,
    out_dir: str | os.PathLike[str] = "results",
    device: str | torch.device = "cpu",
    quiet: bool = False,
    ensemble: bool = False,
) -> list[dict[str, Any]]:
    """Run (or resume) every run of a study; returns the store's rows of these runs.

    Args:
        study: a registered :class:`Study`.
        config: its settings (``study.config(...)``).
        activations: names to compare (default ``study.activations``).
        out_dir: holds ``results.sqlite`` and ``checkpoints/``.
        device: torch device for data and models.
        quiet: no progress bar.
        ensemble: train the runs of each activation together as one batched ensemble
            (:mod:`anact.experiments.ensemble`; the study must declare an
            ``EnsembleSpec``); same runs, store rows and checkpoints as without.
    """
    from tqdm.auto import tqdm

    activations = list(activations or study.activations)
    runs, epochs = int(config["runs"]), int(config["epochs"])
    if runs < 1 or epochs < 1:
        raise ValueError(f"runs and epochs must be >= 1, got runs={runs}, epochs={epochs}")
    if ensemble:
        check_ensemble_support(study)
    device = check_device(device)
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    seeds = range(int(config["seed"]), int(config["seed"]) + runs)
    key = config_key(identity_config(study, config))

    with Store(out / RESULTS_FILE) as store:
        done = {
            (r["activation"], r["seed"])
            for r in store.runs(study=study.name, status="done") if r["config_key"] == key
        }  # fmt: skip
    work_left = any((act, seed) not in done for act in activations for seed in seeds)
    # the data before any run is created or claimed: a data error leaves no failed run
    data = study.load_data(dict(config), device) if work_left else None  # None: all skipped

    with Store(out / RESULTS_FILE) as store, tqdm(
        total=runs * len(activations) * epochs, disable=quiet, unit="epoch",
        desc=study.name, file=sys.stderr, dynamic_ncols=True,
    ) as bar:  # fmt: skip
        if ensemble:
            from anact.experiments.ensemble import train_ensemble

            statuses: Iterable[tuple[str, int, str]] = (
                (act, seed, status)
                for act in activations
                for seed, status in train_ensemble(
                    study, config, act, seeds, store=store, checkpoint_dir=ckpt_dir,
                    device=device, data=data, progress=bar,
                ).items()
            )  # fmt: skip
        else:
            statuses = (
                (act, seed, run_one(
                    study, config, act, seed, store=store, checkpoint_dir=ckpt_dir,
                    device=device, data=data, progress=bar,
                ))
                for seed in seeds for act in activations
            )  # fmt: skip
        for act, seed, status in statuses:
            if status != "done":
                bar.update(epochs)
            if status == "busy" and not quiet:
                bar.write(f"{act} seed {seed}: running in another process, skipped")
        rows = [
            r for r in store.runs(study=study.name)
            if r["config_key"] == key and r["activation"] in activations and r["seed"] in seeds
        ]  # fmt: skip
    return rows
