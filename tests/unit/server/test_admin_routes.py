"""Every admin API route has an RBAC permission, and client certificates map to callers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.clock import FixedClock
from trustmesh.config import ServerConfig
from trustmesh.pki.keys.memory import MemoryKeyManager
from trustmesh.server.admin_api import (
    ROUTE_PERMISSIONS,
    build_admin_app,
    remote_caller_from_certificate,
)
from trustmesh.server.authority import CertificateAuthority
from trustmesh.server.issuance import AsyncIssuer
from trustmesh.server.metrics import ServerMetrics
from trustmesh.server.registry import Registry
from trustmesh.spiffe.ids import TrustDomain
from trustmesh.store.datastore import Datastore


def test_every_route_is_mapped_to_an_rbac_permission(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path)
    store = Datastore(config.datastore_url)
    store.migrate()
    ca = CertificateAuthority(config, store, MemoryKeyManager(), FixedClock())
    app = build_admin_app(ca, ServerMetrics(), AsyncIssuer(ca, 0),
                          Registry(store, TrustDomain.parse("example.org"), FixedClock()))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    assert routes == set(ROUTE_PERMISSIONS), routes ^ set(ROUTE_PERMISSIONS)


def _cert(subject: x509.Name, uris: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
         .public_key(key.public_key()).serial_number(1).not_valid_before(now)
         .not_valid_after(now + timedelta(hours=1)))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return b.sign(key, hashes.SHA256())


def test_user_certificates_use_cn_and_o_like_kubernetes() -> None:
    cert = _cert(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustmesh:admins"),
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ops"),
                            x509.NameAttribute(NameOID.COMMON_NAME, "alice")]), [])
    caller = remote_caller_from_certificate(cert)
    assert (caller.user, caller.groups, caller.local) == ("alice", ("trustmesh:admins", "ops"),
                                                          False)


def test_svids_are_callers_by_spiffe_id() -> None:
    cert = _cert(x509.Name([]), ["spiffe://example.org/ci/deployer"])
    assert remote_caller_from_certificate(cert).user == "spiffe://example.org/ci/deployer"
