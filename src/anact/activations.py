"""Registry of elementwise activation functions, each with its exact derivative.

This is the one place where an activation's formula is written. Everything else
(normalized activations, GPN, the Gaussian analysis) looks functions up here::

    act = anact.get_activation("lrelu", negative_slope=0.2)
    y, dy = act(x), act.derivative(x)

A user registers their own function with :func:`register_activation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Activation",
    "register_activation",
    "get_activation",
    "list_activations",
    "resolve_activation",
]


@dataclass(frozen=True)
class Activation:
    """An elementwise function δ with its exact derivative δ'.

    Args:
        name: registry name, e.g. ``"swish"``.
        fn: ``δ(x)``, any tensor shape to the same shape.
        derivative: ``δ'(x)``, same shapes. Where δ has a kink, any one-sided
            value is fine (it is a set of measure zero).
        kinks: the points where δ' jumps or is not smooth; the exact Gaussian
            expectations (:mod:`anact.gaussian`) split their integrals there.
        params: the keyword parameters the function was built with (for ``repr``).
        module: optional factory of the plain ``torch.nn`` module computing δ,
            used by model conversion to recognise call sites.
        sign_derivative: optional ``(p, q)``: δ'(x) = p where δ(x) > 0 and q where
            δ(x) ≤ 0 (ReLU: (1, 0); LeakyReLU(a ≥ 0): (1, a)). Declares that δ' is
            a function of δ's sign, so the normalized activation may save its
            output instead of x for backward (``save="auto"``). Only valid when
            δ' is the constant p wherever δ(x) > 0 and q wherever δ(x) ≤ 0; leave
            it None (the default) otherwise, and x is saved.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    kinks: tuple[float, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    module: Callable[[], torch.nn.Module] | None = None
    sign_derivative: tuple[float, float] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def __reduce__(self):
        # pickled by registry name and parameters, so modules holding one can be saved
        # with torch.save(model); an unregistered Activation pickles only if its functions do
        key = _ALIASES.get(self.name.lower(), self.name.lower())
        if key in _REGISTRY:
            return (_rebuild, (self.name, dict(self.params)))
        return super().__reduce__()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Activation({self.name}{', ' + args if args else ''})"


# name -> factory(**params) -> Activation
_REGISTRY: dict[str, Callable[..., Activation]] = {}
_ALIASES: dict[str, str] = {}


def register_activation(
    name: str,
    factory: Callable[..., Activation] | None = None,
    *,
    aliases: tuple[str, ...] = (),
    overwrite: bool = False,
):
    """Register ``factory(**params) -> Activation`` under ``name``.

    Usable directly or as a decorator::

        @anact.register_activation("cube_root")
        def _cube_root() -> anact.Activation:
            return anact.Activation("cube_root", fn=..., derivative=...)

    An :class:`Activation` instance may be passed instead of a factory.
    """

    def _register(f: Callable[..., Activation] | Activation):
        key = name.lower()
        names = (key, *(a.lower() for a in aliases))
        if not overwrite:
            taken = [n for n in names if n in _REGISTRY or n in _ALIASES]
            if taken:
                raise ValueError(
                    f"activation name(s) {taken} already registered; "
                    "pass overwrite=True to replace them"
                )
        if isinstance(f, Activation):
            act = f
            f = lambda: act  # noqa: E731
        _REGISTRY[key] = f
        for a in aliases:
            _ALIASES[a.lower()] = key
        return f

    if factory is None:
        return _register
    return _register(factory)


def _rebuild(name: str, params: dict[str, Any]) -> Activation:
    return get_activation(name, **params)


def list_activations() -> list[str]:
    """The registered names (aliases not included), sorted."""
    return sorted(_REGISTRY)


def get_activation(name: str, **params: Any) -> Activation:
    """Build the registered activation ``name`` (case-insensitive) with ``params``."""
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise KeyError(
            f"unknown activation {name!r}; registered: {', '.join(list_activations())}. "
            "Register your own with anact.register_activation()"
        )
    try:
        return _REGISTRY[key](**params)
    except TypeError as e:
        raise TypeError(f"bad parameters {params} for activation {name!r}: {e}") from None


def resolve_activation(activation: str | Activation, **params: Any) -> Activation:
    """An :class:`Activation` from a registered name or an instance."""
    if isinstance(activation, Activation):
        if params:
            raise TypeError(
                f"parameters {sorted(params)} given with an Activation instance; "
                "pass a registered name to build it with parameters"
            )
        return activation
    return get_activation(activation, **params)


# ---------------------------------------------------------------------------
# The built-in functions (paper appendix A.1, eq. 23-30, plus common ones).
# ---------------------------------------------------------------------------


def _ones_like(x: Tensor) -> Tensor:
    return torch.ones_like(x)


def _transforms_active() -> bool:
    """Whether a functorch transform (vmap, grad, …) is running."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


def _forward_ad_active() -> bool:
    """Whether forward-mode AD may be running (a ``forward_ad.dual_level`` is open, as
    ``torch.func.jvp``/``jacfwd`` open one): tangents need the ops' ``jvp`` rules."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _inplace_ok(x: Tensor) -> bool:
    """Intermediates may be overwritten: no graph through the derivative is being built,
    and no vmap (whose in-place ops fall back to one call per batch entry)."""
    return not (torch.is_grad_enabled() and x.requires_grad) and not _transforms_active()


@register_activation("identity", aliases=("linear",))
def _identity() -> Activation:
    return Activation("identity", fn=lambda x: x, derivative=_ones_like, module=torch.nn.Identity)


def _relu_derivative(x: Tensor) -> Tensor:
    # sign(x) clamped at 0 is 1[x > 0] (NaN stays NaN), several times faster than a bool cast
    return torch.sign(x).clamp_(min=0) if _inplace_ok(x) else (x > 0).to(x.dtype)


def _finite(name: str, value: float) -> float:
    """An activation parameter as a finite float, or an error that names it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


@register_activation("relu")
def _relu() -> Activation:
    # eq. 24; δ' = 1[x > 0]
    return Activation(
        "relu",
        fn=torch.relu,
        derivative=_relu_derivative,
        kinks=(0.0,),
        module=torch.nn.ReLU,
        sign_derivative=(1.0, 0.0),
    )


def _lrelu_derivative(x: Tensor, slope: float) -> Tensor:
    if _inplace_ok(x):  # slope + (1 − slope)·1[x > 0]
        return torch.sign(x).clamp_(min=0).mul_(1 - slope).add_(slope)
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))


@register_activation("lrelu", aliases=("leaky_relu", "leakyrelu"))
def _lrelu(negative_slope: float = 0.01) -> Activation:
    # eq. 26
    s = _finite("negative_slope", negative_slope)
    return Activation(
        "lrelu",
        fn=lambda x: F.leaky_relu(x, s),
        derivative=lambda x: _lrelu_derivative(x, s),
        kinks=(0.0,),
        params={"negative_slope": s},
        module=lambda: torch.nn.LeakyReLU(s),
        # a negative slope makes δ(x) > 0 for x < 0 too: δ' is then not a function of δ's sign
        sign_derivative=(1.0, s) if s >= 0 else None,
    )


@register_activation("tanh")
def _tanh() -> Activation:
    # eq. 23
    def d(x: Tensor) -> Tensor:
        t = torch.tanh(x)
        if _inplace_ok(x):
            return t.square_().neg_().add_(1)
        return 1 - t * t

    return Activation("tanh", fn=torch.tanh, derivative=d, module=torch.nn.Tanh)


@register_activation("sigmoid")
def _sigmoid() -> Activation:
    def d(x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        if _inplace_ok(x):
            return (1 - s).mul_(s)
        return s * (1 - s)

    return Activation("sigmoid", fn=torch.sigmoid, derivative=d, module=torch.nn.Sigmoid)


@register_activation("swish", aliases=("silu",))
def _swish() -> Activation:
    # eq. 30 and the derivative of eq. 40/42: s + x·s·(1 − s)
    def d(x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        if _inplace_ok(x):
            return (1 - s).mul_(x).add_(1).mul_(s)
        return s * (1 + x * (1 - s))

    return Activation("swish", fn=F.silu, derivative=d, module=torch.nn.SiLU)


def _elu_derivative(x: Tensor, alpha: float) -> Tensor:
    return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x.clamp(max=0)))


@register_activation("elu")
def _elu(alpha: float = 1.0) -> Activation:
    # eq. 28
    a = _finite("alpha", alpha)
    return Activation(
        "elu",
        fn=lambda x: F.elu(x, a),
        derivative=lambda x: _elu_derivative(x, a),
        kinks=(0.0,),
        params={"alpha": a},
        module=lambda: torch.nn.ELU(a),
    )


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@register_activation("selu")
def _selu() -> Activation:
    # eq. 29
    a, s = _SELU_ALPHA, _SELU_SCALE
    return Activation(
        "selu",
        fn=F.selu,
        derivative=lambda x: s * _elu_derivative(x, a),
        kinks=(0.0,),
        module=torch.nn.SELU,
    )


@register_activation("gelu")
def _gelu() -> Activation:
    # exact GELU x·Φ(x); δ' = Φ(x) + x·φ(x)
    def d(x: Tensor) -> Tensor:
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return cdf + x * pdf

    return Activation("gelu", fn=F.gelu, derivative=d, module=torch.nn.GELU)


@register_activation("mish")
def _mish() -> Activation:
    # x·tanh(softplus(x)); δ' = tanh(sp) + x·sigmoid(x)·(1 − tanh²(sp))
    def d(x: Tensor) -> Tensor:
        t = torch.tanh(F.softplus(x))
        return t + x * torch.sigmoid(x) * (1 - t * t)

    return Activation("mish", fn=F.mish, derivative=d, module=torch.nn.Mish)


@register_activation("softplus")
def _softplus(beta: float = 1.0, threshold: float = 20.0) -> Activation:
    # torch's softplus is linear above `threshold`, so its derivative is exactly 1 there.
    b, th = _finite("beta", beta), _finite("threshold", threshold)
    if b <= 0:
        raise ValueError(f"softplus needs beta > 0 (log(1 + exp(βx))/β), got {b}")

    def d(x: Tensor) -> Tensor:
        return torch.where(x * b > th, torch.ones_like(x), torch.sigmoid(x * b))

    return Activation(
        "softplus",
        fn=lambda x: F.softplus(x, b, th),
        derivative=d,
        kinks=(th / b,),
        params={"beta": b, "threshold": th},
        module=lambda: torch.nn.Softplus(b, th),
    )


@register_activation("hardswish", aliases=("hard_swish", "hardsilu", "hard_silu"))
def _hardswish() -> Activation:
    # x·relu6(x + 3)/6; δ' = 0 (x < −3), (2x + 3)/6 (−3 ≤ x ≤ 3), 1 (x > 3)
    def d(x: Tensor) -> Tensor:
        mid = (2 * x + 3) / 6
        return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), mid))

    return Activation(
        "hardswish", fn=F.hardswish, derivative=d, kinks=(-3.0, 3.0), module=torch.nn.Hardswish
    )
