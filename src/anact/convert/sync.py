"""Synchronised statistics for data-parallel training (DDP).

:class:`SyncNormalizedActivation` all-gathers each rank's batch moments and
merges them exactly (:func:`anact.functional.merge_moments`), so that every rank
holds the running statistics that one process would have after seeing the
global batch. :func:`convert_sync` mirrors ``nn.SyncBatchNorm.convert_sync_batchnorm``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from anact import functional as AF
from anact.modules import NormalizedActivation

__all__ = ["SyncNormalizedActivation", "convert_sync", "gather_moments"]


def gather_moments(moments: AF.BatchMoments, process_group: Any = None) -> AF.BatchMoments:
    """All-gather the moments of every rank and merge them (Chan's exact formula).

    Each field has shape () or (C,); the result has the same shapes and equals
    the moments of the union of all ranks' (unmasked) elements. A rank with no
    real element (count 0) contributes nothing.
    """
    world = dist.get_world_size(process_group)
    packed = torch.stack(list(moments))  # (6, *shape), one collective for all six fields
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed.contiguous(), group=process_group)
    stacked = torch.stack(gathered)  # (world, 6, *shape)
    return AF.merge_moments(AF.BatchMoments(*stacked.unbind(1)))


class SyncNormalizedActivation(NormalizedActivation):
    """A :class:`anact.NormalizedActivation` whose training statistics span all ranks.

    In training, when ``torch.distributed`` is initialised with more than one
    process in ``process_group`` (None = the default group), the batch moments of
    all ranks are gathered and merged before ρ_M, ρ'_M, μ_M are formed (one
    ``all_gather`` of 6 small tensors per call). Otherwise it is the local module.
    Every rank must call it the same number of times per step (as SyncBatchNorm).

    Build it with :func:`convert_sync`, or directly with NormalizedActivation's
    arguments plus ``process_group=``.
    """

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _reduce_moments(self) -> Callable[[AF.BatchMoments], AF.BatchMoments] | None:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size(self.process_group) <= 1:
            return None
        group = self.process_group
        return lambda moments: gather_moments(moments, group)


def _sync_copy(module: NormalizedActivation, process_group: Any) -> SyncNormalizedActivation:
    new = SyncNormalizedActivation.__new__(SyncNormalizedActivation)
    nn.Module.__init__(new)
    # copy configuration, parameters and buffers (shared tensors, as SyncBatchNorm does)
    new.__dict__.update({k: v for k, v in module.__dict__.items()
                         if k not in ("_parameters", "_buffers", "_modules")})
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._moments_hooks = OrderedDict(module.__dict__.get("_moments_hooks", {}))  # own hooks
    new.process_group = process_group
    return new


def convert_sync(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Swap every :class:`NormalizedActivation` in ``module`` for a synchronised one.

    Mirrors ``nn.SyncBatchNorm.convert_sync_batchnorm``: walks the module tree,
    replaces each NormalizedActivation (its subclasses NReLU, NSwish, ... included)
    by a :class:`SyncNormalizedActivation` that holds the same parameter, buffers
    and settings, and returns the module (a new object only when ``module``
    itself is a NormalizedActivation). Call it before wrapping in
    ``DistributedDataParallel``.
    """
    out = module
    if isinstance(module, NormalizedActivation) and not isinstance(
        module, SyncNormalizedActivation
    ):
        out = _sync_copy(module, process_group)
    for name, child in module.named_children():
        new = convert_sync(child, process_group)
        if new is not child:
            out.add_module(name, new)
    return out
