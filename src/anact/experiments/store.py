"""Results in one SQLite file (``DIR/results.sqlite``), safe for several writers.

Two tables::

    runs(id, study, model, dataset, activation, seed, config_key, config JSON,
         status pending|running|done|failed, owner, epochs_done, error,
         created_at, updated_at)            UNIQUE(study, model, dataset, activation,
                                                   seed, config_key)
    epochs(run_id, epoch, train_loss, val_acc, val_acc_top5, score,
           weight_mean_abs_sum, seconds, extra JSON, mode)
                                            PRIMARY KEY(run_id, epoch)

Accuracies are in percent; ``epoch`` counts from 1. ``config_key`` is a hash of the
run's identity settings (everything that changes its numbers), so the same
activation and seed under other settings is another run. WAL journaling and a
busy timeout let several processes write at once; a run is *claimed* by one
process at a time (``owner`` = host:pid). The owner refreshes its claim while it
trains (:meth:`Store.heartbeat`, also in the middle of long epochs). A claim is taken
over when its process has died (SIGKILL included; on the same host this is checked
directly and a live owner is never replaced) or, for an owner on another host, when it
has been silent for ``lease_s``.

``extra`` holds any further metrics a study's ``evaluate()`` returns (e.g.
``corrupt_acc`` and ``corrupt_acc/<name>`` of the ``layeract`` study) as a JSON
object ``{name: number or null}``; NULL when there are none. Databases written
before the column existed are migrated when opened (``ALTER TABLE epochs ADD
COLUMN extra``; their epochs read back with ``extra == {}``).

``mode`` says how the epoch was trained: ``"sequential"`` (one run at a time) or
``"ensemble"`` (``anact reproduce --ensemble``: the same math batched over the runs,
so rounding differs; see docs/ensemble.md); NULL (not recorded) in databases
written before the column existed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Store", "config_key", "EPOCH_FIELDS", "MODES"]

EPOCH_FIELDS = ("train_loss", "val_acc", "val_acc_top5", "score", "weight_mean_abs_sum", "seconds")
#: how an epoch was trained (the ``mode`` column)
MODES = ("sequential", "ensemble")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY,
    study       TEXT NOT NULL,
    model       TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    activation  TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    config_key  TEXT NOT NULL,
    config      TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'running', 'done', 'failed')),
    owner       TEXT,
    epochs_done INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    UNIQUE (study, model, dataset, activation, seed, config_key)
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id              INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch               INTEGER NOT NULL,
    train_loss          REAL,
    val_acc             REAL NOT NULL,
    val_acc_top5        REAL,
    score               REAL,
    weight_mean_abs_sum REAL,
    seconds             REAL,
    extra               TEXT,
    mode                TEXT,
    PRIMARY KEY (run_id, epoch)
);
"""


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able settings dict (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _on_this_host(owner: str) -> bool:
    return owner.rpartition(":")[0] == socket.gethostname()


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (Unix time, ±1 s), or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22: start time since boot
        btime = next(
            float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
            if ln.startswith("btime ")
        )  # fmt: skip
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(owner: str | None, last_seen: float) -> bool:
    """Whether the claim's process (``host:pid``, last heard of at ``last_seen``) lives.
    Another host's process cannot be checked: True (the lease decides). A pid alive
    now but started after ``last_seen`` is another process that reused the number."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    started = _process_start_time(int(pid))
    return started is None or started <= last_seen + 2.0  # /proc's btime is whole seconds


class Store:
    """The results database of one output directory.

    ``Store(path)`` creates the file and tables if needed. Each method is one
    short transaction, so a killed process leaves the database consistent.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            _migrate(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (takes the write lock up front, waits if busy)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- runs -------------------------------------------------------------
    def ensure_run(
        self,
        *,
        study: str,
        model: str,
        dataset: str,
        activation: str,
        seed: int,
        config: Mapping[str, Any],
    ) -> int:
        """The id of the run with this identity, created as ``pending`` if new."""
        key = config_key(config)
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (study, model, dataset, activation, seed, config_key,"
                " config, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study, model, dataset, activation, seed, key,
                 json.dumps(dict(config), sort_keys=True), now, now),
            )  # fmt: skip
            row = db.execute(
                "SELECT id FROM runs WHERE study=? AND model=? AND dataset=? AND activation=?"
                " AND seed=? AND config_key=?",
                (study, model, dataset, activation, seed, key),
            ).fetchone()
        return int(row["id"])

    def claim(self, run_id: int, *, lease_s: float = 3600.0) -> bool:
        """Mark the run ``running`` by this process; False if it is done or another
        live process holds it. A dead owner is replaced; a live owner on this host
        never is; an owner on another host is after ``lease_s`` without a heartbeat."""
        me = _me()
        with self._tx() as db:
            row = db.execute(
                "SELECT status, owner, updated_at FROM runs WHERE id=?", (run_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no run with id {run_id} in {self.path}")
            if row["status"] == "done":
                return False
            owner = row["owner"]
            if row["status"] == "running" and owner and owner != me:
                if _on_this_host(owner):
                    if _owner_alive(owner, row["updated_at"]):
                        return False
                elif time.time() - row["updated_at"] < lease_s:
                    return False
            db.execute(
                "UPDATE runs SET status='running', owner=?, error=NULL, updated_at=? WHERE id=?",
                (me, time.time(), run_id),
            )
        return True

    def heartbeat(self, run_id: int) -> bool:
        """Refresh this process's claim on the run (its lease); False if it holds none."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE runs SET updated_at=? WHERE id=? AND owner=? AND status='running'",
                (time.time(), run_id, _me()),
            )
        return cur.rowcount == 1

    def set_status(self, run_id: int, status: str, error: str | None = None) -> None:
        """Set ``status`` (``done``, ``failed`` or ``pending``) and release the claim."""
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status=?, owner=NULL, error=?, updated_at=? WHERE id=?",
                (status, error, time.time(), run_id),
            )

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as a dict (``config`` parsed)."""
        row = self._db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run with id {run_id} in {self.path}")
        return _run_dict(row)

    def runs(self, study: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """All runs (optionally of one study / status), oldest first."""
        sql, args = "SELECT * FROM runs WHERE 1=1", []
        if study is not None:
            sql += " AND study=?"
            args.append(study)
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        return [_run_dict(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    # -- epochs -----------------------------------------------------------
    def record_epoch(
        self,
        run_id: int,
        epoch: int,
        metrics: Mapping[str, float | None],
        extra: Mapping[str, float | None] | None = None,
        mode: str | None = None,
    ) -> None:
        """Store (or overwrite) one epoch's metrics; unknown keys are an error.

        ``extra``: further named metrics (numbers or None; NaN/inf become None),
        kept as JSON in the ``extra`` column and returned by :meth:`epochs`.
        ``mode``: ``"sequential"`` or ``"ensemble"``, how the epoch was trained.
        """
        if mode not in (None, *MODES):
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        unknown = set(metrics) - set(EPOCH_FIELDS)
        if unknown:
            raise ValueError(f"unknown epoch fields {sorted(unknown)}; known: {EPOCH_FIELDS}")
        values = [metrics.get(k) for k in EPOCH_FIELDS]
        extra_json = _extra_json(extra)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO epochs"
                f" (run_id, epoch, {', '.join(EPOCH_FIELDS)}, extra, mode)"
                f" VALUES (?, ?{', ?' * len(EPOCH_FIELDS)}, ?, ?)",
                (run_id, epoch, *values, extra_json, mode),
            )
            db.execute(
                "UPDATE runs SET epochs_done=(SELECT MAX(epoch) FROM epochs WHERE run_id=?),"
                " updated_at=? WHERE id=?",
                (run_id, time.time(), run_id),
            )

    def truncate_epochs(self, run_id: int, keep_through: int) -> None:
        """Delete the run's epochs after ``keep_through`` (used when resuming)."""
        with self._tx() as db:
            db.execute("DELETE FROM epochs WHERE run_id=? AND epoch>?", (run_id, keep_through))
            db.execute(
                "UPDATE runs SET epochs_done=?, updated_at=? WHERE id=?",
                (keep_through, time.time(), run_id),
            )

    def epochs(self, run_id: int) -> list[dict[str, Any]]:
        """The run's epochs in order, as dicts with ``epoch``, :data:`EPOCH_FIELDS`,
        ``extra`` (a dict, empty if the epoch has no further metrics) and ``mode``."""
        rows = self._db.execute(
            "SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["extra"] = json.loads(d["extra"]) if d.get("extra") else {}
            out.append(d)
        return out


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database of an older schema up to date (inside the open transaction)."""
    cols = {row["name"] for row in db.execute("PRAGMA table_info(epochs)")}
    if "extra" not in cols:
        db.execute("ALTER TABLE epochs ADD COLUMN extra TEXT")
    if "mode" not in cols:
        db.execute("ALTER TABLE epochs ADD COLUMN mode TEXT")


def _extra_json(extra: Mapping[str, Any] | None) -> str | None:
    if not extra:
        return None
    clean: dict[str, float | None] = {}
    for k, v in extra.items():
        if v is None:
            clean[str(k)] = None
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"extra metric {k!r} is not a number: {v!r}") from None
        clean[str(k)] = f if math.isfinite(f) else None
    return json.dumps(clean)  # in the order evaluate() returned them


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["config"] = json.loads(d["config"])
    return d
