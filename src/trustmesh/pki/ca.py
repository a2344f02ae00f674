"""The certificate authority's pure signing logic: hierarchy and issuance.

Nothing here does IO or reads the clock: keys, ``now`` and serial numbers are
inputs, and every function returns a new immutable certificate.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from trustmesh.config import CaMode
from trustmesh.errors import InvalidInput
from trustmesh.pki.csr import RequestedNames
from trustmesh.pki.keys.base import SigningKey
from trustmesh.pki.templates import CertificateTemplate, extensions_for

__all__ = [
    "SHORT_LIVED_MAX_VALIDITY",
    "CaUrls",
    "IssuancePolicy",
    "IssuanceRequest",
    "SigningAuthority",
    "build_intermediate",
    "build_root",
    "ca_id_of",
    "fingerprint",
    "issue_certificate",
    "parse_subject",
    "plan_certificate",
    "plan_validity",
    "signature_hash_for",
]

SHORT_LIVED_MAX_VALIDITY = timedelta(days=7)


def signature_hash_for(key: SigningKey | object) -> hashes.HashAlgorithm | None:
    """The digest to sign with: SHA-384 for P-384 and above, SHA-256 otherwise, none for EdDSA."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 4096:
        return hashes.SHA384()
    return hashes.SHA256()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated upper-case hex, as openssl prints it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ca_id_of(cert: x509.Certificate) -> str:
    """A short, stable id for a CA certificate: the first 16 hex digits of its key id."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


@functools.lru_cache(maxsize=1024)
def parse_subject(text: str) -> x509.Name:
    """Parse ``O=trustmesh,CN=Root`` (RFC 4514-like, comma separated) into a Name."""
    attrs = {
        "CN": NameOID.COMMON_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "C": NameOID.COUNTRY_NAME,
        "L": NameOID.LOCALITY_NAME,
        "ST": NameOID.STATE_OR_PROVINCE_NAME,
        "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    }
    rdns: list[x509.NameAttribute[str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        oid = attrs.get(key.strip().upper())
        if not sep or oid is None or not value.strip():
            raise InvalidInput(
                f"cannot parse subject part {part!r}; use KEY=VALUE with KEY one of "
                + ", ".join(attrs),
                field="subject",
            )
        try:
            rdns.append(x509.NameAttribute(oid, value.strip()))
        except ValueError as exc:
            raise InvalidInput(f"bad subject value {part!r}: {exc}", field="subject") from None
    return x509.Name(rdns)


def _ski(public_key: object) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def build_root(
    key: SigningKey,
    subject: x509.Name,
    now: datetime,
    ttl: timedelta,
    *,
    path_length: int | None = 1,
    backdate: timedelta = timedelta(0),
    serial: int | None = None,
) -> x509.Certificate:
    """A self-signed root CA certificate."""
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(public_key), critical=False)
    )
    return builder.sign(key, signature_hash_for(key))  # type: ignore[arg-type]


def build_intermediate(
    public_key: object,
    subject: x509.Name,
    issuer_cert: x509.Certificate,
    issuer_key: SigningKey,
    now: datetime,
    ttl: timedelta,
    *,
    path_length: int | None = 0,
    permitted_uri_domains: Sequence[str] = (),
    permitted_dns_domains: Sequence[str] = (),
    backdate: timedelta = timedelta(0),
    serial: int | None = None,
) -> x509.Certificate:
    """A CA certificate signed by ``issuer_cert``; it never outlives its issuer."""
    issuer_bc = issuer_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not issuer_bc.ca:
        raise InvalidInput("the upstream certificate is not a CA (basicConstraints CA:FALSE)",
                           field="upstream_ca_cert")
    if issuer_bc.path_length is not None:
        if issuer_bc.path_length < 1:
            raise InvalidInput(
                f"the upstream CA has pathLenConstraint {issuer_bc.path_length}: it cannot "
                "sign another CA",
                field="upstream_ca_cert",
            )
        if path_length is None or path_length > issuer_bc.path_length - 1:
            path_length = issuer_bc.path_length - 1
    not_before = max(now - backdate, issuer_cert.not_valid_before_utc)
    not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
    if not_after <= now:
        raise InvalidInput("the upstream CA certificate has expired", field="upstream_ca_cert")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki_from_issuer(issuer_cert), critical=False)
    )
    permitted: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(d) for d in permitted_uri_domains
    ] + [x509.DNSName(d) for d in permitted_dns_domains]
    if permitted:
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None),
            critical=True,
        )
    return builder.sign(issuer_key, signature_hash_for(issuer_key))  # type: ignore[arg-type]


def _aki_from_issuer(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key()  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class CaUrls:
    """Where relying parties find revocation data for certificates a CA signs."""

    crl_url: str
    ocsp_url: str
    ca_issuers_url: str | None = None


@dataclass(frozen=True)
class SigningAuthority:
    """A CA that signs: its certificate and key, the chain above it, and its URLs."""

    certificate: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...]  # issuers above ``certificate``, trust anchor last
    urls: CaUrls
    permitted_uri_domains: tuple[str, ...] = ()
    permitted_dns_domains: tuple[str, ...] = ()
    ca_id: str = field(default="")

    @property
    def path_length(self) -> int | None:
        bc = self.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        return bc.path_length


@dataclass(frozen=True)
class IssuancePolicy:
    mode: CaMode = CaMode.GENERAL
    backdate: timedelta = timedelta(seconds=60)


@dataclass(frozen=True)
class IssuanceRequest:
    """A validated request: the CSR has been parsed and its signature checked."""

    csr: x509.CertificateSigningRequest
    template: CertificateTemplate
    validity: timedelta
    names: RequestedNames
    path_length: int | None = None
    public_key: object = None  # the CSR's key, when the caller already extracted it
    subject: x509.Name | None = None  # overrides the CSR's subject (X509-SVIDs)


def plan_validity(
    now: datetime,
    validity: timedelta,
    template: CertificateTemplate,
    policy: IssuancePolicy,
    issuer: x509.Certificate,
) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) for a request, or an error naming the limit it breaks."""
    if validity <= timedelta(0):
        raise InvalidInput("validity must be positive", field="validity")
    if policy.mode is CaMode.SHORT_LIVED and validity > SHORT_LIVED_MAX_VALIDITY:
        raise InvalidInput(
            f"validity {_human(validity)} exceeds the short-lived CA mode's limit of "
            f"{_human(SHORT_LIVED_MAX_VALIDITY)}",
            field="validity",
        )
    if validity > template.max_validity:
        raise InvalidInput(
            f"validity {_human(validity)} exceeds the {template.name} template's maximum of "
            f"{_human(template.max_validity)}",
            field="validity",
        )
    not_after = now + validity
    issuer_end = issuer.not_valid_after_utc
    if not_after > issuer_end:
        raise InvalidInput(
            f"validity {_human(validity)} would end at {not_after.isoformat()}, after the "
            f"signing CA expires at {issuer_end.isoformat()}; no certificate may outlive "
            "its issuer",
            field="validity",
        )
    not_before = max(now - policy.backdate, issuer.not_valid_before_utc)
    return not_before, not_after


def _human(d: timedelta) -> str:
    secs = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs % size == 0 and secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _check_names_allowed(names: RequestedNames, authority: SigningAuthority) -> None:
    """Refuse names the CA's own name constraints would make invalid anyway."""
    if authority.permitted_uri_domains:
        for uri in names.uris:
            if uri.startswith("spiffe://"):  # checked SPIFFE IDs: no userinfo, no port
                host = uri[9:].split("/", 1)[0]
            else:
                host = (urlsplit(uri).hostname or "").lower()
            if not any(_host_within(host, d) for d in authority.permitted_uri_domains):
                raise InvalidInput(
                    f"URI {uri!r} is outside this CA's permitted URI domains "
                    f"({', '.join(authority.permitted_uri_domains)})",
                    field="uris",
                )
    if authority.permitted_dns_domains:
        for dns in names.dns_names:
            name = dns[2:] if dns.startswith("*.") else dns
            if not any(_host_within(name, d) for d in authority.permitted_dns_domains):
                raise InvalidInput(
                    f"DNS name {dns!r} is outside this CA's permitted DNS domains "
                    f"({', '.join(authority.permitted_dns_domains)})",
                    field="dns_names",
                )


def _check_svid_names(names: RequestedNames) -> None:
    """X509-SVID profile: exactly one URI SAN, and it is a SPIFFE ID."""
    if len(names.uris) != 1 or not names.uris[0].startswith("spiffe://"):
        raise InvalidInput("an X509-SVID carries exactly one URI SAN: its SPIFFE ID",
                           field="uris")
    if names.ip_addresses or names.emails:
        raise InvalidInput("an X509-SVID carries only its SPIFFE ID and DNS names",
                           field="uris")


def _host_within(host: str, constraint: str) -> bool:
    constraint = constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint or host.endswith("." + constraint)


_ISSUER_EXTENSIONS: dict[tuple[int, bool], tuple[x509.ExtensionType, ...]] = {}


def _issuer_extensions(authority: SigningAuthority, *, with_ocsp: bool
                       ) -> tuple[x509.ExtensionType, ...]:
    """AKI, CRL distribution point and AIA: the same for every certificate a CA signs,
    so built once per CA (extension values are immutable)."""
    key = (id(authority.certificate), with_ocsp)
    cached = _ISSUER_EXTENSIONS.get(key)
    if cached is not None:
        return cached
    exts: list[x509.ExtensionType] = [
        _aki_from_issuer(authority.certificate),
        x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(authority.urls.crl_url)],
            relative_name=None, reasons=None, crl_issuer=None)]),
    ]
    if with_ocsp:
        access = [x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                         x509.UniformResourceIdentifier(authority.urls.ocsp_url))]
        if authority.urls.ca_issuers_url:
            access.append(x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(authority.urls.ca_issuers_url)))
        exts.append(x509.AuthorityInformationAccess(access))
    result = tuple(exts)
    if len(_ISSUER_EXTENSIONS) > 64:
        _ISSUER_EXTENSIONS.clear()
    # keep the certificate alive with the entry so its id() cannot be reused
    _ISSUER_EXTENSIONS[key] = result
    _ISSUER_KEEPALIVE[key] = authority.certificate
    return result


_ISSUER_KEEPALIVE: dict[tuple[int, bool], x509.Certificate] = {}

_MAX_SERIAL = 1 << 159  # RFC 5280: at most 20 octets, positive


def certificate_builder(subject: x509.Name, issuer: x509.Name, public_key: object,
                        serial: int, not_before: datetime, not_after: datetime,
                        extensions: Iterable[tuple[x509.ExtensionType, bool]]
                        ) -> x509.CertificateBuilder:
    """A builder with every field set at once.

    The same certificate as the builder's chained setters would give, with their
    checks made here once: each setter copies the builder and re-checks every
    extension added so far, which costs as much as a third of the signature on
    the busiest path the CA has (X509-SVIDs).
    """
    if not 0 < serial < _MAX_SERIAL:
        raise ValueError("the serial number must be positive and at most 159 bits")
    start = _naive_utc(not_before)
    end = _naive_utc(not_after)
    if start > end:
        raise ValueError("notBefore is after notAfter")
    exts: list[x509.Extension[x509.ExtensionType]] = []
    seen: set[x509.ObjectIdentifier] = set()
    for value, critical in extensions:
        if value.oid in seen:
            raise ValueError(f"extension {value.oid.dotted_string} appears twice")
        seen.add(value.oid)
        exts.append(x509.Extension(value.oid, critical, value))
    return x509.CertificateBuilder(
        issuer_name=issuer, subject_name=subject,
        public_key=public_key,  # type: ignore[arg-type]
        serial_number=serial, not_valid_before=start, not_valid_after=end, extensions=exts)


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def issue_certificate(
    authority: SigningAuthority,
    request: IssuanceRequest,
    now: datetime,
    serial: int,
    policy: IssuancePolicy,
) -> x509.Certificate:
    """Sign ``request`` with ``authority`` under ``policy``; raises InvalidInput on refusal."""
    builder = plan_certificate(authority, request, now, serial, policy)
    return builder.sign(authority.key, signature_hash_for(authority.key))  # type: ignore[arg-type]


def plan_certificate(
    authority: SigningAuthority,
    request: IssuanceRequest,
    now: datetime,
    serial: int,
    policy: IssuancePolicy,
) -> x509.CertificateBuilder:
    """Every check and field of ``issue_certificate``: the builder that only needs
    ``authority``'s signature. Raises InvalidInput on refusal."""
    template = request.template
    names = request.names
    subject = request.csr.subject if request.subject is None else request.subject
    public_key = request.public_key or request.csr.public_key()
    if template.name == "x509-svid":
        _check_svid_names(names)

    if template.is_ca:
        issuer_plen = authority.path_length
        wanted = 0 if request.path_length is None else request.path_length
        if issuer_plen is not None and wanted >= issuer_plen:
            raise InvalidInput(
                f"a subordinate CA with path length {wanted} needs an issuer with a larger "
                f"path length, but this CA's is {issuer_plen}",
                field="path_length",
            )
        if not subject.rdns:
            raise InvalidInput("a subordinate CA needs a subject name", field="csr.subject")
    elif template.requires_names and names.empty:
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else None
        if not isinstance(cn, str) or not cn:
            raise InvalidInput(
                "the certificate would name nothing: give subject alternative names in the "
                "CSR or with --dns-name/--uri",
                field="dns_names",
            )
        from trustmesh.pki.csr import validate_dns_name

        try:
            names = RequestedNames(dns_names=(validate_dns_name(cn, field="csr.subject.CN"),))
        except InvalidInput as exc:
            raise InvalidInput(
                "the certificate would name nothing: the CSR has no subject alternative "
                f"names and its CN is not a DNS name ({exc.message}); give names with "
                "--dns-name/--uri",
                field="dns_names",
            ) from None
    if not subject.rdns and names.empty:
        raise InvalidInput("the certificate needs a subject or at least one SAN",
                           field="csr.subject")

    _check_names_allowed(names, authority)
    not_before, not_after = plan_validity(
        now, request.validity, template, policy, authority.certificate
    )
    # only passthrough copies the CSR's extensions: parse them only then
    csr_extensions = request.csr.extensions if template.passthrough else None
    profile = extensions_for(template, public_key, csr_extensions, request.path_length)

    extensions: list[tuple[x509.ExtensionType, bool]] = list(profile.items)
    if not names.empty:
        # RFC 5280: the SAN is critical when the subject is empty.
        extensions.append((x509.SubjectAlternativeName(names.to_general_names()),
                           not subject.rdns))
    extensions.append((_ski(public_key), False))
    extensions.extend((ext, False) for ext in _issuer_extensions(
        authority, with_ocsp=not template.ocsp_nocheck))
    return certificate_builder(subject, authority.certificate.subject, public_key, serial,
                               not_before, not_after, extensions)
