"""SyncNormalizedActivation: 2 real processes (gloo, CPU) vs one process on the global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import anact
from anact.convert import SyncNormalizedActivation

B, L, F = 3, 5, 4  # per-rank batch of B sequences of L tokens with F features
STEPS = 2


class MaskedNet(nn.Module):
    """Two normalized activations taking a padding mask: per tensor and per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(F, F)
        self.act1 = anact.NSwish(momentum=0.5)
        self.fc2 = nn.Linear(F, F)
        self.act2 = anact.NormalizedActivation("relu", F, channel_dim=-1, momentum=0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc2(self.act1(self.fc1(x), mask)), mask)


def _data(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per step: inputs (world·B, L, F) and masks with different padding per rank."""
    gen = torch.Generator().manual_seed(7)
    xs, masks = [], []
    for step in range(STEPS):
        xs.append(torch.randn(world * B, L, F, generator=gen, dtype=torch.float64))
        lengths = torch.tensor([5, 2, 4, 1, 3, 5][: world * B]).roll(step)
        if world > 1:
            lengths[B:] = torch.tensor([1, 1, 2])  # rank 1 has far fewer real tokens
        masks.append((torch.arange(L)[None, :] < lengths[:, None])[..., None])
    return xs, masks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MaskedNet().double()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = anact.convert_sync(_model())
        xs, masks = _data(world)
        outs = []
        for x, m in zip(xs, masks, strict=True):
            shard = slice(rank * B, (rank + 1) * B)
            outs.append(model(x[shard], m[shard]).detach())
        # synchronised only in training (eval uses the stored statistics, no collective)
        assert model.act1._reduce_moments() is not None
        model.eval()
        assert model.act1._reduce_moments() is None
        torch.save({"outs": outs, "state": model.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # reference: one process, the plain (unsynchronised) model, the concatenated batch
    ref = _model()
    xs, masks = _data(world)
    ref_outs = [ref(x, m).detach() for x, m in zip(xs, masks, strict=True)]
    assert masks[0][:B].sum() != masks[0][B:].sum()  # unequal padding across ranks
    for r, got in enumerate(ranks):
        for key, value in ref.state_dict().items():
            # float64 throughout: equal up to rounding
            torch.testing.assert_close(got["state"][key], value, rtol=1e-12, atol=1e-14,
                                       msg=f"rank {r}: {key}")
        for step in range(STEPS):
            shard = slice(r * B, (r + 1) * B)
            torch.testing.assert_close(got["outs"][step], ref_outs[step][shard],
                                       rtol=1e-12, atol=1e-14)
    # the statistics are not what each rank would see alone (the check can fail)
    local = _model()
    for x, m in zip(xs, masks, strict=True):
        local(x[:B], m[:B])
    assert not torch.allclose(local.act1.running_rho, ref.act1.running_rho)


def test_convert_sync_swaps_modules_and_shares_state():
    model = nn.Sequential(nn.Linear(3, 3), anact.NReLU(momentum=0.3),
                          nn.Sequential(nn.Linear(3, 3), anact.NormalizedActivation("gelu", 3,
                                                                                     channel_dim=1)))
    model(torch.randn(5, 3))
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alpha = model[1].alpha
    out = anact.convert_sync(model, process_group=None)
    assert out is model
    assert isinstance(model[1], SyncNormalizedActivation) and model[1].momentum == 0.3
    assert isinstance(model[2][1], SyncNormalizedActivation) and model[2][1].num_features == 3
    assert model[1].alpha is alpha  # same parameter object, as SyncBatchNorm does
    assert list(model.state_dict()) == keys
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    single = anact.convert_sync(anact.NSwish())
    assert isinstance(single, SyncNormalizedActivation)


def test_sync_module_is_local_without_a_process_group():
    torch.manual_seed(0)
    a, b = anact.NSwish(), anact.convert_sync(anact.NSwish())
    assert b._reduce_moments() is None  # torch.distributed is not initialised here
    x = torch.randn(10, 4)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_rho, b.running_rho)
