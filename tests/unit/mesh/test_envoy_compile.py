"""The compiled sidecar configuration: shape checks and the real Envoy's own validation.

HTTP RBAC lives in the inbound ports' route configurations (RDS); the listeners do not
change with policy, so a policy change never drains a listener.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac
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
    compile_routes,
    compile_static_listeners,
    resource_version,
)
from trustmesh.mesh.envoy.rbac import compile_http_rbac, compile_network_rbac, http_rbac_filters
from trustmesh.mesh.sidecar import envoy_binary
from trustmesh.policy.mesh_model import AuthorizationPolicy, load_mesh_resources

# One policy of each kind, so that every RBAC slot is filled (and validated by Envoy).
POLICIES = [p for p in load_mesh_resources("""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: default}
spec: {action: AUDIT, rules: [{to: [{operation: {paths: [/audit]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: try-audit, namespace: default, annotations: {istio.io/dry-run: "true"}}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: try-deny, namespace: default, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: try-allow, namespace: default, annotations: {istio.io/dry-run: "true"}}
spec: {action: ALLOW, rules: [{from: [{source: {namespaces: [default]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: default}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin/*]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec: {rules: [{from: [{source: {principals: [example.org/ns/default/sa/api]}}]}]}
""") if isinstance(p, AuthorizationPolicy)]
RBAC_8080 = tuple(compile_http_rbac(POLICIES, "default", {"app": "web"}, 8080,
                                    "istio-system").items())
RBAC_5432 = tuple(compile_network_rbac(POLICIES, "default", {"app": "web"}, 5432,
                                       "istio-system"))

PLAN = SidecarPlan(
    node_id="default/web", spiffe_id="spiffe://example.org/ns/default/sa/web",
    address="127.0.0.1",
    inbound=(InboundPort(8080, 15080, "HTTP", "STRICT", http_rbac=RBAC_8080),
             InboundPort(9090, 15090, "HTTP", "PERMISSIVE", http_rbac=RBAC_8080),
             InboundPort(5432, 15432, "TCP", "DISABLE", network_filters=RBAC_5432)),
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


def _with_http_rbac(plan: SidecarPlan, configs: tuple[tuple[str, object], ...]
                    ) -> SidecarPlan:
    inbound = tuple(dataclasses.replace(p, http_rbac=configs) if p.protocol == "HTTP" else p
                    for p in plan.inbound)
    return dataclasses.replace(plan, inbound=inbound)


def test_inbound_http_listeners_take_routes_over_ads_and_have_fixed_rbac_filters() -> None:
    listeners = {x.name: x for x in compile_listeners(PLAN)}
    for name, port in (("inbound|15080", 15080), ("inbound|15090", 15090)):
        for chain in listeners[name].filter_chains:
            manager = hcm_pb2.HttpConnectionManager()
            chain.filters[0].typed_config.Unpack(manager)
            assert not manager.HasField("route_config")
            assert manager.rds.route_config_name == f"inbound|{port}"
            source = manager.rds.config_source
            assert source.HasField("ads")
            assert source.resource_api_version == config_source_pb2.V3
            assert list(manager.http_filters) == [*http_rbac_filters(),
                                                  manager.http_filters[-1]]
            assert manager.http_filters[-1].name == "envoy.filters.http.router"
    # outbound and gateway listeners keep their (policy-free) routes inline
    for name in ("outbound|28080", "gateway|18443"):
        manager = _hcm(listeners[name])
        assert manager.HasField("route_config") and not manager.HasField("rds")


def test_route_configurations_carry_every_rbac_slot() -> None:
    routes = {r.name: r for r in compile_routes(PLAN)}
    assert list(routes) == ["inbound|15080", "inbound|15090"]  # HTTP ports only
    [vhost] = routes["inbound|15080"].virtual_hosts
    assert vhost.domains == ["*"]
    [route] = vhost.routes
    assert route.match.prefix == "/" and route.route.cluster == "inbound|8080||"
    assert sorted(vhost.typed_per_filter_config) == sorted(f.name for f in http_rbac_filters())
    for name, expected in RBAC_8080:
        got = http_rbac.RBACPerRoute()
        assert vhost.typed_per_filter_config[name].Unpack(got)
        assert got == expected and got.HasField("rbac")  # POLICIES fill every slot
    # no policy: every slot present and empty, which turns each filter off for the route
    [bare] = compile_routes(dataclasses.replace(PLAN, inbound=(
        InboundPort(8080, 15080, "HTTP", "STRICT"),)))
    for packed in bare.virtual_hosts[0].typed_per_filter_config.values():
        got = http_rbac.RBACPerRoute()
        assert packed.Unpack(got) and got == http_rbac.RBACPerRoute()
    with pytest.raises(ValueError, match="no RBAC filter named"):
        compile_routes(_with_http_rbac(PLAN, (("envoy.filters.http.rbac",
                                               http_rbac.RBACPerRoute()),)))


def test_a_policy_change_moves_the_routes_and_not_the_listeners() -> None:
    deny_all = (("trustmesh.rbac.allow", http_rbac.RBACPerRoute(rbac=http_rbac.RBAC(
        rules=rbac.RBAC(action=rbac.RBAC.ALLOW)))),)
    for before, after in ((PLAN, _with_http_rbac(PLAN, deny_all)),
                          (_with_http_rbac(PLAN, ()), PLAN)):
        assert resource_version(compile_listeners(before)) == resource_version(
            compile_listeners(after))
        assert compile_listeners(before) == compile_listeners(after)
        assert resource_version(compile_routes(before)) != resource_version(
            compile_routes(after))
        assert resource_version(compile_clusters(before)) == resource_version(
            compile_clusters(after))


def test_static_listeners_have_the_routes_inline() -> None:
    routes = {r.name: r for r in compile_routes(PLAN)}
    static = {x.name: x for x in compile_static_listeners(PLAN)}
    dynamic = {x.name: x for x in compile_listeners(PLAN)}
    assert list(static) == list(dynamic)
    for chain in static["inbound|15090"].filter_chains:
        manager = hcm_pb2.HttpConnectionManager()
        chain.filters[0].typed_config.Unpack(manager)
        assert not manager.HasField("rds")
        assert manager.route_config == routes["inbound|15090"]
    assert static["outbound|25432"] == dynamic["outbound|25432"]


def test_envoy_accepts_the_compiled_configuration(tmp_path: Path) -> None:
    """Envoy's own validation of the bootstrap plus every compiled listener, route
    configuration (with every RBAC slot filled) and cluster: the listeners as served (RDS
    over the bootstrap's ADS), and the same listeners with the routes inline."""
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
    served = bootstrap_pb2.Bootstrap()
    served.CopyFrom(bootstrap)
    served.static_resources.listeners.extend(compile_listeners(PLAN))
    served.static_resources.clusters.extend(compile_clusters(PLAN))
    inline = bootstrap_pb2.Bootstrap()
    inline.CopyFrom(bootstrap)
    inline.ClearField("dynamic_resources")
    inline.static_resources.listeners.extend(compile_static_listeners(PLAN))
    inline.static_resources.clusters.extend(compile_clusters(PLAN))
    for name, doc in (("bootstrap", bootstrap), ("served", served), ("inline", inline)):
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
