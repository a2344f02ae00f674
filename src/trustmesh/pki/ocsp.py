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
    """What the HTTP layer sends, plus a label for metrics and logs."""

    der: bytes
    outcome: str  # good | revoked | unknown | malformedRequest | unauthorized | ...
    serial: int | None = None


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
        self._second = -1
        self._times = (b"", b"")
        self._cert_ids: dict[tuple[str, bytes, bytes, int], bytes] = {}

    @staticmethod
    def usable(ident: ResponderIdentity, digest: hashes.HashAlgorithm | None) -> bool:
        return (isinstance(ident.responder_key, ec.EllipticCurvePrivateKey)
                and digest is not None and digest.name in _ECDSA_WITH)

    def _now(self, now: datetime, validity: timedelta) -> tuple[bytes, bytes]:
        second = int(now.timestamp())
        if second != self._second:
            self._times = (_generalized_time(now),
                           _tlv(0xA0, _generalized_time(now + validity)))
            self._second = second
        return self._times

    def sign(self, algorithm: str, name_hash: bytes, key_hash: bytes, serial: int,
             status: CertificateStatus, now: datetime, validity: timedelta,
             nonce: bytes | None) -> bytes:
        this_update, next_update = self._now(now, validity)
        id_key = (algorithm, name_hash, key_hash, serial)
        cert_id = self._cert_ids.get(id_key)
        if cert_id is None:
            cert_id = _tlv(0x30, _CERT_ID_HASH[algorithm] + _tlv(0x04, name_hash)
                           + _tlv(0x04, key_hash) + _integer(serial))
            if len(self._cert_ids) >= 10000:
                self._cert_ids.clear()
            self._cert_ids[id_key] = cert_id
        if status.status is Status.GOOD:
            cert_status = _GOOD
        elif status.status is Status.REVOKED:
            revoked = _generalized_time(status.revoked_at or now)
            if status.reason not in (None, RevocationReason.UNSPECIFIED):
                assert status.reason is not None
                code = _CRL_REASON[status.reason.flag]
                revoked += _tlv(0xA0, bytes((0x0A, 0x01, code)))
            cert_status = _tlv(0xA1, revoked)
        else:
            cert_status = _UNKNOWN
        single = _tlv(0x30, cert_id + cert_status + this_update + next_update)
        extensions = b"" if nonce is None else _tlv(0xA1, _tlv(0x30, _tlv(
            0x30, _NONCE_OID + _tlv(0x04, _tlv(0x04, nonce)))))
        tbs = _tlv(0x30, self._responder_id + this_update + _tlv(0x30, single) + extensions)
        signature = self._key.sign(tbs, self._ecdsa)
        basic = _tlv(0x30, tbs + self._signature_algorithm
                     + _tlv(0x03, b"\x00" + signature) + self._certs)
        return _tlv(0x30, _SUCCESSFUL + _tlv(0xA0, _tlv(
            0x30, _BASIC_RESPONSE + _tlv(0x04, basic))))


_HASHES: tuple[hashes.HashAlgorithm, ...] = (
    hashes.SHA1(),  # noqa: S303 - RFC 6960 CertID default; a lookup key, not a signature
    hashes.SHA256(),
    hashes.SHA384(),
    hashes.SHA512(),
)

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
                                                                bytes]] = {}
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
        try:
            req = ocsp.load_der_ocsp_request(request_der)
            alg = req.hash_algorithm
            name_hash = req.issuer_name_hash
            key_hash = req.issuer_key_hash
            serial = req.serial_number
        except Exception:
            # Garbage, a truncated request, several CertIDs (unsupported), or an
            # unknown hash algorithm: all of them are malformed for us.
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        nonce_ok, nonce = self._nonce(req)
        if not nonce_ok:
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        found = self._by_hash.get((alg.name, name_hash, key_hash))
        if found is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized", serial)
        ident, encoder = found
        status = lookup(ident.ca_id, serial)
        cache_key = (alg.name, name_hash, key_hash, serial)
        if nonce is None:
            hit = self._cache.get(cache_key)
            if hit is not None and hit[0] == status and now - hit[1] < self._reuse_for:
                return OcspAnswer(hit[2], status.status.value, serial)
        if encoder is not None:
            der = encoder.sign(alg.name, name_hash, key_hash, serial, status, now,
                               self._validity, nonce)
        else:
            der = self._build(ident, alg, name_hash, key_hash, serial, status, now, nonce)
        if nonce is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[cache_key] = (status, now, der)
        return OcspAnswer(der, status.status.value, serial)

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

    @staticmethod
    def _nonce(req: ocsp.OCSPRequest) -> tuple[bool, bytes | None]:
        """(acceptable, nonce): the nonce is None when the request has none."""
        try:
            ext = req.extensions.get_extension_for_class(x509.OCSPNonce)
        except x509.ExtensionNotFound:
            return True, None
        except Exception:
            return False, None
        nonce = ext.value.nonce
        if not nonce or len(nonce) > MAX_NONCE_BYTES:
            return False, None
        return True, nonce


def _unsuccessful(
    status: ocsp.OCSPResponseStatus, label: str, serial: int | None = None
) -> OcspAnswer:
    der = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
    return OcspAnswer(der, label, serial)
