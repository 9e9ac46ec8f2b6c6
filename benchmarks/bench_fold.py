"""Inference speed of a folded normalized model vs the plain-activation model, as ratios.

Three copies of one model run eval forward passes on the same batch in one
process: the plain model (ReLU), the converted model (``anact.convert``: each
call site a NormalizedActivation) and the folded model (``anact.fold``). Each
repeat times K forward passes of each, in alternating order; the figure is the
median over repeats of time(model) / time(plain), as this thread's CPU time
(robust when other processes share the cores; torch runs single-threaded).

    python benchmarks/bench_fold.py [--model resnet|mlp] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import anact


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != planes * 4:
            self.down = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        idt = x if self.down is None else self.down(x)
        return self.relu(out + idt)


def resnet(width: int = 16, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for i, n in enumerate(blocks):
        planes = width * 2**i
        for j in range(n):
            layers.append(Bottleneck(cin, planes, 2 if (i > 0 and j == 0) else 1))
            cin = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 100)]
    return nn.Sequential(*layers)


def mlp(d: int = 512, depth: int = 6) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(d, 10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet", choices=["resnet", "mlp"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="forward passes per timing (K)")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "resnet":
        plain = resnet()
        x = torch.randn(args.batch, 3, 32, 32)
    else:
        plain = mlp()
        x = torch.randn(args.batch * 8, 512)
    converted = anact.convert(plain)
    converted.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            converted(x + 0.1 * torch.randn_like(x))
    plain.eval()
    converted.eval()
    folded, report = anact.fold(converted, return_report=True)
    with torch.no_grad():
        ref, out = converted(x), folded(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()

    models = {"plain": plain, "converted": converted, "folded": folded}
    ratios: dict[str, list[float]] = {"converted": [], "folded": []}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(2):
                m(x)  # warm-up
        for _ in range(args.repeats):
            t = {}
            for name, m in models.items():
                t0 = time.thread_time()
                for _ in range(args.steps):
                    m(x)
                t[name] = time.thread_time() - t0
            for name in ratios:
                ratios[name].append(t[name] / t["plain"])
    acts = [r for r in report if "buffer BatchNorm folded" not in r]
    kept = sum("kept" in r for r in acts)
    print(f"model={args.model} batch={x.shape[0]} threads={args.threads} "
          f"repeats={args.repeats}x{args.steps}")
    print(f"fold: {len(acts)} activations, {kept} with a shift or a scale kept, "
          f"{len(report) - len(acts)} buffer BN folded into the head; "
          f"max |folded − converted| / max |converted| = {err:.2e}")
    for name, r in ratios.items():
        print(f"time({name}) / time(plain) = {statistics.median(r):.3f} "
              f"(quartiles {statistics.quantiles(r, n=4)[0]:.3f}–"
              f"{statistics.quantiles(r, n=4)[2]:.3f})")


if __name__ == "__main__":
    main()
