"""bench/bench_rbac.py runs end to end in its smoke mode and prints its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_rbac.py"


def test_rbac_benchmark_smoke_text() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "[smoke]" in out
    for label in ("indexed can-i", "naive scan can-i", "naive/indexed p50", "who-can"):
        assert label in out
    assert "p50" in out and "p99" in out and " us" in out


def test_rbac_benchmark_smoke_json() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--output", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["smoke"] is True and out["bindings"] == 300
    for key in ("indexed", "naive"):
        assert 0 < out[key]["p50_us"] <= out[key]["p99_us"]
    assert out["naive_over_indexed_p50"] > 0
    assert 0 < out["allowed_fraction"] < 1
