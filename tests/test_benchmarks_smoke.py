"""The benchmark command still runs (a smoke test: timings are never asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_py_monitor_section_prints_a_table(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "monitor",
         "--repeats", "1", "--json", str(out), "--heap", "keep"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| table1 relu training step with ConvergenceMonitor" in proc.stdout
    assert "heap keep" in proc.stdout
    import json

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["step"] > 0 for r in rows)


def test_step_peak_bytes_follows_allocations_in_time_order():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    mb = 1 << 20

    def two_at_once():  # 4 MiB + 4 MiB live together, then a 6 MiB one alone
        a = torch.ones(mb)
        b = torch.ones(mb)
        del a, b
        c = torch.ones(3 * mb // 2)
        del c

    peak = run.step_peak_bytes(two_at_once)
    assert peak is not None and 8 * mb <= peak < 8 * mb + 4096
