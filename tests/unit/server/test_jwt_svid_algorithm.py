"""The server signs JWT-SVIDs with the algorithm that matches its key (P-521 -> ES512)."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.server.agent_api import mint_jwt


@pytest.mark.parametrize(("key", "alg"), [
    (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    (ec.generate_private_key(ec.SECP384R1()), "ES384"),
    (ec.generate_private_key(ec.SECP521R1()), "ES512"),
    (rsa.generate_private_key(65537, 2048), "RS256"),
])
def test_algorithm_follows_the_key(key: object, alg: str) -> None:
    token = mint_jwt("spiffe://example.org/web", ["api", "db"], key, "kid-1", 1000, 2000)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": "kid-1", "typ": "JWT"}
    claims = jwt.decode(token, key.public_key(), algorithms=[alg],  # type: ignore[attr-defined]
                        audience="api", options={"verify_exp": False, "verify_iat": False})
    assert claims["sub"] == "spiffe://example.org/web" and claims["aud"] == ["api", "db"]
