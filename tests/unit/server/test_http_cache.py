"""HTTP caching of OCSP answers (RFC 5019 6.2) and CRLs (validators, RFC 9110 conditions)."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from email.utils import formatdate, parsedate_to_datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.pki.crl import RevocationReason
from trustmesh.pki.ocsp import (
    CertificateStatus,
    OcspAnswer,
    OcspResponder,
    ResponderIdentity,
    Status,
)
from trustmesh.server.http_cache import crl_cache_headers, not_modified, ocsp_cache_headers
from trustmesh.store.datastore import CrlRecord

NOW = datetime(2030, 1, 1, 12, 30, 45, 250000, tzinfo=UTC)
VALIDITY = timedelta(hours=1)
GOOD = CertificateStatus(Status.GOOD)


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, serial: int) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(NOW - timedelta(days=1))
               .not_valid_after(NOW + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None),
                              critical=True))
    if issuer is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA = _cert("test CA", CA_KEY, None, CA_KEY, serial=1)
RESPONDER_KEY = ec.generate_private_key(ec.SECP256R1())
IDENT = ResponderIdentity("ca1", CA, _cert("responder", RESPONDER_KEY, CA, CA_KEY, serial=2),
                          RESPONDER_KEY)


def _request(serial: int, *, nonce: bool = False) -> bytes:
    leaf = _cert("leaf", ec.generate_private_key(ec.SECP256R1()), CA, CA_KEY, serial=serial)
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, CA, hashes.SHA256())
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _headers(answer: OcspAnswer, now: datetime) -> dict[str, str]:
    return dict(ocsp_cache_headers(answer, now.timestamp()))


def test_an_answer_without_a_nonce_names_its_own_times_and_digest() -> None:
    responder = OcspResponder([IDENT], VALIDITY)
    answer = responder.respond(_request(10), lambda ca, serial: GOOD, NOW)
    parsed = ocsp.load_der_ocsp_response(answer.der)
    headers = _headers(answer, NOW)
    assert parsedate_to_datetime(headers["Last-Modified"]) == parsed.this_update_utc
    assert parsedate_to_datetime(headers["Expires"]) == parsed.next_update_utc
    assert headers["ETag"] == f'"{hashlib.sha1(answer.der).hexdigest()}"'  # noqa: S324
    # kept as long as this responder reuses the signed answer: a quarter of its validity
    assert headers["Cache-Control"] == "max-age=900, public, no-transform, must-revalidate"


def test_max_age_counts_down_with_the_reused_answer_and_never_goes_negative() -> None:
    responder = OcspResponder([IDENT], VALIDITY)
    first = responder.respond(_request(11), lambda ca, serial: GOOD, NOW)
    later = NOW + timedelta(minutes=10)
    reused = responder.respond(_request(11), lambda ca, serial: GOOD, later)
    assert reused.der == first.der  # the same signed answer
    assert _headers(reused, later)["Cache-Control"].startswith("max-age=300,")
    assert _headers(reused, later)["ETag"] == _headers(first, NOW)["ETag"]
    assert _headers(first, NOW + timedelta(hours=2))["Cache-Control"].startswith("max-age=0,")


def test_a_changed_status_is_a_new_answer_with_a_full_max_age() -> None:
    responder = OcspResponder([IDENT], VALIDITY)
    first = responder.respond(_request(12), lambda ca, serial: GOOD, NOW)
    revoked = CertificateStatus(Status.REVOKED, NOW - timedelta(hours=1),
                                RevocationReason.KEY_COMPROMISE)
    later = NOW + timedelta(minutes=5)
    second = responder.respond(_request(12), lambda ca, serial: revoked, later)
    assert second.der != first.der and second.outcome == "revoked"
    assert _headers(second, later)["Cache-Control"].startswith("max-age=900,")
    assert _headers(second, later)["ETag"] != _headers(first, NOW)["ETag"]


def test_the_window_never_passes_next_update() -> None:
    short = OcspResponder([IDENT], timedelta(seconds=40))
    answer = short.respond(_request(13), lambda ca, serial: GOOD, NOW)
    assert answer.fresh_until is not None and answer.next_update is not None
    assert answer.fresh_until <= answer.next_update
    assert _headers(answer, NOW)["Cache-Control"].startswith("max-age=10,")  # 40 s / 4


@pytest.mark.parametrize("case", ["nonce", "malformed", "unauthorized"])
def test_answers_not_for_caches_get_no_headers(case: str) -> None:
    responder = OcspResponder([IDENT], VALIDITY)
    der = {"nonce": _request(14, nonce=True), "malformed": b"junk",
           "unauthorized": _foreign_request()}[case]
    answer = responder.respond(der, lambda ca, serial: GOOD, NOW)
    assert ocsp_cache_headers(answer, NOW.timestamp()) == []


def _foreign_request() -> bytes:
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other CA", other_key, None, other_key, serial=3)
    leaf = _cert("leaf", ec.generate_private_key(ec.SECP256R1()), other, other_key, serial=4)
    return (ocsp.OCSPRequestBuilder().add_certificate(leaf, other, hashes.SHA256()).build()
            .public_bytes(serialization.Encoding.DER))


RECORD = CrlRecord("c0ffee", 7, int(NOW.timestamp()), int(NOW.timestamp()) + 86400, b"crl")


def test_crl_validators_differ_by_representation_and_number() -> None:
    der, pem = crl_cache_headers(RECORD, "crl"), crl_cache_headers(RECORD, "pem")
    assert der["ETag"] == '"c0ffee-7-crl"' and pem["ETag"] == '"c0ffee-7-pem"'
    newer = CrlRecord("c0ffee", 8, RECORD.this_update + 5, RECORD.next_update + 5, b"crl2")
    assert crl_cache_headers(newer, "crl")["ETag"] != der["ETag"]
    assert parsedate_to_datetime(der["Last-Modified"]).timestamp() == RECORD.this_update
    assert "no-cache" in der["Cache-Control"]


ETAG = '"c0ffee-7-crl"'
SIGNED_AT = formatdate(RECORD.this_update, usegmt=True)


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, False),
    ({"If-None-Match": ETAG}, True),
    ({"If-None-Match": f"W/{ETAG}"}, True),  # weak comparison
    ({"If-None-Match": f'"a", {ETAG} , "b"'}, True),
    ({"If-None-Match": "*"}, True),
    ({"If-None-Match": '"c0ffee-6-crl"'}, False),
    ({"If-None-Match": ""}, False),
    # a date alone never gives a 304: a newer CRL may have been signed in that second
    ({"If-Modified-Since": SIGNED_AT}, False),
    ({"If-None-Match": '"other"', "If-Modified-Since": SIGNED_AT}, False),
    ({"If-None-Match": ETAG, "If-Modified-Since": "yesterday"}, True),
])
def test_conditional_requests(headers: dict[str, str], expected: bool) -> None:
    assert not_modified(headers, ETAG) is expected
