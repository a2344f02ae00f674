"""Certificate templates: each fixes key usage, extended key usage and basic constraints.

A template is a pure value. ``extensions_for`` turns a template, the subject
public key and (for ``csr-passthrough``) the CSR's own extensions into the
profile-defining extensions of the certificate. The CA adds the identifiers
(SKI, AKI), the names (SAN) and the revocation pointers (CRL DP, AIA).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from trustmesh.errors import InvalidInput

__all__ = [
    "TEMPLATES",
    "CertificateTemplate",
    "ProfileExtensions",
    "extensions_for",
    "get_template",
]


@dataclass(frozen=True)
class CertificateTemplate:
    name: str
    description: str
    max_validity: timedelta
    eku: tuple[x509.ObjectIdentifier, ...] = ()
    is_ca: bool = False
    ocsp_nocheck: bool = False
    passthrough: bool = False
    requires_names: bool = True  # end-entity certificates must name something


_DAY = timedelta(days=1)

TEMPLATES: dict[str, CertificateTemplate] = {
    t.name: t
    for t in (
        CertificateTemplate(
            "end-entity",
            "TLS server and client authentication",
            397 * _DAY,
            eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        ),
        CertificateTemplate(
            "end-entity-server",
            "TLS server authentication only",
            397 * _DAY,
            eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
        ),
        CertificateTemplate(
            "end-entity-client",
            "TLS client authentication only",
            397 * _DAY,
            eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        ),
        CertificateTemplate(
            "x509-svid",
            "SPIFFE X509-SVID: one URI SAN, TLS server and client authentication",
            30 * _DAY,
            eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        ),
        CertificateTemplate(
            "code-signing",
            "code signing",
            3 * 365 * _DAY,
            eku=(ExtendedKeyUsageOID.CODE_SIGNING,),
            requires_names=False,
        ),
        CertificateTemplate(
            "ocsp-signing",
            "delegated OCSP responder (id-kp-OCSPSigning, ocsp-nocheck)",
            30 * _DAY,
            eku=(ExtendedKeyUsageOID.OCSP_SIGNING,),
            ocsp_nocheck=True,
            requires_names=False,
        ),
        CertificateTemplate(
            "subordinate-ca",
            "subordinate CA with a path length",
            5 * 365 * _DAY,
            is_ca=True,
            requires_names=False,
        ),
        CertificateTemplate(
            "csr-passthrough",
            "extensions taken from the CSR after validation (never a CA)",
            397 * _DAY,
            passthrough=True,
            requires_names=False,
        ),
    )
}


def get_template(name: str) -> CertificateTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise InvalidInput(f"unknown template {name!r}; known templates: {known}",
                           field="template") from None


@dataclass(frozen=True)
class ProfileExtensions:
    """Extensions a template fixes: (extension value, critical) pairs in order."""

    items: tuple[tuple[x509.ExtensionType, bool], ...]


def _leaf_key_usage(public_key: object, *, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment and isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# Extensions a passthrough CSR may carry. Anything else is refused, so a CSR
# cannot smuggle in name constraints, policy mappings or CA powers.
_PASSTHROUGH_ALLOWED = {
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.TLS_FEATURE,
    ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
}


def extensions_for(
    template: CertificateTemplate,
    public_key: object,
    csr_extensions: x509.Extensions | None = None,
    path_length: int | None = None,
) -> ProfileExtensions:
    """The profile extensions of a certificate issued with ``template``.

    ``path_length`` applies to ``subordinate-ca`` only. For ``csr-passthrough``
    the CSR's extensions are validated and copied (SAN excluded: the CA
    handles names for every template).
    """
    if path_length is not None and not template.is_ca:
        raise InvalidInput(
            f"a path length only applies to the subordinate-ca template, not {template.name}",
            field="path_length",
        )
    items: list[tuple[x509.ExtensionType, bool]] = []
    if template.is_ca:
        plen = 0 if path_length is None else path_length
        if plen < 0:
            raise InvalidInput("path length cannot be negative", field="path_length")
        items.append((x509.BasicConstraints(ca=True, path_length=plen), True))
        items.append(
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
        )
        return ProfileExtensions(tuple(items))

    if template.passthrough:
        return ProfileExtensions(_passthrough_extensions(csr_extensions))

    # A leaf profile depends on the template and on whether the key is RSA, nothing else:
    # made once per pair (the extension values are immutable).
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    known = TEMPLATES.get(template.name) is template
    cached = _LEAF_PROFILES.get((template.name, rsa_key)) if known else None
    if cached is not None:
        return cached
    items.append((x509.BasicConstraints(ca=False, path_length=None), True))
    server = ExtendedKeyUsageOID.SERVER_AUTH in template.eku
    items.append((_leaf_key_usage(public_key, key_encipherment=server), True))
    items.append((x509.ExtendedKeyUsage(list(template.eku)), False))
    if template.ocsp_nocheck:
        items.append((x509.OCSPNoCheck(), False))
    profile = ProfileExtensions(tuple(items))
    if known:
        _LEAF_PROFILES[(template.name, rsa_key)] = profile
    return profile


_LEAF_PROFILES: dict[tuple[str, bool], ProfileExtensions] = {}


def _passthrough_extensions(
    csr_extensions: x509.Extensions | None,
) -> tuple[tuple[x509.ExtensionType, bool], ...]:
    items: list[tuple[x509.ExtensionType, bool]] = []
    seen_bc = False
    for ext in csr_extensions or ():
        oid = ext.oid
        if oid not in _PASSTHROUGH_ALLOWED:
            name = getattr(oid, "_name", None) or oid.dotted_string
            raise InvalidInput(
                f"the CSR asks for extension {name} ({oid.dotted_string}), which "
                "csr-passthrough does not copy; allowed: key usage, extended key usage, "
                "subject alternative name, basic constraints (CA:FALSE), TLS feature, "
                "certificate policies",
                field="csr.extensions",
            )
        if oid in (ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.SUBJECT_KEY_IDENTIFIER):
            continue  # names are validated and added by the CA; the SKI is recomputed
        value = ext.value
        if isinstance(value, x509.BasicConstraints):
            if value.ca:
                raise InvalidInput(
                    "the CSR asks for CA:TRUE; csr-passthrough never issues CA certificates "
                    "(use the subordinate-ca template)",
                    field="csr.extensions.basicConstraints",
                )
            seen_bc = True
            items.append((x509.BasicConstraints(ca=False, path_length=None), True))
            continue
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise InvalidInput(
                "the CSR asks for keyCertSign or cRLSign key usage, which only CA "
                "certificates may have",
                field="csr.extensions.keyUsage",
            )
        items.append((value, ext.critical))
    if not seen_bc:
        items.insert(0, (x509.BasicConstraints(ca=False, path_length=None), True))
    return tuple(items)
