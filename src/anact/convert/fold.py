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
from anact.convert._sites import Tracer
from anact.modules import NormalizedActivation

__all__ = ["FoldedActivation", "fold"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FoldedActivation(nn.Module):
    """(δ(x) − shift)·scale with fixed buffers (the eval form of eq. 15).

    Args:
        activation: δ.
        scale: shape () or (C,), or None for 1.
        shift: shape () or (C,), or None for 0.
        channel_dim: the dimension of x holding C when scale/shift are (C,).

    Shape: any input (with C channels in ``channel_dim`` when per channel); output
    has the input's shape and dtype.
    """

    def __init__(self, activation: Activation, scale: Tensor | None, shift: Tensor | None,
                 channel_dim: int | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.channel_dim = channel_dim
        self.register_buffer("scale", None if scale is None else scale.detach().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().clone())

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        if self.channel_dim is None or t.dim() == 0:
            return t.to(x.dtype)
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return t.to(x.dtype).reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        y = self.activation.fn(x)
        if self.shift is not None:
            y = y - self._view(self.shift, x)
        if self.scale is not None:
            y = y * self._view(self.scale, x)
        return y

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
    """'identity' or 'flatten' for ops that are linear and elementwise-order preserving."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return "identity"
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        return None
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


def _try_fold(gm: fx.GraphModule, node: fx.Node, m: NormalizedActivation,
              modules: dict[str, nn.Module], calls: dict[str, int]) -> tuple[str, bool]:
    """Fold c (and μ when possible) into the next layer. Returns (what happened, shift folded)."""
    chain, cur, flat = [], node, False
    while True:
        if len(cur.users) != 1:
            return "kept: output used more than once", False
        nxt = next(iter(cur.users))
        if not nxt.args or nxt.args[0] is not cur:
            return "kept: next op does not take it as input", False
        kind = _is_passthrough(nxt, modules)
        if kind is None:
            break
        flat = flat or kind == "flatten"
        chain.append(nxt)
        cur = nxt
    layer = modules.get(nxt.target) if nxt.op == "call_module" else None
    if not isinstance(layer, (nn.Linear, *_CONVS)):
        return "kept: next op is not a Linear/Conv", False
    if calls.get(nxt.target, 0) != 1:
        return f"kept: {nxt.target} is called more than once", False
    c = m.scale().detach().double()
    mu = m.shift().detach().double()
    w = layer.weight.detach().double()
    ndim_in = _ndim(node.args[0]) if node.args else None
    cd = m.channel_dim
    if c.dim() == 1:
        if isinstance(layer, _CONVS):
            conv_nd = w.dim() - 2
            if flat or cd not in (1, -(conv_nd + 1)):
                return "kept: channels are not the Conv's input channels", False
            groups = layer.groups
            cin_g = w.shape[1]
            cw = c.reshape(groups, 1, cin_g)
            mw = mu.reshape(groups, 1, cin_g)
            extra = (1,) * conv_nd
            wv = w.reshape(groups, -1, cin_g, *w.shape[2:])
            w_new = (wv * cw.reshape(*cw.shape, *extra)).reshape(w.shape)
            bias_delta = (wv * (cw * mw).reshape(*cw.shape, *extra)).sum(
                dim=tuple(range(2, wv.dim()))).reshape(-1)
        else:
            if flat:
                if cd != 1:
                    return "kept: flatten mixes dimensions other than the channels", False
                reps = w.shape[1] // c.numel()
                c, mu = c.repeat_interleave(reps), mu.repeat_interleave(reps)
            elif not (cd == -1 or (ndim_in is not None and cd % ndim_in == ndim_in - 1)):
                return ("kept: channel_dim is not the Linear's last dimension (pass "
                        "example_inputs to fold if the input is 2-D)"), False
            w_new = w * c
            bias_delta = w_new @ mu
    else:
        w_new = w * c
        dims = tuple(range(1, w.dim()))
        bias_delta = w_new.sum(dim=dims) * mu
    shift_ok = isinstance(layer, nn.Linear) or all(
        p == 0 for p in (layer.padding if isinstance(layer.padding, tuple) else (1,))
    ) or layer.padding == "valid"
    if not m.center:
        shift_ok = True
        bias_delta = torch.zeros_like(bias_delta)
    with torch.no_grad():
        layer.weight.copy_(w_new.to(layer.weight.dtype))
        if shift_ok and bool((bias_delta != 0).any()):
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            layer.bias.copy_((layer.bias.double() - bias_delta).to(layer.bias.dtype))
    if shift_ok:
        return f"folded scale and shift into {nxt.target}", True
    return f"folded scale into {nxt.target}; shift kept (zero padding of the Conv)", False


def fold(
    model: nn.Module,
    *,
    example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
    return_report: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, list[str]]:
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
        inplace: change ``model``'s own layers instead of a deep copy.
        return_report: also return one line per folded activation.

    Returns:
        An ``fx.GraphModule`` in eval mode (for inference only: training it
        would not update any statistics), and the report when asked.
    """
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    gm = fx.GraphModule(work, Tracer().trace(work), work.__class__.__name__)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    report: list[str] = []
    for node in list(gm.graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, NormalizedActivation):
            continue
        if not m.track_running_stats:
            report.append(f"{node.target}: not folded (track_running_stats=False uses "
                          "batch statistics in eval)")
            continue
        what, _ = _try_fold(gm, node, m, modules, calls)
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
        report.append(f"{node.target}: {what}")
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return (gm, report) if return_report else gm
