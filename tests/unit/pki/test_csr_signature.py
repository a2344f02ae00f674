"""The CSR self-signature check: our fast path must agree with the library's own check."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import InvalidInput
from trustmesh.pki.csr import load_csr_and_key

_RSA = rsa.generate_private_key(65537, 2048)
_KEYS: dict[str, tuple[Any, Any]] = {
    "p256-sha256": (ec.generate_private_key(ec.SECP256R1()), {"algorithm": hashes.SHA256()}),
    "p384-sha384": (ec.generate_private_key(ec.SECP384R1()), {"algorithm": hashes.SHA384()}),
    "p256-sha512": (ec.generate_private_key(ec.SECP256R1()), {"algorithm": hashes.SHA512()}),
    "rsa-pkcs1": (_RSA, {"algorithm": hashes.SHA256()}),
    "rsa-pss": (_RSA, {"algorithm": hashes.SHA256(), "rsa_padding": padding.PSS(
        padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)}),
    "ed25519": (ed25519.Ed25519PrivateKey.generate(), {"algorithm": None}),
}


def csr_der(kind: str, cn: str = "svc.internal") -> bytes:
    key, sign_args = _KEYS[kind]
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, **sign_args))
    return csr.public_bytes(serialization.Encoding.DER)


def library_verdict(der: bytes) -> bool | None:
    """What ``is_signature_valid`` says, or None when the bytes are no CSR at all."""
    try:
        return x509.load_der_x509_csr(der).is_signature_valid
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm):
        return None


def test_a_csr_with_an_unknown_version_is_invalid_input_not_a_crash() -> None:
    der = bytearray(csr_der("p256-sha256"))
    # SEQUENCE { SEQUENCE(tbs) { INTEGER version ...: the version byte follows 02 01
    at = der.index(b"\x02\x01\x00")
    der[at + 2] = 1
    with pytest.raises(InvalidInput, match="not a valid PKCS#10 CSR"):
        load_csr_and_key(bytes(der))


@pytest.mark.parametrize("kind", sorted(_KEYS))
def test_a_well_signed_csr_of_every_key_type_is_accepted(kind: str) -> None:
    csr, key = load_csr_and_key(csr_der(kind))
    assert csr.is_signature_valid
    assert key == csr.public_key()


@pytest.mark.parametrize("kind", sorted(_KEYS))
def test_a_changed_subject_is_a_bad_signature(kind: str) -> None:
    der = csr_der(kind, cn="svc.internal").replace(b"svc.internal", b"svc.intermal")
    assert library_verdict(der) is False
    with pytest.raises(InvalidInput, match="signature does not verify"):
        load_csr_and_key(der)


@pytest.mark.parametrize("kind", sorted(_KEYS))
def test_a_signature_from_another_key_is_refused(kind: str) -> None:
    # the CSR of one key with the signature of another key of the same type
    own = x509.load_der_x509_csr(csr_der(kind))
    other_key = (rsa.generate_private_key(65537, 2048) if kind.startswith("rsa")
                 else ed25519.Ed25519PrivateKey.generate() if kind == "ed25519"
                 else ec.generate_private_key(_KEYS[kind][0].curve))
    der = own.public_bytes(serialization.Encoding.DER)
    for _ in range(100):  # an ECDSA signature's DER length varies: splice one that fits
        other = x509.load_der_x509_csr((x509.CertificateSigningRequestBuilder()
                                        .subject_name(own.subject)
                                        .sign(other_key, **_KEYS[kind][1]))
                                       .public_bytes(serialization.Encoding.DER))
        if len(other.signature) == len(own.signature):
            break
    assert len(other.signature) == len(own.signature)
    spliced = der.replace(own.signature, other.signature)
    assert spliced != der
    assert library_verdict(spliced) is False
    with pytest.raises(InvalidInput, match="signature does not verify"):
        load_csr_and_key(spliced)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(_KEYS)), position=st.integers(min_value=0),
       flip=st.integers(min_value=1, max_value=255))
def test_our_verdict_on_any_corrupted_byte_matches_the_library(
        kind: str, position: int, flip: int) -> None:
    der = bytearray(csr_der(kind))
    der[position % len(der)] ^= flip
    expected = library_verdict(bytes(der))
    try:
        load_csr_and_key(bytes(der))
        ours: bool | None = True
    except InvalidInput as exc:
        ours = False if "signature does not verify" in exc.message else None
    if expected is None:
        assert ours is None  # not a CSR: refused, though not for its signature
    elif expected is False:
        assert ours is not True  # the library refuses it: so do we (maybe for its key)
    else:
        assert ours is not False  # the library accepts the signature: so do we
