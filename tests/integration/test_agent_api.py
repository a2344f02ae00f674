"""The agent API over real gRPC+TLS: attestation, authorization by node SVID, sync, signing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import ServerProcess, openssl
from trustmesh.proto import agent_pb2, agent_pb2_grpc

SERVER_NAME = "trustmesh-server"


def csr_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


class Node:
    """What an agent holds: a key, and after attestation its X509-SVID chain."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.bundle = httpx.get(f"{srv.base_url}/ca/bundle.pem").content
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.chain: list[x509.Certificate] = []
        self.spiffe_id = ""

    def _channel(self, with_svid: bool) -> grpc.Channel:
        if with_svid:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.bundle,
                private_key=self.key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()),
                certificate_chain=b"".join(c.public_bytes(serialization.Encoding.PEM)
                                           for c in self.chain))
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=self.bundle)
        port = self.srv.agent_port if with_svid else self.srv.attest_port
        return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                   options=[("grpc.ssl_target_name_override", SERVER_NAME)])

    def stub(self, with_svid: bool = True) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self._channel(with_svid))

    def attest_join_token(self, token: str) -> agent_pb2.AttestResult:
        start = agent_pb2.AttestRequest(start=agent_pb2.AttestStart(
            attestation_type="join_token", payload=token.encode(), csr=csr_der(self.key)))
        responses = list(self.stub(with_svid=False).Attest(iter([start]), timeout=30))
        result = responses[-1].result
        self.chain = [x509.load_der_x509_certificate(d) for d in result.svid_chain]
        self.spiffe_id = result.spiffe_id
        return result


@pytest.fixture
def srv(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "memory", "--signing-workers", "0",
                        "--agent-svid-ttl", "10m")


def token(srv: ServerProcess, spiffe_id: str | None = None) -> str:
    args = ["token", "create"] + (["--spiffe-id", spiffe_id] if spiffe_id else [])
    return str(srv.cli_json(*args)["token"])


def test_join_token_attestation_gives_a_node_svid(srv: ServerProcess) -> None:
    node = Node(srv)
    result = node.attest_join_token(token(srv, "spiffe://example.org/node1"))
    assert result.spiffe_id == "spiffe://example.org/node1"
    leaf = node.chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [result.spiffe_id]
    assert leaf.public_key() == node.key.public_key()
    life = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=8) < life <= timedelta(minutes=10)
    agents = srv.cli_json("agent", "list")
    assert [a["spiffe_id"] for a in agents] == ["spiffe://example.org/node1"]
    assert agents[0]["attestation"] == "join_token"


def test_tokens_are_single_use_and_bad_attestations_are_refused(srv: ServerProcess) -> None:
    tok = token(srv)
    Node(srv).attest_join_token(tok)
    with pytest.raises(grpc.RpcError) as info:
        Node(srv).attest_join_token(tok)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        Node(srv).attest_join_token("made-up")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    node = Node(srv)
    bad = agent_pb2.AttestRequest(start=agent_pb2.AttestStart(
        attestation_type="magic", payload=b"x", csr=csr_der(node.key)))
    with pytest.raises(grpc.RpcError) as info:
        list(node.stub(with_svid=False).Attest(iter([bad]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    kept = token(srv)
    garbage_csr = agent_pb2.AttestRequest(start=agent_pb2.AttestStart(
        attestation_type="join_token", payload=kept.encode(), csr=b"not a csr"))
    with pytest.raises(grpc.RpcError) as info:
        list(node.stub(with_svid=False).Attest(iter([garbage_csr]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CSR" in (info.value.details() or "")
    Node(srv).attest_join_token(kept)  # a refused request did not spend the token


def test_calls_without_a_node_svid_are_refused(srv: ServerProcess) -> None:
    node = Node(srv)
    with pytest.raises(grpc.RpcError) as info:
        node.stub(with_svid=False).SyncEntries(agent_pb2.SyncEntriesRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sync_and_sign_only_what_the_agent_may_serve(srv: ServerProcess) -> None:
    node = Node(srv)
    node.attest_join_token(token(srv, "spiffe://example.org/node1"))
    other = Node(srv)
    other.attest_join_token(token(srv, "spiffe://example.org/node2"))
    mine = srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node1",
                        "--spiffe-id", "spiffe://example.org/web", "--selector", "unix:uid:1",
                        "--dns-name", "web.internal", "--x509-svid-ttl", "5m")[0]
    child = srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/web",
                         "--spiffe-id", "spiffe://example.org/web/worker", "--selector",
                         "unix:uid:2")[0]
    theirs = srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node2",
                          "--spiffe-id", "spiffe://example.org/db", "--selector",
                          "unix:uid:3")[0]
    stub = node.stub()
    full = stub.SyncEntries(agent_pb2.SyncEntriesRequest(since_revision=0), timeout=10)
    assert {c.entry.spiffe_id for c in full.changes} == {
        "spiffe://example.org/web", "spiffe://example.org/web/worker"}
    assert not full.more
    again = stub.SyncEntries(agent_pb2.SyncEntriesRequest(since_revision=full.revision),
                             timeout=10)
    assert list(again.changes) == []  # nothing changed: nothing re-sent

    # Moving "web" to node2 takes its child along: both are removed for node1.
    srv.cli_json("entry", "update", mine["id"], "--parent-id", "spiffe://example.org/node2")
    moved = stub.SyncEntries(agent_pb2.SyncEntriesRequest(since_revision=full.revision),
                             timeout=10)
    assert {(c.id, c.removed) for c in moved.changes} == {(mine["id"], True),
                                                          (child["id"], True)}
    srv.cli_json("entry", "update", mine["id"], "--parent-id", "spiffe://example.org/node1")

    key = ec.generate_private_key(ec.SECP256R1())
    batch = stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.SvidParams(entry_id=mine["id"], csr=csr_der(key)),
        agent_pb2.SvidParams(entry_id=theirs["id"], csr=csr_der(key)),
        agent_pb2.SvidParams(entry_id="no-such-entry", csr=csr_der(key)),
    ]), timeout=30)
    ok, denied, missing = batch.results
    assert ok.error_code == "" and len(ok.svid_chain) == 2
    svid = x509.load_der_x509_certificate(ok.svid_chain[0])
    san = svid.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/web"]
    assert san.get_values_for_type(x509.DNSName) == ["web.internal"]
    assert svid.public_key() == key.public_key()
    assert svid.not_valid_after_utc - svid.not_valid_before_utc <= timedelta(minutes=6)
    assert denied.error_code == "permission_denied"
    assert missing.error_code == "permission_denied"
    # The SVID verifies with openssl against the bundle.
    tmp = Path(srv.data_dir.parent)
    (tmp / "svid.pem").write_bytes(svid.public_bytes(serialization.Encoding.PEM))
    (tmp / "svid-inter.pem").write_bytes(ok.svid_chain[1] and x509.load_der_x509_certificate(
        ok.svid_chain[1]).public_bytes(serialization.Encoding.PEM))
    (tmp / "bundle.pem").write_bytes(node.bundle)
    res = openssl("verify", "-CAfile", str(tmp / "bundle.pem"), "-untrusted",
                  str(tmp / "svid-inter.pem"), str(tmp / "svid.pem"))
    assert res.stdout.strip().endswith(": OK")


def test_evicted_and_renewed_away_svids_are_refused(srv: ServerProcess) -> None:
    node = Node(srv)
    node.attest_join_token(token(srv, "spiffe://example.org/node1"))
    old_chain = list(node.chain)
    new_key = ec.generate_private_key(ec.SECP256R1())
    renewed = node.stub().RenewAgent(agent_pb2.RenewAgentRequest(csr=csr_der(new_key)),
                                     timeout=10)
    stale = Node(srv)
    stale.key, stale.chain = node.key, old_chain
    with pytest.raises(grpc.RpcError) as info:
        stale.stub().SyncEntries(agent_pb2.SyncEntriesRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not the current X509-SVID" in (info.value.details() or "")
    node.key = new_key
    node.chain = [x509.load_der_x509_certificate(d) for d in renewed.svid_chain]
    node.stub().SyncEntries(agent_pb2.SyncEntriesRequest(), timeout=10)  # works

    srv.cli_json("agent", "evict", "spiffe://example.org/node1")
    with pytest.raises(grpc.RpcError) as info:
        node.stub().SyncEntries(agent_pb2.SyncEntriesRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "evicted" in (info.value.details() or "")
    # and it cannot come back with a fresh token for the same ID
    with pytest.raises(grpc.RpcError) as info:
        Node(srv).attest_join_token(token(srv, "spiffe://example.org/node1"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def x509pop_ca(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(tmp_path / "pop-ca.key"), "-subj", "/CN=node CA", "-days", "30",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", str(tmp_path / "pop-ca.pem"))
    yield tmp_path / "pop-ca.pem", tmp_path / "pop-ca.key"


def test_x509pop_attestation(start_server: Callable[..., ServerProcess], tmp_path: Path,
                             x509pop_ca: tuple[Path, Path]) -> None:
    ca_pem, ca_key = x509pop_ca
    srv = start_server("--key-manager", "memory", "--signing-workers", "0", "--x509pop-ca",
                       str(ca_pem))
    node_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    now = datetime.now(UTC)
    node_cert = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-7")]))
                 .issuer_name(ca_cert.subject).public_key(node_key.public_key())
                 .serial_number(x509.random_serial_number())
                 .not_valid_before(now - timedelta(minutes=1))
                 .not_valid_after(now + timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                 .add_extension(x509.SubjectAlternativeName([x509.DNSName("node-7")]), False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                     ca_cert.public_key()), False)  # type: ignore[arg-type]
                 .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                False)
                 .sign(signer, hashes.SHA256()))  # type: ignore[arg-type]
    node = Node(srv)
    start = agent_pb2.AttestRequest(start=agent_pb2.AttestStart(
        attestation_type="x509pop", payload=node_cert.public_bytes(serialization.Encoding.DER),
        csr=csr_der(node.key)))
    challenge_box: list[bytes] = []
    ready = threading.Event()

    def requests() -> Iterator[agent_pb2.AttestRequest]:
        yield start
        ready.wait(10)
        yield agent_pb2.AttestRequest(challenge_response=node_key.sign(
            challenge_box[0], ec.ECDSA(hashes.SHA256())))

    result = None
    for resp in node.stub(with_svid=False).Attest(requests(), timeout=30):
        if resp.WhichOneof("step") == "challenge":
            challenge_box.append(resp.challenge)
            ready.set()
        else:
            result = resp.result
    assert result is not None
    fp = node_cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303
    assert result.spiffe_id == f"spiffe://example.org/trustmesh/agent/x509pop/{fp}"

    # A key that does not match the certificate fails the challenge.
    wrong = ec.generate_private_key(ec.SECP256R1())
    box: list[bytes] = []
    ev = threading.Event()

    def bad_requests() -> Iterator[agent_pb2.AttestRequest]:
        yield start
        ev.wait(10)
        yield agent_pb2.AttestRequest(challenge_response=wrong.sign(box[0],
                                                                    ec.ECDSA(hashes.SHA256())))

    with pytest.raises(grpc.RpcError) as info:
        for resp in node.stub(with_svid=False).Attest(bad_requests(), timeout=30):
            box.append(resp.challenge)
            ev.set()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not verify" in (info.value.details() or "")


def test_jwt_svids_need_an_audience_and_an_authorized_entry(srv: ServerProcess) -> None:
    import jwt as pyjwt

    node = Node(srv)
    node.attest_join_token(token(srv, "spiffe://example.org/node1"))
    mine = srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node1",
                        "--spiffe-id", "spiffe://example.org/api", "--selector", "unix:uid:1",
                        "--jwt-svid-ttl", "2m")[0]
    stub = node.stub()
    resp = stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=mine["id"],
                                                       audience=["billing"]), timeout=10)
    header = pyjwt.get_unverified_header(resp.token)
    assert header["alg"] == "ES256" and header["typ"] == "JWT" and header["kid"]
    claims = pyjwt.decode(resp.token, options={"verify_signature": False})
    assert claims["sub"] == "spiffe://example.org/api" and claims["aud"] == "billing"
    assert claims["exp"] - claims["iat"] == 120 == resp.expires_at - claims["iat"]
    with pytest.raises(grpc.RpcError) as info:
        stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=mine["id"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audience" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id="nope", audience=["x"]),
                        timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
