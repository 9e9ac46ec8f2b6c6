"""torch.compile(fullgraph=True) of a model with NormalizedActivation and LayerAct, in training."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import anact


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor on CPU needs a C compiler (gcc)")
def test_compile_fullgraph_training_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), anact.NormalizedActivation("swish"),
        nn.Linear(8, 8), anact.NormalizedActivation("gelu", 8, channel_dim=1),
        nn.Linear(8, 8), anact.LASiLU(), nn.Linear(8, 3),
    )
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break (e.g. a host check or the autograd Function)
    compiled = torch.compile(model, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(16, 1, dtype=torch.bool)
    for _ in range(3):
        x = torch.randn(16, 6, generator=gen)
        out_c, out_e = compiled(x), eager(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        out_c.square().sum().backward()
        out_e.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(model.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-7, msg=name)
    assert int(model[1].num_batches_tracked) == 3
    del mask
