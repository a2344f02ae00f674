"""X509-SVID profile: one test per rule of the X509-SVID specification, plus verification."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.spiffe import (
    Bundle,
    BundleSet,
    SpiffeId,
    TrustDomain,
    X509Svid,
    build_signing_certificate,
    build_x509_svid,
    parse_x509_svid,
    spiffe_id_from_certificate,
    validate_leaf_certificate,
    validate_signing_certificate,
    verify_x509_svid,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
TD = TrustDomain("example.org")
SID = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")


@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_root(td: TrustDomain = TD, days: int = 30) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_signing_certificate(td, key.public_key(), key, NOW - timedelta(days=1),
                                     NOW + timedelta(days=days), 1)
    return Ca(cert, key)


def make_intermediate(parent: Ca, td: TrustDomain = TD, hours: int = 48) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_signing_certificate(td, key.public_key(), parent.key, NOW - timedelta(hours=1),
                                     NOW + timedelta(hours=hours), 2, issuer_cert=parent.cert)
    return Ca(cert, key)


ROOT = make_root()
INTER = make_intermediate(ROOT)
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def leaf(sid: SpiffeId = SID, issuer: Ca = INTER, dns: tuple[str, ...] = (),
         hours: int = 1) -> x509.Certificate:
    return build_x509_svid(sid, LEAF_KEY.public_key(), issuer.cert, issuer.key,
                           NOW - timedelta(minutes=5), NOW + timedelta(hours=hours), 77, dns)


NOT_CA = x509.BasicConstraints(False, None)


def custom_leaf(*, san: Sequence[x509.GeneralName] | None = None, san_critical: bool = False,
                subject: x509.Name | None = None,
                bc: x509.BasicConstraints | None = NOT_CA,
                ku: x509.KeyUsage | None = None, ku_critical: bool = True,
                eku: list[x509.ObjectIdentifier] | None = None) -> x509.Certificate:
    """A leaf with exactly the extensions asked for (to break one rule at a time)."""
    if ku is None:
        ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    b = (x509.CertificateBuilder()
         .subject_name(subject if subject is not None
                       else x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")]))
         .issuer_name(INTER.cert.subject).public_key(LEAF_KEY.public_key()).serial_number(9)
         .not_valid_before(NOW - timedelta(minutes=5)).not_valid_after(NOW + timedelta(hours=1)))
    if san is None:
        san = [x509.UniformResourceIdentifier(str(SID))]
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=san_critical)
    if bc is not None:
        b = b.add_extension(bc, critical=True)
    b = b.add_extension(ku, critical=ku_critical)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
        INTER.key.public_key()), critical=False)
    return b.sign(INTER.key, hashes.SHA256())


def ku(**on: bool) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(*[on.get(n, False) for n in names])


# --- leaf rules -------------------------------------------------------------------------------

def test_built_leaf_follows_the_profile() -> None:
    cert = leaf(dns=("web.example.org", "web"))
    assert validate_leaf_certificate(cert) == SID
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [g.value for g in san] == [str(SID), "web.example.org", "web"]
    assert isinstance(san[0], x509.UniformResourceIdentifier)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not key_usage.value.key_encipherment  # EC key
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = INTER.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.subject.rfc4514_string() == "CN=web.example.org,O=trustmesh"
    assert leaf().subject.rfc4514_string() == "O=trustmesh"


def test_rsa_leaf_sets_key_encipherment() -> None:
    rsa_key = rsa.generate_private_key(65537, 2048)
    cert = build_x509_svid(SID, rsa_key.public_key(), INTER.cert, INTER.key,
                           NOW, NOW + timedelta(hours=1), 5)
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    assert validate_leaf_certificate(cert) == SID


def test_leaf_must_have_a_uri_san() -> None:
    with pytest.raises(InvalidInput, match="no URI SAN"):
        validate_leaf_certificate(custom_leaf(san=[x509.DNSName("web.example.org")]))
    with pytest.raises(InvalidInput, match="no URI SAN"):
        validate_leaf_certificate(custom_leaf(san=[]))


def test_leaf_must_have_exactly_one_uri_san() -> None:
    two = [x509.UniformResourceIdentifier(str(SID)),
           x509.UniformResourceIdentifier("spiffe://example.org/other")]
    with pytest.raises(InvalidInput, match="2 URI SANs"):
        validate_leaf_certificate(custom_leaf(san=two))


def test_leaf_uri_san_must_be_a_valid_spiffe_id() -> None:
    for uri in ("https://example.org/web", "spiffe://Example.org/web", "spiffe://example.org/a/"):
        with pytest.raises(InvalidInput, match="not a valid SPIFFE ID"):
            validate_leaf_certificate(custom_leaf(san=[x509.UniformResourceIdentifier(uri)]))


def test_leaf_spiffe_id_must_have_a_non_root_path() -> None:
    cert = custom_leaf(san=[x509.UniformResourceIdentifier("spiffe://example.org")])
    with pytest.raises(InvalidInput, match="has no path"):
        validate_leaf_certificate(cert)
    with pytest.raises(InvalidInput, match="non-root path"):
        build_x509_svid(TD.id, LEAF_KEY.public_key(), INTER.cert, INTER.key, NOW,
                        NOW + timedelta(hours=1), 3)


def test_leaf_san_must_be_critical_when_subject_is_empty() -> None:
    with pytest.raises(InvalidInput, match="must be\\s+marked critical|marked critical"):
        validate_leaf_certificate(custom_leaf(subject=x509.Name([]), san_critical=False))
    assert validate_leaf_certificate(custom_leaf(subject=x509.Name([]), san_critical=True)) == SID


def test_leaf_must_not_be_a_ca() -> None:
    with pytest.raises(InvalidInput, match="cA false"):
        validate_leaf_certificate(custom_leaf(bc=x509.BasicConstraints(True, None)))


def test_leaf_without_basic_constraints_is_not_a_ca() -> None:
    assert validate_leaf_certificate(custom_leaf(bc=None)) == SID


def test_leaf_key_usage_must_be_critical() -> None:
    with pytest.raises(InvalidInput, match="marked critical"):
        validate_leaf_certificate(custom_leaf(ku_critical=False))


def test_leaf_must_set_digital_signature() -> None:
    with pytest.raises(InvalidInput, match="lacks digitalSignature"):
        validate_leaf_certificate(custom_leaf(ku=ku(key_encipherment=True)))


def test_leaf_may_set_key_encipherment_and_key_agreement() -> None:
    cert = custom_leaf(ku=ku(digital_signature=True, key_encipherment=True, key_agreement=True))
    assert validate_leaf_certificate(cert) == SID


def test_leaf_must_not_set_key_cert_sign() -> None:
    with pytest.raises(InvalidInput, match="keyCertSign"):
        validate_leaf_certificate(custom_leaf(ku=ku(digital_signature=True, key_cert_sign=True)))


def test_leaf_must_not_set_crl_sign() -> None:
    with pytest.raises(InvalidInput, match="cRLSign"):
        validate_leaf_certificate(custom_leaf(ku=ku(digital_signature=True, crl_sign=True)))


def test_leaf_extended_key_usage_needs_server_and_client_auth() -> None:
    with pytest.raises(InvalidInput, match="lacks clientAuth"):
        validate_leaf_certificate(custom_leaf(eku=[ExtendedKeyUsageOID.SERVER_AUTH]))
    cert = custom_leaf(eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    assert validate_leaf_certificate(cert) == SID


def test_leaf_must_have_key_usage() -> None:
    cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(INTER.cert.subject).public_key(LEAF_KEY.public_key()).serial_number(4)
            .not_valid_before(NOW).not_valid_after(NOW + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(SID))]), critical=True)
            .sign(INTER.key, hashes.SHA256()))
    with pytest.raises(InvalidInput, match="no keyUsage"):
        validate_leaf_certificate(cert)


# --- signing certificate rules ---------------------------------------------------------------

def test_built_signing_certificate_follows_the_profile() -> None:
    assert validate_signing_certificate(ROOT.cert) == TD.id
    assert validate_signing_certificate(INTER.cert) == TD.id


def signing(*, ca: bool = True, usage: x509.KeyUsage | None = None,
            uri: str | None = "spiffe://example.org") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ca")])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(3)
         .not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca, None), critical=True)
         .add_extension(usage or ku(key_cert_sign=True, crl_sign=True), critical=True))
    if uri:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                            critical=False)
    return b.sign(key, hashes.SHA256())


def test_signing_certificate_must_be_a_ca() -> None:
    with pytest.raises(InvalidInput, match="not a CA"):
        validate_signing_certificate(signing(ca=False))


def test_signing_certificate_must_set_key_cert_sign() -> None:
    with pytest.raises(InvalidInput, match="lacks keyCertSign"):
        validate_signing_certificate(signing(usage=ku(crl_sign=True)))


def test_signing_certificate_spiffe_id_must_not_have_a_path() -> None:
    with pytest.raises(InvalidInput, match="has a path"):
        validate_signing_certificate(signing(uri="spiffe://example.org/ca"))


def test_signing_certificate_need_not_carry_a_spiffe_id() -> None:
    assert validate_signing_certificate(signing(uri=None)) is None


# --- X509Svid, parsing ------------------------------------------------------------------------

def test_x509_svid_parse_round_trip_der_and_pem() -> None:
    svid = X509Svid(SID, (leaf(), INTER.cert), LEAF_KEY, hint="internal")
    assert svid.expires_at == NOW + timedelta(hours=1)
    again = parse_x509_svid(svid.chain_der(), svid.key_der(), hint="internal")
    assert again.spiffe_id == SID and again.cert_chain == svid.cert_chain
    chain_pem, key_pem = svid.to_pem()
    assert parse_x509_svid(chain_pem, key_pem).leaf == svid.leaf


def test_x509_svid_parse_refuses_a_foreign_key() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    der = other.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    with pytest.raises(InvalidInput, match="does not match"):
        parse_x509_svid(leaf().public_bytes(serialization.Encoding.DER), der)


def test_x509_svid_parse_checks_intermediates() -> None:
    chain = leaf().public_bytes(serialization.Encoding.DER) + custom_leaf().public_bytes(
        serialization.Encoding.DER)
    key = LEAF_KEY.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    with pytest.raises(InvalidInput, match="certificate 1 of the chain"):
        parse_x509_svid(chain, key)


@pytest.mark.parametrize("chain,key", [(b"", b""), (b"\x30\x82\xff", b"x"),
                                       (b"-----BEGIN CERTIFICATE-----\nxx\n", b"x")])
def test_x509_svid_parse_refuses_garbage(chain: bytes, key: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_x509_svid(chain, key)


def test_spiffe_id_from_certificate() -> None:
    assert spiffe_id_from_certificate(leaf()) == SID


# --- verification -----------------------------------------------------------------------------

BUNDLES = BundleSet.of(Bundle(TD, (ROOT.cert,)))


def test_verify_through_an_intermediate() -> None:
    assert verify_x509_svid([leaf(), INTER.cert], BUNDLES, NOW) == SID
    assert verify_x509_svid(X509Svid(SID, (leaf(), INTER.cert), LEAF_KEY), BUNDLES, NOW) == SID


def test_verify_with_the_intermediate_in_the_bundle() -> None:
    assert verify_x509_svid([leaf()], Bundle(TD, (INTER.cert,)), NOW) == SID


def test_verify_refuses_a_missing_intermediate() -> None:
    with pytest.raises(PermissionDenied, match="does not chain"):
        verify_x509_svid([leaf()], BUNDLES, NOW)


def test_verify_refuses_an_expired_leaf() -> None:
    with pytest.raises(PermissionDenied, match="does not chain"):
        verify_x509_svid([leaf(), INTER.cert], BUNDLES, NOW + timedelta(hours=2))


def test_verify_refuses_a_leaf_not_yet_valid() -> None:
    with pytest.raises(PermissionDenied):
        verify_x509_svid([leaf(), INTER.cert], BUNDLES, NOW - timedelta(hours=1))


def test_verify_refuses_another_trust_domains_authority() -> None:
    # The chain is fine, but its root is the bundle of a different trust domain.
    other_td = TrustDomain("other.org")
    bundles = BundleSet.of(Bundle(other_td, (ROOT.cert,)))
    with pytest.raises(PermissionDenied, match="no bundle for the trust domain example.org"):
        verify_x509_svid([leaf(), INTER.cert], bundles, NOW)


def test_verify_refuses_an_untrusted_root() -> None:
    rogue = make_root()
    rogue_inter = make_intermediate(rogue)
    with pytest.raises(PermissionDenied, match="does not chain"):
        verify_x509_svid([leaf(issuer=rogue_inter), rogue_inter.cert], BUNDLES, NOW)


def test_verify_refuses_a_leaf_signed_by_a_leaf() -> None:
    evil_key = ec.generate_private_key(ec.SECP256R1())
    mid = build_x509_svid(SpiffeId.parse("spiffe://example.org/mid"), evil_key.public_key(),
                          INTER.cert, INTER.key, NOW - timedelta(minutes=5),
                          NOW + timedelta(hours=1), 11)
    fake = build_x509_svid(SID, LEAF_KEY.public_key(), mid, evil_key,
                           NOW - timedelta(minutes=5), NOW + timedelta(hours=1), 12)
    with pytest.raises(PermissionDenied):
        verify_x509_svid([fake, mid, INTER.cert], BUNDLES, NOW)


def test_verify_refuses_a_tampered_leaf() -> None:
    good = leaf()
    forged = build_x509_svid(SpiffeId.parse("spiffe://example.org/admin"), LEAF_KEY.public_key(),
                             INTER.cert, ec.generate_private_key(ec.SECP256R1()),
                             NOW - timedelta(minutes=5), NOW + timedelta(hours=1), 77)
    assert good.issuer == forged.issuer
    with pytest.raises(PermissionDenied):
        verify_x509_svid([forged, INTER.cert], BUNDLES, NOW)


def test_verify_refuses_a_ca_leaf_as_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="cA false"):
        verify_x509_svid([custom_leaf(bc=x509.BasicConstraints(True, None)), INTER.cert],
                         BUNDLES, NOW)


def test_verify_refuses_an_empty_bundle_and_empty_chain() -> None:
    with pytest.raises(PermissionDenied, match="no X.509 authorities"):
        verify_x509_svid([leaf(), INTER.cert], Bundle(TD), NOW)
    with pytest.raises(InvalidInput, match="no certificate"):
        verify_x509_svid([], BUNDLES, NOW)
