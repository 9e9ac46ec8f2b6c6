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

For an activation layer with input x and output y (a plain activation
y = δ(x); a normalized activation y = c·(δ(x) − μ) with c its current scale
λ + β·tanh α; GPN y = a·(ψ(x) + b), c = a) the monitor records per training step

    ρ  = Var[y] / Var[x] = c²·Var[δ(x)] / Var[x]       (eq. 5, 31, of the whole layer)
    ρ' = E[(c·δ'(x))²]                                 (eq. 6, of the whole layer)
    Score = Σ_i (|ln ρ_i| + |ln ρ'_i|) / 2             (eq. 22)

and, for diagnosis, ρ, ρ', λ of the bare δ (c = 1, eq. 13) and the input's and
output's mean and variance, over all elements of the tensor (population variance),
without gradient. The cost (benchmarks/bench_monitors.py):

* a normalized activation hands the monitor the batch moments it computes anyway
  (:meth:`anact.NormalizedActivation.register_moments_hook`): no pass over the data;
* a plain activation (and GPN) costs power sums Σx, Σx², Σy, Σy² and Σδ'², δ' taken
  from the output where that is cheaper than re-evaluating δ (ReLU: y > 0, tanh:
  1 − y², ELU: y + α, Swish: y/x, …) and otherwise from torch's fused backward
  kernels; ReLU's and LeakyReLU's δ'² are exact counts. On CPU the package's C code
  (``anact._powersums``, built at install where a C compiler exists) reads x and y
  once for all five sums, in one call (float32 block sums added in double, relative
  error ~1e-8); elsewhere, and without the C code, torch ops compute them (float32
  cascade sums and dots over 2^17-element chunks, relative error ~1e-7);
* everything stays on the device until :meth:`ConvergenceMonitor.step`, which
  synchronises once and combines the sums in float64.

With a channel-wise scale (``channel_dim``) or a mask, and where a normalized layer
cannot report its moments (inside ``torch.compile``), the slower exact path is taken:
ρ' = mean over elements of c_k²·δ'(x)², ρ = Var[y]/Var[x] over the whole tensor (or
its unmasked elements).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from anact import _native
from anact import functional as AF
from anact._native import (
    DSQ_ELU_Y,
    DSQ_NONE,
    DSQ_SIGMOID_Y,
    DSQ_SIGN_X,
    DSQ_SIGN_Y,
    DSQ_SWISH_XY,
    DSQ_TANH_Y,
)
from anact.activations import Activation, get_activation
from anact.analysis.moments import lambda_factor

# the one-pass C power sums, built with the package where a C compiler exists (else None:
# torch ops); a module attribute of its own so that tests can take the torch path
_c_power_sums = _native.power_sums

__all__ = [
    "ConvergenceMonitor",
    "LAYER_STATS",
    "activation_of",
    "weight_mean_abs_sum",
]

#: The per-layer statistics in a summary, in the order they are stored.
LAYER_STATS = (
    "rho",  # Var[y] / Var[x] of the whole layer (eq. 5, 31)
    "rho_prime",  # E[(c·δ'(x))²] of the whole layer (eq. 6)
    "delta_rho",  # Var[δ(x)] / Var[x] of the bare activation
    "delta_rho_prime",  # E[δ'(x)²] of the bare activation
    "in_mean",
    "in_var",
    "out_mean",
    "out_var",
)

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


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]


def _weights(model: nn.Module, layers: list[nn.Module] | None = None) -> list[Tensor]:
    """The weight tensors of the Linear and Conv ``layers`` (default: all of ``model``'s)."""
    out = []
    for m in _weight_layers(model) if layers is None else layers:
        w = getattr(m, "weight", None)  # read each step: a weight may be replaced
        if isinstance(w, Tensor) and not isinstance(w, nn.parameter.UninitializedParameter):
            out.append(w)
    return out


@torch.no_grad()
def _weight_sum(weights: list[Tensor]) -> Tensor:
    dev = weights[0].device
    return torch.stack([w.detach().float().mean().to(dev) for w in weights]).abs().sum()


_CHUNK = 1 << 17  # CPU: elements per float32 dot (relative error stays ~1e-7)
_SCRATCH_MAX = 1 << 22  # CPU: largest reused scratch buffer (16 MiB of float32)

# A producer writes δ'(x) of a flat x into ``out`` (a reused scratch buffer of x's size,
# or None to allocate) and returns it. Fresh CPU tensors the size of an activation cost
# page faults that dwarf the arithmetic, hence the scratch buffer.
_Producer = Callable[[Tensor, Activation, Tensor | None], Tensor]


def _relu_prime(x: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    return torch.sign(x, out=out).clamp_(min=0)  # δ' = 1[x > 0] without bool tensors


def _lrelu_prime(x: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    a = float(act.params["negative_slope"])
    return torch.sign(x, out=out).clamp_(min=0).mul_(1 - a).add_(a)  # 1 (x > 0), a (x ≤ 0)


def _fused(backward: Callable[..., Tensor], *extra: Callable[[Activation], Any]) -> _Producer:
    """δ'(x) = backward(grad = 1, x, *extra(act)) from torch's fused backward kernel."""
    out_variant = getattr(backward, "grad_input", None)

    def prime(x: Tensor, act: Activation, out: Tensor | None) -> Tensor:
        one = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)
        args = [f(act) for f in extra]
        if out is not None and out_variant is not None:
            return out_variant(one, x, *args, grad_input=out)
        return backward.default(one, x, *args)

    return prime


_A = torch.ops.aten
_SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)


def _elu_coefficients(act: Activation) -> tuple[float, float]:
    """(α, scale) of ELU (scale 1) or SELU."""
    return _SELU if act.name == "selu" else (float(act.params["alpha"]), 1.0)


def _elu_prime(x: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    alpha, scale = _elu_coefficients(act)
    one = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)
    if out is not None:
        return _A.elu_backward.grad_input(one, alpha, scale, 1.0, False, x, grad_input=out)
    return _A.elu_backward.default(one, alpha, scale, 1.0, False, x)


# δ' by a single kernel instead of the registry's op-by-op formula (2-10x cheaper on
# CPU). Each is used only after :func:`_shortcut_for` has checked it against the
# registered derivative (torch's hardswish_backward differs from ours at x = ±3).
_DSQ_SHORTCUTS: dict[str, _Producer] = {
    "relu": _relu_prime,
    "lrelu": _lrelu_prime,
    "swish": _fused(_A.silu_backward),
    "gelu": _fused(_A.gelu_backward),
    "mish": _fused(_A.mish_backward),
    "elu": _elu_prime,
    "selu": _elu_prime,
    "softplus": _fused(
        _A.softplus_backward, lambda a: float(a.params["beta"]),
        lambda a: float(a.params["threshold"]),
    ),
}


def _agrees_with_registry(act: Activation, derivative: Callable[..., Tensor]) -> bool:
    """Whether ``derivative(x, out)`` (``out`` None or a buffer) equals the registered δ'
    on probe points around the kinks (a user may have registered another function under
    a built-in name, and an op may be missing in this torch)."""
    probe = torch.cat([torch.linspace(-6, 6, 121, device="cpu"),
                       torch.tensor([0.0, -3.0, 3.0, 25.0, 1e-30], device="cpu")])
    try:
        return all(
            torch.allclose(derivative(probe, out), act.derivative(probe), rtol=1e-5, atol=1e-6)
            for out in (None, torch.empty_like(probe))
        )
    except (RuntimeError, KeyError, AttributeError, TypeError):
        return False


def _shortcut_for(act: Activation) -> _Producer | None:
    """The fast δ' for ``act``, if one exists and agrees with its registered derivative."""
    prime = _DSQ_SHORTCUTS.get(act.name)
    if prime is None or not _agrees_with_registry(act, lambda x, out: prime(x, act, out)):
        return None
    return prime


def _sq_sum(t: Tensor) -> Tensor:
    """Σt² of a flat float32 tensor by float32 dots (no memory written): on CPU over
    chunks of :data:`_CHUNK` elements (relative error ~1e-7 each; one CPU dot over
    millions of elements drifts to ~1e-4), in one call on accelerators (tree sums)."""
    if t.device.type != "cpu" or t.numel() <= _CHUNK:
        return torch.dot(t, t)
    return torch.stack([torch.dot(c, c) for c in t.split(_CHUNK)]).sum()


def _dsq_sum(
    xf: Tensor, act: Activation, prime: _Producer | None = None, buf: Tensor | None = None
) -> Tensor:
    """Σδ'(x)² over a flat float32 tensor.

    δ' is written into ``buf`` (a reused CPU scratch buffer of at least x's size: no
    fresh pages) and squared-summed by :func:`_sq_sum`; ReLU's and LeakyReLU's δ'² ∈
    {1, a²} are exact counts of x > 0. Without ``buf`` (accelerators, whose allocator
    caches) a fresh tensor.
    """
    b = None if buf is None else buf[: xf.numel()]
    if prime is _relu_prime or prime is _lrelu_prime:
        # count x > 0 from s = sign(x) as (Σs + Σs²)/2, exact in float32
        sgn = torch.sign(xf, out=b)
        pos = (sgn.sum() + _sq_sum(sgn)) / 2
        a2 = float(act.params["negative_slope"]) ** 2 if prime is _lrelu_prime else 0.0
        return pos if not a2 else pos + a2 * (xf.numel() - pos)
    g = prime(xf, act, b) if prime is not None else act.derivative(xf)
    return _sq_sum(g)


# δ' of a plain layer from its output y = δ(x) (and x where needed), written into ``out``:
# no second evaluation of tanh/exp where y gives it (1 − y², y + α for ELU, …).
_OutProducer = Callable[[Tensor, Tensor, Activation, Tensor | None], Tensor]


def _one(t: Tensor) -> Tensor:
    return torch.ones((), dtype=t.dtype, device=t.device)


def _relu_out(x: Tensor, y: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    return torch.sign(y, out=out)  # y ≥ 0: 1[x > 0]; δ'² sums to an exact count


def _lrelu_out(x: Tensor, y: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    return _lrelu_prime(y, act, out)  # sign(y) = sign(x) for a positive slope


def _tanh_out(x: Tensor, y: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    return torch.addcmul(_one(y), y, y, value=-1, out=out)  # 1 − y²


def _sigmoid_out(x: Tensor, y: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    return torch.addcmul(y, y, y, value=-1, out=out)  # y(1 − y)


def _elu_out(x: Tensor, y: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    alpha, scale = _elu_coefficients(act)
    grad = _one(y).expand_as(y)  # ELU/SELU: scale (y > 0), y + scale·α (y ≤ 0)
    if out is not None:
        return _A.elu_backward.grad_input(grad, alpha, scale, 1.0, True, y, grad_input=out)
    return _A.elu_backward.default(grad, alpha, scale, 1.0, True, y)


_SWISH_TINY = 1e-20  # below it σ(x) = 1/2 in float32; y/x would be 0/0 or a subnormal's


def _swish_out(x: Tensor, y: Tensor, act: Activation, out: Tensor | None) -> Tensor:
    # σ = y/x (1/2 for |x| < 1e-20, and for inf/inf), then δ' = σ + y(1 − σ) = lerp(y, 1, σ)
    sig = torch.div(y, x, out=out).nan_to_num_(nan=0.5)
    sig.masked_fill_(x.abs() < _SWISH_TINY, 0.5)
    return torch.lerp(y, _one(y), sig, out=sig)


# name -> (producer, needs x): used for plain layers after :func:`_out_shortcut_for`
# has checked it against the registered derivative
_OUT_SHORTCUTS: dict[str, tuple[_OutProducer, bool]] = {
    "relu": (_relu_out, False),
    "lrelu": (_lrelu_out, False),
    "tanh": (_tanh_out, False),
    "sigmoid": (_sigmoid_out, False),
    "elu": (_elu_out, False),
    "selu": (_elu_out, False),
    "swish": (_swish_out, True),
}


def _out_shortcut_for(act: Activation, have_x: bool) -> _OutProducer | None:
    """δ' of ``act`` from its output (and input if ``have_x``), if it agrees with the
    registered derivative."""
    prime, needs_x = _OUT_SHORTCUTS.get(act.name, (None, False))
    if prime is None or (needs_x and not have_x):
        return None
    if not _agrees_with_registry(act, lambda x, out: prime(x, act.fn(x), act, out)):
        return None
    return prime


# δ' sources of the C power sums (anact._native); each is the C twin of a shortcut
# above, used only where that shortcut passed the registry check
_C_OUT_KINDS: dict[_OutProducer, int] = {
    _relu_out: DSQ_SIGN_Y, _lrelu_out: DSQ_SIGN_Y, _tanh_out: DSQ_TANH_Y,
    _sigmoid_out: DSQ_SIGMOID_Y, _elu_out: DSQ_ELU_Y, _swish_out: DSQ_SWISH_XY,
}  # fmt: skip
_C_IN_KINDS: dict[_Producer, int] = {_relu_prime: DSQ_SIGN_X, _lrelu_prime: DSQ_SIGN_X}


def _c_params(act: Activation) -> tuple[float, float]:
    """The (p0, p1) the C δ' of ``act`` reads: δ' above and below 0 for ReLU (1, 0) and
    LeakyReLU (1, slope), (α, scale) for ELU/SELU."""
    if act.name == "relu":
        return 1.0, 0.0
    if act.name == "lrelu":
        return 1.0, float(act.params["negative_slope"])
    if act.name in ("elu", "selu"):
        return _elu_coefficients(act)
    return 0.0, 0.0


_c_readable = _native.readable


def _c_sums(x: Tensor | None, y: Tensor | None, kind: int, params: tuple[float, float]
            ) -> tuple[float, float, float, float, float]:  # fmt: skip
    """(Σx, Σx², Σy, Σy², Σδ'²) in one pass of the C code over the tensors the caller
    checked with :func:`_c_readable` (None: absent, its sums 0; equal sizes)."""
    n = (x if x is not None else y).numel()
    return _c_power_sums(0 if x is None else x.data_ptr(), 0 if y is None else y.data_ptr(),
                         n, kind, *params)[:5]


def _out_dsq_sum(xf: Tensor, yf: Tensor, act: Activation, prime: _OutProducer,
                 buf: Tensor | None) -> Tensor:  # fmt: skip
    """Σδ'² of a plain layer from flat float32 input and output (δ' written into ``buf``)."""
    b = None if buf is None else buf[: yf.numel()]
    if prime is _relu_out:  # y ≥ 0: Σ sign(y) counts y > 0 exactly
        return torch.sign(yf, out=b).sum()
    if prime is _lrelu_out:  # exact counts of sign(y) = sign(x)
        return _dsq_sum(yf, act, _lrelu_prime, buf)
    return _sq_sum(prime(xf, yf, act, b))


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
        self.channel_dim = getattr(module, "channel_dim", None) if self.kind == "normalized" \
            else None
        # call index within one forward pass (a module reused at several depths) -> records
        self.pending: dict[int, list[_Record]] = {}
        self.prime = _shortcut_for(act)
        # a plain layer's δ' from its output where cheaper (tanh: 1 − y², ReLU: y > 0, …);
        # an in-place layer has only its output after the forward
        self.out_prime = (
            _out_shortcut_for(act, have_x=not self.inplace) if self.kind == "plain" else None
        )
        # the C sums' δ' for this layer: from the output where the checked shortcut takes
        # it from there, else from the input (ReLU, LeakyReLU), else none (δ' by torch)
        self.c_kind = (
            _C_OUT_KINDS[self.out_prime] if self.out_prime is not None
            else _C_IN_KINDS.get(self.prime, DSQ_NONE)
        )
        self.c_params = _c_params(act)
        # the hook's direct path: one C call, scale a constant (plain: 1, GPN: a)
        self.c_direct = (
            _c_power_sums is not None and self.kind != "normalized" and self.c_kind != DSQ_NONE
        )
        self.calls = 0
        self._pre_sums: list[Tensor] | list[float] | None = None
        # the batch moments a normalized layer computed in the forward pass in flight
        self.moments: AF.BatchMoments | None = None

    def site(self, call: int) -> str:
        """The name of the layer's ``call``-th use in a forward pass: ``name``, ``name#1``, …"""
        return self.name if call == 0 else f"{self.name}#{call}"

    def scale(
        self, x: Tensor | None, mask: Tensor | None, moments: AF.BatchMoments | None = None
    ) -> Tensor | float | None:
        """The factor c of the layer's function c·(δ(x) − shift): shape () or (C,),
        a float for GPN, None for a plain activation (c = 1)."""
        m = self.module
        if self.kind == "gpn":
            return float(m.a)
        if self.kind != "normalized":
            return None
        if m.track_running_stats:
            c = m.scale()  # in training, the running values this forward just used
        else:
            rho, rho_prime, _, _ = self._batch_stats(x, mask, moments)
            c = AF.lambda_factor(rho, rho_prime, m.eps) + m.beta * torch.tanh(m.alpha)
        return c.detach().float()

    def _batch_stats(
        self, x: Tensor | None, mask: Tensor | None, moments: AF.BatchMoments | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ρ_M, ρ'_M, μ_M as an untracked forward uses them (unusable batch: 1, 1, 0)."""
        m = self.module
        if moments is None:
            moments = AF.batch_moments(x, m.activation, channel_dim=m.channel_dim, mask=mask)
        return AF._normalization_stats(moments, None, None, None, None, training=True,
                                       momentum=None, bounds=None)  # the batch's own

    def from_moments(self, moments: AF.BatchMoments) -> _Record:
        """The record of a forward pass from the moments the layer computed itself
        (no pass over the data): its count, mean and variance of x and δ(x), E[δ'²],
        with the scale c and shift of y = c·(δ − shift); () or (C,) each."""
        m = self.module
        if m.track_running_stats:
            # c = λ(running ρ, ρ') + β·tanh α and the shift (running μ) are finished on the
            # host at step(); here one copy of the values this forward used (the next
            # forward and optimizer.step() change them in place)
            parts = [*moments, m.running_rho, m.running_rho_prime, m.alpha]
            if m.center:
                parts.append(m.running_mean)
            dtype = moments.mean_x.dtype
            if any(t.dtype is not dtype for t in parts[6:]):
                parts = [t.to(dtype) for t in parts]
            vec = torch.stack(parts)
            return _Record("running", vec.reshape(-1), float(moments.count.numel()),
                           (m.eps, m.beta, bool(m.center)))  # fmt: skip
        c = self.scale(None, None, moments)
        if not m.center:
            shift = torch.zeros_like(moments.mean_y)
        elif m.track_running_stats:
            shift = m.running_mean  # the value this forward just used (eq. 16)
        else:
            shift = self._batch_stats(None, None, moments)[2]
        dtype = moments.mean_x.dtype
        vec = torch.stack([t.detach().to(dtype) for t in (*moments, c, shift)])
        return _Record("moments", vec.reshape(-1), float(moments.count.numel()), None)

    def x_sums(self, xf: Tensor, buf: Tensor | None) -> list[Tensor] | list[float]:
        """[Σx, Σx²] and, unless the output gives it, Σδ'(x)² of a flat float32 x
        (floats from the C sums where they can read x, else tensors on x's device)."""
        if _c_power_sums is not None and _c_readable(xf):
            kind = self.c_kind if self.out_prime is None else DSQ_NONE
            sx, sxx, _, _, sg = _c_sums(xf, None, kind, self.c_params)
            if self.out_prime is not None:
                return [sx, sxx]
            return [sx, sxx, sg if kind != DSQ_NONE else self._torch_dsq(xf, buf)]
        return self._torch_x_sums(xf, buf)

    def _torch_x_sums(self, xf: Tensor, buf: Tensor | None) -> list[Tensor]:
        out = [xf.sum(), _sq_sum(xf)]
        if self.out_prime is None:
            out.append(_dsq_sum(xf, self.act, self.prime, buf))
        return out

    def y_sums(self, xf: Tensor, yf: Tensor, buf: Tensor | None) -> list[Tensor]:
        """[Σy, Σy²] and, where the output gives it, Σδ'² of a flat float32 output
        (``xf``: the input, overwritten by an in-place layer)."""
        out = [yf.sum(), _sq_sum(yf)]
        if self.out_prime is not None:
            out.append(_out_dsq_sum(xf, yf, self.act, self.out_prime, buf))
        return out

    def _torch_dsq(self, xf: Tensor, buf: Tensor | None) -> float:
        """Σδ'(x)² of a CPU x by torch's δ' (no C twin), summed by the C code."""
        b = None if buf is None else buf[: xf.numel()]
        g = self.prime(xf, self.act, b) if self.prime is not None else self.act.derivative(xf)
        g = g.float().contiguous()
        return _c_sums(g, None, DSQ_NONE, self.c_params)[1]

    def _c_record_sums(
        self, xf: Tensor, yf: Tensor, pre: list[float] | None, buf: Tensor | None
    ) -> list[float]:
        """[Σx, Σx², Σy, Σy², Σδ'²] of C-readable flat x and y of one size: one pass over
        both, or over y alone after an in-place layer's :meth:`x_sums` (``pre``)."""
        if pre is not None:  # x is gone: its sums (and δ' from x) were taken before
            kind = self.c_kind if self.out_prime is not None else DSQ_NONE
            _, _, sy, syy, sg = _c_sums(None, yf, kind, self.c_params)
            return [pre[0], pre[1], sy, syy, sg if self.out_prime is not None else pre[2]]
        sx, sxx, sy, syy, sg = _c_sums(xf, yf, self.c_kind, self.c_params)
        if self.c_kind == DSQ_NONE:
            sg = self._torch_dsq(xf, buf)
        return [sx, sxx, sy, syy, sg]

    def sums(
        self,
        x: Tensor,
        y: Tensor | None,
        mask: Tensor | None,
        max_rows: int | None = None,
        scratch: Callable[[Tensor], Tensor | None] = lambda x: None,
        pre: list[Tensor] | list[float] | None = None,
    ) -> _Record:
        """The power sums of one forward pass (see :class:`_Record`), still on the device
        (or floats already, from the C sums on CPU).

        ``y`` is the layer's output. ``max_rows``: use only the first rows of
        dimension 0. ``scratch(x)``: a reused buffer of at least x's size, or None.
        ``pre``: :meth:`x_sums` taken before an in-place forward overwrote x.
        """
        x = x.detach().float()
        c = self.scale(x, mask)  # from the whole batch, as the forward pass did
        if max_rows is not None and x.dim() and x.shape[0] > max_rows:
            x = x[:max_rows]
            y = y[:max_rows]
            if mask is not None and mask.dim() == x.dim() and mask.shape[0] > 1:
                mask = mask[:max_rows]
        y = y.detach().float()
        if mask is None and (not isinstance(c, Tensor) or c.dim() == 0):
            buf = scratch(x)
            xf, yf = x.reshape(-1), y.reshape(-1)
            if (
                _c_power_sums is not None and _c_readable(x) and _c_readable(y)
                and xf.numel() == yf.numel()
                and (pre is None or not isinstance(pre[0], Tensor))
            ):  # fmt: skip
                vals = self._c_record_sums(xf, yf, pre, buf)
                return _Record("floats", vals, float(xf.numel()), c)
            if pre is not None and not isinstance(pre[0], Tensor):  # x was C-readable, y not
                pre = [torch.tensor(v, device=x.device) for v in pre]
            xs = pre if pre is not None else self._torch_x_sums(xf, buf)
            ys = self.y_sums(xf, yf, buf)
            vec = torch.stack([xs[0], xs[1], ys[0], ys[1], xs[2] if len(xs) > 2 else ys[2]])
            return _Record("sums", vec, float(x.numel()), c)
        return _Record("full", self._masked_or_channel_sums(x, y, c, mask), 0.0, None)

    def _masked_or_channel_sums(
        self, x: Tensor, y: Tensor, c: Tensor | float | None, mask: Tensor | None
    ) -> Tensor:
        """All of :data:`_FULL` (float64) for a mask and/or a per-channel scale c (C,)."""
        dims = list(range(x.dim()))
        if isinstance(c, float):
            c = torch.tensor(c, device=x.device)
        if c is not None and c.dim() > 0:
            cd = self.channel_dim % x.dim()
            dims.remove(cd)
            shape = [1] * x.dim()
            shape[cd] = c.numel()
            c = c.reshape(shape)
        acc = torch.float64 if x.device.type != "mps" else torch.float32
        g = self.act.derivative(x)
        d = self.act.fn(x)
        if mask is not None:
            m = mask.to(x.device).expand_as(x)
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            # masked-out elements may hold anything, NaN included
            x, y, g, d = (torch.where(m, t, zero) for t in (x, y, g, d))
            n = m.sum(dtype=acc)
        else:
            n = torch.tensor(float(x.numel()), dtype=acc, device=x.device)
        gsq = g * g
        sg = gsq.sum(dtype=acc)
        if c is None:
            scg = sg
        elif c.dim() == 0:
            scg = c.to(acc) ** 2 * sg
        else:
            scg = ((c * c).to(acc) * gsq.sum(dim=dims, keepdim=True, dtype=acc)).sum()
        sd, sdd = d.sum(dtype=acc), (d * d).sum(dtype=acc)
        vd_n = sdd - sd * sd / n.clamp_min(1)  # n·Var[δ] of this pass
        sums = [n, x.sum(dtype=acc), (x * x).sum(dtype=acc), y.sum(dtype=acc),
                (y * y).sum(dtype=acc), sg, scg, vd_n]
        return torch.stack([t.to(acc) for t in sums])


# pooled power sums of one layer in one step: count; Σx, Σx²; Σy, Σy² (output); Σδ'²;
# Σ(c·δ')²; Σ_passes n·Var[δ] (the bare δ's variance, within each forward pass)
_FULL = ("n", "x", "xx", "y", "yy", "g", "cg", "vd")

# a "moments" record: the layer's BatchMoments, then its scale c and shift, (C,) each
_MOMENTS = ("count", "mean_x", "var_x", "mean_d", "var_d", "mean_dsq", "c", "shift")


class _Record:
    """One forward pass of one layer, its values still on the device (or already floats).

    ``kind`` "sums": ``vec`` = [Σx, Σx², Σy, Σy², Σδ'²] of ``n`` elements, the scale
    ``c`` (() tensor, float or None) applied after the sync; "floats": the same as a
    list of Python floats (the C sums of a CPU layer); "running": the layer's
    BatchMoments, then its running ρ, ρ', its α (and running μ), (C,) each, ``c`` =
    (eps, β, center) of a normalized layer with running statistics; "moments": ``vec`` =
    :data:`_MOMENTS` for ``n`` channels (the layer's own statistics); "full": ``vec``
    = :data:`_FULL`.
    """

    __slots__ = ("kind", "vec", "n", "c")

    def __init__(
        self, kind: str, vec: Tensor | list[float], n: float,
        c: Tensor | float | tuple[float | None, float, bool] | None,
    ) -> None:
        self.kind, self.vec, self.n, self.c = kind, vec, n, c


def _from_moments(v: list[float], width: int) -> dict[str, float]:
    """:data:`_FULL` of one pass from its moments ``v`` (:data:`_MOMENTS` × ``width``
    channels, row-major), in float64."""
    total: Callable[[Any], float]
    if width == 1:  # per tensor: plain floats (most layers; numpy's overhead dominates)
        count, mx, vx, md, vd, dsq, c, shift = v
        if count <= 0:
            return dict.fromkeys(_FULL, 0.0)

        def total(t: float) -> float:
            return count * t

        n, mean_d = count, md
    else:
        count, mx, vx, md, vd, dsq, c, shift = np.asarray(v, dtype=np.float64).reshape(8, width)
        real = count > 0  # an all-masked channel has NaN moments and no elements

        def total(t: np.ndarray) -> float:
            return float(np.sum(np.where(real, count * t, 0.0)))

        n = float(np.sum(count))
        mean_d = total(md) / n if n > 0 else 0.0
    my = c * (md - shift)  # mean of y = c·(δ − shift), per channel
    return {
        "n": n, "x": total(mx), "xx": total(vx + mx * mx), "y": total(my),
        "yy": total(c * c * vd + my * my), "g": total(dsq), "cg": total(c * c * dsq),
        "vd": total(vd + (md - mean_d) ** 2),  # n·Var[δ] of the pass, pooled over channels
    }  # fmt: skip


def _running_scale(rho: Any, rho_prime: Any, alpha: Any, eps: float | None, beta: float) -> Any:
    """c = λ(ρ, ρ') + β·tanh α (eq. 13, 15) in float64 from the running ρ, ρ' and α, as
    the layer's ``scale()`` computes it (ρ, ρ' floored at ``eps``): floats or arrays."""
    if isinstance(rho, float):
        return AF.lambda_factor(rho, rho_prime, eps) + beta * math.tanh(alpha)
    lam = AF.lambda_factor(torch.from_numpy(rho), torch.from_numpy(rho_prime), eps).numpy()
    return lam + beta * np.tanh(alpha)


def _from_running(v: list[float], width: int, eps: float | None, beta: float, center: bool
                  ) -> dict[str, float]:  # fmt: skip
    """:data:`_FULL` of one pass of a normalized layer with running statistics from its
    moments and the running ρ, ρ', α (and μ if ``center``) its forward used."""
    if width == 1:
        c = _running_scale(*v[6:9], eps, beta)
        return _from_moments([*v[:6], c, v[9] if center else 0.0], 1)
    a = np.asarray(v, dtype=np.float64).reshape(10 if center else 9, width)
    c = _running_scale(a[6], a[7], a[8], eps, beta)
    shift = a[9] if center else np.zeros(width)
    return _from_moments(np.concatenate([a[:6].reshape(-1), c, shift]).tolist(), width)


def _pool(records: list[_Record], values: Iterator[float]) -> dict[str, float]:
    """Pooled :data:`_FULL` of a step's forward passes; ``values`` yields, per record,
    its ``vec`` then its ``c`` (if a tensor), as floats."""
    total = dict.fromkeys(_FULL, 0.0)
    for r in records:
        v = r.vec if r.kind == "floats" else [next(values) for _ in range(r.vec.numel())]
        if r.kind == "full":
            s = dict(zip(_FULL, v, strict=True))
        elif r.kind == "moments":
            s = _from_moments(v, int(r.n))
        elif r.kind == "running":
            s = _from_running(v, int(r.n), *r.c)
        else:
            c = next(values) if isinstance(r.c, Tensor) else r.c  # "sums", "floats"
            c2 = 1.0 if c is None else c * c
            n, (x, xx, y, yy, g) = r.n, v
            if x != x or y != y:  # a NaN in x or y: the step's ρ' is NaN as well
                g = math.nan
            # y = c·(δ − shift) with one c: n·Var[δ] = n·Var[y]/c². An empty pass adds
            # nothing (a step of empty passes only gives NaN statistics, as in _stats);
            # with c = 0 the output tells nothing of δ (NaN)
            if n <= 0:
                vd = 0.0
            elif c2 == 0:
                vd = math.nan
            else:
                vd = max(yy - y * y / n, 0.0) / c2
            s = {"n": n, "x": x, "xx": xx, "y": y, "yy": yy, "g": g, "cg": c2 * g, "vd": vd}
        for k in _FULL:
            total[k] += s[k]
    return total


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
        max_rows: if set, each layer's statistics use only the first ``max_rows``
            entries along dimension 0 of its input: a random sub-batch when batches
            are shuffled and dimension 0 is the batch (not for sequence-first
            layouts). Trades exactness for speed on large activations; the default
            ``None`` uses every element. Normalized layers that report their own
            (whole-batch) moments cost nothing and ignore it.

    Hooks run under ``torch.no_grad`` on the detached layer input, in float32.
    The elements of several forward passes within one step (gradient
    accumulation) are pooled, as if they were one batch. A module used several
    times in one forward pass (one ``nn.ReLU`` shared by all layers) counts as
    one layer per use, named ``name``, ``name#1``, ``name#2``, … (calls are
    counted from the start of each forward of ``model``).
    Values stay on the model's device until :meth:`step`, which synchronises once.

    Attributes:
        layers: ``{module name: Activation}`` of the monitored modules.
        history: one dict per closed step: ``score``, ``weight_mean_abs_sum`` and
            ``layers`` (``{name: {stat: value}}`` with the keys of
            :data:`LAYER_STATS` plus ``lam``).
    """

    def __init__(
        self, model: nn.Module, *, training_only: bool = True, max_rows: int | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ConvergenceMonitor needs an nn.Module, got {type(model).__name__}")
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        self.model = model
        self.training_only = training_only
        self.max_rows = max_rows
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
            if hasattr(module, "register_moments_hook"):
                self._handles.append(module.register_moments_hook(self._moments_hook(layer)))
        if self._layers:
            self._handles.append(model.register_forward_pre_hook(self._new_forward))
        self.history: list[dict[str, Any]] = []
        self._sites: dict[str, Activation] = {}
        self._weight_layers = _weight_layers(model)  # Figure 4's layers, found once
        self._buf: Tensor | None = None

    def _scratch(self, x: Tensor) -> Tensor | None:
        """A reused float32 buffer of at least x's size on CPU, where fresh pages cost
        more than the arithmetic (None elsewhere: the allocator caches; and for
        activations over :data:`_SCRATCH_MAX` elements, not to hold that much memory)."""
        if x.device.type != "cpu" or x.numel() > _SCRATCH_MAX:
            return None
        if self._buf is None or self._buf.numel() < x.numel():
            self._buf = torch.empty(x.numel(), dtype=torch.float32, device="cpu")
        return self._buf

    def _new_forward(self, module: nn.Module, args: tuple) -> None:
        for layer in self._layers:
            layer.calls = 0

    # ------------------------------------------------------------------ hooks

    def _active(self, module: nn.Module) -> bool:
        return module.training or not self.training_only

    def _pre_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._active(module) or not args:
                return
            with torch.no_grad():
                x = args[0].detach().float()
                if self.max_rows is not None and x.dim() and x.shape[0] > self.max_rows:
                    x = x[: self.max_rows]
                layer._pre_sums = layer.x_sums(x.reshape(-1), self._scratch(x))

        return hook

    def _moments_hook(self, layer: _Layer):
        def hook(module: nn.Module, moments: Any) -> None:
            if self._active(module):
                layer.moments = moments

        return hook

    def _post_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            moments, layer.moments = layer.moments, None
            pre, layer._pre_sums = layer._pre_sums, None
            if not self._active(module) or not args or not isinstance(output, Tensor):
                return
            if layer.inplace and pre is None:
                return
            x = args[0]
            if (
                layer.c_direct and pre is None and self.max_rows is None
                and _c_readable(x) and _c_readable(output) and x.numel() == output.numel()
            ):  # fmt: skip
                # plain/GPN layer on CPU with a C δ': one C pass, no tensor op
                sums = _Record("floats", list(_c_sums(x, output, layer.c_kind, layer.c_params)),
                               float(x.numel()), layer.scale(None, None))
                layer.pending.setdefault(layer.calls, []).append(sums)
                layer.calls += 1
                return
            with torch.no_grad():
                if moments is not None:  # the layer's own statistics of this very batch
                    sums = layer.from_moments(moments)
                else:
                    sums = layer.sums(
                        args[0], output, _mask_of(layer, args, kwargs), self.max_rows,
                        self._scratch, pre,
                    )
            layer.pending.setdefault(layer.calls, []).append(sums)
            layer.calls += 1

        return hook

    # ------------------------------------------------------------------ API

    @property
    def layers(self) -> dict[str, Activation]:
        """``{layer name: Activation}`` of the monitored layers, in model order."""
        return {layer.name: layer.act for layer in self._layers}

    def step(self) -> dict[str, Any]:
        """Close a training step (call after ``optimizer.step()``); returns its record.

        A forward pass without elements (an empty batch; a normalized layer's all-masked
        batch) gives NaN statistics for its layer when the step has no other pass of it,
        and a NaN Score, for every kind of layer.

        Raises:
            RuntimeError: no monitored layer ran a (training) forward pass since
                the last step, e.g. ``step()`` called twice, or the model in eval mode;
                or computing the step's statistics failed (the cause chained). Either
                way the step's forward passes are discarded, so the next step starts
                afresh.
        """
        fired = [layer for layer in self._layers if layer.pending]
        if self._layers and not fired:
            raise RuntimeError(
                "step() called but no monitored activation layer ran a training forward "
                "pass since the last step; call step() once per training step, after "
                "optimizer.step(), with the model in train() mode"
            )
        try:
            return self._close_step(fired)
        except Exception as exc:
            raise RuntimeError(
                f"ConvergenceMonitor.step() could not compute this step's statistics "
                f"({type(exc).__name__}: {exc}); the step's forward passes were discarded "
                "and the next step starts afresh"
            ) from exc
        finally:  # one bad step must not leave its records to the next
            for layer in fired:
                layer.pending.clear()
                layer.calls = 0

    def _close_step(self, fired: list[_Layer]) -> dict[str, Any]:
        """The record of the step whose forward passes ``fired`` hold (see :meth:`step`)."""
        sites = [(layer, call) for layer in fired for call in sorted(layer.pending)]
        tensors = []
        for layer, call in sites:
            for r in layer.pending[call]:
                if r.kind != "floats":
                    tensors.append(r.vec)
                if r.kind != "running" and isinstance(r.c, Tensor):
                    tensors.append(r.c.reshape(1))
        weights = _weights(self.model, self._weight_layers)
        # Σ W_i, divided by the count on the host: by the C sums where they can read W_i
        # (None here), else float32 sums on W_i's device, synchronised with the rest
        w_sums: list[float | None] = [
            _c_sums(w, None, DSQ_NONE, (0.0, 0.0))[0]
            if _c_power_sums is not None and _c_readable(w) else None
            for w in weights
        ]  # fmt: skip
        w_dev = [w for w, v in zip(weights, w_sums, strict=True) if v is None]
        if w_dev:
            with torch.no_grad():
                dev = w_dev[0].device
                tensors.append(torch.stack([
                    (w.sum() if w.dtype == torch.float32 else w.sum(dtype=torch.float32)).to(dev)
                    for w in w_dev
                ]))  # fmt: skip
        if len({t.device for t in tensors}) > 1:
            tensors = [t.cpu() for t in tensors]
        if len({t.dtype for t in tensors}) > 1:
            tensors = [t.double() for t in tensors]
        # the one synchronisation per step (float32 sums become Python float64 here)
        values = iter(torch.cat(tensors).tolist() if tensors else [])
        layers: dict[str, dict[str, float]] = {}
        score = 0.0
        for layer, call in sites:
            vals = _stats(_pool(layer.pending[call], values))
            name = layer.site(call)
            self._sites.setdefault(name, layer.act)
            layers[name] = vals
            score += (abs(_log(vals["rho"])) + abs(_log(vals["rho_prime"]))) / 2  # eq. 22
        _add_lambda(layers.values())
        wsum_value = sum(  # Σ_i |E[W_i]| (Figure 4); NaN for an empty W_i, as its mean
            abs(_mean(next(values) if v is None else v, w.numel()))
            for w, v in zip(weights, w_sums, strict=True)
        )
        record = {"score": score, "weight_mean_abs_sum": wsum_value, "layers": layers}
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
        for name, act in {**self.layers, **self._sites}.items():
            rows = [r["layers"][name] for r in h if name in r["layers"]]
            stats: dict[str, Any] = {"activation": act.name}
            for key in (*LAYER_STATS, "lam"):
                stats[key] = float(np.mean([r[key] for r in rows])) if rows else math.nan
            layers[name] = stats
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
            layer.calls = 0
            layer._pre_sums = None
            layer.moments = None

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


def _stats(s: dict[str, float]) -> dict[str, float]:
    """:data:`LAYER_STATS` from pooled power sums, in float64 (λ: :func:`_add_lambda`)."""
    n = s["n"]
    if n <= 0:
        return dict.fromkeys(LAYER_STATS, math.nan)
    mx, my = s["x"] / n, s["y"] / n
    var_x = max(s["xx"] / n - mx * mx, 0.0)
    var_y = max(s["yy"] / n - my * my, 0.0)
    out = {
        "rho": _ratio(var_y, var_x),  # eq. 5, 31 of the whole layer
        "rho_prime": s["cg"] / n,  # eq. 6 of the whole layer
        "delta_rho": _ratio(s["vd"] / n, var_x),
        "delta_rho_prime": s["g"] / n,
        "in_mean": mx,
        "in_var": var_x,
        "out_mean": my,
        "out_var": var_y,
    }
    return out


def _add_lambda(layers: Iterable[dict[str, float]]) -> None:
    """Add λ of the bare δ (eq. 13) to each layer's statistics, all layers in one call:
    +inf where ρ or ρ' is 0 (a dead layer), NaN where either is NaN."""
    layers = list(layers)
    if not layers:
        return
    lam = lambda_factor([s["delta_rho"] for s in layers], [s["delta_rho_prime"] for s in layers])
    for s, value in zip(layers, lam.tolist(), strict=True):
        s["lam"] = value


def _mean(total: float, count: int) -> float:
    """total / count, NaN for count 0 (the mean of no elements)."""
    return total / count if count > 0 else math.nan


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.nan
