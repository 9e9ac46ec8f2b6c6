"""Mixed precision: torch.autocast on CPU with bfloat16."""

from __future__ import annotations

import copy

import torch
from torch import nn

import anact

from .models import ResNet


def test_autocast_bf16_statistics_in_float32_output_in_input_dtype():
    torch.manual_seed(0)
    act = anact.NormalizedActivation("swish")
    lin = nn.Linear(8, 8)
    x = torch.randn(64, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        y = act(h)
    assert y.dtype == torch.bfloat16
    for name in ("running_rho", "running_rho_prime", "running_mean"):
        assert getattr(act, name).dtype == torch.float32
    # the statistics equal float64 statistics of the same bf16 values (first batch: set)
    h64 = h.detach().double()
    s = torch.nn.functional.silu(h64)
    torch.testing.assert_close(act.running_mean.double(), s.mean(), rtol=1e-5, atol=1e-6)
    rho = s.var(unbiased=False) / h64.var(unbiased=False)
    torch.testing.assert_close(act.running_rho.double(), rho, rtol=1e-4, atol=1e-6)
    # the output is the bf16 rounding of the float64 formula
    lam = anact.functional.lambda_factor(act.running_rho.double(), act.running_rho_prime.double())
    ref = lam * (s - act.running_mean.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


def _train(model: nn.Module, steps: int, amp: bool) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    x = torch.randn(16, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_autocast_training_does_not_diverge_where_plain_does_not():
    torch.manual_seed(0)
    plain = ResNet((1, 1, 1, 1), num_classes=10, width=8)
    conv = anact.convert(copy.deepcopy(plain))
    ref = copy.deepcopy(conv)
    plain_losses = _train(plain, 6, amp=True)
    conv_losses = _train(conv, 6, amp=True)
    ref_losses = _train(ref, 6, amp=False)  # the same model in float32
    assert all(torch.isfinite(torch.tensor(plain_losses)))
    assert all(torch.isfinite(torch.tensor(conv_losses)))
    # fitting one batch: both go down, and bf16 tracks the float32 run
    assert conv_losses[-1] < conv_losses[0] and plain_losses[-1] < plain_losses[0]
    assert abs(conv_losses[-1] - ref_losses[-1]) < 0.25 * ref_losses[0]
    for m in conv.modules():
        if isinstance(m, anact.NormalizedActivation):
            assert m.running_rho.dtype == torch.float32 and m.alpha.dtype == torch.float32
            assert torch.isfinite(m.running_rho).all() and int(m.num_batches_tracked) > 0
