"""``policy explain``'s evaluator and the RBAC config the sidecars run never disagree.

Seeded random AuthorizationPolicy sets (ALLOW/DENY/AUDIT, dry run, selectors,
root namespace, principals, namespaces, IP blocks, hosts, ports, methods,
paths, header and namespace conditions, their ``not`` forms) are compiled with
trustmesh's RBAC compiler into one real Envoy, one mTLS listener per set. Each
set gets requests from three client identities; for every request the
evaluator's verdict must equal what Envoy answered (403 ``RBAC: access
denied`` exactly when denied).
"""

from __future__ import annotations

import http.client
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    tls_pb2,
    tls_spiffe_validator_config_pb2,
)
from google.protobuf import any_pb2, json_format

from harness import free_port
from trustmesh.mesh.envoy.compile import InboundPort, SidecarPlan, compile_clusters
from trustmesh.mesh.envoy.compile import compile_listeners as compile_all_listeners
from trustmesh.mesh.envoy.rbac import compile_http_rbac
from trustmesh.mesh.sidecar import envoy_binary
from trustmesh.policy.authz import AuthzRequest, evaluate
from trustmesh.policy.mesh_model import AuthorizationPolicy, load_mesh_resources

pytestmark = pytest.mark.slow

TD = "example.org"
ROOT_NS = "istio-system"
CLIENTS = {"one": f"spiffe://{TD}/ns/a/sa/one", "two": f"spiffe://{TD}/ns/b/sa/two",
           "three": f"spiffe://{TD}/ns/a/sa/three"}
LABELS = {"app": "echo", "tier": "web"}
SETS = 24
REQUESTS_PER_CLIENT = 6


# -- certificates -----------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate | None, uri: str | None
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(_name(uri or "test root"))
         .issuer_name(ca.subject if ca else _name("test root"))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1)))
    if uri is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), True).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
        return b.sign(key, hashes.SHA256()), key
    b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                        False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                ExtendedKeyUsageOID.CLIENT_AUTH]), False)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                      False), True))
    return b.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


# -- random policies ----------------------------------------------------------------------
METHODS = ["GET", "POST", "PUT", "DELETE"]
PATHS = ["/api/payment", "/api/list", "/admin/x", "/health", "/api/v1/items"]
PATH_PATTERNS = ["/api/payment", "/api/*", "*/x", "/health", "*", "/admin/*"]
HOSTS = ["echo.local", "other.local"]
TENANTS = ["red", "blue"]


def _maybe(rng: random.Random, p: float = 0.4) -> bool:
    return rng.random() < p


def _pick(rng: random.Random, pool: list[str]) -> list[str]:
    return rng.sample(pool, rng.randint(1, min(2, len(pool))))


def random_policy(rng: random.Random, name: str, app_port: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": rng.choice(
        ["default", "default", "default", ROOT_NS, "elsewhere"])}
    if _maybe(rng, 0.15):
        meta["annotations"] = {"istio.io/dry-run": "true"}
    spec: dict[str, Any] = {"action": rng.choice(["ALLOW", "ALLOW", "DENY", "AUDIT"])}
    if _maybe(rng, 0.5):
        spec["selector"] = {"matchLabels": rng.choice([{"app": "echo"}, {"tier": "web"},
                                                       {"app": "other"}])}
    if _maybe(rng, 0.1):
        return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": meta, "spec": spec}  # no rules: ALLOW nothing / DENY nothing
    rules = []
    for _ in range(rng.randint(1, 2)):
        rule: dict[str, Any] = {}
        if _maybe(rng, 0.7):
            source: dict[str, Any] = {}
            choice = rng.random()
            if choice < 0.35:
                source["principals"] = [CLIENTS[c].removeprefix("spiffe://") for c in
                                        _pick(rng, list(CLIENTS))]
            elif choice < 0.5:
                source["notPrincipals"] = [CLIENTS[rng.choice(list(CLIENTS))]]
            elif choice < 0.7:
                source["namespaces"] = _pick(rng, ["a", "b", "c*", "*"])
            elif choice < 0.8:
                source["notNamespaces"] = ["b"]
            elif choice < 0.9:
                source["principals"] = [rng.choice(["*", f"{TD}/ns/a/*", "*/sa/two"])]
            else:
                source["ipBlocks" if _maybe(rng, 0.5) else "notIpBlocks"] = [
                    rng.choice(["127.0.0.1/32", "10.0.0.0/8"])]
            rule["from"] = [{"source": source}]
        if _maybe(rng, 0.7):
            op: dict[str, Any] = {}
            if _maybe(rng, 0.5):
                op["methods" if _maybe(rng, 0.7) else "notMethods"] = _pick(rng, METHODS)
            if _maybe(rng, 0.5):
                op["paths" if _maybe(rng, 0.7) else "notPaths"] = _pick(rng, PATH_PATTERNS)
            if _maybe(rng, 0.2):
                op["hosts" if _maybe(rng, 0.7) else "notHosts"] = [rng.choice(
                    ["echo.local", "*.local", "ECHO.LOCAL", "other*"])]
            if _maybe(rng, 0.2):
                op["ports" if _maybe(rng, 0.7) else "notPorts"] = [str(rng.choice(
                    [app_port, 9999]))]
            rule["to"] = [{"operation": op or {"methods": ["GET"]}}]
        if _maybe(rng, 0.3):
            key = rng.choice(["request.headers[x-tenant]", "source.namespace",
                              "destination.port", "source.principal"])
            values = {"request.headers[x-tenant]": [rng.choice(TENANTS + ["r*"])],
                      "source.namespace": [rng.choice(["a", "b"])],
                      "destination.port": [str(rng.choice([app_port, 9999]))],
                      "source.principal": [CLIENTS[rng.choice(list(CLIENTS))]]}[key]
            rule["when"] = [{"key": key, ("values" if _maybe(rng, 0.7) else "notValues"): values}]
        rules.append(rule)
    spec["rules"] = rules
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": meta, "spec": spec}


def random_request(rng: random.Random) -> dict[str, Any]:
    headers = {"x-tenant": rng.choice(TENANTS)} if _maybe(rng, 0.6) else {}
    return {"method": rng.choice(METHODS), "path": rng.choice(PATHS),
            "host": rng.choice(HOSTS + ["echo.local:8443"]), "headers": headers}


# -- the Envoy under test -------------------------------------------------------------------
def _file_tls(base: Path) -> tls_pb2.CommonTlsContext:
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


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="tm-rbac-eq-"))
    ca_cert, ca_key = _issue(ec.generate_private_key(ec.SECP256R1()), None, None)
    # a self-signed root: re-sign with its own key
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_cert = (x509.CertificateBuilder().subject_name(_name("test root"))
               .issuer_name(_name("test root")).public_key(ca_key.public_key())
               .serial_number(1).not_valid_before(now - timedelta(minutes=1))
               .not_valid_after(now + timedelta(hours=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
               .sign(ca_key, hashes.SHA256()))
    (base / "root.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(base / "server", *_issue(ca_key, ca_cert, f"spiffe://{TD}/ns/default/sa/echo"))
    for name, uri in CLIENTS.items():
        _write(base / name, *_issue(ca_key, ca_cert, uri))
    app = subprocess.Popen([sys.executable, "-m", "trustmesh.mesh.echo", "--port",
                            str(app_port := free_port())])
    rng = random.Random(20261122)
    sets = []
    inbound = []
    for i in range(SETS):
        docs = [random_policy(rng, f"p{i}-{j}", app_port) for j in range(rng.randint(1, 3))]
        policies = [p for p in load_mesh_resources(yaml.safe_dump_all(docs))
                    if isinstance(p, AuthorizationPolicy)]
        port = free_port()
        inbound.append(InboundPort(app_port, port, "HTTP", "STRICT", http_filters=tuple(
            compile_http_rbac(policies, "default", LABELS, app_port, ROOT_NS))))
        sets.append({"port": port, "policies": policies, "docs": docs})
    plan = SidecarPlan(node_id="default/echo", spiffe_id="unused", address="127.0.0.1",
                       inbound=tuple(inbound))
    listeners = compile_all_listeners(plan)
    for listener in listeners:
        ctx = tls_pb2.DownstreamTlsContext()
        listener.filter_chains[0].transport_socket.typed_config.Unpack(ctx)
        ctx.common_tls_context.CopyFrom(_file_tls(base))
        listener.filter_chains[0].transport_socket.typed_config.Pack(ctx)
    admin = free_port()
    boot = bootstrap_pb2.Bootstrap(
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            listeners=listeners, clusters=compile_clusters(plan)[:1]),
        admin=bootstrap_pb2.Admin(address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=admin))))
    (base / "envoy.json").write_text(json_format.MessageToJson(boot))
    log = open(base / "envoy.log", "wb")  # noqa: SIM115 - closed below
    envoy = subprocess.Popen([envoy_binary(), "-c", str(base / "envoy.json"),
                              "--disable-hot-restart", "--concurrency", "1",
                              "--log-level", "warning"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert envoy.poll() is None, (base / "envoy.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready",  # noqa: S310
                                            timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        yield {"base": base, "sets": sets, "app_port": app_port, "ca": (ca_cert, ca_key)}
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
        app.terminate()
        app.wait(timeout=10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _send(base: Path, client: str, port: int, req: dict[str, Any]) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(base / "root.pem"))
    ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN, not a host name
    ctx.load_cert_chain(str(base / f"{client}.pem"), str(base / f"{client}.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request(req["method"], req["path"], headers={"host": req["host"],
                                                          **req["headers"]})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def test_explain_and_envoy_agree_on_generated_cases(world: dict[str, Any]) -> None:
    rng = random.Random(7)
    checked = allowed = 0
    disagreements = []
    for s in world["sets"]:
        for client, principal in CLIENTS.items():
            for _ in range(REQUESTS_PER_CLIENT):
                req = random_request(rng)
                status, body = _send(world["base"], client, s["port"], req)
                verdict = evaluate(s["policies"], AuthzRequest(
                    source_principal=principal, source_ip="127.0.0.1",
                    destination_namespace="default", destination_labels=LABELS,
                    destination_port=world["app_port"], protocol="HTTP", host=req["host"],
                    method=req["method"], path=req["path"], headers=req["headers"]),
                    root_namespace=ROOT_NS)
                envoy_allowed = status != 403
                if envoy_allowed != verdict.allowed or (status == 403 and
                                                        body != "RBAC: access denied"):
                    disagreements.append((yaml.safe_dump_all(s["docs"]), client, req, status,
                                          verdict.to_json()))
                if envoy_allowed:
                    assert status == 200, (status, body)
                checked += 1
                allowed += envoy_allowed
    assert not disagreements, disagreements[:3]
    # the generator covers both outcomes in earnest
    assert checked == SETS * len(CLIENTS) * REQUESTS_PER_CLIENT
    assert 0.15 * checked < allowed < 0.85 * checked, (allowed, checked)


def test_expired_and_foreign_client_certificates_are_refused(world: dict[str, Any]) -> None:
    """The compiled inbound TLS context (SPIFFE validator) refuses an expired SVID and one
    from a CA outside the bundle, and accepts a current one."""
    base: Path = world["base"]
    ca_cert, ca_key = world["ca"]
    port = world["sets"][0]["port"]
    uri = CLIENTS["one"]
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    expired = (x509.CertificateBuilder().subject_name(_name(uri)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(hours=2))
               .not_valid_after(now - timedelta(minutes=5))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                              False)
               .sign(ca_key, hashes.SHA256()))
    _write(base / "expired", expired, key)
    foreign_ca, foreign_key = _issue(ec.generate_private_key(ec.SECP256R1()), None, None)
    _write(base / "foreign", *_issue(foreign_key, foreign_ca, uri))
    request = {"method": "GET", "path": "/", "host": "echo.local", "headers": {}}
    for who in ("expired", "foreign"):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
            _send(base, who, port, request)
    status, _ = _send(base, "one", port, request)
    assert status in (200, 403)  # a current SVID completes the handshake
