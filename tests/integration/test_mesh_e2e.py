"""The mesh end to end: real server, agent, Envoy sidecars and an echo app on loopback.

Each step of the Istio + SPIRE scenario is asserted on status codes and
headers; policy changes are timed while traffic flows. HTTP authorization
reaches the sidecars as route configurations (RDS): a policy change applies to
the next request on connections already open, and never touches a listener.
"""

from __future__ import annotations

import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmesh.mesh.demo import ALLOW_CLIENT, ALLOW_PAYMENT_ONLY, DEFAULT_DENY, MeshLab

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab() -> Iterator[MeshLab]:
    lab = MeshLab()  # its own directory under /tmp: sidecars run as other users
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(lab.base, ignore_errors=True)


@pytest.fixture
def clean(lab: MeshLab) -> Iterator[MeshLab]:
    """Every test starts with no AuthorizationPolicy (allow all) and ends the same way."""
    def reset() -> None:
        for text in (DEFAULT_DENY, ALLOW_CLIENT):
            lab.cli("delete", "--ignore-not-found", "-f", "-", input=text)
        allowed, _ = lab.wait_status("GET", "/", 200, timeout=10)
        assert allowed.status == 200, "the mesh did not go back to allow-all"
        # from the first answer under the new routes on, every answer is under them
        assert [lab.call("GET", "/").status for _ in range(8)] == [200] * 8

    reset()
    yield lab
    reset()


def test_a_caller_without_identity_cannot_connect(clean: MeshLab) -> None:
    result = clean.call_without_identity()
    assert result.status == 0, result
    assert "SSL" in result.error or "closed" in result.error or "reset" in result.error.lower()


def test_mtls_call_carries_the_client_identity_in_xfcc(clean: MeshLab) -> None:
    result = clean.call("GET", "/hello")
    assert result.status == 200, result
    seen = result.json()
    assert seen["path"] == "/hello"
    xfcc = seen["headers"]["x-forwarded-client-cert"]
    parts = dict(p.split("=", 1) for p in xfcc.split(";"))
    assert parts["By"] == clean.spiffe_id("echo")
    assert parts["URI"] == clean.spiffe_id("client")
    assert len(parts["Hash"]) == 64


def test_default_deny_then_allow_principal_then_method_and_path(clean: MeshLab) -> None:
    clean.apply(DEFAULT_DENY)
    denied, took = clean.wait_status("GET", "/", 403, timeout=5)
    assert denied.status == 403 and denied.body == "RBAC: access denied", denied
    assert took < 1.0, f"default deny took {took:.2f}s to be enforced"
    verdict = clean.explain("GET", "/", clean.spiffe_id("client"))
    assert verdict["allowed"] is False and verdict["policy"] == "default/allow-nothing"

    clean.apply(ALLOW_CLIENT)
    allowed, took = clean.wait_status("GET", "/", 200, timeout=5)
    assert allowed.status == 200 and took < 1.0, (allowed, took)
    assert [clean.call("GET", "/").status for _ in range(10)] == [200] * 10
    verdict = clean.explain("GET", "/", clean.spiffe_id("client"))
    assert verdict["allowed"] is True and verdict["policy"] == "default/allow-client"
    assert verdict["rule"] == 0

    clean.apply(ALLOW_PAYMENT_ONLY)
    post, _ = clean.wait_status("POST", "/api/payment", 200, timeout=5)
    get, _ = clean.wait_status("GET", "/list", 403, timeout=5)
    assert (post.status, get.status) == (200, 403)
    # Once one request is judged by the new policy, every later one is, whichever pooled
    # connection between the sidecars carries it (the rules live in the route, read per
    # request; no connection keeps the old ones).
    assert [clean.call("GET", "/api/payment").status for _ in range(20)] == [403] * 20
    assert [clean.call("POST", "/api/payment").status for _ in range(5)] == [200] * 5
    assert clean.explain("POST", "/api/payment", clean.spiffe_id("client"))["allowed"] is True
    assert clean.explain("GET", "/list", clean.spiffe_id("client"))["allowed"] is False
    # another principal is not the client
    other = clean.explain("POST", "/api/payment", "spiffe://example.org/ns/default/sa/other")
    assert other["allowed"] is False


def test_policy_applied_under_traffic_takes_effect_within_a_second(clean: MeshLab) -> None:
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        deadline = time.monotonic() + 20  # bounded even if the test fails
        while not stop.is_set() and time.monotonic() < deadline:
            statuses.append((time.monotonic(), clean.call("GET", "/").status))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.5)
        applied_at = time.monotonic()
        clean.apply(DEFAULT_DENY)
        acknowledged = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        t.join()
    first_403 = next(ts for ts, status in statuses if status == 403)
    assert first_403 - acknowledged < 1.0, (first_403 - acknowledged)
    assert first_403 - applied_at < 2.0
    assert all(s == 200 for ts, s in statuses if ts < applied_at), "errors before the change"
    assert all(s == 403 for ts, s in statuses if ts > first_403), statuses
    failed = [(round(ts - applied_at, 3), s) for ts, s in statuses if s not in (200, 403)]
    assert not failed, f"requests failed outright around the change: {failed}"


def _envoy_stats(lab: MeshLab, sidecar: str) -> dict[str, int]:
    url = f"http://127.0.0.1:{lab.ports[sidecar + '_admin']}/stats"
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback admin
        lines = resp.read().decode().splitlines()
    out = {}
    for line in lines:
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out


def _listener_versions(lab: MeshLab, sidecar: str) -> dict[str, tuple[str, str]]:
    """Each active listener's version and last update time (Envoy keeps the version of a
    listener whose filter chains it replaced in place, but not its update time)."""
    query = urllib.parse.urlencode({"resource": "dynamic_listeners"})
    url = f"http://127.0.0.1:{lab.ports[sidecar + '_admin']}/config_dump?{query}"
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback admin
        dump: dict[str, Any] = json.loads(resp.read())
    return {c["name"]: (c["active_state"]["version_info"], c["active_state"]["last_updated"])
            for c in dump["configs"]}


def test_a_policy_change_applies_to_the_next_request_on_an_open_connection(
        clean: MeshLab) -> None:
    """One HTTP/1.1 keep-alive connection to the client's sidecar, carried on to echo's
    sidecar over a pooled mTLS connection: allowed, then a default deny is applied, and a
    request on the same connection is refused within a second. Echo's sidecar accepted no
    new connection for it, took the change as a route update (RDS) and left its listener
    (version, update time) and its filter chains (no drain) as they were."""
    inbound = f"http.inbound_{clean.ports['echo_sidecar']}_mtls"
    conn = http.client.HTTPConnection("127.0.0.1", clean.ports["client_outbound"], timeout=5)

    def get() -> tuple[int, str]:
        conn.request("GET", "/keep-alive")
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        assert not resp.will_close, "the sidecar closed the connection"
        return resp.status, body

    try:
        assert [get()[0] for _ in range(3)] == [200] * 3
        sock = conn.sock
        before = _envoy_stats(clean, "echo")
        listeners = _listener_versions(clean, "echo")
        clean.apply(DEFAULT_DENY)
        applied = time.monotonic()
        statuses = []
        while time.monotonic() - applied < 5:
            status, body = get()
            statuses.append(status)
            if status == 403:
                break
            time.sleep(0.02)
        took = time.monotonic() - applied
        assert conn.sock is sock, "a new connection was opened"
        assert (status, body) == (403, "RBAC: access denied"), statuses
        assert took < 1.0, f"refused on the open connection only after {took:.2f}s"
        assert set(statuses[:-1]) <= {200}, statuses
        assert [get()[0] for _ in range(5)] == [403] * 5
        assert conn.sock is sock
    finally:
        conn.close()
    after = _envoy_stats(clean, "echo")
    # the request came to echo's sidecar over a connection it had accepted before
    assert after[f"{inbound}.downstream_cx_total"] == before[f"{inbound}.downstream_cx_total"]
    # a route update, and nothing for the listeners
    rds = [k for k in after if k.startswith(f"{inbound}.rds.") and
           k.endswith(".update_success")]
    assert len(rds) == 1, rds
    assert after[rds[0]] > before[rds[0]]
    for counter in ("listener_manager.lds.update_success", "listener_manager.listener_modified",
                    "listener_manager.listener_removed", "listener_manager.listener_added"):
        assert after[counter] == before[counter], counter
    assert after["listener_manager.total_filter_chains_draining"] == 0
    assert after["listener_manager.total_listeners_draining"] == 0
    assert _listener_versions(clean, "echo") == listeners


def test_with_a_tcp_port_a_policy_change_updates_only_the_tcp_listener(clean: MeshLab) -> None:
    """Network RBAC stays on TCP listeners: a policy change updates echo's TCP listener,
    while its HTTP listener (and the keep-alive connection through it) stays as it was."""
    from trustmesh.mesh.demo import free_loopback_port

    p = clean.ports
    tcp_sidecar = free_loopback_port()
    with_tcp = clean.registry_yaml().replace(
        f"sidecarPort: {p['echo_sidecar']}}}]",
        f"sidecarPort: {p['echo_sidecar']}}}, {{name: sql, port: {free_loopback_port()}, "
        f"protocol: TCP, sidecarPort: {tcp_sidecar}}}]")
    assert with_tcp != clean.registry_yaml()
    conn = http.client.HTTPConnection("127.0.0.1", p["client_outbound"], timeout=5)
    try:
        clean.apply(with_tcp)
        deadline = time.monotonic() + 10
        while f"inbound|{tcp_sidecar}" not in _listener_versions(clean, "echo"):
            assert time.monotonic() < deadline, "the TCP listener did not arrive"
            time.sleep(0.1)
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and not resp.will_close
        before, listeners = _envoy_stats(clean, "echo"), _listener_versions(clean, "echo")
        clean.apply(DEFAULT_DENY)
        deadline = time.monotonic() + 5
        while True:
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
            assert not resp.will_close
            if resp.status == 403 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert (resp.status, body) == (403, b"RBAC: access denied")
        deadline = time.monotonic() + 5
        while _envoy_stats(clean, "echo")["listener_manager.listener_modified"] == before[
                "listener_manager.listener_modified"]:
            assert time.monotonic() < deadline, "the TCP listener was not updated"
            time.sleep(0.05)
        after = _envoy_stats(clean, "echo")
        assert after["listener_manager.listener_modified"] == before[
            "listener_manager.listener_modified"] + 1
        now = _listener_versions(clean, "echo")
        http_listener = f"inbound|{p['echo_sidecar']}"
        assert now[http_listener] == listeners[http_listener]
        assert now[f"inbound|{tcp_sidecar}"] != listeners[f"inbound|{tcp_sidecar}"]
        inbound = f"http.inbound_{p['echo_sidecar']}_mtls.downstream_cx_total"
        assert after[inbound] == before[inbound]
    finally:
        conn.close()
        clean.apply(clean.registry_yaml())


def test_a_bad_policy_is_refused_and_the_old_one_keeps_working(clean: MeshLab) -> None:
    clean.apply(ALLOW_CLIENT)
    assert clean.wait_status("GET", "/", 200)[0].status == 200
    bad = ALLOW_CLIENT.replace("action: ALLOW", "action: PERMIT")
    proc = clean.cli("apply", "-f", "-", input="---\n".join([DEFAULT_DENY, bad]), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "spec.action" in proc.stderr and "PERMIT" in proc.stderr
    names = [r["metadata"]["name"] for r in clean.cli_json("get", "authorizationpolicies")[
        "resources"]]
    assert names == ["allow-client"], "nothing of the bad input was stored"
    time.sleep(0.5)
    assert clean.call("GET", "/").status == 200


def test_get_lists_resources_in_every_format(clean: MeshLab) -> None:
    text = clean.cli("get", "workloads").stdout
    assert "Workload" in text and "echo" in text and "client" in text
    docs = clean.cli_json("get", "workload")["resources"]
    assert {d["metadata"]["name"] for d in docs} == {"echo", "client"}
    assert "kind: Workload" in clean.cli("get", "workloads", "-o", "yaml").stdout
    proc = clean.cli("get", "virtualservices", check=False)
    assert proc.returncode == 2 and "unknown kind 'virtualservices'" in proc.stderr


def test_sidecars_run_the_default_number_of_envoy_workers(lab: MeshLab) -> None:
    """`sidecar run` execs Envoy with --concurrency; Envoy names its workers wrk:worker_N."""
    from trustmesh.mesh.sidecar import SidecarOptions

    for name in ("sidecar-echo", "sidecar-client"):
        names = []
        for task in Path(f"/proc/{lab.procs[name].pid}/task").iterdir():
            try:
                names.append((task / "comm").read_text())
            except FileNotFoundError:
                continue  # a thread that ended between the listing and the read
        workers = sum(comm.startswith("wrk:") for comm in names)
        assert workers == SidecarOptions.concurrency, name


def test_a_sidecar_must_present_its_own_workload_identity(lab: MeshLab) -> None:
    """ADS refuses a sidecar whose SVID is not the identity of the workload it claims."""
    import subprocess

    from trustmesh.mesh.sidecar import SidecarOptions, envoy_command, write_bootstrap

    opts = SidecarOptions(workload="default/echo",
                          server_address=f"127.0.0.1:{lab.ports['agent_api']}",
                          agent_socket=lab.agent_socket, trust_domain=lab.trust_domain,
                          svid_name=lab.spiffe_id("client") if not lab.as_root else "default",
                          admin_address="127.0.0.1:0")
    tmp_path = Path(tempfile.mkdtemp(prefix="tm-sidecar-", dir=lab.base))
    tmp_path.chmod(0o777)  # the Envoy below runs as another user
    cmd = envoy_command(opts, write_bootstrap(opts, tmp_path), tmp_path / "admin")
    if lab.as_root:  # run as the client's uid: it is entitled to the client identity only
        cmd = ["setpriv", "--reuid=61002", "--regid=61002", "--clear-groups", *cmd]
    log = tmp_path / "envoy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 20
            text = ""
            while time.monotonic() < deadline:
                text = lab.log_tail("server", 200_000)
                if "ADS refused a sidecar" in text:
                    break
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    refused = [line for line in text.splitlines() if "ADS refused a sidecar" in line]
    assert refused, text[-3000:] + log.read_text(errors="replace")[-3000:]
    assert f"must present {lab.spiffe_id('echo')}" in refused[-1]
    assert lab.spiffe_id("client") in refused[-1]


def test_a_certificate_from_another_trust_domain_is_refused(clean: MeshLab) -> None:
    """A client with a valid-looking SVID from a foreign CA cannot even finish the TLS
    handshake with the echo sidecar (no bundle for that trust domain)."""
    import socket
    import ssl
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                "spiffe://other.org/ns/default/sa/client")]), False)
            .sign(key, hashes.SHA256()))
    base = Path(tempfile.mkdtemp(dir=clean.base))
    (base / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (base / "c.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(base / "c.pem"), str(base / "c.key"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(("127.0.0.1", clean.ports["echo_sidecar"]),
                                      timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
            if not tls.recv(100):
                raise ConnectionError("closed")
    assert clean.call("GET", "/").status == 200  # the mesh's own client still gets through


def _foreign_client(base: Path, trust_domain: str) -> tuple[Path, Path, Path]:
    """A CA of another trust domain (root.pem) and a client SVID it signed (c.pem, c.key)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root")])
    root = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                                  ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                f"spiffe://{trust_domain}/ns/default/sa/client")]), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = base / "root.pem", base / "c.pem", base / "c.key"
    paths[0].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _call_with(port: int, cert: Path, key: Path) -> tuple[int, dict[str, str]]:
    """GET / straight to a sidecar's inbound port with this client certificate: the
    status and the headers the echo app saw, or (0, {}) when the handshake is refused."""
    import socket
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
            resp = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            resp.begin()
            body = resp.read()
            headers = json.loads(body).get("headers", {}) if resp.status == 200 else {}
            return resp.status, headers
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError):
        return 0, {}


def test_another_trust_domain_is_accepted_only_while_federated(clean: MeshLab) -> None:
    """other.org's SVIDs reach the echo sidecar once the server holds other.org's bundle
    and echo's entry federates with other.org; policy then decides as for anyone; deleting
    the bundle refuses them at the handshake again."""
    base = Path(tempfile.mkdtemp(dir=clean.base))
    root, cert, key = _foreign_client(base, "other.org")
    port = clean.ports["echo_sidecar"]
    assert _call_with(port, cert, key)[0] == 0  # not federated: no handshake
    [echo] = clean.cli_json("entry", "list", "--spiffe-id", clean.spiffe_id("echo"))
    clean.cli("bundle", "set", "--trust-domain", "other.org", "-f", str(root), "--format",
              "pem")
    try:
        time.sleep(2)  # the bundle alone is not enough: echo's entry does not federate
        assert _call_with(port, cert, key)[0] == 0
        clean.cli("entry", "update", echo["id"], "--federates-with", "other.org")
        deadline = time.monotonic() + 20
        status, headers = 0, {}
        while status != 200 and time.monotonic() < deadline:
            status, headers = _call_with(port, cert, key)
            time.sleep(0.2)
        assert status == 200, "a federated SVID was refused"
        xfcc = headers.get("x-forwarded-client-cert", "")
        assert "URI=spiffe://other.org/ns/default/sa/client" in xfcc, xfcc
        # authorization still applies: only the mesh's own client is allowed
        clean.apply(ALLOW_CLIENT)
        deadline = time.monotonic() + 5
        while _call_with(port, cert, key)[0] != 403 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _call_with(port, cert, key)[0] == 403
        # forgetting other.org's bundle refuses its SVIDs at the handshake again
        clean.cli("bundle", "delete", "--trust-domain", "other.org")
        deadline = time.monotonic() + 20
        while _call_with(port, cert, key)[0] != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _call_with(port, cert, key)[0] == 0
        assert clean.call("GET", "/").status == 200  # the mesh's own client is unaffected
    finally:
        clean.cli("entry", "update", echo["id"], "--clear", "federates-with")
        clean.cli("bundle", "delete", "--trust-domain", "other.org", check=False)


def _key_and_csr(base: Path, name: str, cn: str) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    (base / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    path = base / f"{name}.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def _sidecar_serials(lab: MeshLab, admin_port: str) -> set[str]:
    """Serials (hex) of the SVIDs a sidecar's Envoy presents, from its admin /certs: one
    per TLS context, the same one but for a moment during a rotation."""
    conn = http.client.HTTPConnection("127.0.0.1", lab.ports[admin_port], timeout=5)
    try:
        conn.request("GET", "/certs")
        certs = json.loads(conn.getresponse().read())["certificates"]
    finally:
        conn.close()
    return {str(c["cert_chain"][0]["serial_number"]).lower().lstrip("0")
            for c in certs if c.get("cert_chain")}


def test_a_revoked_svid_is_refused_and_the_agent_replaces_its_own(clean: MeshLab) -> None:
    """A revoked SVID of the trust domain is refused at the echo sidecar's handshake once
    the agent has the new CRL; an SVID the agent itself serves is replaced at once."""
    base = Path(tempfile.mkdtemp(dir=clean.base))
    outsider = clean.cli_json("ca", "issue", "--csr", str(_key_and_csr(base, "outsider", "o")),
                              "--template", "end-entity", "--uri",
                              f"spiffe://{clean.trust_domain}/ns/default/sa/outsider")
    (base / "outsider.pem").write_text(outsider["chain_pem"])
    port = clean.ports["echo_sidecar"]
    cert, key = base / "outsider.pem", base / "outsider.key"
    assert _call_with(port, cert, key)[0] == 200  # allow-all: a valid SVID gets through
    clean.cli("ca", "revoke", "--serial", outsider["serial"], "--reason", "keyCompromise")
    revoked_at = time.monotonic()
    while _call_with(port, cert, key)[0] != 0 and time.monotonic() - revoked_at < 15:
        time.sleep(0.1)
    took = time.monotonic() - revoked_at
    assert _call_with(port, cert, key)[0] == 0, "a revoked SVID still completes the handshake"
    assert took < 10, took  # the agent syncs every second here
    assert clean.call("GET", "/").status == 200  # everyone else is unaffected

    # the client sidecar's own SVID: revoked, then replaced by its agent without waiting
    # for the half-life rotation, and the mesh path keeps working
    [before] = _sidecar_serials(clean, "client_admin")
    clean.cli("ca", "revoke", "--serial", before, "--reason", "keyCompromise")
    deadline = time.monotonic() + 15
    while before in _sidecar_serials(clean, "client_admin") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert before not in _sidecar_serials(clean, "client_admin"), "the revoked SVID was kept"
    deadline = time.monotonic() + 10
    while clean.call("GET", "/").status != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert clean.call("GET", "/").status == 200


def test_ingress_gateway_terminates_tls_and_mutual_tls_then_mtls_inside(clean: MeshLab) -> None:
    import os
    import socket
    import ssl
    import subprocess

    from trustmesh.mesh.demo import free_loopback_port
    from trustmesh.mesh.sidecar import envoy_binary

    base = Path(tempfile.mkdtemp(prefix="gw-", dir=clean.base))
    uid = 61003
    ingress_id = clean.spiffe_id("ingress")
    selectors = (["--selector", f"unix:uid:{uid}"] if clean.as_root else
                 ["--selector", f"unix:uid:{os.geteuid()}", "--selector",
                  f"unix:path:{os.path.realpath(envoy_binary())}"])
    clean.cli("entry", "create", "--spiffe-id", ingress_id, "--parent-id",
              f"spiffe://{clean.trust_domain}/node/demo", *selectors)
    # the gateway's certificate for outside clients, and an outside client's certificate,
    # both from the trustmesh CA
    server = clean.cli_json("ca", "issue", "--csr", str(_key_and_csr(base, "server",
                                                                      "echo.example.com")),
                            "--template", "end-entity-server", "--dns-name", "echo.example.com")
    (base / "server.pem").write_text(server["chain_pem"])
    client = clean.cli_json("ca", "issue", "--csr", str(_key_and_csr(base, "client",
                                                                      "partner-app")),
                            "--template", "end-entity-client")
    (base / "client.pem").write_text(client["chain_pem"])
    roots = clean.cli("bundle", "show", "--format", "pem").stdout
    (base / "roots.pem").write_text(roots)
    simple, mutual = free_loopback_port(), free_loopback_port()
    clean.apply(f"""\
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Gateway
metadata: {{name: ingress, namespace: default}}
spec:
  serviceAccount: ingress
  servers:
  - {{port: {simple}, hosts: [echo.example.com], tls: {{mode: SIMPLE}},
     routes: [{{pathPrefix: /, service: echo, port: 80}}]}}
  - {{port: {mutual}, hosts: ["*"], tls: {{mode: MUTUAL}},
     routes: [{{pathPrefix: /, service: echo, port: 80}}]}}
""")
    if clean.as_root:
        for f in base.iterdir():
            os.chown(f, uid, uid)
        os.chown(base, uid, uid)
    cmd = [sys.executable, "-m", "trustmesh.cli.main", "gateway", "run", "--gateway",
           "default/ingress", "--tls-cert", str(base / "server.pem"), "--tls-key",
           str(base / "server.key"), "--client-ca", str(base / "roots.pem"),
           "--server-address", f"127.0.0.1:{clean.ports['agent_api']}",
           "--agent-socket", str(clean.agent_socket), "--work-dir", str(base)]
    if clean.as_root:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    else:
        cmd += ["--svid", ingress_id]
    log = open(base / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)

    def https(port: int, cert: bool) -> tuple[int, dict[str, str]]:
        ctx = ssl.create_default_context(cafile=str(base / "roots.pem"))
        if cert:
            ctx.load_cert_chain(str(base / "client.pem"), str(base / "client.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
        try:
            conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 5),
                                        server_hostname="echo.example.com")
            conn.request("GET", "/from-outside", headers={"host": "echo.example.com"})
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, json.loads(body)["headers"] if resp.status == 200 else {}
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + 40
        status, headers = 0, {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (base / "gateway.log").read_text()[-3000:]
            try:
                status, headers = https(simple, cert=False)
                if status == 200:
                    break
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.2)
        # SIMPLE: server-authenticated TLS outside (verified against the trustmesh root for
        # the name echo.example.com), then mTLS inside with the gateway's SVID
        assert status == 200, (base / "gateway.log").read_text()[-3000:]
        xfcc = dict(p.split("=", 1) for p in headers["x-forwarded-client-cert"].split(";"))
        assert xfcc["URI"] == ingress_id and xfcc["By"] == clean.spiffe_id("echo")
        # MUTUAL: no client certificate, no handshake; with one, through to the app
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException,
                            OSError)):
            https(mutual, cert=False)
        status, headers = https(mutual, cert=True)
        assert status == 200
        assert "partner-app" not in headers.get("x-forwarded-client-cert", "")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        clean.cli("delete", "--ignore-not-found", "-f", "-", input=(
            "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Gateway\n"
            "metadata: {name: ingress, namespace: default}\n"
            f"spec: {{servers: [{{port: {simple}, routes: [{{service: echo, port: 80}}]}}]}}\n"))


def test_a_nacked_configuration_is_logged_and_the_old_one_keeps_serving(clean: MeshLab) -> None:
    """Envoy cannot bind a port another process holds: it rejects that listener update
    (NACK); the server logs it and the sidecar keeps serving its previous listeners."""
    import socket

    from trustmesh.mesh.demo import free_loopback_port

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    p = clean.ports
    extra = free_loopback_port()
    changed = clean.registry_yaml().replace(
        f"ports: [{{name: http, port: {p['echo_app']}, protocol: HTTP, "
        f"sidecarPort: {p['echo_sidecar']}}}]",
        f"ports: [{{name: http, port: {p['echo_app']}, protocol: HTTP, "
        f"sidecarPort: {p['echo_sidecar']}}}, {{name: extra, port: {extra}, protocol: HTTP, "
        f"sidecarPort: {taken}}}]")
    assert changed != clean.registry_yaml()
    try:
        clean.apply(changed)
        deadline = time.monotonic() + 10
        nacks: list[str] = []
        while time.monotonic() < deadline and not nacks:
            nacks = [line for line in clean.log_tail("server", 400_000).splitlines()
                     if "sidecar rejected configuration" in line and "default/echo" in line]
            time.sleep(0.1)
        assert nacks, clean.log_tail("server")
        assert str(taken) in nacks[-1]  # Envoy's reason names the port it could not bind
        for _ in range(20):  # the previous listeners keep serving
            assert clean.call("GET", "/").status == 200
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{p['http']}/metrics") as resp:
            metrics = dict(line.rsplit(" ", 1) for line in resp.read().decode().splitlines()
                           if line.startswith("trustmesh_xds_") or
                           line.startswith("trustmesh_mesh_revision"))
        assert float(metrics["trustmesh_xds_nacks"]) >= 1
        assert float(metrics["trustmesh_xds_streams"]) >= 2  # echo and client sidecars
        assert float(metrics["trustmesh_xds_acks"]) >= 2
        assert float(metrics["trustmesh_mesh_revision"]) >= 2
    finally:
        blocker.close()
        clean.apply(clean.registry_yaml())


def test_peer_authentication_permissive_then_strict(clean: MeshLab) -> None:
    """PERMISSIVE lets a plaintext caller in (without an identity, so no XFCC); STRICT, the
    default, refuses it again. The mTLS client keeps working throughout."""
    permissive = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo-permissive, namespace: default}
spec: {selector: {matchLabels: {app: echo}}, mtls: {mode: PERMISSIVE}}
"""

    def plaintext() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", clean.ports["echo_sidecar"], timeout=3)
        try:
            conn.request("GET", "/plain")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                assert "x-forwarded-client-cert" not in json.loads(body)["headers"]
            return resp.status
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            conn.close()

    assert plaintext() == 0  # STRICT by default
    try:
        clean.apply(permissive)
        deadline = time.monotonic() + 5
        while plaintext() != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plaintext() == 200
        assert clean.call("GET", "/").status == 200  # mTLS still accepted
        verdict = clean.explain("GET", "/")  # no --from: a caller without identity
        assert verdict["mtls_mode"] == "PERMISSIVE" and verdict["allowed"] is True
    finally:
        clean.cli("delete", "-f", "-", input=permissive)
    deadline = time.monotonic() + 5
    while plaintext() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert plaintext() == 0
    assert clean.explain("GET", "/")["allowed"] is False
