"""Overhead of ConvergenceMonitor on a LeNet5 training step (CPU), as a ratio.

Two identical LeNet5 models train on the same batch in one process, one with a
ConvergenceMonitor attached (``monitor.step()`` after each ``optimizer.step()``).
Each repeat times K steps of each, in alternating order; the figure reported is
the median over repeats of (time with monitor) / (time without), both as wall
time and as this thread's CPU time (robust when other processes share the
cores; torch runs single-threaded here). The target is ≤ 1.10.

    python benchmarks/bench_monitors.py [--act relu|swish|tanh|nrelu|nswish] [--batch 128]

``--study``: instead of the bare step above, the training step of ``anact reproduce
table1`` itself (``studies.table1.build``: the study's LeNet5, init, SGD settings and
batch gathering; ``--act`` any table1 activation), one epoch of ``--steps`` batches per
timing, with ``monitor.step`` or nothing as its ``after_step``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from models import LeNet5
from torch import nn

import anact
from anact.analysis import ConvergenceMonitor

#: the bare benchmark's activation modules (the paper's LeNet5 setting: μ not subtracted)
BARE_ACTIVATIONS = {
    "relu": nn.ReLU, "swish": nn.SiLU, "tanh": nn.Tanh,
    "nrelu": lambda: anact.NReLU(center=False), "nswish": lambda: anact.NSwish(center=False),
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--act", default="relu",
                   help="relu, swish, tanh, nrelu, nswish; with --study any table1 activation")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per timing (K)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rows", type=int, default=None,
                   help="ConvergenceMonitor(max_rows=...): statistics on a sub-batch")
    p.add_argument("--study", action="store_true",
                   help="time table1's own training step (any table1 activation)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.study:
        study_step(args)
        return
    if args.act not in BARE_ACTIVATIONS:
        p.error(f"--act {args.act!r} needs --study (the bare model knows relu, swish, tanh, "
                "nrelu, nswish)")
    torch.manual_seed(0)
    plain_model = LeNet5(BARE_ACTIVATIONS[args.act])
    mon_model = copy.deepcopy(plain_model)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()

    def runner(model: nn.Module, monitor: ConvergenceMonitor | None):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run() -> tuple[float, float]:
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(args.steps):
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if monitor is not None:
                    monitor.step()
            return time.perf_counter() - w0, time.thread_time() - c0

        return run

    with ConvergenceMonitor(mon_model, max_rows=args.max_rows) as mon:
        run_plain, run_mon = runner(plain_model, None), runner(mon_model, mon)
        print(f"LeNet5/{args.act} ({len(mon.layers)} monitored layers), batch {args.batch}, "
              f"{args.threads} thread(s), {args.repeats} repeats x {args.steps} steps, "
              f"max_rows={args.max_rows}, torch {torch.__version__}")
        report(run_plain, run_mon, args)


def study_step(args: argparse.Namespace) -> None:
    """Time table1's training step with and without the monitor (see the docstring)."""
    from models import random_image_data

    from anact.experiments.studies import get_study

    study = get_study("table1")
    config = study.config({"batch_size": args.batch})
    data = random_image_data(args.batch * args.steps)
    device = torch.device("cpu")
    trials = []
    for _ in range(2):
        torch.manual_seed(0)
        trials.append(study.build(dict(config), args.act, 0, data, device))
    plain, monitored = trials

    with ConvergenceMonitor(monitored.model, max_rows=args.max_rows) as mon:

        def timed(trial, after_step):
            def run() -> tuple[float, float]:
                order = torch.Generator().manual_seed(1)
                w0, c0 = time.perf_counter(), time.thread_time()
                trial.train_epoch(order, after_step)
                return time.perf_counter() - w0, time.thread_time() - c0

            return run

        print(f"table1 training step, {args.act} ({len(mon.layers)} monitored layers), "
              f"batch {args.batch}, lr {config['lr']}, {args.threads} thread(s), "
              f"{args.repeats} repeats x {args.steps} steps, torch {torch.__version__}")
        report(timed(plain, lambda: None), timed(monitored, mon.step), args)


def report(run_plain, run_mon, args: argparse.Namespace) -> None:
    """Alternate the two, then print the median ratios (see the module docstring)."""
    run_plain(), run_mon()  # warm-up
    wall, cpu, t_plain, t_mon = [], [], [], []
    for i in range(args.repeats):
        # alternate the order so that drifting machine load hits both sides alike
        if i % 2:
            (wp, cp), (wm, cm) = run_plain(), run_mon()
        else:
            (wm, cm), (wp, cp) = run_mon(), run_plain()
        wall.append(wm / wp)
        cpu.append(cm / cp)
        t_plain.append(wp / args.steps)
        t_mon.append(wm / args.steps)
    med = statistics.median
    print(f"step without monitor: {1e3 * med(t_plain):.2f} ms, with: {1e3 * med(t_mon):.2f} ms "
          "(median wall time)")
    print(f"overhead ratio, wall time (median of repeats): {med(wall):.3f}  "
          f"[quartiles {statistics.quantiles(wall, n=4)[0]:.3f}, "
          f"{statistics.quantiles(wall, n=4)[2]:.3f}]")
    print(f"overhead ratio, thread CPU time (median):      {med(cpu):.3f}  "
          f"[quartiles {statistics.quantiles(cpu, n=4)[0]:.3f}, "
          f"{statistics.quantiles(cpu, n=4)[2]:.3f}]  target <= 1.10")
    print(f"ratio of the fastest steps (least disturbed): {min(t_mon) / min(t_plain):.3f}")


if __name__ == "__main__":
    main()
