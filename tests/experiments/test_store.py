import contextlib
import multiprocessing as mp
import sqlite3
import time

import pytest

from anact.experiments.store import EPOCH_FIELDS, Store, config_key

IDENT = dict(study="s", model="m", dataset="d", activation="relu", seed=0)


def test_schema_wal_and_identity(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        a = st.ensure_run(**IDENT, config={"lr": 0.1, "epochs": 2})
        assert st.ensure_run(**IDENT, config={"epochs": 2, "lr": 0.1}) == a  # key order
        b = st.ensure_run(**IDENT, config={"lr": 0.2, "epochs": 2})
        c = st.ensure_run(**{**IDENT, "seed": 1}, config={"lr": 0.1, "epochs": 2})
        assert len({a, b, c}) == 3
        run = st.run(a)
        assert run["status"] == "pending" and run["config"] == {"lr": 0.1, "epochs": 2}
        assert run["config_key"] == config_key({"epochs": 2, "lr": 0.1})
        assert run["created_at"] <= run["updated_at"]
    db = sqlite3.connect(tmp_path / "r.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in db.execute("PRAGMA table_info(epochs)")]
    assert cols == ["run_id", "epoch", *EPOCH_FIELDS, "extra", "mode"]
    with pytest.raises(sqlite3.IntegrityError):  # the unique key on the run identity
        db.execute(
            "INSERT INTO runs (study, model, dataset, activation, seed, config_key, config,"
            " created_at, updated_at) VALUES ('s','m','d','relu',0,?,'{}',0,0)",
            (config_key({"lr": 0.1, "epochs": 2}),),
        )


def test_epochs_roundtrip_truncate(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        rid = st.ensure_run(**IDENT, config={})
        for e in (1, 2, 3):
            st.record_epoch(rid, e, {"train_loss": 1.0 / e, "val_acc": 50.0 + e, "score": None})
        st.record_epoch(rid, 2, {"val_acc": 99.0})  # overwrite
        eps = st.epochs(rid)
        assert [e["epoch"] for e in eps] == [1, 2, 3]
        assert eps[1]["val_acc"] == 99.0 and eps[1]["train_loss"] is None
        assert eps[0]["val_acc_top5"] is None and st.run(rid)["epochs_done"] == 3
        st.truncate_epochs(rid, 1)
        assert [e["epoch"] for e in st.epochs(rid)] == [1] and st.run(rid)["epochs_done"] == 1
        with pytest.raises(ValueError, match="unknown epoch fields"):
            st.record_epoch(rid, 4, {"val_accuracy": 1.0})


def test_claim_and_status(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        rid = st.ensure_run(**IDENT, config={})
        assert st.claim(rid)
        assert st.claim(rid)  # the same process may re-claim
        assert st.run(rid)["status"] == "running"
        st.set_status(rid, "done")
        assert not st.claim(rid)
        assert st.run(rid)["owner"] is None


def _hold_claim(path, rid, ready, release):
    st = Store(path)
    assert st.claim(rid)
    ready.set()
    release.wait(30)


@contextlib.contextmanager
def _claimed_by_another_process(path):
    """A run claimed by a child process: yields (run id, process, event that ends it)."""
    with Store(path) as st:
        rid = st.ensure_run(**IDENT, config={})
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_claim, args=(path, rid, ready, release))
    p.start()
    try:
        assert ready.wait(60)
        yield rid, p, release
    finally:
        release.set()
        p.join(5)


def test_claim_by_live_and_dead_process(tmp_path):
    path = tmp_path / "r.sqlite"
    with _claimed_by_another_process(path) as (rid, p, release), Store(path) as st:
        assert st.run(rid)["owner"].endswith(f":{p.pid}")
        assert not st.claim(rid)  # held by a live process
        release.set()
        p.join(30)
        assert st.claim(rid)  # its owner died: taken over


def _writer(path, worker, n_runs, n_epochs):
    st = Store(path, timeout_s=60)
    for r in range(n_runs):
        # runs 0..1 are shared by every worker, the rest are the worker's own
        seed = r if r < 2 else 1000 * (worker + 1) + r
        rid = st.ensure_run(**{**IDENT, "seed": seed}, config={"w": r < 2 or worker})
        for e in range(1, n_epochs + 1):
            st.record_epoch(rid, e, {"val_acc": float(e), "train_loss": float(worker)})
    st.close()


def test_concurrent_writers(tmp_path):
    path = tmp_path / "r.sqlite"
    Store(path).close()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 6, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    with Store(path) as st:
        runs = st.runs()
        assert len(runs) == 2 + 4 * 4  # shared runs exist once
        for r in runs:
            assert [e["epoch"] for e in st.epochs(r["id"])] == list(range(1, 16))


def test_live_owner_on_this_host_keeps_its_claim_past_the_lease(tmp_path):
    # a long epoch (no heartbeat for longer than the lease) must not let a second
    # process take over a run whose owner is alive on this host
    path = tmp_path / "r.sqlite"
    with _claimed_by_another_process(path) as (rid, p, release):
        time.sleep(0.05)
        with Store(path) as st:
            assert not st.claim(rid, lease_s=0.01)  # lease long expired, owner alive
            assert not st.heartbeat(rid)  # not ours to refresh
            release.set()
            p.join(30)
            assert st.claim(rid, lease_s=0.01)  # its owner died: taken over


def test_heartbeat_and_lease_of_another_hosts_owner(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        rid = st.ensure_run(**IDENT, config={})
        assert not st.heartbeat(rid)  # unclaimed
        assert st.claim(rid)
        before = st.run(rid)["updated_at"]
        time.sleep(0.01)
        assert st.heartbeat(rid) and st.run(rid)["updated_at"] > before
        # an owner elsewhere cannot be checked: its heartbeat (lease) decides
        st._db.execute("UPDATE runs SET owner='elsewhere.invalid:1', updated_at=? WHERE id=?",
                       (time.time(), rid))  # fmt: skip
        assert not st.claim(rid, lease_s=60)
        st._db.execute("UPDATE runs SET updated_at=? WHERE id=?", (time.time() - 120, rid))
        assert st.claim(rid, lease_s=60)


def test_reused_pid_is_not_a_live_owner(tmp_path):
    # the claim's pid is alive, but that process started after the claim's last
    # heartbeat: the owner died and its pid was reused, so the run is taken over
    import socket
    import subprocess

    other = subprocess.Popen(["sleep", "30"])
    try:
        with Store(tmp_path / "r.sqlite") as st:
            rid = st.ensure_run(**IDENT, config={})
            owner = f"{socket.gethostname()}:{other.pid}"
            st._db.execute("UPDATE runs SET status='running', owner=?, updated_at=? WHERE id=?",
                           (owner, time.time(), rid))  # fmt: skip
            assert not st.claim(rid)  # alive and heard of since it started
            st._db.execute("UPDATE runs SET updated_at=? WHERE id=?", (time.time() - 100, rid))
            assert st.claim(rid)
    finally:
        other.kill()
        other.wait()
