"""Models of the studies, and the paper's activations with their initialisations.

``ACTIVATIONS`` maps each activation name the paper compares (lower case, as typed
on the command line) to an :class:`ActivationSpec`: its label in the paper's tables,
a factory of a fresh module, and the weight initialisation the paper pairs with it
(§3.1, §3.2): Xavier for Tanh and the normalized activations, He for the ReLU family,
ELU, SELU and Swish, orthogonal for GPN. Normalized activations have μ disabled
(``center=False``) as in the LeNet5 study; a study that wants μ passes ``center=True``
to :func:`make_activation`. Other studies add their networks as ``models/<name>.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

import anact
from anact.experiments.models.lenet import LeNet5

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "LeNet5",
    "init_weights",
    "make_activation",
    "parse_activations",
]

Init = Literal["xavier", "he", "orthogonal"]


@dataclass(frozen=True)
class ActivationSpec:
    """One activation of the paper: ``label`` as printed, ``factory(**kw)`` → module,
    ``init`` scheme, ``family`` ("unnormalized", "gpn" or "normalized": the groups
    in which the paper marks the best with "*"), ``he_nonlinearity`` for He init."""

    label: str
    factory: Callable[..., nn.Module]
    init: Init
    family: Literal["unnormalized", "gpn", "normalized"]
    he_nonlinearity: str = "relu"


def _normalized(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def factory(center: bool = False, **kw: Any) -> nn.Module:
        return cls(center=center, **kw)

    return factory


ACTIVATIONS: dict[str, ActivationSpec] = {
    "tanh": ActivationSpec("Tanh", nn.Tanh, "xavier", "unnormalized"),
    "lrelu": ActivationSpec(
        "LReLU", lambda: nn.LeakyReLU(0.01), "he", "unnormalized", "leaky_relu"
    ),
    "elu": ActivationSpec("ELU", nn.ELU, "he", "unnormalized"),
    "selu": ActivationSpec("SELU", nn.SELU, "he", "unnormalized"),
    "relu": ActivationSpec("ReLU", nn.ReLU, "he", "unnormalized"),
    "relu-gpn": ActivationSpec("ReLU-GPN", lambda: anact.GPN("relu"), "orthogonal", "gpn"),
    "lrelu-gpn": ActivationSpec("LReLU-GPN", lambda: anact.GPN("lrelu"), "orthogonal", "gpn"),
    "nrelu": ActivationSpec("NReLU", _normalized(anact.NReLU), "xavier", "normalized"),
    "nlrelu": ActivationSpec("NLReLU", _normalized(anact.NLReLU), "xavier", "normalized"),
    "swish": ActivationSpec("Swish", nn.SiLU, "he", "unnormalized"),
    "nswish": ActivationSpec("NSwish", _normalized(anact.NSwish), "xavier", "normalized"),
}


def parse_activations(
    names: str | Iterable[str], allowed: Iterable[str] | None = None
) -> list[str]:
    """``"ReLU,nrelu"`` → ``["relu", "nrelu"]`` (case-insensitive, duplicates dropped).

    Raises ``ValueError`` naming the valid choices for an unknown name.
    """
    if isinstance(names, str):
        names = names.split(",")
    allowed = list(ACTIVATIONS if allowed is None else allowed)
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in allowed:
            raise ValueError(f"unknown activation {raw.strip()!r}; valid: {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no activation given; valid: {', '.join(allowed)}")
    return out


def make_activation(name: str, **kwargs: Any) -> nn.Module:
    """A fresh module for a paper activation name (see :data:`ACTIVATIONS`)."""
    return ACTIVATIONS[parse_activations([name])[0]].factory(**kwargs)


def init_weights(model: nn.Module, scheme: Init, he_nonlinearity: str = "relu") -> nn.Module:
    """Initialise every Conv/Linear weight by ``scheme``; biases to zero.

    ``"xavier"``: Glorot uniform; ``"he"``: Kaiming normal (fan_in) for
    ``he_nonlinearity``; ``"orthogonal"``: orthogonal (Saxe et al.) of the weight
    flattened to (out, in·k·k).
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "he":
                a = 0.01 if he_nonlinearity == "leaky_relu" else 0.0
                nn.init.kaiming_normal_(m.weight, a=a, nonlinearity=he_nonlinearity)
            elif scheme == "orthogonal":
                nn.init.orthogonal_(m.weight)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}; use xavier, he or orthogonal")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
