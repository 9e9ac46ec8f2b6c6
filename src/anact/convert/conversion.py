"""``anact.convert``: replace a model's activation call sites by NormalizedActivation.

The paper's three rules (section 4) are applied on the graph of calls (torch.fx):

1. ``remove_bn_affine`` — a BatchNorm right before a converted activation
   loses its affine transform (section 3.2; ResNet50 saves 15,199 parameters).
2. ``buffer_bn`` — a BatchNorm (affine=False) lies between the last converted
   activation and the classifier head; one is inserted if none does (section 3.2).
3. ``skip_after_residual_add`` — an activation applied right after an
   element-wise addition of two tensors stays plain (section 3.3, Figure 6).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from anact.activations import get_activation
from anact.convert._sites import (
    BATCHNORMS,
    HEADS,
    METHOD_KINDS,
    MODULE_KINDS,
    FeatureBatchNorm,
    Site,
    Tracer,
    added_to_before,
    alias_used_elsewhere,
    as_example_inputs,
    find_site,
    input_node,
    is_opaque,
    scope_of,
    unique_name,
)
from anact.modules import NormalizedActivation

__all__ = ["ConversionError", "ConversionReport", "SiteRecord", "convert", "DEFAULT_SOURCE"]

#: the activations converted by default (gates such as sigmoid are left alone)
DEFAULT_SOURCE: tuple[str, ...] = ("relu", "lrelu", "swish", "gelu", "elu", "tanh", "mish")

_ALL_KINDS = {k for k, _ in MODULE_KINDS.values()} | {k for k, _ in METHOD_KINDS.values()}


class ConversionError(RuntimeError):
    """A model could not be converted; the message says what to do instead."""


@dataclass
class SiteRecord:
    """What happened to one activation call site."""

    site: str  # e.g. "layer1.0.relu (call 1 of 3)" or "F.relu in block (node relu_1)"
    activation: str  # δ found there, e.g. "relu"
    action: Literal["converted", "skipped"]
    reason: str = ""
    module: str = ""  # name of the NormalizedActivation that replaced it


@dataclass
class ConversionReport:
    """The outcome of :func:`convert`; ``print(report)`` gives a readable table."""

    mode: str
    sites: list[SiteRecord] = field(default_factory=list)
    bn_affine_removed: list[str] = field(default_factory=list)
    bn_affine_kept: list[str] = field(default_factory=list)  # with the reason
    buffer_bn: str = ""
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def converted(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.action == "converted"]

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.action == "skipped"]

    def __str__(self) -> str:
        lines = [f"anact.convert ({self.mode} mode): {len(self.converted)} converted, "
                 f"{len(self.skipped)} skipped"]
        for s in self.sites:
            tail = f" -> {s.module}" if s.module else ""
            why = f"  [{s.reason}]" if s.reason else ""
            lines.append(f"  {s.action:9s} {s.activation:9s} {s.site}{tail}{why}")
        if self.bn_affine_removed:
            lines.append(f"BatchNorm affine removed ({len(self.bn_affine_removed)}): "
                         + ", ".join(self.bn_affine_removed))
        for k in self.bn_affine_kept:
            lines.append(f"BatchNorm affine kept: {k}")
        if self.buffer_bn:
            lines.append(f"buffer BatchNorm: {self.buffer_bn}")
        lines.extend(f"note: {n}" for n in self.notes)
        diff = self.params_after - self.params_before
        lines.append(f"trainable parameters: {self.params_before:,} -> {self.params_after:,} "
                     f"({diff:+,})")
        return "\n".join(lines)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _source_kinds(source: str | Iterable[str] | None) -> set[str]:
    if source is None:
        return set(DEFAULT_SOURCE)
    names = [source] if isinstance(source, str) else list(source)
    if names == ["all"]:
        return set(_ALL_KINDS)
    out = set()
    for n in names:
        kind = get_activation(n).name  # resolves aliases ("silu" -> "swish"), checks the name
        if kind not in _ALL_KINDS:
            raise ValueError(
                f"source activation {n!r} has no torch module or function that convert "
                f"recognises; choose among {sorted(_ALL_KINDS)}"
            )
        out.add(kind)
    return out


def _factory(model: nn.Module) -> dict[str, Any]:
    """device of the model's parameters, and float64 for a float64 model.

    Half-precision models keep float32 statistics and α (the core's default).
    """
    p = next(iter(model.parameters()), None)
    if p is None or not p.is_floating_point():
        return {}
    if p.dtype == torch.float64:
        return {"device": p.device, "dtype": p.dtype}
    return {"device": p.device}


def _make_module(site_kind: str, site_params: dict[str, Any], activation: str | None,
                 kwargs: dict[str, Any], num_features: int | None,
                 factory: dict[str, Any]) -> NormalizedActivation:
    kw = {**factory, **kwargs}
    if activation is None:
        name = site_kind
        kw["activation_params"] = dict(site_params)
    else:
        name = activation
    if kw.get("channel_dim") is not None:
        kw.setdefault("num_features", num_features)
    return NormalizedActivation(name, **kw)


def _bn_affine_is_identity(bn: nn.Module) -> bool:
    if bn.weight.is_meta:  # a model being built on meta holds no trained values yet
        return True
    with torch.no_grad():
        return bool((bn.weight == 1).all()) and bool((bn.bias == 0).all())


def _strip_affine(bn: nn.Module) -> None:
    bn.affine = False
    bn.weight = None
    bn.bias = None


def _channels_in(shape: tuple[int, ...], channel_dim: int, site: str) -> int:
    """The size of dimension ``channel_dim`` of a site's input ``shape``, or a
    ConversionError that names the site and the shape."""
    if not -len(shape) <= channel_dim < len(shape):
        raise ConversionError(
            f"channel_dim={channel_dim} is out of range for the input of {site}, of shape "
            f"{shape}; pass the channel dimension of the activations' inputs (e.g. 1 for "
            "(N, C, H, W), -1 for (N, T, C))"
        )
    return int(shape[channel_dim])


def _num_features_of(src: fx.Node, modules: dict[str, nn.Module], channel_dim: int,
                     site: str) -> int:  # fmt: skip
    """C of the activation's input ``src``, from tensor metadata or the layer producing it
    (where that layer fixes the size of dimension ``channel_dim``), or a ConversionError
    that names the ``site``."""
    meta = src.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return _channels_in(tuple(meta.shape), channel_dim, site)
    if src.op == "call_module":
        m = modules.get(src.target)
        if isinstance(m, BATCHNORMS) and channel_dim == 1:
            return m.num_features
        # a Linear's outputs are (N, features) in most models, so dimension 1 is taken
        # as its last one too (a (N, T, F) input then fails its first call, saying why)
        if isinstance(m, nn.Linear) and channel_dim in (-1, 1):
            return m.out_features
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and channel_dim == 1:
            return m.out_channels
    raise ConversionError(
        f"per-channel statistics (channel_dim={channel_dim}) need the number of channels at "
        f"{site}; pass example_inputs=(x,) so that shapes are known"
    )


def convert(
    model: nn.Module,
    activation: str | None = None,
    *,
    source: str | Iterable[str] | None = None,
    remove_bn_affine: bool = True,
    buffer_bn: bool = True,
    skip_after_residual_add: bool = True,
    mode: Literal["graph", "modules"] = "graph",
    example_inputs: Sequence[Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    inplace: bool = False,
    return_report: bool = False,
    **kwargs: Any,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace the activation call sites of ``model`` by :class:`anact.NormalizedActivation`.

    Args:
        model: any module; in ``"graph"`` mode it must be traceable by torch.fx.
        activation: ``None`` (default) normalizes each call site's own δ (ReLU
            becomes NReLU, LeakyReLU(0.2) becomes NLReLU(0.2), ...); a registered
            name (``"swish"``) replaces δ everywhere by that function.
        source: which activations count as call sites: a name, a list of names
            (registry names or aliases: ``"relu"``, ``"silu"``, ``"lrelu"``, ...),
            ``"all"``, or None for :data:`DEFAULT_SOURCE` (relu, lrelu, swish,
            gelu, elu, tanh, mish; sigmoid gates are left alone by default).
        remove_bn_affine: rule 1 — a BatchNorm whose output feeds only converted
            activations becomes ``affine=False`` (weight and bias removed).
        buffer_bn: rule 2 — if no BatchNorm lies between the last converted
            activation and the classifier head (the last Linear/Conv call), an
            ``affine=False`` BatchNorm is inserted on the head's input.
        skip_after_residual_add: rule 3 — an activation whose input is the sum
            of two tensors (``out + identity``) stays plain.
        mode: ``"graph"`` (default) traces the calls with torch.fx and returns an
            ``fx.GraphModule`` (submodule names kept; a shared module called at
            several sites gets one new module per converted call site, named
            ``<name>1``, ``<name>2``, ...). ``"modules"`` keeps the model's own
            class and swaps activation *modules* in place; it needs
            ``example_inputs`` (one forward pass with hooks finds how often each
            module is called and what feeds it) and cannot see functional calls.
        example_inputs: positional inputs for one forward pass: required by
            ``"modules"`` mode; in graph mode used for shapes (per-channel ``num_features``).
        concrete_args: passed to the fx tracer (e.g. ``{"flag": False}``).
        inplace: modify ``model``'s own submodules instead of a deep copy.
        return_report: also return the :class:`ConversionReport`.
        **kwargs: passed to every :class:`NormalizedActivation` (``momentum``,
            ``beta``, ``center``, ``channel_dim`` (then ``num_features`` is found per
            site), ...).

    Returns:
        The converted model (its report is also in ``model.anact_report``), or
        ``(model, report)`` with ``return_report=True``.
    """
    if "activation_params" in kwargs and activation is None:
        raise TypeError(
            "activation_params needs a named activation: with activation=None each "
            "site keeps its own parameters; pass activation='lrelu' (for example) too"
        )
    if "num_features" in kwargs:
        raise TypeError(
            "num_features differs per call site; pass channel_dim=... only and convert "
            "finds each site's number of channels"
        )
    if activation is not None:
        get_activation(activation, **kwargs.get("activation_params", {}))  # fail early
    example_inputs = as_example_inputs(example_inputs)
    kinds = _source_kinds(source)
    NormalizedActivation("relu", **{k: v for k, v in kwargs.items()  # validate kwargs early
                                    if k not in ("channel_dim", "activation_params")})
    params_before = _count(model)
    work = model if inplace else copy.deepcopy(model)
    existing = {id(m) for m in work.modules()}
    if mode == "graph":
        out, report = _convert_graph(work, activation, kinds, remove_bn_affine, buffer_bn,
                                     skip_after_residual_add, example_inputs, concrete_args,
                                     kwargs)
    elif mode == "modules":
        if example_inputs is None:
            raise ConversionError(
                "mode='modules' needs example_inputs=(x, ...): one forward pass finds how "
                "often each activation module is called (a module called at several "
                "sites, like torchvision's Bottleneck.relu, must not share statistics)"
            )
        out, report = _convert_modules(work, activation, kinds, remove_bn_affine, buffer_bn,
                                       skip_after_residual_add, tuple(example_inputs), kwargs)
    else:
        raise ValueError(f"mode must be 'graph' or 'modules', got {mode!r}")
    _inherit_modes(out, existing, work.training)
    report.params_before = params_before
    report.params_after = _count(out)
    out.anact_report = report
    return (out, report) if return_report else out


def _inherit_modes(out: nn.Module, existing: set[int], training: bool) -> None:
    """New modules (normalized activations, buffer BatchNorms, wrappers) take the train/eval
    mode of the module they were put in, as a model in eval mode must stay in eval mode;
    the model's own modules keep theirs."""
    if id(out) not in existing:
        out.training = training
    for name, module in out.named_modules():  # parents before their children
        if id(module) in existing or not name:
            continue
        parent = out.get_submodule(name.rpartition(".")[0])
        module.training = parent.training


# ---------------------------------------------------------------------------
# graph mode
# ---------------------------------------------------------------------------


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    try:
        graph = Tracer().trace(model, concrete_args=concrete_args)
    except Exception as e:  # torch.fx raises TraceError, TypeError, ... on dynamic control flow
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            "What to do: (a) anact.convert(model, mode='modules', example_inputs=(x,)) swaps "
            "activation modules in place without tracing; (b) pass concrete_args={...} to fix "
            "the arguments that drive Python control flow; (c) convert the traceable "
            "submodules one by one (e.g. each block)."
        ) from e
    name = model.__class__.__name__
    return fx.GraphModule(model, graph, name)


def _site_label(site: Site, calls: dict[str, list[fx.Node]]) -> str:
    n = site.node
    if n.op == "call_module":
        nodes = calls[n.target]
        if len(nodes) > 1:
            return f"{n.target} (call {nodes.index(n) + 1} of {len(nodes)})"
        return str(n.target)
    what = (f"{n.target}()" if n.op == "call_method"
            else getattr(n.target, "__name__", str(n.target)))
    scope = scope_of(n)
    return f"{what} in {scope or '<top>'} (node {n.name})"


def _convert_graph(model, activation, kinds, remove_bn_affine, buffer_bn, skip_add,
                   example_inputs, concrete_args, kwargs):
    gm = _trace(model, concrete_args)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        was = gm.training
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
        gm.train(was)
    graph = gm.graph
    modules = dict(gm.named_modules())
    report = ConversionReport("graph")
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)

    # 1. decide per call site
    converted: list[Site] = []
    for node in list(graph.nodes):
        site = find_site(node, modules)
        if site is None or site.kind not in kinds:
            continue
        label = _site_label(site, calls)
        src = input_node(node)
        reason = ""
        if site.unsupported:
            reason = site.unsupported
        elif skip_add and src is not None and added_to_before(src, node):
            reason = "right after an element-wise addition (rule 3, skip_after_residual_add)"
        elif site.inplace and alias_used_elsewhere(node, modules):
            reason = INPLACE_ALIAS_REASON
        elif src is None:
            reason = "no tensor input found"
        if reason:
            report.sites.append(SiteRecord(label, site.kind, "skipped", reason))
            continue
        converted.append(site)
        report.sites.append(SiteRecord(label, site.kind, "converted"))

    records = {id(s.node): r for s, r in zip(converted, report.converted, strict=True)}
    converted_nodes = {s.node for s in converted}
    # every site's channel count before anything changes (an error leaves the model as it was)
    cd = kwargs.get("channel_dim")
    features = {s.node: None if cd is None else _num_features_of(
        input_node(s.node), modules, cd, records[id(s.node)].site) for s in converted}

    # 2. rule 1: BatchNorms feeding only converted activations lose their affine transform
    if remove_bn_affine:
        bn_targets: dict[str, None] = {}
        for s in converted:
            src = input_node(s.node)
            if src.op == "call_module" and isinstance(modules.get(src.target), BATCHNORMS):
                bn_targets[src.target] = None
        for t in bn_targets:
            bn = modules[t]
            feeds = [u for c in calls[t] for u in c.users]
            if not bn.affine:
                continue
            if not all(u in converted_nodes for u in feeds):
                report.bn_affine_kept.append(f"{t} (its output also feeds unconverted layers)")
                continue
            if not _bn_affine_is_identity(bn):
                report.notes.append(f"{t}: trained affine weights removed; outputs change")
            _strip_affine(bn)
            report.bn_affine_removed.append(t)

    # 3. replace each converted call site by its own NormalizedActivation
    for s in converted:
        node = s.node
        new = _make_module(s.kind, s.params, activation, kwargs, features[node], _factory(gm))
        if node.op == "call_module" and len(calls[node.target]) == 1:
            name = str(node.target)
        elif node.op == "call_module":
            name = unique_name(gm, f"{node.target}{calls[node.target].index(node) + 1}")
        else:
            scope = scope_of(node)
            name = unique_name(gm, f"{scope + '.' if scope else ''}{node.name}")
        gm.add_submodule(name, new)
        with graph.inserting_after(node):
            repl = graph.call_module(name, (input_node(node),))
        repl.meta = dict(node.meta)  # shapes (tensor_meta) for the sites after it
        node.replace_all_uses_with(repl)
        graph.erase_node(node)
        records[id(node)].module = name
    alive = set(graph.nodes)
    for t, nodes in calls.items():
        if all(n not in alive for n in nodes) and not isinstance(
            gm.get_submodule(t), NormalizedActivation
        ):
            _delete_submodule(gm, t)

    # 4. rule 2: a buffer BatchNorm between the last converted activation and the head
    if buffer_bn:
        report.buffer_bn = _apply_buffer_bn(gm, graph)
    else:
        report.buffer_bn = "rule off (buffer_bn=False)"
    graph.lint()
    gm.recompile()
    return gm, report


def _delete_submodule(gm: nn.Module, target: str) -> None:
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if leaf in owner._modules:
        del owner._modules[leaf]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _buffer_bn_for(head: nn.Module) -> nn.Module:
    fac = {"device": head.weight.device, "dtype": head.weight.dtype}
    if isinstance(head, nn.Linear):
        return FeatureBatchNorm(head.in_features, **fac)
    cls = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
    return cls[type(head)](head.in_channels, affine=False, **fac)


def _apply_buffer_bn(gm: fx.GraphModule, graph: fx.Graph) -> str:
    modules = dict(gm.named_modules())
    heads = [n for n in graph.nodes
             if n.op == "call_module" and isinstance(modules.get(n.target), HEADS)]
    if not heads:
        return "not applied: no classifier head (Linear/Conv call) found"
    head = heads[-1]
    before = _ancestors(head)
    acts = [n for n in graph.nodes if n in before and n.op == "call_module"
            and isinstance(modules.get(n.target), NormalizedActivation)]
    if not acts:
        return f"not needed: no converted activation feeds the head {head.target}"
    last = acts[-1]
    between = [n for n in before if n.op == "call_module"
               and isinstance(modules.get(n.target), BATCHNORMS) and last in _ancestors(n)]
    if between:
        names = sorted(str(n.target) for n in between)
        return f"kept: {', '.join(names)} between {last.target} and the head {head.target}"
    name = unique_name(gm, f"{head.target}_buffer_bn")
    gm.add_submodule(name, _buffer_bn_for(modules[head.target]))
    with graph.inserting_before(head):
        bn = graph.call_module(name, (head.args[0],))
    head.args = (bn, *head.args[1:])
    return f"inserted {name} (affine=False) between {last.target} and the head {head.target}"


# ---------------------------------------------------------------------------
# modules mode (no tracing)
# ---------------------------------------------------------------------------


@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: Any
    out: Any
    after_add: bool = False  # the input was a sum of two computed tensors at the call


def _record_calls(model: nn.Module, example_inputs: tuple[Any, ...]) -> list[_Call]:
    calls: list[_Call] = []
    pending: list[bool] = []  # after_add of the calls under way (leaves: at most one)
    handles = []
    opaque: list[str] = []  # anact's own modules: their insides are not call sites
    for name, m in model.named_modules():
        if any(name.startswith(o + ".") for o in opaque):
            continue
        if is_opaque(m):
            opaque.append(name)
        elif next(iter(m.children()), None) is not None:
            continue  # leaves only

        def before(mod, args, name=name):
            # at the call: an in-place addition later (g.add_(h)) or an in-place
            # activation (ReLU(inplace=True)) changes the input's grad_fn afterwards
            pending.append(_grad_fn_is_tensor_add(args[0]) if args else False)

        def hook(mod, args, out, name=name):
            calls.append(_Call(name, mod, args[0] if args else None, out, pending.pop()))

        handles.append(m.register_forward_pre_hook(before))
        handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()  # no running statistic changes
    try:
        with torch.enable_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return calls


INPLACE_ALIAS_REASON = ("in-place call whose input (or what it is a view of) is read again "
                        "afterwards; converting would change the model")


def _aliasing_inplace_sites(
    model: nn.Module, calls: list[_Call], example_inputs: tuple[Any, ...], kinds: set[str]
) -> dict[int, str]:
    """In modules mode, the in-place activation modules whose effect reaches the output
    through their input (``act(h); return f(h)``, or a view of h) rather than through
    what they return: ``{id(module): reason}``. Hooks cannot tell (an in-place call
    returns its input), so the example forward runs again with each one's ``inplace``
    off (eval, no_grad) and the outputs are compared with the unchanged model's."""
    candidates: dict[int, nn.Module] = {}
    for c in calls:
        kind = MODULE_KINDS.get(type(c.module))
        if kind is not None and kind[0] in kinds and getattr(c.module, "inplace", False) is True:
            candidates.setdefault(id(c.module), c.module)
    if not candidates:
        return {}

    def outputs() -> list[Any]:
        with torch.no_grad():
            return torch.utils._pytree.tree_leaves(model(*example_inputs))

    def changes_output(mods: Iterable[nn.Module]) -> bool:
        mods = list(mods)
        for m in mods:
            m.inplace = False
        try:
            return not _same_leaves(reference, outputs())
        finally:
            for m in mods:
                m.inplace = True

    was = model.training
    model.eval()
    try:
        reference = outputs()
        if not changes_output(candidates.values()):
            return {}
        if not _same_leaves(reference, outputs()):
            return {k: "in-place call that could not be checked (the model's eval outputs "
                       "differ between two runs of example_inputs); use mode='graph'"
                    for k in candidates}  # fmt: skip
        bad = {k: m for k, m in candidates.items() if changes_output([m])}
    finally:
        model.train(was)
    return {k: INPLACE_ALIAS_REASON for k in (bad or candidates)}


def _same_leaves(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return False
    return True


def _grad_fn_is_tensor_add(t: Any) -> bool:
    fn = getattr(t, "grad_fn", None)
    if fn is None or not type(fn).__name__.startswith("AddBackward"):
        return False
    return sum(f is not None for f, _ in fn.next_functions) == 2


def _convert_modules(model, activation, kinds, remove_bn_affine, buffer_bn, skip_add,
                     example_inputs, kwargs):
    report = ConversionReport("modules")
    report.notes.append("functional calls (F.relu, x.relu(), ...) are not seen in modules mode")
    registered: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        registered.setdefault(id(m), []).append(name)
    calls = _record_calls(model, example_inputs)
    n_calls: dict[int, int] = {}
    for c in calls:
        n_calls[id(c.module)] = n_calls.get(id(c.module), 0) + 1
    # dataflow by tensor identity, in call order (an in-place call re-produces its input)
    latest: dict[int, int] = {}
    source: dict[int, int | None] = {}
    consumers: dict[int, int] = {}
    for i, c in enumerate(calls):
        src_i = latest.get(id(c.inp))
        source[i] = src_i
        if src_i is not None:
            consumers[src_i] = consumers.get(src_i, 0) + 1
        if isinstance(c.out, torch.Tensor):
            latest[id(c.out)] = i

    # 1. decide per module, and find each site's channel count, before changing anything
    done: set[int] = set()
    chosen: list[tuple[int, str, int | None]] = []  # (call index, kind, num_features)
    cd = kwargs.get("channel_dim")
    inplace_reasons = _aliasing_inplace_sites(model, calls, example_inputs, kinds)
    for i, c in enumerate(calls):
        kind = MODULE_KINDS.get(type(c.module))
        if kind is None or kind[0] not in kinds or id(c.module) in done:
            continue
        done.add(id(c.module))
        name = c.name
        reason = ""
        if len(registered[id(c.module)]) > 1:
            reason = f"one module registered as {registered[id(c.module)]}; use mode='graph'"
        elif n_calls[id(c.module)] > 1:
            reason = f"called {n_calls[id(c.module)]} times per forward; use mode='graph'"
        elif isinstance(c.module, nn.GELU) and c.module.approximate != "none":
            reason = f"GELU(approximate={c.module.approximate!r}) is not the exact GELU"
        elif skip_add and c.after_add:
            reason = "right after an element-wise addition (rule 3, skip_after_residual_add)"
        elif id(c.module) in inplace_reasons:
            reason = inplace_reasons[id(c.module)]
        if reason:
            report.sites.append(SiteRecord(name, kind[0], "skipped", reason))
            continue
        nf = None if cd is None else _channels_in(tuple(c.inp.shape), cd, name)
        chosen.append((i, kind[0], nf))
        report.sites.append(SiteRecord(name, kind[0], "converted", module=name))

    # 2. swap the modules; rule 1 on the BatchNorm feeding each
    converted_calls: list[_Call] = []
    for i, kind_name, nf in chosen:
        c = calls[i]
        params = {a: getattr(c.module, a) for a in MODULE_KINDS[type(c.module)][1]}
        new = _make_module(kind_name, params, activation, kwargs, nf, _factory(model))
        parent, _, leaf = c.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        converted_calls.append(c)
        src_i = source[i]
        src = calls[src_i] if src_i is not None else None
        if (remove_bn_affine and src is not None and isinstance(src.module, BATCHNORMS)
                and src.module.affine):
            if n_calls[id(src.module)] > 1 or consumers.get(src_i, 0) > 1:
                report.bn_affine_kept.append(f"{src.name} (called or consumed more than once)")
            else:
                if not _bn_affine_is_identity(src.module):
                    report.notes.append(f"{src.name}: trained affine weights removed")
                _strip_affine(src.module)
                report.bn_affine_removed.append(src.name)
    if buffer_bn:
        report.buffer_bn = _buffer_bn_modules(model, calls, converted_calls)
    else:
        report.buffer_bn = "rule off (buffer_bn=False)"
    return model, report


def _buffer_bn_modules(model: nn.Module, calls: list[_Call], converted: list[_Call]) -> str:
    heads = [i for i, c in enumerate(calls) if isinstance(c.module, HEADS)]
    if not heads or not converted:
        return "not applied: no classifier head or no converted activation"
    h = heads[-1]
    acts = [i for i, c in enumerate(calls) if i < h and any(c is k for k in converted)]
    if not acts:
        return f"not needed: no converted activation runs before the head {calls[h].name}"
    between = [c.name for c in calls[acts[-1] + 1:h] if isinstance(c.module, BATCHNORMS)]
    if between:
        return f"kept: {', '.join(between)} runs between {calls[acts[-1]].name} and the head"
    name = calls[h].name
    head = calls[h].module
    wrapped = nn.Sequential(_buffer_bn_for(head), head)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    return (f"inserted: {name} is now Sequential(buffer BatchNorm (affine=False), head); "
            f"its parameters are {name}.1.*")
