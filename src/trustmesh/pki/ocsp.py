"""An RFC 6960 OCSP responder as a pure function: request bytes in, response bytes out.

The responder signs with a delegated responder certificate (id-kp-OCSPSigning,
ocsp-nocheck) issued by the CA whose certificates it answers for. Status
comes from a lookup the caller provides, so the datastore stays outside.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
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
        self._validity = validity
        # Signed answers to nonce-less requests (RFC 5019), reused while the status
        # is unchanged and the answer is young; the status is always looked up anew.
        self._cache: dict[tuple[str, bytes, bytes, int], tuple[CertificateStatus, datetime,
                                                                bytes]] = {}
        self._cache_size = cache_size
        self._reuse_for = validity / 4
        self._by_hash: dict[tuple[str, bytes, bytes], ResponderIdentity] = {}
        for ident in identities:
            for alg in _HASHES:
                key = (alg.name, _name_hash(ident.ca_certificate, alg),
                       issuer_key_hash(ident.ca_certificate, alg))
                self._by_hash[key] = ident

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
        ident = self._by_hash.get((alg.name, name_hash, key_hash))
        if ident is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized", serial)
        status = lookup(ident.ca_id, serial)
        cache_key = (alg.name, name_hash, key_hash, serial)
        if nonce is None:
            hit = self._cache.get(cache_key)
            if hit is not None and hit[0] == status and now - hit[1] < self._reuse_for:
                return OcspAnswer(hit[2], status.status.value, serial)
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
        der = response.public_bytes(serialization.Encoding.DER)
        if nonce is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[cache_key] = (status, now, der)
        return OcspAnswer(der, status.status.value, serial)

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
