"""Overhead of ConvergenceMonitor on a LeNet5 training step (CPU), as a ratio.

Two identical LeNet5 models train on the same batch in one process, one with a
ConvergenceMonitor attached (``monitor.step()`` after each ``optimizer.step()``).
Each repeat times K steps of each, in alternating order; the figure reported is
the median over repeats of (time with monitor) / (time without), both as wall
time and as this thread's CPU time (robust when other processes share the
cores; torch runs single-threaded here). The target is ≤ 1.10.

    python benchmarks/bench_monitors.py [--act relu|swish|tanh|nrelu|nswish] [--batch 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from anact.analysis import ConvergenceMonitor


def lenet5(act: str) -> nn.Module:
    def a() -> nn.Module:
        if act == "relu":
            return nn.ReLU()
        if act == "swish":
            return nn.SiLU()
        if act == "tanh":
            return nn.Tanh()
        import anact

        return {"nrelu": anact.NReLU, "nswish": anact.NSwish}[act](center=False)

    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), a(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), a(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), a(), nn.Linear(120, 84), a(), nn.Linear(84, 10),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--act", default="relu", choices=["relu", "swish", "tanh", "nrelu", "nswish"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per timing (K)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rows", type=int, default=None,
                   help="ConvergenceMonitor(max_rows=...): statistics on a sub-batch")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain_model = lenet5(args.act)
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
        n_layers = len(mon.layers)
    med = statistics.median
    print(f"LeNet5/{args.act} ({n_layers} monitored layers), batch {args.batch}, "
          f"{args.threads} thread(s), {args.repeats} repeats x {args.steps} steps, "
          f"max_rows={args.max_rows}, "
          f"torch {torch.__version__}")
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
