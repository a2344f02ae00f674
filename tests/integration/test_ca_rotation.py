"""X.509 CA rotation with a real server, agent, openssl and py-spiffe, on a 90 s CA.

The schedule at this pace: the next CA is published at ~45 s, signs from ~75 s
(after 10 s in the bundle at least), and the old one leaves the bundle once
what it signed has expired (at most at 90 s).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient

from harness import (
    TRUSTMESH,
    AgentProcess,
    ServerProcess,
    make_csr,
    openssl,
    run,
    split_chain,
    urls_of,
)

TTL_FLAGS = ("--intermediate-ttl", "90s", "--root-ttl", "180s", "--ca-propagation", "10s",
             "--default-validity", "15s", "--agent-svid-ttl", "15s")


def slots(srv: ServerProcess) -> list[dict[str, Any]]:
    return list(srv.cli_json("ca", "show")["slots"])


def wait_until(what: str, fn: Callable[[], Any], timeout: float,
               logs: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{logs()}" if logs else ""))


def bundle_roots(srv: ServerProcess) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(httpx.get(f"{srv.base_url}/ca/bundle.pem").content)


def sequence(srv: ServerProcess) -> int:
    out = srv.cli("bundle", "show", "--format", "spiffe", check=True).stdout
    return int(json.loads(out)["spiffe_sequence"])


def root_of(slot: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(slot["chain"][-1]["pem"].encode())


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def write_pem(path: Path, certs: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


@pytest.mark.slow
def test_the_next_ca_is_published_before_it_signs_and_the_old_one_stays_until_expiry(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    srv = start_server(*TTL_FLAGS)
    base = Path(tempfile.mkdtemp(prefix="tm-rot-"))
    os.chmod(base, 0o755)
    agent: AgentProcess | None = None
    try:
        (first,) = slots(srv)
        assert first["state"] == "active"
        root1 = root_of(first)
        assert bundle_roots(srv) == [root1]
        seq1 = sequence(srv)

        tok = srv.cli_json("token", "create", "--spiffe-id",
                           "spiffe://example.org/node1")["token"]
        srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node1",
                     "--spiffe-id", "spiffe://example.org/app", "--x509-svid-ttl", "10s",
                     "--selector", f"unix:uid:{os.getuid()}")
        agent = AgentProcess(srv, base, tok).start()
        agent_log = agent.log_path
        client = WorkloadApiClient(socket_path=f"unix://{agent.socket}")

        # 1. At half-life the next CA is prepared and published, and signs nothing yet.
        prepared = wait_until("a prepared CA", lambda: next(
            (s for s in slots(srv) if s["state"] == "prepared"), None), 70)
        root2 = root_of(prepared)
        assert root2 != root1 and bundle_roots(srv) == [root1, root2]
        seq2 = sequence(srv)
        assert seq2 > seq1
        # the agent learns the new root from the bundle and hands it to workloads
        wait_until("the workload bundle with both roots", lambda: len(
            client.fetch_x509_context().x509_bundle_set.get_bundle_for_trust_domain(  # type: ignore[attr-defined]
                client.fetch_x509_context().default_svid.spiffe_id.trust_domain  # type: ignore[attr-defined]
            ).x509_authorities) == 2, 20)

        # A certificate signed now comes from the old CA; make it outlive the hand-over.
        remaining = (at(first["not_after"]) - datetime.now(UTC)).total_seconds()
        validity = int(min(40, remaining - 3))
        assert validity > 30, f"the test fell behind the schedule ({remaining:.0f}s left)"
        csr = make_csr(tmp_path, "old", subj="/CN=old.internal")
        old = srv.cli_json("ca", "issue", "--csr", str(csr), "--template", "end-entity",
                           "--validity", f"{validity}s")
        old_chain = split_chain(old["chain_pem"])
        (tmp_path / "old.pem").write_text(old_chain[0])
        (tmp_path / "old-inter.pem").write_text(old_chain[1])
        assert x509.load_pem_x509_certificate(old_chain[-1].encode()) == root1

        # 2. The prepared CA takes over at 5/6 of the first one's life.
        wait_until("the hand-over", lambda: [s["state"] for s in slots(srv)] == [
            "old", "active"], 45)
        old_slot, active = slots(srv)
        assert active["ca_id"] == prepared["ca_id"]
        signs_from = at(active["activated_at"])
        assert (signs_from - at(prepared["prepared_at"])).total_seconds() >= 10
        assert bundle_roots(srv) == [root1, root2]  # the old root stays published
        assert sequence(srv) == seq2  # activation alone does not change the bundle

        # the old CA's certificate still verifies against the bundle, with its CRL and OCSP
        write_pem(tmp_path / "bundle.pem", bundle_roots(srv))
        crl_url, ocsp_url = urls_of(tmp_path / "old.pem")
        assert old_slot["ca_id"] in crl_url
        (tmp_path / "old.crl").write_bytes(httpx.get(crl_url).content)
        res = openssl("verify", "-crl_check", "-CRLfile", str(tmp_path / "old.crl"),
                      "-CAfile", str(tmp_path / "bundle.pem"), "-untrusted",
                      str(tmp_path / "old-inter.pem"), str(tmp_path / "old.pem"))
        assert res.stdout.strip().endswith(": OK")

        def ocsp_answer() -> str:
            return openssl("ocsp", "-issuer", str(tmp_path / "old-inter.pem"), "-cert",
                           str(tmp_path / "old.pem"), "-CAfile", str(tmp_path / "bundle.pem"),
                           "-url", ocsp_url).stdout

        assert ": good" in ocsp_answer()
        srv.cli_json("ca", "revoke", "--serial", old["serial"], "--reason", "superseded")
        assert ": revoked" in ocsp_answer()
        crl = x509.load_der_x509_crl(httpx.get(crl_url).content)
        assert crl.get_revoked_certificate_by_serial_number(int(old["serial"], 16)) is not None

        # new certificates come from the new CA and verify against the same bundle
        new = srv.cli_json("ca", "issue", "--csr", str(make_csr(tmp_path, "new")),
                           "--template", "end-entity")
        new_chain = split_chain(new["chain_pem"])
        assert x509.load_pem_x509_certificate(new_chain[-1].encode()) == root2
        (tmp_path / "new.pem").write_text(new_chain[0])
        (tmp_path / "new-inter.pem").write_text(new_chain[1])
        res = openssl("verify", "-CAfile", str(tmp_path / "bundle.pem"), "-untrusted",
                      str(tmp_path / "new-inter.pem"), str(tmp_path / "new.pem"))
        assert res.stdout.strip().endswith(": OK")

        # nothing was signed by the new CA before it had been published for 10 s
        events = srv.cli_json("ca", "audit", "--action", "issue")
        by_new = [e for e in events if e.get("ca_id") == active["ca_id"]]
        assert by_new, "the new CA signed nothing"
        assert min(at(e["at"]) for e in by_new) >= at(prepared["prepared_at"]).replace(
            microsecond=0)
        assert all(at(e["at"]) >= signs_from.replace(microsecond=0) for e in by_new)

        # the agent keeps talking to the server (whose SVID now chains to the new root)
        # and its workloads get SVIDs from the new CA
        def svid_from_new_ca() -> bool:
            svid = client.fetch_x509_context().default_svid  # type: ignore[attr-defined]
            return bool(svid.cert_chain[1].subject.rfc4514_string()
                        == active["chain"][0]["subject"])

        wait_until("an SVID from the new CA", svid_from_new_ca, 20)

        # 3. The old CA leaves the bundle once what it signed has expired.
        # (by then the second CA is near its own half-life: a third may be prepared and
        # published at any moment, so these checks name the roots instead of counting them)
        wait_until("the old CA's retirement",
                   lambda: "old" not in [s["state"] for s in slots(srv)], 30)
        assert next(s for s in slots(srv) if s["state"] == "active")["ca_id"] == (
            active["ca_id"])
        old_end = x509.load_pem_x509_certificate(old_chain[0].encode()).not_valid_after_utc
        assert datetime.now(UTC) >= old_end.replace(microsecond=0)
        published = bundle_roots(srv)
        assert root1 not in published and published[0] == root2
        assert sequence(srv) > seq2

        def workload_roots() -> list[x509.Certificate]:
            ctx = client.fetch_x509_context()
            bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(  # type: ignore[attr-defined]
                ctx.default_svid.spiffe_id.trust_domain)  # type: ignore[attr-defined]
            return list(bundle.x509_authorities)

        wait_until("the workload bundle without the old root",
                   lambda: root1 not in (roots := workload_roots()) and root2 in roots, 30,
                   logs=lambda: agent_log.read_text(errors="replace")[-4000:])
        health = httpx.get(f"http://127.0.0.1:{agent.health}/healthz").json()
        assert health["server_reachable"] is True
        metrics = httpx.get(f"{srv.base_url}/metrics").text
        assert f'trustmesh_x509_ca_slot{{ca_id="{active["ca_id"]}",state="active"}} 1.0' in (
            metrics)
        log = (srv.log_path).read_text()
        assert '"to": "retired"' in log and '"to": "prepared"' in log

        # a restarted agent still reaches the server: its bootstrap bundle only has the
        # retired root, the bundle it cached has the new one
        agent.stop()
        agent.start()
        wait_until("the restarted agent reaching the server", lambda: httpx.get(
            f"http://127.0.0.1:{agent.health}/healthz").json()["server_reachable"], 20)
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("flags,message", [
    (("--intermediate-ttl", "30s"), "too short to rotate"),
    (("--intermediate-ttl", "10m", "--ca-propagation", "5m", "--default-validity", "1m",
      "--agent-svid-ttl", "1m"), "must be at least 15m"),
    (("--intermediate-ttl", "2d"), "must be at least 6d"),
])
def test_a_ca_ttl_too_short_to_rotate_is_a_config_error(
        tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    proc = run([TRUSTMESH, "server", "run", "--data-dir", str(tmp_path / "srv"), *flags])
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "intermediate_ttl" in proc.stderr
