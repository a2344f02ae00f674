"""certificate_builder: every field set at once gives the certificate the chained setters give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.pki.ca import certificate_builder

CA_KEY = ec.generate_private_key(ec.SECP256R1())
LEAF = ec.generate_private_key(ec.SECP256R1()).public_key()
ISSUER = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Issuing CA")])
SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustmesh")])
START = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
EXTENSIONS: list[tuple[x509.ExtensionType, bool]] = [
    (x509.BasicConstraints(ca=False, path_length=None), True),
    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
     False),
    (x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://td/w")]), False),
    (x509.SubjectKeyIdentifier.from_public_key(LEAF), False),
]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_the_same_certificate_as_the_chained_setters() -> None:
    chained = (x509.CertificateBuilder().subject_name(SUBJECT).issuer_name(ISSUER)
               .public_key(LEAF).serial_number(12345).not_valid_before(START)
               .not_valid_after(START + timedelta(hours=1)))
    for ext, critical in EXTENSIONS:
        chained = chained.add_extension(ext, critical=critical)
    ours = certificate_builder(SUBJECT, ISSUER, LEAF, 12345, START, START + timedelta(hours=1),
                               EXTENSIONS)
    # deterministic ECDSA (RFC 6979): equal inputs give byte-for-byte equal certificates
    a = chained.sign(CA_KEY, hashes.SHA256(), ecdsa_deterministic=True)
    b = ours.sign(CA_KEY, hashes.SHA256(), ecdsa_deterministic=True)
    assert der(a) == der(b)
    assert b.not_valid_before_utc == START and b.serial_number == 12345
    # a naive datetime is taken as UTC, as the setters take it
    naive = certificate_builder(SUBJECT, ISSUER, LEAF, 12345, START.replace(tzinfo=None),
                                START + timedelta(hours=1), EXTENSIONS)
    assert der(naive.sign(CA_KEY, hashes.SHA256(), ecdsa_deterministic=True)) == der(a)


@pytest.mark.parametrize("serial", [0, -1, 1 << 159])
def test_a_serial_out_of_rfc5280_range_is_refused(serial: int) -> None:
    with pytest.raises(ValueError, match="serial number"):
        certificate_builder(SUBJECT, ISSUER, LEAF, serial, START, START, EXTENSIONS)


def test_not_before_after_not_after_is_refused() -> None:
    with pytest.raises(ValueError, match="notBefore is after notAfter"):
        certificate_builder(SUBJECT, ISSUER, LEAF, 1, START, START - timedelta(seconds=1),
                            EXTENSIONS)


def test_an_extension_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        certificate_builder(SUBJECT, ISSUER, LEAF, 1, START, START,
                            [*EXTENSIONS, (x509.BasicConstraints(ca=False, path_length=None),
                                           False)])
