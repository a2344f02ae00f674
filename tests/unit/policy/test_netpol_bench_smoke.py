"""bench/bench_netpol.py runs end to end in its smoke mode and prints its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_netpol.py"


def test_netpol_benchmark_smoke_text() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "naive/indexed" in proc.stdout and "indexed growth" in proc.stdout
    assert "[smoke]" in proc.stdout


def test_netpol_benchmark_smoke_json() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--output", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["smoke"] is True
    sizes = out["sizes"]
    assert [s["pods"] for s in sizes] == [20, 60]
    for size in sizes:
        assert size["indexed_seconds"] > 0 and size["indexed_peak_bytes"] > 0
        assert size["naive"]["rows"] > 0 and size["naive_over_indexed"] > 0
    assert "20->60" in out["indexed_growth"]
