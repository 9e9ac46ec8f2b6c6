"""Speed-up of training K LeNet5 runs as one vmapped ensemble over K sequential runs.

Both sides do the same work as ``anact reproduce table1`` (with and without
``--ensemble``): K runs of one activation (seeds 0..K-1), each S SGD steps of
batch 64 on its own data order, with the convergence statistics (Score of eq. 22,
Σ|E W|) of every step. Sequential: table1's ``train_epoch`` under a
:class:`anact.analysis.ConvergenceMonitor`, run after run. Ensemble:
:meth:`anact.experiments.ensemble.Ensemble.train_epoch`. The data are random
28×28 images (speed does not depend on them). Evaluation is not timed.

Each repeat times both in alternating order, as wall time and as this thread's
CPU time (robust when other processes share the cores; torch runs single-threaded);
the figure reported is the median over repeats of (sequential time) / (ensemble
time): above 1 the ensemble is faster.

    python benchmarks/bench_ensemble.py [--sizes 3,9,25] [--acts relu,nrelu,nswish]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from models import random_image_data

from anact.analysis import ConvergenceMonitor
from anact.experiments.ensemble import Ensemble
from anact.experiments.studies import get_study


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, thread CPU seconds) of one call."""
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="3,9,25", help="ensemble sizes K")
    p.add_argument("--acts", default="relu,nrelu,nswish")
    p.add_argument("--steps", type=int, default=8, help="SGD steps per run and timing (S)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    study = get_study("table1")
    config = study.config({"batch_size": args.batch, "lr": 0.01})
    data = random_image_data(args.steps * args.batch)

    print(f"LeNet5, batch {args.batch}, {args.steps} steps per run, torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s); ratio = sequential / "
          f"ensemble time (> 1: ensemble faster), median of {args.repeats} repeats")  # fmt: skip
    print(
        "| activation | K | sequential ms/step/run (CPU) | ensemble ms/step/run (CPU) "
        "| speed-up (CPU time) | speed-up (wall) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for act in args.acts.split(","):
        for k in (int(s) for s in args.sizes.split(",")):
            seq, ens = measure(study, config, data, act, k, args.repeats)
            per_step = k * args.steps / 1e3
            cpu_ratio = statistics.median(s[1] / e[1] for s, e in zip(seq, ens, strict=True))
            wall_ratio = statistics.median(s[0] / e[0] for s, e in zip(seq, ens, strict=True))
            print(f"| {act} | {k} | {statistics.median(s[1] for s in seq) / per_step:.2f}"
                  f" | {statistics.median(e[1] for e in ens) / per_step:.2f}"
                  f" | {cpu_ratio:.2f} | {wall_ratio:.2f} |", flush=True)  # fmt: skip


def measure(
    study: Any, config: dict, data: Any, act: str, k: int, repeats: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(wall, CPU) seconds of one epoch of K sequential runs and of the K-ensemble,
    per repeat, timed in alternating order."""

    def trials() -> list:
        out = []
        for seed in range(k):
            torch.manual_seed(seed)
            out.append(study.build(dict(config), act, seed, data, torch.device("cpu")))
        return out

    seq_trials = trials()
    monitors = [ConvergenceMonitor(t.model) for t in seq_trials]
    ensemble = Ensemble(trials(), study.ensemble, config, data)

    def sequential() -> None:
        for seed, (t, mon) in enumerate(zip(seq_trials, monitors, strict=True)):
            t.train_epoch(torch.Generator().manual_seed(seed), mon.step)
            mon.epoch_summary(reset=True)

    def batched() -> None:
        ensemble.train_epoch([torch.Generator().manual_seed(s) for s in range(k)])

    sequential(), batched()  # warm-up
    seq, ens = [], []
    for r in range(repeats):
        if r % 2 == 0:
            seq.append(timed(sequential))
            ens.append(timed(batched))
        else:
            ens.append(timed(batched))
            seq.append(timed(sequential))
    for mon in monitors:
        mon.remove()
    return seq, ens


if __name__ == "__main__":
    main()
