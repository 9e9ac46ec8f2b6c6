"""Ensemble training (anact.experiments.ensemble) against runs trained one by one.

Tolerance: the batched kernels (grouped convolution, batched matmul, sums over a
member's slice of a larger tensor) add in another order than the per-run kernels, so
each step differs at float32 rounding (eps = 1.2e-7); over the dozen steps here the
largest differences seen are ~5e-7 relative. RTOL = 2e-5 leaves 40× headroom, while a
real fault (another member's batches, shared running statistics, a lost momentum
buffer) changes these numbers by 1e-3 or more. Stable settings (lr 0.02) on purpose:
a diverging run amplifies any rounding difference, as a change of thread count does.

The Score (eq. 22) is a sum of |ln ρ| over layers, so its error is absolute: each ρ
comes from float32 power sums (Var = E[x²] − E[x]²), which the monitor documents as
accurate to ~1e-6·(1 + mean²/var) relative, and both sides sum in their own order;
seen: up to 1e-5. SCORE_ATOL = 1e-4, against Scores of 0.5-10 that move by > 0.1 per
epoch.

Parameters and buffers get STATE_ATOL = 1e-4 (weights are ~0.2, seeds differ by
> 1e-2): max pooling routes the gradient to the largest element of each window, and
the fake images' constant 6×6 blocks give windows of near-equal conv outputs, where a
1-ulp difference sends the gradient to another element; seen once per few dozen
steps, moving a conv weight by ~1e-5 (lr × the difference of two input patches).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from experiments_helpers import Boom, crashing_in_epoch_2, stored, write_dataset

from anact.analysis import ConvergenceMonitor
from anact.experiments.cli import main
from anact.experiments.ensemble import Ensemble
from anact.experiments.report import write_report
from anact.experiments.runner import RESULTS_FILE, reproduce
from anact.experiments.store import Store
from anact.experiments.studies import get_study

RTOL, ATOL = 2e-5, 1e-6
SCORE_ATOL = 1e-4
STATE_ATOL = 1e-4
SEEDS = (0, 1, 2)
EPOCHS = 2
TABLE1 = get_study("table1")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ens-data"), n_train=96, n_test=64)


def config(data_dir, **kw):
    return TABLE1.config({
        "dataset": "mnist", "data_dir": str(data_dir), "train_subset": None, "runs": 3,
        "epochs": EPOCHS, "batch_size": 16, "lr": 0.02, "momentum": 0.5, **kw,
    })  # fmt: skip


def build(cfg, data, activation, seed):
    torch.manual_seed(seed)  # as the runner does
    return TABLE1.build(dict(cfg), activation, seed, data, CPU)


def close(a, b):
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def assert_rows_close(got, want):
    assert got.keys() == want.keys()
    for key, rows in want.items():
        assert len(got[key]) == len(rows), key
        for g, w in zip(got[key], rows, strict=True):
            assert g[0] == w[0] and g[2] == w[2], (key, g, w)  # epoch, accuracy: equal
            assert close(g[1], w[1]) and close(g[4], w[4]), (key, g, w)  # loss, Σ|E W|
            assert abs(g[3] - w[3]) < SCORE_ATOL, (key, g, w)


@pytest.mark.parametrize("activation", ["relu", "nrelu", "nswish"])
def test_members_equal_runs_trained_alone(small_data, activation):
    cfg = config(small_data)
    data = TABLE1.load_data(cfg, CPU)
    ensemble = Ensemble([build(cfg, data, activation, s) for s in SEEDS], TABLE1.ensemble,
                        cfg, data)  # fmt: skip
    orders = [torch.Generator().manual_seed(s) for s in SEEDS]
    results = [(ensemble.train_epoch(orders), ensemble.evaluate()) for _ in range(EPOCHS)]

    for k, seed in enumerate(SEEDS):
        alone, order = build(cfg, data, activation, seed), torch.Generator().manual_seed(seed)
        with ConvergenceMonitor(alone.model) as monitor:
            for epoch, (res, metrics) in enumerate(results):
                loss = alone.train_epoch(order, monitor.step)
                summary = monitor.epoch_summary(reset=True)
                assert close(res.loss[k], loss), (epoch, res.loss[k], loss)
                assert abs(res.score[k] - summary["score"]) < SCORE_ATOL, (epoch, k, summary)
                assert close(res.weight_mean_abs_sum[k], summary["weight_mean_abs_sum"])
                assert metrics[k]["val_acc"] == alone.evaluate()["val_acc"]
                assert res.skipped_batches[k] == 0
        member = ensemble.write_back(k)  # member k's state, as its own model and optimizer
        for (name, p), q in zip(alone.model.named_parameters(), member.model.parameters(),
                                strict=True):  # fmt: skip
            torch.testing.assert_close(q, p, rtol=RTOL, atol=STATE_ATOL, msg=name)
            momentum = alone.optimizer.state[p]["momentum_buffer"]
            torch.testing.assert_close(
                member.optimizer.state[q]["momentum_buffer"], momentum, rtol=RTOL, atol=STATE_ATOL
            )
        buffers = dict(member.model.named_buffers())
        for name, b in alone.model.named_buffers():  # running ρ, ρ', μ, batch counts
            torch.testing.assert_close(buffers[name], b, rtol=RTOL, atol=STATE_ATOL, msg=name)
        if activation == "nrelu":
            assert int(buffers["features.1.num_batches_tracked"]) == EPOCHS * 6


def test_members_are_distinct_runs(small_data):
    cfg = config(small_data)
    data = TABLE1.load_data(cfg, CPU)
    ensemble = Ensemble([build(cfg, data, "nrelu", s) for s in SEEDS], TABLE1.ensemble, cfg, data)
    res = ensemble.train_epoch([torch.Generator().manual_seed(s) for s in SEEDS])
    weights = ensemble.params["features.0.weight"].detach()
    rho = ensemble.buffers["classifier.2.running_rho"]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (weights[a] - weights[b]).abs().max() > 1e-2  # own init and data order
        assert abs(float(rho[a] - rho[b])) > 1e-4  # own running statistics
        assert abs(res.loss[a] - res.loss[b]) > 1e-4


def test_reproduce_ensemble_stores_the_sequential_runs(tmp_path, small_data):
    cfg = config(small_data)
    rows = reproduce(TABLE1, cfg, ["relu", "nswish"], out_dir=tmp_path / "ens", quiet=True,
                     ensemble=True)  # fmt: skip
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    reproduce(TABLE1, cfg, ["relu", "nswish"], out_dir=tmp_path / "seq", quiet=True)
    with Store(tmp_path / "ens" / RESULTS_FILE) as a, Store(tmp_path / "seq" / RESULTS_FILE) as b:
        identity = ("study", "model", "dataset", "activation", "seed", "config_key", "config")
        assert len(a.runs()) == len(b.runs()) == 6
        assert sorted([r[k] for k in identity] for r in a.runs()) == sorted(
            [r[k] for k in identity] for r in b.runs()
        )  # same run identity: --ensemble is not part of it
    assert_rows_close(stored(tmp_path / "ens"), stored(tmp_path / "seq"))
    assert not list((tmp_path / "ens" / "checkpoints").iterdir())


def ensemble_crashing_in_epoch_2(study, calls_per_epoch):
    """``study`` whose ensemble raises when drawing the batches of epoch 2."""
    calls = []

    def batches(cfg, data, order):
        calls.append(1)
        if len(calls) > calls_per_epoch:
            raise Boom("killed in epoch 2")
        return study.ensemble.batches(cfg, data, order)

    return dataclasses.replace(study, ensemble=dataclasses.replace(study.ensemble, batches=batches))


def test_resume_after_interruption(tmp_path, small_data):
    cfg = config(small_data, epochs=3)
    reproduce(TABLE1, cfg, ["nrelu"], out_dir=tmp_path / "ref", quiet=True, ensemble=True)
    reference = stored(tmp_path / "ref")
    for resume_as_ensemble in (True, False):
        out = tmp_path / f"x-{resume_as_ensemble}"
        with pytest.raises(Boom):
            reproduce(ensemble_crashing_in_epoch_2(TABLE1, len(SEEDS)), cfg, ["nrelu"], out_dir=out,
                      quiet=True, ensemble=True)  # fmt: skip
        with Store(out / RESULTS_FILE) as st:
            runs = st.runs()
            assert len(runs) == 3
            for run in runs:
                assert run["status"] == "failed" and "Boom" in run["error"]
                assert run["epochs_done"] == 1
                assert (out / "checkpoints" / f"run-{run['id']}.pt").exists()
        reproduce(TABLE1, cfg, ["nrelu"], out_dir=out, quiet=True, ensemble=resume_as_ensemble)
        if resume_as_ensemble:  # the same batched arithmetic: bit for bit
            assert stored(out) == reference
        else:  # sequentially from the members' checkpoints
            assert_rows_close(stored(out), reference)
        assert not list((out / "checkpoints").iterdir())


def test_members_at_different_epochs_and_done_runs(tmp_path, small_data):
    cfg = config(small_data, epochs=3)
    reproduce(TABLE1, cfg, ["relu"], out_dir=tmp_path / "ref", quiet=True)

    # seed 0 crashes sequentially in epoch 2 (checkpoint after epoch 1), seeds 1, 2 unstarted
    out = tmp_path / "mixed"
    with pytest.raises(Boom):
        reproduce(crashing_in_epoch_2(TABLE1), cfg, ["relu"], out_dir=out, quiet=True)
    reproduce(TABLE1, config(small_data, epochs=3, runs=1, seed=2), ["relu"], out_dir=out,
              quiet=True)  # seed 2 done before  # fmt: skip
    done_before = stored(out)[("relu", 2)]
    calls = []
    counting = dataclasses.replace(TABLE1, build=lambda *a: calls.append(a[2]) or TABLE1.build(*a))
    reproduce(counting, cfg, ["relu"], out_dir=out, quiet=True, ensemble=True)
    assert sorted(calls) == [0, 1]  # the done run is skipped, not rebuilt
    assert stored(out)[("relu", 2)] == done_before
    assert_rows_close(stored(out), stored(tmp_path / "ref"))


def test_cli_ensemble_end_to_end(tmp_path, fake_mnist, capsys):
    args = [
        "reproduce", "table1", "--dataset", "mnist", "--data-dir", str(fake_mnist),
        "--activations", "relu,nswish", "--runs", "2", "--epochs", "1", "--batch-size", "64",
        "--train-subset", "0", "--out", str(tmp_path), "--quiet", "--no-report", "--ensemble",
    ]  # fmt: skip
    assert main(args) == 0
    res = stored(tmp_path)
    assert sorted(res) == [("nswish", 0), ("nswish", 1), ("relu", 0), ("relu", 1)]
    for ((_, loss, acc, score, wsum),) in res.values():
        assert loss > 0 and 0 <= acc <= 100 and 0 < score < 50 and wsum > 0
    with Store(tmp_path / RESULTS_FILE) as st:  # each epoch records how it was trained
        assert {e["mode"] for r in st.runs() for e in st.epochs(r["id"])} == {"ensemble"}
    text = write_report(tmp_path, figures=False).read_text()
    assert "| mode |" in text and "| ensemble |" in text


def test_ensemble_refused_where_unsupported(tmp_path, small_data, capsys):
    code = main(["reproduce", "vgg", "--ensemble", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not support --ensemble" in err and "table1" in err
    with pytest.raises(ValueError, match="does not support --ensemble"):
        reproduce(get_study("vgg"), get_study("vgg").config(), out_dir=tmp_path, ensemble=True)

    cfg = config(small_data)
    data = TABLE1.load_data(cfg, CPU)
    trials = [build(cfg, data, "relu", s) for s in SEEDS[:2]]
    trials[1].optimizer = torch.optim.Adam(trials[1].model.parameters())
    with pytest.raises(ValueError, match="torch.optim.SGD"):
        Ensemble(trials, TABLE1.ensemble, cfg, data)
