"""``anact.fold``: NormalizedActivation -> fixed affine form for inference.

In eval mode a normalized activation is c·(δ(x) − μ) with constants c = λ + β·tanh α
and μ (eq. 15 with the running statistics). :func:`fold` replaces it by that
fixed form and, where the next layer is a Linear or Conv with nothing nonlinear
between, moves c and μ into the layer's weight and bias so that only δ remains::

    W' = W·c (per input channel),  b' = b − W'·μ
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from anact.activations import Activation
from anact.convert._sites import BATCHNORMS, FeatureBatchNorm, Tracer, as_example_inputs
from anact.convert.conversion import ConversionError
from anact.modules import NormalizedActivation

__all__ = ["FoldedActivation", "fold"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# pooling modules by how many trailing dimensions they pool
_POOLS_BY_DIMS = {
    1: (nn.MaxPool1d, nn.AdaptiveMaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d),
    2: (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d),
    3: (nn.MaxPool3d, nn.AdaptiveMaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d),
}
_MAX_POOLS = tuple(k for kinds in _POOLS_BY_DIMS.values() for k in kinds[:2])
_AVG_POOLS = tuple(k for kinds in _POOLS_BY_DIMS.values() for k in kinds[2:])


def _pooled_dims(m: nn.Module) -> int:
    """How many trailing dimensions a pooling module pools (MaxPool2d: 2)."""
    return next(d for d, kinds in _POOLS_BY_DIMS.items() if isinstance(m, kinds))


def _commuting_pool(m: nn.Module) -> str | None:
    """'max' or 'avg' for a pooling module that commutes with a per-channel affine map.

    An average pool does when every output's weights sum to 1: no zero padding counted
    in the average and no divisor override. A max pool does for a positive scale (checked
    by the caller); one that also returns indices changes the graph's shape and is not
    passed through.
    """
    if isinstance(m, _MAX_POOLS):
        return None if m.return_indices else "max"
    if isinstance(m, _AVG_POOLS):
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            if getattr(m, "divisor_override", None) is not None:
                return None
            if any(p != 0 for p in pad) and m.count_include_pad:
                return None
        return "avg"
    return None


class _Delta(nn.Module):
    """δ for an activation the registry knows no torch module for (Python: not
    compilable by TorchScript)."""

    def __init__(self, activation: Activation) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.activation.fn(x)

    def extra_repr(self) -> str:
        return self.activation.name


class FoldedActivation(nn.Module):
    """(δ(x) − shift)·scale with fixed buffers (the eval form of eq. 15).

    Args:
        activation: δ.
        scale: shape () or (C,), or None for 1.
        shift: shape () or (C,), or None for 0.
        channel_dim: the dimension of x holding C when scale/shift are (C,).

    Shape: any input (with C channels in ``channel_dim`` when per channel); output
    has the input's shape and dtype.

    δ runs as its torch module (``nn.ReLU``, ``nn.SiLU``, ...; ``activation.module``),
    so that ``torch.jit.script`` compiles this module (and a folded model).
    """

    __jit_ignored_attributes__ = ["activation"]  # the Python description; δ is .delta

    def __init__(self, activation: Activation, scale: Tensor | None, shift: Tensor | None,
                 channel_dim: int | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.delta = activation.module() if activation.module is not None else _Delta(activation)
        self.channel_dim = channel_dim
        self.register_buffer("scale", None if scale is None else scale.detach().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().clone())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "delta" not in self._modules:  # pickled before δ became a submodule
            act = self.activation
            self.delta = act.module() if act.module is not None else _Delta(act)

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        cd = self.channel_dim
        if cd is None or t.dim() == 0:
            return t.to(x.dtype)
        shape = [1] * x.dim()
        shape[cd] = -1
        return t.to(x.dtype).reshape(shape)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` is accepted (as by NormalizedActivation) and ignored: it only
        ever changed the training statistics."""
        y = self.delta(x)
        shift = self.shift
        if shift is not None:
            y = y - self._view(shift, x)
        scale = self.scale
        if scale is not None:
            y = y * self._view(scale, x)
        return y

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: a clear error where δ has no torch module."""
        if isinstance(self.delta, _Delta):
            raise RuntimeError(
                f"torch.jit.script cannot compile the activation {self.activation.name!r}: "
                "it has no torch module (Activation.module) to compute δ. Register it with "
                "module=... (a scriptable nn.Module computing δ), or export with "
                "torch.export or torch.jit.trace instead."
            )
        return self

    def extra_repr(self) -> str:
        parts = [self.activation.name]
        if self.scale is not None:
            parts.append(f"scale={tuple(self.scale.shape) or float(self.scale):}")
        if self.shift is not None:
            parts.append(f"shift={tuple(self.shift.shape) or float(self.shift):}")
        if self.channel_dim is not None:
            parts.append(f"channel_dim={self.channel_dim}")
        return ", ".join(parts)


def _plain(act: Activation) -> nn.Module:
    """δ alone: the torch module when the registry knows one (same speed as the plain model)."""
    if act.module is not None:
        return act.module()
    return FoldedActivation(act, None, None)


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'identity', 'flatten', 'maxpool' or 'avgpool' for ops the fold passes through.

    Identity and flatten keep every element; the pools commute with a per-channel
    affine map under the conditions of :func:`_commuting_pool` and :func:`_try_fold`.
    """
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return "identity"
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        pool = _commuting_pool(m)
        return None if pool is None else f"{pool}pool"
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return "flatten" if (start, end) == (1, -1) else None
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return "flatten" if (start, end) == (1, -1) else None
    return None


def _ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _consumers(node: fx.Node, modules: dict[str, nn.Module]
               ) -> tuple[list[tuple[fx.Node, bool]], str, list[nn.Module]]:
    """The Linear/Conv calls that take ``node``'s output (through pass-through ops).

    Returns ``([(layer node, flattened on the way), ...], "", pools passed)`` or
    ``([], why not, [])``.
    """
    out: list[tuple[fx.Node, bool]] = []
    pools: list[nn.Module] = []
    stack = [(node, False)]
    while stack:
        cur, flat = stack.pop()
        if not cur.users:
            return [], "kept: its output is a model output", []
        for nxt in cur.users:
            if not nxt.args or nxt.args[0] is not cur or cur in nxt.args[1:]:
                return [], f"kept: {nxt.name} does not take it as its input only", []
            kind = _is_passthrough(nxt, modules)
            if kind is not None:
                if kind.endswith("pool"):
                    if flat:
                        return [], f"kept: {nxt.name} pools a flattened tensor", []
                    pools.append(modules[nxt.target])
                stack.append((nxt, flat or kind == "flatten"))
            elif nxt.op == "call_module" and isinstance(modules.get(nxt.target),
                                                         (nn.Linear, *_CONVS)):
                out.append((nxt, flat))
            else:
                what = (f"{nxt.target} ({type(modules[nxt.target]).__name__})"
                        if nxt.op == "call_module" else nxt.name)
                return [], f"kept: its output feeds {what}, not a Linear/Conv", []
    return out, "", pools


def _pools_commute(pools: list[nn.Module], c: Tensor, cd: int | None,
                   ndim_in: int | None) -> str:
    """"" when c·(y − μ) commutes with every pool passed, else why not."""
    if any(isinstance(p, _MAX_POOLS) for p in pools) and not bool((c > 0).all()):
        return "kept: a max pool after it and a scale that is not positive"
    if c.dim() == 0:
        return ""
    for p in pools:  # the channels must not lie in a pooled dimension
        pooled = _pooled_dims(p)
        if ndim_in is not None:
            if cd % ndim_in >= ndim_in - pooled:
                return f"kept: {type(p).__name__} pools its channel dimension"
        elif cd >= 0 or -cd <= pooled:
            return (f"kept: channel_dim={cd} may be pooled by {type(p).__name__} (pass "
                    "example_inputs to fold, or use a negative channel_dim)")
    return ""


def _fold_into(layer: nn.Module, c: Tensor, mu: Tensor, cd: int | None, flat: bool,
               ndim_in: int | None) -> tuple[Tensor, Tensor] | str:
    """(new weight, bias change) in float64 for W·c and −W·c·μ, or why not."""
    w = layer.weight.detach().double()
    if c.dim() == 1:
        if isinstance(layer, _CONVS):
            conv_nd = w.dim() - 2
            if flat or cd not in (1, -(conv_nd + 1)):
                return "kept: its channels are not the Conv's input channels"
            groups, cin_g = layer.groups, w.shape[1]
            extra = (1,) * conv_nd
            cw = c.reshape(groups, 1, cin_g, *extra)  # input channel g·cin_g + j
            mw = mu.reshape(groups, 1, cin_g, *extra)
            wv = w.reshape(groups, -1, cin_g, *w.shape[2:])
            w_new = (wv * cw).reshape(w.shape)
            bias_delta = (wv * cw * mw).sum(dim=tuple(range(2, wv.dim()))).reshape(-1)
            return w_new, bias_delta
        if flat:
            if cd != 1:
                return "kept: flatten mixes dimensions other than the channels"
            reps = w.shape[1] // c.numel()  # (N, C, *S) -> (N, C·S): channel-major
            c, mu = c.repeat_interleave(reps), mu.repeat_interleave(reps)
        elif not (cd == -1 or (ndim_in is not None and cd % ndim_in == ndim_in - 1)):
            return ("kept: channel_dim is not the Linear's last dimension (pass "
                    "example_inputs to fold if the input is 2-D)")
        w_new = w * c
        return w_new, w_new @ mu
    w_new = w * c
    return w_new, w_new.sum(dim=tuple(range(1, w.dim()))) * mu


def _zero_padded(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return False
    pad = layer.padding
    return pad != "valid" and (isinstance(pad, str) or any(p != 0 for p in pad))


def _shared_tensors(model: nn.Module) -> set[int]:
    """ids of the parameters and buffers reachable under more than one name (tied weights,
    e.g. an embedding and an LM head): folding writes into a private copy of those."""
    seen: dict[int, int] = {}
    for _, t in (*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)):  # fmt: skip
        seen[id(t)] = seen.get(id(t), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _untie(module: nn.Module, names: tuple[str, ...], shared: set[int]) -> None:
    """Give ``module`` its own copy of each named tensor that another module also uses,
    so that folding into it leaves the other one unchanged."""
    for name in names:
        t = getattr(module, name, None)
        if t is None or id(t) not in shared:
            continue
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(t.detach().clone(), t.requires_grad))
        else:
            module._buffers[name] = t.detach().clone()


def _try_fold_into_batchnorm(node: fx.Node, m: NormalizedActivation,
                             modules: dict[str, nn.Module], calls: dict[str, int],
                             shared: set[int]) -> str:
    """An eval BatchNorm right after: (c·(δ − μ) − m)/s = (δ − (μ + m/c))/(s/c)."""
    if len(node.users) != 1:
        return ""
    nxt = next(iter(node.users))
    bn = modules.get(nxt.target) if nxt.op == "call_module" else None
    if not isinstance(bn, BATCHNORMS) or bn.running_mean is None or calls.get(nxt.target) != 1:
        return ""
    if nxt.args[0] is not node or len(nxt.args) > 1:
        return ""
    c = m.scale().detach().double()
    mu = m.shift().detach().double()
    if c.dim() == 1:
        bn_dim = -1 if isinstance(bn, FeatureBatchNorm) else 1
        ndim_in = _ndim(node.args[0]) if node.args else None
        cd = m.channel_dim
        same = cd == bn_dim or (ndim_in is not None and cd % ndim_in == bn_dim % ndim_in)
        if not same:
            return ""
    if not bool((c > 0).all()):
        return ""
    var = bn.running_var.double()
    new_var = (var + bn.eps) / c.square() - bn.eps
    if not bool((new_var > 0).all()):
        return ""
    _untie(bn, ("running_mean", "running_var"), shared)
    with torch.no_grad():
        bn.running_mean.copy_((mu + bn.running_mean.double() / c).to(bn.running_mean.dtype))
        bn.running_var.copy_(new_var.to(bn.running_var.dtype))
    return f"folded scale and shift into the running statistics of {nxt.target}"


def _fold_feature_batchnorms(gm: fx.GraphModule, modules: dict[str, nn.Module],
                             calls: dict[str, int], shared: set[int]) -> list[str]:
    """Fold each eval buffer BN (FeatureBatchNorm) into the Linear head right after it.

    BN(z) = a·z + d with a = γ/sqrt(var + eps), d = β − mean·a (per feature), so
    Linear(BN(z)) = (W·a) z + (W d + b).
    """
    out = []
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, FeatureBatchNorm) or bn.running_mean is None:
            continue
        if len(node.users) != 1 or calls.get(node.target) != 1:
            continue
        nxt = next(iter(node.users))
        lin = modules.get(nxt.target) if nxt.op == "call_module" else None
        if not isinstance(lin, nn.Linear) or calls.get(nxt.target) != 1:
            continue
        if nxt.args[0] is not node or node in nxt.args[1:]:
            continue
        a = torch.rsqrt(bn.running_var.double() + bn.eps)
        d = -bn.running_mean.double() * a
        if bn.affine:
            a, d = a * bn.weight.double(), d * bn.weight.double() + bn.bias.double()
        _untie(lin, ("weight", "bias"), shared)
        w = lin.weight.detach().double()
        with torch.no_grad():
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=lin.weight.dtype,
                                                    device=lin.weight.device))
            lin.bias.copy_((lin.bias.double() + w @ d).to(lin.bias.dtype))
            lin.weight.copy_((w * a).to(lin.weight.dtype))
        nxt.args = (node.args[0], *nxt.args[1:])
        gm.graph.erase_node(node)
        _delete(gm, str(node.target))
        out.append(f"{node.target}: buffer BatchNorm folded into {nxt.target}")
    return out


def _delete(gm: nn.Module, target: str) -> None:
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    del owner._modules[leaf]


def _try_fold(node: fx.Node, m: NormalizedActivation, modules: dict[str, nn.Module],
              calls: dict[str, int], shared: set[int]) -> str:
    """Fold c (and μ when exact) into the next layers; returns what happened."""
    bn_note = _try_fold_into_batchnorm(node, m, modules, calls, shared)
    if bn_note:
        return bn_note
    targets, why, pools = _consumers(node, modules)
    if not targets:
        return why
    for t, _ in targets:
        if calls.get(t.target, 0) != 1:
            return f"kept: {t.target} is called more than once"
    c = m.scale().detach().double()
    mu = m.shift().detach().double()
    ndim_in = _ndim(node.args[0]) if node.args else None
    why = _pools_commute(pools, c, m.channel_dim, ndim_in)
    if why:
        return why
    folds = []
    for t, flat in targets:
        res = _fold_into(modules[t.target], c, mu, m.channel_dim, flat, ndim_in)
        if isinstance(res, str):
            return res
        folds.append((modules[t.target], *res))
    # a zero-padded Conv pads c·(δ − μ) with zeros, not δ with μ: the shift cannot move
    shift_ok = not m.center or not any(_zero_padded(layer) for layer, _, _ in folds)
    with torch.no_grad():
        for layer, w_new, bias_delta in folds:
            _untie(layer, ("weight", "bias"), shared)
            layer.weight.copy_(w_new.to(layer.weight.dtype))
            if shift_ok and m.center and bool((bias_delta != 0).any()):
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(w_new.shape[0],
                                                          dtype=layer.weight.dtype,
                                                          device=layer.weight.device))
                layer.bias.copy_((layer.bias.double() - bias_delta).to(layer.bias.dtype))
    names = ", ".join(str(t.target) for t, _ in targets)
    if shift_ok:
        return f"folded scale and shift into {names}"
    return f"folded scale into {names}; shift kept (zero padding of a Conv)"


def _fold_modules(model: nn.Module) -> list[str]:
    """Replace each NormalizedActivation module by its FoldedActivation, in place."""
    report = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, NormalizedActivation):
            continue
        if not m.track_running_stats:
            report.append(f"{name}: not folded (track_running_stats=False uses "
                          "batch statistics in eval)")
            continue
        new = FoldedActivation(m.activation, m.scale().detach(), m.shift().detach(),
                               m.channel_dim)
        parent, _, leaf = name.rpartition(".")
        if not leaf:
            raise ConversionError("the model itself is a NormalizedActivation: fold its parent")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        report.append(f"{name}: replaced by its fixed affine form (modules mode)")
    return report


def fold(
    model: nn.Module,
    *,
    example_inputs: Sequence[Any] | None = None,
    mode: str = "graph",
    inplace: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, list[str]]:
    """An inference copy of ``model`` with every NormalizedActivation folded.

    Each :class:`anact.NormalizedActivation` (which needs running statistics)
    becomes its eval form c·(δ(x) − μ); where its output goes only to a
    Linear/Conv (possibly through Dropout, Identity or ``flatten(x, 1)``), c and μ
    move into that layer's weight and bias and only δ remains (a plain
    ``nn.ReLU`` etc.). A Conv with zero padding takes c but not μ (padding the
    shifted input with zeros is not padding the unshifted one with μ): a
    ``FoldedActivation`` computing δ(x) − μ stays.

    Args:
        model: a traceable module (e.g. the output of :func:`anact.convert`).
        example_inputs: optional; gives tensor ranks, so per-channel statistics
            with ``channel_dim=1`` on (N, F) inputs can fold into a Linear.
        mode: ``"graph"`` (default) traces with torch.fx and folds into the next
            layers; ``"modules"`` (for models fx cannot trace) only replaces each
            NormalizedActivation module by its FoldedActivation, keeping the class.
        inplace: change ``model``'s own layers instead of a deep copy.
        return_report: also return one line per folded activation.

    Returns:
        An ``fx.GraphModule`` in eval mode (for inference only: training it
        would not update any statistics), and the report when asked.
    """
    if mode not in ("graph", "modules"):
        raise ValueError(f"mode must be 'graph' or 'modules', got {mode!r}")
    example_inputs = as_example_inputs(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    if mode == "modules":
        lines = _fold_modules(work)
        return (work, lines) if return_report else work
    try:
        graph = Tracer().trace(work)
    except Exception as e:  # torch.fx raises TraceError, TypeError, ... on dynamic control flow
        raise ConversionError(
            f"torch.fx could not trace {type(work).__name__}: {type(e).__name__}: {e}\n"
            "What to do: anact.fold(model, mode='modules') replaces each NormalizedActivation "
            "by its fixed affine form without tracing (no folding into the next layer)."
        ) from e
    gm = fx.GraphModule(work, graph, work.__class__.__name__)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    shared = _shared_tensors(gm)
    report: list[str] = []
    for node in list(gm.graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, NormalizedActivation):
            continue
        if not m.track_running_stats:
            report.append(f"{node.target}: not folded (track_running_stats=False uses "
                          "batch statistics in eval)")
            continue
        what = _try_fold(node, m, modules, calls, shared)
        if what.startswith("folded scale and shift"):
            new: nn.Module = _plain(m.activation)
        elif what.startswith("folded scale"):
            new = FoldedActivation(m.activation, None, m.shift(), m.channel_dim)
        else:
            new = FoldedActivation(m.activation, m.scale().detach(), m.shift().detach(),
                                   m.channel_dim)
        # a module called at several sites gets one folded module per site
        name = f"{node.target}_{node.name}" if calls[node.target] > 1 else str(node.target)
        gm.add_submodule(name, new)
        node.target = name
        node.args, node.kwargs = node.args[:1], {}  # a mask only ever changed statistics
        report.append(f"{node.target}: {what}")
    report.extend(_fold_feature_batchnorms(gm, modules, calls, shared))
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return (gm, report) if return_report else gm
