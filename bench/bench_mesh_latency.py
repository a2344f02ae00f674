"""Latency the two-sidecar mTLS path adds: client -> Envoy -> Envoy -> app vs the direct call.

A real server, agent and two Envoy sidecars (``trustmesh.mesh.demo.MeshLab``),
the echo application behind them. A bounded open-loop load generator sends
requests at a fixed rate over one keep-alive connection per path and measures
each request from its scheduled start (so a slow answer cannot hide the ones
queued behind it). Direct and mesh runs alternate in rounds; the figures are
p50/p90/p99 of each path and the difference (what the sidecars add), and the
CPU time each sidecar and the application spent per request (from
/proc/<pid>/stat; less disturbed by other load on the machine than latency is).

Anchor: Istio 1.20 reports +0.23 ms p90 / +0.30 ms p99 for two sidecars.

Run:  .venv/bin/python bench/bench_mesh_latency.py [--rate 200 --seconds 5 --rounds 3]
      [--concurrency N]  (Envoy worker threads per sidecar; default: `sidecar run`'s)
Smoke (CI): .venv/bin/python bench/bench_mesh_latency.py --smoke --output json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trustmesh.mesh.demo import MeshLab  # noqa: E402
from trustmesh.mesh.sidecar import SidecarOptions  # noqa: E402


def load(port: int, rate: float, seconds: float) -> tuple[list[float], int]:
    """Fixed-rate requests to 127.0.0.1:port; latencies (ms) and the number of failures."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    interval = 1.0 / rate
    total = int(rate * seconds)
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    for i in range(total):
        scheduled = start + i * interval
        now = time.perf_counter()
        if scheduled > now:
            time.sleep(scheduled - now)
        try:
            conn.request("GET", "/bench")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failures += 1
        except (OSError, http.client.HTTPException):
            failures += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            continue
        latencies.append((time.perf_counter() - scheduled) * 1000)
    conn.close()
    return latencies, failures


def cpu_and_wakeups(pid: int) -> tuple[float, int]:
    """User + system CPU seconds of a process and the times its threads went to sleep
    (voluntary context switches: each is a wait for the next event, then a wake-up)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between the listing and the read
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                switches += int(line.split()[1])
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), switches


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="Envoy worker threads per sidecar (default: sidecar run's)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    args = parser.parse_args()
    if args.smoke:
        args.rate, args.seconds, args.rounds = 50.0, 1.0, 1
    lab = MeshLab(sidecar_concurrency=args.concurrency)
    processes = ("sidecar-client", "sidecar-echo", "echo-app")
    try:
        lab.start()
        paths = {"direct": lab.ports["echo_app"], "mesh": lab.ports["client_outbound"]}
        for port in paths.values():  # warm up connections, TLS sessions and caches
            load(port, 100, 0.5)
        samples: dict[str, list[float]] = {"direct": [], "mesh": []}
        failures = {"direct": 0, "mesh": 0}
        pids = {n: lab.procs[n].pid for n in processes}  # the sidecar process execs Envoy
        cpu = {path: dict.fromkeys(processes, 0.0) for path in paths}
        sleeps = {path: dict.fromkeys(processes, 0) for path in paths}
        for _ in range(args.rounds):
            for name, port in paths.items():
                before = {n: cpu_and_wakeups(pid) for n, pid in pids.items()}
                lat, failed = load(port, args.rate, args.seconds)
                for n, pid in pids.items():
                    used, slept = cpu_and_wakeups(pid)
                    cpu[name][n] += used - before[n][0]
                    sleeps[name][n] += slept - before[n][1]
                samples[name] += lat
                failures[name] += failed
    finally:
        lab.stop()
        shutil.rmtree(lab.base, ignore_errors=True)
    result: dict[str, object] = {"smoke": args.smoke, "rate_per_s": args.rate,
                                 "envoy_workers_per_sidecar": (args.concurrency
                                                               or SidecarOptions.concurrency),
                                 "requests_per_path": len(samples["mesh"]),
                                 "failures": failures}
    for name, values in samples.items():
        result[name] = {f"p{int(q * 100)}_ms": round(pct(values, q), 3)
                        for q in (0.5, 0.9, 0.99)} | {
            "mean_ms": round(statistics.fmean(values), 3)}
    added = {k: round(result["mesh"][k] - result["direct"][k], 3)  # type: ignore[index]
             for k in ("p50_ms", "p90_ms", "p99_ms")}
    result["added_by_sidecars"] = added
    # CPU per request (us): during the direct rounds the sidecars only idle
    cpu_us = {path: {n: round(used / max(1, len(samples[path])) * 1e6)
                     for n, used in per.items()} for path, per in cpu.items()}
    wakeups = {path: {n: round(count / max(1, len(samples[path])), 2)
                      for n, count in per.items()} for path, per in sleeps.items()}
    result["cpu_us_per_request"] = cpu_us
    result["wakeups_per_request"] = wakeups
    if args.output == "json":
        print(json.dumps(result, indent=2))
        return
    print(f"fixed rate {args.rate:.0f}/s, {len(samples['mesh'])} requests per path, "
          f"{result['envoy_workers_per_sidecar']} Envoy workers per sidecar, failures {failures}")
    for name in ("direct", "mesh"):
        r: dict[str, float] = result[name]  # type: ignore[assignment]
        print(f"  {name:6s} p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms  "
              f"p99 {r['p99_ms']:.3f} ms")
    print(f"  added  p50 +{added['p50_ms']:.3f} ms  p90 +{added['p90_ms']:.3f} ms  "
          f"p99 +{added['p99_ms']:.3f} ms  (Istio 1.20: +0.23 ms p90, +0.30 ms p99)")
    for path, per in cpu_us.items():
        wakes = wakeups[path]
        print(f"  per request, {path} rounds: " + ", ".join(
            f"{n} {us} us CPU / {wakes[n]} wake-ups" for n, us in per.items()))


if __name__ == "__main__":
    main()
