"""The CA keeps its identity and its revocations across restarts, crashes and lost data."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography import x509

from harness import ServerProcess, issue, make_csr, openssl


def crl_number(srv: ServerProcess) -> int:
    info = srv.cli_json("ca", "show")
    der = httpx.get(info["crl_url"]).content
    crl = x509.load_der_x509_crl(der)
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def children_of(pid: int) -> list[int]:
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat_file.parent.name))
    return out


def test_restart_keeps_ca_revocations_and_crl_number_grows(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    srv = start_server()
    before = srv.cli_json("ca", "show")
    out = issue(srv, tmp_path, make_csr(tmp_path, "r"), "--template", "end-entity")
    srv.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "key-compromise")
    number_before = crl_number(srv)
    srv.stop()

    srv2 = ServerProcess(srv.data_dir, port=srv.port).start()
    try:
        after = srv2.cli_json("ca", "show")
        assert [c["fingerprint_sha256"] for c in after["chain"]] == [
            c["fingerprint_sha256"] for c in before["chain"]]
        status = openssl("ocsp", "-issuer", str(out["inter"]), "-cert", str(out["leaf"]),
                         "-CAfile", str(out["root"]), "-url", after["ocsp_url"])
        assert ": revoked" in status.stdout
        number_now = crl_number(srv2)
        assert number_now >= number_before
        other = issue(srv2, tmp_path, make_csr(tmp_path, "r2"), "--template", "end-entity")
        srv2.cli_json("ca", "revoke", "--serial", str(other["serial"]))
        assert crl_number(srv2) > number_now
        crl = x509.load_der_x509_crl(httpx.get(after["crl_url"]).content)
        serials = {format(r.serial_number, "x") for r in crl}
        assert {out["serial"], other["serial"]} <= serials
    finally:
        srv2.stop()


def test_files_and_socket_are_private(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--key-manager", "disk")
    assert stat.S_IMODE(srv.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(srv.socket.stat().st_mode) == 0o600
    keys = list((srv.data_dir / "keys").glob("*"))
    assert keys, "the disk key manager wrote no key files"
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    log = srv.log()
    assert "PRIVATE KEY" not in log


def test_admin_socket_refuses_other_users() -> None:
    # A data directory that "nobody" can traverse, so that the server's own peer
    # check (SO_PEERCRED) is what refuses when the socket itself is opened up.
    base = Path(tempfile.mkdtemp(prefix="tm-peer-"))
    os.chmod(base, 0o755)
    srv = ServerProcess(base / "server")
    try:
        srv.start()
        os.chmod(srv.data_dir, 0o755)
        os.chmod(srv.socket, 0o666)
        proc = srv.cli("ca", "show", user="nobody")
        assert proc.returncode == 5, proc.stderr
        assert "may not use the admin socket" in proc.stderr
        os.chmod(srv.socket, 0o600)  # as the server leaves it: the kernel refuses first
        proc = srv.cli("ca", "show", user="nobody")
        assert proc.returncode == 5 and "permission denied" in proc.stderr.lower()
        os.chmod(srv.data_dir, 0o700)
        proc = srv.cli("ca", "show", user="nobody")
        assert proc.returncode == 5 and "permission denied" in proc.stderr.lower()
        assert srv.cli("ca", "show").returncode == 0  # root still gets in
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_sigkill_during_issuance_leaves_a_consistent_datastore(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    srv = start_server()
    csr = make_csr(tmp_path, "k").read_text()
    stop = threading.Event()
    results: list[int] = []

    def hammer() -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(srv.socket)),
                          timeout=5) as client:
            while not stop.is_set():
                try:
                    r = client.post("http://x/v1/certificates",
                                    json={"csr": csr, "template": "end-entity",
                                          "dns_names": ["k.internal"]})
                    results.append(r.status_code)
                except httpx.HTTPError:
                    return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(results) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.proc is not None
    workers = children_of(srv.proc.pid)
    assert workers, "the server runs its signing workers as child processes"
    srv.kill()  # SIGKILL while requests are in flight
    stop.set()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and (
            time.monotonic() < deadline):
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], (
        "signing workers outlived their server")
    for t in threads:
        t.join(timeout=10)
    assert len(results) >= 40

    db = srv.data_dir / "datastore.sqlite3"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        certs = {r[0]: r[1] for r in conn.execute("SELECT serial, der FROM certificates")}
        issued = {r[0] for r in conn.execute(
            "SELECT serial FROM audit_events WHERE action = 'issue'")}
    assert set(certs) == issued  # every stored certificate has its audit event, and back
    for serial, der in certs.items():
        assert format(x509.load_der_x509_certificate(der).serial_number, "x") == serial

    srv2 = ServerProcess(srv.data_dir, port=srv.port).start()
    try:
        assert len(srv2.cli_json("ca", "audit", "--action", "issue")) == len(certs)
        out = issue(srv2, tmp_path, make_csr(tmp_path, "after"), "--template", "end-entity")
        assert out["serial"]
    finally:
        srv2.stop()


def test_revocations_survive_a_restored_old_datastore(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    srv = start_server()
    out = issue(srv, tmp_path, make_csr(tmp_path, "b"), "--template", "end-entity")
    srv.stop()
    backup = tmp_path / "backup.sqlite3"
    shutil.copy(srv.data_dir / "datastore.sqlite3", backup)  # taken before the revocation
    srv = ServerProcess(srv.data_dir, port=srv.port).start()
    srv.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "key-compromise")
    srv.stop()
    for suffix in ("", "-wal", "-shm"):
        (srv.data_dir / f"datastore.sqlite3{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, srv.data_dir / "datastore.sqlite3")  # the revocation is gone from it

    srv = ServerProcess(srv.data_dir, port=srv.port).start()
    try:
        res = openssl("ocsp", "-issuer", str(out["inter"]), "-cert", str(out["leaf"]),
                      "-CAfile", str(out["root"]), "-url", f"{srv.base_url}/ocsp")
        assert ": revoked" in res.stdout
        assert "Reason: keyCompromise" in res.stdout
        assert "restored revocations" in srv.log()
    finally:
        srv.stop()


def test_upstream_ca_signs_our_intermediate(start_server: Callable[..., ServerProcess],
                                            tmp_path: Path) -> None:
    up_key, up_cert = tmp_path / "corp-root.key", tmp_path / "corp-root.pem"
    openssl("req", "-x509", "-newkey", "rsa:3072", "-nodes", "-keyout", str(up_key),
            "-subj", "/O=Corp/CN=Corp Root", "-days", "3650", "-out", str(up_cert),
            )
    srv = start_server("--upstream-ca-cert", str(up_cert), "--upstream-ca-key", str(up_key),
                       "--trust-domain", "corp.example")
    info = srv.cli_json("ca", "show")
    assert [c["role"] for c in info["chain"]] == ["signing", "upstream"]
    assert info["chain"][1]["subject"] == "CN=Corp Root,O=Corp"
    out = issue(srv, tmp_path, make_csr(tmp_path, "svc"), "--template", "end-entity",
                "--uri", "spiffe://corp.example/ns/default/sa/web")
    res = openssl("verify", "-CAfile", str(up_cert), "-untrusted", str(out["inter"]),
                  str(out["leaf"]))
    assert res.stdout.strip().endswith(": OK")
    assert not (srv.data_dir / "keys" / "corp-root.key").exists()


def test_bad_upstream_key_is_a_clear_startup_error(tmp_path: Path) -> None:
    a_key, a_cert = tmp_path / "a.key", tmp_path / "a.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(a_key), "-subj", "/CN=A", "-days", "30", "-out", str(a_cert))
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", str(tmp_path / "b.key"))
    srv = ServerProcess(tmp_path / "data", ["--upstream-ca-cert", str(a_cert),
                                            "--upstream-ca-key", str(tmp_path / "b.key")])
    proc = subprocess.run(
        [*_server_cmd(srv)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "does not match" in proc.stderr


def _server_cmd(srv: ServerProcess) -> list[str]:
    from harness import TRUSTMESH

    return [TRUSTMESH, "server", "run", "--data-dir", str(srv.data_dir), "--http-address",
            f"127.0.0.1:{srv.port}", "--bind-address", f"127.0.0.1:{srv.agent_port}",
            "--attest-address", f"127.0.0.1:{srv.attest_port}",
            "--admin-address", f"127.0.0.1:{srv.admin_port}", *srv.extra_args]
