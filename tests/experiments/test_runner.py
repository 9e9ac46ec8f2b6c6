import dataclasses
import math

import pytest
import torch
from experiments_helpers import Boom, crashing_in_epoch_2, stored
from torch import nn

import anact
from anact.experiments.models import (
    ACTIVATIONS,
    LeNet5,
    init_weights,
    make_activation,
    parse_activations,
)
from anact.experiments.runner import RESULTS_FILE, reproduce
from anact.experiments.store import Store
from anact.experiments.studies import STUDIES, Study, get_study, identity_config


def small_config(data_dir, **kw):
    cfg = get_study("table1").config(
        {"dataset": "mnist", "data_dir": str(data_dir), "train_subset": None,
         "epochs": 2, "runs": 1, "batch_size": 32, "lr": 0.05}
    )  # fmt: skip
    cfg.update(kw)
    return cfg


def test_lenet5_shape_and_size():
    m = LeNet5(nn.ReLU)
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # the classic LeNet5 (6-16-120-84-10, 5×5 kernels) has 61 706 parameters
    assert sum(p.numel() for p in m.parameters()) == 61706
    assert sum(isinstance(x, nn.ReLU) for x in m.modules()) == 4


def test_paper_activation_init_pairs():
    init = {a: s.init for a, s in ACTIVATIONS.items()}
    assert {a for a, i in init.items() if i == "xavier"} >= {"tanh", "nrelu", "nswish"}
    assert {a for a, i in init.items() if i == "he"} == {"relu", "lrelu", "elu", "selu", "swish"}
    assert init["relu-gpn"] == "orthogonal"
    for name in ("nrelu", "nswish"):
        m = make_activation(name)
        assert isinstance(m, anact.NormalizedActivation) and m.center is False
    gpn = make_activation("ReLU-GPN")
    assert isinstance(gpn, anact.GPN) and math.isclose(gpn.a, math.sqrt(2), rel_tol=1e-9)


def test_init_schemes():
    torch.manual_seed(0)
    lin = nn.Linear(400, 300)
    init_weights(lin, "he")
    assert abs(lin.weight.std().item() / math.sqrt(2 / 400) - 1) < 0.03
    assert torch.count_nonzero(lin.bias) == 0
    init_weights(lin, "xavier")
    bound = math.sqrt(6 / (400 + 300))
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.98 * bound
    init_weights(lin, "orthogonal")
    torch.testing.assert_close(lin.weight @ lin.weight.T, torch.eye(300), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="xavier, he or orthogonal"):
        init_weights(lin, "lecun")


def test_parse_activations():
    assert parse_activations("ReLU, NSWISH,relu") == ["relu", "nswish"]
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'.*nrelu"):
        parse_activations("relu,gelu", get_study("table1").activations)


def test_registry():
    assert get_study("TABLE1") is STUDIES["table1"]
    with pytest.raises(ValueError, match="available: .*table1"):
        get_study("nope")
    with pytest.raises(ValueError, match="has no setting 'wd'"):
        get_study("table1").config({"wd": 1.0})
    s = get_study("table1")
    assert s.config(paper=True)["runs"] == 25 and s.config(paper=True)["epochs"] == 50
    assert s.config(paper=True)["train_subset"] is None
    ident = identity_config(s, s.config())
    assert "runs" not in ident and "seed" not in ident and "lr" in ident


def test_reproduce_stores_learns_and_skips(tmp_path, fake_mnist):
    cfg = small_config(fake_mnist, runs=2)
    rows = reproduce(get_study("table1"), cfg, ["relu", "nrelu"], out_dir=tmp_path, quiet=True)
    assert sorted((r["activation"], r["seed"]) for r in rows) == [
        ("nrelu", 0), ("nrelu", 1), ("relu", 0), ("relu", 1)
    ]
    assert all(r["status"] == "done" for r in rows)
    res = stored(tmp_path)
    for curve in res.values():
        assert [e[0] for e in curve] == [1, 2]
        assert curve[-1][2] > 50.0  # learns the easy fake data (chance: 10 %)
        assert all(0 < e[3] < 50 and 0 < e[4] for e in curve)  # Score, Σ|E W|
    assert res[("relu", 0)] != res[("relu", 1)]  # seeds differ
    assert not list((tmp_path / "checkpoints").iterdir())  # finished: no checkpoints

    calls = []
    study = dataclasses.replace(
        get_study("table1"), build=lambda *a: calls.append(a) or get_study("table1").build(*a)
    )
    reproduce(study, cfg, ["relu", "nrelu"], out_dir=tmp_path, quiet=True)
    assert calls == []  # finished runs are never repeated
    assert stored(tmp_path) == res


def test_deterministic_per_seed(tmp_path, fake_mnist):
    cfg = small_config(fake_mnist)
    reproduce(get_study("table1"), cfg, ["nswish"], out_dir=tmp_path / "a", quiet=True)
    reproduce(get_study("table1"), cfg, ["nswish"], out_dir=tmp_path / "b", quiet=True)
    assert stored(tmp_path / "a") == stored(tmp_path / "b")


def test_resume_after_crash_equals_uninterrupted(tmp_path, fake_mnist):
    cfg = small_config(fake_mnist, epochs=3, lr=0.02, momentum=0.9)  # optimizer state
    table1 = get_study("table1")
    reproduce(table1, cfg, ["nrelu"], out_dir=tmp_path / "ref", quiet=True)
    crashing: Study = crashing_in_epoch_2(table1)
    with pytest.raises(Boom):
        reproduce(crashing, cfg, ["nrelu"], out_dir=tmp_path / "x", quiet=True)
    with Store(tmp_path / "x" / RESULTS_FILE) as st:
        (run,) = st.runs()
        assert run["status"] == "failed" and "Boom" in run["error"]
        assert run["epochs_done"] == 1
    assert (tmp_path / "x" / "checkpoints" / f"run-{run['id']}.pt").exists()
    reproduce(table1, cfg, ["nrelu"], out_dir=tmp_path / "x", quiet=True)
    assert stored(tmp_path / "x") == stored(tmp_path / "ref")


def test_corrupt_checkpoint_is_discarded_and_the_run_restarts(tmp_path, fake_mnist):
    cfg = small_config(fake_mnist)
    table1 = get_study("table1")
    reproduce(table1, cfg, ["relu"], out_dir=tmp_path / "ref", quiet=True)
    out = tmp_path / "x"
    with pytest.raises(Boom):
        reproduce(crashing_in_epoch_2(table1), cfg, ["relu"], out_dir=out, quiet=True)
    (ckpt,) = (out / "checkpoints").iterdir()
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # truncated, e.g. a full disk
    with pytest.warns(RuntimeWarning, match=r"checkpoint .*run-1\.pt is unusable.*from scratch"):
        reproduce(table1, cfg, ["relu"], out_dir=out, quiet=True)
    assert stored(out) == stored(tmp_path / "ref")  # from scratch: the same numbers
    with Store(out / RESULTS_FILE) as st:
        assert [r["status"] for r in st.runs()] == ["done"]
    assert not list((out / "checkpoints").iterdir())


def test_claim_is_refreshed_during_an_epoch(tmp_path, fake_mnist, monkeypatch):
    from anact.experiments import runner

    beats = []
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(Store, "heartbeat", lambda self, run_id: beats.append(run_id) or True)
    reproduce(get_study("table1"), small_config(fake_mnist, epochs=1), ["relu"],
              out_dir=tmp_path, quiet=True)  # fmt: skip
    assert len(beats) == 512 // 32  # after every optimizer step of the one epoch
