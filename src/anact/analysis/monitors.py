"""Training monitors: ρ, ρ' and the Score of eq. 22, Σ|E[W]| of Figure 4.

:class:`ConvergenceMonitor` hangs forward hooks on every activation layer of a
model and reads the layer's real input during the ordinary training forward
pass, so it needs no extra pass over the data::

    with ConvergenceMonitor(model) as mon:
        for epoch in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
                mon.step()                      # closes the training step
            print(mon.epoch_summary(reset=True)["score"])

For a layer computing ``c·(δ(x) − shift)`` on input x (c = 1 for a plain
activation, the current scale λ + β·tanh α for a normalized activation, a for
GPN), the monitor records per training step

    ρ  = Var[c·δ(x)] / Var[x],   ρ' = E[(c·δ'(x))²]        (eq. 5-6, 31, whole layer)
    Score = Σ_i (|ln ρ_i| + |ln ρ'_i|) / 2                   (eq. 22)

and, for diagnosis, ρ, ρ', λ of the bare δ (c = 1, eq. 13) and the input's and
output's mean and variance. Moments are over all elements of the tensor
(population variance), in float32, without gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from anact.activations import Activation, get_activation

__all__ = [
    "ConvergenceMonitor",
    "LAYER_STATS",
    "activation_of",
    "weight_mean_abs_sum",
]

#: The per-layer statistics in a summary, in the order they are stored.
LAYER_STATS = (
    "rho",  # Var[c·δ(x)] / Var[x] of the whole layer (eq. 5, 31)
    "rho_prime",  # E[(c·δ'(x))²] of the whole layer (eq. 6)
    "delta_rho",  # Var[δ(x)] / Var[x] of the bare activation
    "delta_rho_prime",  # E[δ'(x)²] of the bare activation
    "in_mean",
    "in_var",
    "out_mean",
    "out_var",
)
_N_RAW = len(LAYER_STATS)

# plain torch modules -> (registry name, params read from the module)
_PLAIN: dict[type[nn.Module], Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda m: get_activation("relu"),
    nn.SiLU: lambda m: get_activation("swish"),
    nn.Tanh: lambda m: get_activation("tanh"),
    nn.LeakyReLU: lambda m: get_activation("lrelu", negative_slope=m.negative_slope),
    nn.ELU: lambda m: get_activation("elu", alpha=m.alpha),
    nn.SELU: lambda m: get_activation("selu"),
    nn.GELU: lambda m: get_activation("gelu"),
    nn.Mish: lambda m: get_activation("mish"),
    nn.Softplus: lambda m: get_activation("softplus", beta=m.beta, threshold=m.threshold),
    nn.Hardswish: lambda m: get_activation("hardswish"),
    nn.Sigmoid: lambda m: get_activation("sigmoid"),
}


def _core_classes() -> tuple[type | None, type | None]:
    """(NormalizedActivation, GPN) if the core modules are importable."""
    try:
        from anact.modules import GPN, NormalizedActivation
    except ImportError:  # pragma: no cover - core not installed
        return None, None
    return NormalizedActivation, GPN


def activation_of(module: nn.Module) -> Activation | None:
    """The elementwise δ a module applies, or None if it is not an activation layer.

    Recognises ``anact.NormalizedActivation`` (and NReLU, NSwish, …), ``anact.GPN``
    and the plain modules nn.ReLU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.GELU, nn.Mish, nn.Softplus, nn.Hardswish, nn.Sigmoid (exact type match:
    a subclass may compute something else). ``nn.GELU(approximate="tanh")`` maps
    to the exact GELU (their derivatives differ by < 2e-3).
    """
    na_cls, gpn_cls = _core_classes()
    if na_cls is not None and isinstance(module, na_cls | gpn_cls):
        return module.activation
    factory = _PLAIN.get(type(module))
    return factory(module) if factory is not None else None


def weight_mean_abs_sum(model: nn.Module) -> float:
    """Σ_i |E[W_i]| over the weights of every Linear and Conv layer (Figure 4).

    E[W_i] is the mean of all entries of layer i's weight tensor.
    """
    w = _weights(model)
    if not w:
        return 0.0
    return float(_weight_sum(w))


def _weights(model: nn.Module) -> list[Tensor]:
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
        and isinstance(getattr(m, "weight", None), Tensor)
        and not isinstance(m.weight, nn.parameter.UninitializedParameter)
    ]


@torch.no_grad()
def _weight_sum(weights: list[Tensor]) -> Tensor:
    dev = weights[0].device
    return torch.stack([w.detach().float().mean().abs().to(dev) for w in weights]).sum()


def _channel_view(c: Tensor, x: Tensor, channel_dim: int | None) -> Tensor:
    """Broadcast a scale of shape () or (C,) against x (C along channel_dim)."""
    if c.dim() == 0 or channel_dim is None:
        return c
    shape = [1] * x.dim()
    shape[channel_dim] = c.numel()
    return c.reshape(shape)


class _Layer:
    """Hook state for one activation layer."""

    def __init__(self, name: str, module: nn.Module, act: Activation) -> None:
        self.name = name
        self.module = module
        self.act = act
        na_cls, gpn_cls = _core_classes()
        self.kind = (
            "normalized" if na_cls is not None and isinstance(module, na_cls)
            else "gpn" if gpn_cls is not None and isinstance(module, gpn_cls)
            else "plain"
        )
        # an in-place module overwrites its input: read it before the forward
        self.inplace = bool(getattr(module, "inplace", False))
        self.pending: list[Tensor] = []
        self._pre_stats: Tensor | None = None

    def scale(self, x: Tensor) -> Tensor | None:
        """The factor c of the layer's function c·(δ(x) − shift), broadcastable to x."""
        m = self.module
        if self.kind == "gpn":
            return torch.tensor(float(m.a), device=x.device)
        if self.kind != "normalized":
            return None
        if m.track_running_stats:
            c = m.scale()  # in training, the running values this forward just used
        else:
            from anact import functional as AF

            mom = AF.batch_moments(x, m.activation, channel_dim=m.channel_dim)
            rho, rho_prime, _, _ = AF.moments_to_stats(mom)
            c = AF.lambda_factor(rho, rho_prime, m.eps) + m.beta * torch.tanh(m.alpha)
        return _channel_view(c.detach().float(), x, m.channel_dim)

    def input_stats(self, x: Tensor, mask: Tensor | None, d: Tensor | None) -> Tensor:
        """The 6 input-side statistics (LAYER_STATS[:6]) as a float32 tensor."""
        x = x.detach().float()
        if d is None:
            d = self.act.fn(x)
        else:
            d = d.detach().float()
        dd = self.act.derivative(x)
        c = self.scale(x)
        if c is not None:
            c = c.expand_as(x) if c.dim() else c
        if mask is not None:
            m = mask.to(x.device).expand_as(x)
            x, d, dd = x[m], d[m], dd[m]
            if c is not None and c.dim():
                c = c[m]
        in_var, in_mean = torch.var_mean(x, correction=0)
        d_var = torch.var(d, correction=0)
        dd_sq = (dd * dd).mean()
        if c is None:
            l_var, l_dsq = d_var, dd_sq
        elif c.dim() == 0:
            l_var, l_dsq = c * c * d_var, c * c * dd_sq
        else:
            l_var = torch.var(c * d, correction=0)
            l_dsq = ((c * dd) ** 2).mean()
        return torch.stack([l_var / in_var, l_dsq, d_var / in_var, dd_sq, in_mean, in_var])

    def output_stats(self, y: Tensor, mask: Tensor | None) -> Tensor:
        y = y.detach().float()
        if mask is not None:
            y = y[mask.to(y.device).expand_as(y)]
        out_var, out_mean = torch.var_mean(y, correction=0)
        return torch.stack([out_mean, out_var])


def _mask_of(layer: _Layer, args: tuple, kwargs: dict) -> Tensor | None:
    if layer.kind != "normalized":
        return None
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    return mask if isinstance(mask, Tensor) else None


class ConvergenceMonitor:
    """Per-step ρ, ρ', the Score of eq. 22 and Σ|E[W]| of Figure 4, via forward hooks.

    Args:
        model: any ``nn.Module``; every activation layer that
            :func:`activation_of` recognises is monitored.
        training_only: record only forward passes of modules in training mode
            (default), so validation passes leave the statistics alone.

    Hooks run under ``torch.no_grad`` on the detached layer input, in float32.
    Several forward passes within one step (gradient accumulation) are averaged.
    Values stay on the model's device until :meth:`step`, which synchronises once.

    Attributes:
        layers: ``{layer name: Activation}`` of the monitored layers.
        history: one dict per closed step: ``score``, ``weight_mean_abs_sum`` and
            ``layers`` (``{name: {stat: value}}`` with the keys of
            :data:`LAYER_STATS` plus ``lam``).
    """

    def __init__(self, model: nn.Module, *, training_only: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ConvergenceMonitor needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.training_only = training_only
        self._layers: list[_Layer] = []
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            act = activation_of(module)
            if act is None:
                continue
            layer = _Layer(name or type(module).__name__, module, act)
            self._layers.append(layer)
            if layer.inplace:
                self._handles.append(
                    module.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
                )
            self._handles.append(
                module.register_forward_hook(self._post_hook(layer), with_kwargs=True)
            )
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ hooks

    def _active(self, module: nn.Module) -> bool:
        return module.training or not self.training_only

    def _pre_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._active(module) or not args:
                return
            with torch.no_grad():
                layer._pre_stats = layer.input_stats(args[0], _mask_of(layer, args, kwargs), None)

        return hook

    def _post_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._active(module) or not args or not isinstance(output, Tensor):
                return
            mask = _mask_of(layer, args, kwargs)
            with torch.no_grad():
                if layer.inplace:
                    inp, layer._pre_stats = layer._pre_stats, None
                    if inp is None:
                        return
                else:
                    # a plain module's output is δ(x) itself: no need to recompute it
                    d = output if layer.kind == "plain" else None
                    inp = layer.input_stats(args[0], mask, d)
                layer.pending.append(torch.cat([inp, layer.output_stats(output, mask)]))

        return hook

    # ------------------------------------------------------------------ API

    @property
    def layers(self) -> dict[str, Activation]:
        """``{layer name: Activation}`` of the monitored layers, in model order."""
        return {layer.name: layer.act for layer in self._layers}

    def step(self) -> dict[str, Any]:
        """Close a training step (call after ``optimizer.step()``); returns its record.

        Raises:
            RuntimeError: no monitored layer ran a (training) forward pass since
                the last step, e.g. ``step()`` called twice, or the model in eval mode.
        """
        fired = [layer for layer in self._layers if layer.pending]
        if self._layers and not fired:
            raise RuntimeError(
                "step() called but no monitored activation layer ran a training forward "
                "pass since the last step; call step() once per training step, after "
                "optimizer.step(), with the model in train() mode"
            )
        parts = [torch.stack(layer.pending).mean(0).cpu() for layer in fired]
        weights = _weights(self.model)
        wsum = _weight_sum(weights).cpu().reshape(1) if weights else torch.zeros(1)
        flat = torch.cat([*parts, wsum]).tolist()  # the one synchronisation per step
        layers: dict[str, dict[str, float]] = {}
        score = 0.0
        for i, layer in enumerate(fired):
            layer.pending.clear()
            vals = dict(zip(LAYER_STATS, flat[i * _N_RAW : (i + 1) * _N_RAW], strict=True))
            vals["lam"] = _lam(vals["delta_rho"], vals["delta_rho_prime"])  # eq. 13
            layers[layer.name] = vals
            score += (abs(_log(vals["rho"])) + abs(_log(vals["rho_prime"]))) / 2  # eq. 22
        record = {"score": score, "weight_mean_abs_sum": flat[-1], "layers": layers}
        self.history.append(record)
        return record

    def epoch_summary(self, reset: bool = False) -> dict[str, Any]:
        """Means over the steps closed since the last :meth:`reset`.

        Returns:
            ``{"score": mean of the per-step Score (eq. 22), "weight_mean_abs_sum":
            mean Σ|E[W]|, "steps": number of steps, "layers": {name: {"activation":
            name, stat: mean over steps}}}``; NaN values when no step was closed.
            A layer that did not run in some steps is averaged over the steps it ran.
        """
        h = self.history
        layers: dict[str, dict[str, Any]] = {}
        for layer in self._layers:
            rows = [r["layers"][layer.name] for r in h if layer.name in r["layers"]]
            stats: dict[str, Any] = {"activation": layer.act.name}
            for key in (*LAYER_STATS, "lam"):
                stats[key] = float(np.mean([r[key] for r in rows])) if rows else math.nan
            layers[layer.name] = stats
        summary = {
            "score": float(np.mean([r["score"] for r in h])) if h else math.nan,
            "weight_mean_abs_sum": (
                float(np.mean([r["weight_mean_abs_sum"] for r in h])) if h else math.nan
            ),
            "steps": len(h),
            "layers": layers,
        }
        if reset:
            self.reset()
        return summary

    def reset(self) -> None:
        """Forget the closed steps and any forward pass not yet closed by :meth:`step`."""
        self.history = []
        for layer in self._layers:
            layer.pending.clear()
            layer._pre_stats = None

    def remove(self) -> None:
        """Detach every hook; the model runs exactly as without the monitor."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ConvergenceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.history)

    def __repr__(self) -> str:
        names = ", ".join(f"{n}={a.name}" for n, a in self.layers.items())
        return f"ConvergenceMonitor({names}; {len(self.history)} steps)"


def _log(v: float) -> float:
    """ln v, -inf at 0 (a dead layer makes the Score infinite), NaN for NaN/negative."""
    if v > 0:
        return math.log(v)
    return -math.inf if v == 0 else math.nan


def _lam(rho: float, rho_prime: float) -> float:
    if rho > 0 and rho_prime > 0:
        return math.sqrt((rho + rho_prime) / (2 * rho * rho_prime))
    return math.inf if rho == 0 or rho_prime == 0 else math.nan
