"""The responder writes signed OCSP responses itself: they must be what the library writes."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.pki.crl import RevocationReason
from trustmesh.pki.ocsp import CertificateStatus, OcspResponder, ResponderIdentity, Status

NOW = datetime(2030, 1, 1, 12, 30, 45, 123456, tzinfo=UTC)
VALIDITY = timedelta(hours=1)


def _cert(name: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
          issuer: x509.Certificate | None = None,
          issuer_key: ec.EllipticCurvePrivateKey | None = None, *, ca: bool = False,
          serial: int | None = None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(serial or x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1))
               .not_valid_after(NOW + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    signer = issuer_key or key
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    return builder.sign(signer, hashes.SHA256())


CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA = _cert("test CA", CA_KEY, ca=True)


def _responder(curve: ec.EllipticCurve) -> tuple[OcspResponder, ResponderIdentity]:
    key = ec.generate_private_key(curve)
    ident = ResponderIdentity("ca1", CA, _cert("responder", key, CA, CA_KEY), key)
    return OcspResponder([ident], VALIDITY), ident


def _request(serial: int, algorithm: hashes.HashAlgorithm, nonce: bytes | None) -> bytes:
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("leaf", leaf_key, CA, CA_KEY, serial=serial)
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, CA, algorithm)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _generalized_time(when: datetime) -> bytes:
    return b"\x18\x0f" + when.strftime("%Y%m%d%H%M%SZ").encode()


def _library_response(ident: ResponderIdentity, request_der: bytes,
                      status: CertificateStatus) -> ocsp.OCSPResponse:
    req = ocsp.load_der_ocsp_request(request_der)
    cert_status = {Status.GOOD: ocsp.OCSPCertStatus.GOOD,
                   Status.REVOKED: ocsp.OCSPCertStatus.REVOKED,
                   Status.UNKNOWN: ocsp.OCSPCertStatus.UNKNOWN}[status.status]
    reason = (status.reason.flag if status.reason not in (None, RevocationReason.UNSPECIFIED)
              and status.reason is not None else None)
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=req.issuer_name_hash, issuer_key_hash=req.issuer_key_hash,
        serial_number=req.serial_number, algorithm=req.hash_algorithm,
        cert_status=cert_status, this_update=NOW, next_update=NOW + VALIDITY,
        revocation_time=status.revoked_at, revocation_reason=reason,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ident.responder_certificate
                   ).certificates([ident.responder_certificate])
    for ext in req.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    key = ident.responder_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    digest = hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
    return builder.sign(key, digest)


REVOKED_AT = datetime(2029, 12, 31, 8, 0, 0, tzinfo=UTC)
STATUSES = [
    CertificateStatus(Status.GOOD),
    CertificateStatus(Status.UNKNOWN),
    CertificateStatus(Status.REVOKED, REVOKED_AT, RevocationReason.UNSPECIFIED),
    CertificateStatus(Status.REVOKED, REVOKED_AT, RevocationReason.KEY_COMPROMISE),
    CertificateStatus(Status.REVOKED, REVOKED_AT, RevocationReason.AA_COMPROMISE),
    CertificateStatus(Status.REVOKED, REVOKED_AT, RevocationReason.CERTIFICATE_HOLD),
]


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA256(), hashes.SHA384(),  # noqa: S303
                                       hashes.SHA512()], ids=lambda a: a.name)
@pytest.mark.parametrize("nonce", [None, os.urandom(16), os.urandom(32)],
                         ids=["no-nonce", "nonce16", "nonce32"])
def test_signed_response_is_the_librarys_encoding_byte_for_byte(
        curve: ec.EllipticCurve, algorithm: hashes.HashAlgorithm,
        nonce: bytes | None) -> None:
    responder, ident = _responder(curve)
    for serial in (1, 0x7F, 0x80, 0xFF00, x509.random_serial_number()):
        request = _request(serial, algorithm, nonce)
        for status in STATUSES:
            ours_der = responder.respond(request, lambda *_, s=status: s, NOW).der
            ours = ocsp.load_der_ocsp_response(ours_der)
            theirs = _library_response(ident, request, status)
            # the library stamps producedAt with the wall clock; ours is `now`
            theirs_tbs = theirs.tbs_response_bytes.replace(
                _generalized_time(theirs.produced_at_utc), _generalized_time(
                    NOW.replace(microsecond=0)))
            assert ours.tbs_response_bytes == theirs_tbs, (serial, status)
            assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
            assert ours.certificates == theirs.certificates == [ident.responder_certificate]
            assert ours.responder_key_hash == theirs.responder_key_hash
            key = ident.responder_key.public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey)
            assert ours.signature_hash_algorithm is not None
            key.verify(ours.signature, ours.tbs_response_bytes,
                       ec.ECDSA(ours.signature_hash_algorithm))
            # nothing but the response: the DER ends where the structure ends
            assert ours.public_bytes(serialization.Encoding.DER) == ours_der


def test_rsa_responder_key_is_signed_by_the_library() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ident = ResponderIdentity("ca1", CA, _cert("rsa responder", key, CA, CA_KEY), key)
    responder = OcspResponder([ident], VALIDITY)
    request = _request(42, hashes.SHA256(), os.urandom(16))
    good = CertificateStatus(Status.GOOD)
    resp = ocsp.load_der_ocsp_response(responder.respond(request, lambda *_: good, NOW).der)
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    public = key.public_key()
    assert resp.signature_hash_algorithm is not None
    from cryptography.hazmat.primitives.asymmetric import padding

    public.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(),
                  resp.signature_hash_algorithm)
