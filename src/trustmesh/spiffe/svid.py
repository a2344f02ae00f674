"""X509-SVIDs: the profile checks, a pure builder, and chain verification against bundles.

The rules come from the X509-SVID specification:

- a leaf carries exactly one URI SAN, a SPIFFE ID with a non-root path; when its
  subject is empty that SAN is critical;
- a leaf is not a CA (basicConstraints cA false), has a critical keyUsage with
  digitalSignature and without keyCertSign or cRLSign (keyEncipherment and
  keyAgreement are allowed); when it has an extended key usage, both serverAuth
  and clientAuth are in it;
- a signing certificate is a CA (cA true) with a critical keyUsage that has
  keyCertSign; if it carries a SPIFFE ID, that ID has no path.

Violations raise :class:`InvalidInput` naming the rule. Verification
(:func:`verify_x509_svid`) runs RFC 5280 path validation with
``cryptography.x509.verification`` up to the X.509 authorities of the leaf's own
trust domain, and raises :class:`PermissionDenied` when the chain is not trusted.
Nothing here does IO or reads the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.spiffe.bundle import Bundle, BundleSource, bundle_for
from trustmesh.spiffe.ids import SpiffeId, TrustDomain

__all__ = [
    "SVID_ORGANIZATION",
    "X509Svid",
    "build_signing_certificate",
    "build_x509_svid",
    "parse_x509_svid",
    "spiffe_id_from_certificate",
    "validate_leaf_certificate",
    "validate_signing_certificate",
    "verify_x509_svid",
]

#: The subject organization of the SVIDs trustmesh builds (the subject is informational).
SVID_ORGANIZATION = "trustmesh"


# -- profile checks ---------------------------------------------------------------------------

_E = TypeVar("_E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, cls: type[_E]) -> x509.Extension[_E] | None:
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or undecodable extensions
        raise InvalidInput(f"the certificate's extensions are malformed: {exc}") from None


def _uri_sans(cert: x509.Certificate) -> tuple[list[str], bool]:
    ext = _ext(cert, x509.SubjectAlternativeName)
    if ext is None:
        return [], False
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier), ext.critical


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X509-SVID: its one URI SAN, which must be a valid SPIFFE ID."""
    uris, _ = _uri_sans(cert)
    if not uris:
        raise InvalidInput("the certificate has no URI SAN; an X509-SVID carries its SPIFFE ID "
                           "as its one URI SAN")
    if len(uris) > 1:
        raise InvalidInput(f"the certificate has {len(uris)} URI SANs; an X509-SVID has exactly "
                           "one (its SPIFFE ID)")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidInput as exc:
        raise InvalidInput(f"the URI SAN is not a valid SPIFFE ID: {exc.message}") from None


def _key_usage(cert: x509.Certificate, role: str) -> x509.KeyUsage:
    ext = _ext(cert, x509.KeyUsage)
    if ext is None:
        raise InvalidInput(f"the {role} has no keyUsage extension; SVIDs must have one, "
                           "marked critical")
    if not ext.critical:
        raise InvalidInput(f"the {role}'s keyUsage extension must be marked critical")
    return ext.value


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    ext = _ext(cert, x509.BasicConstraints)
    return None if ext is None else ext.value


def validate_leaf_certificate(cert: x509.Certificate) -> SpiffeId:
    """Check ``cert`` against the X509-SVID leaf profile and return its SPIFFE ID."""
    sid = spiffe_id_from_certificate(cert)
    if sid.is_trust_domain_id:
        raise InvalidInput(f"the leaf's SPIFFE ID {sid} has no path; leaf SVIDs need a "
                           "non-root path")
    _, san_critical = _uri_sans(cert)
    if not cert.subject.rdns and not san_critical:
        raise InvalidInput("the leaf has an empty subject, so its SAN extension must be "
                           "marked critical (RFC 5280 4.1.2.6)")
    bc = _basic_constraints(cert)
    if bc is not None and bc.ca:
        raise InvalidInput("the leaf is a CA certificate (basicConstraints cA is true); leaf "
                           "SVIDs must have cA false")
    ku = _key_usage(cert, "leaf")
    if not ku.digital_signature:
        raise InvalidInput("the leaf's keyUsage lacks digitalSignature, which leaf SVIDs "
                           "must set")
    if ku.key_cert_sign:
        raise InvalidInput("the leaf's keyUsage sets keyCertSign, which leaf SVIDs must not")
    if ku.crl_sign:
        raise InvalidInput("the leaf's keyUsage sets cRLSign, which leaf SVIDs must not")
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is not None:
        missing = [name for oid, name in ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                                          (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"))
                   if oid not in eku.value]
        if missing:
            raise InvalidInput(f"the leaf's extendedKeyUsage lacks {' and '.join(missing)}; "
                               "when present it must have both serverAuth and clientAuth")
    return sid


def validate_signing_certificate(cert: x509.Certificate) -> SpiffeId | None:
    """Check ``cert`` against the X509-SVID signing-certificate profile.

    Returns its SPIFFE ID when it carries one (a trust domain ID, no path), else None.
    """
    bc = _basic_constraints(cert)
    if bc is None:
        raise InvalidInput("the signing certificate has no basicConstraints; it must be a CA "
                           "(cA true)")
    if not bc.ca:
        raise InvalidInput("the signing certificate is not a CA (basicConstraints cA is false)")
    ku = _key_usage(cert, "signing certificate")
    if not ku.key_cert_sign:
        raise InvalidInput("the signing certificate's keyUsage lacks keyCertSign, which "
                           "signing certificates must set")
    uris, _ = _uri_sans(cert)
    spiffe_uris = [u for u in uris if u[:9].lower() == "spiffe://"]
    if not spiffe_uris:
        return None
    if len(spiffe_uris) > 1:
        raise InvalidInput("the signing certificate has more than one SPIFFE ID")
    try:
        sid = SpiffeId.parse(spiffe_uris[0])
    except InvalidInput as exc:
        raise InvalidInput("the signing certificate's URI SAN is not a valid SPIFFE ID: "
                           f"{exc.message}") from None
    if not sid.is_trust_domain_id:
        raise InvalidInput(f"the signing certificate's SPIFFE ID {sid} has a path; signing "
                           "certificates carry a trust domain ID only")
    return sid


# -- building ---------------------------------------------------------------------------------

def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = _ext(issuer_cert, x509.SubjectKeyIdentifier)
    if ski is None:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _utc(t: datetime, name: str) -> datetime:
    if t.tzinfo is None:
        raise InvalidInput(f"{name} must be timezone-aware")
    return t.astimezone(UTC)


def build_x509_svid(
    spiffe_id: SpiffeId,
    public_key: CertificatePublicKeyTypes,
    issuer_cert: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """Sign a leaf X509-SVID for ``spiffe_id`` that follows the X509-SVID profile.

    The subject is ``O=trustmesh`` (plus ``CN=<first DNS name>`` when DNS names are
    given); the SAN holds the SPIFFE ID first, then the DNS names. keyUsage is
    digitalSignature (and keyEncipherment for RSA keys), critical; the extended key
    usage is serverAuth and clientAuth; basicConstraints cA false, critical.
    """
    if spiffe_id.is_trust_domain_id:
        raise InvalidInput(f"{spiffe_id} has no path; leaf SVIDs need a non-root path")
    nb, na = _utc(not_before, "not_before"), _utc(not_after, "not_after")
    if na <= nb:
        raise InvalidInput("not_after must be later than not_before")
    if serial <= 0 or serial.bit_length() > 159:
        raise InvalidInput("the serial number must be positive and at most 159 bits")
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, SVID_ORGANIZATION)]
    if dns_names:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(d) for d in dns_names]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
    )
    return builder.sign(issuer_key, _hash_for(issuer_key))


def build_signing_certificate(
    trust_domain: TrustDomain,
    public_key: CertificatePublicKeyTypes,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    *,
    issuer_cert: x509.Certificate | None = None,
    path_length: int | None = None,
    common_name: str | None = None,
) -> x509.Certificate:
    """Sign an X509-SVID signing (CA) certificate for ``trust_domain``.

    Self-signed when ``issuer_cert`` is None (then ``issuer_key`` is the key of
    ``public_key``). The certificate carries the trust domain ID as its URI SAN,
    keyCertSign and cRLSign (critical) and cA true (critical).
    """
    nb, na = _utc(not_before, "not_before"), _utc(not_after, "not_after")
    if na <= nb:
        raise InvalidInput("not_after must be later than not_before")
    if serial <= 0 or serial.bit_length() > 159:
        raise InvalidInput("the serial number must be positive and at most 159 bits")
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, SVID_ORGANIZATION),
             x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{trust_domain} CA")]
    subject = x509.Name(attrs)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(str(trust_domain.id))]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(_aki(issuer_cert), critical=False)
    return builder.sign(issuer_key, _hash_for(issuer_key))


# -- the SVID value -------------------------------------------------------------------------

@dataclass(frozen=True)
class X509Svid:
    """An X509-SVID with its private key: the leaf first, then intermediates up to the bundle."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes
    hint: str = ""

    def __post_init__(self) -> None:
        if not self.cert_chain:
            raise InvalidInput("an X509-SVID needs at least its leaf certificate")

    @property
    def leaf(self) -> x509.Certificate:
        """The leaf certificate (the SVID proper)."""
        return self.cert_chain[0]

    @property
    def expires_at(self) -> datetime:
        """When the leaf stops being valid (timezone-aware UTC)."""
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        """The chain as PEM certificates, leaf first."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    def to_pem(self) -> tuple[bytes, bytes]:
        """``(chain_pem, key_pem)``."""
        return self.chain_pem(), self.key_pem()

    def chain_der(self) -> bytes:
        """The chain as concatenated DER, leaf first (the Workload API form)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.cert_chain)

    def key_der(self) -> bytes:
        """The private key as PKCS#8 DER (the Workload API form)."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())


def _load_chain(data: bytes | Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    if not isinstance(data, bytes | bytearray):
        return tuple(data)
    raw = bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return tuple(x509.load_pem_x509_certificates(raw))
        return tuple(x509.load_der_x509_certificate(der) for der in _split_der(raw))
    except ValueError as exc:
        raise InvalidInput(f"the certificate chain is not readable: {exc}") from None


def _split_der(raw: bytes) -> list[bytes]:
    """Cut concatenated DER certificates (each a SEQUENCE) apart."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if raw[pos] != 0x30 or pos + 2 > len(raw):
            raise ValueError(f"no DER SEQUENCE at byte {pos}")
        first = raw[pos + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + 2 + count > len(raw):
                raise ValueError(f"bad DER length at byte {pos}")
            length = int.from_bytes(raw[pos + 2:pos + 2 + count], "big")
            header = 2 + count
        end = pos + header + length
        if end > len(raw):
            raise ValueError(f"truncated DER certificate at byte {pos}")
        out.append(raw[pos:end])
        pos = end
    return out


def _load_key(data: bytes | PrivateKeyTypes) -> PrivateKeyTypes:
    if not isinstance(data, bytes | bytearray):
        return data
    raw = bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_private_key(raw, password=None)
        return serialization.load_der_private_key(raw, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(f"the private key is not readable as unencrypted PKCS#8: {exc}"
                           ) from None


def parse_x509_svid(chain: bytes | Sequence[x509.Certificate], private_key: bytes | PrivateKeyTypes,
                    hint: str = "") -> X509Svid:
    """Read an X509-SVID (DER or PEM chain, PKCS#8 key) and check its profile and key.

    The leaf must follow the leaf profile, every other certificate the signing
    profile, and the private key must belong to the leaf. Trust is not checked:
    use :func:`verify_x509_svid` for that.
    """
    certs = _load_chain(chain)
    if not certs:
        raise InvalidInput("the certificate chain is empty")
    key = _load_key(private_key)
    sid = validate_leaf_certificate(certs[0])
    for i, cert in enumerate(certs[1:], start=1):
        try:
            validate_signing_certificate(cert)
        except InvalidInput as exc:
            raise InvalidInput(f"certificate {i} of the chain: {exc.message}") from None
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, fmt) != \
            certs[0].public_key().public_bytes(serialization.Encoding.DER, fmt):
        raise InvalidInput("the private key does not match the leaf certificate's public key")
    return X509Svid(sid, certs, key, hint)


# -- verification ---------------------------------------------------------------------------

def verify_x509_svid(chain: Sequence[x509.Certificate] | X509Svid,
                     bundles: BundleSource | Bundle, now: datetime) -> SpiffeId:
    """Verify a presented chain (leaf first) and return the leaf's SPIFFE ID.

    The leaf must follow the leaf profile; the chain must validate (RFC 5280:
    signatures, validity at ``now``, CA constraints, path length) up to an X.509
    authority of the bundle of the leaf's own trust domain; and every intermediate
    on the validated path must follow the signing-certificate profile.
    Raises InvalidInput for a malformed leaf, PermissionDenied for an untrusted chain.
    """
    certs = chain.cert_chain if isinstance(chain, X509Svid) else tuple(chain)
    if not certs:
        raise InvalidInput("no certificate was presented")
    leaf = certs[0]
    sid = validate_leaf_certificate(leaf)
    bundle = bundle_for(bundles, sid.trust_domain)
    if bundle is None:
        raise PermissionDenied(f"no bundle for the trust domain {sid.trust_domain} of {sid}")
    if not bundle.x509_authorities:
        raise PermissionDenied(f"the bundle of {sid.trust_domain} has no X.509 authorities")
    verifier = (
        PolicyBuilder()
        .store(Store(list(bundle.x509_authorities)))
        .time(_utc(now, "now"))
        # The leaf profile is the SPIFFE one checked above, not the web PKI's.
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                            ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(certs[1:]))
    except VerificationError as exc:
        raise PermissionDenied(f"the X509-SVID of {sid} does not chain to the bundle of "
                               f"{sid.trust_domain}: {exc}") from None
    anchors = {c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities}
    for cert in verified.chain[1:]:
        if cert.public_bytes(serialization.Encoding.DER) in anchors:
            break
        try:
            validate_signing_certificate(cert)
        except InvalidInput as exc:
            raise PermissionDenied(f"an intermediate of {sid}'s chain is not an X509-SVID "
                                   f"signing certificate: {exc.message}") from None
    return sid
