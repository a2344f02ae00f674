"""Property tests: round trips that must hold for any input, and parsers that fail cleanly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.spiffe import (
    Bundle,
    JwtAuthorityKey,
    SpiffeId,
    TrustDomain,
    build_signing_certificate,
    mint_jwt_svid,
    validate_jwt_svid,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
TD = TrustDomain("example.org")

# Key generation is slow; draw from a fixed pool instead.
_EC = [ec.generate_private_key(c) for c in (ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1())
       for _ in range(2)]
_RSA = [rsa.generate_private_key(65537, 2048)]
PUBLIC_KEYS: list[JwtAuthorityKey] = [k.public_key() for k in _EC] + [k.public_key() for k in _RSA]
CAS = [build_signing_certificate(TD, k.public_key(), k, NOW, NOW + timedelta(days=1), i + 1)
       for i, k in enumerate(_EC[:3])]

kids = st.text(min_size=1, max_size=16)  # any text hypothesis draws (no lone surrogates)
counts = st.none() | st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def bundles(draw: st.DrawFn) -> Bundle:
    keys = draw(st.dictionaries(kids, st.sampled_from(PUBLIC_KEYS), max_size=6))
    certs: list[x509.Certificate] = draw(st.lists(st.sampled_from(CAS), max_size=3,
                                                  unique_by=lambda c: c.serial_number))
    return Bundle(TD, tuple(certs), keys, draw(counts), draw(counts))


@settings(max_examples=60, deadline=None)
@given(bundles())
def test_jwks_round_trip_for_any_bundle(bundle: Bundle) -> None:
    assert Bundle.parse_jwks(bundle.to_jwks(), TD) == bundle


@settings(max_examples=30, deadline=None)
@given(bundles())
def test_jwks_and_pem_agree_on_x509_authorities(bundle: Bundle) -> None:
    from_pem = Bundle.from_pem(TD, bundle.to_pem())
    from_jwks = Bundle.parse_jwks(bundle.to_jwks(), TD)
    assert from_pem.x509_authorities == from_jwks.x509_authorities == bundle.x509_authorities


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
jwk_like = st.fixed_dictionaries({}, optional={
    "kty": st.sampled_from(["EC", "RSA", "OKP", "oct"]) | json_values,
    "use": st.sampled_from(["x509-svid", "jwt-svid", "sig"]) | json_values,
    "kid": json_values, "crv": st.sampled_from(["P-256", "P-384", "Ed25519"]) | json_values,
    "x": json_values, "y": json_values, "n": json_values, "e": json_values,
    "x5c": json_values})


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"keys": st.lists(jwk_like, max_size=4)},
                                                    optional={"spiffe_sequence": json_values})))
def test_jwks_parser_raises_only_invalid_input(document: Any) -> None:
    try:
        Bundle.parse_jwks(json.dumps(document), TD)
    except InvalidInput:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120) | st.builds(lambda a, b, c: f"{a}.{b}.{c}",
                                         st.text("abcAZ09-_", max_size=40),
                                         st.text("abcAZ09-_", max_size=40),
                                         st.text("abcAZ09-_", max_size=40)))
def test_jwt_validator_raises_only_trustmesh_errors(token: str) -> None:
    bundle = Bundle(TD, jwt_authorities={"k": PUBLIC_KEYS[0]})
    try:
        validate_jwt_svid(token, "aud", bundle, NOW)
    except (InvalidInput, PermissionDenied):
        pass


segment = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=40, deadline=None)
@given(st.lists(segment, min_size=1, max_size=4), st.lists(st.text("abc:/", min_size=1,
                                                                   max_size=10),
                                                           min_size=1, max_size=3),
       st.integers(min_value=1, max_value=3600))
def test_minted_tokens_validate(segments: list[str], audiences: list[str], ttl: int) -> None:
    sid = SpiffeId.from_segments(TD, *segments)
    key = _EC[0]
    token = mint_jwt_svid(sid, audiences, key, "k", now=NOW, ttl=timedelta(seconds=ttl))
    svid = validate_jwt_svid(token, audiences[-1], Bundle(TD, jwt_authorities={
        "k": key.public_key()}), NOW)
    assert svid.spiffe_id == sid and svid.audience == tuple(audiences)
    assert svid.expiry == NOW + timedelta(seconds=ttl)
