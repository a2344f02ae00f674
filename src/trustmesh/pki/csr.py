"""PKCS#10 requests and names: parse, verify, and refuse what a CA must not sign."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from trustmesh.errors import InvalidInput
from trustmesh.spiffe.ids import SpiffeId

__all__ = [
    "RequestedNames",
    "check_public_key",
    "load_csr",
    "load_csr_and_key",
    "validate_dns_name",
    "validate_uri",
]

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
_ALLOWED_CURVES = {"secp256r1", "secp384r1", "secp521r1"}
_MAX_CSR_BYTES = 64 * 1024


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR and check its self-signature and its key."""
    return load_csr_and_key(data)[0]


def load_csr_and_key(data: bytes) -> tuple[x509.CertificateSigningRequest, object]:
    """``load_csr``, also returning the CSR's public key (extracting it is not free)."""
    if not data or not data.strip():
        raise InvalidInput("the CSR is empty", field="csr")
    if len(data) > _MAX_CSR_BYTES:
        raise InvalidInput(f"the CSR is larger than {_MAX_CSR_BYTES} bytes", field="csr")
    stripped = data.lstrip()
    try:
        if stripped.startswith(b"-----BEGIN"):
            if b"-----BEGIN CERTIFICATE REQUEST-----" not in stripped and (
                b"-----BEGIN NEW CERTIFICATE REQUEST-----" not in stripped
            ):
                raise InvalidInput(
                    "expected a PEM block 'CERTIFICATE REQUEST'", field="csr"
                )
            csr = x509.load_pem_x509_csr(stripped)
        else:
            csr = x509.load_der_x509_csr(data)
    except InvalidInput:
        raise
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise InvalidInput(f"not a valid PKCS#10 CSR (PEM or DER): {exc}", field="csr") from None
    try:
        key = csr.public_key()
    except Exception as exc:
        raise InvalidInput(f"unsupported public key in the CSR: {exc}", field="csr") from None
    check_public_key(key)
    try:
        valid = _signature_valid(csr, key)
    except Exception as exc:  # unsupported algorithm surfaces here
        raise InvalidInput(f"cannot check the CSR signature: {exc}", field="csr") from None
    if not valid:
        raise InvalidInput(
            "the CSR signature does not verify with its own public key "
            "(tampered or corrupt request)",
            field="csr",
        )
    return csr, key


# the usual ECDSA signature algorithms, each one verifier object (the library builds one per
# call otherwise)
_ECDSA_BY_OID = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}


def _signature_valid(csr: x509.CertificateSigningRequest, key: object) -> bool:
    """The CSR's self-signature, checked with the key already extracted.

    ``is_signature_valid`` decodes the public key a second time, which costs about as
    much again as the ECDSA verification itself; for the key types a CA meets every
    day the check goes through the extracted key. A signature algorithm that does not
    fit the key is a bad signature, as it is for ``is_signature_valid``.
    """
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            ecdsa = _ECDSA_BY_OID.get(csr.signature_algorithm_oid)
            if ecdsa is None:
                other = csr.signature_algorithm_parameters
                if not isinstance(other, ec.ECDSA):
                    return False
                ecdsa = other
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ecdsa)
        elif isinstance(key, rsa.RSAPublicKey):
            params = csr.signature_algorithm_parameters
            hash_algorithm = csr.signature_hash_algorithm
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or hash_algorithm is None:
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes, params, hash_algorithm)
        else:
            return csr.is_signature_valid
    except InvalidSignature:
        return False
    return True


def check_public_key(key: object) -> None:
    """Refuse weak or unknown keys: RSA below 2048 bits, curves other than P-256/384/521."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidInput(
                f"RSA key of {key.key_size} bits is too weak; at least {MIN_RSA_BITS} required",
                field="csr.publicKey",
            )
        if key.key_size > MAX_RSA_BITS:
            raise InvalidInput(
                f"RSA key of {key.key_size} bits is larger than the {MAX_RSA_BITS}-bit maximum",
                field="csr.publicKey",
            )
        if key.public_numbers().e < 65537:
            raise InvalidInput("RSA public exponent below 65537 is refused",
                               field="csr.publicKey")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _ALLOWED_CURVES:
            raise InvalidInput(
                f"elliptic curve {key.curve.name} is not accepted; use P-256, P-384 or P-521",
                field="csr.publicKey",
            )
        return
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return
    if isinstance(key, dsa.DSAPublicKey):
        raise InvalidInput("DSA keys are not accepted", field="csr.publicKey")
    raise InvalidInput(f"unsupported public key type {type(key).__name__}", field="csr.publicKey")


_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_dns_name(name: str, *, field: str = "dns_names") -> str:
    """Check a DNS SAN (RFC 1123 labels; a wildcard only as the whole leftmost label)."""
    known = _VALID_DNS_NAMES.get(name)  # renewals bring the same names back
    if known is not None:
        return known
    lowered = _check_dns_name(name, field)
    if len(_VALID_DNS_NAMES) >= _REMEMBER_AT_MOST:
        _VALID_DNS_NAMES.clear()
    _VALID_DNS_NAMES[name] = lowered
    return lowered


_VALID_DNS_NAMES: dict[str, str] = {}  # name as given -> its checked, lower-case form


def _check_dns_name(name: str, field: str) -> str:
    if not name:
        raise InvalidInput("empty DNS name", field=field)
    if _WHITESPACE.search(name):
        raise InvalidInput(f"DNS name {name!r} contains whitespace", field=field)
    lowered = name.lower()
    if lowered.endswith("."):
        raise InvalidInput(f"DNS name {name!r} must not end with a dot", field=field)
    if len(lowered) > 253:
        raise InvalidInput(f"DNS name {name!r} is longer than 253 characters", field=field)
    labels = lowered.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 2:
            continue
        if "*" in label:
            raise InvalidInput(
                f"DNS name {name!r}: a wildcard may only be the whole leftmost label "
                "of a name with at least three labels",
                field=field,
            )
        if not _LABEL.match(label):
            raise InvalidInput(
                f"DNS name {name!r}: label {label!r} is not a valid hostname label "
                "(letters, digits and inner hyphens, 1-63 characters)",
                field=field,
            )
    return lowered


_WHITESPACE = re.compile(r"\s")
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*")


def validate_uri(uri: str, *, field: str = "uris") -> str:
    """Check a URI SAN: absolute, with a scheme; SPIFFE IDs must follow their spec."""
    if uri in _VALID_URIS:  # the same SPIFFE IDs come back at every renewal
        return uri
    checked = _check_uri(uri, field)
    if len(_VALID_URIS) >= _REMEMBER_AT_MOST:
        _VALID_URIS.clear()
    _VALID_URIS.add(checked)
    return checked


_VALID_URIS: set[str] = set()  # URIs that passed _check_uri (a pure check of the string)
_REMEMBER_AT_MOST = 8192  # names remembered per kind before the memory starts again


def _check_uri(uri: str, field: str) -> str:
    if not uri or _WHITESPACE.search(uri):
        raise InvalidInput(f"URI {uri!r} is empty or contains whitespace", field=field)
    if uri.startswith("spiffe://"):  # every X509-SVID: the SPIFFE rules say it all
        SpiffeId.parse(uri)
        return uri
    parts = urlsplit(uri)
    if not parts.scheme or not _SCHEME.fullmatch(parts.scheme):
        raise InvalidInput(f"URI {uri!r} has no valid scheme", field=field)
    if parts.scheme == "spiffe":
        SpiffeId.parse(uri)
    elif not parts.netloc and not parts.path:
        raise InvalidInput(f"URI {uri!r} has nothing after the scheme", field=field)
    return uri


@dataclass(frozen=True)
class RequestedNames:
    """SANs for a certificate: from the CSR plus those asked for on the request."""

    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.dns_names or self.uris or self.ip_addresses or self.emails)

    def to_general_names(self) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.DNSName(d) for d in self.dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in self.ip_addresses]
        names += [x509.RFC822Name(e) for e in self.emails]
        return names

    @classmethod
    def collect(
        cls,
        csr: x509.CertificateSigningRequest,
        dns_names: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
    ) -> RequestedNames:
        """Merge and validate the CSR's SANs and the extra names of the request."""
        csr_dns: list[str] = []
        csr_uris: list[str] = []
        csr_ips: list[str] = []
        csr_emails: list[str] = []
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            san = None
        except ValueError as exc:
            raise InvalidInput(f"the CSR's extensions cannot be parsed: {exc}",
                               field="csr") from None
        if san is not None:
            for gn in san.value:
                if isinstance(gn, x509.DNSName):
                    csr_dns.append(gn.value)
                elif isinstance(gn, x509.UniformResourceIdentifier):
                    csr_uris.append(gn.value)
                elif isinstance(gn, x509.IPAddress):
                    csr_ips.append(str(gn.value))
                elif isinstance(gn, x509.RFC822Name):
                    csr_emails.append(gn.value)
                else:
                    raise InvalidInput(
                        f"the CSR asks for a {type(gn).__name__} name, which is not supported",
                        field="csr.subjectAltName",
                    )
        dns = _dedupe(validate_dns_name(d, field="dns_names") for d in (*csr_dns, *dns_names))
        uri_list = _dedupe(validate_uri(u, field="uris") for u in (*csr_uris, *uris))
        ips: list[str] = []
        for a in (*csr_ips, *ip_addresses):
            try:
                ips.append(str(ipaddress.ip_address(a)))
            except ValueError:
                raise InvalidInput(f"{a!r} is not an IP address", field="ip_addresses") from None
        emails = []
        for e in csr_emails:
            if "@" not in e or e.startswith("@") or e.endswith("@"):
                raise InvalidInput(f"{e!r} is not an email address", field="csr.subjectAltName")
            emails.append(e)
        return cls(tuple(dns), tuple(uri_list), tuple(_dedupe(ips)), tuple(_dedupe(emails)))


def _dedupe(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out
