"""The command line end to end on a tiny data set, and its error messages."""

import pytest

from anact.experiments.cli import main


def test_end_to_end(tmp_path, fake_mnist, capsys):
    out = tmp_path / "res"
    rc = main([
        "reproduce", "table1", "--dataset", "mnist", "--data-dir", str(fake_mnist),
        "--activations", "ReLU,nrelu,relu-gpn", "--runs", "2", "--epochs", "2",
        "--batch-size", "32", "--lr", "0.05", "--train-subset", "0", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert rc == 0
    text = (out / "report.md").read_text()
    for label in ("ReLU", "NReLU", "ReLU-GPN"):
        cells = [ln for ln in text.splitlines() if ln.startswith(f"| {label} |")]
        # one row in Table 1's layout (2 runs each), one in the Score table
        assert len(cells) == 2 and cells[0].split("|")[2].strip() == "2"
    assert "<98% @1" in text  # MNIST: the paper's threshold
    assert len(list(out.glob("*.png"))) == 3
    assert "report:" in capsys.readouterr().out

    assert main(["report", str(out), "--threshold", "50", "--threshold-epochs", "2"]) == 0
    assert "<50% @2" in (out / "report.md").read_text()


def test_unknown_activation_lists_valid(capsys, fake_mnist, tmp_path):
    rc = main(["reproduce", "table1", "--activations", "relu,gelu", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown activation 'gelu'" in err and "nswish" in err and "relu-gpn" in err


def test_unknown_setting(capsys, tmp_path):
    assert main(["reproduce", "table1", "--set", "wd=0.1", "--out", str(tmp_path)]) == 2
    assert "has no setting 'wd'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--runs", "0"], ["--epochs", "x"], ["--lr", "-1"]])
def test_bad_numbers(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "table1", *bad])
    assert e.value.code == 2
    assert "expected a positive" in capsys.readouterr().err


def test_unknown_study(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "table9"])
    assert "table1" in capsys.readouterr().err


def test_missing_data_message(tmp_path, capsys):
    rc = main(["reproduce", "table1", "--data-dir", str(tmp_path / "none"), "--runs", "1",
               "--epochs", "1", "--activations", "relu", "--out", str(tmp_path), "--quiet"])
    assert rc == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_report_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "anact reproduce" in capsys.readouterr().err
