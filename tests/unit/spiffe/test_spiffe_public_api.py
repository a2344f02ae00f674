"""The public surface of trustmesh.spiffe, and its purity (it imports no process code)."""

from __future__ import annotations

import subprocess
import sys

import trustmesh.spiffe as spiffe_pkg

EXPECTED = {
    "ALLOWED_ALGORITHMS", "MAX_ID_LENGTH", "MAX_TRUST_DOMAIN_LENGTH",
    "Bundle", "BundleSet", "BundleSource", "JwtAuthorityKey", "JwtSvid", "SpiffeId",
    "TrustDomain", "X509Svid",
    "algorithm_for", "build_signing_certificate", "build_x509_svid", "jwk_from_public_key",
    "mint_jwt_svid", "parse_jwt_svid_unverified", "parse_x509_svid", "public_key_from_jwk",
    "spiffe_id_from_certificate", "validate_jwt_svid", "validate_leaf_certificate",
    "validate_signing_certificate", "verify_x509_svid",
}


def test_public_api_is_what_we_mean() -> None:
    assert set(spiffe_pkg.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(spiffe_pkg, name) is not None


def test_spiffe_package_is_pure() -> None:
    code = ("import sys, trustmesh.spiffe; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('trustmesh'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert set(out) <= {"trustmesh", "trustmesh.errors", "trustmesh.spiffe",
                        "trustmesh.spiffe.ids", "trustmesh.spiffe.bundle",
                        "trustmesh.spiffe.svid", "trustmesh.spiffe.jwt"}, out
