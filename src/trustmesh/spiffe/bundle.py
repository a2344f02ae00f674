"""SPIFFE bundles: the trust anchors of one trust domain, and their JWKS form.

A bundle holds the X.509 authorities (CA certificates that X509-SVIDs chain
to) and the JWT authorities (public keys, by key id, that sign JWT-SVIDs) of
one trust domain, plus the optional ``spiffe_sequence`` and
``spiffe_refresh_hint`` parameters of the SPIFFE Trust Domain and Bundle
specification.

The JWKS document follows that specification and the SVID specifications:

- an X.509 authority is a JWK with ``use: x509-svid`` whose ``x5c`` holds the
  CA certificate (standard base64 DER); we publish no ``kid`` on these;
- a JWT authority is a JWK with ``use: jwt-svid`` and a ``kid``;
- JWKs of an unknown ``use`` or ``kty`` are ignored, as the specification asks;
  everything else that is wrong raises :class:`InvalidInput` naming the entry
  (``keys[3]``).

Reading ``x509-svid`` entries follows section 6.2 of the X509-SVID
specification: an entry without ``x5c`` (or with an empty one) is ignored and
only the first certificate of ``x5c`` counts. ``strict=True`` refuses both, as
go-spiffe and SPIRE do.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from trustmesh.errors import InvalidInput
from trustmesh.spiffe.ids import TrustDomain

__all__ = [
    "Bundle",
    "BundleSet",
    "BundleSource",
    "JwtAuthorityKey",
    "bundle_for",
    "jwk_from_public_key",
    "public_key_from_jwk",
]

#: Public keys a JWT-SVID may be signed with (the JWT-SVID algorithms are RSA and ECDSA).
JwtAuthorityKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_X509_USE = "x509-svid"
_JWT_USE = "jwt-svid"
_PRIVATE_PARAMS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")

# JWK "crv" names (RFC 7518 section 6.2.1.1) and the coordinate size in bytes.
_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(value: object, where: str | None, name: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{name!r} must be a non-empty base64url string", field=where)
    if value.endswith("=") or "+" in value or "/" in value:
        raise InvalidInput(f"{name!r} must be unpadded base64url (RFC 7515)", field=where)
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{name!r} is not valid base64url", field=where) from None


def _uint(n: int, size: int | None = None) -> bytes:
    return n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big")


def jwk_from_public_key(public_key: object) -> dict[str, str]:
    """The public JWK parameters (RFC 7518 section 6) of an EC, RSA or EdDSA key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(public_key.curve.name)
        if crv is None:
            raise InvalidInput(f"the curve {public_key.curve.name} has no JWK name")
        size = _CURVES[crv][1]
        nums = public_key.public_numbers()
        return {"kty": "EC", "crv": crv, "x": _b64url(_uint(nums.x, size)),
                "y": _b64url(_uint(nums.y, size))}
    if isinstance(public_key, rsa.RSAPublicKey):
        rnums = public_key.public_numbers()
        return {"kty": "RSA", "n": _b64url(_uint(rnums.n)), "e": _b64url(_uint(rnums.e))}
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        crv = "Ed25519" if isinstance(public_key, ed25519.Ed25519PublicKey) else "Ed448"
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": crv, "x": _b64url(raw)}
    raise InvalidInput(f"a {type(public_key).__name__} cannot be written as a JWK")


def public_key_from_jwk(jwk: Mapping[str, Any], where: str | None = None) -> object:
    """The public key a JWK describes; InvalidInput (with ``field=where``) if malformed.

    Supports ``kty`` EC (P-256, P-384, P-521), RSA and OKP (Ed25519, Ed448).
    """
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        if crv not in _CURVES:
            raise InvalidInput(f"unsupported EC curve {crv!r}; "
                               f"expected one of {', '.join(_CURVES)}", field=where)
        curve_cls, size = _CURVES[crv]
        x = _b64url_decode(jwk.get("x"), where, "x")
        y = _b64url_decode(jwk.get("y"), where, "y")
        if len(x) != size or len(y) != size:
            raise InvalidInput(f"{crv} coordinates must be {size} bytes each", field=where)
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve_cls()).public_key()
        except ValueError:
            raise InvalidInput(f"the point (x, y) is not on {crv}", field=where) from None
    if kty == "RSA":
        n = int.from_bytes(_b64url_decode(jwk.get("n"), where, "n"), "big")
        e = int.from_bytes(_b64url_decode(jwk.get("e"), where, "e"), "big")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise InvalidInput(f"not a usable RSA public key ({exc})", field=where) from None
    if kty == "OKP":
        crv = jwk.get("crv")
        raw = _b64url_decode(jwk.get("x"), where, "x")
        try:
            if crv == "Ed25519":
                return ed25519.Ed25519PublicKey.from_public_bytes(raw)
            if crv == "Ed448":
                return ed448.Ed448PublicKey.from_public_bytes(raw)
        except ValueError:
            raise InvalidInput(f"'x' is not a {crv} public key", field=where) from None
        raise InvalidInput(f"unsupported OKP curve {crv!r}", field=where)
    raise InvalidInput(f"unsupported key type {kty!r}", field=where)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _same_key(a: object, b: object) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(a.public_bytes(serialization.Encoding.DER, fmt)  # type: ignore[attr-defined]
                == b.public_bytes(serialization.Encoding.DER, fmt))  # type: ignore[attr-defined]


def _check_count(value: object, where: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name!r} must be a non-negative integer, not {value!r}", field=where)
    return value


@dataclass(frozen=True, eq=False)
class Bundle:
    """The trust anchors of one trust domain; immutable, ``with_*`` return new bundles."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, JwtAuthorityKey] = field(default_factory=dict)
    sequence_number: int | None = None
    refresh_hint: int | None = None
    """Seconds the publisher suggests between refreshes."""

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise InvalidInput("a bundle's trust domain must be a TrustDomain, not "
                               f"{type(self.trust_domain).__name__}")
        certs = tuple(self.x509_authorities)
        for i, cert in enumerate(certs):
            if not isinstance(cert, x509.Certificate):
                raise InvalidInput(f"x509_authorities[{i}] is a {type(cert).__name__}, "
                                   "not a certificate")
        object.__setattr__(self, "x509_authorities", _dedupe(certs))
        keys = dict(self.jwt_authorities)
        for kid, key in keys.items():
            if not isinstance(kid, str) or not kid:
                raise InvalidInput("JWT authority key ids must be non-empty strings")
            if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise InvalidInput(f"JWT authority {kid!r} must be an EC or RSA public key, "
                                   f"not {type(key).__name__}")
        object.__setattr__(self, "jwt_authorities", MappingProxyType(keys))
        _check_count(self.sequence_number, "spiffe_sequence", "sequence_number")
        _check_count(self.refresh_hint, "spiffe_refresh_hint", "refresh_hint")

    # -- value semantics -------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bundle):
            return NotImplemented
        return (self.trust_domain == other.trust_domain
                and self.x509_authorities == other.x509_authorities
                and dict(self.jwt_authorities) == dict(other.jwt_authorities)
                and self.sequence_number == other.sequence_number
                and self.refresh_hint == other.refresh_hint)

    def __hash__(self) -> int:
        return hash((self.trust_domain, self.x509_authorities,
                     tuple(sorted(self.jwt_authorities)), self.sequence_number,
                     self.refresh_hint))

    def same_authorities(self, other: Bundle) -> bool:
        """True when both bundles trust the same keys (ignoring order, sequence and hint)."""
        return (self.trust_domain == other.trust_domain
                and {_der(c) for c in self.x509_authorities}
                == {_der(c) for c in other.x509_authorities}
                and dict(self.jwt_authorities) == dict(other.jwt_authorities))

    # -- immutable updates -----------------------------------------------------------------

    def with_x509_authority(self, cert: x509.Certificate) -> Bundle:
        """A copy that also trusts ``cert`` (no change if it is already there)."""
        return replace(self, x509_authorities=(*self.x509_authorities, cert))

    def without_x509_authority(self, cert: x509.Certificate) -> Bundle:
        """A copy that no longer trusts ``cert``."""
        der = _der(cert)
        return replace(self, x509_authorities=tuple(
            c for c in self.x509_authorities if _der(c) != der))

    def with_jwt_authority(self, kid: str, public_key: JwtAuthorityKey) -> Bundle:
        """A copy with ``public_key`` under ``kid``; a different key under that kid is refused."""
        old = self.jwt_authorities.get(kid)
        if old is not None and not _same_key(old, public_key):
            raise InvalidInput(f"the bundle already has a different JWT authority {kid!r}")
        return replace(self, jwt_authorities={**self.jwt_authorities, kid: public_key})

    def without_jwt_authority(self, kid: str) -> Bundle:
        """A copy without the JWT authority ``kid``."""
        return replace(self, jwt_authorities={
            k: v for k, v in self.jwt_authorities.items() if k != kid})

    def with_sequence_number(self, sequence_number: int | None) -> Bundle:
        """A copy with another ``spiffe_sequence``."""
        return replace(self, sequence_number=sequence_number)

    def with_refresh_hint(self, seconds: int | None) -> Bundle:
        """A copy with another ``spiffe_refresh_hint``."""
        return replace(self, refresh_hint=seconds)

    # -- JWKS ------------------------------------------------------------------------------

    def to_jwks_dict(self, *, include_x509: bool = True,
                     include_jwt: bool = True) -> dict[str, Any]:
        """The bundle as a JWKS document (a JSON-ready dict).

        ``include_x509=False`` leaves out the X.509 authorities: the Workload API's JWT
        bundles are JWT authorities only, and some readers (py-spiffe's
        ``JwtBundle.parse``) want a ``kid`` on every key, which X.509 entries must not have.
        """
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities if include_x509 else ():
            jwk: dict[str, Any] = jwk_from_public_key(cert.public_key())
            jwk["use"] = _X509_USE
            jwk["x5c"] = [base64.b64encode(_der(cert)).decode("ascii")]
            keys.append(jwk)
        for kid, key in self.jwt_authorities.items() if include_jwt else ():
            jwk = jwk_from_public_key(key)
            jwk["use"] = _JWT_USE
            jwk["kid"] = kid
            keys.append(jwk)
        doc: dict[str, Any] = {"keys": keys}
        if self.sequence_number is not None:
            doc["spiffe_sequence"] = self.sequence_number
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return doc

    def to_jwks(self, *, include_x509: bool = True, include_jwt: bool = True,
                indent: int | None = None) -> str:
        """The bundle as a JWKS JSON text (see :meth:`to_jwks_dict`)."""
        return json.dumps(self.to_jwks_dict(include_x509=include_x509, include_jwt=include_jwt),
                          indent=indent)

    @classmethod
    def parse_jwks(cls, data: bytes | str | Mapping[str, Any],
                   trust_domain: TrustDomain | str, *, strict: bool = False) -> Bundle:
        """Read a SPIFFE bundle (JWKS) for ``trust_domain``; InvalidInput names the bad entry."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(
            trust_domain)
        doc: object = data
        if isinstance(data, bytes | str):
            try:
                doc = json.loads(data)
            except (UnicodeDecodeError, ValueError) as exc:
                raise InvalidInput(f"the bundle is not valid JSON: {exc}") from None
        if not isinstance(doc, Mapping):
            raise InvalidInput("the bundle must be a JSON object with a 'keys' array")
        if "keys" not in doc:
            raise InvalidInput("the bundle has no 'keys' parameter", field="keys")
        entries = doc["keys"]
        if not isinstance(entries, list):
            raise InvalidInput("'keys' must be an array of JWKs", field="keys")
        certs: list[x509.Certificate] = []
        jwt_keys: dict[str, JwtAuthorityKey] = {}
        for index, entry in enumerate(entries):
            where = f"keys[{index}]"
            if not isinstance(entry, Mapping):
                raise InvalidInput("a JWK must be a JSON object", field=where)
            kty, use = entry.get("kty"), entry.get("use")
            if not isinstance(kty, str) or not kty:
                raise InvalidInput("the JWK has no 'kty' (key type)", field=where)
            if not isinstance(use, str) or not use:
                raise InvalidInput("the JWK has no 'use'; SPIFFE bundles set 'x509-svid' or "
                                   "'jwt-svid'", field=where)
            if use not in (_X509_USE, _JWT_USE) or kty not in ("EC", "RSA", "OKP"):
                continue  # the spec: unknown uses and key types are ignored
            private = [p for p in _PRIVATE_PARAMS if p in entry]
            if private:
                raise InvalidInput(f"the JWK carries private key parameters ({', '.join(private)})"
                                   "; a bundle holds public keys only", field=where)
            if use == _X509_USE:
                cert = _x509_entry(entry, where, strict)
                if cert is not None:
                    certs.append(cert)
            else:
                if kty == "OKP":
                    continue  # EdDSA is not a JWT-SVID algorithm: a key type JWT-SVID lacks
                kid = entry.get("kid")
                if not isinstance(kid, str) or not kid:
                    raise InvalidInput("a 'jwt-svid' JWK must have a non-empty 'kid'",
                                       field=where)
                if kid in jwt_keys:
                    raise InvalidInput(f"the key id {kid!r} appears twice", field=where)
                key = public_key_from_jwk(entry, where)
                assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
                jwt_keys[kid] = key
        return cls(td, tuple(certs), jwt_keys,
                   _check_count(doc.get("spiffe_sequence"), "spiffe_sequence", "spiffe_sequence"),
                   _check_count(doc.get("spiffe_refresh_hint"), "spiffe_refresh_hint",
                                "spiffe_refresh_hint"))

    # -- PEM -------------------------------------------------------------------------------

    def to_pem(self) -> bytes:
        """The X.509 authorities as concatenated PEM certificates (JWT authorities are not kept)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain | str, pem: bytes | str) -> Bundle:
        """A bundle of X.509 authorities read from PEM certificates."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(
            trust_domain)
        raw = pem.encode() if isinstance(pem, str) else pem
        if b"-----BEGIN CERTIFICATE-----" not in raw:
            return cls(td)
        try:
            certs = x509.load_pem_x509_certificates(raw)
        except ValueError as exc:
            raise InvalidInput(f"the PEM bundle for {td} is not readable: {exc}") from None
        return cls(td, tuple(certs))


def _dedupe(certs: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        der = _der(cert)
        if der not in seen:
            seen.add(der)
            out.append(cert)
    return tuple(out)


def _x509_entry(entry: Mapping[str, Any], where: str, strict: bool) -> x509.Certificate | None:
    if strict and "kid" in entry:
        raise InvalidInput("an 'x509-svid' JWK must not have a 'kid'", field=where)
    chain = entry.get("x5c")
    if chain is None or chain == []:
        if strict:
            raise InvalidInput("an 'x509-svid' JWK needs exactly one certificate in 'x5c'",
                               field=where)
        return None  # X509-SVID spec 6.2: such entries are ignored
    if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
        raise InvalidInput("'x5c' must be an array of base64 strings", field=where)
    if strict and len(chain) != 1:
        raise InvalidInput(f"'x5c' must hold exactly one certificate, not {len(chain)}",
                           field=where)
    try:
        der = base64.b64decode(chain[0], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("'x5c'[0] is not valid base64", field=where) from None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise InvalidInput(f"'x5c'[0] is not a DER certificate: {exc}", field=where) from None
    # Key parameters are optional next to x5c, but when present they must describe it.
    if any(p in entry for p in ("n", "e", "x", "y", "crv")):
        key = public_key_from_jwk(entry, where)
        if not _same_key(key, cert.public_key()):
            raise InvalidInput("the JWK's key parameters do not match the certificate in 'x5c'",
                               field=where)
    return cert


class BundleSource(Protocol):
    """Where verifiers find the bundle of a trust domain (a dict or a :class:`BundleSet`)."""

    def get(self, trust_domain: TrustDomain, /) -> Bundle | None:
        """The bundle of ``trust_domain``, or None when it is not trusted."""
        ...


def bundle_for(source: BundleSource | Bundle, trust_domain: TrustDomain) -> Bundle | None:
    """The bundle for ``trust_domain`` from a source, or from a single bundle if it matches."""
    if isinstance(source, Bundle):
        return source if source.trust_domain == trust_domain else None
    return source.get(trust_domain)


@dataclass(frozen=True, eq=False)
class BundleSet(Mapping[TrustDomain, Bundle]):
    """An immutable set of bundles, one per trust domain (own and federated)."""

    _bundles: Mapping[TrustDomain, Bundle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for td, bundle in self._bundles.items():
            if bundle.trust_domain != td:
                raise InvalidInput(f"the bundle of {bundle.trust_domain} is filed under {td}")
        object.__setattr__(self, "_bundles", MappingProxyType(dict(self._bundles)))

    @classmethod
    def of(cls, *bundles: Bundle) -> BundleSet:
        """A set of ``bundles``; two bundles for one trust domain are refused."""
        out: dict[TrustDomain, Bundle] = {}
        for b in bundles:
            if b.trust_domain in out:
                raise InvalidInput(f"two bundles for the trust domain {b.trust_domain}")
            out[b.trust_domain] = b
        return cls(out)

    @classmethod
    def from_iterable(cls, bundles: Iterable[Bundle]) -> BundleSet:
        """Like :meth:`of`, from any iterable."""
        return cls.of(*bundles)

    def with_bundle(self, bundle: Bundle) -> BundleSet:
        """A copy in which ``bundle`` replaces any bundle of its trust domain."""
        return BundleSet({**self._bundles, bundle.trust_domain: bundle})

    def without(self, trust_domain: TrustDomain) -> BundleSet:
        """A copy without the bundle of ``trust_domain``."""
        return BundleSet({k: v for k, v in self._bundles.items() if k != trust_domain})

    def __getitem__(self, trust_domain: TrustDomain) -> Bundle:
        return self._bundles[trust_domain]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self._bundles)

    def __len__(self) -> int:
        return len(self._bundles)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BundleSet):
            return NotImplemented
        return dict(self._bundles) == dict(other._bundles)

    def __hash__(self) -> int:
        return hash(frozenset(self._bundles.items()))

    def __repr__(self) -> str:
        return f"BundleSet({', '.join(str(td) for td in sorted(self._bundles))})"
