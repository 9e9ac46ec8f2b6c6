"""`anact rscore` and `anact gpn` through their own argparse parser (independent of anact.cli)."""

import argparse
import csv
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from anact.analysis import cli


def _run(argv):
    parser = argparse.ArgumentParser(prog="anact")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=np.float64)


def test_rscore_writes_png_csv_markdown(tmp_path, capsys):
    out = tmp_path / "fig"
    rc = _run(["rscore", "--activations", "relu", "lrelu:negative_slope=0.2", "tanh", "identity",
               "--sigma-min", "0.05", "--sigma-max", "5", "--num", "7", "--out-dir", str(out)])
    assert rc == 0
    header, data = _read_csv(out / "rscore.csv")
    assert header == ["sigma", "ReLU", "LeakyReLU(negative_slope=0.2)", "Tanh", "Identity"]
    np.testing.assert_allclose(data[:, 0], np.geomspace(0.05, 5, 7), rtol=1e-15)
    # closed forms: R = ln(1 − (1 − a)²/(π(1 + a²))) for LeakyReLU(a), 0 for the identity
    np.testing.assert_allclose(data[:, 1], math.log(1 - 1 / math.pi), atol=1e-9)
    np.testing.assert_allclose(data[:, 2], math.log(1 - 0.8**2 / (math.pi * 1.04)), atol=1e-9)
    np.testing.assert_allclose(data[:, 4], 0.0, atol=1e-12)
    # tanh against an independent quadrature at σ = 5
    s = 5.0
    dens = lambda x: math.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))
    e2 = integrate.quad(lambda x: math.tanh(x) ** 2 * dens(x), -14 * s, 14 * s, limit=200)[0]
    ed = integrate.quad(lambda x: (1 - math.tanh(x) ** 2) ** 2 * dens(x), -14 * s, 14 * s,
                        points=[0], limit=200)[0]
    np.testing.assert_allclose(data[-1, 3], math.log(e2 / (s * s * ed)), atol=1e-6)

    md = (out / "rscore.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 7 and "LeakyReLU(negative_slope=0.2)" in table[0]
    assert float(table[2].split("|")[2]) == pytest.approx(math.log(1 - 1 / math.pi), abs=1e-6)
    png = (out / "rscore.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "wrote" in capsys.readouterr().out


def test_rscore_linear_sigma(tmp_path):
    threads = torch.get_num_threads()
    assert _run(["rscore", "--activations", "swish", "--no-log-sigma", "--sigma-min", "1",
                 "--sigma-max", "3", "--num", "3", "--out-dir", str(tmp_path),
                 "--name", "lin"]) == 0
    assert torch.get_num_threads() == threads  # the command restores torch's setting
    _, data = _read_csv(tmp_path / "lin.csv")
    np.testing.assert_allclose(data[:, 0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "argv",
    [
        ["--sigma-min", "0"],
        ["--sigma-min", "2", "--sigma-max", "1"],
        ["--num", "1"],
    ],
)
def test_rscore_bad_range_is_an_error(tmp_path, argv, capsys):
    assert _run(["rscore", "--out-dir", str(tmp_path), *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_unknown_activation_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        _run(["rscore", "--activations", "nope"])
    assert "unknown activation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["rscore", "--activations", "lrelu:negative_slope"])


def _quad_gpn(f, df, points=()):
    dens = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    e = lambda g: integrate.quad(lambda x: g(x) * dens(x), -14, 14, points=points or None,
                                 epsabs=1e-13, limit=200)[0]
    m, m2, d2 = e(f), e(lambda x: f(x) ** 2), e(lambda x: df(x) ** 2)
    roots = np.roots([1.0, 2 * m, m2 - d2]).real
    return 1 / math.sqrt(d2), roots[np.argmin(np.abs(roots))]


def test_gpn_table(tmp_path, capsys):
    out = tmp_path / "gpn.md"
    assert _run(["gpn", "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
        for r in text.splitlines()[6:]
    }
    import anact

    assert set(rows) >= {"ReLU", "LeakyReLU", "Tanh", "Swish", "Identity"}
    assert len(rows) == len(anact.list_activations())
    a, b = (float(v) for v in rows["ReLU"][:2])
    assert a == pytest.approx(math.sqrt(2), abs=1e-6) and b == pytest.approx(0, abs=1e-6)
    s = 0.01  # LeakyReLU: E[ψ²] = E[ψ'²] = (1 + s²)/2, so b = 0
    assert float(rows["LeakyReLU"][0]) == pytest.approx(math.sqrt(2 / (1 + s * s)), abs=1e-6)
    sig = lambda x: 1 / (1 + math.exp(-x))
    a_sw, b_sw = _quad_gpn(lambda x: x * sig(x), lambda x: sig(x) * (1 + x * (1 - sig(x))))
    assert float(rows["Swish"][0]) == pytest.approx(a_sw, abs=1e-6)
    assert float(rows["Swish"][1]) == pytest.approx(b_sw, abs=1e-6)
    a_t, b_t = _quad_gpn(math.tanh, lambda x: 1 - math.tanh(x) ** 2)
    assert float(rows["Tanh"][0]) == pytest.approx(a_t, abs=1e-6)
    assert abs(float(rows["Tanh"][1])) == pytest.approx(abs(b_t), abs=1e-6)  # ±b tie for odd ψ
    for name, cells in rows.items():
        if cells[0] != "—":
            assert float(cells[2]) == pytest.approx(1, abs=1e-6), name  # E[φ²] = 1
            assert float(cells[3]) == pytest.approx(1, abs=1e-6), name  # E[φ'²] = 1


def test_gpn_selected_activations(capsys):
    assert _run(["gpn", "--activations", "relu", "elu:alpha=0.5"]) == 0
    out = capsys.readouterr().out
    assert "| ReLU |" in out and "| ELU(alpha=0.5) |" in out and "Tanh" not in out


def test_rscore_outside_the_resolvable_sigma_range_is_a_usage_error(tmp_path, capsys):
    """σ beyond what float64 resolves: exit 2 with the reason, no traceback, no files."""
    rc = _run(["rscore", "--sigma-max", "1e200", "--log-sigma", "--out-dir", str(tmp_path)])
    assert rc == 2
    assert "error: sigma must lie in" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
