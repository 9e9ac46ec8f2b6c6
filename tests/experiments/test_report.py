import re

import pytest

from anact.experiments.report import scaled_epochs, spearman, write_report
from anact.experiments.store import Store

CURVES = {
    "relu": [[80.0, 86.0, 84.0], [70.0, 75.0, 90.0], [10.0, 10.0, 10.0]],
    "nrelu": [[85.5, 87.0, 88.0], [86.0, 86.0, 89.0], [84.0, 88.0, 88.5]],
}


@pytest.fixture
def results(tmp_path):
    with Store(tmp_path / "results.sqlite") as st:
        for act, curves in CURVES.items():
            for seed, curve in enumerate(curves):
                rid = st.ensure_run(
                    study="table1", model="lenet5", dataset="fashion-mnist",
                    activation=act, seed=seed, config={"epochs": 3, "lr": 0.01},
                )  # fmt: skip
                for e, acc in enumerate(curve, 1):
                    st.record_epoch(rid, e, {
                        "val_acc": acc, "train_loss": 1.0 / e, "score": 3.0 - e / 2,
                        "weight_mean_abs_sum": 0.01 * e, "seconds": 2.0,
                    })  # fmt: skip
                st.set_status(rid, "done")
        # an unfinished run must not enter the numbers
        rid = st.ensure_run(study="table1", model="lenet5", dataset="fashion-mnist",
                            activation="relu", seed=9, config={"epochs": 3, "lr": 0.01})
        st.record_epoch(rid, 1, {"val_acc": 99.9})
    return tmp_path


def row(text, label, table=0):
    """The cells of the row ``label`` in the ``table``-th table (0: Table 1 layout,
    1: Score vs convergence)."""
    lines = [ln for ln in text.splitlines() if ln.startswith(f"| {label} |")]
    assert len(lines) == 2
    return [c.strip() for c in lines[table].strip("|").split("|")]


def test_table_numbers(results):
    path = write_report(results, threshold=85.0, threshold_epochs=(1, 2, 3))
    text = path.read_text()
    header = row(text, "method")
    assert header[:7] == ["method", "runs", "mean", "median", "<85% @1", "<85% @2", "<85% @3"]
    # relu bests 86, 90, 10 -> mean 62, median 86; under 85 until epoch 1/2/3: 3, 2, 1
    r = row(text, "ReLU")
    assert r[:7] == ["ReLU", "3", "62.00", "86.00", "3", "2", "1"]
    assert r[7] == "2.0"  # median seconds per epoch
    assert r[8:] == ["94.42", "98.92", "19/15/14/11/11"]  # the paper's numbers beside ours
    n = row(text, "NReLU")
    assert n[:7] == ["NReLU", "3", "**88.50**", "**88.50**", "1", "0", "0"]
    assert n[8:] == ["98.95", "98.96", "0/0/0/0/0"]
    assert "1 unfinished run(s) left out" in text
    assert "official test split" in text


def test_default_threshold_and_epochs(results):
    text = write_report(results, figures=False).read_text()
    # Fashion-MNIST default threshold 88 %, paper epochs scaled to 3 epochs: 1, 2, 3
    assert row(text, "method")[4:7] == ["<88% @1", "<88% @2", "<88% @3"]
    assert row(text, "NReLU")[4:7] == ["3", "2", "0"]
    assert not list(results.glob("*.png"))


def test_figures(results):
    text = write_report(results).read_text()
    pngs = re.findall(r"!\[\w+\]\(([^)]+\.png)\)", text)
    assert len(pngs) == 3
    for name in pngs:
        data = (results / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_scaled_epochs():
    assert scaled_epochs(50) == (5, 10, 15, 30, 50)
    assert scaled_epochs(6) == (1, 2, 4, 6)
    assert scaled_epochs(1) == (1,)


def test_missing_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="anact reproduce"):
        write_report(tmp_path)


def test_convergence_table(results):
    text = write_report(results, threshold=85.0, figures=False).read_text()
    # Score per epoch 2.5, 2.0, 1.5 in every run -> mean 2.0; epoch-1 accuracy medians
    assert row(text, "ReLU", 1)[1:] == ["2.000", "70.00", "3"]  # reach 85: epochs 2, 3, never
    assert row(text, "NReLU", 1)[1:] == ["2.000", "85.50", "1"]  # reach 85: 1, 1, 2
    assert "Score vs accuracy after epoch 1: –" in text  # two activations: undefined


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = [3.0, 1.0, 2.0, 2.0, 5.0, 0.5]
    y = [10.0, 30.0, 20.0, 25.0, 1.0, 40.0]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def _one_epoch_run(st, act, seed, acc, *, status="done", mode=None, error=None):
    rid = st.ensure_run(study="table1", model="lenet5", dataset="mnist", activation=act,
                        seed=seed, config={"epochs": 1})  # fmt: skip
    if acc is not None:
        st.record_epoch(rid, 1, {"val_acc": acc, "score": 1.0, "seconds": 1.0}, mode=mode)
    st.set_status(rid, status, error)
    return rid


def test_failed_runs_are_listed_with_their_error(tmp_path):
    with Store(tmp_path / "results.sqlite") as st:
        _one_epoch_run(st, "relu", 0, 90.0)
        _one_epoch_run(st, "nrelu", 0, None, status="failed",
                       error="Traceback (most recent call last):\n  ...\nBoom: disk full\n")
        _one_epoch_run(st, "swish", 0, None, status="pending")
    text = write_report(tmp_path, figures=False).read_text()
    assert "1 failed run(s) left out" in text
    assert "- NReLU seed 0, after 0 epoch(s): `Boom: disk full`" in text
    assert "1 unfinished run(s) left out (pending, or running in another process" in text


def test_training_mode_is_shown_when_ensembles_were_used(tmp_path):
    with Store(tmp_path / "results.sqlite") as st:
        _one_epoch_run(st, "relu", 0, 90.0, mode="sequential")
        _one_epoch_run(st, "relu", 1, 91.0, mode="ensemble")
        _one_epoch_run(st, "nrelu", 0, 92.0, mode="ensemble")
        with pytest.raises(ValueError, match="mode must be one of"):
            st.record_epoch(1, 1, {"val_acc": 1.0}, mode="batched")
    text = write_report(tmp_path, figures=False).read_text()
    head = next(ln for ln in text.splitlines() if ln.startswith("| method |"))
    col = [c.strip() for c in head.strip("|").split("|")].index("mode")  # before the paper's
    assert row(text, "ReLU")[col] == "1 ensemble, 1 sequential"
    assert row(text, "NReLU")[col] == "ensemble"
    assert "grow over training" in text


def test_sequential_only_has_no_mode_column_and_ties_are_not_bold(tmp_path):
    with Store(tmp_path / "results.sqlite") as st:
        for act in ("relu", "nrelu", "swish"):
            _one_epoch_run(st, act, 0, 10.0, mode="sequential")  # all at chance
    text = write_report(tmp_path, figures=False).read_text()
    assert "| mode |" not in text and "**" not in text
