"""Devices: the modules follow their input's device and never read values back to the host
on the way; internal CPU work ignores the default device (``torch.set_default_device``,
``with torch.device(...)``).

Tensors on the ``meta`` device carry shapes, dtypes and devices but no data: any read-back
(``.item()``, ``.tolist()``, ``bool(t)``) raises, and any op mixing a meta tensor with a
non-scalar CPU tensor raises. A non-CPU input takes the same path as a CUDA one (the
native C passes apply only to CPU tensors), so running it on meta checks, without a GPU,
that a training step on CUDA makes no host synchronization inside the activation and keeps
every intermediate on the input's device.
"""

import copy
import dataclasses

import pytest
import torch

import anact
import anact.kernels as K
from anact.analysis import gaussian_moments, lambda_factor, r_score
from anact.gaussian import gaussian_expectation


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = K.get_backend()
    yield
    K.set_backend(previous)


NORMALIZED = {
    "nrelu": lambda **kw: anact.NReLU(**kw),
    "nswish-channels": lambda **kw: anact.NSwish(channel_dim=1, num_features=4, **kw),
    "nlrelu-cumulative": lambda **kw: anact.NLReLU(momentum=None, **kw),
    "ngelu-unbounded": lambda **kw: anact.NGELU(bounds=None, **kw),
    "ntanh-no-running": lambda **kw: anact.NTanh(track_running_stats=False, **kw),
    "sync-nswish": lambda **kw: anact.SyncNormalizedActivation("swish", **kw),
}
OTHERS = {
    "gpn-relu": lambda: anact.GPN("relu"),
    "gpn-lrelu": lambda: anact.GPN("lrelu"),
    "layeract-silu": lambda: anact.LASiLU(),
    "layeract-hardsilu": lambda: anact.LAHardSiLU(),
}


def _step(module, x, mask=None):
    """One forward and backward; the output and the input's gradient."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x) if mask is None else module(x, mask=mask)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return y.detach(), x.grad


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("backend", ["native", "eager", "fused"])
@pytest.mark.parametrize("name", sorted(NORMALIZED))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_meta_inputs_stay_on_their_device_without_host_reads(backend, name, training, masked):
    K.set_backend(backend)
    m = NORMALIZED[name](device="meta").train(training)
    x = torch.randn(8, 4, 6, device="meta")
    mask = torch.ones(8, 1, 6, dtype=torch.bool, device="meta") if masked else None
    y, gx = _step(m, x, mask)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    assert gx.device.type == "meta" and gx.shape == x.shape
    assert m.alpha.grad is not None and m.alpha.grad.device.type == "meta"
    assert all(t.device.type == "meta" for t in m.state_dict().values())


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_meta_inputs_gpn_and_layeract(name):
    with torch.device("meta"):
        m = OTHERS[name]()
    y, gx = _step(m, torch.randn(8, 4, 6, device="meta"))
    assert y.device.type == "meta" and gx.device.type == "meta" and y.shape == (8, 4, 6)


@pytest.mark.parametrize("backend", ["native", "eager", "fused"])
@pytest.mark.parametrize("name", sorted(NORMALIZED))
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_inputs_under_another_default_device(backend, name, masked):
    """A CPU module on CPU inputs computes the same numbers, bit for bit, whatever the
    default device: the passes' scratch and statistics are made on CPU, not on the
    default device (where the C passes would get a pointer they cannot read)."""
    K.set_backend(backend)
    torch.manual_seed(0)
    x = torch.randn(32, 4, 6) * 1.5 + 0.2
    mask = (torch.rand(32, 1, 6) > 0.3) if masked else None
    ref = NORMALIZED[name]()
    other = copy.deepcopy(ref)
    want = [_step(ref, x, mask) for _ in range(2)]
    with torch.device("meta"):
        got = [_step(other, x, mask) for _ in range(2)]
    for (y0, g0), (y1, g1) in zip(want, got, strict=True):
        assert y1.device.type == "cpu" and torch.equal(y0, y1)
        assert torch.equal(g0, g1)
    for k, v in _state(ref).items():
        assert torch.equal(v, other.state_dict()[k]), k
    ref.eval()
    other.eval()
    with torch.no_grad(), torch.device("meta"):
        y_eval = other(x) if mask is None else other(x, mask=mask)
    assert torch.equal(y_eval, ref(x) if mask is None else ref(x, mask=mask))


@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_built_on_meta_then_materialized(name):
    """The large-model pattern: build on meta, ``to_empty`` on the real device, then
    ``reset_parameters()`` gives the state of a module built there directly."""
    with torch.device("meta"):
        m = NORMALIZED[name]()
    assert all(t.device.type == "meta" for t in m.state_dict().values())
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    want = NORMALIZED[name]().state_dict()
    got = m.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].device.type == "cpu" and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("channels", [None, 8])
def test_built_on_meta_then_loaded_with_assign(channels):
    """``load_state_dict(sd, assign=True)`` into a module built on meta (how large
    checkpoints are loaded): every tensor, the unsaved skip count too, ends on the
    checkpoint's device, and the module trains and moves like one built there."""
    kw = {} if channels is None else {"channel_dim": 1}
    source = anact.NSwish(channels, **kw)
    source(torch.randn(16, 8))
    with torch.device("meta"):
        m = anact.NSwish(channels, **kw)
    m.load_state_dict(source.state_dict(), assign=True)
    assert all(t.device.type == "cpu" for t in (*m.parameters(), *m.buffers()))
    assert int(m.num_batches_skipped) == 0
    m(torch.randn(16, 8))
    assert int(m.num_batches_tracked) == 2
    m.to(torch.float64)


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_gpn_and_layeract_built_under_meta(name):
    ref = OTHERS[name]()
    with torch.device("meta"):
        m = OTHERS[name]()
    assert repr(m) == repr(ref)  # GPN's constants a, b come out the same
    x = torch.randn(8, 4, 6)
    assert torch.equal(m(x), ref(x))


def test_analysis_on_cpu_whatever_the_default_device():
    sigmas = [0.5, 1.0, 2.0]
    want_e = gaussian_expectation([torch.relu, lambda t: t.square()], sigmas, (0.0,))
    want_r = r_score("swish", sigmas)
    want_m = gaussian_moments("lrelu", sigmas)
    want_l = lambda_factor([0.5, 1.0], [0.9, 1.1])
    want_gpn = anact.modules.gpn_constants("swish")
    with torch.device("meta"):
        got_e = gaussian_expectation([torch.relu, lambda t: t.square()], sigmas, (0.0,))
        got_r = r_score("swish", sigmas)
        got_m = gaussian_moments("lrelu", sigmas)
        got_l = lambda_factor([0.5, 1.0], [0.9, 1.1])
        got_gpn = anact.modules.gpn_constants("swish")
    for w, g in zip(want_e, got_e, strict=True):
        assert g.device.type == "cpu" and torch.equal(w, g)
    assert (want_r == got_r).all() and (want_l == got_l).all() and want_gpn == got_gpn
    for field in dataclasses.fields(want_m):
        assert (getattr(want_m, field.name) == getattr(got_m, field.name)).all(), field.name


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4),
    )  # fmt: skip


def test_convert_fold_and_monitor_whatever_the_default_device():
    from anact.analysis import ConvergenceMonitor

    x, plain = torch.randn(16, 3, 8, 8), _small_model()

    def run():
        model = anact.convert(copy.deepcopy(plain))
        with ConvergenceMonitor(model) as mon:
            for _ in range(3):
                model.zero_grad()
                model(x).square().mean().backward()
                mon.step()
            summary = mon.epoch_summary(reset=True)
        folded = anact.fold(copy.deepcopy(model).eval())
        return model, summary, folded

    model0, summary0, folded0 = run()
    with torch.device("meta"):
        model1, summary1, folded1 = run()
    for m0, m1 in ((model0, model1), (folded0, folded1)):
        s0, s1 = m0.state_dict(), m1.state_dict()
        assert s0.keys() == s1.keys()
        for k in s0:
            assert s1[k].device.type == "cpu" and torch.equal(s0[k], s1[k]), k
    assert summary0 == summary1
    with torch.no_grad():
        assert torch.equal(folded0(x), folded1(x))


def test_convert_a_model_built_on_meta():
    """Build on meta, convert, materialize, load weights: the model converted on CPU."""
    ref = anact.convert(_small_model())
    with torch.device("meta"):
        plain = _small_model()
    model = anact.convert(plain)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    model = model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(model(x), ref(x))
