"""``policy explain``'s evaluator and the RBAC config the sidecars run never disagree.

Seeded random AuthorizationPolicy sets (ALLOW/DENY/AUDIT, dry run, selectors,
root namespace, principals, namespaces, IP blocks, hosts, ports, methods,
paths, header, SNI, IP and namespace conditions, their ``not`` forms) are
compiled with trustmesh's RBAC compiler into one real Envoy, one mTLS listener
per set, built by the same compiler that makes the sidecars' listeners and
route configurations (for HTTP: the fixed RBAC filters on the listener, the
policies' rules as per-route configs; the route configuration the sidecars get
over RDS is put inline here, where there is no xDS server).
Requests come from three client identities holding X509-SVIDs signed in
process by trustmesh's own PKI code. For every request:

- HTTP ports: the evaluator's verdict equals Envoy's (403 ``RBAC: access
  denied`` exactly when denied), and the dry-run and audit verdicts equal what
  Envoy's shadow rules and LOG filter recorded in its access log;
- TCP ports (network RBAC): a connection is served exactly when the evaluator
  allows it, including rules with HTTP-only fields (ALLOW dropped, DENY widened).
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    extension_pb2,
    substitution_format_string_pb2,
)
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    tls_pb2,
    tls_spiffe_validator_config_pb2,
)
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from harness import free_port
from trustmesh.mesh.envoy.compile import (
    InboundPort,
    SidecarPlan,
    compile_clusters,
    compile_static_listeners,
)
from trustmesh.mesh.envoy.compile import compile_listeners as compile_all_listeners
from trustmesh.mesh.envoy.rbac import compile_http_rbac, compile_network_rbac
from trustmesh.mesh.sidecar import envoy_binary
from trustmesh.pki.ca import build_root, parse_subject
from trustmesh.policy.authz import (
    AuthzDecision,
    AuthzRequest,
    applicable_policies,
    evaluate,
    normalise_path,
)
from trustmesh.policy.mesh_model import AuthorizationPolicy, load_mesh_resources
from trustmesh.spiffe.ids import SpiffeId
from trustmesh.spiffe.svid import build_x509_svid

pytestmark = pytest.mark.slow

TD = "example.org"
ROOT_NS = "istio-system"
CLIENTS = {"one": f"spiffe://{TD}/ns/a/sa/one", "two": f"spiffe://{TD}/ns/b/sa/two",
           "three": f"spiffe://{TD}/ns/a/sa/three"}
LABELS = {"app": "echo", "tier": "web"}
HTTP_SETS = 30
TCP_SETS = 12
REQUESTS_PER_CLIENT = 6
CONNECTIONS_PER_CLIENT = 3
ACCESS_LOG_FORMAT = (
    "%REQ(X-TEST-ID)% shadow-deny=%DYNAMIC_METADATA(envoy.filters.http.rbac:"
    "dry_run_deny_shadow_engine_result)% shadow-allow=%DYNAMIC_METADATA("
    "envoy.filters.http.rbac:dry_run_allow_shadow_engine_result)% audit="
    "%DYNAMIC_METADATA(envoy.common:access_log_hint)%\n")


# -- certificates: trustmesh's own CA and X509-SVID code ------------------------------------
@dataclass(frozen=True)
class Pki:
    base: Path
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate

    def issue(self, name: str, spiffe_id: str, *, not_before: datetime | None = None,
              not_after: datetime | None = None) -> None:
        """Write ``<name>.pem`` and ``<name>.key``: an X509-SVID for ``spiffe_id``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = build_x509_svid(SpiffeId.parse(spiffe_id), key.public_key(), self.root,
                               self.root_key, not_before or now - timedelta(minutes=1),
                               not_after or now + timedelta(hours=1),
                               x509.random_serial_number())
        write_pair(self.base / name, cert, key)


def write_pair(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def make_pki(base: Path, subject: str = "O=trustmesh test,CN=root") -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    root = build_root(key, parse_subject(subject), datetime.now(UTC) - timedelta(minutes=1),
                      timedelta(hours=2))
    pki = Pki(base, key, root)
    (base / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    pki.issue("server", f"spiffe://{TD}/ns/default/sa/echo")
    for name, uri in CLIENTS.items():
        pki.issue(name, uri)
    return pki


# -- random policies ----------------------------------------------------------------------
METHODS = ["GET", "POST", "PUT", "DELETE"]
# Paths as clients write them; the sidecar normalises them (RFC 3986 dot segments,
# merged slashes, unreserved percent-escapes) before RBAC sees them, and so does explain.
PATHS = ["/api/payment", "/api/list", "/admin/x", "/health", "/api/v1/items",
         "/api/payment?x=1", "/api/./payment", "/api/../admin/x", "//api//list",
         "/%61dmin/x", "/Admin/x", "/api/v1/../../health"]
PATH_PATTERNS = ["/api/payment", "/api/*", "*/x", "/health", "*", "/admin/*"]
HOSTS = ["echo.local", "other.local", "echo.local:8443", "ECHO.local"]
TENANTS = ["red", "blue"]
SNIS = [None, "echo.local", "db.local"]


def _maybe(rng: random.Random, p: float = 0.4) -> bool:
    return rng.random() < p


def _pick(rng: random.Random, pool: Sequence[str]) -> list[str]:
    return rng.sample(list(pool), rng.randint(1, min(2, len(pool))))


def _random_source(rng: random.Random) -> dict[str, Any]:
    choice = rng.random()
    if choice < 0.3:
        return {"principals": [CLIENTS[c].removeprefix("spiffe://")
                               for c in _pick(rng, list(CLIENTS))]}
    if choice < 0.42:
        return {"notPrincipals": [CLIENTS[rng.choice(list(CLIENTS))]]}
    if choice < 0.6:
        return {"namespaces": _pick(rng, ["a", "b", "c*", "*"])}
    if choice < 0.68:
        return {"notNamespaces": ["b"]}
    if choice < 0.8:
        return {"principals": [rng.choice(["*", f"{TD}/ns/a/*", "*/sa/two"])]}
    key = rng.choice(["ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"])
    return {key: [rng.choice(["127.0.0.1/32", "10.0.0.0/8", "127.0.0.0/8"])]}


def _random_operation(rng: random.Random, app_port: int) -> dict[str, Any]:
    op: dict[str, Any] = {}
    if _maybe(rng, 0.5):
        op["methods" if _maybe(rng, 0.7) else "notMethods"] = _pick(rng, METHODS)
    if _maybe(rng, 0.5):
        op["paths" if _maybe(rng, 0.7) else "notPaths"] = _pick(rng, PATH_PATTERNS)
    if _maybe(rng, 0.2):
        op["hosts" if _maybe(rng, 0.7) else "notHosts"] = [rng.choice(
            ["echo.local", "*.local", "ECHO.LOCAL", "other*"])]
    if _maybe(rng, 0.25):
        op["ports" if _maybe(rng, 0.7) else "notPorts"] = [str(rng.choice(
            [app_port, 9999]))]
    return op or {"methods": ["GET"]}


def _random_condition(rng: random.Random, app_port: int) -> dict[str, Any]:
    key = rng.choice(["request.headers[x-tenant]", "request.headers[x-tenant]",
                      "request.headers[host]", "source.namespace", "destination.port",
                      "source.principal", "source.ip", "remote.ip", "destination.ip",
                      "connection.sni"])
    values = {"request.headers[x-tenant]": [rng.choice([*TENANTS, "r*", "*", "*n"])],
              "request.headers[host]": [rng.choice(["echo.local", "echo*", "*:8443"])],
              "source.namespace": [rng.choice(["a", "b"])],
              "destination.port": [str(rng.choice([app_port, 9999]))],
              "source.principal": [CLIENTS[rng.choice(list(CLIENTS))]],
              "source.ip": [rng.choice(["127.0.0.1", "10.0.0.0/8"])],
              "remote.ip": [rng.choice(["127.0.0.0/8", "192.168.0.1"])],
              "destination.ip": [rng.choice(["127.0.0.1/32", "10.1.1.1"])],
              "connection.sni": [rng.choice(["echo.local", "*.local", "db*"])]}[key]
    return {"key": key, ("values" if _maybe(rng, 0.7) else "notValues"): values}


def random_policy(rng: random.Random, name: str, app_port: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": rng.choice(
        ["default", "default", "default", ROOT_NS, "elsewhere"])}
    if _maybe(rng, 0.2):
        meta["annotations"] = {"istio.io/dry-run": "true"}
    spec: dict[str, Any] = {"action": rng.choice(["ALLOW", "ALLOW", "DENY", "AUDIT"])}
    if _maybe(rng, 0.5):
        spec["selector"] = {"matchLabels": rng.choice([{"app": "echo"}, {"tier": "web"},
                                                       {"app": "other"}])}
    doc = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": meta, "spec": spec}
    if spec["action"] != "DENY" and _maybe(rng, 0.08):
        return doc  # no rules: ALLOW nothing, AUDIT nothing (Istio refuses DENY without)
    rules = []
    for _ in range(rng.randint(1, 2)):
        rule: dict[str, Any] = {}
        if _maybe(rng, 0.7):
            rule["from"] = [{"source": _random_source(rng)}
                            for _ in range(rng.choice([1, 1, 1, 2]))]
        if _maybe(rng, 0.7):
            rule["to"] = [{"operation": _random_operation(rng, app_port)}
                          for _ in range(rng.choice([1, 1, 1, 2]))]
        if _maybe(rng, 0.35):
            rule["when"] = [_random_condition(rng, app_port)
                            for _ in range(rng.choice([1, 1, 2]))]
        rules.append(rule)
    spec["rules"] = rules
    return doc


def random_policies(rng: random.Random, prefix: str, app_port: int
                    ) -> tuple[list[dict[str, Any]], list[AuthorizationPolicy]]:
    docs = [random_policy(rng, f"{prefix}-{j}", app_port) for j in range(rng.randint(1, 3))]
    loaded = load_mesh_resources(yaml.safe_dump_all(docs), source=prefix)
    return docs, [p for p in loaded if isinstance(p, AuthorizationPolicy)]


def random_request(rng: random.Random) -> dict[str, Any]:
    # a header may come twice, or with spaces around its value
    tenant = rng.choice([*TENANTS, *TENANTS, " red ", [*TENANTS], ["blue", "green"]])
    headers = {"x-tenant": tenant} if _maybe(rng, 0.6) else {}
    return {"method": rng.choice(METHODS), "path": rng.choice(PATHS),
            "host": rng.choice(HOSTS), "headers": headers, "sni": rng.choice(SNIS)}


# -- the Envoy under test -------------------------------------------------------------------
def _packed(message: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def _file_tls(base: Path) -> tls_pb2.CommonTlsContext:
    """Files instead of the agent's SDS secrets; the same SPIFFE validator."""
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(trust_domains=[
        tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
            name=TD, trust_bundle=base_pb2.DataSource(filename=str(base / "root.pem")))])
    packed = any_pb2.Any()
    packed.Pack(config)
    return tls_pb2.CommonTlsContext(
        tls_certificates=[common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(filename=str(base / "server.pem")),
            private_key=base_pb2.DataSource(filename=str(base / "server.key")))],
        validation_context=common_pb2.CertificateValidationContext(
            custom_validator_config=extension_pb2.TypedExtensionConfig(
                name="envoy.tls.cert_validator.spiffe", typed_config=packed)))


TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"


def _has_tls_inspector(listener: listener_pb2.Listener) -> bool:
    return any(f.name == TLS_INSPECTOR for f in listener.listener_filters)


def _with_file_tls_and_log(listener: listener_pb2.Listener, base: Path, log: Path) -> None:
    # Envoy learns the SNI (connection.sni) from this listener filter only
    assert _has_tls_inspector(listener), listener.name
    chain = listener.filter_chains[0]
    ctx = tls_pb2.DownstreamTlsContext()
    chain.transport_socket.typed_config.Unpack(ctx)
    ctx.common_tls_context.CopyFrom(_file_tls(base))
    chain.transport_socket.typed_config.Pack(ctx)
    first = chain.filters[0]
    if first.name != "envoy.filters.network.http_connection_manager":
        return
    manager = hcm_pb2.HttpConnectionManager()
    first.typed_config.Unpack(manager)
    logger = file_pb2.FileAccessLog(path=str(log), log_format=(
        substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=ACCESS_LOG_FORMAT))))
    manager.access_log.append(accesslog_pb2.AccessLog(name="envoy.access_loggers.file",
                                                      typed_config=_packed(logger)))
    first.typed_config.Pack(manager)


@contextmanager
def running_envoy(base: Path, inbound: Sequence[InboundPort]) -> Iterator[Path]:
    """One Envoy serving ``inbound`` (compiled as for a sidecar); yields its access log."""
    plan = SidecarPlan(node_id="default/echo", spiffe_id="unused", address="127.0.0.1",
                       inbound=tuple(inbound))
    log = base / "access.log"
    listeners = compile_static_listeners(plan)
    for listener in listeners:
        _with_file_tls_and_log(listener, base, log)
    clusters = list({c.name: c for c in compile_clusters(plan)}.values())
    admin = free_port()
    boot = bootstrap_pb2.Bootstrap(
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(listeners=listeners,
                                                                 clusters=clusters),
        admin=bootstrap_pb2.Admin(address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=admin))))
    (base / "envoy.json").write_text(json_format.MessageToJson(boot))
    with open(base / "envoy.out", "wb") as out:
        envoy = subprocess.Popen([envoy_binary(), "-c", str(base / "envoy.json"),
                                  "--disable-hot-restart", "--concurrency", "1",
                                  "--log-level", "warning"], stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert envoy.poll() is None, (base / "envoy.out").read_text()[-3000:]
                assert time.monotonic() < deadline, "Envoy did not become ready"
                try:
                    with urllib.request.urlopen(  # noqa: S310 - loopback admin
                            f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.1)
            yield log
        finally:
            envoy.terminate()
            try:
                envoy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                envoy.kill()
                envoy.wait(timeout=10)


def _tls(base: Path, client: str, port: int, sni: str | None) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN, not a host name
    ctx.load_verify_locations(str(base / "root.pem"))
    ctx.load_cert_chain(str(base / f"{client}.pem"), str(base / f"{client}.key"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(sock, server_hostname=sni)
    except BaseException:
        sock.close()
        raise


def send_http(base: Path, client: str, port: int, req: dict[str, Any], test_id: str
              ) -> tuple[int, str]:
    """One HTTP/1.1 request with the path sent exactly as written (no client cleanup)."""
    with _tls(base, client, port, req["sni"]) as conn:
        head = [f"{req['method']} {req['path']} HTTP/1.1", f"Host: {req['host']}",
                f"x-test-id: {test_id}", "Connection: close", "Content-Length: 0"]
        head += [f"{k}:{v}" for k, values in req["headers"].items()
                 for v in ([values] if isinstance(values, str) else values)]
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        resp = http.client.HTTPResponse(conn)  # type: ignore[arg-type]
        resp.begin()
        return resp.status, resp.read().decode(errors="replace")


def send_tcp(base: Path, client: str, port: int, sni: str | None) -> bool:
    """Whether a TCP connection through the sidecar reaches the echo server."""
    try:
        with _tls(base, client, port, sni) as conn:
            conn.sendall(b"ping\n")
            data = b""
            while len(data) < 5:
                chunk = conn.recv(64)
                if not chunk:
                    break
                data += chunk
            return data == b"ping\n"
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def tcp_echo_server() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@contextmanager
def echo_app() -> Iterator[int]:
    port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "trustmesh.mesh.echo", "--port", str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and app.poll() is None
                time.sleep(0.05)
        yield port
    finally:
        app.terminate()
        app.wait(timeout=10)


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="tm-rbac-eq-"))
    try:
        pki = make_pki(base)
        with echo_app() as app_port, tcp_echo_server() as tcp_port:
            rng = random.Random(20261122)
            http_sets, tcp_sets, inbound = [], [], []
            for i in range(HTTP_SETS):
                docs, policies = random_policies(rng, f"h{i}", app_port)
                port = free_port()
                inbound.append(InboundPort(app_port, port, "HTTP", "STRICT", http_rbac=tuple(
                    compile_http_rbac(policies, "default", LABELS, app_port,
                                      ROOT_NS).items())))
                http_sets.append({"port": port, "policies": policies, "docs": docs})
            for i in range(TCP_SETS):
                docs, policies = random_policies(rng, f"t{i}", tcp_port)
                port = free_port()
                inbound.append(InboundPort(tcp_port, port, "TCP", "STRICT",
                                           network_filters=tuple(compile_network_rbac(
                                               policies, "default", LABELS, tcp_port,
                                               ROOT_NS))))
                tcp_sets.append({"port": port, "policies": policies, "docs": docs})
            open_port = free_port()  # no policy: shows the path the filters see
            inbound.append(InboundPort(app_port, open_port, "HTTP", "STRICT"))
            with running_envoy(base, inbound) as log:
                yield {"base": base, "pki": pki, "http_sets": http_sets, "tcp_sets": tcp_sets,
                       "app_port": app_port, "tcp_port": tcp_port, "log": log,
                       "open_port": open_port}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _explain(policies: Sequence[AuthorizationPolicy], principal: str, port: int,
             protocol: str, req: dict[str, Any]) -> AuthzDecision:
    return evaluate(policies, AuthzRequest(
        source_principal=principal, source_ip="127.0.0.1", destination_namespace="default",
        destination_labels=LABELS, destination_ip="127.0.0.1", destination_port=port,
        protocol=protocol, host=req.get("host", ""), method=req.get("method", ""),
        path=req.get("path", "/"), headers=req.get("headers", {}), sni=req["sni"] or ""),
        root_namespace=ROOT_NS)


def _shadow(decision: AuthzDecision, action: str) -> str:
    """What Envoy's shadow engine of one action records for the dry-run policies."""
    verdicts = [d for d in decision.dry_run if d["action"] == action]
    if not verdicts:
        return "-"
    if action == "DENY":
        return "denied" if any(not d["allowed"] for d in verdicts) else "allowed"
    return "allowed" if any(d["allowed"] for d in verdicts) else "denied"


def _audit(policies: Sequence[AuthorizationPolicy], decision: AuthzDecision) -> str:
    """What Envoy's LOG filter records: the hint when an AUDIT rule matched."""
    if decision.audited:
        return "true"
    selected = applicable_policies(policies, "default", LABELS, ROOT_NS)
    return "false" if any(p.action == "AUDIT" and not p.dry_run for p in selected) else "-"


def _read_log(log: Path, expected: int) -> dict[str, str]:
    deadline = time.monotonic() + 15  # the file access log flushes about once a second
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= expected or time.monotonic() > deadline:
            return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines}
        time.sleep(0.2)


def _report(disagreements: Sequence[dict[str, Any]]) -> str:
    shown = yaml.safe_dump_all(disagreements[:3], sort_keys=False)
    return f"{len(disagreements)} disagreement(s) between explain and Envoy:\n{shown}"


def test_explain_and_envoy_agree_on_generated_http_cases(world: dict[str, Any]) -> None:
    rng = random.Random(7)
    checked = allowed = 0
    disagreements: list[dict[str, Any]] = []
    expected_log: dict[str, str] = {}
    for n, s in enumerate(world["http_sets"]):
        for client, principal in CLIENTS.items():
            for k in range(REQUESTS_PER_CLIENT):
                req = random_request(rng)
                test_id = f"{n}-{client}-{k}"
                status, body = send_http(world["base"], client, s["port"], req, test_id)
                verdict = _explain(s["policies"], principal, world["app_port"], "HTTP", req)
                envoy_allowed = status != 403
                if envoy_allowed != verdict.allowed or (status == 403 and
                                                        body != "RBAC: access denied"):
                    disagreements.append({"client": client, "request": req,
                                          "envoy": f"{status} {body[:200]}",
                                          "explain": verdict.to_json()["summary"],
                                          "policies": s["docs"]})
                if envoy_allowed:
                    assert status == 200, (status, body, req)
                expected_log[test_id] = (
                    f"shadow-deny={_shadow(verdict, 'DENY')} "
                    f"shadow-allow={_shadow(verdict, 'ALLOW')} "
                    f"audit={_audit(s['policies'], verdict)}")
                checked += 1
                allowed += envoy_allowed
    if disagreements:
        pytest.fail(_report(disagreements))
    # the generator covers both outcomes in earnest
    assert checked == HTTP_SETS * len(CLIENTS) * REQUESTS_PER_CLIENT
    assert 0.15 * checked < allowed < 0.85 * checked, (allowed, checked)
    # dry-run and audit verdicts: what Envoy's shadow rules and LOG filter recorded
    logged = _read_log(world["log"], len(expected_log))
    mismatches = [(i, logged.get(i), want) for i, want in expected_log.items()
                  if logged.get(i) != want]
    assert not mismatches, mismatches[:5]
    assert any("shadow-deny=denied" in v for v in expected_log.values())
    assert any("audit=true" in v for v in expected_log.values())


def test_explain_and_envoy_agree_on_generated_tcp_cases(world: dict[str, Any]) -> None:
    """Network RBAC: HTTP-only fields drop ALLOW rules and widen DENY rules, as explained."""
    rng = random.Random(11)
    checked = allowed = 0
    disagreements: list[dict[str, Any]] = []
    for s in world["tcp_sets"]:
        for client, principal in CLIENTS.items():
            for _ in range(CONNECTIONS_PER_CLIENT):
                sni = rng.choice(SNIS)
                served = send_tcp(world["base"], client, s["port"], sni)
                verdict = _explain(s["policies"], principal, world["tcp_port"], "TCP",
                                   {"sni": sni})
                if served != verdict.allowed:
                    disagreements.append({"client": client, "sni": sni,
                                          "envoy": "served" if served else "refused",
                                          "explain": verdict.to_json()["summary"],
                                          "policies": s["docs"]})
                checked += 1
                allowed += served
    if disagreements:
        pytest.fail(_report(disagreements))
    assert 0.1 * checked < allowed < 0.9 * checked, (allowed, checked)


PATH_PIECES = ["a", "B", ".", "..", "%2e", "%2E%2e", "", "%41", "%7e", "%7E", "x;p=1", "..;",
               ".;", "%20", "%zz", "%", "~", "\\", "%2F", "%5c", "%3a", "...", '"', "{}"]


def test_explain_sees_the_path_the_sidecar_filters_see(world: dict[str, Any]) -> None:
    """normalise_path == the path Envoy's inbound HTTP connection manager hands to RBAC
    (and forwards), for paths built from the pieces that normalisation rewrites."""
    rng = random.Random(5)
    wrong = []
    redirects = rewritten = 0
    for n in range(250):
        path = "/" + "/".join(rng.choice(PATH_PIECES) for _ in range(rng.randint(1, 5)))
        if _maybe(rng, 0.2):
            path += "?q=/../x"
        req = {"method": "GET", "path": path, "host": "echo.local", "headers": {}, "sni": None}
        status, body = send_http(world["base"], "one", world["open_port"], req, f"path-{n}")
        if status == 307:  # escaped slashes: Envoy redirects to the unescaped path
            redirects += 1
            req["path"] = _redirect(world["base"], world["open_port"], path)
            status, body = send_http(world["base"], "one", world["open_port"], req,
                                     f"path-{n}-redirected")
        assert status == 200, (path, req["path"], status, body)
        seen = json.loads(body)["path"].split("?", 1)[0]
        if seen != normalise_path(path):
            wrong.append((path, seen, normalise_path(path)))
        rewritten += seen != path.split("?", 1)[0]
    assert not wrong, wrong[:10]
    assert redirects > 10 and rewritten > 100, (redirects, rewritten)


def _redirect(base: Path, port: int, path: str) -> str:
    with _tls(base, "one", port, None) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: echo.local\r\nConnection: close\r\n"
                     "\r\n".encode())
        resp = http.client.HTTPResponse(conn)  # type: ignore[arg-type]
        resp.begin()
        location = resp.getheader("location") or ""
    return location


def test_expired_and_foreign_client_certificates_are_refused(world: dict[str, Any]) -> None:
    """The compiled inbound TLS context (SPIFFE validator) refuses an expired SVID and one
    from a CA outside the bundle, and accepts a current one."""
    base: Path = world["base"]
    pki: Pki = world["pki"]
    now = datetime.now(UTC)
    pki.issue("expired", CLIENTS["one"], not_before=now - timedelta(hours=2),
              not_after=now - timedelta(minutes=5))
    foreign_dir = base / "foreign-ca"
    foreign_dir.mkdir()
    foreign = make_pki(foreign_dir, "O=elsewhere,CN=root")
    foreign.issue("client", CLIENTS["one"])
    for suffix in (".pem", ".key"):
        shutil.copy(foreign_dir / f"client{suffix}", base / f"foreign{suffix}")
    port = world["http_sets"][0]["port"]
    request = {"method": "GET", "path": "/", "host": "echo.local", "headers": {}, "sni": None}
    for who in ("expired", "foreign"):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
            send_http(base, who, port, request, f"refused-{who}")
    status, _ = send_http(base, "one", port, request, "accepted")
    assert status in (200, 403)  # a current SVID completes the handshake


def test_strict_inbound_listeners_read_the_sni() -> None:
    plan = SidecarPlan(node_id="default/echo", spiffe_id="unused", address="127.0.0.1",
                       inbound=(InboundPort(8080, 15080, "HTTP", "STRICT"),
                                InboundPort(5432, 15432, "TCP", "STRICT")))
    assert all(_has_tls_inspector(x) for x in compile_all_listeners(plan))
