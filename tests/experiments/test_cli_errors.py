"""``anact reproduce`` checks settings, device, output folder and data before any run is
created: clean ``anact reproduce: error: …`` messages (exit 2), nothing left in the store."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from anact.experiments.cli import main
from anact.experiments.runner import RESULTS_FILE
from anact.experiments.store import Store

QUICK = ["--runs", "1", "--epochs", "1", "--activations", "relu", "--quiet", "--no-report"]


def reproduce_error(capsys, *args: str) -> str:
    """Run ``anact reproduce ARGS``: expects exit code 2 (returned or from argparse)
    and no traceback; returns stderr."""
    try:
        rc = main(["reproduce", *args])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "anact reproduce: error:" in err and "Traceback" not in err
    return err


def stored_runs(out) -> list[dict]:
    if not (out / RESULTS_FILE).exists():
        return []
    with Store(out / RESULTS_FILE) as st:
        return st.runs()


@pytest.mark.parametrize(
    "args",
    [
        ["table1", "--dataset", "mnist", "--data-dir", "/nonexistent/anact"],
        ["vgg", "--dataset", "cifar10"],  # no --data-dir
        ["vgg", "--dataset", "cifar10", "--data-dir", "/nonexistent/anact"],
    ],
)
def test_data_errors_leave_no_run(tmp_path, capsys, args):
    out = tmp_path / "out"
    reproduce_error(capsys, *args, *QUICK, "--out", str(out))
    assert stored_runs(out) == []  # nothing failed, nothing for `anact report` to carry
    # a later, correct run of the same folder starts clean: no "unfinished" runs reported
    assert main(["report", str(out), "--no-figures"]) == 0
    assert "unfinished" not in (out / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_fails_before_any_run(tmp_path, fake_mnist, capsys):
    out = tmp_path / "out"
    err = reproduce_error(capsys, "table1", "--dataset", "mnist", "--data-dir", str(fake_mnist),
                          "--device", "cuda", *QUICK, "--out", str(out))  # fmt: skip
    assert "device 'cuda'" in err and "--device cpu" in err
    assert stored_runs(out) == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("epochs=0", "setting epochs: expected a positive integer"),
        ("runs=2.5", "setting runs: expected a positive integer"),
        ("lr=Infinity", "setting lr: expected a positive finite number"),
        ("train_subset=-1", "setting train_subset: expected an integer >= 0"),
        ('momentum="fast"', "setting momentum: expected a number"),
        ('dataset="cifar10"', "has no dataset 'cifar10'; choose one of fashion-mnist, mnist"),
    ],
)
def test_set_values_get_the_flags_checks(tmp_path, capsys, setting, message):
    # (no data: should a check be missing, the run stops at loading instead of training)
    err = reproduce_error(capsys, "table1", "--set", setting, "--data-dir", "/nonexistent/anact",
                          "--quiet", "--no-report", "--out", str(tmp_path))  # fmt: skip
    assert message in err
    assert stored_runs(tmp_path) == []


def test_set_train_subset_zero_means_the_full_set(tmp_path, fake_mnist):
    rc = main(["reproduce", "table1", "--dataset", "mnist", "--data-dir", str(fake_mnist),
               "--set", "train_subset=0", "--set", "batch_size=256", *QUICK,
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    (run,) = stored_runs(tmp_path)
    assert run["status"] == "done" and run["config"]["train_subset"] is None


def test_non_finite_lr_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "table1", "--lr", "inf"])
    assert e.value.code == 2 and "positive finite number" in capsys.readouterr().err


def test_out_must_be_a_writable_directory(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    err = reproduce_error(capsys, "table1", *QUICK, "--out", str(afile))
    assert "is a file, not a directory" in err
    err = reproduce_error(capsys, "table1", *QUICK, "--out", str(afile / "sub"))
    assert "is a file, not a directory" in err


def _cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def test_data_dir_of_another_layout_suggests_the_dataset(tmp_path, fake_mnist, capsys):
    from anact.experiments.data.layouts import guess_datasets

    cifar = _cifar10(tmp_path / "cifar")
    iwslt = tmp_path / "iwslt"
    iwslt.mkdir()
    for name in ("train.de", "train.en", "valid.de", "valid.en", "test.de", "test.en"):
        (iwslt / name).write_text("Hallo Welt .\n")
    assert guess_datasets(cifar) == ["cifar10"] and guess_datasets(iwslt) == ["iwslt"]
    assert guess_datasets(fake_mnist) == ["fashion-mnist", "mnist"]

    err = reproduce_error(capsys, "vgg", "--data-dir", str(cifar), *QUICK,
                          "--out", str(tmp_path / "o1"))  # fmt: skip
    assert "pass --dataset cifar10" in err
    assert "or pass --data-dir" not in err  # it was passed
    err = reproduce_error(capsys, "translation", "--data-dir", str(iwslt), *QUICK,
                          "--out", str(tmp_path / "o2"))  # fmt: skip
    assert "pass --dataset iwslt" in err
    err = reproduce_error(capsys, "text", "--data-dir", str(tmp_path / "o1"), *QUICK,
                          "--out", str(tmp_path / "o3"))  # fmt: skip
    assert "imdb reads aclImdb/" in err  # which --dataset reads which layout


def test_help_is_per_study(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "~10 min on a 2-core CPU" not in out
    assert "text: rotten-tomatoes, imdb" in out and "translation: trans-de-en, iwslt" in out
    assert "resnet-tiny 1 run(s) × 3 epochs on fashion-mnist" in out
    assert "--paper: 3 run(s) × 200 epochs on tiny-imagenet" in out
    assert "grow over training" in out  # --ensemble: not "the same numbers"
