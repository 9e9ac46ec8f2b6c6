"""Optional fast paths of the normalized activation, behind one dispatch.

:func:`anact.functional.normalized_activation` (what every
:class:`anact.NormalizedActivation` calls) asks :func:`dispatch` whether a fast
path applies; the eager code in :mod:`anact.functional` stays the reference.

Backends (``set_backend(name)``, the ``with backend(name):`` context, or the
environment variable ``ANACT_BACKEND`` read at import):

* ``"native"`` (default): the C passes of :mod:`anact.kernels.native` (built at install
  when a C compiler is present) for the built-in ReLU, LeakyReLU and Swish on float32
  and bfloat16 CPU tensors (large ones split over ``torch.get_num_threads()`` threads);
  the eager reference everywhere else (other activations, float16 and float64, masks,
  CUDA, compile, transforms, export);
* ``"eager"``: the reference, torch ops only, no compilation;
* ``"compiled"``: the fused kernels of :mod:`anact.kernels.fused` through
  ``torch.compile`` (inductor: C++/OpenMP on CPU, Triton on CUDA), compiled once
  per activation, shape, dtype and configuration (``dynamic=False``);
* ``"triton"``: the Triton kernels of :mod:`anact.kernels.triton_passes` for the same
  activations on CUDA tensors (float32, bfloat16, float16; needs the ``triton``
  package), the native passes on CPU, eager elsewhere; only when chosen, while it has
  never run on a GPU (docs/core.md);
* ``"auto"``: ``"native"`` where it applies, else ``"compiled"`` for inputs of at
  least :data:`AUTO_MIN_NUMEL` elements and eager for smaller ones (where a compiled
  call's fixed cost is not repaid);
* ``"fused"``: the fused kernels run eagerly, without compilation (slow; for
  testing the fused math and debugging).

The default needs no compilation at run time: ``"compiled"`` costs seconds per new
shape (tens of seconds for the first one in a process) and needs a C++ compiler
(CPU) or Triton (CUDA). The native passes follow the eager formulas (ReLU's outputs
and gradients are equal bit for bit given the statistics, Swish's within 4 ulp;
the statistics are sums in another order), tested in tests/kernels/test_native.py.
When compilation fails, a :class:`KernelWarning` is issued once
and the call runs eagerly.

The fast path is skipped (eager is used) inside ``torch.compile`` (the outer
compiler fuses the reference itself), under functorch transforms (``vmap``,
``grad``), and for inputs with fewer than 2 elements per statistic.
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from anact.activations import Activation, _forward_ad_active, _transforms_active

if TYPE_CHECKING:
    from anact.functional import StatisticsStep

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "AUTO_MIN_NUMEL",
    "KernelWarning",
    "backend",
    "get_backend",
    "set_backend",
    "dispatch",
    "clear_cache",
]

BACKENDS = ("eager", "native", "compiled", "auto", "fused", "triton")
DEFAULT_BACKEND = "native"
AUTO_MIN_NUMEL = 1 << 15


class KernelWarning(UserWarning):
    """A fast path could not be used (e.g. compilation failed); eager ran instead."""


def _check_backend(name: str) -> str:
    """A backend name, case-insensitive as ``ANACT_BACKEND`` is."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return key


def _from_environment() -> str:
    name = os.environ.get("ANACT_BACKEND", "").strip().lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        warnings.warn(
            f"ANACT_BACKEND={name!r} is not one of {', '.join(BACKENDS)}; "
            f"using {DEFAULT_BACKEND!r}",
            KernelWarning,
            stacklevel=2,
        )
        return DEFAULT_BACKEND
    return name


_backend = _from_environment()


def set_backend(name: str) -> None:
    """Select the implementation of the normalized activation: one of :data:`BACKENDS`."""
    global _backend
    _backend = _check_backend(name)


def get_backend() -> str:
    """The current backend name."""
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with anact.kernels.backend("compiled"): ...`` — the backend inside the block."""
    global _backend
    previous = _backend
    _backend = _check_backend(name)
    try:
        yield
    finally:
        _backend = previous


# ---------------------------------------------------------------------------
# Compiled functions, one per key
# ---------------------------------------------------------------------------


def _fn_key(f: Callable) -> Any:
    # lambdas made by a registry factory share their code; their parameters are in .params
    return getattr(f, "__code__", f)


def _act_key(act: Activation) -> tuple:
    return (act.name, tuple(sorted(act.params.items())), _fn_key(act.fn), _fn_key(act.derivative),
            act.sign_derivative)  # fmt: skip


def _tensor_key(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


_cache: dict[tuple, Callable] = {}
_failed: set[tuple] = set()


def clear_cache() -> None:
    """Forget the compiled functions (they are recompiled on the next call)."""
    _cache.clear()
    _failed.clear()


def _fresh(f: Callable) -> Callable:
    """A copy of f with its own code object.

    ``torch.compile`` keeps its compiled variants on the code object and stops
    recompiling after a few (``recompile_limit``); a model has more shapes than
    that, so each key gets its own code object and hence its own cache.
    """
    code = f.__code__.replace()
    if code is f.__code__:  # CPython may return the same object for an identical replace
        code = f.__code__.replace(co_name=f.__code__.co_name + "_")
    g = types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


def _with_scalars(f: Callable, zero: tuple[bool, ...]) -> Callable:
    """f taking (1,) views where ``zero`` marks arguments that are 0-dim tensors."""

    def g(*args: Any) -> Any:
        return f(*(a.view(()) if zero[i] else a for i, a in enumerate(args)))

    return g


class _Runner:
    """Runs a fused kernel, compiled (cached per key) or eagerly."""

    def __init__(self, compile_: bool) -> None:
        self.compile = compile_

    def _call(self, name: str, key: tuple, f: Callable, *args: Any) -> Any:
        if not self.compile:
            return f(*args)
        key = (name, *key)
        fn = _cache.get(key)
        # 0-dim tensors go in as (1,) views: inductor (torch 2.13, CPU) drops in-place
        # updates of 0-dim float64 inputs, i.e. the running statistics of a float64 module
        zero = tuple(isinstance(a, Tensor) and a.dim() == 0 for a in args)
        cargs = [a.view(1) if zero[i] else a for i, a in enumerate(args)]
        if fn is None:
            if key in _failed:
                return f(*args)
            fn = torch.compile(_fresh(_with_scalars(f, zero)), dynamic=False, fullgraph=True)
            try:
                out = fn(*cargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                _failed.add(key)
                warnings.warn(
                    f"anact.kernels: compiling {name} failed ({type(e).__name__}: {e}); "
                    "running eagerly. Install a C++ compiler (CPU) or Triton (CUDA), or "
                    "set_backend('eager') to silence this",
                    KernelWarning,
                    stacklevel=4,
                )
                return f(*args)
            _cache[key] = fn
            return out
        return fn(*cargs)

    def prepare(self, x, mask, running, act, cfg):
        from anact.kernels import fused

        def f(x, mask, *running):
            return fused.prepare(x, mask, running, act=act, cfg=cfg)

        key = (_act_key(act), cfg, _tensor_key(x), _tensor_key(mask), _tensor_key(running[0]),
               _tensor_key(running[3]))  # fmt: skip
        return self._call("prepare", key, f, x, mask, *running)

    def finish(self, moments, running, cfg):
        from anact import functional as AF
        from anact.kernels import fused

        def f(*args):  # the six moments, then the running buffers
            return fused.finish(AF.BatchMoments(*args[:6]), args[6:], cfg=cfg)

        key = (cfg, *(_tensor_key(m) for m in moments), _tensor_key(running[0]),
               _tensor_key(running[3]))  # fmt: skip
        return self._call("finish", key, f, *moments, *running)

    def output(self, x, scale, shift, act, channel_dim):
        from anact.kernels import fused

        def f(x, scale, shift):
            return fused.output(x, scale, shift, act=act, channel_dim=channel_dim)

        key = (_act_key(act), channel_dim, _tensor_key(x), _tensor_key(scale),
               _tensor_key(shift))  # fmt: skip
        return self._call("output", key, f, x, scale, shift)

    def output_nudged(self, x, s, b, lo, hi, act):
        from anact.kernels import fused

        def f(x, s, b, lo, hi):
            return fused.output_nudged(x, s, b, lo, hi, act=act)

        key = (_act_key(act), _tensor_key(x), _tensor_key(s), _tensor_key(b))
        return self._call("output_nudged", key, f, x, s, b, lo, hi)

    def backward(self, x, grad_out, scale, shift, act, channel_dim, need_x, need_scale):
        from anact.kernels import fused

        def f(x, grad_out, scale, shift):
            return fused.backward_pass(
                x, grad_out, scale, shift, act=act, channel_dim=channel_dim,
                need_x=need_x, need_scale=need_scale,
            )  # fmt: skip

        key = (_act_key(act), channel_dim, need_x, need_scale, _tensor_key(x),
               _tensor_key(grad_out), _tensor_key(scale), _tensor_key(shift))  # fmt: skip
        return self._call("backward", key, f, x, grad_out, scale, shift)

    def backward_from_output(self, out, grad_out, scale, s, t, act, channel_dim, need_x,
                             need_scale):  # fmt: skip
        from anact.kernels import fused

        def f(out, grad_out, scale, s, t):
            return fused.backward_from_output(
                out, grad_out, scale, s, t, act=act, channel_dim=channel_dim,
                need_x=need_x, need_scale=need_scale,
            )  # fmt: skip

        key = (_act_key(act), channel_dim, need_x, need_scale, _tensor_key(out),
               _tensor_key(grad_out), _tensor_key(scale), _tensor_key(s),
               _tensor_key(t))  # fmt: skip
        return self._call("backward_from_output", key, f, out, grad_out, scale, s, t)


_RUNNERS = {"compiled": _Runner(True), "fused": _Runner(False)}


def _is_compiling() -> bool:
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())




def _pass_backends(x: Tensor) -> tuple[types.ModuleType, ...]:
    """The modules of hand-written passes the current backend tries, in order."""
    if _backend not in ("native", "auto", "triton"):
        return ()
    from anact.kernels import native

    if _backend == "triton":
        from anact.kernels import triton_passes

        return (triton_passes, native)
    return (native,)


def _choose(x: Tensor, channel_dim: int | None) -> _Runner | None:
    name = _backend
    if name in ("eager", "native", "triton") or _is_compiling() or _transforms_active():
        return None
    per_stat = x.numel() // (1 if channel_dim is None else max(1, x.shape[channel_dim]))
    if per_stat < 2:
        return None
    if name == "auto":
        if x.numel() < AUTO_MIN_NUMEL:
            return None
        name = "compiled"
    return _RUNNERS[name]


def dispatch(
    x: Tensor,
    act: Activation,
    step: StatisticsStep,
    *,
    channel_dim: int | None,
    mask: Tensor | None,
    save_output: Callable[[Tensor], bool] | bool = False,
) -> Tensor | None:
    """The normalized activation through the selected fast path, or None for eager.

    Arguments as :func:`anact.functional.normalized_activation` takes them (already
    checked), the statistics' ones bundled in ``step`` (an
    :class:`anact.functional.StatisticsStep`); ``save_output``: whether backward keeps
    the output instead of x, or a function of the scale that says so.
    """
    if _forward_ad_active():  # tangents: the eager op's jvp rule
        return None
    cd = None if channel_dim is None else channel_dim % x.dim()
    for fast in _pass_backends(x):  # the Triton kernels, the C passes: where they apply
        plan = fast.plan_call(x, act, cd, mask)
        if plan is not None:
            return fast.forward(x, act, step, channel_dim=cd, save_output=save_output,
                                plan=plan)  # fmt: skip
    runner = _choose(x, channel_dim)
    if runner is None:
        return None
    from anact import functional as AF
    from anact.kernels import fused

    if mask is not None:
        mask = AF._check_mask(x, mask)
    cfg = fused.PrepareConfig.of(step, cd, mask is not None)
    running = step.running
    xd = x.detach()
    with torch.no_grad():
        out = runner.prepare(xd, mask, running, act, cfg)
        if cfg.observe:
            step.on_moments(AF.BatchMoments(*out[3:]))
            out = out[:3]
        if cfg.reduce_moments and AF._uses_batch(step):
            moments = AF.BatchMoments(*out)
            if step.on_moments is not None:
                step.on_moments(moments)  # this process's, before the reduction
            moments = step.reduce_moments(moments)
            out = runner.finish(moments, running, cfg)
    lam, shift, valid = out
    if AF._uses_batch(step) and x.device.type == "cpu" and not bool(valid.all()):
        AF._warn_unusable_batch()
    scale = lam.to(step.alpha.dtype) + step.beta * torch.tanh(step.alpha)
    if callable(save_output):
        save_output = save_output(scale)
    return AF.apply_function(
        fused.FusedNormalizedActivationFn, x, scale, shift, act, cd, runner, save_output
    )
