"""SPIFFE primitives: IDs, X509-SVIDs, JWT-SVIDs and bundles. Pure: no IO, no clock.

- :mod:`trustmesh.spiffe.ids`: :class:`SpiffeId`, :class:`TrustDomain`
- :mod:`trustmesh.spiffe.svid`: the X509-SVID profile, builder and verifier
- :mod:`trustmesh.spiffe.jwt`: JWT-SVID minting and validation
- :mod:`trustmesh.spiffe.bundle`: :class:`Bundle` (JWKS and PEM) and :class:`BundleSet`
"""

from trustmesh.spiffe.bundle import (
    Bundle,
    BundleSet,
    BundleSource,
    JwtAuthorityKey,
    jwk_from_public_key,
    public_key_from_jwk,
)
from trustmesh.spiffe.ids import MAX_ID_LENGTH, MAX_TRUST_DOMAIN_LENGTH, SpiffeId, TrustDomain
from trustmesh.spiffe.jwt import (
    ALLOWED_ALGORITHMS,
    JwtSvid,
    algorithm_for,
    mint_jwt_svid,
    parse_jwt_svid_unverified,
    validate_jwt_svid,
)
from trustmesh.spiffe.svid import (
    X509Svid,
    build_signing_certificate,
    build_x509_svid,
    parse_x509_svid,
    spiffe_id_from_certificate,
    validate_leaf_certificate,
    validate_signing_certificate,
    verify_x509_svid,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "MAX_ID_LENGTH",
    "MAX_TRUST_DOMAIN_LENGTH",
    "Bundle",
    "BundleSet",
    "BundleSource",
    "JwtAuthorityKey",
    "JwtSvid",
    "SpiffeId",
    "TrustDomain",
    "X509Svid",
    "algorithm_for",
    "build_signing_certificate",
    "build_x509_svid",
    "jwk_from_public_key",
    "mint_jwt_svid",
    "parse_jwt_svid_unverified",
    "parse_x509_svid",
    "public_key_from_jwk",
    "spiffe_id_from_certificate",
    "validate_jwt_svid",
    "validate_leaf_certificate",
    "validate_signing_certificate",
    "verify_x509_svid",
]
