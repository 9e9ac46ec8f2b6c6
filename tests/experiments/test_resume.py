"""A real process killed with SIGKILL mid-run resumes to the same numbers, bit for bit."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from experiments_helpers import write_dataset

from anact.experiments.runner import reproduce
from anact.experiments.studies import get_study

EPOCHS = 3


def command(data_dir, out):
    return [
        sys.executable, "-m", "anact.experiments.cli", "reproduce", "table1",
        "--dataset", "mnist", "--data-dir", str(data_dir), "--activations", "nrelu",
        "--runs", "1", "--epochs", str(EPOCHS), "--batch-size", "16", "--lr", "0.02",
        "--set", "momentum=0.5", "--train-subset", "0", "--out", str(out),
        "--quiet", "--no-report",
    ]  # fmt: skip


def epochs_of(out):
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute(
        "SELECT e.epoch, e.train_loss, e.val_acc, e.score, e.weight_mean_abs_sum, r.status"
        " FROM epochs e JOIN runs r ON r.id = e.run_id ORDER BY e.epoch"
    ).fetchall()
    db.close()
    return rows


def epochs_done(out):
    try:
        db = sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True, timeout=1)
        row = db.execute("SELECT status, epochs_done FROM runs").fetchone()
        db.close()
        return row
    except sqlite3.Error:
        return None


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=800, n_test=200)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"  # the uninterrupted run, in this process (also 1 thread)
    table1 = get_study("table1")
    config = table1.config({
        "dataset": "mnist", "data_dir": str(data), "runs": 1, "epochs": EPOCHS,
        "batch_size": 16, "lr": 0.02, "momentum": 0.5, "train_subset": None,
    })  # fmt: skip
    reproduce(table1, config, ["nrelu"], out_dir=ref, quiet=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(data, out), env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        row = epochs_done(out) if (out / "results.sqlite").exists() else None
        if row and row[1] >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    status, done = epochs_done(out)
    assert status == "running" and 1 <= done < EPOCHS, "the kill must land mid-run"

    subprocess.run(command(data, out), check=True, env=env, timeout=240)
    resumed, reference = epochs_of(out), epochs_of(ref)
    assert [r[0] for r in reference] == list(range(1, EPOCHS + 1))
    assert reference[-1][-1] == "done"
    assert resumed == reference  # exact float equality of every stored number
    assert not list((out / "checkpoints").iterdir())
