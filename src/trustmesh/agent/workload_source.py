"""The SPIFFE Workload API on the agent's Unix socket, served from the agent's cache.

grpcio's Python server does not expose the connecting socket, so the kernel's
word about the caller (``SO_PEERCRED``) could not be read there. The Workload
API is therefore served with grpclib (HTTP/2 gRPC in asyncio), whose streams
reach their transport; clients (py-spiffe, go-spiffe, Envoy) see standard gRPC.

Behaviour per the SPIFFE Workload API and Workload Endpoint specifications:
every request must carry ``workload.spiffe.io: true`` (else INVALID_ARGUMENT);
a caller whose selectors match no entry gets PERMISSION_DENIED; streams send
the full state at once and again on every change, and never end with OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.server import Server, Stream

from trustmesh.agent.attest.unix import attest_unix
from trustmesh.agent.cache import CachedSvid
from trustmesh.agent.peer import peer_credentials
from trustmesh.errors import PermissionDenied as TmPermissionDenied
from trustmesh.errors import TrustmeshError
from trustmesh.log import get_logger
from trustmesh.proto import workloadapi_pb2 as pb
from trustmesh.proto.workloadapi_grpc import SpiffeWorkloadAPIBase
from trustmesh.spiffe.bundle import Bundle
from trustmesh.spiffe.ids import SpiffeId

if TYPE_CHECKING:
    from trustmesh.agent.app import Agent

__all__ = ["WorkloadApi", "start_workload_api"]

log = get_logger("trustmesh.agent.workload_api")

_HEADER = "workload.spiffe.io"
_RECHECK = 5.0  # seconds between re-checks of a stream even without a change event
_ALLOWED_ALGS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384",
                 "PS512"]


def _check_header(stream: Stream[Any, Any]) -> None:
    metadata: Any = stream.metadata or {}
    if metadata.get(_HEADER) != "true":
        raise GRPCError(Status.INVALID_ARGUMENT,
                        "security header missing from request: workload.spiffe.io: true")


def _der_chain(svid: CachedSvid) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in svid.chain)


class WorkloadApi(SpiffeWorkloadAPIBase):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._jwt_cache: dict[tuple[str, tuple[str, ...]], tuple[str, float, float]] = {}

    # -- helpers ---------------------------------------------------------------------
    async def _selectors(self, stream: Stream[Any, Any]) -> frozenset[str]:
        _check_header(stream)
        peer = peer_credentials(stream)
        try:
            # A handful of small /proc reads: cheaper inline than a thread hop.
            return attest_unix(peer)
        except TmPermissionDenied as exc:
            raise GRPCError(Status.PERMISSION_DENIED, str(exc)) from None

    def _svids(self, selectors: frozenset[str]) -> list[CachedSvid]:
        return self.agent.cache.svids_for(selectors, time.time())

    def _bundle_der(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.agent.roots)

    def _federated(self, entry_ids: Iterable[str]) -> dict[str, Bundle]:
        """Federated bundles (trust domain name -> bundle) for these entries: only the
        trust domains they federate with."""
        names: set[str] = set()
        for entry_id in entry_ids:
            entry = self.agent.cache.entries.get(entry_id)
            if entry is not None:
                names.update(entry.federates_with)
        return self.agent.federated_for(sorted(names))

    def _federated_der(self, entry_ids: Iterable[str]) -> dict[str, bytes]:
        return {f"spiffe://{td}": b"".join(c.public_bytes(serialization.Encoding.DER)
                                           for c in b.x509_authorities)
                for td, b in self._federated(entry_ids).items() if b.x509_authorities}

    def _trust_domain_id(self) -> str:
        node = self.agent.node
        td = SpiffeId.parse(node.spiffe_id).trust_domain if node else None
        return f"spiffe://{td}" if td else ""

    async def _wait_change(self, generation: int) -> int:
        return await self.agent.changes.wait(generation, _RECHECK)

    # -- X.509 -----------------------------------------------------------------------
    def _x509_response(self, svids: list[CachedSvid]) -> pb.X509SVIDResponse:
        bundle = self._bundle_der()
        out = []
        for s in svids:
            key = s.key.private_bytes(serialization.Encoding.DER,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
            out.append(pb.X509SVID(spiffe_id=s.spiffe_id, x509_svid=_der_chain(s),
                                   x509_svid_key=key, bundle=bundle, hint=s.hint))
        return pb.X509SVIDResponse(
            svids=out, federated_bundles=self._federated_der(s.entry_id for s in svids))

    async def FetchX509SVID(self, stream: Stream[pb.X509SVIDRequest,  # noqa: N802
                                                  pb.X509SVIDResponse]) -> None:
        await stream.recv_message()
        selectors = await self._selectors(stream)
        sent: list[bytes] | None = None
        generation = -1
        while True:
            svids = self._svids(selectors)
            if not svids:
                raise GRPCError(Status.PERMISSION_DENIED,
                                "no identity issued: no registration entry matches this caller")
            federated = self._federated_der(s.entry_id for s in svids)
            fingerprint = [_der_chain(s) for s in svids] + [self._bundle_der()] + [
                td.encode() + b"=" + der for td, der in sorted(federated.items())]
            if fingerprint != sent:
                await stream.send_message(self._x509_response(svids))
                sent = fingerprint
            generation = await self._wait_change(generation)
            selectors = await self._selectors(stream)  # the process may have changed

    async def FetchX509Bundles(self, stream: Stream[pb.X509BundlesRequest,  # noqa: N802
                                                     pb.X509BundlesResponse]) -> None:
        await stream.recv_message()
        selectors = await self._selectors(stream)
        sent: dict[str, bytes] | None = None
        generation = -1
        while True:
            svids = self._svids(selectors)
            if not svids:
                raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
            bundles = {self._trust_domain_id(): self._bundle_der(),
                       **self._federated_der(s.entry_id for s in svids)}
            if bundles != sent:
                await stream.send_message(pb.X509BundlesResponse(bundles=bundles))
                sent = bundles
            generation = await self._wait_change(generation)
            selectors = await self._selectors(stream)

    # -- JWT -----------------------------------------------------------------------------
    async def FetchJWTSVID(self, stream: Stream[pb.JWTSVIDRequest,  # noqa: N802
                                                 pb.JWTSVIDResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        selectors = await self._selectors(stream)
        audience = tuple(sorted({a for a in request.audience if a}))
        if not audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        entries = self.agent.cache.match(selectors)
        if request.spiffe_id:
            entries = [e for e in entries if e.spiffe_id == request.spiffe_id]
            if not entries:
                raise GRPCError(Status.PERMISSION_DENIED,
                                f"no identity {request.spiffe_id} for this caller")
        if not entries:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        out = []
        for entry in entries:
            token = await self._jwt_for(entry.id, audience)
            out.append(pb.JWTSVID(spiffe_id=entry.spiffe_id, svid=token, hint=entry.hint))
        await stream.send_message(pb.JWTSVIDResponse(svids=out))

    async def _jwt_for(self, entry_id: str, audience: tuple[str, ...]) -> str:
        now = time.time()
        cached = self._jwt_cache.get((entry_id, audience))
        if cached is not None and now < cached[1] + (cached[2] - cached[1]) / 2:
            return cached[0]
        node = self.agent.node
        if node is None:
            raise GRPCError(Status.UNAVAILABLE, "the agent has not attested yet")
        try:
            token, expires = await self.agent.client.new_jwt_svid(node, entry_id, list(audience))
        except TrustmeshError as exc:
            raise GRPCError(Status.UNAVAILABLE, f"cannot mint a JWT-SVID: {exc}") from None
        if len(self._jwt_cache) > 10000:
            self._jwt_cache.clear()
        self._jwt_cache[(entry_id, audience)] = (token, now, float(expires))
        return token

    def _jwt_bundles(self, entry_ids: Iterable[str]) -> dict[str, bytes]:
        out = {self._trust_domain_id(): self.agent.jwt_bundle_jwks()}
        for td, b in self._federated(entry_ids).items():
            if b.jwt_authorities:
                out[f"spiffe://{td}"] = b.to_jwks(include_x509=False).encode()
        return out

    async def FetchJWTBundles(self, stream: Stream[pb.JWTBundlesRequest,  # noqa: N802
                                                    pb.JWTBundlesResponse]) -> None:
        await stream.recv_message()
        selectors = await self._selectors(stream)
        sent: dict[str, bytes] | None = None
        generation = -1
        while True:
            entries = self.agent.cache.match(selectors)
            if not self._svids(selectors) and not entries:
                raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
            bundles = self._jwt_bundles(e.id for e in entries)
            if bundles != sent:
                await stream.send_message(pb.JWTBundlesResponse(bundles=bundles))
                sent = bundles
            generation = await self._wait_change(generation)

    async def ValidateJWTSVID(self, stream: Stream[pb.ValidateJWTSVIDRequest,  # noqa: N802
                                                    pb.ValidateJWTSVIDResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        _check_header(stream)
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
        claims = validate_jwt_svid(request.svid, request.audience,
                                   self._jwt_keys(_claimed_trust_domain(request.svid)))
        st = struct_pb2.Struct()
        st.update({k: v for k, v in claims.items()})
        await stream.send_message(pb.ValidateJWTSVIDResponse(spiffe_id=claims["sub"],
                                                             claims=st))

    def _jwt_keys(self, trust_domain: str | None) -> Mapping[str, Any]:
        """The JWT authorities of the token's own trust domain: this one's, or a federated
        one's (a key of one trust domain never vouches for another's subject)."""
        own = self._trust_domain_id().removeprefix("spiffe://")
        if trust_domain is not None and trust_domain != own:
            federated = self.agent.federated.get(trust_domain)
            if federated is None:
                raise GRPCError(Status.INVALID_ARGUMENT,
                                f"no bundle for trust domain {trust_domain}: it is not this "
                                "trust domain and none of this agent's entries federates "
                                "with it")
            return dict(federated.jwt_authorities)
        doc = json.loads(self.agent.jwt_bundle_jwks())
        keys: dict[str, Any] = {}
        for jwk in doc.get("keys", []):
            try:
                keys[jwk["kid"]] = pyjwt.PyJWK.from_dict(jwk).key
            except (KeyError, pyjwt.PyJWKError):
                continue
        return keys


def _claimed_trust_domain(token: str) -> str | None:
    """The trust domain the token's (unverified) subject names, to pick its bundle."""
    try:
        sub = pyjwt.decode(token, options={"verify_signature": False}).get("sub")
        return SpiffeId.parse(sub).trust_domain.name if isinstance(sub, str) else None
    except (pyjwt.PyJWTError, TrustmeshError):
        return None  # validate_jwt_svid says what is wrong with it


def validate_jwt_svid(token: str, audience: str, keys: Mapping[str, Any]) -> dict[str, Any]:
    """Check a JWT-SVID against the trust domain's JWT keys (INVALID_ARGUMENT if it fails)."""
    try:
        header = pyjwt.get_unverified_header(token)
    except pyjwt.PyJWTError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed JWT-SVID: {exc}") from None
    alg = header.get("alg")
    if alg not in _ALLOWED_ALGS:
        raise GRPCError(Status.INVALID_ARGUMENT, f"JWT-SVID algorithm {alg!r} is not allowed")
    if header.get("typ") not in (None, "JWT", "JOSE"):
        raise GRPCError(Status.INVALID_ARGUMENT, f"JWT-SVID type {header.get('typ')!r} "
                        "is not allowed")
    kid = header.get("kid")
    if not kid:
        raise GRPCError(Status.INVALID_ARGUMENT, "JWT-SVID has no key ID (kid)")
    key = keys.get(kid)
    if key is None:
        raise GRPCError(Status.INVALID_ARGUMENT, f"JWT-SVID key {kid!r} is not in the bundle")
    try:
        claims: dict[str, Any] = pyjwt.decode(
            token, key, algorithms=[alg], audience=audience,
            options={"require": ["sub", "aud", "exp"]})
    except pyjwt.PyJWTError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc}") from None
    try:
        SpiffeId.parse(claims["sub"])
    except TrustmeshError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"JWT-SVID subject: {exc}") from None
    return claims


class _Running:
    def __init__(self, server: Server, path: Path) -> None:
        self.server = server
        self.path = path

    async def stop(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def start_workload_api(agent: Agent, path: Path) -> _Running:
    """Serve the Workload API on ``path``. Any local process may connect (the socket is
    0777, its directory 0755); attestation decides what each one gets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.stat().st_uid != os.getuid():
        from trustmesh.errors import ConfigError

        raise ConfigError(f"{path.parent} belongs to another user; refusing to serve the "
                          "Workload API from it")
    os.chmod(path.parent, 0o755)  # noqa: S103 - workloads of every user connect here
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    from trustmesh.agent.sds import SecretDiscovery

    agent.sds = SecretDiscovery(agent)
    server = Server([WorkloadApi(agent), agent.sds])
    await server.start(path=str(path))
    os.chmod(path, 0o777)  # noqa: S103 - attestation, not file modes, decides
    log.info("Workload API listening", extra={"socket": str(path)})
    return _Running(server, path)
