"""The agent API (gRPC over TLS): node attestation, entry sync, SVID signing, bundles.

``Attest`` is the only call served without a client certificate. Every other
call must present a node X509-SVID that chains to this trust domain, names an
agent that is attested and not evicted, and is that agent's current SVID.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from trustmesh.clock import Clock
from trustmesh.errors import (
    InternalError,
    InvalidInput,
    PermissionDenied,
    TrustmeshError,
    Unauthenticated,
)
from trustmesh.log import get_logger
from trustmesh.pki.csr import load_csr
from trustmesh.proto import agent_pb2, agent_pb2_grpc
from trustmesh.server.authority import CertificateAuthority, IssuedCertificate, IssueParams
from trustmesh.server.entries import Entry
from trustmesh.server.entry_cache import EntryCache
from trustmesh.server.issuance import AsyncIssuer, SignItem
from trustmesh.server.jwt_authority import JwtAuthority
from trustmesh.server.registry import Registry
from trustmesh.spiffe.ids import SpiffeId

__all__ = ["AgentApi", "X509PopConfig", "entry_to_proto"]

log = get_logger("trustmesh.server.agent_api")

_STATUS = {
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.ALREADY_EXISTS,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
_MAX_BATCH = 500
_SVID_PARAMS = IssueParams(csr=b"", template="x509-svid")  # SVIDs carry no idempotency key
_DEFAULT_PAGE = 500


def entry_to_proto(e: Entry) -> agent_pb2.Entry:
    return agent_pb2.Entry(
        id=e.id, spiffe_id=str(e.spiffe_id), parent_id=str(e.parent_id),
        selectors=[str(s) for s in e.selectors], x509_svid_ttl=e.x509_svid_ttl,
        jwt_svid_ttl=e.jwt_svid_ttl, dns_names=list(e.dns_names),
        federates_with=[str(t) for t in e.federates_with], admin=e.admin,
        downstream=e.downstream, hint=e.hint, revision=e.revision)


@dataclass(frozen=True)
class X509PopConfig:
    """Node certificates signed by these CAs may attest with x509pop."""

    cas: tuple[x509.Certificate, ...]


class AgentApi(agent_pb2_grpc.AgentServicer):
    def __init__(self, ca: CertificateAuthority, issuer: AsyncIssuer, registry: Registry,
                 cache: EntryCache, clock: Clock, *, agent_svid_ttl: int = 3600,
                 x509pop: X509PopConfig | None = None,
                 jwt: JwtAuthority | None = None) -> None:
        self.ca = ca
        self.issuer = issuer
        self.registry = registry
        self.cache = cache
        self.clock = clock
        self.agent_svid_ttl = agent_svid_ttl
        self.x509pop = x509pop
        self.jwt = jwt
        self.trust_domain = registry.trust_domain
        # (agent ID, registry revision) -> trust domains that agent's entries federate with
        self._federates_with: dict[tuple[str, int], frozenset[str]] = {}
        self._tail_der: dict[tuple[x509.Certificate, ...], list[bytes]] = {}

    # -- helpers -------------------------------------------------------------------
    async def _abort(self, context: grpc.aio.ServicerContext, err: TrustmeshError) -> None:
        await context.abort(_STATUS.get(err.code, grpc.StatusCode.INTERNAL), str(err))

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _caller(self, context: grpc.aio.ServicerContext) -> SpiffeId:
        """The agent behind this call, from its verified client certificate."""
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            raise Unauthenticated("this call needs the agent's X509-SVID as client certificate")
        cert = x509.load_pem_x509_certificate(pems[0])
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise Unauthenticated("the client certificate is not an X509-SVID")
        agent_id = SpiffeId.parse(uris[0])
        if agent_id.trust_domain != self.trust_domain:
            raise PermissionDenied(f"{agent_id} is not in trust domain {self.trust_domain}")
        record = self.registry.store.get_agent(str(agent_id))
        if record is None:
            raise PermissionDenied(f"{agent_id} is not an attested agent")
        if record["banned"]:
            raise PermissionDenied(f"agent {agent_id} was evicted")
        if record["serial"] != format(cert.serial_number, "x"):
            raise PermissionDenied(
                f"this is not the current X509-SVID of {agent_id}; re-attest or renew")
        return agent_id

    def _svid_request(self, spiffe_id: SpiffeId, csr: bytes, ttl: int,
                      dns_names: tuple[str, ...], actor: str
                      ) -> tuple[SignItem, tuple[IssueParams, str]]:
        """What the batcher signs for one X509-SVID: names and subject from the entry."""
        item = SignItem(csr=csr, template="x509-svid", validity_seconds=float(ttl),
                        dns_names=dns_names, uris=(str(spiffe_id),), ip_addresses=(),
                        path_length=None, serial=x509.random_serial_number(),
                        subject=_svid_subject(dns_names), names_from_csr=False)
        return item, (_SVID_PARAMS, actor)

    async def _sign_svid(self, spiffe_id: SpiffeId, csr: bytes, ttl: int,
                         dns_names: tuple[str, ...], actor: str) -> IssuedCertificate:
        item, context = self._svid_request(spiffe_id, csr, ttl, dns_names, actor)
        result = await self.issuer.batcher.submit(item, context)
        if isinstance(result, BaseException):  # pragma: no cover - submit raises instead
            raise result
        assert isinstance(result, IssuedCertificate)
        return result

    # -- Attest ----------------------------------------------------------------------
    async def Attest(self, request_iterator: AsyncIterator[agent_pb2.AttestRequest],  # noqa: N802
                     context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[agent_pb2.AttestResponse]:
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            await self._abort(context, InvalidInput("empty attestation stream"))
            return
        try:
            if first.WhichOneof("step") != "start":
                raise InvalidInput("an attestation starts with an AttestStart message")
            start = first.start
            if not start.csr:
                raise InvalidInput("a CSR for the node SVID is required", field="csr")
            kind = start.attestation_type
            try:
                load_csr(start.csr)  # before a token is spent on a request that cannot succeed
            except TrustmeshError as exc:
                raise InvalidInput(f"node SVID CSR: {exc.message}", field="csr") from None
            if kind == "join_token":
                token = start.payload.decode(errors="replace")
                agent_id = await self._run(self.registry.consume_join_token, token)
            elif kind == "x509pop":
                if self.x509pop is None:
                    raise PermissionDenied("x509pop attestation is not enabled on this server")
                leaf = self._x509pop_verify_chain(start.payload)
                challenge = os.urandom(32)
                yield agent_pb2.AttestResponse(challenge=challenge)
                try:
                    answer = await anext(request_iterator)
                except StopAsyncIteration:
                    raise InvalidInput("the agent left before answering the challenge"
                                       ) from None
                if answer.WhichOneof("step") != "challenge_response":
                    raise InvalidInput("expected the signed challenge")
                _verify_pop(leaf, challenge, answer.challenge_response)
                fp = leaf.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - an identifier
                agent_id = SpiffeId.parse(
                    f"spiffe://{self.trust_domain}/trustmesh/agent/x509pop/{fp}")
            else:
                raise InvalidInput(f"unknown attestation type {kind!r}; "
                                   "use join_token or x509pop")
            record = await self._run(self.registry.store.get_agent, str(agent_id))
            if record is not None and record["banned"]:
                raise PermissionDenied(f"agent {agent_id} was evicted")
            issued = await self._sign_svid(agent_id, start.csr, self.agent_svid_ttl, (),
                                           f"agent:{agent_id}")
            now = int(self.clock.now().timestamp())
            expires = issued.not_after
            await self._run(lambda: self.registry.store.upsert_agent(
                str(agent_id), attestation=kind, serial=issued.serial, expires_at=expires,
                now=now))
            log.info("agent attested", extra={"agent": str(agent_id), "attestation": kind})
            yield agent_pb2.AttestResponse(result=agent_pb2.AttestResult(
                spiffe_id=str(agent_id), svid_chain=self._der_chain(issued), expires_at=expires))
        except TrustmeshError as err:
            log.warning("attestation refused", extra={"reason": str(err)})
            await self._abort(context, err)

    def _x509pop_verify_chain(self, payload: bytes) -> x509.Certificate:
        assert self.x509pop is not None
        try:
            chain = _split_der(payload)
        except ValueError:
            raise InvalidInput("the x509pop payload is not a DER certificate chain") from None
        if not chain:
            raise InvalidInput("the x509pop payload holds no certificate")
        from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

        verifier = (PolicyBuilder().store(Store(list(self.x509pop.cas)))
                    .time(self.clock.now()).build_client_verifier())
        try:
            verifier.verify(chain[0], chain[1:])
        except VerificationError as exc:
            raise PermissionDenied(f"the node certificate does not chain to an x509pop CA: "
                                   f"{exc}") from None
        return chain[0]

    # -- calls that need the node SVID ---------------------------------------------
    async def RenewAgent(self, request: agent_pb2.RenewAgentRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> agent_pb2.RenewAgentResponse:
        try:
            agent_id = await self._run(self._caller, context)
            issued = await self._sign_svid(agent_id, request.csr, self.agent_svid_ttl, (),
                                           f"agent:{agent_id}")
            record = await self._run(self.registry.store.get_agent, str(agent_id))
            expires = issued.not_after
            await self._run(lambda: self.registry.store.upsert_agent(
                str(agent_id), attestation=record["attestation"], serial=issued.serial,
                expires_at=expires, now=int(self.clock.now().timestamp())))
            return agent_pb2.RenewAgentResponse(svid_chain=self._der_chain(issued),
                                                expires_at=expires)
        except TrustmeshError as err:
            await self._abort(context, err)
            raise AssertionError("unreachable") from None

    async def SyncEntries(self, request: agent_pb2.SyncEntriesRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> agent_pb2.SyncEntriesResponse:
        try:
            agent_id = await self._run(self._caller, context)
            await self._run(self.cache.refresh)
            page = request.page_size if 0 < request.page_size <= 5000 else _DEFAULT_PAGE
            changes = self.cache.changes_for_agent(agent_id, max(0, request.since_revision),
                                                   page)
            out = [agent_pb2.EntryChange(id=e.id, entry=entry_to_proto(e))
                   for e in changes.upserts]
            out += [agent_pb2.EntryChange(id=i, removed=True) for i in changes.removed]
            return agent_pb2.SyncEntriesResponse(changes=out, revision=changes.revision,
                                                 more=changes.more)
        except TrustmeshError as err:
            await self._abort(context, err)
            raise AssertionError("unreachable") from None

    async def BatchNewX509SVID(self, request: agent_pb2.BatchNewX509SVIDRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext
                               ) -> agent_pb2.BatchNewX509SVIDResponse:
        try:
            agent_id = await self._run(self._caller, context)
            if len(request.params) > _MAX_BATCH:
                raise InvalidInput(f"at most {_MAX_BATCH} CSRs per batch")
            await self._run(self.cache.refresh)
            authorized = self.cache.authorized_ids(agent_id)
        except TrustmeshError as err:
            await self._abort(context, err)
            raise AssertionError("unreachable") from None

        # One submission for the whole batch: the CSRs are signed together, in as few
        # worker round trips and datastore transactions as the batcher can make them.
        results: list[agent_pb2.SvidResult | None] = [None] * len(request.params)
        requests: list[tuple[SignItem, tuple[IssueParams, str]]] = []
        positions: list[int] = []
        actor = f"agent:{agent_id}"
        for i, p in enumerate(request.params):
            entry = self.cache.get(p.entry_id) if p.entry_id in authorized else None
            if entry is None:
                refusal = PermissionDenied(
                    f"entry {p.entry_id} does not exist or is not this agent's to serve")
                results[i] = agent_pb2.SvidResult(entry_id=p.entry_id, error_code=refusal.code,
                                                  error_message=str(refusal))
                continue
            requests.append(self._svid_request(entry.spiffe_id, p.csr, entry.x509_svid_ttl,
                                               entry.dns_names, actor))
            positions.append(i)
        outcomes = await self.issuer.batcher.submit_many(requests)
        for i, outcome in zip(positions, outcomes, strict=True):
            entry_id = request.params[i].entry_id
            if isinstance(outcome, IssuedCertificate):
                results[i] = agent_pb2.SvidResult(
                    entry_id=entry_id, svid_chain=self._der_chain(outcome),
                    expires_at=outcome.not_after)
            else:
                failure = outcome if isinstance(outcome, TrustmeshError) else InternalError(
                    "internal error while signing; see the server log")
                if not isinstance(outcome, TrustmeshError):
                    log.error("X509-SVID signing failed", extra={"error": repr(outcome)})
                results[i] = agent_pb2.SvidResult(entry_id=entry_id, error_code=failure.code,
                                                  error_message=str(failure))
        return agent_pb2.BatchNewX509SVIDResponse(results=[r for r in results if r is not None])

    def _der_chain(self, issued: IssuedCertificate) -> list[bytes]:
        """An SVID and the intermediates above it, DER, without the root; the CA's part is
        encoded once per CA chain, the leaf is sent as signed."""
        tail = issued.chain_tail[:-1]
        encoded = self._tail_der.get(tail)
        if encoded is None:
            encoded = [c.public_bytes(serialization.Encoding.DER) for c in tail]
            if len(self._tail_der) > 16:  # a few CA chains at most (rotation)
                self._tail_der.clear()
            self._tail_der[tail] = encoded
        return [issued.der, *encoded]

    async def NewJWTSVID(self, request: agent_pb2.NewJWTSVIDRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> agent_pb2.NewJWTSVIDResponse:
        try:
            agent_id = await self._run(self._caller, context)
            if self.jwt is None:
                raise PermissionDenied("this server does not mint JWT-SVIDs")
            audience = [a for a in request.audience if a]
            if not audience:
                raise InvalidInput("a JWT-SVID needs at least one audience", field="audience")
            await self._run(self.cache.refresh)
            entry = (self.cache.get(request.entry_id)
                     if request.entry_id in self.cache.authorized_ids(agent_id) else None)
            if entry is None:
                raise PermissionDenied(f"entry {request.entry_id} does not exist or is not "
                                       "this agent's to serve")
            kid, key = self.jwt.signing_key()
            now = int(self.clock.now().timestamp())
            expires = now + entry.jwt_svid_ttl
            token = mint_jwt(str(entry.spiffe_id), audience, key, kid, now, expires)
            return agent_pb2.NewJWTSVIDResponse(token=token, expires_at=expires)
        except TrustmeshError as err:
            await self._abort(context, err)
            raise AssertionError("unreachable") from None

    def _bundles_for(self, agent_id: SpiffeId) -> agent_pb2.FetchBundlesResponse:
        """This trust domain's bundle, and the federated bundles that the entries this
        agent serves federate with (and no others)."""
        revision = self.cache.refresh()
        key = (str(agent_id), revision)
        wanted = self._federates_with.get(key)
        if wanted is None:  # walk the agent's entries once per registry revision
            wanted = frozenset(td.name for entry_id in self.cache.authorized_ids(agent_id)
                               if (entry := self.cache.get(entry_id)) is not None
                               for td in entry.federates_with)
            if len(self._federates_with) > 10000:
                self._federates_with.clear()
            self._federates_with[key] = wanted
        federated = self.registry.federation.for_trust_domains(wanted) if wanted else {}
        return agent_pb2.FetchBundlesResponse(bundle=self.ca.bundle_jwks(),
                                              federated=federated,
                                              crls=self.ca.revocation_lists())

    async def FetchBundles(self, request: agent_pb2.FetchBundlesRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext
                           ) -> agent_pb2.FetchBundlesResponse:
        try:
            agent_id = await self._run(self._caller, context)
            resp: agent_pb2.FetchBundlesResponse = await self._run(self._bundles_for, agent_id)
            return resp
        except TrustmeshError as err:
            await self._abort(context, err)
            raise AssertionError("unreachable") from None


def mint_jwt(subject: str, audience: list[str], key: Any, kid: str, now: int,
             expires: int) -> str:
    """A JWT-SVID: sub, aud, exp, iat; kid and typ JWT in the header; never alg none."""
    import jwt as pyjwt

    from trustmesh.spiffe.jwt import algorithm_for

    alg = algorithm_for(key)  # ES256/ES384/ES512 by curve (P-521 signs ES512), RS256 for RSA
    claims = {"sub": subject, "aud": audience if len(audience) > 1 else audience[0],
              "exp": expires, "iat": now}
    return pyjwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def _svid_subject(dns_names: tuple[str, ...]) -> str:
    return f"O=trustmesh,CN={dns_names[0]}" if dns_names else "O=trustmesh"


def _split_der(data: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates, in order."""
    out = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise ValueError("not DER")
        length = data[pos + 1]
        header = 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos + 2: pos + 2 + n], "big")
            header += n
        end = pos + header + length
        if end > len(data):
            raise ValueError("truncated")
        out.append(x509.load_der_x509_certificate(data[pos:end]))
        pos = end
    return out


def _verify_pop(leaf: x509.Certificate, challenge: bytes, signature: bytes) -> None:
    """The agent proves it holds the node key by signing the server's challenge."""
    key = leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, challenge, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, challenge,
                       padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                   salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
        else:
            raise PermissionDenied("x509pop supports EC and RSA node keys")
    except PermissionDenied:
        raise
    except Exception:
        raise PermissionDenied("the challenge signature does not verify with the node "
                               "certificate's key") from None
