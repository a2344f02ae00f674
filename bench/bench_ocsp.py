"""OCSP responses per second: the trustmesh server vs `openssl ocsp` as a responder.

Both answer for the same certificates (issued by a running trustmesh server,
some of them revoked), both sign with a delegated P-256 responder certificate,
and both are driven by the same load generator (ApacheBench: a new connection
per request, as openssl's HTTP/1.0 responder requires; same request body, same
concurrency) in the same run. Two request mixes:

  nonce     every request carries a fresh-looking nonce (openssl's client default):
            every response must be signed anew.
  no-nonce  RFC 5019 style requests (what browsers and most TLS stacks send):
            a responder may serve a pre-signed response.

Each figure is measured in rounds that alternate which responder goes first (the
machine's speed drifts over a run); a figure is the median of its rounds, and the
ratio is the ratio of the two medians. Two concurrencies by default: 4 (few
clients) and 16 (a responder with many clients, where requests queue).

Run:  .venv/bin/python bench/bench_ocsp.py [--requests 20000] [--rounds 3]
          [--concurrency 4,16] [--output json]
Smoke (CI): .venv/bin/python bench/bench_ocsp.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from trustmesh.mesh.demo import free_loopback_port

VENV_BIN = Path(sys.executable).parent


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def csr_pem(cn: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM), key


def run_ab(url: str, body: Path, requests: int, concurrency: int,
           after_failure: Callable[[], None] | None = None) -> dict[str, float]:
    """ApacheBench: a new connection per request (openssl's responder speaks HTTP/1.0).
    ``after_failure`` runs before a failed run is retried."""
    ab = shutil.which("ab")
    if ab is None:
        raise SystemExit("ab is not installed: run scripts/setup.sh --test "
                         "(Debian package apache2-utils)")
    # openssl's single-threaded responder now and then leaves a connection unanswered,
    # which stops ab even with -r; ab gives up on a silent socket after 5 s (-s, not the
    # default 30) and the run is retried (at most 5 times) before failing.
    for attempt in range(5):
        proc = subprocess.run(
            [ab, "-q", "-r", "-s", "5", "-n", str(requests), "-c", str(concurrency),
             "-p", str(body),
             "-T", "application/ocsp-request", url],
            capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            break
        if after_failure is not None:
            after_failure()
        if attempt == 4:
            raise SystemExit(f"ab against {url} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-500:]}")
    out = proc.stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    complete = int(re.search(r"Complete requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    exceptions = re.search(r"Failed requests:\s+(\d+)\n\s+\(Connect: (\d+), Receive: (\d+)",
                           out)
    hard_failures = sum(int(g) for g in exceptions.groups()[1:]) if exceptions else 0
    return {"rps": rps, "complete": complete, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "connect_or_receive_failures": hard_failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="per responder and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="4,16",
                    help="comma-separated; the first one is the headline figure")
    ap.add_argument("--certs", type=int, default=40)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--output", choices=["text", "json"], default="text")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.certs, args.concurrency, args.rounds = 300, 6, "2", 1
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if not concurrencies or min(concurrencies) < 1 or args.rounds < 1:
        ap.error("--concurrency takes positive integers and --rounds at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="bench-ocsp-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_loopback_port()
        data = tmp / "server"
        srv = subprocess.Popen(
            [str(VENV_BIN / "trustmesh"), "server", "run", "--data-dir", str(data),
             "--http-address", f"127.0.0.1:{port}", "--key-manager", "memory",
             "--bind-address", f"127.0.0.1:{free_loopback_port()}",
             "--attest-address", f"127.0.0.1:{free_loopback_port()}", "--admin-address", "",
             "--signing-workers", "0", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))  # noqa: SIM115
        procs.append(srv)
        wait_http(f"http://127.0.0.1:{port}/ocsp", srv)
        admin = httpx.Client(transport=httpx.HTTPTransport(uds=str(data / "admin.sock")),
                             base_url="http://x", timeout=30)

        def issue(cn: str, template: str
                  ) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
            pem, key = csr_pem(cn)
            r = admin.post("/v1/certificates", json={"csr": pem.decode(), "template": template,
                                                     "dns_names": [] if template ==
                                                     "ocsp-signing" else [cn]})
            r.raise_for_status()
            return x509.load_pem_x509_certificates(r.json()["chain_pem"].encode()), key

        leaves: list[x509.Certificate] = []
        issuer = None
        for i in range(args.certs):
            chain, _ = issue(f"svc{i}.internal", "end-entity")
            leaves.append(chain[0])
            issuer = chain[1]
        assert issuer is not None
        revoked = leaves[::4]
        for cert in revoked:
            admin.post(f"/v1/certificates/{format(cert.serial_number, 'x')}/revoke",
                       json={"reason": "key-compromise"}).raise_for_status()

        # openssl's responder: its own delegated responder certificate from the same CA.
        rchain, rkey = issue("openssl OCSP responder", "ocsp-signing")
        (tmp / "rsigner.pem").write_bytes(rchain[0].public_bytes(serialization.Encoding.PEM))
        (tmp / "rkey.pem").write_bytes(rkey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(tmp / "rkey.pem", 0o600)
        (tmp / "ca.pem").write_bytes(issuer.public_bytes(serialization.Encoding.PEM))
        revoked_serials = {c.serial_number for c in revoked}
        lines = []
        for cert in leaves:
            exp = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
            serial = format(cert.serial_number, "X")
            serial = serial if len(serial) % 2 == 0 else "0" + serial
            subj = "/CN=" + cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            if cert.serial_number in revoked_serials:
                rev = time.strftime("%y%m%d%H%M%SZ", time.gmtime()) + ",keyCompromise"
                lines.append(f"R\t{exp}\t{rev}\t{serial}\tunknown\t{subj}")
            else:
                lines.append(f"V\t{exp}\t\t{serial}\tunknown\t{subj}")
        (tmp / "index.txt").write_text("\n".join(lines) + "\n")
        oport = free_loopback_port()
        openssl_restarts = 0

        def start_openssl() -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                ["openssl", "ocsp", "-index", str(tmp / "index.txt"), "-port", str(oport),
                 "-rsigner", str(tmp / "rsigner.pem"), "-rkey", str(tmp / "rkey.pem"),
                 "-CA", str(tmp / "ca.pem"), "-nmin", "60", "-ignore_err",
                 # a client that connects and never sends must not stall the
                 # single-threaded responder for the rest of the run
                 "-timeout", "5"],
                stdout=subprocess.DEVNULL, stderr=open(tmp / "openssl.log", "ab"))  # noqa: SIM115
            procs.append(proc)
            wait_http(f"http://127.0.0.1:{oport}/", proc)
            return proc

        def restart_openssl() -> None:
            # openssl 3.0's responder can spin for good on a connection the client closed
            # before sending (it reads EOF again and again): seen under load, when ab gives
            # up on a round. A fresh responder, and the round is run again.
            nonlocal openssl_restarts
            openssl_restarts += 1
            for proc in procs[1:]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            del procs[1:]
            start_openssl()

        def openssl_spinning() -> bool:
            """True when the idle responder burns CPU (the spin above): it would take a core
            from whatever runs next."""
            def ticks() -> int:
                stat = Path(f"/proc/{procs[-1].pid}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                return int(fields[11]) + int(fields[12])  # utime + stime
            before = ticks()
            time.sleep(0.3)
            return ticks() - before > 5

        start_openssl()

        def request(cert: x509.Certificate, nonce: bool, i: int) -> bytes:
            b = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
            if nonce:
                b = b.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
            return b.build().public_bytes(serialization.Encoding.DER)

        # Same answers from both before measuring anything.
        for cert in leaves[:4]:
            body = request(cert, True, 0)
            answers = []
            for url in (f"http://127.0.0.1:{port}/ocsp", f"http://127.0.0.1:{oport}/"):
                r = httpx.post(url, content=body,
                               headers={"Content-Type": "application/ocsp-request"})
                resp = ocsp.load_der_ocsp_response(r.content)
                answers.append(resp.certificate_status)
            assert answers[0] == answers[1], answers
            expected = (ocsp.OCSPCertStatus.REVOKED if cert.serial_number in revoked_serials
                        else ocsp.OCSPCertStatus.GOOD)
            assert answers[0] == expected

        urls = {"trustmesh": f"http://127.0.0.1:{port}/ocsp",
                "openssl": f"http://127.0.0.1:{oport}/"}
        # (mix, concurrency) -> responder -> one ab result per round
        runs: dict[tuple[str, int], dict[str, list[dict[str, float]]]] = {}
        for mix in ("nonce", "no-nonce"):
            body = tmp / f"{mix}.der"
            body.write_bytes(request(leaves[1], mix == "nonce", 0))
            for concurrency in concurrencies:
                rounds: dict[str, list[dict[str, float]]] = {"trustmesh": [], "openssl": []}
                for i in range(args.rounds):
                    order = ("trustmesh", "openssl") if i % 2 == 0 else ("openssl", "trustmesh")
                    for name in order:
                        # a spinning responder fails its own round (and is restarted
                        # then); only a trustmesh round needs it checked beforehand
                        if name == "trustmesh" and openssl_spinning():
                            restart_openssl()
                        rounds[name].append(run_ab(
                            urls[name], body, args.requests, concurrency,
                            restart_openssl if name == "openssl" else None))
                runs[(mix, concurrency)] = rounds
        admin.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for (mix, concurrency), rounds in runs.items():
        ours = [r["rps"] for r in rounds["trustmesh"]]
        theirs = [r["rps"] for r in rounds["openssl"]]
        ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
        rows.append({
            "mix": mix, "concurrency": concurrency, "rounds": len(ours),
            "trustmesh_rps": round(ours_median, 1),
            "openssl_rps": round(theirs_median, 1),
            "ratio": round(ours_median / max(theirs_median, 1e-9), 2),
            "round_ratios": [round(a / max(b, 1e-9), 2) for a, b in zip(ours, theirs,
                                                                         strict=True)],
            "trustmesh_failures": sum(r["non_2xx"] + r["connect_or_receive_failures"]
                                      for r in rounds["trustmesh"]),
            "openssl_failures": sum(r["non_2xx"] + r["connect_or_receive_failures"]
                                    for r in rounds["openssl"]),
        })
    # the headline figure of each mix: the first concurrency
    summary: dict[str, object] = {row["mix"]: row for row in rows
                                  if row["concurrency"] == concurrencies[0]}
    summary["rows"] = rows
    summary["openssl_restarts"] = openssl_restarts
    summary["target_ratio"] = 1.0
    summary["smoke"] = args.smoke
    if args.output == "json":
        json.dump(summary, sys.stdout, indent=2)
        print()
        return
    for row in rows:
        print(f"{row['mix']:9} c={row['concurrency']:<3} trustmesh {row['trustmesh_rps']:9.1f} "
              f"req/s   openssl ocsp {row['openssl_rps']:9.1f} req/s   ratio "
              f"{row['ratio']:.2f} (rounds {', '.join(map(str, row['round_ratios']))}; "
              "target >= 1.0)")
    if openssl_restarts:
        print(f"(openssl's responder was restarted {openssl_restarts} times: ab gave up on "
              "it, and that round was run again, or it spun while idle)")


if __name__ == "__main__":
    main()
