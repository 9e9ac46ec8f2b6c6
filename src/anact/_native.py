"""The optional C power sums (``anact._powersums``) and their δ' kinds.

Shared by the eager statistics of a normalized activation on CPU
(:func:`anact.functional.batch_moments`) and the training monitor. ``power_sums``
is None where the package was installed without a C compiler; callers then use
torch ops (same numbers, more passes over memory).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from anact._powersums import power_sums
except ImportError:  # pragma: no cover - installed without a C compiler
    power_sums = None

# where Σδ'² comes from: DSQ_* in _powersums.c. The sign kinds weight a count of
# y > 0 (x > 0) by p0² and the rest by p1² (δ' = p0 there, p1 elsewhere: ReLU 1, 0).
DSQ_NONE, DSQ_SIGN_Y, DSQ_TANH_Y, DSQ_SIGMOID_Y, DSQ_ELU_Y, DSQ_SWISH_XY, DSQ_SIGN_X = range(7)


def readable(t: Tensor) -> bool:
    """Whether the C sums may read ``t``: contiguous float32 in CPU memory, holding its
    values (not a lazily negated view, whose memory holds −t)."""
    return t.is_cpu and t.dtype is torch.float32 and t.is_contiguous() and not t.is_neg()
