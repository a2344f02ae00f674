"""The compiled sidecar configuration: shape checks and the real Envoy's own validation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from trustmesh.mesh.envoy.bootstrap import BootstrapParams, build_bootstrap
from trustmesh.mesh.envoy.compile import (
    GatewayListener,
    InboundPort,
    SidecarPlan,
    Upstream,
    compile_clusters,
    compile_listeners,
    resource_version,
)
from trustmesh.mesh.sidecar import envoy_binary

PLAN = SidecarPlan(
    node_id="default/web", spiffe_id="spiffe://example.org/ns/default/sa/web",
    address="127.0.0.1",
    inbound=(InboundPort(8080, 15080, "HTTP", "STRICT"),
             InboundPort(9090, 15090, "HTTP", "PERMISSIVE"),
             InboundPort(5432, 15432, "TCP", "DISABLE")),
    upstreams=(Upstream("db.default:5432", 25432, "TCP", (("127.0.0.1", 16432),),
                        ("spiffe://example.org/ns/default/sa/db",)),
               Upstream("api.default:80", 28080, "HTTP", (("127.0.0.1", 16080),),
                        ("spiffe://example.org/ns/default/sa/api",))),
    gateways=(GatewayListener(18443, ("echo.example.com",), "MUTUAL", (
        ("/api", Upstream("api.default:80", 0, "HTTP", (("127.0.0.1", 16080),),
                          ("spiffe://example.org/ns/default/sa/api",))),)),))


def _hcm(listener: object) -> hcm_pb2.HttpConnectionManager:
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)  # type: ignore[attr-defined]
    return manager


def test_strict_inbound_requires_client_certificates_and_sets_xfcc() -> None:
    listeners = {x.name: x for x in compile_listeners(PLAN)}
    strict = listeners["inbound|15080"]
    assert len(strict.filter_chains) == 1
    ctx = tls_pb2.DownstreamTlsContext()
    strict.filter_chains[0].transport_socket.typed_config.Unpack(ctx)
    assert ctx.require_client_certificate.value is True
    common = ctx.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [PLAN.spiffe_id]
    assert common.combined_validation_context.validation_context_sds_secret_config.name == "ALL"
    manager = _hcm(strict)
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert manager.set_current_client_cert_details.uri is True
    assert manager.normalize_path.value is True


def test_permissive_has_a_tls_and_a_plaintext_chain_and_disable_has_no_tls() -> None:
    listeners = {x.name: x for x in compile_listeners(PLAN)}
    permissive = listeners["inbound|15090"]
    assert [c.filter_chain_match.transport_protocol for c in permissive.filter_chains] == [
        "tls", "raw_buffer"]
    assert permissive.listener_filters[0].name == "envoy.filters.listener.tls_inspector"
    disabled = listeners["inbound|15432"]
    assert not disabled.filter_chains[0].HasField("transport_socket")
    assert disabled.filter_chains[0].filters[-1].name == "envoy.filters.network.tcp_proxy"


def test_upstreams_verify_the_peer_spiffe_id() -> None:
    clusters = {c.name: c for c in compile_clusters(PLAN)}
    up = clusters["outbound|api.default:80"]
    ctx = tls_pb2.UpstreamTlsContext()
    up.transport_socket.typed_config.Unpack(ctx)
    sans = ctx.common_tls_context.combined_validation_context.default_validation_context
    assert [m.matcher.exact for m in sans.match_typed_subject_alt_names] == [
        "spiffe://example.org/ns/default/sa/api"]
    assert "inbound|8080||" in clusters and "inbound|5432||" in clusters


def test_versions_follow_content() -> None:
    a = resource_version(compile_listeners(PLAN))
    assert a == resource_version(compile_listeners(PLAN))
    other = SidecarPlan(node_id=PLAN.node_id, spiffe_id=PLAN.spiffe_id, address=PLAN.address,
                        inbound=PLAN.inbound[:1])
    assert resource_version(compile_listeners(other)) != a


def test_envoy_accepts_the_compiled_configuration(tmp_path: Path) -> None:
    """Envoy's own validation of the bootstrap plus every compiled listener and cluster."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echo.example.com")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "gw.pem").write_bytes(pem)
    (tmp_path / "ca.pem").write_bytes(pem)
    (tmp_path / "gw.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    bootstrap = build_bootstrap(BootstrapParams(
        node_id="default/web", cluster="web", agent_socket=tmp_path / "agent.sock",
        server_host="127.0.0.1", server_port=8081,
        server_spiffe_id="spiffe://example.org/trustmesh/server",
        gateway_cert=tmp_path / "gw.pem", gateway_key=tmp_path / "gw.key",
        gateway_client_ca=tmp_path / "ca.pem"))
    full = bootstrap_pb2.Bootstrap()
    full.CopyFrom(bootstrap)
    full.ClearField("dynamic_resources")
    full.static_resources.listeners.extend(compile_listeners(PLAN))
    full.static_resources.clusters.extend(compile_clusters(PLAN))
    for name, doc in (("bootstrap", bootstrap), ("full", full)):
        path = tmp_path / f"{name}.json"
        path.write_text(json_format.MessageToJson(doc))
        proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                               "--disable-hot-restart"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "OK" in proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", ["BOGUS"])
def test_unknown_modes_are_refused(mode: str) -> None:
    plan = SidecarPlan(node_id="a/b", spiffe_id="spiffe://x/y", address="127.0.0.1",
                       inbound=(InboundPort(1, 2, "HTTP", mode),))
    with pytest.raises(ValueError, match="unknown mTLS mode 'BOGUS'"):
        compile_listeners(plan)


def test_mutual_gateway_requires_client_certificates_from_its_client_ca() -> None:
    [gw] = [x for x in compile_listeners(PLAN) if x.name == "gateway|18443"]
    ctx = tls_pb2.DownstreamTlsContext()
    gw.filter_chains[0].transport_socket.typed_config.Unpack(ctx)
    assert ctx.require_client_certificate.value is True
    common = ctx.common_tls_context
    assert common.validation_context_sds_secret_config.name == "gateway-client-ca"
    assert not common.validation_context_sds_secret_config.HasField("sds_config")  # static
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [
        "gateway-server-certificate"]
    clusters = {c.name for c in compile_clusters(PLAN)}
    assert "outbound|api.default:80" in clusters
