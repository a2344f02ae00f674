"""Routes on the ADS stream: HTTP RBAC travels in route configurations (RDS), so a policy
change is a new RDS version and leaves the listeners (LDS) and clusters (CDS) as they were.

The server's own mesh configuration (SQLite) is the source; the ADS servicer is driven in
process with a stand-in for the gRPC context (the sidecar's X509-SVID as peer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.rbac.v3 import rbac_pb2 as rbac
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from trustmesh.mesh.demo import ALLOW_CLIENT, DEFAULT_DENY
from trustmesh.mesh.envoy.compile import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE
from trustmesh.mesh.xds import AdsServer
from trustmesh.pki.ca import build_root, parse_subject
from trustmesh.server.mesh_config import MeshConfigService
from trustmesh.spiffe.ids import SpiffeId
from trustmesh.spiffe.svid import build_x509_svid
from trustmesh.store.datastore import Datastore

TD = "example.org"
ECHO = f"spiffe://{TD}/ns/default/sa/echo"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"
DB = f"spiffe://{TD}/ns/default/sa/db"
REGISTRY = """\
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: echo, namespace: default, labels: {app: echo}}
spec:
  serviceAccount: echo
  ports:
  - {name: http, port: 18080, protocol: HTTP, sidecarPort: 15080}
  - {name: grpc, port: 18081, protocol: GRPC, sidecarPort: 15081}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: db, namespace: default, labels: {app: echo}}
spec:
  serviceAccount: db
  address: 127.0.0.2
  ports:
  - {name: http, port: 18080, protocol: HTTP, sidecarPort: 15080}
  - {name: sql, port: 15432, protocol: TCP, sidecarPort: 25432}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 18080, protocol: HTTP}]
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  serviceAccount: client
  upstreams: [{service: echo, port: 80, localPort: 18000}]
"""


def mesh_service(tmp_path: Path) -> MeshConfigService:
    store = Datastore(f"sqlite:///{tmp_path / 'mesh.sqlite3'}")
    store.migrate()
    mesh = MeshConfigService(store, TD)
    mesh.apply(REGISTRY)
    mesh.reload()
    return mesh


def allow_slot(route: route_pb2.RouteConfiguration) -> http_rbac.RBACPerRoute:
    out = http_rbac.RBACPerRoute()
    assert route.virtual_hosts[0].typed_per_filter_config["trustmesh.rbac.allow"].Unpack(out)
    return out


# -- the compiled configuration per sidecar ----------------------------------------------------
def test_a_policy_change_moves_the_route_version_and_not_the_listener_version(
        tmp_path: Path) -> None:
    mesh = mesh_service(tmp_path)
    before = mesh.config_for("default/echo", ECHO)
    client_before = mesh.config_for("default/client", CLIENT)
    db_before = mesh.config_for("default/db", DB)
    assert [r.name for r in before.resources[ROUTE_TYPE]] == ["inbound|15080", "inbound|15081"]
    assert all(allow_slot(r) == http_rbac.RBACPerRoute() for r in before.resources[ROUTE_TYPE])

    for policy in (DEFAULT_DENY, ALLOW_CLIENT):
        mesh.apply(policy)
        assert mesh.reload()
        after = mesh.config_for("default/echo", ECHO)
        assert after.versions[LISTENER_TYPE] == before.versions[LISTENER_TYPE]
        assert after.resources[LISTENER_TYPE] == before.resources[LISTENER_TYPE]
        assert after.versions[CLUSTER_TYPE] == before.versions[CLUSTER_TYPE]
        assert after.versions[ROUTE_TYPE] != before.versions[ROUTE_TYPE]
        before = after
        # A TCP port keeps network RBAC on its listener, so LDS moves for a sidecar that
        # has one; its HTTP listener stays byte for byte (Envoy leaves it and its
        # connections alone) and the HTTP rules move in RDS.
        db = mesh.config_for("default/db", DB)
        assert db.versions[LISTENER_TYPE] != db_before.versions[LISTENER_TYPE]
        old, new = ({x.name: x for x in c.resources[LISTENER_TYPE]} for c in (db_before, db))
        assert new["inbound|15080"] == old["inbound|15080"]
        assert new["inbound|25432"] != old["inbound|25432"]
        assert db.versions[ROUTE_TYPE] != db_before.versions[ROUTE_TYPE]
        db_before = db
    # both HTTP ports carry the ALLOW rules; the client sidecar (no inbound port) is untouched
    for route in before.resources[ROUTE_TYPE]:
        assert allow_slot(route).rbac.rules.action == rbac.RBAC.ALLOW
        assert list(allow_slot(route).rbac.rules.policies) == ["default/allow-client/rule-0"]
    assert mesh.config_for("default/client", CLIENT).versions == client_before.versions


def test_a_registry_change_still_moves_the_listeners(tmp_path: Path) -> None:
    mesh = mesh_service(tmp_path)
    before = mesh.config_for("default/echo", ECHO)
    mesh.apply(REGISTRY.replace("sidecarPort: 15081", "sidecarPort: 15082"))
    assert mesh.reload()
    after = mesh.config_for("default/echo", ECHO)
    assert after.versions[LISTENER_TYPE] != before.versions[LISTENER_TYPE]
    assert [r.name for r in after.resources[ROUTE_TYPE]] == ["inbound|15080", "inbound|15082"]


# -- the ADS stream -------------------------------------------------------------------------------
class _Aborted(Exception):
    pass


class _Context:
    """What AdsServer reads from grpc.aio's servicer context: the peer certificate."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.aborted: tuple[Any, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.pem]}

    async def abort(self, code: Any, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted(details)


def _svid_pem(spiffe_id: str) -> bytes:
    root_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    root = build_root(root_key, parse_subject("O=test,CN=root"), now - timedelta(minutes=1),
                      timedelta(hours=1))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_x509_svid(SpiffeId.parse(spiffe_id), key.public_key(), root, root_key,
                           now - timedelta(minutes=1), now + timedelta(hours=1),
                           x509.random_serial_number())
    return cert.public_bytes(serialization.Encoding.PEM)


class _Stream:
    """One sidecar's ADS stream: requests in, responses out."""

    def __init__(self, ads: AdsServer, node_id: str, spiffe_id: str) -> None:
        self.node_id = node_id
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.responses: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()
        self.context = _Context(_svid_pem(spiffe_id))
        self.task = asyncio.ensure_future(self._run(ads))

    async def _incoming(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (req := await self.requests.get()) is not None:
            yield req

    async def _run(self, ads: AdsServer) -> None:
        async for resp in ads.StreamAggregatedResources(self._incoming(), self.context):
            await self.responses.put(resp)

    async def ask(self, type_url: str, names: tuple[str, ...] = (), *,
                  answers: discovery_pb2.DiscoveryResponse | None = None,
                  error: str | None = None) -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names))
        req.node.id = self.node_id
        if answers is not None:
            req.response_nonce = answers.nonce
            req.version_info = answers.version_info
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.requests.put(req)

    async def next(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing_more(self, wait: float = 0.3) -> None:
        await asyncio.sleep(wait)
        assert self.responses.empty(), [r.type_url for r in self.responses._queue]  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.requests.put(None)
        await asyncio.wait_for(self.task, 5)


def _names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for packed in resp.resources:
        route = route_pb2.RouteConfiguration()
        assert packed.Unpack(route)
        out.append(route.name)
    return out


def test_ads_sends_routes_by_name_and_a_policy_change_as_rds_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mesh = mesh_service(tmp_path)

    async def scenario() -> None:
        ads = AdsServer(mesh)
        echo = _Stream(ads, "default/echo", ECHO)
        try:
            # Envoy's order: clusters, then listeners, then the routes those listeners name
            await echo.ask(CLUSTER_TYPE)
            cds = await echo.next()
            assert cds.type_url == CLUSTER_TYPE and cds.resources
            await echo.ask(CLUSTER_TYPE, answers=cds)
            await echo.ask(LISTENER_TYPE)
            lds = await echo.next()
            assert lds.type_url == LISTENER_TYPE and len(lds.resources) == 2
            await echo.ask(LISTENER_TYPE, answers=lds)
            await echo.ask(ROUTE_TYPE, ("inbound|15080",))
            rds = await echo.next()
            assert rds.type_url == ROUTE_TYPE and _names(rds) == ["inbound|15080"]
            await echo.ask(ROUTE_TYPE, ("inbound|15080",), answers=rds)
            await echo.nothing_more()
            # the other listener's route joins the subscription (with the ACK, as Envoy does)
            await echo.ask(ROUTE_TYPE, ("inbound|15080", "inbound|15081"), answers=rds)
            rds = await echo.next()
            assert _names(rds) == ["inbound|15080", "inbound|15081"]
            await echo.ask(ROUTE_TYPE, ("inbound|15080", "inbound|15081"), answers=rds)
            await echo.nothing_more()
            pushes, acks = ads.stats.pushes, ads.stats.acks

            # a policy change: a new RDS version and nothing else
            mesh.apply(DEFAULT_DENY)
            await mesh.refresh()
            pushed = await echo.next()
            assert pushed.type_url == ROUTE_TYPE and pushed.version_info != rds.version_info
            assert _names(pushed) == ["inbound|15080", "inbound|15081"]
            route = route_pb2.RouteConfiguration()
            pushed.resources[0].Unpack(route)
            assert allow_slot(route).rbac.rules == rbac.RBAC(action=rbac.RBAC.ALLOW)
            await echo.nothing_more()
            await echo.ask(ROUTE_TYPE, ("inbound|15080", "inbound|15081"), answers=pushed)
            await echo.nothing_more()
            assert (ads.stats.pushes, ads.stats.acks) == (pushes + 1, acks + 1)
        finally:
            await echo.close()

        # a fresh stream: an RDS NACK is logged and counted like any other, and not sent
        # again; a subscription without names gets no routes
        echo = _Stream(ads, "default/echo", ECHO)
        try:
            await echo.ask(ROUTE_TYPE, ("inbound|15081",))
            rds = await echo.next()
            assert _names(rds) == ["inbound|15081"]
            with caplog.at_level(logging.WARNING, logger="trustmesh.mesh.xds"):
                await echo.ask(ROUTE_TYPE, ("inbound|15081",), answers=rds,
                               error="route says no")
                await echo.nothing_more()
            assert ads.stats.nacks == 1
            assert ads.stats.last_nack["default/echo"] == "route says no"
            [record] = [r for r in caplog.records
                        if r.getMessage() == "sidecar rejected configuration"]
            assert record.type_url == ROUTE_TYPE  # type: ignore[attr-defined]
            assert record.version == rds.version_info  # type: ignore[attr-defined]
            # a change elsewhere in the mesh leaves the rejected routes as they are: not resent
            mesh.apply(ALLOW_CLIENT.replace("app: echo", "app: other")
                       .replace("allow-client", "allow-other"))
            await mesh.refresh()
            await echo.nothing_more()
            # no names: routes are not a wildcard type, so nothing is sent
            await echo.ask(ROUTE_TYPE, (), answers=rds)
            empty = await echo.next()
            assert empty.type_url == ROUTE_TYPE and not empty.resources
            mesh.apply(ALLOW_CLIENT)
            await mesh.refresh()
            await echo.nothing_more()  # nothing subscribed, nothing pushed
        finally:
            await echo.close()

    asyncio.run(scenario())
