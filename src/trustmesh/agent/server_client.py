"""The agent's side of the agent API: attest, renew, sync entries, get SVIDs signed.

Every call after attestation runs over mutual TLS with the node's current
X509-SVID; the server's certificate must chain to the trust bundle and name
the server (DNS ``trustmesh-server`` in its X509-SVID).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.errors import (
    InvalidInput,
    PermissionDenied,
    TrustmeshError,
    Unauthenticated,
    Unavailable,
)
from trustmesh.proto import agent_pb2, agent_pb2_grpc

__all__ = ["NodeCredentials", "ServerClient", "make_csr"]

SERVER_NAME = "trustmesh-server"
_TIMEOUT = 30.0


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A DER CSR carrying only the public key: the server decides the names."""
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


@dataclass(frozen=True)
class NodeCredentials:
    spiffe_id: str
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first, without the root
    # when the agent got it: notBefore is backdated by the server's clock skew allowance,
    # so half of notBefore..notAfter can be gone (or more) the moment it arrives
    received_at: float | None = None

    @property
    def expires_at(self) -> float:
        return self.chain[0].not_valid_after_utc.timestamp()

    @property
    def issued_at(self) -> float:
        return self.chain[0].not_valid_before_utc.timestamp()

    @property
    def lifetime_start(self) -> float:
        """Where the lifetime that renewal halves begins: receipt, not the backdated
        notBefore."""
        if self.received_at is None:
            return self.issued_at
        return max(self.issued_at, min(self.received_at, self.expires_at))


def _map_error(exc: grpc.aio.AioRpcError) -> TrustmeshError:
    code = exc.code()
    details = exc.details() or str(code)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details)
    return Unavailable(f"server call failed ({code.name}): {details}")


class ServerClient:
    def __init__(self, server_address: str, attest_address: str, bundle_pem: bytes) -> None:
        self.server_address = server_address
        self.attest_address = attest_address
        self.bundle_pem = bundle_pem
        self._channel: grpc.aio.Channel | None = None
        self._channel_for: str | None = None

    def update_trust(self, bundle_pem: bytes) -> None:
        """Trust these roots for the server from the next call on (the CA rotated)."""
        if bundle_pem != self.bundle_pem:
            self.bundle_pem = bundle_pem
            self._channel_for = None  # the next call opens a channel with the new roots

    def _options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", SERVER_NAME),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024)]

    def _stub(self, creds: NodeCredentials) -> agent_pb2_grpc.AgentStub:
        serial = format(creds.chain[0].serial_number, "x")
        if self._channel is None or self._channel_for != serial:
            if self._channel is not None:
                old = self._channel
                asyncio.get_running_loop().create_task(old.close(grace=5))
            tls = grpc.ssl_channel_credentials(
                root_certificates=self.bundle_pem,
                private_key=creds.key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()),
                certificate_chain=b"".join(c.public_bytes(serialization.Encoding.PEM)
                                           for c in creds.chain))
            self._channel = grpc.aio.secure_channel(self.server_address, tls, self._options())
            self._channel_for = serial
        return agent_pb2_grpc.AgentStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def attest_join_token(self, token: str) -> NodeCredentials:
        key = ec.generate_private_key(ec.SECP256R1())
        start = agent_pb2.AttestRequest(start=agent_pb2.AttestStart(
            attestation_type="join_token", payload=token.encode(), csr=make_csr(key)))
        return await self._attest(key, [start], None)

    async def attest_x509pop(self, chain_der: bytes, node_key: ec.EllipticCurvePrivateKey
                             ) -> NodeCredentials:
        key = ec.generate_private_key(ec.SECP256R1())
        start = agent_pb2.AttestRequest(start=agent_pb2.AttestStart(
            attestation_type="x509pop", payload=chain_der, csr=make_csr(key)))
        return await self._attest(key, [start], node_key)

    async def _attest(self, key: ec.EllipticCurvePrivateKey,
                      first: Sequence[agent_pb2.AttestRequest],
                      pop_key: ec.EllipticCurvePrivateKey | None) -> NodeCredentials:
        tls = grpc.ssl_channel_credentials(root_certificates=self.bundle_pem)
        queue: asyncio.Queue[agent_pb2.AttestRequest | None] = asyncio.Queue()
        for msg in first:
            queue.put_nowait(msg)

        async def requests() -> AsyncIterator[agent_pb2.AttestRequest]:
            while True:
                msg = await queue.get()
                if msg is None:
                    return
                yield msg

        async with grpc.aio.secure_channel(self.attest_address, tls, self._options()) as ch:
            call = agent_pb2_grpc.AgentStub(ch).Attest(requests(), timeout=_TIMEOUT)
            try:
                async for resp in call:
                    if resp.WhichOneof("step") == "challenge":
                        if pop_key is None:
                            raise InvalidInput("the server sent an unexpected challenge")
                        sig = pop_key.sign(resp.challenge, ec.ECDSA(hashes.SHA256()))
                        queue.put_nowait(agent_pb2.AttestRequest(challenge_response=sig))
                    else:
                        queue.put_nowait(None)
                        result = resp.result
                        chain = tuple(x509.load_der_x509_certificate(d)
                                      for d in result.svid_chain)
                        return NodeCredentials(result.spiffe_id, key, chain)
            except grpc.aio.AioRpcError as exc:
                raise _map_error(exc) from None
        raise Unavailable("the server ended attestation without a result")

    async def renew(self, creds: NodeCredentials) -> NodeCredentials:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            resp = await self._stub(creds).RenewAgent(
                agent_pb2.RenewAgentRequest(csr=make_csr(key)), timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc) from None
        chain = tuple(x509.load_der_x509_certificate(d) for d in resp.svid_chain)
        return NodeCredentials(creds.spiffe_id, key, chain)

    async def sync_entries(self, creds: NodeCredentials, since: int, page_size: int = 500
                           ) -> agent_pb2.SyncEntriesResponse:
        try:
            resp: agent_pb2.SyncEntriesResponse = await self._stub(creds).SyncEntries(
                agent_pb2.SyncEntriesRequest(since_revision=since, page_size=page_size),
                timeout=_TIMEOUT)
            return resp
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc) from None

    async def sign_svids(self, creds: NodeCredentials,
                         params: Sequence[tuple[str, bytes]]
                         ) -> list[agent_pb2.SvidResult]:
        try:
            resp = await self._stub(creds).BatchNewX509SVID(
                agent_pb2.BatchNewX509SVIDRequest(params=[
                    agent_pb2.SvidParams(entry_id=e, csr=c) for e, c in params]),
                timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc) from None
        return list(resp.results)

    async def new_jwt_svid(self, creds: NodeCredentials, entry_id: str,
                           audience: Sequence[str]) -> tuple[str, int]:
        try:
            resp = await self._stub(creds).NewJWTSVID(
                agent_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=list(audience)),
                timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc) from None
        return resp.token, int(resp.expires_at)

    async def fetch_bundle(self, creds: NodeCredentials
                           ) -> tuple[bytes, dict[str, bytes], list[bytes]]:
        """This trust domain's SPIFFE bundle, the federated ones (trust domain name ->
        SPIFFE bundle) that this agent's entries federate with, and this trust domain's
        CRLs (DER; all of its CAs' or none)."""
        try:
            resp = await self._stub(creds).FetchBundles(agent_pb2.FetchBundlesRequest(),
                                                        timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc) from None
        return (bytes(resp.bundle), {td: bytes(b) for td, b in resp.federated.items()},
                [bytes(c) for c in resp.crls])
