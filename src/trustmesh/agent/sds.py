"""Envoy SDS on the agent's socket: SVIDs and trust bundles for sidecars and gateways.

Served next to the Workload API (same Unix socket, same grpclib server) and
attested the same way: the kernel names the calling Envoy (``SO_PEERCRED``),
its selectors pick the entries it may serve. Envoy does not send the Workload
API's security header, so SDS does not ask for it.

Resource names (the contract SPIRE's SDS established, so its Envoy configs work):

- ``default``: the caller's default X509-SVID (the first of its identities);
- ``spiffe://td/path``: that X509-SVID, if the caller is entitled to it;
- ``ROOTCA``: the agent's trust domain bundle as ``trusted_ca``;
- ``ALL``: every bundle the caller may see, for Envoy's SPIFFE certificate
  validator (one trust domain per bundle);
- ``spiffe://td``: that trust domain's bundle as ``trusted_ca``.

Responses are built by :func:`build_secrets` (pure); the stream handlers only
attest, wait for changes and send. A rotation pushes new secrets on every open
stream; Envoy swaps them in without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Stream

from trustmesh.agent.attest.unix import attest_unix
from trustmesh.agent.cache import CachedSvid
from trustmesh.errors import PermissionDenied, TrustmeshError
from trustmesh.log import get_logger

if TYPE_CHECKING:
    from trustmesh.agent.app import Agent

__all__ = ["SECRET_TYPE", "SecretDiscovery", "build_secrets", "secrets_version"]

log = get_logger("trustmesh.agent.sds")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
DEFAULT_SVID = "default"
ROOT_BUNDLE = "ROOTCA"
ALL_BUNDLES = "ALL"
_RECHECK = 5.0
_END = object()  # the client closed its side of the stream
_SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _tls_certificate(name: str, svid: CachedSvid) -> secret_pb2.Secret:
    key = svid.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=_pem(svid.chain)),
        private_key=base_pb2.DataSource(inline_bytes=key)))


def _trusted_ca(name: str, roots: Sequence[x509.Certificate]) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=_pem(roots))))


def _spiffe_validator(name: str, bundles: Mapping[str, Sequence[x509.Certificate]]
                      ) -> secret_pb2.Secret:
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(trust_domains=[
        tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
            name=td, trust_bundle=base_pb2.DataSource(inline_bytes=_pem(roots)))
        for td, roots in sorted(bundles.items()) if roots])
    packed = any_pb2.Any()
    packed.Pack(config)
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        custom_validator_config=extension_pb2.TypedExtensionConfig(
            name="envoy.tls.cert_validator.spiffe", typed_config=packed)))


def build_secrets(names: Sequence[str], svids: Sequence[CachedSvid],
                  bundles: Mapping[str, Sequence[x509.Certificate]],
                  own_trust_domain: str) -> list[secret_pb2.Secret]:
    """The secrets named in an SDS request, for a caller entitled to ``svids`` and
    ``bundles`` (trust domain name -> roots). PermissionDenied names what it may not
    have."""
    out = []
    by_id: dict[str, CachedSvid] = {}
    for s in svids:
        by_id.setdefault(s.spiffe_id, s)
    for name in names:
        if name == DEFAULT_SVID:
            if not svids:
                raise PermissionDenied("no identity issued: no registration entry matches "
                                       "this caller")
            out.append(_tls_certificate(name, svids[0]))
        elif name == ROOT_BUNDLE:
            out.append(_trusted_ca(name, bundles.get(own_trust_domain, ())))
        elif name == ALL_BUNDLES:
            out.append(_spiffe_validator(name, bundles))
        elif name.startswith("spiffe://"):
            rest = name[len("spiffe://"):]
            td, _, path = rest.partition("/")
            if not path:
                if td not in bundles:
                    raise PermissionDenied(f"no bundle for trust domain {td} for this caller")
                out.append(_trusted_ca(name, bundles[td]))
            elif name in by_id:
                out.append(_tls_certificate(name, by_id[name]))
            else:
                raise PermissionDenied(f"this caller is not entitled to the identity {name}")
        else:
            raise PermissionDenied(f"unknown SDS resource {name!r}: ask for 'default', "
                                   "'ROOTCA', 'ALL', a SPIFFE ID or a trust domain ID")
    return out


def secrets_version(secrets: Sequence[secret_pb2.Secret]) -> str:
    digest = hashlib.sha256()
    for s in secrets:
        digest.update(s.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


def _secret_version(secret: secret_pb2.Secret) -> str:
    return hashlib.sha256(secret.SerializeToString(deterministic=True)).hexdigest()[:16]


def _pack(secret: secret_pb2.Secret) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(secret)
    return out


class SecretDiscovery:
    """``envoy.service.secret.v3.SecretDiscoveryService`` for grpclib."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.open_streams = 0
        self._nonces = itertools.count(1)

    # -- what the caller may have ----------------------------------------------------
    def _selectors(self, stream: Stream[Any, Any]) -> frozenset[str]:
        from trustmesh.agent.workload_source import _peer

        try:
            return attest_unix(_peer(stream))
        except PermissionDenied as exc:
            raise GRPCError(Status.PERMISSION_DENIED, str(exc)) from None

    def _bundles(self) -> dict[str, Sequence[x509.Certificate]]:
        return {self._own_td(): self.agent.roots}

    def _own_td(self) -> str:
        node = self.agent.node
        if node is None:
            return ""
        return node.spiffe_id[len("spiffe://"):].split("/", 1)[0]

    def _secrets(self, selectors: frozenset[str], names: Sequence[str]
                 ) -> list[secret_pb2.Secret]:
        svids = self.agent.cache.svids_for(selectors, time.time())
        if not svids and not self.agent.cache.match(selectors):
            raise GRPCError(Status.PERMISSION_DENIED,
                            "no identity issued: no registration entry matches this caller")
        try:
            return build_secrets(names, svids, self._bundles(), self._own_td())
        except TrustmeshError as exc:
            raise GRPCError(Status.PERMISSION_DENIED, str(exc)) from None

    # -- stream plumbing -------------------------------------------------------------------
    async def _events(self, stream: Stream[Any, Any]) -> AsyncIterator[Any | None]:
        """The stream's requests as they come, and ``None`` whenever what the agent serves
        may have changed (or every few seconds), until the client goes away."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            with contextlib.suppress(Exception):
                async for req in stream:
                    await queue.put(req)
            await queue.put(_END)

        reader = asyncio.ensure_future(read())
        generation = self.agent.changes.generation
        self.open_streams += 1
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                changed = asyncio.ensure_future(self.agent.changes.wait(generation, _RECHECK))
                done, _ = await asyncio.wait({getter, changed},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    changed.cancel()
                    req = getter.result()
                    if req is _END:
                        return
                    yield req
                else:
                    getter.cancel()
                    generation = changed.result()
                    yield None
        finally:
            self.open_streams -= 1
            reader.cancel()

    # -- state of the world --------------------------------------------------------------
    async def StreamSecrets(self, stream: Stream[discovery_pb2.DiscoveryRequest,  # noqa: N802
                                                 discovery_pb2.DiscoveryResponse]) -> None:
        selectors = self._selectors(stream)
        names: tuple[str, ...] = ()
        sent_version = ""
        nonce = ""
        async for req in self._events(stream):
            if req is not None:
                if req.response_nonce and req.response_nonce != nonce:
                    continue  # answers an older response
                if req.HasField("error_detail"):
                    log.warning("Envoy rejected secrets", extra={
                        "names": list(names), "version": sent_version,
                        "error": req.error_detail.message[:2000]})
                    continue
                if req.response_nonce and tuple(req.resource_names) == names:
                    continue  # ACK
                names = tuple(req.resource_names)
            else:
                selectors = self._selectors(stream)  # the process may have changed
            if not names:
                continue
            secrets = self._secrets(selectors, names)
            version = secrets_version(secrets)
            if version == sent_version and req is None:
                continue  # a change elsewhere; nothing new for this stream
            sent_version = version
            nonce = str(next(self._nonces))
            await stream.send_message(discovery_pb2.DiscoveryResponse(
                version_info=version, type_url=SECRET_TYPE, nonce=nonce,
                resources=[_pack(s) for s in secrets]))

    async def FetchSecrets(self, stream: Stream[discovery_pb2.DiscoveryRequest,  # noqa: N802
                                                discovery_pb2.DiscoveryResponse]) -> None:
        req = await stream.recv_message()
        assert req is not None
        secrets = self._secrets(self._selectors(stream), tuple(req.resource_names))
        await stream.send_message(discovery_pb2.DiscoveryResponse(
            version_info=secrets_version(secrets), type_url=SECRET_TYPE,
            nonce=str(next(self._nonces)), resources=[_pack(s) for s in secrets]))

    # -- incremental -----------------------------------------------------------------------
    async def DeltaSecrets(self, stream: Stream[discovery_pb2.DeltaDiscoveryRequest,  # noqa: N802
                                                discovery_pb2.DeltaDiscoveryResponse]) -> None:
        selectors = self._selectors(stream)
        subscribed: set[str] = set()
        known: dict[str, str] = {}  # name -> version the client has
        async for req in self._events(stream):
            if req is not None:
                if req.HasField("error_detail"):
                    log.warning("Envoy rejected secrets (delta)", extra={
                        "error": req.error_detail.message[:2000]})
                    continue
                for name, version in req.initial_resource_versions.items():
                    known[name] = version
                subscribed |= set(req.resource_names_subscribe)
                for name in req.resource_names_unsubscribe:
                    subscribed.discard(name)
                    known.pop(name, None)
            else:
                selectors = self._selectors(stream)
            secrets = self._secrets(selectors, sorted(subscribed))
            fresh = []
            for s in secrets:
                v = _secret_version(s)
                if known.get(s.name) != v:
                    known[s.name] = v
                    fresh.append(discovery_pb2.Resource(name=s.name, version=v,
                                                        resource=_pack(s)))
            if not fresh:
                continue
            await stream.send_message(discovery_pb2.DeltaDiscoveryResponse(
                type_url=SECRET_TYPE, nonce=str(next(self._nonces)), resources=fresh,
                system_version_info=secrets_version(secrets)))

    def __mapping__(self) -> dict[str, Handler]:
        return {
            f"{_SERVICE}/StreamSecrets": Handler(
                self.StreamSecrets, Cardinality.STREAM_STREAM,
                discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse),
            f"{_SERVICE}/DeltaSecrets": Handler(
                self.DeltaSecrets, Cardinality.STREAM_STREAM,
                discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse),
            f"{_SERVICE}/FetchSecrets": Handler(
                self.FetchSecrets, Cardinality.UNARY_UNARY,
                discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse),
        }
