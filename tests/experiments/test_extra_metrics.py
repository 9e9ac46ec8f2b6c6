"""Extra metrics (``epochs.extra``): store round-trip, migration of an old database,
the runner keeping every key of ``evaluate()`` across a resume, the layeract
robustness table, the Score "n/a" of unhooked activations and the BLEU label."""

import sqlite3

import pytest
import torch
from torch import nn

from anact.experiments import paper
from anact.experiments.report import write_report
from anact.experiments.runner import RESULTS_FILE, reproduce
from anact.experiments.store import EPOCH_FIELDS, Store
from anact.experiments.studies import Study, Trial, get_study

IDENT = dict(study="s", model="m", dataset="d", activation="relu", seed=0)

#: the schema of the store before ``extra`` (as committed before issue 7)
OLD_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, study TEXT NOT NULL, model TEXT NOT NULL,
    dataset TEXT NOT NULL, activation TEXT NOT NULL, seed INTEGER NOT NULL,
    config_key TEXT NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'done', 'failed')),
    owner TEXT, epochs_done INTEGER NOT NULL DEFAULT 0, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE (study, model, dataset, activation, seed, config_key)
);
CREATE TABLE epochs (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL, train_loss REAL, val_acc REAL NOT NULL, val_acc_top5 REAL,
    score REAL, weight_mean_abs_sum REAL, seconds REAL,
    PRIMARY KEY (run_id, epoch)
);
"""


def test_extra_roundtrip_overwrite_truncate(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        rid = st.ensure_run(**IDENT, config={})
        st.record_epoch(rid, 1, {"val_acc": 50.0}, extra={"corrupt_acc": 40.5, "a/b": 1})
        st.record_epoch(rid, 2, {"val_acc": 60.0}, extra={"corrupt_acc": float("nan")})
        st.record_epoch(rid, 3, {"val_acc": 70.0})
        eps = st.epochs(rid)
        assert eps[0]["extra"] == {"corrupt_acc": 40.5, "a/b": 1.0}
        assert eps[1]["extra"] == {"corrupt_acc": None}  # NaN is stored as null
        assert eps[2]["extra"] == {}
        st.record_epoch(rid, 1, {"val_acc": 51.0}, extra={"corrupt_acc": 41.0})  # overwrite
        assert st.epochs(rid)[0]["extra"] == {"corrupt_acc": 41.0}
        st.truncate_epochs(rid, 1)
        assert [e["extra"] for e in st.epochs(rid)] == [{"corrupt_acc": 41.0}]
        with pytest.raises(ValueError, match="not a number"):
            st.record_epoch(rid, 2, {"val_acc": 1.0}, extra={"name": "text"})


def test_old_database_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute(
        "INSERT INTO runs (study, model, dataset, activation, seed, config_key, config,"
        " status, epochs_done, created_at, updated_at)"
        " VALUES ('s', 'm', 'd', 'relu', 0, 'k', '{}', 'running', 1, 0, 0)"
    )
    db.execute("INSERT INTO epochs (run_id, epoch, val_acc, score) VALUES (1, 1, 55.0, 2.5)")
    db.commit()
    db.close()
    with Store(path) as st:  # opens and migrates
        assert st.epochs(1) == [{
            "run_id": 1, "epoch": 1, "train_loss": None, "val_acc": 55.0, "val_acc_top5": None,
            "score": 2.5, "weight_mean_abs_sum": None, "seconds": None, "extra": {},
            "mode": None,
        }]  # fmt: skip
        st.record_epoch(1, 2, {"val_acc": 60.0}, extra={"corrupt_acc": 30.0})
        assert st.epochs(1)[1]["extra"] == {"corrupt_acc": 30.0}
    with Store(path) as st:  # a second open finds it migrated already
        assert [e["extra"] for e in st.epochs(1)] == [{}, {"corrupt_acc": 30.0}]
    cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(epochs)")]
    assert cols == ["run_id", "epoch", *EPOCH_FIELDS, "extra", "mode"]


# -- the runner -------------------------------------------------------------------


def fake_study(stop_at=None, hooked=True):
    """A tiny linear-model study whose evaluate() returns extra metrics that change
    with the weights; ``stop_at``: raise KeyboardInterrupt when that epoch starts."""

    def build(config, activation, seed, data, device):
        act = nn.ReLU() if hooked else nn.Identity()  # nothing for the monitor to hook
        model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = data
        epoch = {"n": 0}

        def train_epoch(gen, after_step):
            epoch["n"] += 1
            if stop_at is not None and epoch["n"] == stop_at:
                raise KeyboardInterrupt
            perm = torch.randperm(x.shape[0], generator=gen)
            total = 0.0
            for i in range(0, x.shape[0], 16):
                idx = perm[i : i + 16]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                after_step()
                total += loss.item()
            return total

        @torch.no_grad()
        def evaluate():
            acc = 100.0 * float((model(x).argmax(1) == y).float().mean())
            w = float(model[0].weight.sum())
            return {"val_acc": acc, "val_acc_top5": None, "corrupt_acc": acc / 2,
                    "corrupt_acc/noise": w}  # fmt: skip

        return Trial(model, opt, train_epoch, evaluate)

    def load_data(config, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return x, (x[:, 0] > 0).long()

    return Study(
        name="fake-extra", title="fake", model="mlp",
        defaults={"dataset": "toy", "epochs": 3, "runs": 1, "seed": 0},
        paper_preset={}, activations=("relu",), load_data=load_data, build=build,
    )  # fmt: skip


def stored_epochs(out):
    with Store(out / RESULTS_FILE) as st:
        (run,) = st.runs()
        return run["status"], st.epochs(run["id"])


def test_runner_stores_extra_and_resumes(tmp_path):
    ref = tmp_path / "ref"
    study = fake_study()
    reproduce(study, study.config(), out_dir=ref, quiet=True)
    status, ref_eps = stored_epochs(ref)
    assert status == "done" and len(ref_eps) == 3
    for e in ref_eps:
        assert set(e["extra"]) == {"corrupt_acc", "corrupt_acc/noise"}
        assert e["extra"]["corrupt_acc"] == pytest.approx(e["val_acc"] / 2)
        assert e["score"] is not None and e["score"] > 0
    # interrupted at epoch 3, then resumed from the epoch-2 checkpoint
    out = tmp_path / "out"
    broken = fake_study(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        reproduce(broken, broken.config(), out_dir=out, quiet=True)
    status, eps = stored_epochs(out)
    assert status == "pending" and [e["extra"] for e in eps] == [e["extra"] for e in ref_eps[:2]]
    reproduce(study, study.config(), out_dir=out, quiet=True)
    status, eps = stored_epochs(out)
    assert status == "done"
    assert [e["extra"] for e in eps] == [e["extra"] for e in ref_eps]


def test_resume_in_a_database_of_the_old_schema(tmp_path):
    """A run interrupted under the old schema (no ``extra``) resumes under the new."""
    out = tmp_path / "out"
    broken, study = fake_study(stop_at=2), fake_study()
    with pytest.raises(KeyboardInterrupt):
        reproduce(broken, broken.config(), out_dir=out, quiet=True)
    db = sqlite3.connect(out / RESULTS_FILE)
    db.execute("ALTER TABLE epochs DROP COLUMN extra")  # as the old code wrote it
    db.commit()
    db.close()
    reproduce(study, study.config(), out_dir=out, quiet=True)
    status, eps = stored_epochs(out)
    assert status == "done" and [e["epoch"] for e in eps] == [1, 2, 3]
    assert eps[0]["extra"] == {}  # written before the migration
    assert all(set(e["extra"]) == {"corrupt_acc", "corrupt_acc/noise"} for e in eps[1:])


def test_unhooked_model_stores_no_score(tmp_path):
    study = fake_study(hooked=False)
    reproduce(study, study.config(), out_dir=tmp_path, quiet=True)
    _, eps = stored_epochs(tmp_path)
    assert [e["score"] for e in eps] == [None, None, None]
    assert all(e["weight_mean_abs_sum"] > 0 for e in eps)  # the weights are still there


# -- the report -------------------------------------------------------------------

LAYERACT = {  # activation: (clean per epoch, corrupt per epoch, score)
    "relu": ([50.0, 80.0], [40.0, 62.0], 2.0),
    "la-silu": ([52.0, 84.0], [45.0, 71.0], None),  # unhooked: NULL Score
    "la-hardsilu": ([51.0, 83.0], [44.0, 70.0], 0.0),  # unhooked, pre-fix database: 0.0
    "nswish": ([10.0, 10.0], [10.0, 10.0], None),  # diverged: no Score, no weights either
}


def row(text, label, table):
    lines = [ln for ln in text.splitlines() if ln.startswith(f"| {label} |")]
    return [c.strip() for c in lines[table].strip("|").split("|")]


def header(text, first_cell):
    return next(ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |"))


@pytest.fixture
def layeract_results(tmp_path):
    with Store(tmp_path / RESULTS_FILE) as st:
        for act, (clean, corrupt, score) in LAYERACT.items():
            rid = st.ensure_run(study="layeract", model="resnet-cifar", dataset="fashion-mnist",
                                activation=act, seed=0, config={"epochs": 2})  # fmt: skip
            for e, (c, k) in enumerate(zip(clean, corrupt, strict=True), 1):
                wsum = None if act == "nswish" else 0.01 * e
                st.record_epoch(
                    rid, e, {"val_acc": c, "score": score, "seconds": 1.0,
                             "weight_mean_abs_sum": wsum},
                    extra={"corrupt_acc": k, "corrupt_acc/gaussian_noise": k - 10,
                           "corrupt_acc/contrast": k + 10},
                )  # fmt: skip
            st.set_status(rid, "done")
    return tmp_path


def test_layeract_robustness_table(layeract_results):
    text = write_report(layeract_results, figures=False).read_text()
    assert "Robustness: clean vs corrupted accuracy" in text
    heads = [ln for ln in text.splitlines() if ln.startswith("| method |")]
    robust_head = next(h for h in heads if "corrupted top-1" in h)
    assert [c.strip() for c in robust_head.strip("|").split("|")] == [
        "method", "runs", "clean top-1 (full test)", "clean top-1 (corrupted images)",
        "corrupted top-1 (mean)", "drop", "gaussian noise", "contrast", "paper clean top1",
    ]  # fmt: skip
    assert "| method | runs | mean | median |" in text  # the main table is still there
    # no corrupt_subset in these runs' settings: the whole test set was corrupted
    assert row(text, "ReLU", 1) == ["ReLU", "1", "80.00", "80.00", "62.00", "18.00", "52.00",
                                    "72.00", "91.79"]  # fmt: skip
    la = row(text, "LA-SiLU", 1)
    assert la[2:6] == ["84.00", "84.00", "71.00", "13.00"] and la[-1] == "92.30"
    assert row(text, "LA-HardSiLU", 1)[-1] == "91.84"


def test_robustness_drop_is_measured_on_the_corrupted_images(tmp_path):
    # clean top-1 90 % on the full test set but 50 % on the 500 images that were
    # corrupted (45 %): the drop is 5 points, not 45
    with Store(tmp_path / RESULTS_FILE) as st:
        for act, extra in (("relu", {"corrupt_clean_acc": 50.0}), ("swish", {})):
            rid = st.ensure_run(study="layeract", model="resnet-cifar", dataset="cifar10",
                                activation=act, seed=0,
                                config={"epochs": 1, "corrupt_subset": 500})  # fmt: skip
            st.record_epoch(rid, 1, {"val_acc": 90.0, "score": 1.0},
                            extra={"corrupt_acc": 45.0, **extra})  # fmt: skip
            st.set_status(rid, "done")
    text = write_report(tmp_path, figures=False).read_text()
    assert row(text, "ReLU", 1)[2:6] == ["90.00", "50.00", "45.00", "5.00"]
    # stored before corrupt_clean_acc existed: no clean accuracy on those images, no drop
    assert row(text, "Swish", 1)[2:6] == ["90.00", "–", "45.00", "–"]
    assert "the first 500 test images" in text


def test_layeract_paper_numbers_in_paper_module():
    assert paper.LAYERACT == {"relu": {"top1": 91.79}, "swish": {"top1": 91.96},
                              "la-silu": {"top1": 92.30}, "la-hardsilu": {"top1": 91.84}}
    assert dict(get_study("layeract").paper) == paper.LAYERACT


def test_unhooked_score_is_na(layeract_results):
    text = write_report(layeract_results, figures=False).read_text()
    assert row(text, "ReLU", 2)[1] == "2.000"
    assert row(text, "LA-SiLU", 2)[1] == "n/a"  # NULL Score
    assert row(text, "LA-HardSiLU", 2)[1] == "n/a"  # 0.0 in every epoch: nothing hooked
    assert row(text, "NSwish", 2)[1] == "–"  # diverged: not "n/a"
    assert "0.000" not in text


def test_no_robustness_table_without_extras(tmp_path):
    with Store(tmp_path / RESULTS_FILE) as st:
        rid = st.ensure_run(study="table1", model="lenet5", dataset="mnist",
                            activation="relu", seed=0, config={"epochs": 1})  # fmt: skip
        st.record_epoch(rid, 1, {"val_acc": 90.0, "score": 1.0})
        st.set_status(rid, "done")
    assert "Robustness" not in write_report(tmp_path, figures=False).read_text()


def test_translation_is_labelled_bleu(tmp_path, monkeypatch):
    assert get_study("translation").metric == "bleu"
    assert get_study("translation").metric_label == "BLEU"
    assert get_study("vgg").metric == "accuracy"
    with pytest.raises(ValueError, match="metric"):
        Study(name="x", title="x", model="x", defaults={}, paper_preset={}, activations=(),
              load_data=None, build=None, metric="f1")  # fmt: skip
    with Store(tmp_path / RESULTS_FILE) as st:
        for act, bleu in (("relu", [3.0, 7.5]), ("nswish", [4.0, 8.0])):
            rid = st.ensure_run(study="translation", model="transformer", dataset="trans-de-en",
                                activation=act, seed=0, config={"epochs": 2})  # fmt: skip
            for e, b in enumerate(bleu, 1):
                st.record_epoch(rid, e, {"val_acc": b, "score": 1.0 + e, "seconds": 1.0})
            st.set_status(rid, "done")
    labels = []
    from matplotlib.figure import Figure

    real_savefig = Figure.savefig

    def savefig(fig, *args, **kw):
        labels.append(fig._suptitle.get_text() if fig._suptitle else "")
        labels.extend(t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel()))
        return real_savefig(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    text = write_report(tmp_path).read_text()
    main = [c.strip() for c in header(text, "method").strip("|").split("|")]
    assert main[:4] == ["method", "runs", "mean BLEU", "median BLEU"]
    assert "BLEU after epoch 1" in text and "accuracy after epoch 1" not in text
    assert "best validation BLEU over its epochs" in text and "(%)" not in text
    assert row(text, "NSwish", 0)[2] == "**8.00**"
    assert "validation BLEU" in labels and "best validation BLEU so far" in labels
    assert "BLEU" in labels and "accuracy (%)" not in labels
    assert any(t.startswith("Validation BLEU (") for t in labels)
