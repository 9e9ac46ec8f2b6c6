"""anact: normalized activation functions (ANAct), GPN and LayerAct for PyTorch.

Quick start::

    import anact
    act = anact.NSwish()            # drop-in for nn.SiLU(), BatchNorm-like state
    y = act(torch.randn(8, 16))
"""

from anact import functional
from anact.activations import (
    Activation,
    get_activation,
    list_activations,
    register_activation,
    resolve_activation,
)
from anact.convert import (
    ConversionError,
    ConversionReport,
    FoldedActivation,
    SyncNormalizedActivation,
    convert,
    convert_sync,
    fold,
)
from anact.modules import (
    GPN,
    NELU,
    NGELU,
    LAHardSiLU,
    LASiLU,
    NLReLU,
    NMish,
    NormalizedActivation,
    NReLU,
    NSoftplus,
    NSwish,
    NTanh,
    gpn_constants,
)

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "GPN",
    "LAHardSiLU",
    "LASiLU",
    "NELU",
    "NGELU",
    "NLReLU",
    "NMish",
    "NReLU",
    "NSoftplus",
    "NSwish",
    "NTanh",
    "NormalizedActivation",
    "functional",
    "get_activation",
    "gpn_constants",
    "list_activations",
    "register_activation",
    "resolve_activation",
    "ConversionError",
    "ConversionReport",
    "FoldedActivation",
    "SyncNormalizedActivation",
    "convert",
    "convert_sync",
    "fold",
]
