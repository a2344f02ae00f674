"""Workload API latency: first FetchX509SVID response vs a bare grpcio unary call.

The agent side runs in a child process: the real Workload API server (grpclib,
SO_PEERCRED attestation from /proc, selector index) over a cache holding N
entries with SVIDs, of which the caller's selectors match one. The client is
grpcio with py-spiffe's own Workload API stubs, on one established channel:
each sample opens a FetchX509SVID stream, waits for the first message, and
cancels. The child also reports its peak RSS with all N SVIDs (each with its
own key) in memory: the agent-memory figure. The baseline, in the same run, is
a grpcio unary call to a grpcio server over a Unix socket that returns an
empty message.

Run:  .venv/bin/python bench/bench_workload_api.py [--output json]
Smoke (CI): .venv/bin/python bench/bench_workload_api.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def serve(socket_path: str, entries: int) -> None:
    """Child process: a Workload API over a cache of ``entries`` entries."""
    import asyncio
    import resource
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from trustmesh.agent.cache import CachedEntry, CachedSvid, SvidCache
    from trustmesh.agent.workload_source import start_workload_api

    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = datetime.now(UTC)
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(ca_key.public_key()).serial_number(1)
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(ca_key, hashes.SHA256()))
    cache = SvidCache()
    made = []
    svids = []
    for i in range(entries):
        uid = os.getuid() if i == entries // 2 else 100000 + i
        e = CachedEntry(id=f"e{i}", spiffe_id=f"spiffe://bench.org/w{i}", parent_id="x",
                        selectors=frozenset({f"unix:uid:{uid}"}), x509_svid_ttl=3600,
                        jwt_svid_ttl=300, dns_names=(), federates_with=(), hint="",
                        revision=i + 1)
        made.append(e)
        leaf_key = ec.generate_private_key(ec.SECP256R1())  # one key per SVID, as agents hold
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([])).issuer_name(name)
                .public_key(leaf_key.public_key()).serial_number(i + 2)
                .not_valid_before(now - timedelta(minutes=1))
                .not_valid_after(now + timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(e.spiffe_id)]), False)
                .sign(ca_key, hashes.SHA256()))
        svids.append(CachedSvid(e.id, e.revision, e.spiffe_id, leaf_key, (cert,),
                                received_at=time.time()))
    cache.apply_changes(made, [], entries)
    cache.store(svids)

    class FakeAgent:
        def __init__(self) -> None:
            from trustmesh.agent.app import ChangeNotifier

            self.cache = cache
            self.roots = (root,)
            self.node = None
            self.changes = ChangeNotifier()

        def jwt_bundle_jwks(self) -> bytes:
            return b'{"keys": []}'

        def federated_for(self, trust_domains: object) -> dict[str, object]:
            return {}  # no federation in this benchmark

        def current_crls(self) -> tuple[()]:
            return ()

    async def main() -> None:
        running = await start_workload_api(FakeAgent(), Path(socket_path))  # type: ignore[arg-type]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"ready": True, "max_rss_kib": rss}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await running.stop()

    asyncio.run(main())


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def measure_workload(socket_path: str, samples: int) -> list[float]:
    import grpc
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    out = []
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        for i in range(samples + 20):
            start = time.perf_counter()
            call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                      metadata=[("workload.spiffe.io", "true")], timeout=10)
            first = next(iter(call))
            elapsed = time.perf_counter() - start
            call.cancel()
            assert len(first.svids) == 1
            if i >= 20:  # warm-up
                out.append(elapsed)
    return out


def measure_bare(samples: int) -> list[float]:
    from concurrent import futures

    import grpc

    from trustmesh.proto import agent_pb2, agent_pb2_grpc

    class Bare(agent_pb2_grpc.AgentServicer):
        def FetchBundles(self, request: object, context: object) -> agent_pb2.FetchBundlesResponse:  # noqa: N802
            return agent_pb2.FetchBundlesResponse()

    path = tempfile.mktemp(prefix="bench-bare-", suffix=".sock")  # noqa: S306
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServicer_to_server(Bare(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    out = []
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            for i in range(samples + 20):
                start = time.perf_counter()
                stub.FetchBundles(agent_pb2.FetchBundlesRequest(), timeout=10)
                if i >= 20:
                    out.append(time.perf_counter() - start)
    finally:
        server.stop(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--output", choices=["text", "json"], default="text")
    ap.add_argument("--serve", nargs=2, metavar=("SOCKET", "ENTRIES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if args.smoke:
        args.sizes, args.samples = "10,100", 30
    bare = measure_bare(args.samples)
    bare_p50, bare_p99 = percentile(bare, 50), percentile(bare, 99)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="bench-wl-"))
        sock = str(tmp / "api.sock")
        child = subprocess.Popen([sys.executable, __file__, "--serve", sock, str(size)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            ready = json.loads(child.stdout.readline())
            samples = measure_workload(sock, args.samples)
        finally:
            if child.stdin:
                child.stdin.close()
            child.wait(timeout=30)
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        rows.append({"entries": size, "p50_ms": round(p50 * 1e3, 3),
                     "p99_ms": round(p99 * 1e3, 3), "p50_ratio_to_bare": round(p50 / bare_p50, 2),
                     "agent_max_rss_mib": round(ready["max_rss_kib"] / 1024, 1),
                     "mean_ms": round(statistics.mean(samples) * 1e3, 3)})
    result = {"bare_grpcio_p50_ms": round(bare_p50 * 1e3, 3),
              "bare_grpcio_p99_ms": round(bare_p99 * 1e3, 3), "rows": rows,
              "target_ratio": 3.0, "smoke": args.smoke}
    if args.output == "json":
        print(json.dumps(result, indent=2))
        return
    print(f"bare grpcio unary over UDS: p50 {bare_p50 * 1e3:.3f} ms  p99 {bare_p99 * 1e3:.3f} ms")
    for r in rows:
        print(f"{r['entries']:6} entries: first FetchX509SVID p50 {r['p50_ms']:.3f} ms  "
              f"p99 {r['p99_ms']:.3f} ms  ratio {r['p50_ratio_to_bare']:.2f} (target <= 3)  "
              f"server RSS {r['agent_max_rss_mib']} MiB")


if __name__ == "__main__":
    main()
