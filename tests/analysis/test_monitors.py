"""ConvergenceMonitor against a direct float64 computation on the captured pre-activations."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import anact
import anact.analysis.monitors as M
from anact.analysis import ConvergenceMonitor, activation_of, weight_mean_abs_sum
from anact.functional import StatisticsWarning


@pytest.fixture(autouse=True, params=["c_sums", "torch_sums"])
def sums_backend(request, monkeypatch):
    """Every test runs on both ways of summing a CPU layer: the C power sums built with
    the package, and the PyTorch fallback of an install without a compiler."""
    if request.param == "torch_sums":
        monkeypatch.setattr(M, "_c_power_sums", None)
    elif M._c_power_sums is None:
        pytest.skip("anact._powersums is not built (installed without a C compiler)")
    return request.param

# independent float64 formulas of δ and δ' (numpy), keyed by registry name
_NP = {
    "relu": (lambda x, p: np.maximum(x, 0), lambda x, p: (x > 0).astype(float)),
    "lrelu": (
        lambda x, p: np.where(x > 0, x, p["negative_slope"] * x),
        lambda x, p: np.where(x > 0, 1.0, p["negative_slope"]),
    ),
    "tanh": (lambda x, p: np.tanh(x), lambda x, p: 1 - np.tanh(x) ** 2),
    "elu": (
        lambda x, p: np.where(x > 0, x, p["alpha"] * np.expm1(np.minimum(x, 0))),
        lambda x, p: np.where(x > 0, 1.0, p["alpha"] * np.exp(np.minimum(x, 0))),
    ),
    "swish": (
        lambda x, p: x / (1 + np.exp(-x)),
        lambda x, p: 1 / (1 + np.exp(-x)) * (1 + x * (1 - 1 / (1 + np.exp(-x)))),
    ),
    "sigmoid": (
        lambda x, p: 1 / (1 + np.exp(-x)),
        lambda x, p: np.exp(-x) / (1 + np.exp(-x)) ** 2,
    ),
}


class Capture:
    """Records each activation layer's input and output in float64 (pre-hook: before in-place)."""

    def __init__(self, model):
        self.inputs, self.outputs, self.handles = {}, {}, []
        for name, m in model.named_modules():
            if activation_of(m) is None:
                continue
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(m, args):
            self.inputs[name] = args[0].detach().double().numpy().copy()
        return hook

    def _post(self, name):
        def hook(m, args, out):
            self.outputs[name] = out.detach().double().numpy().copy()
        return hook


def _expected_plain(x, act):
    f, df = _NP[act.name]
    d, dd = f(x, act.params), df(x, act.params)
    return d.var() / x.var(), np.mean(dd**2)


def _score(pairs):
    return sum((abs(math.log(r)) + abs(math.log(rp))) / 2 for r, rp in pairs)  # eq. 22


def _train_steps(model, mon, cap, steps=3, n_in=5, seed=0, forward=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    captured = []
    for _ in range(steps):
        x = torch.randn(64, n_in, generator=g) * 1.5 + 0.3
        out = model(x) if forward is None else forward(model, x)
        loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = mon.step()
        w64 = sum(
            abs(m.weight.detach().double().mean().item())
            for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)
        )
        captured.append((rec, dict(cap.inputs), dict(cap.outputs), w64))
    return captured


def test_plain_model_matches_float64():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(),
        nn.Linear(16, 16), nn.LeakyReLU(0.2),
        nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.ELU(alpha=0.7),
        nn.Linear(16, 16), nn.SiLU(),
        nn.Linear(16, 3),
    )
    cap = Capture(model)
    with ConvergenceMonitor(model) as mon:
        assert [a.name for a in mon.layers.values()] == ["relu", "lrelu", "tanh", "elu", "swish"]
        captured = _train_steps(model, mon, cap)
        scores = []
        for rec, ins, outs, w64 in captured:
            pairs = []
            for name, act in mon.layers.items():
                x, y = ins[name], outs[name]
                rho, rho_p = _expected_plain(x, act)
                got = rec["layers"][name]
                np.testing.assert_allclose(got["rho"], rho, rtol=1e-4)
                np.testing.assert_allclose(got["rho_prime"], rho_p, rtol=1e-4)
                # a plain layer is its bare δ: the same numbers
                np.testing.assert_allclose(got["delta_rho"], rho, rtol=1e-4)
                np.testing.assert_allclose(got["lam"], math.sqrt((rho + rho_p) / (2 * rho * rho_p)),
                                           rtol=1e-4)
                np.testing.assert_allclose(got["in_mean"], x.mean(), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(got["in_var"], x.var(), rtol=1e-4)
                np.testing.assert_allclose(got["out_mean"], y.mean(), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(got["out_var"], y.var(), rtol=1e-4)
                pairs.append((rho, rho_p))
            scores.append(_score(pairs))
            np.testing.assert_allclose(rec["score"], scores[-1], rtol=1e-4)
            np.testing.assert_allclose(rec["weight_mean_abs_sum"], w64, rtol=1e-5)
        summ = mon.epoch_summary()
        assert summ["steps"] == 3
        np.testing.assert_allclose(summ["score"], np.mean(scores), rtol=1e-4)
        np.testing.assert_allclose(
            summ["weight_mean_abs_sum"], np.mean([c[3] for c in captured]), rtol=1e-5
        )
        first = next(iter(mon.layers))
        np.testing.assert_allclose(
            summ["layers"][first]["rho"],
            np.mean([_expected_plain(c[1][first], mon.layers[first])[0] for c in captured]),
            rtol=1e-4,
        )
    for h in cap.handles:
        h.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "module,name,params",
    [
        (nn.ReLU(), "relu", {}),
        (nn.SiLU(), "swish", {}),
        (nn.Tanh(), "tanh", {}),
        (nn.LeakyReLU(0.3), "lrelu", {"negative_slope": 0.3}),
        (nn.ELU(alpha=0.5), "elu", {"alpha": 0.5}),
        (nn.SELU(), "selu", {}),
        (nn.GELU(), "gelu", {}),
        (nn.Mish(), "mish", {}),
        (nn.Softplus(beta=2.0, threshold=5.0), "softplus", {"beta": 2.0, "threshold": 5.0}),
        (nn.Hardswish(), "hardswish", {}),
        (nn.Sigmoid(), "sigmoid", {}),
    ],
)
def test_plain_modules_are_recognised_with_their_parameters(module, name, params):
    act = activation_of(module)
    assert act.name == name and act.params == params
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(act.fn(x), module(x))


def test_non_activations_are_ignored():
    for m in (nn.Linear(2, 2), nn.Identity(), nn.BatchNorm1d(3), nn.Dropout()):
        assert activation_of(m) is None
    mon = ConvergenceMonitor(nn.Sequential(nn.Linear(2, 2)))
    assert mon.layers == {}


def test_inplace_relu_reads_the_input_before_it_is_overwritten():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(inplace=True), nn.Linear(32, 2))
    cap = Capture(model)
    mon = ConvergenceMonitor(model)
    ((rec, ins, outs, _),) = _train_steps(model, mon, cap, steps=1)
    x = ins["1"]
    assert (x < 0).any()
    rho, rho_p = _expected_plain(x, mon.layers["1"])
    np.testing.assert_allclose(rec["layers"]["1"]["rho"], rho, rtol=1e-4)
    np.testing.assert_allclose(rec["layers"]["1"]["rho_prime"], rho_p, rtol=1e-4)
    np.testing.assert_allclose(rec["layers"]["1"]["in_mean"], x.mean(), rtol=1e-4)
    mon.remove()


def test_normalized_and_gpn_layers_use_their_scale():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(5, 32), anact.NReLU(),
        nn.Linear(32, 32), anact.GPN("swish"),
        nn.Linear(32, 32), anact.NSwish(center=False),
        nn.Linear(32, 2),
    )
    cap = Capture(model)
    mon = ConvergenceMonitor(model)
    assert [(n, a.name) for n, a in mon.layers.items()] == [
        ("1", "relu"), ("3", "swish"), ("5", "swish")
    ]
    captured = _train_steps(model, mon, cap, steps=3)
    for rec, ins, outs, _ in captured:
        pairs = []
        for name, act in mon.layers.items():
            x, y = ins[name], outs[name]
            f, df = _NP[act.name]
            d, dd = f(x, act.params), df(x, act.params)
            # the layer computes c·(δ(x) − shift) with a constant c: c² = Var[y]/Var[δ(x)]
            c2 = y.var() / d.var()
            rho, rho_p = y.var() / x.var(), c2 * np.mean(dd**2)  # eq. 5-6 of the whole layer
            got = rec["layers"][name]
            np.testing.assert_allclose(got["rho"], rho, rtol=1e-4)
            np.testing.assert_allclose(got["rho_prime"], rho_p, rtol=1e-4)
            np.testing.assert_allclose(got["delta_rho"], d.var() / x.var(), rtol=1e-4)
            np.testing.assert_allclose(got["delta_rho_prime"], np.mean(dd**2), rtol=1e-4)
            pairs.append((rho, rho_p))
        np.testing.assert_allclose(rec["score"], _score(pairs), rtol=1e-4)
    gpn = captured[-1][0]["layers"]["3"]
    np.testing.assert_allclose(
        gpn["rho_prime"] / gpn["delta_rho_prime"], model[3].a ** 2, rtol=1e-5
    )


def test_channelwise_normalized_activation():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), anact.NReLU(4, channel_dim=1), nn.Conv2d(4, 1, 1)
    )
    cap = Capture(model)
    mon = ConvergenceMonitor(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(8, 2, 6, 6) + 0.5).square().mean().backward()
        opt.step()
        opt.zero_grad()
        rec = mon.step()
    x, y = cap.inputs["1"], cap.outputs["1"]
    d, dd = np.maximum(x, 0), (x > 0).astype(float)
    # per-channel c_k: c_k² = Var_k[y] / Var_k[δ(x)]
    c = np.sqrt(y.var(axis=(0, 2, 3)) / d.var(axis=(0, 2, 3)))[None, :, None, None]
    assert np.ptp(c) > 1e-3  # the channels really have different scales
    got = rec["layers"]["1"]
    # ρ of the whole layer is Var[y]/Var[x]; ρ' weighs each element by its channel's c²
    np.testing.assert_allclose(got["rho"], y.var() / x.var(), rtol=1e-4)
    np.testing.assert_allclose(got["rho_prime"], np.mean((c * dd) ** 2), rtol=1e-4)
    np.testing.assert_allclose(got["delta_rho"], d.var() / x.var(), rtol=1e-4)
    np.testing.assert_allclose(got["delta_rho_prime"], np.mean(dd**2), rtol=1e-4)
    w64 = sum(abs(m.weight.detach().double().mean().item()) for m in (model[0], model[2]))
    np.testing.assert_allclose(rec["weight_mean_abs_sum"], w64, rtol=1e-5)
    mon.remove()


def test_mask_of_a_normalized_activation_is_used():
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 8)
            self.act = anact.NReLU()

        def forward(self, x, mask):
            return self.act(self.lin(x), mask=mask)

    net = Net()
    x = torch.randn(4, 10, 3)
    mask = torch.zeros(4, 10, 1, dtype=torch.bool)
    mask[:, :6] = True
    x[~mask.expand_as(x)] = 50.0  # padding: wild values that must not enter the statistics
    with torch.no_grad():
        h = net.lin(x).double().numpy()
    mon = ConvergenceMonitor(net)
    out = net(x, mask).detach().double().numpy()
    rec = mon.step()
    m = np.broadcast_to(mask.numpy(), h.shape)
    hx, y = h[m], out[m]
    d, dd = np.maximum(hx, 0), (hx > 0).astype(float)
    c2 = y.var() / d.var()
    got = rec["layers"]["act"]
    np.testing.assert_allclose(got["rho"], y.var() / hx.var(), rtol=1e-4)
    np.testing.assert_allclose(got["rho_prime"], c2 * np.mean(dd**2), rtol=1e-4)
    np.testing.assert_allclose(got["in_mean"], hx.mean(), rtol=1e-4)
    np.testing.assert_allclose(got["out_var"], y.var(), rtol=1e-4)


def test_eval_passes_reset_remove_and_errors():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
    mon = ConvergenceMonitor(model)
    with pytest.raises(RuntimeError, match="no monitored activation layer"):
        mon.step()
    model.eval()
    model(torch.randn(16, 3))
    with pytest.raises(RuntimeError):
        mon.step()  # eval forward passes are not recorded
    model.train()
    model(torch.randn(16, 3))
    mon.step()
    assert mon.epoch_summary()["steps"] == 1
    assert mon.epoch_summary(reset=True)["steps"] == 1
    summ = mon.epoch_summary()
    assert summ["steps"] == 0 and math.isnan(summ["score"])
    model(torch.randn(16, 3))
    mon.reset()
    with pytest.raises(RuntimeError):
        mon.step()  # reset also drops the unclosed forward pass
    mon.remove()
    assert not model[1]._forward_hooks
    model(torch.randn(16, 3))
    assert mon.history == []
    with pytest.raises(TypeError, match="nn.Module"):
        ConvergenceMonitor(lambda x: x)


def test_forward_passes_within_a_step_are_pooled():
    # gradient accumulation: the step's statistics are over all elements of its passes
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
    cap = Capture(model)
    mon = ConvergenceMonitor(model)
    xs = []
    for k in range(2):
        model(torch.randn(32, 3) * (1 + k) + k)
        xs.append(cap.inputs["1"])
    rec = mon.step()
    rho, rho_p = _expected_plain(np.concatenate(xs), mon.layers["1"])
    np.testing.assert_allclose(rec["layers"]["1"]["rho"], rho, rtol=1e-4)
    np.testing.assert_allclose(rec["layers"]["1"]["rho_prime"], rho_p, rtol=1e-4)


def test_large_layer_is_chunked_exactly():
    # more elements than one chunk (2**17): the chunked power sums must add up
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Flatten(),
                          nn.Linear(4 * 40 * 40, 1))
    cap = Capture(model)
    mon = ConvergenceMonitor(model)
    model(torch.randn(24, 1, 40, 40) * 2 + 0.5)  # 153,600 activations
    rec = mon.step()["layers"]["1"]
    x = cap.inputs["1"]
    rho, rho_p = _expected_plain(x, mon.layers["1"])
    np.testing.assert_allclose(rec["rho"], rho, rtol=1e-4)
    np.testing.assert_allclose(rec["rho_prime"], rho_p, rtol=1e-4)
    np.testing.assert_allclose(rec["in_var"], x.var(), rtol=1e-4)


def test_weight_mean_abs_sum_float64():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2),
                          nn.BatchNorm1d(2))
    with torch.no_grad():
        model[3].weight.add_(0.2)  # a weight matrix with a clearly nonzero mean
    expected = sum(
        abs(w.detach().double().mean().item()) for w in (model[0].weight, model[3].weight)
    )
    np.testing.assert_allclose(weight_mean_abs_sum(model), expected, rtol=1e-6)
    assert weight_mean_abs_sum(nn.ReLU()) == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_normalized_activation_without_running_stats(masked):
    # the scale then comes from the batch itself: λ(ρ_M, ρ'_M) + β·tanh α (eq. 13, 15)
    torch.manual_seed(9)
    act = anact.NSwish(track_running_stats=False)
    with torch.no_grad():
        act.alpha.fill_(0.7)
    x = torch.randn(6, 20, 1) * 2 + 1
    mask = torch.ones(6, 20, 1, dtype=torch.bool)
    if masked:
        mask[:, 12:] = False
    mon = ConvergenceMonitor(act)
    y = act(x, mask=mask) if masked else act(x)
    got = mon.step()["layers"]["NSwish"]
    m = mask.numpy().ravel()
    xs, ys = x.double().numpy().ravel()[m], y.detach().double().numpy().ravel()[m]
    f, df = _NP["swish"]
    d, dd = f(xs, {}), df(xs, {})
    rho_m, rho_pm = d.var() / xs.var(), np.mean(dd**2)
    c = math.sqrt((rho_m + rho_pm) / (2 * rho_m * rho_pm)) + 0.3 * math.tanh(0.7)
    np.testing.assert_allclose(got["rho"], ys.var() / xs.var(), rtol=1e-4)
    np.testing.assert_allclose(got["rho"], c * c * rho_m, rtol=1e-4)
    np.testing.assert_allclose(got["rho_prime"], c * c * rho_pm, rtol=1e-4)
    np.testing.assert_allclose(got["lam"], math.sqrt((rho_m + rho_pm) / (2 * rho_m * rho_pm)),
                               rtol=1e-4)


def test_a_module_reused_in_one_forward_counts_once_per_use():
    torch.manual_seed(10)

    class Net(nn.Module):  # one nn.ReLU shared by both hidden layers (a common idiom)
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))

    net = Net()
    seen = []
    net.act.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().numpy()))
    mon = ConvergenceMonitor(net)
    for _ in range(2):  # two forward passes in one step: each use is pooled with itself
        net(torch.randn(32, 4) + 1)
    rec = mon.step()
    assert list(rec["layers"]) == ["act", "act#1"]
    act = mon.layers["act"]
    pairs = []
    for name, xs in (("act", seen[0::2]), ("act#1", seen[1::2])):
        rho, rho_p = _expected_plain(np.concatenate(xs), act)
        np.testing.assert_allclose(rec["layers"][name]["rho"], rho, rtol=1e-4)
        np.testing.assert_allclose(rec["layers"][name]["rho_prime"], rho_p, rtol=1e-4)
        pairs.append((rho, rho_p))
    np.testing.assert_allclose(rec["score"], _score(pairs), rtol=1e-4)
    assert list(mon.epoch_summary()["layers"]) == ["act", "act#1"]


@pytest.mark.parametrize(
    "name,params",
    [(n, {}) for n in anact.list_activations()]
    + [("lrelu", {"negative_slope": 0.3}), ("elu", {"alpha": 0.4}),
       ("softplus", {"beta": 2.0, "threshold": 3.0})],
)
def test_derivative_square_sums_match_float64(name, params):
    # the fast Σδ'² (sign counts, fused backward kernels, chunks) vs the registered δ' in float64
    from anact.analysis.monitors import _CHUNK, _dsq_sum, _shortcut_for

    act = anact.get_activation(name, **params)
    x = torch.randn(2 * _CHUNK + 1001, generator=torch.Generator().manual_seed(0)) * 3
    x[:7] = torch.tensor([0.0, -3.0, 3.0, 1.5, 25.0, -25.0, 0.0])  # kinks of some functions
    g = act.derivative(x.double())
    expected = torch.dot(g, g)
    prime = _shortcut_for(act)
    for buf in (None, torch.empty(x.numel() + 5)):  # fresh tensors; a reused scratch buffer
        got = _dsq_sum(x, act, prime, buf).double()
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=0)


def test_shortcuts_are_only_used_for_the_functions_they_match():
    from anact.analysis.monitors import _DSQ_SHORTCUTS, _dsq_sum, _shortcut_for

    for name in ("relu", "lrelu", "swish", "gelu", "mish", "elu", "selu", "softplus"):
        assert _shortcut_for(anact.get_activation(name)) is _DSQ_SHORTCUTS[name], name
    x = torch.randn(1000, dtype=torch.float32)
    # a different function that happens to be called "relu" gets the generic path
    impostor = anact.Activation("relu", fn=torch.tanh, derivative=lambda t: 1 - torch.tanh(t) ** 2)
    assert _shortcut_for(impostor) is None
    g = impostor.derivative(x.double())
    torch.testing.assert_close(_dsq_sum(x, impostor).double(), torch.dot(g, g), rtol=1e-5, atol=0)


def test_max_rows_uses_the_first_rows_but_the_whole_batch_scale():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 12), anact.NSwish(track_running_stats=False), nn.Tanh())
    cap = Capture(model)
    mon = ConvergenceMonitor(model, max_rows=5)
    model(torch.randn(40, 3) * 2)
    rec = mon.step()["layers"]
    x, y = cap.inputs["1"], cap.outputs["1"]
    f, df = _NP["swish"]
    d, dd = f(x, {}), df(x, {})
    c2 = y.var() / d.var()  # the scale the forward used, from all 40 rows
    # a normalized layer hands over its own whole-batch moments: max_rows does not apply
    np.testing.assert_allclose(rec["1"]["rho"], y.var() / x.var(), rtol=1e-4)
    np.testing.assert_allclose(rec["1"]["rho_prime"], c2 * np.mean(dd**2), rtol=1e-4)
    # without them (as inside torch.compile, where the layer calls no moments hook) the
    # monitor computes on the first rows, with the scale of the whole batch
    model[1]._moments_hooks.clear()
    model(torch.randn(40, 3) * 2)
    rec = mon.step()["layers"]
    x, y = cap.inputs["1"], cap.outputs["1"]
    d, dd = f(x, {}), df(x, {})
    c2 = y.var() / d.var()
    xs, ys, dds = x[:5], y[:5], dd[:5]
    np.testing.assert_allclose(rec["1"]["rho"], ys.var() / xs.var(), rtol=1e-4)
    np.testing.assert_allclose(rec["1"]["rho_prime"], c2 * np.mean(dds**2), rtol=1e-4)
    xt = cap.inputs["2"][:5]
    rho, rho_p = _expected_plain(xt, mon.layers["2"])
    np.testing.assert_allclose(rec["2"]["rho"], rho, rtol=1e-4)
    np.testing.assert_allclose(rec["2"]["rho_prime"], rho_p, rtol=1e-4)
    with pytest.raises(ValueError, match="max_rows"):
        ConvergenceMonitor(model, max_rows=0)


@pytest.mark.parametrize(
    "name,params",
    [("relu", {}), ("lrelu", {}), ("lrelu", {"negative_slope": 0.3}), ("tanh", {}),
     ("sigmoid", {}), ("elu", {}), ("elu", {"alpha": 0.4}), ("selu", {}), ("swish", {})],
)
def test_derivative_from_the_output_matches_float64(name, params):
    # plain layers take δ' from their output y = δ(x) (1 − y², y > 0, y/x for Swish, …)
    from anact.analysis.monitors import _CHUNK, _out_dsq_sum, _out_shortcut_for

    act = anact.get_activation(name, **params)
    x = torch.randn(2 * _CHUNK + 1001, generator=torch.Generator().manual_seed(1)) * 3
    x[:8] = torch.tensor([0.0, -3.0, 3.0, 1e-30, -1e-30, 25.0, -25.0, -0.0])
    prime = _out_shortcut_for(act, have_x=True)
    assert prime is not None
    g = act.derivative(x.double())
    for buf in (None, torch.empty(x.numel() + 5)):
        got = _out_dsq_sum(x, act.fn(x), act, prime, buf).double()
        torch.testing.assert_close(got, torch.dot(g, g), rtol=2e-5, atol=0)


def test_output_derivative_needs_the_input_only_for_swish_and_checks_the_registry():
    from anact.analysis.monitors import _out_shortcut_for

    assert _out_shortcut_for(anact.get_activation("swish"), have_x=False) is None  # in place
    assert _out_shortcut_for(anact.get_activation("tanh"), have_x=False) is not None
    assert _out_shortcut_for(anact.get_activation("gelu"), have_x=True) is None  # no formula
    impostor = anact.Activation("tanh", lambda x: torch.tanh(2 * x),
                                lambda x: 2 / torch.cosh(2 * x) ** 2)
    assert _out_shortcut_for(impostor, have_x=True) is None


@pytest.mark.parametrize("inplace", [False, True])
def test_plain_layers_whose_derivative_comes_from_the_output(inplace):
    torch.manual_seed(5)
    acts = [nn.Tanh(), nn.Sigmoid(), nn.ELU(alpha=0.7, inplace=inplace), nn.SiLU(inplace=inplace),
            nn.ReLU(inplace=inplace)]
    layers = []
    for a in acts:
        layers += [nn.Linear(6, 6), a]
    model = nn.Sequential(*layers)
    cap = Capture(model)
    mon = ConvergenceMonitor(model)
    model(torch.randn(50, 6) * 2)
    rec = mon.step()["layers"]
    for name, act in mon.layers.items():
        rho, rho_p = _expected_plain(cap.inputs[name], act)
        np.testing.assert_allclose(rec[name]["rho"], rho, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(rec[name]["rho_prime"], rho_p, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("kind", ["per-tensor", "per-channel"])
def test_normalized_layers_report_the_same_numbers_on_the_fused_path(kind):
    # the layer hands its batch moments to the monitor on every backend
    torch.manual_seed(3)
    act = anact.NSwish() if kind == "per-tensor" else anact.NSwish(5, channel_dim=1)
    model = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 2))
    x = torch.randn(64, 4) * 2
    records = []
    for name in ("eager", "fused"):
        net = copy.deepcopy(model)
        mon = ConvergenceMonitor(net)
        with anact.kernels.backend(name):
            net(x)
        records.append(mon.step()["layers"]["1"])
        mon.remove()
    for key in ("rho", "rho_prime", "delta_rho", "delta_rho_prime", "in_var", "out_mean"):
        np.testing.assert_allclose(records[1][key], records[0][key], rtol=1e-5, err_msg=key)


def test_large_activations_use_fresh_buffers_and_the_same_numbers(monkeypatch, sums_backend):
    # over the scratch cap the monitor allocates instead of holding a buffer that large
    # (the C sums need no buffer for ReLU and SiLU)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 64), nn.SiLU(), nn.Linear(64, 64), nn.ReLU())
    x = torch.randn(300, 4)
    records = []
    for cap in (1 << 22, 1000):  # the second forces the fresh-buffer path
        monkeypatch.setattr(M, "_SCRATCH_MAX", cap)
        mon = ConvergenceMonitor(model)
        model(x)
        records.append(mon.step()["layers"])
        assert (mon._buf is None) == (cap == 1000 or sums_backend == "c_sums")
        mon.remove()
    for name in records[0]:
        for key in ("rho", "rho_prime", "in_var", "out_var"):
            np.testing.assert_allclose(records[1][name][key], records[0][name][key], rtol=1e-6)


@pytest.mark.parametrize("num_features", [None, 3])
def test_the_scale_finished_on_the_host_is_the_layers_scale(num_features):
    # a normalized layer with running statistics hands over ρ, ρ', α; step() computes
    # c = λ + β·tanh α in float64: the layer's scale(), ρ and ρ' floored at its eps
    m = anact.NReLU(num_features=num_features, channel_dim=1 if num_features else None, beta=0.7)
    shape = m.running_rho.shape
    with torch.no_grad():
        m.running_rho.copy_(torch.tensor([0.5, 1e-9, 2.0][: max(1, shape.numel())]).reshape(shape))
        m.running_rho_prime.copy_(torch.tensor([0.3, 0.8, 0.0][: max(1, shape.numel())])
                                  .reshape(shape))
        m.alpha.copy_(torch.tensor([0.4, -1.2, 3.0][: max(1, shape.numel())]).reshape(shape))
    args = [t.detach().double().numpy() if num_features else float(t.detach())
            for t in (m.running_rho, m.running_rho_prime, m.alpha)]
    got = M._running_scale(*args, m.eps, m.beta)
    np.testing.assert_allclose(got, m.scale().detach().double().numpy(), rtol=1e-6)


# --------------------------------------------------------------- empty and failed steps

_KEYS = {*M.LAYER_STATS, "lam"}


def _assert_nan_record(rec, names):
    assert math.isnan(rec["score"])
    assert list(rec["layers"]) == names
    for name in names:
        assert set(rec["layers"][name]) == _KEYS, name
        assert all(math.isnan(v) for v in rec["layers"][name].values()), (name, rec)


def _forward_steps(model, mon, batches):
    records = []
    for x in batches:
        model(x)
        records.append(mon.step())
    return records


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.ReLU()),  # the reported case
        lambda: nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)),  # read before forward
        lambda: nn.Sequential(nn.Linear(3, 3), nn.GELU()),  # δ' by torch, not from y
        lambda: anact.GPN("swish"),
    ],
    ids=["relu", "inplace-relu", "gelu", "gpn"],
)
@pytest.mark.parametrize("max_rows", [None, 4])
def test_an_empty_batch_gives_a_nan_record_and_leaves_later_steps_alone(make, max_rows):
    torch.manual_seed(12)
    model = make()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(10, 3, generator=g) * 2 + 0.5 for _ in range(2)]
    twin = copy.deepcopy(model)  # before the hooks: a copy would carry them
    mon = ConvergenceMonitor(model, max_rows=max_rows)
    model(torch.randn(0, 3))
    empty = mon.step()
    _assert_nan_record(empty, list(mon.layers))
    got = _forward_steps(model, mon, batches)
    fresh = ConvergenceMonitor(twin, max_rows=max_rows)
    want = _forward_steps(twin, fresh, batches)
    np.testing.assert_equal(got, want)  # the same numbers as without the empty step
    assert all(math.isfinite(r["score"]) for r in got)
    # the empty step counts as a NaN step in the summary, as for a normalized layer
    summ = mon.epoch_summary()
    assert summ["steps"] == 3 and math.isnan(summ["score"])
    assert all(math.isnan(summ["layers"][n]["rho"]) for n in mon.layers)
    # an empty pass pooled with a real one in the same step adds nothing
    model(torch.randn(0, 3))
    model(batches[0])
    np.testing.assert_equal(mon.step(), want[0])


@pytest.mark.parametrize(
    "norm",
    [lambda: anact.NReLU(), lambda: anact.NSwish(track_running_stats=False),
     lambda: anact.NReLU(8, channel_dim=-1)],
    ids=["running", "batch-stats", "per-channel"],
)
def test_empty_batch_gives_the_same_nan_record_for_every_kind_of_layer(norm):
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 8), norm(), nn.Linear(8, 8), anact.GPN("tanh"),
                          nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU())
    mon = ConvergenceMonitor(model)
    with pytest.warns(StatisticsWarning):  # the normalized layer's own report
        model(torch.randn(0, 3))
    _assert_nan_record(mon.step(), ["1", "3", "5", "7"])
    rec = _forward_steps(model, mon, [torch.randn(16, 3)])[0]
    assert all(math.isfinite(v) for s in rec["layers"].values() for v in s.values())
    summ = mon.epoch_summary()
    for name in mon.layers:  # every layer averages the NaN step alike
        assert all(math.isnan(summ["layers"][name][k]) for k in _KEYS), name


@pytest.mark.filterwarnings("ignore::anact.functional.StatisticsWarning")
@pytest.mark.parametrize("moments_hook", [True, False])
def test_all_masked_batch_gives_nan_records(moments_hook):
    # the normalized layer sees no unmasked element; the plain layer runs on the
    # unmasked elements only, an empty tensor
    torch.manual_seed(14)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.norm = anact.NReLU()
            self.act = nn.Tanh()

        def forward(self, x, mask):
            h = self.norm(self.lin(x), mask=mask)
            return self.act(h[mask.expand_as(h)])

    net = Net()
    if not moments_hook:  # as inside torch.compile: the monitor's own masked sums
        net.norm._moments_hooks.clear()
    mon = ConvergenceMonitor(net)
    x = torch.randn(2, 5, 3)
    net(x, torch.zeros(2, 5, 1, dtype=torch.bool))
    _assert_nan_record(mon.step(), ["norm", "act"])
    net(x, torch.ones(2, 5, 1, dtype=torch.bool))
    rec = mon.step()
    assert all(math.isfinite(rec["layers"][n]["rho"]) for n in ("norm", "act"))


def test_a_failed_step_propagates_and_does_not_poison_the_next(monkeypatch):
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh())
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(12, 3, generator=g) for _ in range(2)]
    twin = copy.deepcopy(model)
    mon = ConvergenceMonitor(model)
    model(torch.randn(12, 3) * 5 + 3)
    real_stats = M._stats

    def broken(s):
        raise FloatingPointError("injected")

    monkeypatch.setattr(M, "_stats", broken)
    with pytest.raises(RuntimeError, match="discarded") as info:
        mon.step()
    assert isinstance(info.value.__cause__, FloatingPointError)
    monkeypatch.setattr(M, "_stats", real_stats)
    assert mon.history == []
    with pytest.raises(RuntimeError, match="no monitored activation layer"):
        mon.step()  # nothing of the failed step is left
    got = _forward_steps(model, mon, batches)
    fresh = ConvergenceMonitor(twin)
    np.testing.assert_equal(got, _forward_steps(twin, fresh, batches))


@pytest.mark.filterwarnings("ignore::anact.functional.StatisticsWarning")
@pytest.mark.parametrize(
    "make", [nn.ReLU, anact.NReLU, lambda: anact.NReLU(track_running_stats=False),
             lambda: anact.GPN("relu")],
    ids=["relu", "nrelu", "nrelu-batch-stats", "gpn"],
)
def test_a_dead_layer_has_an_infinite_lambda(make):
    # ρ = ρ' = 0: λ² = (ρ + ρ')/(2ρρ') = 1/(2ρ) + 1/(2ρ') is +inf, not 0/0
    layer = make()
    mon = ConvergenceMonitor(layer)
    layer(-torch.rand(16, 3) - 0.1)
    (stats,) = mon.step()["layers"].values()
    assert stats["delta_rho"] == 0 and stats["delta_rho_prime"] == 0
    assert stats["lam"] == math.inf


def test_lambda_of_degenerate_statistics():
    rows = [{"delta_rho": r, "delta_rho_prime": rp} for r, rp in
            [(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (math.nan, 0.0), (0.0, math.nan), (1.0, 1.0)]]
    M._add_lambda(rows)
    lam = [s["lam"] for s in rows]
    assert lam[:3] == [math.inf] * 3 and math.isnan(lam[3]) and math.isnan(lam[4])
    assert lam[5] == 1.0


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_an_empty_weight_gives_a_nan_weight_sum_as_its_mean():
    model = nn.Sequential(nn.Linear(0, 3), nn.ReLU())
    mon = ConvergenceMonitor(model)
    model(torch.randn(5, 0))
    rec = mon.step()
    assert math.isnan(rec["weight_mean_abs_sum"]) and math.isnan(weight_mean_abs_sum(model))
