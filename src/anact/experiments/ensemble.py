"""Train the runs of a study together as one batched ensemble (``torch.func.vmap``).

K runs of one activation differ only in their seed. :class:`Ensemble` builds each
member exactly as the sequential runner builds the run (``torch.manual_seed(seed)``,
:attr:`Study.build`, the run's checkpoint if it has one), stacks the members'
parameters and buffers along a leading member dimension and runs one
``vmap(functional_call(model))`` per training step over K batches, one per member:

* data order: member k draws its batches from its own ``torch.Generator`` seeded
  with its seed, through the study's :class:`~anact.experiments.studies.EnsembleSpec`
  (the function its ``train_epoch`` uses), so it sees run k's batches in run k's order;
* optimizer: ``torch.optim.SGD`` with the members' settings on the stacked tensors;
  SGD (momentum, dampening, weight decay, Nesterov) is elementwise, so each member's
  slice takes the step its own optimizer would take. The loss is the sum of the
  members' losses: member k's parameters get exactly ∂loss_k;
* normalization statistics: per member, as stacked buffers that the vmapped forward
  updates in place (eq. 16-18);
* convergence statistics: the Score of eq. 22 and Σ|E W| of Figure 4 with the
  definitions of :class:`anact.analysis.ConvergenceMonitor`, gathered by forward hooks
  inside the vmapped function and returned from it, so they come out per member.

"The same math", not the same numbers: the batched kernels (a grouped convolution, a
batched matmul) sum in another order than the per-run ones, so each step agrees with
the run trained alone to float32 rounding (relative ~1e-6), not bit for bit, and
these differences grow over training (SGD amplifies them: after a full epoch the
validation accuracy of a member and of its sequential run can differ by a point or
more); see docs/ensemble.md for the measured agreement. The store records each
epoch's ``mode`` ("ensemble" here, "sequential" from the runner) and the report
says which runs were trained how.

:func:`train_ensemble` is the store-backed driver that ``anact reproduce --ensemble``
runs: same run identity, epoch rows and per-run checkpoints as
:func:`anact.experiments.runner.run_one`, so a killed ensemble resumes as an
ensemble or sequentially.
"""

from __future__ import annotations

import contextlib
import copy
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from anact import functional as AF
from anact.analysis.monitors import activation_of
from anact.modules import NormalizedActivation

__all__ = ["Ensemble", "EpochResult", "train_ensemble"]

# power sums one activation layer records per member and forward pass
_SUMS = ("x", "xx", "y", "yy", "dsq", "scale")


def _sum_of_squares(t: Tensor, dims: list[int] | None = None) -> Tensor:
    """Σ t² over ``dims`` (all if None) as ``square().sum()``, without the slower pow
    kernel. (``linalg.vector_norm`` saves the temporary but sums with ~1e-4 relative
    error in float32, which the running statistics then carry into training.)"""
    return (t * t).sum(dim=dims)


def _check_normalized_layers(template: nn.Module) -> None:
    """Refuse normalized activations the vmapped step cannot train as a sequential run
    would: without running statistics, or with moments synchronised across processes.
    (The stock forward runs under vmap; it skips its host check of unusable batches
    there, and the ensemble warns from ``num_batches_skipped`` after each epoch.)"""
    for name, m in template.named_modules():
        if not isinstance(m, NormalizedActivation):
            continue
        if not m.track_running_stats or type(m)._reduce_moments is not (
            NormalizedActivation._reduce_moments
        ):
            raise ValueError(
                f"layer {name!r}: ensemble training supports normalized activations with "
                "running statistics and local (not synchronised) moments; train this "
                "study without --ensemble"
            )


class _Probe:
    """Forward hooks that record, per activation layer and training forward pass,
    [Σx, Σx², Σy, Σy², Σδ'(x)², c] of the layer's input x and output y, with c the
    layer's scale (ConvergenceMonitor's definitions: c = λ + β·tanh α for a
    normalized activation, a for GPN, 1 for a plain activation). They run inside the
    vmapped function, which returns the records, so each has a member dimension."""

    def __init__(self, template: nn.Module) -> None:
        self.layers: list[str] = []
        self._records: list[Tensor] | None = None
        self.counts: list[int] = []
        for name, module in template.named_modules():
            act = activation_of(module)
            if act is None:
                continue
            per_channel = getattr(module, "channel_dim", None) is not None
            if getattr(module, "inplace", False) or per_channel:
                raise ValueError(
                    f"layer {name!r}: the ensemble's monitor needs out-of-place activations "
                    "with one scale per layer; train this study without --ensemble"
                )
            module.register_forward_hook(self._hook(act))
            self.layers.append(name)

    def _hook(self, act: Any) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._records is None or not module.training:
                return
            with torch.no_grad():
                x, y = args[0].detach().float(), output.detach().float()
                g = act.derivative(x)
                self._records.append(torch.stack([
                    x.sum(), _sum_of_squares(x), y.sum(), _sum_of_squares(y),
                    _sum_of_squares(g), _scale_of(module, x),
                ]))  # fmt: skip
                self.counts.append(x.numel())

        return hook

    def start(self) -> None:
        self._records, self.counts = [], []

    def stop(self, like: Tensor) -> Tensor:
        """The records of this forward pass, shape (layers, len(_SUMS))."""
        records, self._records = self._records, None
        if not records:
            return like.new_zeros(0, len(_SUMS))
        return torch.stack(records)


def _scale_of(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, NormalizedActivation):
        return module.scale().detach().float()  # the running values this forward just used
    return x.new_tensor(float(getattr(module, "a", 1.0)))  # GPN: a; plain: 1


def _score(sums: Tensor, counts: Tensor) -> Tensor:
    """Score of eq. 22 per step and member from the layers' power sums, in float64.

    ``sums`` (steps, members, layers, len(_SUMS)), ``counts`` (steps, layers):
    ρ = Var[y]/Var[x] (eq. 5, 31), ρ' = E[(c·δ')²] (eq. 6), Score = Σ_i (|ln ρ_i| +
    |ln ρ'_i|)/2; ln 0 = -inf (a dead layer), NaN stays NaN, as the monitor's.
    """
    s = sums.double()
    n = counts.double()[:, None, :]
    mx, my = s[..., 0] / n, s[..., 2] / n
    var_x = (s[..., 1] / n - mx * mx).clamp_min(0)
    var_y = (s[..., 3] / n - my * my).clamp_min(0)
    rho = torch.where(var_x > 0, var_y / var_x, torch.full_like(var_x, float("nan")))
    rho_prime = s[..., 5].square() * s[..., 4] / n
    return ((rho.log().abs() + rho_prime.log().abs()) / 2).sum(-1)


@dataclass
class EpochResult:
    """One training epoch of the ensemble, one entry per member: mean training loss,
    mean per-step Score (None if no activation layer is monitored) and Σ|E W|."""

    loss: list[float]
    score: list[float | None]
    weight_mean_abs_sum: list[float]
    skipped_batches: list[int]


class Ensemble:
    """K trials of one architecture trained as one vmapped model.

    Args:
        trials: the members, each made by ``study.build`` under
            ``torch.manual_seed(seed)`` (and possibly restored from a checkpoint):
            the same architecture, a ``torch.optim.SGD`` with the same settings over
            ``model.parameters()``, no scheduler.
        spec: the study's :class:`~anact.experiments.studies.EnsembleSpec`.
        config: the study's settings.
        data: the study's data (``study.load_data``).

    The members' own models and optimizers are left as they were until
    :meth:`write_back` copies member k's state into them.
    """

    def __init__(
        self, trials: Sequence[Any], spec: Any, config: Mapping[str, Any], data: Any
    ) -> None:
        if not trials:
            raise ValueError("an ensemble needs at least one member")
        self.trials, self.spec, self.config, self.data = list(trials), spec, config, data
        hyper = _sgd_settings(self.trials)
        models = [t.model for t in self.trials]
        names = [n for n, _ in models[0].named_parameters()]
        for m in models[1:]:
            if [n for n, _ in m.named_parameters()] != names:
                raise ValueError("ensemble members must share one architecture")
        with torch.no_grad():
            self.params = {
                n: torch.stack([dict(m.named_parameters())[n] for m in models]).requires_grad_()
                for n in names
            }
            self.buffers = {
                n: torch.stack([dict(m.named_buffers())[n] for m in models])
                for n, _ in models[0].named_buffers()
            }
        self.optimizer = torch.optim.SGD([self.params[n] for n in names], **hyper)
        self._stack_optimizer_state(names)
        self._names = names
        self.template = copy.deepcopy(models[0]).to("meta")  # structure only
        _check_normalized_layers(self.template)
        self.probe = _Probe(self.template)
        self._weights = [  # Σ|E W| over every Linear and Conv weight (Figure 4)
            f"{n}.weight" for n, m in self.template.named_modules()
            if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
        ]  # fmt: skip
        self._skip_counters = [n for n in self.buffers if n.endswith("num_batches_skipped")]

    @property
    def size(self) -> int:
        return len(self.trials)

    # ------------------------------------------------------------------ training

    def _member_step(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One member's forward pass and loss (run under vmap), with its layer records."""
        self.probe.start()
        try:
            loss = self.spec.loss(functional_call(self.template, (params, buffers), (x,)), y)
        finally:
            records = self.probe.stop(like=x)
        return loss, records

    def train_epoch(
        self,
        orders: Sequence[torch.Generator],
        after_step: Callable[[], None] | None = None,
    ) -> EpochResult:
        """One epoch for every member; member k draws its batches from ``orders[k]``.
        ``after_step`` is called after every optimizer step (e.g. a heartbeat)."""
        if len(orders) != self.size:
            raise ValueError(f"need one generator per member ({self.size}), got {len(orders)}")
        self.template.train()
        x, y = self.spec.train_set(self.data)
        skipped_before = self._skipped()
        step = vmap(self._member_step, randomness="error")
        total = torch.zeros(self.size, device=x.device)
        sums, counts, weight_means = [], [], []
        member_batches = [self.spec.batches(self.config, self.data, o) for o in orders]
        try:
            steps = list(zip(*member_batches, strict=True))
        except ValueError:
            raise ValueError("ensemble members drew different numbers of batches") from None
        for batch in steps:
            idx = torch.stack(batch)  # (members, batch)
            with _quiet_vmap_fallback():
                losses, records = step(self.params, self.buffers, x[idx], y[idx])
                self.optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()  # member k's parameters get ∂loss_k only
            self.optimizer.step()
            total += losses.detach() * idx.shape[1]
            sums.append(records.detach())
            counts.append(self.probe.counts)
            weight_means.append(self._weight_means())  # after the step, as the monitor
            if after_step is not None:
                after_step()
        n = x.shape[0]
        wsum = torch.stack(weight_means).double().abs().sum(-1).mean(0)  # mean Σ_i|E[W_i]|
        if self.probe.layers:
            steps_sums = torch.stack(sums)
            score = _score(steps_sums, torch.tensor(counts, device=steps_sums.device))
            score = score.mean(0).tolist()
        else:  # no monitored layer: no Score (the runner stores NULL)
            score = [None] * self.size
        skipped = [a - b for a, b in zip(self._skipped(), skipped_before, strict=True)]
        return EpochResult([t / n for t in total.tolist()], score, wsum.tolist(), skipped)

    @torch.no_grad()
    def _weight_means(self) -> Tensor:
        """E[W_i] of every Linear and Conv weight, shape (members, weights)."""
        means = [
            self.params[n].mean(dim=tuple(range(1, self.params[n].dim())), dtype=torch.float32)
            for n in self._weights
        ]
        if not means:
            return torch.zeros(self.size, 0)
        return torch.stack(means, dim=1)

    def _skipped(self) -> list[int]:
        if not self._skip_counters:
            return [0] * self.size
        return torch.stack([self.buffers[n] for n in self._skip_counters]).sum(0).tolist()

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float | None]]:
        """Top-1 validation accuracy (percent) per member, as the study's ``evaluate``."""
        self.template.eval()
        vx, vy = self.spec.val_set(self.data)
        forward = vmap(
            lambda p, b, x: functional_call(self.template, (p, b), (x,)), in_dims=(0, 0, None)
        )
        correct = torch.zeros(self.size, dtype=torch.long, device=vx.device)
        eb = int(self.spec.eval_batch)
        for i in range(0, vx.shape[0], eb):
            with _quiet_vmap_fallback():
                logits = forward(self.params, self.buffers, vx[i : i + eb])
            correct += (logits.argmax(-1) == vy[i : i + eb]).sum(-1)
        return [
            {"val_acc": 100.0 * c / vx.shape[0], "val_acc_top5": None} for c in correct.tolist()
        ]

    # ------------------------------------------------------------------ state

    def _stack_optimizer_state(self, names: list[str]) -> None:
        """Stack the members' SGD state (momentum buffers after a resume)."""
        for i, n in enumerate(names):
            states = [t.optimizer.state.get(t.optimizer.param_groups[0]["params"][i], {})
                      for t in self.trials]  # fmt: skip
            keys = set(states[0])
            if any(set(s) != keys for s in states):
                raise ValueError(
                    "ensemble members are at different optimizer states; group members by "
                    "the epoch they resume from"
                )
            if keys:
                self.optimizer.state[self.params[n]] = {
                    k: _stack_or_same([s[k] for s in states]) for k in keys
                }

    @torch.no_grad()
    def write_back(self, k: int) -> Any:
        """Copy member k's parameters, buffers and optimizer state into its trial;
        returns the trial (then ``runner._trial_state(trial)`` is its checkpoint)."""
        trial = self.trials[k]
        for n, p in trial.model.named_parameters():
            p.copy_(self.params[n][k])
        for n, b in trial.model.named_buffers():
            b.copy_(self.buffers[n][k])
        member_params = trial.optimizer.param_groups[0]["params"]
        for n, p in zip(self._names, member_params, strict=True):
            state = self.optimizer.state.get(self.params[n], {})
            trial.optimizer.state[p] = {
                key: v[k].clone() if isinstance(v, Tensor) and v.dim() else v
                for key, v in state.items()
            }
        return trial


@contextlib.contextmanager
def _quiet_vmap_fallback() -> Iterator[None]:
    """Silence vmap's "performance drop" warning: the library's in-place derivatives
    (``clamp_``, ``square_``, ...) run through vmap's per-member fallback, which is
    correct and, on CPU, a negligible cost (see docs/ensemble.md)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        yield


def _stack_or_same(values: list[Any]) -> Any:
    if all(isinstance(v, Tensor) for v in values):
        if values[0].dim() == 0 and all(bool(v == values[0]) for v in values):
            return values[0].clone()  # a shared scalar (e.g. a step count)
        return torch.stack(values)
    if any(v != values[0] for v in values):
        raise ValueError(f"ensemble members disagree on optimizer state {values!r}")
    return values[0]


def _sgd_settings(trials: Sequence[Any]) -> dict[str, Any]:
    """The members' common SGD hyper-parameters; ValueError for anything else."""
    settings = []
    for t in trials:
        opt = t.optimizer
        if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
            raise ValueError(
                f"ensemble training needs torch.optim.SGD with one parameter group (its "
                f"update is elementwise, so identical per member); got "
                f"{type(opt).__name__} with {len(opt.param_groups)} group(s)"
            )
        if list(map(id, opt.param_groups[0]["params"])) != list(map(id, t.model.parameters())):
            raise ValueError("ensemble training needs an optimizer over model.parameters()")
        if t.scheduler is not None or t.extra_state:
            raise ValueError("ensemble training supports no scheduler and no extra state")
        settings.append({k: v for k, v in opt.param_groups[0].items() if k != "params"})
    if any(s != settings[0] for s in settings):
        raise ValueError("ensemble members must share their optimizer settings")
    return settings[0]


# ---------------------------------------------------------------------- the driver


def train_ensemble(
    study: Any,
    config: Mapping[str, Any],
    activation: str,
    seeds: Sequence[int],
    *,
    store: Any,
    checkpoint_dir: Path,
    device: torch.device,
    data: Any,
    progress: Any = None,
) -> dict[int, str]:
    """Train (or resume, or skip) the runs ``seeds`` of one activation as ensembles.

    The counterpart of :func:`anact.experiments.runner.run_one` for several runs:
    the same run identity, claims, epoch rows (one per member and epoch; ``seconds``
    is the ensemble's epoch time divided by its size) and per-run checkpoints,
    written at each epoch's end. Runs resuming from different epochs train as
    separate ensembles, one per start epoch. Returns ``{seed: "done" | "skipped" |
    "busy"}``.
    """
    from anact.experiments import runner

    spec = getattr(study, "ensemble", None)
    if spec is None:
        raise ValueError(
            f"study {study.name!r} does not support ensemble training (it declares no "
            "EnsembleSpec); run it without --ensemble"
        )
    result: dict[int, str] = {}
    claimed: list[tuple[int, int, Path]] = []
    for seed in seeds:
        state, run_id, ckpt_path = runner._claim_run(
            study, config, activation, seed, store, checkpoint_dir
        )
        result[seed] = state
        if state == "claimed":
            claimed.append((seed, run_id, ckpt_path))
    if not claimed:
        return result
    open_runs = {run_id for _, run_id, _ in claimed}
    try:
        if callable(data):
            data = data()
        groups: dict[int, list[_Member]] = {}
        for seed, run_id, ckpt_path in claimed:
            trial, order, start = runner._start_trial(
                study, config, activation, seed, data, device, run_id, ckpt_path
            )
            member = _Member(seed, run_id, ckpt_path, trial, order, runner._rng_state())
            store.truncate_epochs(run_id, start)
            if progress is not None:
                progress.update(start)
            groups.setdefault(start, []).append(member)
        for start, members in sorted(groups.items()):
            _train_group(members, start, spec, config, activation, store, data, progress)
            for m in members:
                store.set_status(m.run_id, "done")
                m.ckpt_path.unlink(missing_ok=True)
                open_runs.discard(m.run_id)
                result[m.seed] = "done"
    except KeyboardInterrupt:
        for run_id in open_runs:
            store.set_status(run_id, "pending")
        raise
    except BaseException:
        error = traceback.format_exc(limit=20)
        for run_id in open_runs:
            store.set_status(run_id, "failed", error)
        raise
    return result


@dataclass
class _Member:
    seed: int
    run_id: int
    ckpt_path: Path
    trial: Any
    order: torch.Generator
    rng: dict[str, Any]  # the torch RNG state the run alone would have (training draws none)


def _train_group(
    members: list[_Member],
    start: int,
    spec: Any,
    config: Mapping[str, Any],
    activation: str,
    store: Any,
    data: Any,
    progress: Any,
) -> None:
    from anact.experiments import runner

    ensemble = Ensemble([m.trial for m in members], spec, config, data)
    heartbeat = runner._Heartbeat(store, [m.run_id for m in members])
    for epoch in range(start + 1, int(config["epochs"]) + 1):
        t0 = time.perf_counter()
        result = ensemble.train_epoch([m.order for m in members], heartbeat)
        metrics = ensemble.evaluate()
        seconds = (time.perf_counter() - t0) / ensemble.size
        if any(result.skipped_batches):
            warnings.warn(
                f"{activation}, epoch {epoch}: mini-batches that could not define the "
                "activation statistics were left out of the running statistics (seeds "
                + ", ".join(f"{m.seed}: {s}" for m, s in
                            zip(members, result.skipped_batches, strict=True) if s)
                + ")", AF.StatisticsWarning, stacklevel=2,
            )  # fmt: skip
        for k, m in enumerate(members):
            runner._record_epoch(
                store, m.run_id, epoch, loss=result.loss[k], metrics=metrics[k],
                score=result.score[k], weight_mean_abs_sum=result.weight_mean_abs_sum[k],
                seconds=seconds, mode="ensemble",
            )  # fmt: skip
        for k, m in enumerate(members):
            ensemble.write_back(k)
            runner._save_run_checkpoint(m.ckpt_path, m.run_id, epoch, m.trial, m.order, m.rng)
        if progress is not None:
            accs = [mt["val_acc"] for mt in metrics]
            progress.set_postfix_str(
                f"{activation} ×{ensemble.size} epoch {epoch}: {min(accs):.2f}-{max(accs):.2f}%"
            )
            progress.update(ensemble.size)
