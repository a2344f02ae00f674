"""One SDS stream: the xDS request/ACK/NACK exchange (pure), and the grpclib service
driven over a real Unix socket by an in-process client (the caller is this process,
attested by SO_PEERCRED)."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.server import Server
from test_sds_secrets import ROOT, svid

from trustmesh.agent.app import ChangeNotifier
from trustmesh.agent.cache import CachedEntry, SvidCache
from trustmesh.agent.sds import (
    SECRET_TYPE,
    DeltaState,
    RequestKind,
    SecretDiscovery,
    SotwState,
    build_secrets,
)

TD = "example.org"
WEB = f"spiffe://{TD}/web"
DB = f"spiffe://{TD}/db"
SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


# -- state of the world, pure -------------------------------------------------------------
def test_first_request_subscribes_and_its_ack_is_recognised() -> None:
    s = SotwState()
    assert s.on_request(["default"], "", False) is RequestKind.SUBSCRIBE
    s.sent("v1", "1")
    assert s.on_request(["default"], "1", False) is RequestKind.ACK
    assert s.acked_version == "v1"


def test_a_nack_keeps_the_last_good_state() -> None:
    s = SotwState()
    s.on_request(["default"], "", False)
    s.sent("v1", "1")
    s.on_request(["default"], "1", False)
    s.sent("v2", "2")
    assert s.on_request(["default"], "2", True) is RequestKind.NACK
    assert (s.names, s.acked_version) == (("default",), "v1")


def test_a_request_answering_an_older_response_is_stale() -> None:
    s = SotwState()
    s.on_request(["default"], "", False)
    s.sent("v1", "1")
    s.sent("v2", "2")
    assert s.on_request(["default", "ALL"], "1", False) is RequestKind.STALE
    assert s.names == ("default",)


def test_new_names_with_the_current_nonce_subscribe() -> None:
    s = SotwState()
    s.on_request(["default"], "", False)
    s.sent("v1", "1")
    assert s.on_request(["default", "ALL"], "1", False) is RequestKind.SUBSCRIBE
    assert s.names == ("default", "ALL")


def test_a_change_is_pushed_only_when_the_content_changed() -> None:
    s = SotwState()
    assert not s.needs_push("v1")  # nothing asked for yet
    s.on_request(["default"], "", False)
    s.sent("v1", "1")
    assert not s.needs_push("v1")
    assert s.needs_push("v2")


# -- incremental, pure --------------------------------------------------------------------------
def test_delta_sends_each_version_once_and_forgets_unsubscribed_names() -> None:
    secrets = build_secrets(["default", "ROOTCA"], [svid(WEB)], {TD: (ROOT,)}, TD)
    d = DeltaState()
    d.on_request(["default"], [], {})
    assert [u[0] for u in d.updates(secrets)] == ["default"]
    assert d.updates(secrets) == []
    d.on_request(["ROOTCA"], ["default"], {})
    assert [u[0] for u in d.updates(secrets)] == ["ROOTCA"]
    assert "default" not in d.known


def test_delta_reconnect_with_current_versions_gets_nothing_new() -> None:
    secrets = build_secrets(["default"], [svid(WEB)], {TD: (ROOT,)}, TD)
    first = DeltaState()
    first.on_request(["default"], [], {})
    [(_, version, _)] = first.updates(secrets)
    again = DeltaState()
    again.on_request(["default"], [], {"default": version})
    assert again.updates(secrets) == []
    stale = DeltaState()
    stale.on_request(["default"], [], {"default": "old"})
    assert [u[1] for u in stale.updates(secrets)] == [version]


# -- the service over a Unix socket ----------------------------------------------------------
def _agent(spiffe_ids: list[str], issued: bool = True) -> Any:
    cache = SvidCache()
    sel = f"unix:uid:{os.getuid()}"
    entries = [CachedEntry(f"e{i}", sid, f"spiffe://{TD}/node", frozenset({sel}), 60, 60, (),
                           (), "", 1) for i, sid in enumerate(spiffe_ids)]
    cache.apply_changes(entries, [], 1)
    if issued:
        _issue(cache)
    return SimpleNamespace(cache=cache, changes=ChangeNotifier(), roots=(ROOT,),
                           federated_for=lambda tds: {}, current_crls=lambda: (),
                           node=SimpleNamespace(spiffe_id=f"spiffe://{TD}/node"))


def _issue(cache: SvidCache) -> None:
    fresh = []
    for e in cache.entries.values():
        s = svid(e.spiffe_id)
        fresh.append(type(s)(e.id, e.revision, s.spiffe_id, s.key, s.chain))
    cache.store(fresh)


def _serve(agent: Any, body: Callable[[Channel, SecretDiscovery], Awaitable[None]]) -> None:
    async def main() -> None:
        sds = SecretDiscovery(cast(Any, agent))
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "sds.sock")
            server = Server([sds])
            await server.start(path=path)
            channel = Channel(path=path)
            try:
                await asyncio.wait_for(body(channel, sds), 20)
            finally:
                channel.close()
                server.close()
                await server.wait_closed()

    asyncio.run(main())


def _secrets(resp: discovery_pb2.DiscoveryResponse) -> list[secret_pb2.Secret]:
    out = []
    for any_ in resp.resources:
        s = secret_pb2.Secret()
        assert any_.Unpack(s)
        out.append(s)
    return out


def _stream(channel: Channel) -> Any:
    return channel.request(f"{SERVICE}/StreamSecrets", Cardinality.STREAM_STREAM,
                           discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse)


def test_stream_answers_pushes_a_rotation_and_logs_a_nack(
        caplog: pytest.LogCaptureFixture) -> None:
    agent = _agent([WEB])

    async def body(channel: Channel, sds: SecretDiscovery) -> None:
        async with _stream(channel) as stream:
            await stream.send_message(discovery_pb2.DiscoveryRequest(
                resource_names=["default", "ALL"], type_url=SECRET_TYPE))
            first = await stream.recv_message()
            assert first is not None and first.type_url == SECRET_TYPE
            assert [s.name for s in _secrets(first)] == ["default", "ALL"]
            assert sds.open_streams == 1
            # ACK, then a rotation: a new response with a new version and nonce
            await stream.send_message(discovery_pb2.DiscoveryRequest(
                resource_names=["default", "ALL"], version_info=first.version_info,
                response_nonce=first.nonce, type_url=SECRET_TYPE))
            _issue(agent.cache)
            agent.changes.set()
            second = await stream.recv_message()
            assert second is not None
            assert (second.version_info, second.nonce) != (first.version_info, first.nonce)
            assert _secrets(second)[0].tls_certificate != _secrets(first)[0].tls_certificate
            # NACK: logged with the workload's SPIFFE ID, and the stream stays open
            with caplog.at_level(logging.WARNING, logger="trustmesh.agent.sds"):
                await stream.send_message(discovery_pb2.DiscoveryRequest(
                    resource_names=["default", "ALL"], version_info=first.version_info,
                    response_nonce=second.nonce, type_url=SECRET_TYPE,
                    error_detail=status_pb2.Status(code=3, message="bad key")))
                for _ in range(200):  # let the NACK be read before the next change
                    if caplog.records:
                        break
                    await asyncio.sleep(0.01)
                _issue(agent.cache)
                agent.changes.set()
                third = await stream.recv_message()
            assert third is not None and third.nonce != second.nonce
            [nack] = [r for r in caplog.records if "rejected" in r.getMessage()]
            assert nack.levelno == logging.WARNING
            assert WEB in nack.spiffe_id and "bad key" in nack.error  # type: ignore[attr-defined]
            await stream.end()

    _serve(agent, body)


def test_a_change_elsewhere_sends_nothing_new() -> None:
    agent = _agent([WEB])

    async def body(channel: Channel, sds: SecretDiscovery) -> None:
        async with _stream(channel) as stream:
            await stream.send_message(discovery_pb2.DiscoveryRequest(resource_names=["ROOTCA"]))
            first = await stream.recv_message()
            assert first is not None
            _issue(agent.cache)  # the SVID rotates, but this stream only wants the bundle
            agent.changes.set()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.recv_message(), 0.5)
            await stream.cancel()

    _serve(agent, body)


def test_an_identity_waits_for_its_first_svid() -> None:
    agent = _agent([WEB], issued=False)

    async def body(channel: Channel, sds: SecretDiscovery) -> None:
        async with _stream(channel) as stream:
            await stream.send_message(discovery_pb2.DiscoveryRequest(resource_names=[WEB]))
            answer = asyncio.ensure_future(stream.recv_message())
            done, _ = await asyncio.wait({answer}, timeout=0.3)
            assert not done, "nothing to send before the SVID is issued"
            _issue(agent.cache)
            agent.changes.set()
            resp = await answer
            assert resp is not None and [s.name for s in _secrets(resp)] == [WEB]
            await stream.cancel()

    _serve(agent, body)


@pytest.mark.parametrize(("spiffe_ids", "names", "status", "message"), [
    ([], ["default"], Status.PERMISSION_DENIED, "no registration entry matches"),
    ([WEB], [DB], Status.PERMISSION_DENIED, f"not entitled to the identity {DB}"),
    ([WEB], ["spiffe://other.org"], Status.PERMISSION_DENIED, "other.org"),
    ([WEB], ["secret-sauce"], Status.INVALID_ARGUMENT, "unknown SDS resource"),
])
def test_refusals_end_the_stream_with_a_status(spiffe_ids: list[str], names: list[str],
                                               status: Status, message: str) -> None:
    async def body(channel: Channel, sds: SecretDiscovery) -> None:
        with pytest.raises(GRPCError) as err:
            async with _stream(channel) as stream:
                await stream.send_message(discovery_pb2.DiscoveryRequest(resource_names=names))
                await stream.recv_message()
        assert err.value.status is status and message in str(err.value.message)

    _serve(_agent(spiffe_ids), body)


def test_fetch_secrets_answers_once() -> None:
    async def body(channel: Channel, sds: SecretDiscovery) -> None:
        async with channel.request(f"{SERVICE}/FetchSecrets", Cardinality.UNARY_UNARY,
                                   discovery_pb2.DiscoveryRequest,
                                   discovery_pb2.DiscoveryResponse) as stream:
            await stream.send_message(discovery_pb2.DiscoveryRequest(
                resource_names=[DB, "spiffe://example.org"]), end=True)
            resp = await stream.recv_message()
            assert resp is not None
            assert [s.name for s in _secrets(resp)] == [DB, "spiffe://example.org"]

    _serve(_agent([WEB, DB]), body)


def test_delta_stream_sends_versions_and_only_what_changed(
        caplog: pytest.LogCaptureFixture) -> None:
    agent = _agent([WEB])

    async def body(channel: Channel, sds: SecretDiscovery) -> None:
        async with channel.request(f"{SERVICE}/DeltaSecrets", Cardinality.STREAM_STREAM,
                                   discovery_pb2.DeltaDiscoveryRequest,
                                   discovery_pb2.DeltaDiscoveryResponse) as stream:
            await stream.send_message(discovery_pb2.DeltaDiscoveryRequest(
                type_url=SECRET_TYPE, resource_names_subscribe=["default", "ROOTCA"]))
            first = await stream.recv_message()
            assert first is not None
            versions = {r.name: r.version for r in first.resources}
            assert set(versions) == {"default", "ROOTCA"} and all(versions.values())
            await stream.send_message(discovery_pb2.DeltaDiscoveryRequest(
                type_url=SECRET_TYPE, response_nonce=first.nonce))
            _issue(agent.cache)
            agent.changes.set()
            second = await stream.recv_message()
            assert second is not None and second.nonce != first.nonce
            assert [r.name for r in second.resources] == ["default"]  # the bundle is as it was
            assert second.resources[0].version != versions["default"]
            # a NACK is logged and the stream keeps serving
            with caplog.at_level(logging.WARNING, logger="trustmesh.agent.sds"):
                await stream.send_message(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=SECRET_TYPE, response_nonce=second.nonce,
                    error_detail=status_pb2.Status(code=3, message="bad chain")))
                for _ in range(200):  # let the NACK be read before the next change
                    if caplog.records:
                        break
                    await asyncio.sleep(0.01)
                _issue(agent.cache)
                agent.changes.set()
                third = await stream.recv_message()
            assert third is not None and [r.name for r in third.resources] == ["default"]
            [nack] = [r for r in caplog.records if "rejected" in r.getMessage()]
            assert nack.spiffe_id == WEB and nack.nonce == second.nonce  # type: ignore[attr-defined]
            await stream.cancel()

    _serve(agent, body)
