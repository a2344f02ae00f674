"""OCSP responder processes: each answers from the datastore, follows the responder
certificate, reads HTTP strictly, and ends with the server."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from harness import ServerProcess, issue, make_csr, ocsp_request, openssl

WORKERS = 3


@pytest.fixture
def srv(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "disk", "--signing-workers", "0",
                        "--ocsp-workers", str(WORKERS))


def workers_of(pid: int) -> list[int]:
    """The OCSP worker processes of a server started with --signing-workers 0."""
    found = []
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():  # children of every thread
        try:
            children += (task / "children").read_text().split()
        except FileNotFoundError:
            continue
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            found.append(int(child))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ask(srv: ServerProcess, der: bytes, *, get: bool = False) -> ocsp.OCSPResponse:
    """One request on a new connection (the kernel picks the worker per connection)."""
    if get:
        path = quote(base64.b64encode(der).decode(), safe="")
        resp = httpx.get(f"{srv.base_url}/ocsp/{path}", timeout=10)
    else:
        resp = httpx.post(f"{srv.base_url}/ocsp", content=der, timeout=10,
                          headers={"Content-Type": "application/ocsp-request"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/ocsp-response"
    return ocsp.load_der_ocsp_response(resp.content)


def counter(srv: ServerProcess, outcome: str) -> float:
    text = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    found = re.search(rf'^trustmesh_ocsp_responses_total{{outcome="{outcome}"}} (\S+)$', text,
                      flags=re.M)
    return float(found.group(1)) if found else 0.0


def test_workers_run_and_other_routes_are_forwarded(srv: ServerProcess) -> None:
    assert srv.proc is not None
    assert len(workers_of(srv.proc.pid)) == WORKERS
    health = httpx.get(f"{srv.base_url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ca_id = health.json()["ca_id"]
    assert httpx.get(f"{srv.base_url}/crl/{ca_id}.crl").headers["content-type"] == (
        "application/pkix-crl")
    assert b"BEGIN CERTIFICATE" in httpx.get(f"{srv.base_url}/ca/bundle.pem").content
    assert httpx.get(f"{srv.base_url}/nothing/here").status_code == 404


def test_revocation_is_seen_by_every_worker_at_once(srv: ServerProcess, tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    plain = ocsp_request(out, nonce=False)
    # every worker now holds a signed 'good' answer it may reuse for nonce-less requests
    for _ in range(40):
        assert ask(srv, plain).certificate_status == ocsp.OCSPCertStatus.GOOD
    srv.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "key-compromise")
    for i in range(120):
        resp = ask(srv, ocsp_request(out, nonce=i % 2 == 0) if i % 3 else plain,
                   get=i % 4 == 0)
        assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED, i
        assert resp.revocation_reason == x509.ReasonFlags.key_compromise
    # the counters of all workers add up on /metrics
    assert counter(srv, "good") == 40
    assert counter(srv, "revoked") == 120


def test_openssl_client_post_and_get_forms(srv: ServerProcess, tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    verify = ["-issuer", str(out["inter"]), "-cert", str(out["leaf"]), "-CAfile",
              str(out["root"])]
    for _ in range(4):  # a few connections, so more than one worker answers
        res = openssl("ocsp", *verify, "-url", f"{srv.base_url}/ocsp")
        assert f"{out['leaf']}: good" in res.stdout
        assert "Response verify OK" in res.stderr and "WARNING" not in res.stderr
    # GET /ocsp/<base64> (RFC 6960 A.1), checked by openssl from the saved response
    der = ocsp_request(out, nonce=False)
    path = quote(base64.b64encode(der).decode(), safe="")
    (tmp_path / "resp.der").write_bytes(
        httpx.get(f"{srv.base_url}/ocsp/{path}", timeout=10).content)
    res = openssl("ocsp", *verify, "-respin", str(tmp_path / "resp.der"))
    assert f"{out['leaf']}: good" in res.stdout and "Response verify OK" in res.stderr
    # HTTP/1.1 keep-alive: several requests on one connection
    with httpx.Client(base_url=srv.base_url) as client:
        for _ in range(5):
            resp = client.post("/ocsp", content=ocsp_request(out, nonce=True),
                               headers={"Content-Type": "application/ocsp-request"})
            parsed = ocsp.load_der_ocsp_response(resp.content)
            assert parsed.certificate_status == ocsp.OCSPCertStatus.GOOD


def raw_exchange(srv: ServerProcess, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def http_bodies(data: bytes) -> list[bytes]:
    """The bodies of the HTTP responses in ``data``, one after another."""
    bodies = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        bodies.append(rest[:length])
        data = rest[length:]
    return bodies


def read_response(sock: socket.socket) -> bytes:
    """The body of the next HTTP response on a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        body += chunk
    return body


def test_connections_that_need_more_than_one_read_are_answered(srv: ServerProcess,
                                                               tmp_path: Path) -> None:
    # the answering thread answers a request that came whole in its first read; the
    # event loop takes over the others
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")

    def post(version: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
        der = ocsp_request(out, nonce=True)
        return (b"POST /ocsp " + version + b"\r\nContent-Type: application/ocsp-request\r\n"
                + extra + b"Content-Length: " + str(len(der)).encode() + b"\r\n\r\n", der)

    def good(body: bytes) -> bool:
        return ocsp.load_der_ocsp_response(body).certificate_status == (
            ocsp.OCSPCertStatus.GOOD)

    for pause_before in ("body", "request"):
        for _ in range(3):  # a few connections, so more than one worker answers
            head, der = post(b"HTTP/1.0")
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                if pause_before == "request":  # connected, silent for a while
                    time.sleep(0.3)
                    sock.sendall(head)
                else:
                    sock.sendall(head)
                    time.sleep(0.3)
                sock.sendall(der)
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
            assert [good(b) for b in http_bodies(received)] == [True], pause_before
    # two pipelined requests in one write, the second one closing the connection
    first, second = post(b"HTTP/1.1"), post(b"HTTP/1.1", b"Connection: close\r\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"".join(first + second))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert [good(b) for b in http_bodies(received)] == [True, True]
    # keep-alive answers leave at once, not when the connection closes (accepted
    # connections start corked for the one-shot case; ten answers held back 200 ms
    # each would take two seconds)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        started = time.monotonic()
        for _ in range(10):
            sock.sendall(b"".join(post(b"HTTP/1.1")))
            assert good(read_response(sock))
        assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"garbage\r\n\r\n", 400),
    (b"GET /ocsp/x HTTP/2.0\r\n\r\n", 505),
    (b"POST /ocsp HTTP/1.0\r\n\r\n", 411),
    (b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET /ocsp HTTP/1.0\r\n\r\n", 405),
    (b"POST /ocsp HTTP/1.0\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi", 415),
    (b"POST /ocsp HTTP/1.0\r\nContent-Length: 9999999\r\n\r\n", 413),
    (b"GET /" + b"x" * 30000 + b" HTTP/1.0\r\n\r\n", 414),
])
def test_malformed_http_is_refused_with_a_4xx_or_5xx(srv: ServerProcess, request_bytes: bytes,
                                                     status: int) -> None:
    answer = raw_exchange(srv, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert httpx.get(f"{srv.base_url}/healthz", timeout=10).status_code == 200


def test_malformed_ocsp_requests_get_malformed_request(srv: ServerProcess) -> None:
    answer = raw_exchange(srv, b"POST /ocsp HTTP/1.0\r\nContent-Type: application/ocsp-request"
                               b"\r\nContent-Length: 15\r\n\r\nthis is not DER")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert ocsp.load_der_ocsp_response(body).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    resp = httpx.get(f"{srv.base_url}/ocsp/!!!notbase64", timeout=10)
    assert ocsp.load_der_ocsp_response(resp.content).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    assert counter(srv, "malformedRequest") == 2


def test_a_dead_worker_is_replaced(srv: ServerProcess, tmp_path: Path) -> None:
    assert srv.proc is not None
    before = workers_of(srv.proc.pid)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = workers_of(srv.proc.pid)
        if len(now) == WORKERS and before[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker not replaced: {workers_of(srv.proc.pid)}")
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    for _ in range(30):
        assert ask(srv, ocsp_request(out, nonce=True)).certificate_status == (
            ocsp.OCSPCertStatus.GOOD)


def test_workers_end_with_a_killed_server(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--key-manager", "disk", "--signing-workers", "0", "--ocsp-workers", "2")
    assert srv.proc is not None
    pids = workers_of(srv.proc.pid)
    assert len(pids) == 2
    srv.kill()  # SIGKILL: no chance to stop them
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "orphaned OCSP workers"
    # the port is free again: the same server starts on it
    again = start_server("--key-manager", "disk", "--signing-workers", "0",
                         "--ocsp-workers", "2", port=srv.port)
    assert httpx.get(f"{again.base_url}/healthz", timeout=10).status_code == 200


def test_port_in_use_is_a_configuration_error(start_server: Callable[..., ServerProcess],
                                              tmp_path: Path) -> None:
    srv = start_server("--key-manager", "disk", "--signing-workers", "0", "--ocsp-workers", "2")
    with pytest.raises(AssertionError, match="cannot listen on"):
        start_server("--key-manager", "disk", "--signing-workers", "0", "--ocsp-workers", "2",
                     name="second", port=srv.port)


def test_in_process_responder_with_zero_workers(start_server: Callable[..., ServerProcess],
                                                tmp_path: Path) -> None:
    srv = start_server("--key-manager", "disk", "--signing-workers", "0", "--ocsp-workers", "0")
    assert srv.proc is not None and workers_of(srv.proc.pid) == []
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    res = openssl("ocsp", "-issuer", str(out["inter"]), "-cert", str(out["leaf"]), "-CAfile",
                  str(out["root"]), "-url", f"{srv.base_url}/ocsp")
    assert f"{out['leaf']}: good" in res.stdout and "Response verify OK" in res.stderr


@pytest.mark.slow
def test_responder_rotation_reaches_every_worker(start_server: Callable[..., ServerProcess],
                                                 tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('ocsp_responder_ttl = "24s"\n')  # renewed at 16 s
    srv = start_server("--config", str(config), "--key-manager", "disk", "--signing-workers",
                       "0", "--ocsp-workers", str(WORKERS))
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")

    def responder_serials(n: int) -> set[int]:
        return {ask(srv, ocsp_request(out, nonce=True)).certificates[0].serial_number
                for _ in range(n)}

    first = responder_serials(12)
    assert len(first) == 1
    deadline = time.monotonic() + 60
    while responder_serials(1) == first:
        assert time.monotonic() < deadline, "the responder certificate was not renewed"
        time.sleep(0.5)
    time.sleep(1.0)  # the server tells its workers within a fraction of a second
    after = responder_serials(60)
    assert len(after) == 1 and after.isdisjoint(first)
    res = openssl("ocsp", "-issuer", str(out["inter"]), "-cert", str(out["leaf"]), "-CAfile",
                  str(out["root"]), "-url", f"{srv.base_url}/ocsp")
    assert "Response verify OK" in res.stderr and f"{out['leaf']}: good" in res.stdout
