"""Compile one sidecar's plan into Envoy listeners, routes and clusters (xDS v3 messages).

Pure: a :class:`SidecarPlan` in, protobuf messages out. The plan says what the
sidecar must do (accept mTLS for these ports under these modes and RBAC
rules, offer these upstreams on loopback); this module only knows how Envoy
spells it. Certificates never appear here: every TLS context names SDS
secrets that the node's agent serves (the workload's SVID and the ``ALL``
validation context with the SPIFFE validator).

An inbound HTTP listener does not depend on policy: its connection manager
has the fixed RBAC filters of :func:`~trustmesh.mesh.envoy.rbac.http_rbac_filters`
and takes its routes over RDS (route configuration ``inbound|<sidecarPort>``),
where the policies' RBACPerRoute configs live. A policy change is then a new
route configuration, which Envoy applies to the next request on every open
connection, and never a listener change (which would drain connections and
leave the old filters judging requests on them meanwhile).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.core.v3 import protocol_pb2 as core_protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from trustmesh.mesh.envoy.rbac import HTTP_RBAC_SLOTS, http_rbac_filters

__all__ = [
    "ALL_BUNDLES_SECRET",
    "GATEWAY_CERT_SECRET",
    "GATEWAY_CLIENT_CA_SECRET",
    "GatewayListener",
    "CLUSTER_TYPE",
    "LISTENER_TYPE",
    "ROUTE_TYPE",
    "SDS_CLUSTER",
    "InboundPort",
    "SidecarPlan",
    "Upstream",
    "compile_clusters",
    "compile_listeners",
    "compile_routes",
    "compile_static_listeners",
    "inbound_route_name",
    "resource_version",
    "sds_secret",
]

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS_CLUSTER = "sds-grpc"  # the static cluster of the bootstrap that reaches the agent
ALL_BUNDLES_SECRET = "ALL"  # noqa: S105 - an SDS resource name; the agent's SDS name for every trust bundle (SPIFFE validator)
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})


@dataclass(frozen=True)
class InboundPort:
    """One application port behind the sidecar."""

    port: int  # the application's plaintext port (what policies name)
    sidecar_port: int  # where the sidecar accepts connections for it
    protocol: str  # HTTP | HTTP2 | GRPC | TCP
    mtls_mode: str  # STRICT | PERMISSIVE | DISABLE
    # HTTP ports: (RBAC filter name, RBACPerRoute) from compile_http_rbac; a slot left out
    # is off. They go to the port's route configuration, not to the listener.
    http_rbac: tuple[tuple[str, Message], ...] = ()
    network_filters: tuple[Message, ...] = ()  # RBAC network Filters for TCP ports


@dataclass(frozen=True)
class Upstream:
    """A service port the application reaches through the sidecar on loopback."""

    name: str  # e.g. "echo.default:80"
    local_port: int
    protocol: str
    endpoints: tuple[tuple[str, int], ...]  # the upstream sidecars' (address, port)
    spiffe_ids: tuple[str, ...]  # identities the upstream may present


@dataclass(frozen=True)
class GatewayListener:
    """A port where clients outside the mesh connect with TLS (or mutual TLS)."""

    port: int
    hosts: tuple[str, ...]
    tls_mode: str  # SIMPLE | MUTUAL
    routes: tuple[tuple[str, Upstream], ...]  # (path prefix, upstream) in match order


# Static secrets of a gateway's bootstrap (files given to `trustmesh gateway run`).
GATEWAY_CERT_SECRET = "gateway-server-certificate"  # noqa: S105 - a secret's name
GATEWAY_CLIENT_CA_SECRET = "gateway-client-ca"  # noqa: S105 - a secret's name


@dataclass(frozen=True)
class SidecarPlan:
    node_id: str  # "namespace/name" of the workload
    spiffe_id: str  # the identity this sidecar presents (its SDS secret name)
    address: str  # where the application and its sidecar listen
    inbound: tuple[InboundPort, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    gateways: tuple[GatewayListener, ...] = ()
    sds_cluster: str = SDS_CLUSTER
    extra: dict[str, str] = field(default_factory=dict)  # not compiled; for explanations


def _any(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=host, port_value=port))


def _sds_source(cluster: str) -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        resource_api_version=config_source_pb2.V3,
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            transport_api_version=config_source_pb2.V3,
            set_node_on_first_message_only=True,
            grpc_services=[grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster))]))


def sds_secret(name: str, cluster: str = SDS_CLUSTER) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=_sds_source(cluster))


def _common_tls(plan: SidecarPlan, peer_ids: Sequence[str],
                alpn: Sequence[str] = ()) -> tls_pb2.CommonTlsContext:
    default = common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[
        common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI,
                                         matcher=string_pb2.StringMatcher(exact=i))
        for i in peer_ids])
    return tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(
            tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2),
        tls_certificate_sds_secret_configs=[sds_secret(plan.spiffe_id, plan.sds_cluster)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=default,
            validation_context_sds_secret_config=sds_secret(ALL_BUNDLES_SECRET,
                                                            plan.sds_cluster)),
        alpn_protocols=list(alpn))


def _downstream_tls(plan: SidecarPlan, port: InboundPort) -> base_pb2.TransportSocket:
    alpn = ["h2", "http/1.1"] if port.protocol in HTTP_PROTOCOLS else []
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=_common_tls(plan, (), alpn))
    ctx.require_client_certificate.value = True
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(ctx))


def _router() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                              typed_config=_any(router_pb2.Router()))


def _route(name: str, cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[
        route_components_pb2.VirtualHost(
            name=name, domains=["*"], routes=[route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(
                    cluster=cluster, timeout=duration_pb2.Duration(seconds=0)))])])


def _rds(route_name: str) -> hcm_pb2.Rds:
    return hcm_pb2.Rds(route_config_name=route_name, config_source=(
        config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                       resource_api_version=config_source_pb2.V3)))


def _hcm(stat_prefix: str, route: route_pb2.RouteConfiguration | str,
         http_filters: Sequence[Message], *, inbound_mtls: bool, inbound: bool
         ) -> listener_components_pb2.Filter:
    """A connection manager with ``route`` inline, or taken over RDS when it is a name."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix, codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        http_filters=[*http_filters, _router()])
    if isinstance(route, str):
        manager.rds.CopyFrom(_rds(route))
    else:
        manager.route_config.CopyFrom(route)
    if inbound:
        # Policies see the path Envoy routes on: normalised, slashes merged.
        manager.normalize_path.value = True
        manager.merge_slashes = True
        manager.path_with_escaped_slashes_action = (
            hcm_pb2.HttpConnectionManager.UNESCAPE_AND_REDIRECT)
        if inbound_mtls:
            manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
            manager.set_current_client_cert_details.uri = True
        else:
            manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE
    return listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))


def _tcp_proxy(stat_prefix: str, cluster: str) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(
        name="envoy.filters.network.tcp_proxy",
        typed_config=_any(tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)))


def inbound_cluster_name(port: InboundPort) -> str:
    return f"inbound|{port.port}||"


def outbound_cluster_name(up: Upstream) -> str:
    return f"outbound|{up.name}"


def inbound_route_name(port: InboundPort) -> str:
    """The route configuration of an inbound HTTP port (all its filter chains share it)."""
    return f"inbound|{port.sidecar_port}"


def _inbound_chain(plan: SidecarPlan, port: InboundPort, *, tls: bool
                   ) -> listener_components_pb2.FilterChain:
    cluster = inbound_cluster_name(port)
    prefix = f"inbound_{port.sidecar_port}_{'mtls' if tls else 'plaintext'}"
    if port.protocol in HTTP_PROTOCOLS:
        filters = [_hcm(prefix, inbound_route_name(port), http_rbac_filters(),
                        inbound_mtls=tls, inbound=True)]
    else:
        filters = [*port.network_filters, _tcp_proxy(prefix, cluster)]
    chain = listener_components_pb2.FilterChain(name=prefix, filters=filters)
    if tls:
        chain.transport_socket.CopyFrom(_downstream_tls(plan, port))
    return chain


def _inbound_listener(plan: SidecarPlan, port: InboundPort) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name=f"inbound|{port.sidecar_port}",
                                     address=_address(plan.address, port.sidecar_port))
    mode = port.mtls_mode
    if mode in ("STRICT", "PERMISSIVE"):
        # The TLS inspector reads the SNI (connection.sni conditions, requested_server_name
        # in RBAC) and, on PERMISSIVE ports, tells TLS clients from plaintext ones.
        listener.listener_filters.append(listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.tls_inspector",
            typed_config=_any(tls_inspector_pb2.TlsInspector())))
    if mode == "STRICT":
        listener.filter_chains.append(_inbound_chain(plan, port, tls=True))
    elif mode == "DISABLE":
        listener.filter_chains.append(_inbound_chain(plan, port, tls=False))
    elif mode == "PERMISSIVE":
        # TLS clients get mTLS; plaintext clients get the same app without an identity.
        tls_chain = _inbound_chain(plan, port, tls=True)
        tls_chain.filter_chain_match.transport_protocol = "tls"
        listener.filter_chains.append(tls_chain)
        plain = _inbound_chain(plan, port, tls=False)
        plain.filter_chain_match.transport_protocol = "raw_buffer"
        listener.filter_chains.append(plain)
    else:
        raise ValueError(f"unknown mTLS mode {mode!r}")
    return listener


def _outbound_listener(plan: SidecarPlan, up: Upstream) -> listener_pb2.Listener:
    prefix = f"outbound_{up.local_port}"
    cluster = outbound_cluster_name(up)
    if up.protocol in HTTP_PROTOCOLS:
        filters = [_hcm(prefix, _route(prefix, cluster), (), inbound_mtls=False,
                        inbound=False)]
    else:
        filters = [_tcp_proxy(prefix, cluster)]
    return listener_pb2.Listener(
        name=f"outbound|{up.local_port}", address=_address("127.0.0.1", up.local_port),
        filter_chains=[listener_components_pb2.FilterChain(name=prefix, filters=filters)])


def _gateway_listener(plan: SidecarPlan, gw: GatewayListener) -> listener_pb2.Listener:
    common = tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(
            tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2),
        # no sds_config: the secrets are the static ones of the gateway's bootstrap
        tls_certificate_sds_secret_configs=[secret_pb2.SdsSecretConfig(
            name=GATEWAY_CERT_SECRET)],
        alpn_protocols=["h2", "http/1.1"])
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if gw.tls_mode == "MUTUAL":
        ctx.require_client_certificate.value = True
        ctx.common_tls_context.validation_context_sds_secret_config.CopyFrom(
            secret_pb2.SdsSecretConfig(name=GATEWAY_CLIENT_CA_SECRET))
    prefix = f"gateway_{gw.port}"
    routes = [route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=path),
        route=route_components_pb2.RouteAction(cluster=outbound_cluster_name(up),
                                               timeout=duration_pb2.Duration(seconds=0)))
        for path, up in gw.routes]
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=prefix, codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        strip_any_host_port=True,
        forward_client_cert_details=hcm_pb2.HttpConnectionManager.SANITIZE,
        route_config=route_pb2.RouteConfiguration(name=prefix, virtual_hosts=[
            route_components_pb2.VirtualHost(name=prefix, domains=list(gw.hosts),
                                             routes=routes)]),
        http_filters=[_router()])
    manager.normalize_path.value = True
    manager.merge_slashes = True
    chain = listener_components_pb2.FilterChain(name=prefix, filters=[
        listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                       typed_config=_any(manager))])
    chain.transport_socket.CopyFrom(base_pb2.TransportSocket(
        name="envoy.transport_sockets.tls", typed_config=_any(ctx)))
    return listener_pb2.Listener(name=f"gateway|{gw.port}",
                                 address=_address(plan.address, gw.port),
                                 filter_chains=[chain])


def compile_listeners(plan: SidecarPlan) -> list[listener_pb2.Listener]:
    """Inbound listeners (one per application port), outbound ones (one per upstream) and
    a gateway's TLS listeners."""
    out = [_inbound_listener(plan, p) for p in plan.inbound]
    out += [_outbound_listener(plan, u) for u in plan.upstreams]
    out += [_gateway_listener(plan, g) for g in plan.gateways]
    return out


def _inbound_route(port: InboundPort) -> route_pb2.RouteConfiguration:
    route = _route(inbound_route_name(port), inbound_cluster_name(port))
    configs = dict(port.http_rbac)
    unknown = set(configs) - {slot.name for slot in HTTP_RBAC_SLOTS}
    if unknown:
        raise ValueError(f"no RBAC filter named {sorted(unknown)} on inbound HTTP listeners")
    per_filter = route.virtual_hosts[0].typed_per_filter_config
    for slot in HTTP_RBAC_SLOTS:  # every slot, so that none falls back to its filter's config
        per_filter[slot.name].CopyFrom(_any(configs.get(slot.name,
                                                        http_rbac_pb2.RBACPerRoute())))
    return route


def compile_routes(plan: SidecarPlan) -> list[route_pb2.RouteConfiguration]:
    """The route configuration of each inbound HTTP port, carrying its RBAC (served by RDS)."""
    return [_inbound_route(p) for p in plan.inbound if p.protocol in HTTP_PROTOCOLS]


def compile_static_listeners(plan: SidecarPlan) -> list[listener_pb2.Listener]:
    """The listeners with their RDS route configurations inline, for an Envoy without an
    xDS server (a static bootstrap; ``envoy --mode validate``). Same filters, same routes."""
    routes = {r.name: r for r in compile_routes(plan)}
    listeners = compile_listeners(plan)
    for listener in listeners:
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.name != "envoy.filters.network.http_connection_manager":
                    continue
                manager = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(manager)
                if manager.HasField("rds"):
                    manager.route_config.CopyFrom(routes[manager.rds.route_config_name])
                    f.typed_config.Pack(manager)
    return listeners


def _static_cluster(name: str, endpoints: Sequence[tuple[str, int]]) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=_address(host, port))) for host, port in endpoints])]))


def _http2(cluster: cluster_pb2.Cluster) -> None:
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=core_protocol_pb2.Http2ProtocolOptions()))
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(_any(opts))


def compile_clusters(plan: SidecarPlan) -> list[cluster_pb2.Cluster]:
    """One cluster per application port (plaintext, local) and per upstream (mTLS)."""
    out = []
    for port in plan.inbound:
        c = _static_cluster(inbound_cluster_name(port), [(plan.address, port.port)])
        if port.protocol in ("HTTP2", "GRPC"):
            _http2(c)
        out.append(c)
    upstreams = {u.name: u for u in plan.upstreams}
    for gw in plan.gateways:
        for _, up in gw.routes:
            upstreams.setdefault(up.name, up)
    for up in upstreams.values():
        c = _static_cluster(outbound_cluster_name(up), up.endpoints)
        alpn = ["h2"] if up.protocol in ("HTTP2", "GRPC") else (
            ["http/1.1"] if up.protocol == "HTTP" else [])
        ctx = tls_pb2.UpstreamTlsContext(common_tls_context=_common_tls(plan, up.spiffe_ids,
                                                                        alpn))
        c.transport_socket.CopyFrom(base_pb2.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=_any(ctx)))
        if up.protocol in ("HTTP2", "GRPC"):
            _http2(c)
        out.append(c)
    return out


def resource_version(resources: Sequence[Message]) -> str:
    """A version that changes exactly when the resources do (deterministic bytes)."""
    digest = hashlib.sha256()
    for r in resources:
        digest.update(r.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]
