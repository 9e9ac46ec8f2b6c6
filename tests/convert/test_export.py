"""Export of converted (eval) models: torch.export and ONNX (run in onnxruntime)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import anact

from .models import FunctionalNet, ResNet

has_ort = importlib.util.find_spec("onnxruntime") is not None
has_onnxscript = importlib.util.find_spec("onnxscript") is not None


@pytest.fixture(scope="module")
def trained():
    """A converted model with non-trivial statistics, in eval mode, and an input."""
    torch.manual_seed(0)
    model = anact.convert(FunctionalNet())
    x = torch.randn(16, 6)
    for _ in range(3):
        model(x + 0.1 * torch.randn_like(x))
    return model.eval(), x


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # the eager float64 computation of the same module is the independent reference
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double()).float()


def test_torch_export_matches_eager(trained):
    model, x = trained
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), _reference(model, x), rtol=1e-5, atol=1e-6)
    # exporting reads the running statistics, it does not change them
    assert all(int(m.num_batches_tracked) == 3 for m in model.modules()
               if isinstance(m, anact.NormalizedActivation))


def test_torch_export_of_a_folded_resnet():
    torch.manual_seed(0)
    model = anact.convert(ResNet((1, 1, 1, 1), num_classes=10, width=8))
    x = torch.randn(4, 3, 8, 8)
    model(x)
    folded = anact.fold(model.eval())
    ep = torch.export.export(folded, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), _reference(model, x), rtol=1e-4, atol=1e-5)


def _run_ort(path: str, x: torch.Tensor):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.skipif(not has_ort, reason="onnxruntime not installed (pip install onnxruntime)")
def test_onnx_legacy_exporter_runs_in_onnxruntime(trained, tmp_path):
    model, x = trained
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no data-dependent branch
        # a GraphModule has an fx .graph: with dynamic_axes the legacy exporter needs
        # output_names too (else it asks the fx graph for TorchScript outputs)
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    torch.testing.assert_close(_run_ort(path, x), _reference(model, x), rtol=1e-5, atol=1e-6)
    x2 = torch.randn(5, 6)  # another batch size through the dynamic axis
    torch.testing.assert_close(_run_ort(path, x2), _reference(model, x2), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (has_ort and has_onnxscript),
                    reason="needs onnxruntime and onnxscript (pip install onnxruntime onnxscript)")
def test_onnx_dynamo_exporter_runs_in_onnxruntime(trained, tmp_path):
    model, x = trained
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    torch.testing.assert_close(_run_ort(path, x), _reference(model, x), rtol=1e-5, atol=1e-6)


def _script_net(per_channel: bool) -> torch.nn.Module:
    torch.manual_seed(1)
    c, cd = (8, 1) if per_channel else (None, None)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), anact.NReLU(c, channel_dim=cd), torch.nn.Conv2d(8, 8, 3),
        anact.NSwish(c, channel_dim=cd), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5),
        anact.NLReLU(negative_slope=0.1),
    )  # fmt: skip
    for _ in range(3):
        net(torch.randn(6, 3, 8, 8) + 0.2)
    return net


@pytest.mark.parametrize("mode", ["graph", "modules"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_folded_model_compiles_with_torch_jit_script(per_channel, mode, tmp_path):
    """torch.jit.script compiles anact.fold's inference copy (each normalized activation
    as (δ(x) − μ)·s with δ's torch module, or folded into the next layer): the eager eval
    output, also after a save and load (what LibTorch runs); the model is not changed."""
    net = _script_net(per_channel).eval()
    x = torch.randn(4, 3, 8, 8)
    folded = anact.fold(net, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        scripted = torch.jit.script(folded)
        torch.jit.save(scripted, str(tmp_path / "m.pt"))
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        want = folded(x)
        torch.testing.assert_close(want, _reference(net, x), rtol=1e-5, atol=1e-6)
        assert torch.equal(scripted(x), want)
        assert torch.equal(loaded(x), want)
    assert sum(isinstance(m, anact.NormalizedActivation) for m in net.modules()) == 3


def test_torch_jit_script_refuses_what_it_cannot_compile():
    """A normalized activation (its forward is Python statistics code) and a folded
    activation without a torch module: a RuntimeError that says what to do."""
    custom = anact.Activation("cube", lambda t: t**3, lambda t: 3 * t**2)
    odd = anact.NormalizedActivation(custom)
    odd(torch.randn(32))
    cases = [(_script_net(False), "anact.fold"), (_script_net(True).eval(), "anact.fold"),
             (anact.fold(torch.nn.Sequential(odd).eval(), mode="modules"), "module=")]  # fmt: skip
    for module, hint in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pytest.raises(RuntimeError, match=hint):
                torch.jit.script(module)


def test_torch_jit_trace_in_eval_mode_without_tracer_warnings():
    net = _script_net(True).eval()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, (x,))
    with torch.no_grad():  # (the trace records the eager ops; eval runs the C passes)
        torch.testing.assert_close(traced(x), net(x), rtol=1e-6, atol=1e-7)
        x2 = torch.randn(7, 3, 8, 8)  # another batch size
        torch.testing.assert_close(traced(x2), net(x2), rtol=1e-6, atol=1e-7)


def test_torch_jit_trace_keeps_the_channel_check():
    """A trace of an input with the wrong channel count fails with the module's error."""
    m = anact.NReLU(3, channel_dim=1)
    m(torch.randn(4, 3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match="expected 3 channels"):
            torch.jit.trace(m.eval(), (torch.randn(2, 5, 4),))
