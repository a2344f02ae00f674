"""NetworkPolicy reachability matrix: the indexed evaluator vs the naive reference.

Generates synthetic clusters (default 100, 1,000 and 5,000 pods over 50
namespaces, one policy per two pods: 500 policies at 1,000 pods) with a fixed
seed and a mix of what real clusters hold: per-namespace default deny, allow
rules by pod labels, by namespace labels, both, matchExpressions, ipBlocks
with except, named ports, endPort ranges, egress default deny with DNS
allowances. For each size it times the full matrix (TCP/80) of the indexed
evaluator (index build + matrix, best of a few runs) and its peak memory
(tracemalloc, a separate run), and the naive evaluator on the same cluster.
The naive run is bounded: it computes source rows until its time budget is
spent and, if it did not finish, extrapolates the full matrix from the rows it
did (the computed rows are checked against the indexed ones either way).

Run:    .venv/bin/python bench/bench_netpol.py [--sizes 100,1000,5000] [--naive-budget 60]
        [--output json]
Smoke:  .venv/bin/python bench/bench_netpol.py --smoke
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trustmesh.policy.labels import LabelSelector, Operator, Requirement  # noqa: E402
from trustmesh.policy.netpol import (  # noqa: E402
    Cluster,
    ContainerPort,
    IndexedEvaluator,
    IPBlock,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Reachability,
    Rule,
    naive_rows,
)

APPS = [f"app{i}" for i in range(20)]
TIERS = ["front", "back", "db"]
TEAMS = ["red", "green", "blue", "gold"]


def _sel(**labels: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(labels.items())))


def generate(pods: int, namespaces: int, policies: int, seed: int = 7) -> Cluster:
    """A reproducible synthetic cluster."""
    rnd = random.Random(seed)
    ns_list = [
        Namespace(f"ns{i}", {"team": TEAMS[i % len(TEAMS)], "env": rnd.choice(["prod", "dev"])})
        for i in range(namespaces)
    ]
    pod_list = []
    for i in range(pods):
        ns = ns_list[i % namespaces].name
        ports = [ContainerPort(80, Protocol.TCP, "http"), ContainerPort(9090, Protocol.TCP,
                                                                        "metrics")]
        if i % 25 == 0:
            ports.append(ContainerPort(53, Protocol.UDP, "dns"))
        labels = {"app": rnd.choice(APPS), "tier": rnd.choice(TIERS)}
        if rnd.random() < 0.3:
            labels["canary"] = "true"
        ip = ipaddress.ip_address(0x0A000000 + i + 1)
        pod_list.append(Pod(ns, f"pod{i}", labels, tuple(ports), (ip,)))
    pol_list: list[NetworkPolicy] = []
    dns = Rule((), (PortSpec(Protocol.UDP, 53), PortSpec(Protocol.TCP, 53)))
    for k in range(policies):
        # 13 is prime to the namespace counts used, so every namespace gets every shape
        ns = ns_list[k * 13 % namespaces].name
        shape = k % 8
        name = f"np{k}"
        ingress_only = frozenset({PolicyType.INGRESS})
        if shape == 0:  # default deny ingress
            pol = NetworkPolicy(ns, name, LabelSelector(), ingress_only)
        elif shape == 1:  # allow app -> app in namespace on a named port
            pol = NetworkPolicy(ns, name, _sel(app=rnd.choice(APPS)), ingress_only, (
                Rule((Peer(pod_selector=_sel(app=rnd.choice(APPS))),),
                     (PortSpec(Protocol.TCP, "http"),)),))
        elif shape == 2:  # allow from namespaces of a team (namespaceSelector)
            pol = NetworkPolicy(ns, name, _sel(tier=rnd.choice(TIERS)), ingress_only, (
                Rule((Peer(namespace_selector=_sel(team=rnd.choice(TEAMS))),),
                     (PortSpec(Protocol.TCP, 80),)),))
        elif shape == 3:  # namespaceSelector AND podSelector, matchExpressions
            expr = Requirement("tier", Operator.IN, frozenset({"front", "back"}))
            pol = NetworkPolicy(ns, name, _sel(app=rnd.choice(APPS)), ingress_only, (
                Rule((Peer(pod_selector=LabelSelector((), (expr,)),
                           namespace_selector=_sel(env="prod")),),
                     (PortSpec(Protocol.TCP, 80, 90),)),))
        elif shape == 4:  # egress default deny + DNS
            pol = NetworkPolicy(ns, name, _sel(tier="db"), frozenset({PolicyType.EGRESS}),
                                (), (dns,))
        elif shape == 5:  # egress to a CIDR with an except, and to a tier
            base = rnd.randrange(0, max(pods, 256)) & ~0xFF
            net = ipaddress.IPv4Network(0x0A000000 + base).supernet(new_prefix=24)
            block = IPBlock(net, (next(iter(net.subnets(new_prefix=26))),))
            pol = NetworkPolicy(
                ns, name, _sel(app=rnd.choice(APPS)),
                frozenset({PolicyType.EGRESS}), (),
                (Rule((Peer(ip_block=block),)),
                 Rule((Peer(pod_selector=_sel(tier="back")),), (PortSpec(Protocol.TCP, 80),)),
                 dns))
        elif shape == 6:  # NotIn / DoesNotExist selectors, any port
            expr = Requirement("canary", Operator.DOES_NOT_EXIST)
            pol = NetworkPolicy(ns, name, LabelSelector((), (expr,)), ingress_only, (
                Rule((Peer(pod_selector=LabelSelector((), (
                    Requirement("app", Operator.NOT_IN, frozenset(rnd.sample(APPS, 3))),))),)),))
        else:  # allow monitoring from every namespace on metrics
            pol = NetworkPolicy(ns, name, LabelSelector(), ingress_only, (
                Rule((Peer(namespace_selector=LabelSelector(),
                           pod_selector=_sel(app="app0")),),
                     (PortSpec(Protocol.TCP, "metrics"),)),))
        pol_list.append(pol)
    return Cluster.build(ns_list, pod_list, pol_list)


def time_indexed(cluster: Cluster, repeats: int) -> tuple[float, float, Reachability]:
    """(best seconds for build+matrix, of which build, the matrix)."""
    best = build_best = float("inf")
    result: Reachability | None = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ev = IndexedEvaluator(cluster)
        t1 = time.perf_counter()
        result = ev.matrix(80, Protocol.TCP)
        t2 = time.perf_counter()
        if t2 - t0 < best:
            best, build_best = t2 - t0, t1 - t0
    assert result is not None
    return best, build_best, result


def peak_memory_indexed(cluster: Cluster) -> int:
    tracemalloc.start()
    try:
        IndexedEvaluator(cluster).matrix(80, Protocol.TCP)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def time_naive(cluster: Cluster, budget: float, indexed_rows: tuple[int, ...]
               ) -> dict[str, Any]:
    n = len(cluster.pods)
    done = 0
    start = time.perf_counter()
    batch = 1
    while done < n and time.perf_counter() - start < budget:
        part = naive_rows(cluster, 80, Protocol.TCP, range(done, min(n, done + batch)))
        if part != indexed_rows[done:done + len(part)]:
            raise SystemExit(f"naive and indexed disagree in rows {done}..{done + len(part)}")
        done += len(part)
        batch = min(batch * 2, 64)
    spent = time.perf_counter() - start
    full = spent * n / done
    return {"rows": done, "of": n, "seconds": round(spent, 4),
            "full_seconds": round(full, 4), "extrapolated": done < n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--namespaces", type=int, default=50)
    ap.add_argument("--naive-max", type=int, default=1000,
                    help="largest size the naive evaluator runs on")
    ap.add_argument("--naive-budget", type=float, default=60.0,
                    help="seconds the naive evaluator may spend per size before extrapolating")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds in all")
    ap.add_argument("--output", choices=["text", "json"], default="text")
    args = ap.parse_args()
    if args.smoke:
        sizes, namespaces, budget, repeats, naive_max = [20, 60], 5, 1.0, 1, 60
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        namespaces, budget, repeats = args.namespaces, args.naive_budget, args.repeats
        naive_max = args.naive_max
    results: list[dict[str, Any]] = []
    for n in sizes:
        cluster = generate(n, min(namespaces, n), n // 2)
        seconds, build, matrix = time_indexed(cluster, repeats)
        row: dict[str, Any] = {
            "pods": n, "namespaces": len(cluster.namespaces), "policies": len(cluster.policies),
            "indexed_seconds": round(seconds, 5), "indexed_build_seconds": round(build, 5),
            "indexed_peak_bytes": peak_memory_indexed(cluster),
            "allowed_pairs": matrix.count_allowed(),
        }
        if n <= naive_max:
            naive_run = time_naive(cluster, budget, matrix.rows)
            row["naive"] = naive_run
            row["naive_over_indexed"] = round(float(naive_run["full_seconds"]) / seconds, 1)
        results.append(row)
    growth = {}
    for a, b in zip(results, results[1:], strict=False):
        key = f"{a['pods']}->{b['pods']}"
        growth[key] = round(float(b["indexed_seconds"]) / float(a["indexed_seconds"]), 1)
    out = {"smoke": args.smoke, "port": "TCP/80", "sizes": results,
           "indexed_growth": growth, "python": sys.version.split()[0]}
    if args.output == "json":
        print(json.dumps(out, indent=2))
        return
    print(f"NetworkPolicy matrix (TCP/80), Python {out['python']}"
          + (" [smoke]" if args.smoke else ""))
    print(f"{'pods':>6} {'ns':>4} {'policies':>8} {'indexed s':>10} {'(build s)':>10} "
          f"{'peak MiB':>9} {'allowed':>8} {'naive s':>10} {'naive/indexed':>14}")
    for r in results:
        naive: dict[str, Any] | None = r.get("naive")
        naive_s = "-"
        ratio = "-"
        if isinstance(naive, dict):
            naive_s = f"{naive['full_seconds']:.3f}" + ("*" if naive["extrapolated"] else "")
            ratio = f"{r['naive_over_indexed']}x"
        share = int(r["allowed_pairs"]) / int(r["pods"]) ** 2
        print(f"{r['pods']:>6} {r['namespaces']:>4} {r['policies']:>8} "
              f"{r['indexed_seconds']:>10.4f} {r['indexed_build_seconds']:>10.4f} "
              f"{int(r['indexed_peak_bytes']) / 2**20:>9.2f} "
              f"{share:>8.1%} "
              f"{naive_s:>10} {ratio:>14}")
    print("indexed growth: " + ", ".join(f"{k}: {v}x" for k, v in growth.items()))
    if any(isinstance(r.get("naive"), dict) and r["naive"]["extrapolated"]
           for r in results):
        print("* naive extrapolated from the rows it computed within its budget")


if __name__ == "__main__":
    main()
