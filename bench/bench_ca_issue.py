"""Issuance throughput: trustmesh's API path vs the raw `cryptography` signing floor.

floor   build and sign the same end-entity certificate with `cryptography` in a
        tight loop, on one core (no CSR, no checks, no storage).
ours    the server's issuance path as the admin API drives it: idempotency
        check, CSR parse and signature check, key and SAN validation, template,
        signing in the worker pool, and the datastore write (SQLite, one
        transaction per batch, synchronous=FULL) with the audit event.

Run:  .venv/bin/python bench/bench_ca_issue.py [--requests 6000] [--output json]
Smoke (CI): .venv/bin/python bench/bench_ca_issue.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from trustmesh.clock import SystemClock
from trustmesh.config import ServerConfig
from trustmesh.pki.keys.memory import MemoryKeyManager
from trustmesh.server.authority import CertificateAuthority, IssueParams
from trustmesh.server.issuance import AsyncIssuer, default_worker_count
from trustmesh.store.datastore import Datastore


def floor_rate(seconds: float, ca: CertificateAuthority) -> tuple[float, int]:
    """Certificates per second that `cryptography` alone builds and signs on one core."""
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    issuer = ca.authority.certificate
    key = ca.authority.key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.internal")])
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    now = datetime.now(UTC)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(issuer.subject)
                .public_key(leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(now + timedelta(hours=24))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                             False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("svc.internal")]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
                               critical=False)
                .add_extension(aki, critical=False)
                .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                    [x509.UniformResourceIdentifier("http://127.0.0.1:8080/crl/x.crl")],
                    None, None, None)]), critical=False)
                .add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier("http://127.0.0.1:8080/ocsp"))]),
                    critical=False)
                .sign(key, hashes.SHA256())  # type: ignore[arg-type]
            )
            count += 1
    return count / (time.perf_counter() - start), count


def make_csrs(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                           f"svc{i}.internal")]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"svc{i}.internal")]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        out.append(csr.public_bytes(serialization.Encoding.PEM))
    return out


@dataclass
class CpuSplit:
    """CPU seconds per certificate: the server process (all its threads) and the signers."""

    server: float = 0.0
    signers: float = 0.0
    certificates: int = 0
    startups: int = 0
    # what starting and stopping one pool costs (imports in each signer): taken off
    startup_server: float = 0.0
    startup_signers: float = 0.0

    def add(self, server: float, signers: float, certificates: int) -> None:
        if certificates == 0:
            self.startup_server, self.startup_signers = server, signers
            return
        self.server += server
        self.signers += signers
        self.certificates += certificates
        self.startups += 1

    def per_certificate_us(self) -> tuple[float, float]:
        n = max(1, self.certificates)
        server = max(0.0, self.server - self.startups * self.startup_server)
        signers = max(0.0, self.signers - self.startups * self.startup_signers)
        return server / n * 1e6, signers / n * 1e6


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


async def ours_rate(ca: CertificateAuthority, workers: int, requests: int,
                    concurrency: int, csrs: list[bytes], cpu: CpuSplit | None = None) -> float:
    issuer = AsyncIssuer(ca, workers)
    await issuer.start()
    server_cpu = time.process_time()
    children_cpu = _children_cpu()
    total = 0
    try:
        sem = asyncio.Semaphore(concurrency)
        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            async with sem:
                try:
                    await issuer.issue(IssueParams(csr=csrs[i % len(csrs)],
                                                   template="end-entity"), "bench")
                except Exception:
                    failures += 1

        # warm-up (imports, first transaction) outside the timing
        await asyncio.gather(*(one(i) for i in range(min(200, requests))))
        total = min(200, requests) + requests
        if requests == 0:
            return 0.0
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.perf_counter() - start
        if failures:
            raise SystemExit(f"{failures} issuance requests failed")
        return requests / elapsed
    finally:
        await issuer.close()  # the signers have exited: their CPU time is ours to read
        if cpu is not None:
            cpu.add(time.process_time() - server_cpu, _children_cpu() - children_cpu, total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4000, help="per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--floor-seconds", type=float, default=1.5)
    ap.add_argument("--workers", type=int, default=None, help="default: one per core")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI")
    ap.add_argument("--output", choices=["text", "json"], default="text")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.floor_seconds, args.concurrency, args.rounds = 200, 0.3, 64, 1
    workers = default_worker_count() if args.workers is None else args.workers

    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(data_dir=Path(tmp))
        store = Datastore(config.datastore_url)
        store.migrate()
        ca = CertificateAuthority(config, store, MemoryKeyManager(), SystemClock())
        csrs = make_csrs(64)
        # Interleave floor and ours, several rounds, and report the median ratio:
        # the machines are shared, so a single pair of numbers is mostly noise.
        floors: list[float] = []
        ours: list[float] = []
        cpu = CpuSplit()
        asyncio.run(ours_rate(ca, workers, 0, args.concurrency, csrs, cpu))
        for _ in range(args.rounds):
            floors.append(floor_rate(args.floor_seconds, ca)[0])
            ours.append(asyncio.run(ours_rate(ca, workers, args.requests, args.concurrency,
                                              csrs, cpu)))
        ratios = sorted(o / f for o, f in zip(ours, floors, strict=True))
        ratio = ratios[len(ratios) // 2]
        floor = sorted(floors)[len(floors) // 2]
        ours_pool = sorted(ours)[len(ours) // 2]
        ours_single = asyncio.run(ours_rate(ca, 0, max(100, args.requests // 4),
                                            args.concurrency, csrs))
        single_floor = floor_rate(args.floor_seconds, ca)[0]
        stored = store.count_certificates()
        store.close()

    server_us, signers_us = cpu.per_certificate_us()
    result = {
        "floor_per_s_one_core": round(floor, 1),
        "ours_per_s": round(ours_pool, 1),
        "ratios_per_round": [round(r, 3) for r in ratios],
        "ours_workers": workers,
        "ours_per_s_in_process": round(ours_single, 1),
        "ratio_ours_to_floor": round(ratio, 3),
        "ratio_in_process_to_floor": round(ours_single / single_floor, 3),
        "cpu_us_per_certificate": {"server_process": round(server_us, 1),
                                   "signing_workers": round(signers_us, 1),
                                   "floor": round(1e6 / floor, 1)},
        "target_ratio": 0.5,
        "requests": args.requests,
        "certificates_stored": stored,
        "smoke": args.smoke,
    }
    if args.output == "json":
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(f"floor (cryptography, 1 core):      {floor:9.1f} certs/s  (median of "
              f"{args.rounds} rounds)")
        print(f"trustmesh, {workers} signing workers:     {ours_pool:9.1f} certs/s  "
              f"ratio {ratio:.2f} (target >= 0.50; per round: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
        print(f"trustmesh, in-process signing:     {ours_single:9.1f} certs/s  "
              f"ratio {ours_single / single_floor:.2f}")
        print(f"CPU per certificate: server process {server_us:.0f} us, signing workers "
              f"{signers_us:.0f} us (floor: {1e6 / floor:.0f} us of one core)")
        print(f"certificates stored: {stored}")


if __name__ == "__main__":
    main()
