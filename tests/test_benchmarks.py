"""The benchmark runner prints every capability's table (at toy sizes here, so it stays ready
for a GPU run with ``--device cuda --quick``)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_tiny_prints_every_capability_table():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--tiny", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for header in ("x GEMM floor", "swap: fast path (bypass)", "forward only", "rows/s", "all tables in"):
        assert header in text, (header, text[-3000:])
    gemm_row = next(line for line in text.splitlines() if line.startswith("gemm "))
    assert "1.00x" in gemm_row  # the floor is its own anchor
