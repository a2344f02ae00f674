"""The CA against real clients: the openssl command line as requester, verifier and OCSP client."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from harness import ServerProcess, audit_count, issue, make_csr, openssl, split_chain, urls_of


@pytest.fixture
def srv(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "disk")


@pytest.mark.parametrize("key", ["ec", "rsa:2048", "rsa:3072"])
def test_openssl_csr_issues_a_chain_openssl_verifies(srv: ServerProcess, tmp_path: Path,
                                                     key: str) -> None:
    csr = make_csr(tmp_path, "web", key=key)
    out = issue(srv, tmp_path, csr, "--template", "end-entity", "--dns-name", "web.internal",
                "--validity", "48h")
    res = openssl("verify", "-CAfile", str(out["root"]), "-untrusted", str(out["inter"]),
                  str(out["leaf"]))
    assert res.stdout.strip().endswith(": OK")
    assert len(out["chain"]) == 3  # type: ignore[arg-type]
    text = openssl("x509", "-in", str(out["leaf"]), "-noout", "-text").stdout
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "DNS:web.internal" in text
    assert "CA:FALSE" in text


def test_text_output_is_the_chain_leaf_first(srv: ServerProcess, tmp_path: Path) -> None:
    csr = make_csr(tmp_path, "a")
    proc = srv.cli("ca", "issue", "--csr", str(csr), "--template", "end-entity-server",
                   check=True)
    chain = [x509.load_pem_x509_certificate(c.encode()) for c in split_chain(proc.stdout)]
    assert chain[0].issuer == chain[1].subject and chain[1].issuer == chain[2].subject
    assert chain[2].issuer == chain[2].subject


def test_revocation_shows_in_crl_from_the_certificates_own_url_and_in_ocsp(
        srv: ServerProcess, tmp_path: Path) -> None:
    good = issue(srv, tmp_path, make_csr(tmp_path, "good"), "--template", "end-entity")
    bad = issue(srv, tmp_path, make_csr(tmp_path, "bad"), "--template", "end-entity")
    crl_url, ocsp_url = urls_of(bad["leaf"])  # type: ignore[arg-type]
    assert crl_url.startswith(srv.base_url) and ocsp_url.startswith(srv.base_url)

    ocsp_args = ["ocsp", "-issuer", str(good["inter"]), "-CAfile", str(good["root"]),
                 "-url", ocsp_url]
    before = openssl(*ocsp_args, "-cert", str(bad["leaf"]))
    assert f"{bad['leaf']}: good" in before.stdout
    assert "Response verify OK" in before.stderr
    assert "WARNING" not in before.stderr  # nonce echoed, times fine

    revoked = srv.cli_json("ca", "revoke", "--serial", str(bad["serial"]), "--reason",
                           "key-compromise")
    assert revoked["status"] == "revoked"

    crl_der = httpx.get(crl_url).content
    crl_pem = tmp_path / "crl.pem"
    crl_pem.write_bytes(x509.load_der_x509_crl(crl_der).public_bytes(serialization.Encoding.PEM))
    res = openssl("verify", "-crl_check", "-CAfile", str(bad["root"]), "-untrusted",
                  str(bad["inter"]), "-CRLfile", str(crl_pem), str(bad["leaf"]), check=False)
    assert res.returncode != 0
    assert "certificate revoked" in res.stdout + res.stderr
    ok = openssl("verify", "-crl_check", "-CAfile", str(good["root"]), "-untrusted",
                 str(good["inter"]), "-CRLfile", str(crl_pem), str(good["leaf"]))
    assert ok.stdout.strip().endswith(": OK")

    after = openssl(*ocsp_args, "-cert", str(bad["leaf"]))
    assert f"{bad['leaf']}: revoked" in after.stdout
    assert "Reason: keyCompromise" in after.stdout
    assert "Response verify OK" in after.stderr
    still_good = openssl(*ocsp_args, "-cert", str(good["leaf"]))
    assert f"{good['leaf']}: good" in still_good.stdout

    crl_text = openssl("crl", "-in", str(crl_pem), "-noout", "-text").stdout
    assert "X509v3 CRL Number" in crl_text and "Key Compromise" in crl_text
    assert "X509v3 Authority Key Identifier" in crl_text
    assert "Next Update" in crl_text


def test_ocsp_get_and_unknown_serial_and_nonce(srv: ServerProcess, tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "x"), "--template", "end-entity")
    leaf = x509.load_pem_x509_certificate(out["leaf"].read_bytes())  # type: ignore[union-attr]
    inter = x509.load_pem_x509_certificate(out["inter"].read_bytes())  # type: ignore[union-attr]
    import base64
    from urllib.parse import quote

    from cryptography.hazmat.primitives import hashes

    req = (ocsp.OCSPRequestBuilder().add_certificate(leaf, inter, hashes.SHA256())
           .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False).build())
    der = req.public_bytes(serialization.Encoding.DER)
    resp = httpx.get(f"{srv.base_url}/ocsp/{quote(base64.b64encode(der).decode(), safe='')}")
    assert resp.headers["content-type"] == "application/ocsp-response"
    parsed = ocsp.load_der_ocsp_response(resp.content)
    assert parsed.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert parsed.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == (
        b"0123456789abcdef")
    assert parsed.next_update_utc is not None and parsed.next_update_utc > parsed.this_update_utc
    responder = parsed.certificates[0]
    assert responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in list(eku)
    # A serial this CA never issued: "unknown".
    unknown = (ocsp.OCSPRequestBuilder()
               .add_certificate_by_hash(req.issuer_name_hash, req.issuer_key_hash, 12345,
                                        hashes.SHA256()).build())
    resp2 = httpx.post(f"{srv.base_url}/ocsp",
                       content=unknown.public_bytes(serialization.Encoding.DER),
                       headers={"Content-Type": "application/ocsp-request"})
    assert ocsp.load_der_ocsp_response(resp2.content).certificate_status == (
        ocsp.OCSPCertStatus.UNKNOWN)


def test_ocsp_garbage_is_malformed_and_foreign_issuer_unauthorized(
        srv: ServerProcess, tmp_path: Path) -> None:
    resp = httpx.post(f"{srv.base_url}/ocsp", content=b"this is not DER",
                      headers={"Content-Type": "application/ocsp-request"})
    assert resp.status_code == 200  # RFC 6960: errors travel inside the OCSP response
    assert ocsp.load_der_ocsp_response(resp.content).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    resp = httpx.get(f"{srv.base_url}/ocsp/!!!notbase64")
    assert ocsp.load_der_ocsp_response(resp.content).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    # A certificate from another CA, asked of ours: unauthorized.
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(tmp_path / "other.key"), "-subj", "/CN=other CA", "-days", "2",
            "-out", str(tmp_path / "other.pem"))
    res = openssl("ocsp", "-issuer", str(tmp_path / "other.pem"), "-serial", "0x1234",
                  "-url", f"{srv.base_url}/ocsp", check=False)
    assert "unauthorized" in (res.stdout + res.stderr).lower()


def test_a_request_for_several_certificates_is_malformed_and_each_alone_is_answered(
        srv: ServerProcess, tmp_path: Path) -> None:
    """One certificate per request (RFC 5019 2.1.1), as docs/ca.md says."""
    a = issue(srv, tmp_path, make_csr(tmp_path, "a"), "--template", "end-entity")
    b = issue(srv, tmp_path, make_csr(tmp_path, "b"), "--template", "end-entity")
    srv.cli_json("ca", "revoke", "--serial", str(b["serial"]), "--reason", "superseded")
    both = openssl("ocsp", "-issuer", str(a["inter"]), "-cert", str(a["leaf"]), "-cert",
                   str(b["leaf"]), "-CAfile", str(a["root"]), "-url", f"{srv.base_url}/ocsp",
                   check=False)
    assert both.returncode != 0
    assert "malformedrequest" in (both.stdout + both.stderr).lower()
    for out, status in ((a, "good"), (b, "revoked")):
        alone = openssl("ocsp", "-issuer", str(out["inter"]), "-cert", str(out["leaf"]),
                        "-CAfile", str(out["root"]), "-url", f"{srv.base_url}/ocsp")
        assert f"{out['leaf']}: {status}" in alone.stdout


BAD_CASES = {
    "garbage": lambda tmp: _write(tmp / "g.csr", b"hello, I am not a CSR\n"),
    "truncated": lambda tmp: _truncate(make_csr(tmp, "t")),
    "bad-signature": lambda tmp: _tamper(make_csr(tmp, "s")),
    "rsa-1024": lambda tmp: make_csr(tmp, "w", key="rsa:1024"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    return _write(path, data[: len(data) // 2] + b"\n-----END CERTIFICATE REQUEST-----\n")


def _tamper(path: Path) -> Path:
    csr = x509.load_pem_x509_csr(path.read_bytes())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # Flip a byte of the subject (inside the signed part): the signature no longer matches.
    idx = bytes(der).find(b"web.internal")
    der[idx] ^= 0x01
    return _write(path.with_suffix(".der"), bytes(der))


@pytest.mark.parametrize("case,expected", [
    ("garbage", "not a valid PKCS#10 CSR"),
    ("truncated", "not a valid PKCS#10 CSR"),
    ("bad-signature", "signature does not verify"),
    ("rsa-1024", "1024 bits is too weak"),
])
def test_bad_csrs_are_refused_precisely_and_nothing_is_stored(
        srv: ServerProcess, tmp_path: Path, case: str, expected: str) -> None:
    before = audit_count(srv)
    csr = BAD_CASES[case](tmp_path)
    proc = srv.cli("ca", "issue", "--csr", str(csr), "--template", "end-entity",
                   "--dns-name", "x.internal")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert proc.stdout == ""
    assert audit_count(srv) == before


def test_passthrough_refuses_ca_true(srv: ServerProcess, tmp_path: Path) -> None:
    csr = make_csr(tmp_path, "ca", extra=("-addext", "basicConstraints=critical,CA:TRUE"))
    proc = srv.cli("ca", "issue", "--csr", str(csr), "--template", "csr-passthrough",
                   "--output", "json")
    assert proc.returncode == 2
    err = json.loads(proc.stderr)["error"]
    assert err["code"] == "invalid_input" and "CA:TRUE" in err["message"]
    assert audit_count(srv) == 0


def test_passthrough_copies_validated_extensions(srv: ServerProcess, tmp_path: Path) -> None:
    csr = make_csr(tmp_path, "p", extra=(
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=clientAuth,emailProtection",
        "-addext", "subjectAltName=DNS:p.internal,URI:spiffe://example.org/ns/a/sa/b"))
    out = issue(srv, tmp_path, csr, "--template", "csr-passthrough")
    text = openssl("x509", "-in", str(out["leaf"]), "-noout", "-text").stdout
    assert "E-mail Protection" in text and "URI:spiffe://example.org/ns/a/sa/b" in text
    assert "CA:FALSE" in text


def test_validity_limits(srv: ServerProcess, tmp_path: Path,
                         start_server: Callable[..., ServerProcess]) -> None:
    csr = make_csr(tmp_path, "v")
    past_ca = srv.cli("ca", "issue", "--csr", str(csr), "--template", "code-signing",
                      "--validity", "1000d")
    assert past_ca.returncode == 2 and "after the signing CA expires" in past_ca.stderr
    past_template = srv.cli("ca", "issue", "--csr", str(csr), "--template", "end-entity",
                            "--validity", "400d")
    assert past_template.returncode == 2 and "template's maximum" in past_template.stderr
    short = start_server("--ca-mode", "short-lived", "--key-manager", "memory", name="short")
    too_long = short.cli("ca", "issue", "--csr", str(csr), "--template", "end-entity",
                         "--validity", "8d")
    assert too_long.returncode == 2 and "short-lived CA mode's limit of 7d" in too_long.stderr
    ok = short.cli_json("ca", "issue", "--csr", str(csr), "--template", "end-entity",
                        "--dns-name", "v.internal", "--validity", "7d")
    assert ok["serial"]
    assert audit_count(srv) == 0


def test_unknown_template_and_unknown_serial(srv: ServerProcess, tmp_path: Path) -> None:
    csr = make_csr(tmp_path, "u")
    proc = srv.cli("ca", "issue", "--csr", str(csr), "--template", "nope")
    assert proc.returncode == 2 and "nope" in proc.stderr
    # The API refuses it as well (the CLI's choice list is a convenience, not the check).
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(srv.socket))) as client:
        resp = client.post("http://x/v1/certificates",
                           json={"csr": csr.read_text(), "template": "nope"})
    assert resp.status_code == 400 and "unknown template 'nope'" in resp.text
    proc = srv.cli("ca", "revoke", "--serial", "abcdef0123", "--reason", "superseded")
    assert proc.returncode == 3 and "no certificate with serial abcdef0123" in proc.stderr
    proc = srv.cli("ca", "revoke", "--serial", "xyz")
    assert proc.returncode == 2 and "not a hexadecimal serial" in proc.stderr
    assert audit_count(srv) == 0


def test_idempotency_key_returns_the_same_certificate(srv: ServerProcess,
                                                      tmp_path: Path) -> None:
    csr = make_csr(tmp_path, "i")
    args = ("ca", "issue", "--csr", str(csr), "--template", "end-entity",
            "--idempotency-key", "req-42")
    first = srv.cli_json(*args)
    second = srv.cli_json(*args)
    assert first["serial"] == second["serial"] and second["reused"] is True
    assert audit_count(srv) == 1
    other = srv.cli("ca", "issue", "--csr", str(make_csr(tmp_path, "j")), "--template",
                    "end-entity", "--idempotency-key", "req-42")
    assert other.returncode == 4 and "already used for a different request" in other.stderr


def test_subordinate_ca_with_path_length(srv: ServerProcess, tmp_path: Path) -> None:
    csr = make_csr(tmp_path, "sub", subj="/O=team/CN=team sub CA")
    out = issue(srv, tmp_path, csr, "--template", "subordinate-ca", "--path-length", "0",
                "--validity", "30d")
    text = openssl("x509", "-in", str(out["leaf"]), "-noout", "-text").stdout
    assert "CA:TRUE, pathlen:0" in text and "Certificate Sign, CRL Sign" in text
    too_deep = srv.cli("ca", "issue", "--csr", str(csr), "--template", "subordinate-ca",
                       "--path-length", "1")
    assert too_deep.returncode == 2 and "path length" in too_deep.stderr


def test_audit_records_issuance_and_revocation(srv: ServerProcess, tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "a"), "--template", "end-entity",
                "--dns-name", "a.internal")
    srv.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "superseded")
    events = srv.cli_json("ca", "audit")
    assert [e["action"] for e in events] == ["issue", "revoke"]
    issue_ev, revoke_ev = events
    assert issue_ev["serial"] == revoke_ev["serial"] == out["serial"]
    assert issue_ev["template"] == "end-entity" and "DNS:a.internal" in issue_ev["sans"]
    assert issue_ev["actor"].startswith("unix:uid:")
    assert issue_ev["not_after"] and issue_ev["subject"] == "CN=web.internal"
    assert revoke_ev["reason"] == "superseded"
    csv_out = srv.cli("ca", "audit", "--output", "csv", check=True).stdout.splitlines()
    assert csv_out[0].startswith("id,at,actor,action,serial")
    assert len(csv_out) == 3


def test_show_prints_chain_and_fingerprints(srv: ServerProcess) -> None:
    info = srv.cli_json("ca", "show")
    assert [c["role"] for c in info["chain"]] == ["signing", "root"]
    text = srv.cli("ca", "show", check=True).stdout
    for cert in info["chain"]:
        assert cert["fingerprint_sha256"] in text
    inter = x509.load_pem_x509_certificate(info["chain"][0]["pem"].encode())
    nc = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert [g.value for g in nc.value.permitted_subtrees] == ["example.org"]
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    root = x509.load_pem_x509_certificate(info["chain"][1]["pem"].encode())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 2


def test_uri_outside_trust_domain_is_refused(srv: ServerProcess, tmp_path: Path) -> None:
    proc = srv.cli("ca", "issue", "--csr", str(make_csr(tmp_path, "o")), "--template",
                   "end-entity", "--uri", "spiffe://other.org/x")
    assert proc.returncode == 2 and "outside this CA's permitted URI domains" in proc.stderr
