"""The CA benchmarks run end to end in their short smoke mode (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(name: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, str(BENCH / name), "--smoke", "--output", "json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_issuance_benchmark_smoke() -> None:
    out = run_bench("bench_ca_issue.py")
    assert out["smoke"] is True
    assert float(out["floor_per_s_one_core"]) > 0 and float(out["ours_per_s"]) > 0
    # every request of both runs (and the warm-ups) was stored
    assert int(out["certificates_stored"]) >= int(out["requests"])


@pytest.mark.slow
def test_svid_signing_benchmark_smoke() -> None:
    out = run_bench("bench_svid_signing.py")
    assert out["smoke"] is True
    assert float(out["floor_per_s_one_core"]) > 0 and float(out["ours_per_s"]) > 0
    cpu = out["cpu_us_per_svid"]
    assert isinstance(cpu, dict)
    # the server signed in its worker processes, not in its own
    assert cpu["signing_workers"] > 0


@pytest.mark.slow
def test_ocsp_benchmark_smoke() -> None:
    out = run_bench("bench_ocsp.py")
    for mix in ("nonce", "no-nonce"):
        figures = out[mix]
        assert isinstance(figures, dict)
        assert figures["trustmesh_rps"] > 0 and figures["openssl_rps"] > 0
        assert figures["trustmesh_failures"] == 0


@pytest.mark.slow
def test_workload_api_benchmark_smoke() -> None:
    out = run_bench("bench_workload_api.py")
    rows = out["rows"]
    assert isinstance(rows, list) and [r["entries"] for r in rows] == [10, 100]
    assert all(r["p50_ms"] > 0 and r["agent_max_rss_mib"] > 0 for r in rows)


@pytest.mark.slow
def test_mesh_latency_benchmark_smoke() -> None:
    out = run_bench("bench_mesh_latency.py")
    assert out["failures"] == {"direct": 0, "mesh": 0}
    assert out["mesh"]["p50_ms"] > 0 and out["direct"]["p50_ms"] > 0  # type: ignore[index]


@pytest.mark.slow
def test_mesh_control_benchmark_smoke() -> None:
    out = run_bench("bench_mesh_control.py")
    push = out["push"]
    assert push["not_updated"] == 0 and push["enforced_status"] == 403  # type: ignore[index]
    assert push["listener_updates"] == 0  # type: ignore[index]  # policy travels in routes
    assert out["compile"]["config_bytes"] > 0  # type: ignore[index]
