"""JWT-SVIDs: one test per rule of the JWT-SVID specification (and trustmesh's kid rule)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.spiffe import (
    Bundle,
    BundleSet,
    SpiffeId,
    TrustDomain,
    algorithm_for,
    mint_jwt_svid,
    parse_jwt_svid_unverified,
    validate_jwt_svid,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
TD = TrustDomain("example.org")
SID = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)
BUNDLES = BundleSet.of(Bundle(TD, jwt_authorities={
    "k1": EC_KEY.public_key(), "r1": RSA_KEY.public_key()}))


def mint(**kw: Any) -> str:
    args: dict[str, Any] = {"spiffe_id": SID, "audience": "reports", "key": EC_KEY, "kid": "k1",
                            "now": NOW, "ttl": timedelta(minutes=5)}
    args.update(kw)
    return mint_jwt_svid(**args)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: Any = EC_KEY,
          alg: str = "ES256") -> str:
    """Sign arbitrary header and claims with PyJWT (to break one rule at a time)."""
    return pyjwt.encode(claims, key, algorithm=alg, headers=header)


CLAIMS = {"sub": str(SID), "aud": "reports", "exp": int((NOW + timedelta(minutes=5)).timestamp())}


def test_round_trip() -> None:
    token = mint(extra_claims={"jti": "abc"})
    svid = validate_jwt_svid(token, "reports", BUNDLES, NOW)
    assert svid.spiffe_id == SID and svid.audience == ("reports",)
    assert svid.expiry == NOW + timedelta(minutes=5)
    assert svid.issued_at == NOW and svid.claims["jti"] == "abc" and svid.token == token
    header = pyjwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": "k1", "typ": "JWT"}


def test_several_audiences_are_written_as_an_array() -> None:
    token = mint(audience=["reports", "billing"])
    assert pyjwt.decode(token, options={"verify_signature": False})["aud"] == [
        "reports", "billing"]
    assert validate_jwt_svid(token, "billing", BUNDLES, NOW).audience == ("reports", "billing")


@pytest.mark.parametrize("curve,alg", [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384"),
                                       (ec.SECP521R1(), "ES512")])
def test_algorithm_follows_the_curve(curve: ec.EllipticCurve, alg: str) -> None:
    key = ec.generate_private_key(curve)
    assert algorithm_for(key) == alg
    token = mint(key=key, kid="c")
    assert pyjwt.get_unverified_header(token)["alg"] == alg
    bundle = Bundle(TD, jwt_authorities={"c": key.public_key()})
    assert validate_jwt_svid(token, "reports", bundle, NOW).spiffe_id == SID


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_algorithms(alg: str) -> None:
    token = mint(key=RSA_KEY, kid="r1", algorithm=alg)
    assert pyjwt.get_unverified_header(token)["alg"] == alg
    assert validate_jwt_svid(token, "reports", BUNDLES, NOW).spiffe_id == SID
    assert algorithm_for(RSA_KEY) == "RS256" and algorithm_for(RSA_KEY, rsa_pss=True) == "PS256"


def test_mint_refuses_keys_without_a_jwt_svid_algorithm() -> None:
    with pytest.raises(InvalidInput, match="cannot sign JWT-SVIDs"):
        mint(key=ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(InvalidInput, match="cannot sign with ES384"):
        mint(algorithm="ES384")
    with pytest.raises(InvalidInput, match="not a JWT-SVID algorithm"):
        mint(algorithm="HS256")


def test_mint_requires_an_audience() -> None:
    with pytest.raises(InvalidInput, match="at least one audience"):
        mint(audience=[])
    with pytest.raises(InvalidInput, match="at least one audience"):
        mint(audience="")


def test_mint_requires_an_expiry() -> None:
    with pytest.raises(InvalidInput, match="exactly one of ttl and expires_at"):
        mint(ttl=None)
    with pytest.raises(InvalidInput, match="already be expired"):
        mint(ttl=None, expires_at=NOW)
    token = mint(ttl=None, expires_at=NOW + timedelta(hours=1))
    assert validate_jwt_svid(token, "reports", BUNDLES, NOW).expiry == NOW + timedelta(hours=1)


def test_mint_extra_claims_cannot_override_registered_ones() -> None:
    with pytest.raises(InvalidInput, match="may not set sub"):
        mint(extra_claims={"sub": "spiffe://example.org/admin"})


# --- validation: alg ---------------------------------------------------------------------------

def test_alg_none_is_refused() -> None:
    token = f"{b64({'alg': 'none', 'kid': 'k1'})}.{b64(CLAIMS)}."
    with pytest.raises(InvalidInput, match="alg 'none' is not allowed"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_alg_hmac_is_refused() -> None:
    token = forge({"kid": "k1"}, CLAIMS, key=b"k" * 32, alg="HS256")
    with pytest.raises(InvalidInput, match="alg 'HS256' is not allowed"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_alg_must_be_present() -> None:
    token = f"{b64({'kid': 'k1'})}.{b64(CLAIMS)}.c2ln"
    with pytest.raises(InvalidInput, match="no 'alg'"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_alg_must_fit_the_key() -> None:
    token = forge({"kid": "r1"}, CLAIMS)  # ES256 header, but r1 is an RSA key
    with pytest.raises(PermissionDenied, match="cannot have signed with ES256"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


# --- validation: kid and typ ------------------------------------------------------------------

def test_kid_is_required() -> None:
    token = forge({}, CLAIMS)
    with pytest.raises(InvalidInput, match="no 'kid'"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_unknown_kid_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="'nope' is not a JWT authority"):
        validate_jwt_svid(mint(kid="nope"), "reports", BUNDLES, NOW)


@pytest.mark.parametrize("typ,ok", [(None, True), ("JWT", True), ("JOSE", True),
                                    ("at+jwt", False), ("jwt", False)])
def test_typ_must_be_absent_jwt_or_jose(typ: str | None, ok: bool) -> None:
    header: dict[str, Any] = {"kid": "k1", "typ": typ}
    if typ is None:
        # PyJWT leaves typ out when it is given as None.
        token = pyjwt.encode(CLAIMS, EC_KEY, algorithm="ES256", headers=header)
        assert "typ" not in pyjwt.get_unverified_header(token)
    else:
        token = forge(header, CLAIMS)
    if ok:
        assert validate_jwt_svid(token, "reports", BUNDLES, NOW).spiffe_id == SID
    else:
        with pytest.raises(InvalidInput, match="typ"):
            validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_embedded_keys_in_the_header_are_refused() -> None:
    token = forge({"kid": "k1", "jku": "https://evil.example/jwks"}, CLAIMS)
    with pytest.raises(InvalidInput, match="'jku'"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


# --- validation: claims -----------------------------------------------------------------------

def test_sub_must_be_present() -> None:
    token = forge({"kid": "k1"}, {k: v for k, v in CLAIMS.items() if k != "sub"})
    with pytest.raises(InvalidInput, match="no 'sub'"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_sub_must_be_a_spiffe_id() -> None:
    token = forge({"kid": "k1"}, {**CLAIMS, "sub": "web@example.org"})
    with pytest.raises(InvalidInput, match="'sub' claim is not a SPIFFE ID"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_aud_must_be_present() -> None:
    token = forge({"kid": "k1"}, {k: v for k, v in CLAIMS.items() if k != "aud"})
    with pytest.raises(InvalidInput, match="no 'aud'"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_aud_must_not_be_empty() -> None:
    token = forge({"kid": "k1"}, {**CLAIMS, "aud": []})
    with pytest.raises(InvalidInput, match="non-empty array"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_aud_must_contain_the_validators_audience() -> None:
    with pytest.raises(PermissionDenied, match="not for 'billing'"):
        validate_jwt_svid(mint(), "billing", BUNDLES, NOW)


def test_exp_must_be_present() -> None:
    token = forge({"kid": "k1"}, {k: v for k, v in CLAIMS.items() if k != "exp"})
    with pytest.raises(InvalidInput, match="no 'exp'"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_exp_must_be_a_number() -> None:
    token = forge({"kid": "k1"}, {**CLAIMS, "exp": "tomorrow"})
    with pytest.raises(InvalidInput, match="'exp' claim must be a number"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_exp_must_not_be_in_the_past() -> None:
    token = mint()
    later = NOW + timedelta(minutes=6)
    with pytest.raises(PermissionDenied, match="expired at 2030-01-01T00:05:00"):
        validate_jwt_svid(token, "reports", BUNDLES, later)


def test_exp_allows_a_small_leeway() -> None:
    token = mint()
    just_after = NOW + timedelta(minutes=5, seconds=10)
    assert validate_jwt_svid(token, "reports", BUNDLES, just_after).spiffe_id == SID
    with pytest.raises(PermissionDenied, match="expired"):
        validate_jwt_svid(token, "reports", BUNDLES, just_after, leeway=timedelta(0))


def test_nbf_in_the_future_is_refused() -> None:
    nbf = int((NOW + timedelta(minutes=2)).timestamp())
    token = forge({"kid": "k1"}, {**CLAIMS, "nbf": nbf})
    with pytest.raises(PermissionDenied, match="not valid before"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


# --- validation: signature and trust ----------------------------------------------------------

def test_tampered_signature_is_refused() -> None:
    head, payload, sig = mint().split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[5] ^= 0x01
    bad = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(PermissionDenied, match="does not verify"):
        validate_jwt_svid(f"{head}.{payload}.{bad}", "reports", BUNDLES, NOW)


def test_tampered_claims_are_refused() -> None:
    head, _, sig = mint().split(".")
    payload = b64({**CLAIMS, "sub": "spiffe://example.org/admin"})
    with pytest.raises(PermissionDenied, match="does not verify"):
        validate_jwt_svid(f"{head}.{payload}.{sig}", "reports", BUNDLES, NOW)


def test_signed_by_another_key_under_a_known_kid_is_refused() -> None:
    token = mint(key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(PermissionDenied, match="does not verify"):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_key_is_taken_from_the_subjects_trust_domain_only() -> None:
    other = SpiffeId.parse("spiffe://other.org/web")
    with pytest.raises(PermissionDenied, match="no bundle for the trust domain other.org"):
        validate_jwt_svid(mint(spiffe_id=other), "reports", BUNDLES, NOW)


@pytest.mark.parametrize("token,match", [
    ("", "empty"),
    ("abc", "not a JWS compact serialization"),
    ("a.b.c.d.e", "is a JWE"),
    ("!!!.e30.c2ln", "header is not base64url-encoded JSON"),
    (f"{b64({'alg': 'ES256', 'kid': 'k1'})}.WzFd.c2ln", "payload must be a JSON object"),
])
def test_malformed_tokens_are_invalid_input(token: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        validate_jwt_svid(token, "reports", BUNDLES, NOW)


def test_parse_unverified_reads_claims_without_keys() -> None:
    svid = parse_jwt_svid_unverified(mint())
    assert svid.spiffe_id == SID and svid.expiry == NOW + timedelta(minutes=5)
