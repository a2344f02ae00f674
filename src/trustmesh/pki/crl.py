"""Certificate revocation lists (RFC 5280 section 5), built as pure values."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from trustmesh.errors import InvalidInput
from trustmesh.pki.keys.base import SigningKey

__all__ = ["RevocationReason", "RevokedCertificate", "build_crl"]


class RevocationReason(enum.StrEnum):
    """RFC 5280 CRLReason values, as users type them (``key-compromise``)."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key-compromise"
    CA_COMPROMISE = "ca-compromise"
    AFFILIATION_CHANGED = "affiliation-changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation-of-operation"
    CERTIFICATE_HOLD = "certificate-hold"
    PRIVILEGE_WITHDRAWN = "privilege-withdrawn"
    AA_COMPROMISE = "aa-compromise"

    @classmethod
    def parse(cls, value: str) -> RevocationReason:
        normalized = value.strip().lower().replace("_", "-")
        # Accept the camelCase names of RFC 5280 too (keyCompromise).
        aliases = {r.value.replace("-", ""): r for r in cls}
        try:
            return cls(normalized)
        except ValueError:
            found = aliases.get(normalized.replace("-", ""))
            if found is not None:
                return found
        allowed = ", ".join(r.value for r in cls)
        raise InvalidInput(f"unknown revocation reason {value!r}; use one of {allowed}",
                           field="reason")

    @property
    def flag(self) -> x509.ReasonFlags:
        return x509.ReasonFlags[self.value.replace("-", "_")]


@dataclass(frozen=True)
class RevokedCertificate:
    serial: int
    revoked_at: datetime
    reason: RevocationReason


def build_crl(
    issuer: x509.Certificate,
    key: SigningKey,
    revoked: Iterable[RevokedCertificate],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A CRL for ``issuer``, with CRL number, AKI and a reason code on each entry."""
    from trustmesh.pki.ca import signature_hash_for

    if number < 0:
        raise InvalidInput("CRL number cannot be negative")
    if next_update <= this_update:
        raise InvalidInput("nextUpdate must be after thisUpdate")
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()  # type: ignore[arg-type]
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(aki, critical=False)
    )
    for entry in revoked:
        rb = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        # RFC 5280 5.3.1: omit the reason code rather than use unspecified.
        if entry.reason is not RevocationReason.UNSPECIFIED:
            rb = rb.add_extension(x509.CRLReason(entry.reason.flag), critical=False)
        builder = builder.add_revoked_certificate(rb.build())
    return builder.sign(key, signature_hash_for(key))  # type: ignore[arg-type]
