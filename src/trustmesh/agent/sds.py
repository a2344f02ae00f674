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

Deciding is pure: :func:`build_secrets` turns what a caller is entitled to into
``Secret`` messages, :class:`SotwState` and :class:`DeltaState` follow the xDS
request/ACK/NACK exchange of one stream. The grpclib handlers only attest, feed
them, wait for changes and send. A rotation pushes new secrets on every open
stream; Envoy swaps them in without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
from trustmesh.agent.peer import peer_credentials
from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.log import get_logger
from trustmesh.spiffe.ids import SpiffeId

if TYPE_CHECKING:
    from trustmesh.agent.app import Agent

__all__ = ["ALL_BUNDLES", "DEFAULT_SVID", "ROOT_BUNDLE", "SECRET_TYPE", "DeltaState",
           "RequestKind", "SecretDiscovery", "SotwState", "build_secrets", "secret_version",
           "secrets_version"]

log = get_logger("trustmesh.agent.sds")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
DEFAULT_SVID = "default"
ROOT_BUNDLE = "ROOTCA"
ALL_BUNDLES = "ALL"
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
_RECHECK = 5.0  # seconds between re-checks of a stream even without a change event
_END = object()  # the client closed its side of the stream
_SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


# -- secrets (pure) ----------------------------------------------------------------------
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


def _spiffe_validator(name: str, bundles: Mapping[str, Sequence[x509.Certificate]],
                      crls: Mapping[str, Sequence[x509.CertificateRevocationList]]
                      ) -> secret_pb2.Secret:
    # CRLs go into the trust domain's PEM beside its roots: the validator then checks
    # every certificate of a chain from that trust domain against them.
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(trust_domains=[
        tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
            name=td, trust_bundle=base_pb2.DataSource(inline_bytes=_pem(roots) + b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in crls.get(td, ()))))
        for td, roots in sorted(bundles.items()) if roots])
    packed = any_pb2.Any()
    packed.Pack(config)
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        custom_validator_config=extension_pb2.TypedExtensionConfig(
            name=SPIFFE_VALIDATOR, typed_config=packed)))


def build_secrets(names: Sequence[str], svids: Sequence[CachedSvid],
                  bundles: Mapping[str, Sequence[x509.Certificate]],
                  own_trust_domain: str, pending: Collection[str] = (),
                  crls: Sequence[x509.CertificateRevocationList] = ()
                  ) -> list[secret_pb2.Secret]:
    """The secrets named in an SDS request, in request order, for a caller entitled to
    ``svids`` (issued, default first) and ``bundles`` (trust domain name -> roots).

    ``pending`` holds the SPIFFE IDs the caller is entitled to whose SVID is not issued
    yet: names waiting for one are left out (ask again after the next change). A name the
    caller may not have raises PermissionDenied naming it; a malformed one InvalidInput.
    ``crls`` are the own trust domain's CRLs (all of its CAs' or none), checked by the
    SPIFFE validator (``ALL``).
    """
    out = []
    by_id: dict[str, CachedSvid] = {}
    for s in svids:
        by_id.setdefault(s.spiffe_id, s)
    for name in names:
        if name == DEFAULT_SVID:
            if svids:
                out.append(_tls_certificate(name, svids[0]))
            elif not pending:
                raise PermissionDenied("no identity issued: no registration entry matches "
                                       "this caller")
        elif name == ROOT_BUNDLE:
            out.append(_trusted_ca(name, bundles.get(own_trust_domain, ())))
        elif name == ALL_BUNDLES:
            out.append(_spiffe_validator(name, bundles, {own_trust_domain: crls}))
        elif name.startswith("spiffe://"):
            sid = SpiffeId.parse(name)
            if sid.is_trust_domain_id:
                roots = bundles.get(sid.trust_domain.name)
                if not roots:
                    raise PermissionDenied(f"no bundle for trust domain {sid.trust_domain} "
                                           "for this caller")
                out.append(_trusted_ca(name, roots))
            elif name in by_id:
                out.append(_tls_certificate(name, by_id[name]))
            elif name not in pending:
                raise PermissionDenied(f"this caller is not entitled to the identity {name}")
        else:
            raise InvalidInput(f"unknown SDS resource {name!r}: ask for 'default', "
                               "'ROOTCA', 'ALL', a SPIFFE ID or a trust domain ID")
    return out


def secret_version(secret: secret_pb2.Secret) -> str:
    """A version that changes exactly when the secret's content does."""
    return hashlib.sha256(secret.SerializeToString(deterministic=True)).hexdigest()[:16]


def secrets_version(secrets: Sequence[secret_pb2.Secret]) -> str:
    """The version of a state-of-the-world response holding ``secrets``."""
    digest = hashlib.sha256()
    for s in secrets:
        digest.update(s.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


# -- one stream's protocol state (pure) ------------------------------------------------
class RequestKind(enum.Enum):
    SUBSCRIBE = "subscribe"  # first request or new names: answer it
    ACK = "ack"  # Envoy applied the last response
    NACK = "nack"  # Envoy rejected the last response; keep serving, say so in the log
    STALE = "stale"  # answers a response older than the last one sent: ignore it


@dataclass
class SotwState:
    """What a StreamSecrets (state of the world) stream asked for and was sent."""

    names: tuple[str, ...] = ()
    sent_version: str = ""
    nonce: str = ""
    acked_version: str = ""

    def on_request(self, names: Sequence[str], response_nonce: str, error: bool
                   ) -> RequestKind:
        if response_nonce and response_nonce != self.nonce:
            return RequestKind.STALE
        if response_nonce and error:
            return RequestKind.NACK
        if response_nonce and tuple(names) == self.names:
            self.acked_version = self.sent_version
            return RequestKind.ACK
        self.names = tuple(names)
        return RequestKind.SUBSCRIBE

    def needs_push(self, version: str) -> bool:
        """After a change: push only when what this stream serves is different."""
        return bool(self.names) and version != self.sent_version

    def sent(self, version: str, nonce: str) -> None:
        self.sent_version, self.nonce = version, nonce


@dataclass
class DeltaState:
    """What a DeltaSecrets (incremental) stream subscribes to and which versions it holds."""

    subscribed: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version the client has

    def on_request(self, subscribe: Sequence[str], unsubscribe: Sequence[str],
                   initial_versions: Mapping[str, str]) -> None:
        self.known.update(initial_versions)  # a reconnecting client says what it kept
        self.subscribed |= set(subscribe)
        for name in unsubscribe:
            self.subscribed.discard(name)
            self.known.pop(name, None)

    def updates(self, secrets: Sequence[secret_pb2.Secret]
                ) -> list[tuple[str, str, secret_pb2.Secret]]:
        """(name, version, secret) for each secret the client does not hold yet; from
        then on it counts as held (a NACK is logged, not retried with the same bytes)."""
        out = []
        for s in secrets:
            if s.name not in self.subscribed:
                continue
            version = secret_version(s)
            if self.known.get(s.name) != version:
                self.known[s.name] = version
                out.append((s.name, version, s))
        return out


# -- the gRPC service (IO) -----------------------------------------------------------------
def _pack(secret: secret_pb2.Secret) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(secret)
    return out


@dataclass(frozen=True)
class _Grant:
    """What one attested caller may have right now."""

    svids: list[CachedSvid]
    pending: frozenset[str]
    bundles: dict[str, Sequence[x509.Certificate]]
    trust_domain: str
    crls: Sequence[x509.CertificateRevocationList] = ()

    @property
    def spiffe_ids(self) -> list[str]:
        return [s.spiffe_id for s in self.svids] + sorted(self.pending)

    def secrets(self, names: Sequence[str]) -> list[secret_pb2.Secret]:
        try:
            return build_secrets(names, self.svids, self.bundles, self.trust_domain,
                                 self.pending, self.crls)
        except InvalidInput as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        except PermissionDenied as exc:
            raise GRPCError(Status.PERMISSION_DENIED, str(exc)) from None


class SecretDiscovery:
    """``envoy.service.secret.v3.SecretDiscoveryService`` for grpclib."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.open_streams = 0
        self._nonces = itertools.count(1)

    # -- what the caller may have ----------------------------------------------------
    def _selectors(self, stream: Stream[Any, Any]) -> frozenset[str]:
        try:
            return attest_unix(peer_credentials(stream))
        except PermissionDenied as exc:
            raise GRPCError(Status.PERMISSION_DENIED, str(exc)) from None

    def _bundles(self, federates_with: Iterable[str] = ()) -> dict[str, Sequence[x509.Certificate]]:
        """Trust domain name -> roots: this trust domain's, and the federated ones the
        caller's entries federate with (the SPIFFE validator then accepts their SVIDs)."""
        out: dict[str, Sequence[x509.Certificate]] = {self._own_td(): self.agent.roots}
        for td, bundle in self.agent.federated_for(federates_with).items():
            if bundle.x509_authorities:
                out[td] = bundle.x509_authorities
        return out

    def _own_td(self) -> str:
        node = self.agent.node
        return SpiffeId.parse(node.spiffe_id).trust_domain.name if node else ""

    def _grant(self, selectors: frozenset[str]) -> _Grant:
        entries = self.agent.cache.match(selectors)
        if not entries:
            raise GRPCError(Status.PERMISSION_DENIED,
                            "no identity issued: no registration entry matches this caller")
        svids = self.agent.cache.svids_for(selectors, time.time())
        pending = frozenset(e.spiffe_id for e in entries) - {s.spiffe_id for s in svids}
        federates = sorted({td for e in entries for td in e.federates_with})
        return _Grant(svids, pending, self._bundles(federates), self._own_td(),
                      self.agent.current_crls())

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

    def _log_nack(self, grant: _Grant, names: Sequence[str], message: str,
                  **detail: str) -> None:
        log.warning("Envoy rejected the secrets it was sent", extra={
            "spiffe_id": ",".join(grant.spiffe_ids), "names": ",".join(names), **detail,
            "error": message[:2000]})

    # -- state of the world --------------------------------------------------------------
    async def StreamSecrets(self, stream: Stream[discovery_pb2.DiscoveryRequest,  # noqa: N802
                                                 discovery_pb2.DiscoveryResponse]) -> None:
        selectors = self._selectors(stream)
        state = SotwState()
        async for req in self._events(stream):
            if req is None:
                selectors = self._selectors(stream)  # the process may have changed
                answer = False
            else:
                kind = state.on_request(req.resource_names, req.response_nonce,
                                        req.HasField("error_detail"))
                if kind is RequestKind.NACK:
                    self._log_nack(self._grant(selectors), state.names,
                                   req.error_detail.message, version=state.sent_version)
                if kind is not RequestKind.SUBSCRIBE:
                    continue
                answer = True
            if not state.names:
                continue
            secrets = self._grant(selectors).secrets(state.names)
            if len(secrets) < len(state.names):
                continue  # an SVID is not issued yet; its arrival is a change
            version = secrets_version(secrets)
            if not answer and not state.needs_push(version):
                continue
            nonce = str(next(self._nonces))
            await stream.send_message(discovery_pb2.DiscoveryResponse(
                version_info=version, type_url=SECRET_TYPE, nonce=nonce,
                resources=[_pack(s) for s in secrets]))
            state.sent(version, nonce)

    async def FetchSecrets(self, stream: Stream[discovery_pb2.DiscoveryRequest,  # noqa: N802
                                                discovery_pb2.DiscoveryResponse]) -> None:
        req = await stream.recv_message()
        assert req is not None
        names = tuple(req.resource_names)
        secrets = self._grant(self._selectors(stream)).secrets(names)
        if len(secrets) < len(names):
            raise GRPCError(Status.UNAVAILABLE, "an SVID named in the request is not issued "
                            "yet; try again shortly")
        await stream.send_message(discovery_pb2.DiscoveryResponse(
            version_info=secrets_version(secrets), type_url=SECRET_TYPE,
            nonce=str(next(self._nonces)), resources=[_pack(s) for s in secrets]))

    # -- incremental -----------------------------------------------------------------------
    async def DeltaSecrets(self, stream: Stream[discovery_pb2.DeltaDiscoveryRequest,  # noqa: N802
                                                discovery_pb2.DeltaDiscoveryResponse]) -> None:
        selectors = self._selectors(stream)
        state = DeltaState()
        async for req in self._events(stream):
            if req is None:
                selectors = self._selectors(stream)
            else:
                if req.HasField("error_detail"):
                    self._log_nack(self._grant(selectors), sorted(state.subscribed),
                                   req.error_detail.message, nonce=req.response_nonce)
                    continue
                state.on_request(req.resource_names_subscribe, req.resource_names_unsubscribe,
                                 req.initial_resource_versions)
            grant = self._grant(selectors)
            secrets = grant.secrets(sorted(state.subscribed))
            updates = state.updates(secrets)
            if not updates:
                continue
            await stream.send_message(discovery_pb2.DeltaDiscoveryResponse(
                type_url=SECRET_TYPE, nonce=str(next(self._nonces)),
                system_version_info=secrets_version(secrets),
                resources=[discovery_pb2.Resource(name=name, version=version,
                                                  resource=_pack(secret))
                           for name, version, secret in updates]))

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
