"""Pure CA logic: hierarchy, templates, validity planning, names, CRL and OCSP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.config import CaMode
from trustmesh.errors import InvalidInput
from trustmesh.pki.ca import (
    CaUrls,
    IssuancePolicy,
    IssuanceRequest,
    SigningAuthority,
    build_intermediate,
    build_root,
    ca_id_of,
    issue_certificate,
    parse_subject,
    plan_validity,
)
from trustmesh.pki.crl import RevocationReason, RevokedCertificate, build_crl
from trustmesh.pki.csr import RequestedNames, check_public_key, load_csr, validate_dns_name
from trustmesh.pki.ocsp import (
    CertificateStatus,
    OcspResponder,
    ResponderIdentity,
    Status,
    issuer_key_hash,
)
from trustmesh.pki.templates import TEMPLATES, get_template

NOW = datetime(2030, 1, 1, tzinfo=UTC)
URLS = CaUrls("http://ca/crl/x.crl", "http://ca/ocsp", "http://ca/ca/x.der")


@pytest.fixture(scope="module")
def authority() -> SigningAuthority:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_root(
        root_key,
        parse_subject("O=t,CN=root"),
        NOW - timedelta(days=1),
        timedelta(days=3650),
        path_length=2,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    inter = build_intermediate(
        key.public_key(),
        parse_subject("O=t,CN=inter"),
        root,
        root_key,
        NOW - timedelta(days=1),
        timedelta(days=365),
        path_length=1,
        permitted_uri_domains=("example.org",),
    )
    return SigningAuthority(inter, key, (root,), URLS, ("example.org",), (), ca_id_of(inter))


def csr_for(
    key: object = None,
    *,
    cn: str = "svc",
    sans: list[x509.GeneralName] | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),
) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext, crit in extensions:
        b = b.add_extension(ext, critical=crit)
    return b.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def request(
    csr: x509.CertificateSigningRequest,
    template: str = "end-entity",
    validity: timedelta = timedelta(hours=1),
    **names: tuple[str, ...],
) -> IssuanceRequest:
    return IssuanceRequest(
        csr, get_template(template), validity, RequestedNames.collect(csr, **names)
    )


POLICY = IssuancePolicy(CaMode.GENERAL, timedelta(seconds=60))


def test_root_is_self_signed_ca_with_path_length(authority: SigningAuthority) -> None:
    root = authority.chain[0]
    root.verify_directly_issued_by(root)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 2
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign


def test_intermediate_has_name_constraints_and_aki(authority: SigningAuthority) -> None:
    inter = authority.certificate
    inter.verify_directly_issued_by(authority.chain[0])
    nc = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    aki = inter.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = authority.chain[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_intermediate_never_outlives_its_issuer(authority: SigningAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = authority.chain[0]
    long = build_intermediate(
        key.public_key(),
        parse_subject("CN=x"),
        root,
        ec.generate_private_key(ec.SECP256R1()),
        NOW,
        timedelta(days=100000),
    )
    assert long.not_valid_after_utc == root.not_valid_after_utc


def test_upstream_path_length_zero_cannot_sign_a_ca() -> None:
    k = ec.generate_private_key(ec.SECP256R1())
    root = build_root(k, parse_subject("CN=r"), NOW, timedelta(days=10), path_length=0)
    with pytest.raises(InvalidInput, match="cannot sign another CA"):
        build_intermediate(k.public_key(), parse_subject("CN=i"), root, k, NOW, timedelta(days=1))


@pytest.mark.parametrize(
    "template,eku",
    [
        ("end-entity", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        ("end-entity-server", [ExtendedKeyUsageOID.SERVER_AUTH]),
        ("end-entity-client", [ExtendedKeyUsageOID.CLIENT_AUTH]),
        ("code-signing", [ExtendedKeyUsageOID.CODE_SIGNING]),
        ("ocsp-signing", [ExtendedKeyUsageOID.OCSP_SIGNING]),
    ],
)
def test_each_leaf_template_fixes_its_eku(
    authority: SigningAuthority, template: str, eku: list[x509.ObjectIdentifier]
) -> None:
    cert = issue_certificate(
        authority, request(csr_for(), template, dns_names=("a.b.c",)), NOW, 7, POLICY
    )
    cert.verify_directly_issued_by(authority.certificate)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == eku
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    has_nocheck = any(isinstance(e.value, x509.OCSPNoCheck) for e in cert.extensions)
    assert has_nocheck == (template == "ocsp-signing")


def test_key_encipherment_only_for_rsa_server_keys(authority: SigningAuthority) -> None:
    rsa_key = rsa.generate_private_key(65537, 2048)
    cert = issue_certificate(
        authority, request(csr_for(rsa_key), dns_names=("a.b",)), NOW, 8, POLICY
    )
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    cert = issue_certificate(authority, request(csr_for(), dns_names=("a.b",)), NOW, 9, POLICY)
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_issued_certificates_point_at_crl_and_ocsp(authority: SigningAuthority) -> None:
    cert = issue_certificate(authority, request(csr_for(), dns_names=("a.b",)), NOW, 10, POLICY)
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name[0].value == URLS.crl_url
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert {a.access_location.value for a in aia} == {URLS.ocsp_url, URLS.ca_issuers_url}


def test_not_before_is_backdated_by_the_skew(authority: SigningAuthority) -> None:
    cert = issue_certificate(
        authority,
        request(csr_for(), dns_names=("a.b",)),
        NOW,
        11,
        IssuancePolicy(CaMode.GENERAL, timedelta(minutes=5)),
    )
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=1)


def test_cn_becomes_the_dns_san_when_no_names_are_given(authority: SigningAuthority) -> None:
    cert = issue_certificate(authority, request(csr_for(cn="web.internal")), NOW, 12, POLICY)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.internal"]


def test_a_leaf_that_names_nothing_is_refused(authority: SigningAuthority) -> None:
    with pytest.raises(InvalidInput, match="would name nothing"):
        issue_certificate(authority, request(csr_for(cn="not a hostname")), NOW, 13, POLICY)


@pytest.mark.parametrize(
    "validity,mode,match",
    [
        (timedelta(days=8), CaMode.SHORT_LIVED, "short-lived CA mode's limit of 7d"),
        (timedelta(days=398), CaMode.GENERAL, "template's maximum of 397d"),
        (timedelta(0), CaMode.GENERAL, "must be positive"),
    ],
)
def test_validity_limits(
    authority: SigningAuthority, validity: timedelta, mode: CaMode, match: str
) -> None:
    with pytest.raises(InvalidInput, match=match):
        plan_validity(
            NOW, validity, get_template("end-entity"), IssuancePolicy(mode), authority.certificate
        )


def test_no_certificate_outlives_its_issuer(authority: SigningAuthority) -> None:
    late = authority.certificate.not_valid_after_utc - timedelta(hours=1)
    with pytest.raises(InvalidInput, match="after the signing CA expires"):
        plan_validity(
            late, timedelta(hours=2), get_template("end-entity"), POLICY, authority.certificate
        )


def test_subordinate_ca_path_length_must_fit_under_the_issuer(authority: SigningAuthority) -> None:
    csr = csr_for(cn="sub")
    sub = issue_certificate(
        authority,
        IssuanceRequest(
            csr, get_template("subordinate-ca"), timedelta(days=1), RequestedNames(), 0
        ),
        NOW,
        14,
        POLICY,
    )
    bc = sub.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    with pytest.raises(InvalidInput, match="path length"):
        issue_certificate(
            authority,
            IssuanceRequest(
                csr, get_template("subordinate-ca"), timedelta(days=1), RequestedNames(), 1
            ),
            NOW,
            15,
            POLICY,
        )


def test_path_length_only_for_subordinate_ca(authority: SigningAuthority) -> None:
    with pytest.raises(InvalidInput, match="only applies to the subordinate-ca"):
        issue_certificate(
            authority,
            IssuanceRequest(
                csr_for(),
                get_template("end-entity"),
                timedelta(hours=1),
                RequestedNames(dns_names=("a.b",)),
                1,
            ),
            NOW,
            16,
            POLICY,
        )


def test_passthrough_refuses_ca_powers(authority: SigningAuthority) -> None:
    ca_csr = csr_for(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)])
    with pytest.raises(InvalidInput, match="CA:TRUE"):
        issue_certificate(authority, request(ca_csr, "csr-passthrough"), NOW, 17, POLICY)
    ku = x509.KeyUsage(True, False, False, False, False, True, False, False, False)
    with pytest.raises(InvalidInput, match="keyCertSign"):
        issue_certificate(
            authority, request(csr_for(extensions=[(ku, True)]), "csr-passthrough"), NOW, 18, POLICY
        )
    nc = x509.NameConstraints([x509.DNSName("x")], None)
    with pytest.raises(InvalidInput, match="does not copy"):
        issue_certificate(
            authority, request(csr_for(extensions=[(nc, True)]), "csr-passthrough"), NOW, 19, POLICY
        )


def test_uri_sans_must_fit_the_name_constraints(authority: SigningAuthority) -> None:
    with pytest.raises(InvalidInput, match="outside this CA's permitted URI domains"):
        issue_certificate(
            authority, request(csr_for(), uris=("https://evil.example/x",)), NOW, 20, POLICY
        )


def test_unknown_template_lists_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match="known templates: code-signing") as info:
        get_template("server")
    assert info.value.field == "template"
    assert set(TEMPLATES) == {
        "end-entity",
        "end-entity-server",
        "end-entity-client",
        "code-signing",
        "ocsp-signing",
        "subordinate-ca",
        "csr-passthrough",
        "x509-svid",
    }


@pytest.mark.parametrize(
    "name,ok",
    [
        ("web.internal", True),
        ("*.apps.internal", True),
        ("a-b.c", True),
        ("xn--bcher-kva.ch", True),
        ("*.internal", False),
        ("a.*.b", False),
        ("-a.b", False),
        ("a..b", False),
        ("a.b.", False),
        ("a b.c", False),
        ("a" * 64 + ".b", False),
        ("", False),
        ("f*o.bar.baz", False),
    ],
)
def test_dns_name_rules(name: str, ok: bool) -> None:
    if ok:
        assert validate_dns_name(name) == name.lower()
    else:
        with pytest.raises(InvalidInput):
            validate_dns_name(name)


def test_weak_and_unknown_keys_are_refused() -> None:
    with pytest.raises(InvalidInput, match="too weak"):
        check_public_key(rsa.generate_private_key(65537, 1024).public_key())
    with pytest.raises(InvalidInput, match="not accepted"):
        check_public_key(ec.generate_private_key(ec.SECP256K1()).public_key())
    check_public_key(ec.generate_private_key(ec.SECP384R1()).public_key())


def test_load_csr_rejects_pem_of_the_wrong_kind_and_empty_input() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        load_csr(b"  \n")
    with pytest.raises(InvalidInput, match="CERTIFICATE REQUEST"):
        load_csr(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    der = csr_for().public_bytes(serialization.Encoding.DER)
    assert load_csr(der).is_signature_valid


def _signed_crl(
    authority: SigningAuthority, revoked: list[RevokedCertificate]
) -> x509.CertificateRevocationList:
    return build_crl(
        authority.certificate,
        authority.key,
        revoked,
        number=5,
        this_update=NOW,
        next_update=NOW + timedelta(hours=24),
    )


def test_crl_has_number_aki_times_and_reasons(authority: SigningAuthority) -> None:
    crl = _signed_crl(
        authority,
        [
            RevokedCertificate(0xABC, NOW, RevocationReason.KEY_COMPROMISE),
            RevokedCertificate(0xDEF, NOW, RevocationReason.UNSPECIFIED),
        ],
    )
    assert crl.is_signature_valid(authority.certificate.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 5
    assert crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert crl.next_update_utc == NOW + timedelta(hours=24)
    entry = crl.get_revoked_certificate_by_serial_number(0xABC)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    plain = crl.get_revoked_certificate_by_serial_number(0xDEF)
    assert plain is not None and len(plain.extensions) == 0


def test_revocation_reason_parsing() -> None:
    assert RevocationReason.parse("keyCompromise") is RevocationReason.KEY_COMPROMISE
    assert RevocationReason.parse("key_compromise") is RevocationReason.KEY_COMPROMISE
    with pytest.raises(InvalidInput, match="unknown revocation reason"):
        RevocationReason.parse("bored")


@pytest.fixture(scope="module")
def responder(authority: SigningAuthority) -> tuple[OcspResponder, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = csr_for(key, cn="ocsp")
    cert = issue_certificate(
        authority,
        IssuanceRequest(csr, get_template("ocsp-signing"), timedelta(days=1), RequestedNames()),
        NOW,
        99,
        POLICY,
    )
    ident = ResponderIdentity(authority.ca_id, authority.certificate, cert, key)
    return OcspResponder([ident], timedelta(hours=1)), cert


def _ocsp_request(
    authority: SigningAuthority, serial: int, alg: hashes.HashAlgorithm, nonce: bytes | None = None
) -> bytes:
    inter = authority.certificate
    h = hashes.Hash(alg)
    h.update(inter.subject.public_bytes())
    b = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        h.finalize(), issuer_key_hash(inter, alg), serial, alg
    )
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("alg", [hashes.SHA1(), hashes.SHA256(), hashes.SHA384()])
def test_ocsp_answers_for_every_certid_hash(
    authority: SigningAuthority,
    responder: tuple[OcspResponder, x509.Certificate],
    alg: hashes.HashAlgorithm,
) -> None:
    resp, cert = responder
    ans = resp.respond(
        _ocsp_request(authority, 42, alg, b"n0nce"),
        lambda ca, s: CertificateStatus(Status.GOOD),
        NOW,
    )
    parsed = ocsp.load_der_ocsp_response(ans.der)
    assert parsed.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert parsed.serial_number == 42
    assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"n0nce"
    cert.public_key().verify(  # type: ignore[union-attr, call-arg]
        parsed.signature, parsed.tbs_response_bytes, ec.ECDSA(hashes.SHA256())
    )  # type: ignore[call-arg]


def test_ocsp_revoked_carries_time_and_reason(
    authority: SigningAuthority, responder: tuple[OcspResponder, x509.Certificate]
) -> None:
    resp, _ = responder
    status = CertificateStatus(
        Status.REVOKED, NOW - timedelta(hours=2), RevocationReason.SUPERSEDED
    )
    ans = resp.respond(
        _ocsp_request(authority, 7, hashes.SHA1()),  # noqa: S303
        lambda ca, s: status,
        NOW,
    )
    parsed = ocsp.load_der_ocsp_response(ans.der)
    assert parsed.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert parsed.revocation_time_utc == NOW - timedelta(hours=2)
    assert parsed.revocation_reason == x509.ReasonFlags.superseded
    assert ans.outcome == "revoked"


@pytest.mark.parametrize("data", [b"", b"\x30\x03\x02\x01", b"garbage" * 10, b"\x30" * 200])
def test_ocsp_malformed_requests(
    responder: tuple[OcspResponder, x509.Certificate], data: bytes
) -> None:
    ans = responder[0].respond(data, lambda ca, s: CertificateStatus(Status.GOOD), NOW)
    assert ans.outcome == "malformedRequest"
    assert ocsp.load_der_ocsp_response(ans.der).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )


def test_ocsp_oversized_nonce_is_malformed(
    authority: SigningAuthority, responder: tuple[OcspResponder, x509.Certificate]
) -> None:
    ans = responder[0].respond(
        _ocsp_request(authority, 1, hashes.SHA256(), b"x" * 500),
        lambda ca, s: CertificateStatus(Status.GOOD),
        NOW,
    )
    assert ans.outcome == "malformedRequest"


def test_ocsp_foreign_issuer_is_unauthorized(
    responder: tuple[OcspResponder, x509.Certificate],
) -> None:
    k = ec.generate_private_key(ec.SECP256R1())
    other = build_root(k, parse_subject("CN=other"), NOW, timedelta(days=1))
    other_auth = SigningAuthority(other, k, (), URLS)
    ans = responder[0].respond(
        _ocsp_request(other_auth, 1, hashes.SHA256()),
        lambda ca, s: CertificateStatus(Status.GOOD),
        NOW,
    )
    assert ans.outcome == "unauthorized"
    assert ocsp.load_der_ocsp_response(ans.der).response_status == (
        ocsp.OCSPResponseStatus.UNAUTHORIZED
    )


def test_x509_svid_template_has_exactly_one_spiffe_uri(authority: SigningAuthority) -> None:
    csr = csr_for(cn="ignored")
    req = IssuanceRequest(csr, get_template("x509-svid"), timedelta(hours=1),
                          RequestedNames(uris=("spiffe://example.org/ns/a/sa/b",)),
                          subject=parse_subject("O=trustmesh"))
    cert = issue_certificate(authority, req, NOW, 77, POLICY)
    assert cert.subject == parse_subject("O=trustmesh")  # the CSR's subject is not used
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/ns/a/sa/b"]
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    two = IssuanceRequest(csr, get_template("x509-svid"), timedelta(hours=1),
                          RequestedNames(uris=("spiffe://example.org/a",
                                               "spiffe://example.org/b")))
    with pytest.raises(InvalidInput, match="exactly one URI SAN"):
        issue_certificate(authority, two, NOW, 78, POLICY)
    not_spiffe = IssuanceRequest(csr, get_template("x509-svid"), timedelta(hours=1),
                                 RequestedNames(uris=("https://example.org/a",)))
    with pytest.raises(InvalidInput, match="exactly one URI SAN"):
        issue_certificate(authority, not_spiffe, NOW, 79, POLICY)
