"""The trust domain's bundle as the server publishes it (SPIFFE bundle format, JWKS).

X.509 authorities are the trust anchors (``use: x509-svid``, one certificate
in ``x5c``); JWT authorities are the published JWT-SVID keys (``use:
jwt-svid`` with their ``kid``). ``spiffe_sequence`` grows whenever the
content changes, so consumers can tell a new bundle from a repeated one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.errors import InternalError
from trustmesh.store.datastore import Datastore

__all__ = ["BundlePublisher", "jwk_for", "spiffe_bundle"]

_SEQ = "bundle.sequence"
_DIGEST = "bundle.digest"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(n: int, size: int | None = None) -> bytes:
    return n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big")


def jwk_for(public_key: Any) -> dict[str, str]:
    """The JWK (RFC 7517/7518) of an EC or RSA public key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
            public_key.curve.name)
        if crv is None:
            raise InternalError(f"curve {public_key.curve.name} has no JWK name")
        ec_nums = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8
        return {"kty": "EC", "crv": crv, "x": _b64u(_int_bytes(ec_nums.x, size)),
                "y": _b64u(_int_bytes(ec_nums.y, size))}
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_nums = public_key.public_numbers()
        return {"kty": "RSA", "n": _b64u(_int_bytes(rsa_nums.n)),
                "e": _b64u(_int_bytes(rsa_nums.e))}
    raise InternalError(f"unsupported key type {type(public_key).__name__}")


def spiffe_bundle(x509_authorities: Sequence[x509.Certificate],
                  jwt_authorities: Mapping[str, Any], *, sequence: int,
                  refresh_hint: int) -> dict[str, Any]:
    keys: list[dict[str, Any]] = []
    for cert in x509_authorities:
        jwk: dict[str, Any] = dict(jwk_for(cert.public_key()))
        jwk["use"] = "x509-svid"
        # no kid: the X509-SVID spec (6.1) leaves it out of x509-svid entries
        jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        keys.append(jwk)
    for kid, pub in sorted(jwt_authorities.items()):
        jwk = dict(jwk_for(pub))
        jwk["use"] = "jwt-svid"
        jwk["kid"] = kid
        keys.append(jwk)
    return {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": refresh_hint}


class BundlePublisher:
    """Builds the bundle and bumps its sequence number (in the datastore) on change."""

    def __init__(self, store: Datastore, refresh_hint: int = 300) -> None:
        self.store = store
        self.refresh_hint = refresh_hint
        self._lock = threading.Lock()

    def current(self, x509_authorities: Sequence[x509.Certificate],
                jwt_authorities: Mapping[str, Any]) -> dict[str, Any]:
        content = spiffe_bundle(x509_authorities, jwt_authorities, sequence=0,
                                refresh_hint=self.refresh_hint)
        digest = hashlib.sha256(json.dumps(content["keys"], sort_keys=True).encode()
                                ).hexdigest()
        with self._lock:
            seq = int(self.store.get_setting(_SEQ) or 0)
            if self.store.get_setting(_DIGEST) != digest:
                seq += 1
                self.store.put_settings({_SEQ: str(seq), _DIGEST: digest})
        content["spiffe_sequence"] = seq
        return content
