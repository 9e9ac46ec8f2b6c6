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
