"""The agent's CRLs: kept as the server sends them, handed out only while every one is
current, and the SVIDs they list marked for renewal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.agent.app import Agent
from trustmesh.config import AgentConfig

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=9))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, serials: list[int],
         hours: int) -> bytes:
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
         .last_update(NOW - timedelta(minutes=1)).next_update(NOW + timedelta(hours=hours)))
    for serial in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(NOW).build())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _agent(tmp_path: Path, root: x509.Certificate, clock: list[float]) -> Agent:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    config = AgentConfig(trust_bundle=bundle, data_dir=tmp_path / "data",
                         socket=tmp_path / "api.sock", health_address=None)
    return Agent(config, clock=lambda: clock[0])


def test_crls_are_kept_with_their_revoked_serials_and_a_change_is_announced(
        tmp_path: Path) -> None:
    root, key = _root()
    clock = [NOW.timestamp()]
    agent = _agent(tmp_path, root, clock)
    before = agent.changes.generation
    agent._keep_crls([_crl(root, key, [7, 9], 24)])
    assert agent.changes.generation > before
    assert agent.cache.revoked == {(root.subject.public_bytes(), 7),
                                   (root.subject.public_bytes(), 9)}
    assert len(agent.current_crls()) == 1
    same = agent.changes.generation
    agent._keep_crls([c.public_bytes(serialization.Encoding.DER) for c in agent.crls])
    assert agent.changes.generation == same  # the same CRLs again: nothing to push
    agent._keep_crls([b"not a CRL"])  # unreadable: the ones it had stay
    assert len(agent.crls) == 1


def test_expired_crls_are_withheld_rather_than_refuse_every_chain(tmp_path: Path) -> None:
    root, key = _root()
    clock = [NOW.timestamp()]
    agent = _agent(tmp_path, root, clock)
    agent._keep_crls([_crl(root, key, [], 24), _crl(root, key, [], 1)])
    assert len(agent.current_crls()) == 2
    clock[0] += 2 * 3600  # one of them is past its nextUpdate and was not refreshed
    assert agent.current_crls() == ()
    agent._keep_crls([_crl(root, key, [], 48)])  # a fresh set from the next sync
    assert len(agent.current_crls()) == 1
