"""Figure helpers: labels, tables, and the training-curve PNG."""

import math

import numpy as np
import pytest

import anact.activations as acts
from anact.analysis import (
    activation_label,
    plot_training_curves,
    rscore_table,
    write_table_markdown,
)


def test_labels():
    assert activation_label("relu") == "ReLU"
    assert activation_label("lrelu") == "LeakyReLU"  # default slope: no parameters shown
    assert activation_label(("lrelu", {"negative_slope": 0.2})) == "LeakyReLU(negative_slope=0.2)"
    custom = acts.Activation("cube", fn=lambda x: x**3, derivative=lambda x: 3 * x**2)
    assert activation_label(custom) == "cube"


def test_rscore_table_values_and_errors():
    t = rscore_table(["relu", "identity"], [0.5, 2.0])
    np.testing.assert_allclose(t["ReLU"], math.log(1 - 1 / math.pi), atol=1e-9)
    np.testing.assert_allclose(t["Identity"], 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="twice"):
        rscore_table(["relu", "relu"], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        rscore_table(["relu"], [[1.0]])


def test_markdown_rounding(tmp_path):
    p = write_table_markdown(tmp_path / "t.md", "x", [1.0, 2.0], {"a": [0.1234567891, -2.0]},
                             title="T")
    lines = p.read_text().splitlines()
    assert lines[0] == "# T" and lines[-1] == "| 2 | -2.000000 |" and "0.123457" in lines[-2]


def test_training_curves_png(tmp_path):
    runs = {
        m: [{"score": 3.0 / (e + k), "weight_mean_abs_sum": 0.1 * e * k} for e in range(1, 6)]
        for k, m in enumerate(["ReLU", "NReLU"], start=1)
    }
    p = plot_training_curves(tmp_path / "curves.png", runs)
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
