"""An RFC 6960 OCSP responder as a pure function: request bytes in, response bytes out.

The responder signs with a delegated responder certificate (id-kp-OCSPSigning,
ocsp-nocheck) issued by the CA whose certificates it answers for. Status
comes from a lookup the caller provides, so the datastore stays outside.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from trustmesh.pki.crl import RevocationReason
from trustmesh.pki.keys.base import SigningKey

__all__ = [
    "CertificateStatus",
    "OcspAnswer",
    "OcspResponder",
    "ResponderIdentity",
    "Status",
    "issuer_key_hash",
]

MAX_NONCE_BYTES = 128


class Status(enum.StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CertificateStatus:
    status: Status
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None


GOOD = CertificateStatus(Status.GOOD)
UNKNOWN = CertificateStatus(Status.UNKNOWN)


@dataclass(frozen=True)
class ResponderIdentity:
    """A CA we answer for, and the delegated certificate and key we sign with."""

    ca_id: str
    ca_certificate: x509.Certificate
    responder_certificate: x509.Certificate
    responder_key: SigningKey


@dataclass(frozen=True)
class OcspAnswer:
    """What the HTTP layer sends, plus a label for metrics and logs.

    An answer to a request without a nonce is the same for everyone who asks, so HTTP
    caches may keep it (RFC 5019 6.2): ``this_update`` and ``next_update`` are its own
    times (epoch seconds), ``fresh_until`` when this responder stops reusing it and
    signs anew. They are None on answers with a nonce and on refusals.
    """

    der: bytes
    outcome: str  # good | revoked | unknown | malformedRequest | unauthorized | ...
    serial: int | None = None
    this_update: int | None = None
    next_update: int | None = None
    fresh_until: int | None = None


def _der_read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    return tag, pos, pos + length


def issuer_key_hash(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    """Hash of the issuer's subjectPublicKey BIT STRING value (RFC 6960 4.1.1)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _, start, _ = _der_read(spki, 0)  # SubjectPublicKeyInfo SEQUENCE
    _, _, alg_end = _der_read(spki, start)  # AlgorithmIdentifier
    tag, bits_start, bits_end = _der_read(spki, alg_end)  # subjectPublicKey BIT STRING
    if tag != 0x03:
        raise ValueError("SubjectPublicKeyInfo without a BIT STRING")
    key_bits = spki[bits_start + 1 : bits_end]  # skip the unused-bits octet
    h = hashes.Hash(algorithm)
    h.update(key_bits)
    return h.finalize()


def _name_hash(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(cert.subject.public_bytes())
    return h.finalize()


# -- DER of a signed response ---------------------------------------------------------
# The library's response builder re-encodes the responder certificate, hashes its key
# and serializes the result on every call: three quarters of the time of a signed
# answer. A responder identity's fixed parts are encoded once here instead; what varies
# (CertID, status, times, nonce) is a few small TLVs. tests/unit/pki/test_ocsp_encoding.py
# checks the result against the library's encoding byte for byte.


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _header(tag: int, n: int) -> bytes:
    """Tag and DER length of an element with ``n`` content bytes (n < 64 KiB)."""
    if n < 0x80:
        return bytes((tag, n))
    if n < 0x100:
        return bytes((tag, 0x81, n))
    return bytes((tag, 0x82, n >> 8, n & 0xFF))


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _integer(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


_NULL = b"\x05\x00"
_CERT_ID_HASH = {  # AlgorithmIdentifier of the CertID hash, as the library writes it
    "sha1": _tlv(0x30, _oid("1.3.14.3.2.26") + _NULL),
    "sha256": _tlv(0x30, _oid("2.16.840.1.101.3.4.2.1") + _NULL),
    "sha384": _tlv(0x30, _oid("2.16.840.1.101.3.4.2.2") + _NULL),
    "sha512": _tlv(0x30, _oid("2.16.840.1.101.3.4.2.3") + _NULL),
}
_ECDSA_WITH = {
    "sha256": _tlv(0x30, _oid("1.2.840.10045.4.3.2")),
    "sha384": _tlv(0x30, _oid("1.2.840.10045.4.3.3")),
    "sha512": _tlv(0x30, _oid("1.2.840.10045.4.3.4")),
}
_NONCE_OID = _oid("1.3.6.1.5.5.7.48.1.2")
_BASIC_RESPONSE = _oid("1.3.6.1.5.5.7.48.1.1")
_SUCCESSFUL = b"\x0a\x01\x00"
_GOOD = b"\x80\x00"  # [0] IMPLICIT NULL
_UNKNOWN = b"\x82\x00"  # [2] IMPLICIT NULL
_CRL_REASON = {
    x509.ReasonFlags.unspecified: 0, x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.ca_compromise: 2, x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4, x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.certificate_hold: 6, x509.ReasonFlags.remove_from_crl: 8,
    x509.ReasonFlags.privilege_withdrawn: 9, x509.ReasonFlags.aa_compromise: 10,
}


def _generalized_time(when: datetime) -> bytes:
    return _tlv(0x18, when.astimezone(UTC).strftime("%Y%m%d%H%M%SZ").encode())


# The responseExtensions of an answer with a nonce, up to the nonce itself, by nonce
# length: [1] { SEQUENCE { Extension { id-pkix-ocsp-nonce, OCTET STRING { OCTET STRING
# nonce } } } } (RFC 6960 4.4.1, the nonce echoed as the request sent it).
def _nonce_extension_prefix(n: int) -> bytes:
    inner = _header(0x04, n)
    value = _header(0x04, len(inner) + n) + inner
    extension = _header(0x30, len(_NONCE_OID) + len(value) + n) + _NONCE_OID + value
    extensions = _header(0x30, len(extension) + n) + extension
    return _header(0xA1, len(extensions) + n) + extensions


_NONCE_EXTENSION_PREFIX = tuple(_nonce_extension_prefix(n) for n in range(MAX_NONCE_BYTES + 1))


class _ResponseEncoder:
    """Signs responses for one responder identity with an EC key (all we issue)."""

    def __init__(self, ident: ResponderIdentity, digest: hashes.HashAlgorithm) -> None:
        assert isinstance(ident.responder_key, ec.EllipticCurvePrivateKey)
        self._key = ident.responder_key
        self._ecdsa = ec.ECDSA(digest)
        self._signature_algorithm = _ECDSA_WITH[digest.name]
        key_hash = issuer_key_hash(ident.responder_certificate, hashes.SHA1())  # noqa: S303
        self._responder_id = _tlv(0xA2, _tlv(0x04, key_hash))  # byKey (RFC 6960 4.2.1)
        cert = ident.responder_certificate.public_bytes(serialization.Encoding.DER)
        self._certs = _tlv(0xA0, _tlv(0x30, cert))
        # (second, producedAt and thisUpdate, thisUpdate + nextUpdate) in one attribute:
        # both threads of a responder process sign, and a reader must not see the times
        # of one second with the marker of another
        self._times: tuple[int, bytes, bytes] = (-1, b"", b"")
        self._cert_ids: dict[tuple[str, bytes, bytes, int], bytes] = {}
        self._revoked: dict[tuple[datetime | None, RevocationReason | None], bytes] = {}
        # the three outer headers of a response by the length of its BasicOCSPResponse
        self._outer: dict[int, bytes] = {}

    @staticmethod
    def usable(ident: ResponderIdentity, digest: hashes.HashAlgorithm | None) -> bool:
        return (isinstance(ident.responder_key, ec.EllipticCurvePrivateKey)
                and digest is not None and digest.name in _ECDSA_WITH)

    def _now(self, now: datetime, validity: timedelta) -> tuple[int, bytes, bytes]:
        second = int(now.timestamp())
        times = self._times
        if second != times[0]:
            this_update = _generalized_time(now)
            times = (second, this_update,
                     this_update + _tlv(0xA0, _generalized_time(now + validity)))
            self._times = times
        return times

    def _cert_status(self, status: CertificateStatus, now: datetime) -> bytes:
        if status.status is Status.GOOD:
            return _GOOD
        if status.status is not Status.REVOKED:
            return _UNKNOWN
        key = (status.revoked_at, status.reason)
        encoded = self._revoked.get(key)
        if encoded is None:
            revoked = _generalized_time(status.revoked_at or now)
            if status.reason not in (None, RevocationReason.UNSPECIFIED):
                assert status.reason is not None
                code = _CRL_REASON[status.reason.flag]
                revoked += _tlv(0xA0, bytes((0x0A, 0x01, code)))
            encoded = _tlv(0xA1, revoked)
            if status.revoked_at is not None:  # no revocation time: "now" is not kept
                if len(self._revoked) >= 10000:
                    self._revoked.clear()
                self._revoked[key] = encoded
        return encoded

    def sign(self, algorithm: str, name_hash: bytes, key_hash: bytes, serial: int,
             status: CertificateStatus, now: datetime, validity: timedelta,
             nonce: bytes | None) -> bytes:
        _, this_update, update_times = self._now(now, validity)
        id_key = (algorithm, name_hash, key_hash, serial)
        cert_id = self._cert_ids.get(id_key)
        if cert_id is None:
            cert_id = _tlv(0x30, _CERT_ID_HASH[algorithm] + _tlv(0x04, name_hash)
                           + _tlv(0x04, key_hash) + _integer(serial))
            if len(self._cert_ids) >= 10000:
                self._cert_ids.clear()
            self._cert_ids[id_key] = cert_id
        single = cert_id + self._cert_status(status, now) + update_times
        n = len(single)
        # responses SEQUENCE { SingleResponse SEQUENCE { ... } }
        responses = (_header(0x30, n + (2 if n < 0x80 else 3 if n < 0x100 else 4))
                     + _header(0x30, n) + single)
        responder_id = self._responder_id
        if nonce is None:
            tbs = (_header(0x30, len(responder_id) + len(this_update) + len(responses))
                   + responder_id + this_update + responses)
        else:
            extensions = _NONCE_EXTENSION_PREFIX[len(nonce)] + nonce
            tbs = (_header(0x30, len(responder_id) + len(this_update) + len(responses)
                           + len(extensions))
                   + responder_id + this_update + responses + extensions)
        signature = self._key.sign(tbs, self._ecdsa)
        signature_algorithm, certs = self._signature_algorithm, self._certs
        size = (len(tbs) + len(signature_algorithm) + len(signature) + 1
                + (2 if len(signature) < 0x7F else 3) + len(certs))
        outer = self._outer.get(size)
        if outer is None:
            outer = self._outer_headers(size)
        return b"".join((outer, _header(0x30, size), tbs, signature_algorithm,
                         _header(0x03, len(signature) + 1), b"\x00", signature, certs))

    def _outer_headers(self, size: int) -> bytes:
        """OCSPResponse { successful, [0] { ResponseBytes { id-pkix-ocsp-basic,
        OCTET STRING { BasicOCSPResponse } } } } up to the BasicOCSPResponse's own header
        (of ``size`` content bytes)."""
        basic = len(_header(0x30, size)) + size
        octets = _header(0x04, basic)
        response_bytes = len(_BASIC_RESPONSE) + len(octets) + basic
        seq = _header(0x30, response_bytes)
        explicit = _header(0xA0, len(seq) + response_bytes)
        total = len(_SUCCESSFUL) + len(explicit) + len(seq) + response_bytes
        outer = (_header(0x30, total) + _SUCCESSFUL + explicit + seq + _BASIC_RESPONSE
                 + octets)
        if len(self._outer) < 64:
            self._outer[size] = outer
        return outer


_HASHES: tuple[hashes.HashAlgorithm, ...] = (
    hashes.SHA1(),  # noqa: S303 - RFC 6960 CertID default; a lookup key, not a signature
    hashes.SHA256(),
    hashes.SHA384(),
    hashes.SHA512(),
)
_HASH_BY_NAME = {h.name: h for h in _HASHES}


# -- reading a request -------------------------------------------------------------
# (hash algorithm name, issuerNameHash, issuerKeyHash, serial, nonce or None)
_RequestFields = tuple[str, bytes, bytes, int, bytes | None]

_CERT_ID_ALGORITHM = {der: name for name, der in _CERT_ID_HASH.items()}


def _content(der: bytes, pos: int, tag: int) -> tuple[int, int]:
    """(start, end) of the content of the element at ``pos``, which must have ``tag`` and
    a minimal DER length; ValueError or IndexError otherwise."""
    if der[pos] != tag:
        raise ValueError("unexpected tag")
    n = der[pos + 1]
    if n < 0x80:
        return pos + 2, pos + 2 + n
    if n == 0x81:
        n = der[pos + 2]
        if n < 0x80:
            raise ValueError("non-minimal length")
        return pos + 3, pos + 3 + n
    if n == 0x82:
        n = (der[pos + 2] << 8) | der[pos + 3]
        if n < 0x100:
            raise ValueError("non-minimal length")
        return pos + 4, pos + 4 + n
    raise ValueError("unsupported length")


def _read_single_request(der: bytes) -> _RequestFields | None:
    """The fields of the request nearly every client sends: one CertID (SHA-1/256/384/512,
    the parameters NULL), a positive serial, no version, requestor name, signature or
    per-request extensions, and at most a non-critical nonce as its one extension.
    None for anything else, which the library's decoder then reads
    (``_read_request_with_library``); where both read a request they agree."""
    if len(der) < 130:
        return _read_short_single_request(der)
    return _read_any_single_request(der)


def _read_any_single_request(der: bytes) -> _RequestFields | None:
    """``_read_single_request`` for a request of any length."""
    try:
        start, end = _content(der, 0, 0x30)  # OCSPRequest
        if end != len(der):
            return None
        pos, tbs_end = _content(der, start, 0x30)  # TBSRequest, no optionalSignature
        if tbs_end != end:
            return None
        pos, list_end = _content(der, pos, 0x30)  # requestList, first: no version or name
        pos, request_end = _content(der, pos, 0x30)  # the one Request
        if request_end != list_end:
            return None
        pos, cert_id_end = _content(der, pos, 0x30)  # CertID, no singleRequestExtensions
        if cert_id_end != request_end:
            return None
        algorithm_end = pos + 2 + der[pos + 1]
        algorithm = _CERT_ID_ALGORITHM.get(der[pos:algorithm_end])
        if algorithm is None:
            return None
        pos, name_end = _content(der, algorithm_end, 0x04)
        name_hash = der[pos:name_end]
        pos, key_end = _content(der, name_end, 0x04)
        key_hash = der[pos:key_end]
        pos, serial_end = _content(der, key_end, 0x02)
        if serial_end != cert_id_end or serial_end == pos:
            return None
        first = der[pos]
        if first & 0x80 or (first == 0 and (serial_end - pos == 1 or not der[pos + 1] & 0x80)):
            return None  # negative, zero or not minimal: the library's decoder decides
        serial = int.from_bytes(der[pos:serial_end], "big")
        if list_end == tbs_end:
            return algorithm, name_hash, key_hash, serial, None
        pos, explicit_end = _content(der, list_end, 0xA2)  # requestExtensions
        if explicit_end != tbs_end:
            return None
        pos, extensions_end = _content(der, pos, 0x30)
        if extensions_end != explicit_end:
            return None
        pos, extension_end = _content(der, pos, 0x30)  # the one Extension
        if extension_end != extensions_end:
            return None
        oid_end = pos + len(_NONCE_OID)
        if der[pos:oid_end] != _NONCE_OID:
            return None
        pos, value_end = _content(der, oid_end, 0x04)  # extnValue, right after: not critical
        if value_end != extension_end:
            return None
        pos, nonce_end = _content(der, pos, 0x04)  # the nonce, an OCTET STRING
        if nonce_end != value_end:
            return None
        return algorithm, name_hash, key_hash, serial, der[pos:nonce_end]
    except (ValueError, IndexError):
        return None


def _read_short_single_request(der: bytes) -> _RequestFields | None:
    """``_read_single_request`` for a request of under 130 bytes (a SHA-1 CertID with a
    nonce of up to 23 bytes), where every length is one byte and every element ends
    where its container does, or before: the same checks without a call per element."""
    size = len(der)
    try:
        # OCSPRequest { TBSRequest { requestList { Request { CertID ...
        if (der[0] != 0x30 or der[1] != size - 2 or der[2] != 0x30 or der[3] != size - 4
                or der[4] != 0x30):
            return None
        list_end = 6 + der[5]
        if (list_end > size or der[6] != 0x30 or 8 + der[7] != list_end or der[8] != 0x30
                or 10 + der[9] != list_end):
            return None
        algorithm_end = 12 + der[11]
        algorithm = _CERT_ID_ALGORITHM.get(der[10:algorithm_end])
        if algorithm is None or der[algorithm_end] != 0x04:
            return None
        name_end = algorithm_end + 2 + der[algorithm_end + 1]
        if der[name_end] != 0x04:
            return None
        key_end = name_end + 2 + der[name_end + 1]
        if der[key_end] != 0x02:
            return None
        serial_start = key_end + 2
        if serial_start + der[key_end + 1] != list_end or serial_start == list_end:
            return None
        first = der[serial_start]
        if first & 0x80 or (first == 0 and (list_end - serial_start == 1
                                            or not der[serial_start + 1] & 0x80)):
            return None
        fields = (algorithm, der[algorithm_end + 2:name_end], der[name_end + 2:key_end],
                  int.from_bytes(der[serial_start:list_end], "big"))
        if list_end == size:
            return (*fields, None)
        # [2] { Extensions { Extension { nonce OID, OCTET STRING { OCTET STRING } } } },
        # each one ending where the request does
        pos = list_end
        for tag in (0xA2, 0x30, 0x30):
            if der[pos] != tag or pos + 2 + der[pos + 1] != size:
                return None
            pos += 2
        oid_end = pos + len(_NONCE_OID)
        if der[pos:oid_end] != _NONCE_OID:
            return None
        pos = oid_end
        for _ in range(2):
            if der[pos] != 0x04 or pos + 2 + der[pos + 1] != size:
                return None
            pos += 2
        return (*fields, der[pos:size])
    except IndexError:
        return None


def _read_request_with_library(der: bytes) -> _RequestFields | None:
    """The fields of any request the library reads, or None when it is malformed for us
    (garbage, truncated, several CertIDs, an unknown hash algorithm, a nonce extension
    that does not hold an OCTET STRING)."""
    try:
        req = ocsp.load_der_ocsp_request(der)
        fields = (req.hash_algorithm.name, req.issuer_name_hash, req.issuer_key_hash,
                  req.serial_number)
    except Exception:
        return None
    try:
        ext = req.extensions.get_extension_for_class(x509.OCSPNonce)
    except x509.ExtensionNotFound:
        return (*fields, None)
    except Exception:
        return None
    return (*fields, ext.value.nonce)

Lookup = Callable[[str, int], CertificateStatus]


class OcspResponder:
    """Answers OCSP requests for a fixed set of CAs; build a new one when they change."""

    def __init__(self, identities: Sequence[ResponderIdentity], validity: timedelta,
                 *, cache_size: int = 10000) -> None:
        self._identities = tuple(identities)
        self._validity = validity
        # Signed answers to nonce-less requests (RFC 5019), reused while the status
        # is unchanged and the answer is young; the status is always looked up anew.
        self._cache: dict[tuple[str, bytes, bytes, int], tuple[CertificateStatus, datetime,
                                                                OcspAnswer]] = {}
        self._cache_size = cache_size
        self._reuse_for = validity / 4
        from trustmesh.pki.ca import signature_hash_for

        self._by_hash: dict[tuple[str, bytes, bytes],
                            tuple[ResponderIdentity, _ResponseEncoder | None]] = {}
        for ident in identities:
            digest = signature_hash_for(ident.responder_key)
            encoder = (_ResponseEncoder(ident, digest)
                       if digest is not None and _ResponseEncoder.usable(ident, digest)
                       else None)
            for alg in _HASHES:
                key = (alg.name, _name_hash(ident.ca_certificate, alg),
                       issuer_key_hash(ident.ca_certificate, alg))
                self._by_hash[key] = (ident, encoder)

    @property
    def identities(self) -> tuple[ResponderIdentity, ...]:
        return self._identities

    @property
    def validity(self) -> timedelta:
        """How long after thisUpdate a response's nextUpdate lies."""
        return self._validity

    def respond(self, request_der: bytes, lookup: Lookup, now: datetime) -> OcspAnswer:
        """Answer one DER request. Never raises on bad input: it answers malformedRequest."""
        fields = _read_single_request(request_der) or _read_request_with_library(request_der)
        if fields is None:
            return _MALFORMED
        algorithm, name_hash, key_hash, serial, nonce = fields
        if nonce is not None and (not nonce or len(nonce) > MAX_NONCE_BYTES):
            return _MALFORMED
        found = self._by_hash.get((algorithm, name_hash, key_hash))
        if found is None:
            return OcspAnswer(_UNAUTHORIZED_DER, "unauthorized", serial)
        ident, encoder = found
        status = lookup(ident.ca_id, serial)
        if nonce is None:
            cache_key = (algorithm, name_hash, key_hash, serial)
            hit = self._cache.get(cache_key)
            if hit is not None and hit[0] == status and now - hit[1] < self._reuse_for:
                return hit[2]
        if encoder is not None:
            der = encoder.sign(algorithm, name_hash, key_hash, serial, status, now,
                               self._validity, nonce)
        else:
            der = self._build(ident, _HASH_BY_NAME[algorithm], name_hash, key_hash, serial,
                              status, now, nonce)
        if nonce is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            answer = self._cacheable(der, status, serial, now)
            self._cache[cache_key] = (status, now, answer)
            return answer
        return OcspAnswer(der, status.status.value, serial)

    def _cacheable(self, der: bytes, status: CertificateStatus, serial: int,
                   signed_at: datetime) -> OcspAnswer:
        this_update = int(signed_at.timestamp())  # the response's times are whole seconds
        next_update = int((signed_at + self._validity).timestamp())
        fresh_until = min(next_update, int((signed_at + self._reuse_for).timestamp()))
        return OcspAnswer(der, status.status.value, serial, this_update, next_update,
                          fresh_until)

    def _build(self, ident: ResponderIdentity, alg: hashes.HashAlgorithm, name_hash: bytes,
               key_hash: bytes, serial: int, status: CertificateStatus, now: datetime,
               nonce: bytes | None) -> bytes:
        """A signed response from the library's builder (responder keys other than EC)."""
        cert_status = {
            Status.GOOD: ocsp.OCSPCertStatus.GOOD,
            Status.REVOKED: ocsp.OCSPCertStatus.REVOKED,
            Status.UNKNOWN: ocsp.OCSPCertStatus.UNKNOWN,
        }[status.status]
        revocation_reason = None
        if status.status is Status.REVOKED and status.reason not in (
            None,
            RevocationReason.UNSPECIFIED,
        ):
            assert status.reason is not None
            revocation_reason = status.reason.flag
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=name_hash,
            issuer_key_hash=key_hash,
            serial_number=serial,
            algorithm=alg,
            cert_status=cert_status,
            this_update=now,
            next_update=now + self._validity,
            revocation_time=status.revoked_at if status.status is Status.REVOKED else None,
            revocation_reason=revocation_reason,
        )
        builder = builder.responder_id(
            ocsp.OCSPResponderEncoding.HASH, ident.responder_certificate
        ).certificates([ident.responder_certificate])
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        from trustmesh.pki.ca import signature_hash_for

        key = ident.responder_key
        response = builder.sign(key, signature_hash_for(key))
        return response.public_bytes(serialization.Encoding.DER)

def _unsuccessful(
    status: ocsp.OCSPResponseStatus, label: str, serial: int | None = None
) -> OcspAnswer:
    der = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
    return OcspAnswer(der, label, serial)


_MALFORMED = _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
_UNAUTHORIZED_DER = _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized").der
