"""The responder reads the common OCSP request itself; the library's decoder reads the rest.
Where the quick reader accepts a request, both must read the same fields from it."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.pki.ocsp import (
    CertificateStatus,
    OcspResponder,
    ResponderIdentity,
    Status,
    _read_any_single_request,
    _read_request_with_library,
    _read_short_single_request,
    _read_single_request,
)

_HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(),  # noqa: S303
           "sha384": hashes.SHA384(), "sha512": hashes.SHA512(), "sha224": hashes.SHA224()}


def _request(algorithm: str, name_hash: bytes, key_hash: bytes, serial: int,
             nonce: bytes | None, *, critical: bool = False,
             more: list[x509.ExtensionType] | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, _HASHES[algorithm])
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=critical)
    for ext in more or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    size = bytes((n,)) if n < 0x80 else bytes((0x81, n)) if n < 0x100 else bytes(
        (0x82, n >> 8, n & 0xFF))
    return bytes((tag,)) + size + content


def _agree(der: bytes) -> None:
    quick = _read_single_request(der)
    if quick is not None:
        assert quick == _read_request_with_library(der), der.hex()
    if len(der) < 130:  # the reader for short requests does what the general one does
        assert _read_short_single_request(der) == _read_any_single_request(der), der.hex()


_SERIALS = st.one_of(st.integers(1, 2**8), st.integers(1, 2**160),
                     st.sampled_from([0x7F, 0x80, 0xFF, 0x100, 0x8000, 2**159, 2**160 - 1]))
_NONCES = st.one_of(st.none(), st.binary(min_size=0, max_size=200))
_DIGEST_SIZE = {"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}


@settings(max_examples=300, deadline=None)
@given(algorithm=st.sampled_from(sorted(_HASHES)), serial=_SERIALS, nonce=_NONCES,
       critical=st.booleans())
def test_both_readers_agree_on_the_librarys_requests(algorithm: str, serial: int,
                                                     nonce: bytes | None,
                                                     critical: bool) -> None:
    size = _DIGEST_SIZE[algorithm]
    der = _request(algorithm, os.urandom(size), os.urandom(size), serial, nonce,
                   critical=critical)
    _agree(der)
    if algorithm != "sha224" and not (critical and nonce is not None):
        assert _read_single_request(der) is not None  # what clients send is read quickly


_OIDS = {"sha1": "2b0e03021a", "sha224": "608648016503040204", "sha256": "608648016503040201",
         "sha384": "608648016503040202", "sha512": "608648016503040203"}
_NONCE_OID = bytes.fromhex("06092b0601050507300102")


@settings(max_examples=600, deadline=None)
@given(algorithm=st.sampled_from(sorted(_OIDS)), null_parameters=st.booleans(),
       name_hash=st.binary(max_size=70), key_hash=st.binary(max_size=70),
       serial=st.binary(max_size=24), nonce=_NONCES, critical=st.booleans(),
       wrapped=st.booleans(), extra=st.booleans(), version=st.booleans(),
       requests=st.integers(1, 2))
def test_both_readers_agree_on_requests_written_by_hand(
        algorithm: str, null_parameters: bool, name_hash: bytes, key_hash: bytes,
        serial: bytes, nonce: bytes | None, critical: bool, wrapped: bool, extra: bool,
        version: bool, requests: int) -> None:
    oid = bytes.fromhex(_OIDS[algorithm])
    algorithm_id = _tlv(0x30, _tlv(0x06, oid) + (b"\x05\x00" if null_parameters else b""))
    cert_id = _tlv(0x30, algorithm_id + _tlv(0x04, name_hash) + _tlv(0x04, key_hash)
                   + _tlv(0x02, serial))
    extensions = []
    if nonce is not None:
        value = _tlv(0x04, nonce) if wrapped else nonce
        extensions.append(_tlv(0x30, _NONCE_OID + (b"\x01\x01\xff" if critical else b"")
                               + _tlv(0x04, value)))
    if extra:
        extensions.append(_tlv(0x30, bytes.fromhex("06032a0304") + _tlv(0x04, b"\x05\x00")))
    tbs = ((_tlv(0xA0, b"\x02\x01\x00") if version else b"")
           + _tlv(0x30, _tlv(0x30, cert_id) * requests)
           + (_tlv(0xA2, _tlv(0x30, b"".join(extensions))) if extensions else b""))
    der = _tlv(0x30, _tlv(0x30, tbs))
    _agree(der)
    minimal_serial = bool(serial) and serial[0] < 0x80 and not (
        serial[0] == 0 and (len(serial) == 1 or serial[1] < 0x80))
    if (algorithm != "sha224" and null_parameters and minimal_serial and not extra
            and not version and requests == 1 and (nonce is None or (wrapped and not critical))):
        assert _read_single_request(der) == (algorithm, name_hash, key_hash,
                                             int.from_bytes(serial, "big"), nonce)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nonce=_NONCES, serial=_SERIALS, data=st.data())
def test_both_readers_agree_on_damaged_requests(nonce: bytes | None, serial: int,
                                                data: st.DataObject) -> None:
    der = bytearray(_request("sha1", os.urandom(20), os.urandom(20), serial, nonce))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "drop"]))
        if not der:
            break
        at = data.draw(st.integers(0, len(der) - 1))
        if kind == "flip":
            der[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del der[at:]
        elif kind == "insert":
            der[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        else:
            del der[at]
    _agree(bytes(der))


def test_requests_the_quick_reader_leaves_to_the_library() -> None:
    name, key = os.urandom(20), os.urandom(20)
    cases = {
        "critical nonce": _request("sha1", name, key, 5, b"n" * 16, critical=True),
        "two extensions": _request("sha1", name, key, 5, b"n" * 16, more=[
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")]),
        "other extension only": _request("sha1", name, key, 5, None, more=[
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")]),
        "sha224": _request("sha224", os.urandom(28), os.urandom(28), 5, None),
    }
    # by hand: an INTEGER serial with a redundant leading zero, a negative one, zero, and
    # a version field written out although it is the default
    sha1_id = _tlv(0x30, bytes.fromhex("06052b0e03021a0500"))

    def by_hand(serial: bytes, version: bytes = b"") -> bytes:
        cert_id = _tlv(0x30, sha1_id + _tlv(0x04, name) + _tlv(0x04, key) + _tlv(0x02, serial))
        return _tlv(0x30, _tlv(0x30, version + _tlv(0x30, _tlv(0x30, cert_id))))

    assert _read_single_request(by_hand(b"\x05")) == ("sha1", name, key, 5, None)
    assert _read_request_with_library(by_hand(b"\x05")) == ("sha1", name, key, 5, None)
    cases["padded serial"] = by_hand(b"\x00\x05")
    cases["negative serial"] = by_hand(b"\xfb")
    cases["zero serial"] = by_hand(b"\x00")
    cases["explicit version"] = by_hand(b"\x05", _tlv(0xA0, b"\x02\x01\x00"))
    for label, der in cases.items():
        assert _read_single_request(der) is None, label
        _agree(der)
    # the library still reads what the quick reader leaves to it
    assert _read_request_with_library(cases["critical nonce"]) == ("sha1", name, key, 5,
                                                                    b"n" * 16)


def test_responses_are_the_same_whichever_reader_read_the_request() -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime(2030, 1, 1, tzinfo=UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=9))
          .sign(ca_key, hashes.SHA256()))
    responder = OcspResponder([ResponderIdentity("ca1", ca, ca, ca_key)], timedelta(hours=1))
    req = (ocsp.OCSPRequestBuilder()
           .add_certificate(ca, ca, hashes.SHA1())  # noqa: S303
           .add_extension(x509.OCSPNonce(b"\x01" * 16), critical=False).build())
    quick = req.public_bytes(serialization.Encoding.DER)
    critical = (ocsp.OCSPRequestBuilder().add_certificate(ca, ca, hashes.SHA1())  # noqa: S303
                .add_extension(x509.OCSPNonce(b"\x01" * 16), critical=True).build()
                .public_bytes(serialization.Encoding.DER))
    assert _read_single_request(quick) is not None and _read_single_request(critical) is None
    revoked = CertificateStatus(Status.REVOKED, now - timedelta(hours=2))
    for status in (CertificateStatus(Status.GOOD), revoked):
        answers = [ocsp.load_der_ocsp_response(
            responder.respond(der, lambda *_, s=status: s, now).der) for der in (quick, critical)]
        # ECDSA signatures differ from one signing to the next; what was signed may not
        assert answers[0].tbs_response_bytes == answers[1].tbs_response_bytes
        assert answers[0].certificate_status == answers[1].certificate_status
        nonce = answers[0].extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        assert nonce == b"\x01" * 16
