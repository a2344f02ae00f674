"""SPIFFE bundles: the JWKS format of the Trust Domain and Bundle spec, PEM, immutability."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trustmesh.errors import InvalidInput
from trustmesh.spiffe import (
    Bundle,
    BundleSet,
    TrustDomain,
    build_signing_certificate,
    jwk_from_public_key,
    public_key_from_jwk,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
TD = TrustDomain("example.org")


def root(key: Any = None) -> x509.Certificate:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return build_signing_certificate(TD, key.public_key(), key, NOW, NOW + timedelta(days=1), 1)


CA1 = root()
CA2 = root(rsa.generate_private_key(65537, 2048))
EC_PUB = ec.generate_private_key(ec.SECP384R1()).public_key()
RSA_PUB = rsa.generate_private_key(65537, 2048).public_key()
BUNDLE = Bundle(TD, (CA1, CA2), {"k1": EC_PUB, "k2": RSA_PUB}, sequence_number=7,
                refresh_hint=300)


def doc(*keys: dict[str, Any], **extra: Any) -> str:
    return json.dumps({"keys": list(keys), **extra})


def x509_jwk(cert: x509.Certificate = CA1) -> dict[str, Any]:
    return {**jwk_from_public_key(cert.public_key()), "use": "x509-svid",
            "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]}


def jwt_jwk(kid: str = "k1", key: Any = EC_PUB) -> dict[str, Any]:
    return {**jwk_from_public_key(key), "use": "jwt-svid", "kid": kid}


def test_jwks_round_trip() -> None:
    text = BUNDLE.to_jwks()
    assert Bundle.parse_jwks(text, TD) == BUNDLE
    assert Bundle.parse_jwks(text.encode(), "spiffe://example.org") == BUNDLE


def test_jwks_document_shape() -> None:
    d = BUNDLE.to_jwks_dict()
    assert d["spiffe_sequence"] == 7 and d["spiffe_refresh_hint"] == 300
    x, r, j1, j2 = d["keys"]
    assert x["use"] == r["use"] == "x509-svid" and x["kty"] == "EC" and r["kty"] == "RSA"
    assert "kid" not in x and len(x["x5c"]) == 1  # X509-SVID spec: no kid, one certificate
    assert j1 == {**jwk_from_public_key(EC_PUB), "use": "jwt-svid", "kid": "k1"}
    assert j2["kty"] == "RSA" and j2["e"] == "AQAB"
    assert "spiffe_sequence" not in Bundle(TD).to_jwks_dict()


def test_keys_parameter_must_be_present() -> None:
    with pytest.raises(InvalidInput, match="no 'keys'"):
        Bundle.parse_jwks("{}", TD)
    with pytest.raises(InvalidInput, match="array of JWKs"):
        Bundle.parse_jwks('{"keys": {}}', TD)


def test_bundle_must_be_a_json_object() -> None:
    for text in ("[]", "nope", b"\xff"):
        with pytest.raises(InvalidInput):
            Bundle.parse_jwks(text, TD)


def test_unknown_use_is_ignored() -> None:
    bundle = Bundle.parse_jwks(doc({**jwt_jwk(), "use": "wit-svid"}, jwt_jwk("k9")), TD)
    assert list(bundle.jwt_authorities) == ["k9"]


def test_unknown_key_type_is_ignored() -> None:
    assert Bundle.parse_jwks(doc({"kty": "oct", "use": "jwt-svid", "k": "c2VjcmV0"}),
                             TD).jwt_authorities == {}


def test_use_must_be_set() -> None:
    entry = jwt_jwk()
    del entry["use"]
    with pytest.raises(InvalidInput, match="keys\\[1\\]: the JWK has no 'use'"):
        Bundle.parse_jwks(doc(jwt_jwk("a"), entry), TD)


def test_kty_must_be_set() -> None:
    entry = jwt_jwk()
    del entry["kty"]
    with pytest.raises(InvalidInput, match="keys\\[0\\]: the JWK has no 'kty'"):
        Bundle.parse_jwks(doc(entry), TD)


def test_jwt_svid_keys_need_a_kid() -> None:
    entry = jwt_jwk()
    del entry["kid"]
    with pytest.raises(InvalidInput, match="keys\\[0\\]: a 'jwt-svid' JWK must have"):
        Bundle.parse_jwks(doc(entry), TD)


def test_jwt_svid_kids_are_unique() -> None:
    with pytest.raises(InvalidInput, match="keys\\[1\\].*appears twice"):
        Bundle.parse_jwks(doc(jwt_jwk("a"), jwt_jwk("a", RSA_PUB)), TD)


@pytest.mark.parametrize("change,match", [
    ({"crv": "P-192"}, "unsupported EC curve"),
    ({"x": "AAAA"}, "coordinates must be 48 bytes"),
    ({"y": None}, "'y' must be a non-empty base64url"),
    ({"x": "not base64!!"}, "not valid base64url"),
    ({"x": "AQAB=="}, "unpadded"),
])
def test_ec_key_parameters_must_be_valid(change: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        Bundle.parse_jwks(doc({**jwt_jwk(), **change}), TD)


def test_ec_point_must_be_on_the_curve() -> None:
    entry = jwt_jwk()
    entry["y"] = entry["x"]
    with pytest.raises(InvalidInput, match="not on P-384"):
        Bundle.parse_jwks(doc(entry), TD)


def test_rsa_key_parameters_must_be_present() -> None:
    entry = jwt_jwk(key=RSA_PUB)
    del entry["n"]
    with pytest.raises(InvalidInput, match="'n' must be"):
        Bundle.parse_jwks(doc(entry), TD)


def test_private_key_material_is_refused() -> None:
    with pytest.raises(InvalidInput, match="private key parameters \\(d\\)"):
        Bundle.parse_jwks(doc({**jwt_jwk(), "d": "AAAA"}), TD)


def test_x509_svid_entry_certificate_must_be_der() -> None:
    with pytest.raises(InvalidInput, match="not a DER certificate"):
        Bundle.parse_jwks(doc({**x509_jwk(), "x5c": [base64.b64encode(b"junk").decode()]}), TD)
    with pytest.raises(InvalidInput, match="not valid base64"):
        Bundle.parse_jwks(doc({**x509_jwk(), "x5c": ["***"]}), TD)
    with pytest.raises(InvalidInput, match="array of base64 strings"):
        Bundle.parse_jwks(doc({**x509_jwk(), "x5c": "abc"}), TD)


def test_x509_svid_entry_without_x5c_is_ignored_unless_strict() -> None:
    entry = x509_jwk()
    del entry["x5c"]
    assert Bundle.parse_jwks(doc(entry), TD).x509_authorities == ()
    with pytest.raises(InvalidInput, match="exactly one certificate"):
        Bundle.parse_jwks(doc(entry), TD, strict=True)


def test_x509_svid_entry_uses_only_the_first_certificate_unless_strict() -> None:
    entry = x509_jwk()
    entry["x5c"] = entry["x5c"] + x509_jwk(CA2)["x5c"]
    assert Bundle.parse_jwks(doc(entry), TD).x509_authorities == (CA1,)
    with pytest.raises(InvalidInput, match="exactly one certificate, not 2"):
        Bundle.parse_jwks(doc(entry), TD, strict=True)


def test_x509_svid_entry_with_kid_is_tolerated_unless_strict() -> None:
    entry = {**x509_jwk(), "kid": "abc"}
    assert Bundle.parse_jwks(doc(entry), TD).x509_authorities == (CA1,)
    with pytest.raises(InvalidInput, match="must not have a 'kid'"):
        Bundle.parse_jwks(doc(entry), TD, strict=True)


def test_x509_svid_entry_key_parameters_must_match_the_certificate() -> None:
    entry = x509_jwk(CA1)
    other = jwk_from_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    entry.update({"x": other["x"], "y": other["y"]})
    with pytest.raises(InvalidInput, match="do not match the certificate"):
        Bundle.parse_jwks(doc(entry), TD)


@pytest.mark.parametrize("field,value", [("spiffe_sequence", -1), ("spiffe_sequence", "1"),
                                         ("spiffe_refresh_hint", True),
                                         ("spiffe_refresh_hint", 1.5)])
def test_sequence_and_refresh_hint_are_non_negative_integers(field: str, value: Any) -> None:
    with pytest.raises(InvalidInput, match=field):
        Bundle.parse_jwks(doc(**{field: value}), TD)


def test_sequence_numbers_beyond_32_bits_survive() -> None:
    big = 2**63 - 1
    assert Bundle.parse_jwks(doc(spiffe_sequence=big), TD).sequence_number == big


def test_okp_keys_for_x509_authorities() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    cert = build_signing_certificate(TD, key.public_key(), key, NOW, NOW + timedelta(days=1), 2)
    bundle = Bundle(TD, (cert,))
    assert Bundle.parse_jwks(bundle.to_jwks(), TD) == bundle
    assert bundle.to_jwks_dict()["keys"][0]["kty"] == "OKP"


def test_jwk_helpers_round_trip() -> None:
    for pub in (EC_PUB, RSA_PUB, ed25519.Ed25519PrivateKey.generate().public_key()):
        assert public_key_from_jwk(jwk_from_public_key(pub)) == pub


# --- PEM and immutability ---------------------------------------------------------------------

def test_pem_round_trip() -> None:
    pem = BUNDLE.to_pem()
    assert pem.count(b"BEGIN CERTIFICATE") == 2
    assert Bundle.from_pem(TD, pem) == Bundle(TD, (CA1, CA2))
    assert Bundle.from_pem(TD, b"") == Bundle(TD)


def test_pem_garbage_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        Bundle.from_pem(TD, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_bundles_are_immutable() -> None:
    b2 = BUNDLE.with_x509_authority(root())
    assert len(b2.x509_authorities) == 3 and len(BUNDLE.x509_authorities) == 2
    assert BUNDLE.with_x509_authority(CA1) == BUNDLE  # no duplicates
    assert BUNDLE.without_x509_authority(CA1).x509_authorities == (CA2,)
    assert set(BUNDLE.with_jwt_authority("k3", EC_PUB).jwt_authorities) == {"k1", "k2", "k3"}
    assert set(BUNDLE.without_jwt_authority("k1").jwt_authorities) == {"k2"}
    assert BUNDLE.with_sequence_number(8).sequence_number == 8
    assert BUNDLE.with_refresh_hint(None).refresh_hint is None
    with pytest.raises(TypeError):
        BUNDLE.jwt_authorities["k9"] = EC_PUB  # type: ignore[index]
    with pytest.raises(InvalidInput, match="different JWT authority"):
        BUNDLE.with_jwt_authority("k1", RSA_PUB)


def test_bundle_refuses_bad_values() -> None:
    with pytest.raises(InvalidInput, match="EC or RSA"):
        Bundle(TD, jwt_authorities={"k": ed25519.Ed25519PrivateKey.generate().public_key()})  # type: ignore[dict-item]
    with pytest.raises(InvalidInput, match="non-negative"):
        Bundle(TD, sequence_number=-1)


def test_bundle_set() -> None:
    other = Bundle(TrustDomain("other.org"), (CA2,))
    bundles = BundleSet.of(BUNDLE, other)
    assert bundles.get(TD) == BUNDLE and bundles[TrustDomain("other.org")] == other
    assert bundles.get(TrustDomain("nope.org")) is None and len(bundles) == 2
    assert set(bundles.without(TD)) == {TrustDomain("other.org")}
    assert bundles.with_bundle(BUNDLE.with_sequence_number(9))[TD].sequence_number == 9
    with pytest.raises(InvalidInput, match="two bundles"):
        BundleSet.of(BUNDLE, BUNDLE)
    with pytest.raises(InvalidInput, match="filed under"):
        BundleSet({TrustDomain("other.org"): BUNDLE})
    assert hash(bundles) == hash(BundleSet.of(other, BUNDLE))
