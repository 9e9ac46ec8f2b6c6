"""Recognising activation call sites in a torch.fx graph (shared by convert and fold)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from anact.modules import GPN, NormalizedActivation, _LayerAct

# plain torch activation modules -> (registry name, attributes that are parameters of δ)
MODULE_KINDS: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.ReLU: ("relu", ()),
    nn.LeakyReLU: ("lrelu", ("negative_slope",)),
    nn.SiLU: ("swish", ()),
    nn.GELU: ("gelu", ()),
    nn.ELU: ("elu", ("alpha",)),
    nn.Tanh: ("tanh", ()),
    nn.Mish: ("mish", ()),
    nn.Sigmoid: ("sigmoid", ()),
    nn.SELU: ("selu", ()),
    nn.Softplus: ("softplus", ("beta", "threshold")),
    nn.Hardswish: ("hardswish", ()),
}

# functional targets -> (registry name, names of the positional arguments after x)
FUNCTION_KINDS: dict[Any, tuple[str, tuple[str, ...]]] = {}


def _add(fns: tuple[Any, ...], name: str, argnames: tuple[str, ...]) -> None:
    for f in fns:
        if f is not None:
            FUNCTION_KINDS[f] = (name, argnames)


_nn = torch._C._nn
_add((F.relu, torch.relu, F.relu_, torch.relu_), "relu", ("inplace",))
_add((F.leaky_relu, F.leaky_relu_, getattr(_nn, "leaky_relu", None)), "lrelu",
     ("negative_slope", "inplace"))
_add((F.silu,), "swish", ("inplace",))
_add((F.gelu, getattr(_nn, "gelu", None)), "gelu", ("approximate",))
_add((F.elu, F.elu_), "elu", ("alpha", "inplace"))
_add((torch.tanh, F.tanh, torch.tanh_), "tanh", ())
_add((F.mish,), "mish", ("inplace",))
_add((torch.sigmoid, F.sigmoid, torch.sigmoid_), "sigmoid", ())
_add((F.selu, torch.selu, torch.selu_), "selu", ("inplace",))
_add((F.softplus, getattr(_nn, "softplus", None)), "softplus", ("beta", "threshold"))
_add((F.hardswish,), "hardswish", ("inplace",))

# Tensor methods: x.relu(), x.tanh_(), ...
METHOD_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "relu": ("relu", ()),
    "relu_": ("relu", ()),
    "tanh": ("tanh", ()),
    "tanh_": ("tanh", ()),
    "sigmoid": ("sigmoid", ()),
    "sigmoid_": ("sigmoid", ()),
}

INPLACE_METHODS = {"relu_", "tanh_", "sigmoid_"}
INPLACE_FUNCTIONS = {F.relu_, torch.relu_, F.leaky_relu_, F.elu_, torch.tanh_, torch.sigmoid_,
                     torch.selu_}

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
HEADS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Site:
    """One activation call site in the graph."""

    node: fx.Node
    kind: str  # registry name of δ, e.g. "relu"
    params: dict[str, Any]  # parameters of δ, e.g. {"negative_slope": 0.2}
    inplace: bool
    unsupported: str | None = None  # why δ cannot be expressed by the registry


class FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dimension of an (N, ..., F) input (the buffer BN of rule 2).

    ``nn.BatchNorm1d`` takes (N, F) or (N, F, L); a Linear head takes (N, ..., F):
    this flattens the leading dimensions so that both (N, F) and (N, L, F) work.
    Shape: (N, ..., F) -> (N, ..., F). Default ``affine=False``.
    """

    def __init__(self, num_features: int, affine: bool = False, **kwargs: Any) -> None:
        super().__init__(num_features, affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None:
            return super().forward(x.reshape(-1, self.num_features)).reshape(x.shape)
        # eval: plain broadcasting over the last dim (exports without a channel size)
        y = (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps)
        return y * self.weight + self.bias if self.affine else y


class Tracer(fx.Tracer):
    """fx tracer that keeps anact's own modules as leaves (their state is opaque)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_opaque(m) or super().is_leaf_module(m, qualname)


def is_opaque(m: nn.Module) -> bool:
    """anact's own modules, whose insides conversion leaves alone (a FoldedActivation's
    δ module is part of a folded activation, not a site to normalize again)."""
    from anact.convert.fold import FoldedActivation  # (fold imports this module)

    return isinstance(m, (NormalizedActivation, GPN, _LayerAct, FeatureBatchNorm,
                          FoldedActivation))  # fmt: skip


def _args(node: fx.Node, argnames: tuple[str, ...]) -> dict[str, Any]:
    out = dict(zip(argnames, node.args[1:], strict=False))
    out.update({k: v for k, v in node.kwargs.items() if k != "input"})
    return out


def find_site(node: fx.Node, modules: dict[str, nn.Module]) -> Site | None:
    """The activation call made by ``node``, or None if it is no activation call."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        kind = MODULE_KINDS.get(type(mod))
        if kind is None:
            return None
        name, attrs = kind
        params = {a: getattr(mod, a) for a in attrs}
        site = Site(node, name, params, bool(getattr(mod, "inplace", False)))
        if isinstance(mod, nn.GELU) and mod.approximate != "none":
            site.unsupported = f"GELU(approximate={mod.approximate!r}) is not the exact GELU"
        return site
    if node.op == "call_function" and node.target in FUNCTION_KINDS:
        name, argnames = FUNCTION_KINDS[node.target]
        params = _args(node, argnames)
        inplace = bool(params.pop("inplace", False)) or node.target in INPLACE_FUNCTIONS
        site = Site(node, name, params, inplace)
        if name == "gelu":
            approx = params.pop("approximate", "none")
            if approx != "none":
                site.unsupported = f"gelu(approximate={approx!r}) is not the exact GELU"
        return site
    if node.op == "call_method" and node.target in METHOD_KINDS:
        name, _ = METHOD_KINDS[node.target]
        return Site(node, name, {}, node.target in INPLACE_METHODS)
    return None


def is_tensor_add(node: fx.Node) -> bool:
    """Whether ``node`` adds two computed tensors (a residual connection)."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        operands = node.args[:2]
    elif node.op == "call_method" and node.target in ADD_METHODS:
        operands = node.args[:2]
    else:
        return False
    return len(operands) == 2 and all(
        isinstance(a, fx.Node) and a.op not in ("get_attr",) for a in operands
    )


def added_to_before(src: fx.Node, node: fx.Node) -> bool:
    """Whether ``src`` is a residual sum where ``node`` reads it: ``src`` adds two
    computed tensors, or an in-place addition on it (``out.add_(identity)``, whose
    result the code ignores and reads ``out`` again) runs before ``node``."""
    if is_tensor_add(src):
        return True
    for user in src.users:
        if not (user.op == "call_method" and user.target == "add_" and user.args[0] is src
                and is_tensor_add(user)):  # fmt: skip
            continue
        later = user.next
        while later.op != "root":  # graph order: does node come after the addition?
            if later is node:
                return True
            later = later.next
    return False


# calls whose result may share memory with their first argument (a view, the argument
# itself, or part of it): an in-place activation on such a result also changes the argument
_ALIAS_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose",
    "permute", "t", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select",
    "unfold", "as_strided", "detach", "contiguous", "chunk", "split", "unbind", "movedim",
    "swapaxes", "swapdims", "diagonal", "type_as", "to", "float", "__getitem__",
})
_ALIAS_FUNCTIONS = frozenset({
    torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.t, torch.detach, torch.chunk,
    torch.split, torch.unbind, torch.movedim, torch.swapaxes, torch.diagonal,
    torch.as_strided, operator.getitem, F.dropout, torch.dropout,
})
_ALIAS_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                  nn.Dropout3d, nn.AlphaDropout)  # (dropout: its input itself in eval)


def _may_alias_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS or str(node.target).endswith("_")
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS or getattr(node.target, "__name__", "").endswith(
            "_")
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return isinstance(m, _ALIAS_MODULES) or bool(getattr(m, "inplace", False))
    return False


def alias_used_elsewhere(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an in-place call ``node`` changes a tensor that other code reads: its
    input, or what its input is a view of (walking up through view-like calls), has a
    user besides the chain to ``node``. Converting such a site (the normalized
    activation returns a new tensor) would change what those users see."""
    chain, src = node, input_node(node)
    while src is not None:
        if any(user is not chain for user in src.users):
            return True
        if not _may_alias_input(src, modules):
            return False
        chain, src = src, input_node(src)
    return False


def as_example_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """``example_inputs`` as the tuple of the model's positional inputs: a lone tensor is
    taken as ``(x,)``; None stays None."""
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tuple of the model's positional inputs, e.g. (x,), got "
        f"{type(example_inputs).__name__}"
    )


def input_node(node: fx.Node) -> fx.Node | None:
    """The first (tensor) argument of a call node."""
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    x = node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


def scope_of(node: fx.Node) -> str:
    """The qualified name of the module whose forward made this call ('' = top)."""
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module":
        return str(node.target).rpartition(".")[0]
    if stack:
        return str(list(stack.keys())[-1])
    return ""


def unique_name(root: nn.Module, base: str) -> str:
    """``base`` or ``base`` with a number appended, free in ``root``'s module tree."""
    taken = {n for n, _ in root.named_modules(remove_duplicate=False)}
    taken |= {n for n, _ in root.named_parameters(remove_duplicate=False)}
    taken |= {n for n, _ in root.named_buffers(remove_duplicate=False)}
    parent, _, leaf = base.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    cand, k = base, 1
    while cand in taken or hasattr(owner, cand.rpartition(".")[2]):
        cand = f"{parent + '.' if parent else ''}{leaf}{k}"
        k += 1
    return cand
