"""The CA service with a clock that tests move: CRL refresh, responder rotation, OCSP cache."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from trustmesh.clock import FixedClock
from trustmesh.config import ServerConfig
from trustmesh.errors import Conflict, NotFound
from trustmesh.pki.keys.memory import MemoryKeyManager
from trustmesh.server.authority import CertificateAuthority, IssueParams, normalize_serial
from trustmesh.store.datastore import Datastore


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    config = ServerConfig(data_dir=tmp_path, crl_validity="1h", ocsp_responder_ttl="3h")
    store = Datastore(config.datastore_url)
    store.migrate()
    return CertificateAuthority(config, store, MemoryKeyManager(), FixedClock())


def csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.internal")]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def crl_number(ca: CertificateAuthority) -> int:
    crl = x509.load_der_x509_crl(ca.crl_der(ca.ca_id))
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_crl_is_resigned_after_half_its_validity(ca: CertificateAuthority) -> None:
    clock = ca.clock
    assert isinstance(clock, FixedClock)
    first = crl_number(ca)
    clock.advance(timedelta(minutes=29))
    assert ca.ensure_crl() is False and crl_number(ca) == first
    clock.advance(timedelta(minutes=2))
    assert ca.ensure_crl() is True and crl_number(ca) == first + 1
    crl = x509.load_der_x509_crl(ca.crl_der(ca.ca_id))
    # backdated by the configured skew, as certificates are
    assert crl.last_update_utc == (clock.now() - ca.config.backdate).replace(microsecond=0)
    assert crl.next_update_utc == clock.now().replace(microsecond=0) + ca.config.crl_validity


def test_revocation_resigns_the_crl_at_once(ca: CertificateAuthority) -> None:
    issued = ca.issue(IssueParams(csr=csr(), template="end-entity"), "t")
    before = crl_number(ca)
    ca.revoke(issued.serial, "superseded", "t")
    crl = x509.load_der_x509_crl(ca.crl_der(ca.ca_id))
    assert crl_number(ca) == before + 1
    assert crl.get_revoked_certificate_by_serial_number(int(issued.serial, 16)) is not None
    with pytest.raises(Conflict, match="already revoked"):
        ca.revoke(issued.serial, "superseded", "t")
    with pytest.raises(NotFound):
        ca.revoke("abc123", "superseded", "t")


def test_ocsp_responder_is_rotated_before_it_expires(ca: CertificateAuthority) -> None:
    clock = ca.clock
    assert isinstance(clock, FixedClock)
    first = ca.responder_certificate
    assert ca.rotate_responder_if_due() is False
    clock.advance(timedelta(hours=2, minutes=1))  # past two thirds of 3h
    assert ca.rotate_responder_if_due() is True
    assert ca.responder_certificate.serial_number != first.serial_number
    assert ca.responder_certificate.not_valid_after_utc > first.not_valid_after_utc


def _request(ca: CertificateAuthority, serial_hex: str) -> bytes:
    cert = x509.load_der_x509_certificate(ca.store.get_certificate(serial_hex).der)
    return (ocsp.OCSPRequestBuilder().add_certificate(cert, ca.authority.certificate,
                                                      hashes.SHA256())
            .build().public_bytes(serialization.Encoding.DER))


def test_cached_ocsp_answer_never_hides_a_revocation(ca: CertificateAuthority) -> None:
    issued = ca.issue(IssueParams(csr=csr(), template="end-entity"), "t")
    req = _request(ca, issued.serial)
    first = ca.ocsp(req)
    assert ca.ocsp(req).der == first.der  # nonce-less: the signed answer is reused
    # The datastore changes behind the service's back (another replica revokes).
    ca.store.revoke(issued.serial, at=int(ca.clock.now().timestamp()), reason="key-compromise",
                    actor="replica-2", details={})
    after = ocsp.load_der_ocsp_response(ca.ocsp(req).der)
    assert after.certificate_status == ocsp.OCSPCertStatus.REVOKED


def test_serial_normalisation() -> None:
    assert normalize_serial("0A:1B") == "a1b"
    assert normalize_serial("0x00ff") == "ff"
    with pytest.raises(Exception, match="hexadecimal"):
        normalize_serial("12g")


def test_memory_key_manager_gives_a_new_ca_on_restart(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path)
    store = Datastore(config.datastore_url)
    store.migrate()
    first = CertificateAuthority(config, store, MemoryKeyManager(), FixedClock())
    second = CertificateAuthority(config, store, MemoryKeyManager(), FixedClock())
    assert first.ca_id != second.ca_id
