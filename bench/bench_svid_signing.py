"""X509-SVID signing from batched agent CSRs, end to end, vs the `cryptography` floor.

server  a real ``trustmesh server run`` process (SQLite, its default signing
        workers: one process per core) on loopback.
agent   this process attests as a node with a join token, then sends
        ``BatchNewX509SVID`` over gRPC with mutual TLS (its node SVID), as the
        agent does: batches of 200 CSRs (the agent's batch size) for entries
        parented to the node, a few batches in flight. Each CSR has its own key,
        made before the clock starts. Every answer is checked (one SVID per CSR,
        no errors); a sample of SVIDs is verified against the bundle and
        checked to name its entry's SPIFFE ID.
floor   `cryptography` building and signing a comparable leaf (same extensions,
        P-256 CA key) in a tight loop on one core, with the server idle,
        measured in rounds interleaved with ours; the median ratio is reported.

The server's own CPU and its signers' CPU per SVID are read from /proc, so
the figure says where the time goes.

Run:  .venv/bin/python bench/bench_svid_signing.py [--svids 4000] [--rounds 5]
Smoke (CI): .venv/bin/python bench/bench_svid_signing.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.mesh.demo import free_loopback_port
from trustmesh.proto import agent_pb2, agent_pb2_grpc

BATCH = 200  # what the agent sends in one BatchNewX509SVID
TRUST_DOMAIN = "example.org"
NODE_ID = f"spiffe://{TRUST_DOMAIN}/bench-node"
SERVER_NAME = "trustmesh-server"
_TICKS = os.sysconf("SC_CLK_TCK")


def trustmesh_cli() -> str:
    beside = Path(sys.executable).with_name("trustmesh")  # the same virtualenv first
    return str(beside) if beside.exists() else (shutil.which("trustmesh") or "trustmesh")


def csr_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


class Server:
    """``trustmesh server run`` on loopback ports, in a data directory of its own."""

    def __init__(self, base: Path) -> None:
        self.data_dir = base / "server"
        self.http_port, self.agent_port = free_loopback_port(), free_loopback_port()
        self.attest_port, self.admin_port = free_loopback_port(), free_loopback_port()
        self.log = open(base / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [trustmesh_cli(), "server", "run", "--data-dir", str(self.data_dir),
             "--trust-domain", TRUST_DOMAIN, "--key-manager", "memory",
             "--http-address", f"127.0.0.1:{self.http_port}",
             "--bind-address", f"127.0.0.1:{self.agent_port}",
             "--attest-address", f"127.0.0.1:{self.attest_port}",
             "--admin-address", f"127.0.0.1:{self.admin_port}",
             "--ocsp-workers", "0", "--log-level", "warning"],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; "
                                 f"see {base / 'server.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/healthz",
                             timeout=1).status_code == 200 and (
                                 self.data_dir / "admin.sock").exists():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise SystemExit("the server did not become ready in 90 s")

    def cli(self, *args: str, stdin: bytes | None = None) -> Any:
        proc = subprocess.run(
            [trustmesh_cli(), *args, "--socket", str(self.data_dir / "admin.sock"),
             "--output", "json"], input=stdin, capture_output=True, check=False, timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"trustmesh {' '.join(args)} failed: {proc.stderr.decode()}")
        return json.loads(proc.stdout)

    def cpu(self) -> tuple[float, float]:
        """(server process, its child processes) CPU seconds so far."""
        pid = self.proc.pid
        kids = 0.0
        for child in children_of(pid):
            try:
                kids += cpu_seconds(child)
            except OSError:
                pass
        return cpu_seconds(pid), kids

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Node:
    """What the agent holds: its key and, once attested, its node SVID."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.bundle = httpx.get(f"http://127.0.0.1:{server.http_port}/ca/bundle.pem").content
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.chain: list[bytes] = []

    def attest(self, token: str) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=self.bundle)
        with grpc.secure_channel(f"127.0.0.1:{self.server.attest_port}", creds, options=[
                ("grpc.ssl_target_name_override", SERVER_NAME)]) as channel:
            start = agent_pb2.AttestRequest(start=agent_pb2.AttestStart(
                attestation_type="join_token", payload=token.encode(),
                csr=csr_der(self.key)))
            responses = list(agent_pb2_grpc.AgentStub(channel).Attest(iter([start]),
                                                                       timeout=60))
        self.chain = list(responses[-1].result.svid_chain)

    def channel(self) -> grpc.aio.Channel:
        pem_chain = b"".join(
            x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
            for d in self.chain)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.bundle, certificate_chain=pem_chain,
            private_key=self.key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return grpc.aio.secure_channel(
            f"127.0.0.1:{self.server.agent_port}", creds,
            options=[("grpc.ssl_target_name_override", SERVER_NAME),
                     ("grpc.max_receive_message_length", 64 << 20)])


def make_entries(server: Server, count: int) -> list[tuple[str, str]]:
    """``count`` entries parented to the node: [(entry id, SPIFFE ID)]."""
    docs = "".join(f"- spiffe_id: spiffe://{TRUST_DOMAIN}/bench/w{i}\n"
                   f"  parent_id: {NODE_ID}\n  selectors: [unix:uid:{100000 + i}]\n"
                   for i in range(count))
    created = server.cli("entry", "create", "-f", "-", stdin=docs.encode())
    items = created if isinstance(created, list) else created.get("entries", [])
    out = [(str(e["id"]), str(e["spiffe_id"])) for e in items]
    if len(out) != count:
        raise SystemExit(f"expected {count} entries, the server made {len(out)}")
    return out


async def sign_round(node: Node, requests: list[list[agent_pb2.SvidParams]],
                     in_flight: int) -> tuple[float, list[agent_pb2.BatchNewX509SVIDResponse]]:
    async with node.channel() as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        # one small call first: the TLS handshake and the server's caches are not timed
        await stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=requests[0][:1]),
                                    timeout=60)
        gate = asyncio.Semaphore(in_flight)

        async def one(params: list[agent_pb2.SvidParams]) -> agent_pb2.BatchNewX509SVIDResponse:
            async with gate:
                resp: agent_pb2.BatchNewX509SVIDResponse = await stub.BatchNewX509SVID(
                    agent_pb2.BatchNewX509SVIDRequest(params=params), timeout=300)
                return resp

        start = time.perf_counter()
        responses = await asyncio.gather(*(one(p) for p in requests))
        return time.perf_counter() - start, list(responses)


def check_answers(requests: list[list[agent_pb2.SvidParams]],
                  responses: list[agent_pb2.BatchNewX509SVIDResponse],
                  names: dict[str, str], bundle: bytes) -> None:
    roots = x509.load_pem_x509_certificates(bundle)
    for params, resp in zip(requests, responses, strict=True):
        if len(resp.results) != len(params):
            raise SystemExit(f"{len(params)} CSRs, {len(resp.results)} answers")
        for p, r in zip(params, resp.results, strict=True):
            if r.error_code or not r.svid_chain or r.entry_id != p.entry_id:
                raise SystemExit(f"entry {p.entry_id}: {r.error_code} {r.error_message}")
    # a sample, fully: chain to a published root, and the entry's SPIFFE ID
    for params, resp in list(zip(requests, responses, strict=True))[:3]:
        r = resp.results[0]
        chain = [x509.load_der_x509_certificate(d) for d in r.svid_chain]
        uris = chain[0].extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
        if uris != [names[params[0].entry_id]]:
            raise SystemExit(f"SVID names {uris}, the entry {names[params[0].entry_id]}")
        issuer = chain[-1]
        if not any(issuer.issuer == root.subject for root in roots):
            raise SystemExit("an SVID does not chain to the bundle")
        chain[0].verify_directly_issued_by(chain[1] if len(chain) > 1 else roots[0])


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_ca_issue import floor_rate  # the same floor as the CA issuance figures

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--svids", type=int, default=4000, help="per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=4, help="batches in flight")
    ap.add_argument("--floor-seconds", type=float, default=1.5)
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI")
    ap.add_argument("--output", choices=["text", "json"], default="text")
    args = ap.parse_args()
    if args.smoke:
        args.svids, args.rounds, args.entries, args.floor_seconds = 400, 1, 50, 0.3

    base = Path(tempfile.mkdtemp(prefix="tm-bench-svid-"))
    server = Server(base)
    try:
        token = server.cli("token", "create", "--spiffe-id", NODE_ID)["token"]
        node = Node(server)
        node.attest(str(token))
        entries = make_entries(server, args.entries)
        names = dict(entries)
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(args.svids)]
        params = [agent_pb2.SvidParams(entry_id=entries[i % len(entries)][0],
                                       csr=csr_der(k)) for i, k in enumerate(keys)]
        requests = [params[i:i + BATCH] for i in range(0, len(params), BATCH)]

        from trustmesh.clock import SystemClock
        from trustmesh.config import ServerConfig
        from trustmesh.pki.keys.memory import MemoryKeyManager
        from trustmesh.server.authority import CertificateAuthority
        from trustmesh.store.datastore import Datastore

        # the floor signs with a CA of the same kind (P-256), made here
        floor_dir = base / "floor"
        floor_dir.mkdir(mode=0o700)
        config = ServerConfig(data_dir=floor_dir)
        store = Datastore(config.datastore_url)
        store.migrate()
        floor_ca = CertificateAuthority(config, store, MemoryKeyManager(), SystemClock())

        floors: list[float] = []
        ours: list[float] = []
        server_cpu = signer_cpu = client_cpu = 0.0
        in_order: list[dict[str, float]] = []
        for _ in range(args.rounds):
            floors.append(floor_rate(args.floor_seconds, floor_ca)[0])
            before, client_before = server.cpu(), time.process_time()
            elapsed, responses = asyncio.run(sign_round(node, requests, args.in_flight))
            after, client_after = server.cpu(), time.process_time()
            server_cpu += after[0] - before[0]
            signer_cpu += after[1] - before[1]
            client_cpu += client_after - client_before
            check_answers(requests, responses, names, node.bundle)
            ours.append(args.svids / elapsed)
            in_order.append({"floor_per_s": round(floors[-1], 1),
                             "ours_per_s": round(ours[-1], 1),
                             "server_cpu_us": round((after[0] - before[0]) / args.svids * 1e6),
                             "signers_cpu_us": round((after[1] - before[1]) / args.svids * 1e6)})
        store.close()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

    ratios = sorted(o / f for o, f in zip(ours, floors, strict=True))
    ratio = ratios[len(ratios) // 2]
    floor = sorted(floors)[len(floors) // 2]
    rate = sorted(ours)[len(ours) // 2]
    n = args.svids * args.rounds
    result = {
        "floor_per_s_one_core": round(floor, 1),
        "ours_per_s": round(rate, 1),
        "ratio_ours_to_floor": round(ratio, 3),
        "ratios_per_round": [round(r, 3) for r in ratios],
        "target_ratio": 0.5,
        "cpu_us_per_svid": {"server_process": round(server_cpu / n * 1e6, 1),
                            "signing_workers": round(signer_cpu / n * 1e6, 1),
                            "bench_agent": round(client_cpu / n * 1e6, 1),
                            "floor": round(1e6 / floor, 1)},
        "rounds_in_order": in_order,
        "svids_per_round": args.svids,
        "batch": BATCH,
        "in_flight": args.in_flight,
        "smoke": args.smoke,
    }
    if args.output == "json":
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    cpu: dict[str, float] = result["cpu_us_per_svid"]
    print(f"floor (cryptography, 1 core):         {floor:8.1f} certs/s  (median of "
          f"{args.rounds} rounds)")
    print(f"trustmesh server, BatchNewX509SVID:   {rate:8.1f} SVIDs/s  ratio {ratio:.2f} "
          f"(target >= 0.50; per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"CPU per SVID: server process {cpu['server_process']:.0f} us, signing workers "
          f"{cpu['signing_workers']:.0f} us, bench agent {cpu['bench_agent']:.0f} us "
          f"(floor: {cpu['floor']:.0f} us of one core)")


if __name__ == "__main__":
    main()
