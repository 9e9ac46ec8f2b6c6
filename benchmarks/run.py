"""Normalized activations against their plain counterparts, as ratios in one process.

    python benchmarks/run.py            # full shapes (minutes, plus one-off compilation)
    python benchmarks/run.py --quick    # smaller shapes and fewer repeats
    python benchmarks/run.py --only monitor,ensemble   # sections: act, lenet, resnet, fold,
                                                       # monitor, ensemble

Every figure is a ratio to the plain counterpart measured in the same process,
interleaved round by round (the order rotates each round), and reported as the
median over rounds of the per-round ratio, so that load from other processes on
a shared machine affects both sides alike. Torch runs single-threaded by
default (``--threads``) and time is this thread's CPU time
(``time.thread_time``: user + system, page faults included, time spent
descheduled by other processes excluded); with ``--threads`` > 1 it is wall time.
Memory:

* kept for backward: bytes of the distinct storages that autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``, keyed by storage address, so a
  tensor that two layers save, e.g. a ReLU's output that the next conv also
  saves, counts once), for one activation and for a whole model's forward pass
  (the bulk of a training step's peak). A resident-set
  peak (VmHWM) was tried and dropped: glibc serves freed heap blocks again, so it
  varied by 2× between identical steps on this machine.

Heap (``--heap``): glibc returns large freed blocks to the system, so a step's big
tensors may land on fresh pages whose first-touch faults cost a quarter of a LeNet5
step on this VM, and which tensors do differs between the two models and between
processes (model-step ratios then spread by ±0.05 from process to process).
``--heap keep`` raises glibc's mmap and trim thresholds (``mallopt``, as the
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` variables do) before anything
is measured: freed memory is then reused and both models run on warm pages. The
default leaves the allocator as it is, as a training script would.

Prints one markdown table (and, with ``--json PATH``, writes the raw figures).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import LeNet5, ResNet50  # noqa: E402

import anact  # noqa: E402
import anact.kernels as K  # noqa: E402

Row = dict[str, object]


# ---------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------


_clock = time.thread_time
DEVICE = torch.device("cpu")  # --device
DTYPE = torch.float32  # --dtype: the activation inputs' dtype
MODEL_FORMAT = torch.contiguous_format  # --channels-last: the models' weights and images


def keep_heap() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB so that freed memory is reused
    (no fresh-page faults); False where the C library has no ``mallopt``."""
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _cuda_clock() -> float:
    """Wall time after the device's queued work has finished."""
    torch.cuda.synchronize()
    return time.perf_counter()


def interleaved(
    fns: dict[str, Callable[[], object]], base: str, repeats: int, warmup: int = 2
) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, median per-round ratio to ``base``)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = _clock()
            fns[n]()
            times[n].append(_clock() - t0)
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[base], strict=True)]
        out[n] = (statistics.median(times[n]), statistics.median(ratios))
    return out


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages saved for backward while running fn()."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def step_peak_bytes(step: Callable[[], None]) -> int | None:
    """Peak bytes of tensor memory allocated during one call of step(), above what was
    allocated before it. CUDA: the caching allocator's peak counter. CPU: every
    allocation and free of torch's CPU allocator, as the profiler records them
    (``profile_memory=True``), summed in time order; None where this torch's profiler
    does not expose them."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - a torch without the event tree
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frees of blocks allocated before the profiler
        for _ in range(2):  # the last counts: a process's first profile allocates ~250 KB more
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted((e for e in walk(tree) if e.tag == _EventType.Allocation),
                         key=lambda e: e.start_time_ns)  # fmt: skip
    live = peak = 0
    for e in allocations:
        live += e.extra_fields.alloc_size  # negative for a free
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------
# Activation fwd+bwd
# ---------------------------------------------------------------------------

PLAIN = {"swish": nn.SiLU, "relu": nn.ReLU}
NORMALIZED = {"swish": anact.NSwish, "relu": anact.NReLU}
SAVE = "auto"  # NReLU's save= option (--save); "input" gives the layers before output saving


def fast_backends() -> tuple[str, ...]:
    """The backends measured against the plain op: "native" (the C passes) on CPU when
    built, "triton" (the Triton kernels) on CUDA when Triton is installed."""
    from anact.kernels import native, triton_passes

    if DEVICE.type == "cpu" and native.available():
        return ("eager", "native", "compiled")
    if DEVICE.type == "cuda" and triton_passes.available():
        return ("eager", "triton", "compiled")
    return ("eager", "compiled")


def nrelu(*args, **kwargs) -> nn.Module:
    return anact.NReLU(*args, save=SAVE, **kwargs)


def _backend_module(module: nn.Module, backend: str) -> Callable[[Tensor], Tensor]:
    def call(x: Tensor) -> Tensor:
        with K.backend(backend):
            return module(x)

    return call


def bench_activation(
    shape, kind: str, channel_dim: int | None, repeats: int, channels_last: bool = False,
    calls: int = 1,
) -> list[Row]:
    """Ratios of one activation's forward (+ backward) to the plain one's; each timing
    covers ``calls`` calls (small tensors, where a call's fixed cost is the figure)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE).to(memory_format=fmt).requires_grad_()
    g = torch.randn(shape, device=DEVICE, dtype=DTYPE).to(memory_format=fmt)
    plain = PLAIN[kind]()
    c = None if channel_dim is None else shape[channel_dim]
    norm = (nrelu if kind == "relu" else NORMALIZED[kind])(c, channel_dim=channel_dim)
    norm.to(DEVICE)  # statistics and α stay float32 whatever the input dtype
    variants: dict[str, Callable[[Tensor], Tensor]] = {"plain": plain}
    for b in fast_backends():
        variants[b] = _backend_module(norm, b)

    def fwd_bwd(f):
        def run():
            for _ in range(calls):
                x.grad = None
                norm.alpha.grad = None
                f(x).backward(g)

        return run

    def fwd(f):
        def run():
            for _ in range(calls):
                f(x)

        return run

    t_fb = interleaved({k: fwd_bwd(f) for k, f in variants.items()}, "plain", repeats)
    t_f = interleaved({k: fwd(f) for k, f in variants.items()}, "plain", repeats)
    rows = []
    per = "per-tensor" if channel_dim is None else f"per-channel (dim {channel_dim})"
    per += ", channels_last" if channels_last else ""
    for b in fast_backends():
        mem = saved_bytes(lambda b=b: variants[b](x)) / saved_bytes(lambda: plain(x))
        rows.append({
            "what": f"N{kind.capitalize() if kind == 'swish' else 'ReLU'} vs "
                    f"{'F.silu' if kind == 'swish' else 'F.relu'}, "
                    f"{'×'.join(map(str, shape))}, {per}"
                    + ("" if DTYPE == torch.float32 else f", {str(DTYPE).split('.')[-1]}"),
            "backend": b,
            "fwd+bwd": t_fb[b][1],
            "fwd": t_f[b][1],
            "plain fwd+bwd ms": t_fb["plain"][0] * 1e3 / calls,
            "saved for bwd": mem,
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------
# Whole models: one training step
# ---------------------------------------------------------------------------


def _train_step(model: nn.Module, opt, xb: Tensor, yb: Tensor, backend: str) -> Callable[[], None]:
    def step() -> None:
        with K.backend(backend):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()

    return step


def bench_model(name: str, make: Callable[[Callable[[], nn.Module]], nn.Module], plain_act,
                norm_act, xb: Tensor, yb: Tensor, repeats: int) -> list[Row]:
    torch.manual_seed(0)
    plain = make(plain_act).to(DEVICE, memory_format=MODEL_FORMAT)
    torch.manual_seed(0)
    norm = make(norm_act).to(DEVICE, memory_format=MODEL_FORMAT)
    xb = xb.contiguous(memory_format=MODEL_FORMAT)
    steps = {"plain": _train_step(plain, torch.optim.SGD(plain.parameters(), 0.01, 0.9), xb, yb,
                                  "eager")}
    opt = torch.optim.SGD(norm.parameters(), 0.01, 0.9)
    for b in fast_backends():
        steps[b] = _train_step(norm, opt, xb, yb, b)
    t = interleaved(steps, "plain", repeats)

    def forward(model: nn.Module, backend: str) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with K.backend(backend):
                return F.cross_entropy(model(xb), yb)

        return run

    saved_plain = saved_bytes(forward(plain, "eager"))
    peak_plain = step_peak_bytes(steps["plain"])
    rows = []
    for b in fast_backends():
        rows.append({
            "what": f"{name}: training step",
            "backend": b,
            "step": t[b][1],
            "saved for bwd": saved_bytes(forward(norm, b)) / saved_plain,
            "step peak mem": None if peak_plain is None else step_peak_bytes(steps[b]) / peak_plain,
            "plain step ms": t["plain"][0] * 1e3,
        })  # fmt: skip
    return rows


def bench_fold(xb: Tensor, repeats: int) -> list[Row]:
    fold = getattr(anact, "fold", None)
    if not callable(fold):
        return [{"what": "LeNet5 inference after anact.fold", "backend": "-",
                 "note": "missing: anact.fold not in this tree yet"}]
    torch.manual_seed(0)
    plain = LeNet5(nn.ReLU).to(DEVICE).eval()
    torch.manual_seed(0)  # the same weights: after folding, only the scales differ
    norm = LeNet5(lambda: nrelu(center=False)).to(DEVICE)
    with torch.no_grad():
        norm(xb)  # running statistics from one batch
    norm.eval()
    folded = fold(norm)
    variants = {"plain": lambda: plain(xb)}
    for b in fast_backends():
        variants[b] = functools.partial(_backend_module(norm, b), xb)
    variants["anact.fold"] = lambda: folded(xb)
    with torch.no_grad():
        t = interleaved(variants, "plain", repeats)
    name = f"LeNet5 NReLU vs ReLU, inference (eval), batch {len(xb)}"
    return [{"what": name, "backend": k, "step": t[k][1], "plain step ms": t["plain"][0] * 1e3}
            for k in variants if k != "plain"]


# ---------------------------------------------------------------------------


def bench_ensemble(acts: list[str], k: int, steps: int, repeats: int) -> list[Row]:
    """K table1 runs as one vmapped ensemble against K sequential runs (benchmarks/
    bench_ensemble.py's measurement): ensemble time / sequential time, < 1 is faster."""
    from bench_ensemble import measure
    from models import random_image_data

    from anact.experiments.studies import get_study

    study = get_study("table1")
    config = study.config({"lr": 0.01})
    data = random_image_data(steps * int(config["batch_size"]))
    rows = []
    for act in acts:
        seq, ens = measure(study, config, data, act, k, repeats)
        pick = 0 if _clock is time.perf_counter else 1  # wall or thread CPU time
        rows.append({
            "what": f"table1 {act}: {k} runs as one ensemble vs one after another, batch "
                    f"{config['batch_size']}", "backend": "eager",
            "step": statistics.median(e[pick] / q[pick] for q, e in zip(seq, ens, strict=True)),
            "plain step ms": 1e3 * statistics.median(q[pick] for q in seq) / (k * steps),
            "note": "ensemble time / sequential time",
        })  # fmt: skip
    return rows


def bench_monitor(acts: list[str], batch: int, steps: int, repeats: int) -> list[Row]:
    """table1's training step with a ConvergenceMonitor against without one."""
    from models import random_image_data

    from anact.analysis import ConvergenceMonitor
    from anact.experiments.studies import get_study

    study = get_study("table1")
    config = study.config({"batch_size": batch})
    data = random_image_data(batch * steps)
    rows = []
    for act in acts:
        trials = []
        for _ in range(2):
            torch.manual_seed(0)
            trials.append(study.build(dict(config), act, 0, data, torch.device("cpu")))
        mon = ConvergenceMonitor(trials[1].model)

        def epoch(trial, after_step):
            return lambda: trial.train_epoch(torch.Generator().manual_seed(1), after_step)

        res = interleaved({"plain": epoch(trials[0], lambda: None),
                           "monitored": epoch(trials[1], mon.step)}, "plain", repeats)
        mon.remove()
        rows.append({"what": f"table1 {act} training step with ConvergenceMonitor, batch {batch}",
                     "backend": K.get_backend(), "step": res["monitored"][1],
                     "plain step ms": 1e3 * res["plain"][0] / steps,
                     "note": "monitored / unmonitored"})  # fmt: skip
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    gpu = f", {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[Row]) -> str:
    cols = ["what", "backend", "fwd+bwd", "fwd", "step", "saved for bwd", "step peak mem",
            "plain fwd+bwd ms", "plain step ms", "note"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per figure")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1; >1 switches to wall time)")
    p.add_argument("--only", default="act,lenet,resnet,fold,monitor,ensemble",
                   help="comma-separated sections: act,lenet,resnet,fold,monitor,ensemble")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda: tensors and models there; CUDA times are wall "
                        "time after torch.cuda.synchronize(). The monitor and ensemble "
                        "sections run on the CPU only")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the activation section's inputs (models stay float32)")
    p.add_argument("--save", default="auto", choices=("auto", "input", "output"),
                   help="NReLU's save= option (default auto: the output; input: as before)")
    p.add_argument("--channels-last", action="store_true",
                   help="the LeNet5 and ResNet50 sections in channels_last (weights and images)")
    p.add_argument("--heap", default="default", choices=("default", "keep"),
                   help="keep: glibc reuses freed memory instead of returning it (no "
                        "fresh-page faults; see the module docstring)")
    a = p.parse_args(argv)
    if a.heap == "keep" and not keep_heap():
        p.error("--heap keep: this C library has no mallopt (glibc only)")
    global _clock, SAVE, DEVICE, DTYPE, MODEL_FORMAT
    SAVE = a.save
    MODEL_FORMAT = torch.channels_last if a.channels_last else torch.contiguous_format
    DEVICE, DTYPE = torch.device(a.device), getattr(torch, a.dtype)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device")
    torch.set_num_threads(a.threads)
    if a.threads > 1:
        _clock = time.perf_counter
    if DEVICE.type == "cuda":
        _clock = _cuda_clock
    warnings.simplefilter("ignore", anact.functional.StatisticsWarning)
    only = set(a.only.split(","))
    reps = a.repeats or (7 if a.quick else 15)
    if a.quick:
        shapes = [((32, 64, 32, 32), 1), ((8, 512, 768), -1)]
        lenet_batch, resnet_batch = 128, 4
    else:
        shapes = [((128, 64, 32, 32), 1), ((32, 512, 768), -1)]
        lenet_batch, resnet_batch = 256, 16
    t0 = time.time()
    rows: list[Row] = []
    if "act" in only:
        for shape, cd in shapes:
            for kind in ("swish", "relu"):
                rows += bench_activation(shape, kind, None, reps)
                print(f"# {kind} {shape} done ({time.time() - t0:.0f}s)", file=sys.stderr)
            rows += bench_activation(shape, "swish", cd, reps)
            if len(shape) == 4:  # the layout oneDNN prefers for convolutions
                rows += bench_activation(shape, "swish", cd, reps, channels_last=True)
        # a small layer (LeNet5's last hidden one at batch 256), where a call's fixed cost
        # (Python, autograd, the statistics' step) is the figure: 100 calls per timing
        for kind, cd in (("swish", None), ("relu", None), ("swish", -1)):
            rows += bench_activation((256, 84), kind, cd, reps, calls=100)
        print(f"# small layer done ({time.time() - t0:.0f}s)", file=sys.stderr)
    torch.manual_seed(0)
    xl = torch.randn(lenet_batch, 1, 28, 28, device=DEVICE)
    yl = torch.randint(0, 10, (lenet_batch,), device=DEVICE)
    if "lenet" in only:
        for kind, plain, norm in (("ReLU", nn.ReLU, lambda: nrelu(center=False)),
                                  ("Swish", nn.SiLU, lambda: anact.NSwish(center=False))):
            rows += bench_model(f"LeNet5 N{kind} vs {kind}, batch {lenet_batch}", LeNet5,
                                plain, norm, xl, yl, reps * 3)
        print(f"# lenet done ({time.time() - t0:.0f}s)", file=sys.stderr)
    if "resnet" in only:
        xr = torch.randn(resnet_batch, 3, 32, 32, device=DEVICE)
        yr = torch.randint(0, 100, (resnet_batch,), device=DEVICE)
        rows += bench_model(f"CIFAR ResNet50 NReLU vs ReLU, batch {resnet_batch}", ResNet50,
                            nn.ReLU, nrelu, xr, yr, max(5, reps // 2))
        print(f"# resnet done ({time.time() - t0:.0f}s)", file=sys.stderr)
    if "fold" in only:
        rows += bench_fold(xl, reps * 3)
    if DEVICE.type != "cpu" and only & {"monitor", "ensemble"}:
        print("# monitor and ensemble sections: CPU only, skipped", file=sys.stderr)
        only -= {"monitor", "ensemble"}
    if "monitor" in only:
        rows += bench_monitor(["relu", "swish", "nrelu", "nswish"], 64, 5, reps * 2)
        print(f"# monitor done ({time.time() - t0:.0f}s)", file=sys.stderr)
    if "ensemble" in only:
        rows += bench_ensemble(["relu", "nrelu"], 3 if a.quick else 9, 4, 3 if a.quick else 5)
        print(f"# ensemble done ({time.time() - t0:.0f}s)", file=sys.stderr)
    print(f"<!-- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; "
          f"{reps} rounds; NReLU save={SAVE}; heap {a.heap}; device {DEVICE}, "
          f"models {'channels_last' if a.channels_last else 'contiguous'}, "
          f"activation inputs {a.dtype}; "
          f"{time.time() - t0:.0f}s -->")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
