"""The SDS response builder: resource names, PEM contents, SPIFFE validator, refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe

from trustmesh.agent.cache import CachedSvid
from trustmesh.agent.sds import build_secrets, secret_version, secrets_version
from trustmesh.errors import InvalidInput, PermissionDenied


def _cert(uri: str | None, ca: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri or "root")])
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
    if uri:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                            False)
    return b.sign(key, hashes.SHA256()), key


def svid(spiffe_id: str) -> CachedSvid:
    cert, key = _cert(spiffe_id, False)
    return CachedSvid("e-" + spiffe_id, 1, spiffe_id, key, (cert,))


ROOT, _ = _cert(None, True)
FED, _ = _cert(None, True)
BUNDLES = {"example.org": (ROOT,), "partner.org": (FED,)}
WEB = svid("spiffe://example.org/web")
DB = svid("spiffe://example.org/db")


def test_default_is_the_first_identity_with_chain_and_key() -> None:
    [secret] = build_secrets(["default"], [WEB, DB], BUNDLES, "example.org")
    assert secret.name == "default"
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    assert chain == list(WEB.chain)
    key = serialization.load_pem_private_key(secret.tls_certificate.private_key.inline_bytes,
                                             None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == WEB.key.public_key().public_bytes(*spki)


def test_named_identity_root_bundle_and_trust_domain_bundle() -> None:
    db, root, fed = build_secrets(["spiffe://example.org/db", "ROOTCA", "spiffe://partner.org"],
                                  [WEB, DB], BUNDLES, "example.org")
    assert x509.load_pem_x509_certificates(db.tls_certificate.certificate_chain.inline_bytes) \
        == list(DB.chain)
    assert x509.load_pem_x509_certificates(root.validation_context.trusted_ca.inline_bytes) \
        == [ROOT]
    assert x509.load_pem_x509_certificates(fed.validation_context.trusted_ca.inline_bytes) \
        == [FED]


def test_all_is_the_spiffe_validator_with_one_trust_domain_per_bundle() -> None:
    [secret] = build_secrets(["ALL"], [WEB], BUNDLES, "example.org")
    custom = secret.validation_context.custom_validator_config
    assert custom.name == "envoy.tls.cert_validator.spiffe"
    config = spiffe.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config)
    domains = {td.name: x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes)
               for td in config.trust_domains}
    assert domains == {"example.org": [ROOT], "partner.org": [FED]}


@pytest.mark.parametrize(("names", "svids", "message"), [
    (["spiffe://example.org/admin"], [WEB], "not entitled to the identity "
                                            "spiffe://example.org/admin"),
    (["default"], [], "no identity issued"),
    (["spiffe://other.org"], [WEB], "no bundle for trust domain other.org"),
])
def test_refusals_name_what_was_refused(names: list[str], svids: list[CachedSvid],
                                        message: str) -> None:
    with pytest.raises(PermissionDenied, match=message):
        build_secrets(names, svids, BUNDLES, "example.org")


def test_version_follows_content() -> None:
    a = build_secrets(["default", "ALL"], [WEB], BUNDLES, "example.org")
    b = build_secrets(["default", "ALL"], [DB], BUNDLES, "example.org")
    assert secrets_version(a) == secrets_version(
        build_secrets(["default", "ALL"], [WEB], BUNDLES, "example.org"))
    assert secrets_version(a) != secrets_version(b)


@pytest.mark.parametrize("name", ["secret-sauce", "spiffe://Example.org/x", "spiffe://td/a//b"])
def test_malformed_names_are_invalid_input(name: str) -> None:
    with pytest.raises(InvalidInput):
        build_secrets([name], [WEB], BUNDLES, "example.org")


def test_secrets_come_back_in_request_order_with_the_requested_names() -> None:
    names = ["ALL", "spiffe://example.org/db", "default", "spiffe://example.org", "ROOTCA"]
    secrets = build_secrets(names, [WEB, DB], BUNDLES, "example.org")
    assert [s.name for s in secrets] == names
    kinds = [s.WhichOneof("type") for s in secrets]
    assert kinds == ["validation_context", "tls_certificate", "tls_certificate",
                     "validation_context", "validation_context"]


def test_an_identity_waiting_for_its_svid_is_left_out_not_refused() -> None:
    pending = {"spiffe://example.org/db"}
    assert build_secrets(["default"], [], BUNDLES, "example.org", pending) == []
    [root] = build_secrets(["spiffe://example.org/db", "ROOTCA"], [WEB], BUNDLES,
                           "example.org", pending)
    assert root.name == "ROOTCA"
    with pytest.raises(PermissionDenied, match="spiffe://example.org/admin"):
        build_secrets(["spiffe://example.org/admin"], [], BUNDLES, "example.org", pending)


def test_the_key_is_unencrypted_pkcs8_and_the_chain_has_no_root() -> None:
    [secret] = build_secrets(["default"], [WEB], BUNDLES, "example.org")
    assert secret.tls_certificate.private_key.inline_bytes.startswith(
        b"-----BEGIN PRIVATE KEY-----")
    assert ROOT.public_bytes(serialization.Encoding.PEM) not in \
        secret.tls_certificate.certificate_chain.inline_bytes


def test_all_leaves_out_trust_domains_without_roots() -> None:
    [secret] = build_secrets(["ALL"], [WEB], {"example.org": (ROOT,), "empty.org": ()},
                             "example.org")
    config = spiffe.SPIFFECertValidatorConfig()
    secret.validation_context.custom_validator_config.typed_config.Unpack(config)
    assert [td.name for td in config.trust_domains] == ["example.org"]


def test_secret_version_changes_with_rotation_only() -> None:
    [a] = build_secrets(["default"], [WEB], BUNDLES, "example.org")
    [again] = build_secrets(["default"], [WEB], BUNDLES, "example.org")
    [rotated] = build_secrets(["default"], [svid(WEB.spiffe_id)], BUNDLES, "example.org")
    assert secret_version(a) == secret_version(again) != secret_version(rotated)


def _crl(issuer: x509.Certificate, revoked_serials: list[int]) -> x509.CertificateRevocationList:
    key = ec.generate_private_key(ec.SECP256R1())  # the signature is not what is tested here
    now = datetime.now(UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
         .last_update(now).next_update(now + timedelta(hours=1)))
    for serial in revoked_serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now).build())
    return b.sign(key, hashes.SHA256())


def test_crls_join_the_own_trust_domain_in_the_spiffe_validator_only() -> None:
    crl = _crl(ROOT, [WEB.chain[0].serial_number])
    [all_] = build_secrets(["ALL"], [WEB], BUNDLES, "example.org", crls=[crl])
    config = spiffe.SPIFFECertValidatorConfig()
    assert all_.validation_context.custom_validator_config.typed_config.Unpack(config)
    pems = {td.name: td.trust_bundle.inline_bytes for td in config.trust_domains}
    own = pems["example.org"]
    assert x509.load_pem_x509_certificates(own) == [ROOT]  # the roots, then the CRL
    assert own.count(b"-----BEGIN X509 CRL-----") == 1
    assert x509.load_pem_x509_crl(own[own.index(b"-----BEGIN X509 CRL-----"):]) == crl
    assert b"X509 CRL" not in pems["partner.org"]  # a federated trust domain's are not ours
    [without] = build_secrets(["ALL"], [WEB], BUNDLES, "example.org")
    assert secret_version(without) != secret_version(all_)  # a new CRL is a new version


def test_a_revoked_svid_is_due_for_renewal_at_once() -> None:
    from trustmesh.agent.cache import CachedEntry, SvidCache

    cache = SvidCache()
    entry = CachedEntry(WEB.entry_id, WEB.spiffe_id, "spiffe://example.org/node",
                        frozenset({"unix:uid:1"}), 3600, 300, (), (), "", 1)
    cache.apply_changes([entry], [], 1)
    fresh = CachedSvid(entry.id, 1, WEB.spiffe_id, WEB.key, WEB.chain,
                       received_at=WEB.not_before)
    cache.store([fresh])
    assert cache.due(WEB.not_before + 60) == []
    leaf = WEB.chain[0]
    cache.revoked = frozenset({(leaf.issuer.public_bytes(), leaf.serial_number + 1)})
    assert cache.due(WEB.not_before + 60) == []  # another serial
    cache.revoked = frozenset({(leaf.issuer.public_bytes(), leaf.serial_number)})
    assert cache.due(WEB.not_before + 60) == [entry.id]
