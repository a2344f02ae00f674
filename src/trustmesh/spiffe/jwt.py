"""JWT-SVIDs: minting and validation as the JWT-SVID specification sets them out.

A JWT-SVID is a JWS compact serialization whose protected header has ``alg``
(one of the RSA, ECDSA or RSA-PSS algorithms of RFC 7518; never ``none`` or an
HMAC), a ``kid`` naming a JWT authority of the subject's trust domain, and
optionally ``typ`` ``JWT`` or ``JOSE``. Its claims carry ``sub`` (the SPIFFE
ID), ``aud`` (one or more audiences) and ``exp``.

The specification makes ``kid`` optional; trustmesh requires it when
validating (as go-spiffe does), because the key is looked up by it.

Errors: :class:`InvalidInput` when the token is not a well-formed JWT-SVID
(bad encoding, disallowed ``alg``, no ``kid``, ``sub`` not a SPIFFE ID, no
``aud`` or ``exp``...); :class:`PermissionDenied` when it is well formed but
must not be accepted (no bundle, unknown ``kid``, bad signature, expired, not
for this audience). Time is always a parameter.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeAlias

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.spiffe.bundle import Bundle, BundleSource, bundle_for
from trustmesh.spiffe.ids import SpiffeId

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "JwtSigningKey",
    "JwtSvid",
    "algorithm_for",
    "mint_jwt_svid",
    "parse_jwt_svid_unverified",
    "validate_jwt_svid",
]

#: The ``alg`` values the JWT-SVID specification allows.
ALLOWED_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"})

#: How far past ``exp`` (or before ``nbf``) a token is still accepted, for clock skew.
DEFAULT_LEEWAY = timedelta(seconds=30)

JwtSigningKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_EC_ALG_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RESERVED_CLAIMS = frozenset({"sub", "aud", "exp", "iat"})
# Headers that would let the token choose its own key, or demand semantics we don't implement.
_REFUSED_HEADERS = ("jku", "jwk", "x5u", "x5c", "crit")


@dataclass(frozen=True)
class JwtSvid:
    """A JWT-SVID that passed validation (or was read unverified, see its origin)."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: datetime
    claims: Mapping[str, Any] = field(repr=False)
    token: str = field(repr=False)
    hint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "claims", MappingProxyType(dict(self.claims)))

    @property
    def issued_at(self) -> datetime | None:
        """The ``iat`` claim as a UTC datetime, when present."""
        iat = self.claims.get("iat")
        return _from_numeric(iat) if iat is not None and _is_number(iat) else None

    def __hash__(self) -> int:
        return hash(self.token)


def algorithm_for(key: object, *, rsa_pss: bool = False) -> str:
    """The ``alg`` for a signing key: ES256/384/512 by curve, RS256 (or PS256) for RSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        alg = _EC_ALG_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise InvalidInput(f"the curve {key.curve.name} has no JWT-SVID algorithm; use "
                               "P-256, P-384 or P-521")
        return alg
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "PS256" if rsa_pss else "RS256"
    raise InvalidInput(f"a {type(key).__name__} cannot sign JWT-SVIDs; use an EC or RSA key")


def _key_fits(alg: str, key: object) -> bool:
    if alg.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and \
            _EC_ALG_BY_CURVE.get(key.curve.name) == alg
    return isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey)


def _numeric(t: datetime) -> int:
    if t.tzinfo is None:
        raise InvalidInput("times must be timezone-aware")
    return math.floor(t.timestamp())


def _from_numeric(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def mint_jwt_svid(
    spiffe_id: SpiffeId,
    audience: str | Sequence[str],
    key: JwtSigningKey,
    kid: str,
    *,
    now: datetime,
    ttl: timedelta | None = None,
    expires_at: datetime | None = None,
    algorithm: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Sign a JWT-SVID for ``spiffe_id``: header alg, kid, typ JWT; claims sub, aud, exp, iat.

    Give exactly one of ``ttl`` and ``expires_at``. ``algorithm`` defaults to
    :func:`algorithm_for` the key (pass ``"PS256"`` etc. for RSA-PSS). A single
    audience is written as a string, several as an array. ``extra_claims`` may not
    override sub, aud, exp or iat.
    """
    if not isinstance(spiffe_id, SpiffeId):
        raise InvalidInput(f"the subject must be a SpiffeId, not {type(spiffe_id).__name__}")
    audiences = [audience] if isinstance(audience, str) else list(audience)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise InvalidInput("a JWT-SVID needs at least one audience, each a non-empty string",
                           field="audience")
    if not isinstance(kid, str) or not kid:
        raise InvalidInput("a JWT-SVID needs a key id (kid)", field="kid")
    if (ttl is None) == (expires_at is None):
        raise InvalidInput("give exactly one of ttl and expires_at")
    iat = _numeric(now)
    if ttl is not None:
        if ttl <= timedelta(0):
            raise InvalidInput("the ttl must be positive", field="ttl")
        exp = _numeric(now + ttl)
    else:
        assert expires_at is not None
        exp = _numeric(expires_at)
    if exp <= iat:
        raise InvalidInput("the token would already be expired", field="expires_at")
    alg = algorithm or algorithm_for(key)
    if alg not in ALLOWED_ALGORITHMS:
        raise InvalidInput(f"alg {alg!r} is not a JWT-SVID algorithm; allowed are "
                           f"{', '.join(sorted(ALLOWED_ALGORITHMS))}", field="algorithm")
    if not _key_fits(alg, key):
        raise InvalidInput(f"a {type(key).__name__} cannot sign with {alg}", field="algorithm")
    claims: dict[str, Any] = {}
    if extra_claims:
        clash = sorted(_RESERVED_CLAIMS & set(extra_claims))
        if clash:
            raise InvalidInput(f"extra claims may not set {', '.join(clash)}",
                               field="extra_claims")
        claims.update(extra_claims)
    claims.update({"sub": str(spiffe_id),
                   "aud": audiences[0] if len(audiences) == 1 else audiences,
                   "exp": exp, "iat": iat})
    jws = pyjwt.PyJWS(options={"enforce_minimum_key_length": True})
    try:
        payload = json.dumps(claims, separators=(",", ":")).encode()
        return jws.encode(payload, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the claims cannot be encoded: {exc}", field="extra_claims"
                           ) from None
    except pyjwt.InvalidKeyError as exc:
        raise InvalidInput(f"the key cannot sign JWT-SVIDs: {exc}", field="key") from None


def _b64url_json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"the token's {what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"the token's {what} must be a JSON object")
    return value


@dataclass(frozen=True)
class _Parsed:
    header: dict[str, Any]
    claims: dict[str, Any]
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    exp: float


def _parse(token: object) -> _Parsed:
    """The structural checks of the JWT-SVID specification, before any key is used."""
    if not isinstance(token, str) or not token:
        raise InvalidInput("the token is empty")
    parts = token.split(".")
    if len(parts) == 5:
        raise InvalidInput("the token is a JWE; JWT-SVIDs are JWS compact serializations")
    if len(parts) != 3:
        raise InvalidInput("the token is not a JWS compact serialization "
                           "(header.payload.signature)")
    header = _b64url_json(parts[0], "header")
    alg = header.get("alg")
    if alg is None:
        raise InvalidInput("the token header has no 'alg'")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise InvalidInput(f"alg {alg!r} is not allowed for JWT-SVIDs; allowed are "
                           f"{', '.join(sorted(ALLOWED_ALGORITHMS))}")
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise InvalidInput(f"typ {typ!r} is not allowed; a JWT-SVID's typ is absent, "
                           "'JWT' or 'JOSE'")
    for name in _REFUSED_HEADERS:
        if name in header:
            raise InvalidInput(f"the token header carries {name!r}, which JWT-SVIDs must not")
    claims = _b64url_json(parts[1], "payload")
    sub = claims.get("sub")
    if sub is None:
        raise InvalidInput("the token has no 'sub' claim; a JWT-SVID's sub is its SPIFFE ID")
    if not isinstance(sub, str):
        raise InvalidInput("the 'sub' claim must be a string SPIFFE ID")
    try:
        sid = SpiffeId.parse(sub)
    except InvalidInput as exc:
        raise InvalidInput(f"the 'sub' claim is not a SPIFFE ID: {exc.message}") from None
    aud = claims.get("aud")
    if aud is None:
        raise InvalidInput("the token has no 'aud' claim; JWT-SVIDs must name an audience")
    auds = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else None
    if not auds or not all(isinstance(a, str) for a in auds):
        raise InvalidInput("the 'aud' claim must be a string or a non-empty array of strings")
    exp = claims.get("exp")
    if exp is None:
        raise InvalidInput("the token has no 'exp' claim; JWT-SVIDs must expire")
    if not _is_number(exp):
        raise InvalidInput("the 'exp' claim must be a number (seconds since the epoch)")
    for name in ("nbf", "iat"):
        if name in claims and not _is_number(claims[name]):
            raise InvalidInput(f"the {name!r} claim must be a number (seconds since the epoch)")
    return _Parsed(header, claims, sid, auds, float(exp))


def parse_jwt_svid_unverified(token: str) -> JwtSvid:
    """Read a JWT-SVID's structure and claims WITHOUT checking signature, audience or expiry.

    For a holder inspecting its own tokens (e.g. to schedule renewal); never for
    authenticating a peer.
    """
    parsed = _parse(token)
    return JwtSvid(parsed.spiffe_id, parsed.audience, _from_numeric(parsed.exp),
                   parsed.claims, token)


def validate_jwt_svid(
    token: str,
    audience: str,
    bundles: BundleSource | Bundle,
    now: datetime,
    *,
    leeway: timedelta = DEFAULT_LEEWAY,
) -> JwtSvid:
    """Validate a JWT-SVID presented to ``audience`` and return it.

    Checks, in order: structure (alg allowed, typ, kid, sub a SPIFFE ID, aud,
    exp); that the subject's trust domain has a bundle holding the ``kid``; the
    signature with that key; ``exp`` and ``nbf`` against ``now`` (with
    ``leeway``); that ``audience`` is one of the token's audiences.
    """
    if not isinstance(audience, str) or not audience:
        raise InvalidInput("the expected audience must be a non-empty string", field="audience")
    if now.tzinfo is None:
        raise InvalidInput("now must be timezone-aware")
    parsed = _parse(token)
    kid = parsed.header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidInput("the token header has no 'kid'; trustmesh finds the signing key "
                           "by it")
    sid, alg = parsed.spiffe_id, parsed.header["alg"]
    bundle = bundle_for(bundles, sid.trust_domain)
    if bundle is None:
        raise PermissionDenied(f"no bundle for the trust domain {sid.trust_domain} of {sid}")
    key = bundle.jwt_authorities.get(kid)
    if key is None:
        raise PermissionDenied(f"the key id {kid!r} is not a JWT authority of "
                               f"{sid.trust_domain}")
    if not _key_fits(alg, key):
        raise PermissionDenied(f"the JWT authority {kid!r} is a {type(key).__name__}, which "
                               f"cannot have signed with {alg}")
    jws = pyjwt.PyJWS(options={"enforce_minimum_key_length": True})
    try:
        jws.decode_complete(token, key=key, algorithms=[alg])
    except pyjwt.InvalidSignatureError:
        raise PermissionDenied(f"the signature of the JWT-SVID for {sid} does not verify "
                               f"with the key {kid!r}") from None
    except pyjwt.InvalidKeyError as exc:
        raise PermissionDenied(f"the JWT authority {kid!r} is not acceptable: {exc}") from None
    except pyjwt.PyJWTError as exc:
        raise InvalidInput(f"the token is malformed: {exc}") from None
    t = now.timestamp()
    slack = leeway.total_seconds()
    expiry = _from_numeric(parsed.exp)
    if t >= parsed.exp + slack:
        raise PermissionDenied(f"the JWT-SVID for {sid} expired at {expiry.isoformat()}")
    nbf = parsed.claims.get("nbf")
    if nbf is not None and t + slack < nbf:
        raise PermissionDenied(f"the JWT-SVID for {sid} is not valid before "
                               f"{_from_numeric(nbf).isoformat()}")
    if audience not in parsed.audience:
        raise PermissionDenied(f"the JWT-SVID for {sid} is for {list(parsed.audience)}, "
                               f"not for {audience!r}")
    return JwtSvid(sid, parsed.audience, expiry, parsed.claims, token)
