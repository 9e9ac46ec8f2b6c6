"""anact.convert: call-site conversion with the paper's three rules."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import anact
from anact.convert import ConversionError, FeatureBatchNorm

from .models import FunctionalNet, ResNet, Untraceable, resnet50_cifar100


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return resnet50_cifar100()


def test_resnet50_parameter_counts_match_the_paper(resnet50):
    # section 3.3: 23,705,252 parameters plain, 23,690,053 normalized (15,199 fewer)
    assert n_params(resnet50) == 23_705_252
    conv, report = anact.convert(resnet50, return_report=True)
    assert n_params(conv) == 23_690_053
    assert (report.params_before, report.params_after) == (23_705_252, 23_690_053)
    assert len(report.converted) == 1 + 2 * 16  # stem + two per bottleneck
    assert len(report.skipped) == 16  # the activation after each addition
    assert len(report.bn_affine_removed) == 33
    assert report.buffer_bn.startswith("kept: layer4.2.bn3")
    assert "23,705,252 -> 23,690,053 (-15,199)" in str(report)
    assert conv.anact_report is report
    # the original is untouched
    assert n_params(resnet50) == 23_705_252 and resnet50.layer1[0].bn1.affine


def test_resnet50_rule_switches(resnet50):
    # rule 1 off: only the 33 α parameters are added
    conv = anact.convert(resnet50, remove_bn_affine=False)
    assert n_params(conv) == 23_705_252 + 33
    # rule 3 off: the 16 activations after the additions are converted too
    conv, rep = anact.convert(resnet50, skip_after_residual_add=False, return_report=True)
    assert len(rep.converted) == 49 and not rep.skipped
    assert n_params(conv) == 23_690_053 + 16


def test_shared_relu_gets_one_module_per_converted_call_site():
    torch.manual_seed(0)
    model = ResNet((1, 1, 1, 1), num_classes=10, width=8)
    conv = anact.convert(model)
    assert isinstance(conv, fx.GraphModule)
    modules = dict(conv.named_modules())
    normalized = [n for n in conv.graph.nodes if n.op == "call_module"
                  and isinstance(modules[n.target], anact.NormalizedActivation)]
    plain = [n for n in conv.graph.nodes if n.op == "call_module"
             and isinstance(modules[n.target], nn.ReLU)]
    assert len(normalized) == 9 and len({n.target for n in normalized}) == 9
    assert len(plain) == 4
    for n in normalized:  # rule 1's BN is right before each converted call
        bn = modules[n.args[0].target]
        assert isinstance(bn, nn.BatchNorm2d) and not bn.affine and bn.weight is None
    for n in plain:  # rule 3: the unconverted calls follow the residual additions
        assert n.args[0].op == "call_function" and n.args[0].target in (operator.add,
                                                                         operator.iadd)
        assert n.target.endswith(".relu")
    assert {"layer1.0.relu1", "layer1.0.relu2", "layer1.0.relu"} <= set(modules)


def _identity_stats(model: nn.Module) -> None:
    # ρ = ρ' = 1, μ = 0, α = 0 -> λ = 1: the normalized activation is δ itself
    for m in model.modules():
        if isinstance(m, anact.NormalizedActivation):
            m.reset_parameters()


def test_converted_resnet_computes_the_same_graph():
    torch.manual_seed(0)
    model = ResNet((1, 1, 1, 1), num_classes=10, width=8).double().eval()
    conv = anact.convert(model).eval()
    _identity_stats(conv)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # freshly initialised BN affine is the identity, so both compute the same function
    torch.testing.assert_close(conv(x), model(x), rtol=1e-12, atol=1e-12)
    # and with statistics, the converted sites compute c·(δ − μ)
    for m in conv.modules():
        if isinstance(m, anact.NormalizedActivation):
            m.running_mean.fill_(0.25)
    assert not torch.allclose(conv(x), model(x))


def _ref_functional(model: FunctionalNet, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 reference of the converted FunctionalNet, written out by hand."""
    mods = dict(conv.named_modules())
    acts = [m for m in mods.values() if isinstance(m, anact.NormalizedActivation)]
    assert len(acts) == 5

    def norm(name: str, fn, z: torch.Tensor) -> torch.Tensor:
        m = mods[name]
        c = anact.functional.lambda_factor(m.running_rho.double(), m.running_rho_prime.double())
        c = c + 0.3 * torch.tanh(m.alpha.double())
        return c * (fn(z) - m.running_mean.double())

    bn = model.bn1
    z = (model.fc1(x) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)  # affine removed
    h = norm("relu", F.relu, z)
    h = norm("tanh", torch.tanh, model.fc2(h)) * torch.sigmoid(h)
    h = norm("silu", F.silu, model.fc3(h))
    h = norm("relu_1", F.relu, model.fc4(h))
    h = norm("act", lambda t: F.leaky_relu(t, 0.2), h)
    buf = mods["head_buffer_bn"]
    h = (h - buf.running_mean) / torch.sqrt(buf.running_var + buf.eps)
    return model.head(h)


def test_functional_calls_are_converted_and_match_a_hand_written_reference():
    torch.manual_seed(0)
    model = FunctionalNet().double()
    with torch.no_grad():
        model.bn1.weight.fill_(1.7)  # a trained affine: removed by rule 1, with a note
    conv, report = anact.convert(model, return_report=True)
    kinds = sorted(s.activation for s in report.converted)
    assert kinds == ["lrelu", "relu", "relu", "swish", "tanh"]
    assert [s.activation for s in report.skipped] == []  # sigmoid is not a default source
    assert report.bn_affine_removed == ["bn1"]
    assert any("trained affine" in n for n in report.notes)
    assert report.buffer_bn.startswith("inserted head_buffer_bn")
    assert isinstance(conv.head_buffer_bn, FeatureBatchNorm)
    assert conv.act.activation.params == {"negative_slope": 0.2}  # the site's own δ
    # train a few steps so that statistics are not trivial, then compare in eval
    x = torch.randn(32, 6, dtype=torch.float64)
    conv.train()
    for _ in range(3):
        conv(x + 0.1 * torch.randn_like(x))
    conv.eval()
    with torch.no_grad():
        model.bn1.running_mean.copy_(conv.bn1.running_mean)
        model.bn1.running_var.copy_(conv.bn1.running_var)
        for name in ("fc1", "fc2", "fc3", "fc4", "head"):
            getattr(model, name).load_state_dict(getattr(conv, name).state_dict())
        ref = _ref_functional(model, conv, x)
    torch.testing.assert_close(conv(x), ref, rtol=1e-10, atol=1e-10)


def test_named_activation_and_source_selection():
    model = FunctionalNet()
    conv, rep = anact.convert(model, "swish", source=["relu"], return_report=True)
    assert len(rep.converted) == 2
    assert all(m.activation.name == "swish" for m in conv.modules()
               if isinstance(m, anact.NormalizedActivation))
    conv, rep = anact.convert(model, source="all", return_report=True)
    assert len(rep.converted) == 6  # the sigmoid gate too
    with pytest.raises(KeyError, match="unknown activation"):
        anact.convert(model, source="nope")


def test_kwargs_reach_the_modules_and_per_channel_finds_num_features():
    model = FunctionalNet()
    conv = anact.convert(model, channel_dim=1, momentum=0.2, beta=0.1,
                         example_inputs=(torch.randn(4, 6),))
    acts = [m for m in conv.modules() if isinstance(m, anact.NormalizedActivation)]
    assert all(m.num_features == 6 and m.momentum == 0.2 and m.beta == 0.1 for m in acts)
    with pytest.raises(TypeError, match="num_features differs per call site"):
        anact.convert(model, num_features=6)


def test_gelu_tanh_approximation_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(3, 3), nn.GELU(approximate="tanh"), nn.Linear(3, 2))
    _, rep = anact.convert(model, return_report=True)
    assert rep.skipped and "not the exact GELU" in rep.skipped[0].reason


def test_untraceable_model_gives_a_clear_error_and_modules_mode_works():
    torch.manual_seed(0)
    model = Untraceable()
    with pytest.raises(ConversionError, match="mode='modules'"):
        anact.convert(model)
    with pytest.raises(ConversionError, match="needs example_inputs"):
        anact.convert(model, mode="modules")
    x = torch.randn(8, 4)
    conv, rep = anact.convert(model, mode="modules", example_inputs=(x,), return_report=True)
    assert type(conv) is Untraceable
    assert isinstance(conv.act1, anact.NormalizedActivation)
    assert isinstance(conv.act2, anact.NormalizedActivation)
    assert rep.bn_affine_removed == ["bn"] and conv.bn.weight is None
    assert rep.buffer_bn.startswith("inserted")
    assert isinstance(conv.head, nn.Sequential) and isinstance(conv.head[1], nn.Linear)
    assert n_params(conv) == n_params(model) - 8 + 2
    conv(x)


def test_modules_mode_skips_shared_and_post_addition_activations():
    torch.manual_seed(0)
    model = ResNet((1, 1, 1, 1), num_classes=10, width=8)
    conv, rep = anact.convert(model, mode="modules", example_inputs=(torch.randn(2, 3, 8, 8),),
                              return_report=True)
    assert [s.site for s in rep.converted] == ["relu"]  # the stem's relu, called once
    assert all("called 3 times" in s.reason for s in rep.skipped)
    assert rep.bn_affine_removed == ["bn1"]


def test_post_addition_detection_in_modules_mode():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.a1 = nn.ReLU()
            self.a2 = nn.ReLU()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a1(self.fc(x))
            return self.head(self.a2(h + x))

    x = torch.randn(3, 4, requires_grad=True)
    _, rep = anact.convert(Res(), mode="modules", example_inputs=(x,), return_report=True)
    assert [s.site for s in rep.converted] == ["a1"]
    assert "element-wise addition" in rep.skipped[0].reason
    _, rep = anact.convert(Res(), return_report=True)  # graph mode agrees
    assert [s.site for s in rep.converted] == ["a1"]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("mode", ["graph", "modules"])
def test_in_place_residual_addition_counts_for_rule_3(mode, inplace):
    """``out.add_(identity); relu(out)``: the activation reads a residual sum although
    its input node is ``out`` (the in-place call's result is not used); an in-place
    addition after the activation does not count."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.a1, self.a2 = nn.ReLU(inplace=inplace), nn.ReLU()

        def forward(self, x):
            out = self.fc1(x)
            out.add_(x)  # residual, in place
            h = self.a1(out)
            g = self.fc2(h)
            z = self.a2(g)  # reads g before the addition below
            g.add_(h)
            return self.head(z + g)

    x = torch.randn(3, 4, requires_grad=True)  # computed, as a block's input is
    _, rep = anact.convert(Block(), mode=mode, example_inputs=(x,), return_report=True)
    assert [r.site for r in rep.converted] == ["a2"] and [r.site for r in rep.skipped] == ["a1"]
    assert "element-wise addition" in rep.skipped[0].reason
    _, rep = anact.convert(Block(), mode=mode, example_inputs=(x,), return_report=True,
                           skip_after_residual_add=False)  # fmt: skip
    # (graph mode leaves an in-place call whose input is used again: out.add_ reads it)
    assert len(rep.converted) == (1 if inplace and mode == "graph" else 2)


def test_buffer_bn_for_sequence_inputs():
    bn = FeatureBatchNorm(5)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    bn.double().train()
    y = bn(x)
    flat = x.reshape(-1, 5)
    ref = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(y, ref.reshape(3, 7, 5))
    bn.eval()
    ref = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(bn(x), ref)


def test_named_activation_with_parameters_and_model_dtype():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    conv = anact.convert(model, "lrelu", activation_params={"negative_slope": 0.3})
    act = conv.get_submodule("1")
    assert act.activation.params == {"negative_slope": 0.3}
    assert act.running_rho.dtype == torch.float64  # a float64 model gets float64 statistics
    with pytest.raises(TypeError, match="activation_params needs a named activation"):
        anact.convert(model, activation_params={"negative_slope": 0.3})
    half = anact.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).bfloat16())
    assert half.get_submodule("1").running_rho.dtype == torch.float32


def test_state_dict_round_trip_between_two_conversions():
    def build():
        return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))

    torch.manual_seed(0)
    a = anact.convert(build())
    a(torch.randn(8, 3))
    b = anact.convert(build())
    b.load_state_dict(a.state_dict())  # same names: strict loading works
    a.eval()
    b.eval()
    x = torch.randn(4, 3)
    torch.testing.assert_close(b(x), a(x))
    assert "1.weight" not in a.state_dict() and "3_buffer_bn.running_mean" in a.state_dict()


def test_per_channel_num_features_from_the_layer_before():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 7, 1), nn.SiLU(), nn.Flatten(), nn.Linear(7, 4),
                          nn.Tanh(), nn.Linear(4, 2))
    conv = anact.convert(model, channel_dim=1)  # no example_inputs: found from BN/Conv/Linear
    assert [m.num_features for m in conv.modules()
            if isinstance(m, anact.NormalizedActivation)] == [5, 7, 4]
    conv(torch.randn(2, 3, 3, 3))
    with pytest.raises(ConversionError, match="pass example_inputs"):
        anact.convert(nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(4, 2)), channel_dim=1)


@pytest.mark.parametrize("mode", ["graph", "modules"])
def test_new_modules_take_the_mode_of_the_model(mode):
    """A model converted in eval mode stays in eval mode: its new normalized activations and
    buffer BatchNorm use their running values and change nothing; one in train mode trains."""
    for training in (False, True):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).train(training)
        kw = {"example_inputs": (torch.randn(2, 6),)} if mode == "modules" else {}
        out = anact.convert(model, mode=mode, **kw)
        new = [m for m in out.modules() if isinstance(m, (anact.NormalizedActivation,
                                                           FeatureBatchNorm))]  # fmt: skip
        assert len(new) == 2
        assert all(m.training is training for m in out.modules())
        before = {k: v.clone() for k, v in out.state_dict().items()}
        out(torch.randn(4, 6))
        changed = [k for k, v in out.state_dict().items() if not torch.equal(v, before[k])]
        assert bool(changed) is training, changed


class _AliasNet(nn.Module):
    """An in-place ReLU whose effect the code reads through its input (``how``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        if self.how == "input":  # the result is dropped; h was changed in place
            self.act(h)
        elif self.how == "view":  # through a view of h
            self.act(h.view(-1, 2))
        elif self.how == "functional-view":
            F.relu_(h.reshape(-1, 2))
        else:  # "result": the usual form, safe to convert
            h = self.act(h)
        return self.fc2(h)


@pytest.mark.parametrize(
    "how,mode",
    [(how, mode) for how in ("input", "view", "result") for mode in ("graph", "modules")]
    + [("functional-view", "graph")],  # modules mode does not see functional calls
)
def test_inplace_sites_read_through_an_alias_stay_plain(how, mode):
    """Converting an in-place activation whose effect reaches the output through its input
    (or a view of it) would drop it: such sites are skipped, in both modes; the usual
    ``h = act(h)`` is converted."""
    torch.manual_seed(0)
    model = _AliasNet(how).eval()
    x = torch.randn(6, 4)
    with torch.no_grad():
        want = model(x)
    out, report = anact.convert(model, mode=mode, example_inputs=x, return_report=True,
                                remove_bn_affine=False, buffer_bn=False)  # fmt: skip
    [site] = report.sites
    assert (site.action == "converted") == (how == "result"), site
    if how != "result":
        assert "read again afterwards" in site.reason
    out.eval()  # before any batch: λ = 1, μ = 0, so a converted NReLU is the plain ReLU
    with torch.no_grad():
        torch.testing.assert_close(out(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["graph", "modules"])
def test_a_failed_inplace_conversion_leaves_the_model_as_it_was(mode):
    """Errors found while sizing the sites come before rule 1 or any swap changes the
    user's model (``inplace=True``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Tanh())  # fmt: skip
    nn.init.uniform_(model[1].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [(dict(channel_dim=5, example_inputs=torch.randn(2, 3, 8, 8)),
              r"channel_dim=5 is out of range for the input of .*shape \(2, 4, 6, 6\)")]
    if mode == "graph":  # no shapes: the Tanh after the pool cannot be sized
        cases.append((dict(channel_dim=1), "pass example_inputs"))
    for kw, match in cases:
        with pytest.raises(ConversionError, match=match):
            anact.convert(model, mode=mode, inplace=True, **kw)
        assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                                            nn.Tanh]  # fmt: skip
        assert model[1].affine
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_example_inputs_may_be_one_tensor_or_must_be_a_tuple():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    a = anact.convert(model, mode="modules", example_inputs=x, channel_dim=1)
    b = anact.convert(model, mode="modules", example_inputs=(x,), channel_dim=1)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    folded = anact.fold(a.eval(), example_inputs=x)
    torch.testing.assert_close(folded(x), a(x))
    with pytest.raises(TypeError, match=r"example_inputs must be a tuple .* e.g. \(x,\)"):
        anact.convert(model, mode="modules", example_inputs={"x": x})
