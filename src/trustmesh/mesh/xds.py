"""ADS: the server streams each sidecar its clusters, listeners and routes (xDS v3, SotW).

A thin shell over a :class:`ConfigSource`: the sidecar is known by its
X509-SVID (mutual TLS on the server's agent API port), it must be the
workload its Envoy node ID names, and it receives exactly that workload's
compiled configuration. Versions are content hashes per type, so a change
elsewhere in the mesh pushes nothing to sidecars whose configuration did not
change, and a policy change, which moves only the route configurations that
carry HTTP RBAC, pushes only RDS (the listeners, and the connections they
hold, stay as they are). Clusters and listeners are sent whole (wildcard);
route configurations only by the names Envoy asks for, which it does once it
has accepted the listeners that use them. NACKs are logged and counted; they
never stop other sidecars, and the rejected version is not sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from cryptography import x509
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from trustmesh.errors import InvalidInput, NotFound, PermissionDenied, TrustmeshError
from trustmesh.log import get_logger
from trustmesh.mesh.envoy.compile import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE
from trustmesh.spiffe.svid import spiffe_id_from_certificate

__all__ = ["AdsServer", "ConfigSource", "NodeConfig", "XdsStats"]

log = get_logger("trustmesh.mesh.xds")

# Clusters before listeners (a listener must never point at a cluster Envoy lacks), routes
# last: they are asked for by the listeners.
_PUSH_ORDER = (CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE)
# Types where a request without names asks for everything; for the others (routes) it asks
# for nothing.
_WILDCARD_TYPES = frozenset({CLUSTER_TYPE, LISTENER_TYPE})
_WAKE = object()


@dataclass(frozen=True)
class NodeConfig:
    """What one sidecar gets: resources and a version per type URL."""

    resources: dict[str, tuple[Message, ...]]
    versions: dict[str, str]


class ConfigSource(Protocol):
    generation: int

    async def wait_change(self, seen: int, timeout: float) -> int: ...

    def config_for(self, node_id: str, peer_spiffe_id: str) -> NodeConfig:
        """The node's configuration; PermissionDenied if the peer is not that node."""
        ...


@dataclass
class XdsStats:
    connected: int = 0
    pushes: int = 0
    acks: int = 0
    nacks: int = 0
    last_nack: dict[str, str] = field(default_factory=dict)  # node -> message


@dataclass
class _Subscription:
    names: tuple[str, ...] = ()
    sent_version: str | None = None
    nonce: str = ""
    acked_version: str | None = None
    nacked_version: str | None = None


def _peer_spiffe_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        raise PermissionDenied("ADS needs the sidecar's X509-SVID as client certificate")
    try:
        return str(spiffe_id_from_certificate(x509.load_pem_x509_certificate(pems[0])))
    except InvalidInput as exc:
        raise PermissionDenied(f"the client certificate is not an X509-SVID: {exc}") from None


def _pack(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, source: ConfigSource) -> None:
        self.source = source
        self.stats = XdsStats()
        self._nonces = itertools.count(1)

    async def StreamAggregatedResources(  # noqa: N802
            self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
            context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        try:
            peer = _peer_spiffe_id(context)
        except TrustmeshError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            with contextlib.suppress(Exception):
                async for req in request_iterator:
                    await queue.put(req)
            await queue.put(None)

        async def watch() -> None:
            seen = self.source.generation
            while True:
                now = await self.source.wait_change(seen, 30.0)
                if now != seen:
                    seen = now
                    await queue.put(_WAKE)

        tasks = [asyncio.ensure_future(read()), asyncio.ensure_future(watch())]
        node_id = ""
        subs: dict[str, _Subscription] = {}
        self.stats.connected += 1
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if item is _WAKE:
                    if not node_id:
                        continue
                    config = await self._config(node_id, peer)
                    for type_url in _PUSH_ORDER:
                        sub = subs.get(type_url)
                        if sub is None or not (sub.names or type_url in _WILDCARD_TYPES):
                            continue
                        if config.versions.get(type_url) not in (sub.sent_version,
                                                                 sub.nacked_version):
                            yield self._response(type_url, config, sub)
                    continue
                req: discovery_pb2.DiscoveryRequest = item
                if not node_id:
                    node_id = req.node.id
                    if not node_id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "the first request must carry node.id")
                        return
                    try:
                        await self._config(node_id, peer)
                    except PermissionDenied as exc:
                        log.warning("ADS refused a sidecar", extra={
                            "node": node_id, "peer": peer, "error": str(exc)})
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                        return
                    except NotFound as exc:
                        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
                        return
                    log.info("sidecar connected", extra={"node": node_id, "peer": peer})
                response = await self._on_request(node_id, peer, req, subs)
                if response is not None:
                    yield response
        except TrustmeshError as exc:
            log.warning("ADS stream ended", extra={"node": node_id, "error": str(exc)})
            code = (grpc.StatusCode.PERMISSION_DENIED if isinstance(exc, PermissionDenied)
                    else grpc.StatusCode.NOT_FOUND if isinstance(exc, NotFound)
                    else grpc.StatusCode.INTERNAL)
            await context.abort(code, str(exc))
        finally:
            self.stats.connected -= 1
            for t in tasks:
                t.cancel()

    async def _config(self, node_id: str, peer: str) -> NodeConfig:
        # Compiling a large mesh takes a while; keep the event loop (and the agent API on
        # the same server) responsive meanwhile. Results are cached per mesh revision.
        return await asyncio.get_running_loop().run_in_executor(
            None, self.source.config_for, node_id, peer)

    async def _on_request(self, node_id: str, peer: str, req: discovery_pb2.DiscoveryRequest,
                    subs: dict[str, _Subscription]) -> discovery_pb2.DiscoveryResponse | None:
        type_url = req.type_url
        sub = subs.get(type_url)
        if sub is not None and req.response_nonce:
            if req.response_nonce != sub.nonce:
                return None  # answers an older response; a newer one is on its way
            if req.HasField("error_detail"):
                self.stats.nacks += 1
                sub.nacked_version = sub.sent_version
                self.stats.last_nack[node_id] = req.error_detail.message
                log.warning("sidecar rejected configuration", extra={
                    "node": node_id, "type_url": type_url, "version": sub.sent_version,
                    "error": req.error_detail.message[:2000]})
                return None
            self.stats.acks += 1
            sub.acked_version = req.version_info
            if tuple(req.resource_names) == sub.names:
                return None
        if sub is None:
            sub = subs[type_url] = _Subscription()
        sub.names = tuple(req.resource_names)
        config = await self._config(node_id, peer)
        return self._response(type_url, config, sub)

    def _response(self, type_url: str, config: NodeConfig, sub: _Subscription
                  ) -> discovery_pb2.DiscoveryResponse:
        resources = config.resources.get(type_url, ())
        if sub.names or type_url not in _WILDCARD_TYPES:
            wanted = set(sub.names)
            resources = tuple(r for r in resources if getattr(r, "name", "") in wanted)
        version = config.versions.get(type_url, "0")
        sub.sent_version = version
        sub.nonce = str(next(self._nonces))
        self.stats.pushes += 1
        return discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=sub.nonce,
            resources=[_pack(r) for r in resources])

    async def DeltaAggregatedResources(  # noqa: N802
            self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
            context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "use the state-of-the-world ADS (api_type: GRPC)")
        yield discovery_pb2.DeltaDiscoveryResponse()  # pragma: no cover - never reached


def add_ads_to_server(server: grpc.aio.Server, source: ConfigSource) -> AdsServer:
    ads = AdsServer(source)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    return ads
