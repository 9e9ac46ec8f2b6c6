"""``nn.Module``s: normalized activations (ANAct), GPN baselines and LayerAct.

:class:`NormalizedActivation` is the same kind of object as ``nn.BatchNorm2d``:
running statistics live in buffers, ``train()``/``eval()`` switch between batch
and stored statistics, and the math lives in :mod:`anact.functional`.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from anact import functional as AF
from anact.activations import Activation, _transforms_active, resolve_activation
from anact.gaussian import gaussian_expectation

__all__ = [
    "NormalizedActivation",
    "NReLU",
    "NSwish",
    "NLReLU",
    "NTanh",
    "NELU",
    "NGELU",
    "NMish",
    "NSoftplus",
    "GPN",
    "gpn_constants",
    "LASiLU",
    "LAHardSiLU",
]


class NormalizedActivation(nn.Module):
    r"""The normalized activation function of ANAct (eq. 15):

    .. math:: \hat\delta(x) = (\lambda + \beta \tanh\alpha)\,(\delta(x) - \mu),
              \quad \lambda = \sqrt{(\rho + \rho') / (2\rho\rho')}

    with ρ = Var[δ(x)]/Var[x], ρ' = E[δ'(x)²] and μ = E[δ(x)] taken over the
    mini-batch in training and kept as running statistics (eq. 16–18).

    Args:
        activation: δ, a registered name (``"relu"``, ``"swish"``, …) or an
            :class:`anact.Activation`.
        num_features: the number of channels C; required with ``channel_dim``.
        momentum: weight of the new batch in the running statistics (as in
            ``nn.BatchNorm``); ``None`` for a cumulative average. Default 0.1.
        bounds: ``(L, U)`` of eq. 17–18: a batch's ρ_M (ρ'_M) enters the running
            value only when L·ρ < ρ_M < U·ρ. Default ``(0.2, 5.0)``: a batch more
            than 5× off the running value is an outlier. ``None`` disables the
            filter. With narrow bounds a genuine, sudden shift of ρ would be
            rejected for good, hence the wide default.
        beta: bound of the learnable adjustment β·tanh(α) (paper: 0.3).
        center: subtract μ (the paper disables it for LeNet5).
        channel_dim: ``None`` (default, as in the paper) for one ρ, ρ', μ, α
            per tensor; e.g. ``1`` for one per channel of an (N, C, ...) input.
        eps: floor of ρ and ρ' inside λ.
        track_running_stats: keep running statistics (default). Without them
            the batch statistics are used in training and eval alike.
        activation_params: parameters of a registered activation, e.g.
            ``{"negative_slope": 0.1}`` for ``"lrelu"``.
        save: the full-size tensor kept for backward: ``"auto"`` (default: what
            the plain torch module keeps — the output for ReLU, which the next layer
            shares, x otherwise, e.g. for LeakyReLU, whose output user code may change
            in place), ``"input"`` (always x) or ``"output"`` (ReLU, and LeakyReLU
            with slope ≥ 0, which then keeps less than nn.LeakyReLU; an error for
            other activations). Same gradients either way; see docs/core.md,
            "Gradients and memory".

    Shape:
        input (any shape; ``channel_dim`` must hold C channels), optional bool
        ``mask`` broadcastable to it; output has the input's shape and dtype.

    Guards: a batch that cannot define the statistics (fewer than 2 real
    elements, constant input, all-False mask, a dead activation with ρ_M = 0,
    NaN/Inf) leaves the running statistics unchanged and is counted in
    ``num_batches_skipped``; on CPU a :class:`anact.functional.StatisticsWarning`
    is issued (once per process, by Python's warning filter). On accelerators
    no check is made on the host, to avoid a synchronisation per call.
    """

    def __init__(
        self,
        activation: str | Activation,
        num_features: int | None = None,
        *,
        momentum: float | None = 0.1,
        bounds: tuple[float, float] | None = (0.2, 5.0),
        beta: float = 0.3,
        center: bool = True,
        channel_dim: int | None = None,
        eps: float = 1e-5,
        track_running_stats: bool = True,
        activation_params: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        save: str = "auto",
    ) -> None:
        super().__init__()
        self.activation = resolve_activation(activation, **(activation_params or {}))
        AF._saves_output(self.activation, save)  # raises on a bad value
        self.save = save
        momentum, bounds, beta, eps = AF._check_options(momentum, bounds, beta, eps)
        for name, flag in (("center", center), ("track_running_stats", track_running_stats)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if channel_dim is not None and (isinstance(channel_dim, bool)
                                        or not isinstance(channel_dim, int)):  # fmt: skip
            raise TypeError(f"channel_dim must be an int or None, got {channel_dim!r}")
        if num_features is not None and (isinstance(num_features, bool)
                                         or not isinstance(num_features, int)):  # fmt: skip
            raise TypeError(f"num_features must be an int or None, got {num_features!r}")
        if (channel_dim is None) != (num_features is None):
            raise ValueError(
                "per-channel statistics need both channel_dim and num_features "
                f"(got channel_dim={channel_dim}, num_features={num_features}); "
                "omit both for the paper's per-tensor statistics"
            )
        if num_features is not None and num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features}")
        self.num_features = num_features
        self.momentum = momentum
        self.bounds = bounds
        self.beta = float(beta)
        self.center = center
        self.channel_dim = channel_dim
        self.eps = eps
        self.track_running_stats = track_running_stats
        self._moments_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()

        shape = () if num_features is None else (num_features,)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"dtype must be a floating-point torch.dtype (float32, float64, ...) for the "
                f"statistics and α, got {dtype!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.zeros(shape, **factory))
        stats = {"device": device, "dtype": dtype or torch.float32}
        if track_running_stats:
            self.register_buffer("running_rho", torch.ones(shape, **stats))
            self.register_buffer("running_rho_prime", torch.ones(shape, **stats))
            self.register_buffer("running_mean", torch.zeros(shape, **stats))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            if num_features is not None:  # per channel: each channel's usable batches
                self.register_buffer(
                    "channel_batches_tracked", torch.zeros(shape, dtype=torch.long, device=device)
                )
            # training batches left out of the running statistics (not saved)
            self.register_buffer(
                "num_batches_skipped",
                torch.tensor(0, dtype=torch.long, device=device),
                persistent=False,
            )
        else:
            self.register_buffer("running_rho", None)
            self.register_buffer("running_rho_prime", None)
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)
            self.register_buffer("num_batches_skipped", None, persistent=False)

    def reset_running_stats(self) -> None:
        """ρ = ρ' = 1, μ = 0 (so λ = 1) and no batch tracked."""
        if self.track_running_stats:
            self.running_rho.fill_(1)
            self.running_rho_prime.fill_(1)
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()
            self.num_batches_skipped.zero_()
            if self._buffers.get("channel_batches_tracked") is not None:
                self.channel_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.zeros_(self.alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        per_channel = self._buffers.get("channel_batches_tracked")
        key = prefix + "channel_batches_tracked"
        if per_channel is not None and key not in state_dict:
            # saved before the per-channel counts: every channel counted every batch
            tracked = state_dict.get(prefix + "num_batches_tracked")
            count = 0 if tracked is None else int(tracked)
            state_dict[key] = torch.full_like(per_channel, count, device="cpu")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # num_batches_skipped is not saved: after load_state_dict(..., assign=True) into a
        # module built on meta, it would stay on meta; start it at 0 beside the count
        skipped, tracked = self.num_batches_skipped, self.num_batches_tracked
        if skipped is not None and skipped.is_meta and not tracked.is_meta:
            self.num_batches_skipped = torch.zeros_like(skipped, device=tracked.device)

    def _check_input(self, x: Tensor) -> None:
        AF._check_input(x)
        if self.channel_dim is None:
            return
        if AF._is_recording():  # a trace's sizes are tensors: the same checks, without a
            with warnings.catch_warnings():  # TracerWarning for each comparison
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._check_channels(x)
        else:
            self._check_channels(x)

    def _check_channels(self, x: Tensor) -> None:
        if not -x.dim() <= self.channel_dim < x.dim():
            raise ValueError(
                f"expected an input with a channel dimension {self.channel_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[self.channel_dim] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels in dimension {self.channel_dim}, "
                f"got input of shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input(x)
        running_rho, running_rho_prime, running_mean, counts, alpha = self._state_tensors()
        before = self._batches_seen(counts) if self._counts_skips() else None
        step = AF.StatisticsStep(
            (running_rho, running_rho_prime, running_mean, counts), alpha, self.training,
            self.momentum, self.bounds, self.beta, self.center, self.eps,
            self._reduce_moments(), self._moments_observer(),
        )  # fmt: skip
        out = AF._normalized_activation(  # state and options checked when built and loaded
            x, self.activation, step, channel_dim=self.channel_dim, mask=mask,
            save=self.__dict__.get("save", "auto"),  # absent in modules pickled before
        )  # fmt: skip
        if before is not None:
            self._count_batch(before, counts)
        return out

    def _state_tensors(self) -> tuple[Tensor | None, ...]:
        """(running_rho, running_rho_prime, running_mean, counts, alpha), read from the
        module's tables: ~2 µs less per tensor than ``Module.__getattr__``'s search;
        attribute access where a name left them (e.g. a parametrization). ``counts``:
        ``channel_batches_tracked`` per channel, else ``num_batches_tracked``."""
        buffers, params = self._buffers, self._parameters
        names = ("running_rho", "running_rho_prime", "running_mean", "num_batches_tracked")
        if all(name in buffers for name in names) and "alpha" in params:
            tensors = [buffers[name] for name in names]
            alpha = params["alpha"]
        else:
            tensors = [getattr(self, name) for name in names]
            alpha = self.alpha
        per_channel = buffers.get("channel_batches_tracked")
        if per_channel is not None:
            tensors[3] = per_channel
        return (*tensors, alpha)

    def _counts_skips(self) -> bool:
        return self.training and self.track_running_stats

    def _batches_seen(self, counts: Tensor) -> int | Tensor:
        """The total of ``counts`` before a batch: on CPU in eager mode a Python int (a
        read costs less than a clone and a comparison); elsewhere (devices, vmap,
        compile) a tensor, compared as a tensor (no host synchronisation)."""
        if counts.device.type == "cpu" and not AF._is_compiling() and not _transforms_active():
            return int(counts.sum()) if counts.dim() else int(counts)
        return counts.sum() if counts.dim() else counts.clone()

    def _count_batch(self, before: int | Tensor, counts: Tensor) -> None:
        """After a training batch: per channel, add 1 to ``num_batches_tracked`` when some
        channel could use it; add 1 to ``num_batches_skipped`` when none could."""
        per_channel = counts.dim() > 0
        buffers = self._buffers
        if isinstance(before, int):
            counted = (int(counts.sum()) if per_channel else int(counts)) != before
            if not counted:
                buffers["num_batches_skipped"].add_(1)
            elif per_channel:
                buffers["num_batches_tracked"].add_(1)
        else:
            counted = (counts.sum() if per_channel else counts) != before
            buffers["num_batches_skipped"].add_((~counted).long())
            if per_channel:
                buffers["num_batches_tracked"].add_(counted.long())

    def _reduce_moments(self):
        """Hook for synchronised statistics (distributed training); None = local."""
        return None

    def register_moments_hook(
        self, hook: Callable[[NormalizedActivation, AF.BatchMoments], None]
    ) -> RemovableHandle:
        """Call ``hook(module, moments)`` whenever a forward pass computes batch moments.

        ``moments`` (:class:`anact.functional.BatchMoments`, no gradient) are this
        process's moments of the batch, before any cross-process reduction: the
        statistics the layer needs anyway, so a monitor can read ρ, ρ', μ of each
        batch without another pass over the data (:class:`anact.analysis.
        ConvergenceMonitor` does). Not called inside ``torch.compile``. Returns a
        handle whose ``remove()`` detaches the hook, like ``register_forward_hook``.
        """
        hooks = self.__dict__.setdefault("_moments_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def _moments_observer(self) -> Callable[[AF.BatchMoments], None] | None:
        """The moments hooks as one callback (None when there are none)."""
        hooks = self.__dict__.get("_moments_hooks")  # absent in modules pickled before
        if not hooks or AF._is_compiling():
            return None

        def observe(moments: AF.BatchMoments) -> None:
            for hook in tuple(hooks.values()):
                hook(self, moments)

        return observe

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` asks each module for this before compiling: the forward
        (batch statistics, running update, fast paths) is Python that TorchScript cannot
        compile, so the answer is an error that says what to script instead."""
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__} (its forward computes "
            "batch statistics and updates running ones in Python); what to do: script "
            "anact.fold(model.eval()) or anact.fold(model, mode='modules'), the inference "
            "copy in which each normalized activation is its fixed (δ(x) − μ)·s; or use "
            "torch.compile (training), torch.export or torch.jit.trace (inference)."
        )

    def scale(self) -> Tensor:
        """The current factor λ + β·tanh(α) from the running statistics (eq. 15)."""
        if not self.track_running_stats:
            raise RuntimeError("scale() needs running statistics (track_running_stats=True)")
        lam = AF.lambda_factor(self.running_rho, self.running_rho_prime, self.eps)
        return lam.to(self.alpha.dtype) + self.beta * torch.tanh(self.alpha)

    def shift(self) -> Tensor:
        """The current μ subtracted before scaling (zeros when ``center=False``)."""
        if not self.track_running_stats:
            raise RuntimeError("shift() needs running statistics (track_running_stats=True)")
        return self.running_mean if self.center else torch.zeros_like(self.running_mean)

    def extra_repr(self) -> str:
        act = self.activation
        name = act.name + "".join(f", {k}={v}" for k, v in act.params.items())
        parts = [name]
        if self.num_features is not None:
            parts.append(f"num_features={self.num_features}, channel_dim={self.channel_dim}")
        parts.append(
            f"momentum={self.momentum}, bounds={self.bounds}, beta={self.beta}, "
            f"center={self.center}, eps={self.eps}"
        )
        if not self.track_running_stats:
            parts.append("track_running_stats=False")
        save = self.__dict__.get("save", "auto")
        if save != "auto":
            parts.append(f"save={save!r}")
        return ", ".join(parts)


def _named(name: str, doc: str) -> type[NormalizedActivation]:
    def __init__(self, num_features: int | None = None, **kwargs: Any) -> None:
        NormalizedActivation.__init__(self, name, num_features, **kwargs)

    cls = type(
        f"N{doc}",
        (NormalizedActivation,),
        {
            "__init__": __init__,
            "__doc__": f"Normalized {doc} (eq. 15 with δ = {name}); "
            "takes the keyword arguments of :class:`NormalizedActivation`.",
            "__module__": __name__,
        },
    )
    cls.__init__.__qualname__ = f"{cls.__name__}.__init__"
    return cls


NReLU = _named("relu", "ReLU")
NSwish = _named("swish", "Swish")
NTanh = _named("tanh", "Tanh")
NELU = _named("elu", "ELU")
NGELU = _named("gelu", "GELU")
NMish = _named("mish", "Mish")
NSoftplus = _named("softplus", "Softplus")


class NLReLU(NormalizedActivation):
    """Normalized LeakyReLU (eq. 15 with δ = LeakyReLU(negative_slope))."""

    def __init__(
        self, num_features: int | None = None, negative_slope: float = 0.01, **kwargs: Any
    ) -> None:
        super().__init__(
            "lrelu", num_features, activation_params={"negative_slope": negative_slope}, **kwargs
        )


# ---------------------------------------------------------------------------
# GPN (Lu et al. 2020), the paper's baselines ReLU-GPN and LReLU-GPN.
# ---------------------------------------------------------------------------


def gpn_constants(activation: str | Activation, **params: Any) -> tuple[float, float]:
    """(a, b) of the Gaussian-Poincaré normalized φ = a·(ψ + b), x ~ N(0, 1).

    a = 1/sqrt(E[ψ'²]); b is the root of smaller |b| of
    b² + 2b·E[ψ] + E[ψ²] − E[ψ'²] = 0, so that E[φ²] = E[φ'²] = 1.
    """
    act = resolve_activation(activation, **params)
    mean, second, dsq = (
        float(v)
        for v in gaussian_expectation(
            [act.fn, lambda x: act.fn(x).square(), lambda x: act.derivative(x).square()],
            1.0,
            act.kinks,
        )
    )
    if not dsq > 0:
        raise ValueError(f"{act!r} has E[ψ'²] = 0 under N(0, 1); it cannot be GPN-normalized")
    disc = mean * mean - second + dsq
    if disc < 0:
        raise ValueError(
            f"{act!r} has no real GPN shift b: E[ψ]² − E[ψ²] + E[ψ'²] = {disc:.3g} < 0"
        )
    root = math.sqrt(disc)
    # quadrature is exact to ~1e-15: treat values at that level as exact zeros
    if abs(mean) < 1e-12:
        mean = 0.0
    b = -mean + root if mean >= 0 else -mean - root
    if abs(b) < 1e-12:
        b = 0.0
    return 1.0 / math.sqrt(dsq), b


class GPN(nn.Module):
    """Gaussian-Poincaré normalized activation φ(x) = a·(ψ(x) + b) (Lu et al. 2020).

    ``GPN("relu")`` is √2·ReLU; ``GPN("lrelu")`` ≈ 1.4141·LeakyReLU(0.01).
    Shape: any input; output of the same shape and dtype.
    """

    def __init__(self, activation: str | Activation, **params: Any) -> None:
        super().__init__()
        self.activation = resolve_activation(activation, **params)
        self.a, self.b = gpn_constants(self.activation)

    def forward(self, x: Tensor) -> Tensor:
        y = self.activation.fn(x)
        if self.b != 0.0:
            y = y + self.b
        return self.a * y

    def extra_repr(self) -> str:
        return f"{self.activation.name}, a={self.a:.6f}, b={self.b:.6f}"


# ---------------------------------------------------------------------------
# LayerAct (shared/papers/layeract.md): y = x · s(n), n = layer-normalized x.
# ---------------------------------------------------------------------------


def _hard_gate(n: Tensor) -> tuple[Tensor, Tensor]:
    g = (n / 6 + 0.5).clamp(0, 1)
    dg = ((n > -3) & (n < 3)).to(n.dtype) / 6
    return g, dg


def _sigmoid_gate(n: Tensor) -> tuple[Tensor, Tensor]:
    g = torch.sigmoid(n)
    return g, g * (1 - g)


_GATES = {"sigmoid": _sigmoid_gate, "hard": _hard_gate}


class _LayerActFn(torch.autograd.Function):
    """y = x·g(n), n = (x − m)/sqrt(v + eps) per sample; saves only x.

    With u = grad·x·g'(n) and σ = sqrt(v + eps), the exact input gradient is
    grad·g(n) + (u − mean(u) − n·mean(u·n))/σ (LayerNorm's backward on u).
    """

    generate_vmap_rule = True

    @staticmethod
    def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor, list[int]]:
        dims = list(range(1, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        sigma = torch.sqrt(var + eps)
        return (x - mean) / sigma, sigma, dims

    @staticmethod
    def forward(x, gate, eps):  # type: ignore[override]
        n, _, _ = _LayerActFn._normalize(x, eps)
        return x * _GATES[gate](n)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, eps = inputs
        ctx.save_for_backward(x)
        ctx.gate, ctx.eps = gate, eps

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        n, sigma, dims = _LayerActFn._normalize(x, ctx.eps)
        g, dg = _GATES[ctx.gate](n)
        u = grad * x * dg
        mean_u = u.mean(dim=dims, keepdim=True)
        mean_un = (u * n).mean(dim=dims, keepdim=True)
        return grad * g + (u - mean_u - n * mean_un) / sigma, None, None


class _LayerActJvpFn(_LayerActFn):
    """:class:`_LayerActFn` with its forward-mode rule, used only under forward AD
    (torch.compile cannot trace a Function that defines ``jvp``)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _LayerActFn.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, x_dot, *_):
        """ẏ = ẋ·g(n) + x·g'(n)·ṅ, ṅ = (ẋ − mean ẋ − n·mean(n·ẋ))/σ (LayerNorm's jvp)."""
        (x,) = ctx.saved_tensors
        n, sigma, dims = _LayerActFn._normalize(x, ctx.eps)
        g, dg = _GATES[ctx.gate](n)
        n_dot = (x_dot - x_dot.mean(dim=dims, keepdim=True)
                 - n * (n * x_dot).mean(dim=dims, keepdim=True)) / sigma  # fmt: skip
        return x_dot * g + x * dg * n_dot


_LayerActFn.jvp_variant = _LayerActJvpFn


class _LayerAct(nn.Module):
    _gate = "sigmoid"

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        eps = AF._real("eps", eps)
        if not 0 < eps < math.inf:
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        AF._check_input(x)
        if x.dim() < 2:
            raise ValueError(
                f"LayerAct normalizes each sample over its non-batch dimensions; expected an "
                f"input of shape (N, ...) with at least 2 dimensions, got {tuple(x.shape)}"
            )
        return AF.apply_function(_LayerActFn, x, self._gate, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LASiLU(_LayerAct):
    """LayerAct SiLU: x·sigmoid(n), n = x normalized per sample over all non-batch dims.

    Shape: (N, *) → (N, *). No running statistics: train and eval are the same.
    """

    _gate = "sigmoid"


class LAHardSiLU(_LayerAct):
    """LayerAct HardSiLU: x·clip(n/6 + 1/2, 0, 1), n as in :class:`LASiLU`.

    Shape: (N, *) → (N, *).
    """

    _gate = "hard"
