"""Interoperability with py-spiffe (``spiffe`` on PyPI): what we write, it reads, and back.

py-spiffe checks JWT-SVID expiry against the real clock, so tokens handed to it
are minted with the current time (passed in, as always).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import spiffe
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe.bundle.jwt_bundle.errors import ParseJWTBundleError

from trustmesh.errors import InvalidInput
from trustmesh.spiffe import (
    Bundle,
    SpiffeId,
    TrustDomain,
    X509Svid,
    build_signing_certificate,
    build_x509_svid,
    mint_jwt_svid,
    parse_x509_svid,
    validate_jwt_svid,
    verify_x509_svid,
)

TD = TrustDomain("example.org")
SID = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
PY_TD = spiffe.TrustDomain("example.org")
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)


def wall_now() -> datetime:
    return datetime.now(UTC)


def ca_and_leaf(now: datetime) -> tuple[X509Svid, Bundle]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build_signing_certificate(TD, ca_key.public_key(), ca_key, now - timedelta(hours=1),
                                   now + timedelta(days=1), 1)
    leaf = build_x509_svid(SID, EC_KEY.public_key(), ca, ca_key, now - timedelta(minutes=1),
                           now + timedelta(hours=1), 99, ("web.example.org",))
    return X509Svid(SID, (leaf,), EC_KEY), Bundle(TD, (ca,), {"k1": EC_KEY.public_key()})


def test_py_spiffe_reads_our_jwt_bundle() -> None:
    bundle = Bundle(TD, jwt_authorities={"k1": EC_KEY.public_key(), "r1": RSA_KEY.public_key()},
                    sequence_number=3, refresh_hint=60)
    theirs = spiffe.JwtBundle.parse(PY_TD, bundle.to_jwks(include_x509=False).encode())
    assert theirs.jwt_authorities == dict(bundle.jwt_authorities)


def test_py_spiffe_cannot_read_x509_entries_without_kid() -> None:
    # Known py-spiffe limit: its JWT bundle parser wants a kid on every JWK, while the
    # X509-SVID spec says x509-svid entries must not have one. We follow the spec.
    _, bundle = ca_and_leaf(wall_now())
    with pytest.raises(ParseJWTBundleError, match="keyID"):
        spiffe.JwtBundle.parse(PY_TD, bundle.to_jwks().encode())


def test_py_spiffe_reads_our_x509_bundle_pem() -> None:
    _, bundle = ca_and_leaf(wall_now())
    theirs = spiffe.X509Bundle.parse(PY_TD, bundle.to_pem())
    assert theirs.x509_authorities == set(bundle.x509_authorities)


def test_py_spiffe_validates_our_jwt_svids() -> None:
    now = wall_now()
    bundle = Bundle(TD, jwt_authorities={"k1": EC_KEY.public_key(), "r1": RSA_KEY.public_key()})
    theirs = spiffe.JwtBundle.parse(PY_TD, bundle.to_jwks(include_x509=False).encode())
    for key, kid, alg in ((EC_KEY, "k1", None), (RSA_KEY, "r1", "RS256"),
                          (RSA_KEY, "r1", "PS256")):
        token = mint_jwt_svid(SID, ["reports", "billing"], key, kid, now=now,
                              ttl=timedelta(minutes=5), algorithm=alg)
        svid = spiffe.JwtSvid.parse_and_validate(token, theirs, {"reports"})
        assert str(svid.spiffe_id) == str(SID)
        assert svid.expiry == int((now + timedelta(minutes=5)).timestamp())


def test_we_validate_with_keys_py_spiffe_parsed() -> None:
    now = wall_now()
    jwks = Bundle(TD, jwt_authorities={"k1": EC_KEY.public_key()}).to_jwks(include_x509=False)
    theirs = spiffe.JwtBundle.parse(PY_TD, jwks.encode())
    keys = {kid: key for kid, key in theirs.jwt_authorities.items()
            if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)}
    assert keys.keys() == {"k1"}
    ours = Bundle(TD, jwt_authorities=keys)
    token = mint_jwt_svid(SID, "reports", EC_KEY, "k1", now=now, ttl=timedelta(minutes=5))
    assert validate_jwt_svid(token, "reports", ours, now).spiffe_id == SID


def test_py_spiffe_reads_our_x509_svid() -> None:
    svid, _ = ca_and_leaf(wall_now())
    theirs = spiffe.X509Svid.parse_raw(svid.chain_der(), svid.key_der())
    assert str(theirs.spiffe_id) == str(SID)
    assert theirs.leaf == svid.leaf


def test_we_read_an_x509_svid_py_spiffe_wrote(tmp_path: object) -> None:
    now = wall_now()
    svid, bundle = ca_and_leaf(now)
    theirs = spiffe.X509Svid.parse(*svid.to_pem())
    ours = parse_x509_svid(list(theirs.cert_chain), theirs.private_key)
    assert verify_x509_svid(ours, bundle, now) == SID


def test_py_spiffe_folds_case_where_the_spec_refuses() -> None:
    # py-spiffe lower-cases the scheme and trust domain; the SPIFFE-ID spec (and trustmesh)
    # refuse upper case there. Paths are case-sensitive in both.
    for text in ("spiffe://Example.org/x", "SPIFFE://example.org/x"):
        assert str(spiffe.SpiffeId(text)) == "spiffe://example.org/x"
        with pytest.raises(InvalidInput):
            SpiffeId.parse(text)


@settings(max_examples=300)
@given(td=st.text(alphabet="ab09.-_:%@?#", max_size=12),
       path=st.text(alphabet="abcXYZ09.-_/:%@?#", max_size=20))
def test_spiffe_id_parsers_agree(td: str, path: str) -> None:
    """Ours and py-spiffe accept and refuse the same short, lower-case-domain SPIFFE IDs."""
    text = f"spiffe://{td}/{path}" if path else f"spiffe://{td}"
    try:
        ours: str | None = str(SpiffeId.parse(text))
    except InvalidInput:
        ours = None
    try:
        theirs: str | None = str(spiffe.SpiffeId(text))
    except Exception:  # py-spiffe raises several types
        theirs = None
    assert ours == theirs
