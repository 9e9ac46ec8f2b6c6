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
