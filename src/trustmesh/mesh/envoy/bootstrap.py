"""The Envoy bootstrap of a trustmesh sidecar or gateway.

Two static clusters and nothing else: ``sds-grpc`` reaches the node's agent on
its Unix socket (certificates and trust bundles), ``xds-grpc`` reaches the
server's ADS over mutual TLS with the SVID the agent served. Listeners,
routes and clusters for traffic all come over ADS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.core.v3 import protocol_pb2 as core_protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, json_format

from trustmesh.mesh.envoy.compile import (
    GATEWAY_CERT_SECRET,
    GATEWAY_CLIENT_CA_SECRET,
    SDS_CLUSTER,
    sds_secret,
)

__all__ = ["XDS_CLUSTER", "BootstrapParams", "build_bootstrap", "bootstrap_json"]

XDS_CLUSTER = "xds-grpc"
ROOT_BUNDLE_SECRET = "ROOTCA"  # noqa: S105 - an SDS resource name: this trust domain's roots


@dataclass(frozen=True)
class BootstrapParams:
    node_id: str  # "namespace/name" of the workload
    cluster: str  # Envoy's service cluster (the workload's service account)
    agent_socket: Path
    server_host: str
    server_port: int
    server_spiffe_id: str  # the xDS server must present exactly this identity
    svid_name: str = "default"  # the SDS secret with this sidecar's X509-SVID
    admin_address: str = "127.0.0.1"
    admin_port: int = 0  # 0: the kernel picks a port (read it from --admin-address-path)
    # A gateway's own TLS certificate for outside clients, and the CA its clients' (MUTUAL)
    # certificates must chain to: PEM files the Envoy process reads.
    gateway_cert: Path | None = None
    gateway_key: Path | None = None
    gateway_client_ca: Path | None = None


def _any(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _http2_options() -> dict[str, any_pb2.Any]:
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=core_protocol_pb2.Http2ProtocolOptions()))
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(opts)}


def build_bootstrap(p: BootstrapParams) -> bootstrap_pb2.Bootstrap:
    sds = cluster_pb2.Cluster(
        name=SDS_CLUSTER, type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        typed_extension_protocol_options=_http2_options(),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=SDS_CLUSTER, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(pipe=address_pb2.Pipe(
                        path=str(p.agent_socket)))))])]))
    tls = tls_pb2.UpstreamTlsContext(
        sni="trustmesh-server",
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2"],  # gRPC servers insist on it
            tls_certificate_sds_secret_configs=[sds_secret(p.svid_name)],
            combined_validation_context=(
                tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                    default_validation_context=common_pb2.CertificateValidationContext(
                        match_typed_subject_alt_names=[common_pb2.SubjectAltNameMatcher(
                            san_type=common_pb2.SubjectAltNameMatcher.URI,
                            matcher=string_pb2.StringMatcher(exact=p.server_spiffe_id))]),
                    validation_context_sds_secret_config=sds_secret(ROOT_BUNDLE_SECRET)))))
    xds = cluster_pb2.Cluster(
        name=XDS_CLUSTER, type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=2),
        typed_extension_protocol_options=_http2_options(),
        transport_socket=base_pb2.TransportSocket(name="envoy.transport_sockets.tls",
                                                  typed_config=_any(tls)),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=XDS_CLUSTER, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
                        address=p.server_host, port_value=p.server_port))))])]))
    secrets = []
    if p.gateway_cert is not None and p.gateway_key is not None:
        secrets.append(secret_pb2.Secret(name=GATEWAY_CERT_SECRET, tls_certificate=(
            common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(filename=str(p.gateway_cert)),
                private_key=base_pb2.DataSource(filename=str(p.gateway_key))))))
    if p.gateway_client_ca is not None:
        trusted = common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(filename=str(p.gateway_client_ca)))
        secrets.append(secret_pb2.Secret(name=GATEWAY_CLIENT_CA_SECRET,
                                         validation_context=trusted))
    ads_source = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                                resource_api_version=config_source_pb2.V3)
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=p.node_id, cluster=p.cluster),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(clusters=[sds, xds],
                                                                 secrets=secrets),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=config_source_pb2.ApiConfigSource.GRPC,
                transport_api_version=config_source_pb2.V3,
                set_node_on_first_message_only=True,
                grpc_services=[grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                        cluster_name=XDS_CLUSTER))]),
            cds_config=ads_source, lds_config=ads_source),
        admin=bootstrap_pb2.Admin(address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=p.admin_address,
                                                      port_value=p.admin_port))))


def bootstrap_json(p: BootstrapParams) -> str:
    """The bootstrap as the JSON Envoy reads with ``-c``."""
    return str(json_format.MessageToJson(build_bootstrap(p), indent=1))
